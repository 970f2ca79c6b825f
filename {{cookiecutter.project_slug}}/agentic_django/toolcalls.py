"""Exactly-once tool calls, and no call repeated blindly.

Every function tool of the agents a run uses is wrapped once (``install``); outside a run the
wrapper only calls the tool. In a run, a call is recorded as *started* (under the attempt's
fence) before the tool runs, and as *finished*, with its output, the moment it returns. A
resumed or retried run gets a finished call's output back instead of calling the tool again.
A call is matched by the model's call id -- a run resumed from a checkpoint or from an
approval replays the very same calls -- or, within the turn that was in progress when a
worker died, by tool name, arguments and occurrence: that turn's model call is made again and
may give the same call a new id.

A call that started and never finished (its worker died inside the tool) may or may not have
happened. A retry runs it again only if its tool is declared safe to repeat (``repeatable``);
for every other tool the run pauses before its next model call and asks its user, through the
approval inbox, whether to run the call again, to count it as done (with a message the model
gets as its output), or to stop the run.

Tools that act on the world should also pass ``idempotency_key(context)`` to the system they
act on: the key tells the calls of a turn apart and stays the same on every retry of a call.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

from django.db import connection
from django.db.models import Exists, Max
from django.utils import timezone

from agentic_django.db import run_sync
from agentic_django.lifecycle import FENCE_VALUES, Fence
from agentic_django.models import AgentApproval, AgentToolCall
from agentic_django.prepared import Statement
from agentic_django.serializers import json_safe
from agentic_django.validation import storable_copy

logger = logging.getLogger(__name__)

_current: ContextVar[ToolLedger | None] = ContextVar("agentic_django_tool_ledger", default=None)
_WRAPPED = "_agentic_django_ledger"
_REPEATABLE = "_agentic_django_repeatable"
# The output a call in doubt gets when its user counts it as done without a message.
DONE_OUTPUT = "This call was already carried out (confirmed by the user)."


class ToolCallDropped(RuntimeError):
    """The attempt lost its run while a tool ran: its output was not recorded."""


class ToolCallCancelled(RuntimeError):
    """The run's cancellation was requested before the tool started: it did not run."""


class ToolCallInDoubt(RuntimeError):
    """A call that may have happened came up again without a decision on it."""


def repeatable(tool: Any) -> Any:
    """Declare a function tool safe to run again when its worker died inside it (it reads,
    or its effect is idempotent); returns the tool. Undeclared tools make the run ask."""
    setattr(tool, _REPEATABLE, True)
    return tool


def is_repeatable(tool: Any) -> bool:
    return bool(getattr(tool, _REPEATABLE, False))


def in_doubt_id(call_id: str, attempt: int) -> str:
    """The id a call in doubt is decided under (its call id, and the attempt that died)."""
    return f"{call_id}@{attempt}"


@dataclass
class Started:
    """A call of this attempt, recorded as started."""

    pk: int
    key: str


