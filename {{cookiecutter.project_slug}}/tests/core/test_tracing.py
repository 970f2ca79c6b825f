"""The run inspector's record: every span the SDK traces for a run is stored once, linked to
the run and its attempt, only while the attempt holds its run; a retried or resumed run keeps
its attempts apart; inputs and outputs only when sensitive data is kept.

A worker dies here as ``SystemExit`` raised at a chosen statement or tool (see
``test_retries``): what is left in the database is what a SIGKILL there leaves.
"""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from agents import Agent, GenerationSpanData, custom_span, function_tool
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call

from agentic_django import inspector, recovery, tracing
from agentic_django.execution import execute
from agentic_django.models import AgentRun, AgentSession, AgentSpan
from agentic_django.services import approve_tool_call
from tests.core import registry
from tests.core.conftest import call, register, used, worker_died
from tests.core.faults import database_faults
from tests.waiting import PATIENCE

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
SPAN_INSERT = r'^INSERT (OR IGNORE )?INTO "agentic_django_agentspan"'


def new_run(user: Any, key: str) -> AgentRun:
    session = AgentSession.objects.get_or_create(owner=user, session_key="traced")[0]
    return AgentRun.objects.create(
        session=session, owner=user, agent_key=key, input_payload="look it up"
    )


def reload(run: AgentRun) -> AgentRun:
    return AgentRun.objects.get(pk=run.pk)


def spans(run: AgentRun) -> list[AgentSpan]:
    return list(AgentSpan.objects.filter(run=run).order_by("started_at", "id"))


def register_desk(lookups: list[str], *, kill_in_tool: bool = False) -> None:
    """ "Desk" looks something up, then hands off to "Expert", who answers."""

    @function_tool
    def lookup(topic: str) -> str:
        """Look up a topic."""
        lookups.append(topic)
        if kill_in_tool and len(lookups) == 1:
            raise SystemExit("worker killed in the tool")
        return f"notes on {topic}"

    def build() -> Agent:
        expert = Agent(
            name="Expert",
            instructions="Answer.",
            model=ScriptedModel([[assistant_message("the answer")]] * 3),
        )
        return Agent(
            name="Desk",
            instructions="Look it up, then hand off.",
            model=ScriptedModel(
                [
                    [function_call("lookup", {"topic": "tides"}, call_id="c1")],
                    [function_call("transfer_to_expert", {}, call_id="c2")],
                ]
                * 3
            ),
            tools=[lookup],
            handoffs=[expert],
        )

    registry.FACTORIES["desk"] = build


def test_a_run_with_a_tool_call_and_a_handoff_is_traced_once_step_by_step(user, settings):
    settings.TASKS = QUEUE
    lookups: list[str] = []
    register_desk(lookups)
    run = new_run(user, "desk")

    execute(str(run.pk), task_id="w1")

    run = reload(run)
    assert run.status == "completed"
    found = spans(run)
    kinds = Counter(span.kind for span in found)
    assert kinds["trace"] == 1
    assert kinds["function"] == 1
    assert kinds["handoff"] == 1
    assert {span.name for span in found if span.kind == "agent"} == {"Desk", "Expert"}
    [root] = [span for span in found if span.kind == "trace"]
    assert (root.name, root.span_id, root.attempt) == ("desk", root.trace_id, 1)
    assert root.data == {"group_id": "traced"}
    # One tree: every span hangs under a span of the same trace.
    ids = {span.span_id for span in found}
    assert all(span.parent_id in ids for span in found if span is not root)
    assert all(span.ended_at is not None and span.error is None for span in found)
    [tool] = [span for span in found if span.kind == "function"]
    assert (tool.name, tool.data["input"], tool.data["output"]) == (
        "lookup",
        '{"topic":"tides"}',
        "notes on tides",
    )
    [handoff] = [span for span in found if span.kind == "handoff"]
    assert handoff.data == {"from_agent": "Desk", "to_agent": "Expert"}


