"""Recovery of runs whose worker died: only runs whose lease expired are touched.

``AGENTIC_DJANGO_STARTUP_RECOVERY`` is applied once per process, lazily, on the first
dispatch or execution (never in ``AppConfig.ready``), and again whenever a new run finds
itself blocked by expired runs. Requeueing first deletes the session items the dead attempt
wrote, so the retry does not duplicate history.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from agentic_django.conf import get_config
from agentic_django.models import AgentRun, AgentSession, AgentSessionItem
from agentic_django.signals import agent_run_cancelled, agent_run_failed, send_safely

logger = logging.getLogger(__name__)

Status = AgentRun.Status
LEASE_EXPIRED_ERROR = "The worker running this run stopped before it finished."

_startup_lock = threading.Lock()
_startup_done = False


def ensure_startup_recovery() -> None:
    """Apply the startup recovery policy the first time this process dispatches or executes."""
    global _startup_done
    if _startup_done:
        return
    with _startup_lock:
        if _startup_done:
            return
        # Set first: recovery dispatches runs, which re-enters this function.
        _startup_done = True
    mode = get_config().startup_recovery
    if mode == "ignore":
        return
    try:
        recovered = recover_runs(mode=mode)
    except Exception:
        logger.exception("agentic_django: startup recovery (%s) failed", mode)
        return
    if recovered:
        logger.warning("agentic_django: startup recovery %s %d stale run(s)", mode, recovered)


def reset_startup_recovery() -> None:
    """Forget that startup recovery ran (as in a fresh process); for tests and tooling."""
    global _startup_done
    with _startup_lock:
        _startup_done = False


def recover_stale_blockers() -> int:
    """Apply the recovery policy to expired runs now (a waiting run is blocked); 0 if "ignore"."""
    mode = get_config().startup_recovery
    if mode == "ignore" or not stale_runs().exists():
        return 0
    return recover_runs(mode=mode)


def recover_if_stuck(run: AgentRun) -> bool:
    """Recover what keeps an observed run from progressing; True if recovery was attempted.

    Called when a client polls a run, so a dead worker is noticed by whoever waits on it
    instead of at the next restart. Decides from the row already loaded: no query while the
    run is healthy. A run pending for longer than a lease is dispatched again (at most once
    per lease per process), which also covers a task the broker lost.
    """
    from agentic_django.dispatch import dispatch_run

    config = get_config()
    if config.startup_recovery == "ignore":
        return False
    now = timezone.now()
    lease = timedelta(seconds=config.lease_seconds)
    if run.status == Status.RUNNING:
        if run.lease_expires_at is None or run.lease_expires_at >= now:
            return False
        recover_stale_blockers()
        return True
    if run.status != Status.PENDING or run.created_at >= now - lease:
        return False
    if not cache.add(f"agentic_django:redispatch:{run.pk}", 1, timeout=config.lease_seconds):
        return False
    dispatch_run(str(run.pk), redispatch=True)
    return True


def stale_runs():
    """Running runs whose lease expired: their worker stopped renewing it."""
    return AgentRun.objects.filter(status=Status.RUNNING, lease_expires_at__lt=timezone.now())


def recover_runs(*, mode: str) -> int:
    """Fail or requeue every stale run, then dispatch what can start; return how many changed."""
    from agentic_django.dispatch import dispatch_next

    if mode not in ("fail", "requeue"):
        raise ValueError(f"mode must be 'fail' or 'requeue', got {mode!r}")
    count = 0
    for run in stale_runs().order_by("created_at"):
        changed = _requeue(run, stale_only=True) if mode == "requeue" else fail_stale(run)
        count += int(changed)
    if count:
        dispatch_next()
    return count


def fail_stale(run: AgentRun) -> bool:
    """Mark a stale run failed; False if it is not stale (anymore)."""
    updated = (
        stale_runs()
        .filter(pk=run.pk, attempt=run.attempt)
        .update(
            status=Status.FAILED,
            error=LEASE_EXPIRED_ERROR,
            finished_at=timezone.now(),
            lease_expires_at=None,
        )
    )
    if updated:
        run.refresh_from_db()
        send_safely(agent_run_failed, AgentRun, run=run)
    return bool(updated)


def requeue(run: AgentRun) -> bool:
    """Put a stale running run or a failed run back to pending and dispatch it.

    The items the previous attempt wrote are deleted first. A failed run is only requeued if
    no later run of its session exists, so the history stays in order. A stale run whose
    cancellation was requested is cancelled instead. Returns True if the run changed.
    """
    from agentic_django.dispatch import dispatch_next

    changed = _requeue(run, stale_only=False)
    if changed:
        transaction.on_commit(dispatch_next)
    return changed


def _requeue(run: AgentRun, *, stale_only: bool) -> bool:
    now = timezone.now()
    with transaction.atomic():
        # Same lock order as session writes: a stale worker cannot add items while we clean up.
        list(AgentSession.objects.select_for_update().filter(pk=run.session_id).values("pk"))
        current = AgentRun.objects.filter(pk=run.pk).first()
        if current is None or not _requeueable(current, now, stale_only=stale_only):
            return False
        cancel_instead = current.status == Status.RUNNING and current.cancel_requested_at
        AgentSessionItem.objects.filter(run_id=current.pk).delete()
        if cancel_instead:
            updates = {"status": Status.CANCELLED, "finished_at": now}
        else:
            updates = {
                "status": Status.PENDING,
                "started_at": None,
                "finished_at": None,
                "error": "",
                "final_output": None,
                "cancel_requested_at": None,
                # No task exists for the new attempt yet: dispatch_next must pick it up.
                "task_id": "",
            }
        AgentRun.objects.filter(pk=current.pk, status=current.status).update(
            lease_expires_at=None, heartbeat_at=None, **updates
        )
    run.refresh_from_db()
    if cancel_instead:
        send_safely(agent_run_cancelled, AgentRun, run=run)
    return True


def _requeueable(run: AgentRun, now, *, stale_only: bool) -> bool:
    if run.status == Status.RUNNING:
        return run.lease_expires_at is not None and run.lease_expires_at < now
    if stale_only or run.status != Status.FAILED:
        return False
    later = AgentRun.objects.filter(session_id=run.session_id, created_at__gt=run.created_at)
    return not later.exists()
