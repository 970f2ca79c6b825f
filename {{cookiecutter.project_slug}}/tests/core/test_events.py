"""Run events: what each SDK event becomes, how they are numbered, and who hears of them."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection, transaction

from agentic_django import signals
from agentic_django.events import EventRecorder, describe
from agentic_django.models import AgentEvent, AgentSession
from tests.core.conftest import running_elsewhere
from tests.core.faults import database_faults
from tests.waiting import PATIENCE, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

EVENT_INSERT = r'^INSERT INTO "agentic_django_agentevent"'


@pytest.fixture
def claimed(user):
    return running_elsewhere(AgentSession.objects.create(owner=user, session_key="k"))


def test_receivers_get_the_stored_event(claimed):
    heard: list[Any] = []

    def receiver(sender, run, event, **kwargs):
        heard.append((sender, run.pk, event))

    signals.agent_run_event.connect(receiver, sender=AgentEvent)
    try:
        returned = EventRecorder(claimed).record("tool_called", {"tool_name": "calculate"})
    finally:
        signals.agent_run_event.disconnect(receiver, sender=AgentEvent)
    stored = AgentEvent.objects.get(run=claimed)
    ((sender, run_id, event),) = heard
    assert (sender, run_id, event) == (AgentEvent, claimed.pk, returned)
    for name in ("pk", "run_id", "sequence", "attempt", "event_type", "payload"):
        assert getattr(event, name) == getattr(stored, name), name
    assert abs((event.created_at - stored.created_at).total_seconds()) < 1


@pytest.mark.postgres
def test_an_insert_that_collides_with_a_lost_attempts_takes_the_next_sequence(claimed):
    """A lost attempt's last event is being written (not yet committed) as this attempt writes
    its own: both pick sequence 2; the live attempt's insert must not fail but take 3."""
    from tests.core.test_faults import psycopg_connect

    recorder = EventRecorder(claimed)
    recorder.record("agent_updated", {"agent": "A"})
    inserted = threading.Event()

    def lost_attempt() -> None:
        with transaction.atomic():
            AgentEvent.objects.create(
                run=claimed, sequence=2, attempt=0, event_type="tool_called", payload={}
            )
            inserted.set()
            # Commit only once the live attempt's insert waits on this row's sequence.
            with psycopg_connect() as observer:
                wait_for(
                    lambda: observer.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    ).fetchone()[0],
                    "the live insert to wait",
                )
        connection.close()

    writer = threading.Thread(target=lost_attempt)

    def start_the_lost_attempt() -> None:
        writer.start()
        assert inserted.wait(PATIENCE)

    with database_faults() as faults:
        faults.before(EVENT_INSERT, start_the_lost_attempt, thread=threading.current_thread())
        event = recorder.record("message_output", {"text": "hi"})
    writer.join(PATIENCE)
    assert event is not None and event.sequence == 3
    assert list(AgentEvent.objects.filter(run=claimed).values_list("sequence", "attempt")) == [
        (1, 1),
        (2, 0),
        (3, 1),
    ]


def test_payloads_are_stored_even_with_text_the_database_rejects(claimed):
    event = EventRecorder(claimed).record("tool_output", {"output": "a\x00b"})
    assert AgentEvent.objects.get(pk=event.pk).payload == {"output": "a\ufffdb"}


def test_refusals_and_odd_items_are_described():
    from types import SimpleNamespace

    from agents import Agent
    from agents.items import MessageOutputItem
    from openai.types.responses import (
        ResponseOutputMessage,
        ResponseOutputRefusal,
        ResponseOutputText,
    )

    class Event:
        type = "run_item_stream_event"

        def __init__(self, name: str, item: Any) -> None:
            self.name, self.item = name, item

    message = ResponseOutputMessage(
        id="m1",
        role="assistant",
        status="completed",
        type="message",
        content=[
            ResponseOutputText(type="output_text", text="Sure. ", annotations=[]),
            ResponseOutputRefusal(type="refusal", refusal="But not that."),
        ],
    )
    item = MessageOutputItem(Agent(name="Writer"), message)
    kind, payload = describe(Event("message_output_created", item))
    assert (kind, payload) == ("message_output", {"agent": "Writer", "text": "Sure. But not that."})

    # An item the engine does not know keeps its raw form, whatever it is.
    odd = SimpleNamespace(raw_item="plain text", agent=None)
    assert describe(Event("something_new", odd)) == (
        "something_new",
        {"agent": None, "item": {"value": "plain text"}},
    )
