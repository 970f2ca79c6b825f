"""Settings every benchmark runs with, on top of the project's own settings.

Kept free of Django imports: ``benchmarks.settings`` applies them in every benchmark process
and its workers, and ``run_workers`` reads the task backends before Django is set up.
"""

from __future__ import annotations

import importlib.util
from typing import Any

REGISTRY = "benchmarks.registry.get_agent_registry"

TASK_BACKENDS = {
    "immediate": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"},
    "database": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default"]},
    "rq": {"BACKEND": "django_tasks_rq.RQBackend", "QUEUES": ["default"]},
}
# The app each worker backend needs in INSTALLED_APPS (its models or its management command).
BACKEND_APPS = {"database": "django_tasks_db", "rq": "django_rq"}


def available_backends() -> list[str]:
    """Worker backends whose packages are installed in this environment."""
    return [name for name, app in BACKEND_APPS.items() if importlib.util.find_spec(app)]


def overrides(base: dict[str, Any], *, task_backend: str = "immediate") -> dict[str, Any]:
    """Settings to apply over ``base`` (the project's settings as a dict)."""
    hosts = list(base.get("ALLOWED_HOSTS", []))
    return {
        # DEBUG would record every query and slow every request: measure production mode.
        "DEBUG": False,
        "ALLOWED_HOSTS": [*hosts, "testserver"] if "testserver" not in hosts else hosts,
        "SECURE_SSL_REDIRECT": False,
        "SESSION_COOKIE_SECURE": False,
        "CSRF_COOKIE_SECURE": False,
        "ROOT_URLCONF": "benchmarks.urls",
        "TASKS": {"default": dict(TASK_BACKENDS[task_backend])},
        "AGENTIC_DJANGO_AGENT_REGISTRY": REGISTRY,
        "AGENTIC_DJANGO_DEFAULT_AGENT_KEY": "chat",
        # Thousands of runs per minute from one user are the point here.
        "AGENTIC_DJANGO_RATE_LIMIT": None,
        "STORAGES": {
            **base.get("STORAGES", {}),
            "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
        },
        "PASSWORD_HASHERS": ["django.contrib.auth.hashers.MD5PasswordHasher"],
    }
