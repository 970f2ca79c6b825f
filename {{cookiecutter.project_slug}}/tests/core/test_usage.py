"""The usage ledger and budgets: every model call is one fenced row, a retried run counts each
call once as its own and every call paid for as spent, and budgets stop a run before the call
that would go past them.

A worker dies here as ``SystemExit`` raised at a chosen statement or tool (see
``test_retries``): what is left in the database is what a SIGKILL there leaves.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from agents import function_tool
from agents.testing import ModelStep, function_call
from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.db.models import Sum

from agentic_django import lifecycle, recovery, signals, usage
from agentic_django.dispatch import dispatch_next
from agentic_django.execution import execute
from agentic_django.models import AgentRun, AgentSession, AgentUsage
from agentic_django.services import cancel_run, create_run
from agentic_django.usage import BudgetExceeded, CallUsage, period_bounds
from tests.core.conftest import call, register, used, worker_died
from tests.core.faults import CHECKPOINT_SAVE, TOOL_START, database_faults, lock_waiters
from tests.waiting import PATIENCE, in_thread, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
LEDGER_INSERT = r'^INSERT INTO "agentic_django_agentusage"'
CANCEL_FLAG = r'^UPDATE "agentic_django_agentrun" SET "cancel_requested_at"'
RUN_FIELDS = ("requests", "input_tokens", "output_tokens", "total_tokens")


def calling(tool: str, number: int, tokens: tuple[int, int] = (70, 30)) -> Any:
    """A model step calling ``tool`` (call id ``c<number>``), reporting ``tokens``."""
    return ModelStep(
        output=[function_call(tool, {"n": number}, call_id=f"c{number}")], usage=used(*tokens)
    )


def answering(reply: str, tokens: tuple[int, int] = (70, 30)) -> Any:
    from agents.testing import assistant_message

    return ModelStep(output=[assistant_message(reply)], usage=used(*tokens))


class Counter:
    """A tool that counts its calls; ``kill_on`` kills the worker on that call, once."""

    def __init__(self, kill_on: int | None = None) -> None:
        self.calls: list[int] = []
        self.kill_on = kill_on
        self.tool = function_tool(self.count, name_override="count")

    def count(self, n: int) -> str:
        """Count."""
        self.calls.append(n)
        if n == self.kill_on:
            self.kill_on = None
            raise SystemExit("worker killed in the tool")
        return f"counted {n}"


def new_run(user, key: str, session_key: str = "k") -> AgentRun:
    return AgentRun.objects.create(
        session=AgentSession.objects.get_or_create(owner=user, session_key=session_key)[0],
        owner=user,
        agent_key=key,
        input_payload="go",
    )


def reload(run: AgentRun) -> AgentRun:
    return AgentRun.objects.get(pk=run.pk)


def until_done(run: AgentRun) -> AgentRun:
    """Execute the run as workers would, recovering it after every death, until it ends."""
    for attempt in range(1, 6):
        try:
            execute(str(run.pk), task_id=f"worker-{attempt}")
        except SystemExit:
            worker_died(reload(run))
            assert recovery.recover_runs(mode="requeue", dispatch=False) == 1
            continue
        run = reload(run)
        if run.status != "pending":
            return run
    raise AssertionError("the run never ended")


def assert_ledger_matches_the_run(run: AgentRun) -> None:
    """The run's own ledger rows add up to what the SDK reported for it."""
    totals = usage.run_totals(run)
    assert {name: getattr(totals, name) for name in RUN_FIELDS} == {
        name: getattr(run, name) for name in RUN_FIELDS
    }


def tool_outputs(model_call: Any) -> int:
    """How many tool outputs a model call's input holds (a retry asks again from its
    checkpoint, with the outputs it had then)."""
    items = model_call.input if isinstance(model_call.input, list) else []
    return sum(
        1 for item in items if isinstance(item, dict) and item.get("type") == "function_call_output"
    )


def two_calls_then_done(count: int = 10) -> list[Any]:
    """Steps that call ``count`` twice, then answer "done", whatever was replayed."""

    def respond(model_call: Any) -> Any:
        outputs = tool_outputs(model_call)
        return calling("count", outputs + 1) if outputs < 2 else answering("done", (100, 50))

    return [ModelStep.respond(respond) for _ in range(count)]


def killed_at(run: AgentRun, pattern: str, nth: int) -> None:
    """Execute ``run`` until the worker dies at the ``nth`` statement matching ``pattern``,
    then recover it as a worker would."""
    with database_faults() as faults:
        faults.before(pattern, lambda: None, times=nth - 1)
        faults.before(pattern, kill)
        with pytest.raises(SystemExit):
            execute(str(run.pk), task_id="worker-1")
    worker_died(reload(run))
    assert recovery.recover_runs(mode="requeue", dispatch=False) == 1


