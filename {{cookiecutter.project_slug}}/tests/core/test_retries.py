"""Retries after a worker died: attempts are counted and capped, the run timeout covers them
all, the dead attempt's events never come back, and tool calls keep their idempotency keys.

A worker dies here as ``SystemExit`` raised at a chosen point (a model step, a tool, a
statement), which unwinds the attempt without any of its handlers: what is left in the
database is what a SIGKILL at that point leaves (``test_tool_kill`` kills real processes).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from agents import RunContextWrapper, function_tool
from agents.testing import ModelStep, ScriptedModel, function_call
from django.db.models.functions import Now

from agentic_django import recovery
from agentic_django.events import visible_events
from agentic_django.execution import execute, timeout_message
from agentic_django.lifecycle import attempts_exhausted_error
from agentic_django.models import AgentApproval, AgentRun, AgentSession, AgentToolCall
from agentic_django.toolcalls import idempotency_key, repeatable
from tests.core.conftest import call, dies, register, text, worker_died
from tests.core.faults import (
    CHECKPOINT_SAVE,
    TOOL_FINISH,
    TOOL_RERUN,
    TOOL_START,
    database_faults,
)

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
IMMEDIATE = {"default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}}


def new_run(user, key: str, text_input: str = "go") -> AgentRun:
    return AgentRun.objects.create(
        session=AgentSession.objects.get_or_create(owner=user, session_key="k")[0],
        owner=user,
        agent_key=key,
        input_payload=text_input,
    )


def reload(run: AgentRun) -> AgentRun:
    return AgentRun.objects.get(pk=run.pk)


def test_a_run_that_kills_its_worker_every_time_fails_after_max_attempts(user, settings):
    settings.TASKS = QUEUE  # this test plays the workers
    settings.AGENTIC_DJANGO_MAX_ATTEMPTS = 3
    model = register("crasher", [dies(), dies(), dies(), text("never")])
    run = new_run(user, "crasher")
    for attempt in (1, 2, 3):
        with pytest.raises(SystemExit):
            execute(str(run.pk), task_id=f"worker-{attempt}")
        run = reload(run)
        assert (run.status, run.attempt) == ("running", attempt)
        worker_died(run)
        assert recovery.recover_runs(mode="requeue") == 1
    run = reload(run)
    assert (run.status, run.error) == ("failed", attempts_exhausted_error(3))
    assert len(model.calls) == 3  # the model was paid three times, not forever
    assert (run.retries, run.finished_at is not None) == (2, True)
    # A person may still retry it: that starts a fresh count.
    from agentic_django.services import requeue_run

    settings.TASKS = IMMEDIATE
    assert requeue_run(run)
    run = reload(run)
    assert (run.status, run.final_output, run.retries) == ("completed", "never", 0)


def died_after(run: AgentRun, *, seconds: int) -> None:
    """The run's worker died ``seconds`` (database clock) into its attempt; recovery looks."""
    with pytest.raises(SystemExit):
        execute(str(run.pk), task_id="worker")
    AgentRun.objects.filter(pk=run.pk).update(
        started_at=Now() - timedelta(seconds=seconds), heartbeat_at=Now()
    )
    worker_died(run)
    assert recovery.recover_runs(mode="requeue") == 1


def test_the_run_timeout_counts_every_attempt(user, settings):
    """Attempt 1 ran 55 of its 60 s before its worker died: the retry gets the 5 s left, and
    a run that used all of it is not retried at all."""
    settings.TASKS = QUEUE
    settings.AGENTIC_DJANGO_RUN_TIMEOUT = 60
    release = asyncio.Event()

    async def hang(model_call: Any) -> Any:
        await release.wait()  # a provider that never answers

    register("slow", [dies(), ModelStep.respond(hang)])
    run = new_run(user, "slow")
    died_after(run, seconds=55)
    run = reload(run)
    assert run.status == "pending" and 55 <= run.elapsed_seconds < 60
    execute(str(run.pk), task_id="worker-2")  # hangs on the model: stopped after ~5 s
    run = reload(run)
    assert (run.status, run.error) == ("failed", timeout_message(60))
    assert run.error_detail == ""  # its own deadline stopped it, not the lease keeper's later one

    # Over its budget already: the dead attempt's run is failed, not retried.
    register("slower", [dies()])
    over = new_run(user, "slower")
    over.session = AgentSession.objects.create(owner=user, session_key="over")
    over.save()
    died_after(over, seconds=61)
    over = reload(over)
    assert (over.status, over.error, over.attempt) == ("failed", timeout_message(60), 1)


