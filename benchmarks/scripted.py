"""The scripted agents every per-run benchmark times, and the SDK-only floors they are measured
against: only the Agents SDK and this directory's ``common``, so the same agents and floors run
in this project's processes and in the reference package's (``reference``).

``chat`` answers one message; ``tool`` calls one function tool, then answers. Each factory
builds a fresh agent and model (a scripted model consumes its steps), exactly like a project
factory builds a fresh agent per run.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents import Agent, Runner, SQLiteSession, function_tool
from agents.testing import ScriptedModel, assistant_message, function_call
from asgiref.sync import async_to_sync

from benchmarks import common

CHAT_REPLY = "Hello from the scripted model."
TOOL_REPLY = "2 + 3 = 5"

BARE = "Runner.run"
FLOOR = "Runner.run + SQLiteSession"
FLOOR_NORMAL = "Runner.run + SQLiteSession, synchronous=NORMAL"
# What the engine does around the SDK, minus Django: stream events, from sync code.
STREAMED = "Runner.run_streamed + SQLiteSession, synchronous=NORMAL"


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def build_chat() -> Agent:
    """One model call that answers with one message."""
    model = ScriptedModel([[assistant_message(CHAT_REPLY)]])
    return Agent(name="Bench chat", instructions="Answer briefly.", model=model)


def build_tool() -> Agent:
    """Two model calls: one function-tool call, then an answer."""
    model = ScriptedModel(
        [
            [function_call("add", {"a": 2, "b": 3}, call_id="call-add")],
            [assistant_message(TOOL_REPLY)],
        ]
    )
    return Agent(
        name="Bench tool",
        instructions="Use the add tool.",
        tools=[function_tool(add)],
        model=model,
    )


AGENTS: dict[str, Callable[[], Agent]] = {"chat": build_chat, "tool": build_tool}
REPLIES = {"chat": CHAT_REPLY, "tool": TOOL_REPLY}


def expect(agent_key: str, output: Any) -> None:
    """Fail unless ``output`` is what ``agent_key``'s script answers."""
    if output != REPLIES[agent_key]:
        raise AssertionError(f"unexpected final output {output!r}")


def run_check(run: Any, agent_key: str) -> common.Check:
    """A check that ``run`` (an ``AgentRun``, this project's or the reference's) completed
    with the scripted answer."""

    def check() -> None:
        run.refresh_from_db()
        if run.status != type(run).Status.COMPLETED:
            raise AssertionError(f"run {run.id} is {run.status}: {run.error}")
        expect(agent_key, run.final_output)

    return check


def timed(
    variants: list[common.Variant], *, runs: int, block: int, warmup: int, queried: tuple[str, ...]
) -> dict[str, Any]:
    """Each variant's median (ms) and block medians, and the statements per run of those
    ``queried``, for ``compare_reference``."""
    timings = common.interleave(variants, runs=runs, block=block, warmup=warmup)
    report = {
        variant.name: {
            "median_ms": timings.stats(variant.name).median_ms,
            "blocks": timings.block_medians[variant.name],
        }
        for variant in variants
    }
    for variant in variants:
        if variant.name in queried:
            report[variant.name]["queries"] = common.count_queries(variant).per_call
    return report


class NormalSQLiteSession(SQLiteSession):
    """The SDK's SQLiteSession with the project database's durability setting."""

    @staticmethod
    def _configure_connection(conn: Any) -> None:
        SQLiteSession._configure_connection(conn)
        conn.execute("PRAGMA synchronous=NORMAL")


def sdk_variants(agent_key: str, workdir: Path) -> list[common.Variant]:
    """``Runner.run`` without memory, with the SDK's ``SQLiteSession`` on a file (as the SDK
    configures it, and with ``synchronous=NORMAL``), and streamed through ``async_to_sync``."""
    factory = AGENTS[agent_key]
    sqlite_path = workdir / f"sdk-sessions-{agent_key}.sqlite3"
    normal_path = workdir / f"sdk-sessions-normal-{agent_key}.sqlite3"

    def bare() -> common.Check:
        result = Runner.run_sync(factory(), "Hi")
        return lambda: expect(agent_key, result.final_output)

    def with_session(session_class: type[SQLiteSession], path: Path) -> common.Call:
        def call() -> common.Check:
            session = session_class(uuid.uuid4().hex, db_path=path)
            try:
                result = Runner.run_sync(factory(), "Hi", session=session)
            finally:
                session.close()
            return lambda: expect(agent_key, result.final_output)

        return call

    async def streamed(session: Any) -> Any:
        result = Runner.run_streamed(factory(), "Hi", session=session)
        async for _ in result.stream_events():
            pass
        return result

    def streamed_sqlite() -> common.Check:
        session = NormalSQLiteSession(uuid.uuid4().hex, db_path=normal_path)
        try:
            result = async_to_sync(streamed)(session)
        finally:
            session.close()
        return lambda: expect(agent_key, result.final_output)

    return [
        common.Variant(BARE, bare),
        common.Variant(FLOOR, with_session(SQLiteSession, sqlite_path)),
        common.Variant(FLOOR_NORMAL, with_session(NormalSQLiteSession, normal_path)),
        common.Variant(STREAMED, streamed_sqlite),
    ]