@pytest.mark.parametrize(
    ("pattern", "nth"),
    [
        pytest.param(TOOL_START, 2, id="after-the-second-row"),
        pytest.param(CHECKPOINT_SAVE, 1, id="at-the-first-checkpoint"),
        pytest.param(CHECKPOINT_SAVE, 2, id="at-the-last-checkpoint"),
        pytest.param(LEDGER_INSERT, 3, id="before-the-last-row"),
    ],
)
def test_a_run_killed_between_calls_counts_each_call_once_and_spends_what_was_paid(
    user, settings, pattern, nth
):
    settings.TASKS = QUEUE  # this test plays the workers
    counter = Counter()
    model = register("counter", two_calls_then_done(), [counter.tool])
    run = new_run(user, "counter")
    killed_at(run, pattern, nth)
    run = until_done(run)

    assert (run.status, run.final_output) == ("completed", "done")
    assert_ledger_matches_the_run(run)
    rows = list(AgentUsage.objects.filter(run=run).order_by("sequence"))
    # Every model call that answered is one row, the dead attempt's included (it was paid
    # for), but for a call whose worker died before its row was written.
    assert len(rows) == len(model.calls) - (1 if pattern == LEDGER_INSERT else 0)
    assert [row.sequence for row in rows] == list(range(1, len(rows) + 1))
    assert {row.attempt for row in rows} == {1, 2}
    # What the run counts as its own: one row per turn, each once.
    assert sorted(row.turn for row in rows if not row.superseded) == [1, 2, 3]
    assert usage.run_spend(run.pk).total_tokens == sum(row.total_tokens for row in rows)
    assert usage.run_spend(run.pk).total_tokens > run.total_tokens or len(rows) == 3


def test_a_moments_database_trouble_writing_a_row_loses_no_paid_call(user, settings):
    """The ledger INSERT fails once on a dropped connection after the provider answered: the
    row is written again on a fresh connection, in the same attempt, and the ledger matches."""
    from django.db import OperationalError

    settings.TASKS = QUEUE
    counter = Counter()
    model = register("counter", two_calls_then_done(), [counter.tool])
    run = new_run(user, "counter")
    with database_faults() as faults:
        faults.fail(LEDGER_INSERT, OperationalError("server closed the connection"), times=1)
        execute(str(run.pk), task_id="worker-1")

    run = reload(run)
    assert (run.status, run.attempt) == ("completed", 1)
    assert_ledger_matches_the_run(run)
    assert AgentUsage.objects.filter(run=run).count() == len(model.calls) == 3


def test_a_cancel_racing_a_budget_pause_cancels_the_paused_run(user, settings):
    """The run pauses on its budget between cancel's two statements (not paused yet, not
    running any more): the cancel is not lost, the paused run is cancelled."""
    from tests.core.conftest import running_elsewhere

    run = running_elsewhere(AgentSession.objects.create(owner=user, session_key="race"))

    def worker_pauses_it() -> None:
        AgentRun.objects.filter(pk=run.pk).update(status="budget_exceeded", lease_expires_at=None)

    with database_faults() as faults:
        faults.before(CANCEL_FLAG, worker_pauses_it)
        cancel_run(run)

    assert reload(run).status == "cancelled"


def kill() -> None:
    raise SystemExit("worker killed")


def test_a_resumed_run_keeps_its_earlier_rows_and_adds_its_own(user, settings, refunds):
    """Pausing for an approval and resuming (a later attempt, from the checkpoint) adds rows
    and supersedes none."""
    from agentic_django.services import approve_tool_call

    settings.TASKS = QUEUE
    asking = ModelStep(output=call("refund", {"order": "42"}, call_id="c1"), usage=used(70, 30))
    register("clerk", [asking, answering("refunded")], [refunds.tool])
    run = new_run(user, "clerk")
    execute(str(run.pk), task_id="w1")
    run = reload(run)
    assert run.status == "awaiting_approval"
    assert list(AgentUsage.objects.filter(run=run).values_list("turn", "attempt")) == [(1, 1)]
    approve_tool_call(run, "c1")
    execute(str(run.pk), task_id="w2")
    run = reload(run)
    assert (run.status, refunds.done) == ("completed", ["42"])
    assert_ledger_matches_the_run(run)
    rows = AgentUsage.objects.filter(run=run).order_by("sequence")
    assert [(r.turn, r.attempt, r.superseded) for r in rows] == [(1, 1, False), (2, 2, False)]


