"""Worker processes for agent runs (``python manage.py agentic_django_worker``).

Whatever the task backend, a worker process:

- runs up to ``AGENTIC_DJANGO_WORKER_CONCURRENCY`` runs at once (its slots): a run spends
  nearly all its time waiting on a model provider. Each run has a thread of its own for its
  database work and its lease keeper; the async part of all of them (the SDK's turns, the
  model's stream) shares one event loop (``agentic_django.eventloop``). A hung provider or a
  blocking sync tool costs one slot, never the worker. It takes a task only when a slot is
  free;
- imports the Agents SDK, the agent registry and the task modules once, at start, and warms
  them up with one in-memory agent run, so no task pays for the import;
- records the deployment's concurrency limit in the database (``lifecycle``) and announces
  itself with its slots, renewing that every half lease (``AgentWorker``): unset, the limit
  is the live workers' slots, and since it claims a run only for a free slot of its own, its
  claims then skip the deployment-wide lock that an integer limit needs;
- sweeps every half lease (``recovery.sweep``): runs whose worker died are recovered and runs
  that wait are dispatched, so an idle deployment heals itself without cron;
- on SIGTERM/SIGINT stops taking tasks, lets the runs in flight finish within
  ``AGENTIC_DJANGO_WORKER_SHUTDOWN_GRACE`` seconds, and ends the leases of the rest so the
  next sweep (of any worker) retries them at once; a second signal cuts the wait short.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import connections
from django.utils.crypto import get_random_string
from django.utils.module_loading import autodiscover_modules, import_string

from agentic_django import lifecycle, otlp
from agentic_django.conf import get_config
from agentic_django.recovery import sweep

logger = logging.getLogger(__name__)


def sweep_interval() -> float:
    """Seconds between two sweeps of one worker: half a lease."""
    return get_config().lease_seconds / 2


def start_worker(presence: Presence) -> None:
    """What every worker process does before taking tasks: preload, record the limit,
    announce itself, sweep."""
    preload()
    share_event_loop()
    lifecycle.claims_hold_slots = True
    try:
        lifecycle.record_concurrency_limit(get_config().concurrency_limit)
        presence.announce()
    finally:
        connections.close_all()
    sweep_safely()


class Presence:
    """A worker's row in ``AgentWorker``: its slots count while its heartbeat is fresh."""

    def __init__(self, slots: int, worker_id: str = "") -> None:
        self.slots = slots
        self.worker_id = worker_id or get_random_string(32)
        self.retired = False

    def announce(self) -> None:
        lifecycle.announce_worker(
            self.worker_id, slots=self.slots, hostname=socket.gethostname(), pid=os.getpid()
        )

    def beat(self) -> None:
        """Renew the heartbeat (a failure is logged: the next beat tries again)."""
        if self.retired:
            return
        try:
            self.announce()
        except Exception:
            logger.warning("agentic_django: worker heartbeat failed", exc_info=True)
        finally:
            connections.close_all()

    def retire(self) -> None:
        try:
            lifecycle.retire_worker(self.worker_id)
        except Exception:
            logger.warning("agentic_django: could not retire worker", exc_info=True)
        finally:
            connections.close_all()


