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
from django.db import connections, router
from django.db.models import Prefetch
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt

from agentic_django.models import AgentApproval, AgentRun, AgentSession, AgentSessionItem
from agentic_django.prepared import column_converters, convert_row

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
    def in_doubt(self) -> bool:
        """True when the run asks about calls that may or may not have happened."""
        return any(a.kind == AgentApproval.Kind.IN_DOUBT for a in self.approvals)

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


def run_view(run: AgentRun, payloads: Sequence[Any] | None = None) -> RunView:
    """Build the display of one run from the session items it wrote (their payloads, in order;
    read here when not given), or from its input while it wrote none."""
    if payloads is None:
        payloads = [item.payload for item in run.session_items.order_by("sequence")]
    entries = entries_from_items(payloads)
    if not any(e.kind == "message" and e.role == "user" for e in entries):
        entries = entries_from_items(input_items(run.input_payload)) + entries
    approvals = run.pending_approvals()
    for approval in approvals:
        approval.arguments_text = _pretty_arguments(approval.arguments)
    return RunView(run, entries, item_count=len(payloads), approvals=approvals)


@dataclass
class PolledRun:
    """A run read for its fragment, with how many items it wrote and (unread until asked) their
    payloads in order."""

    run: AgentRun
    item_count: int
    _items: Any

    @property
    def payloads(self) -> list[Any]:
        """The payloads of the run's items, in order (decoded on first use)."""
        pairs = json.loads(self._items) if isinstance(self._items, str) else self._items
        return [payload for _, payload in sorted(pairs or [], key=lambda pair: pair[0])]


# The run's items as [sequence, payload] pairs, per database vendor. SQLite (before 3.44) cannot
# order inside an aggregate, so the pairs are sorted in Python.
_ITEMS_AGGREGATE = {
    "postgresql": "json_agg(json_build_array({sequence}, {payload}))",
    "sqlite": "json_group_array(json_array({sequence}, json({payload})))",
}


@dataclass(frozen=True)
class _PolledRunQuery:
    sql: str
    field_names: list[str]
    # (index, column expression, converters) of the run's columns whose values need converting.
    converters: list[tuple[int, Any, list[Any]]]


@cache
def _polled_run_query(alias: str) -> _PolledRunQuery:
    """One statement for a run of an owner, the count of its items and their payloads, built
    once per database: the ORM would compile it again on every poll, which costs more than
    running it."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    run, item = AgentRun._meta, AgentSessionItem._meta

    def column(meta: Any, name: str, alias: str) -> str:
        return f"{alias}.{quote(meta.get_field(name).column)}"

    fields = run.concrete_fields
    aggregate = _ITEMS_AGGREGATE[connection.vendor].format(
        payload=column(item, "payload", "i"), sequence=column(item, "sequence", "i")
    )
    run_pk = f"r.{quote(run.pk.column)}"
    items_of_run = f"FROM {quote(item.db_table)} i WHERE {column(item, 'run', 'i')} = {run_pk}"
    # Only quoted table and column names are interpolated; values go in as parameters.
    sql = (
        f"SELECT {', '.join(f'r.{quote(f.column)}' for f in fields)}, "  # noqa: S608
        f"(SELECT COUNT(*) {items_of_run}), (SELECT {aggregate} {items_of_run}) "
        f"FROM {quote(run.db_table)} r "
        f"WHERE {run_pk} = %s AND {column(run, 'owner', 'r')} = %s"
    )
    columns = [run_field.get_col(run.db_table) for run_field in fields]
    converters = column_converters(columns, connection)
    return _PolledRunQuery(sql, [f.attname for f in fields], converters)


def polled_run(run_id: Any, owner_id: Any) -> PolledRun | None:
    """The run ``run_id`` of ``owner_id`` with its items, in one query (None if there is none).

    This is what a polled run fragment costs on top of the request's own session and user
    lookups. On databases other than PostgreSQL and SQLite the items take a second query."""
    alias = router.db_for_read(AgentRun)
    connection = connections[alias]
    if connection.vendor not in _ITEMS_AGGREGATE:
        run = AgentRun.objects.filter(pk=run_id, owner_id=owner_id).first()
        if run is None:
            return None
        items = run.session_items.order_by("sequence").values_list("sequence", "payload")
        return PolledRun(run, len(items), list(items))
    query = _polled_run_query(alias)
    pk = AgentRun._meta.pk.get_db_prep_value(run_id, connection)
    with connection.cursor() as cursor:
        cursor.execute(query.sql, [pk, owner_id])
        row = cursor.fetchone()
    if row is None:
        return None
    *values, item_count, items = row
    values = convert_row(values, query.converters, connection)
    return PolledRun(AgentRun.from_db(alias, query.field_names, values), item_count, items)


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
        "runs": [run_view(run, [i.payload for i in run.session_items.all()]) for run in runs],
        "truncated": truncated,
    }
