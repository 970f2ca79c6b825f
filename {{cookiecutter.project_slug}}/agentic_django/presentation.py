"""Turn stored SDK items and runs into what the HTML fragments display.

Session items are OpenAI Responses input items (user/assistant messages, function calls and
their outputs). Here they become ``Entry`` objects -- a message, or one tool call paired with its
output -- and Markdown is rendered to sanitized HTML. Queries for the template tags and the
HTML views live here too, so templates and tags never build querysets.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import nh3
from django.db.models import Prefetch
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt

from agentic_django.models import AgentRun, AgentSession, AgentSessionItem

MAX_RUNS_SHOWN = 100
SUMMARY_CHARS = 80
HANDOFF_PREFIX = "transfer_to_"
_ALLOWED_TAGS = {
    "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
    "li", "ol", "p", "pre", "s", "strong", "table", "tbody", "td", "th", "thead", "tr", "ul",
}  # fmt: skip


@dataclass
class Entry:
    """One displayable piece of a conversation."""

    kind: str  # "message" or "tool"
    role: str = ""
    text: str = ""
    name: str = ""
    arguments: str = ""
    output: str | None = None
    is_handoff: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """A one-line description of a tool call for the collapsed view."""
        if self.is_handoff:
            return f"Handed off to {self._handoff_target()}"
        return f"{self.name}({_shorten(self.arguments)})"

    def _handoff_target(self) -> str:
        # The SDK's handoff output names the new agent: {"assistant": "<agent name>"}.
        try:
            parsed = json.loads(self.output or "")
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and len(parsed) == 1:
            (name,) = parsed.values()
            if isinstance(name, str) and name:
                return name
        return self.name.removeprefix(HANDOFF_PREFIX).replace("_", " ")

    @property
    def output_summary(self) -> str:
        """The tool output, shortened for the collapsed view."""
        return _shorten(self.output or "")


def _shorten(text: str, limit: int = SUMMARY_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@cache
def _markdown() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": False, "linkify": False}).enable(
        ["table", "strikethrough"]
    )


def render_markdown(text: str) -> SafeString:
    """Render Markdown to HTML that is safe to embed (raw HTML is escaped, then sanitized)."""
    html = _markdown().render(text or "")
    # nh3 strips anything outside the allowlist, incl. style attributes the CSP would block.
    cleaned = nh3.clean(
        html,
        tags=_ALLOWED_TAGS,
        attributes={"a": {"href", "title"}, "code": {"class"}, "th": {"align"}, "td": {"align"}},
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )
    return mark_safe(cleaned)  # noqa: S308 -- sanitized by nh3 just above


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                parts.append(part.get("text") or part.get("refusal") or "")
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return "" if content is None else str(content)


def _pretty_arguments(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return arguments
    if isinstance(arguments, dict):
        return ", ".join(f"{key}={json.dumps(value)}" for key, value in arguments.items())
    return json.dumps(arguments)


def output_text(value: Any) -> str:
    """A final output or tool output as text (structured values become JSON)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, dict) and "text" in v for v in value):
        return _text_of(value)
    return json.dumps(value, indent=2, ensure_ascii=False)


def entries_from_items(items: Iterable[Any]) -> list[Entry]:
    """Messages and tool calls (each paired with its output) from SDK input items, in order."""
    entries: list[Entry] = []
    calls: dict[str, Entry] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        item_type = item.get("type")
        role = item.get("role")
        if role in ("user", "assistant", "system", "developer") and item_type in (None, "message"):
            text = _text_of(item.get("content"))
            if text.strip() and role in ("user", "assistant"):
                entries.append(Entry("message", role=role, text=text))
        elif item_type == "function_call":
            name = str(item.get("name", ""))
            entry = Entry(
                "tool",
                name=name,
                arguments=_pretty_arguments(item.get("arguments", "")),
                is_handoff=name.startswith(HANDOFF_PREFIX),
            )
            calls[str(item.get("call_id", ""))] = entry
            entries.append(entry)
        elif item_type == "function_call_output":
            output = output_text(item.get("output"))
            call = calls.get(str(item.get("call_id", "")))
            if call is not None:
                call.output = output
            else:
                entries.append(Entry("tool", name="tool output", output=output))
    return entries


def input_items(input_payload: Any) -> list[Any]:
    """A run's input as a list of SDK items (a plain string is one user message)."""
    if isinstance(input_payload, str):
        return [{"role": "user", "content": input_payload}]
    return list(input_payload) if isinstance(input_payload, list) else []


@dataclass
class RunView:
    """What a run fragment shows: the turn's entries plus the run's state."""

    run: AgentRun
    entries: list[Entry]
    item_count: int = 0
    # The tool calls a paused run waits on (AgentApproval rows), in order.
    approvals: list[Any] = field(default_factory=list)

    @property
    def final_output_text(self) -> str:
        """The final output when no assistant message already shows it."""
        if self.run.status != AgentRun.Status.COMPLETED:
            return ""
        if any(e.kind == "message" and e.role == "assistant" for e in self.entries):
            return ""
        return output_text(self.run.final_output)

    @property
    def partial_text(self) -> str:
        """What a run that failed or was cancelled mid-message had streamed of it."""
        return self.run.stream_text if self.run.is_terminal else ""

    @property
    def version(self) -> str:
        """Changes whenever the fragment would look different; polls send it back."""
        return run_version(self.run, self.item_count)

    @property
    def is_working(self) -> bool:
        """True while the run is pending or running."""
        return not self.run.is_terminal


def run_version(run: AgentRun, item_count: int) -> str:
    """A fingerprint of what a run fragment shows, from the run row and its item count."""
    cancelling = int(run.cancel_requested_at is not None)
    return f"{run.status}.{item_count}.{cancelling}"


def run_view(run: AgentRun, items: Sequence[AgentSessionItem] | None = None) -> RunView:
    """Build the display of one run from the session items it wrote (or its input)."""
    if items is None:
        items = list(run.session_items.order_by("sequence"))
    entries = entries_from_items(item.payload for item in items)
    if not any(e.kind == "message" and e.role == "user" for e in entries):
        entries = entries_from_items(input_items(run.input_payload)) + entries
    approvals = run.pending_approvals()
    for approval in approvals:
        approval.arguments_text = _pretty_arguments(approval.arguments)
    return RunView(run, entries, item_count=len(items), approvals=approvals)


def conversation(session: AgentSession | None) -> dict[str, Any]:
    """Context for the conversation partial: items written outside runs, then each run."""
    if session is None or session.pk is None:
        return {"session": session, "loose_entries": [], "runs": [], "truncated": False}
    items_in_order = Prefetch(
        "session_items", queryset=AgentSessionItem.objects.order_by("sequence")
    )
    newest = list(
        AgentRun.objects.filter(session=session)
        .select_related("session")
        .prefetch_related(items_in_order)
        .order_by("-created_at", "-id")[: MAX_RUNS_SHOWN + 1]
    )
    truncated = len(newest) > MAX_RUNS_SHOWN
    runs = list(reversed(newest[:MAX_RUNS_SHOWN]))
    loose = session.items.filter(run__isnull=True).order_by("sequence")
    return {
        "session": session,
        "loose_entries": [] if truncated else entries_from_items(i.payload for i in loose),
        "runs": [run_view(run, list(run.session_items.all())) for run in runs],
        "truncated": truncated,
    }
