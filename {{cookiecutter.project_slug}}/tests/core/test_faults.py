"""The run lifecycle on its error paths: one fault at a time, injected at a boundary.

Faults come from the database (statements failing or pausing, see ``tests.core.faults``),
the broker (a backend that is down, or a queue nobody works yet), the model (scripted steps
that fail or wait), the clock (a process whose clock runs ahead) and the process itself (a
receiver that kills it right after a run finished). The engine is never patched.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from agents import function_tool
from agents.testing import ModelStep, ScriptedModel, assistant_message
from asgiref.sync import sync_to_async
from django.db import DataError, OperationalError, connection
from django.db.models import Count
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from pydantic import BaseModel

from agentic_django import lifecycle, recovery, signals
from agentic_django.execution import UNSTORABLE_OUTPUT, execute, timeout_message
from agentic_django.failures import STORE_FAILED
from agentic_django.lifecycle import LEASE_EXPIRED_ERROR
from agentic_django.models import AgentEvent, AgentRun, AgentSession, AgentSessionItem
from agentic_django.services import cancel_run, create_run, enqueue_agent_run
from agentic_django.sessions import SessionWriteRejected, session_for_run
from agentic_django.toolcalls import repeatable
from agentic_django.workers import Slots
from tests.core import registry
from tests.core.conftest import call, running_elsewhere, text, worker_died
from tests.core.faults import (
    FINISH,
    ITEM_DELETE,
    ITEM_INSERT,
    RENEW,
    STATUS_CHANGE,
    database_faults,
    queued_results,
    queued_run_ids,
)
from tests.core.registry import DEMO_REPLY
from tests.waiting import PATIENCE, in_thread, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
BROKER_DOWN = {"default": {"BACKEND": "tests.core.faults.UnavailableBackend"}}
IMMEDIATE = {"default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}}


async def async_wait_for(condition: Callable[[], object], timeout: float = PATIENCE) -> bool:
    """In a model step: wait (polling the database) until ``condition`` holds; False if never."""
    deadline = time.monotonic() + timeout
    while not await sync_to_async(condition)():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def pending(session: AgentSession, agent_key: str, text_input: str = "hi", **fields) -> AgentRun:
    return AgentRun.objects.create(
        session=session,
        owner=session.owner,
        agent_key=agent_key,
        input_payload=text_input,
        **fields,
    )


def register(key: str, steps: list[Any], tools: list[Any] = (), **options: Any) -> ScriptedModel:
    """Register an agent whose runs all share one scripted model."""
    from agents import Agent

    model = ScriptedModel(list(steps))
    registry.FACTORIES[key] = lambda: Agent(
        name=key, instructions="Test.", model=model, tools=list(tools), **options
    )
    return model


# --- 1. Lease renewal -------------------------------------------------------------------------


@pytest.mark.parametrize("failing", [1, 2], ids=["first-renewal", "a-later-renewal"])
def test_a_transient_error_while_renewing_the_lease_is_retried(user, settings, failing):
    settings.AGENTIC_DJANGO_LEASE_SECONDS = 5  # renewals every 5/3 s
    renewals: list[int] = []

    def renewal() -> None:
        renewals.append(len(renewals) + 1)
        if len(renewals) == failing:  # as a dropped connection would make it
            raise OperationalError("server closed the connection")

    async def slow(model_call: Any) -> Any:
        # Work until two more renewals were sent after the failed one: the keeper sends one
        # only once the one before it went through.
        assert await async_wait_for(lambda: len(renewals) >= failing + 2)
        return [assistant_message("done despite the hiccup")]

    model = register("slow", [ModelStep.respond(slow)])
    with database_faults() as faults:
        faults.before(RENEW, renewal, times=float("inf"))
        run = create_run(owner=user, session_key="k", input_payload="go", agent_key="slow")

    run.refresh_from_db()
    assert (run.status, run.error, run.final_output) == ("completed", "", "done despite the hiccup")
    assert run.attempt == 1
    assert len(model.calls) == 1


def test_a_live_run_whose_event_loop_is_blocked_keeps_its_lease(user, settings):
    """A model call that holds the event loop (CPU-bound, or a blocking call) longer than a
    whole lease: the lease keeper renews from its own thread, so recovery leaves it alone."""
    settings.AGENTIC_DJANGO_LEASE_SECONDS = 5
    release = threading.Event()
    recovered: list[int] = []

    async def hogs_the_loop(model_call: Any) -> Any:
        release.wait(PATIENCE)  # blocks the event loop, as a busy or blocking call would
        return [assistant_message("still mine")]

    register("hog", [ModelStep.respond(hogs_the_loop)])
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = pending(session, "hog")
    worker = in_thread(lambda: enqueue_agent_run(str(run.pk)))
    wait_for(lambda: AgentRun.objects.get(pk=run.pk).status == "running", "the claim")
    started = AgentRun.objects.get(pk=run.pk).lease_expires_at
    # Wait past the first lease, then let recovery look: the run is alive.
    wait_for(
        lambda: AgentRun.objects.get(pk=run.pk).heartbeat_at > started,
        "the lease to be renewed past its first expiry",
    )
    recovered.append(recovery.recover_runs(mode="requeue"))
    release.set()
    worker.join(PATIENCE)
    run.refresh_from_db()
    assert recovered == [0]
    assert (run.status, run.attempt, run.final_output) == ("completed", 1, "still mine")


def test_a_database_outage_during_a_run_leaves_it_to_a_retry_not_failed(user, settings):
    """The database goes away as a run writes its history (a restart, a failover, a full
    pool): the attempt stops without failing the run and ends its lease, so the next sweep
    retries it at once; the retry completes it, its history written once."""
    settings.TASKS = QUEUE
    model = register("ok", [text("answered")])
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = pending(session, "ok")
    enqueue_agent_run(str(run.pk))
    with database_faults() as faults:  # as it stores the user's message
        rule = faults.fail(ITEM_INSERT, OperationalError("terminating connection"), times=1)
        assert execute(str(run.pk), task_id="t1") == "running"
    assert rule.fired == 1
    run.refresh_from_db()
    assert (run.status, run.attempt, run.error) == ("running", 1, "")
    assert lifecycle.stale_runs().filter(pk=run.pk).exists()  # no waiting for its lease
    settings.TASKS = IMMEDIATE
    assert recovery.recover_runs(mode="requeue") == 1
    run.refresh_from_db()
    assert (run.status, run.attempt, run.final_output) == ("completed", 2, "answered")
    assert len(model.calls) == 1
    roles = list(AgentSessionItem.objects.values_list("payload__role", flat=True))
    assert roles == ["user", "assistant"]


def test_a_cancellation_poll_the_database_refuses_is_tried_again(user, settings):
    """The watcher's look for a cancellation fails on a transient database error: the run
    goes on, and a cancellation requested after it still stops the run."""
    settings.TASKS = QUEUE
    poll = r'^SELECT "agentic_django_agentrun"."cancel_requested_at"'

    async def until_cancelled(model_call: Any) -> Any:
        await asyncio.sleep(PATIENCE)  # cancelled by the watcher
        return [assistant_message("not cancelled")]

    register("slow", [ModelStep.respond(until_cancelled)])
    run = pending(AgentSession.objects.create(owner=user, session_key="k"), "slow")
    enqueue_agent_run(str(run.pk))
    with database_faults() as faults:
        rule = faults.fail(poll, OperationalError("server closed the connection"), times=1)
        worker = in_thread(lambda: execute(str(run.pk), task_id="t1"))
        wait_for(lambda: rule.fired == 1, "the failed poll")
        cancel_run(AgentRun.objects.get(pk=run.pk))
        worker.join(PATIENCE)
    run.refresh_from_db()
    assert (run.status, run.attempt) == ("cancelled", 1)


def test_an_attempt_that_cannot_renew_its_lease_stops_and_the_run_is_retried_once(user, settings):
    settings.AGENTIC_DJANGO_LEASE_SECONDS = 5
    settings.TASKS = QUEUE

    async def never_answers(model_call: Any) -> Any:
        await asyncio.sleep(PATIENCE)  # cancelled when the attempt gives up its run
        return [assistant_message("finished blind")]

    model = register("stuck", [ModelStep.respond(never_answers), text("second attempt")])
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = pending(session, "stuck")
    enqueue_agent_run(str(run.pk))
    with database_faults() as faults:
        faults.fail(RENEW, OperationalError("could not connect to server"), times=float("inf"))
        assert execute(str(run.pk), task_id="t1") == "running"
    # The attempt stopped on its own once its lease ran out; nothing it had is written.
    run.refresh_from_db()
    assert (run.status, run.attempt, run.final_output) == ("running", 1, None)

    wait_for(lambda: lifecycle.stale_runs().filter(pk=run.pk).exists(), "the lease to expire")
    settings.TASKS = IMMEDIATE
    assert recovery.recover_runs(mode="requeue") == 1
    run.refresh_from_db()
    assert (run.status, run.attempt, run.final_output) == ("completed", 2, "second attempt")
    assert len(model.calls) == 2


# --- 2. The terminal write ----------------------------------------------------------------------


class Note(BaseModel):
    text: str


def test_output_the_database_cannot_store_fails_the_run_and_the_session_moves_on(user):
    register("nul", [ModelStep.respond(lambda call: [assistant_message('{"text": "a\\u0000b"}')])],
             output_type=Note)  # fmt: skip
    register("next", [text("next answered")])
    first = create_run(owner=user, session_key="k", input_payload="one", agent_key="nul")
    second = create_run(owner=user, session_key="k", input_payload="two", agent_key="next")

    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, first.error, first.final_output) == ("failed", UNSTORABLE_OUTPUT, None)
    assert first.finished_at is not None and first.lease_expires_at is None
    assert (second.status, second.final_output) == ("completed", "next answered")


def test_a_transient_error_on_the_terminal_write_is_retried(user):
    register("ok", [text("stored on the second try")])
    with database_faults() as faults:
        rule = faults.fail(FINISH, OperationalError("server closed the connection unexpectedly"))
        run = create_run(owner=user, session_key="k", input_payload="hi", agent_key="ok")
    assert rule.fired == 1
    run.refresh_from_db()
    assert (run.status, run.final_output) == ("completed", "stored on the second try")


def test_a_terminal_write_the_database_rejects_ends_the_run_failed(user):
    register("ok", [text("rejected")])
    register("next", [text("next answered")])
    with database_faults() as faults:
        faults.fail(FINISH, DataError("value out of range"))
        run = create_run(owner=user, session_key="k", input_payload="one", agent_key="ok")
    second = create_run(owner=user, session_key="k", input_payload="two", agent_key="next")
    run.refresh_from_db()
    second.refresh_from_db()
    assert (run.status, run.error) == ("failed", STORE_FAILED)
    assert "value out of range" in run.error_detail
    assert second.status == "completed"


# --- 3. Recovery racing a finishing worker (PostgreSQL: the two really interleave) -------------


@pytest.mark.postgres
def test_requeue_never_deletes_the_history_of_a_run_that_just_finished(user):
    """The run's lease expired but its worker was alive, and finishes while recovery acts."""
    register("late", [text("finished just in time")])
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = pending(session, "late", "question")
    about_to_finish, recovery_checked, finished = (threading.Event() for _ in range(3))

    def worker() -> None:
        execute(str(run.pk), task_id="t1")
        finished.set()

    with database_faults() as faults:
        # The worker pauses right before its terminal write; meanwhile its lease expires.
        def pause_worker() -> None:
            about_to_finish.set()
            assert recovery_checked.wait(PATIENCE)

        worker_thread = threading.Thread(target=lambda: (worker(), connection.close()))
        faults.before(FINISH, pause_worker, thread=worker_thread)
        worker_thread.start()
        assert about_to_finish.wait(PATIENCE)
        worker_died(run)

        # Recovery runs; before its first write the worker finishes.
        def let_the_worker_finish() -> None:
            recovery_checked.set()
            assert finished.wait(PATIENCE)

        faults.before(
            f"{STATUS_CHANGE}|{ITEM_DELETE}",
            let_the_worker_finish,
            thread=threading.current_thread(),
        )
        recovery.recover_runs(mode="requeue")
        worker_thread.join(PATIENCE)

    run.refresh_from_db()
    assert (run.status, run.attempt, run.final_output) == ("completed", 1, "finished just in time")
    history = list(session.items.values_list("payload", flat=True))
    assert [item.get("role") for item in history] == ["user", "assistant"]