def test_an_attempt_that_lost_its_run_records_its_paid_call_as_spending_only(user, settings):
    """The ledger row is fenced like every write: once recovery took the run over, the old
    attempt's call is not the run's own -- but it was paid for, so it is stored superseded
    (spending), numbered after the rows of the attempt that holds the run."""
    settings.TASKS = QUEUE
    run = new_run(user, "counter")
    claimed = AgentRun.objects.filter(pk=run.pk)
    claimed.update(status="running", attempt=1)
    old = lifecycle.Fence(run.pk, 1)
    caller = usage.Caller.of(run)
    call = CallUsage(input_tokens=7, output_tokens=3, total_tokens=10)

    def record(fence: lifecycle.Fence, turn: int) -> AgentUsage | None:
        return usage.record(
            fence, caller, turn=turn, agent_name="a", model="m", provider="p", used=call
        )

    kept = record(old, 1)
    assert kept is not None and (kept.sequence, kept.superseded) == (1, False)
    claimed.update(attempt=2)  # taken over
    late = record(old, 2)
    assert late is not None and (late.sequence, late.superseded) == (2, True)
    new = record(lifecycle.Fence(run.pk, 2), 2)
    assert new is not None and (new.sequence, new.superseded) == (3, False)
    rows = AgentUsage.objects.filter(run=run).order_by("sequence")
    assert [(r.attempt, r.superseded) for r in rows] == [(1, False), (1, True), (2, False)]
    assert (usage.run_totals(run).calls, usage.run_spend(run.pk).calls) == (2, 3)
    # A store retried after its outcome was lost (the connection dropped as it committed)
    # does not store the call twice; nobody was told of it yet: now they are.
    told: list[int] = []

    def receiver(sender: Any, usage: AgentUsage, **kwargs: Any) -> None:
        told.append(usage.pk)

    signals.agent_usage_recorded.connect(receiver, weak=False)
    try:
        assert usage.store(old, late, again=True) == late
    finally:
        signals.agent_usage_recorded.disconnect(receiver)
    assert told == [late.pk]
    assert usage.run_spend(run.pk).calls == 3
    # A run that is gone takes nothing more.
    claimed.delete()
    assert record(old, 3) is None


# --- Agents used as tools ---------------------------------------------------------------------


def register_boss(parent_steps: list[Any], sub_steps: list[Any], sub_tools: list[Any]) -> Any:
    """Register "boss": an agent "Boss" that delegates to "Researcher" (``Agent.as_tool``,
    tool name "researcher"); the two scripted models."""
    from agents import Agent
    from agents.testing import ScriptedModel

    from tests.core import registry

    parent, sub = ScriptedModel(parent_steps), ScriptedModel(sub_steps)
    researcher = Agent(name="Researcher", instructions="Sub.", model=sub, tools=sub_tools)
    tool = researcher.as_tool(tool_name="researcher", tool_description="Research.")
    registry.FACTORIES["boss"] = lambda: Agent(
        name="Boss", instructions="Test.", model=parent, tools=[tool]
    )
    return parent, sub


def delegating(number: int) -> Any:
    return ModelStep(
        output=[function_call("researcher", {"input": f"q{number}"}, call_id=f"r{number}")],
        usage=used(70, 30),
    )


@pytest.mark.parametrize("dies", [False, True], ids=["in-one-attempt", "killed-at-a-checkpoint"])
def test_the_calls_of_an_agent_used_as_a_tool_are_rows_of_the_run(user, settings, dies):
    """The sub-agent's calls (its nested run has none of the run's hooks) are rows too, in
    the turn of the run that called it: the run's own rows add up to the SDK's usage (which
    counts the nested calls), a retry after a worker died included."""
    settings.TASKS = QUEUE

    def respond(model_call: Any) -> Any:
        # Delegates twice, then answers, whatever was replayed.
        outputs = tool_outputs(model_call)
        return delegating(outputs + 1) if outputs < 2 else answering("done")

    parent, sub = register_boss(
        [ModelStep.respond(respond) for _ in range(5)],
        [answering(f"found {n}", (400, 100)) for n in range(1, 5)],
        [],
    )
    run = new_run(user, "boss")
    if dies:
        # After both delegations, before the run's last call: the retry goes on from its
        # checkpoint; the tool calls are replayed from the tool ledger, not run again.
        killed_at(run, CHECKPOINT_SAVE, 2)
    run = until_done(run)

    assert (run.status, run.final_output) == ("completed", "done")
    assert len(sub.calls) == 2
    rows = list(AgentUsage.objects.filter(run=run).order_by("sequence"))
    assert len(rows) == len(parent.calls) + len(sub.calls)
    assert [(r.agent_name, r.turn) for r in rows[:4]] == [
        ("Boss", 1),
        ("Researcher", 1),
        ("Boss", 2),
        ("Researcher", 2),
    ]
    # The Boss's three turns and the Researcher's two calls; a retry replays the second
    # delegation from the tool ledger (its nested calls are then no longer the run's own).
    assert run.total_tokens == 3 * 100 + (1 if dies else 2) * 500
    assert_ledger_matches_the_run(run)
    assert usage.run_spend(run.pk).total_tokens == sum(r.total_tokens for r in rows)


