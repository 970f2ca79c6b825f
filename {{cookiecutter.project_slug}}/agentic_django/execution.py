"""Execution of one run in a worker: claim it, build the agent, stream it with the database
session, and record exactly one terminal state.

While the agent runs:

- a ``LeaseKeeper`` thread renews the lease (a starved or blocked event loop cannot lose a live
  run; a transient database error is retried until the lease would run out) and enforces the
  run timeout even if the agent's event loop is stuck;
- a watcher on the event loop turns a cancellation request into an after-turn stop, so the
  history stays consistent;
- an attempt that lost its run (its lease expired and recovery took it over) stops at once;
  every write it would still make is dropped by the fence (see ``lifecycle``).

A sync function tool still running when the run times out is abandoned in its (daemon)
thread: the run ends ``failed`` at once and frees its slot, and whatever the tool does
afterwards cannot reach the run, its session or its events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError, InterfaceError, OperationalError, connection, connections

from agentic_django import (
    checkpoints,
    eventloop,
    failures,
    lifecycle,
    logcontext,
    toolcalls,
    tracing,
)
from agentic_django.checkpoints import CheckpointHooks, UnreadableCheckpoint, run_context
from agentic_django.conf import TIMEOUT_GRACE_SECONDS, get_config, validate_run_options
from agentic_django.db import release_connection, released, run_sync
from agentic_django.dispatch import dispatch_next, release_unclaimed
from agentic_django.events import EventRecorder, describe
from agentic_django.exceptions import AgenticDjangoError
from agentic_django.lifecycle import Fence
from agentic_django.logcontext import bind_run
from agentic_django.models import (
    AgentApproval,
    AgentCheckpoint,
    AgentRun,
    AgentSession,
    AgentToolCall,
)
from agentic_django.recovery import ensure_startup_recovery
from agentic_django.registry import build_agent
from agentic_django.serializers import json_safe
from agentic_django.sessions import SessionWriteRejected, session_for_run
from agentic_django.signals import (
    agent_budget_exceeded,
    agent_run_cancelled,
    agent_run_completed,
    agent_run_failed,
    agent_run_started,
    send_safely,
)
from agentic_django.toolcalls import (
    ToolCallCancelled,
    ToolCallDropped,
    ToolCallInDoubt,
    ToolLedger,
    in_doubt_id,
)
from agentic_django.usage import BudgetStop, UsageMeter
from agentic_django.validation import is_storable, storable_copy

logger = logging.getLogger(__name__)

Status = AgentRun.Status
# How often a running run looks for a cancellation request (on its event loop).
POLL_SECONDS = 1.0
# Time a cancelled stream gets to wind down before the attempt stops waiting for it (less
# than TIMEOUT_GRACE_SECONDS, after which the lease keeper ends a run its loop cannot stop).
DRAIN_SECONDS = 5.0
# Events after which the SDK starts another turn; the watcher covers the time in between.
TURN_END_EVENTS = frozenset({"tool_output", "handoff", "mcp_approval_response"})
IN_DOUBT_ERROR = (
    "A tool call that may or may not have happened came up again without a decision, so the "
    "run was stopped."
)
UNSTORABLE_OUTPUT = (
    "The agent's answer contains text the database cannot store (a NUL character or an "
    "invalid Unicode code point), so it was not saved."
)
TRANSIENT_DATABASE_ERRORS = (OperationalError, InterfaceError)


def execute(run_id: str, *, task_id: str = "") -> str:
    """Claim and execute a run (the body of the background task); "skipped" if not claimable."""
    try:
        ensure_startup_recovery()
        run = lifecycle.claim(run_id, task_id=task_id)
        if run is None:
            release_unclaimed(run_id, task_id)
            return "skipped"
        try:
            binding = bind_run(run)  # every line logged while it executes names the run
        except AgentSession.DoesNotExist:
            logger.warning("agentic_django: run %s was deleted as it was claimed", run.pk)
            return "skipped"
        with binding:
            return execute_claimed_run(run)
    finally:
        release_connection()


class _SlotOfThread(threading.local):
    """How the worker thread executing a run frees its worker slot (see ``workers.Slots``)."""

    release: Callable[[], None] | None = None


# Set by a worker for the run its thread executes: an attempt that lost its run (timed out by
# its keeper, taken over) frees its slot at once, even while a blocked tool or event loop
# keeps the thread.
slot_of_thread = _SlotOfThread()

# The attempts this process is executing, by fence, with their lease keepers.
_in_flight: dict[Fence, LeaseKeeper] = {}
_in_flight_lock = threading.Lock()


def abandon_in_flight() -> list[Fence]:
    """Stop renewing the leases of every attempt still executing here (a worker that stops
    before they finished); their fences, for ``lifecycle.give_up``."""
    with _in_flight_lock:
        abandoned = list(_in_flight.items())
    for _, keeper in abandoned:
        keeper.abandon()
    return [fence for fence, _ in abandoned]


@dataclass
class Outcome:
    """How an attempt ended; ``lost`` means another process took the run over."""

    status: str
    error: str = ""
    error_detail: str = ""
    final_output: Any = None
    usage: dict[str, int] = field(default_factory=dict)
    last_response_id: str = ""
    lost: bool = False
    # A run pausing for approvals: its resumable state, the turn and the calls it waits on.
    checkpoint: str = ""
    turn: int = 0
    approvals: list[dict[str, Any]] = field(default_factory=list)
    # Stopped before a model call a budget could not pay for.
    over_budget: bool = False

    @classmethod
    def failure(cls, exc: BaseException, **fields: Any) -> Outcome:
        described = failures.describe(exc)
        return cls(Status.FAILED, error=described.message, error_detail=described.detail, **fields)


def execute_claimed_run(run: AgentRun) -> str:
    """Run a claimed (running) run to its terminal state, then dispatch the next runs."""
    config = get_config()
    fence = Fence.of(run)
    keeper = LeaseKeeper(
        fence,
        lease_seconds=config.lease_seconds,
        timeout_seconds=time_left(run) + TIMEOUT_GRACE_SECONDS,
        elapsed_before=run.elapsed_seconds,
    )
    if slot_of_thread.release is not None:
        keeper.on_lost(slot_of_thread.release)
    keeper.start()
    with _in_flight_lock:
        _in_flight[fence] = keeper
    try:
        send_safely(agent_run_started, AgentRun, run=run)
        try:
            outcome = _execute(run, keeper)
        except Exception as exc:
            if database_unavailable(exc):
                outcome = _left_for_retry(fence, exc)
            else:
                logger.exception("agentic_django: run %s crashed", run.pk)
                outcome = Outcome.failure(exc)
        finished = None if outcome.lost else finish(fence, outcome, keeper)
    finally:
        keeper.stop()
        with _in_flight_lock:
            _in_flight.pop(fence, None)
    if finished is None:
        logger.warning(
            "agentic_django: attempt %s of run %s no longer holds the run; result dropped",
            fence.attempt,
            run.pk,
        )
    dispatch_next_safely()
    current = finished or AgentRun.objects.filter(pk=run.pk).first()
    return current.status if current else "skipped"


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the database being away or overloaded (a restart, a
    failover, a full pool), not from the run: the run is retried, not failed."""
    return any(_caused_by(exc, kind) for kind in TRANSIENT_DATABASE_ERRORS)


