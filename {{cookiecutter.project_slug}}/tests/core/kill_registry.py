"""The agent of ``test_tool_kill``, for worker processes started by that test.

Agent "tickets" asks, in its first turn, for two equal charges (two tickets at $5) and an order
lookup, naming the calls anew in every process (as a model asked again does); then it answers.
``charge`` has a side effect and is not declared repeatable; ``lookup`` is. Each tool writes
``<tool> <idempotency key>`` to the file ``TOOL_LOG`` names when it starts -- the outside
world that sees every call -- and, while ``HANG_TOOLS`` is set, never returns, so the test can
kill the worker inside them.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from agents import Agent, RunContextWrapper, function_tool
from agents.testing import ScriptedModel, assistant_message, function_call

from agentic_django.toolcalls import idempotency_key, repeatable

ANSWER = "Two tickets bought."


def _touch_world(name: str, context: RunContextWrapper[Any]) -> None:
    with open(os.environ["TOOL_LOG"], "a") as log:
        log.write(f"{name} {idempotency_key(context)}\n")
    while os.environ.get("HANG_TOOLS"):
        time.sleep(0.1)  # killed in here


@function_tool
def charge(context: RunContextWrapper[Any], cents: int) -> str:
    """Charge the customer's card."""
    _touch_world("charge", context)
    return f"charged {cents}"


@repeatable
@function_tool
def lookup(context: RunContextWrapper[Any], order: str) -> str:
    """Look an order up."""
    _touch_world("lookup", context)
    return f"order {order} found"


def build_tickets() -> Agent:
    calls = uuid.uuid4().hex[:8]  # a model asked again names its calls anew
    model = ScriptedModel(
        [
            [
                function_call("charge", {"cents": 500}, call_id=f"first-{calls}"),
                function_call("charge", {"cents": 500}, call_id=f"second-{calls}"),
                function_call("lookup", {"order": "7"}, call_id=f"lookup-{calls}"),
            ],
            [assistant_message(ANSWER)],
        ]
    )
    return Agent(name="Tickets", instructions="Test.", model=model, tools=[charge, lookup])


def get_agent_registry() -> dict[str, Callable[[], Any]]:
    return {"tickets": build_tickets}