@pytest.mark.postgres
def test_a_stale_attempt_cannot_slip_an_item_into_a_requeued_history(user):
    """Recovery deletes the dead attempt's items and commits; the attempt, still alive, tries
    to write in between. The session lock keeps it out until the fence has moved on."""
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = running_elsewhere(session)
    stale = session_for_run(run)
    worker_died(run)
    outcome: dict[str, object] = {}

    def stale_write() -> None:
        try:
            stale.add_items_sync([{"role": "assistant", "content": "from the dead attempt"}])
        except SessionWriteRejected as exc:
            outcome["rejected"] = exc
        finally:
            connection.close()

    def while_recovery_holds_its_transaction() -> None:
        writer = threading.Thread(target=stale_write)
        writer.start()
        writer.join(2)  # with the lock it waits for the commit; without, it would land now
        outcome["writer"] = writer

    with database_faults() as faults:
        faults.before(
            r'^UPDATE "agentic_django_agentsession" SET "updated_at"',
            while_recovery_holds_its_transaction,
            thread=threading.current_thread(),
        )
        assert recovery.recover_runs(mode="requeue") == 1
    outcome["writer"].join(PATIENCE)
    assert "rejected" in outcome
    history = list(session.items.values_list("payload", flat=True))
    assert "from the dead attempt" not in str(history)
    assert [item["role"] for item in history] == ["user", "assistant"]  # the retry's own
    assert DEMO_REPLY in str(history[1])


