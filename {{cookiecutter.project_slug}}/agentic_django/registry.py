"""The agent registry: ``AGENTIC_DJANGO_AGENT_REGISTRY`` names a callable returning
``{agent_key: factory}``; each factory builds a fresh ``agents.Agent`` for one run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from django.utils.module_loading import import_string

from agentic_django.conf import get_config
from agentic_django.exceptions import AgentRegistryError, UnknownAgent


def get_registry() -> Mapping[str, Callable[[], Any]]:
    """Return the project's ``{agent_key: factory}`` mapping."""
    path = get_config().agent_registry
    if not path:
        raise AgentRegistryError("AGENTIC_DJANGO_AGENT_REGISTRY is not set.")
    try:
        provider = import_string(path)
    except ImportError as exc:
        raise AgentRegistryError(f"Cannot import the agent registry {path!r}: {exc}") from exc
    registry = provider() if callable(provider) else provider
    if not isinstance(registry, Mapping):
        raise AgentRegistryError(f"The agent registry {path!r} did not return a mapping.")
    return registry


def resolve_agent_key(agent_key: str | None) -> str:
    """Return ``agent_key`` (or the default key) if the registry knows it; else ``UnknownAgent``."""
    key = agent_key or get_config().default_agent_key
    if not isinstance(key, str) or key not in get_registry():
        raise UnknownAgent(f"Unknown agent {key!r}.")
    return key


def build_agent(agent_key: str) -> Any:
    """Build a fresh agent for ``agent_key``."""
    registry = get_registry()
    if agent_key not in registry:
        raise UnknownAgent(f"Unknown agent {agent_key!r}.")
    return registry[agent_key]()
