"""Fields every log line carries while they are bound, such as the run a worker executes.

``execute_claimed_run`` binds ``run_id``, ``attempt``, ``session`` (the session key) and
``trace_id`` for the whole attempt, so each line logged while a run executes -- by the engine,
the Agents SDK or a tool -- names its run; a nested ``bind`` adds or replaces fields::

    with logcontext.bind(trace_id=trace.trace_id):
        ...

The fields live in a context variable: each run executes in a thread of its own, and asgiref's
``async_to_sync``/``sync_to_async`` and ``asyncio.to_thread`` carry them into the run's event
loop and the threads it uses, so runs executing side by side never mix theirs. A thread
started with ``threading.Thread`` starts without them.

``ContextFilter`` (on a handler) copies them onto each record; ``TextFormatter`` appends them
to the line, ``JsonFormatter`` writes one JSON object per line (``LOG_FORMAT=json``). Only the
standard library is imported here: logging is configured before Django's apps are loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_fields: ContextVar[Mapping[str, Any]] = ContextVar("agentic_django_log_fields", default=_EMPTY)


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every log line of this context (thread or task) while the block runs."""
    token = _fields.set(MappingProxyType({**_fields.get(), **fields}))
    try:
        yield
    finally:
        _fields.reset(token)


def current() -> Mapping[str, Any]:
    """The fields bound in this context (read-only)."""
    return _fields.get()


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record (``record.log_context``, and each field as an
    attribute of its own unless the call passed it in ``extra``); filters nothing out."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = current()
        record.log_context = fields
        for name, value in fields.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def _fields_of(record: logging.LogRecord) -> Mapping[str, Any]:
    """The record's bound fields: those its handler's filter copied, else this context's."""
    fields = getattr(record, "log_context", None)
    return current() if fields is None else fields


class TextFormatter(logging.Formatter):
    """The usual one-line format, followed by the bound fields (``run_id=... attempt=...``)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields_of(record)
        if not fields:
            return line
        # A value is one token: a session key with a newline cannot forge a line of its own.
        suffix = " ".join(
            f"{name}={_escaped(value)}" for name, value in fields.items() if value != ""
        )
        head, newline, rest = line.partition("\n")  # a traceback stays below the message
        return f"{head} [{suffix}]{newline}{rest}"


def _escaped(value: Any) -> str:
    text = str(value)
    if text.isascii() and text.isprintable() and " " not in text:
        return text
    return json.dumps(text)  # escapes control, blank-looking and other non-ASCII characters


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the bound
    fields, and ``exc_info`` (the formatted traceback) / ``stack_info`` when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in _fields_of(record).items() if k not in entry)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def bind_run(run: Any) -> AbstractContextManager[None]:
    """``bind`` the fields of a claimed ``AgentRun``'s attempt (its trace id comes later)."""
    return bind(
        run_id=str(run.pk), attempt=run.attempt, session=run.session.session_key, trace_id=""
    )
