"""No trace leaves the machine unless asked for: whatever the provider settings, a worker
process -- its start-up warm-up and a real run included -- opens no connection to anywhere but
the model server, unless `OPENAI_TRACING=True` with OpenAI itself as the provider.

Each case is a fresh process (tracing is configured once per process) with its own SQLite
database, whose every outgoing HTTP(S) connection goes through a recording proxy on loopback:
the proxy refuses them all and keeps what they asked for. The last case is the control: there
the SDK's exporter must show up at the proxy, or the test could not see a leak.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.conf import settings

from tests.fakes.openai_server import FakeOpenAI, Text

pytestmark = pytest.mark.slow

PROJECT_DIR = Path(settings.BASE_DIR)
OPENAI_HOST = "api.openai.com"

# A worker process as `agentic_django_worker` starts one (preload: SDK import and warm-up run),
# then one run of a sample agent (the assistant unless RUN_AGENT says), in a database of its own.
WORKER = """
import django, os, sys
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from agentic_django.workers import preload
preload()
from django.contrib.auth import get_user_model
from agentic_django.execution import execute
from agentic_django.models import AgentRun, AgentSession
user = get_user_model().objects.create_user("tracer")
session = AgentSession.objects.create(owner=user, session_key="trace")
run = AgentRun.objects.create(session=session, owner=user,
                              agent_key=os.environ.get("RUN_AGENT", "assistant"),
                              input_payload=os.environ.get("RUN_INPUT", "Hello"))
print("run ended", execute(str(run.pk)), flush=True)
"""


class RecordingProxy:
    """An HTTP proxy on loopback that refuses every request and records what it asked for
    (``CONNECT host:443`` for HTTPS)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    line = conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
                except OSError:
                    continue
                self.requests.append(line)
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self._server.close()

    def to(self, host: str) -> list[str]:
        return [request for request in self.requests if host in request]


@pytest.fixture
def proxy() -> Iterator[RecordingProxy]:
    recording = RecordingProxy()
    yield recording
    recording.close()


def worker_process(tmp_path: Path, name: str, proxy: RecordingProxy, **provider: str) -> str:
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPENAI_")}
    proxy_url = f"http://127.0.0.1:{proxy.port}"
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DATABASE_URL": f"sqlite:///{tmp_path / name}.sqlite3",
            "HTTP_PROXY": proxy_url,
            "HTTPS_PROXY": proxy_url,
            "ALL_PROXY": proxy_url,
            "NO_PROXY": "127.0.0.1,localhost",
            "OPENAI_MAX_RETRIES": "0",
            "OPENAI_TIMEOUT": "10",
            **provider,
        }
    )
    for lower in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        env.pop(lower, None)
    result = subprocess.run(  # noqa: S603 (this interpreter, a fixed script)
        [sys.executable, "-c", WORKER],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "run ended" in output, output[-3000:]
    return output


def test_no_trace_leaves_the_machine_unless_asked_for_with_openai(tmp_path, proxy):
    cases = {
        "demo model": {},
        # Another server with a key, tracing asked for: it still never goes to OpenAI.
        "own server": {
            "OPENAI_API_KEY": "sk-not-for-openai",
            "OPENAI_TRACING": "True",
            "OPENAI_API_MODE": "chat_completions",
        },
        "openai, not asked": {"OPENAI_API_KEY": "sk-test"},
    }
    with FakeOpenAI() as fake:
        fake.reply(Text("Hello from your own server."))
        cases["own server"]["OPENAI_BASE_URL"] = fake.url
        with ThreadPoolExecutor(max_workers=2) as pool:
            outputs = dict(
                zip(
                    cases,
                    pool.map(
                        lambda item: worker_process(tmp_path, item[0], proxy, **item[1]),
                        [
                            (name.replace(" ", "-").replace(",", ""), case)
                            for name, case in cases.items()
                        ],
                    ),
                    strict=True,
                )
            )
        assert len(fake.requests) == 1  # the own-server run reached its server
    assert "completed" in outputs["demo model"] and "completed" in outputs["own server"]
    # The OpenAI run's model call went to the proxy (and was refused): only that.
    openai_calls = proxy.to(OPENAI_HOST)
    assert openai_calls == [f"CONNECT {OPENAI_HOST}:443 HTTP/1.1"], proxy.requests
    assert len(proxy.requests) == 1, proxy.requests

    # The control: asked for, with OpenAI, the SDK's exporter connects too (and is refused).
    proxy.requests.clear()
    worker_process(tmp_path, "openai-asked", proxy, OPENAI_API_KEY="sk-test", OPENAI_TRACING="True")
    assert len(proxy.to(OPENAI_HOST)) > 1, proxy.requests
