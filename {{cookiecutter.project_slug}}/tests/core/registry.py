"""A test agent registry: agents backed by the SDK's ScriptedModel, scripted per test."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agents import Agent
from agents.testing import ScriptedModel, assistant_message

# Tests register extra factories here (see the ``agent_registry`` fixture).
FACTORIES: dict[str, Callable[[], Any]] = {}


def build_demo() -> Agent:
    return Agent(
        name="Demo",
        instructions="Greet the user.",
        model=ScriptedModel([[assistant_message("Hello from the demo agent!")]]),
    )


def get_agent_registry() -> dict[str, Callable[[], Any]]:
    return {"demo": build_demo, **FACTORIES}
