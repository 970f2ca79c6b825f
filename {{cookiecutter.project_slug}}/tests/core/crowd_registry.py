"""The agent of ``test_many_runs``, for worker processes started by that test.

Agent "crowd" calls ``tally`` once, then answers. ``tally`` writes its idempotency key to the
file ``TOOL_LOG`` names -- the outside world that sees every call. While the file
``HOLD_FILE`` names exists, the model holds its second turn (after the call), so the test can
kill the worker with every run in flight there -- all but a run whose message is ``QUICK``,
which answers at once. The model decides from the history, as a real
one does, so a retried run that already has the call's output answers.
"""

from __future__ import annotations

import asyncio
import os
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


def get_agent_registry() -> dict[str, Callable[[], Any]]:
    return {"crowd": build_crowd}
