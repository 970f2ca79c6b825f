import os
from pathlib import Path

import pytest

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")

IMMEDIATE_TASKS = {"default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}}


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix, tmp_path_factory):
    """SQLite tests use a file, as the project does: threads and processes then share it
    (WAL, busy timeout) the way workers do, instead of an in-memory database's table locks.

    With AGENTIC_TEST_DB_DIR set (mutation testing runs many short sessions side by side),
    each concurrent session takes a numbered slot there and keeps that slot's test database
    between sessions (pytest --reuse-db).
    """
    from django.conf import settings

    database = settings.DATABASES["default"]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    fixed = os.environ.get("AGENTIC_TEST_DB_DIR")
    slot = _locked_slot(Path(fixed), worker) if fixed else None
    if database["ENGINE"] == "django.db.backends.sqlite3":
        directory = Path(fixed) if fixed else tmp_path_factory.mktemp("sqlite")
        name = f"test-{worker}{slot or ''}.sqlite3"
        database.setdefault("TEST", {})["NAME"] = str(directory / name)
    elif slot:
        database.setdefault("TEST", {})["NAME"] = f"test_{database['NAME']}_{worker}{slot}"


def _locked_slot(directory: Path, worker: str) -> str:
    """A slot name no other running session holds (its lock lasts as long as this process)."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    for slot in range(64):
        lock = (directory / f"{worker}-{slot}.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        _held_locks.append(lock)
        return f"-{slot}"
    raise RuntimeError(f"no free test database slot in {directory}")


_held_locks: list = []


@pytest.fixture(autouse=True)
def _test_settings(settings):
    """Run tasks in-process (the template's stack tests exercise the real workers)."""
    settings.TASKS = IMMEDIATE_TASKS
    # Whatever the developer's .env says, tests never talk to a real model provider.
    settings.OPENAI_API_KEY = ""
    settings.OPENAI_BASE_URL = ""
    # The default PBKDF2 hasher would dominate a suite that creates users per test.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # Pages render without collectstatic whatever DEBUG the environment sets.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="correct-horse-42")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user(username="mallory", password="correct-horse-43")


@pytest.fixture
def make_run(db):
    """A run stored directly, without enqueueing it (so it stays as created); `with_event`
    also stores its first event."""
    from agentic_django.models import AgentEvent, AgentRun, AgentSession

    def make(owner, *, session_key="s1", with_event=False, **fields):
        session, _ = AgentSession.objects.get_or_create(owner=owner, session_key=session_key)
        fields.setdefault("agent_key", "assistant")
        fields.setdefault("input_payload", "hello")
        if fields.get("status", "pending") != "pending":
            fields.setdefault("attempt", 1)  # a worker claimed it
        run = AgentRun.objects.create(session=session, owner=owner, **fields)
        if with_event:
            AgentEvent.objects.create(run=run, sequence=1, event_type="run_started", payload={})
        return run

    return make


def pytest_report_header(config):
    """Say up front which tests this machine leaves out, and what they need."""
    from django.db import connection

    from tests.needs import missing

    return missing(connection.vendor)
