"""Turn stored SDK items and runs into what the HTML fragments display.

Session items are OpenAI Responses input items (user/assistant messages, function calls and
their outputs). Here they become ``Entry`` objects -- a message, or one tool call paired with its
output -- and Markdown is rendered to sanitized HTML. Queries for the template tags and the
HTML views live here too, so templates and tags never build querysets: a page of runs reads
their usage in the same statement as the runs, and the spend meter is one aggregate. So do the
polled reads of one run, each one statement: the fragment's (``polled_run``) and the JSON
detail's (``detailed_run``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from typing import Any

import nh3
from django.db import connections, router
from django.db.models import OuterRef, Prefetch, Subquery
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt

from agentic_django.conf import get_config
from agentic_django.models import (
    AgentApproval,
    AgentRun,
    AgentSession,
    AgentSessionItem,
    AgentUsage,
)
from agentic_django.prepared import column_converters, convert_row
from agentic_django.usage import (
    TOTAL_FIELDS,
    Standing,
    Totals,
    format_money,
    run_totals,
    standing,
    totals_aggregates,
    totals_of,
    user_limits,
)

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


@cache
def _sanitizer() -> nh3.Cleaner:
    # nh3 strips anything outside the allowlist, incl. style attributes the CSP would block.
    # Built once: ``nh3.clean(html, **options)`` builds it again for every text.
    return nh3.Cleaner(
        tags=_ALLOWED_TAGS,
        attributes={"a": {"href", "title"}, "code": {"class"}, "th": {"align"}, "td": {"align"}},
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )


def render_markdown(text: str) -> SafeString:
    """Render Markdown to HTML that is safe to embed (raw HTML is escaped, then sanitized)."""
    html = _markdown().render(text or "")
    return mark_safe(_sanitizer().clean(html))  # noqa: S308 -- sanitized by nh3


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


# --- Usage and spending ----------------------------------------------------------------------


def dollars(amount: Decimal) -> str:
    """US dollars for people: "$3.20", "$0.0021", "$0.00"."""
    return f"${format_money(amount)}"


def token_count(tokens: int) -> str:
    return f"{tokens:,} token{'' if tokens == 1 else 's'}"


def cost_text(totals: Totals) -> str:
    """What the calls cost; a call whose price is unknown is never counted as free."""
    if totals.calls and totals.unpriced == totals.calls:
        return "cost unknown"
    if totals.unpriced:
        return f"at least {dollars(totals.cost)}"
    return dollars(totals.cost)


@dataclass(frozen=True)
class SpendMeter:
    """The user's spending this period against their caps, for the chat page."""

    standing: Standing

    @property
    def text(self) -> str:
        """E.g. "$3.20 of $20.00 this month" (and the tokens, if they are capped)."""
        found = self.standing
        parts = []
        if found.limits.cost is not None:
            parts.append(f"{cost_text(found.spent)} of {dollars(found.limits.cost)}")
        if found.limits.tokens is not None:
            parts.append(f"{found.spent.total_tokens:,} of {token_count(found.limits.tokens)}")
        period = "today" if found.period == "day" else "this month"
        return f"{' · '.join(parts)} {period}"

    @property
    def warning(self) -> bool:
        return self.standing.warning

    @property
    def exceeded(self) -> bool:
        return self.standing.over

    @property
    def message(self) -> str:
        """Why nothing new can start, and when it can again (empty while within the caps)."""
        return self.standing.message

    @property
    def used(self) -> str:
        """The share of the tightest cap used, 0 to 1 (a ``<meter>`` value; never localized)."""
        found = self.standing
        cost, tokens = found.limits.cost, found.limits.tokens
        shares = []
        if cost is not None:
            shares.append(float(found.spent.cost / cost) if cost else 1.0)
        if tokens is not None:
            shares.append(found.spent.total_tokens / tokens)
        return f"{min(max(shares, default=0.0), 1.0):.3f}"

    @property
    def warn_at(self) -> str:
        return f"{self.standing.warn_at:.3f}"


def spend_meter(user: Any) -> SpendMeter | None:
    """The user's spend meter; None (and no query) when no user cap applies to them."""
    if not getattr(user, "is_authenticated", False):
        return None
    limits = user_limits(user)
    if limits.cost is None and limits.tokens is None:
        return None
    return SpendMeter(standing(user, limits=limits))


# How the pause message of a run that reached its own cap starts (usage.exceeded_message).
RUN_CAP_MESSAGE_START = "This run reached its"


