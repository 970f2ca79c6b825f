"""Each transition of ``agentic_django.lifecycle``: what it changes, and when it refuses.

The engine's other tests drive these through runs; here every condition of every
conditional UPDATE is pinned down on its own, so none can be dropped unnoticed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from django.db.models.functions import Now
from django.utils import timezone

from agentic_django import lifecycle, signals
from agentic_django.lifecycle import QUEUED, Fence
from agentic_django.models import (
    AgentRun,
    AgentSession,
    AgentSessionItem,
    AgentWorker,
    DispatchLock,
)
from tests.core.conftest import running_elsewhere, worker_died

pytestmark = pytest.mark.django_db(transaction=True)

LEASE = 60  # the tests' AGENTIC_DJANGO_LEASE_SECONDS (the default)
OUTCOME = {
    "error": "",
    "error_detail": "",
    "final_output": "done",
    "last_response_id": "resp_1",
    "usage": {"requests": 1, "input_tokens": 2, "output_tokens": 3, "total_tokens": 5},
}


@pytest.fixture
def session(user) -> AgentSession:
    return AgentSession.objects.create(owner=user, session_key="k")


def new_run(session: AgentSession, **fields) -> AgentRun:
    return AgentRun.objects.create(
        session=session, owner=session.owner, agent_key="demo", input_payload="hi", **fields
    )


def db_now():
    return AgentRun.objects.annotate(now=Now()).values_list("now", flat=True).first()


def assert_about(moment, expected, slack: float = 30.0) -> None:
    assert abs((moment - expected).total_seconds()) < slack, (moment, expected)


def reload(run: AgentRun) -> AgentRun:
    return AgentRun.objects.get(pk=run.pk)


# --- claim ---------------------------------------------------------------------------------------


def test_claim_starts_the_next_attempt_with_a_lease_from_the_database_clock(session):
    run = new_run(session)
    claimed = lifecycle.claim(run.pk, task_id="task-7")
    now = db_now()
    assert claimed is not None
    assert (claimed.status, claimed.attempt, claimed.task_id) == ("running", 1, "task-7")
    assert_about(claimed.started_at, now)
    assert claimed.heartbeat_at == claimed.started_at
    assert_about(claimed.lease_expires_at, claimed.started_at + timedelta(seconds=LEASE), 1)
    assert reload(run).attempt == 1
    # Claimed again after a requeue: the next attempt number; a task id is kept when none given.
    worker_died(run)
    assert lifecycle.requeue(reload(run), stale_only=True)
    again = lifecycle.claim(run.pk)
    assert (again.attempt, again.task_id) == (2, "")


def test_claim_refuses_a_run_that_is_not_pending(session):
    for status in ("running", "completed", "failed", "cancelled"):
        run = new_run(session, status=status)
        assert lifecycle.claim(run.pk) is None
        assert reload(run).status == status


def test_claim_keeps_session_order(session, other_user):
    first, second = new_run(session), new_run(session)
    assert lifecycle.claim(second.pk) is None  # an earlier run of its session waits
    assert lifecycle.claim(first.pk) is not None
    assert lifecycle.claim(second.pk) is None  # ... or runs
    # Runs of other sessions are not in the way.
    other = new_run(AgentSession.objects.create(owner=other_user, session_key="k"))
    assert lifecycle.claim(other.pk) is not None


def test_same_time_submissions_are_ordered_by_id(session):
    first, second = sorted([new_run(session), new_run(session)], key=lambda r: r.pk)
    AgentRun.objects.update(created_at=timezone.now())
    assert lifecycle.claim(second.pk) is None
    assert lifecycle.claim(first.pk) is not None


def test_claim_holds_the_concurrency_limit(user, settings):
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 2
    runs = [new_run(AgentSession.objects.create(owner=user, session_key=f"s{n}")) for n in range(3)]
    assert lifecycle.claim(runs[0].pk) and lifecycle.claim(runs[1].pk)
    assert lifecycle.claim(runs[2].pk) is None
    lifecycle.finish(Fence.of(reload(runs[0])), status="completed", **OUTCOME)
    assert lifecycle.claim(runs[2].pk) is not None


def test_the_recorded_limit_wins_over_this_process_setting(user, settings):
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 1
    lifecycle.record_concurrency_limit(2)
    assert DispatchLock.objects.get(name=lifecycle.LOCK_NAME).concurrency_limit == 2
    runs = [new_run(AgentSession.objects.create(owner=user, session_key=f"s{n}")) for n in range(3)]
    assert [lifecycle.claim(run.pk) is not None for run in runs] == [True, True, False]
    lifecycle.record_concurrency_limit(3)
    assert lifecycle.claim(runs[2].pk) is not None


def limit() -> int:
    return DispatchLock.objects.annotate(n=lifecycle.concurrency_limit()).values("n")[0]["n"]


def test_auto_limit_is_the_slots_of_the_live_workers(settings):
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = None
    settings.AGENTIC_DJANGO_WORKER_CONCURRENCY = 7
    lifecycle.record_concurrency_limit(None)
    assert limit() == 7  # no worker yet: one worker's slots, as this process would run
    lifecycle.announce_worker("a", slots=3, hostname="h", pid=1)
    lifecycle.announce_worker("b", slots=2, hostname="h", pid=2)
    assert limit() == 5
    # A worker that missed its heartbeat for a lease no longer counts, and the sweep forgets it.
    AgentWorker.objects.filter(pk="b").update(heartbeat_at=Now() - timedelta(seconds=LEASE + 5))
    assert limit() == 3
    lifecycle.announce_worker("a", slots=4, hostname="h", pid=1)  # a renewal updates its slots
    assert limit() == 4
    AgentWorker.objects.filter(pk="a").update(heartbeat_at=Now() - timedelta(seconds=LEASE - 5))
    assert lifecycle.forget_dead_workers() == 1
    assert list(AgentWorker.objects.values_list("pk", flat=True)) == ["a"]
    lifecycle.announce_worker("b", slots=2, hostname="h", pid=2)  # back: announced anew
    assert limit() == 6
    lifecycle.retire_worker("a")
    assert limit() == 2
    lifecycle.record_concurrency_limit(9)  # an integer caps the deployment, workers or not
    assert limit() == 9


def test_give_up_ends_the_leases_of_the_attempts_given_up(user):
    runs = [
        running_elsewhere(AgentSession.objects.create(owner=user, session_key=f"g{n}"))
        for n in range(3)
    ]
    given, lost, kept = runs
    fences = [Fence.of(given), Fence(lost.pk, lost.attempt - 1)]  # `lost` was taken over
    assert lifecycle.give_up(fences) == 1
    assert_about(reload(given).lease_expires_at, db_now())  # the next sweep retries it now
    assert reload(lost).lease_expires_at == lost.lease_expires_at
    assert reload(kept).lease_expires_at == kept.lease_expires_at
    assert lifecycle.give_up([Fence.of(kept), Fence.of(lost)]) == 2


# --- reserve, record_task_id, release, fail_pending ---------------------------------------------


def test_reserve_marks_the_run_queued_once(session):
    run = new_run(session)
    assert lifecycle.reserve(run.pk)
    reserved = reload(run)
    assert reserved.task_id == QUEUED
    assert_about(reserved.dispatched_at, db_now())
    assert not lifecycle.reserve(run.pk)  # its task is on its way
    lifecycle.record_task_id(run.pk, "broker-id")
    assert reload(run).task_id == "broker-id"
    assert not lifecycle.reserve(run.pk)


def test_reserve_again_once_the_task_may_be_lost(session):
    run = new_run(session, task_id="broker-id")
    AgentRun.objects.filter(pk=run.pk).update(dispatched_at=timezone.now() - timedelta(seconds=30))
    assert not lifecycle.reserve(run.pk)
    AgentRun.objects.filter(pk=run.pk).update(dispatched_at=timezone.now() - timedelta(minutes=5))
    assert lifecycle.reserve(run.pk)
    # A task without a dispatch time (from an older version) counts as lost as well.
    AgentRun.objects.filter(pk=run.pk).update(task_id="old", dispatched_at=None)
    assert lifecycle.reserve(run.pk)


def test_reserve_counts_queued_tasks_as_taken_slots(user, settings):
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 2
    runs = [new_run(AgentSession.objects.create(owner=user, session_key=f"s{n}")) for n in range(4)]
    running_elsewhere(AgentSession.objects.create(owner=user, session_key="busy"))
    assert [lifecycle.reserve(run.pk) for run in runs] == [True, False, False, False]


def test_reserve_keeps_session_order_and_status(session):
    first, second = new_run(session), new_run(session)
    assert not lifecycle.reserve(second.pk)
    done = new_run(session, status="completed")
    assert not lifecycle.reserve(done.pk)
    assert lifecycle.reserve(first.pk)


def test_record_task_id_only_replaces_this_runs_queued_mark(session, other_user):
    run, other = new_run(session, task_id=QUEUED), new_run(session, task_id=QUEUED)
    lifecycle.record_task_id(run.pk, "broker-id")
    assert (reload(run).task_id, reload(other).task_id) == ("broker-id", QUEUED)
    # A worker that already claimed the run stored its own id: it stays.
    claimed = new_run(AgentSession.objects.create(owner=other_user, session_key="x"))
    AgentRun.objects.filter(pk=claimed.pk).update(task_id="worker-id")
    lifecycle.record_task_id(claimed.pk, "broker-id")
    assert reload(claimed).task_id == "worker-id"


def test_release_forgets_only_this_runs_task(session, other_user):
    run = new_run(session, task_id="t-1", dispatched_at=timezone.now())
    other = new_run(
        AgentSession.objects.create(owner=other_user, session_key="x"),
        task_id="t-1",
        dispatched_at=timezone.now(),
    )
    assert not lifecycle.release(run.pk, "another-task")
    assert lifecycle.release(run.pk, "t-1")
    assert (reload(run).task_id, reload(run).dispatched_at) == ("", None)
    assert reload(other).task_id == "t-1"
    queued = new_run(session, task_id=QUEUED, dispatched_at=timezone.now())
    assert lifecycle.release(queued.pk)
    running = new_run(session, status="running", task_id=QUEUED)
    assert not lifecycle.release(running.pk)


def test_fail_pending_fails_only_a_pending_run(session):
    run = new_run(session)
    assert lifecycle.fail_pending(run.pk, "The queue is down.")
    failed = reload(run)
    assert (failed.status, failed.error) == ("failed", "The queue is down.")
    assert_about(failed.finished_at, db_now())
    assert not lifecycle.fail_pending(run.pk, "again")
    assert reload(run).error == "The queue is down."


# --- renew, finish --------------------------------------------------------------------------------


def test_renew_extends_the_lease_while_the_fence_holds(session):
    claimed = lifecycle.claim(new_run(session).pk)
    AgentRun.objects.filter(pk=claimed.pk).update(
        lease_expires_at=timezone.now() + timedelta(seconds=1),
        heartbeat_at=timezone.now() - timedelta(minutes=1),
    )
    assert lifecycle.renew(Fence.of(claimed))
    renewed = reload(claimed)
    now = db_now()
    assert_about(renewed.heartbeat_at, now)
    assert_about(renewed.lease_expires_at, now + timedelta(seconds=LEASE))
    assert not lifecycle.renew(Fence(claimed.pk, claimed.attempt + 1))
    lifecycle.finish(Fence.of(claimed), status="completed", **OUTCOME)
    assert not lifecycle.renew(Fence.of(claimed))


def test_finish_writes_the_outcome_once_under_the_fence(session):
    claimed = lifecycle.claim(new_run(session).pk)
    assert (
        lifecycle.finish(Fence(claimed.pk, claimed.attempt + 1), status="failed", **OUTCOME) is None
    )
    finished = lifecycle.finish(Fence.of(claimed), status="completed", **OUTCOME)
    assert finished is not None and finished == reload(claimed)
    assert (finished.status, finished.final_output, finished.last_response_id) == (
        "completed",
        "done",
        "resp_1",
    )
    assert (finished.requests, finished.total_tokens, finished.lease_expires_at) == (1, 5, None)
    assert_about(finished.finished_at, db_now())
    assert lifecycle.finish(Fence.of(claimed), status="failed", **OUTCOME) is None
    assert reload(claimed).status == "completed"


def test_streamed_text_is_added_only_while_the_fence_holds(session, other_user):
    claimed = lifecycle.claim(new_run(session).pk)
    elsewhere = AgentSession.objects.create(owner=other_user, session_key="o")
    other = lifecycle.claim(new_run(elsewhere).pk)
    fence = Fence.of(claimed)
    assert lifecycle.stream_text(fence, "Hel", new_message=True, events=False)
    assert lifecycle.stream_text(fence, "lo", new_message=False)
    assert reload(claimed).stream_text == "Hello"
    assert not lifecycle.stream_text(Fence(claimed.pk, claimed.attempt + 1), "!", new_message=False)
    assert (reload(claimed).stream_text, reload(other).stream_text) == ("Hello", "")
    lifecycle.finish(fence, status="completed", **OUTCOME)  # which clears the streamed text
    assert not lifecycle.stream_text(fence, "!", new_message=False)
    assert reload(claimed).stream_text == ""


def test_fence_state_reports_cancellation_and_loss(session):
    claimed = lifecycle.claim(new_run(session).pk)
    fence = Fence.of(claimed)
    assert fence.state() is False
    lifecycle.cancel(claimed)
    assert fence.state() is True
    assert Fence(claimed.pk, claimed.attempt + 1).state() is None


# --- cancel ---------------------------------------------------------------------------------------


def test_cancel_ends_a_pending_run_at_once(session):
    run = new_run(session)
    assert lifecycle.cancel(run) is True
    assert (run.status, run.is_terminal) == ("cancelled", True)
    assert run.cancel_requested_at is not None and run.finished_at is not None


def test_cancel_flags_a_running_run_once(session, other_user):
    claimed = lifecycle.claim(new_run(session).pk)
    other = running_elsewhere(AgentSession.objects.create(owner=other_user, session_key="x"))
    assert lifecycle.cancel(claimed) is False
    assert reload(other).cancel_requested_at is None
    assert claimed.status == "running" and claimed.cancel_requested_at is not None
    first_request = claimed.cancel_requested_at
    lifecycle.cancel(claimed)
    assert claimed.cancel_requested_at == first_request


def test_cancel_leaves_a_finished_run_alone(session):
    run = new_run(session, status="completed")
    assert lifecycle.cancel(run) is False
    assert (run.status, run.cancel_requested_at) == ("completed", None)


# --- recovery -------------------------------------------------------------------------------------


def test_stale_runs_are_running_runs_whose_lease_expired(session):
    live = running_elsewhere(session)
    assert not lifecycle.stale_runs().exists()
    worker_died(live)
    assert list(lifecycle.stale_runs()) == [live]
    # A finished run carrying an old lease (edited by hand, say) is never stale.
    AgentRun.objects.filter(pk=live.pk).update(status="completed")
    assert not lifecycle.stale_runs().exists()


def test_fail_stale_fails_only_an_expired_run_in_the_attempt_read(session, other_user):
    run = running_elsewhere(session)
    also_dead = running_elsewhere(AgentSession.objects.create(owner=other_user, session_key="x"))
    worker_died(also_dead)
    assert not lifecycle.fail_stale(run)
    worker_died(run)
    assert not lifecycle.fail_stale(AgentRun(pk=run.pk, attempt=run.attempt + 1))
    assert lifecycle.fail_stale(run)
    failed = reload(run)
    assert (failed.status, failed.error, failed.lease_expires_at) == (
        "failed",
        lifecycle.LEASE_EXPIRED_ERROR,
        None,
    )
    assert_about(failed.finished_at, db_now())
    assert reload(also_dead).status == "running"  # only the run it was given


def test_requeue_resets_a_stale_run_and_removes_only_its_items(session, user):
    run = running_elsewhere(session)
    AgentRun.objects.filter(pk=run.pk).update(
        task_id="t-1", dispatched_at=timezone.now(), error="x", error_detail="y", final_output="z"
    )
    earlier = AgentSessionItem.objects.create(session=session, sequence=1, payload={"n": 1})
    AgentSessionItem.objects.create(session=session, sequence=2, payload={"n": 2}, run=run)
    assert not lifecycle.requeue(reload(run), stale_only=True)  # alive
    worker_died(run)
    assert not lifecycle.requeue(AgentRun(pk=run.pk, session=session, attempt=9), stale_only=True)
    assert lifecycle.requeue(reload(run), stale_only=True)
    requeued = reload(run)
    assert requeued.status == "pending" and requeued.attempt == 1
    for name in ("started_at", "finished_at", "final_output", "cancel_requested_at"):
        assert getattr(requeued, name) is None, name
    for name in ("lease_expires_at", "heartbeat_at", "dispatched_at"):
        assert getattr(requeued, name) is None, name
    assert (requeued.task_id, requeued.error, requeued.error_detail) == ("", "", "")
    assert list(session.items.all()) == [earlier]


def test_requeue_of_stale_runs_takes_only_running_ones(session):
    finished = new_run(session, status="completed", attempt=1)
    # A finished run carrying an old lease (edited by hand, say) is not stale.
    AgentRun.objects.filter(pk=finished.pk).update(
        lease_expires_at=timezone.now() - timedelta(minutes=1)
    )
    assert not lifecycle.requeue(reload(finished), stale_only=True)
    assert reload(finished).status == "completed"


def test_requeue_leaves_a_live_run_alone_even_with_a_cancel_request(session):
    run = running_elsewhere(session)
    lifecycle.cancel(run)
    for stale_only in (True, False):
        assert not lifecycle.requeue(reload(run), stale_only=stale_only)
    assert reload(run).status == "running"


def test_an_admin_requeue_also_takes_a_stale_run(session):
    run = running_elsewhere(session)
    worker_died(run)
    assert lifecycle.requeue(reload(run), stale_only=False)
    assert reload(run).status == "pending"


def test_requeue_cancels_a_stale_run_whose_cancellation_was_requested(session):
    run = running_elsewhere(session)
    AgentSessionItem.objects.create(session=session, sequence=1, payload={}, run=run)
    lifecycle.cancel(run)
    worker_died(run)
    assert lifecycle.requeue(reload(run), stale_only=True)
    cancelled = reload(run)
    assert (cancelled.status, cancelled.lease_expires_at) == ("cancelled", None)
    assert cancelled.finished_at is not None
    assert not session.items.exists()


def test_requeue_retries_a_failed_run_only_while_nothing_came_after_it(session):
    failed = new_run(session, status="failed", error="flaky")
    assert not lifecycle.requeue(failed, stale_only=True)
    # Later runs of other conversations do not matter.
    elsewhere = new_run(AgentSession.objects.create(owner=session.owner, session_key="y"))
    AgentRun.objects.filter(pk=elsewhere.pk).update(
        created_at=failed.created_at + timedelta(seconds=1)
    )
    later = new_run(session)
    AgentRun.objects.filter(pk=later.pk).update(created_at=failed.created_at + timedelta(seconds=1))
    assert not lifecycle.requeue(failed, stale_only=False)
    later.delete()
    AgentRun.objects.filter(pk=failed.pk).update(
        finished_at=timezone.now(), cancel_requested_at=timezone.now()
    )
    assert lifecycle.requeue(reload(failed), stale_only=False)
    retried = reload(failed)
    assert (retried.finished_at, retried.cancel_requested_at) == (None, None)
    assert reload(elsewhere).status == "pending"
    assert (reload(failed).status, reload(failed).error) == ("pending", "")
    completed = new_run(AgentSession.objects.create(owner=session.owner, session_key="z"))
    AgentRun.objects.filter(pk=completed.pk).update(status="completed")
    assert not lifecycle.requeue(reload(completed), stale_only=False)


# --- signals -------------------------------------------------------------------------------------


@contextmanager
def received(signal) -> Iterator[list[tuple[str, str]]]:
    """(run id, status) of each ``signal`` sent by AgentRun while the block runs."""
    seen: list[tuple[str, str]] = []

    def receiver(sender, run, **kwargs):
        seen.append((str(run.pk), run.status))

    signal.connect(receiver, sender=AgentRun)
    try:
        yield seen
    finally:
        signal.disconnect(receiver, sender=AgentRun)


def test_each_ending_sends_its_signal_with_the_run(session, user):
    queued = new_run(session)
    pending_run = new_run(AgentSession.objects.create(owner=user, session_key="p"))
    with received(signals.agent_run_failed) as failed:
        lifecycle.fail_pending(queued.pk, "The queue is down.")
        stale = running_elsewhere(AgentSession.objects.create(owner=user, session_key="s"))
        worker_died(stale)
        lifecycle.fail_stale(stale)
    assert failed == [(str(queued.pk), "failed"), (str(stale.pk), "failed")]
    with received(signals.agent_run_cancelled) as cancelled:
        lifecycle.cancel(pending_run)
        flagged = running_elsewhere(AgentSession.objects.create(owner=user, session_key="c"))
        lifecycle.cancel(flagged)
        worker_died(flagged)
        lifecycle.requeue(reload(flagged), stale_only=True)
    assert cancelled == [(str(pending_run.pk), "cancelled"), (str(flagged.pk), "cancelled")]


def test_a_requeue_deletes_only_its_own_runs_items_after_its_checkpoint(user, session):
    # Another conversation's finished run has items past its own last checkpoint.
    other = AgentSession.objects.create(owner=user, session_key="other")
    finished = new_run(other, status="completed", checkpoint_item_sequence=1)
    for sequence in (1, 2, 3):
        AgentSessionItem.objects.create(
            session=other, run=finished, sequence=sequence, payload={"n": sequence}
        )
    run = running_elsewhere(session)
    AgentRun.objects.filter(pk=run.pk).update(checkpoint_item_sequence=1)
    for sequence in (1, 2):
        AgentSessionItem.objects.create(
            session=session, run=run, sequence=sequence, payload={"n": sequence}
        )
    worker_died(run)

    assert lifecycle.requeue(reload(run), stale_only=True)

    assert list(session.items.values_list("sequence", flat=True)) == [1]  # up to its checkpoint
    assert list(other.items.values_list("sequence", flat=True)) == [1, 2, 3]


def test_expiry_fails_only_overdue_paused_runs_and_expires_only_their_approvals(user, session):
    from agentic_django.models import AgentApproval

    past = timezone.now() - timedelta(seconds=5)
    overdue = new_run(session, status="awaiting_approval", attempt=1, approval_expires_at=past)
    other = AgentSession.objects.create(owner=user, session_key="other")
    waiting = new_run(
        other,
        status="awaiting_approval",
        attempt=1,
        approval_expires_at=timezone.now() + timedelta(minutes=5),
    )
    # A run that is not paused (any more) is left alone whatever its old deadline says.
    done = new_run(
        AgentSession.objects.create(owner=user, session_key="done"),
        status="completed",
        attempt=1,
        approval_expires_at=past,
    )
    for run in (overdue, waiting, done):
        AgentApproval.objects.create(
            run=run, call_id="call-1", tool_name="refund", arguments={}, requested_at=past
        )
    AgentApproval.objects.filter(run=done).update(decision=AgentApproval.Decision.APPROVED)

    with received(signals.agent_run_failed) as failed:
        expired = lifecycle.expire_approvals()

    assert [run.pk for run in expired] == [overdue.pk]
    assert failed == [(str(overdue.pk), "failed")]
    overdue = reload(overdue)
    assert (overdue.status, overdue.error) == ("failed", lifecycle.APPROVAL_EXPIRED_ERROR)
    assert_about(overdue.finished_at, db_now())
    approval = AgentApproval.objects.get(run=overdue)
    assert approval.decision == AgentApproval.Decision.EXPIRED
    assert_about(approval.decided_at, db_now())
    assert reload(waiting).status == "awaiting_approval"
    assert AgentApproval.objects.get(run=waiting).decision == AgentApproval.Decision.PENDING
    assert reload(done).status == "completed"
    assert AgentApproval.objects.get(run=done).decision == AgentApproval.Decision.APPROVED
