"""One event loop for a worker's runs.

A run spends nearly all its time waiting on its model, and an event loop per run (a thread
of its own, created and torn down for every run) costs a worker more CPU than the waits. A
worker process therefore runs the async part of every run -- the SDK's turns, the model's
stream, the watchers -- on one shared loop (``share()``, called at the worker's start), while
each run keeps its slot thread for its database work: ``run()`` hands the coroutine to the
shared loop the way ``async_to_sync`` hands it to a loop of its own, and the run's
``sync_to_async`` steps still run on the run's thread, which gives its pooled connection
back after each step. Outside a worker (the immediate backend, a test calling ``execute``) there
is no shared loop and ``run()`` is ``async_to_sync``.

What the shared loop changes, and how it is kept as it was:

- tasks a run leaves behind (the SDK's background turn of a run that lost its lease, a
  stream nobody drained) were cancelled by ``asyncio.run`` at the end of the run's own loop;
  here every task created inside a run is marked with it, and the run's end cancels those
  still running (``LEFTOVER_SECONDS`` to wind down);
- sync tools run in daemon threads (``DaemonThreadExecutor``), as before;
- a step that borrowed a pooled connection (a tool's ``sync_to_async(Model.objects...)``)
  gives it back when it returns, as the engine's own steps (``db.run_sync``) always did;
- code that blocks the loop itself (an ``async`` tool calling ``time.sleep``) holds every run
  on it: a watchdog notices a loop that has not answered for ``STALL_SECONDS``, logs which
  run blocks it and where, and gives the runs that start from then on a new loop. The runs
  on the stuck loop stay where they are (their lease keepers renew their leases from their
  own threads): they go on when the loop does, or end at their run timeout at the latest.
  Once it goes on and they are done, the stuck loop ends: what its runs shared (their kept
  connections to the model, ``resource``) is closed and its thread ends.
  Giving them up to be retried elsewhere would cost each an attempt, and a sync tool call
  still running in its thread would be asked about as if its worker had died.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine, Hashable
from typing import Any

from asgiref.sync import AsyncToSync, SyncToAsync, async_to_sync

logger = logging.getLogger(__name__)

# How long a run's leftover tasks get to end once they are cancelled.
LEFTOVER_SECONDS = 5.0
# A loop that has not run a callback for this long is stuck (see the module's docstring).
STALL_SECONDS = 10.0
# How often the watchdog looks.
WATCH_SECONDS = 1.0

# The run a task belongs to (tasks inherit it from the task that created them).
_owner: contextvars.ContextVar[Hashable] = contextvars.ContextVar("agentic_django_run_owner")


class SharedLoop:
    """An event loop running in a daemon thread of its own until the process ends."""

    def __init__(self, default_executor: Any = None) -> None:
        self.loop = asyncio.new_event_loop()
        # The runs handed to this loop and not returned yet (see ``run``).
        self.owners: set[Hashable] = set()
        self.owners_lock = threading.Lock()
        # Set (under ``owners_lock``) once the loop ends: no run is handed to it from then on.
        self.ended = False
        # What the runs on this loop share (``resource``), touched from the loop's thread only.
        self.resources: dict[Hashable, Any] = {}
        self.closers: list[Callable[[], Coroutine[Any, Any, Any]]] = []
        _loops[self.loop] = self
        if default_executor is not None:
            self.loop.set_default_executor(default_executor)
        self.thread = threading.Thread(target=self._run, name="agentic-django-runs", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            if self.ended:  # nothing is handed to it any more: its thread and loop go
                _loops.pop(self.loop, None)
                self.loop.close()

    def _close_and_stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close_resources(), self.loop).add_done_callback(
            lambda _: self.loop.call_soon_threadsafe(self.loop.stop)
        )

    async def _close_resources(self) -> None:
        for close in reversed(self.closers):
            try:
                await close()
            except Exception:
                logger.exception("agentic_django: closing a shared loop's resource failed")

    def end_when_idle(self) -> bool:
        """End the loop if no run is on it (it is not the current one any more): close what
        its runs shared (``resource``), then stop and close it."""
        with self.owners_lock:
            if self.owners or self.ended:
                return False
            self.ended = True
        self._close_and_stop()
        return True

    def answers(self, timeout: float) -> bool:
        """Whether the loop runs a callback within ``timeout`` seconds."""
        answered = threading.Event()
        try:
            self.loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # closed
            return False
        return answered.wait(timeout)

    def blocker(self) -> Hashable | None:
        """The run whose task the loop is running now (the one blocking a stuck loop)."""
        task = asyncio.current_task(self.loop)
        return task.get_context().get(_owner) if task is not None else None

    def stack(self) -> str:
        """Where the loop's thread is now."""
        frame = sys._current_frames().get(self.thread.ident or 0)
        return "".join(traceback.format_stack(frame)) if frame is not None else ""


