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

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
PROTOCOL = "http/protobuf"
DEFAULT_SERVICE_NAME = "agentic-django"
_lock = threading.Lock()
_processors: dict[str, Any] = {}


def endpoint() -> str:
    """The collector's address, or ``""`` when nothing is to be exported."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    for variable in ENDPOINT_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value:
            return value
    return ""


def problems() -> list[str]:
    """What is wrong with the export's environment (the system checks report it)."""
    address = endpoint()
    if not address:
        return []
    found = []
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        found.append(
            f"OTEL_EXPORTER_OTLP_ENDPOINT must be an http:// or https:// URL (got {address!r})."
        )
    for variable in PROTOCOL_VARIABLES:
        protocol = os.environ.get(variable, "").strip()
        if protocol and protocol != PROTOCOL:
            found.append(
                f"{variable}={protocol!r}: runs' traces are exported with OTLP over HTTP "
                f"({PROTOCOL!r}) only; point the endpoint at the collector's HTTP port (4318)."
            )
    return found


def processors() -> list[Any]:
    """The trace processors that export runs' spans: none, or one built once per process for
    the collector the environment names."""
    address = endpoint()
    if not address:
        return []
    with _lock:
        if address not in _processors:
            provider = _tracer_provider()
            _processors[address] = RunAttributes(_openinference_processor(provider), provider)
        return [_processors[address]]


def flush(timeout_seconds: float = 5.0) -> None:
    """Send the spans still waiting in the batch processors (a stopping worker calls it)."""
    with _lock:
        exporting = list(_processors.values())
    for processor in exporting:
        processor.force_flush(timeout_seconds)


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
    provider = TracerProvider(resource=resource)
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
    return OpenInferenceTracingProcessor(tracer)


class RunAttributes:
    """A trace processor around the exporting one: the spans of a run's trace carry the
    conversation (``session.id``) and the run's id and attempt (``metadata``)."""

    def __init__(self, processor: Any, provider: Any) -> None:
        self.processor = processor
        self.provider = provider
        self._traces: dict[str, dict[str, Any]] = {}

    def on_trace_start(self, trace: Any) -> None:
        metadata = getattr(trace, "metadata", None) or {}
        from agentic_django.tracing import ATTEMPT_KEY, RUN_KEY

        attributes: dict[str, Any] = {}
        if getattr(trace, "group_id", None):
            attributes["session_id"] = str(trace.group_id)
        run = {
            name: str(metadata[key])
            for name, key in (("run_id", RUN_KEY), ("attempt", ATTEMPT_KEY))
            if key in metadata
        }
        if run:
            attributes["metadata"] = run
        self._traces[trace.trace_id] = attributes
        with _attributes(attributes):
            self.processor.on_trace_start(trace)

    def on_trace_end(self, trace: Any) -> None:
        self._traces.pop(trace.trace_id, None)
        self.processor.on_trace_end(trace)

    def on_span_start(self, span: Any) -> None:
        with _attributes(self._traces.get(span.trace_id)):
            self.processor.on_span_start(span)

    def on_span_end(self, span: Any) -> None:
        self.processor.on_span_end(span)

    def shutdown(self) -> None:
        # The provider may be the project's: send what waits, leave it running.
        self.force_flush()

    def force_flush(self, timeout_seconds: float = 5.0) -> None:
        self.provider.force_flush(int(timeout_seconds * 1000))


@contextmanager
def _attributes(attributes: dict[str, Any] | None) -> Iterator[None]:
    if not attributes:
        yield
        return
    from openinference.instrumentation import using_attributes

    with using_attributes(**attributes):
        yield
