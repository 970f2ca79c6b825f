"""Queueing of runs: enqueue on commit, atomic claims under the concurrency limit, one running
run per session in submission order, and dispatch of the next run when one finishes.

A task is only a wake-up call: the run's row decides whether it may start. Duplicate or late
tasks are harmless because claiming is an atomic conditional update made under a lock row.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q
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


def enqueue_on_commit(run_id: str) -> None:
    """Dispatch ``run_id`` after the current transaction commits (at once outside one)."""
    transaction.on_commit(lambda: dispatch_run(run_id))


def dispatch_run(run_id: str) -> None:
    """Enqueue the run's task if it could start now; otherwise a finishing run will do it."""
    from agentic_django.recovery import ensure_startup_recovery, recover_stale_blockers

    ensure_startup_recovery()
    run = AgentRun.objects.filter(pk=run_id).first()
    if run is None:
        logger.warning("agentic_django: run %s does not exist; nothing to enqueue", run_id)
        return
    if run.status != Status.PENDING:
        return
    if _blocked_in_session(run) or _free_slots() <= 0:
        # A dead worker's expired lease must not hold the queue until the next restart.
        recover_stale_blockers()
        return
    _enqueue(run_id)


def dispatch_next() -> int:
    """Enqueue the oldest eligible pending runs that fit in the free slots; return how many."""
    free = _free_slots()
    if free <= 0:
        return 0
    heads = list(_session_heads().order_by("created_at", "id").values_list("id", flat=True)[:free])
    for run_id in heads:
        _enqueue(str(run_id))
    return len(heads)


def claim(run_id: str, *, task_id: str = "") -> AgentRun | None:
    """Atomically move a pending run to running with a fresh lease, if the rules allow it.

    Returns the claimed run, or None if it is not pending, another run of its session runs
    or comes first, or the concurrency limit is reached.
    """
    config = get_config()
    with transaction.atomic():
        # Every claim takes this lock, so counting running runs below cannot race.
        DispatchLock.objects.select_for_update().get_or_create(name=LOCK_NAME)
        run = AgentRun.objects.filter(pk=run_id).first()
        if run is None or run.status != Status.PENDING:
            return None
        if _blocked_in_session(run):
            return None
        if AgentRun.objects.filter(status__in=SLOT_STATUSES).count() >= config.concurrency_limit:
            return None
        now = timezone.now()
        updates = {
            "status": Status.RUNNING,
            "started_at": now,
            "heartbeat_at": now,
            "lease_expires_at": now + timedelta(seconds=config.lease_seconds),
            "attempt": F("attempt") + 1,
            "error": "",
        }
        if task_id:
            updates["task_id"] = task_id
        if not AgentRun.objects.filter(pk=run_id, status=Status.PENDING).update(**updates):
            return None
    run.refresh_from_db()
    return run


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
    # A plain column update: never changes the status a fast worker may already have set.
    AgentRun.objects.filter(pk=run_id, task_id="").update(task_id=result.id)


def _free_slots() -> int:
    running = AgentRun.objects.filter(status__in=SLOT_STATUSES).count()
    return get_config().concurrency_limit - running


def _blocked_in_session(run: AgentRun) -> bool:
    """True if another run of the session is active or was submitted earlier and still waits."""
    earlier = Q(created_at__lt=run.created_at) | Q(created_at=run.created_at, id__lt=run.id)
    return (
        AgentRun.objects.filter(session_id=run.session_id)
        .exclude(pk=run.pk)
        .filter(Q(status__in=SESSION_BLOCKING_STATUSES) | (Q(status=Status.PENDING) & earlier))
        .exists()
    )


def _session_heads():
    """Pending runs that are first in line on a session with nothing active."""
    session_runs = AgentRun.objects.filter(session_id=OuterRef("session_id"))
    earlier_pending = session_runs.filter(status=Status.PENDING).filter(
        Q(created_at__lt=OuterRef("created_at"))
        | Q(created_at=OuterRef("created_at"), id__lt=OuterRef("id"))
    )
    active = session_runs.filter(status__in=SESSION_BLOCKING_STATUSES)
    return AgentRun.objects.filter(status=Status.PENDING).filter(
        ~Exists(earlier_pending), ~Exists(active)
    )
