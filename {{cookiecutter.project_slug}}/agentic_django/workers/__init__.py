"""Worker processes for agent runs (``python manage.py agentic_django_worker``).

Whatever the task backend, a worker process:

- imports the Agents SDK, the agent registry and the task modules once, at start, and warms
  them up with one in-memory agent run, so no task pays for the import;
- records the deployment's concurrency limit in the database (``lifecycle``);
- sweeps every half lease (``recovery.sweep``): runs whose worker died are recovered and runs
  that wait are dispatched, so an idle deployment heals itself without cron.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time

from django.conf import settings
from django.db import connections
from django.utils.module_loading import autodiscover_modules, import_string

from agentic_django import lifecycle
from agentic_django.conf import get_config
from agentic_django.recovery import sweep

logger = logging.getLogger(__name__)


def sweep_interval() -> float:
    """Seconds between two sweeps of one worker: half a lease."""
    return get_config().lease_seconds / 2


def start_worker() -> None:
    """What every worker process does before taking tasks: preload, record the limit, sweep."""
    preload()
    try:
        lifecycle.record_concurrency_limit(get_config().concurrency_limit)
    finally:
        connections.close_all()
    sweep_safely()


def preload() -> None:
    """Import the Agents SDK, the agent registry and every app's ``tasks`` module, warmed up."""
    started = time.monotonic()
    importlib.import_module("agents")
    registry = getattr(settings, "AGENTIC_DJANGO_AGENT_REGISTRY", None)
    if registry:
        import_string(registry)
    autodiscover_modules("tasks")
    warm_up()
    logger.info("Preloaded the Agents SDK and agent registry in %.1fs", time.monotonic() - started)


def warm_up() -> None:
    """Run one in-memory scripted agent run (a tool call, then an answer), without the database.

    An import does not cover the SDK's first-use costs (tracing setup, pydantic schemas,
    lazily imported modules); paid here once, every task finds them warm.
    """
    from agents import Agent, RunConfig, Runner, function_tool
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
        # Never traced: a trace of it would go wherever the SDK exports by default.
        config = RunConfig(tracing_disabled=True)
        result = Runner.run_streamed(agent, "warm up", max_turns=3, run_config=config)
        async for _ in result.stream_events():
            pass

    try:
        asyncio.run(drain())
    except Exception:
        logger.warning(
            "Warm-up agent run failed; the first task pays the first-run cost", exc_info=True
        )


def sweep_safely() -> None:
    """One sweep, logged; its database connections are closed afterwards."""
    try:
        result = sweep()
    except Exception:
        logger.exception("agentic_django: sweep failed; the next one will try again")
    else:
        if result.recovered or result.dispatched:
            logger.info(
                "agentic_django: sweep recovered %d run(s), dispatched %d",
                result.recovered,
                result.dispatched,
            )
    finally:
        connections.close_all()


class Sweeper:
    """Sweeps every ``interval`` seconds from a daemon thread (for non-forking workers)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="agentic-django-sweeper", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            sweep_safely()
