"""Executing runs end to end: the real Runner with ScriptedModel at the model boundary."""

from __future__ import annotations

import datetime
import decimal
import json
import uuid

import pytest
from agents import function_tool
from agents.testing import ModelStep
from django.db import transaction
from django.tasks.signals import task_enqueued
from pydantic import BaseModel

from agentic_django import signals
from agentic_django.models import AgentEvent, AgentRun, AgentSession
from agentic_django.services import create_run, enqueue_agent_run
from tests.core.conftest import call, text
from tests.core.registry import DEMO_REPLY

pytestmark = pytest.mark.django_db(transaction=True)


def test_readme_example_works_verbatim(user):
    session, _ = AgentSession.objects.get_or_create(owner=user, session_key="k")
    run = AgentRun.objects.create(session=session, owner=user, agent_key="demo", input_payload="hi")
    enqueue_agent_run(str(run.id))
    run.refresh_from_db()
    assert run.status == "completed"
    assert run.final_output == DEMO_REPLY
    assert run.is_terminal


@pytest.mark.django_db(transaction=True)
def test_enqueue_waits_for_the_transaction_to_commit(user):
    with transaction.atomic():
        session = AgentSession.objects.create(owner=user, session_key="k")
        run = AgentRun.objects.create(
            session=session, owner=user, agent_key="demo", input_payload="hi"
        )
        enqueue_agent_run(str(run.id))
        run.refresh_from_db()
        assert run.status == "pending"
    run.refresh_from_db()
    assert run.status == "completed"


@pytest.mark.django_db(transaction=True)
def test_nothing_is_enqueued_when_the_transaction_rolls_back(user):
    enqueued = []
    task_enqueued.connect(enqueued.append, dispatch_uid="test-rollback")
    try:
        with pytest.raises(RuntimeError), transaction.atomic():
            create_run(owner=user, session_key="k", input_payload="hi")
            raise RuntimeError("abort the request")
    finally:
        task_enqueued.disconnect(dispatch_uid="test-rollback")
    assert enqueued == []
    assert not AgentRun.objects.exists()


def test_text_run_records_output_usage_history_and_signals(user, scripted_agent):
    agent = scripted_agent(
        [text("Paris.", requests=1, input_tokens=11, output_tokens=3, total_tokens=14)]
    )
    seen: list[tuple[str, str]] = []

    def listener(signal_name):
        def receive(sender, run, **kwargs):
            seen.append((signal_name, AgentRun.objects.get(pk=run.pk).status))

        return receive

    receivers = {
        name: listener(name)
        for name in ("agent_run_started", "agent_run_completed", "agent_run_failed")
    }
    for name, receiver in receivers.items():
        getattr(signals, name).connect(receiver)
    try:
        run = create_run(
            owner=user, session_key="geo", input_payload="Capital of France?", agent_key=agent.key
        )
    finally:
        for name, receiver in receivers.items():
            getattr(signals, name).disconnect(receiver)

    run.refresh_from_db()
    assert run.status == "completed"
    assert run.final_output == "Paris."
    assert (run.requests, run.input_tokens, run.output_tokens, run.total_tokens) == (1, 11, 3, 14)
    assert run.last_response_id == "resp-789"
    assert run.started_at and run.finished_at and run.task_id and run.attempt == 1
    assert run.lease_expires_at is None
    assert seen == [("agent_run_started", "running"), ("agent_run_completed", "completed")]
    payloads = list(run.session.items.values_list("payload", flat=True))
    assert payloads[0] == {"role": "user", "content": "Capital of France?"}
    assert payloads[1]["role"] == "assistant"
    assert len(payloads) == 2


def test_tool_call_then_text_persists_the_call_output_and_events(user, scripted_agent):
    calls = []

    @function_tool
    def lookup_order(order_id: str) -> str:
        """Look up an order."""
        calls.append(order_id)
        return f"Order {order_id} ships tomorrow."

    agent = scripted_agent(
        [call("lookup_order", {"order_id": "A42"}), text("It ships tomorrow.")],
        tools=[lookup_order],
    )
    run = create_run(
        owner=user, session_key="orders", input_payload="Where is A42?", agent_key=agent.key
    )
    run.refresh_from_db()

    assert run.status == "completed", run.error
    assert run.final_output == "It ships tomorrow."
    assert calls == ["A42"]
    types = [
        item.get("type", item.get("role"))
        for item in run.session.items.values_list("payload", flat=True)
    ]
    assert types == ["user", "function_call", "function_call_output", "message"]
    events = list(run.events.order_by("sequence"))
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    kinds = [e.event_type for e in events]
    assert kinds.index("tool_called") < kinds.index("tool_output") < kinds.index("message_output")
    assert "raw_response_event" not in kinds
    tool_called = next(e for e in events if e.event_type == "tool_called")
    assert tool_called.payload["tool_name"] == "lookup_order"
    assert json.loads(tool_called.payload["arguments"]) == {"order_id": "A42"}
    tool_output = next(e for e in events if e.event_type == "tool_output")
    assert tool_output.payload["output"] == "Order A42 ships tomorrow."
    assert next(e for e in events if e.event_type == "message_output").payload["text"] == (
        "It ships tomorrow."
    )


