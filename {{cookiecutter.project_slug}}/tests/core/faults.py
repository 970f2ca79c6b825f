"""Faults injected at the boundaries of the engine, never inside it.

- ``DatabaseFaults``: every database connection of the process, in any thread, sends its SQL
  through ``DatabaseFaults.__call__`` (Django's ``execute_wrapper`` hook). A rule matches
  statements by regular expression and raises an error or runs a callback before them.
- A task backend whose broker is down; Django's ``DummyBackend`` is a queue no worker takes
  from, so a test can play the worker.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import connections
from django.db.backends.signals import connection_created
from django.tasks.backends.base import BaseTaskBackend

from agentic_django.tasks import execute_agent_run

# The statements the engine's transitions and writes send (both vendors quote with ").
RENEW = r'^UPDATE "agentic_django_agentrun" SET "heartbeat_at"'
FINISH = r'^UPDATE "agentic_django_agentrun" SET "status" = %s, "error" = %s, "error_detail"'
STATUS_CHANGE = r'^UPDATE "agentic_django_agentrun" SET "status"'
ITEM_INSERT = r'^INSERT INTO "agentic_django_agentsessionitem"'
# PostgreSQL saves a checkpoint in one statement: the fenced UPDATE in a CTE feeds the upsert.
CHECKPOINT_SAVE = (
    r'^(WITH marked AS \()?UPDATE "agentic_django_agentrun" SET "checkpoint_item_sequence"'
)
ITEM_DELETE = r'^DELETE FROM "agentic_django_agentsessionitem"'
# The UPDATE that pauses a run (awaiting approval).
PAUSE = (
    r'^UPDATE "agentic_django_agentrun" SET "status" = %s, "error" = %s, '
    r'"lease_expires_at" = (%s|NULL), '
    r'"heartbeat_at" = .*"approval_expires_at"'
)
TOOL_START = r'^INSERT INTO "agentic_django_agenttoolcall"'
TOOL_FINISH = r'^UPDATE "agentic_django_agenttoolcall" SET "output"'
TOOL_RERUN = r'^UPDATE "agentic_django_agenttoolcall" SET "attempt"'


@dataclass
class Rule:
    pattern: re.Pattern[str]
    times: float
    error: BaseException | None = None
    before: Callable[[], object] | None = None
    thread: threading.Thread | None = None
    # Only statements of the thread with this name (say, one run's lease keeper).
    thread_name: str | None = None
    fired: int = 0

    def takes(self, sql: str) -> bool:
        if self.fired >= self.times or not self.pattern.search(sql):
            return False
        current = threading.current_thread()
        if self.thread_name is not None and current.name != self.thread_name:
            return False
        return self.thread is None or self.thread is current


@dataclass
class DatabaseFaults:
    rules: list[Rule] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, pattern: str, error: BaseException, *, times: float = 1) -> Rule:
        """Raise ``error`` instead of running the next ``times`` matching statements."""
        return self._add(Rule(re.compile(pattern), times, error=error))

    def before(
        self,
        pattern: str,
        callback: Callable[[], object],
        *,
        times: float = 1,
        thread: threading.Thread | None = None,
    ) -> Rule:
        """Call ``callback`` before the next ``times`` matching statements (of ``thread``)."""
        return self._add(Rule(re.compile(pattern), times, before=callback, thread=thread))

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def __call__(self, execute: Callable, sql: str, params: Any, many: bool, context: Any) -> Any:
        with self._lock:
            self.statements.append(sql)
            rule = next((r for r in self.rules if r.takes(sql)), None)
            if rule is not None:
                rule.fired += 1
        if rule is not None:
            if rule.before is not None:
                rule.before()
            if rule.error is not None:
                raise rule.error
        return execute(sql, params, many, context)


@contextmanager
def database_faults() -> Iterator[DatabaseFaults]:
    """Route the SQL of every connection, existing or new, in every thread through the rules."""
    faults = DatabaseFaults()
    wrapped = []

    def install(connection: Any, **kwargs: Any) -> None:
        if faults not in connection.execute_wrappers:
            connection.execute_wrappers.append(faults)
            wrapped.append(connection)

    connection_created.connect(install, weak=False)
    for connection in connections.all(initialized_only=True):
        install(connection)
    try:
        yield faults
    finally:
        connection_created.disconnect(install)
        for connection in wrapped:
            if faults in connection.execute_wrappers:
                connection.execute_wrappers.remove(faults)


class UnavailableBackend(BaseTaskBackend):
    """A broker that is down: every enqueue fails."""

    supports_async_task = True

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def queued_run_ids() -> list[str]:
    """Run ids of the tasks a ``DummyBackend`` (a queue no worker takes from) holds, in order."""
    return [str(result.args[0]) for result in queued_results()]


def queued_results() -> list[Any]:
    """The task results a ``DummyBackend`` holds, read from the backend the engine's task uses.

    With django-tasks-rq installed the task is a ``django_tasks`` task whose backends are not
    those of ``django.tasks.task_backends``, so ask the task itself.
    """
    return execute_agent_run.get_backend().results


def lock_waiters() -> int:
    """Connections of this database waiting for a lock (PostgreSQL), now: also from inside a
    transaction, which would otherwise see the activity it first read, for as long as it lasts."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        return cursor.fetchone()[0]