def test_the_events_of_an_attempt_that_died_never_come_back(user, settings, client):
    """The worker dies right after a tool ran, before the next checkpoint; the retry asks for
    that turn again, replays the tool and saves its own checkpoint. Clients see each event
    once: the dead attempt's stay stored, superseded."""
    ran: list[str] = []

    @function_tool
    def lookup(order: str) -> str:
        """Look an order up."""
        ran.append(order)
        return f"order {order}: shipped"

    register(
        "clerk",
        [
            call("lookup", {"order": "9"}, "call-a"),
            call("lookup", {"order": "9"}, "call-b"),  # the retry's new id for the same call
            text("It shipped."),
        ],
        [lookup],
    )
    settings.TASKS = QUEUE
    with database_faults() as faults:
        faults.fail(CHECKPOINT_SAVE, SystemExit("worker killed"))
        run = new_run(user, "clerk")
        with pytest.raises(SystemExit):
            execute(str(run.pk), task_id="worker-1")
    settings.TASKS = IMMEDIATE  # the retry runs in-process
    worker_died(run)
    assert recovery.recover_runs(mode="requeue") == 1
    run = reload(run)
    assert (run.status, run.final_output, ran) == ("completed", "It shipped.", ["9"])
    assert run.checkpoint_event_sequence > 3  # the retry's checkpoint is past the dead events

    shown = [e.event_type for e in visible_events(run).order_by("sequence")]
    assert shown == ["agent_updated", "tool_called", "tool_output", "message_output"]
    client.force_login(user)
    listed = client.get(f"/agents/runs/{run.pk}/events/").json()["events"]
    assert [(e["type"], e["attempt"]) for e in listed] == [
        ("agent_updated", 2),
        ("tool_called", 2),
        ("tool_output", 2),
        ("message_output", 2),
    ]
    superseded = run.events.filter(superseded=True).values_list("attempt", "event_type")
    assert sorted(superseded) == [(1, "agent_updated"), (1, "tool_called"), (1, "tool_output")]


def test_two_equal_calls_in_a_turn_get_two_keys(user, settings):
    """Two tickets at $5: ``charge(cents=500)`` twice in one turn. A payment system that
    honours idempotency keys must see two keys, or it charges once. (That a call run again
    after its worker died keeps its key: ``test_tool_kill``.)"""
    settings.TASKS = IMMEDIATE
    keys: list[str] = []

    @function_tool
    def charge(context: RunContextWrapper[Any], cents: int) -> str:
        """Charge the customer."""
        keys.append(idempotency_key(context))
        return f"charged {cents}"

    register(
        "tickets",
        [
            [
                function_call("charge", {"cents": 500}, call_id="first"),
                function_call("charge", {"cents": 500}, call_id="second"),
            ],
            text("Two tickets bought."),
        ],
        [charge],
    )
    run = new_run(user, "tickets", "two tickets please")
    execute(str(run.pk), task_id="worker-1")
    run = reload(run)
    assert run.status == "completed", run.error_detail
    assert len(keys) == 2 and len(set(keys)) == 2, keys
    recorded = AgentToolCall.objects.filter(run=run).order_by("occurrence")
    assert [(c.occurrence, c.idempotency_key in keys) for c in recorded] == [(0, True), (1, True)]


def invoice_in_doubt(user) -> tuple[AgentRun, list[str], ScriptedModel]:
    """A run of an undeclared tool, ``send_invoice``, whose worker died as the tool returned
    (before its output was recorded), retried: the run, what was sent, and the model."""
    sent: list[str] = []

    @function_tool
    def send_invoice(customer: str) -> str:
        """Send an invoice."""
        sent.append(customer)
        return f"invoice sent to {customer}"

    model = register(
        "billing",
        [
            call("send_invoice", {"customer": "ACME"}, "call-1"),
            call("send_invoice", {"customer": "ACME"}, "call-1-again"),
            text("Done."),
        ],
        [send_invoice],
    )
    run = new_run(user, "billing", "invoice ACME")
    with database_faults() as faults, pytest.raises(SystemExit):
        faults.fail(TOOL_FINISH, SystemExit("worker killed"))
        execute(str(run.pk), task_id="worker-1")
    worker_died(run)
    assert recovery.recover_runs(mode="requeue") == 1
    execute(str(run.pk), task_id="worker-2")
    return reload(run), sent, model


