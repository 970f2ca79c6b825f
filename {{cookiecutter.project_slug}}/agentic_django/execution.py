"""Execution of one run in a worker: claim it, build the agent, stream it with the database
session, and record exactly one terminal state.

While the agent runs, a monitor renews the lease, notices cancellation requests (the run then
stops after its current turn, so the history stays consistent) and notices a lost claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.utils import timezone

from agentic_django.conf import get_config, validate_run_options
from agentic_django.dispatch import claim, dispatch_next
from agentic_django.events import EventRecorder, describe
from agentic_django.exceptions import AgenticDjangoError
from agentic_django.models import AgentRun
from agentic_django.recovery import ensure_startup_recovery
from agentic_django.registry import build_agent
from agentic_django.serializers import json_safe
from agentic_django.sessions import SessionWriteRejected, session_for_run
from agentic_django.signals import (
    agent_run_cancelled,
    agent_run_completed,
    agent_run_failed,
    agent_run_started,
    send_safely,
)

logger = logging.getLogger(__name__)

Status = AgentRun.Status
MAX_ERROR_LENGTH = 500
# How often a running run looks for a cancellation request or a lost claim.
POLL_SECONDS = 1.0
DRAIN_SECONDS = 5.0
# Events after which the SDK starts another turn; the watcher covers the time in between.
TURN_END_EVENTS = frozenset({"tool_output", "handoff", "mcp_approval_response"})


def execute(run_id: str, *, task_id: str = "") -> str:
    """Claim and execute a run (the body of the background task); "skipped" if not claimable."""
    ensure_startup_recovery()
    run = claim(run_id, task_id=task_id)
    if run is None:
        return "skipped"
    return execute_claimed_run(run)


@dataclass
class Outcome:
    """How an attempt ended; ``lost`` means another process took the run over."""

    status: str
    error: str = ""
    final_output: Any = None
    usage: dict[str, int] = field(default_factory=dict)
    last_response_id: str = ""
    lost: bool = False


def execute_claimed_run(run: AgentRun) -> str:
    """Run a claimed (running) run to its terminal state, then dispatch the next runs."""
    send_safely(agent_run_started, AgentRun, run=run)
    try:
        outcome = _execute(run)
    except Exception as exc:
        logger.exception("agentic_django: run %s crashed", run.pk)
        outcome = Outcome(Status.FAILED, error=_error_text(exc))
    if outcome.lost:
        logger.warning("agentic_django: run %s lost its claim; result dropped", run.pk)
    else:
        _finish(run, outcome)
    dispatch_next()
    if outcome.lost:
        run.refresh_from_db()
    return run.status


def _execute(run: AgentRun) -> Outcome:
    config = get_config()
    try:
        options = validate_run_options(
            {**config.default_run_options, **(run.run_options or {})},
            max_turns=config.max_turns,
            source="Run options",
        )
    except ValueError as exc:
        return Outcome(Status.FAILED, error=str(exc))
    try:
        agent = build_agent(run.agent_key)
    except AgenticDjangoError as exc:
        return Outcome(Status.FAILED, error=exc.message)
    recorder = EventRecorder(run) if config.enable_events else None
    return async_to_sync(_stream)(run, agent, options, recorder)


async def _stream(
    run: AgentRun, agent: Any, options: dict[str, Any], recorder: EventRecorder | None
) -> Outcome:
    from agents import Runner
    from agents.exceptions import MaxTurnsExceeded

    config = get_config()
    max_turns = options.get("max_turns", config.max_turns)
    result = Runner.run_streamed(
        agent, run.input_payload, session=session_for_run(run), max_turns=max_turns
    )
    monitor = _Monitor(run, result)
    watcher = asyncio.create_task(monitor.watch())
    try:
        async with asyncio.timeout(config.run_timeout_seconds):
            async for event in result.stream_events():
                described = describe(event)
                if described is None:
                    continue
                if recorder is not None:
                    await sync_to_async(recorder.record)(*described)
                if described[0] in TURN_END_EVENTS:
                    # A turn's tools are done: look now, before the SDK asks the model again.
                    await monitor.check()
    except TimeoutError:
        await _stop(result)
        seconds = config.run_timeout_seconds
        return _outcome(result, Status.FAILED, f"The run took longer than {seconds}s and stopped.")
    except SessionWriteRejected:
        return Outcome(Status.FAILED, lost=True)
    except MaxTurnsExceeded:
        return _outcome(
            result, Status.FAILED, f"The agent used all {max_turns} turns without finishing."
        )
    except Exception as exc:
        logger.exception("agentic_django: run %s failed", run.pk)
        return _outcome(result, Status.FAILED, _error_text(exc))
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if monitor.lost:
        return Outcome(Status.FAILED, lost=True)
    if monitor.cancel_requested and result.final_output is None:
        return _outcome(result, Status.CANCELLED)
    return _outcome(result, Status.COMPLETED, final_output=json_safe(result.final_output))


async def _stop(result: Any) -> None:
    result.cancel()
    with contextlib.suppress(Exception, TimeoutError):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in result.stream_events():
                pass


def _outcome(result: Any, status: str, error: str = "", final_output: Any = None) -> Outcome:
    usage = result.context_wrapper.usage
    try:
        last_response_id = result.last_response_id or ""
    except Exception:
        last_response_id = ""
    return Outcome(
        status,
        error=error,
        final_output=final_output,
        usage={
            "requests": usage.requests,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
        },
        last_response_id=last_response_id[:255],
    )


class _Monitor:
    """Renews the lease and turns a cancellation request into an after-turn stop."""

    def __init__(self, run: AgentRun, result: Any) -> None:
        self.run_pk = run.pk
        self.attempt = run.attempt
        self.result = result
        self.lease = timedelta(seconds=get_config().lease_seconds)
        self.renew_every = self.lease.total_seconds() / 3
        self.cancel_requested = False
        self.lost = False

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        last_renewal = loop.time()
        while True:
            await asyncio.sleep(min(POLL_SECONDS, self.renew_every))
            if loop.time() - last_renewal >= self.renew_every:
                if not await sync_to_async(self._renew)():
                    self.lost = True
                    self.result.cancel()
                    return
                last_renewal = loop.time()
            await self.check()

    async def check(self) -> None:
        if self.cancel_requested or self.lost:
            return
        state = await sync_to_async(self._state)()
        if state is None:
            self.lost = True
            self.result.cancel()
        elif state:
            self.cancel_requested = True
            self.result.cancel(mode="after_turn")

    def _state(self) -> bool | None:
        """None if the claim is lost, else whether cancellation was requested."""
        rows = list(
            AgentRun.objects.filter(
                pk=self.run_pk, attempt=self.attempt, status=Status.RUNNING
            ).values_list("cancel_requested_at", flat=True)[:1]
        )
        if not rows:
            return None
        return rows[0] is not None

    def _renew(self) -> bool:
        now = timezone.now()
        return bool(
            AgentRun.objects.filter(
                pk=self.run_pk, attempt=self.attempt, status=Status.RUNNING
            ).update(heartbeat_at=now, lease_expires_at=now + self.lease)
        )


def _finish(run: AgentRun, outcome: Outcome) -> None:
    now = timezone.now()
    updates = {
        "status": outcome.status,
        "error": outcome.error,
        "final_output": outcome.final_output,
        "last_response_id": outcome.last_response_id,
        "finished_at": now,
        "lease_expires_at": None,
        "heartbeat_at": now,
        **outcome.usage,
    }
    running = AgentRun.objects.filter(pk=run.pk, status=Status.RUNNING, attempt=run.attempt)
    if not running.update(**updates):
        logger.warning("agentic_django: run %s changed while running; result dropped", run.pk)
        run.refresh_from_db()
        return
    # Only cancel_requested_at can change under a claimed run; keep the rest from memory.
    for name, value in updates.items():
        setattr(run, name, value)
    if outcome.status == Status.CANCELLED and run.cancel_requested_at is None:
        run.refresh_from_db(fields=["cancel_requested_at"])
    signal = {
        Status.COMPLETED: agent_run_completed,
        Status.FAILED: agent_run_failed,
        Status.CANCELLED: agent_run_cancelled,
    }[outcome.status]
    send_safely(signal, AgentRun, run=run)


def _error_text(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    text = text[:MAX_ERROR_LENGTH]
    if settings.DEBUG:
        text += "\n\n" + "".join(traceback.format_exception(exc))
    return text
