"""Log lines name the run they were logged for (``agentic_django.logcontext``), as text or as
one JSON object per line (``LOG_FORMAT=json``)."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agentic_django import lifecycle, logcontext, recovery
from agentic_django.execution import execute
from agentic_django.models import AgentRun, AgentSession, AgentSpan
from tests.core.conftest import call, text
from tests.waiting import PATIENCE, in_thread

RUN_FIELDS = ("run_id", "attempt", "session", "trace_id")
tool_log = logging.getLogger("tests.tool")


@pytest.fixture
def json_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The root logger's lines as ``LOG_FORMAT=json`` writes them, parsed."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logcontext.JsonFormatter())
    handler.addFilter(logcontext.ContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)


def noting_tool(barrier: threading.Barrier | None = None) -> Any:
    from agents import function_tool

    @function_tool
    def note(tag: str) -> str:
        """Note the tag."""
        if barrier is not None:
            barrier.wait()  # the runs overlap: each holds here until the other arrives
        tool_log.info("noted %s", tag)
        return "noted"

    return note


def register_agent(key: str, steps: list[Any], tools: list[Any]) -> None:
    from agents import Agent
    from agents.testing import ScriptedModel

    from tests.core import registry

    model = ScriptedModel(steps)
    registry.FACTORIES[key] = lambda: Agent(
        name=key, instructions="Test.", model=model, tools=tools
    )


def stored_run(user: Any, key: str) -> AgentRun:
    """A pending run, left for ``execute`` (this process's startup recovery has run, so it
    does not dispatch the run by itself)."""
    recovery.ensure_startup_recovery()
    session = AgentSession.objects.create(owner=user, session_key=f"session-{key}")
    return AgentRun.objects.create(session=session, owner=user, agent_key=key, input_payload="go")


@pytest.mark.django_db(transaction=True)
def test_every_line_logged_while_a_run_executes_names_it(user, json_lines):
    from agents.testing import ModelStep

    steps = [call("note", {"tag": "a"}), ModelStep.raise_error(RuntimeError("model broke"))]
    register_agent("failing", steps, [noting_tool()])
    run = stored_run(user, "failing")
    assert execute(str(run.pk)) == "failed"
    logging.getLogger("tests.after").info("after the run")

    lines = json_lines()
    tool_line = next(line for line in lines if line["logger"] == "tests.tool")
    engine_line = next(line for line in lines if line["message"].endswith(" failed"))
    for line in (tool_line, engine_line):  # one from the tool, one from the engine's loop
        assert {name: line[name] for name in RUN_FIELDS[:3]} == {
            "run_id": str(run.pk),
            "attempt": 1,
            "session": "session-failing",
        }
    # The trace the run inspector stored for this attempt (agentic_django.tracing).
    [trace_id] = AgentSpan.objects.filter(run=run, kind="trace").values_list("trace_id", flat=True)
    assert tool_line["trace_id"] == engine_line["trace_id"] == trace_id
    assert "RuntimeError: model broke" in engine_line["exc_info"]
    assert engine_line["level"] == "ERROR" and engine_line["time"].endswith("+00:00")
    after = next(line for line in lines if line["logger"] == "tests.after")
    assert not set(RUN_FIELDS) & set(after)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("claimed_by", ["process", "worker"])
def test_runs_executing_side_by_side_keep_their_own_fields(
    user, json_lines, claimed_by, monkeypatch, settings
):
    if claimed_by == "worker":
        # A worker's claim under the "auto" limit reads the conversation's key with its row
        # (PostgreSQL; SQLite claims the same way in every process).
        monkeypatch.setattr(lifecycle, "claims_hold_slots", True)
        settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = None
    barrier = threading.Barrier(2, timeout=PATIENCE)
    runs = {}
    for tag in ("a", "b"):
        register_agent(tag, [call("note", {"tag": tag}), text("done")], [noting_tool(barrier)])
        runs[tag] = stored_run(user, tag)
    threads = [in_thread(lambda run=run: execute(str(run.pk))) for run in runs.values()]
    for thread in threads:
        thread.join(PATIENCE)
    assert [run.status for run in AgentRun.objects.order_by("agent_key")] == ["completed"] * 2

    noted = {line["message"]: line for line in json_lines() if line["logger"] == "tests.tool"}
    for tag, run in runs.items():
        line = noted[f"noted {tag}"]
        assert (line["run_id"], line["session"]) == (str(run.pk), f"session-{tag}")


def test_text_lines_show_the_bound_fields_and_nested_binds_add_to_them():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    formatter = logcontext.TextFormatter("%(levelname)s %(message)s")
    with logcontext.bind(run_id="r1", attempt=2, session="s", trace_id=""):
        assert formatter.format(record) == "INFO hello [run_id=r1 attempt=2 session=s]"
        with logcontext.bind(trace_id="trace_9"):
            assert formatter.format(record).endswith("session=s trace_id=trace_9]")
        assert logcontext.current()["trace_id"] == ""
    assert formatter.format(record) == "INFO hello"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "oops", None, sys.exc_info())
    with logcontext.bind(run_id="r1"):
        first, *traceback = formatter.format(failed).splitlines()
    assert first == "ERROR oops [run_id=r1]" and traceback[-1] == "ValueError: boom"
    # A client's session key is one quoted value: it cannot forge a line of its own.
    forged = "s\nERROR run x failed"
    with logcontext.bind(run_id="r1", session=forged):
        assert formatter.format(record) == 'INFO hello [run_id=r1 session="s\\nERROR run x failed"]'
    with logcontext.bind(session="s\u3164run_id=r9"):  # a blank that is "printable"
        assert formatter.format(record) == 'INFO hello [session="s\\u3164run_id=r9"]'
