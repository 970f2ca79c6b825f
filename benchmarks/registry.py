"""The benchmark-only agent registry: the SDK's ``ScriptedModel`` answers, so no network.

``chat`` answers one message; ``tool`` calls one function tool, then answers (both in
``benchmarks/scripted.py``, fresh agent and model per run). ``stream`` has the project's own
model instead (``chat/providers.py``): with ``OPENAI_BASE_URL`` set, the ``openai`` client
streaming from that server over HTTP (``run_concurrency`` points it at the fake OpenAI server).
"""

from __future__ import annotations

from collections.abc import Callable

# Imported at module level like a real registry, so preloading workers import it once.
from agents import Agent

from benchmarks.scripted import CHAT_REPLY, TOOL_REPLY, build_chat, build_tool
from chat.providers import build_model

__all__ = ["CHAT_REPLY", "TOOL_REPLY", "build_chat", "build_stream", "build_tool"]


def build_stream() -> Agent:
    """One model call to the project's configured provider (its offline demo model without
    ``OPENAI_BASE_URL`` or a key)."""
    return Agent(name="Bench stream", instructions="Answer briefly.", model=build_model())


def get_agent_registry() -> dict[str, Callable[[], Agent]]:
    """``AGENTIC_DJANGO_AGENT_REGISTRY`` for benchmarks."""
    return {"chat": build_chat, "tool": build_tool, "stream": build_stream}