def test_a_retried_run_keeps_what_its_dead_attempt_traced_and_traces_each_step_once(
    user, settings, monkeypatch
):
    """The first attempt's worker dies in its second model call: what it traced by then (the
    lookup) stays as attempt 1's, the retry resumes after the lookup and traces the rest."""
    settings.TASKS = QUEUE
    monkeypatch.setattr(tracing, "FLUSH_SECONDS", 0)  # write at every turn's end
    lookups: list[str] = []
    died = []

    def handoff_or_die(model_call: Any) -> Any:
        if not died:
            # What the database holds when the worker dies (read from another thread: this
            # is the run's event loop).
            with ThreadPoolExecutor(1) as reader:
                died.append(reader.submit(lambda: spans(run)).result())
            raise SystemExit("worker killed in a model call")
        return [function_call("transfer_to_expert", {}, call_id="c2")]

    from agents.testing import ModelStep

    @function_tool
    def lookup(topic: str) -> str:
        """Look up a topic."""
        lookups.append(topic)
        return f"notes on {topic}"

    expert = Agent(
        name="Expert", instructions="-", model=ScriptedModel([[assistant_message("ok")]])
    )
    desk_model = ScriptedModel(
        [
            [function_call("lookup", {"topic": "tides"}, call_id="c1")],
            ModelStep.respond(handoff_or_die),
            ModelStep.respond(handoff_or_die),
        ]
    )
    registry.FACTORIES["desk"] = lambda: Agent(
        name="Desk", instructions="-", model=desk_model, tools=[lookup], handoffs=[expert]
    )
    run = new_run(user, "desk")
    with pytest.raises(SystemExit):
        execute(str(run.pk), task_id="w1")
    [at_death] = died
    worker_died(reload(run))
    assert recovery.recover_runs(mode="requeue", dispatch=False) == 1
    execute(str(run.pk), task_id="w2")

    run = reload(run)
    assert (run.status, lookups) == ("completed", ["tides"])
    found = spans(run)
    # Attempt 1 had written its first turn (the lookup) when it died; it is still there.
    assert [(s.attempt, s.name) for s in at_death if s.kind == "function"] == [(1, "lookup")]
    assert {span.span_id for span in at_death} <= {span.span_id for span in found}
    by_attempt = {n: [s for s in found if s.attempt == n] for n in (1, 2)}
    assert [s.name for s in by_attempt[1] if s.kind == "function"] == ["lookup"]
    assert [s.kind for s in by_attempt[2] if s.kind in ("function", "handoff")] == ["handoff"]
    # Each attempt is a trace of its own; the retry's, first written mid-run, got its end.
    roots = {s.attempt: s for s in found if s.kind == "trace"}
    assert sorted(roots) == [1, 2]
    assert roots[2].ended_at is not None
    assert len({s.span_id for s in found}) == len(found)


def test_an_approval_pause_and_its_resumption_are_two_traces(user, settings, refunds):
    settings.TASKS = QUEUE
    steps = [call("refund", {"order": "42"}, call_id="c1"), [assistant_message("refunded")]]
    register("clerk", steps, [refunds.tool])
    run = new_run(user, "clerk")
    execute(str(run.pk), task_id="w1")
    assert reload(run).status == "awaiting_approval"
    approve_tool_call(reload(run), "c1")
    execute(str(run.pk), task_id="w2")

    run = reload(run)
    assert (run.status, refunds.done) == ("completed", ["42"])
    found = spans(run)
    roots = [s for s in found if s.kind == "trace"]
    assert [r.attempt for r in roots] == [1, 2]
    assert all(r.ended_at is not None for r in roots)
    # The call that asked for approval (no output), then the call itself once approved.
    assert [(s.attempt, s.name, s.data["output"]) for s in found if s.kind == "function"] == [
        (1, "refund", None),
        (2, "refund", "refunded 42"),
    ]
    assert len({s.span_id for s in found}) == len(found)


def test_an_attempt_that_lost_its_run_stores_nothing(user, settings):
    """Recovery takes the run over while the attempt's tool runs: the attempt's spans are
    not the run's story (the retry tells it)."""
    settings.TASKS = QUEUE
    lookups: list[str] = []

    @function_tool
    def lookup(topic: str) -> str:
        """Look up a topic (meanwhile, the run is taken over)."""
        lookups.append(topic)
        run = AgentRun.objects.get(agent_key="desk")
        worker_died(run)
        recovery.recover_runs(mode="requeue", dispatch=False)
        return "notes"

    model = ScriptedModel(
        [[function_call("lookup", {"topic": "t"}, call_id="c1")], [assistant_message("ok")]]
    )
    registry.FACTORIES["desk"] = lambda: Agent(
        name="Desk", instructions="-", model=model, tools=[lookup]
    )
    run = new_run(user, "desk")
    execute(str(run.pk), task_id="w1")

    assert reload(run).status == "pending"
    assert spans(run) == []


def test_without_sensitive_data_spans_keep_names_and_timings_only(user, settings):
    settings.TASKS = QUEUE
    settings.AGENTIC_DJANGO_TRACING = {"include_sensitive_data": False}
    register_desk([])
    run = new_run(user, "desk")
    execute(str(run.pk), task_id="w1")

    found = spans(run)
    [tool] = [span for span in found if span.kind == "function"]
    assert tool.name == "lookup" and tool.ended_at is not None
    assert "input" not in tool.data and "output" not in tool.data
    assert "tides" not in str([span.data for span in found])


