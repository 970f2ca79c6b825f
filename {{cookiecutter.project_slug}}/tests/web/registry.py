"""Registry for the web and browser tests: the sample agents plus a model that always fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agents import Agent
from agents.testing import ModelStep, ScriptedModel

from chat.registry import get_agent_registry as sample_registry

MODEL_ERROR = "the model service is unavailable"


def build_broken() -> Agent:
    return Agent(
        name="Broken",
        model=ScriptedModel([ModelStep.raise_error(RuntimeError(MODEL_ERROR))]),
    )


def get_agent_registry() -> dict[str, Callable[[], Any]]:
    return {**sample_registry(), "broken": build_broken}