def _left_for_retry(fence: Fence, exc: BaseException) -> Outcome:
    """The attempt stops on a database outage; its lease ends (if the database takes the
    write) so that recovery retries the run from its last checkpoint, as after a worker died
    (within ``AGENTIC_DJANGO_MAX_ATTEMPTS``)."""
    logger.warning(
        "agentic_django: run %s stopped on a database error; it will be retried",
        fence.run_id,
        exc_info=exc,
    )
    with contextlib.suppress(DatabaseError):
        released(lifecycle.give_up)([fence])
    return Outcome(Status.FAILED, lost=True)


def time_left(run: AgentRun) -> float:
    """Seconds of ``AGENTIC_DJANGO_RUN_TIMEOUT`` the run's earlier attempts left it."""
    return max(0.0, get_config().run_timeout_seconds - run.elapsed_seconds)


def _execute(run: AgentRun, keeper: LeaseKeeper) -> Outcome:
    config = get_config()
    if time_left(run) <= 0:
        return Outcome(Status.FAILED, error=timeout_message(config.run_timeout_seconds))
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
    repeatable = toolcalls.install([agent])
    # Only a retried or resumed run (a later attempt) can have a checkpoint or calls in doubt.
    checkpoint = None
    if run.attempt > 1:
        in_doubt = calls_in_doubt(run, repeatable)
        if in_doubt:
            # Ask before anything is paid for or run again; the checkpoint stays as it is.
            return Outcome(Status.AWAITING_APPROVAL, approvals=in_doubt)
        checkpoint = AgentCheckpoint.objects.filter(run_id=run.pk).first()
    recorder = EventRecorder(run) if config.enable_events else None
    tracing.install()
    run_config = tracing.run_config(run)
    release_connection()  # the run's database work borrows a connection for each step
    with logcontext.bind(trace_id=run_config.trace_id):
        return eventloop.run(
            _stream,
            run,
            agent,
            options,
            recorder,
            keeper,
            checkpoint,
            run_config,
            owner=keeper.fence,
        )


