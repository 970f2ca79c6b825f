"""Wake-ups through the database: a process that wrote tells the processes waiting on it to
look again, so a stream shows a delta at once and an idle worker starts a new task at once.

- PostgreSQL: ``NOTIFY`` on a channel per topic; waiters ``LISTEN``. ``agentic_runs`` carries
  the id of a run whose row changed or that got an event: triggers send it (migration 0005),
  so every write does, from any process, at no extra round trip. ``agentic_tasks`` says a
  task was queued. In a web process one connection per event loop listens for every stream
  it serves.
- SQLite: every write changes the database's files (its write-ahead log), so waiters watch
  their size and modification time and look as soon as they move. An idle worker sleeps in
  ``inotify`` on the database's directory (Linux) and checks the files when something in it
  changed, so waiting costs nothing; elsewhere, and for streams, a ``stat`` every 20 ms.

Nothing here is a queue: a missed wake-up only delays a waiter until its timeout, when it
looks anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import select
import time
import weakref
from functools import cache
from pathlib import Path
from typing import Any

from django.db import connection

logger = logging.getLogger(__name__)

RUNS = "agentic_runs"
TASKS = "agentic_tasks"
WATCH_SECONDS = 0.02


def notify_tasks() -> None:
    """Tell idle workers a task was queued (delivered when the transaction commits)."""
    if connection.vendor != "postgresql":
        return  # SQLite waiters see the write itself
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [TASKS])
    except Exception:
        # A lost wake-up only delays a worker until it looks anyway.
        logger.warning("agentic_django: could not notify %s", TASKS, exc_info=True)


# --- waiting (async: streams) ------------------------------------------------------------------


class RunWatch:
    """Watches one run for changes, without losing one between a look and the wait after it:
    take ``mark()`` before reading the run, then ``wait(mark, timeout)``."""

    def __init__(self, run_id: Any) -> None:
        self.key = str(run_id)
        self.postgres = connection.vendor == "postgresql"
        self.files = [] if self.postgres else _sqlite_files()
        self.listener: _Listener | None = None

    async def __aenter__(self) -> RunWatch:
        if self.postgres:
            self.listener = _listener()
            await self.listener.subscribe(self.key)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.listener is not None:
            self.listener.unsubscribe(self.key)

    def mark(self) -> Any:
        if self.listener is not None:
            return self.listener.versions.get(self.key, 0)
        return _signature(self.files)

    async def wait(self, mark: Any, timeout: float) -> None:
        """Return once the run changed after ``mark`` was taken, or after ``timeout``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                if self.listener is not None:
                    await self.listener.changed(self.key, mark)
                else:
                    while _signature(self.files) == mark:
                        await asyncio.sleep(WATCH_SECONDS)


class _Listener:
    """One LISTEN connection per event loop, counting the notifications of watched runs."""

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}
        self.watchers: dict[str, int] = {}
        self.changes = asyncio.Condition()
        self.listening = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def subscribe(self, key: str) -> None:
        self.watchers[key] = self.watchers.get(key, 0) + 1
        if self.task is None or self.task.done():
            self.listening.clear()
            self.task = asyncio.create_task(self._listen())
        # Changes made before LISTEN took effect would be missed: wait for it (or its failure).
        await asyncio.wait(
            {asyncio.ensure_future(self.listening.wait()), self.task},
            return_when=asyncio.FIRST_COMPLETED,
        )

    def unsubscribe(self, key: str) -> None:
        self.watchers[key] -= 1
        if not self.watchers[key]:
            del self.watchers[key]
            self.versions.pop(key, None)

    async def changed(self, key: str, mark: int) -> None:
        async with self.changes:
            await self.changes.wait_for(
                lambda: self.versions.get(key, 0) != mark or self.task is None or self.task.done()
            )
            if self.task is not None and self.task.done():
                await asyncio.sleep(WATCH_SECONDS * 50)  # no LISTEN: look again soon

    async def _listen(self) -> None:
        import psycopg

        try:
            async with await psycopg.AsyncConnection.connect(
                _conninfo(), autocommit=True
            ) as listening:
                await listening.execute(f"LISTEN {RUNS}")
                self.listening.set()
                async for note in listening.notifies():
                    if note.payload in self.watchers:
                        self.versions[note.payload] = self.versions.get(note.payload, 0) + 1
                        async with self.changes:
                            self.changes.notify_all()
        except Exception:
            logger.warning(
                "agentic_django: LISTEN stopped; streams look every second", exc_info=True
            )
        finally:
            async with self.changes:
                self.changes.notify_all()


