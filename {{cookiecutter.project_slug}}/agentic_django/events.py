"""Run events: semantic SDK stream events (tool calls and outputs, messages, handoffs, agent
changes; never raw token deltas) stored one by one as they happen, with a per-run sequence.

``agent_run_event`` is sent after each event is stored, from synchronous code, so receivers
can use the ORM; a receiver that raises is logged and ignored.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Max

from agentic_django.models import AgentEvent, AgentRun
from agentic_django.serializers import json_safe
from agentic_django.signals import agent_run_event, send_safely

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
    """Stores the events of one run attempt; sequences continue after earlier attempts."""

    def __init__(self, run: AgentRun) -> None:
        self.run = run
        self._next_sequence: int | None = None

    def record(self, event_type: str, payload: dict[str, Any]) -> AgentEvent:
        """Store one event now and notify ``agent_run_event`` receivers."""
        if self._next_sequence is None:
            # A first attempt has no events yet; a retry continues after the earlier ones.
            last = (
                self.run.events.aggregate(last=Max("sequence"))["last"]
                if self.run.attempt > 1
                else 0
            )
            self._next_sequence = (last or 0) + 1
        event = AgentEvent.objects.create(
            run=self.run,
            sequence=self._next_sequence,
            event_type=event_type,
            payload=json_safe(payload),
        )
        self._next_sequence += 1
        send_safely(agent_run_event, AgentEvent, run=self.run, event=event)
        return event


def _raw_dict(raw: Any) -> dict[str, Any]:
    value = json_safe(raw)
    return value if isinstance(value, dict) else {"value": value}


def _message_text(raw: dict[str, Any]) -> str:
    parts = raw.get("content") or []
    return "".join(
        part.get("text") or part.get("refusal") or "" for part in parts if isinstance(part, dict)
    )
