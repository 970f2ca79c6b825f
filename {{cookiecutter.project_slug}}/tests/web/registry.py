"""Registry for the web and browser tests: the sample agents plus a model that always fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2
import openai
from agents import Agent
from agents.testing import ModelStep, ScriptedModel

from chat.registry import get_agent_registry as sample_registry

# What the provider says (never shown to users) and what users see instead.
PROVIDER_TEXT = "upstream pool exhausted for org-4711"
MODEL_ERROR = "The model provider had an error (HTTP 500). Try again shortly."


def provider_error() -> openai.InternalServerError:
    request = httpx2.Request("POST", "https://llm.example/v1/responses")
    return openai.InternalServerError(
        PROVIDER_TEXT, response=httpx2.Response(500, request=request), body=None
    )


def build_broken() -> Agent:
    return Agent(
        name="Broken",
        model=ScriptedModel([ModelStep.raise_error(provider_error())]),
    )


def get_agent_registry() -> dict[str, Callable[[], Any]]:
    return {**sample_registry(), "broken": build_broken}
