"""The web process as `make dev` and compose run it -- uvicorn serving `config.asgi` -- creates
runs, serves pages and streams without loading the Agents SDK (workers run the agents), so it
starts and reloads at once; and it starts without a traceback. Only the immediate backend runs
agents in the web process: then it loads and warms the SDK, in the background."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils.crypto import get_random_string

from agentic_django.models import AgentRun
from config.startup import IMMEDIATE_BACKEND
from tests.waiting import wait_for
from tests.web.live import TIMEOUT, ClientLoop, StreamClient, WebProcess, database_url

pytestmark = pytest.mark.django_db(transaction=True)

# uvicorn as `uvicorn --reload` (make dev) runs its server process: the application loads in the
# server's running event loop. The process writes the modules it imported as it exits.
UVICORN = """
import atexit, json, os, sys
import uvicorn
modules = os.environ["AGENTIC_TEST_MODULES_FILE"]
atexit.register(lambda: open(modules, "w").write(json.dumps(sorted(sys.modules))))
config = uvicorn.Config(
    "config.asgi:application", fd=int(sys.argv[1]), lifespan="off", timeout_graceful_shutdown=2
)
try:
    uvicorn.Server(config).run()
except KeyboardInterrupt:  # the test stops it as Ctrl-C does: uvicorn raises it once stopped
    pass
"""
DUMMY_BACKEND = "django.tasks.backends.dummy.DummyBackend"
SDK = "agents"


@dataclass
class Server:
    web: WebProcess
    log: Path
    modules_file: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> set[str]:
        """Stop the process as Ctrl-C does; the modules it had imported. (uvicorn raises the
        signal again once stopped: SIGINT, unlike SIGTERM, lets the process exit normally.)"""
        self.web.popen.send_signal(signal.SIGINT)
        self.web.popen.wait(TIMEOUT)
        return set(json.loads(self.modules_file.read_text()))


@contextlib.contextmanager
def web_server(tmp_path: Path, task_backend: str = "") -> Iterator[Server]:
    """uvicorn serving ``config.asgi:application`` on the test database, logging at INFO (access
    log included)."""
    listening = socket.create_server(("127.0.0.1", 0))
    name = f"agentic-web-{uuid.uuid4().hex[:12]}"
    log, modules_file = tmp_path / f"{name}.log", tmp_path / f"{name}.json"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.web.process_settings",
        "DATABASE_URL": database_url(connection.settings_dict, name),
        "SECRET_KEY": settings.SECRET_KEY,  # the session's signature must hold there
        "SECURE_SSL_REDIRECT": "false",
        "LOG_LEVEL": "INFO",
        "PYTHONWARNINGS": "ignore:No directory at",  # whitenoise: no collectstatic here
        "AGENTIC_TEST_MODULES_FILE": str(modules_file),
        "AGENTIC_TEST_TASK_BACKEND": task_backend,
    }
    argv = [sys.executable, "-c", UVICORN, str(listening.fileno())]
    with log.open("wb") as output:
        popen = subprocess.Popen(  # noqa: S603 (this interpreter, fixed arguments)
            argv,
            cwd=settings.BASE_DIR,
            env=env,
            pass_fds=[listening.fileno()],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    host, port = listening.getsockname()[:2]
    listening.close()
    try:
        yield Server(WebProcess(popen, host, port, name), log, modules_file)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()


def request(web: WebProcess, method: str, path: str, cookies: str, body: str = "") -> bytes:
    """An HTTP/1.0 request (the connection closes after the answer); the whole answer."""
    csrf = cookies.split("csrftoken=")[-1].split(";")[0]
    head = (
        f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nCookie: {cookies}\r\n"
        f"X-CSRFToken: {csrf}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body.encode())}\r\n\r\n"
    )
    with socket.create_connection((web.host, web.port), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode() + body.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def login_cookies(user) -> str:
    client = Client()
    client.force_login(user)
    session = client.cookies[settings.SESSION_COOKIE_NAME].value
    return f"{settings.SESSION_COOKIE_NAME}={session}; csrftoken={get_random_string(32)}"


def no_trouble(output: str) -> None:
    for trouble in ("Traceback", "Warm-up agent run failed", "was never awaited"):
        assert trouble not in output, output


def test_the_web_process_never_loads_the_agents_sdk(tmp_path, user):
    """With the project's task backend (workers run the agents; an immediate one is swapped for
    a dummy here): the chat page, a run created, its fragment and its stream to the end."""
    project_backend = settings.TASKS["default"]["BACKEND"]
    backend = DUMMY_BACKEND if project_backend == IMMEDIATE_BACKEND else ""
    cookies = login_cookies(user)
    with web_server(tmp_path, backend) as server, ClientLoop() as clients:
        web = server.web
        assert request(web, "GET", "/", cookies).startswith(b"HTTP/1.1 200"), server.output()
        body = json.dumps({"input": "hello", "session_key": "web-process"})
        created = request(web, "POST", reverse("agents:run-create"), cookies, body)
        assert created.startswith(b"HTTP/1.1 201"), created[:2000]
        run = AgentRun.objects.get(owner=user, session__session_key="web-process")
        fragment = request(web, "GET", reverse("agents:run-fragment", args=[run.pk]), cookies)
        assert fragment.startswith(b"HTTP/1.1 200")

        stream = StreamClient()
        clients.run(stream.open(web, reverse("agents:run-stream", args=[run.pk]), cookies))
        # What a worker would write: streamed text, then the end of the run.
        AgentRun.objects.filter(pk=run.pk).update(status="running", attempt=1, stream_text="Hi")
        wait_for(lambda: web.check() or stream.got("delta"), "the streamed text")
        AgentRun.objects.filter(pk=run.pk).update(status="completed", stream_text="")
        wait_for(lambda: web.check() or stream.got("end"), "the end of the stream")
        clients.run(stream.close())
        modules = server.stop()
    assert SDK not in modules, sorted(m for m in modules if m.startswith(SDK))
    assert "chat.registry" in modules  # the run's agent key was checked against the registry
    no_trouble(server.output())


def test_with_the_immediate_backend_it_warms_the_sdk_in_the_background(tmp_path, user):
    """It serves at once; the SDK loads and warms up meanwhile, cleanly (uvicorn's event loop
    runs in the main thread: a warm-up there used to fail at every start)."""
    with web_server(tmp_path, IMMEDIATE_BACKEND) as server:
        web = server.web
        assert request(web, "GET", "/healthz/", "").startswith(b"HTTP/1.1 200"), server.output()
        wait_for(
            lambda: web.check() or "Preloaded the Agents SDK" in server.output(),
            "the Agents SDK to be preloaded",
        )
        modules = server.stop()
    assert SDK in modules
    no_trouble(server.output())
