"""The run lifecycle: the only module that changes an ``AgentRun``'s status.

::

    pending ──reserve──► pending with a task ──claim──► running ──finish──► completed
       ▲  ▲ │                                            │ │ │               failed
       │  │ └──────────────── cancel ────────────────────┼─┼─┼─────────────► cancelled
       │  └──── requeue (lease expired) ─────────────────┘ │ └─ fail (lease expired)
       ├─── decide (last approval) ◄── awaiting_approval ◄─┤ pause
       │                                └─ expire ─────────┼────────────────► failed
       └─── resume_within_budget ◄──── budget_exceeded ◄───┘ pause (a cap reached)

Every transition is one conditional UPDATE: nothing is read first and trusted afterwards, so
two processes racing for the same run cannot both win. Timestamps come from the database
clock (``Now()``), never from the clock of the process that happens to make the change.

A claimed attempt holds a ``Fence``: the run is RUNNING with that attempt number. Every write
the attempt makes -- lease renewals, session items, events, its terminal state -- is
conditional on the fence, so an attempt whose lease expired and whose run was taken over can
no longer change anything; its writes are dropped.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import OperationalError, connection, transaction
from django.db.models import (
    Exists,
    ExpressionWrapper,
    F,
    Func,
    IntegerField,
    Max,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Value,
)
from django.db.models.expressions import CombinedExpression
from django.db.models.functions import Coalesce, Now
from django.db.models.lookups import GreaterThan
from django.db.models.sql import UpdateQuery
from django.utils import timezone

from agentic_django.conf import get_config
from agentic_django.exceptions import (
    ApprovalAlreadyDecided,
    ApprovalExpired,
    ApprovalNotFound,
    ConversationBusy,
    RunNotAwaitingApproval,
)
from agentic_django.models import (
    AgentApproval,
    AgentCheckpoint,
    AgentEvent,
    AgentRun,
    AgentSession,
    AgentSessionItem,
    AgentUsage,
    AgentWorker,
    DispatchLock,
)
from agentic_django.prepared import Statement
from agentic_django.signals import (
    agent_budget_exceeded,
    agent_run_awaiting_approval,
    agent_run_cancelled,
    agent_run_failed,
    agent_run_resumed,
    send_safely,
)

logger = logging.getLogger(__name__)

Status = AgentRun.Status
# Statuses that occupy a worker slot, and statuses that keep later runs of their session
# waiting. A paused state (awaiting approval) would block its session without a slot.
SLOT_STATUSES = (Status.RUNNING,)
SESSION_BLOCKING_STATUSES = (Status.RUNNING, *AgentRun.PAUSED_STATUSES)
LOCK_NAME = "runs"
# task_id of a run a dispatcher is enqueueing, until the broker gives the task its id.
QUEUED = "queued"
LEASE_EXPIRED_ERROR = "The worker running this run stopped before it finished."
APPROVAL_EXPIRED_ERROR = (
    "Nobody approved or rejected the agent's tool calls in time, so the run was stopped."
)


def attempts_exhausted_error(attempts: int) -> str:
    return (
        f"The worker running this run stopped before it finished, {attempts} times in a row, "
        "so it was not tried again."
    )


def timeout_error(seconds: int) -> str:
    return f"The run took longer than {seconds} s and was stopped."


@dataclass(frozen=True)
class Fence:
    """The claim an attempt holds: run ``run_id`` is RUNNING with attempt number ``attempt``."""

    run_id: Any
    attempt: int

    @classmethod
    def of(cls, run: AgentRun) -> Fence:
        return cls(run.pk, run.attempt)

    def runs(self) -> QuerySet[AgentRun]:
        """The run, as long as this attempt still holds it (an empty queryset otherwise)."""
        return AgentRun.objects.filter(pk=self.run_id, attempt=self.attempt, status=Status.RUNNING)

    def values(self) -> dict[str, Any]:
        """The fence as the values of a prepared statement (``FENCE_VALUES``)."""
        return {"run_id": self.run_id, "attempt": self.attempt}

    def exists_sql(
        self, *, uncancelled: bool = False, lock: bool = False
    ) -> tuple[str, tuple[Any, ...]]:
        """``EXISTS (...)`` SQL and parameters, true while the fence holds (for raw writes);
        ``uncancelled``: and nobody asked to cancel the run. ``lock`` (PostgreSQL): read the
        run's row with a share lock, so a statement that started before a change of the claim
        committed waits for it and checks the row as changed (a plain subquery would check
        the row as the statement's snapshot saw it), and no change of the claim commits until
        the statement's transaction ends."""
        statement = _FENCE_UNCANCELLED if uncancelled else _FENCE_HOLDS
        sql, params = statement.sql(**self.values())
        return f"EXISTS ({sql}{' FOR SHARE' if lock else ''})", tuple(params)

    def state(self) -> bool | None:
        """None if the claim is lost; otherwise whether cancellation was requested."""
        rows = _FENCE_STATE.rows(**self.values())
        return None if not rows else rows[0][0] is not None


def fence_states(fences: list[Fence]) -> dict[Fence, bool | None]:
    """``Fence.state`` of many fences in one query: None for a lost claim, otherwise whether
    cancellation was requested."""
    rows = AgentRun.objects.filter(
        pk__in={fence.run_id for fence in fences}, status=Status.RUNNING
    ).values_list("pk", "attempt", "cancel_requested_at")
    held = {(pk, attempt): requested is not None for pk, attempt, requested in rows}
    return {fence: held.get((fence.run_id, fence.attempt)) for fence in fences}


# The values of statements conditional on a fence, prepared as the fields they are compared to.
FENCE_VALUES = {"run_id": AgentRun._meta.pk, "attempt": AgentRun._meta.get_field("attempt")}
_FENCE_HOLDS = Statement(lambda **fence: Fence(**fence).runs().values("pk"), values=FENCE_VALUES)
_FENCE_UNCANCELLED = Statement(
    lambda **fence: Fence(**fence).runs().filter(cancel_requested_at__isnull=True).values("pk"),
    values=FENCE_VALUES,
)
_FENCE_STATE = Statement(
    lambda **fence: Fence(**fence).runs().values_list("cancel_requested_at")[:1],
    values=FENCE_VALUES,
)


def lease_end() -> CombinedExpression:
    """Database time one lease from now."""
    return Now() + timedelta(seconds=get_config().lease_seconds)


def lease_ago() -> CombinedExpression:
    """Database time one lease ago."""
    return Now() - timedelta(seconds=get_config().lease_seconds)


# --- Conditions ------------------------------------------------------------------------------


def blockers() -> QuerySet[AgentRun]:
    """Runs of the outer run's session that keep it from starting (active or ahead of it)."""
    earlier = Q(created_at__lt=OuterRef("created_at")) | Q(
        created_at=OuterRef("created_at"), id__lt=OuterRef("id")
    )
    return AgentRun.objects.filter(session_id=OuterRef("session_id")).filter(
        Q(status__in=SESSION_BLOCKING_STATUSES) | (Q(status=Status.PENDING) & earlier)
    )


def _count(runs: QuerySet[AgentRun]) -> Subquery:
    count = Func(F("pk"), function="COUNT", output_field=IntegerField())
    return Subquery(runs.order_by().annotate(n=count).values("n")[:1], output_field=IntegerField())


def running_count() -> Subquery:
    """Subquery: how many runs hold a worker slot."""
    return _count(AgentRun.objects.filter(status__in=SLOT_STATUSES))


def occupied_count() -> Subquery:
    """Subquery: runs holding a slot plus runs whose task is on its way to claim one."""
    on_the_way = Q(status=Status.PENDING) & ~needs_task()
    return _count(AgentRun.objects.filter(Q(status__in=SLOT_STATUSES) | on_the_way))


def concurrency_limit() -> Coalesce:
    """The deployment's concurrency limit: the one the workers recorded; "auto" (none
    recorded): the slots of the live workers; before any worker announced itself, this
    process's setting, or one worker's slots."""
    recorded = DispatchLock.objects.filter(name=LOCK_NAME).values("concurrency_limit")[:1]
    config = get_config()
    return Coalesce(
        Subquery(recorded),
        live_slots(),
        Value(config.concurrency_limit or config.worker_concurrency),
        output_field=IntegerField(),
    )


def live_workers() -> QuerySet[AgentWorker]:
    """Workers that renewed their heartbeat within the last lease."""
    return AgentWorker.objects.filter(heartbeat_at__gte=lease_ago())


def live_slots() -> Subquery:
    """Subquery: the slots of the live workers (NULL when there are none)."""
    total = Func(F("slots"), function="SUM", output_field=IntegerField())
    return Subquery(
        live_workers().order_by().annotate(n=total).values("n")[:1], output_field=IntegerField()
    )


def slot_free() -> GreaterThan:
    """Condition: fewer runs hold a slot than the concurrency limit allows."""
    return GreaterThan(concurrency_limit(), running_count())


def free_slots() -> ExpressionWrapper:
    """Slots neither held nor promised to a queued task (may be negative)."""
    return ExpressionWrapper(concurrency_limit() - occupied_count(), output_field=IntegerField())


def needs_task() -> Q:
    """Condition: the pending run has no task, or its task may be lost (older than a lease).

    A pending run has a task exactly when it has a dispatch time (``reserve`` sets both,
    ``release`` and ``requeue`` clear both).
    """
    return Q(dispatched_at__isnull=True) | Q(dispatched_at__lt=lease_ago())


def waiting_for_task() -> QuerySet[AgentRun]:
    """Pending runs that need a task (whether they may start now or not)."""
    return AgentRun.objects.filter(status=Status.PENDING).filter(needs_task())


def startable() -> QuerySet[AgentRun]:
    """Pending runs that may start now: first in their session, with a free slot."""
    return AgentRun.objects.filter(status=Status.PENDING).filter(~Exists(blockers()), slot_free())


def session_heads() -> QuerySet[AgentRun]:
    """Pending runs first in line in their session (whatever the slots)."""
    return AgentRun.objects.filter(status=Status.PENDING).filter(~Exists(blockers()))


def stale_runs() -> QuerySet[AgentRun]:
    """Running runs whose lease expired (database clock): their worker stopped renewing it."""
    return AgentRun.objects.filter(status=Status.RUNNING, lease_expires_at__lt=Now())


def record_concurrency_limit(limit: int | None) -> None:
    """Make ``limit`` the concurrency limit of every process of the deployment (None: the
    live workers' slots)."""
    DispatchLock.objects.update_or_create(name=LOCK_NAME, defaults={"concurrency_limit": limit})


# --- Workers ---------------------------------------------------------------------------------


def announce_worker(worker_id: str, *, slots: int, hostname: str, pid: int) -> None:
    """Record a worker (or renew its heartbeat): its slots count from now on."""
    updated = AgentWorker.objects.filter(pk=worker_id).update(heartbeat_at=Now(), slots=slots)
    if not updated:
        AgentWorker.objects.create(
            id=worker_id,
            slots=slots,
            hostname=hostname[:255],
            pid=pid,
            started_at=Now(),
            heartbeat_at=Now(),
        )


def retire_worker(worker_id: str) -> None:
    """A worker stops: its slots no longer count."""
    AgentWorker.objects.filter(pk=worker_id).delete()


def forget_dead_workers() -> int:
    """Remove the workers whose heartbeat is older than a lease; how many."""
    return AgentWorker.objects.exclude(heartbeat_at__gte=lease_ago()).delete()[0]


def give_up(fences: list[Fence]) -> int:
    """End the leases of attempts this process will not finish (a worker stopping after its
    grace period), so the next sweep retries their runs at once; how many it ended."""
    ended = 0
    for fence in fences:
        ended += fence.runs().update(lease_expires_at=Now())
    return ended


# --- Dispatch --------------------------------------------------------------------------------


def reserve(run_id: Any) -> bool:
    """Mark a run that may start and needs a task as being enqueued; True if this caller won.

    Only as many runs as there are free slots get a task: a slot is counted as taken from the
    moment a run's task is queued, so waiting runs do not pile up tasks that cannot claim.
    """
    return bool(_RESERVE.update(run_id=run_id))


_RESERVE = Statement(
    lambda run_id: (
        session_heads().filter(pk=run_id).filter(needs_task(), GreaterThan(free_slots(), 0)),
        {"task_id": QUEUED, "dispatched_at": Now()},
    ),
    values={"run_id": AgentRun._meta.pk},
)


def record_task_id(run_id: Any, task_id: str) -> None:
    """Store the broker's id of the task just enqueued (unless a worker already took it)."""
    AgentRun.objects.filter(pk=run_id, task_id=QUEUED).update(task_id=task_id)


def release(run_id: Any, task_id: str = "") -> bool:
    """Forget the task of a pending run (its enqueue failed, or it could not claim the run)."""
    tasks = [t for t in (task_id, QUEUED) if t]
    released = AgentRun.objects.filter(pk=run_id, status=Status.PENDING, task_id__in=tasks)
    return bool(released.update(task_id="", dispatched_at=None))


def fail_pending(run_id: Any, message: str) -> bool:
    """Fail a new pending run with ``message`` (its task could not be queued).

    Only a run that never started fails: one that goes on (resumed after its approvals, or
    retried) has work and decisions behind it, so it stays pending, without a task, for the
    next sweep to enqueue.
    """
    failed = AgentRun.objects.filter(pk=run_id, status=Status.PENDING, attempt=0).update(
        status=Status.FAILED, error=message, finished_at=Now()
    )
    if failed:
        send_safely(agent_run_failed, AgentRun, run=AgentRun.objects.get(pk=run_id))
    else:
        release(run_id)
    return bool(failed)


# --- An attempt ------------------------------------------------------------------------------


# Set by a worker process (``workers.start_worker``): it claims a run only for a slot of its
# own that it took first (``workers.Slots``).
claims_hold_slots = False


def claim(run_id: Any, *, task_id: str = "") -> AgentRun | None:
    """Move a startable run to RUNNING with a fresh lease and the next attempt number.

    Returns the claimed run (its ``attempt`` is the fence), or None if it is not pending,
    another run of its session runs or comes first, or every slot is taken.
    """
    statement, values = (_CLAIM_TASK, {"task_id": task_id}) if task_id else (_CLAIM, {})
    if connection.vendor == "sqlite":
        # SQLite runs one writer at a time: a single UPDATE sees every committed claim.
        return _first(statement.update_returning(run_id=run_id, **values))
    if claims_hold_slots and get_config().concurrency_limit is None:
        # "auto": the limit is the live workers' slots, and this worker claims a run only for
        # a free slot of its own, so no claim can pass the limit: claims of different
        # conversations need not take turns on the deployment's lock, only on their
        # conversation's row (its claims see each other's, whatever the runs' order and
        # however slow a claim is). A limit another worker recorded is still counted.
        with transaction.atomic():
            locked = _SESSION_LOCK.rows(run_id=run_id)
            if locked and locked[0][0] is not None:
                _LOCK.rows()
            run = _first(statement.update_returning(run_id=run_id, **values))
        if run is not None and locked:
            # The conversation's row was read anyway: its key (for the run's log lines) needs
            # no query of its own; its other fields load if anything reads them.
            _, session_pk, session_key = locked[0]
            session = AgentSession.from_db(
                connection.alias, ["id", "session_key"], [session_pk, session_key]
            )
            AgentRun.session.field.set_cached_value(run, session)
        return run
    with transaction.atomic():
        # Every claim takes this lock, so the running count in the UPDATE cannot race; the
        # timestamps are taken once it is held (a run that finished meanwhile came first).
        if not _LOCK.rows():
            DispatchLock.objects.select_for_update().get_or_create(name=LOCK_NAME)
        return _first(statement.update_returning(run_id=run_id, **values))


def _claim_updates(**task: Any) -> dict[str, Any]:
    return {
        "status": Status.RUNNING,
        "started_at": Now(),
        "heartbeat_at": Now(),
        "lease_expires_at": lease_end(),
        "attempt": F("attempt") + 1,
        # A retry streams its own text: a dead attempt's partial text goes.
        "stream_text": "",
        **task,
    }


RUN_FIELDS = tuple(AgentRun._meta.concrete_fields)
_CLAIM = Statement(
    lambda run_id: (startable().filter(pk=run_id), _claim_updates()),
    values={"run_id": AgentRun._meta.pk},
    returning=RUN_FIELDS,
)
_CLAIM_TASK = Statement(
    lambda run_id, task_id: (startable().filter(pk=run_id), _claim_updates(task_id=task_id)),
    values={"run_id": AgentRun._meta.pk, "task_id": AgentRun._meta.get_field("task_id")},
    returning=RUN_FIELDS,
)
_LOCK = Statement(
    lambda: DispatchLock.objects.select_for_update().filter(name=LOCK_NAME).values_list("name")
)
# The run's conversation row, locked, with the deployment's recorded limit (None: "auto").
_SESSION_LOCK = Statement(
    lambda run_id: (
        AgentSession.objects.select_for_update(no_key=True, of=("self",))
        .filter(pk=Subquery(AgentRun.objects.filter(pk=run_id).values("session_id")[:1]))
        .annotate(
            recorded=Subquery(
                DispatchLock.objects.filter(name=LOCK_NAME).values("concurrency_limit")[:1]
            )
        )
        .values_list("recorded", "pk", "session_key")
    ),
    values={"run_id": AgentRun._meta.pk},
)


def _first(runs: list[AgentRun]) -> AgentRun | None:
    return runs[0] if runs else None


def renew(fence: Fence) -> bool:
    """Extend the attempt's lease; False if the attempt no longer holds its run."""
    return bool(_RENEW.update(**fence.values()))


_RENEW = Statement(
    lambda **fence: (
        Fence(**fence).runs(),
        {"heartbeat_at": Now(), "lease_expires_at": lease_end()},
    ),
    values=FENCE_VALUES,
)


def finish(
    fence: Fence,
    *,
    status: str,
    error: str,
    error_detail: str,
    final_output: Any,
    last_response_id: str,
    usage: dict[str, int],
) -> AgentRun | None:
    """Record the attempt's terminal state; None (nothing written) if the fence was lost."""
    written = {
        "status": status,
        "error": error,
        "error_detail": error_detail,
        "final_output": final_output,
        "last_response_id": last_response_id,
        **usage,
    }
    if status == Status.CANCELLED and not error:
        del written["error"]  # keeps why it was cancelled (INTERRUPTED_ERROR)
    # A failed or cancelled run keeps its streamed text: its partial output.
    statement = _finish_statement(tuple(written), clear_stream=status == Status.COMPLETED)
    return _first(statement.update_returning(**written, **fence.values()))


@functools.cache
def _finish_statement(names: tuple[str, ...], *, clear_stream: bool) -> Statement:
    def build(run_id: Any, attempt: int, **written: Any) -> Any:
        updates = {
            **written,
            "finished_at": Now(),
            "heartbeat_at": Now(),
            "lease_expires_at": None,
        }
        if clear_stream:
            updates["stream_text"] = ""
        return Fence(run_id, attempt).runs(), updates

    fields = {name: AgentRun._meta.get_field(name) for name in names}
    return Statement(build, values={**fields, **FENCE_VALUES}, returning=RUN_FIELDS)


# --- Cancellation and recovery ---------------------------------------------------------------

INTERRUPTED_ERROR = "Stopped for a newer message."
IN_PROGRESS_STATUSES = (Status.PENDING, Status.RUNNING, *AgentRun.PAUSED_STATUSES)


def make_way(session_id: int, strategy: str) -> list[AgentRun]:
    """Apply a new run's ``multitask_strategy`` to the runs its session has in progress;
    call it inside the transaction that creates the new run. Returns the runs it cancelled.

    The session's row is taken first (an ``UPDATE``: a row lock on PostgreSQL, the write lock
    on SQLite), so posts to one conversation take turns and each sees the runs the previous
    one left. ``enqueue`` leaves them alone (the new run waits its turn); ``reject`` raises
    ``ConversationBusy`` with the oldest of them; ``interrupt`` cancels waiting and paused
    runs at once and asks a running one to stop after its current step (it keeps its partial
    output, and the new run starts when it has stopped); ``rollback`` cancels them all at once,
    a running one included (its attempt loses the run: nothing it does afterwards is kept),
    deletes the history items they wrote and their streamed text, and supersedes their events.
    """
    if strategy == "enqueue":
        return []
    AgentSession.objects.filter(pk=session_id).update(updated_at=Now())
    busy = AgentRun.objects.filter(session_id=session_id, status__in=IN_PROGRESS_STATUSES)
    if strategy == "reject":
        oldest = busy.order_by("created_at", "id").values_list("pk", flat=True).first()
        if oldest is not None:
            raise ConversationBusy(oldest)
        return []
    # One locking read of every run in progress: a run that changes meanwhile (a running run
    # pausing for approval, a pending one being claimed) is read as it is once its change
    # committed, and none changes again before this transaction ends.
    locked = dict(busy.select_for_update().values_list("pk", "status"))
    running = [pk for pk, status in locked.items() if status == Status.RUNNING]
    ids = list(locked) if strategy == "rollback" else [pk for pk in locked if pk not in running]
    AgentRun.objects.filter(pk__in=ids).update(
        status=Status.CANCELLED,
        error=INTERRUPTED_ERROR,
        cancel_requested_at=Now(),
        finished_at=Now(),
        lease_expires_at=None,
    )
    if strategy == "rollback":
        # Gone from the conversation: its history, its partial text and (for clients) its events.
        AgentSessionItem.objects.filter(run_id__in=ids).delete()
        AgentRun.objects.filter(pk__in=ids).update(stream_text="")
        AgentEvent.objects.filter(run_id__in=ids).update(superseded=True)
    else:
        AgentRun.objects.filter(pk__in=running, cancel_requested_at__isnull=True).update(
            cancel_requested_at=Now(), error=INTERRUPTED_ERROR
        )
    cancelled = list(AgentRun.objects.filter(pk__in=ids))
    for run in cancelled:
        transaction.on_commit(lambda run=run: send_safely(agent_run_cancelled, AgentRun, run=run))
    return cancelled


def cancel(run: AgentRun) -> bool:
    """Cancel a pending or paused run now (True), or flag a running one to stop after its
    turn (False).

    ``run`` is refreshed; callers check ``run.is_terminal`` for runs that already finished.
    """
    waiting = (Status.PENDING, *AgentRun.PAUSED_STATUSES)
    runs = AgentRun.objects.filter(pk=run.pk)
    while True:
        cancelled = runs.filter(status__in=waiting).update(
            status=Status.CANCELLED, cancel_requested_at=Now(), finished_at=Now()
        )
        if cancelled:
            break
        flagged = runs.filter(status=Status.RUNNING, cancel_requested_at__isnull=True).update(
            cancel_requested_at=Now()
        )
        # Neither: the run finished, was flagged already, or paused between the two
        # statements (its worker stopped it at a budget or an approval): then cancel it now.
        if flagged or not runs.filter(status__in=waiting).exists():
            break
    run.refresh_from_db()
    if cancelled:
        send_safely(agent_run_cancelled, AgentRun, run=run)
    return bool(cancelled)


def fail_stale(run: AgentRun) -> bool:
    """Fail ``run`` if its lease expired in the attempt it had when read."""
    failed = (
        stale_runs()
        .filter(pk=run.pk, attempt=run.attempt)
        .update(
            status=Status.FAILED,
            error=LEASE_EXPIRED_ERROR,
            finished_at=Now(),
            lease_expires_at=None,
        )
    )
    if failed:
        run.refresh_from_db()
        send_safely(agent_run_failed, AgentRun, run=run)
    return bool(failed)


def requeue(run: AgentRun, *, stale_only: bool) -> bool:
    """Put a stale run (or, unless ``stale_only``, a failed one) back to pending.

    The items its attempt wrote after the run's last checkpoint are deleted and its events
    after it marked superseded, in the same transaction and only if the run really changed,
    so a run that finished meanwhile keeps its history. A stale run whose cancellation was
    requested is cancelled instead; one that used up ``AGENTIC_DJANGO_MAX_ATTEMPTS`` or its
    ``AGENTIC_DJANGO_RUN_TIMEOUT`` (counted over all its attempts) fails. A failed run
    (``stale_only`` False: a person asked) starts over with a fresh count, and only while no
    later run of its session exists, so the history stays in order. True if the run changed.
    """
    config = get_config()
    later = AgentRun.objects.filter(
        session_id=OuterRef("session_id"), created_at__gt=OuterRef("created_at")
    )
    stale = Q(status=Status.RUNNING, attempt=run.attempt, lease_expires_at__lt=Now())
    # How long the dead attempt ran, as far as its last renewal tells (database clock).
    used = run.elapsed_seconds + _attempt_seconds(run)
    exhausted = ""
    if stale_only and run.retries + 1 >= config.max_attempts:
        exhausted = attempts_exhausted_error(run.retries + 1)
    elif stale_only and used >= config.run_timeout_seconds:
        exhausted = timeout_error(config.run_timeout_seconds)
    retryable = stale & Q(cancel_requested_at__isnull=True)
    if not stale_only:
        retryable |= Q(status=Status.FAILED) & ~Exists(later)
    this_run = AgentRun.objects.filter(pk=run.pk)
    with transaction.atomic():
        # Serializes with the session's other locked writers (pop, clear, a write that found
        # its sequences taken). A run's own writes check its claim with a share lock on the
        # run's row instead, which the UPDATEs below wait for: until this transaction
        # commits, no item of the old attempt can land. No KEY: an item's insert checks its
        # foreign key to the session with a key-share lock, which must not wait for this one
        # while this transaction waits for that insert's share lock on the run.
        session = AgentSession.objects.select_for_update(no_key=True).filter(pk=run.session_id)
        list(session.values("pk"))
        cancelled = this_run.filter(stale, cancel_requested_at__isnull=False).update(
            status=Status.CANCELLED, finished_at=Now(), lease_expires_at=None
        )
        failed = 0
        if exhausted:
            # After a cancel the run is no longer stale, so this matches nothing.
            failed = this_run.filter(retryable).update(
                status=Status.FAILED,
                error=exhausted,
                finished_at=Now(),
                lease_expires_at=None,
                elapsed_seconds=used,
            )
            retryable = Q(pk__in=[])
        counts = (
            {"retries": F("retries") + 1, "elapsed_seconds": used}
            if stale_only
            else {"retries": 0, "elapsed_seconds": 0}
        )
        requeued = this_run.filter(retryable).update(
            status=Status.PENDING,
            started_at=None,
            finished_at=None,
            error="",
            error_detail="",
            final_output=None,
            cancel_requested_at=None,
            # No task exists for the next attempt yet: a dispatcher must enqueue one.
            task_id="",
            dispatched_at=None,
            lease_expires_at=None,
            heartbeat_at=None,
            # The dead attempt's partial text goes with it.
            stream_text="",
            **counts,
        )
        if cancelled or requeued:
            _roll_back_to_checkpoint(run.pk)
            session.update(updated_at=Now())  # its history changed
    if not (cancelled or requeued or failed):
        return False
    run.refresh_from_db()
    if cancelled:
        send_safely(agent_run_cancelled, AgentRun, run=run)
    if failed:
        send_safely(agent_run_failed, AgentRun, run=run)
    return True


def _attempt_seconds(run: AgentRun) -> float:
    """Seconds between the attempt's start and its last sign of life (both database clock)."""
    if run.started_at is None or run.heartbeat_at is None:
        return 0.0
    return max(0.0, (run.heartbeat_at - run.started_at).total_seconds())


def _roll_back_to_checkpoint(run_id: Any) -> None:
    """Drop what the run's last attempt wrote after its checkpoint: a retry writes it again.
    Items go; events stay stored for the admin, marked superseded so no client sees them."""
    AgentSessionItem.objects.filter(
        run_id=run_id, sequence__gt=F("run__checkpoint_item_sequence")
    ).delete()
    AgentEvent.objects.filter(
        run_id=run_id, superseded=False, sequence__gt=F("run__checkpoint_event_sequence")
    ).update(superseded=True)
    # The calls stay in the ledger (they were paid for) but no longer count as the run's.
    AgentUsage.objects.filter(
        run_id=run_id, superseded=False, sequence__gt=F("run__checkpoint_usage_sequence")
    ).update(superseded=True)
    AgentRun.objects.filter(pk=run_id).update(rollbacks=F("rollbacks") + 1)


# --- Streamed text ---------------------------------------------------------------------------


def stream_text(fence: Fence, text: str, *, new_message: bool, events: bool = True) -> bool:
    """Add ``text`` to the assistant message streaming in (``new_message``: its first text,
    which follows the run's latest event -- or, when the run records no ``events``, gets the
    next message number); False if the fence was lost."""
    if new_message:
        statement = _NEW_MESSAGE_AFTER_EVENTS if events else _NEW_MESSAGE
        return bool(statement.update(text=text, **fence.values()))
    # The text that follows: the most frequent write of a streaming run, so one prebuilt
    # statement with the fence's conditions (``Fence.runs``), not a compiled queryset.
    with connection.cursor() as cursor:
        cursor.execute(_append_sql(connection.vendor), _fence_params(fence, text))
        return cursor.rowcount > 0


@functools.cache
def _append_sql(vendor: str) -> str:
    """``UPDATE`` appending to a run's streamed text while ``Fence.runs`` would match it."""
    name, field = connection.ops.quote_name, AgentRun._meta.get_field
    text, pk, attempt, status = (
        name(field(column).column) for column in ("stream_text", "id", "attempt", "status")
    )
    return (
        f"UPDATE {name(AgentRun._meta.db_table)} SET {text} = {text} || %s "  # noqa: S608
        f"WHERE {pk} = %s AND {attempt} = %s AND {status} = %s"
    )


def _new_message(*, events: bool) -> Statement:
    def build(text: str, run_id: Any, attempt: int) -> Any:
        sequence = _max_sequence(AgentEvent, run_id) if events else F("stream_sequence") + 1
        updates = {"stream_text": Value(text), "stream_sequence": sequence}
        return Fence(run_id, attempt).runs(), updates

    return Statement(
        build, values={"text": AgentRun._meta.get_field("stream_text"), **FENCE_VALUES}
    )


_NEW_MESSAGE_AFTER_EVENTS = _new_message(events=True)
_NEW_MESSAGE = _new_message(events=False)


def _fence_params(fence: Fence, text: str) -> list[Any]:
    run_id = AgentRun._meta.pk.get_db_prep_value(fence.run_id, connection)
    return [text, run_id, fence.attempt, Status.RUNNING.value]


def end_stream(fence: Fence, sequence: int | None) -> bool:
    """The streamed message is complete: it is event ``sequence`` now (None: the run records
    no events, and the message keeps its number)."""
    if sequence is None:
        return bool(_END_STREAM.update(**fence.values()))
    return bool(_END_STREAM_AS_EVENT.update(sequence=sequence, **fence.values()))


_END_STREAM = Statement(
    lambda **fence: (Fence(**fence).runs(), {"stream_text": ""}), values=FENCE_VALUES
)
_END_STREAM_AS_EVENT = Statement(
    lambda sequence, **fence: (
        Fence(**fence).runs(),
        {"stream_text": "", "stream_sequence": sequence},
    ),
    values={"sequence": AgentRun._meta.get_field("stream_sequence"), **FENCE_VALUES},
)


# --- Checkpoints and approvals ---------------------------------------------------------------


def _max_sequence(model: Any, run_id: Any) -> Coalesce:
    rows = model.objects.filter(run_id=run_id).order_by().values("run_id")
    latest = rows.annotate(last=Max("sequence")).values("last")[:1]
    return Coalesce(Subquery(latest), 0)


def _checkpoint_marks(run_id: Any) -> dict[str, Any]:
    """Run fields recording how far the run's items, events and ledger rows went at its
    checkpoint."""
    return {
        "checkpoint_item_sequence": _max_sequence(AgentSessionItem, run_id),
        "checkpoint_event_sequence": _max_sequence(AgentEvent, run_id),
        "checkpoint_usage_sequence": _max_sequence(AgentUsage, run_id),
    }


_CHECKPOINT_MARKS = Statement(
    lambda run_id, attempt: (Fence(run_id, attempt).runs(), _checkpoint_marks(run_id)),
    values=FENCE_VALUES,
)


def _checkpoint_values(fence: Fence, state: str, schema_version: str, turn: int) -> dict:
    """A checkpoint's fields but its run: what an upsert stores or replaces."""
    return {
        "state": state,
        "schema_version": schema_version,
        "turn": turn,
        "attempt": fence.attempt,
        "updated_at": timezone.now(),
    }


def _store_checkpoint(fence: Fence, state: str, schema_version: str, turn: int) -> None:
    # One upsert (INSERT ... ON CONFLICT DO UPDATE): no read, no savepoints.
    values = _checkpoint_values(fence, state, schema_version, turn)
    AgentCheckpoint.objects.bulk_create(
        [AgentCheckpoint(run_id=fence.run_id, **values)],
        update_conflicts=True,
        unique_fields=["run"],
        update_fields=list(values),
    )


@functools.cache
def _checkpoint_upsert_sql(stored_fields: tuple[str, ...]) -> str:
    """``INSERT`` of a checkpoint (replacing the run's last) from the run rows a ``marked``
    CTE returns: PostgreSQL runs the fenced marks UPDATE and the upsert as one statement."""
    qn = connection.ops.quote_name
    meta = AgentCheckpoint._meta
    run_column = qn(meta.get_field("run").column)
    stored = [qn(meta.get_field(name).column) for name in stored_fields]
    columns = [run_column, *stored]
    assignments = ", ".join(f"{column} = EXCLUDED.{column}" for column in stored)
    placeholders = ", ".join(["%s"] * len(stored))
    run_pk = qn(AgentRun._meta.pk.column)
    return (
        f"INSERT INTO {qn(meta.db_table)} ({', '.join(columns)}) "  # noqa: S608 - names only
        f"SELECT {run_pk}, {placeholders} FROM marked "
        f"ON CONFLICT ({run_column}) DO UPDATE SET {assignments}"
    )


def save_checkpoint(fence: Fence, *, state: str, schema_version: str, turn: int) -> bool:
    """Store the attempt's resumable state and where its items and events stand; False (and
    nothing stored) if the fence was lost."""
    if connection.vendor == "postgresql":
        # One statement: the fenced UPDATE (re-checked on the run row as last committed, and
        # locking it) feeds the upsert, so both land or neither does, with no transaction of
        # their own (BEGIN, two statements, COMMIT before).
        marks_sql, params = _CHECKPOINT_MARKS.sql(**fence.values())
        run_pk = connection.ops.quote_name(AgentRun._meta.pk.column)
        meta = AgentCheckpoint._meta
        values = _checkpoint_values(fence, state, schema_version, turn)
        params += [
            meta.get_field(name).get_db_prep_save(value, connection)
            for name, value in values.items()
        ]
        upsert = _checkpoint_upsert_sql(tuple(values))
        sql = f"WITH marked AS ({marks_sql} RETURNING {run_pk}) {upsert}"
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount == 1
    with transaction.atomic():
        # The fenced UPDATE locks the run row: no transition can slip in before the commit.
        if not _CHECKPOINT_MARKS.update(**fence.values()):
            return False
        _store_checkpoint(fence, state, schema_version, turn)
    return True


def pause(
    fence: Fence,
    *,
    state: str | None,
    schema_version: str,
    turn: int,
    approvals: list[dict[str, Any]],
    usage: dict[str, int],
    elapsed: float,
    status: str = Status.AWAITING_APPROVAL,
    reason: str = "",
) -> AgentRun | None:
    """Park the run on tool calls that need a decision: it keeps its session blocked but gives
    its slot up, and fails at ``approval_expires_at`` unless decided. With ``status``
    ``budget_exceeded`` (and no approvals) it waits for its budget instead, without a
    deadline, ``reason`` (the cap it reached) as its error until it goes on.

    ``state`` is the run's resumable state as it paused; None keeps the checkpoint it has
    (the run pauses before doing anything: what came after the checkpoint is rolled back).
    A run whose cancellation was requested never pauses: it ends cancelled. Returns the run
    as written (paused or cancelled), or None if the fence was lost. ``elapsed``: the seconds
    the run has run in all its attempts.
    """
    expires = Now() + timedelta(seconds=get_config().approval_timeout_seconds)
    if status != Status.AWAITING_APPROVAL:
        expires = None
    marks = _checkpoint_marks(fence.run_id) if state is not None else {}
    with transaction.atomic():
        paused = _update_returning(
            fence.runs().filter(cancel_requested_at__isnull=True),
            {
                "status": status,
                "error": reason,
                "lease_expires_at": None,
                "heartbeat_at": Now(),
                "approval_expires_at": expires,
                "task_id": "",
                "dispatched_at": None,
                "elapsed_seconds": elapsed,
                **marks,
                **usage,
            },
        )
        if paused is None:
            # Cancelled meanwhile (or the fence is lost: then this matches nothing either).
            return _update_returning(
                fence.runs(),
                {
                    "status": Status.CANCELLED,
                    "finished_at": Now(),
                    "heartbeat_at": Now(),
                    "lease_expires_at": None,
                    "elapsed_seconds": elapsed,
                    **usage,
                },
            )
        if state is None:
            _roll_back_to_checkpoint(fence.run_id)
        else:
            _store_checkpoint(fence, state, schema_version, turn)
        requested = [
            AgentApproval(run_id=paused.pk, requested_at=paused.heartbeat_at, **approval)
            for approval in approvals
        ]
        # A call decided earlier in the run keeps its decision; one nobody decided in time
        # (the run expired, then was retried) is asked again.
        AgentApproval.objects.bulk_create(requested, ignore_conflicts=True)
        AgentApproval.objects.filter(
            run_id=paused.pk,
            call_id__in=[approval["call_id"] for approval in approvals],
            decision=AgentApproval.Decision.EXPIRED,
        ).update(
            decision=AgentApproval.Decision.PENDING,
            requested_at=paused.heartbeat_at,
            decided_at=None,
        )
    if status == Status.AWAITING_APPROVAL:
        send_safely(agent_run_awaiting_approval, AgentRun, run=paused)
    else:
        send_safely(agent_budget_exceeded, AgentRun, run=paused, reason=reason)
    return paused


def resume_within_budget(run_id: Any) -> bool:
    """A run paused on its budget goes back to pending (to be dispatched like any run); False
    if it was no longer paused so (cancelled, or resumed by another sweep)."""
    resumed = AgentRun.objects.filter(pk=run_id, status=Status.BUDGET_EXCEEDED).update(
        status=Status.PENDING, error="", task_id="", dispatched_at=None
    )
    if resumed:
        send_safely(agent_run_resumed, AgentRun, run=AgentRun.objects.get(pk=run_id))
    return bool(resumed)


def decide(
    run: AgentRun,
    call_id: str,
    *,
    approve: bool,
    always: bool = False,
    message: str = "",
    user: Any = None,
) -> bool:
    """Record one decision on a paused run; once none is pending, the run goes back to
    pending (True is returned) to be dispatched like any run. The first decision on a call
    counts: ``ApprovalAlreadyDecided`` for the next one. Past the run's approval deadline
    nothing is decided: the run fails as expired (``ApprovalExpired``), sweep or no sweep."""
    decision = AgentApproval.Decision.APPROVED if approve else AgentApproval.Decision.REJECTED
    pending = AgentApproval.objects.filter(
        run_id=OuterRef("pk"), decision=AgentApproval.Decision.PENDING
    )
    with transaction.atomic():
        # Decisions on one run take turns, so exactly one of them sees the last one done.
        paused = AgentRun.objects.select_for_update().filter(
            pk=run.pk, status=Status.AWAITING_APPROVAL
        )
        if not paused.exists():
            raise RunNotAwaitingApproval()
        expired = _expire(paused.filter(approval_expires_at__lt=Now()), run.pk)
        if not expired:
            decided = AgentApproval.objects.filter(
                run_id=run.pk, call_id=call_id, decision=AgentApproval.Decision.PENDING
            ).update(
                decision=decision,
                always=always,
                message=message,
                decided_at=Now(),
                decided_by=user if getattr(user, "pk", None) else None,
            )
            if not decided:
                if AgentApproval.objects.filter(run_id=run.pk, call_id=call_id).exists():
                    raise ApprovalAlreadyDecided()
                raise ApprovalNotFound()
            resumed = (
                AgentRun.objects.filter(pk=run.pk, status=Status.AWAITING_APPROVAL)
                .exclude(Exists(pending))
                .update(
                    status=Status.PENDING, approval_expires_at=None, task_id="", dispatched_at=None
                )
            )
    run.refresh_from_db()
    if expired:
        send_safely(agent_run_failed, AgentRun, run=run)
        raise ApprovalExpired()
    if resumed:
        send_safely(agent_run_resumed, AgentRun, run=run)
    return bool(resumed)


def expire_approvals() -> list[AgentRun]:
    """Fail paused runs whose approvals were not decided in time; the runs that failed."""
    expired = []
    overdue = AgentRun.objects.filter(
        status=Status.AWAITING_APPROVAL, approval_expires_at__lt=Now()
    )
    for run_id in overdue.values_list("pk", flat=True):
        with transaction.atomic():
            failed = _expire(overdue.filter(pk=run_id), run_id)
        if failed:
            run = AgentRun.objects.get(pk=run_id)
            send_safely(agent_run_failed, AgentRun, run=run)
            expired.append(run)
    return expired


def _expire(overdue: QuerySet[AgentRun], run_id: Any) -> bool:
    """Fail the overdue paused run and mark its undecided calls expired (in the caller's
    transaction); whether it was overdue."""
    failed = overdue.update(status=Status.FAILED, error=APPROVAL_EXPIRED_ERROR, finished_at=Now())
    if failed:
        AgentApproval.objects.filter(run_id=run_id, decision=AgentApproval.Decision.PENDING).update(
            decision=AgentApproval.Decision.EXPIRED, decided_at=Now()
        )
    return bool(failed)


# --- Deleting runs and conversations --------------------------------------------------------

# How long a delete tries to lock what it deletes while others hold it (a run's writer holds
# its row for a statement, recovery and claims for a short transaction) before it gives up.
DELETE_PATIENCE_SECONDS = 10.0
# A lock taken by someone else (NOWAIT), or a deadlock (a DELETE that waited on a child row).
_BUSY_SQLSTATES = frozenset({"55P03", "40P01"})


def lock_and_delete(
    queryset: QuerySet[Any], *, recheck: bool = False
) -> tuple[int, dict[str, int]]:
    """Delete runs or conversations (a queryset of either) with all that is theirs, also
    while their runs are writing; what ``QuerySet.delete`` returns. ``recheck``: only those
    that still match ``queryset`` once locked (say, conversations still idle).

    Django gathers the rows to delete and deletes a table at a time: an event, history item
    or usage record a running run commits in between points at a run or conversation about to
    go, and the delete fails on its foreign key at commit. So the runs, then the
    conversations, then runs created meanwhile are locked first (``FOR UPDATE``): a write
    that points at them waits, then finds them gone and is refused as a lost claim's. The
    locks are taken without waiting -- what another holds (recovery and claims lock a
    conversation, then its runs) makes the delete let go of all it holds and try again
    shortly, so it is never a deadlock's other half. SQLite takes its write lock when the
    transaction begins (``IMMEDIATE``), which does the same.
    """
    model = queryset.model
    if model not in (AgentRun, AgentSession):
        raise TypeError(f"lock_and_delete deletes runs or conversations, not {model.__name__}")
    pks = list(queryset.values_list("pk", flat=True))
    rows = model.objects.filter(pk__in=pks)
    deadline = time.monotonic() + DELETE_PATIENCE_SECONDS
    pause = 0.02
    while True:
        try:
            with transaction.atomic():
                if model is AgentRun:
                    _lock(rows)
                else:
                    runs = AgentRun.objects.filter(session_id__in=pks)
                    _lock(runs)
                    _lock(rows)
                    _lock(runs)  # a run created before its conversation was locked
                return (queryset.filter(pk__in=pks) if recheck else rows).delete()
        except OperationalError as exc:
            busy = getattr(exc.__cause__, "sqlstate", None) in _BUSY_SQLSTATES
            if not busy or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def _lock(queryset: QuerySet[Any]) -> None:
    locking = queryset.order_by("pk").select_for_update(nowait=True, of=("self",))
    list(locking.values_list("pk", flat=True))


# --- Helpers ---------------------------------------------------------------------------------


def _update_returning(queryset: QuerySet[AgentRun], updates: dict[str, Any]) -> AgentRun | None:
    """Apply ``updates`` to the (single) matched row and return it as updated, or None.

    One ``UPDATE ... RETURNING`` statement (Django's query compiler, which this project pins;
    PostgreSQL and SQLite 3.35+ support it, see ``checks``), so what is returned is exactly
    what the update wrote.
    """
    query = queryset.query.chain(UpdateQuery)
    query.add_update_values(updates)
    fields = AgentRun._meta.concrete_fields
    rows = query.get_compiler(queryset.db).execute_returning_sql(fields)
    if not rows:
        return None
    return AgentRun.from_db(queryset.db, [f.attname for f in fields], rows[0])
