"""The live stream of a run, as server-sent events built from what is persisted.

Events, in order:

- ``event``: a run event (tool call, tool output, message, handoff...), id ``<sequence>``;
- ``delta``: text of the assistant message streaming in, id ``<sequence>:<offset>`` (the event
  it follows and how far into the message the client now is);
- ``reset``: the run was retried from its checkpoint; what was shown after that event is void;
- ``end``: the run finished (or paused for approvals); the stream closes.

Everything sent comes from the database, so a client that reconnects with ``Last-Event-ID``
(or ``?after=``) gets exactly what it missed: no gap, nothing twice. A connection lives at most
``MAX_SECONDS`` (clients reconnect) and gets a comment every ``HEARTBEAT_SECONDS`` while idle.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async

from agentic_django.events import visible_events
from agentic_django.models import AgentEvent, AgentRun
from agentic_django.notify import RunWatch
from agentic_django.serializers import event_to_dict

HEARTBEAT_SECONDS = 15.0
MAX_SECONDS = 300.0
RETRY_MILLISECONDS = 1000
BATCH = 100
_POSITION = re.compile(r"^(\d{1,18})(?::(\d{1,18}))?$")
# The run's fields a stream reads (not its input, output or history).
STREAM_FIELDS = (
    "status",
    "attempt",
    "checkpoint_event_sequence",
    "stream_text",
    "stream_sequence",
    "error",
    "finished_at",
)


@dataclass
class Position:
    """How far a client is: the last event it has, and how much of the text after it."""

    sequence: int = 0
    offset: int = 0

    @classmethod
    def parse(cls, text: str) -> Position | None:
        """The position an event id (``12`` or ``12:40``) names; None if it is not one."""
        match = _POSITION.match(text)
        return cls(int(match[1]), int(match[2] or 0)) if match else None

    @property
    def id(self) -> str:
        return f"{self.sequence}:{self.offset}" if self.offset else str(self.sequence)


def message(kind: str, data: Any, position: Position | None = None) -> str:
    """One server-sent event."""
    lines = [f"event: {kind}"]
    if position is not None:
        lines.append(f"id: {position.id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False))
    return "\n".join(lines) + "\n\n"


def _snapshot(run_pk: Any, after: int) -> tuple[AgentRun, list[AgentEvent]]:
    run = AgentRun.objects.only(*STREAM_FIELDS).get(pk=run_pk)
    events = list(visible_events(run).filter(sequence__gt=after).order_by("sequence")[:BATCH])
    return run, events


def _void(run_pk: Any, position: Position) -> bool:
    """Whether a reconnecting client's last event belongs to an attempt that died since."""
    if position.sequence == 0:
        return False
    run = AgentRun.objects.only(*STREAM_FIELDS).get(pk=run_pk)
    if position.sequence <= run.checkpoint_event_sequence:
        return False
    return not visible_events(run).filter(sequence=position.sequence).exists()


async def run_events(run_pk: Any, position: Position) -> AsyncIterator[str]:
    """The run's stream from ``position`` on, until it ends or ``MAX_SECONDS`` passed."""
    async with RunWatch(run_pk) as watch:
        async for item in _run_events(run_pk, position, watch):
            yield item


async def _run_events(run_pk: Any, position: Position, watch: RunWatch) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MILLISECONDS}\n\n"
    deadline = time.monotonic() + MAX_SECONDS
    attempt: int | None = None
    if await sync_to_async(_void)(run_pk, position):
        run = await sync_to_async(AgentRun.objects.only(*STREAM_FIELDS).get)(pk=run_pk)
        position = Position(run.checkpoint_event_sequence)
        yield message("reset", {"attempt": run.attempt}, position)
    idle_since = time.monotonic()
    while True:
        mark = watch.mark()  # before the look: a change during it ends the wait below at once
        run, events = await sync_to_async(_snapshot)(run_pk, position.sequence)
        retried = attempt is not None and run.attempt != attempt
        attempt = run.attempt
        if retried and position.sequence > run.checkpoint_event_sequence:
            # What this client saw after the checkpoint came from the attempt that died.
            position = Position(run.checkpoint_event_sequence)
            yield message("reset", {"attempt": run.attempt}, position)
            continue
        sent = False
        for event in events:
            position = Position(event.sequence)
            yield message("event", event_to_dict(event), position)
            sent = True
        text = run.stream_text
        if run.stream_sequence == position.sequence and len(text) > position.offset:
            chunk, position = text[position.offset :], Position(position.sequence, len(text))
            yield message("delta", {"text": chunk}, position)
            sent = True
        if len(events) == BATCH:
            continue
        if run.is_terminal or run.status == AgentRun.Status.AWAITING_APPROVAL:
            yield message("end", {"status": run.status, "error": run.error or None})
            return
        now = time.monotonic()
        if now > deadline:
            return
        if sent:
            idle_since = now
        elif now - idle_since >= HEARTBEAT_SECONDS:
            yield ": keep-alive\n\n"
            idle_since = now
        await watch.wait(mark, min(HEARTBEAT_SECONDS, deadline - now))
