"""Runs' traces go to an OpenTelemetry collector when `OTEL_EXPORTER_OTLP_ENDPOINT` names one:
a worker process runs the Toolsmith (a tool call, then an answer) with the real `openai` client
against the fake server, and a local OTLP/HTTP receiver gets the run's spans -- one trace, the
model calls with their tokens, the tool call, each span naming the conversation and the run.
Inputs and outputs are exported only while the project keeps them; a collector that is down
costs the spans, not the run.

Each case is a fresh process (the export is set up once per process) whose spans are sent as
the process exits, as a stopping worker's are.
"""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from agentic_django import otlp
from agentic_django.checks import check_settings
from tests.fakes.openai_server import FakeOpenAI, Text, ToolCall
from tests.providers.test_tracing import RecordingProxy, worker_process
from tests.waiting import PATIENCE, wait_for

pytestmark = pytest.mark.slow

PROMPT = "What is 6*7? (marker-in-the-prompt)"
ANSWER = "It is 42 (marker-in-the-answer)."
TOOL_INPUT = "6*7+0"


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP collector on loopback that keeps every span it is sent, with the raw
    requests (to look for text that must not be there)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Collect)
        self.bodies: list[bytes] = []
        self.spans: list[dict[str, Any]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Collect(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        self.server.bodies.append(body)
        for resource in request.resource_spans:
            service = _attributes(resource.resource.attributes).get("service.name")
            for scope in resource.scope_spans:
                self.server.spans += [
                    {
                        "path": self.path,
                        "service": service,
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_id": span.parent_span_id.hex(),
                        "attributes": _attributes(span.attributes),
                    }
                    for span in scope.spans
                ]
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


def _attributes(pairs: Any) -> dict[str, Any]:
    found = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        found[pair.key] = getattr(pair.value, kind) if kind else None
    return found


@pytest.fixture
def receivers() -> Iterator[dict[str, Receiver]]:
    started = {name: Receiver() for name in ("kept", "hidden")}
    yield started
    for receiver in started.values():
        receiver.shutdown()
        receiver.server_close()


def test_runs_traces_reach_the_collector_with_inputs_only_when_kept(tmp_path, receivers):
    proxy = RecordingProxy()

    def run_toolsmith(case: dict[str, str]) -> str:
        """A worker process's run of the Toolsmith, on a model server of its own."""
        with FakeOpenAI() as fake:
            fake.reply(ToolCall("calculate", {"expression": TOOL_INPUT}), Text(ANSWER))
            return worker_process(
                tmp_path,
                case["OTEL_EXPORTER_OTLP_ENDPOINT"].rsplit(":", 1)[1],
                proxy,
                OPENAI_BASE_URL=fake.url,
                OPENAI_API_KEY="sk-own-server",
                OPENAI_API_MODE="chat_completions",
                RUN_AGENT="toolsmith",
                RUN_INPUT=PROMPT,
                **case,
            )

    closed = Receiver()  # a collector that is down: its port, closed
    closed.shutdown()
    closed.server_close()
    cases = {
        "kept": {"OTEL_EXPORTER_OTLP_ENDPOINT": receivers["kept"].url},
        "hidden": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receivers["hidden"].url,
            "OTEL_SERVICE_NAME": "shop-agents",
            "AGENTIC_DJANGO_TRACE_SENSITIVE_DATA": "False",
        },
        "down": {"OTEL_EXPORTER_OTLP_ENDPOINT": closed.url, "OTEL_EXPORTER_OTLP_TIMEOUT": "2"},
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        outputs = dict(zip(cases, pool.map(run_toolsmith, cases.values()), strict=True))
    proxy.close()
    assert all("completed" in output for output in outputs.values()), outputs
    assert proxy.requests == []  # nothing went anywhere but the model server and collectors

    kept = receivers["kept"].spans
    assert {span["path"] for span in kept} == {"/v1/traces"}
    assert {span["service"] for span in kept} == {otlp.DEFAULT_SERVICE_NAME}
    # One trace of the run (the worker's warm-up run is never traced), one tree.
    assert len({span["trace_id"] for span in kept}) == 1
    [root] = [span for span in kept if not span["parent_id"]]
    assert root["name"] == "toolsmith"
    ids = {span["span_id"] for span in kept}
    assert all(span["parent_id"] in ids for span in kept if span is not root)
    # Every span names the conversation and the run.
    assert {span["attributes"].get("session.id") for span in kept} == {"trace"}
    assert all('"run_id"' in span["attributes"].get("metadata", "") for span in kept)
    assert all('"attempt": "1"' in span["attributes"]["metadata"] for span in kept)
    kinds = [span["attributes"]["openinference.span.kind"] for span in kept]
    assert kinds.count("LLM") == 2 and kinds.count("TOOL") == 1
    [tool] = [span for span in kept if span["attributes"]["openinference.span.kind"] == "TOOL"]
    assert tool["name"] == "calculate" and TOOL_INPUT in tool["attributes"]["input.value"]
    model_calls = [span for span in kept if span["attributes"]["openinference.span.kind"] == "LLM"]
    for span in model_calls:
        assert span["attributes"]["llm.token_count.prompt"] > 0
        assert span["attributes"]["llm.token_count.completion"] > 0
    sent = b"".join(receivers["kept"].bodies)
    assert PROMPT.encode() in sent and ANSWER.encode() in sent

    hidden = receivers["hidden"].spans
    assert {span["service"] for span in hidden} == {"shop-agents"}
    assert [span["attributes"]["openinference.span.kind"] for span in hidden].count("LLM") == 2
    assert all(span["attributes"].get("session.id") == "trace" for span in hidden)
    sent = b"".join(receivers["hidden"].bodies)
    for secret in (PROMPT, ANSWER, TOOL_INPUT, "marker-in"):
        assert secret.encode() not in sent


def test_the_environment_decides_whether_and_where_traces_are_exported(monkeypatch):
    for variable in (*otlp.ENDPOINT_VARIABLES, "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(variable, raising=False)
    assert otlp.processors() == []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert otlp.endpoint() == "http://collector:4318"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4318/v1/traces")
    assert otlp.endpoint() == "http://traces:4318/v1/traces"
    [exporting] = otlp.processors()
    assert otlp.processors() == [exporting]  # built once per process
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert otlp.processors() == []
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert otlp.processors() == []


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "sk-secret@collector:4318", "an http:// or"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "OTLP over HTTP ('http/protobuf') only"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "Authorization: Bearer sk-secret", "key=value pairs"),
    ],
)
def test_an_export_it_cannot_make_fails_the_checks(monkeypatch, variable, value, problem):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv(variable, value)
    found = [message for message in check_settings() if message.id == "agentic_django.E008"]
    assert [problem in message.msg for message in found] == [True]
    assert found[0].msg.startswith(variable) and "sk-secret" not in found[0].msg