def test_a_run_cap_stops_the_calls_of_an_agent_used_as_a_tool(user, settings):
    """The sub-agent loops on its own tool: its calls are checked like the run's, so the run
    stops one call past its cap at most, then goes on from there once the cap is raised."""
    settings.TASKS = QUEUE
    settings.AGENTIC_DJANGO_BUDGETS = {"run_tokens": 250}
    counter = Counter()
    parent, sub = register_boss(
        [delegating(1), answering("done")],
        [calling("count", n) for n in range(1, 10)],
        [counter.tool],
    )
    run = new_run(user, "boss")
    execute(str(run.pk), task_id="w1")
    run = reload(run)
    # 100 tokens (Boss), 200, 300 (Researcher): the cap is reached, no further call is made;
    # the stopped sub-agent's tool answers an error and the run pauses before its next call.
    assert run.status == "budget_exceeded"
    assert run.error == "This run reached its token limit (250 tokens)."
    assert (len(parent.calls), len(sub.calls), counter.calls) == (1, 2, [1, 2])
    assert usage.run_spend(run.pk).total_tokens == 300

    settings.AGENTIC_DJANGO_BUDGETS = {"run_tokens": 10_000}
    assert recovery.sweep().resumed == 1
    execute(str(run.pk), task_id="w2")
    run = reload(run)
    assert (run.status, run.final_output) == ("completed", "done")
    assert (len(parent.calls), len(sub.calls)) == (2, 2)
    assert_ledger_matches_the_run(run)
    assert not AgentUsage.objects.filter(run=run, superseded=True).exists()


def test_a_call_that_answers_after_its_attempt_lost_the_run_is_spent_not_the_runs(user, settings):
    """Recovery takes the run over while the model answers: the call was paid for, so it is
    a row -- superseded: spending, never the run's own (the next attempt makes it again)."""
    from django.db.models import F

    settings.TASKS = QUEUE

    def taken_over(model_call: Any) -> Any:
        def take_over() -> None:
            AgentRun.objects.filter(pk=run.pk).update(attempt=F("attempt") + 1)
            connection.close()

        thread = threading.Thread(target=take_over)  # another process, as far as it knows
        thread.start()
        thread.join()
        return answering("late")

    register("slow", [ModelStep.respond(taken_over)])
    run = new_run(user, "slow")
    execute(str(run.pk), task_id="w1")

    rows = list(AgentUsage.objects.filter(run=run).values_list("attempt", "superseded"))
    assert rows == [(1, True)]
    assert (usage.run_totals(run).calls, usage.run_spend(run.pk).total_tokens) == (0, 100)


# --- Prices ----------------------------------------------------------------------------------


def test_a_call_is_priced_from_settings_then_the_price_table_and_unknown_stays_unknown(settings):
    settings.AGENTIC_DJANGO_MODEL_PRICES = {
        "house-model": {"input": "2", "output": "8", "cached_input": "0.5"}
    }
    call = CallUsage(input_tokens=1_000_000, cached_tokens=200_000, output_tokens=500_000)
    house = usage.price("house-model", "llm.internal", call)
    # 800k uncached input at $2, 200k cached at $0.50, 500k output at $8.
    assert (house.cost, house.source) == (
        Decimal("1.6") + Decimal("0.1") + Decimal("4"),
        "settings",
    )
    listed = usage.price("gpt-4o-mini", "openai", call)
    assert listed.source == "genai-prices" and listed.cost > 0
    unknown = usage.price("my-own-finetune-xyz", "llm.internal", call)
    assert (unknown.cost, unknown.source) == (None, "")
    # A server that reports no usage: the cost is unknown, never $0 (but a free model's).
    silent = CallUsage()
    assert usage.price("gpt-4o-mini", "openai", silent).cost is None
    assert usage.price("house-model", "llm.internal", silent).cost is None
    settings.AGENTIC_DJANGO_MODEL_PRICES = {"demo": {"input": 0, "output": 0}}
    assert usage.price("demo", "", silent) == usage.Price(Decimal(0), "settings")


