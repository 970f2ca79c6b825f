"""The agent of ``test_many_runs``, for worker processes started by that test.

Agent "crowd" calls ``tally`` once, then answers. ``tally`` writes its idempotency key to the
file ``TOOL_LOG`` names -- the outside world that sees every call. While the file
``HOLD_FILE`` names exists, the model holds its second turn (after the call), so the test can
kill the worker with every run in flight there -- all but a run whose message is ``QUICK``,
which answers at once. The model decides from the history, as a real
one does, so a retried run that already has the call's output answers.

Agent "blocker" calls ``block_the_loop``, an async tool that blocks its event loop (a sync
wait inside it) until the file ``RELEASE_FILE`` names exists. Agent "leaver" calls
``leave_a_task``, which starts a task it never awaits; that task writes "cancelled" to the
file ``LEFTOVER_LOG`` names when it is cancelled.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from agents import Agent, RunContextWrapper, function_tool
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call

from agentic_django.toolcalls import idempotency_key

ANSWER = "Counted."
QUICK = "quick"


@function_tool
def tally(context: RunContextWrapper[Any]) -> str:
    """Count this conversation once."""
    with open(os.environ["TOOL_LOG"], "a") as log:
        log.write(f"{idempotency_key(context)}\n")
    return "counted"


def _has_output(items: Any) -> bool:
    return any(
        isinstance(item, dict) and item.get("type") == "function_call_output"
        for item in (items if isinstance(items, list) else [])
    )


def _asks_quickly(items: Any) -> bool:
    return any(
        isinstance(item, dict) and item.get("role") == "user" and item.get("content") == QUICK
        for item in (items if isinstance(items, list) else [])
    )


async def _decide(call: Any) -> list[Any]:
    if not _has_output(call.input):
        return [function_call("tally", {}, call_id=f"tally-{uuid.uuid4().hex[:8]}")]
    while os.path.exists(os.environ["HOLD_FILE"]) and not _asks_quickly(call.input):
        await asyncio.sleep(0.05)  # killed in here
    return [assistant_message(ANSWER)]


def build_crowd() -> Agent:
    model = ScriptedModel([ModelStep.respond(_decide) for _ in range(4)])
    return Agent(name="Crowd", instructions="Test.", model=model, tools=[tally])


@function_tool
async def block_the_loop() -> str:
    """Wait, the wrong way."""
    deadline = time.monotonic() + 120
    while not os.path.exists(os.environ["RELEASE_FILE"]) and time.monotonic() < deadline:
        time.sleep(0.05)  # the point: a sync wait on the event loop
    return "released"


async def _linger() -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        with open(os.environ["LEFTOVER_LOG"], "a") as log:
            log.write("cancelled\n")
        raise


_lingering: set[asyncio.Task[None]] = set()


@function_tool
async def leave_a_task() -> str:
    """Start something and never wait for it."""
    task = asyncio.create_task(_linger())
    _lingering.add(task)
    task.add_done_callback(_lingering.discard)
    return "left"


def build_caller(tool: Any) -> Callable[[], Agent]:
    """An agent that calls ``tool`` once, then answers."""

    def build() -> Agent:
        async def decide(call: Any) -> list[Any]:
            if not _has_output(call.input):
                return [function_call(tool.name, {}, call_id=f"c-{uuid.uuid4().hex[:8]}")]
            return [assistant_message(ANSWER)]

        model = ScriptedModel([ModelStep.respond(decide) for _ in range(3)])
        return Agent(name="Caller", instructions="Test.", model=model, tools=[tool])

    return build


def get_agent_registry() -> dict[str, Callable[[], Any]]:
    return {
        "crowd": build_crowd,
        "blocker": build_caller(block_the_loop),
        "leaver": build_caller(leave_a_task),
    }
