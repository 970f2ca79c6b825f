"""Double texting: what a new message does to its conversation's run in progress
(``multitask_strategy``: enqueue, reject, interrupt, rollback)."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from agents import function_tool
from django.db import close_old_connections, transaction
from django.test import Client
from django.utils import timezone

from agentic_django import signals
from agentic_django.exceptions import ConversationBusy
from agentic_django.execution import execute
from agentic_django.lifecycle import INTERRUPTED_ERROR, Fence, pause
from agentic_django.models import (
    AgentCheckpoint,
    AgentEvent,
    AgentRun,
    AgentSession,
    AgentSessionItem,
)
from agentic_django.services import create_run
from tests.core.conftest import call, echo_steps, register
from tests.core.faults import lock_waiters
from tests.waiting import PATIENCE, in_thread, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}


@pytest.fixture
def queued(settings):
    settings.TASKS = QUEUE  # runs wait until a test executes them


@pytest.fixture
def slow_tool():
    """An agent ("lookup") whose first step calls a tool that blocks until released; its
    later steps echo the latest user message."""
    started, release = threading.Event(), threading.Event()

    @function_tool
    def slow_lookup() -> str:
        """Look something up, slowly."""
        started.set()
        assert release.wait(PATIENCE)
        return "looked up"

    model = register("lookup", [call("slow_lookup", {}), *echo_steps(3)], tools=[slow_lookup])
    yield started, release, model
    release.set()


def history(run: AgentRun) -> list[str]:
    return [json.dumps(item) for item in run.session.items.values_list("payload", flat=True)]


def running_first_run(user, started) -> tuple[AgentRun, threading.Thread]:
    first = create_run(owner=user, session_key="k", input_payload="first", agent_key="lookup")
    worker = in_thread(lambda: execute(str(first.pk), task_id="t1"))
    assert started.wait(PATIENCE)
    return first, worker


def send_second(user, strategy: str) -> AgentRun:
    return create_run(
        owner=user,
        session_key="k",
        input_payload="second",
        agent_key="lookup",
        multitask_strategy=strategy,
    )


def test_interrupt_stops_the_running_run_after_its_step_and_keeps_what_it_did(
    user, queued, slow_tool
):
    started, release, _model = slow_tool
    first, worker = running_first_run(user, started)

    second = send_second(user, "interrupt")
    first.refresh_from_db()
    assert first.status == "running" and first.cancel_requested_at is not None
    assert execute(str(second.pk), task_id="t2") == "skipped"  # waits for the first to stop

    release.set()
    worker.join(PATIENCE)
    first.refresh_from_db()
    assert (first.status, first.error) == ("cancelled", INTERRUPTED_ERROR)
    assert "looked up" in str(history(first))  # its step's tool result is kept
    assert execute(str(second.pk), task_id="t3") == "completed"
    second.refresh_from_db()
    assert second.final_output == "echo: second"
    assert second.started_at >= first.finished_at
    assert '"first"' in str(history(second))  # the new run sees what the old one said


def test_rollback_cancels_the_running_run_at_once_and_nothing_it_did_is_kept(
    user, queued, slow_tool
):
    started, release, model = slow_tool
    cancelled = []

    def on_cancel(sender, run, **kwargs):
        cancelled.append(run.pk)

    first, worker = running_first_run(user, started)
    assert AgentSessionItem.objects.filter(run=first).exists()
    signals.agent_run_cancelled.connect(on_cancel)
    try:
        second = send_second(user, "rollback")
    finally:
        signals.agent_run_cancelled.disconnect(on_cancel)
    first.refresh_from_db()
    assert (first.status, first.error, first.stream_text) == ("cancelled", INTERRUPTED_ERROR, "")
    assert not AgentSessionItem.objects.filter(run=first).exists()
    assert not AgentEvent.objects.filter(run=first, superseded=False).exists()  # none shown
    assert cancelled == [first.pk]
    # The new run does not wait for the old attempt, still inside its tool.
    assert execute(str(second.pk), task_id="t2") == "completed"
    second.refresh_from_db()
    assert second.final_output == "echo: second"
    assert "first" not in str(model.calls[-1].input)

    release.set()
    worker.join(PATIENCE)
    first.refresh_from_db()
    assert first.status == "cancelled"
    assert not AgentSessionItem.objects.filter(run=first).exists()  # the old attempt wrote none
    assert not AgentEvent.objects.filter(run=first, superseded=False).exists()
    assert "looked up" not in str(history(second))


def test_interrupt_cancels_waiting_runs_at_once(user, queued):
    runs = [
        create_run(owner=user, session_key="k", input_payload=text_input)
        for text_input in ("one", "two")
    ]
    newest = create_run(
        owner=user, session_key="k", input_payload="three", multitask_strategy="interrupt"
    )
    for run in runs:
        run.refresh_from_db()
        assert (run.status, run.error) == ("cancelled", INTERRUPTED_ERROR)
    assert AgentRun.objects.get(pk=newest.pk).status == "pending"
    # enqueue (the default) leaves the newest alone and waits behind it.
    create_run(owner=user, session_key="k", input_payload="four")
    assert AgentRun.objects.filter(status="pending").count() == 2


def test_reject_answers_409_with_the_busy_run_and_creates_nothing(user, client, queued):
    first = create_run(owner=user, session_key="k", input_payload="first")
    with pytest.raises(ConversationBusy) as raised:
        create_run(owner=user, session_key="k", input_payload="again", multitask_strategy="reject")
    assert raised.value.run_id == str(first.pk)

    client.force_login(user)
    body = {"input": "again", "session_key": "k", "multitask_strategy": "reject"}
    response = client.post("/agents/runs/", body, content_type="application/json")
    assert response.status_code == 409
    error = response.json()["error"]
    assert (error["code"], error["run_id"]) == ("conversation_busy", str(first.pk))
    htmx = client.post("/agents/runs/", body, headers={"HX-Request": "true"})
    assert htmx.status_code == 409
    assert "A reply is on its way" in htmx.content.decode()
    assert "in progress" in htmx.content.decode()
    for strategy in ("later", 3):
        bad = client.post(
            "/agents/runs/",
            {**body, "multitask_strategy": strategy},
            content_type="application/json",
        )
        assert bad.status_code == 400, strategy
    assert AgentRun.objects.count() == 1
    # Another conversation is not busy.
    create_run(owner=user, session_key="other", input_payload="hi", multitask_strategy="reject")


@pytest.mark.postgres
@pytest.mark.parametrize("strategy", ["reject", "interrupt", "rollback"])
def test_fifty_posts_at_once_leave_one_run_in_progress(user, queued, settings, strategy):
    settings.AGENTIC_DJANGO_RATE_LIMIT = None
    AgentSession.objects.create(owner=user, session_key="k")
    logged_in = Client()
    logged_in.force_login(user)
    barrier = threading.Barrier(50)
    statuses: list[int] = []

    def post(n: int) -> None:
        client = Client()
        client.cookies = logged_in.cookies  # no database work before the barrier
        body = {"input": f"message {n}", "session_key": "k", "multitask_strategy": strategy}
        barrier.wait(PATIENCE)
        try:
            response = client.post("/agents/runs/", body, content_type="application/json")
            statuses.append(response.status_code)
        finally:
            close_old_connections()

    threads = [in_thread(lambda n=n: post(n)) for n in range(50)]
    for thread in threads:
        thread.join(PATIENCE)
    wait_for(lambda: len(statuses) == 50, "every post answered")
    in_progress = AgentRun.objects.exclude(status__in=("completed", "failed", "cancelled"))
    assert in_progress.count() == 1
    if strategy == "reject":
        assert sorted(statuses) == [201] + [409] * 49
        assert AgentRun.objects.count() == 1
    else:
        assert statuses == [201] * 50
        assert AgentRun.objects.filter(status="cancelled", error=INTERRUPTED_ERROR).count() == 49
        # The one left is the last post to get the conversation's lock: the newest.
        assert in_progress.get() == AgentRun.objects.order_by("-created_at", "-id").first()


@pytest.mark.postgres
@pytest.mark.parametrize("strategy", ["interrupt", "rollback"])
def test_a_run_pausing_for_approval_while_interrupted_is_cancelled(
    user, queued, make_run, strategy
):
    """The worker's pause is in flight (a slow database holds its transaction open) when the
    new message arrives: the paused run must not survive and hold the conversation."""
    lease = timezone.now() + timedelta(hours=1)
    running = make_run(user, session_key="k", status="running", lease_expires_at=lease)
    AgentCheckpoint.objects.create(run=running, state="{}", schema_version="1", turn=1, attempt=1)
    slow, release = threading.Event(), threading.Event()

    def slow_database() -> None:  # holds the checkpoint row that pause's transaction writes
        with transaction.atomic():
            AgentCheckpoint.objects.select_for_update().filter(run=running).exists()
            slow.set()
            assert release.wait(PATIENCE)

    holder = in_thread(slow_database)
    assert slow.wait(PATIENCE)
    approval = {"call_id": "c1", "tool_name": "t", "arguments": {}, "agent_name": "a"}
    pauser = in_thread(
        lambda: pause(
            Fence.of(running),
            state="{}",
            schema_version="1",
            turn=2,
            approvals=[approval],
            usage={},
            elapsed=0.0,
        )
    )
    wait_for(lambda: lock_waiters() >= 1, "pause holding the run row, waiting for the checkpoint")
    poster = in_thread(
        lambda: create_run(
            owner=user, session_key="k", input_payload="new", multitask_strategy=strategy
        )
    )
    wait_for(lambda: lock_waiters() >= 2, "the new message waiting for the run row")
    release.set()
    for thread in (holder, pauser, poster):
        thread.join(PATIENCE)
    running.refresh_from_db()
    assert (running.status, running.error) == ("cancelled", INTERRUPTED_ERROR)
    assert AgentRun.objects.exclude(status="cancelled").count() == 1  # the new one
