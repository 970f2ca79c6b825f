"""The compose stack, run natively: real PostgreSQL and Redis on loopback, and the generated
project's migrate, web and worker processes started with the commands and environment that
`docker compose config` gives them (only the service addresses differ, as Docker's DNS would).

The settings are production ones (DEBUG off, secure cookies, HTTPS redirect); the test client
plays the TLS proxy in front of the web service, sending `X-Forwarded-Proto: https`.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from scripts.native_stack import Stack, build_project, kill_tree, running_servers
from tests.conftest import Combo, combo_params

pytestmark = pytest.mark.stack

STACK_COMBOS = [Combo("rq", "postgres", "none"), Combo("database", "postgres", "none")]
USERNAME = "alice"
PASSWORD = "stack-test-password-42"
# The demo model's slow path: a message "/slow N" answers after N seconds.
SLOW_SECONDS = 6
RUN_DEADLINE = 90.0


class BrowserCookiePolicy(http.cookiejar.DefaultCookiePolicy):
    """Send Secure cookies although the hop to the app is plain HTTP (the proxy's view)."""

    def return_ok_secure(self, cookie, request) -> bool:
        return True


@pytest.fixture
def stack(request, tmp_path) -> Iterator[Stack]:
    built = build_project(tmp_path, request.param)
    logs = tmp_path / "logs"
    logs.mkdir()
    stack = Stack(
        project=built.project, services=built.services, base_env=built.base_env, logs=logs
    )
    try:
        with running_servers(stack, request.param):
            yield stack
    finally:
        # Shown by pytest only when the test failed.
        for name in stack.processes:
            print(f"--- {name} log (tail) ---\n{stack.log(name)[-6000:]}")


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    text: str

    def json(self):
        return json.loads(self.text)


class NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class Client:
    """An HTTP client behind a TLS-terminating proxy: https as far as Django can tell."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.origin = f"https://127.0.0.1:{port}"
        self.cookies = http.cookiejar.CookieJar(policy=BrowserCookiePolicy())
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.cookies), NoRedirects()
        )

    def request(self, method: str, path: str, *, data=None, json_body=None, headers=None):
        body, all_headers = None, {"X-Forwarded-Proto": "https", **(headers or {})}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            all_headers["Content-Type"] = "application/json"
        elif data is not None:
            body = urllib.parse.urlencode(data).encode()
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        request = urllib.request.Request(
            self.base + path, data=body, headers=all_headers, method=method
        )
        try:
            with self.opener.open(request, timeout=30) as response:
                return Response(response.status, dict(response.headers), response.read().decode())
        except urllib.error.HTTPError as error:
            return Response(error.code, dict(error.headers), error.read().decode(errors="replace"))

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, **kwargs) -> Response:
        csrf = next((c.value for c in self.cookies if c.name == "csrftoken"), "")
        headers = {"Origin": self.origin, "Referer": self.origin + path, "X-CSRFToken": csrf}
        return self.request("POST", path, headers=headers, **kwargs)

    def login(self) -> None:
        form = self.get("/accounts/login/")
        assert form.status == 200, form.text[:2000]
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        assert token, "the login form has no CSRF token"
        response = self.post(
            "/accounts/login/",
            data={"username": USERNAME, "password": PASSWORD, "csrfmiddlewaretoken": token[1]},
        )
        assert response.status == 302, response.text[:2000]
        assert "/accounts/login/" not in response.headers["Location"]

    def submit(self, session_key: str, text: str) -> str:
        response = self.post("/agents/runs/", json_body={"session_key": session_key, "input": text})
        assert response.status == 201, response.text[:2000]
        return response.json()["id"]

    def run(self, run_id: str) -> dict:
        response = self.get(f"/agents/runs/{run_id}/")
        assert response.status == 200, response.text[:2000]
        return response.json()

    def wait_for(self, run_id: str, predicate, what: str, deadline: float = RUN_DEADLINE) -> dict:
        """Poll the run until `predicate(run)` holds; fail after `deadline` seconds."""
        stop = time.monotonic() + deadline
        while True:
            run = self.run(run_id)
            if predicate(run):
                return run
            if time.monotonic() > stop:
                pytest.fail(f"run {run_id} never became {what}: {run}", pytrace=False)
            time.sleep(0.3)

    def items(self, session_key: str) -> list[dict]:
        response = self.get(f"/agents/sessions/{session_key}/items/?limit=100")
        assert response.status == 200, response.text[:2000]
        return response.json()["items"]


def wait_until_healthy(stack: Stack, web: subprocess.Popen) -> None:
    stop = time.monotonic() + 60
    while not stack.healthy():
        assert web.poll() is None, f"web exited:\n{stack.log('web')}"
        assert time.monotonic() < stop, f"web never became healthy:\n{stack.log('web')}"
        time.sleep(0.3)


def run_row(stack: Stack, run_id: str) -> dict:
    """Internals the API does not show (attempts, lease), read straight from PostgreSQL."""
    with psycopg.connect(stack.overrides["DATABASE_URL"]) as connection:
        cursor = connection.execute(
            "SELECT attempt, lease_expires_at, now() AS db_now"
            " FROM agentic_django_agentrun WHERE id = %s",
            (uuid.UUID(run_id),),
        )
        columns = [column.name for column in cursor.description]
        return dict(zip(columns, cursor.fetchone(), strict=True))


def wait_for_lease_expiry(stack: Stack, run_id: str) -> None:
    """Until the dead worker's lease runs out, recovery must (and does) leave the run alone."""
    row = run_row(stack, run_id)
    assert row["lease_expires_at"] is not None, row
    stop = time.monotonic() + (row["lease_expires_at"] - row["db_now"]).total_seconds() + 30
    while run_row(stack, run_id)["lease_expires_at"] >= run_row(stack, run_id)["db_now"]:
        assert time.monotonic() < stop, "the lease never expired"
        time.sleep(0.5)


def texts(items: list[dict], role: str) -> list[str]:
    """The text of every item with this role (user input items or assistant messages)."""
    found = []
    for item in items:
        payload = item["payload"]
        if payload.get("role") != role:
            continue
        content = payload.get("content")
        if isinstance(content, str):
            found.append(content)
        else:
            found.append("".join(part.get("text", "") for part in content or []))
    return found


def has_slow_path(project: Path) -> bool:
    return "/slow" in (project / "chat/demo_model.py").read_text()


def start_stack(stack: Stack) -> tuple[Client, subprocess.Popen]:
    """migrate, a user, then web and worker; returns a logged-in client and the worker."""
    stack.run_once("migrate")
    stack.manage(
        "createsuperuser", "--no-input", "--username", USERNAME, "--email", "alice@example.com",
        env={"DJANGO_SUPERUSER_PASSWORD": PASSWORD},
    )  # fmt: skip
    web = stack.start("web")
    worker = stack.start("worker")
    wait_until_healthy(stack, web)
    client = Client(stack.web_port)
    client.login()
    return client, worker


@pytest.mark.parametrize("stack", combo_params(STACK_COMBOS), indirect=True)
def test_stack_serves_the_chat_with_production_settings(stack: Stack):
    client, _ = start_stack(stack)
    plain = client.request("GET", "/accounts/login/", headers={"X-Forwarded-Proto": "http"})
    assert plain.status == 301 and plain.headers["Location"].startswith("https://")
    chat = client.get("/")
    assert chat.status == 200 and USERNAME in chat.text
    assert "Strict-Transport-Security" in chat.headers

    run_id = client.submit("stack-hello", "Hello from the stack test")
    done = client.wait_for(run_id, lambda run: run["is_terminal"], "terminal")
    assert done["status"] == "completed", (done, stack.log("worker"))
    assert done["final_output"]
    items = client.items("stack-hello")
    assert texts(items, "user") == ["Hello from the stack test"]
    assert len(texts(items, "assistant")) == 1
    assert "Preloaded the Agents SDK" in stack.log("worker")


@pytest.mark.parametrize("stack", combo_params(STACK_COMBOS), indirect=True)
def test_stack_recovers_a_run_whose_worker_was_killed(stack: Stack):
    if not has_slow_path(stack.project):
        pytest.skip("the demo model has no slow path ('/slow N' message) to kill a worker mid-run")
    client, worker = start_stack(stack)
    slow_text = f"/slow {SLOW_SECONDS}"
    slow = client.submit("stack-slow", slow_text)
    client.wait_for(slow, lambda run: run["status"] == "running", "running")
    kill_tree(worker)
    assert client.run(slow)["status"] == "running"

    # What `restart: unless-stopped` does: the same worker command again, right away; work
    # submitted meanwhile is not held up by the dead run.
    stack.start("worker", name="worker-2")
    during = client.submit("stack-during-lease", "Hello during the lease")
    assert client.wait_for(during, lambda run: run["is_terminal"], "terminal")["status"] == (
        "completed"
    )
    assert client.run(slow)["status"] == "running"

    # The user goes on in the stuck conversation once the dead worker's lease has expired: the
    # new message finds the dead run in its way, which is recovered per the setting first.
    recovery = stack.env_for("worker").get("AGENTIC_DJANGO_STARTUP_RECOVERY", "requeue")
    assert recovery == "requeue", "compose leaves the default; this test checks that policy"
    wait_for_lease_expiry(stack, slow)
    after_text = "Hello after the lease"
    after = client.submit("stack-slow", after_text)
    recovered = client.wait_for(slow, lambda run: run["is_terminal"], "terminal")
    assert recovered["status"] == "completed", (recovered, stack.log("worker-2"))
    finished = client.wait_for(after, lambda run: run["is_terminal"], "terminal")
    assert finished["status"] == "completed", finished
    started_after = datetime.fromisoformat(finished["started_at"])
    assert started_after >= datetime.fromisoformat(recovered["finished_at"]), "order lost"

    # Nothing lost, nothing twice: each message once, each answered once, in order.
    items = client.items("stack-slow")
    assert texts(items, "user") == [slow_text, after_text]
    assert len(texts(items, "assistant")) == 2
    roles = [item["payload"].get("role") for item in items if item["payload"].get("role")]
    assert roles == ["user", "assistant", "user", "assistant"], roles
    assert run_row(stack, slow)["attempt"] == 2
    assert run_row(stack, during)["attempt"] == 1 and run_row(stack, after)["attempt"] == 1
