from __future__ import annotations

from django.apps import AppConfig


class AgenticDjangoConfig(AppConfig):
    name = "agentic_django"
    verbose_name = "Agentic Django"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers system checks only: no database access and no SDK import at startup.
        from agentic_django import checks  # noqa: F401
