"""The run inspector: what a run did, step by step, from its stored trace (``AgentSpan``).

``inspect(run)`` reads the run's spans, its ledger rows and its approvals in three queries and
returns one ``Section`` per trace -- each attempt of the run, and each part after an approval,
in order -- with its spans as a tree flattened for display (depth, offset and width to scale
within the section), the model calls' tokens and cost from the usage ledger, and what came
between two sections (an approval asked and answered, a worker that died, a pause).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from agentic_django.models import AgentApproval, AgentRun, AgentSpan, AgentUsage
from agentic_django.usage import format_money

# Width of the timeline in SVG user units (bars are drawn with attributes: no inline styles).
SCALE = 1000
# Spans shown at most (a run that looped thousands of times still renders quickly).
MAX_SPANS = 5000
KIND_LABELS = {
    "trace": "attempt",
    "agent": "agent",
    "generation": "model call",
    "response": "model call",
    "function": "tool",
    "handoff": "handoff",
    "guardrail": "guardrail",
    "turn": "turn",
    "task": "run",
    "custom": "custom",
}


MODEL_CALLS = ("generation", "response")
# Messages of a model call's input that hold the agent's instructions: a run's owner sees
# what was said and done, not the prompt behind it.
INSTRUCTION_ROLES = ("system", "developer")
HIDDEN = "(the agent's instructions: shown to staff only)"


@dataclass
class Step:
    span: AgentSpan
    depth: int
    offset: float
    width: float
    duration_ms: float | None
    tokens: int | None = None
    cost: Decimal | None = None
    priced: bool = True

    @property
    def kind_label(self) -> str:
        return KIND_LABELS.get(self.span.kind, self.span.kind)

    @property
    def unfinished(self) -> bool:
        return self.span.ended_at is None

    @property
    def cost_text(self) -> str:
        if self.tokens is None:
            return ""
        money = f"${format_money(self.cost)}" if self.priced else "cost unknown"
        return f"{self.tokens:,} tokens · {money}"

    @property
    def duration_text(self) -> str:
        return duration_text(self.duration_ms)

    @property
    def detail(self) -> str:
        """The span's data (and error) as indented JSON, for its expandable row."""
        body: dict[str, Any] = dict(self.span.data or {})
        if self.span.error is not None:
            body["error"] = self.span.error
        return json.dumps(body, indent=2, ensure_ascii=False, default=str) if body else ""


@dataclass
class Section:
    attempt: int
    trace_id: str
    started_at: datetime
    ended_at: datetime | None
    steps: list[Step] = field(default_factory=list)
    # How this part of the run ended, in words.
    ending: str = ""
    # What happened before the next section (approvals asked and answered), in words.
    between: list[str] = field(default_factory=list)

    @property
    def duration_text(self) -> str:
        if self.ended_at is None:
            return ""
        return duration_text((self.ended_at - self.started_at).total_seconds() * 1000)


@dataclass
class Inspection:
    run: AgentRun
    sections: list[Section]
    span_count: int
    truncated: bool


def duration_text(ms: float | None) -> str:
    if ms is None:
        return "unfinished"
    if ms < 1:
        return "<1 ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    return f"{ms / 60_000:.1f} min"


def inspect(run: AgentRun, *, instructions: bool = True) -> Inspection:
    """What ``run`` did; ``instructions``: with the agent's instructions (system and developer
    messages) in the model calls' inputs, else those are hidden (from the run's owner)."""
    spans = list(
        AgentSpan.objects.filter(run=run).order_by("attempt", "started_at", "id")[: MAX_SPANS + 1]
    )
    truncated = len(spans) > MAX_SPANS
    spans = spans[:MAX_SPANS]
    if not instructions:
        for span in spans:
            _hide_instructions(span)
    calls: dict[tuple[int, int], list[AgentUsage]] = defaultdict(list)
    for row in AgentUsage.objects.filter(run=run).order_by("sequence"):
        calls[(row.attempt, row.turn)].append(row)
    approvals = list(AgentApproval.objects.filter(run=run).order_by("requested_at", "id"))

    by_trace: dict[str, list[AgentSpan]] = defaultdict(list)
    for span in spans:
        by_trace[span.trace_id].append(span)
    sections = [_section(trace_spans, calls) for trace_spans in by_trace.values()]
    sections.sort(key=lambda section: (section.started_at, section.attempt))
    _explain(run, sections, approvals)
    return Inspection(run=run, sections=sections, span_count=len(spans), truncated=truncated)


def _hide_instructions(span: AgentSpan) -> None:
    """Hide the agent's instructions in a model call's input (in memory, not stored)."""
    data = span.data
    if span.kind not in MODEL_CALLS or not isinstance(data, dict):
        return
    if isinstance(data.get("input"), list):
        data["input"] = [
            {**item, "content": HIDDEN}
            if isinstance(item, dict) and item.get("role") in INSTRUCTION_ROLES
            else item
            for item in data["input"]
        ]


