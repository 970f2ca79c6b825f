"""Real providers by configuration: the sample agents, built by the project's registry from its
settings, run by the engine with the real Agents SDK and `openai` client, over HTTP to a fake
OpenAI-compatible server. Every test runs in both API modes (Responses, Chat Completions)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from django.template.loader import render_to_string

from agentic_django import eventloop
from agentic_django.execution import DaemonThreadExecutor, timeout_message
from agentic_django.models import AgentRun
from agentic_django.presentation import run_view
from agentic_django.serializers import run_to_dict
from agentic_django.services import create_run
from tests.fakes.openai_server import Drop, Failure, Hang, Redirect, Stall, Text, ToolCall

# Transactional: runs are enqueued on commit, and the immediate backend runs them then.
pytestmark = pytest.mark.django_db(transaction=True)

# What the provider says in its error bodies; users must never see it.
PROVIDER_TEXT = "quota exceeded for org-4711 (sk-live-abc)"
RATE_LIMITED = "The model provider is limiting requests right now. Try again shortly."
SERVER_ERROR = "The model provider had an error (HTTP 500). Try again shortly."
TIMED_OUT = "The model provider did not answer in time. Try again shortly."
BROKE_OFF = "The connection to the model provider broke off. Try again shortly."
UNREACHABLE = "The model provider could not be reached. Try again shortly."


def run_agent(user, message: str, agent_key: str = "assistant") -> AgentRun:
    """Create a run the way the chat does and return it once the backend has executed it."""
    run = create_run(owner=user, session_key="provider", input_payload=message, agent_key=agent_key)
    run.refresh_from_db()
    return run


def event_types(run: AgentRun) -> list[str]:
    return list(run.events.order_by("sequence").values_list("event_type", flat=True))


def assert_short_clear_error(run: AgentRun, message: str) -> None:
    assert run.status == AgentRun.Status.FAILED
    assert run.error == message
    assert PROVIDER_TEXT not in run.error and "Traceback" not in run.error
    assert run.final_output is None


def assert_partial_text_kept(run: AgentRun, streamed: str) -> None:
    """The text streamed before a failure is kept on the run and marked partial."""
    run.refresh_from_db()
    assert run_to_dict(run)["partial_output"] == (streamed or None)
    fragment = render_to_string(
        "agentic_django/partials/run_fragment.html", {"run": run, "view": run_view(run)}
    )
    assert ("The answer was cut off here." in fragment) == bool(streamed)
    if streamed:
        assert streamed.strip() in fragment


def test_a_plain_reply(provider, user, api_mode):
    provider.reply(Text("Hello from a real provider."))

    run = run_agent(user, "hello there")

    assert run.status == AgentRun.Status.COMPLETED, run.error
    assert run.final_output == "Hello from a real provider."
    [request] = provider.requests
    assert request.api == api_mode
    assert request.body["model"] == "fake-model"
    assert "hello there" in request.text()
    assert request.headers["authorization"] == "Bearer no-key-needed"  # none configured
    assert run.requests == 1
    if api_mode == "responses":  # streamed Chat Completions carry usage only when asked
        assert run.input_tokens > 0 and run.output_tokens > 0


def test_a_finished_run_leaves_no_connection_open(provider, user):
    # Each run has its own event loop: a pooled connection would outlive it, and closing it
    # later, from another run's loop, fails.
    provider.reply(Text("first"), Text("second"))

    assert run_agent(user, "one").status == AgentRun.Status.COMPLETED
    assert run_agent(user, "two").status == AgentRun.Status.COMPLETED

    assert provider.wait_until_no_connection_is_open()


@pytest.fixture
def worker_loop() -> Iterator[None]:
    """Runs share one event loop, as a worker's do."""
    eventloop.share(DaemonThreadExecutor)
    try:
        yield
    finally:
        eventloop.unshare()