def test_the_model_and_provider_of_a_call(settings):
    from agents import OpenAIChatCompletionsModel
    from openai import AsyncOpenAI

    assert usage.model_of("gpt-4o") == ("gpt-4o", "openai")
    local = AsyncOpenAI(api_key="x", base_url="http://llm.internal:8000/v1")
    assert usage.model_of(OpenAIChatCompletionsModel("qwen", local)) == ("qwen", "llm.internal")
    openai = AsyncOpenAI(api_key="x")
    assert usage.model_of(OpenAIChatCompletionsModel("gpt-4o", openai)) == ("gpt-4o", "openai")
    # A provider genai-prices knows by its API's address.
    deepseek = AsyncOpenAI(api_key="x", base_url="https://api.deepseek.com/v1")
    assert usage.model_of(OpenAIChatCompletionsModel("deepseek-chat", deepseek)) == (
        "deepseek-chat",
        "deepseek",
    )


def test_a_model_served_by_a_host_the_price_table_does_not_know_has_no_price(settings):
    """A self-hosted "deepseek-r1:7b" (Ollama on localhost) is not DeepSeek's API: its cost
    is unknown, whatever genai-prices would match its name with, until settings price it."""
    call = CallUsage(input_tokens=1_000, output_tokens=1_000, total_tokens=2_000)
    for model in ("deepseek-r1:7b", "gpt-4o-mini", "gpt-oss-20b"):
        assert usage.price(model, "localhost", call) == usage.Price(None, "")
        assert usage.price(model, "", call) == usage.Price(None, "")
    assert usage.price("deepseek-reasoner", "deepseek", call).source == "genai-prices"
    assert usage.price("gpt-4o-mini", "openai", call).source == "genai-prices"
    settings.AGENTIC_DJANGO_MODEL_PRICES = {"deepseek-r1:7b": {"input": "1", "output": "1"}}
    assert usage.price("deepseek-r1:7b", "localhost", call) == usage.Price(
        Decimal("0.002"), "settings"
    )


# --- Budgets ---------------------------------------------------------------------------------


def budget_signals() -> tuple[list[Any], Any]:
    seen: list[Any] = []

    def exceeded(sender, run, reason, **kwargs):
        seen.append(("exceeded", run.status, reason))

    def threshold(sender, user_id, run, standing, **kwargs):
        seen.append(("threshold", user_id, standing.spent.total_tokens))

    signals.agent_budget_exceeded.connect(exceeded, weak=False)
    signals.agent_budget_threshold_reached.connect(threshold, weak=False)

    def disconnect() -> None:
        signals.agent_budget_exceeded.disconnect(exceeded)
        signals.agent_budget_threshold_reached.disconnect(threshold)

    return seen, disconnect


def test_a_run_pauses_before_the_call_past_its_cap_and_goes_on_once_the_cap_is_raised(
    user, settings
):
    settings.TASKS = QUEUE
    settings.AGENTIC_DJANGO_BUDGETS = {"run_tokens": 200}
    counter = Counter()
    model = register(
        "counter",
        [calling("count", 1), calling("count", 2), answering("done")],
        [counter.tool],
    )
    seen, disconnect = budget_signals()
    try:
        run = new_run(user, "counter")
        execute(str(run.pk), task_id="w1")
        run = reload(run)
        # 100 tokens, then 200: the cap is reached with the second call; no third is made.
        assert run.status == "budget_exceeded"
        assert run.error == "This run reached its token limit (200 tokens)."
        assert (len(model.calls), counter.calls) == (2, [1, 2])
        assert usage.run_spend(run.pk).total_tokens == 200
        assert run.lease_expires_at is None and run.approval_expires_at is None
        assert seen == [("exceeded", "budget_exceeded", run.error)]
        # Nothing changes while the cap holds.
        assert recovery.sweep().resumed == 0
        assert reload(run).status == "budget_exceeded"

        settings.AGENTIC_DJANGO_BUDGETS = {"run_tokens": 1000}
        assert recovery.sweep().resumed == 1
        run = reload(run)
        assert (run.status, run.error) == ("pending", "")
        execute(str(run.pk), task_id="w2")
        run = reload(run)
        assert (run.status, run.final_output) == ("completed", "done")
        # Went on from the call it stopped before: no call or tool made twice.
        assert (len(model.calls), counter.calls) == (3, [1, 2])
        assert_ledger_matches_the_run(run)
        assert not AgentUsage.objects.filter(run=run, superseded=True).exists()
    finally:
        disconnect()