def test_tracing_turned_off_stores_nothing(user, settings):
    settings.TASKS = QUEUE
    settings.AGENTIC_DJANGO_TRACING = {"enabled": False}
    register_desk([])
    run = new_run(user, "desk")
    execute(str(run.pk), task_id="w1")

    assert reload(run).status == "completed"
    assert spans(run) == []


def test_a_database_error_storing_spans_leaves_the_run_alone(user, settings, caplog):
    from django.db import OperationalError

    settings.TASKS = QUEUE
    register_desk([])
    run = new_run(user, "desk")
    with database_faults() as faults:
        # Every write fails (a slow run also writes at a turn's end, before the final one).
        faults.fail(SPAN_INSERT, OperationalError("connection lost"), times=float("inf"))
        execute(str(run.pk), task_id="w1")

    run = reload(run)
    assert (run.status, run.final_output) == ("completed", "the answer")
    assert spans(run) == []
    assert "could not store" in caplog.text


def test_a_run_that_times_out_in_a_hung_tool_keeps_its_trace(user, settings):
    """A tool hangs past the run's timeout: the run fails at once, and its trace shows the
    tool it waited on (the SDK ends the tool's span when it gives up on it)."""
    settings.TASKS = QUEUE
    settings.AGENTIC_DJANGO_RUN_TIMEOUT = 1
    release = threading.Event()

    @function_tool
    def hang(topic: str) -> str:
        """Hang until released."""
        release.wait(PATIENCE)
        return "late"

    model = ScriptedModel([[function_call("hang", {"topic": "t"}, call_id="c1")]])
    registry.FACTORIES["hung"] = lambda: Agent(
        name="Hung", instructions="-", model=model, tools=[hang]
    )
    run = new_run(user, "hung")
    try:
        execute(str(run.pk), task_id="w1")
    finally:
        release.set()

    assert reload(run).status == "failed"
    found = spans(run)
    [tool] = [span for span in found if span.kind == "function"]
    [root] = [span for span in found if span.kind == "trace"]
    assert tool.name == "hang"
    assert root.ended_at is not None and tool.ended_at is not None


def register_clerk(tool: Any, arguments: dict[str, Any]) -> None:
    """ "Clerk" calls ``tool`` once (100 tokens), then answers "done" (100 tokens)."""
    call = function_call(tool.name, arguments, call_id="c1")
    answer = assistant_message("done")
    register("clerk", [ModelStep(output=[call], usage=used(70, 30)),
                       ModelStep(output=[answer], usage=used(80, 20))], [tool])  # fmt: skip


def test_odd_text_in_span_names_and_ids_neither_fails_the_run_nor_loses_its_trace(user, settings):
    """A NUL or a lone surrogate in a span's name (a provider's model name, a tool's custom
    span) and an id longer than the column: each stored as text the database takes."""
    settings.TASKS = QUEUE

    @function_tool
    def lookup(topic: str) -> str:
        """Look up, in traced steps with odd names."""
        with (
            custom_span("step \ud800"),
            custom_span("step \x00"),
            custom_span("long id", span_id="span_" + "a" * 80),
        ):
            return "notes"

    register_clerk(lookup, {"topic": "x"})
    run = new_run(user, "clerk")
    execute(str(run.pk), task_id="w1")

    run = reload(run)
    assert (run.status, run.final_output) == ("completed", "done")
    names = sorted(span.name for span in spans(run) if span.kind == "custom")
    assert names[0] == "long id"
    assert [name.strip("\ufffd") for name in names[1:]] == ["step ", "step "]
    assert {"trace", "agent", "turn", "function"} <= {span.kind for span in spans(run)}


@pytest.mark.parametrize("failing", ["a turn's write", "the final write"])
def test_a_span_write_that_meets_a_dropped_connection_is_made_again(
    user, settings, monkeypatch, failing
):
    """A write is tried once more on a fresh connection; a turn's batch that still fails goes
    with the next write: the run's trace is whole, and ends as the run did."""
    from django.db import OperationalError

    settings.TASKS = QUEUE
    # Every turn's end writes, or only the attempt's end does.
    monkeypatch.setattr(tracing, "FLUSH_SECONDS", 0 if failing == "a turn's write" else 1e9)
    monkeypatch.setattr(tracing, "FLUSH_SPANS", 10**6)

    @function_tool
    def lookup(topic: str) -> str:
        """Look up."""
        return "notes"

    register_clerk(lookup, {"topic": "tides"})
    run = new_run(user, "clerk")
    with database_faults() as faults:
        # A turn's write fails on the fresh connection too; the final write gets one.
        times = 2 if failing == "a turn's write" else 1
        faults.fail(SPAN_INSERT, OperationalError("server closed the connection"), times=times)
        execute(str(run.pk), task_id="w1")

    run = reload(run)
    assert (run.status, run.attempt) == ("completed", 1)
    found = spans(run)
    assert [span.name for span in found if span.kind == "function"] == ["lookup"]
    assert [span.name for span in found if span.kind == "turn"] == ["turn 1", "turn 2"]
    [root] = [span for span in found if span.kind == "trace"]
    assert root.ended_at is not None
    assert [section.ending for section in inspector.inspect(run).sections] == ["Completed"]