def test_a_workers_runs_reuse_their_connections_to_the_provider(provider, user, worker_loop):
    # A tool run makes two model calls; two runs after it make one each.
    provider.reply(ToolCall("calculate", {"expression": "6 * 7"}), Text("It is 42."))
    provider.reply(Text("first"), Text("second"))

    assert run_agent(user, "6 * 7?", agent_key="toolsmith").status == AgentRun.Status.COMPLETED
    assert run_agent(user, "one").status == AgentRun.Status.COMPLETED
    assert run_agent(user, "two").status == AgentRun.Status.COMPLETED

    assert len(provider.requests) == 4
    assert provider.connections_opened == 1  # one TCP (and, to a real provider, TLS) handshake


def test_a_loop_that_replaces_another_opens_connections_of_its_own(provider, user):
    # A pooled connection belongs to the loop that opened it: used from another it would fail.
    provider.reply(Text("first"), Text("second"))
    for message in ("one", "two"):
        eventloop.share(DaemonThreadExecutor)
        try:
            assert run_agent(user, message).status == AgentRun.Status.COMPLETED
        finally:
            eventloop.unshare()  # its loop closes the connections its runs kept

    assert provider.connections_opened == 2
    assert provider.wait_until_no_connection_is_open()


def test_a_connection_the_provider_closed_while_idle_is_not_reused(provider, user, worker_loop):
    provider.close_after_each_response = True  # retries are off: a dead connection would fail
    provider.reply(Text("first"), Text("second"))

    assert run_agent(user, "one").status == AgentRun.Status.COMPLETED
    assert provider.wait_until_no_connection_is_open()
    run = run_agent(user, "two")

    assert run.status == AgentRun.Status.COMPLETED, run.error
    assert provider.connections_opened == 2


def test_a_cookie_the_provider_sets_stays_with_its_run(provider, user, worker_loop):
    # A gateway's affinity cookie goes back with the run's next call, as from a client of its
    # own, and never with another run's request; a redirect carries the cookie it set.
    provider.set_cookie = "affinity=run-a; Path=/"
    provider.reply(ToolCall("calculate", {"expression": "6 * 7"}), Text("It is 42."))
    assert run_agent(user, "6 * 7?", agent_key="toolsmith").status == AgentRun.Status.COMPLETED
    provider.set_cookie = "gate=run-b; Path=/"
    provider.reply(Redirect(), Text("second"))
    assert run_agent(user, "two").status == AgentRun.Status.COMPLETED

    sent = [request.headers.get("cookie") for request in provider.requests]
    assert sent == [None, "affinity=run-a", None, "gate=run-b"]
    assert provider.connections_opened == 1


def test_streamed_deltas_reach_the_final_output(provider, user):
    reply = Text("Streaming works one small piece at a time.", deltas=8, delay=0.01)
    provider.reply(reply)

    run = run_agent(user, "stream please")

    assert run.status == AgentRun.Status.COMPLETED, run.error
    assert run.final_output == reply.text
    assert provider.requests[0].stream  # the engine streams every run


def test_a_tool_call_round_trip(provider, user):
    provider.reply(
        ToolCall("calculate", {"expression": "(12 + 7) * 3"}, call_id="call_calc"),
        Text("(12 + 7) * 3 is 57."),
    )

    run = run_agent(user, "What is (12 + 7) * 3?", agent_key="toolsmith")

    assert run.status == AgentRun.Status.COMPLETED, run.error
    assert run.final_output == "(12 + 7) * 3 is 57."
    first, second = provider.requests
    assert "calculate" in first.tool_names()
    # The sample tool really ran, and its result went back to the model.
    assert second.tool_outputs() == {"call_calc": "57"}
    assert event_types(run) == ["agent_updated", "tool_called", "tool_output", "message_output"]
    assert run.events.get(event_type="tool_output").payload["output"] == "57"