@dataclass
class ToolLedger:
    """The tool calls of one attempt of a run."""

    fence: Fence
    # The model turn the attempt is in (kept current by the checkpoint hooks), and the turn
    # that was in progress when the attempt this one resumes stopped.
    turn: int = 1
    resumed_turn: int = 1
    _matched: set[int] = field(default_factory=set)
    # call id -> which call of its tool with its arguments it is in its turn (0, 1, ...).
    _occurrences: dict[str, int] = field(default_factory=dict)
    # call id -> idempotency key, for the calls this attempt runs.
    keys: dict[str, str] = field(default_factory=dict)

    def activate(self) -> Token[ToolLedger | None]:
        """Make this the ledger of the current context (the run's event loop)."""
        return _current.set(self)

    def plan(self, output: Iterable[Any]) -> None:
        """Number the calls a model response asks for, in its order: two calls of one tool
        with the same arguments in a turn are two calls (and get two keys)."""
        seen: dict[tuple[str, str], int] = {}
        for item in output:
            if getattr(item, "type", None) != "function_call":
                continue
            name, arguments = getattr(item, "name", ""), getattr(item, "arguments", "")
            occurrence = seen.get((name, arguments), 0)
            seen[(name, arguments)] = occurrence + 1
            self._occurrences[getattr(item, "call_id", "")] = occurrence

    def _occurrence(self, call_id: str, name: str, arguments: str) -> int:
        """Which call of its tool with its arguments in its turn this is: as the model's
        response numbered it, or -- for a call no response of this attempt named (an approved
        call a resumed run makes) -- the next number after those already recorded."""
        if call_id not in self._occurrences:
            recorded = AgentToolCall.objects.filter(
                run_id=self.fence.run_id, turn=self.turn, tool_name=name, arguments=arguments
            ).aggregate(last=Max("occurrence"))["last"]
            self._occurrences[call_id] = 0 if recorded is None else recorded + 1
        return self._occurrences[call_id]

    def key_for(self, name: str, arguments: str, occurrence: int) -> str:
        return _key([str(self.fence.run_id), self.turn, name, arguments, occurrence])

    def begin(
        self, call_id: str, name: str, arguments: str, *, repeatable: bool
    ) -> tuple[bool, Any, Started | None]:
        """Before the tool runs: ``(True, output, None)`` to replay a finished call, else
        ``(False, None, started)`` once the call is recorded as started.

        Raises ``ToolCallDropped`` if the attempt lost its run, ``ToolCallCancelled`` if the
        run's cancellation was requested, ``ToolCallInDoubt`` for a call in doubt nobody
        decided on.
        """
        # Only a later attempt can find calls of earlier ones.
        row = self._earlier(call_id, name, arguments) if self.fence.attempt > 1 else None
        if row is None:
            occurrence = self._occurrence(call_id, name, arguments)
            key = self.key_for(name, arguments, occurrence)
            started = Started(self._insert(call_id, name, arguments, occurrence, key), key)
        elif row.finished_at is not None:
            return True, row.output, None
        else:
            started = self._resume(row, repeatable=repeatable)
            if started is None:
                return True, row.output, None
        self.keys[call_id] = started.key
        return False, None, started

    def _earlier(self, call_id: str, name: str, arguments: str) -> AgentToolCall | None:
        """The record of this call from an earlier attempt: by call id, or -- for a call the
        model named anew as it was asked for the turn in progress again -- by tool, arguments
        and occurrence. A call the SDK replays from a resumed state keeps its id, and only
        that matches it (an equal call that ran already is another call)."""
        # Calls of earlier attempts only: those this attempt started are its own, running.
        calls = AgentToolCall.objects.filter(
            run_id=self.fence.run_id, attempt__lt=self.fence.attempt
        ).exclude(pk__in=self._matched)
        row = calls.filter(call_id=call_id, tool_name=name, arguments=arguments).first()
        if row is None and self.turn == self.resumed_turn and call_id in self._occurrences:
            occurrence = self._occurrences[call_id]
            same = calls.filter(turn=self.turn, tool_name=name, arguments=arguments)
            row = same.filter(occurrence=occurrence).order_by("pk").first()
            row = row or same.order_by("occurrence", "pk").first()
        if row is not None:
            self._matched.add(row.pk)
        return row

    def _resume(self, row: AgentToolCall, *, repeatable: bool) -> Started | None:
        """A call an earlier attempt started and never finished: run it again (a repeatable
        tool, or its user said so; a Started), or count it as done (its user said so; the
        row then holds the output, None is returned)."""
        decision = (
            AgentApproval.objects.filter(
                run_id=self.fence.run_id,
                kind=AgentApproval.Kind.IN_DOUBT,
                call_id=in_doubt_id(row.call_id, row.attempt),
            )
            .values_list("decision", "message")
            .first()
        )
        if not repeatable and (decision is None or decision[0] not in AgentApproval.ANSWERS):
            raise ToolCallInDoubt(f"{row.tool_name} {row.call_id} is in doubt and undecided")
        this_call = AgentToolCall.objects.filter(pk=row.pk)
        if repeatable or decision[0] == AgentApproval.Decision.APPROVED:
            # Run again under this attempt (if it dies inside the tool again, it is asked
            # again) -- unless a cancellation was requested: then no tool starts.
            uncancelled = self.fence.runs().filter(cancel_requested_at__isnull=True)
            again = this_call.filter(Exists(uncancelled)).update(attempt=self.fence.attempt)
            self._check(again, row.tool_name)
            return Started(row.pk, row.idempotency_key)
        output = decision[1] or DONE_OUTPUT
        done = this_call.filter(Exists(self.fence.runs()))
        self._check(done.update(output=output, finished_at=timezone.now()), row.tool_name)
        row.output = output
        return None

    def _insert(self, call_id: str, name: str, arguments: str, occurrence: int, key: str) -> int:
        """Record the call as started, if this attempt holds its run and nobody asked to
        cancel it; its primary key."""
        meta = AgentToolCall._meta
        qn = connection.ops.quote_name
        values = {
            "run": self.fence.run_id,
            "call_id": call_id,
            "tool_name": name,
            "arguments": arguments,
            "turn": self.turn,
            "occurrence": occurrence,
            "idempotency_key": key,
            "attempt": self.fence.attempt,
            "created_at": timezone.now(),
        }
        columns = ", ".join(qn(meta.get_field(n).column) for n in values)
        params = [meta.get_field(n).get_db_prep_value(v, connection) for n, v in values.items()]
        fence_sql, fence_params = self.fence.exists_sql(uncancelled=True)
        placeholders = ", ".join(["%s"] * len(params))
        # Only quoted model names are interpolated; every value is a parameter.
        sql = (
            f"INSERT INTO {qn(meta.db_table)} ({columns}) SELECT {placeholders} "
            f"WHERE {fence_sql} RETURNING {qn(meta.pk.column)}"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [*params, *fence_params])
            row = cursor.fetchone()
        if row is None:
            self._check(0, name)
        return row[0]

    def finish(self, started: Started, name: str, output: Any) -> None:
        """Record the call's output, if this attempt still holds its run."""
        written = _FINISH.update(
            pk=started.pk, output=output, now=timezone.now(), **self.fence.values()
        )
        self._check(written, name)

    def _check(self, written: int, name: str) -> None:
        if written:
            return
        if self.fence.state() is None:
            raise ToolCallDropped(
                f"Run {self.fence.run_id} attempt {self.fence.attempt} lost its run during "
                f"{name}; nothing more of it is recorded."
            )
        raise ToolCallCancelled(f"Run {self.fence.run_id} was cancelled before {name} ran.")