def test_without_sensitive_data_a_custom_span_keeps_its_name_and_turns_their_cost(user, settings):
    settings.TASKS = QUEUE
    settings.AGENTIC_DJANGO_TRACING = {"include_sensitive_data": False}
    settings.AGENTIC_DJANGO_MODEL_PRICES = {"scripted": {"input": "3", "output": "15"}}

    @function_tool
    def lookup(topic: str) -> str:
        """Look up, in a traced step of its own."""
        with custom_span("search", {"query": topic, "hits": f"notes on {topic}"}):
            return f"notes on {topic}"

    register_clerk(lookup, {"topic": "patient-4711"})
    run = new_run(user, "clerk")
    execute(str(run.pk), task_id="w1")

    [search] = [span for span in spans(run) if span.kind == "custom"]
    assert (search.name, search.data) == ("search", {})
    assert "patient-4711" not in str([(span.data, span.error) for span in spans(run)])
    # Each turn shows what the ledger says its model call cost.
    steps = [step for section in inspector.inspect(run).sections for step in section.steps]
    turns = [step for step in steps if step.span.kind == "turn"]
    assert [step.tokens for step in turns] == [100, 100]


def test_a_spans_data_is_kept_within_a_bound_and_without_the_model_servers_address():
    # A model call late in a long conversation: its input is the whole conversation.
    history = [{"role": "user", "content": f"message {n}: " + "x" * 5_000} for n in range(100)]
    stored = tracing._storable({"input": history})
    assert len(json.dumps(stored)) <= tracing.MAX_SPAN_BYTES
    assert stored["input"][0] == "… 80 earlier"
    assert stored["input"][-1]["content"].startswith("message 99: ")
    wide = {f"key {n}": "y" * 2_000 for n in range(100)}
    assert "too large to keep" in tracing._storable(wide)["cut"]
    assert tracing._storable({"output": "short"}) == {"output": "short"}

    config = {"base_url": "http://vllm.internal:8000/v1", "temperature": 0.2}
    _kind, _name, data = tracing.describe(
        GenerationSpanData(model="m", model_config=config), sensitive=True
    )
    assert data["model_config"] == {"temperature": 0.2}


def test_trace_cleanup_prunes_whole_traces_of_runs_no_longer_in_progress(user):
    from django.core.management import call_command
    from django.utils import timezone

    now = timezone.now()

    def traced(status: str, started_ago: timedelta) -> AgentRun:
        run = new_run(user, "desk")
        AgentRun.objects.filter(pk=run.pk).update(status=status)
        began = now - started_ago
        rows = [
            AgentSpan(run=run, attempt=1, trace_id="t", span_id="t", kind="trace", name="desk",
                      started_at=began, ended_at=began + timedelta(seconds=60))
        ]  # fmt: skip
        rows += [
            AgentSpan(run=run, attempt=1, trace_id="t", span_id=f"s{n}", parent_id="t",
                      kind="function", name="lookup", started_at=began + timedelta(seconds=n * 20))
            for n in range(4)
        ]  # fmt: skip
        AgentSpan.objects.bulk_create(rows)
        return run

    waiting = traced("awaiting_approval", timedelta(days=3))
    # A trace across the cutoff: its root is older, its last steps are not.
    done = traced("completed", timedelta(days=2, seconds=30))
    recent = traced("completed", timedelta(days=1))
    orphan = AgentSpan.objects.create(
        run=recent, attempt=1, trace_id="gone", span_id="o", kind="function", name="lookup",
        started_at=now - timedelta(days=5),
    )  # fmt: skip

    call_command("agentic_django_cleanup", "--trace-days", "2", stdout=io.StringIO())

    assert AgentSpan.objects.filter(run=waiting).count() == 5
    assert AgentSpan.objects.filter(run=done).count() == 0
    assert AgentSpan.objects.filter(run=recent).count() == 5
    assert not AgentSpan.objects.filter(pk=orphan.pk).exists()