def test_a_handoff_from_the_assistant_to_the_toolsmith(provider, user):
    provider.reply(
        ToolCall("transfer_to_toolsmith", call_id="call_handoff"),
        ToolCall(
            "convert_units",
            {"value": 10, "from_unit": "km", "to_unit": "mi"},
            call_id="call_convert",
        ),
        Text("10 km is about 6.2 miles."),
    )

    run = run_agent(user, "Convert 10 km to miles")

    assert run.status == AgentRun.Status.COMPLETED, run.error
    assert run.final_output == "10 km is about 6.2 miles."
    to_assistant, to_toolsmith, after_tool = provider.requests
    assert to_assistant.tool_names() == ["transfer_to_toolsmith"]
    assert "convert_units" in to_toolsmith.tool_names()
    assert after_tool.tool_outputs()["call_convert"] == "10 km = 6.21371 mi"
    handoff = run.events.get(event_type="handoff").payload
    assert (handoff["from_agent"], handoff["to_agent"]) == ("Assistant", "Toolsmith")


def test_a_key_is_sent_when_configured(provider, user, settings):
    settings.OPENAI_API_KEY = "sk-test-123"
    provider.reply(Text("Authorized."))

    run = run_agent(user, "hi")

    assert run.status == AgentRun.Status.COMPLETED, run.error
    assert provider.requests[0].headers["authorization"] == "Bearer sk-test-123"


def test_429_and_500_are_retried_as_configured(provider, user, settings):
    settings.OPENAI_MAX_RETRIES = 2
    provider.reply(
        Failure(429, PROVIDER_TEXT, "rate_limit_exceeded"), Failure(500, PROVIDER_TEXT), Text("ok")
    )

    run = run_agent(user, "hi")

    assert run.status == AgentRun.Status.COMPLETED, run.error
    assert run.final_output == "ok"
    assert len(provider.requests) == 3


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (Failure(429, PROVIDER_TEXT, "rate_limit_exceeded", "rate_limit_exceeded"), RATE_LIMITED),
        (Failure(500, PROVIDER_TEXT), SERVER_ERROR),
    ],
    ids=["429", "500"],
)
def test_an_error_status_fails_the_run_with_a_short_clear_error(provider, user, failure, message):
    provider.reply(failure)

    run = run_agent(user, "hi")

    assert_short_clear_error(run, message)
    assert_partial_text_kept(run, "")


def test_a_provider_that_never_answers_times_out(provider, user, settings):
    settings.OPENAI_TIMEOUT = 0.5
    provider.reply(Hang())

    run = run_agent(user, "hi")

    assert_short_clear_error(run, TIMED_OUT)
    assert_partial_text_kept(run, "")


def test_a_stream_that_stalls_times_out(provider, user, settings):
    settings.OPENAI_TIMEOUT = 0.5
    stall = Stall("The first half arrives, the second never does.", deltas=4, after=2)
    provider.reply(stall)

    run = run_agent(user, "hi")

    assert_short_clear_error(run, TIMED_OUT)
    assert_partial_text_kept(run, stall.sent)


def test_a_provider_nobody_listens_for_is_unreachable(provider, user, settings):
    with socket.socket() as sock:  # a port that was free a moment ago: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings.OPENAI_BASE_URL = f"http://127.0.0.1:{port}/v1"

    run = run_agent(user, "hi")

    assert_short_clear_error(run, UNREACHABLE)


def test_a_stream_cut_off_mid_answer_fails_clearly_and_keeps_the_partial_text(provider, user):
    drop = Drop("The first half arrives, then the connection is gone.", deltas=4, after=2)
    provider.reply(drop)

    run = run_agent(user, "hi")

    assert_short_clear_error(run, BROKE_OFF)
    assert_partial_text_kept(run, drop.sent)


def test_the_run_timeout_stops_a_slow_provider(provider, user, settings):
    settings.AGENTIC_DJANGO_RUN_TIMEOUT = 1
    # Each chunk comes well within the client timeout; the run as a whole takes too long.
    provider.reply(Text("slow " * 200, deltas=200, delay=0.05))

    run = run_agent(user, "hi")

    assert_short_clear_error(run, timeout_message(1))