def calls_in_doubt(run: AgentRun, repeatable: dict[str, bool]) -> list[dict[str, Any]]:
    """Calls an earlier attempt started and never finished, of tools not safe to repeat,
    that nobody was asked about yet, as ``AgentApproval`` fields."""
    unfinished = AgentToolCall.objects.filter(
        run_id=run.pk, finished_at__isnull=True, attempt__lt=run.attempt
    ).order_by("pk")
    # Answered questions; one nobody answered in time (expired) is asked again.
    asked = set(
        AgentApproval.objects.filter(
            run_id=run.pk, kind=AgentApproval.Kind.IN_DOUBT, decision__in=AgentApproval.ANSWERS
        ).values_list("call_id", flat=True)
    )
    found = []
    for call in unfinished:
        call_id = in_doubt_id(call.call_id, call.attempt)
        if repeatable.get(call.tool_name) or call_id in asked:
            continue
        found.append(
            {
                "kind": AgentApproval.Kind.IN_DOUBT,
                "call_id": call_id,
                "tool_name": call.tool_name,
                "arguments": checkpoints.parsed_arguments(call.arguments),
                "agent_name": "",
            }
        )
    return found


async def _stream(
    run: AgentRun,
    agent: Any,
    options: dict[str, Any],
    recorder: EventRecorder | None,
    keeper: LeaseKeeper,
    checkpoint: AgentCheckpoint | None,
    run_config: Any,
) -> Outcome:
    config = get_config()
    if eventloop.shared() is None:
        # Sync tools run in daemon threads that the attempt never waits for once it is over
        # (a shared loop has one such executor for all its runs).
        asyncio.get_running_loop().set_default_executor(DaemonThreadExecutor())
    max_turns = options.get("max_turns", config.max_turns)
    turn = checkpoint.turn if checkpoint else 1
    ledger = ToolLedger(Fence.of(run), turn=turn, resumed_turn=turn)
    activated = ledger.activate()
    try:
        return await _run_agent(
            run, agent, max_turns, recorder, keeper, checkpoint, ledger, run_config
        )
    finally:
        # The context goes back to the calling thread: the run's ledger must not go with it.
        toolcalls.deactivate(activated)