_lock = threading.Lock()
_current: SharedLoop | None = None
# Every shared loop made (stuck ones stay), by its asyncio loop.
_loops: dict[asyncio.AbstractEventLoop, SharedLoop] = {}
_make_executor: Callable[[], Any] | None = None


def share(default_executor: Callable[[], Any]) -> None:
    """From now on, this process's runs share one event loop (a worker's start);
    ``default_executor()`` makes each loop's default executor."""
    global _current, _make_executor
    with _lock:
        if _current is not None:
            return
        _make_executor = default_executor
        _current = loop = SharedLoop(default_executor())
    threading.Thread(
        target=_watch, args=(loop,), name="agentic-django-loop-watch", daemon=True
    ).start()


def unshare() -> None:
    """Runs get an event loop each again (the shared loop ends once its runs are done)."""
    global _current
    with _lock:
        loop, _current = _current, None
    if loop is not None:
        _end_when_done(loop)


def is_shared(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` is a shared loop of this process (one that ended is closed)."""
    return loop in _loops


def shared() -> SharedLoop | None:
    return _current


def resource[T](
    key: Hashable,
    make: Callable[[], T],
    close: Callable[[T], Coroutine[Any, Any, Any]] | None = None,
) -> T | None:
    """What the runs on the running shared loop share under ``key`` (``make()`` on first use,
    ``close(it)`` awaited on the loop when it ends); None when the running loop is not a
    shared one (a run with a loop of its own must not leave anything behind on it). Things
    bound to a loop, such as a pool of connections, are shared this way: each shared loop
    has its own, and a loop that replaced a stuck one never uses the stuck one's."""
    shared = _loops.get(asyncio.get_running_loop())
    if shared is None:
        return None
    if key not in shared.resources:
        shared.resources[key] = made = make()
        if close is not None:
            shared.closers.append(lambda: close(made))
    return shared.resources[key]


def _watch(loop: SharedLoop) -> None:
    """Watch ``loop`` while it is the shared one; then the loop that replaced it, if any."""
    pause = threading.Event()
    while _current is loop:
        if loop.answers(STALL_SECONDS):
            pause.wait(WATCH_SECONDS)
        else:
            fresh = _replace(loop)
            if fresh is not None:
                _end_when_done(loop, stuck=True)
                loop = fresh


def _end_when_done(loop: SharedLoop, *, stuck: bool = False) -> None:
    """End a loop that is not the current one any more once it answers and its runs are
    done (at once if it can): what they shared (their connections to the model) is closed,
    and its thread ends."""
    if not stuck and loop.end_when_idle():
        return
    threading.Thread(
        target=_retire, args=(loop, stuck), name="agentic-django-loop-retire", daemon=True
    ).start()


def _retire(loop: SharedLoop, stuck: bool) -> None:
    pause = threading.Event()
    while not loop.ended:
        if loop.answers(STALL_SECONDS) and loop.end_when_idle():
            if stuck:
                logger.warning(
                    "agentic_django: the event loop that was stuck went on and its runs are "
                    "done; it ended (new runs stay on the loop that replaced it)."
                )
            return
        pause.wait(WATCH_SECONDS)


def _replace(stuck: SharedLoop) -> SharedLoop | None:
    """Runs starting from now get a new loop; the stuck one keeps its runs."""
    global _current
    with _lock:
        if _current is not stuck or _make_executor is None:
            return None
        _current = fresh = SharedLoop(_make_executor())
    blocker = stuck.blocker()
    with stuck.owners_lock:
        waiting = len(stuck.owners) - (blocker in stuck.owners)
    logger.error(
        "agentic_django: the runs' event loop has not answered for %ss: code of %s is "
        "blocking it (an async tool or hook calling something synchronous?). New runs start "
        "on a new loop; %d other run(s) wait for it to go on, or for their timeout. It is "
        "stuck here:\n%s",
        STALL_SECONDS,
        f"run {getattr(blocker, 'run_id', blocker)}" if blocker is not None else "no run",
        waiting,
        stuck.stack(),
    )
    return fresh


def run[R](fn: Callable[..., Coroutine[Any, Any, R]], *args: Any, owner: Hashable) -> R:
    """``async_to_sync(fn)(*args)``, on the shared loop when there is one. ``owner`` names the
    run (the tasks it creates are its own; a stuck loop's log line names it).

    As with ``async_to_sync``, the calling thread runs the coroutine's thread-sensitive
    ``sync_to_async`` steps meanwhile -- the engine's and a tool's alike -- and here it gives
    its database connection back to the pool after each one: a run holds a pooled connection
    only while a step of it uses one, never while it waits on its model."""
    loop = _joined(owner)
    if loop is None:
        return async_to_sync(fn)(*args)
    local = SyncToAsync.threadlocal
    saved = {name: getattr(local, name, None) for name in _THREADLOCALS}
    # What asgiref looks at to run a nested ``async_to_sync`` on its caller's loop.
    local.main_event_loop = loop.loop
    local.main_event_loop_pid = os.getpid()
    local.task_context = None
    try:
        return AsyncToSync(_owned)(owner, fn, *args)
    finally:
        with loop.owners_lock:
            loop.owners.discard(owner)
        for name, value in saved.items():
            setattr(local, name, value)


_THREADLOCALS = ("main_event_loop", "main_event_loop_pid", "task_context")


def _joined(owner: Hashable) -> SharedLoop | None:
    """The shared loop ``owner`` now runs on (None: there is none), never one that ended: a
    run that read a loop just as it was replaced and then ended goes to the new one."""
    while True:
        loop = _current
        if loop is None:
            return None
        with loop.owners_lock:
            if not loop.ended:
                loop.owners.add(owner)
                return loop


class _Releasing(concurrent.futures.Executor):
    """The calling thread's executor for a run's ``sync_to_async`` steps (asgiref's), giving
    the thread's pooled database connection back after each step."""

    def __init__(self, steps: concurrent.futures.Executor) -> None:
        self.steps = steps

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return self.steps.submit(_then_release, fn, *args, **kwargs)


def _then_release(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    from agentic_django.db import release_connection

    try:
        return fn(*args, **kwargs)
    finally:
        release_connection()


async def _owned[R](owner: Hashable, fn: Callable[..., Coroutine[Any, Any, R]], *args: Any) -> R:
    """``fn(*args)``, then the end of every task it left running."""
    _owner.set(owner)
    # asgiref put the calling thread's executor here; its steps now give connections back.
    steps = getattr(AsyncToSync.executors, "current", None)
    if steps is not None:
        AsyncToSync.executors.current = _Releasing(steps)
    try:
        return await fn(*args)
    finally:
        await _end_leftovers(owner)


async def _end_leftovers(owner: Hashable) -> None:
    me = asyncio.current_task()
    leftovers = [
        task
        for task in asyncio.all_tasks()
        if task is not me and not task.done() and task.get_context().get(_owner) is owner
    ]
    if not leftovers:
        return
    for task in leftovers:
        task.cancel()
    _, pending = await asyncio.wait(leftovers, timeout=LEFTOVER_SECONDS)
    if pending:
        logger.warning(
            "agentic_django: %d task(s) of a run did not end when cancelled", len(pending)
        )
