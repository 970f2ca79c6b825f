"""Export of runs' traces as OpenTelemetry spans over OTLP, when the environment asks for it.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, every
process that executes runs sends each run's trace -- the run, its agents, model calls, tool
calls, handoffs and guardrails -- to that collector as OpenTelemetry spans, next to the copy the
run inspector keeps in the database. The Agents SDK's spans are converted by OpenInference's
processor for the SDK (``openinference-instrumentation-openai-agents``), whose conventions
Phoenix, Langfuse, Arize and any OTLP backend read; every span also carries ``session.id`` (the
conversation) and the run's id and attempt in its ``metadata``. The OpenTelemetry SDK's batch
processor sends them from a thread of its own: nothing a run does waits for the collector, and
a collector that is down costs spans, never a run. A stopping process sends what is left (at
exit); a killed one loses the spans of its last few seconds -- the database's copy is the one
that is written under the run's fence.

Inputs and outputs are exported only when ``AGENTIC_DJANGO_TRACING['include_sensitive_data']``
is on (the SDK records them only then, for the database's copy and the export alike);
OpenInference's ``OPENINFERENCE_HIDE_*`` variables can hide them from the export alone. The
rest is the OpenTelemetry SDK's standard environment: ``OTEL_EXPORTER_OTLP_HEADERS`` (a
collector's key), ``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SDK_DISABLED``. The protocol is OTLP over HTTP
(``http/protobuf``). A project that sets up OpenTelemetry itself (a global SDK
``TracerProvider``, e.g. with ``opentelemetry-instrument``) gets the spans through that one.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
PROTOCOL = "http/protobuf"
# Seconds a stopping process waits to send the spans left (a collector that hangs must not
# hold up a worker's stop; OpenTelemetry's own flush does not keep to its timeout).
FLUSH_SECONDS = 5.0
DEFAULT_SERVICE_NAME = "agentic-django"
_lock = threading.Lock()
_processors: dict[str, Any] = {}
_flusher: Flusher | None = None
_labels: ContextVar[dict[str, str] | None] = ContextVar("agentic_django_otlp", default=None)


def endpoint() -> str:
    """The collector's address, or ``""`` when nothing is to be exported."""
    return _endpoint()[1]


