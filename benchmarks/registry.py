"""The benchmark-only agent registry: the SDK's ``ScriptedModel`` answers, so no network.

``chat`` answers one message; ``tool`` calls one function tool, then answers. Each factory
builds a fresh agent and model (a scripted model consumes its steps), exactly like a project
factory builds a fresh agent per run. ``stream`` has the project's own model instead
(``chat/providers.py``): with ``OPENAI_BASE_URL`` set, the ``openai`` client streaming from
that server over HTTP (``run_concurrency`` points it at the fake OpenAI server).
"""

from __future__ import annotations

from collections.abc import Callable

# Imported at module level like a real registry, so preloading workers import it once.
from agents import Agent, function_tool
from agents.testing import ScriptedModel, assistant_message, function_call

from chat.providers import build_model

CHAT_REPLY = "Hello from the scripted model."
TOOL_REPLY = "2 + 3 = 5"


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


def build_stream() -> Agent:
    """One model call to the project's configured provider (its offline demo model without
    ``OPENAI_BASE_URL`` or a key)."""
    return Agent(name="Bench stream", instructions="Answer briefly.", model=build_model())


def get_agent_registry() -> dict[str, Callable[[], Agent]]:
    """``AGENTIC_DJANGO_AGENT_REGISTRY`` for benchmarks."""
    return {"chat": build_chat, "tool": build_tool, "stream": build_stream}
