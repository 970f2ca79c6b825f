"""The streams of one event loop share their waiting and their reads: a change of a run wakes
the streams of that run, and only those, and costs them about one read however many they are."""

from __future__ import annotations

import json

import pytest
from django.db import connection

from agentic_django import notify, streams
from agentic_django.models import AgentRun
from agentic_django.notify import RunWatch
from agentic_django.streams import Position, run_events
from tests.providers.test_streaming import Event, parse
from tests.waiting import PATIENCE, wait_for
from tests.web.live import ClientLoop

pytestmark = pytest.mark.django_db(transaction=True)

STREAMS = 20
NEVER = PATIENCE * 3  # a wait only a wake-up can end within the test's patience


class Follower:
    """A client of the run's stream, served in the client loop: what it got so far."""

    def __init__(self, run: AgentRun) -> None:
        self.run_pk = run.pk
        self.body = ""

    @property
    def events(self) -> list[Event]:
        return parse(self.body)

    def got(self, kind: str) -> list[Event]:
        return [event for event in self.events if event.kind == kind]

    async def follow(self) -> None:
        async for item in run_events(self.run_pk, Position()):
            self.body += item


@pytest.fixture
def reads(monkeypatch) -> list[object]:
    """The reads streams make (one entry each)."""
    made: list[object] = []
    snapshot = streams._snapshot

    def counted(run_pk, position):
        made.append(run_pk)
        return snapshot(run_pk, position)

    monkeypatch.setattr(streams, "_snapshot", counted)
    return made


def follow_a_delta_and_the_end(run: AgentRun, streams: int) -> None:
    """``streams`` clients follow the run while another process writes a delta, then finishes
    the run: each gets the delta, then the end."""
    followers = [Follower(run) for _ in range(streams)]
    with ClientLoop() as clients:
        following = [clients.start(follower.follow()) for follower in followers]
        wait_for(lambda: all(f.body for f in followers), "every stream to begin")

        AgentRun.objects.filter(pk=run.pk).update(stream_text="Hello")
        wait_for(lambda: all(f.got("delta") for f in followers), "the delta on every stream")
        AgentRun.objects.filter(pk=run.pk).update(status=AgentRun.Status.COMPLETED)
        for done in following:
            done.result(PATIENCE)  # each stream ended by itself

    for follower in followers:
        assert [event.kind for event in follower.events] == ["delta", "end"]
        assert json.loads(follower.got("delta")[0].data) == {"text": "Hello", "start": True}


def test_a_change_reaches_every_stream_of_the_run_for_about_one_read(user, make_run, reads):
    follow_a_delta_and_the_end(make_run(user, status="running"), STREAMS)
    if connection.vendor == "postgresql":
        # A read at the start and one after each change (and, should the first change come
        # while some streams still look, one more of each): never one per stream.
        assert len(reads) <= 6, len(reads)


@pytest.mark.postgres
def test_a_notification_ends_the_waits_on_its_run_only(user, make_run):
    if connection.vendor != "postgresql":
        pytest.skip("needs DATABASE_URL pointing at PostgreSQL")
    changed, other = make_run(user, status="running"), make_run(user, status="running")

    async def watch(run: AgentRun) -> tuple[RunWatch, object]:
        entered = await RunWatch(run.pk).__aenter__()
        return entered, entered.mark()

    with ClientLoop() as clients:
        (changed_watch, changed_mark), (other_watch, other_mark) = [
            clients.run(watch(run)) for run in (changed, other)
        ]
        woken = clients.start(changed_watch.wait(changed_mark, NEVER))
        waiting = clients.start(other_watch.wait(other_mark, NEVER))

        AgentRun.objects.filter(pk=changed.pk).update(stream_text="Hello")
        wait_for(woken.done, "the stream of the changed run to wake")
        # The other run's notification count did not move: its streams were not woken.
        assert not waiting.done() and other_watch.mark() == other_mark

        AgentRun.objects.filter(pk=other.pk).update(stream_text="Hi")
        wait_for(waiting.done, "the stream of the other run to wake")


@pytest.mark.postgres
def test_without_listen_streams_look_every_second(user, make_run, monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("needs DATABASE_URL pointing at PostgreSQL")
    # Nothing listens on port 1: LISTEN fails at once, and the streams poll instead.
    monkeypatch.setattr(notify, "_conninfo", lambda: "host=127.0.0.1 port=1 connect_timeout=5")

    follow_a_delta_and_the_end(make_run(user, status="running"), 3)