async def _run_agent(
    run: AgentRun,
    agent: Any,
    max_turns: int,
    recorder: EventRecorder | None,
    keeper: LeaseKeeper,
    checkpoint: AgentCheckpoint | None,
    ledger: ToolLedger,
    run_config: Any,
) -> Outcome:
    from agents import Runner
    from agents.exceptions import MaxTurnsExceeded

    from agentic_django import metering

    config = get_config()
    loop = asyncio.get_running_loop()
    fence = ledger.fence
    meter = UsageMeter(run, fence)
    hooks = CheckpointHooks(fence, ledger, resumed=checkpoint is not None, meter=meter)
    if checkpoint is None:
        run_input, context = run.input_payload, run_context(run)
    else:
        try:
            run_input, context = await checkpoints.load(run, agent, checkpoint), None
        except UnreadableCheckpoint as exc:
            logger.exception("agentic_django: run %s cannot resume", run.pk)
            detail = failures.describe(exc).detail
            return Outcome(Status.FAILED, error=checkpoints.UNREADABLE, error_detail=detail)
    # Every model call of the run -- the agents it runs as tools included -- is checked
    # against the budgets and recorded by the meter (the run's task inherits it).
    with metering.metering(meter):
        result = Runner.run_streamed(
            agent,
            run_input,
            session=session_for_run(run),
            max_turns=max_turns,
            hooks=hooks.hooks(),
            context=context,
            run_config=run_config,
        )
    hooks.result = result
    trace_id = run_config.trace_id
    watch = _CancelWatch(fence, result)
    keeper.on_lost(lambda: loop.call_soon_threadsafe(watch.lose))
    if eventloop.is_shared(loop):
        # A worker's runs: one query a second for all of them (``CancelPoller``).
        watcher = None
        CANCEL_POLLER.watch(watch, loop)
    else:
        watcher = asyncio.create_task(watch.run())
    deltas = DeltaWriter(fence, events=recorder is not None)
    try:
        async with asyncio.timeout(time_left(run)):
            async for event in result.stream_events():
                text = _text_delta(event)
                if text:
                    deltas.add(text)
                    continue
                described = describe(event)
                if described is None:
                    continue
                watch.saw(described[0])
                streamed = await deltas.complete() if described[0] == "message_output" else False
                recorded = None
                if recorder is not None:
                    recorded = await run_sync(recorder.record)(*described)
                    if recorded is None:
                        watch.lose()  # the event was dropped: this attempt lost the run
                if streamed:
                    # Clients now have the whole message (as an event, when events are on).
                    sequence = recorded.sequence if recorded is not None else None
                    await run_sync(lifecycle.end_stream)(fence, sequence)
                if described[0] in TURN_END_EVENTS:
                    # A turn's tools are done: look now, before the SDK asks the model again.
                    await watch.check()
                    if tracing.RECORDER.due(trace_id):
                        await run_sync(tracing.RECORDER.write)(trace_id, fence, final=False)
            await meter.settle()  # a call the hooks did not see end (an agent's as a tool)
    except TimeoutError:
        await _stop(result)
        seconds = config.run_timeout_seconds
        return _outcome(result, Status.FAILED, timeout_message(seconds))
    except SessionWriteRejected:
        return Outcome(Status.FAILED, lost=True)
    except MaxTurnsExceeded:
        return _outcome(
            result, Status.FAILED, f"The agent used all {max_turns} turns without finishing."
        )
    except Exception as exc:
        if watch.lost or _caused_by(exc, ToolCallDropped):
            return Outcome(Status.FAILED, lost=True)
        if database_unavailable(exc):
            return await run_sync(_left_for_retry)(fence, exc)
        if _caused_by(exc, ToolCallCancelled):
            return _outcome(result, Status.CANCELLED)  # the tool did not run
        stop = _cause(exc, BudgetStop)
        if stop is not None:
            # Before the model call: the checkpoint taken just now is where the run goes on.
            on_exceeded = config.budgets.on_exceeded
            status = Status.BUDGET_EXCEEDED if on_exceeded == "pause" else Status.FAILED
            stopped = _outcome(result, status, stop.standing.message)
            stopped.over_budget = True
            return stopped
        if _caused_by(exc, ToolCallInDoubt):
            logger.error("agentic_django: run %s: %s", run.pk, exc)
            return _outcome(result, Status.FAILED, IN_DOUBT_ERROR)
        logger.exception("agentic_django: run %s failed", run.pk)
        described = failures.describe(exc)
        return _outcome(result, Status.FAILED, described.message, detail=described.detail)
    finally:
        # A call that answered before the run stopped was paid for (the run still holds it).
        try:
            await meter.settle()
        except Exception:
            logger.exception("agentic_django: run %s: a model call could not be recorded", run.pk)
        # Text streamed so far stays: the partial output of a run that failed or stopped.
        await deltas.close()
        if watcher is None:
            CANCEL_POLLER.forget(watch)
        else:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, DatabaseError):
                await watcher
        # What the attempt did, step by step, for the inspector (before its terminal state).
        await run_sync(tracing.RECORDER.write)(trace_id, fence, final=True)
    if watch.lost:
        return Outcome(Status.FAILED, lost=True)
    if watch.cancel_requested and result.final_output is None:
        return _outcome(result, Status.CANCELLED)
    if result.interruptions:
        paused = _outcome(result, Status.AWAITING_APPROVAL)
        paused.checkpoint = checkpoints.serialize(result)
        paused.turn = result.current_turn
        paused.approvals = checkpoints.pending_approvals(result)
        return paused
    return _outcome(result, Status.COMPLETED, final_output=json_safe(result.final_output))