def test_a_cost_cap_counts_priced_calls_and_a_paused_run_holds_its_conversation(user, settings):
    settings.TASKS = QUEUE
    # $1,000 per million tokens: a call of 100 tokens costs $0.10.
    settings.AGENTIC_DJANGO_MODEL_PRICES = {"scripted": {"input": 1000, "output": 1000}}
    settings.AGENTIC_DJANGO_BUDGETS = {"user_cost": "0.20"}
    counter = Counter()
    model = register(
        "counter", [calling("count", n) for n in range(1, 5)] + [answering("done")], [counter.tool]
    )
    model.model = "scripted"
    run = new_run(user, "counter")
    execute(str(run.pk), task_id="w1")
    run = reload(run)
    assert (run.status, len(model.calls)) == ("budget_exceeded", 2)  # $0.20 reached
    assert run.error.startswith("You have used this month's budget ($0.20 of $0.20).")
    assert usage.user_spend(user.pk, period_bounds("month")[0]).cost == Decimal("0.2")
    # Its conversation waits behind it, as behind a run waiting for approval.
    later = new_run(user, "counter")
    assert dispatch_next() == 0
    assert reload(later).task_id == ""
    # And it can be cancelled like any paused run; then the conversation goes on.
    assert cancel_run(run).status == "cancelled"


def test_with_on_exceeded_fail_the_run_fails_with_the_reason(user, settings):
    settings.TASKS = QUEUE
    settings.AGENTIC_DJANGO_BUDGETS = {"run_tokens": 50, "on_exceeded": "fail"}
    counter = Counter()
    register("counter", [calling("count", 1), answering("done")], [counter.tool])
    seen, disconnect = budget_signals()
    try:
        run = new_run(user, "counter")
        execute(str(run.pk), task_id="w1")
    finally:
        disconnect()
    run = reload(run)
    assert (run.status, run.error) == ("failed", "This run reached its token limit (50 tokens).")
    assert seen == [("exceeded", "failed", run.error)]


def test_a_user_over_the_cap_starts_nothing_and_the_period_rolling_over_resumes_the_run(
    user, other_user, settings
):
    settings.TASKS = QUEUE
    settings.AGENTIC_DJANGO_BUDGETS = {"user_tokens": 300, "period": "month", "warn_at": 0.5}
    counter = Counter()
    model = register(
        "counter",
        [calling("count", n) for n in range(1, 5)] + [answering("done")],
        [counter.tool],
    )
    seen, disconnect = budget_signals()
    try:
        run = new_run(user, "counter")
        execute(str(run.pk), task_id="w1")
        run = reload(run)
        assert run.status == "budget_exceeded" and len(model.calls) == 3  # the cap, reached
        assert run.error.startswith("You have used this month's tokens (300 of 300).")
        # The soft threshold (150 tokens) was crossed by the second call, and said once.
        assert [s for s in seen if s[0] == "threshold"] == [("threshold", user.pk, 200)]
        with pytest.raises(BudgetExceeded) as raised:
            create_run(owner=user, session_key="other", input_payload="hi", agent_key="counter")
        start, end = period_bounds("month")
        assert raised.value.status_code == 402
        assert raised.value.details == {"reason": "user_tokens", "resets_at": end.isoformat()}
        # Another user is not affected.
        create_run(owner=other_user, session_key="k", input_payload="hi", agent_key="counter")
        # A run queued before the cap was reached stops before its first call: nothing of it
        # is kept (its message goes back in once it starts for real).
        queued = new_run(user, "counter", session_key="queued")
        execute(str(queued.pk), task_id="w-queued")
        assert (reload(queued).status, len(model.calls)) == ("budget_exceeded", 3)
        assert not queued.session.items.exists()

        # The clock moves into the next month: this month's calls are last month's.
        AgentUsage.objects.filter(owner=user).update(created_at=start - timedelta(seconds=1))
        assert recovery.sweep().resumed == 2
        execute(str(run.pk), task_id="w2")
        run = reload(run)
        assert (run.status, run.final_output) == ("completed", "done")
        assert counter.calls == [1, 2, 3, 4]
        register("counter", [answering("hello")])
        execute(str(queued.pk), task_id="w-queued-2")
        assert reload(queued).status == "completed"
        roles = [item["role"] for item in queued.session.items.values_list("payload", flat=True)]
        assert roles == ["user", "assistant"]
    finally:
        disconnect()


def plan_limits(user: Any) -> dict[str, Any] | None:
    """A project's caps per user (``user_limits``): a small plan for one user."""
    return {"user_tokens": 100} if user.username.startswith("trial") else None


def test_caps_per_user_come_from_the_projects_callable(user, django_user_model, settings):
    settings.AGENTIC_DJANGO_BUDGETS = {
        "user_tokens": 1_000,
        "user_limits": "tests.core.test_usage.plan_limits",
    }
    trial = django_user_model.objects.create_user("trial-1", password="pw-123456789")
    for owner in (user, trial):
        run = new_run(owner, "counter", session_key=f"s-{owner.pk}")
        AgentUsage.objects.create(
            run=run,
            session=run.session,
            owner=owner,
            sequence=1,
            attempt=1,
            turn=1,
            total_tokens=100,
            priced_at=run.created_at,
            created_at=run.created_at,
        )
    usage.check_new_run(user)  # 100 of the default 1,000
    with pytest.raises(BudgetExceeded):
        usage.check_new_run(trial)  # 100 of its plan's 100
    assert usage.standing(trial).limits == usage.UserLimits(cost=None, tokens=100)


