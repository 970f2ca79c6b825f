"""Calls a resumed or retried run makes: equal calls of one turn, some approved, some run
already, each runs once under its own key; a question nobody answered in time is asked again
when a person retries the run, never taken as an answer."""

from __future__ import annotations

from typing import Any

import pytest
from agents import RunContextWrapper, function_tool
from agents.testing import function_call

from agentic_django import recovery
from agentic_django.execution import execute
from agentic_django.models import AgentRun, AgentSession, AgentToolCall
from agentic_django.services import approve_tool_call, reject_tool_call
from agentic_django.toolcalls import idempotency_key
from tests.core.conftest import register, text, worker_died
from tests.core.faults import TOOL_FINISH, database_faults

pytestmark = pytest.mark.django_db(transaction=True)
QUEUE = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}


def new_run(user, key: str) -> AgentRun:
    return AgentRun.objects.create(
        session=AgentSession.objects.get_or_create(owner=user, session_key="k")[0],
        owner=user,
        agent_key=key,
        input_payload="go",
    )


def reload(run: AgentRun) -> AgentRun:
    return AgentRun.objects.get(pk=run.pk)


def tickets(call_ids: list[str], *, needs_approval: Any) -> list[tuple[str, str]]:
    """Agent "tickets": one turn charging $5 once per call id, then "Done."; the (call id,
    idempotency key) of every charge that really ran."""
    charged: list[tuple[str, str]] = []

    async def charge(context: RunContextWrapper[Any], cents: int) -> str:
        """Charge the customer."""
        charged.append((context.tool_call_id, idempotency_key(context)))
        return f"charged {cents} ({context.tool_call_id})"

    calls = [function_call("charge", {"cents": 500}, call_id=c) for c in call_ids]
    register(
        "tickets", [calls, text("Done.")], [function_tool(charge, needs_approval=needs_approval)]
    )
    return charged


def test_an_approved_call_equal_to_one_that_ran_without_approval_runs(user, settings):
    """Two $5 tickets in one turn; only the second needs approval (a policy by call). The
    first runs at once; the second, approved, must run too, under a key of its own."""
    settings.TASKS = QUEUE

    async def only_second(_context: Any, _params: Any, call_id: str) -> bool:
        return call_id == "second"

    charged = tickets(["first", "second"], needs_approval=only_second)
    run = new_run(user, "tickets")
    execute(str(run.pk), task_id="w1")
    run = reload(run)
    assert run.status == "awaiting_approval", (run.status, run.error)
    assert [a.call_id for a in run.pending_approvals()] == ["second"]
    assert approve_tool_call(run, "second", user=user) is True
    execute(str(run.pk), task_id="w2")
    run = reload(run)
    rows = list(AgentToolCall.objects.filter(run=run).values_list("call_id", "idempotency_key"))
    assert (run.status, run.error) == ("completed", ""), run.error
    assert [c for c, _ in charged] == ["first", "second"], (charged, rows)
    assert len({k for _, k in charged}) == 2, (charged, rows)


def test_three_equal_calls_two_approved_one_rejected(user, settings):
    settings.TASKS = QUEUE
    charged = tickets(["a", "b", "c"], needs_approval=True)
    run = new_run(user, "tickets")
    execute(str(run.pk), task_id="w1")
    run = reload(run)
    assert sorted(a.call_id for a in run.pending_approvals()) == ["a", "b", "c"]
    approve_tool_call(run, "a", user=user)
    reject_tool_call(run, "b", message="no", user=user)
    approve_tool_call(run, "c", user=user)
    execute(str(run.pk), task_id="w2")
    run = reload(run)
    assert (run.status, run.error) == ("completed", ""), run.error
    assert sorted(c for c, _ in charged) == ["a", "c"], charged
    assert len({k for _, k in charged}) == 2, charged