_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Listener] = (
    weakref.WeakKeyDictionary()
)


def _listener() -> _Listener:
    loop = asyncio.get_running_loop()
    if loop not in _listeners:
        _listeners[loop] = _Listener()
    return _listeners[loop]


# --- waiting (sync: workers) -------------------------------------------------------------------


class TaskWaiter:
    """An idle worker's wait for the next queued task (or for ``timeout``)."""

    def __init__(self) -> None:
        self._listening: Any = None

    def wait(self, timeout: float) -> None:
        if connection.vendor != "postgresql":
            _file_change(_sqlite_files(), timeout)
            return
        try:
            if self._listening is None or self._listening.closed:
                import psycopg

                self._listening = psycopg.connect(_conninfo(), autocommit=True)
                self._listening.execute(f"LISTEN {TASKS}")
            for _ in self._listening.notifies(timeout=timeout, stop_after=1):
                break
        except Exception:
            logger.warning("agentic_django: LISTEN failed; polling instead", exc_info=True)
            self.close()
            time.sleep(timeout)

    def close(self) -> None:
        if self._listening is not None:
            with contextlib.suppress(Exception):
                self._listening.close()
            self._listening = None


# --- helpers ----------------------------------------------------------------------------------


def _conninfo() -> str:
    from psycopg.conninfo import make_conninfo

    settings = connection.settings_dict
    options = {
        "dbname": settings["NAME"],
        "user": settings.get("USER") or None,
        "password": settings.get("PASSWORD") or None,
        "host": settings.get("HOST") or None,
        "port": str(settings.get("PORT") or "") or None,
    }
    for name in ("sslmode", "sslrootcert", "sslcert", "sslkey", "options"):
        if name in settings.get("OPTIONS", {}):
            options[name] = settings["OPTIONS"][name]
    return make_conninfo(**{key: value for key, value in options.items() if value is not None})


def _sqlite_files() -> list[Path]:
    name = str(connection.settings_dict["NAME"])
    return [Path(name), Path(f"{name}-wal")]


def _signature(paths: list[Path]) -> tuple[tuple[int, int], ...]:
    signature = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            signature.append((0, 0))
        else:
            signature.append((stat.st_mtime_ns, stat.st_size))
    return tuple(signature)


def _file_change(paths: list[Path], timeout: float) -> None:
    """Return once the files' signature changes, or after ``timeout`` seconds."""
    start, deadline = _signature(paths), time.monotonic() + timeout
    watch = _inotify(paths[0].parent)
    try:
        while _signature(paths) == start:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if watch is None:
                time.sleep(min(WATCH_SECONDS, remaining))
            elif select.select([watch], [], [], remaining)[0]:
                with contextlib.suppress(BlockingIOError):
                    os.read(watch, 65536)  # drain; the signature decides
    finally:
        if watch is not None:
            os.close(watch)


_IN_MODIFY, _IN_CREATE = 0x2, 0x100


def _inotify(directory: Path) -> int | None:
    """A non-blocking inotify descriptor watching ``directory`` for writes; None where the
    system has no inotify (or it refused), and the caller polls instead."""
    libc = _libc()
    if libc is None:
        return None
    watch = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if watch < 0:
        return None
    if libc.inotify_add_watch(watch, os.fsencode(directory), _IN_MODIFY | _IN_CREATE) < 0:
        os.close(watch)
        return None
    return watch


@cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "inotify_init1") else None