def test_model_error_fails_the_run_with_a_short_message(user, scripted_agent, settings):
    settings.DEBUG = False
    agent = scripted_agent(
        [ModelStep.raise_error(RuntimeError("upstream exploded\nsecret detail sk-live-123"))]
    )
    failed = []

    def on_failed(sender, run, **kwargs):
        failed.append(run.pk)

    signals.agent_run_failed.connect(on_failed)
    try:
        run = create_run(owner=user, session_key="s", input_payload="hi", agent_key=agent.key)
    finally:
        signals.agent_run_failed.disconnect(on_failed)
    run.refresh_from_db()
    assert run.status == "failed"
    assert run.error == "The agent failed unexpectedly. The details are in the server log."
    assert failed == [run.pk]
    assert run.finished_at is not None
    # The whole story is kept for the admin only.
    assert "RuntimeError: upstream exploded" in run.error_detail
    assert "Traceback" in run.error_detail


@pytest.mark.parametrize("debug", [True, False])
def test_users_never_see_tracebacks_or_provider_text(user, scripted_agent, settings, debug):
    settings.DEBUG = debug
    agent = scripted_agent([ModelStep.raise_error(RuntimeError("key sk-live-123 in /srv/app"))])
    run = create_run(owner=user, session_key="s", input_payload="hi", agent_key=agent.key)
    run.refresh_from_db()
    assert run.status == "failed"
    for leak in ("Traceback", "sk-live-123", "/srv/app", "RuntimeError", ".py"):
        assert leak not in run.error
    assert "sk-live-123" in run.error_detail


class Invoice(BaseModel):
    number: uuid.UUID
    issued_at: datetime.datetime
    due: datetime.date
    total: decimal.Decimal


def test_structured_output_with_datetime_decimal_uuid_is_stored_as_json(user, scripted_agent):
    number = uuid.uuid4()
    reply = json.dumps(
        {
            "number": str(number),
            "issued_at": "2025-01-02T03:04:05Z",
            "due": "2025-02-01",
            "total": "12.50",
        }
    )
    agent = scripted_agent([text(reply)], output_type=Invoice)
    run = create_run(owner=user, session_key="s", input_payload="Bill me", agent_key=agent.key)
    run.refresh_from_db()
    assert run.status == "completed", run.error
    assert run.final_output == {
        "number": str(number),
        "issued_at": "2025-01-02T03:04:05Z",
        "due": "2025-02-01",
        "total": "12.50",
    }
    json.dumps(run.final_output)


def test_max_turns_from_run_options_is_enforced(user, scripted_agent):
    @function_tool
    def ping() -> str:
        """Ping."""
        return "pong"

    agent = scripted_agent([call("ping", {}), text("done")], tools=[ping])
    run = create_run(
        owner=user,
        session_key="s",
        input_payload="go",
        agent_key=agent.key,
        run_options={"max_turns": 1},
    )
    run.refresh_from_db()
    assert run.status == "failed"
    assert run.error == "The agent used all 1 turns without finishing."


def test_unknown_agent_key_fails_the_run_clearly(user):
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = AgentRun.objects.create(session=session, owner=user, agent_key="nope", input_payload="hi")
    enqueue_agent_run(str(run.id))
    run.refresh_from_db()
    assert run.status == "failed"
    assert run.error == "Unknown agent 'nope'."


def test_run_options_outside_the_allowlist_never_reach_the_runner(user):
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = AgentRun.objects.create(
        session=session,
        owner=user,
        agent_key="demo",
        input_payload="hi",
        run_options={"run_config": {"model": "gpt-5"}, "max_turns": 2},
    )
    enqueue_agent_run(str(run.id))
    run.refresh_from_db()
    assert run.status == "failed"
    assert "run_config" in run.error
    assert not run.session.items.exists()


def test_a_run_is_executed_once_even_if_enqueued_twice(user, scripted_agent):
    agent = scripted_agent([text("only once")])
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = AgentRun.objects.create(
        session=session, owner=user, agent_key=agent.key, input_payload="hi"
    )
    enqueue_agent_run(str(run.id))
    enqueue_agent_run(str(run.id))
    run.refresh_from_db()
    assert run.status == "completed"
    assert len(agent.model.calls) == 1
    assert run.session.items.count() == 2
    assert run.attempt == 1