class Slots:
    """Runs up to ``size`` tasks at once, each in a daemon thread of its own (a stopping
    worker never waits for a thread past its grace period)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0
        self._changed = threading.Condition()

    def acquire(self, timeout: float) -> bool:
        """Take a free slot, waiting up to ``timeout`` seconds for one; False if none freed."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.busy < self.size, timeout):
                return False
            self.busy += 1
            return True

    def acquire_free(self, limit: int) -> int:
        """Take up to ``limit`` more slots, only those free now; how many."""
        with self._changed:
            taken = max(0, min(limit, self.size - self.busy))
            self.busy += taken
            return taken

    def release(self, count: int = 1) -> None:
        """Give back ``count`` slots taken with ``acquire`` (or ``acquire_free``) and not used."""
        with self._changed:
            self.busy -= count
            self._changed.notify_all()

    def start(self, task: Callable[..., Any], *args: Any) -> None:
        """Run ``task(*args)`` in the slot taken with ``acquire``; the slot frees after it."""
        thread = threading.Thread(
            target=self._run, args=(task, args), name="agentic-django-run", daemon=True
        )
        thread.start()

    def _run(self, task: Callable[..., Any], args: tuple[Any, ...]) -> None:
        from agentic_django.execution import slot_of_thread

        # Freed when the task returns, or before if its run is lost while the thread stays
        # blocked (a tool or event loop that never returns costs a thread, not a slot).
        slot_of_thread.release = free = self._freer()
        try:
            task(*args)
        except Exception:
            logger.exception("agentic_django: a task failed in its worker slot")
        finally:
            slot_of_thread.release = None
            connections.close_all()
            free()

    def _freer(self) -> Callable[[], None]:
        """A function that releases the slot once, however often it is called."""
        lock = threading.Lock()
        freed = False

        def free() -> None:
            nonlocal freed
            with lock:
                if freed:
                    return
                freed = True
            self.release()

        return free

    def wait_for_change(self, timeout: float) -> None:
        """Return when a slot frees (or after ``timeout``)."""
        with self._changed:
            self._changed.wait(timeout)

    def wait_idle(self, timeout: float, cut_short: threading.Event | None = None) -> bool:
        """Wait up to ``timeout`` seconds (or until ``cut_short`` is set) for every task to
        end; whether they did."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.busy:
                left = deadline - time.monotonic()
                if left <= 0 or (cut_short is not None and cut_short.is_set()):
                    return False
                # Short waits: a signal handler in this thread sets ``cut_short``.
                self._changed.wait(min(left, 0.2))
            return True


class Stopping:
    """A worker's stop requests, as its signal handlers record them (they never raise, so a
    signal cannot cut a shutdown step short): the first asks it to take no more tasks and let
    its runs finish; a second one, more than a second later, to stop now. (Ctrl-C reaches
    every process of a terminal's group, and a supervisor may signal as well: a second
    signal within a second is the same request.)"""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.forced = threading.Event()
        self._first = 0.0

    def request(self) -> bool:
        """Record a signal; whether it was the first."""
        if not self.requested.is_set():
            self._first = time.monotonic()
            self.requested.set()
            return True
        if time.monotonic() - self._first >= 1.0:
            self.forced.set()
        return False


def stop_worker(slots: Slots, presence: Presence, sweeper: Sweeper, stopping: Stopping) -> None:
    """A worker stops: the runs in flight get the grace period to finish (unless a second
    signal cuts it short), the worker still beating its heartbeat meanwhile; the leases of
    those still running after it end, so the next sweep (of any worker) retries them now, and
    the process exits at once (status 1 when cut short)."""
    grace = 0 if stopping.forced.is_set() else get_config().worker_shutdown_grace
    if slots.busy and grace:
        logger.info("agentic_django: waiting up to %ss for %d run(s)", grace, slots.busy)
    finished = slots.wait_idle(grace, cut_short=stopping.forced)
    sweeper.stop()
    presence.retired = True  # a beat still under way must not announce it again
    if finished:
        presence.retire()
        return
    stop_in_flight()
    presence.retire()
    # The runs given up still hold threads the interpreter would wait for at exit (an event
    # loop's thread is not a daemon): leave now; their work is fenced off and will be retried.
    # What waits for the OpenTelemetry collector is sent first, unless cut short.
    if not stopping.forced.is_set():
        otlp.flush()
    logging.shutdown()
    os._exit(1 if stopping.forced.is_set() else 0)


def stop_in_flight() -> None:
    """Give up the runs still executing in this process (see ``lifecycle.give_up``)."""
    from agentic_django.execution import abandon_in_flight

    fences = abandon_in_flight()
    try:
        ended = lifecycle.give_up(fences)
    except Exception:
        logger.exception("agentic_django: could not end the leases of %d run(s)", len(fences))
    else:
        logger.warning(
            "agentic_django: stopped with %d run(s) unfinished; they will be retried", ended
        )
    finally:
        connections.close_all()


def share_event_loop() -> None:
    """The runs of this process share one event loop (see ``agentic_django.eventloop``)."""
    from agentic_django import eventloop
    from agentic_django.execution import DaemonThreadExecutor

    eventloop.share(DaemonThreadExecutor)


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
        lifecycle.forget_dead_workers()
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
    """Renews the worker's heartbeat and sweeps every ``interval`` seconds, from a thread."""

    def __init__(self, interval: float, presence: Presence) -> None:
        self.interval = interval
        self.presence = presence
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="agentic-django-sweeper", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Beat and sweep no more (a sweep under way may finish: the thread is a daemon)."""
        self._stopped.set()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.presence.beat()
            sweep_safely()
