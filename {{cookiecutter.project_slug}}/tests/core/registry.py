"""A test agent registry: agents backed by the SDK's ScriptedModel, scripted per test."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agents import Agent
from agents.testing import ScriptedModel, assistant_message

# Tests add factories here through the ``agents_registry`` fixture (see conftest.py).
FACTORIES: dict[str, Callable[[], Any]] = {}
DEMO_REPLY = "Hello from the demo agent!"


def build_demo() -> Agent:
    return Agent(
        name="Demo",
        instructions="Greet the user.",
        model=ScriptedModel([[assistant_message(DEMO_REPLY)]]),
    )


def get_agent_registry() -> dict[str, Callable[[], Any]]:
    return {"demo": build_demo, **FACTORIES}
