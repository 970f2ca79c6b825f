"""JSON-safe representations: ``json_safe`` for anything we persist, ``*_to_dict`` for the API."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import math
import uuid
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from agentic_django.models import (
    AgentApproval,
    AgentEvent,
    AgentRun,
    AgentSession,
    AgentSessionItem,
)
from agentic_django.usage import Standing, Totals, run_totals

_MAX_DEPTH = 64


def json_safe(value: Any, _depth: int = 0) -> Any:
    """Convert ``value`` to plain JSON types (datetime, Decimal, UUID, pydantic models, ...)."""
    if _depth > _MAX_DEPTH:
        return repr(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID | PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return json_safe(value.value, _depth + 1)
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump) and not isinstance(value, type):
        # pydantic v2 models; mode="json" already handles nested special types.
        return json_safe(model_dump(mode="json"), _depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return json_safe(fields, _depth + 1)
    if isinstance(value, Mapping):
        return {str(key): json_safe(item, _depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(item, _depth + 1) for item in value]
    return str(value)


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value else None


def run_to_dict(
    run: AgentRun, *, session_key: str | None = None, used: Totals | None = None
) -> dict[str, Any]:
    """The public view of a run (no lease or task internals). ``session_key`` and ``used``
    (its usage, see ``usage_to_dict``): read here when not given."""
    return {
        "id": str(run.id),
        "session_key": run.session.session_key if session_key is None else session_key,
        "agent_key": run.agent_key,
        "status": run.status,
        "is_terminal": run.is_terminal,
        "input": run.input_payload,
        "final_output": run.final_output,
        # What a run that failed or was cancelled mid-message had streamed of it.
        "partial_output": (run.stream_text or None) if run.is_terminal else None,
        "error": run.error or None,
        "usage": usage_to_dict(run, used),
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "cancel_requested": run.cancel_requested_at is not None,
        "attempt": run.attempt,
        "approvals": [approval_to_dict(approval) for approval in run.pending_approvals()],
        "approval_expires_at": _iso(run.approval_expires_at),
        "last_response_id": run.last_response_id or None,
    }


RUN_COUNTS = ("requests", "input_tokens", "output_tokens", "total_tokens")


def totals_to_dict(totals: Totals) -> dict[str, Any]:
    """Ledger sums; the cost counts priced calls only (``cost_known``: every call had a price)."""
    return totals.as_dict()


def usage_to_dict(run: AgentRun, used: Totals | None = None) -> dict[str, Any]:
    """What the run used by its ledger (``used``, or one query): each call once, retries
    included."""
    used = totals_to_dict(run_totals(run) if used is None else used)
    if not used["calls"] and run.total_tokens:
        # A run older than the ledger: its own counts, at a cost nobody recorded.
        used.update({name: getattr(run, name) for name in RUN_COUNTS}, cost_known=False)
    return used


def spending_to_dict(found: Standing) -> dict[str, Any]:
    """The user's spending this period against their caps (``usage.standing`` without a run)."""
    return found.as_dict()


def approval_to_dict(approval: AgentApproval) -> dict[str, Any]:
    """A tool call a paused run waits on."""
    return {
        "kind": approval.kind,
        "call_id": approval.call_id,
        "tool": approval.tool_name,
        "arguments": approval.arguments,
        "agent": approval.agent_name or None,
        "requested_at": _iso(approval.requested_at),
        "decision": approval.decision,
    }


def event_to_dict(event: AgentEvent) -> dict[str, Any]:
    """One persisted run event."""
    return {
        "sequence": event.sequence,
        "attempt": event.attempt,
        "type": event.event_type,
        "payload": event.payload,
        "created_at": _iso(event.created_at),
    }


def item_to_dict(item: AgentSessionItem) -> dict[str, Any]:
    """One conversation item (the SDK input item is under ``payload``)."""
    return {
        "sequence": item.sequence,
        "payload": item.payload,
        "run_id": str(item.run_id) if item.run_id else None,
        "created_at": _iso(item.created_at),
    }


def session_to_dict(session: AgentSession) -> dict[str, Any]:
    """A conversation's metadata."""
    return {
        "session_key": session.session_key,
        "metadata": session.metadata,
        "created_at": _iso(session.created_at),
        "updated_at": _iso(session.updated_at),
    }
