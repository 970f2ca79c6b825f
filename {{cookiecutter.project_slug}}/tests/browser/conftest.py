"""Playwright (sync API) driving Chromium against pytest-django's live server.

Chromium: $CHROMIUM_PATH, else /usr/bin/chromium, else Playwright's own download (CI runs
`playwright install chromium`); the tests skip with the reason when none is there.
Every page records console errors, page errors and CSP violations; a test fails on any.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.conf import settings

from tests.needs import INSTALL_CHROMIUM, chromium_executable

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = Path(settings.BASE_DIR) / "test-artifacts"
PASSWORD = "correct-horse-42"
IMMEDIATE = {"default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}}
# Stores enqueued tasks without running them: runs stay pending until the test runs them.
DEFERRED = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}

# Report CSP violations to the test (init scripts are not subject to the page's CSP).
_CSP_LISTENER = """
document.addEventListener("securitypolicyviolation", (event) => {
  window.__reportCsp(`${event.violatedDirective} blocked ${event.blockedURI || "inline"}`);
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Chromium for one test module; Playwright's event loop must not outlive these tests."""
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; the tests' ORM calls are sync.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            executable = chromium_executable()
            if executable is None and not Path(playwright.chromium.executable_path).exists():
                pytest.skip(f"no Chromium ({INSTALL_CHROMIUM})")
            instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
            yield instance
            instance.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@dataclass
class AsgiServer:
    url: str


@pytest.fixture
def server(transactional_db) -> Iterator[AsgiServer]:
    """The project's ASGI application served by uvicorn in a thread, as compose serves it (a
    WSGI server would buffer each server-sent event stream until its end). Static files are
    served as in development; the test database is the one the test writes."""
    import asyncio
    import threading

    import uvicorn
    from asgiref.sync import SyncToAsync
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
    from django.core.asgi import get_asgi_application
    from django.db import connections

    port = free_port()
    config = uvicorn.Config(
        ASGIStaticFilesHandler(get_asgi_application()),
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_level="warning",
    )
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, name="uvicorn", daemon=True)
    thread.start()
    while not uvicorn_server.started:
        assert thread.is_alive(), "uvicorn did not start"
        threading.Event().wait(0.02)
    yield AsgiServer(url=f"http://localhost:{port}")
    uvicorn_server.should_exit = True
    thread.join(30)
    # The views' database work ran on asgiref's thread: close its connections there.
    executor = SyncToAsync.single_thread_executor
    executor.submit(connections.close_all).result()
    asyncio.set_event_loop(None)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PageProblems:
    """Console errors, uncaught page errors and CSP violations seen by one page."""

    console: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    csp: list[str] = field(default_factory=list)
    expected_statuses: set[int] = field(default_factory=set)
    expected_messages: list[str] = field(default_factory=list)

    def expect_http_error(self, status: int) -> None:
        """The test provokes this HTTP status; Chromium (and htmx, for 5xx) log it as an error."""
        self.expected_statuses.add(status)

    def expect_console(self, text: str) -> None:
        """The test provokes console errors containing ``text`` (e.g. a blocked request)."""
        self.expected_messages.append(text)

    def all(self) -> list[str]:
        expected = [f"the server responded with a status of {s} " for s in self.expected_statuses]
        expected += [f"Response Status Error Code {s} " for s in self.expected_statuses]  # htmx
        expected += self.expected_messages
        console = [m for m in self.console if not any(e in m for e in expected)]
        return console + self.page_errors + self.csp


@pytest.fixture
def problems() -> PageProblems:
    return PageProblems()


@pytest.fixture
def page(browser, server, transactional_db, problems, request) -> Iterator[object]:
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 860})
    context.expose_function("__reportCsp", lambda text: problems.csp.append(text))
    context.add_init_script(_CSP_LISTENER)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.on("console", lambda msg: msg.type == "error" and problems.console.append(msg.text))
    page.on("pageerror", lambda error: problems.page_errors.append(str(error)))
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"failed-{request.node.name}.png", full_page=True)
    context.close()
    assert problems.all() == [], f"console errors or CSP violations: {problems.all()}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.rep_call = report
    return report


@pytest.fixture(autouse=True)
def _browser_settings(settings):
    settings.AGENTIC_DJANGO_AGENT_REGISTRY = "tests.browser.registry.get_agent_registry"
    settings.AGENTIC_DJANGO_RATE_LIMIT = None
    settings.TASKS = IMMEDIATE


@pytest.fixture
def chat_user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password=PASSWORD)


@pytest.fixture
def chat(page, chat_user):
    """A page logged in through the login form, showing a new chat."""
    page.goto("/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/")
    page.get_by_role("heading", name="How can I help?").wait_for()
    return page


def screenshot(page, name: str) -> None:
    """Save a screenshot of the current page as a test artifact."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def send(page, text: str) -> None:
    """Type a message into the composer and send it with Enter."""
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    box.press("Enter")


def last_run(page):
    return page.locator("#turns .agentic-run").last
