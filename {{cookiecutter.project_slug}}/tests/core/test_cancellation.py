"""Cancelling runs: pending ones end at once, running ones stop after their current turn."""

from __future__ import annotations

import pytest
from agents import function_tool
from asgiref.sync import sync_to_async

from agentic_django import recovery, signals
from agentic_django.exceptions import RunNotCancellable
from agentic_django.models import AgentRun, AgentSession
from agentic_django.services import cancel_run, create_run, enqueue_agent_run
from tests.core.conftest import call, text

pytestmark = pytest.mark.django_db(transaction=True)


def test_cancelling_a_pending_run_ends_it_at_once(user, scripted_agent):
    agent = scripted_agent([text("never said")])
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = AgentRun.objects.create(
        session=session, owner=user, agent_key=agent.key, input_payload="hi"
    )
    cancelled = []

    def on_cancel(sender, run, **kwargs):
        cancelled.append(run.status)

    signals.agent_run_cancelled.connect(on_cancel)
    try:
        result = cancel_run(run)
    finally:
        signals.agent_run_cancelled.disconnect(on_cancel)
    assert result.status == "cancelled"
    assert result.finished_at is not None
    assert cancelled == ["cancelled"]

    enqueue_agent_run(str(run.id))  # a late task must not resurrect it
    run.refresh_from_db()
    assert run.status == "cancelled"
    assert agent.model.calls == ()
    assert not session.items.exists()


def test_cancelling_a_running_run_stops_after_the_current_turn(user, scripted_agent):
    @function_tool
    async def long_job() -> str:
        """Start a long job."""
        running = await sync_to_async(AgentRun.objects.get)(status="running")
        flagged = await sync_to_async(cancel_run)(running)
        assert flagged.status == "running"
        assert flagged.cancel_requested_at is not None
        return "job started"

    agent = scripted_agent([call("long_job", {}), text("should not be reached")], tools=[long_job])
    run = create_run(owner=user, session_key="k", input_payload="do it", agent_key=agent.key)
    run.refresh_from_db()

    assert run.status == "cancelled"
    assert run.final_output is None
    assert agent.model.remaining_steps == 1
    payloads = list(run.session.items.values_list("payload", flat=True))
    kinds = [p.get("type", p.get("role")) for p in payloads]
    # The interrupted turn is complete: the tool call has its output, nothing is dangling.
    assert kinds == ["user", "function_call", "function_call_output"]
    assert payloads[1]["call_id"] == payloads[2]["call_id"]


def test_finished_runs_cannot_be_cancelled(user):
    run = create_run(owner=user, session_key="k", input_payload="hi")
    run.refresh_from_db()
    assert run.status == "completed"
    with pytest.raises(RunNotCancellable):
        cancel_run(run)
    run.refresh_from_db()
    assert run.status == "completed"


def test_cancelling_a_pending_run_lets_the_next_run_of_the_session_start(user, scripted_agent):
    agent = scripted_agent([text("second answered")])
    # A process that already swept at its start (a sweep would dispatch the first run).
    recovery.ensure_startup_recovery()
    session = AgentSession.objects.create(owner=user, session_key="k")
    first = AgentRun.objects.create(
        session=session, owner=user, agent_key=agent.key, input_payload="one"
    )
    second = AgentRun.objects.create(
        session=session, owner=user, agent_key=agent.key, input_payload="two"
    )
    enqueue_agent_run(str(second.id))
    second.refresh_from_db()
    assert second.status == "pending"  # waits for the earlier run of its session

    cancel_run(first)
    second.refresh_from_db()
    assert second.status == "completed"
    assert second.final_output == "second answered"