def test_a_call_in_doubt_pauses_the_retry_and_its_user_decides(user, settings, client):
    """A tool not declared repeatable was running when its worker died. The retry asks before
    anything else: no model call, no tool. "Count it as done" gives the model the message."""
    settings.TASKS = QUEUE
    run, sent, model = invoice_in_doubt(user)
    assert run.status == "awaiting_approval"
    assert len(model.calls) == 1 and sent == ["ACME"]  # nothing paid for or sent again
    (question,) = run.pending_approvals()
    assert (question.kind, question.call_id, question.tool_name) == (
        "in_doubt",
        "call-1@1",
        "send_invoice",
    )
    assert question.arguments == {"customer": "ACME"}

    client.force_login(user)
    detail = client.get(f"/agents/runs/{run.pk}/").json()
    assert detail["approvals"][0]["kind"] == "in_doubt"
    response = client.post(
        f"/agents/runs/{run.pk}/reject/",
        {"call_id": "call-1@1", "message": "It went out at 9:02."},
        content_type="application/json",
    )
    assert response.status_code == 200
    execute(str(run.pk), task_id="worker-3")
    run = reload(run)
    assert (run.status, run.final_output) == ("completed", "Done."), run.error_detail
    assert sent == ["ACME"]  # never sent twice
    outputs = [i.get("output") for i in run.session.items.values_list("payload", flat=True)]
    assert "It went out at 9:02." in outputs
    assert AgentApproval.objects.get(run=run).decision == "rejected"


@pytest.mark.parametrize("declared", [True, False], ids=["repeatable", "undeclared"])
def test_a_call_run_again_after_its_worker_died_keeps_its_key(user, settings, declared):
    """The worker dies as the tool returns (before its output is recorded). A repeatable tool
    runs again on the retry at once; an undeclared one once its user said "run it again".
    Either way it runs under the key it had."""
    settings.TASKS = QUEUE
    keys: list[str] = []

    def pay(context: RunContextWrapper[Any], cents: int) -> str:
        """Pay a supplier."""
        keys.append(idempotency_key(context))
        return f"paid {cents}"

    tool = function_tool(pay)
    register(
        "payer",
        [
            call("pay", {"cents": 700}, "call-1"),
            call("pay", {"cents": 700}, "call-1-again"),
            text("Paid."),
        ],
        [repeatable(tool) if declared else tool],
    )
    run = new_run(user, "payer", "pay 7")
    with database_faults() as faults, pytest.raises(SystemExit):
        faults.fail(TOOL_FINISH, SystemExit("worker killed"))
        execute(str(run.pk), task_id="worker-1")
    worker_died(run)
    assert recovery.recover_runs(mode="requeue") == 1
    execute(str(run.pk), task_id="worker-2")
    if not declared:
        run = reload(run)
        assert run.status == "awaiting_approval" and len(keys) == 1
        from agentic_django.services import approve_tool_call

        approve_tool_call(run, "call-1@1")
        execute(str(run.pk), task_id="worker-3")
    run = reload(run)
    assert (run.status, run.final_output) == ("completed", "Paid."), run.error_detail
    assert len(keys) == 2 and keys[0] == keys[1]
    (recorded,) = AgentToolCall.objects.filter(run=run)
    assert (recorded.idempotency_key, recorded.output) == (keys[0], "paid 700")