def test_worker_dies_inside_one_of_two_equal_approved_calls(user, settings):
    """Both approved; the worker dies as the second to finish returns. The retry asks about
    that call alone; "run it again" reuses that call's key, and each ticket is charged under
    its own key."""
    settings.TASKS = QUEUE
    charged = tickets(["first", "second"], needs_approval=True)
    run = new_run(user, "tickets")
    execute(str(run.pk), task_id="w1")
    run = reload(run)
    approve_tool_call(run, "first", user=user)
    approve_tool_call(run, "second", user=user)
    with database_faults() as faults, pytest.raises(SystemExit):
        faults.before(TOOL_FINISH, lambda: None)  # the first to finish
        faults.fail(TOOL_FINISH, SystemExit("worker killed"))  # the second
        execute(str(run.pk), task_id="w2")
    dead_rows = dict(
        AgentToolCall.objects.filter(run=run, finished_at__isnull=True).values_list(
            "call_id", "idempotency_key"
        )
    )
    assert len(dead_rows) == 1, dead_rows
    ((dead_call, dead_key),) = dead_rows.items()
    worker_died(run)
    assert recovery.recover_runs(mode="requeue") == 1
    execute(str(run.pk), task_id="w3")
    run = reload(run)
    assert run.status == "awaiting_approval", (run.status, run.error)
    questions = run.pending_approvals()
    assert [(q.kind, q.call_id) for q in questions] == [("in_doubt", f"{dead_call}@2")]
    assert approve_tool_call(run, f"{dead_call}@2", user=user) is True
    execute(str(run.pk), task_id="w4")
    run = reload(run)
    assert (run.status, run.error) == ("completed", ""), run.error
    assert len(charged) == 3, charged
    assert charged[2] == (dead_call, dead_key), (charged, dead_rows)
    assert len({k for _, k in charged}) == 2, charged


def test_an_expired_in_doubt_question_is_not_taken_as_done_when_the_run_is_retried(user, settings):
    """send_invoice was in its tool when its worker died; the retry asked its user, who never
    answered: the question expired and the run failed. An operator retries the failed run.
    Nobody said the invoice was sent, so the run must ask again (or not go on), never feed the
    model "already carried out (confirmed by the user)"."""
    from datetime import timedelta

    from django.utils import timezone

    from agentic_django import lifecycle, services
    from agentic_django.toolcalls import DONE_OUTPUT
    from tests.core.test_retries import invoice_in_doubt

    settings.TASKS = QUEUE
    run, sent, _model = invoice_in_doubt(user)
    assert run.status == "awaiting_approval"
    AgentRun.objects.filter(pk=run.pk).update(
        approval_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert [r.pk for r in lifecycle.expire_approvals()] == [run.pk]
    assert reload(run).status == "failed"
    assert services.requeue_run(reload(run)) is True
    execute(str(run.pk), task_id="w3")
    run = reload(run)
    row = AgentToolCall.objects.get(run=run)
    assert row.output != DONE_OUTPUT, (run.status, row.output, sent)
    assert run.status == "awaiting_approval", (run.status, run.error, row.output)


def test_an_expired_approval_is_not_taken_as_a_rejection_when_the_run_is_retried(user, settings):
    from datetime import timedelta

    from django.utils import timezone

    from agentic_django import lifecycle, services
    from tests.core.conftest import call

    settings.TASKS = QUEUE
    refunded: list[str] = []

    @function_tool(needs_approval=True)
    def refund(order: str) -> str:
        """Refund."""
        refunded.append(order)
        return "ok"

    register("clerk", [call("refund", {"order": "1"}, "call-r"), text("Done.")], [refund])
    run = new_run(user, "clerk")
    execute(str(run.pk), task_id="w1")
    assert reload(run).status == "awaiting_approval"
    AgentRun.objects.filter(pk=run.pk).update(
        approval_expires_at=timezone.now() - timedelta(seconds=1)
    )
    lifecycle.expire_approvals()
    assert reload(run).status == "failed"
    assert services.requeue_run(reload(run)) is True
    execute(str(run.pk), task_id="w2")
    run = reload(run)
    assert run.status == "awaiting_approval", (run.status, run.final_output, refunded)