def _caused_by(exc: BaseException | None, kind: type[BaseException]) -> bool:
    return _cause(exc, kind) is not None


def _cause[E: BaseException](exc: BaseException | None, kind: type[E]) -> E | None:
    """``exc`` or the first exception of ``kind`` in its chain of causes."""
    while exc is not None:
        if isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


timeout_message = lifecycle.timeout_error


async def _stop(result: Any) -> None:
    result.cancel()
    with contextlib.suppress(Exception, TimeoutError):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in result.stream_events():
                pass


def _outcome(
    result: Any, status: str, error: str = "", final_output: Any = None, detail: str = ""
) -> Outcome:
    usage = result.context_wrapper.usage
    try:
        last_response_id = result.last_response_id or ""
    except Exception:
        last_response_id = ""
    return Outcome(
        status,
        error=error,
        error_detail=detail,
        final_output=final_output,
        usage={
            "requests": usage.requests,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
        },
        last_response_id=last_response_id[:255],
    )


def _text_delta(event: Any) -> str:
    """The text of a model's output-text delta event ("" for any other event)."""
    if getattr(event, "type", None) != "raw_response_event":
        return ""
    data = getattr(event, "data", None)
    if getattr(data, "type", None) != "response.output_text.delta":
        return ""
    return getattr(data, "delta", "") or ""


class DeltaWriter:
    """Writes an attempt's streamed text to its run (clients read it from there), from a task
    of its own: a message's first text at once, the rest coalesced to one write per
    ``interval()`` -- ``INTERVAL``, longer once the process's open writers would write more
    than ``WRITES_PER_SECOND`` in all (a worker streaming 200 runs writes each about every
    0.8 s instead of 2,000 times a second). ``close()`` must follow."""

    INTERVAL = 0.1
    WRITES_PER_SECOND = 250
    _open = 0  # writers of this process not closed yet
    _open_lock = threading.Lock()

    def __init__(self, fence: Fence, *, events: bool = True) -> None:
        self.fence = fence
        self.events = events  # the run records events (messages follow them)
        self._buffer: list[str] = []
        self._written = False  # the run holds text of the message streaming now
        self._last_write = 0.0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        with DeltaWriter._open_lock:
            DeltaWriter._open += 1

    @classmethod
    def interval(cls) -> float:
        """Seconds between two writes of one writer."""
        return max(cls.INTERVAL, cls._open / cls.WRITES_PER_SECOND)

    def add(self, text: str) -> None:
        self._buffer.append(text)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._write_soon())

    async def _write_soon(self) -> None:
        delay = self._last_write + self.interval() - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
        self._wake.clear()
        await self._write()

    async def _write(self) -> None:
        if not self._buffer:
            return
        text, new_message = "".join(self._buffer), not self._written
        self._buffer.clear()
        self._written = True
        self._last_write = time.monotonic()
        await run_sync(self._store)(text, new_message)

    def _store(self, text: str, new_message: bool) -> None:
        lifecycle.stream_text(
            self.fence, storable_copy(text), new_message=new_message, events=self.events
        )

    async def complete(self) -> bool:
        """The message is complete: drop what is not written yet; whether any was."""
        self._buffer.clear()
        await self._settle()
        written, self._written = self._written, False
        return written

    async def close(self) -> None:
        """Write what is left (the run stopped mid-message)."""
        if not self._closed:
            self._closed = True
            with DeltaWriter._open_lock:
                DeltaWriter._open -= 1
        await self._settle()
        with contextlib.suppress(Exception):
            await self._write()

    async def _settle(self) -> None:
        if self._task is not None and not self._task.done():
            self._wake.set()
            with contextlib.suppress(Exception):
                await self._task