# --- 4. Events of an attempt that lost its run --------------------------------------------------


def test_a_lost_attempt_writes_nothing_and_clients_see_one_attempt(user, client):
    """Attempt 1 is stuck in a tool while its lease expires; attempt 2 runs and finishes; then
    attempt 1's tool returns. Nothing attempt 1 does afterwards is kept."""
    tool_started, release_tool = threading.Event(), threading.Event()

    @repeatable  # a lookup: safe to run again when its worker dies inside it
    @function_tool
    def slow_lookup() -> str:
        """A tool that takes longer than the lease."""
        tool_started.set()
        assert release_tool.wait(PATIENCE)
        return "stale result"

    model = register(
        "lookup",
        [call("slow_lookup", {}), text("answer from attempt 2"), text("answer from attempt 1")],
        tools=[slow_lookup],
    )
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = pending(session, "lookup", "look it up")
    first_attempt = in_thread(lambda: execute(str(run.pk), task_id="t1"))
    assert tool_started.wait(PATIENCE)

    worker_died(run)
    # Attempt 2 (a new task, run in-process) takes over: it has its own script step.
    model_steps_left = model.remaining_steps
    recovery.recover_runs(mode="requeue")
    run.refresh_from_db()
    assert (run.status, run.attempt, run.final_output) == ("completed", 2, "answer from attempt 2")
    assert model.remaining_steps == model_steps_left - 1

    release_tool.set()
    first_attempt.join(PATIENCE)
    assert not first_attempt.is_alive()

    run.refresh_from_db()
    assert (run.status, run.attempt, run.final_output) == ("completed", 2, "answer from attempt 2")
    assert model.remaining_steps == 1  # attempt 1 never asked the model again
    events = list(AgentEvent.objects.filter(run=run).order_by("sequence"))
    assert [(e.attempt, e.event_type) for e in events] == [
        (1, "agent_updated"),
        (1, "tool_called"),
        (2, "agent_updated"),
        (2, "message_output"),
    ]
    client.force_login(user)
    listed = client.get(reverse("agents:run-events", args=[run.pk])).json()["events"]
    assert [(e["attempt"], e["type"]) for e in listed] == [
        (2, "agent_updated"),
        (2, "message_output"),
    ]
    history = list(session.items.values_list("payload", flat=True))
    assert [item.get("role") or item.get("type") for item in history] == ["user", "assistant"]


# --- 5. Broker outage while many runs wait -----------------------------------------------------


def test_a_broker_outage_fails_only_the_run_it_refused_and_dispatch_stays_flat(user, settings):
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 1
    register("quick", [text("ok")] * 3)
    blocker = running_elsewhere(AgentSession.objects.create(owner=user, session_key="busy"))
    waiting = [
        AgentRun(
            session=AgentSession.objects.create(owner=user, session_key=f"s{n}"),
            owner=user,
            agent_key="quick",
            input_payload=f"m{n}",
        )
        for n in range(800)
    ]
    AgentRun.objects.bulk_create(waiting)

    settings.TASKS = BROKER_DOWN
    worker_died(blocker)
    assert recovery.recover_runs(mode="fail") == 1  # its dispatch finds the broker down
    fresh = create_run(owner=user, session_key="fresh", input_payload="new", agent_key="quick")

    statuses = dict(
        AgentRun.objects.exclude(pk__in=[blocker.pk, fresh.pk])
        .values_list("status")
        .annotate(n=Count("pk"))
        .order_by()
    )
    assert statuses == {"pending": 800}
    assert not AgentRun.objects.filter(status="pending").exclude(task_id="").exists()
    fresh.refresh_from_db()
    # The user who just submitted sees why; nobody else's run failed.
    assert (fresh.status, fresh.error) == (
        "failed",
        "The run could not be queued: the task queue is unavailable. Try again shortly.",
    )

    settings.TASKS = QUEUE  # the broker is back; nothing works the queue yet
    assert recovery.sweep().dispatched == 1  # one slot
    assert len(queued_run_ids()) == 1