def broken_plans(user: Any) -> Any:
    """A project's caps per user with bugs: one user's plan raises, another's is nonsense."""
    if user.username.startswith("broken"):
        raise KeyError("plan")
    return {"user_tokens": "lots"} if user.username.startswith("odd") else None


def test_a_broken_user_limits_gets_the_settings_caps_and_stops_nobody_else(
    user, django_user_model, settings, caplog
):
    """The project's callable raises for one user and answers nonsense for another: both get
    the settings' caps (logged), creating runs answers no 500, and the sweep still resumes the
    other users' paused runs."""
    settings.AGENTIC_DJANGO_BUDGETS = {
        "user_tokens": 1_000,
        "user_limits": broken_plans.__module__ + ".broken_plans",
    }
    broken = django_user_model.objects.create_user("broken-1", password="pw-123456789")
    odd = django_user_model.objects.create_user("odd-1", password="pw-123456789")
    for owner in (broken, odd, user):
        assert usage.standing(owner).limits == usage.UserLimits(cost=None, tokens=1_000)
        usage.check_new_run(owner)
    paused = []
    for owner in (broken, user):  # the broken plan's run is looked at first
        run = new_run(owner, "counter", session_key=f"p-{owner.pk}")
        AgentRun.objects.filter(pk=run.pk).update(status="budget_exceeded", attempt=1)
        paused.append(run)
    assert usage.resume_within_budgets() == 2
    assert {reload(run).status for run in paused} == {"pending"}
    assert "broken_plans failed for user" in caplog.text


def test_the_period_is_a_calendar_day_or_month_in_the_time_zone(settings):
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from django.utils import timezone

    settings.TIME_ZONE = "Europe/Berlin"
    tz = ZoneInfo("Europe/Berlin")
    now = datetime(2026, 3, 29, 12, 0, tzinfo=tz)  # the day clocks go forward
    assert period_bounds("day", now) == (
        datetime(2026, 3, 29, tzinfo=tz),
        datetime(2026, 3, 30, tzinfo=tz),
    )
    assert period_bounds("month", datetime(2026, 12, 31, 23, 59, tzinfo=tz)) == (
        datetime(2026, 12, 1, tzinfo=tz),
        datetime(2027, 1, 1, tzinfo=tz),
    )
    # A project that activates each user's time zone (middleware) counts the same period in
    # the web process (402s, the meter) as the workers enforce: TIME_ZONE's.
    late = datetime(2026, 12, 31, 21, 0, tzinfo=tz)  # already next year in Kiritimati (+14)
    with timezone.override("Pacific/Kiritimati"):
        assert period_bounds("day", late) == (
            datetime(2026, 12, 31, tzinfo=tz),
            datetime(2027, 1, 1, tzinfo=tz),
        )
        assert period_bounds("month", late)[0] == datetime(2026, 12, 1, tzinfo=tz)


@pytest.mark.postgres
def test_runs_of_one_user_racing_the_cap_overshoot_by_at_most_one_call_each(
    user, settings, django_db_blocker
):
    """Two workers run two runs of one user at once: each checks before each call, so the
    user's spending ends at most one call per run past the cap."""
    settings.TASKS = QUEUE
    settings.AGENTIC_DJANGO_BUDGETS = {"user_tokens": 450}
    counters = [Counter(), Counter()]
    for index, counter in enumerate(counters):
        register(f"loop{index}", [calling("count", n) for n in range(1, 20)], [counter.tool])
    runs = [new_run(user, f"loop{index}", session_key=f"s{index}") for index in range(2)]
    barrier = threading.Barrier(2)

    def work(run: AgentRun) -> None:
        barrier.wait()
        try:
            execute(str(run.pk), task_id=f"w-{run.pk}")
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(run,)) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [reload(run).status for run in runs] == ["budget_exceeded"] * 2
    spent = AgentUsage.objects.filter(owner=user).aggregate(total=Sum("total_tokens"))["total"]
    assert 450 <= spent <= 450 + 2 * 100


# --- Calls cut short, races ------------------------------------------------------------------