class _CancelWatch:
    """Polls the run on the event loop for a cancellation request: while a tool runs, the run
    stops after its turn (so every call keeps its output in the history); otherwise -- the
    model is thinking or streaming text -- at once (the text so far is kept as partial)."""

    def __init__(self, fence: Fence, result: Any) -> None:
        self.fence = fence
        self.result = result
        self.cancel_requested = False
        self.lost = False
        self.tools_running = 0

    def saw(self, event_type: str) -> None:
        """Keep count of the tool calls (and handoffs) started but not finished."""
        if event_type in ("tool_called", "handoff_requested"):
            self.tools_running += 1
        elif event_type in ("tool_output", "handoff") and self.tools_running:
            self.tools_running -= 1

    async def run(self) -> None:
        while not self.lost:
            await asyncio.sleep(POLL_SECONDS)
            await self.check()

    async def check(self) -> None:
        if self.cancel_requested or self.lost:
            return
        try:
            state = await run_sync(self.fence.state)()
        except DatabaseError:
            # The database is away for a moment: look again at the next poll (the lease
            # keeper decides whether the attempt still holds its run).
            logger.warning("agentic_django: could not look for a cancellation", exc_info=True)
            return
        self.found(state)

    def found(self, state: bool | None) -> None:
        """What a look at the run found (``Fence.state``): lost, cancelled or neither."""
        if self.cancel_requested or self.lost:
            return
        if state is None:
            self.lose()
        elif state:
            self.cancel_requested = True
            self.result.cancel(mode="after_turn" if self.tools_running else "immediate")

    def lose(self) -> None:
        """The attempt lost its run: stop at once, nothing more it does is kept."""
        if not self.lost:
            self.lost = True
            self.result.cancel()


class CancelPoller:
    """Looks for the cancellation requests (and lost claims) of every run a process executes
    on a shared event loop with one query every ``POLL_SECONDS``, from a thread of its own,
    instead of one query per run: 200 runs in flight cost one query a second, not 200. What
    it finds goes to each run's ``_CancelWatch`` on its loop; a turn's end still looks at
    once (``_CancelWatch.check``)."""

    def __init__(self) -> None:
        self._watches: dict[_CancelWatch, asyncio.AbstractEventLoop] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, watch: _CancelWatch, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._watches[watch] = loop
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="agentic-django-cancel-poller", daemon=True
                )
                self._thread.start()

    def forget(self, watch: _CancelWatch) -> None:
        with self._lock:
            self._watches.pop(watch, None)

    def _run(self) -> None:
        pause = threading.Event()
        while True:
            pause.wait(POLL_SECONDS)
            with self._lock:
                watches = list(self._watches.items())
            try:
                if watches:
                    self.poll(watches)
            except Exception:  # the poller must outlive any one look
                logger.exception("agentic_django: the cancellation poll failed")

    def poll(self, watches: list[tuple[_CancelWatch, asyncio.AbstractEventLoop]]) -> None:
        """One look at the runs of ``watches``; each watch hears what concerns it."""
        try:
            states = released(lifecycle.fence_states)([watch.fence for watch, _ in watches])
        except (DatabaseError, InterfaceError):
            # The database is away for a moment: look again next time (the lease keepers
            # decide whether the attempts still hold their runs).
            logger.warning("agentic_django: could not look for cancellations", exc_info=True)
            return
        for watch, loop in watches:
            state = states.get(watch.fence)
            if state is not False:
                with contextlib.suppress(RuntimeError):  # a closed loop: its runs are gone
                    loop.call_soon_threadsafe(watch.found, state)


