"""Token streaming: a provider streams a reply slowly; the run's stream (server-sent events)
shows the text as it arrives, and a client that reconnects gets exactly what it missed."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
from asgiref.sync import async_to_sync
from django.test import Client
from django.urls import reverse

from agentic_django.execution import execute
from agentic_django.models import AgentRun
from agentic_django.services import create_run
from tests.core.faults import database_faults
from tests.fakes.openai_server import Text
from tests.waiting import PATIENCE, in_thread, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
STREAM_WRITE = r'^UPDATE "agentic_django_agentrun" SET "stream_text"'


@dataclass
class Event:
    kind: str
    id: str | None
    data: str


def parse(body: str) -> list[Event]:
    events = []
    for block in re.split(r"\n\n", body):
        fields = dict(re.findall(r"^(event|id|data): ?(.*)$", block, re.MULTILINE))
        if "event" in fields:
            events.append(Event(fields["event"], fields.get("id"), fields.get("data", "")))
    return events


def read(
    client: Client, run: AgentRun, *, last_id: str | None = None, until: str = "end"
) -> list[Event]:
    """Open the run's stream and read it until an event of kind ``until`` (then hang up)."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    response = client.get(reverse("agents:run-stream", args=[run.pk]), headers=headers)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"

    async def collect() -> str:
        body = ""
        async for chunk in response.streaming_content:
            body += chunk.decode() if isinstance(chunk, bytes) else chunk
            if any(event.kind == until for event in parse(body)):
                break
        return body

    return parse(async_to_sync(collect)())


@pytest.fixture
def streaming_run(provider, user, settings, client):
    """A run whose reply streams in 8 pieces, 0.25 s apart, executed by a worker thread."""
    settings.TASKS = QUEUE
    reply = Text("one two three four five six seven eight", deltas=8, delay=0.25)
    provider.reply(reply)
    run = create_run(owner=user, session_key="stream", input_payload="count to eight")
    worker = in_thread(lambda: execute(str(run.pk), task_id="worker"))
    client.force_login(user)
    yield run, reply, client
    worker.join(PATIENCE)