@dataclass
class RunView:
    """What a run fragment shows: the turn's entries plus the run's state."""

    run: AgentRun
    entries: list[Entry]
    item_count: int = 0
    # The tool calls a paused run waits on (AgentApproval rows), in order.
    approvals: list[Any] = field(default_factory=list)
    # What the run used (its ledger rows, a retried call once); read for finished runs only.
    usage: Totals | None = None

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

    @property
    def paused_on_run_cap(self) -> bool:
        """True when a budget-paused run reached its own cap, which no new period resets."""
        return self.run.status == AgentRun.Status.BUDGET_EXCEEDED and self.run.error.startswith(
            RUN_CAP_MESSAGE_START
        )

    @property
    def usage_text(self) -> str:
        """What a finished run used, e.g. "1,234 tokens · $0.0021" (empty while it works)."""
        if not self.run.is_terminal:
            return ""
        if self.usage is None or not self.usage.calls:
            # A run older than the ledger knows its tokens, not what they cost.
            return token_count(self.run.total_tokens) if self.run.total_tokens else ""
        return f"{token_count(self.usage.total_tokens)} · {cost_text(self.usage)}"


def run_version(run: AgentRun, item_count: int) -> str:
    """A fingerprint of what a run fragment shows, from the run row and its item count."""
    cancelling = int(run.cancel_requested_at is not None)
    return f"{run.status}.{item_count}.{cancelling}"


def run_view(
    run: AgentRun, payloads: Sequence[Any] | None = None, used: Totals | None = None
) -> RunView:
    """Build the display of one run from the session items it wrote (their payloads, in order;
    read here when not given), or from its input while it wrote none. ``used``: the run's
    usage (read here for a finished run when not given)."""
    if used is None and run.is_terminal:
        used = run_totals(run)
    if payloads is None:
        payloads = [item.payload for item in run.session_items.order_by("sequence")]
    entries = entries_from_items(payloads)
    if not any(e.kind == "message" and e.role == "user" for e in entries):
        entries = entries_from_items(input_items(run.input_payload)) + entries
    approvals = run.pending_approvals()
    for approval in approvals:
        approval.arguments_text = _pretty_arguments(approval.arguments)
    return RunView(run, entries, item_count=len(payloads), approvals=approvals, usage=used)


@dataclass
class PolledRun:
    """A run read for its fragment, with how many items it wrote, (unread until asked) their
    payloads in order, and what it used."""

    run: AgentRun
    item_count: int
    _items: Any
    usage: Totals | None = None

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
    # The same for the run's summed cost (a float on SQLite).
    cost_converters: list[tuple[int, Any, list[Any]]]


# Statements built by hand once per database, and again whenever the settings change (as
# ``prepared.Statement``'s are): (builder, alias) -> (the settings, the statement).
_BUILT: dict[tuple[Callable[[str], Any], str], tuple[Any, Any]] = {}


def _built(build: Callable[[str], Any], alias: str) -> Any:
    config = get_config()
    found = _BUILT.get((build, alias))
    if found is None or found[0] is not config:
        found = _BUILT[build, alias] = (config, build(alias))
    return found[1]


def _polled_run_query(alias: str) -> _PolledRunQuery:
    """One statement for a run of an owner, the count of its items, their payloads and the
    run's usage (calls, priced calls, tokens, cost of its rows not superseded), built once per
    database: the ORM would compile it again on every poll, which costs more than running it."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    run, item, ledger = AgentRun._meta, AgentSessionItem._meta, AgentUsage._meta

    def column(meta: Any, name: str, alias: str) -> str:
        return f"{alias}.{quote(meta.get_field(name).column)}"

    fields = run.concrete_fields
    aggregate = _ITEMS_AGGREGATE[connection.vendor].format(
        payload=column(item, "payload", "i"), sequence=column(item, "sequence", "i")
    )
    run_pk = f"r.{quote(run.pk.column)}"
    cost, tokens = column(ledger, "cost", "u"), column(ledger, "total_tokens", "u")
    # The items and the usage as two one-row aggregates over the run's id (a parameter),
    # joined to the run: two scans for the planner, where six correlated subqueries (one per
    # value) cost more to plan than to run.
    # Only quoted table and column names are interpolated; values go in as parameters.
    sql = (
        f"SELECT {', '.join(f'r.{quote(f.column)}' for f in fields)}, "  # noqa: S608
        "it.n, it.items, t.calls, t.priced, t.tokens, t.cost "
        f"FROM {quote(run.db_table)} r "
        f"CROSS JOIN (SELECT COUNT(*) AS n, {aggregate} AS items "
        f"FROM {quote(item.db_table)} i WHERE {column(item, 'run', 'i')} = %s) it "
        f"CROSS JOIN (SELECT COUNT(*) AS calls, COUNT({cost}) AS priced, "
        f"SUM({tokens}) AS tokens, SUM({cost}) AS cost "
        f"FROM {quote(ledger.db_table)} u WHERE {column(ledger, 'run', 'u')} = %s "
        f"AND NOT {column(ledger, 'superseded', 'u')}) t "
        f"WHERE {run_pk} = %s AND {column(run, 'owner', 'r')} = %s"
    )
    columns = [run_field.get_col(run.db_table) for run_field in fields]
    converters = column_converters(columns, connection)
    cost_column = ledger.get_field("cost").get_col(ledger.db_table)
    cost_converters = column_converters([cost_column], connection)
    return _PolledRunQuery(sql, [f.attname for f in fields], converters, cost_converters)


def polled_run(run_id: Any, owner_id: Any) -> PolledRun | None:
    """The run ``run_id`` of ``owner_id`` with its items and usage, in one query (None if there
    is none).

    This is what a polled run fragment costs on top of the request's own session and user
    lookups. On databases other than PostgreSQL and SQLite the items and the usage of a
    finished run take more queries."""
    alias = router.db_for_read(AgentRun)
    connection = connections[alias]
    if connection.vendor not in _ITEMS_AGGREGATE:
        run = AgentRun.objects.filter(pk=run_id, owner_id=owner_id).first()
        if run is None:
            return None
        items = run.session_items.order_by("sequence").values_list("sequence", "payload")
        used = run_totals(run) if run.is_terminal else None
        return PolledRun(run, len(items), list(items), used)
    query = _built(_polled_run_query, alias)
    pk = AgentRun._meta.pk.get_db_prep_value(run_id, connection)
    with connection.cursor() as cursor:
        cursor.execute(query.sql, [pk, pk, pk, owner_id])
        row = cursor.fetchone()
    if row is None:
        return None
    *values, item_count, items, calls, priced, tokens, cost = row
    values = convert_row(values, query.converters, connection)
    (cost,) = convert_row([cost], query.cost_converters, connection)
    used = Totals(
        calls=calls,
        total_tokens=int(tokens or 0),
        cost=Decimal(cost or 0),
        unpriced=calls - priced,
    )
    run = AgentRun.from_db(alias, query.field_names, values)
    return PolledRun(run, item_count, items, used)


@dataclass
class DetailedRun:
    """A run read for its JSON detail: the columns the JSON shows (and those recovery decides
    by), its conversation's key, and what it used."""

    run: AgentRun
    session_key: str
    usage: Totals


# The run's columns a JSON detail reads: what ``serializers.run_to_dict`` shows and what
# ``recovery.recover_if_stuck`` decides by. The streamed text is read for a finished run only
# (the only one the JSON shows it for); every other column stays deferred.
_DETAIL_FIELDS = frozenset(
    {
        "id", "session", "owner", "agent_key", "status", "input_payload", "final_output",
        "error", "requests", "input_tokens", "output_tokens", "total_tokens", "created_at",
        "started_at", "finished_at", "dispatched_at", "attempt", "lease_expires_at",
        "cancel_requested_at", "last_response_id", "approval_expires_at", "stream_text",
    }
)  # fmt: skip
_FINISHED_ONLY = "stream_text"
_TERMINAL = sorted(status.value for status in AgentRun.TERMINAL_STATUSES)


@dataclass(frozen=True)
class _RunDetailQuery:
    sql: str
    # The run's selected columns in model order, with and without the streamed text.
    field_names: list[str]
    unfinished_names: list[str]
    finished_only: int
    converters: list[tuple[int, Any, list[Any]]]
    cost_converters: list[tuple[int, Any, list[Any]]]


def _run_detail_query(alias: str) -> _RunDetailQuery:
    """One statement for a run of an owner, its conversation's key and the run's usage totals
    (its ledger rows not superseded, summed in a subquery), with only the columns the JSON
    shows: the ORM would select every column of the run and its session, and the usage takes
    a second query."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    run, session, ledger = AgentRun._meta, AgentSession._meta, AgentUsage._meta

    def column(meta: Any, name: str, alias: str) -> str:
        return f"{alias}.{quote(meta.get_field(name).column)}"

    fields = [f for f in run.concrete_fields if f.name in _DETAIL_FIELDS]
    finished_only = next(i for i, f in enumerate(fields) if f.name == _FINISHED_ONLY)
    terminal = ", ".join(["%s"] * len(_TERMINAL))
    selected = [f"r.{quote(f.column)}" for f in fields]
    selected[finished_only] = (
        f"CASE WHEN {column(run, 'status', 'r')} IN ({terminal}) THEN {selected[finished_only]} END"
    )
    cost = column(ledger, "cost", "u")
    sums = ", ".join(f"SUM({column(ledger, name, 'u')}) AS {quote(name)}" for name in TOTAL_FIELDS)
    # Only quoted table and column names are interpolated; values go in as parameters.
    sql = (
        f"SELECT {', '.join(selected)}, {column(session, 'session_key', 's')}, "  # noqa: S608
        f"t.* FROM {quote(run.db_table)} r "
        f"INNER JOIN {quote(session.db_table)} s "
        f"ON {column(session, 'id', 's')} = {column(run, 'session', 'r')} "
        f"CROSS JOIN (SELECT COUNT(*) AS {quote('calls')}, {sums}, "
        f"COUNT({cost}) AS {quote('priced')}, SUM({cost}) AS {quote('cost')} "
        f"FROM {quote(ledger.db_table)} u WHERE {column(ledger, 'run', 'u')} = %s "
        f"AND NOT {column(ledger, 'superseded', 'u')}) t "
        f"WHERE r.{quote(run.pk.column)} = %s AND {column(run, 'owner', 'r')} = %s"
    )
    columns = [f.get_col(run.db_table) for f in fields]
    columns.append(session.get_field("session_key").get_col(session.db_table))
    converters = column_converters(columns, connection)
    cost_column = ledger.get_field("cost").get_col(ledger.db_table)
    names = [f.attname for f in fields]
    return _RunDetailQuery(
        sql,
        names,
        names[:finished_only] + names[finished_only + 1 :],
        finished_only,
        converters,
        column_converters([cost_column], connection),
    )


def detailed_run(run_id: Any, owner_id: Any) -> DetailedRun | None:
    """The run ``run_id`` of ``owner_id`` for its JSON detail, in one query (None if there is
    none): what a polled run detail costs on top of the request's session and user lookups.
    On databases other than PostgreSQL and SQLite it takes the ORM's two queries."""
    alias = router.db_for_read(AgentRun)
    connection = connections[alias]
    if connection.vendor not in _ITEMS_AGGREGATE:
        run = AgentRun.objects.select_related("session").filter(pk=run_id, owner_id=owner_id)
        found = run.first()
        if found is None:
            return None
        return DetailedRun(found, found.session.session_key, run_totals(found))
    query = _built(_run_detail_query, alias)
    pk = AgentRun._meta.pk.get_db_prep_value(run_id, connection)
    with connection.cursor() as cursor:
        cursor.execute(query.sql, [*_TERMINAL, pk, pk, owner_id])
        row = cursor.fetchone()
    if row is None:
        return None
    # The run's columns and its session key, then the calls, sums, priced calls and cost.
    usage = len(TOTAL_FIELDS) + 3
    calls, *sums, priced, cost = row[-usage:]
    *values, session_key = convert_row(row[:-usage], query.converters, connection)
    names = query.field_names
    if values[query.finished_only] is None:  # not finished: the streamed text was not read
        del values[query.finished_only]
        names = query.unfinished_names
    (cost,) = convert_row([cost], query.cost_converters, connection)
    used = Totals(
        calls=calls,
        **{name: int(value or 0) for name, value in zip(TOTAL_FIELDS, sums, strict=True)},
        cost=Decimal(cost or 0),
        unpriced=calls - priced,
    )
    return DetailedRun(AgentRun.from_db(alias, names, values), session_key, used)


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
        .annotate(**_usage_annotations())
        .prefetch_related(items_in_order)
        .order_by("-created_at", "-id")[: MAX_RUNS_SHOWN + 1]
    )
    truncated = len(newest) > MAX_RUNS_SHOWN
    runs = list(reversed(newest[:MAX_RUNS_SHOWN]))
    loose = session.items.filter(run__isnull=True).order_by("sequence")
    return {
        "session": session,
        "loose_entries": [] if truncated else entries_from_items(i.payload for i in loose),
        "runs": [
            run_view(run, [i.payload for i in run.session_items.all()], _annotated_usage(run))
            for run in runs
        ],
        "truncated": truncated,
    }


# The sums a run fragment shows, as named by ``usage.totals_aggregates``.
_SHOWN_TOTALS = ("calls", "total_tokens_total", "cost_total", "unpriced")


def _usage_annotations() -> dict[str, Subquery]:
    """Each run's usage (its ledger rows not superseded) as subqueries of the runs' own
    statement: a page of runs costs no query more than it did without."""
    rows = AgentUsage.objects.filter(run=OuterRef("pk"), superseded=False).order_by().values("run")
    aggregates = totals_aggregates()
    return {
        f"usage_{name}": Subquery(rows.annotate(total=aggregates[name]).values("total"))
        for name in _SHOWN_TOTALS
    }


def _annotated_usage(run: AgentRun) -> Totals:
    return totals_of({name: getattr(run, f"usage_{name}") for name in _SHOWN_TOTALS})
