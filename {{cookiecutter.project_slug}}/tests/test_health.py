import io
import json
import os
import socket
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import OperationalError, connection
from django.utils import timezone

from agentic_django import lifecycle
from agentic_django.models import AgentWorker


@pytest.mark.django_db
def test_healthz_reports_database_ok(client):
    response = client.get("/healthz/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_chat_requires_login(client, user):
    assert client.get("/").status_code == 302
    client.force_login(user)
    assert client.get("/").status_code == 200


@pytest.mark.django_db
def test_pages_carry_the_project_name(client, settings):
    settings.PROJECT_NAME = "Support Desk"
    assert "<title>Log in · Support Desk</title>" in client.get("/accounts/login/").text


# --- /readyz/ -------------------------------------------------------------------------------

DATABASE_TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
RQ_TASKS = {"default": {"BACKEND": "django_tasks_rq.RQBackend", "QUEUES": ["default"]}}


def live_worker(hostname="worker-1"):
    lifecycle.announce_worker(hostname, slots=4, hostname=hostname, pid=1)


def closed_port():
    """A loopback port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def fake_redis():
    """A loopback server answering Redis's PING (+PONG) and any other command (+OK); its URL."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            with client:
                pending = b""
                while chunk := client.recv(65536):
                    pending += chunk
                    # Each command is a RESP array: "*<n>", then "$<len>" and the bytes of each.
                    while (lines := pending.split(b"\r\n")) and len(lines) > 1:
                        count = int(lines[0][1:])
                        if len(lines) < 2 + 2 * count:
                            break
                        words = lines[2 : 2 + 2 * count : 2]
                        pending = b"\r\n".join(lines[1 + 2 * count :])
                        client.sendall(b"+PONG\r\n" if words[0].upper() == b"PING" else b"+OK\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield f"redis://:s3cret@127.0.0.1:{server.getsockname()[1]}/0"
    server.close()


@pytest.mark.django_db
def test_readyz_is_ready_with_a_live_worker(client, settings):
    settings.TASKS = DATABASE_TASKS
    settings.SECURE_SSL_REDIRECT = True  # probes speak plain HTTP to the container
    live_worker()
    response = client.get("/readyz/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "workers": "ok"}}
    assert "no-store" in response["Cache-Control"]


@pytest.mark.django_db
@pytest.mark.parametrize("heartbeat", ["absent", "stale"])
def test_readyz_is_unavailable_without_a_live_worker(client, settings, heartbeat):
    settings.TASKS = DATABASE_TASKS
    if heartbeat == "stale":
        live_worker()
        a_lease_ago = timezone.now() - timedelta(seconds=settings.AGENTIC_DJANGO_LEASE_SECONDS + 5)
        AgentWorker.objects.update(heartbeat_at=a_lease_ago)
    response = client.get("/readyz/")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {"database": "ok", "workers": "no live worker"},
        "failing": ["workers"],
    }


@pytest.mark.django_db
def test_readyz_needs_no_worker_with_the_immediate_backend(client):
    response = client.get("/readyz/")  # the tests' own backend runs tasks in the request
    assert (response.status_code, response.json()["checks"]) == (200, {"database": "ok"})


@pytest.mark.django_db
def test_readyz_is_unavailable_while_the_database_is(client, settings, monkeypatch):
    settings.TASKS = DATABASE_TASKS

    def refused():
        raise OperationalError("connection to server at 10.0.0.5 failed: password=hunter2")

    monkeypatch.setattr(connection, "cursor", refused)
    response = client.get("/readyz/")
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": "unreachable", "workers": "unknown"}
    assert b"hunter2" not in response.content and b"10.0.0.5" not in response.content


@pytest.mark.django_db
def test_readyz_checks_redis_with_the_rq_backend(client, settings, fake_redis):
    pytest.importorskip("redis")
    settings.TASKS = RQ_TASKS
    live_worker()
    settings.REDIS_URL = fake_redis
    ready = client.get("/readyz/")
    assert (ready.status_code, ready.json()["checks"]["broker"]) == (200, "ok")
    settings.REDIS_URL = f"redis://:s3cret@127.0.0.1:{closed_port()}/0"
    unready = client.get("/readyz/")
    assert unready.status_code == 503
    assert unready.json()["failing"] == ["broker"]
    assert b"s3cret" not in unready.content and b"127.0.0.1" not in unready.content


# --- The worker's container health check (manage.py agentic_django_worker --check) ----------


@pytest.mark.django_db
def test_the_worker_check_passes_only_with_a_live_worker_on_this_host():
    live_worker(hostname="another-host")
    with pytest.raises(CommandError, match="No worker on"):
        call_command("agentic_django_worker", "--check", stdout=io.StringIO())
    live_worker(hostname=socket.gethostname())
    call_command("agentic_django_worker", "--check", stdout=io.StringIO())


def test_a_fresh_process_logs_json_and_its_health_checks_skip_the_agents_sdk():
    """LOG_FORMAT=json as the settings configure it; /readyz/ and the worker's health check
    (a process of its own every 30 s in compose) import no Agents SDK."""
    script = (
        "import logging, sys, django; django.setup();"
        "from django.urls import resolve; resolve('/readyz/'); import config.health;"
        "import agentic_django.lifecycle, agentic_django.management.commands.agentic_django_worker;"
        "logging.getLogger('probe').warning('sdk %s', 'agents' in sys.modules)"
    )
    env = {**os.environ, "LOG_FORMAT": "json", "DJANGO_SETTINGS_MODULE": "config.settings"}
    done = subprocess.run(  # noqa: S603 (this interpreter, a fixed script)
        [sys.executable, "-c", script],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    line = json.loads(done.stderr.strip().splitlines()[-1])
    assert {k: line[k] for k in ("level", "logger", "message")} == {
        "level": "WARNING",
        "logger": "probe",
        "message": "sdk False",
    }
