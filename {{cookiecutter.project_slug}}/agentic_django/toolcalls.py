"""Exactly-once tool calls: a call's output is recorded the moment the tool returns, before the
run goes on, and a resumed or retried run gets the recorded output back instead of calling
the tool again.

Every function tool of the agents a run uses is wrapped once (``install``); outside a run the
wrapper only calls the tool. A call is matched by the model's call id -- a run resumed from a
checkpoint or from an approval replays the very same calls -- or, within the turn that was in
progress when a worker died, by tool name and arguments: that turn's model call is made again
and may give the same call a new id.

One window cannot be closed: a worker that dies *inside* a tool leaves no recorded output, so
the call runs again. A tool with side effects should pass ``idempotency_key(context)`` to the
system it acts on (most payment, mail and ticket APIs accept one): the key is the same for
every retry of the call.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.db import IntegrityError, connection
from django.utils import timezone

from agentic_django.lifecycle import Fence
from agentic_django.models import AgentToolCall
from agentic_django.serializers import json_safe
from agentic_django.validation import storable_copy

logger = logging.getLogger(__name__)

_current: ContextVar[ToolLedger | None] = ContextVar("agentic_django_tool_ledger", default=None)
_WRAPPED = "_agentic_django_ledger"


class ToolCallDropped(RuntimeError):
    """The attempt lost its run while a tool ran: its output was not recorded."""


@dataclass
class ToolLedger:
    """The tool calls of one attempt of a run."""

    fence: Fence
    # The model turn the attempt is in (kept current by the checkpoint hooks), and the turn
    # that was in progress when the attempt this one resumes stopped.
    turn: int = 1
    resumed_turn: int = 1
    _matched: set[int] = field(default_factory=set)

    def activate(self) -> Token[ToolLedger | None]:
        """Make this the ledger of the current context (the run's event loop)."""
        return _current.set(self)

    def lookup(self, call_id: str, tool_name: str, arguments: str) -> tuple[bool, Any]:
        """(True, output) if this call already finished in an earlier attempt."""
        calls = AgentToolCall.objects.filter(run_id=self.fence.run_id)
        row = calls.filter(call_id=call_id).values_list("pk", "output").first()
        if row is None and self.turn == self.resumed_turn:
            row = (
                calls.filter(turn=self.turn, tool_name=tool_name, arguments=arguments)
                .exclude(pk__in=self._matched)
                .order_by("pk")
                .values_list("pk", "output")
                .first()
            )
        if row is None:
            return False, None
        self._matched.add(row[0])
        return True, row[1]

    def record(self, call_id: str, tool_name: str, arguments: str, output: Any) -> None:
        """Store a finished call, if this attempt still holds its run."""
        meta = AgentToolCall._meta
        qn = connection.ops.quote_name
        names = ("run", "call_id", "tool_name", "arguments", "turn", "output", "attempt")
        columns = ", ".join(qn(meta.get_field(name).column) for name in (*names, "created_at"))
        fence_sql, fence_params = self.fence.exists_sql()
        values = {
            "run": self.fence.run_id,
            "call_id": call_id,
            "tool_name": tool_name,
            "arguments": arguments,
            "turn": self.turn,
            "output": output,
            "attempt": self.fence.attempt,
        }
        params = [
            meta.get_field(name).get_db_prep_value(values[name], connection) for name in names
        ]
        params.append(meta.get_field("created_at").get_db_prep_value(timezone.now(), connection))
        placeholders = ", ".join(["%s"] * len(params))
        # Only quoted model names are interpolated; every value is a parameter.
        sql = f"INSERT INTO {qn(meta.db_table)} ({columns}) SELECT {placeholders} WHERE {fence_sql}"
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, [*params, *fence_params])
                recorded = cursor.rowcount
        except IntegrityError:
            return  # recorded already (the same call replayed)
        if not recorded:
            raise ToolCallDropped(
                f"Run {self.fence.run_id} attempt {self.fence.attempt} lost its run during "
                f"{tool_name}; its output was dropped."
            )


def deactivate(token: Token[ToolLedger | None]) -> None:
    """Undo ``activate``."""
    _current.reset(token)


def idempotency_key(context: Any) -> str:
    """A key for the tool call ``context`` (a ``ToolContext``) that stays the same on every
    retry of the call: pass it to the system a tool with side effects acts on."""
    ledger = _current.get()
    run = ledger.fence.run_id if ledger else "-"
    turn = ledger.turn if ledger else 0
    digest = hashlib.sha256(
        json.dumps([str(run), turn, context.tool_name, context.tool_arguments]).encode()
    ).hexdigest()
    return f"agentic-{digest[:40]}"


def install(agents: Iterable[Any]) -> None:
    """Wrap every function tool of ``agents`` and the agents they hand off to (once)."""
    from agents import Agent, FunctionTool

    seen: set[int] = set()
    pending = list(agents)
    while pending:
        agent = pending.pop()
        if not isinstance(agent, Agent) or id(agent) in seen:
            continue
        seen.add(id(agent))
        for tool in agent.tools:
            if isinstance(tool, FunctionTool) and not getattr(tool, _WRAPPED, False):
                tool.on_invoke_tool = _ledgered(tool.on_invoke_tool)
                setattr(tool, _WRAPPED, True)
        pending.extend(agent.handoffs)


def _ledgered(invoke: Callable[[Any, str], Awaitable[Any]]) -> Callable[[Any, str], Awaitable[Any]]:
    async def invoke_once(context: Any, arguments: str) -> Any:
        ledger = _current.get()
        if ledger is None:
            return await invoke(context, arguments)
        call_id, name = context.tool_call_id, context.tool_name
        found, output = await sync_to_async(ledger.lookup)(call_id, name, arguments)
        if found:
            logger.info("agentic_django: %s %s replayed from its recorded output", name, call_id)
            return output
        output = await invoke(context, arguments)
        await sync_to_async(ledger.record)(
            call_id, name, arguments, storable_copy(json_safe(output))
        )
        return output

    return invoke_once
