"""Recovery of runs whose worker died, and the sweep that keeps an idle deployment moving.

Only runs whose lease expired by the database clock are touched, never live work in another
process. ``AGENTIC_DJANGO_STARTUP_RECOVERY`` decides what happens to them (requeue, fail or
ignore). A sweep applies it and dispatches the runs that wait (also those whose task the broker
lost). Sweeps happen:

- once per process, lazily, on its first dispatch or execution (never in ``AppConfig.ready``);
- periodically in every worker process started with ``manage.py agentic_django_worker``
  (about every half lease), so a stack with nobody polling heals itself without cron;
- when a client polls a run that looks stuck, and when a new run finds its session blocked.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from django.core.cache import cache
from django.utils import timezone

from agentic_django import lifecycle
from agentic_django.conf import get_config
from agentic_django.models import AgentRun

logger = logging.getLogger(__name__)

Status = AgentRun.Status
LEASE_EXPIRED_ERROR = lifecycle.LEASE_EXPIRED_ERROR

_startup_lock = threading.Lock()
_startup_done = False


@dataclass(frozen=True)
class SweepResult:
    recovered: int
    dispatched: int
    expired: int = 0
    resumed: int = 0


def sweep() -> SweepResult:
    """Recover expired runs (unless the policy is "ignore"), fail paused runs whose approvals
    expired, resume runs paused on a budget that allows them again, and dispatch waiting
    runs."""
    from agentic_django.dispatch import dispatch_next
    from agentic_django.usage import resume_within_budgets

    mode = get_config().startup_recovery
    recovered = recover_runs(mode=mode, dispatch=False) if mode != "ignore" else 0
    expired = len(lifecycle.expire_approvals())
    resumed = resume_within_budgets()
    return SweepResult(
        recovered=recovered, dispatched=dispatch_next(), expired=expired, resumed=resumed
    )


def ensure_startup_recovery() -> None:
    """Sweep the first time this process dispatches or executes a run."""
    global _startup_done
    if _startup_done:
        return
    with _startup_lock:
        if _startup_done:
            return
        # Set first: the sweep dispatches runs, which re-enters this function.
        _startup_done = True
    try:
        result = sweep()
    except Exception:
        logger.exception("agentic_django: startup recovery failed")
        return
    if result.recovered:
        mode = get_config().startup_recovery
        logger.warning(
            "agentic_django: startup recovery %s %d stale run(s)", mode, result.recovered
        )


def reset_startup_recovery() -> None:
    """Forget that startup recovery ran (as in a fresh process); for tests and tooling."""
    global _startup_done
    with _startup_lock:
        _startup_done = False


def recover_stale_blockers() -> int:
    """Apply the recovery policy to expired runs now (a waiting run is blocked); 0 if "ignore"."""
    mode = get_config().startup_recovery
    if mode == "ignore" or not lifecycle.stale_runs().exists():
        return 0
    return recover_runs(mode=mode)


def recover_if_stuck(run: AgentRun) -> bool:
    """Recover what keeps an observed run from progressing; True if recovery was attempted.

    Called when a client polls a run, so a dead worker is noticed by whoever waits on it.
    Decides from the row already loaded, so a healthy run costs no query; this process's
    clock only decides whether to look -- the conditional updates decide by the database's.
    A pending run whose task is older than a lease is dispatched again (at most once per lease
    per process), which also covers a task the broker lost.
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
    if run.status != Status.PENDING or (run.dispatched_at or run.created_at) >= now - lease:
        return False
    if not cache.add(f"agentic_django:redispatch:{run.pk}", 1, timeout=config.lease_seconds):
        return False
    dispatch_run(str(run.pk))
    return True


def stale_runs():
    """Running runs whose lease expired: their worker stopped renewing it."""
    return lifecycle.stale_runs()


def recover_runs(*, mode: str, dispatch: bool = True) -> int:
    """Fail or requeue every stale run, then (if any) dispatch what can start; how many changed."""
    from agentic_django.dispatch import dispatch_next

    if mode not in ("fail", "requeue"):
        raise ValueError(f"mode must be 'fail' or 'requeue', got {mode!r}")
    count = 0
    for run in lifecycle.stale_runs().order_by("created_at"):
        if mode == "requeue":
            changed = lifecycle.requeue(run, stale_only=True)
        else:
            changed = lifecycle.fail_stale(run)
        count += int(changed)
    if count and dispatch:
        dispatch_next()
    return count


def requeue(run: AgentRun) -> bool:
    """Put a stale running run or a failed run back to pending and dispatch it.

    See ``lifecycle.requeue``. Returns True if the run changed.
    """
    from django.db import transaction

    from agentic_django.dispatch import dispatch_next

    changed = lifecycle.requeue(run, stale_only=False)
    if changed:
        transaction.on_commit(dispatch_next)
    return changed
