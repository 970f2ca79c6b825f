"""System checks: report bad model-provider settings at startup, not at the first run."""

from __future__ import annotations

from typing import Any

from django.core import checks


@checks.register()
def check_model_provider(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from chat.providers import problems  # the Agents SDK loads when checks run, not on import

    return [
        checks.Error(problem, hint="See .env.example.", id="chat.E001") for problem in problems()
    ]
