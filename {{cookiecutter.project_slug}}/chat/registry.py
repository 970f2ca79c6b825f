"""The agents this project offers: start here to add your own.

`AGENTIC_DJANGO_AGENT_REGISTRY` points at `get_agent_registry`, which maps an agent key (what
runs store and API clients send as `agent_key`) to a factory building a fresh `Agent` per run.
Every sample agent gets its model from `build_model()` (chat/providers.py): the offline
`DemoModel` until `.env` sets `OPENAI_API_KEY` or `OPENAI_BASE_URL`, then `OPENAI_MODEL` on
OpenAI or on any OpenAI-compatible server.

The web process imports this module too, to check the agent key of each run it creates, but
never runs an agent: the factories import the Agents SDK, the model and the tools when they
build one (in the worker), so the web process never loads the SDK. Import `agents`, and the
modules that import it, inside your factories too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agents import Agent


def build_toolsmith() -> Agent:
    """An agent that answers with its function tools: time, arithmetic, units, word counts."""
    from agents import Agent

    from chat.providers import build_model, model_settings  # build_model applies OPENAI_TRACING
    from chat.tools import TOOLS

    return Agent(
        name="Toolsmith",
        handoff_description="Uses tools for the current time, arithmetic, unit conversion "
        "and word counts.",
        instructions=(
            "You answer precisely using your tools. Always call a tool for the current time, "
            "arithmetic, unit conversions and counting words; never guess those. "
            "Reply briefly in Markdown."
        ),
        tools=TOOLS,
        model=build_model(),
        model_settings=model_settings(),
    )


def build_assistant() -> Agent:
    """A general assistant that hands off to the Toolsmith when tools are needed."""
    from agents import Agent

    from chat.providers import build_model, model_settings

    return Agent(
        name="Assistant",
        instructions=(
            "You are a helpful, concise assistant. Reply in Markdown. When the user asks for "
            "the time, a calculation, a unit conversion or a word count, hand off to the "
            "Toolsmith."
        ),
        handoffs=[build_toolsmith()],
        model=build_model(),
        model_settings=model_settings(),
    )


def get_agent_registry() -> dict[str, Callable[[], Agent]]:
    """Map agent keys to factories; AGENTIC_DJANGO_DEFAULT_AGENT_KEY picks the default."""
    return {
        "assistant": build_assistant,
        "toolsmith": build_toolsmith,
        # The key agentic_django's documentation uses in its examples.
        "demo": build_assistant,
    }
