"""The live stream of a run, as server-sent events built from what is persisted.

Events, in order:

- ``event``: a run event (tool call, tool output, message, handoff...), id ``<sequence>``;
- ``delta``: text of the assistant message streaming in, id ``<sequence>:<offset>:<epoch>``
  (the event it follows -- or, for a run that records no events, the message's number --, how
  far into the message the client now is, and the run's epoch as it streamed: ``attempt +
  rollbacks``, which changes whenever an attempt starts or a dead one's work is rolled back);
  ``start`` is true on the first text of a message;
- ``reset``: the run was retried from its checkpoint; what was shown after that event is void
  (events and text of the attempt that died);
- ``end``: the run finished (or paused for approvals); the stream closes. Its id is the
  position it ended at, marked ``<sequence>:<offset>:<epoch>:end``.

Everything sent comes from the database, so a client that reconnects with ``Last-Event-ID``
(or ``?after=``) gets exactly what it missed: no gap, nothing twice. After an ``end`` that is
nothing, until the run goes on: a finished run's stream answers 204 (an ``EventSource`` stops
reconnecting), a paused one's waits for the run to go on. A connection lives at most
``MAX_SECONDS`` (clients reconnect) and gets a comment every ``HEARTBEAT_SECONDS`` while idle.

No stream holds a database connection: it gives back the one its request used before it starts,
and reads on one of ``READ_THREADS`` shared threads, which give theirs back after each read (to
the pool, on PostgreSQL). Streams of one run at one position share a read (``RunWatch.shared``),
so a change of a run followed by a thousand clients costs one read, not a thousand.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection

from agentic_django.events import visible_events
from agentic_django.models import AgentEvent, AgentRun
from agentic_django.notify import RunWatch
from agentic_django.serializers import event_to_dict

HEARTBEAT_SECONDS = 15.0
MAX_SECONDS = 300.0
RETRY_MILLISECONDS = 1000
BATCH = 100
# Threads (so at most as many connections) that read for every stream of a process.
READ_THREADS = 3
_POSITION = re.compile(r"^(\d{1,18})(?::(\d{1,18}):(\d{1,18})(:end)?)?$")
# The run's fields a stream reads (not its input, output or history).
STREAM_FIELDS = (
    "status",
    "attempt",
    "rollbacks",
    "stream_text",
    "stream_sequence",
    "error",
    "finished_at",
)
# A look at the run: the run, its visible events after the client's position, and the event to
# start over from (if the client must).
type Snapshot = tuple[AgentRun, list[AgentEvent], int | None]


@dataclass
class Position:
    """How far a client is: the last event it has, how much of the text after it, the run's
    epoch as of which that was checked (None: unknown, a reconnect with an event id), and
    whether it got the ``end`` there."""

    sequence: int = 0
    offset: int = 0
    epoch: int | None = None
    ended: bool = False

    @classmethod
    def parse(cls, text: str) -> Position | None:
        """The position an event id (``12``, ``12:40:2`` or ``12:40:2:end``) names; None if it
        is not one."""
        match = _POSITION.match(text)
        if not match:
            return None
        if match[2] is None:
            return cls(int(match[1]))
        return cls(int(match[1]), int(match[2]), int(match[3]), ended=match[4] is not None)

    @property
    def id(self) -> str:
        if self.ended:
            return f"{self.sequence}:{self.offset}:{self.epoch}:end"
        if self.offset:
            return f"{self.sequence}:{self.offset}:{self.epoch}"
        return str(self.sequence)


def epoch(run: AgentRun) -> int:
    """Changes whenever an attempt starts or what a dead one wrote is rolled back."""
    return run.attempt + run.rollbacks


def message(kind: str, data: Any, position: Position | None = None) -> str:
    """One server-sent event."""
    lines = [f"event: {kind}"]
    if position is not None:
        lines.append(f"id: {position.id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False))
    return "\n".join(lines) + "\n\n"


def _snapshot(run_pk: Any, position: Position) -> Snapshot:
    """The run, the visible events after ``position`` and, if part of what the client has
    came from an attempt that died (or the text it has from another attempt), the event to
    start over from."""
    run = AgentRun.objects.only(*STREAM_FIELDS).get(pk=run_pk)
    restart = _restart_from(run, position)
    if restart is not None:
        return run, [], restart
    after = position.sequence
    events = list(visible_events(run).filter(sequence__gt=after).order_by("sequence")[:BATCH])
    return run, events, None


def _restart_from(run: AgentRun, position: Position) -> int | None:
    """None while everything the client has is still valid; else the last event it has that
    is (0: none), from which it must start over.

    What a client has was checked as of the epoch in its position; in another epoch, events
    it has may since have been superseded (an attempt died; conservatively, any superseded
    event up to its position, when the position does not say its epoch), and text it has was
    streamed in another epoch: it is void (the message became an event, or died with its
    attempt).
    """
    if position.epoch == epoch(run) or (position.sequence == 0 and not position.offset):
        return None
    dead = run.events.filter(superseded=True, sequence__lte=position.sequence)
    first_dead = dead.order_by("sequence").values_list("sequence", flat=True).first()
    if first_dead is None:
        return position.sequence if position.offset else None
    before = visible_events(run).filter(sequence__lt=first_dead).order_by("-sequence")
    return before.values_list("sequence", flat=True).first() or 0


@cache
def _readers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(READ_THREADS, thread_name_prefix="agentic-stream-read")


# A forked child has none of its parent's threads: it starts its own readers.
os.register_at_fork(after_in_child=_readers.cache_clear)


def _borrowed_snapshot(run_pk: Any, position: Position) -> Snapshot:
    """``_snapshot`` on a reader thread, which then gives its connection back as a request
    does when it ends (with ``CONN_MAX_AGE = 0``, and always with a pool, at once)."""
    try:
        return _snapshot(run_pk, position)
    finally:
        close_old_connections()


def _seen_to_the_end(run_pk: Any, position: Position) -> bool:
    """Whether the run is finished and a client at ``position`` has all of it: nothing came
    after (or replaced) what it had."""
    run, events, restart = _snapshot(run_pk, position)
    text_after = run.stream_sequence > position.sequence or (
        run.stream_sequence == position.sequence and len(run.stream_text) > position.offset
    )
    return run.is_terminal and restart is None and not events and not text_after


async def seen_to_the_end(run_pk: Any, position: Position) -> bool:
    """Whether a client that reconnects from ``position`` got the end of the finished run
    there, and nothing came since: its stream has nothing to send, ever."""
    return position.ended and await sync_to_async(_seen_to_the_end)(run_pk, position)


def _release_connection() -> bool:
    """Give back the connection of the stream's request (it looked up the user and the run)
    rather than hold it for the stream's whole life; True. Inside a transaction -- a test's --
    keep it and say so: that stream must read in the transaction, on this thread, alone, to
    see what the transaction wrote."""
    if connection.in_atomic_block:
        return False
    connection.close()
    return True


async def _look(
    watch: RunWatch, mark: Any, run_pk: Any, position: Position, *, shared: bool
) -> Snapshot:
    """``_snapshot`` -- read on a reader thread, shared with the streams of the run at the
    same position -- or, for a stream opened inside a transaction, read on its own."""
    if not shared:
        return await sync_to_async(_snapshot)(run_pk, position)
    at = replace(position)  # the stream moves its own position on while the read may wait
    loop = asyncio.get_running_loop()
    return await watch.shared(
        mark,
        (at.sequence, at.offset, at.epoch),
        lambda: loop.run_in_executor(_readers(), _borrowed_snapshot, run_pk, at),
    )


async def run_events(run_pk: Any, position: Position) -> AsyncIterator[str]:
    """The run's stream from ``position`` on, until it ends or ``MAX_SECONDS`` passed."""
    shared = await sync_to_async(_release_connection)()
    async with RunWatch(run_pk) as watch:
        async for item in _run_events(run_pk, position, watch, shared=shared):
            yield item


