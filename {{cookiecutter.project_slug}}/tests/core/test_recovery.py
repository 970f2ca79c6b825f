"""Recovery of runs whose worker died; live runs in other processes are never touched."""

from __future__ import annotations

import asyncio
from io import StringIO

import pytest
from agents import function_tool
from agents.testing import ModelStep, assistant_message
from asgiref.sync import sync_to_async
from django.apps import apps
from django.core.management import call_command

from agentic_django.models import AgentRun, AgentSession, AgentSessionItem
from agentic_django.recovery import LEASE_EXPIRED_ERROR, recover_runs
from agentic_django.services import create_run, requeue_run
from tests.core.conftest import call, running_elsewhere, text, worker_died

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def crashed(user, scripted_agent):
    """A run whose worker died mid-run after writing part of the history, and a live run."""
    agent = scripted_agent([text("recovered answer")])
    session = AgentSession.objects.create(owner=user, session_key="crashed")
    dead = running_elsewhere(session, agent_key=agent.key, text_input="question")
    AgentSessionItem.objects.create(
        session=session, sequence=1, run=dead, payload={"role": "user", "content": "question"}
    )
    worker_died(dead)
    live = running_elsewhere(AgentSession.objects.create(owner=user, session_key="live"))
    return dead, live, agent


def trigger_first_dispatch(user) -> AgentRun:
    """Something happens in this fresh process: a new run is dispatched."""
    run = create_run(owner=user, session_key="unrelated", input_payload="hi")
    run.refresh_from_db()
    return run


def test_startup_requeue_reruns_only_expired_runs_without_duplicating_history(user, crashed):
    dead, live, agent = crashed
    trigger = trigger_first_dispatch(user)

    dead.refresh_from_db()
    live.refresh_from_db()
    assert trigger.status == "completed"
    assert dead.status == "completed"
    assert dead.final_output == "recovered answer"
    assert dead.attempt == 2
    history = list(dead.session.items.values_list("payload", flat=True))
    assert [p.get("content") for p in history if p.get("role") == "user"] == ["question"]
    assert len(history) == 2
    assert live.status == "running"
    assert live.attempt == 1
    assert len(agent.model.calls) == 1


def test_startup_fail_marks_expired_runs_failed(user, crashed, settings):
    settings.AGENTIC_DJANGO_STARTUP_RECOVERY = "fail"
    dead, live, _ = crashed
    trigger_first_dispatch(user)
    dead.refresh_from_db()
    live.refresh_from_db()
    assert dead.status == "failed"
    assert dead.error == LEASE_EXPIRED_ERROR
    assert live.status == "running"


def test_startup_ignore_leaves_expired_runs_alone(user, crashed, settings):
    settings.AGENTIC_DJANGO_STARTUP_RECOVERY = "ignore"
    dead, _, _ = crashed
    trigger_first_dispatch(user)
    dead.refresh_from_db()
    assert dead.status == "running"


def test_startup_recovery_runs_once_per_process(user, crashed, settings):
    settings.AGENTIC_DJANGO_STARTUP_RECOVERY = "fail"
    dead, live, _ = crashed
    trigger_first_dispatch(user)
    dead.refresh_from_db()
    assert dead.status == "failed"
    worker_died(live)
    create_run(owner=user, session_key="another", input_payload="hi")
    live.refresh_from_db()
    assert live.status == "running"


def test_startup_recovery_also_runs_on_the_first_execution_in_a_worker(user, crashed, settings):
    from agentic_django.tasks import execute_agent_run

    settings.AGENTIC_DJANGO_STARTUP_RECOVERY = "fail"
    dead, _, _ = crashed
    execute_agent_run.enqueue("00000000-0000-0000-0000-000000000000")
    dead.refresh_from_db()
    assert dead.status == "failed"


def test_an_expired_run_blocking_a_new_run_is_recovered_later_in_the_process(user, crashed):
    dead, live, agent = crashed
    trigger_first_dispatch(user)  # startup recovery is done for this process
    agent.model.extend([text("blocker answer"), text("answer to the new question")])
    blocker = running_elsewhere(dead.session, agent_key=agent.key, text_input="blocking")
    worker_died(blocker)

    run = create_run(owner=user, session_key="crashed", input_payload="new", agent_key=agent.key)
    blocker.refresh_from_db()
    run.refresh_from_db()
    assert blocker.status == "completed"  # requeued, then executed before the newer run
    assert run.status == "completed"
    assert run.final_output == "answer to the new question"
    assert blocker.finished_at <= run.started_at
    live.refresh_from_db()
    assert live.status == "running"


