"""Tool calls that need a person's approval: the run pauses, a decision resumes it, and an
approved call runs exactly once whatever happens to the workers around it."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from agents import function_tool
from django.db.models.functions import Now
from django.utils import timezone

from agentic_django import lifecycle, recovery, signals
from agentic_django.exceptions import (
    ApprovalAlreadyDecided,
    ApprovalExpired,
    ApprovalNotFound,
    RunNotAwaitingApproval,
)
from agentic_django.execution import execute
from agentic_django.lifecycle import APPROVAL_EXPIRED_ERROR
from agentic_django.models import AgentApproval, AgentCheckpoint, AgentRun, AgentSession
from agentic_django.services import approve_tool_call, create_run, reject_tool_call
from tests.core import registry
from tests.core.conftest import call, dies, register, running_elsewhere, text, worker_died
from tests.core.faults import CHECKPOINT_SAVE, PAUSE, TOOL_START, database_faults

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
IMMEDIATE = {"default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}}


def start(user, key: str, text_input: str = "refund order 42", session_key: str = "k") -> AgentRun:
    run = create_run(owner=user, session_key=session_key, input_payload=text_input, agent_key=key)
    run.refresh_from_db()
    return run


def reload(run: AgentRun) -> AgentRun:
    return AgentRun.objects.get(pk=run.pk)


def history_roles(run: AgentRun) -> list[str]:
    return [
        item.get("role") or item.get("type")
        for item in run.session.items.values_list("payload", flat=True)
    ]


def test_a_call_that_needs_approval_pauses_the_run_and_approving_finishes_it(user, refunds):
    model = register(
        "clerk",
        [call("refund", {"order": "42"}, "call-r1"), text("Refunded order 42.")],
        [refunds.tool],
    )
    seen = []

    def receiver(signal):
        def record(sender, run, **kwargs):
            seen.append((signal, run.status))

        return record

    receivers = {
        name: receiver(name) for name in ("agent_run_awaiting_approval", "agent_run_resumed")
    }
    for name, function in receivers.items():
        getattr(signals, name).connect(function, sender=AgentRun)
    try:
        run = start(user, "clerk")
        assert run.status == "awaiting_approval"
        assert refunds.done == []
        assert run.lease_expires_at is None and run.approval_expires_at is not None
        (approval,) = run.pending_approvals()
        assert (approval.call_id, approval.tool_name, approval.arguments) == (
            "call-r1",
            "refund",
            {"order": "42"},
        )
        assert approval.agent_name == "Clerk"
        assert AgentCheckpoint.objects.get(run=run).state

        assert approve_tool_call(run, "call-r1", user=user) is True
    finally:
        for name, function in receivers.items():
            getattr(signals, name).disconnect(function, sender=AgentRun)
    run = reload(run)
    assert (run.status, run.final_output, run.attempt) == ("completed", "Refunded order 42.", 2)
    assert refunds.done == ["42"]
    assert len(model.calls) == 2
    assert seen == [
        ("agent_run_awaiting_approval", "awaiting_approval"),
        ("agent_run_resumed", "pending"),
    ]
    assert AgentApproval.objects.get(run=run).decided_by == user
    assert history_roles(run) == ["user", "function_call", "function_call_output", "assistant"]


def test_rejecting_tells_the_model_and_never_runs_the_tool(user, refunds):
    model = register(
        "clerk",
        [call("refund", {"order": "42"}, "call-r1"), text("Understood, no refund.")],
        [refunds.tool],
    )
    run = start(user, "clerk")
    reject_tool_call(run, "call-r1", message="Order 42 was already refunded by phone.")
    run = reload(run)
    assert (run.status, run.final_output) == ("completed", "Understood, no refund.")
    assert refunds.done == []
    outputs = [i for i in model.calls[1].input if i.get("type") == "function_call_output"]
    assert outputs[0]["output"] == "Order 42 was already refunded by phone."


def test_one_decision_per_call_and_the_run_goes_on_once_all_are_decided(user, refunds):
    register(
        "clerk",
        [
            [
                *call("refund", {"order": "1"}, "call-a"),
                *call("refund", {"order": "2"}, "call-b"),
            ],
            text("Done."),
        ],
        [refunds.tool],
    )
    run = start(user, "clerk")
    assert {a.call_id for a in run.pending_approvals()} == {"call-a", "call-b"}
    assert approve_tool_call(run, "call-a") is False  # one still pending
    assert reload(run).status == "awaiting_approval"
    with pytest.raises(ApprovalAlreadyDecided):
        reject_tool_call(run, "call-a")
    with pytest.raises(ApprovalNotFound):
        approve_tool_call(run, "call-zzz")
    assert reject_tool_call(run, "call-b") is True
    assert reload(run).status == "completed"
    assert refunds.done == ["1"]


def test_a_decision_concerns_its_own_run_even_when_call_ids_repeat(user, refunds):
    # Providers make call ids up; two paused runs can wait on the same one.
    refund = refunds.tool
    both = [*call("refund", {"order": "a"}, "call-same"), *call("refund", {"order": "x"}, "call-x")]
    register("clerk-a", [both, text("A done.")], [refund])
    register("clerk-b", [call("refund", {"order": "b"}, "call-same"), text("B done.")], [refund])
    first = start(user, "clerk-a", session_key="a")
    second = start(user, "clerk-b", session_key="b")
    assert (first.status, second.status) == ("awaiting_approval", "awaiting_approval")

    assert approve_tool_call(first, "call-same") is False  # its call-x is still pending
    assert [a.call_id for a in reload(second).pending_approvals()] == ["call-same"]
    assert reject_tool_call(first, "call-x") is True  # nothing of its own left pending

    resumed = reload(first)
    assert (resumed.status, resumed.approval_expires_at) == ("completed", None)
    assert reload(second).status == "awaiting_approval"
    assert [a.call_id for a in reload(second).pending_approvals()] == ["call-same"]
    decided = AgentApproval.objects.get(run=first, call_id="call-same")
    assert decided.decision == AgentApproval.Decision.APPROVED
    assert decided.decided_at is not None
    with pytest.raises(RunNotAwaitingApproval):  # the other run's pause is not this one's
        approve_tool_call(first, "call-same")
    with pytest.raises(ApprovalNotFound):  # decided in the other run, unknown in this one
        approve_tool_call(second, "call-x")
    assert reject_tool_call(second, "call-same") is True
    assert reload(second).status == "completed"
    assert refunds.done == ["a"]


def test_two_decisions_at_the_same_time_count_once(user, refunds):
    register("clerk", [call("refund", {"order": "42"}, "call-r1"), text("ok")], [refunds.tool])
    run = start(user, "clerk")
    barrier = threading.Barrier(4)
    outcomes: list[str] = []
    from django.db import connection

    def click(approve: bool) -> None:
        try:
            barrier.wait()
            if approve:
                approve_tool_call(run, "call-r1")
            else:
                reject_tool_call(run, "call-r1")
            outcomes.append("decided")
        except ApprovalAlreadyDecided:
            outcomes.append("conflict")
        except Exception as exc:  # the run went on meanwhile: not waiting any more
            outcomes.append(type(exc).__name__)
        finally:
            connection.close()

    threads = [threading.Thread(target=click, args=(n % 2 == 0,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes.count("decided") == 1, outcomes
    assert set(outcomes) - {"decided"} <= {"conflict", "RunNotAwaitingApproval"}
    assert reload(run).status == "completed"
    assert len(refunds.done) <= 1


def test_a_paused_run_blocks_its_session_but_holds_no_slot(user, refunds, settings):
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 1
    register("clerk", [call("refund", {"order": "42"}, "call-r1"), text("ok")], [refunds.tool])
    registry.FACTORIES.update()  # the "demo" agent answers the other runs
    paused = start(user, "clerk")
    behind = start(user, "demo", "and then?")
    elsewhere = start(user, "demo", "hello", session_key="other")
    assert reload(behind).status == "pending"  # its session waits for the paused run
    assert reload(elsewhere).status == "completed"  # the slot was free
    approve_tool_call(paused, "call-r1")
    assert reload(paused).status == "completed"
    assert reload(behind).status == "completed"


def test_approvals_expire_and_the_session_moves_on(user, refunds, settings):
    settings.AGENTIC_DJANGO_APPROVAL_TIMEOUT = 60
    register("clerk", [call("refund", {"order": "42"}, "call-r1")], [refunds.tool])
    paused = start(user, "clerk")
    behind = start(user, "demo", "next question")
    assert recovery.sweep().expired == 0  # not yet
    AgentRun.objects.filter(pk=paused.pk).update(approval_expires_at=Now() - timedelta(seconds=1))
    assert recovery.sweep().expired == 1
    paused = reload(paused)
    assert (paused.status, paused.error) == ("failed", APPROVAL_EXPIRED_ERROR)
    assert AgentApproval.objects.get(run=paused).decision == "expired"
    assert reload(behind).status == "completed"
    assert refunds.done == []
    with pytest.raises(lifecycle.RunNotAwaitingApproval):
        approve_tool_call(paused, "call-r1")


def test_a_decision_after_the_deadline_fails_the_run_even_before_a_sweep(
    user, refunds, settings, client
):
    """With nothing sweeping (the immediate backend has no worker), the decision itself sees
    that the deadline passed: 410, the run fails as expired and the tool never runs."""
    asks = call("refund", {"order": "42"}, "call-r1")
    register("clerk", [asks, asks], [refunds.tool])
    paused = start(user, "clerk")
    AgentRun.objects.filter(pk=paused.pk).update(approval_expires_at=Now() - timedelta(seconds=1))
    failed = []

    def record(sender, run, **kwargs):
        failed.append(run.status)

    signals.agent_run_failed.connect(record, sender=AgentRun)
    try:
        with pytest.raises(ApprovalExpired):
            approve_tool_call(paused, "call-r1")
    finally:
        signals.agent_run_failed.disconnect(record, sender=AgentRun)
    paused = reload(paused)
    assert (paused.status, paused.error) == ("failed", APPROVAL_EXPIRED_ERROR)
    assert failed == ["failed"]
    assert AgentApproval.objects.get(run=paused).decision == "expired"
    assert refunds.done == []

    # Over the API: another overdue run answers 410 with a clear message, never 200.
    late = start(user, "clerk", session_key="late")
    AgentRun.objects.filter(pk=late.pk).update(approval_expires_at=Now() - timedelta(seconds=1))
    client.force_login(user)
    response = client.post(
        f"/agents/runs/{late.pk}/approve/", {"call_id": "call-r1"}, content_type="application/json"
    )
    assert response.status_code == 410
    assert response.json()["error"]["code"] == "approval_expired"
    assert reload(late).status == "failed" and refunds.done == []


def test_a_cancel_that_lands_just_before_the_pause_ends_the_run_cancelled(user, refunds):
    """The user cancels while the attempt is about to pause on a call: the run never pauses,
    so no later approval can run the tool."""
    from agentic_django.services import cancel_run

    register("clerk", [call("refund", {"order": "42"}, "call-r1"), text("?")], [refunds.tool])
    with database_faults() as faults:
        # Just before the pausing UPDATE, the cancel lands (on the pausing connection: SQLite
        # lets no other writer in once the pause's transaction began).
        faults.before(PAUSE, lambda: cancel_run(AgentRun.objects.get(agent_key="clerk")))
        run = start(user, "clerk")
    assert run.status == "cancelled"
    assert run.cancel_requested_at is not None and run.approval_expires_at is None
    assert not AgentApproval.objects.filter(run=run).exists()
    with pytest.raises(RunNotAwaitingApproval):
        approve_tool_call(run, "call-r1")
    assert refunds.done == []


def test_a_cancel_requested_before_a_tool_starts_keeps_the_tool_from_running(user, settings):
    """The model asked for a tool; the cancellation lands as the call is about to be recorded
    as started: the tool never runs and the run ends cancelled."""
    from agentic_django.services import cancel_run
    from tests.waiting import in_thread

    ran: list[str] = []

    @function_tool
    def ship(order: str) -> str:
        """Ship an order."""
        ran.append(order)
        return "shipped"

    register("shipper", [call("ship", {"order": "7"}, "call-s1"), text("Shipped.")], [ship])
    with database_faults() as faults:
        faults.before(
            TOOL_START,
            lambda: in_thread(lambda: cancel_run(AgentRun.objects.get(agent_key="shipper"))).join(),
        )
        run = start(user, "shipper", "ship order 7")
    assert run.status == "cancelled", run.error_detail
    assert ran == []


def test_a_decision_while_the_task_queue_is_down_keeps_the_run_for_the_sweep(
    user, refunds, settings
):
    """The decision is spent and answered; the broker refuses the resumed run's task. The run
    stays pending (never failed for a blip) and the next sweep, with the broker back, runs it."""
    register(
        "clerk", [call("refund", {"order": "42"}, "call-r1"), text("Refunded.")], [refunds.tool]
    )
    run = start(user, "clerk")
    settings.TASKS = {"default": {"BACKEND": "tests.core.faults.UnavailableBackend"}}
    assert approve_tool_call(run, "call-r1") is True
    run = reload(run)
    assert (run.status, run.error, run.task_id) == ("pending", "", "")
    with pytest.raises(RunNotAwaitingApproval):  # 409: the decision is spent
        reject_tool_call(run, "call-r1")
    assert refunds.done == []

    settings.TASKS = IMMEDIATE
    recovery.sweep()
    run = reload(run)
    assert (run.status, run.final_output) == ("completed", "Refunded.")
    assert refunds.done == ["42"]


def test_cancelling_a_paused_run_ends_it_at_once(user, refunds):
    from agentic_django.services import cancel_run

    register("clerk", [call("refund", {"order": "42"}, "call-r1")], [refunds.tool])
    run = cancel_run(start(user, "clerk"))
    assert run.status == "cancelled"
    assert refunds.done == []


# --- crashes around an approved call ------------------------------------------------------------


def crash_and_recover(run: AgentRun, settings) -> AgentRun:
    """The worker died mid-run; its lease expires and recovery runs the run again."""
    worker_died(run)
    settings.TASKS = IMMEDIATE
    assert recovery.recover_runs(mode="requeue") == 1
    return reload(run)


def test_a_crash_between_the_decision_and_the_tool_runs_the_tool_once(user, refunds, settings):
    register(
        "clerk",
        [call("refund", {"order": "42"}, "call-r1"), text("Refunded.")],
        [refunds.tool],
    )
    run = start(user, "clerk")
    settings.TASKS = QUEUE  # the decision queues the run; the worker that claims it dies
    approve_tool_call(run, "call-r1")
    claimed = lifecycle.claim(run.pk)
    assert claimed is not None and refunds.done == []
    run = crash_and_recover(claimed, settings)
    assert (run.status, run.final_output) == ("completed", "Refunded.")
    assert refunds.done == ["42"]


def test_a_crash_after_the_tool_before_the_next_model_call_never_runs_it_twice(
    user, refunds, settings
):
    model = register(
        "clerk",
        [call("refund", {"order": "42"}, "call-r1"), text("Refunded.")],
        [refunds.tool],
    )
    run = start(user, "clerk")
    with database_faults() as faults:
        # The worker dies as it saves the checkpoint before the next model call.
        faults.fail(CHECKPOINT_SAVE, SystemExit("worker killed"))
        approve_tool_call(run, "call-r1")  # runs the resumed run in-process, whose worker dies
    assert refunds.done == ["42"]
    assert reload(run).status == "running"
    run = crash_and_recover(reload(run), settings)
    assert (run.status, run.final_output) == ("completed", "Refunded.")
    assert refunds.done == ["42"]  # the recorded output was replayed
    assert len(model.calls) == 2
    roles = history_roles(run)
    assert roles.count("function_call_output") == 1, roles


def test_a_turn_asked_again_with_new_call_ids_does_not_repeat_its_finished_tools(user, settings):
    """No approval here: the worker dies after a tool finished, before the next checkpoint.
    The retry asks the model for that turn again, which names the same call differently."""
    sent: list[str] = []

    @function_tool
    def send_invoice(customer: str) -> str:
        """Send an invoice."""
        sent.append(customer)
        return f"invoice sent to {customer}"

    model = register(
        "billing",
        [
            call("send_invoice", {"customer": "ACME"}, "call-first"),
            call("send_invoice", {"customer": "ACME"}, "call-second-try"),
            text("Invoice sent."),
        ],
        [send_invoice],
    )
    with database_faults() as faults:
        faults.fail(CHECKPOINT_SAVE, SystemExit("worker killed"))
        run = start(user, "billing", "invoice ACME")
    assert (run.status, sent) == ("running", ["ACME"])
    run = crash_and_recover(run, settings)
    assert (run.status, run.final_output) == ("completed", "Invoice sent.")
    assert sent == ["ACME"]
    assert len(model.calls) == 3


def test_a_long_tool_run_killed_in_turn_five_resumes_there(user, settings):
    """Six turns (five tool calls, then the answer); the worker dies during turn five's model
    call. Another worker resumes from the checkpoint: two model calls, not six again."""
    done: list[int] = []

    @function_tool
    def step(number: int) -> str:
        """One step of a long job."""
        done.append(number)
        return f"step {number} done"

    steps = [call("step", {"number": n}, f"call-{n}") for n in range(1, 5)]
    model = register(
        "long", [*steps, dies(), call("step", {"number": 5}, "call-5"), text("All done.")], [step]
    )
    settings.TASKS = QUEUE  # this test plays the worker
    run = AgentRun.objects.create(
        session=AgentSession.objects.create(owner=user, session_key="k"),
        owner=user,
        agent_key="long",
        input_payload="do the long job",
    )
    with pytest.raises(SystemExit):
        execute(str(run.pk), task_id="worker-1")
    assert reload(run).status == "running", reload(run).error_detail
    assert done == [1, 2, 3, 4]
    calls_before = len(model.calls)
    assert calls_before == 5
    checkpoint = AgentCheckpoint.objects.get(run=run)
    assert checkpoint.turn == 5

    run = crash_and_recover(reload(run), settings)
    assert (run.status, run.final_output, run.attempt) == ("completed", "All done.", 2), (
        run.error,
        run.error_detail,
    )
    assert len(model.calls) - calls_before == 2
    assert done == [1, 2, 3, 4, 5]
    roles = history_roles(run)
    assert roles.count("function_call_output") == 5 and roles.count("user") == 1, roles
    # Clients see each step once: the checkpointed events and the resumed attempt's.
    events = list(run.events.filter(event_type="tool_called").values_list("attempt", flat=True))
    from agentic_django.events import visible_events

    visible = list(
        visible_events(run).filter(event_type="tool_called").values_list("payload", flat=True)
    )
    assert [p["call_id"] for p in visible] == [f"call-{n}" for n in range(1, 6)]
    assert events.count(1) == 4


def test_a_stored_state_the_runtime_cannot_read_fails_the_run_once(user, refunds, settings):
    register("clerk", [call("refund", {"order": "42"}, "call-r1"), text("?")], [refunds.tool])
    run = start(user, "clerk")
    # Written by a future SDK with a schema this one does not know.
    AgentCheckpoint.objects.filter(run=run).update(
        state='{"$schemaVersion": "99.0", "garbage": true}', schema_version="99.0"
    )
    approve_tool_call(run, "call-r1")
    run = reload(run)
    assert run.status == "failed"
    assert "cannot go on" in run.error
    assert refunds.done == []
    assert not lifecycle.stale_runs().exists()
    assert timezone.now() >= run.finished_at


def test_another_worker_resumes_a_checkpointed_run_with_its_own_fence(user, settings):
    """The checkpoint is written under the first attempt's fence; once that attempt lost the
    run, it can no longer overwrite the checkpoint the second attempt works from."""
    from agentic_django.lifecycle import Fence

    session = AgentSession.objects.create(owner=user, session_key="k")
    run = running_elsewhere(session)
    first = Fence.of(run)
    assert lifecycle.save_checkpoint(first, state="{}", schema_version="1.21", turn=2)
    worker_died(run)
    assert lifecycle.requeue(reload(run), stale_only=True)
    second = lifecycle.claim(run.pk)
    assert second.attempt == 2
    assert not lifecycle.save_checkpoint(first, state="stale", schema_version="1.21", turn=3)
    kept = AgentCheckpoint.objects.get(run=run)
    assert (kept.state, kept.turn, kept.attempt) == ("{}", 2, 1)
    assert lifecycle.save_checkpoint(Fence.of(second), state="fresh", schema_version="1.21", turn=3)
    checkpoint = AgentCheckpoint.objects.get(run=run)
    assert (checkpoint.state, checkpoint.turn, checkpoint.attempt) == ("fresh", 3, 2)


def test_always_approving_a_tool_lets_its_later_calls_in_the_run_through(user, refunds):
    register(
        "clerk",
        [
            call("refund", {"order": "1"}, "call-1"),
            call("refund", {"order": "2"}, "call-2"),
            text("Both refunded."),
        ],
        [refunds.tool],
    )
    run = start(user, "clerk")
    approve_tool_call(run, "call-1", always=True)
    run = reload(run)
    assert (run.status, run.final_output) == ("completed", "Both refunded.")
    assert refunds.done == ["1", "2"]
    assert AgentApproval.objects.filter(run=run).count() == 1


def test_admins_decide_from_the_run_list(user, refunds, client, django_user_model):
    from django.urls import reverse

    register("clerk", [call("refund", {"order": "42"}, "call-r1"), text("ok")], [refunds.tool])
    run = start(user, "clerk")
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw-12345678")
    client.force_login(admin)
    response = client.post(
        reverse("admin:agentic_django_agentrun_changelist"),
        {"action": "approve_selected", "_selected_action": [run.pk]},
        follow=True,
    )
    assert "Approved 1 tool call(s)" in response.content.decode()
    assert reload(run).status == "completed"
    assert AgentApproval.objects.get(run=run).decided_by == admin
    assert refunds.done == ["42"]
    page = client.get(reverse("admin:agentic_django_agentrun_change", args=[run.pk]))
    assert b"call-r1" in page.content
