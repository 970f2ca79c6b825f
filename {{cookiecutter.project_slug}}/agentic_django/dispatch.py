"""Queueing of runs: enqueue on commit, one task per run, and dispatch of waiting runs.

A task is only a wake-up call: the run's row decides whether it may start (see
``lifecycle.claim``). Duplicate or late tasks are harmless; a task the broker lost is replaced
once it is older than a lease (``dispatched_at``), so a run gets O(1) tasks, not one per
finishing run.

When the broker refuses a task, only that run is affected: a new run (dispatched from the
request that created it) fails at once with a clear error its user sees; a waiting run
(dispatched because another run finished) stays pending without a task, and the next sweep
(``recovery.sweep``, run periodically by every worker) enqueues it once the broker is back.
Dispatching is a loop, never a recursion, however many runs wait.
"""

from __future__ import annotations

import logging
import threading

from django.db import connection, transaction
from django.tasks.backends.immediate import ImmediateBackend

from agentic_django import lifecycle, notify
from agentic_django.exceptions import EnqueueFailed
from agentic_django.models import AgentRun
from agentic_django.prepared import Statement

logger = logging.getLogger(__name__)

# Waiting runs looked at per round of dispatch_next (rounds repeat while they dispatch).
BATCH = 100


class _Turn:
    """Which thread of this process is dispatching, and whether it is asked for a round more."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.again = False


_turn = _Turn()
_local = threading.local()


def _turn_for_this_call() -> _Turn:
    """The process's turn; a thread's own where tasks run inside ``enqueue`` (the immediate
    backend): there a dispatching thread executes whole runs, which must not hold up others'."""
    from agentic_django.tasks import execute_agent_run

    if not isinstance(execute_agent_run.get_backend(), ImmediateBackend):
        return _turn
    if not hasattr(_local, "turn"):
        _local.turn = _Turn()
    return _local.turn


def enqueue_on_commit(run_id: str) -> None:
    """Dispatch ``run_id`` after the current transaction commits (at once outside one): its
    user is waiting for it, so a task queue that refuses a new run fails it with a message."""
    transaction.on_commit(lambda: dispatch_run(run_id, submitted=True))


def dispatch_run(run_id: str, *, submitted: bool = False) -> None:
    """Enqueue a run's task if it can start now; otherwise a finishing run will do it.

    A run that already has a recent task is left alone (one task per run). If the queue
    refuses the task, a run its user just ``submitted`` (and that never started) fails with a
    clear message; any other stays pending for the next sweep.
    """
    from agentic_django.recovery import ensure_startup_recovery, recover_stale_blockers

    ensure_startup_recovery()
    if lifecycle.reserve(run_id):
        _enqueue(run_id, fail_on_error=submitted)
        return
    # Blocked or full (or not pending): a dead worker's expired lease must not hold the queue.
    recover_stale_blockers()


def dispatch_next() -> int:
    """Enqueue waiting runs that can start now (oldest first, within free slots); how many.

    One thread of a process dispatches at a time: a call while another thread is dispatching
    (a worker's runs finishing together) only asks that thread for another round, and so does
    a re-entrant call (a run executed in-process finishing while this loop enqueues), so the
    stack stays flat whatever the queue length and N runs ending at once cost a few rounds,
    not N. A call inside a transaction dispatches by itself (another thread would not see what
    the transaction changed); so does any call once the dispatching thread stopped for a
    broker error. With the immediate backend each thread dispatches for itself (its runs execute
    inside ``enqueue``). Returns the runs this call dispatched.
    """
    turn = _turn_for_this_call()
    me = threading.get_ident()
    with turn.lock:
        if turn.owner is None:
            turn.owner = me
        elif turn.owner == me or not connection.in_atomic_block:
            turn.again = True
            return 0
        else:
            me = None  # beside the dispatching thread, inside this transaction
    total = 0
    try:
        while True:
            if me is not None:
                with turn.lock:
                    turn.again = False
            dispatched, broker_ok = _dispatch_round()
            total += dispatched
            if not broker_ok:
                return total
            if dispatched:
                continue
            if me is None:
                return total
            with turn.lock:
                if not turn.again:
                    turn.owner = None  # checked and released together: no request is lost
                    return total
    finally:
        if me is not None:
            with turn.lock:
                if turn.owner == me:
                    turn.owner = None


def _dispatch_round() -> tuple[int, bool]:
    if not _ANY_WAITING.rows():
        return 0, True  # the common case, after each run: every waiting run has its task
    heads = _HEADS.rows()
    free = heads[0][1] if heads else 0
    count = 0
    for run_id, _free in heads[: max(free, 0)]:
        # Each reservation re-checks the slot and the session order in the database.
        if not lifecycle.reserve(run_id):
            continue
        if not _enqueue(str(run_id), fail_on_error=False):
            return count, False
        count += 1
    return count, True


# Whether any pending run needs a task; the oldest heads of their sessions that do.
_ANY_WAITING = Statement(lambda: lifecycle.waiting_for_task().values_list("pk")[:1])
_HEADS = Statement(
    lambda: (
        lifecycle.session_heads()
        .filter(lifecycle.needs_task())
        .annotate(free=lifecycle.free_slots())
        .order_by("created_at", "id")
        .values_list("id", "free")[:BATCH]
    )
)


def release_unclaimed(run_id: str, task_id: str) -> None:
    """A task could not claim its pending run: leave the run to the next dispatch."""
    # Re-dispatching after the release closes the race with a blocker that finished meanwhile.
    if lifecycle.release(run_id, task_id):
        dispatch_run(run_id)


def _enqueue(run_id: str, *, fail_on_error: bool) -> bool:
    """Enqueue the reserved run's task; False if the broker refused it."""
    from agentic_django.tasks import execute_agent_run

    try:
        result = execute_agent_run.enqueue(run_id)
    except Exception:
        logger.exception("agentic_django: could not enqueue run %s", run_id)
        if fail_on_error:
            lifecycle.fail_pending(run_id, EnqueueFailed.message)
        else:
            lifecycle.release(run_id)
        return False
    if not result.is_finished:
        # Ran in-process otherwise: the claim already stored the task id.
        lifecycle.record_task_id(run_id, str(result.id))
        if type(execute_agent_run.get_backend()).__module__.startswith("django_tasks_db"):
            notify.notify_tasks()  # an idle database worker starts it at once
    return True


def cancel(run: AgentRun) -> bool:
    """Cancel ``run`` (see ``lifecycle.cancel``); a freed session lets its next run start."""
    cancelled = lifecycle.cancel(run)
    if cancelled:
        transaction.on_commit(dispatch_next)
    return cancelled
