"""Dispatch: per-session order, the global concurrency limit, enqueue failures, task ids."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agentic_django.dispatch import dispatch_next
from agentic_django.models import AgentRun, AgentSession
from agentic_django.recovery import recover_runs, sweep
from agentic_django.services import create_run, enqueue_agent_run
from tests.core.conftest import echo_steps, running_elsewhere, text, worker_died
from tests.core.faults import database_faults, queued_run_ids

pytestmark = pytest.mark.django_db(transaction=True)

IMMEDIATE_TASKS = {"default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}}
BROKEN_TASKS = {"default": {"BACKEND": "tests.core.faults.UnavailableBackend"}}
QUEUE = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
PATIENCE = 60.0


def test_runs_of_one_session_run_in_order_and_see_earlier_history(user, scripted_agent):
    agent = scripted_agent(echo_steps(3))
    with transaction.atomic():
        runs = [
            create_run(owner=user, session_key="k", input_payload=f"msg {n}", agent_key=agent.key)
            for n in range(3)
        ]
    for run in runs:
        run.refresh_from_db()
    assert [r.status for r in runs] == ["completed"] * 3
    assert [r.final_output for r in runs] == ["echo: msg 0", "echo: msg 1", "echo: msg 2"]
    assert runs[0].finished_at <= runs[1].started_at
    assert runs[1].finished_at <= runs[2].started_at
    last_input = agent.model.calls[2].input
    users = [item["content"] for item in last_input if item.get("role") == "user"]
    assert users == ["msg 0", "msg 1", "msg 2"]
    history = list(runs[0].session.items.values_list("payload", flat=True))
    assert len(history) == 6


def test_a_run_waits_while_its_session_has_a_running_run(user, scripted_agent):
    agent = scripted_agent([text("after the blocker")])
    session = AgentSession.objects.create(owner=user, session_key="k")
    blocker = running_elsewhere(session)
    run = create_run(owner=user, session_key="k", input_payload="next", agent_key=agent.key)
    run.refresh_from_db()
    assert run.status == "pending"

    # The blocker's worker died; recovering it frees the session and dispatches the next run.
    worker_died(blocker)
    assert recover_runs(mode="fail") == 1
    blocker.refresh_from_db()
    run.refresh_from_db()
    assert blocker.status == "failed"
    assert run.status == "completed"
    assert run.final_output == "after the blocker"


def test_concurrency_limit_keeps_runs_pending_until_a_slot_frees(user, other_user, settings):
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 1
    other_session = AgentSession.objects.create(owner=other_user, session_key="busy")
    blocker = running_elsewhere(other_session)
    run = create_run(owner=user, session_key="k", input_payload="hi")
    run.refresh_from_db()
    assert run.status == "pending"

    worker_died(blocker)
    recover_runs(mode="fail")
    blocker.refresh_from_db()
    run.refresh_from_db()
    assert blocker.status == "failed"
    assert run.status == "completed"


def test_a_broker_error_fails_the_run_with_a_clear_message(user, settings):
    settings.TASKS = BROKEN_TASKS
    run = create_run(owner=user, session_key="k", input_payload="hi")
    run.refresh_from_db()
    assert run.status == "failed"
    assert (
        run.error
        == "The run could not be queued: the task queue is unavailable. Try again shortly."
    )
    assert run.finished_at is not None


def test_a_broker_error_defers_the_runs_queued_behind_until_a_sweep(user, settings):
    session = AgentSession.objects.create(owner=user, session_key="k")
    blocker = running_elsewhere(session)
    behind = create_run(owner=user, session_key="k", input_payload="waiting")
    settings.TASKS = BROKEN_TASKS
    worker_died(blocker)
    recover_runs(mode="fail")
    blocker.refresh_from_db()
    behind.refresh_from_db()
    assert blocker.status == "failed"
    # Not failed for an outage it had no part in: it waits, without a task, for the broker.
    assert (behind.status, behind.task_id, behind.dispatched_at) == ("pending", "", None)

    settings.TASKS = IMMEDIATE_TASKS
    assert sweep().dispatched == 1
    behind.refresh_from_db()
    assert behind.status == "completed"


def test_task_id_is_recorded_by_the_worker_that_ran_the_run(user):
    run = create_run(owner=user, session_key="k", input_payload="hi")
    run.refresh_from_db()
    assert run.status == "completed"
    assert len(run.task_id) >= 10


def test_enqueue_of_an_unknown_run_is_a_no_op(db):
    enqueue_agent_run("00000000-0000-0000-0000-000000000000")
    assert not AgentRun.objects.exists()


def test_a_task_that_could_not_claim_hands_its_run_to_the_next_dispatch(user, settings):
    """The run's task arrives while the run ahead still runs, so it cannot claim; the run
    ahead finishes just before the task lets go of the run. The run must not be left with
    neither a task nor anyone to dispatch it."""
    from agentic_django import lifecycle
    from agentic_django.dispatch import dispatch_next
    from agentic_django.execution import execute
    from tests.core.faults import database_faults

    settings.TASKS = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
    session = AgentSession.objects.create(owner=user, session_key="k")
    ahead = running_elsewhere(session)
    run = AgentRun.objects.create(
        session=session, owner=user, agent_key="demo", input_payload="next"
    )
    AgentRun.objects.filter(pk=run.pk).update(task_id="task-1", dispatched_at=timezone.now())

    def the_run_ahead_finishes() -> None:
        AgentRun.objects.filter(pk=ahead.pk).update(status="completed")
        dispatch_next()  # its worker dispatches: this run still has its (recent) task

    with database_faults() as faults:
        faults.before(lifecycle_release_sql(), the_run_ahead_finishes)
        assert execute(str(run.pk), task_id="task-1") == "skipped"
    run.refresh_from_db()
    assert run.status == "pending" and run.dispatched_at is not None
    assert queued_run_ids() == [str(run.pk)]  # a new task, from the release
    assert lifecycle.stale_runs().count() == 0


def lifecycle_release_sql() -> str:
    return r'^UPDATE "agentic_django_agentrun" SET "task_id" = %s, "dispatched_at" = %s WHERE'


@pytest.mark.parametrize("in_transaction", [False, True])
def test_one_thread_of_a_process_dispatches_for_the_runs_ending_beside_it(
    user, other_user, settings, in_transaction
):
    """While a thread dispatches, a run ending in another thread only asks it for one round
    more (no query of its own), and that thread dispatches the run waiting behind it too; a
    call inside a transaction dispatches by itself (the other thread cannot see its changes)."""
    settings.TASKS = QUEUE  # this test plays the workers
    first = running_elsewhere(AgentSession.objects.create(owner=user, session_key="a"))
    second = running_elsewhere(AgentSession.objects.create(owner=other_user, session_key="b"))
    behind_first = create_run(owner=user, session_key="a", input_payload="1", agent_key="demo")
    behind_second = create_run(
        owner=other_user, session_key="b", input_payload="2", agent_key="demo"
    )
    assert AgentRun.objects.filter(task_id="").count() == 4
    AgentRun.objects.filter(pk=first.pk).update(status="completed", finished_at=timezone.now())
    looking, go, dispatched = threading.Event(), threading.Event(), []

    def dispatch() -> None:
        try:
            dispatched.append(dispatch_next())
        finally:
            connection.close()

    dispatcher = threading.Thread(target=dispatch)
    with database_faults() as faults:
        # Hold the dispatching thread at its first statement, the round's first look.
        faults.before(r"^SELECT", lambda: (looking.set(), go.wait(PATIENCE)), thread=dispatcher)
        dispatcher.start()
        assert looking.wait(PATIENCE)
        AgentRun.objects.filter(pk=second.pk).update(status="completed")
        with CaptureQueriesContext(connection) as queries:
            if in_transaction:
                with transaction.atomic():
                    beside = dispatch_next()
            else:
                beside = dispatch_next()
        go.set()
        dispatcher.join(PATIENCE)
    if in_transaction:
        assert (beside, dispatched) == (2, [0])
    else:
        assert (beside, dispatched, queries.captured_queries) == (0, [2], [])
    tasks = AgentRun.objects.filter(pk__in=[behind_first.pk, behind_second.pk])
    assert [run.task_id != "" for run in tasks] == [True, True]
