"""System checks: report invalid ``AGENTIC_DJANGO_*`` settings at startup."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.utils.module_loading import import_string

from agentic_django.conf import load_config


def _importable(path: str, setting: str, hint: str, check_id: str) -> list[checks.CheckMessage]:
    try:
        import_string(path)
    except Exception as exc:  # a module that fails to import at all must be reported too
        return [
            checks.Error(f"{setting} {path!r} cannot be imported: {exc}", hint=hint, id=check_id)
        ]
    return []


@checks.register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Validate every setting and import the registry and serializer they name.

    Importing the registry imports the Agents SDK: a process that runs the checks (web
    server, worker) pays that once at start instead of on its first request or task.
    """
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
        messages += _importable(
            config.agent_registry,
            "AGENTIC_DJANGO_AGENT_REGISTRY",
            "Point it at a callable returning {agent_key: factory}.",
            "agentic_django.E003",
        )
    if config.session_serializer:
        messages += _importable(
            config.session_serializer,
            "AGENTIC_DJANGO_SESSION_SERIALIZER",
            "Point it at a class with dumps(item) and loads(payload) methods.",
            "agentic_django.E005",
        )
    if not connection.features.can_return_rows_from_update:
        messages.append(
            checks.Error(
                f"agentic_django needs UPDATE ... RETURNING, which this {connection.vendor} "
                "database lacks.",
                hint="Use PostgreSQL, or SQLite 3.35 or newer.",
                id="agentic_django.E006",
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
