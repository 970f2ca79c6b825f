"""Run events: semantic SDK stream events (tool calls and outputs, messages, handoffs, agent
changes; never raw token deltas) stored one by one as they happen, with a per-run sequence,
each fenced by the claim of the attempt that writes it (see ``lifecycle``).

``agent_run_event`` is sent after each event is stored, from synchronous code, so receivers
can use the ORM; a receiver that raises is logged and ignored.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import IntegrityError, connection
from django.db.models import QuerySet
from django.utils import timezone

from agentic_django.lifecycle import Fence
from agentic_django.models import AgentEvent, AgentRun
from agentic_django.serializers import json_safe
from agentic_django.signals import agent_run_event, send_safely
from agentic_django.validation import storable_copy

logger = logging.getLogger(__name__)

# Attempts at an event insert that collides with a lost attempt's insert.
COLLISION_RETRIES = 3

# SDK item event name -> our event type.
ITEM_EVENT_TYPES = {
    "message_output_created": "message_output",
    "tool_called": "tool_called",
    "tool_output": "tool_output",
    "handoff_requested": "handoff_requested",
    "handoff_occured": "handoff",
    "reasoning_item_created": "reasoning",
    "tool_search_called": "tool_search_called",
    "tool_search_output_created": "tool_search_output",
    "mcp_approval_requested": "mcp_approval_requested",
    "mcp_approval_response": "mcp_approval_response",
    "mcp_list_tools": "mcp_list_tools",
}


def describe(event: Any) -> tuple[str, dict[str, Any]] | None:
    """Map an SDK stream event to ``(event_type, payload)``; None for raw model deltas."""
    kind = getattr(event, "type", None)
    if kind == "agent_updated_stream_event":
        return "agent_updated", {"agent": getattr(event.new_agent, "name", None)}
    if kind != "run_item_stream_event":
        return None
    event_type = ITEM_EVENT_TYPES.get(event.name, event.name)
    item = event.item
    raw = _raw_dict(getattr(item, "raw_item", None))
    payload: dict[str, Any] = {"agent": getattr(getattr(item, "agent", None), "name", None)}
    if event_type == "message_output":
        payload["text"] = _message_text(raw)
    elif event_type in ("tool_called", "handoff_requested"):
        payload["tool_name"] = raw.get("name") or raw.get("type")
        payload["call_id"] = raw.get("call_id") or raw.get("id")
        payload["arguments"] = raw.get("arguments")
    elif event_type == "tool_output":
        payload["call_id"] = raw.get("call_id")
        payload["output"] = json_safe(getattr(item, "output", None))
    elif event_type == "handoff":
        payload["from_agent"] = getattr(getattr(item, "source_agent", None), "name", None)
        payload["to_agent"] = getattr(getattr(item, "target_agent", None), "name", None)
    else:
        payload["item"] = raw
    return event_type, payload


class EventRecorder:
    """Stores the events of one run attempt, fenced by its claim.

    Sequences are per run and keep growing across attempts; each event records the attempt
    that wrote it. An attempt that lost its run writes nothing (``record`` returns None).
    """

    def __init__(self, run: AgentRun) -> None:
        self.run = run
        self.fence = Fence.of(run)

    def record(self, event_type: str, payload: dict[str, Any]) -> AgentEvent | None:
        """Store one event now and notify ``agent_run_event`` receivers; None if dropped."""
        # An event log must never fail a run: text the database cannot store is replaced.
        payload = storable_copy(json_safe(payload))
        for _ in range(COLLISION_RETRIES):
            try:
                event = _insert(self.fence, event_type, payload)
            except IntegrityError:
                # A lost attempt took the same sequence a moment ago; the next one is free.
                continue
            break
        else:
            event = None
        if event is None:
            logger.info(
                "agentic_django: dropped a %s event of run %s attempt %s (claim lost)",
                event_type,
                self.fence.run_id,
                self.fence.attempt,
            )
            return None
        send_safely(agent_run_event, AgentEvent, run=self.run, event=event)
        return event


def visible_events(run: AgentRun) -> QuerySet[AgentEvent]:
    """The events clients see: every event but those an attempt that died wrote after the
    run's checkpoint (marked superseded when the run was retried, see ``lifecycle``; they
    stay stored for the admin), so a retried run shows no duplicates."""
    return run.events.filter(superseded=False)


def _insert(fence: Fence, event_type: str, payload: dict[str, Any]) -> AgentEvent | None:
    """Insert the run's next event in one statement, if the fence holds; None otherwise."""
    meta = AgentEvent._meta
    qn = connection.ops.quote_name
    names = ("run", "sequence", "attempt", "event_type", "payload", "created_at", "superseded")
    columns = ", ".join(qn(meta.get_field(name).column) for name in names)
    table, run_column = qn(meta.db_table), qn(meta.get_field("run").column)
    sequence = qn(meta.get_field("sequence").column)
    fence_sql, fence_params = fence.exists_sql()
    now = timezone.now()
    # Only quoted model names are interpolated; every value is a parameter. The database must
    # support INSERT ... RETURNING (checked at startup).
    sql = (
        f"INSERT INTO {table} ({columns}) "  # noqa: S608
        f"SELECT %s, base.last + 1, %s, %s, %s, %s, %s FROM "
        f"(SELECT COALESCE(MAX({sequence}), 0) AS last FROM {table} WHERE {run_column} = %s) base "
        f"WHERE {fence_sql} RETURNING {qn(meta.pk.column)}, {sequence}"
    )
    run_id = meta.get_field("run").get_db_prep_value(fence.run_id, connection)
    params = [
        run_id,
        fence.attempt,
        event_type,
        meta.get_field("payload").get_db_prep_value(payload, connection),
        meta.get_field("created_at").get_db_prep_value(now, connection),
        False,
        run_id,
        *fence_params,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        return None
    pk, number = row
    return AgentEvent(
        pk=pk,
        run_id=fence.run_id,
        sequence=number,
        attempt=fence.attempt,
        event_type=event_type,
        payload=payload,
        created_at=now,
    )


def _raw_dict(raw: Any) -> dict[str, Any]:
    value = json_safe(raw)
    return value if isinstance(value, dict) else {"value": value}


def _message_text(raw: dict[str, Any]) -> str:
    parts = raw.get("content") or []
    return "".join(
        part.get("text") or part.get("refusal") or "" for part in parts if isinstance(part, dict)
    )
