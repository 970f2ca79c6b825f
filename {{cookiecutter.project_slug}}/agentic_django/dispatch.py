"""Queueing of runs: enqueue on commit, atomic claims under the concurrency limit, one running
run per session in submission order, and dispatch of the next run when one finishes.

A task is only a wake-up call: the run's row decides whether it may start. Duplicate or late
tasks are harmless because claiming is an atomic conditional update made under a lock row.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db import connection, transaction
from django.db.models import Exists, F, Func, IntegerField, OuterRef, Q, Subquery
from django.db.models.sql import UpdateQuery
from django.utils import timezone

from agentic_django.conf import get_config
from agentic_django.exceptions import EnqueueFailed, RunNotCancellable
from agentic_django.models import AgentRun, DispatchLock
from agentic_django.signals import agent_run_cancelled, agent_run_failed, send_safely

logger = logging.getLogger(__name__)

Status = AgentRun.Status
# Statuses that occupy a worker slot and block later runs of their session. Future paused
# states (e.g. awaiting approval) would block the session without using a slot.
SLOT_STATUSES = (Status.RUNNING,)
SESSION_BLOCKING_STATUSES = (Status.RUNNING,)
LOCK_NAME = "runs"
# task_id of a run a dispatcher is enqueueing, until the broker gives the task its id.
QUEUED = "queued"


def enqueue_on_commit(run_id: str) -> None:
    """Dispatch ``run_id`` after the current transaction commits (at once outside one)."""
    transaction.on_commit(lambda: dispatch_run(run_id))


def dispatch_run(run_id: str, *, redispatch: bool = False) -> None:
    """Enqueue the run's task if it could start now; otherwise a finishing run will do it.

    ``redispatch`` also enqueues a run that already has a task (one the broker may have lost).
    """
    from agentic_django.recovery import ensure_startup_recovery, recover_stale_blockers

    ensure_startup_recovery()
    # One conditional UPDATE decides and reserves: only one dispatcher enqueues the run.
    runs = AgentRun.objects.filter(pk=run_id, status=Status.PENDING)
    if not redispatch:
        runs = runs.filter(task_id="")
    if runs.filter(~Exists(_blockers()), _slot_free()).update(task_id=QUEUED):
        _enqueue(run_id)
        return
    # Blocked or full (or not pending): a dead worker's expired lease must not hold the queue.
    recover_stale_blockers()


def dispatch_next() -> int:
    """Enqueue the oldest eligible pending runs that fit in the free slots; return how many."""
    config = get_config()
    # Runs with a task are skipped, unless pending longer than a lease (the task may be lost).
    cutoff = timezone.now() - timedelta(seconds=config.lease_seconds)
    heads = list(
        _session_heads()
        .filter(Q(task_id="") | Q(created_at__lt=cutoff))
        .annotate(running=_running_count())
        .order_by("created_at", "id")
        .values_list("id", "running", "task_id")[: config.concurrency_limit]
    )
    if not heads:
        return 0
    free = config.concurrency_limit - (heads[0][1] or 0)
    count = 0
    for run_id, _running, task_id in heads[: max(free, 0)]:
        reserved = AgentRun.objects.filter(pk=run_id, status=Status.PENDING, task_id=task_id)
        if reserved.update(task_id=QUEUED):
            _enqueue(str(run_id))
            count += 1
    return count


def claim(run_id: str, *, task_id: str = "") -> AgentRun | None:
    """Atomically move a pending run to running with a fresh lease, if the rules allow it.

    Returns the claimed run, or None if it is not pending, another run of its session runs
    or comes first, or the concurrency limit is reached.
    """
    claimable = AgentRun.objects.filter(pk=run_id, status=Status.PENDING).filter(
        ~Exists(_blockers()), _slot_free()
    )
    if connection.vendor == "sqlite":
        # SQLite runs one writer at a time: a single UPDATE sees every committed claim.
        run = _update_returning(claimable, _claim_updates(task_id))
    else:
        with transaction.atomic():
            # Every claim takes this lock, so the running count in the UPDATE cannot race.
            DispatchLock.objects.select_for_update().get_or_create(name=LOCK_NAME)
            # Stamped once the lock is held: a run that finished while we waited came first.
            run = _update_returning(claimable, _claim_updates(task_id))
    if run is None:
        _release(run_id, task_id)
    return run


def _claim_updates(task_id: str) -> dict:
    now = timezone.now()
    updates = {
        "status": Status.RUNNING,
        "started_at": now,
        "heartbeat_at": now,
        "lease_expires_at": now + timedelta(seconds=get_config().lease_seconds),
        "attempt": F("attempt") + 1,
        "error": "",
    }
    if task_id:
        updates["task_id"] = task_id
    return updates


def _update_returning(queryset, updates: dict) -> AgentRun | None:
    """Apply ``updates`` to the (single) matched row and return it as updated, or None."""
    if not connection.features.can_return_rows_from_update:
        pks = list(queryset.values_list("pk", flat=True)[:1])
        if not pks or not AgentRun.objects.filter(pk=pks[0]).filter(
            pk__in=queryset.values("pk")
        ).update(**updates):
            return None
        return AgentRun.objects.get(pk=pks[0])
    query = queryset.query.chain(UpdateQuery)
    query.add_update_values(updates)
    fields = AgentRun._meta.concrete_fields
    rows = query.get_compiler(queryset.db).execute_returning_sql(fields)
    if not rows:
        return None
    return AgentRun.from_db(queryset.db, [f.attname for f in fields], rows[0])


def _release(run_id: str, task_id: str) -> None:
    """A pending run this task could not claim waits for a later dispatch."""
    # Clearing the task mark makes dispatch_next pick the run up when something finishes;
    # re-checking after the clear closes the race with a run that finished just before it.
    if AgentRun.objects.filter(
        pk=run_id, status=Status.PENDING, task_id__in=[t for t in (task_id, QUEUED) if t]
    ).update(task_id=""):
        dispatch_run(run_id)


def cancel(run: AgentRun) -> AgentRun:
    """Cancel a pending run now; flag a running one so it stops after its current turn."""
    now = timezone.now()
    cancelled = AgentRun.objects.filter(pk=run.pk, status=Status.PENDING).update(
        status=Status.CANCELLED, cancel_requested_at=now, finished_at=now, lease_expires_at=None
    )
    if cancelled:
        run.refresh_from_db()
        send_safely(agent_run_cancelled, AgentRun, run=run)
        transaction.on_commit(dispatch_next)
        return run
    AgentRun.objects.filter(
        pk=run.pk, status=Status.RUNNING, cancel_requested_at__isnull=True
    ).update(cancel_requested_at=now)
    run.refresh_from_db()
    if run.is_terminal:
        raise RunNotCancellable()
    return run


def fail_pending(run_id: str, message: str) -> bool:
    """Mark a pending run failed with ``message``; False if it was no longer pending."""
    updated = AgentRun.objects.filter(pk=run_id, status=Status.PENDING).update(
        status=Status.FAILED, error=message, finished_at=timezone.now(), lease_expires_at=None
    )
    if updated:
        send_safely(agent_run_failed, AgentRun, run=AgentRun.objects.get(pk=run_id))
    return bool(updated)


def _enqueue(run_id: str) -> None:
    from agentic_django.tasks import execute_agent_run

    try:
        result = execute_agent_run.enqueue(run_id)
    except Exception:
        logger.exception("agentic_django: could not enqueue run %s", run_id)
        # A run whose task never reached the queue must not wait forever.
        if fail_pending(run_id, EnqueueFailed.message):
            dispatch_next()
        return
    if result.is_finished:
        return  # Ran in-process: the claim already stored the task id.
    # Only replaces this dispatcher's mark: a worker that already ran or released the run wins.
    AgentRun.objects.filter(pk=run_id, task_id=QUEUED).update(task_id=result.id)


def _running_count():
    """Subquery: how many runs hold a worker slot."""
    running = AgentRun.objects.filter(status__in=SLOT_STATUSES).order_by()
    count = Func(F("pk"), function="COUNT", output_field=IntegerField())
    return Subquery(running.annotate(n=count).values("n")[:1], output_field=IntegerField())


def _slot_free() -> Q:
    """Condition: fewer runs hold a slot than the concurrency limit allows."""
    limit = get_config().concurrency_limit
    # "No limit-th running run exists", i.e. running < limit, as an indexed EXISTS.
    nth = AgentRun.objects.filter(status__in=SLOT_STATUSES).order_by().values("pk")
    return ~Exists(nth[limit - 1 : limit])


def _blockers():
    """Runs of the outer run's session that keep it from starting (active or ahead of it)."""
    earlier = Q(created_at__lt=OuterRef("created_at")) | Q(
        created_at=OuterRef("created_at"), id__lt=OuterRef("id")
    )
    return (
        AgentRun.objects.filter(session_id=OuterRef("session_id"))
        .exclude(pk=OuterRef("pk"))
        .filter(Q(status__in=SESSION_BLOCKING_STATUSES) | (Q(status=Status.PENDING) & earlier))
    )


def _session_heads():
    """Pending runs that are first in line on a session with nothing active."""
    return AgentRun.objects.filter(status=Status.PENDING).filter(~Exists(_blockers()))
