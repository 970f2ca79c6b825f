"""The usage ledger and budgets with the real `openai` client against the fake server, which
reports token usage as OpenAI does (Responses, and streamed Chat Completions when asked)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from agentic_django import usage
from agentic_django.models import AgentRun, AgentUsage
from agentic_django.services import create_run
from tests.fakes.openai_server import Text, ToolCall

pytestmark = pytest.mark.django_db(transaction=True)

PRICE = {"fake-model": {"input": "3", "output": "15"}}  # dollars per million tokens


def run_toolsmith(user) -> AgentRun:
    run = create_run(
        owner=user, session_key="usage", input_payload="What is 6 * 7?", agent_key="toolsmith"
    )
    run.refresh_from_db()
    return run


def test_every_call_is_in_the_ledger_with_the_tokens_the_provider_reported(
    provider, user, settings, api_mode
):
    settings.AGENTIC_DJANGO_MODEL_PRICES = PRICE
    provider.reply(ToolCall("calculate", {"expression": "6 * 7"}), Text("6 * 7 is 42."))

    run = run_toolsmith(user)

    assert run.status == AgentRun.Status.COMPLETED, run.error
    rows = list(AgentUsage.objects.filter(run=run).order_by("sequence"))
    assert [(row.turn, row.model, row.agent_name) for row in rows] == [
        (1, "fake-model", "Toolsmith"),
        (2, "fake-model", "Toolsmith"),
    ]
    assert {row.provider for row in rows} == {"127.0.0.1"}
    totals = usage.run_totals(run)
    # What the SDK reported for the run, call by call, and never nothing (Chat Completions
    # streams carry usage because the sample agents ask for it).
    assert (totals.requests, totals.input_tokens, totals.output_tokens) == (
        run.requests,
        run.input_tokens,
        run.output_tokens,
    )
    assert all(row.input_tokens > 0 and row.output_tokens > 0 for row in rows)
    expected = sum(
        (Decimal(row.input_tokens) * 3 + Decimal(row.output_tokens) * 15) / 1_000_000
        for row in rows
    )
    assert (totals.cost, totals.unpriced) == (expected, 0)


def test_a_run_cap_stops_before_the_next_request_reaches_the_provider(provider, user, settings):
    settings.AGENTIC_DJANGO_BUDGETS = {"run_tokens": 10}
    provider.reply(ToolCall("calculate", {"expression": "6 * 7"}))

    run = run_toolsmith(user)

    assert run.status == AgentRun.Status.BUDGET_EXCEEDED
    assert run.error == "This run reached its token limit (10 tokens)."
    assert len(provider.requests) == 1  # the cap is past after one call: no second request
    assert AgentUsage.objects.filter(run=run).count() == 1