def test_app_ready_does_not_touch_the_database(django_assert_num_queries):
    with django_assert_num_queries(0):
        apps.get_app_config("agentic_django").ready()


def test_recover_command_fail_and_requeue(user, crashed):
    dead, live, _ = crashed
    out = StringIO()
    call_command("agentic_django_recover_runs", "--mode=requeue", "--dry-run", stdout=out)
    assert "1 stale run(s)" in out.getvalue()
    dead.refresh_from_db()
    assert dead.status == "running"

    call_command("agentic_django_recover_runs", "--mode=requeue", stdout=out)
    dead.refresh_from_db()
    assert dead.status == "completed"
    assert dead.session.items.count() == 2

    worker_died(live)
    call_command("agentic_django_recover_runs", "--mode=fail", stdout=out)
    live.refresh_from_db()
    assert live.status == "failed"
    assert live.error == LEASE_EXPIRED_ERROR


def test_requeue_of_a_stale_run_whose_cancel_was_requested_cancels_it(user, crashed):
    dead, _, agent = crashed
    AgentRun.objects.filter(pk=dead.pk).update(cancel_requested_at=dead.started_at)
    assert recover_runs(mode="requeue") == 1
    dead.refresh_from_db()
    assert dead.status == "cancelled"
    assert agent.model.calls == ()
    assert not dead.session.items.exists()


def test_a_worker_that_lost_its_claim_cannot_write_or_overwrite(user, scripted_agent):
    @function_tool
    async def slow_tool() -> str:
        """Takes so long that the lease expires and another process takes over."""
        running = await sync_to_async(AgentRun.objects.get)(status="running")
        await sync_to_async(worker_died)(running)
        await sync_to_async(recover_runs)(mode="fail")
        return "finished too late"

    agent = scripted_agent([call("slow_tool", {}), text("too late")], tools=[slow_tool])
    run = create_run(owner=user, session_key="k", input_payload="go", agent_key=agent.key)
    run.refresh_from_db()
    assert run.status == "failed"
    assert run.error == LEASE_EXPIRED_ERROR
    payloads = list(run.session.items.values_list("payload", flat=True))
    assert payloads == [{"role": "user", "content": "go"}]
    assert agent.model.remaining_steps == 1


def test_heartbeat_renews_the_lease_while_running(user, scripted_agent, settings):
    settings.AGENTIC_DJANGO_LEASE_SECONDS = 5
    observed = {}

    async def slow(model_call):
        # A slow model call: wait (up to 15 s) until the worker has renewed the lease once.
        for _ in range(150):
            await asyncio.sleep(0.1)
            run = await sync_to_async(AgentRun.objects.get)(status="running")
            if run.heartbeat_at > run.started_at:
                break
        observed["started_at"], observed["heartbeat_at"] = run.started_at, run.heartbeat_at
        observed["lease_expires_at"] = run.lease_expires_at
        return [assistant_message("ok")]

    agent = scripted_agent([ModelStep.respond(slow)])
    run = create_run(owner=user, session_key="k", input_payload="hi", agent_key=agent.key)
    run.refresh_from_db()
    assert run.status == "completed"
    assert observed["heartbeat_at"] > observed["started_at"]
    assert observed["lease_expires_at"] > observed["heartbeat_at"]


def test_admin_requeue_retries_the_last_failed_run_of_a_session(user, scripted_agent):
    from agents.testing import ModelStep

    agent = scripted_agent([ModelStep.raise_error(RuntimeError("flaky")), text("second try")])
    run = create_run(owner=user, session_key="k", input_payload="hi", agent_key=agent.key)
    run.refresh_from_db()
    assert run.status == "failed"

    assert requeue_run(run) is True
    run.refresh_from_db()
    assert run.status == "completed"
    assert run.final_output == "second try"
    assert run.error == ""
    users = [
        p for p in run.session.items.values_list("payload", flat=True) if p.get("role") == "user"
    ]
    assert users == [{"role": "user", "content": "hi"}]


def test_requeue_refuses_a_failed_run_followed_by_a_later_run(user, scripted_agent):
    from agents.testing import ModelStep

    agent = scripted_agent([ModelStep.raise_error(RuntimeError("flaky")), text("later")])
    first = create_run(owner=user, session_key="k", input_payload="one", agent_key=agent.key)
    create_run(owner=user, session_key="k", input_payload="two", agent_key=agent.key)
    first.refresh_from_db()
    assert first.status == "failed"
    assert requeue_run(first) is False
    first.refresh_from_db()
    assert first.status == "failed"