# A call's output, written while the attempt holds its run (compiled once: see ``prepared``).
_FINISH = Statement(
    lambda pk, output, now, **fence: (
        AgentToolCall.objects.filter(pk=pk).filter(Exists(Fence(**fence).runs())),
        {"output": output, "finished_at": now},
    ),
    values={
        "pk": AgentToolCall._meta.pk,
        "output": AgentToolCall._meta.get_field("output"),
        "now": AgentToolCall._meta.get_field("finished_at"),
        **FENCE_VALUES,
    },
)


def deactivate(token: Token[ToolLedger | None]) -> None:
    """Undo ``activate``."""
    _current.reset(token)


def idempotency_key(context: Any) -> str:
    """A key for the tool call ``context`` (a ``ToolContext``): different for each call of a
    turn -- two calls with the same arguments included -- and the same on every retry of a
    call. Pass it to the system a tool with side effects acts on."""
    ledger = _current.get()
    if ledger is not None and context.tool_call_id in ledger.keys:
        return ledger.keys[context.tool_call_id]
    return _key(["-", 0, context.tool_name, context.tool_arguments, context.tool_call_id])


def _key(parts: list[Any]) -> str:
    return "agentic-" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:40]


def function_tools(agents: Iterable[Any]) -> list[Any]:
    """The function tools of ``agents`` and of the agents they hand off to."""
    from agents import Agent, FunctionTool

    tools: list[Any] = []
    seen: set[int] = set()
    pending = list(agents)
    while pending:
        agent = pending.pop()
        if not isinstance(agent, Agent) or id(agent) in seen:
            continue
        seen.add(id(agent))
        for tool in agent.tools:
            if isinstance(tool, FunctionTool):
                tools.append(tool)
        pending.extend(getattr(h, "agent", h) for h in agent.handoffs)
    return tools


def install(agents: Iterable[Any]) -> dict[str, bool]:
    """Wrap every function tool of ``agents`` and the agents they hand off to (once); which
    tool names are safe to repeat (a name any of them declares ``repeatable``)."""
    tools = function_tools(agents)
    for tool in tools:
        if not getattr(tool, _WRAPPED, False):
            tool.on_invoke_tool = _ledgered(tool, tool.on_invoke_tool)
            setattr(tool, _WRAPPED, True)
    return {tool.name: is_repeatable(tool) for tool in tools}


def _ledgered(
    tool: Any, invoke: Callable[[Any, str], Awaitable[Any]]
) -> Callable[[Any, str], Awaitable[Any]]:
    async def invoke_once(context: Any, arguments: str) -> Any:
        ledger = _current.get()
        if ledger is None:
            return await invoke(context, arguments)
        call_id, name = context.tool_call_id, context.tool_name
        replay, output, started = await run_sync(ledger.begin)(
            call_id, name, arguments, repeatable=is_repeatable(tool)
        )
        if replay:
            logger.info("agentic_django: %s %s replayed from its recorded output", name, call_id)
            return output
        output = await invoke(context, arguments)
        await run_sync(ledger.finish)(started, name, storable_copy(json_safe(output)))
        return output

    return invoke_once