async def _run_events(
    run_pk: Any, position: Position, watch: RunWatch, *, shared: bool
) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MILLISECONDS}\n\n"
    deadline = time.monotonic() + MAX_SECONDS
    idle_since = time.monotonic()
    while True:
        mark = watch.mark()  # before the look: a change during it ends the wait below at once
        run, events, restart = await _look(watch, mark, run_pk, position, shared=shared)
        if restart is not None:
            # What this client has after that event came from an attempt that died, or is
            # text of another attempt.
            position = Position(restart, epoch=epoch(run))
            yield message("reset", {"attempt": run.attempt}, position)
            continue
        sent = False
        for event in events:
            position = Position(event.sequence, epoch=epoch(run))
            yield message("event", event_to_dict(event), position)
            sent = True
        if len(events) == BATCH:
            continue
        if not position.offset:
            position.epoch = epoch(run)  # checked against this snapshot: nothing superseded
        if run.stream_sequence > position.sequence:
            # Every visible event up to the one the message follows was sent (those a dead
            # attempt wrote are not shown); without events, the message number moved on.
            position = Position(run.stream_sequence, epoch=epoch(run))
        text = run.stream_text
        if run.stream_sequence == position.sequence and len(text) > position.offset:
            chunk, start = text[position.offset :], position.offset == 0
            position = Position(position.sequence, len(text), epoch(run))
            yield message("delta", {"text": chunk, "start": start}, position)
            sent = True
        if run.is_terminal or run.is_paused:
            if not position.ended:
                position = replace(position, ended=True)
                yield message("end", {"status": run.status, "error": run.error or None}, position)
                return
            if run.is_terminal:
                return  # the client got it all, the end included, from an earlier connection
            # Paused where the client got its end: nothing new until the run goes on.
        now = time.monotonic()
        if now > deadline:
            return
        if sent:
            idle_since = now
        elif now - idle_since >= HEARTBEAT_SECONDS:
            yield ": keep-alive\n\n"
            idle_since = now
        await watch.wait(mark, min(HEARTBEAT_SECONDS, deadline - now))
