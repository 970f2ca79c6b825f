"""Wake-ups through the database: an idle worker's wait ends when a task is queued, not when its
timeout runs out. Each wait here is far longer than the test's patience, so a wake-up that
never comes fails the test instead of passing slowly."""

from __future__ import annotations

import importlib
import sqlite3
import threading

import pytest

from agentic_django import notify
from tests.waiting import PATIENCE, in_thread, wait_for

NEVER = PATIENCE * 3  # a wait that only a wake-up can end within the test's patience
TRIGGER_MIGRATION = "0008_notify_only_what_streams_read"


def _in_background(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_a_write_to_an_sqlite_database_wakes_a_waiter(tmp_path):
    database = tmp_path / "db.sqlite3"
    writer = sqlite3.connect(database, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE task (id INTEGER PRIMARY KEY)")
    files = [database, tmp_path / "db.sqlite3-wal"]
    thread = _in_background(lambda: notify._file_change(files, NEVER))

    def write_and_check() -> bool:
        # A write per look: whenever the waiter took its baseline, a later write changes it.
        writer.execute("INSERT INTO task DEFAULT VALUES")
        return not thread.is_alive()

    wait_for(write_and_check, "the waiter to wake after a write")
    writer.close()


def test_an_sqlite_waiter_returns_at_its_timeout_when_nothing_is_written(tmp_path):
    database = tmp_path / "db.sqlite3"
    sqlite3.connect(database).close()
    thread = _in_background(lambda: notify._file_change([database], 0.05))

    wait_for(lambda: not thread.is_alive(), "the waiter to give up at its timeout")


def test_a_missing_database_file_is_a_signature_not_an_error(tmp_path):
    files = [tmp_path / "absent.sqlite3"]

    assert notify._signature(files) == ((0, 0),)
    notify._file_change(files, 0.01)  # returns at its timeout


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_queued_task_wakes_an_idle_postgres_worker():
    waiter = notify.TaskWaiter()
    listening = threading.Event()

    def wait() -> None:
        # LISTEN first (the first wait opens the listening connection), then wait for real.
        waiter.wait(0.01)
        listening.set()
        waiter.wait(NEVER)

    thread = in_thread(wait)
    wait_for(listening.is_set, "the worker to listen")
    # A NOTIFY sent before the waiter blocks is delivered to it all the same.
    notify.notify_tasks()

    wait_for(lambda: not thread.is_alive(), "the worker to wake when a task is queued")
    waiter.close()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_run_notifies_its_streams_only_when_a_column_they_read_changes(user):
    import psycopg
    from django.db import connection
    from django.db.models.functions import Now
    from django.utils import timezone

    from agentic_django.models import AgentRun, AgentSession
    from agentic_django.streams import STREAM_FIELDS

    trigger = importlib.import_module(f"agentic_django.migrations.{TRIGGER_MIGRATION}")
    streamed = tuple(AgentRun._meta.get_field(name).column for name in STREAM_FIELDS)
    assert streamed == trigger.STREAMED_COLUMNS

    def new_run(key: str) -> AgentRun:
        session = AgentSession.objects.create(owner=user, session_key=key)
        return AgentRun.objects.create(
            session=session, owner=user, agent_key="demo", input_payload=""
        )

    quiet, loud = new_run("quiet"), new_run("loud")
    params = {k: v for k, v in connection.get_connection_params().items() if k != "pool"}
    with psycopg.connect(**params, autocommit=True) as listener:
        listener.execute(f"LISTEN {notify.RUNS}")
        changes = {
            "status": "running",
            "attempt": 4,
            "rollbacks": 1,
            "stream_text": "Hel",
            "stream_sequence": 3,
            "error": "Stopped.",
            "finished_at": timezone.now(),
        }
        for name, value in changes.items():
            # What a worker writes that no stream reads: a lease renewal, a task, a cancel flag.
            AgentRun.objects.filter(pk=quiet.pk).update(
                heartbeat_at=Now(),
                lease_expires_at=Now(),
                task_id=f"task-{name}",
                dispatched_at=Now(),
                cancel_requested_at=Now(),
                checkpoint_item_sequence=len(name),
            )
            AgentRun.objects.filter(pk=loud.pk).update(**{name: value})
            # Notifications arrive in commit order: the first one must be the loud run's.
            received = [n.payload for n in listener.notifies(timeout=PATIENCE, stop_after=1)]
            assert received == [str(loud.pk)], name
