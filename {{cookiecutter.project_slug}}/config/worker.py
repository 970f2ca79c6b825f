"""An RQ worker that imports the agent stack once, before it starts forking.

RQ runs every job in a freshly forked "work horse". Whatever the parent process has imported,
the horse inherits for free; whatever it has not, each job imports again. Importing the
OpenAI Agents SDK takes seconds, so the parent imports it (and the project's agent registry
and task modules) up front:

    python manage.py rqworker --job-class django_tasks_rq.Job \\
        --worker-class config.worker.PreloadingWorker default
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from django.conf import settings
from django.utils.module_loading import autodiscover_modules, import_string
from rq.worker import Worker

logger = logging.getLogger(__name__)


def preload() -> None:
    """Import the Agents SDK, the agent registry and every app's ``tasks`` module."""
    started = time.monotonic()
    importlib.import_module("agents")
    registry = getattr(settings, "AGENTIC_DJANGO_AGENT_REGISTRY", None)
    if registry:
        import_string(registry)
    autodiscover_modules("tasks")
    logger.info("Preloaded the Agents SDK and agent registry in %.1fs", time.monotonic() - started)


class PreloadingWorker(Worker):
    """``rq.Worker`` that calls ``preload()`` once in the parent before working."""

    def work(self, *args: Any, **kwargs: Any) -> bool:
        preload()
        return super().work(*args, **kwargs)
