"""The database session implements the Agents SDK Session protocol (awaited for real)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import traceback
from typing import Any

import pytest
from agents import Agent, Runner
from agents.memory import Session
from agents.testing import ScriptedModel, assistant_message
from asgiref.sync import async_to_sync
from django.db import DataError, connection, transaction

from agentic_django import lifecycle
from agentic_django.models import AgentSession, AgentSessionItem
from agentic_django.services import create_run
from agentic_django.sessions import DatabaseSession, SessionWriteRejected, session_for_run
from tests.core.conftest import running_elsewhere, worker_died
from tests.core.faults import ITEM_INSERT, database_faults, lock_waiters
from tests.waiting import PATIENCE, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def user_item(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


@pytest.fixture
def agent_session(user):
    return AgentSession.objects.create(owner=user, session_key="mem")


def test_implements_the_sdk_protocol(agent_session):
    session = DatabaseSession(agent_session)
    assert isinstance(session, Session)
    assert session.session_id == str(agent_session.pk)


def test_add_get_limit_pop_and_clear(agent_session):
    session = DatabaseSession(agent_session)

    async def scenario() -> dict[str, Any]:
        await session.add_items([user_item("one"), user_item("two")])
        await session.add_items([user_item("three")])
        return {
            "all": await session.get_items(),
            "last_two": await session.get_items(limit=2),
            "zero": await session.get_items(limit=0),
            "negative": await session.get_items(limit=-1),
            "popped": await session.pop_item(),
            "after_pop": await session.get_items(),
        }

    seen = async_to_sync(scenario)()
    assert [i["content"] for i in seen["all"]] == ["one", "two", "three"]
    assert [i["content"] for i in seen["last_two"]] == ["two", "three"]
    assert seen["zero"] == [] and seen["negative"] == []
    assert seen["popped"] == user_item("three")
    assert [i["content"] for i in seen["after_pop"]] == ["one", "two"]

    async_to_sync(session.clear_session)()
    assert async_to_sync(session.get_items)() == []
    assert async_to_sync(session.pop_item)() is None
    assert not AgentSessionItem.objects.filter(session=agent_session).exists()


def test_the_sdk_session_settings_limit_applies_unless_a_limit_is_given(agent_session):
    from agents.memory import SessionSettings

    limited = DatabaseSession(agent_session, session_settings=SessionSettings(limit=2))
    unlimited = DatabaseSession(agent_session, session_settings=SessionSettings())
    async_to_sync(limited.add_items)([user_item("one"), user_item("two"), user_item("three")])

    def contents(items: list[Any]) -> list[str]:
        return [item["content"] for item in items]

    assert contents(async_to_sync(limited.get_items)()) == ["two", "three"]
    assert contents(async_to_sync(limited.get_items)(limit=1)) == ["three"]
    assert contents(async_to_sync(unlimited.get_items)()) == ["one", "two", "three"]
    assert contents(async_to_sync(DatabaseSession(agent_session).get_items)(limit=1)) == ["three"]


def test_sequences_keep_growing_and_stay_unique(agent_session):
    session = DatabaseSession(agent_session)
    async_to_sync(session.add_items)([user_item("a"), user_item("b")])
    async_to_sync(session.pop_item)()
    async_to_sync(session.add_items)([user_item("c")])
    rows = list(agent_session.items.values_list("sequence", "payload"))
    assert [(seq, p["content"]) for seq, p in rows] == [(1, "a"), (2, "c")]


def test_works_directly_with_runner_run(agent_session):
    model = ScriptedModel(
        [[assistant_message("Nice to meet you, Ada.")], [assistant_message("Ada.")]]
    )
    agent = Agent(name="Memory", instructions="Remember names.", model=model)
    session = DatabaseSession(agent_session)

    async def chat() -> tuple[str, str]:
        first = await Runner.run(agent, "My name is Ada.", session=session)
        second = await Runner.run(agent, "What is my name?", session=session)
        return first.final_output, second.final_output

    assert async_to_sync(chat)() == ("Nice to meet you, Ada.", "Ada.")
    second_input = model.calls[1].input
    contents = [item.get("content") for item in second_input if item.get("role") == "user"]
    assert contents == ["My name is Ada.", "What is my name?"]
    assert agent_session.items.count() == 4


class EnvelopeSerializer:
    """Stores each item inside an envelope, to prove serialization is pluggable."""

    def dumps(self, item: Any) -> Any:
        return {"v": 1, "item": item}

    def loads(self, payload: Any) -> Any:
        return payload["item"]


def test_item_serialization_is_pluggable(agent_session):
    session = DatabaseSession(agent_session, serializer=EnvelopeSerializer())
    async_to_sync(session.add_items)([user_item("hi")])
    assert agent_session.items.get().payload == {"v": 1, "item": user_item("hi")}
    assert async_to_sync(session.get_items)() == [user_item("hi")]
    by_path = DatabaseSession(
        agent_session, serializer="tests.core.test_sessions.EnvelopeSerializer"
    )
    assert async_to_sync(by_path.get_items)() == [user_item("hi")]


def test_runs_use_the_configured_serializer(user, settings):
    settings.AGENTIC_DJANGO_SESSION_SERIALIZER = "tests.core.test_sessions.EnvelopeSerializer"
    run = create_run(owner=user, session_key="k", input_payload="hi")
    run.refresh_from_db()
    assert run.status == "completed"
    payloads = list(run.session.items.values_list("payload", flat=True))
    assert payloads[0] == {"v": 1, "item": user_item("hi")}
    assert all(set(p) == {"v", "item"} for p in payloads)


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_never_interleave_a_batch(agent_session):
    writers, batch = 8, 5
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def write(writer: int) -> None:
        try:
            session = DatabaseSession(agent_session.pk)
            barrier.wait()
            session.add_items_sync([user_item(f"{writer}-{n}") for n in range(batch)])
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    rows = list(agent_session.items.order_by("sequence").values_list("sequence", "payload"))
    assert [seq for seq, _ in rows] == list(range(1, writers * batch + 1))
    contents = [payload["content"] for _, payload in rows]
    for start in range(0, len(contents), batch):
        chunk = contents[start : start + batch]
        writer = chunk[0].split("-")[0]
        assert chunk == [f"{writer}-{n}" for n in range(batch)]


@pytest.mark.django_db(transaction=True)
def test_a_write_that_numbered_its_items_like_a_concurrent_one_goes_after_it(agent_session):
    """On PostgreSQL a write is one statement, numbering its items after the last one it sees.
    Another writer's items, not yet committed as it starts, took the same numbers: it waits
    for them, then writes its own after them instead of failing."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: SQLite runs one writer at a time")
    holding, release = threading.Event(), threading.Event()

    def first_writer() -> None:
        try:
            with transaction.atomic():
                DatabaseSession(agent_session.pk).add_items_sync([user_item("first")])
                holding.set()
                release.wait(PATIENCE)
        finally:
            connection.close()

    def release_once_the_second_waits() -> None:
        try:
            wait_for(lambda: lock_waiters() > 0, "the second write to wait for the first")
        finally:
            release.set()
            connection.close()

    first = threading.Thread(target=first_writer)
    first.start()
    assert holding.wait(PATIENCE)
    releaser = threading.Thread(target=release_once_the_second_waits)
    releaser.start()
    DatabaseSession(agent_session.pk).add_items_sync([user_item("second")])
    first.join(PATIENCE)
    releaser.join(PATIENCE)
    rows = agent_session.items.order_by("sequence").values_list("sequence", "payload")
    assert [(sequence, payload["content"]) for sequence, payload in rows] == [
        (1, "first"),
        (2, "second"),
    ]


