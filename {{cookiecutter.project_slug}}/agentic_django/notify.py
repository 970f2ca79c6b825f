"""Wake-ups through the database: a process that wrote tells the processes waiting on it to
look again, so a stream shows a delta at once and an idle worker starts a new task at once.

- PostgreSQL: ``NOTIFY`` on a channel per topic; waiters ``LISTEN``. ``agentic_runs`` carries
  the id of a run whose row changed or that got an event: triggers send it (migration 0005),
  so every write does, from any process, at no extra round trip. ``agentic_tasks`` says a
  task was queued. In a web process one connection per event loop listens for every stream
  it serves, and a run's notification wakes only the streams watching that run.
- SQLite: every write changes the database's files (its write-ahead log), so waiters watch
  their size and modification time and look as soon as they move. An idle worker sleeps in
  ``inotify`` on the database's directory (Linux) and checks the files when something in it
  changed, so waiting costs nothing; elsewhere a ``stat`` every 20 ms -- for streams, one per
  event loop, whatever the number of streams.

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
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

from django.db import connection

logger = logging.getLogger(__name__)

RUNS = "agentic_runs"
TASKS = "agentic_tasks"
WATCH_SECONDS = 0.02
POLL_SECONDS = 1.0  # how often streams look while LISTEN does not work
# A shared read is kept at most this long even if no notification came: a LISTEN connection that
# died without an error (a dropped network path) must not keep streams on an old read forever.
KEEP_READ_SECONDS = 60.0


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
    take ``mark()`` before reading the run, then ``wait(mark, timeout)``.

    The watches of one event loop share their waiting -- one LISTEN connection (PostgreSQL) or
    one look at the database's files every 20 ms (SQLite) -- and a change wakes only the
    watches it concerns; they can share their reads too (``shared``).
    """

    def __init__(self, run_id: Any) -> None:
        self.key = str(run_id)
        self.source: _Listener | _FilePoller = (
            _listener() if connection.vendor == "postgresql" else _file_poller(_sqlite_files())
        )

    async def __aenter__(self) -> RunWatch:
        await self.source.subscribe(self.key)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.source.unsubscribe(self.key)

    def mark(self) -> Any:
        return self.source.mark(self.key)

    async def wait(self, mark: Any, timeout: float) -> None:
        """Return once the run changed after ``mark`` was taken, or after ``timeout``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.source.changed(self.key, mark)

    async def shared[T](self, mark: Any, what: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """What ``read()`` returns -- or what the same read (``what`` names it) by another
        watch of this run in this event loop returned, where that is as new as a read of
        this watch's own after ``mark`` would be: one read, however many clients watch.

        PostgreSQL: a read started after the run's last notification stays valid until the
        next one, so it is kept until then (at most ``KEEP_READ_SECONDS``; while LISTEN does
        not work nothing is shared). SQLite: a read is shared while in flight, among watches
        of the same mark (the files' signature): one that saw a write since never joins a
        read from before it.
        """
        shelf = self.source.shelf(self.key, mark, what)
        if shelf is None:
            return await read()
        reads, key, keep = shelf
        now = asyncio.get_running_loop().time()
        kept_until, future = reads.get(key, (now, None))
        if future is None or kept_until < now:
            future = asyncio.ensure_future(read())
            reads[key] = (now + KEEP_READ_SECONDS, future)
            future.add_done_callback(partial(_settled, reads, key, keep=keep))
        # A client that hangs up stops waiting; the read goes on for the others.
        return await asyncio.shield(future)


# Shared reads (each kept until a time of the event loop's clock), where one is found (its key
# among them), and whether it stays there once finished.
type Reads = dict[Hashable, tuple[float, asyncio.Future[Any]]]
type Shelf = tuple[Reads, Hashable, bool]


def _settled(reads: Reads, key: Hashable, future: asyncio.Future[Any], *, keep: bool) -> None:
    """A shared read finished: forget it unless it stays valid (it succeeded and may be kept:
    the listener drops all of a run's reads when the run changes)."""
    failed = future.cancelled() or future.exception() is not None  # (retrieves the error)
    if failed or not keep:
        _forget(reads, key, future)


def _forget(reads: Reads, key: Hashable, future: asyncio.Future[Any]) -> None:
    if key in reads and reads[key][1] is future:
        del reads[key]


class _Wakeups:
    """Waiters by key: waking a key ends the waits on it, and no other."""

    def __init__(self) -> None:
        self._waiting: dict[Hashable, set[asyncio.Future[None]]] = {}

    def waited(self) -> list[Hashable]:
        """The keys someone waits on."""
        return list(self._waiting)

    async def wait(self, key: Hashable) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, set()).add(future)
        try:
            await future
        finally:
            waiters = self._waiting.get(key)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._waiting[key]

    def wake(self, key: Hashable) -> None:
        for future in self._waiting.pop(key, ()):
            if not future.done():
                future.set_result(None)

    def wake_all(self) -> None:
        for key in self.waited():
            self.wake(key)


@dataclass
class _Watched:
    """A run the streams of one event loop watch: how many, the notifications of it counted so
    far, and the reads of it started since the last one (see ``RunWatch.shared``)."""

    watchers: int = 0
    version: int = 0
    reads: Reads = field(default_factory=dict)


class _Listener:
    """One LISTEN connection per event loop, for every run its streams watch: a notification of
    a run counts a version of it and wakes the streams watching that run, and only those."""

    def __init__(self) -> None:
        self.watched: dict[str, _Watched] = {}
        self.wakeups = _Wakeups()
        self.listening = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        """Whether every change of a watched run is counted (LISTEN is in effect)."""
        return self.listening.is_set() and self.task is not None and not self.task.done()

    async def subscribe(self, key: str) -> None:
        self.watched.setdefault(key, _Watched()).watchers += 1
        try:
            if self.task is None or self.task.done():
                self.listening.clear()
                self.task = asyncio.create_task(self._listen())
            if self.listening.is_set():
                return
            # Changes made before LISTEN took effect would be missed: wait for it (or its end).
            listening = asyncio.ensure_future(self.listening.wait())
            try:
                await asyncio.wait({listening, self.task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                listening.cancel()
        except BaseException:
            self.unsubscribe(key)  # a client that hung up meanwhile watches nothing
            raise

    def unsubscribe(self, key: str) -> None:
        watched = self.watched[key]
        watched.watchers -= 1
        if not watched.watchers:
            del self.watched[key]

    def mark(self, key: str) -> int:
        return self.watched[key].version

    def shelf(self, key: str, mark: int, what: Hashable) -> Shelf | None:
        """Reads of the run since its last change, kept; none while changes may go uncounted."""
        return (self.watched[key].reads, what, True) if self.healthy else None

    async def changed(self, key: str, mark: int) -> None:
        if not self.healthy:
            await asyncio.sleep(POLL_SECONDS)  # no LISTEN: look again soon
        elif self.watched[key].version == mark:
            await self.wakeups.wait(key)

    def _count(self, key: str) -> None:
        watched = self.watched.get(key)
        if watched is not None:
            watched.version += 1
            watched.reads = {}  # started before this change: no longer valid
            self.wakeups.wake(key)

    def _count_all(self) -> None:
        """Every watched run may have changed unseen (LISTEN starts, or stops): look again."""
        for key in list(self.watched):
            self._count(key)
        self.wakeups.wake_all()

    async def _listen(self) -> None:
        import psycopg

        try:
            async with await psycopg.AsyncConnection.connect(
                _conninfo(), autocommit=True
            ) as listening:
                await listening.execute(f"LISTEN {RUNS}")
                self._count_all()  # what changed while nobody listened (before a restart)
                self.listening.set()
                async for note in listening.notifies():
                    self._count(note.payload)
        except Exception:
            logger.warning(
                "agentic_django: LISTEN stopped; streams look every second", exc_info=True
            )
        finally:
            self.listening.clear()
            self._count_all()  # the waiting streams go on polling


_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Listener] = (
    weakref.WeakKeyDictionary()
)


def _listener() -> _Listener:
    loop = asyncio.get_running_loop()
    if loop not in _listeners:
        _listeners[loop] = _Listener()
    return _listeners[loop]


class _FilePoller:
    """SQLite: one look at the database's files every ``WATCH_SECONDS`` per event loop while
    any stream waits, not one per stream; it wakes the streams whose mark the files moved away
    from (a write anywhere in the database: SQLite cannot tell which run it changed)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.wakeups = _Wakeups()  # by mark
        self.reads: Reads = {}
        self.task: asyncio.Task[None] | None = None

    async def subscribe(self, key: str) -> None:
        pass  # the files tell of every run

    def unsubscribe(self, key: str) -> None:
        pass

    def mark(self, key: str) -> tuple[tuple[int, int], ...]:
        return _signature(self.files)

    def shelf(self, key: str, mark: Any, what: Hashable) -> Shelf:
        """Reads in flight, by run and mark (a finished one is not kept: the files' signature
        can miss a write -- two in one tick of the clock --, which the look at the stream's
        next heartbeat must then see)."""
        return self.reads, (key, mark, what), False

    async def changed(self, key: str, mark: Any) -> None:
        if _signature(self.files) != mark:
            return
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._poll())
        await self.wakeups.wait(mark)

    async def _poll(self) -> None:
        while self.wakeups.waited():
            await asyncio.sleep(WATCH_SECONDS)
            signature = _signature(self.files)
            for mark in self.wakeups.waited():
                if mark != signature:
                    self.wakeups.wake(mark)


_file_pollers: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[Path, ...], _FilePoller]
] = weakref.WeakKeyDictionary()


def _file_poller(files: list[Path]) -> _FilePoller:
    pollers = _file_pollers.setdefault(asyncio.get_running_loop(), {})
    if tuple(files) not in pollers:
        pollers[tuple(files)] = _FilePoller(files)
    return pollers[tuple(files)]


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
    for name in ("sslmode", "sslrootcert", "sslcert", "sslkey", "options", "application_name"):
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