# --- 6. A worker that dies right after a run finished -------------------------------------------


def test_runs_queued_behind_a_run_whose_worker_died_after_finishing_are_dispatched(user, settings):
    settings.TASKS = QUEUE
    register("ok", [text("first"), text("second")])
    session = AgentSession.objects.create(owner=user, session_key="k")
    first, second = pending(session, "ok", "one"), pending(session, "ok", "two")
    for run in (first, second):
        enqueue_agent_run(str(run.pk))
    assert queued_run_ids() == [str(first.pk)]  # the second waits for the first

    def process_dies(sender: Any, run: AgentRun, **kwargs: Any) -> None:
        raise SystemExit("killed right after the run finished")

    signals.agent_run_completed.connect(process_dies)
    try:
        with pytest.raises(SystemExit):
            execute(str(first.pk), task_id="t1")
    finally:
        signals.agent_run_completed.disconnect(process_dies)
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.status == "completed"
    assert (second.status, second.task_id) == ("pending", "")

    # A new process starts (web or worker): its startup sweep dispatches the waiting run.
    recovery.reset_startup_recovery()
    recovery.ensure_startup_recovery()
    assert queued_run_ids() == [str(first.pk), str(second.pk)]


# --- 7. Timeouts -------------------------------------------------------------------------------


def test_a_timeout_ends_a_run_stuck_in_a_sync_tool_at_once(user, settings):
    settings.AGENTIC_DJANGO_RUN_TIMEOUT = 1
    release = threading.Event()
    tool_returned = threading.Event()

    @function_tool
    def stuck() -> str:
        """Never returns on its own."""
        release.wait(PATIENCE)
        tool_returned.set()
        return "too late"

    register("stuck", [call("stuck", {}), text("never")], tools=[stuck])
    register("next", [text("next answered")])
    session = AgentSession.objects.create(owner=user, session_key="k")
    run, behind = pending(session, "stuck", "one"), pending(session, "next", "two")
    worker = in_thread(lambda: enqueue_agent_run(str(run.pk)))

    wait_for(lambda: AgentRun.objects.get(pk=behind.pk).is_terminal, "the run behind it")
    run.refresh_from_db()
    assert (run.status, run.error) == ("failed", timeout_message(1))
    assert AgentRun.objects.get(pk=behind.pk).final_output == "next answered"
    assert not tool_returned.is_set()  # the tool is still running, abandoned
    worker.join(PATIENCE)
    assert not worker.is_alive()

    items_before = list(AgentSessionItem.objects.values_list("pk", flat=True))
    events_before = AgentEvent.objects.count()
    release.set()
    assert tool_returned.wait(PATIENCE)
    run.refresh_from_db()
    assert run.status == "failed"
    assert list(AgentSessionItem.objects.values_list("pk", flat=True)) == items_before
    assert AgentEvent.objects.count() == events_before
    assert not lifecycle.stale_runs().exists()


def test_a_timeout_ends_a_run_whose_event_loop_is_blocked(user, settings):
    # Long enough for the run to reach its tool on a busy machine: a run that times out before
    # its loop is blocked ends by its own timeout, not the keeper's.
    settings.AGENTIC_DJANGO_RUN_TIMEOUT = 3
    release, blocking = threading.Event(), threading.Event()

    @function_tool
    async def blocks_the_loop() -> str:
        """An async tool that blocks its event loop (a bug in a tool)."""
        blocking.set()
        release.wait(PATIENCE * 3)  # past the test's own waits
        return "too late"

    register("blocking", [call("blocks_the_loop", {}), text("never")], tools=[blocks_the_loop])
    register("next", [text("next answered")])
    session = AgentSession.objects.create(owner=user, session_key="k")
    run, behind = pending(session, "blocking"), pending(session, "next", "then this")
    slots = Slots(1)  # a worker with one slot
    assert slots.acquire(0)
    slots.start(enqueue_agent_run, str(run.pk))
    try:
        wait_for(lambda: AgentRun.objects.get(pk=run.pk).is_terminal, "the lease keeper")
        assert blocking.is_set(), "the run timed out before its tool blocked the loop"
        run.refresh_from_db()
        assert (run.status, run.error) == ("failed", timeout_message(3))
        assert "event loop" in run.error_detail
        # Its slot is free, though its thread is still blocked: the worker takes more tasks.
        assert slots.acquire(PATIENCE)
        slots.release()
        # The keeper also dispatched the run waiting behind it (run here by another thread).
        wait_for(lambda: AgentRun.objects.get(pk=behind.pk).is_terminal, "the run behind")
        assert AgentRun.objects.get(pk=behind.pk).final_output == "next answered"
    finally:
        release.set()
        assert slots.wait_idle(PATIENCE)
    # The blocked thread ends at last: its slot, freed already, is not freed a second time.
    wait_for(
        lambda: not any(t.name == "agentic-django-run" for t in threading.enumerate()),
        "the blocked run's thread to end",
    )
    assert slots.busy == 0