@pytest.mark.parametrize(
    "signal_name", ["agent_run_started", "agent_run_completed", "agent_run_event"]
)
def test_a_raising_receiver_never_changes_the_run_state(user, signal_name, caplog):
    def explode(sender, **kwargs):
        raise ValueError("receiver bug")

    signal = getattr(signals, signal_name)
    signal.connect(explode)
    try:
        run = create_run(owner=user, session_key="k", input_payload="hi")
    finally:
        signal.disconnect(explode)
    run.refresh_from_db()
    assert run.status == "completed"
    assert run.final_output == DEMO_REPLY
    assert "receiver bug" in caplog.text


def test_event_receivers_use_the_orm_while_the_run_is_still_running(user):
    observed = []

    def on_event(sender, run, event, **kwargs):
        # Querying here would raise SynchronousOnlyOperation if sent from the event loop.
        observed.append(
            (
                event.sequence,
                AgentEvent.objects.filter(run=run, sequence=event.sequence).exists(),
                AgentRun.objects.get(pk=run.pk).status,
            )
        )

    signals.agent_run_event.connect(on_event)
    try:
        run = create_run(owner=user, session_key="k", input_payload="hi")
    finally:
        signals.agent_run_event.disconnect(on_event)
    assert observed
    assert [seq for seq, _, _ in observed] == list(range(1, len(observed) + 1))
    # Each event was stored (and visible) before the run finished.
    assert all(stored and status == "running" for _, stored, status in observed)
    run.refresh_from_db()
    assert run.events.count() == len(observed)


def test_events_are_not_stored_when_disabled(user, settings):
    settings.AGENTIC_DJANGO_ENABLE_EVENTS = False
    run = create_run(owner=user, session_key="k", input_payload="hi")
    run.refresh_from_db()
    assert run.status == "completed"
    assert not run.events.exists()


def test_timeout_fails_the_run(user, scripted_agent, settings):
    import asyncio

    settings.AGENTIC_DJANGO_RUN_TIMEOUT = 1

    async def slow(model_call):
        await asyncio.sleep(30)
        return []

    agent = scripted_agent([ModelStep.respond(slow)])
    run = create_run(owner=user, session_key="k", input_payload="hi", agent_key=agent.key)
    run.refresh_from_db()
    assert run.status == "failed"
    assert run.error == "The run took longer than 1 s and was stopped."
    assert run.finished_at is not None


def test_handoffs_and_agent_changes_are_recorded_as_events(user):
    from agents import Agent
    from agents.testing import ScriptedModel

    from tests.core import registry

    specialist = Agent(
        name="Specialist",
        instructions="Answer billing questions.",
        model=ScriptedModel([text("Your invoice is paid.")]),
    )
    triage = Agent(
        name="Triage",
        instructions="Route the user.",
        handoffs=[specialist],
        model=ScriptedModel([call("transfer_to_specialist", {})]),
    )
    registry.FACTORIES["triage"] = lambda: triage
    run = create_run(owner=user, session_key="k", input_payload="Invoice?", agent_key="triage")
    run.refresh_from_db()
    assert run.status == "completed", run.error
    assert run.final_output == "Your invoice is paid."
    events = [(e.event_type, e.payload) for e in run.events.order_by("sequence")]
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "agent_updated"
    assert "handoff_requested" in kinds
    handoff = next(payload for kind, payload in events if kind == "handoff")
    assert (handoff["from_agent"], handoff["to_agent"]) == ("Triage", "Specialist")
    updates = [payload["agent"] for kind, payload in events if kind == "agent_updated"]
    assert updates == ["Triage", "Specialist"]


def test_streamed_text_is_written_less_often_the_more_runs_stream():
    import asyncio

    from agentic_django.execution import DeltaWriter
    from agentic_django.lifecycle import Fence

    fence = Fence(uuid.uuid4(), 1)
    before = DeltaWriter._open  # writers of runs still open in this test process (none, or few)
    alone = DeltaWriter(fence)
    assert DeltaWriter.interval() == DeltaWriter.INTERVAL
    crowd = [DeltaWriter(fence) for _ in range(2 * DeltaWriter.WRITES_PER_SECOND - 1)]
    assert 2.0 <= DeltaWriter.interval() < 2.1  # 500 writers: each writes every 2 s

    async def close_all() -> None:
        for writer in [*crowd, crowd[0], alone]:  # closing twice counts once
            await writer.close()

    asyncio.run(close_all())
    assert DeltaWriter.interval() == DeltaWriter.INTERVAL
    assert DeltaWriter._open == before
