"""An RQ worker that imports the agent stack once, before it starts forking.

RQ runs every job in a freshly forked "work horse". Whatever the parent process has imported,
the horse inherits for free; whatever it has not, each job imports again. Importing the
OpenAI Agents SDK takes seconds, so the parent imports it (and the project's agent registry
and task modules) up front:

    python manage.py rqworker --job-class django_tasks_rq.Job \\
        --worker-class config.worker.PreloadingWorker default
"""

from __future__ import annotations

import gc
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
    warm_up()
    warm_up_database()
    # Keep the preloaded objects out of the collector: a horse's GC would otherwise touch (and
    # copy) every inherited page.
    gc.freeze()
    logger.info("Preloaded the Agents SDK and agent registry in %.1fs", time.monotonic() - started)


def warm_up_database() -> None:
    """Load the database backend and run one engine query, then close the connection.

    Django loads its database driver on first use; done here, horses inherit it. The
    connection itself is closed: a forked process must never share the parent's socket.
    """
    from django.db import connections

    from agentic_django.dispatch import dispatch_next  # noqa: F401 - imported for its modules
    from agentic_django.models import AgentRun

    try:
        AgentRun.objects.filter(status=AgentRun.Status.PENDING, task_id="x").exists()
    except Exception:
        logger.warning("Database warm-up failed; jobs will load the driver", exc_info=True)
    finally:
        connections.close_all()


def warm_up() -> None:
    """Run one in-memory scripted agent run (a tool call, then an answer), without the database.

    An import does not cover the SDK's first-use costs (tracing setup, pydantic schemas,
    lazily imported modules); paid here once, every forked job inherits them warm.
    """
    import asyncio

    from agents import Agent, Runner, function_tool
    from agents.testing import ScriptedModel, assistant_message, function_call

    @function_tool
    def ping() -> str:
        """Answer pong."""
        return "pong"

    model = ScriptedModel(
        [[function_call("ping", {}, call_id="warm-up")], [assistant_message("done")]]
    )
    agent = Agent(name="warm-up", instructions="Warm-up.", model=model, tools=[ping])

    async def drain() -> None:
        result = Runner.run_streamed(agent, "warm up", max_turns=3)
        async for _ in result.stream_events():
            pass

    try:
        asyncio.run(drain())
    except Exception:
        logger.warning("Warm-up agent run failed; jobs will pay the first-run cost", exc_info=True)


class PreloadingWorker(Worker):
    """``rq.Worker`` that calls ``preload()`` once in the parent before working."""

    def work(self, *args: Any, **kwargs: Any) -> bool:
        preload()
        return super().work(*args, **kwargs)
