"""System checks: report invalid ``AGENTIC_DJANGO_*`` settings at startup."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.utils.module_loading import import_string

from agentic_django import otlp
from agentic_django.conf import TIMEOUT_GRACE_SECONDS, load_config


def _importable(path: str, setting: str, hint: str, check_id: str) -> list[checks.CheckMessage]:
    try:
        import_string(path)
    except Exception as exc:  # a module that fails to import at all must be reported too
        return [
            checks.Error(f"{setting} {path!r} cannot be imported: {exc}", hint=hint, id=check_id)
        ]
    return []


# RQ's own default job timeout, used when a queue sets none.
RQ_DEFAULT_JOB_TIMEOUT = 180


def _rq_timeouts(run_timeout: int) -> list[checks.CheckMessage]:
    """RQ kills a job at its queue's timeout: that must not come before the run timeout."""
    backend = getattr(settings, "TASKS", {}).get("default", {})
    if backend.get("BACKEND") != "django_tasks_rq.RQBackend":
        return []
    needed = run_timeout + TIMEOUT_GRACE_SECONDS
    messages: list[checks.CheckMessage] = []
    for queue in backend.get("QUEUES", ["default"]):
        rq_queue = getattr(settings, "RQ_QUEUES", {}).get(queue, {})
        timeout = rq_queue.get("DEFAULT_TIMEOUT", RQ_DEFAULT_JOB_TIMEOUT)
        if timeout < needed:
            messages.append(
                checks.Warning(
                    f"RQ kills jobs of queue {queue!r} after {timeout} s, before "
                    f"AGENTIC_DJANGO_RUN_TIMEOUT ({run_timeout} s) can end a run cleanly.",
                    hint=f"Set RQ_QUEUES[{queue!r}]['DEFAULT_TIMEOUT'] to at least {needed}.",
                    id="agentic_django.W001",
                )
            )
    return messages


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
    if config.budgets.user_limits:
        messages += _importable(
            config.budgets.user_limits,
            "AGENTIC_DJANGO_BUDGETS['user_limits']",
            "Point it at a callable(user) returning {'user_cost': ..., 'user_tokens': ...}.",
            "agentic_django.E007",
        )
    features = connection.features
    if not (features.can_return_rows_from_update and features.can_return_columns_from_insert):
        messages.append(
            checks.Error(
                f"agentic_django needs UPDATE ... RETURNING and INSERT ... RETURNING, which "
                f"this {connection.vendor} database lacks.",
                hint="Use PostgreSQL, or SQLite 3.35 or newer.",
                id="agentic_django.E006",
            )
        )
    messages += _rq_timeouts(config.run_timeout_seconds)
    messages += [
        checks.Error(problem, hint="See README: Inspecting runs.", id="agentic_django.E008")
        for problem in otlp.problems()
    ]
    if "default" not in getattr(settings, "TASKS", {"default": None}):
        messages.append(
            checks.Error(
                "TASKS has no 'default' backend; agent runs are enqueued on it.",
                id="agentic_django.E004",
            )
        )
    return messages