def ending(status: str, tokens: tuple[int, int]) -> ModelStep:
    """A streamed call the provider ends with ``response.<status>`` (its usage billed): a
    model that ran into its output limit or a content filter ("incomplete")."""
    from agents.testing import assistant_message
    from agents.testing.model import _convert_output_items, _response_for_step
    from openai.types.responses import ResponseIncompleteEvent

    step = ModelStep(output=[assistant_message("partial")], usage=used(*tokens))
    response = _response_for_step(step, _convert_output_items(step.output))
    response.status = status

    async def events(call: Any) -> Any:
        yield ResponseIncompleteEvent(
            type=f"response.{status}", response=response, sequence_number=1
        )

    return ModelStep.stream(events)


def test_a_call_cut_short_is_paid_for_and_counts_against_the_budget(user, settings):
    """A call that ends "incomplete" (its output tokens used up: easy to provoke) fails its
    run, but the provider billed it: it is in the ledger, and the user's cap stops the next."""
    settings.TASKS = QUEUE
    settings.AGENTIC_DJANGO_BUDGETS = {"user_tokens": 1000}
    model = register("truncated", [ending("incomplete", (70, 4000)) for _ in range(2)])
    for number in range(2):
        run = new_run(user, "truncated", session_key=f"cut-{number}")
        execute(str(run.pk), task_id=f"w{number}")
    assert list(AgentUsage.objects.values_list("total_tokens", flat=True)) == [4070]
    assert len(model.calls) == 1  # the second run met the cap before its call


def test_a_call_that_answered_as_its_run_was_cancelled_is_in_the_ledger(user, settings):
    """The provider sent the end of the call (paid, its usage known) and the run is cancelled
    while its client still reads the stream: the call is recorded all the same."""
    from agents.testing.model import _stream_events_for_step

    settings.TASKS = QUEUE
    run = new_run(user, "cut")

    async def events(call: Any) -> Any:
        from agents.testing import assistant_message

        step = ModelStep(output=[assistant_message("done")], usage=used(70, 30))
        for event in _stream_events_for_step(step, preserve_raw_usage=False):
            yield event
        # The call ended; the user cancels while the last bytes are read.
        await sync_to_async(cancel_run)(run)
        for _ in range(int(PATIENCE / 0.05)):
            await asyncio.sleep(0.05)  # until the cancel reaches the run

    register("cut", [ModelStep.stream(events)])
    execute(str(run.pk), task_id="w1")

    assert AgentRun.objects.get(pk=run.pk).status == "cancelled"
    assert list(AgentUsage.objects.filter(run=run).values_list("total_tokens", flat=True)) == [100]


@pytest.mark.postgres
def test_the_live_attempts_row_survives_a_late_row_taking_its_number(user, settings):
    """An attempt that lost its run stores its late call while the attempt that holds the
    run stores its own: both read the same last number; the one that loses numbers again."""
    run = new_run(user, "counter")
    AgentRun.objects.filter(pk=run.pk).update(status="running", attempt=2)
    caller = usage.Caller.of(run)
    call = CallUsage(input_tokens=7, output_tokens=3, total_tokens=10)
    inserted = threading.Event()

    def row(fence: lifecycle.Fence) -> AgentUsage:
        return usage.call_row(
            fence, caller, turn=1, agent_name="a", model="m", provider="p", used=call
        )

    def late() -> None:
        with transaction.atomic():  # its row not committed until the live insert waits on it
            usage.store(lifecycle.Fence(run.pk, 1), row(lifecycle.Fence(run.pk, 1)))
            inserted.set()
            wait_for(lambda: lock_waiters() > 0, "the live insert to wait on the late row")

    thread = in_thread(late)
    assert inserted.wait(PATIENCE)
    live = usage.store(lifecycle.Fence(run.pk, 2), row(lifecycle.Fence(run.pk, 2)))
    thread.join(PATIENCE)
    assert live is not None and (live.sequence, live.superseded) == (2, False)
    rows = AgentUsage.objects.filter(run=run).order_by("sequence")
    assert [(row.attempt, row.superseded) for row in rows] == [(1, True), (2, False)]


def test_a_host_that_only_starts_like_a_cloud_api_is_a_server_of_your_own():
    assert usage.provider_of_url("https://api.openai.com.gateway.internal/v1") == (
        "api.openai.com.gateway.internal"
    )
    assert usage.provider_of_url("https://API.DeepSeek.com/v1") == "deepseek"
    assert usage.provider_of_url("https://api.moonshot.cn/v1") == "moonshotai"
    cost = usage.price("gpt-4o", "api.openai.com.gateway.internal", CallUsage(total_tokens=9))
    assert cost.cost is None


def test_budget_periods_without_time_zone_support(settings):
    settings.USE_TZ = False
    start, end = period_bounds("day", datetime(2026, 3, 8, 15, 30))
    assert (start, end) == (datetime(2026, 3, 8), datetime(2026, 3, 9))