def test_the_run_span_is_current_inside_it_and_nothing_of_the_run_stays(monkeypatch):
    """Other instrumentation (the HTTP client of a model call, a tool's queries, the project's
    own spans) nests under the SDK span it runs in, and carries nothing of the run after."""
    from agents import custom_span, trace
    from opentelemetry import context
    from opentelemetry import trace as otel_trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from agentic_django import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    processor = otlp.RunAttributes(otlp._openinference_processor(provider), provider)
    monkeypatch.setattr(tracing, "_exporters", [processor])
    monkeypatch.setattr(tracing, "_installed", None)
    monkeypatch.setattr(tracing, "RECORDER", tracing.SpanRecorder())
    monkeypatch.setattr(otlp, "processors", list)
    tracing.install()
    before = context.get_current()
    metadata = {tracing.RUN_KEY: "r1", tracing.ATTEMPT_KEY: "2"}
    try:
        with (
            trace("run", group_id="conv-1", metadata=metadata),
            custom_span("model call"),
            provider.get_tracer("httpx").start_as_current_span("POST /v1/responses"),
        ):
            pass
    finally:
        monkeypatch.undo()
        tracing._installed = None
        tracing.install(exporters=[])
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert spans["POST /v1/responses"].parent.span_id == spans["model call"].context.span_id
    labels = dict(spans["model call"].attributes)
    assert (labels["session.id"], labels["metadata"]) == (
        "conv-1",
        '{"run_id": "r1", "attempt": "2"}',
    )
    assert "session.id" not in dict(spans["POST /v1/responses"].attributes)
    assert context.get_current() == before
    assert otel_trace.get_current_span() is otel_trace.INVALID_SPAN


def test_a_collector_that_never_answers_does_not_hold_up_the_flush(monkeypatch):
    """A stopping process sends what waits for a few seconds at most: a collector that takes
    the connection and never answers keeps the spans, not the process."""
    silent = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []
    threading.Thread(target=lambda: taken.append(silent.accept()[0]), daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "600")  # the exporter would wait that long
    monkeypatch.setattr(otlp, "_processors", {})
    [exporting] = otlp.processors()
    exporting.provider.get_tracer("test").start_span("waiting").end()
    flushing = threading.Thread(target=otlp.flush, args=(0.5,), daemon=True)
    try:
        flushing.start()
        wait_for(lambda: taken, "the collector to take the connection")
        flushing.join(PATIENCE)
        assert not flushing.is_alive()
    finally:
        silent.close()
        for connection in taken:
            connection.close()
