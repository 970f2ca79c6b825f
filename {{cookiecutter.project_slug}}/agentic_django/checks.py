"""System checks: report invalid ``AGENTIC_DJANGO_*`` settings at startup."""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from agentic_django.conf import load_config


@checks.register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Validate every setting and that the agent registry module exists (without importing it)."""
    try:
        config = load_config()
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="agentic_django.E001")]
    messages: list[checks.CheckMessage] = []
    if not config.agent_registry:
        messages.append(
            checks.Error(
                "AGENTIC_DJANGO_AGENT_REGISTRY is not set.",
                hint="Point it at a callable returning {agent_key: factory}.",
                id="agentic_django.E002",
            )
        )
    else:
        module_path = config.agent_registry.rpartition(".")[0]
        try:
            found = find_spec(module_path) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            messages.append(
                checks.Error(
                    f"AGENTIC_DJANGO_AGENT_REGISTRY module {module_path!r} cannot be found.",
                    id="agentic_django.E003",
                )
            )
    if "default" not in getattr(settings, "TASKS", {"default": None}):
        messages.append(
            checks.Error(
                "TASKS has no 'default' backend; agent runs are enqueued on it.",
                id="agentic_django.E004",
            )
        )
    return messages