# --- 8. Tasks per run ---------------------------------------------------------------------------


def test_waiting_runs_get_one_task_each_however_long_they_wait(user, settings):
    """One worker takes tasks one by one; every run waited longer than a lease."""
    settings.TASKS = QUEUE
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 8
    register("ok", [text("ok")] * 6)
    runs = [
        pending(AgentSession.objects.create(owner=user, session_key=f"s{n}"), "ok")
        for n in range(6)
    ]
    long_ago = timezone.now() - timedelta(minutes=10)
    AgentRun.objects.update(created_at=long_ago)
    for run in runs:
        enqueue_agent_run(str(run.pk))
    done = 0
    while done < len(queued_run_ids()):
        result = queued_results()[done]
        execute(str(result.args[0]), task_id=str(result.id))
        done += 1
    assert set(AgentRun.objects.values_list("status", flat=True)) == {"completed"}
    assert sorted(queued_run_ids()) == sorted(str(run.pk) for run in runs)


# --- Clocks, limits and sessions ----------------------------------------------------------------


def test_a_web_process_whose_clock_runs_ahead_never_recovers_a_live_run(user, monkeypatch):
    live = running_elsewhere(AgentSession.objects.create(owner=user, session_key="k"))
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(minutes=10))
    client = Client()
    client.force_login(user)
    assert client.get(reverse("agents:run-detail", args=[live.pk])).status_code == 200
    assert client.get(reverse("agents:run-fragment", args=[live.pk])).status_code == 200
    recovery.reset_startup_recovery()
    recovery.ensure_startup_recovery()
    live.refresh_from_db()
    assert (live.status, live.attempt) == ("running", 1)


def test_the_concurrency_limit_recorded_by_the_workers_holds_in_every_process(user, settings):
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 4  # this process alone would allow 4
    lifecycle.record_concurrency_limit(1)  # what the deployment's workers recorded
    register("ok", [text("ok")])
    running_elsewhere(AgentSession.objects.create(owner=user, session_key="busy"))
    run = create_run(owner=user, session_key="k", input_payload="hi", agent_key="ok")
    run.refresh_from_db()
    assert run.status == "pending"


@pytest.mark.postgres
def test_a_connection_killed_before_the_terminal_write_is_reconnected(user):
    """PostgreSQL drops the worker's connection (a restart, a proxy timeout) just before the
    run's result is written: the write is retried on a new connection."""
    register("ok", [text("written after reconnecting")])
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = pending(session, "ok")

    def kill_this_connection() -> None:
        victim = connection.connection.info.backend_pid
        with psycopg_connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (victim,))

    with database_faults() as faults:
        faults.before(FINISH, kill_this_connection)
        execute(str(run.pk), task_id="t1")
    run.refresh_from_db()
    assert (run.status, run.final_output) == ("completed", "written after reconnecting")


def psycopg_connect():
    import psycopg
    from django.db import connection as default

    settings = default.settings_dict
    return psycopg.connect(
        dbname=settings["NAME"],
        user=settings["USER"],
        password=settings["PASSWORD"],
        host=settings["HOST"],
        port=settings["PORT"],
        autocommit=True,
    )


def test_a_stale_run_failed_by_recovery_keeps_its_error(user):
    dead = running_elsewhere(AgentSession.objects.create(owner=user, session_key="k"))
    worker_died(dead)
    assert recovery.recover_runs(mode="fail") == 1
    dead.refresh_from_db()
    assert (dead.status, dead.error) == ("failed", LEASE_EXPIRED_ERROR)