def _endpoint() -> tuple[str, str]:
    """``(variable, address)`` of the collector, or ``("", "")``."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "", ""
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return "", ""
    for variable in ENDPOINT_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value:
            return variable, value
    return "", ""


def problems() -> list[str]:
    """What is wrong with the export's environment (the system checks report it, without
    repeating a value that may hold a secret)."""
    variable, address = _endpoint()
    if not address:
        return []
    found = []
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        found.append(f"{variable} must be an http:// or https:// URL.")
    for name in PROTOCOL_VARIABLES:
        protocol = os.environ.get(name, "").strip()
        if protocol and protocol != PROTOCOL:
            found.append(
                f"{name}={protocol!r}: runs' traces are exported with OTLP over HTTP "
                f"({PROTOCOL!r}) only; point the endpoint at the collector's HTTP port (4318)."
            )
    for name in HEADER_VARIABLES:
        items = [item for item in os.environ.get(name, "").split(",") if item.strip()]
        if any("=" not in item for item in items):
            # The OpenTelemetry SDK would log the header, a collector's key, and drop it.
            found.append(f"{name} must be key=value pairs separated by commas.")
    return found


def processors() -> list[Any]:
    """The trace processors that export runs' spans: none, or one built once per process for
    the collector the environment names."""
    address = endpoint()
    if not address:
        return []
    with _lock:
        if address not in _processors:
            global _flusher
            if _flusher is None:
                _flusher = Flusher()
                atexit.register(flush)
            provider = _tracer_provider()
            _flusher.providers.append(provider)
            _processors[address] = RunAttributes(_openinference_processor(provider), provider)
        return [_processors[address]]


def flush(timeout_seconds: float = FLUSH_SECONDS) -> None:
    """Send the spans still waiting in the batch processors, waiting ``timeout_seconds`` at
    most (a stopping worker calls it, and every process as it exits)."""
    with _lock:
        flusher = _flusher
    if flusher is not None:
        flusher.flush(timeout_seconds)


class Flusher:
    """A thread of its own that sends what waits when asked, so that whoever asks waits no
    longer than they say (OpenTelemetry's own flush does not keep to its timeout). Started
    with the first exporting processor: a thread cannot be started at exit."""

    def __init__(self) -> None:
        self.providers: list[Any] = []
        self._asked = threading.Event()
        self._done = threading.Event()
        thread = threading.Thread(target=self._serve, name="agentic-django-otlp", daemon=True)
        thread.start()

    def flush(self, timeout_seconds: float) -> None:
        self._done.clear()
        self._asked.set()
        self._done.wait(timeout_seconds)

    def _serve(self) -> None:
        while True:
            self._asked.wait()
            self._asked.clear()
            for provider in list(self.providers):
                provider.force_flush()
            self._done.set()


def _tracer_provider() -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    configured = trace.get_tracer_provider()
    if isinstance(configured, TracerProvider):
        return configured
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    # Given attributes override the environment's: the default name only when it names none.
    resource = Resource.create({} if named else {SERVICE_NAME: DEFAULT_SERVICE_NAME})
    # Sent at exit by ``flush``, which keeps to its timeout (the provider's own exit hook
    # waits for a hanging collector).
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def _openinference_processor(provider: Any) -> Any:
    from openinference.instrumentation import OITracer, TraceConfig
    from openinference.instrumentation.openai_agents._processor import (
        OpenInferenceTracingProcessor,
    )
    from openinference.instrumentation.openai_agents.version import __version__

    # The SDK leaves inputs and outputs out of the spans unless the project keeps them; the
    # OPENINFERENCE_HIDE_* variables (read by TraceConfig) can hide them from the export alone.
    tracer = OITracer(provider.get_tracer("agentic_django", __version__), config=TraceConfig())
    return OpenInferenceTracingProcessor(LabellingTracer(tracer))


class LabellingTracer:
    """The exporting processor's tracer: every span it starts carries the labels of the run
    whose SDK span or trace is being started (``RunAttributes``)."""

    def __init__(self, tracer: Any) -> None:
        self._tracer = tracer

    def start_span(self, *args: Any, attributes: Any = None, **kwargs: Any) -> Any:
        labels = _labels.get()
        if labels:
            attributes = {**labels, **(attributes or {})}
        return self._tracer.start_span(*args, attributes=attributes, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracer, name)


class RunAttributes:
    """A trace processor around the exporting one: the spans of a run's trace carry the
    conversation (``session.id``) and the run's id and attempt (``metadata``, JSON)."""

    def __init__(self, processor: Any, provider: Any) -> None:
        self.processor = processor
        self.provider = provider
        self._traces: dict[str, dict[str, str]] = {}

    def on_trace_start(self, trace: Any) -> None:
        from agentic_django.tracing import ATTEMPT_KEY, RUN_KEY

        metadata = getattr(trace, "metadata", None) or {}
        labels: dict[str, str] = {}
        if getattr(trace, "group_id", None):
            labels["session.id"] = str(trace.group_id)
        run = {
            name: str(metadata[key])
            for name, key in (("run_id", RUN_KEY), ("attempt", ATTEMPT_KEY))
            if key in metadata
        }
        if run:
            labels["metadata"] = json.dumps(run)
        self._traces[trace.trace_id] = labels
        self._started(self.processor.on_trace_start, trace, labels)

    def on_trace_end(self, trace: Any) -> None:
        self._traces.pop(trace.trace_id, None)
        self.processor.on_trace_end(trace)

    def on_span_start(self, span: Any) -> None:
        self._started(self.processor.on_span_start, span, self._traces.get(span.trace_id))

    def on_span_end(self, span: Any) -> None:
        self.processor.on_span_end(span)

    def shutdown(self) -> None:
        pass  # sent at exit by ``flush``; the provider may be the project's: left running

    def force_flush(self) -> None:
        flush()

    @staticmethod
    def _started(start: Any, item: Any, labels: dict[str, str] | None) -> None:
        # Our own context variable, set only for the call: the processor's own change of
        # OpenTelemetry's context (the span it makes current) stays as it leaves it.
        token = _labels.set(labels or None)
        try:
            start(item)
        finally:
            _labels.reset(token)