CANCEL_POLLER = CancelPoller()


class DaemonThreadExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each call in its own daemon thread; ``shutdown`` never waits for one.

    The event loop's default executor during a run, so a sync tool that hangs past the run
    timeout is abandoned instead of holding the worker (``asyncio.run`` would join it).
    A ``ThreadPoolExecutor`` only because asyncio accepts nothing else; it keeps no pool.
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                connections.close_all()  # this thread's connections, if the tool used the ORM

        threading.Thread(target=run, name="agentic-django-tool", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None


class LeaseKeeper:
    """Keeps an attempt's lease alive from its own thread and enforces the run's deadline.

    Renews every third of a lease. A renewal that fails on a database error is retried until
    the lease would run out; then -- or when a renewal finds the run taken over -- the attempt
    is told it lost its run. If the attempt is still running ``timeout_seconds`` after it
    started (its event loop is blocked), the keeper records the timeout itself.
    """

    RETRY_SECONDS = 1.0

    def __init__(
        self,
        fence: Fence,
        *,
        lease_seconds: float,
        timeout_seconds: float,
        elapsed_before: float = 0.0,
    ) -> None:
        self.fence = fence
        self.lease_seconds = lease_seconds
        self.renew_every = lease_seconds / 3
        self.elapsed_before = elapsed_before
        self.started = started = time.monotonic()
        self.deadline = started + timeout_seconds
        self.lease_until = started + lease_seconds
        self.next_renewal = started + self.renew_every
        self.lost = False
        self._callbacks: list[Callable[[], object]] = []
        self._stopped = threading.Event()
        # Its log lines carry the run's fields (agentic_django.logcontext) like the run's own.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run,
            args=(self._run,),
            name=f"agentic-django-lease-{fence.run_id}",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def abandon(self) -> None:
        """Renew no more: this process gives the attempt up (without waiting for it)."""
        self._stopped.set()

    def on_lost(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (from the keeper's thread) when the attempt loses its run."""
        self._callbacks.append(callback)
        if self.lost:
            callback()

    def elapsed(self) -> float:
        """Seconds the run has run in all its attempts, this one so far included."""
        return self.elapsed_before + time.monotonic() - self.started

    def lease_left(self) -> float:
        """Seconds until the lease runs out, as far as this process knows."""
        return self.lease_until - time.monotonic()

    def _run(self) -> None:
        try:
            while not self._stopped.wait(
                max(0.0, min(self.next_renewal, self.deadline) - time.monotonic())
            ):
                if time.monotonic() >= self.deadline:
                    self._time_out()
                    return
                if not self._renew():
                    return
        finally:
            connections.close_all()

    def _renew(self) -> bool:
        """One renewal; False once the attempt lost its run."""
        sent = time.monotonic()
        try:
            held = released(lifecycle.renew)(self.fence)
        except DatabaseError:
            logger.warning(
                "agentic_django: could not renew the lease of run %s; retrying",
                self.fence.run_id,
                exc_info=True,
            )
            connection.close()  # reconnect on the next try
            if self.lease_left() <= self.RETRY_SECONDS:
                self._lose("its lease could not be renewed before it ran out")
                return False
            self.next_renewal = time.monotonic() + self.RETRY_SECONDS
            return True
        if not held:
            self._lose("the run was taken over")
            return False
        self.lease_until = sent + self.lease_seconds
        self.next_renewal = sent + self.renew_every
        return True

    def _lose(self, why: str) -> None:
        if self._stopped.is_set():
            return  # the attempt already ended (its terminal state ends the claim too)
        logger.warning(
            "agentic_django: attempt %s of run %s stops: %s",
            self.fence.attempt,
            self.fence.run_id,
            why,
        )
        self.lost = True
        for callback in self._callbacks:
            with contextlib.suppress(Exception):
                callback()

    def _time_out(self) -> None:
        """The attempt is still running long past its timeout: end the run from here."""
        seconds = get_config().run_timeout_seconds
        outcome = Outcome(
            Status.FAILED,
            error=timeout_message(seconds),
            error_detail="The agent's event loop did not stop at the run timeout; the lease "
            "keeper ended the run.",
        )
        finished = finish(self.fence, outcome, self)
        self._lose("it ran past its timeout")
        if finished is not None:
            dispatch_next_safely()


def finish(fence: Fence, outcome: Outcome, keeper: LeaseKeeper) -> AgentRun | None:
    """Record ``outcome`` under the fence, retrying transient database errors while the lease
    lasts; output the database cannot store fails the run instead. None if the fence is lost.
    """
    outcome = _storable(outcome)
    delay = 0.2
    while True:
        try:
            if outcome.status in AgentRun.PAUSED_STATUSES:
                # Sends its own signal: the run is paused, not over.
                run = lifecycle.pause(
                    fence,
                    state=outcome.checkpoint or None,
                    schema_version=checkpoints.schema_version(),
                    turn=outcome.turn,
                    approvals=outcome.approvals,
                    usage=outcome.usage,
                    elapsed=keeper.elapsed(),
                    status=outcome.status,
                    reason=outcome.error,
                )
                if run is not None and run.status == Status.CANCELLED:
                    _announce(run)  # its cancellation came first: it never paused
                return run
            run = lifecycle.finish(
                fence,
                status=outcome.status,
                error=outcome.error,
                error_detail=outcome.error_detail,
                final_output=outcome.final_output,
                last_response_id=outcome.last_response_id,
                usage=outcome.usage,
            )
        except TRANSIENT_DATABASE_ERRORS:
            logger.warning(
                "agentic_django: could not finish run %s; retrying", fence.run_id, exc_info=True
            )
            if keeper.lost or keeper.lease_left() <= delay:
                return None
            if not connection.in_atomic_block:
                connection.close()
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        except DatabaseError as exc:
            if outcome.error == failures.STORE_FAILED:
                # Not even a fixed message can be written: leave the run to lease recovery.
                logger.exception("agentic_django: run %s cannot be finished", fence.run_id)
                return None
            logger.exception("agentic_django: the outcome of run %s cannot be stored", fence.run_id)
            outcome = Outcome(
                Status.FAILED,
                error=failures.STORE_FAILED,
                error_detail=failures.describe(exc).detail,
                usage=outcome.usage,
            )
            continue
        if run is not None:
            _announce(run)
            if outcome.over_budget:
                send_safely(agent_budget_exceeded, AgentRun, run=run, reason=run.error)
        return run


def _storable(outcome: Outcome) -> Outcome:
    if is_storable(outcome.final_output):
        return outcome
    return Outcome(
        Status.FAILED,
        error=UNSTORABLE_OUTPUT,
        error_detail=outcome.error_detail.replace("\x00", "\\x00"),
        usage=outcome.usage,
        last_response_id=outcome.last_response_id,
    )


def _announce(run: AgentRun) -> None:
    signal = {
        Status.COMPLETED: agent_run_completed,
        Status.FAILED: agent_run_failed,
        Status.CANCELLED: agent_run_cancelled,
    }[run.status]
    send_safely(signal, AgentRun, run=run)


def dispatch_next_safely() -> None:
    """Dispatch the waiting runs; a failure here is left to the next sweep, never raised."""
    try:
        dispatch_next()
    except Exception:
        logger.exception("agentic_django: dispatching the next runs failed; the next sweep will")
