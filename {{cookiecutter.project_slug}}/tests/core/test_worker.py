"""The worker process (``manage.py agentic_django_worker``) on this project's task backend.

It is started for real, against the test database (and Redis for RQ), with the project's own
settings and the offline demo model. Nobody polls: the worker alone must heal the queue.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection

from agentic_django import lifecycle
from agentic_django.models import AgentRun, AgentSession, AgentWorker, DispatchLock
from tests.core.conftest import running_elsewhere, worker_died

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

PROJECT_DIR = Path(settings.BASE_DIR)
LEASE_SECONDS = 5  # sweeps every 2.5 s
PATIENCE = 120.0


def configured_backend() -> str:
    import config.settings as project_settings

    return project_settings.TASKS["default"]["BACKEND"]


def database_url() -> str:
    """The test database, as DATABASE_URL for another process."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    auth = f"{quote(db['USER'])}:{quote(db['PASSWORD'])}@" if db["USER"] else ""
    return f"postgres://{auth}{db['HOST']}:{db['PORT']}/{db['NAME']}"


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Path]:
    """A worker process of this project; yields its log file."""
    if "ImmediateBackend" in configured_backend():
        pytest.skip("the immediate task backend has no worker")
    log_path = tmp_path / "worker.log"
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "AGENTIC_DJANGO_LEASE_SECONDS": str(LEASE_SECONDS),
        "AGENTIC_DJANGO_CONCURRENCY_LIMIT": "7",
        "OPENAI_API_KEY": "",
        "OPENAI_AGENTS_DISABLE_TRACING": "1",
        "DJANGO_SETTINGS_MODULE": "config.settings",
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "agentic_django_worker"],
            cwd=PROJECT_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield log_path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        print(log_path.read_text(errors="replace")[-4000:])  # shown when the test failed


def wait_for(condition, what: str, log: Path) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; worker log:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def test_an_idle_worker_recovers_a_dead_run_and_dispatches_the_run_behind_it(user, worker):
    # The worker has started: preloaded, announced its slots, swept once.
    wait_for(lambda: AgentWorker.objects.exists(), "the worker to start", worker)
    assert AgentWorker.objects.get().slots == 50
    # Compose's health check of the worker's container finds its heartbeat.
    check = subprocess.run(
        [sys.executable, "manage.py", "agentic_django_worker", "--check"],
        cwd=PROJECT_DIR,
        env={**os.environ, "DATABASE_URL": database_url()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    # Its concurrency limit holds for every process of the deployment.
    assert DispatchLock.objects.get(name=lifecycle.LOCK_NAME).concurrency_limit == 7
    session = AgentSession.objects.create(owner=user, session_key="idle")
    dead = running_elsewhere(session, agent_key="assistant", text_input="Hello there")
    worker_died(dead)
    behind = AgentRun.objects.create(
        session=session, owner=user, agent_key="assistant", input_payload="And then?"
    )  # created, never enqueued: only a sweep can find it

    def settled() -> bool:
        return all(AgentRun.objects.get(pk=r.pk).is_terminal for r in (dead, behind))

    wait_for(settled, "the periodic sweep to heal the session", worker)
    dead.refresh_from_db()
    behind.refresh_from_db()
    assert (dead.status, dead.attempt) == ("completed", 2)
    assert (behind.status, behind.attempt) == ("completed", 1)
    assert behind.started_at >= dead.finished_at
    assert "Preloaded the Agents SDK" in worker.read_text()