def _section(spans: list[AgentSpan], calls: dict[tuple[int, int], list[AgentUsage]]) -> Section:
    root = next((span for span in spans if span.kind == "trace"), None)
    start = min(span.started_at for span in spans)
    ends = [span.ended_at for span in spans if span.ended_at is not None]
    end = root.ended_at if root is not None else None
    last = max(ends + [span.started_at for span in spans])
    section = Section(
        attempt=spans[0].attempt,
        trace_id=spans[0].trace_id,
        started_at=start,
        ended_at=end,
    )
    total = max((last - start).total_seconds(), 1e-6)
    children: dict[str, list[AgentSpan]] = defaultdict(list)
    ids = {span.span_id for span in spans}
    tops = []
    for span in spans:
        if span is root:
            continue
        if span.parent_id in ids and span.parent_id != span.span_id:
            children[span.parent_id].append(span)
        else:
            tops.append(span)  # its parent was not recorded (still open when the worker died)

    def visit(span: AgentSpan, depth: int) -> None:
        offset = (span.started_at - start).total_seconds() / total * SCALE
        span_end = span.ended_at or last
        width = max((span_end - span.started_at).total_seconds() / total * SCALE, 2.0)
        duration = span.duration_ms
        step = Step(span, depth, offset, min(width, SCALE - offset), duration)
        _attach_usage(step, calls)
        section.steps.append(step)
        for child in sorted(children.get(span.span_id, ()), key=_start_key):
            visit(child, depth + 1)

    if root is not None:
        visit(root, 0)
    for span in sorted(tops, key=_start_key):
        visit(span, 1 if root is not None else 0)
    return section


def _start_key(span: AgentSpan) -> tuple[datetime, int]:
    return (span.started_at, span.pk or 0)


def _attach_usage(step: Step, calls: dict[tuple[int, int], list[AgentUsage]]) -> None:
    """Tokens and cost of a turn from the ledger (what was paid for it); of a model call
    from what the provider reported in its span."""
    span = step.span
    if span.kind == "turn":
        turn = (span.data or {}).get("turn")
        rows = calls.get((span.attempt, turn), []) if isinstance(turn, int) else []
        if rows:
            step.tokens = sum(row.total_tokens for row in rows)
            costs = [row.cost for row in rows]
            step.priced = all(cost is not None for cost in costs)
            step.cost = sum((cost for cost in costs if cost is not None), Decimal(0))
    elif span.kind in MODEL_CALLS:
        usage = (span.data or {}).get("usage")
        if isinstance(usage, dict):
            total = usage.get("total_tokens")
            if total is None:
                parts = [usage.get(key) for key in ("input_tokens", "output_tokens")]
                total = sum(part for part in parts if isinstance(part, int)) or None
            if isinstance(total, int):
                step.tokens, step.priced = total, False


def _explain(run: AgentRun, sections: list[Section], approvals: list[AgentApproval]) -> None:
    """Say how each section ended and what came before the next one."""
    for index, section in enumerate(sections):
        last = index == len(sections) - 1
        following = sections[index + 1] if not last else None
        asked = [
            approval
            for approval in approvals
            if approval.requested_at >= section.started_at
            and (following is None or approval.requested_at < following.started_at)
        ]
        if asked:
            section.ending = "Paused: waiting for a decision"
            for approval in asked:
                section.between.append(_decision_text(approval))
        elif last:
            section.ending = run.get_status_display()
            if section.ended_at is None and run.is_terminal:
                section.ending += " (its last steps were not recorded)"
        elif section.ended_at is None:
            section.ending = "The worker stopped (the run was retried from its last checkpoint)"
        else:
            section.ending = "Stopped, then went on in a later attempt"


def _decision_text(approval: AgentApproval) -> str:
    call = f"{approval.tool_name}"
    if approval.decision == AgentApproval.Decision.PENDING:
        return f"{call}: waiting for a decision"
    who = f" by {approval.decided_by}" if approval.decided_by_id else ""
    waited = ""
    if approval.decided_at is not None:
        waited = " after " + duration_text(
            (approval.decided_at - approval.requested_at).total_seconds() * 1000
        )
    return f"{call}: {approval.get_decision_display().lower()}{who}{waited}"


def span_to_dict(step_or_span: Step | AgentSpan) -> dict[str, Any]:
    """One span as JSON (the trace endpoint)."""
    span = step_or_span.span if isinstance(step_or_span, Step) else step_or_span
    return {
        "span_id": span.span_id,
        "parent_id": span.parent_id or None,
        "trace_id": span.trace_id,
        "attempt": span.attempt,
        "kind": span.kind,
        "name": span.name,
        "started_at": span.started_at.isoformat(),
        "ended_at": span.ended_at.isoformat() if span.ended_at else None,
        "duration_ms": None if span.duration_ms is None else round(span.duration_ms, 3),
        "data": span.data,
        "error": span.error,
    }
