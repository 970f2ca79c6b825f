"""Clients following a run's stream, live or reconnecting, across retries, rollbacks and
cancellations: each ends with exactly the events a fresh client sees, nothing twice."""

from __future__ import annotations

import threading

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.urls import reverse

from agentic_django import lifecycle, recovery
from agentic_django.events import EventRecorder
from agentic_django.lifecycle import Fence
from agentic_django.models import AgentRun, AgentSession
from tests.core.conftest import running_elsewhere, worker_died
from tests.providers.test_streaming import (  # noqa: F401
    Event,
    clerk,
    client_view,
    deltas,
    parse,
    read,
    visible,
)
from tests.waiting import PATIENCE, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
QUEUE = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}


class LiveClient:
    """A client following a run's stream live, in a thread of its own."""

    def __init__(self, client, run, last_id=None):
        self.events: list[Event] = []
        self.done = threading.Event()
        headers = {"Last-Event-ID": last_id} if last_id else {}
        self.response = client.get(reverse("agents:run-stream", args=[run.pk]), headers=headers)

        async def collect():
            body = ""
            async for chunk in self.response.streaming_content:
                body += chunk.decode() if isinstance(chunk, bytes) else chunk
                self.events = parse(body)
                if any(e.kind == "end" for e in self.events):
                    break

        def target():
            try:
                async_to_sync(collect)()
            finally:
                connection.close()
                self.done.set()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def has(self, predicate) -> bool:
        return any(predicate(e) for e in self.events)

    def finish(self):
        assert self.done.wait(PATIENCE), "the stream never ended"
        return self.events


def event_after_checkpoint(user) -> tuple[AgentRun, Fence]:
    """A run whose live attempt wrote events 1 and 2, saved its checkpoint, then wrote event
    3; the run and that attempt's fence."""
    run = running_elsewhere(AgentSession.objects.create(owner=user, session_key="k"))
    first = Fence.of(run)
    recorder = EventRecorder(run)
    recorder.record("tool_called", {"tool_name": "calculate", "call_id": "c1"})
    recorder.record("tool_output", {"call_id": "c1", "output": "42"})
    assert lifecycle.save_checkpoint(first, state="{}", schema_version="1", turn=2)
    recorder.record("tool_called", {"tool_name": "calculate", "call_id": "c2"})
    return run, first


def test_a_live_client_is_reset_when_a_dead_run_is_cancelled_at_recovery(user, client, settings):
    """Attempt 1 wrote event 3 after its checkpoint and died; its user pressed Stop while the
    worker was dead; recovery cancels the run and marks event 3 superseded. A client that
    followed the run live must end with what every other client sees (events 1, 2)."""
    from agentic_django.services import cancel_run

    settings.TASKS = QUEUE
    run, _ = event_after_checkpoint(user)
    client.force_login(user)
    live = LiveClient(client, run)
    wait_for(lambda: live.has(lambda e: e.id == "3"), "the live client to get event 3")

    cancel_run(AgentRun.objects.get(pk=run.pk))  # a running run: flagged only
    worker_died(run)
    assert recovery.recover_runs(mode="requeue") == 1
    run.refresh_from_db()
    assert run.status == "cancelled" and visible(run) == {1: "tool_called", 2: "tool_output"}
    events = live.finish()
    assert client_view(events, {}) == visible(run), [(e.kind, e.id) for e in events]


def test_a_reconnecting_text_client_is_reset_when_a_dead_run_is_cancelled_at_recovery(
    user, client, settings
):
    """Same, for a client that reconnects holding text of the dead attempt (id 3:5:1)."""
    from agentic_django.services import cancel_run

    settings.TASKS = QUEUE
    run, first = event_after_checkpoint(user)
    assert lifecycle.stream_text(first, "Hello", new_message=True)
    client.force_login(user)
    seen = read(client, run, until="delta")
    assert seen[-1].id == "3:5:1"
    held = client_view(seen, {})

    cancel_run(AgentRun.objects.get(pk=run.pk))
    worker_died(run)
    assert recovery.recover_runs(mode="requeue") == 1
    run.refresh_from_db()
    assert run.status == "cancelled"
    again = read(client, run, last_id=seen[-1].id)
    assert client_view(again, held) == visible(run), [(e.kind, e.id) for e in again]


def test_a_live_client_is_reset_when_a_requeued_run_is_cancelled_before_its_retry(
    user, client, settings
):
    """Attempt 1 wrote event 3 after its checkpoint and died; recovery put the run back to
    pending (event 3 superseded); before any worker claims it, its user cancels it. A client
    that followed the run live must not keep event 3."""
    from agentic_django.services import cancel_run

    settings.TASKS = QUEUE
    run, _ = event_after_checkpoint(user)
    client.force_login(user)
    live = LiveClient(client, run)
    wait_for(lambda: live.has(lambda e: e.id == "3"), "the live client to get event 3")
    worker_died(run)
    assert lifecycle.requeue(AgentRun.objects.get(pk=run.pk), stale_only=True)
    cancel_run(AgentRun.objects.get(pk=run.pk))  # pending: cancelled at once
    run.refresh_from_db()
    assert run.status == "cancelled" and 3 not in visible(run)
    events = live.finish()
    assert client_view(events, {}) == visible(run), [(e.kind, e.id) for e in events]


def test_a_live_client_across_two_retries(user, client, settings):
    """Attempt 1: events 1-2, checkpoint, event 3, dies. Attempt 2: event 4, checkpoint,
    event 5, dies. Attempt 3: event 6, completes. A live client ends with the visible events."""
    settings.TASKS = QUEUE
    run = running_elsewhere(AgentSession.objects.create(owner=user, session_key="k"))
    fence = Fence.of(run)
    rec = EventRecorder(run)
    rec.record("tool_called", {"call_id": "c1"})
    rec.record("tool_output", {"call_id": "c1"})
    assert lifecycle.save_checkpoint(fence, state="{}", schema_version="1", turn=2)
    rec.record("tool_called", {"call_id": "c2"})
    assert lifecycle.stream_text(fence, "dead one", new_message=True)
    client.force_login(user)
    live = LiveClient(client, run)
    wait_for(lambda: live.has(lambda e: e.kind == "delta"), "text of attempt 1")
    for attempt, (kinds) in ((2, ("tool_called", "tool_output")), (3, ("message_output",))):
        worker_died(AgentRun.objects.get(pk=run.pk))
        assert lifecycle.requeue(AgentRun.objects.get(pk=run.pk), stale_only=True)
        claimed = lifecycle.claim(run.pk)
        assert claimed.attempt == attempt
        fence = Fence.of(claimed)
        rec = EventRecorder(claimed)
        rec.record(kinds[0], {"call_id": f"x{attempt}"})
        if attempt == 2:
            assert lifecycle.save_checkpoint(fence, state="{}", schema_version="1", turn=3)
            assert lifecycle.stream_text(fence, "dead two", new_message=True)
            wait_for(
                lambda: live.has(lambda e: e.kind == "delta" and e.id.endswith(":3")),
                "text of attempt 2",
            )
            rec.record(kinds[1], {"call_id": "x2"})
            wait_for(lambda: live.has(lambda e: e.id == "5"), "event 5")
    lifecycle.finish(
        fence,
        status="completed",
        error="",
        error_detail="",
        final_output="ok",
        last_response_id="",
        usage={},
    )
    events = live.finish()
    run.refresh_from_db()
    assert client_view(events, {}) == visible(run), [(e.kind, e.id) for e in events]