# An item whose content starts with "held" waits, inside its INSERT, for the advisory lock the
# test holds: the statement has read the session's last number but written nothing yet.
HELD_LOCK = 7_420_019
HOLD_INSERTS = f"""
CREATE FUNCTION test_held_item() RETURNS trigger AS $$
BEGIN
  IF NEW.payload->>'content' LIKE 'held%' THEN
    PERFORM pg_advisory_lock({HELD_LOCK}); PERFORM pg_advisory_unlock({HELD_LOCK});
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER test_held_item BEFORE INSERT ON agentic_django_agentsessionitem
  FOR EACH ROW EXECUTE FUNCTION test_held_item();
"""
LET_INSERTS_GO = """
DROP TRIGGER IF EXISTS test_held_item ON agentic_django_agentsessionitem;
DROP FUNCTION IF EXISTS test_held_item();
"""


@pytest.mark.django_db(transaction=True)
def test_a_locked_write_goes_after_a_one_statement_write_that_took_its_numbers(agent_session):
    """A write under the session's lock (inside a transaction) has read the last number when a
    one-statement write, which takes no lock, commits the same numbers: it tries again after
    them instead of failing."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: SQLite runs one writer at a time")
    with connection.cursor() as cursor:
        cursor.execute(HOLD_INSERTS)
        cursor.execute("SELECT pg_advisory_lock(%s)", [HELD_LOCK])
    errors: list[BaseException] = []

    def write(content: str, *more: str, locked: bool = False) -> None:
        items = [user_item(text) for text in (content, *more)]
        try:
            with transaction.atomic() if locked else contextlib.nullcontext():
                DatabaseSession(agent_session.pk).add_items_sync(items)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    writers = [
        threading.Thread(target=write, args=("held-1", "held-2"), kwargs={"locked": True}),
        threading.Thread(target=write, args=("fast",)),
    ]
    try:
        writers[0].start()
        wait_for(lambda: lock_waiters() > 0, "the locked write to be inside its INSERT")
        writers[1].start()
        # Its item commits; then it waits to touch the session, until the locked write is done.
        wait_for(lambda: agent_session.items.exists(), "the one-statement write's item")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [HELD_LOCK])
        for writer in writers:
            writer.join(PATIENCE)
        with connection.cursor() as cursor:
            cursor.execute(LET_INSERTS_GO)
    assert errors == []
    rows = agent_session.items.order_by("sequence").values_list("sequence", "payload")
    assert [(sequence, payload["content"]) for sequence, payload in rows] == [
        (1, "fast"),
        (2, "held-1"),
        (3, "held-2"),
    ]


def test_a_cancelled_caller_returns_only_once_its_write_is_done(agent_session):
    """Like the SDK's own sessions: cancelling the awaiting task never leaves a write behind."""
    session = DatabaseSession(agent_session)
    write_started, caller_returned = threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def stored() -> int:
        try:
            return AgentSessionItem.objects.filter(session=agent_session).count()
        finally:
            connection.close()

    async def scenario() -> None:
        task = asyncio.ensure_future(session.add_items([user_item("kept")]))
        assert await asyncio.to_thread(write_started.wait, 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        seen["when_cancelled"] = await asyncio.to_thread(stored)
        caller_returned.set()

    with database_faults() as faults:
        # The INSERT is slow: it waits until the caller has returned (at most 2 s).
        faults.before(ITEM_INSERT, lambda: (write_started.set(), caller_returned.wait(2)))
        async_to_sync(scenario)()
    assert seen["when_cancelled"] == 1


def _logged(record: logging.LogRecord) -> str:
    """A log record's message and the exception it carries, as the log shows them."""
    text = record.getMessage()
    if record.exc_info:
        text += "".join(traceback.format_exception(*record.exc_info))
    return text


def test_a_cancelled_caller_whose_write_fails_leaves_no_error_unread(agent_session, caplog):
    """The caller gets its cancellation; the write's own error is read (asyncio would log
    "Task exception was never retrieved" for it, at some later time, in whatever code)."""
    session = DatabaseSession(agent_session)
    write_started, cancelled = threading.Event(), threading.Event()
    gc.collect()  # what earlier tests left behind says its piece now, not below

    def refused() -> None:
        write_started.set()
        cancelled.wait(60)
        raise DataError("the database refused the write")

    async def scenario() -> None:
        task = asyncio.ensure_future(session.add_items([user_item("refused")]))
        assert await asyncio.to_thread(write_started.wait, 60)
        task.cancel()
        cancelled.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    with database_faults() as faults:
        faults.before(ITEM_INSERT, refused)
        async_to_sync(scenario)()
    gc.collect()
    unread = [r for r in caplog.records if "the database refused the write" in _logged(r)]
    assert unread == []


def test_a_handle_whose_run_was_taken_over_can_neither_add_pop_nor_clear(user, agent_session):
    run = running_elsewhere(agent_session)
    stale = session_for_run(run)
    stale.add_items_sync([user_item("from attempt 1")])
    # The worker died; recovery requeues the run and another worker claims it (attempt 2).
    worker_died(run)
    assert lifecycle.requeue(run, stale_only=True)
    current = lifecycle.claim(run.pk)
    assert current is not None and current.attempt == 2
    session_for_run(current).add_items_sync([user_item("from attempt 2")])

    for write in (
        lambda: stale.add_items_sync([user_item("late")]),
        stale.pop_item_sync,
        stale.clear_session_sync,
    ):
        with pytest.raises(SessionWriteRejected):
            write()
    contents = [p["content"] for p in agent_session.items.values_list("payload", flat=True)]
    assert contents == ["from attempt 2"]