def test_text_shows_while_the_model_streams_and_the_message_replaces_it(streaming_run):
    run, reply, client = streaming_run
    wait_for(lambda: AgentRun.objects.get(pk=run.pk).stream_text, "the first streamed text")
    events = read(client, run)
    kinds = [event.kind for event in events]
    deltas = [event for event in events if event.kind == "delta"]
    assert deltas, kinds
    # The text came in pieces before the finished message, which then brings all of it (the
    # pieces not written yet when the message completed come with it).
    first_message = next(i for i, e in enumerate(events) if '"message_output"' in e.data)
    assert kinds.index("delta") < first_message
    streamed = "".join(json.loads(event.data)["text"] for event in deltas)
    assert streamed and reply.text.startswith(streamed)
    assert json.loads(events[first_message].data)["payload"]["text"] == reply.text
    assert kinds[-1] == "end" and '"completed"' in events[-1].data
    # Every event has an id, and ids only grow: a reconnect can resume from any of them.
    assert all(event.id for event in events)
    ids = [tuple(map(int, event.id.removesuffix(":end").split(":"))) for event in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert events[-1].id.endswith(":end")
    run.refresh_from_db()
    assert (run.status, run.stream_text, run.final_output) == ("completed", "", reply.text)


def test_the_streamed_text_grows_piece_by_piece(streaming_run):
    run, reply, _ = streaming_run
    seen: list[str] = []

    def grown_or_done() -> bool:
        current = AgentRun.objects.get(pk=run.pk)
        if current.stream_text and current.stream_text not in seen:
            seen.append(current.stream_text)
        return len(seen) >= 2 or current.is_terminal

    wait_for(grown_or_done, "the streamed text to grow")
    assert len(seen) >= 2, seen  # later writes add to the text, not only the first one
    assert seen[1].startswith(seen[0]) and len(seen[1]) > len(seen[0])
    assert reply.text.startswith(seen[1])


def test_a_reconnect_gets_the_rest_once(streaming_run):
    run, reply, client = streaming_run
    wait_for(lambda: AgentRun.objects.get(pk=run.pk).stream_text, "the first streamed text")
    first = read(client, run, until="delta")  # the connection drops after one delta
    seen = "".join(json.loads(e.data)["text"] for e in first if e.kind == "delta")
    rest = read(client, run, last_id=first[-1].id)
    more = "".join(json.loads(e.data)["text"] for e in rest if e.kind == "delta")
    assert seen and reply.text.startswith(seen + more)  # nothing twice, nothing skipped
    assert sum('"message_output"' in e.data for e in first + rest) == 1
    assert rest[-1].kind == "end"


def test_delta_writes_are_coalesced(provider, user, settings):
    """200 pieces in about a second: the run is written a handful of times, not 200."""
    reply = Text("x" * 400, deltas=200, delay=0.005)
    provider.reply(reply)
    with database_faults() as faults:
        run = create_run(owner=user, session_key="s", input_payload="go")
        writes = sum(1 for sql in faults.statements if re.match(STREAM_WRITE, sql))
    run.refresh_from_db()
    assert run.final_output == reply.text
    elapsed = (run.finished_at - run.started_at).total_seconds()
    # At most one write per 0.1 s of streaming, plus the first and the last.
    assert 1 <= writes <= elapsed * 10 + 2, (writes, elapsed)


def test_a_client_of_a_retried_run_is_told_to_start_over(user, client):
    """The stream showed an event of attempt 1; its worker died and attempt 2 ran the run
    again. On reconnecting, the client hears that what it saw is void, then gets attempt 2."""
    from agentic_django.events import EventRecorder
    from agentic_django.models import AgentSession
    from agentic_django.recovery import recover_runs
    from tests.core.conftest import running_elsewhere, worker_died

    run = running_elsewhere(
        AgentSession.objects.create(owner=user, session_key="k"), agent_key="assistant"
    )
    EventRecorder(run).record("tool_called", {"tool_name": "calculate", "call_id": "c1"})
    client.force_login(user)
    first = read(client, run, until="event")
    assert [e.id for e in first if e.kind == "event"] == ["1"]

    worker_died(run)
    assert recover_runs(mode="requeue") == 1  # attempt 2 runs in-process
    again = read(client, run, last_id="1")
    assert (again[0].kind, again[0].id) == ("reset", "0")
    attempts = {json.loads(e.data)["attempt"] for e in again if e.kind == "event"}
    assert attempts == {2}
    assert again[-1].kind == "end" and '"completed"' in again[-1].data


def test_a_reconnect_after_the_end_gets_exactly_what_came_after_it(user, client):
    """The end has an id like every event. A paused run's stream ends; the run goes on and
    finishes: from the first end's id a client gets the new event and one end. From the id of
    that end it gets nothing (204: a finished run has nothing more); from the id before it,
    that same end again and nothing else."""
    from agentic_django.events import EventRecorder
    from agentic_django.models import AgentSession
    from tests.core.conftest import running_elsewhere

    run = running_elsewhere(
        AgentSession.objects.create(owner=user, session_key="k"), agent_key="assistant"
    )
    EventRecorder(run).record("tool_called", {"tool_name": "send_team_note", "call_id": "c1"})
    AgentRun.objects.filter(pk=run.pk).update(status=AgentRun.Status.AWAITING_APPROVAL)
    client.force_login(user)
    paused = read(client, run)
    assert [(e.kind, e.id) for e in paused] == [("event", "1"), ("end", "1:0:1:end")]
    assert '"awaiting_approval"' in paused[-1].data

    AgentRun.objects.filter(pk=run.pk).update(status=AgentRun.Status.RUNNING)
    EventRecorder(run).record("tool_output", {"call_id": "c1", "output": "sent"})
    AgentRun.objects.filter(pk=run.pk).update(status=AgentRun.Status.COMPLETED)
    rest = read(client, run, last_id=paused[-1].id)
    assert [(e.kind, e.id) for e in rest] == [("event", "2"), ("end", "2:0:1:end")]
    assert '"completed"' in rest[-1].data

    stream = reverse("agents:run-stream", args=[run.pk])
    after_the_end = client.get(stream, headers={"Last-Event-ID": rest[-1].id})
    assert after_the_end.status_code == 204
    assert client.get(stream, {"after": rest[-1].id}).status_code == 204
    again = read(client, run, last_id=rest[0].id)
    assert [(e.kind, e.id, e.data) for e in again] == [("end", rest[-1].id, rest[-1].data)]


def deltas(events: list[Event]) -> list[dict]:
    return [json.loads(e.data) for e in events if e.kind == "delta"]


def test_text_of_an_attempt_that_died_never_mixes_with_the_retry(user, client, settings):
    """Turn 1 called a tool (so there is a checkpoint after its events); attempt 1 streamed
    "Hello wor" of its answer and died. While the run waits for its retry, nobody sees that
    text; a client that saw it is told to start over, then gets the retry's answer alone."""
    from agentic_django import lifecycle
    from agentic_django.events import EventRecorder
    from agentic_django.lifecycle import Fence
    from agentic_django.models import AgentSession
    from tests.core.conftest import running_elsewhere, worker_died

    settings.TASKS = QUEUE  # this test plays the workers
    run = running_elsewhere(AgentSession.objects.create(owner=user, session_key="k"))
    first = Fence.of(run)
    recorder = EventRecorder(run)
    recorder.record("tool_called", {"tool_name": "calculate", "call_id": "c1"})
    recorder.record("tool_output", {"call_id": "c1", "output": "42"})
    assert lifecycle.save_checkpoint(first, state="{}", schema_version="1", turn=2)
    assert lifecycle.stream_text(first, "Hello wor", new_message=True)
    client.force_login(user)
    seen = read(client, run, until="delta")
    assert seen[-1].id == "2:9:1" and deltas(seen) == [{"text": "Hello wor", "start": True}]

    worker_died(run)
    assert lifecycle.requeue(AgentRun.objects.get(pk=run.pk), stale_only=True)
    assert AgentRun.objects.get(pk=run.pk).stream_text == ""
    page = client.get(reverse("agents:run-fragment", args=[run.pk]))
    assert "Hello wor" not in page.content.decode()

    second = Fence.of(lifecycle.claim(run.pk))
    assert lifecycle.stream_text(second, "Good morning", new_message=True)
    lifecycle.finish(
        second,
        status="completed",
        error="",
        error_detail="",
        final_output="Good morning",
        last_response_id="",
        usage={},
    )
    again = read(client, run, last_id=seen[-1].id)
    assert (again[0].kind, again[0].id) == ("reset", "2")
    assert json.loads(again[0].data) == {"attempt": 2}
    assert "Hello" not in "".join(e.data for e in again)


def test_without_events_each_streamed_message_starts_afresh(user, client, settings):
    """The engine's default (no events): a client following a run that streams two messages
    gets the second as a message of its own, never continued from the first one's length."""
    from agentic_django import lifecycle
    from agentic_django.lifecycle import Fence
    from agentic_django.models import AgentSession
    from tests.core.conftest import running_elsewhere

    settings.AGENTIC_DJANGO_ENABLE_EVENTS = False
    run = running_elsewhere(AgentSession.objects.create(owner=user, session_key="k"))
    fence = Fence.of(run)
    lifecycle.stream_text(fence, "Let me look that up.", new_message=True, events=False)
    client.force_login(user)
    first = read(client, run, until="delta")
    assert deltas(first) == [{"text": "Let me look that up.", "start": True}]
    lifecycle.end_stream(fence, None)
    lifecycle.stream_text(fence, "two.", new_message=True, events=False)
    rest = read(client, run, last_id=first[-1].id, until="delta")
    assert deltas(rest) == [{"text": "two.", "start": True}]
    assert rest[-1].id == "2:4:1"


def test_a_run_without_events_numbers_its_streamed_messages(provider, user, settings):
    """The worker's side of it: with events off, a message a model streams gets the next
    number (there is no event for it to follow)."""
    settings.AGENTIC_DJANGO_ENABLE_EVENTS = False
    settings.TASKS = {"default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}}
    provider.reply(Text("one two three", deltas=3, delay=0.15))
    run = create_run(owner=user, session_key="k", input_payload="count")
    run.refresh_from_db()
    assert (run.status, run.final_output) == ("completed", "one two three")
    assert run.stream_sequence == 1 and run.stream_text == ""


def test_cancel_while_text_streams_stops_at_once_and_keeps_the_partial_text(streaming_run):
    from agentic_django.services import cancel_run

    run, reply, _client = streaming_run
    wait_for(lambda: AgentRun.objects.get(pk=run.pk).stream_text, "the first streamed text")
    cancel_run(AgentRun.objects.get(pk=run.pk))
    wait_for(lambda: AgentRun.objects.get(pk=run.pk).is_terminal, "the run to stop")
    run.refresh_from_db()
    assert run.status == "cancelled"
    assert run.stream_text and reply.text.startswith(run.stream_text)
    assert run.stream_text != reply.text  # it did not wait for the whole message
    assert run.final_output is None


# --- Reconnecting across retries and resumes (real runs, scripted models) -----------------------

END_STREAM = r'^UPDATE "agentic_django_agentrun" SET "stream_text" = %s, "stream_sequence" = %s'


def client_view(events: list[Event], view: dict[int, str]) -> dict[int, str]:
    """Apply what a stream sent to a client's view of the run's events {sequence: type}."""
    for event in events:
        if event.kind == "reset":
            keep = int(event.id.split(":")[0])
            view = {sequence: kind for sequence, kind in view.items() if sequence <= keep}
        elif event.kind == "event":
            assert int(event.id) not in view, f"event {event.id} seen twice"
            view[int(event.id)] = json.loads(event.data)["type"]
    return view


def visible(run: AgentRun) -> dict[int, str]:
    from agentic_django.events import visible_events

    return dict(visible_events(run).order_by("sequence").values_list("sequence", "event_type"))


def slow_step(output: list) -> object:
    """A model step streaming ``output`` slowly, so its text is written while it streams."""
    import asyncio

    from agents.testing import ModelStep
    from agents.testing.model import _stream_events_for_step

    events = _stream_events_for_step(ModelStep(output=output), preserve_raw_usage=False)

    async def stream(model_call):
        for event in events:
            await asyncio.sleep(0.12)
            yield event

    return ModelStep.stream(stream)


@pytest.fixture
def clerk(settings):
    """Agent "clerk" of the engine's test registry with a lookup tool; returns the register."""
    from agents import function_tool

    from tests.core import registry
    from tests.core.conftest import REGISTRY_PATH, register

    @function_tool
    def lookup(order: str) -> str:
        """Look an order up."""
        return f"order {order}: shipped"

    settings.AGENTIC_DJANGO_AGENT_REGISTRY = REGISTRY_PATH
    settings.AGENTIC_DJANGO_ENABLE_EVENTS = True
    settings.TASKS = QUEUE  # these tests play the workers
    yield lambda steps, tools=(lookup,): register("clerk", steps, list(tools))
    registry.FACTORIES.clear()


def new_run(user) -> AgentRun:
    from agentic_django.models import AgentSession

    return AgentRun.objects.create(
        session=AgentSession.objects.create(owner=user, session_key="k"),
        owner=user,
        agent_key="clerk",
        input_payload="where are my orders?",
    )


def died_and_retried(run: AgentRun, at: str) -> AgentRun:
    """The worker dies at statement ``at``; its lease runs out; another worker retries."""
    from agentic_django import recovery
    from tests.core.conftest import worker_died

    with database_faults() as faults, pytest.raises(SystemExit):
        faults.fail(at, SystemExit("worker killed"))
        execute(str(run.pk), task_id="worker-1")
    dead = AgentRun.objects.get(pk=run.pk)
    worker_died(dead)
    assert recovery.recover_runs(mode="requeue") == 1
    execute(str(run.pk), task_id="worker-2")
    return dead


def test_a_client_holding_dead_events_is_reset_after_the_retry_checkpointed(clerk, user, client):
    from tests.core.conftest import call, text
    from tests.core.faults import CHECKPOINT_SAVE

    clerk(
        [
            call("lookup", {"order": "9"}, "call-a"),
            call("lookup", {"order": "9"}, "call-b"),
            call("lookup", {"order": "10"}, "call-c"),
            text("Both shipped."),
        ]
    )
    run = new_run(user)
    seen = {}

    def before_dying():
        seen.update(visible(run))

    with database_faults() as faults:
        faults.before(CHECKPOINT_SAVE, before_dying)  # what a client had when the worker died
        died_and_retried(run, CHECKPOINT_SAVE)
    run.refresh_from_db()
    assert list(seen) == [1, 2, 3] and run.status == "completed"
    assert run.checkpoint_event_sequence > 3
    client.force_login(user)
    rest = read(client, run, last_id="3")
    assert rest[0].kind == "reset"
    assert client_view(rest, seen) == visible(run)


def test_a_client_holding_dead_text_gets_every_event_of_the_retry(clerk, user, client):
    from agents.testing import assistant_message

    from tests.core.conftest import call, text

    clerk(
        [
            call("lookup", {"order": "9"}, "call-a"),
            slow_step([assistant_message("partial answer that will die")]),
            call("lookup", {"order": "10"}, "call-c"),
            text("Both shipped."),
        ]
    )
    run = new_run(user)
    dead = died_and_retried(run, END_STREAM)
    assert dead.stream_text and dead.attempt == 1
    last_id = f"{dead.stream_sequence}:{len(dead.stream_text)}:1"
    seen = {s: kind for s, kind in visible(dead).items() if s <= dead.stream_sequence}
    run.refresh_from_db()
    assert run.status == "completed", run.error
    client.force_login(user)
    rest = read(client, run, last_id=last_id)
    assert rest[0].kind == "reset"
    assert client_view(rest, seen) == visible(run)
    assert "partial answer" not in "".join(e.data for e in rest)


def test_a_client_holding_text_gets_the_message_after_an_approval(clerk, user, client):
    """Not every new attempt is a retry: text streamed before an approval pause became an
    event, which a client that reconnects after the resume still gets."""
    from agents import function_tool
    from agents.testing import assistant_message, function_call

    from agentic_django.services import approve_tool_call
    from tests.core.conftest import text

    @function_tool(needs_approval=True)
    def refund(order: str) -> str:
        """Refund an order."""
        return f"refunded {order}"

    clerk(
        [
            slow_step(
                [
                    assistant_message("Let me refund that."),
                    function_call("refund", {"order": "42"}, call_id="call-r"),
                ]
            ),
            text("Refunded."),
        ],
        tools=(refund,),
    )
    run = new_run(user)
    held = {}

    def capture():
        current = AgentRun.objects.get(pk=run.pk)
        if current.stream_text and not held:
            held["id"] = f"{current.stream_sequence}:{len(current.stream_text)}:1"
            held["seen"] = {
                s: k for s, k in visible(current).items() if s <= current.stream_sequence
            }

    with database_faults() as faults:
        faults.before(END_STREAM, capture)
        execute(str(run.pk), task_id="worker-1")
    assert held, "the text was written while it streamed"
    assert approve_tool_call(AgentRun.objects.get(pk=run.pk), "call-r") is True
    execute(str(run.pk), task_id="worker-2")
    run.refresh_from_db()
    assert run.status == "completed", run.error
    client.force_login(user)
    rest = read(client, run, last_id=held["id"])
    view = client_view(rest, held["seen"])
    assert view == visible(run) and "message_output" in view.values()