def test_a_retried_turn_replays_only_that_turns_calls(user, settings):
    """The same lookup in turns 1 and 2; the worker dies in turn 2 before its lookup started.
    The retry resumes turn 2 and runs that lookup: turn 1's recorded output is not its own."""
    settings.TASKS = QUEUE
    looked: list[str] = []

    @function_tool
    def lookup(order: str) -> str:
        """Look an order up."""
        looked.append(order)
        return f"order {order}: #{len(looked)}"

    register(
        "clerk",
        [
            call("lookup", {"order": "9"}, "turn-1"),
            call("lookup", {"order": "9"}, "turn-2"),
            call("lookup", {"order": "9"}, "turn-2-again"),
            text("Checked twice."),
        ],
        [lookup],
    )
    run = new_run(user, "clerk")
    with database_faults() as faults, pytest.raises(SystemExit):
        # The first call's start lands; the worker dies as the second one's is written.
        faults.before(TOOL_START, lambda: None)
        faults.fail(TOOL_START, SystemExit("worker killed"))
        execute(str(run.pk), task_id="worker-1")
    assert looked == ["9"]
    worker_died(run)
    assert recovery.recover_runs(mode="requeue") == 1
    execute(str(run.pk), task_id="worker-2")
    run = reload(run)
    assert (run.status, run.final_output) == ("completed", "Checked twice."), run.error_detail
    assert looked == ["9", "9"]
    outputs = [i.get("output") for i in run.session.items.values_list("payload", flat=True)]
    assert [o for o in outputs if o] == ["order 9: #1", "order 9: #2"]


def test_keys_tell_apart_runs_tools_and_approved_calls(user, settings):
    """Two equal calls that needed approval (no model response names them on the resumed
    attempt) get two keys; another tool with the same arguments and another run get others."""
    from agentic_django.services import approve_tool_call, create_run

    settings.TASKS = IMMEDIATE
    keys: dict[str, list[str]] = {"refund": [], "credit": []}

    def refund(context: RunContextWrapper[Any], cents: int) -> str:
        """Refund."""
        keys["refund"].append(idempotency_key(context))
        return "refunded"

    def credit(context: RunContextWrapper[Any], cents: int) -> str:
        """Credit."""
        keys["credit"].append(idempotency_key(context))
        return "credited"

    both = [
        function_call("refund", {"cents": 500}, call_id="r1"),
        function_call("refund", {"cents": 500}, call_id="r2"),
        function_call("credit", {"cents": 500}, call_id="c1"),
    ]
    tools = [function_tool(refund, needs_approval=True), function_tool(credit)]
    register("desk", [both, text("Done."), both, text("Done.")], tools)
    runs = []
    for session_key in ("a", "b"):
        run = create_run(owner=user, session_key=session_key, input_payload="x", agent_key="desk")
        approve_tool_call(run, "r1")
        approve_tool_call(run, "r2")
        runs.append(reload(run))
    assert [r.status for r in runs] == ["completed", "completed"]
    first, second = keys["refund"][:2], keys["refund"][2:]
    assert len(set(first)) == 2 and len(set(second)) == 2  # two approved calls, two keys
    assert not set(first) & set(second)  # another run
    assert not set(keys["credit"]) & set(keys["refund"])  # another tool
    assert len(set(keys["credit"])) == 2


def test_outside_a_run_a_wrapped_tool_is_just_called(user):
    """The ledger's wrapper is installed on the tools once; an agent run without the engine
    (no ledger) calls the tool as it is, and keys still tell calls apart."""
    from agents import Agent, Runner

    from agentic_django import toolcalls

    seen: list[tuple[str, str]] = []

    def note(context: RunContextWrapper[Any], text: str) -> str:
        """Note something."""
        seen.append((context.tool_call_id, idempotency_key(context)))
        return "noted"

    agent = Agent(
        name="Plain",
        model=ScriptedModel(
            [
                [
                    function_call("note", {"text": "a"}, call_id="n1"),
                    function_call("note", {"text": "a"}, call_id="n2"),
                ],
                text("ok"),
            ]
        ),
        tools=[function_tool(note)],
    )
    assert toolcalls.install([agent]) == {"note": False}
    result = asyncio.run(Runner.run(agent, "note it"))
    assert result.final_output == "ok"
    assert sorted(call_id for call_id, _ in seen) == ["n1", "n2"]
    assert len({key for _, key in seen}) == 2


def test_no_tool_starts_after_a_cancellation_not_even_a_call_run_again(user, settings):
    """A call in doubt its user said to run again: a cancel that lands just before the call
    starts again keeps the tool from running."""
    from agentic_django.services import approve_tool_call, cancel_run

    settings.TASKS = QUEUE
    run, sent, _model = invoice_in_doubt(user)
    assert approve_tool_call(run, "call-1@1") is True
    with database_faults() as faults:
        faults.before(TOOL_RERUN, lambda: cancel_run(reload(run)))
        execute(str(run.pk), task_id="worker-3")
    run = reload(run)
    assert (run.status, sent) == ("cancelled", ["ACME"])
