"""Resumable runs: the SDK's ``RunState`` of a run, saved server-side and loaded to go on.

A run saves a checkpoint before every model call after its first (when the previous turn's
items are in its session) and when it pauses for approvals. A retry after a worker died, and a
run resumed after its approvals were decided, load the checkpoint and go on from there: earlier
turns are neither paid for nor repeated. The state never comes from a client: it is written
and read only here, under the attempt's fence.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from agentic_django import lifecycle
from agentic_django.db import run_sync
from agentic_django.lifecycle import Fence
from agentic_django.models import AgentApproval, AgentCheckpoint, AgentRun
from agentic_django.toolcalls import ToolLedger
from agentic_django.usage import UsageMeter

logger = logging.getLogger(__name__)

UNREADABLE = (
    "This run was saved in a form the installed agent runtime cannot read, so it cannot go "
    "on. Start a new run."
)


class UnreadableCheckpoint(Exception):
    """The stored state cannot be loaded by the installed SDK (or for this agent)."""


@dataclass
class RunContext:
    """The context every run gets (``RunContextWrapper.context`` in tools and hooks)."""

    run_id: str
    owner_id: Any
    session_id: Any


def run_context(run: AgentRun) -> RunContext:
    return RunContext(run_id=str(run.pk), owner_id=run.owner_id, session_id=run.session_id)


def serialize(result: Any, *, before_turn: bool = False) -> str:
    """The run's current state, as text to store (``RunContext`` as a plain mapping).

    ``before_turn``: taken as a turn starts (its number already counted), to be resumed
    as that turn, which must not count twice against ``max_turns``.
    """
    from agentic_django.serializers import json_safe

    data = result.to_state().to_json(context_serializer=json_safe)
    if before_turn:
        data["current_turn"] = max(0, data["current_turn"] - 1)
    return json.dumps(data)


def schema_version() -> str:
    from agents.run_state import CURRENT_SCHEMA_VERSION

    return CURRENT_SCHEMA_VERSION


async def load(run: AgentRun, agent: Any, checkpoint: AgentCheckpoint) -> Any:
    """The run's ``RunState``, with the decisions taken on its pending tool calls applied."""
    from agents import RunState

    try:
        state = await RunState.from_string(
            agent, checkpoint.state, context_override=run_context(run)
        )
    except Exception as exc:
        raise UnreadableCheckpoint(f"checkpoint of schema {checkpoint.schema_version}") from exc
    decisions = await run_sync(_decisions)(run.pk)
    for item in state.get_interruptions():
        decision = decisions.get(getattr(item.raw_item, "call_id", None))
        if decision is None:
            continue
        if decision.decision == AgentApproval.Decision.APPROVED:
            state.approve(item, always_approve=decision.always)
        else:
            state.reject(
                item, always_reject=decision.always, rejection_message=decision.message or None
            )
    return state


def _decisions(run_id: Any) -> dict[str, AgentApproval]:
    # Only answers count: a call nobody decided in time (expired) is asked again.
    decided = AgentApproval.objects.filter(
        run_id=run_id,
        kind=AgentApproval.Kind.APPROVAL,
        decision__in=AgentApproval.ANSWERS,
    )
    return {approval.call_id: approval for approval in decided}


class CheckpointHooks:
    """SDK run hooks: before each model call of the run but the attempt's first of a fresh
    run, save the state; keep the turn of the tool ledger and of the usage ``meter`` current
    (the meter itself sees every model call, see ``agentic_django.metering``)."""

    def __init__(
        self, fence: Fence, ledger: ToolLedger, *, resumed: bool, meter: UsageMeter | None = None
    ) -> None:
        self.fence = fence
        self.ledger = ledger
        self.meter = meter
        self.result: Any = None  # the streaming result, set once the run started
        self._skip_first = not resumed

    def hooks(self) -> Any:
        from agents import RunHooks

        owner = self

        class Hooks(RunHooks):
            async def on_llm_start(self, context: Any, agent: Any, *args: Any) -> None:
                await owner.before_model_call()

            async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
                owner.ledger.plan(response.output)
                if owner.meter is not None:
                    await owner.meter.settle()  # the call's ledger row, before its tools run

        return Hooks()

    async def before_model_call(self) -> None:
        turn = self.result.current_turn
        self.ledger.turn = turn
        if self.meter is not None:
            # Every call so far is in the ledger before the checkpoint counts its rows.
            await self.meter.settle()
        if self._skip_first:
            self._skip_first = False
        else:
            state = serialize(self.result, before_turn=True)
            saved = await run_sync(lifecycle.save_checkpoint)(
                self.fence, state=state, schema_version=schema_version(), turn=turn
            )
            if not saved:
                logger.info(
                    "agentic_django: run %s lost its claim; checkpoint dropped", self.fence.run_id
                )
        if self.meter is not None:
            # The budgets are checked as the call starts, after the checkpoint: a run that
            # stops there goes on from this very call.
            self.meter.turn = turn


def pending_approvals(result: Any) -> list[dict[str, Any]]:
    """The tool calls a run stopped on, as ``AgentApproval`` fields."""
    from agentic_django.serializers import json_safe

    approvals = []
    for item in result.interruptions:
        raw = item.raw_item
        arguments = getattr(raw, "arguments", None)
        if isinstance(raw, dict):
            arguments = raw.get("arguments")
        approvals.append(
            {
                "call_id": raw.get("call_id", "") if isinstance(raw, dict) else raw.call_id,
                "tool_name": item.tool_name or "",
                "arguments": parsed_arguments(arguments),
                "agent_name": getattr(item.agent, "name", "") or "",
            }
        )
    return json_safe(approvals)


def parsed_arguments(arguments: Any) -> Any:
    """A tool call's arguments as JSON data when they parse, else as given."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments
