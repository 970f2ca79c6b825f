"""Traces of runs, kept in the project's own database for the run inspector.

The Agents SDK reports every span of a run -- agent, model call (``generation`` or
``response``), tool call (``function``), handoff, guardrail, custom -- to its trace
processors. ``SpanRecorder`` is one: it keeps the spans of traces that name a run (their
metadata, set by ``run_config``) in memory as they start and end. Nothing on a step's path
touches the database: the attempt writes its spans in one batch when its trace is over (in
the same thread as its other writes, before the run's terminal state), and, in a long run, at
the end of a turn once ``FLUSH_SECONDS`` have passed or ``FLUSH_SPANS`` spans wait. A batch is
one transaction, written only while the attempt still holds its run (``Fence``); each span
once (``run``, ``span_id`` unique). Spans still open when the attempt ends (a hung model call
at a timeout, a cancelled tool) are written as unfinished.

``install()`` registers the recorder with the SDK once per process. The SDK's own export to
OpenAI is a separate processor, installed only when the project asks for it (``exporters``),
and so is the export to an OpenTelemetry collector (``otlp``, when ``OTEL_EXPORTER_OTLP_ENDPOINT``
is set): the recorder works with every provider and sends nothing anywhere.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, connection

from agentic_django import otlp
from agentic_django.conf import get_config
from agentic_django.models import AgentRun, AgentSpan
from agentic_django.serializers import json_safe
from agentic_django.validation import storable_copy

if TYPE_CHECKING:
    from agentic_django.lifecycle import Fence

logger = logging.getLogger(__name__)

# Trace metadata naming the run and attempt a trace belongs to.
RUN_KEY = "agentic_run_id"
ATTEMPT_KEY = "agentic_attempt"
# A long run writes what it traced at a turn's end once this much time has passed since its
# last write, or this many spans wait.
FLUSH_SECONDS = 5.0
FLUSH_SPANS = 200
# Strings longer than this are cut in stored spans (a huge tool output, a long prompt); a
# span's data longer than MAX_SPAN_BYTES (in JSON) is cut harder: strings at SHORT_TEXT, lists
# to their last SHORT_LIST items (a model call's input is the whole conversation so far).
MAX_TEXT = 20_000
MAX_SPAN_BYTES = 64_000
SHORT_TEXT = 2_000
SHORT_LIST = 20
# Span and trace ids longer than this (never the SDK's own) are cut.
ID_LENGTH = 64
UNFINISHED = {"message": "Still running when the attempt ended."}


@dataclass
class _Trace:
    run_id: str
    attempt: int
    name: str
    group_id: str
    started_at: datetime
    ended_at: datetime | None = None
    open: dict[str, Any] = field(default_factory=dict)
    ended: list[Any] = field(default_factory=list)
    root_written: bool = False
    flushed_at: float = field(default_factory=time.monotonic)


class SpanRecorder:
    """The trace processor that keeps runs' spans until their attempt writes them.

    Thread-safe: the runs of a worker process end spans in their own threads and loops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._traces: dict[str, _Trace] = {}

    # --- the SDK's TracingProcessor interface (no database access here) --------------------

    def on_trace_start(self, trace: Any) -> None:
        metadata = getattr(trace, "metadata", None) or {}
        run_id = metadata.get(RUN_KEY)
        if not run_id:
            return
        entry = _Trace(
            run_id=run_id,
            attempt=int(metadata.get(ATTEMPT_KEY, 0)),
            name=str(getattr(trace, "name", "") or ""),
            group_id=str(getattr(trace, "group_id", "") or ""),
            started_at=_now(),
        )
        with self._lock:
            self._traces[trace.trace_id] = entry

    def on_trace_end(self, trace: Any) -> None:
        with self._lock:
            entry = self._traces.get(trace.trace_id)
            if entry is not None:
                entry.ended_at = _now()

    def on_span_start(self, span: Any) -> None:
        with self._lock:
            entry = self._traces.get(span.trace_id)
            if entry is not None:
                entry.open[span.span_id] = span

    def on_span_end(self, span: Any) -> None:
        with self._lock:
            entry = self._traces.get(span.trace_id)
            if entry is not None:
                entry.open.pop(span.span_id, None)
                entry.ended.append(span)

    def shutdown(self) -> None:
        pass

    def force_flush(self) -> None:
        pass  # spans are written by their attempts, under its fence

    # --- the attempt's side ----------------------------------------------------------------

    def due(self, trace_id: str) -> bool:
        """Whether a long run should write what it traced so far (at a turn's end)."""
        with self._lock:
            entry = self._traces.get(trace_id)
            if entry is None or not entry.ended:
                return False
            waited = time.monotonic() - entry.flushed_at
            return len(entry.ended) >= FLUSH_SPANS or waited >= FLUSH_SECONDS

    def write(self, trace_id: str, fence: Fence, *, final: bool) -> int:
        """Write the trace's ended spans (``final``: all of it, open spans as unfinished, and
        forget it) if ``fence`` still holds; the number of spans written."""
        with self._lock:
            entry = self._traces.get(trace_id) if not final else self._traces.pop(trace_id, None)
            if entry is None:
                return 0
            spans, entry.ended = entry.ended, []
            if final:
                spans += list(entry.open.values())
                entry.ended_at = entry.ended_at or _now()
            entry.flushed_at = time.monotonic()
        try:
            written = self._store(trace_id, entry, spans, fence, final=final)
        except Exception:
            # Whatever goes wrong with a trace, the run itself goes on: the inspector misses
            # these spans, and a turn's batch is written again with the next one.
            logger.warning(
                "agentic_django: could not store %d spans of run %s",
                len(spans),
                fence.run_id,
                exc_info=True,
            )
            if not final:
                with self._lock:
                    entry.ended[:0] = spans
            return 0
        if written is None:
            return 0  # the attempt lost its run: what it did is not the run's story
        entry.root_written = True
        return written

    def _store(
        self, trace_id: str, entry: _Trace, spans: list[Any], fence: Fence, *, final: bool
    ) -> int | None:
        sensitive = get_config().tracing.include_sensitive_data
        rows = [_row(span, entry, fence, sensitive) for span in spans]
        if not entry.root_written:
            rows.insert(0, _root_row(trace_id, entry, fence))
        for retry in (True, False):
            try:
                written = _insert(fence, rows)
                if final and entry.root_written and written is not None:
                    AgentSpan.objects.filter(
                        run__in=fence.runs().values("pk"), span_id=trace_id
                    ).update(ended_at=entry.ended_at)
                return written
            except DatabaseError:
                # A dropped connection: once more on a fresh one (outside a transaction).
                if not retry or connection.in_atomic_block:
                    raise
                connection.close()
        return None


# The span columns an insert writes, in order.
COLUMNS = (
    "run",
    "attempt",
    "trace_id",
    "span_id",
    "parent_id",
    "kind",
    "name",
    "started_at",
    "ended_at",
    "data",
    "error",
)


def _insert(fence: Fence, rows: list[AgentSpan]) -> int | None:
    """Insert ``rows`` in one statement, only while ``fence`` holds; each span once. The
    number of rows inserted, or None if the fence is lost."""
    if not rows:
        return 0 if fence.runs().exists() else None
    meta = AgentSpan._meta
    fields = [meta.get_field(name) for name in COLUMNS]
    fence_sql, fence_params = fence.exists_sql()
    quote = connection.ops.quote_name
    columns = ", ".join(quote(field.column) for field in fields)
    if connection.vendor == "postgresql":
        # VALUES columns take their types from the values: an all-NULL one would be text.
        row_sql = "(" + ", ".join(f"CAST(%s AS {f.db_type(connection)})" for f in fields) + ")"
    else:
        row_sql = "(" + ", ".join(["%s"] * len(fields)) + ")"
    params: list[Any] = []
    for row in rows:
        params += [
            field.get_db_prep_save(getattr(row, field.attname), connection) for field in fields
        ]
    names = ", ".join(f"column{index}" for index in range(1, len(fields) + 1))
    # Identifiers from the model, values as parameters.
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({columns}) "  # noqa: S608
        f"SELECT {names} FROM (VALUES {', '.join([row_sql] * len(rows))}) AS spans "
        f"WHERE {fence_sql} ON CONFLICT DO NOTHING"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *fence_params])
        inserted = cursor.rowcount
    if inserted == 0 and not fence.runs().exists():
        return None
    return inserted


RECORDER = SpanRecorder()
_install_lock = threading.Lock()
_exporters: list[Any] = []
_installed: tuple[bool, tuple[int, ...]] | None = None


def install(exporters: list[Any] | None = None) -> None:
    """Make the SDK report runs' spans to ``RECORDER`` (while ``AGENTIC_DJANGO_TRACING`` is
    enabled), to the OTLP export when the environment names a collector (``otlp``), and to
    ``exporters`` (e.g. the SDK's export to OpenAI; ``None``: those installed before), and to
    nothing else. Cheap when nothing changed: every attempt calls it."""
    global _exporters, _installed
    with _install_lock:
        wanted = _exporters if exporters is None else list(exporters)
        enabled = get_config().tracing.enabled
        exporting = otlp.processors()
        state = (enabled, tuple(id(exporter) for exporter in exporting + wanted))
        if state == _installed:
            return
        from agents import set_trace_processors, set_tracing_disabled

        processors = ([RECORDER] if enabled else []) + exporting + wanted
        set_trace_processors(processors)
        # The SDK's OPENAI_AGENTS_DISABLE_TRACING stops every processor; exporters already
        # honour it (the project leaves them out then), the local record does not need to.
        set_tracing_disabled(not processors)
        _exporters, _installed = wanted, state


def run_config(run: AgentRun) -> Any:
    """The ``RunConfig`` that makes the SDK trace this attempt of ``run`` as a trace of its
    own, named by the agent and grouped by the conversation."""
    from agents import RunConfig
    from agents.tracing import gen_trace_id

    config = get_config().tracing
    return RunConfig(
        workflow_name=run.agent_key or "run",
        trace_id=gen_trace_id(),
        group_id=run.session.session_key if run.session_id else None,
        trace_metadata={RUN_KEY: str(run.pk), ATTEMPT_KEY: str(run.attempt)},
        trace_include_sensitive_data=config.include_sensitive_data,
    )


# --- rows ------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _root_row(trace_id: str, entry: _Trace, fence: Fence) -> AgentSpan:
    return AgentSpan(
        run_id=fence.run_id,
        attempt=fence.attempt,
        trace_id=_text(trace_id, ID_LENGTH),
        span_id=_text(trace_id, ID_LENGTH),
        parent_id="",
        kind="trace",
        name=_text(entry.name, 255),
        started_at=entry.started_at,
        ended_at=entry.ended_at,
        data={"group_id": entry.group_id} if entry.group_id else {},
    )


def _row(span: Any, entry: _Trace, fence: Fence, sensitive: bool) -> AgentSpan:
    kind, name, data = describe(span.span_data, sensitive)
    started = _time(span.started_at) or entry.started_at
    ended = _time(span.ended_at)
    error = span.error
    if ended is None and error is None:
        error = UNFINISHED
    return AgentSpan(
        run_id=fence.run_id,
        attempt=fence.attempt,
        trace_id=_text(span.trace_id, ID_LENGTH),
        span_id=_text(span.span_id, ID_LENGTH),
        parent_id=_text(span.parent_id or span.trace_id, ID_LENGTH),
        kind=_text(kind, 32),
        name=_text(name, 255),
        started_at=started,
        ended_at=ended,
        data=_storable(data),
        error=_storable(error) if error is not None else None,
    )


def describe(span_data: Any, sensitive: bool) -> tuple[str, str, dict[str, Any]]:
    """``(kind, name, data)`` of a span: what the inspector shows of it. Inputs and outputs
    are kept only when ``sensitive``."""
    kind = getattr(span_data, "type", "custom")
    data: dict[str, Any]
    if kind == "agent":
        name = span_data.name
        data = {
            "handoffs": span_data.handoffs,
            "tools": span_data.tools,
            "output_type": span_data.output_type,
        }
    elif kind == "function":
        name = span_data.name
        data = {"mcp_data": span_data.mcp_data} if span_data.mcp_data else {}
        if sensitive:
            data["input"] = span_data.input
            data["output"] = None if span_data.output is None else str(span_data.output)
    elif kind == "generation":
        name = span_data.model or "model"
        config = span_data.model_config
        if isinstance(config, dict):
            # Where the model server is, is the deployment's business, not the run's.
            config = {key: value for key, value in config.items() if key != "base_url"}
        data = {"model": span_data.model, "model_config": config, "usage": span_data.usage}
        if sensitive:
            data["input"] = span_data.input
            data["output"] = span_data.output
    elif kind == "response":
        response = span_data.response
        model = getattr(response, "model", None)
        name = model or "model"
        usage = span_data.usage
        if usage is None and getattr(response, "usage", None) is not None:
            usage = response.usage
        data = {
            "response_id": getattr(response, "id", None),
            "model": model,
            "usage": usage,
        }
        if sensitive:
            data["input"] = span_data.input
            data["output"] = getattr(response, "output", None)
    elif kind == "handoff":
        name = f"{span_data.from_agent or '?'} → {span_data.to_agent or '?'}"
        data = {"from_agent": span_data.from_agent, "to_agent": span_data.to_agent}
    elif kind == "turn":
        name = f"turn {span_data.turn}"
        data = {"turn": span_data.turn, "agent": span_data.agent_name, "usage": span_data.usage}
    elif kind == "task":
        name = span_data.name
        data = {"usage": span_data.usage}
    elif kind == "guardrail":
        name = span_data.name
        data = {"triggered": span_data.triggered}
    else:
        exported = span_data.export() or {}
        name = str(exported.get("name") or getattr(span_data, "name", "") or kind)
        data = {}
        if sensitive:
            # A custom span's data is whatever the code that made it put there.
            data = {key: value for key, value in exported.items() if key not in ("type", "name")}
    return kind, str(name or kind), data


def _text(value: Any, limit: int) -> str:
    """A text column's value: storable (no NUL, no lone surrogate) and within its length."""
    return storable_copy(str(value or ""))[:limit]


def _storable(value: Any) -> Any:
    """A span's data as stored: JSON, strings cut at ``MAX_TEXT``; when that is still more
    than ``MAX_SPAN_BYTES`` (a model call's whole conversation), shorter strings and the last
    ``SHORT_LIST`` items of each list; and failing that, a note of its size."""
    safe = json_safe(value)
    for text, items in ((MAX_TEXT, None), (SHORT_TEXT, SHORT_LIST)):
        cut = storable_copy(_cut(safe, text, items))
        size = len(json.dumps(cut, ensure_ascii=False, default=str))
        if size <= MAX_SPAN_BYTES:
            return cut
    return {"cut": f"{size:,} characters: too large to keep"}


def _cut(value: Any, text: int, items: int | None) -> Any:
    if isinstance(value, str):
        return value if len(value) <= text else value[:text] + " … (cut)"
    if isinstance(value, dict):
        return {key: _cut(item, text, items) for key, item in value.items()}
    if isinstance(value, list):
        kept = value if items is None or len(value) <= items else value[-items:]
        cut = [_cut(item, text, items) for item in kept]
        return cut if len(kept) == len(value) else [f"… {len(value) - items} earlier", *cut]
    return value
