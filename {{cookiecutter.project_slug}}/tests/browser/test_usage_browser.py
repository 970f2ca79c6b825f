"""Usage and budgets in a real browser: what a reply used, the spend meter, the message when
the budget is used up, and a run paused on its budget."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from agentic_django.models import AgentRun, AgentSession
from tests.browser.conftest import last_run, screenshot, send
from tests.web.test_usage_api import spend

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def finished_run(user, session_key: str, **fields) -> AgentRun:
    session, _ = AgentSession.objects.get_or_create(owner=user, session_key=session_key)
    fields.setdefault("status", AgentRun.Status.COMPLETED)
    return AgentRun.objects.create(
        session=session, owner=user, agent_key="assistant", input_payload="earlier", **fields
    )


def test_spend_the_budget_reached_and_a_paused_run(chat, chat_user, settings, problems):
    page = chat
    problems.expect_http_error(402)
    settings.AGENTIC_DJANGO_BUDGETS = {"user_cost": "1.00"}
    earlier = finished_run(chat_user, "earlier")
    spend(earlier, "0.85")
    page.reload()

    meter = page.locator("#agentic-spend")
    expect(meter).to_contain_text("$0.85 of $1.00 this month")
    expect(meter).to_have_class(re.compile(r"\bagentic-spend--warning\b"))

    send(page, "What is (12 + 7) * 3?")
    run = last_run(page)
    run.and_(page.locator('[data-terminal="true"]')).wait_for()
    # The demo model is free, and says so.
    expect(run.locator(".agentic-run__usage")).to_have_text(
        re.compile(r"^[\d,]+ tokens · \$0\.00$")
    )
    screenshot(page, "usage-reply-and-meter")

    spend(earlier, "0.20")  # another conversation takes the user past the cap
    send(page, "Convert 10 km to miles")

    error = page.locator("#turns > .agentic-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("Budget reached")
    expect(error).to_contain_text("budget ($1.05 of $1.00)")
    assert page.get_by_role("textbox", name="Message").input_value() == "Convert 10 km to miles"
    assert page.locator("#turns .agentic-run").count() == 1
    screenshot(page, "usage-budget-reached")

    reason = "This run reached its cost limit ($0.50)."
    finished_run(chat_user, "paused", status=AgentRun.Status.BUDGET_EXCEEDED, error=reason)
    page.goto("/c/paused/")

    paused = last_run(page)
    expect(paused.get_by_role("status")).to_contain_text("Paused: the budget is used up")
    expect(paused).to_contain_text(reason)
    expect(paused.locator(".agentic-spinner")).to_have_count(0)
    expect(page.locator("#agentic-spend")).to_contain_text("It resets at")
    # The composer does not say a reply is on its way: it says the reply is paused.
    on_budget = page.locator("#composer-hint [data-budget-text]")
    expect(on_budget).to_be_visible()
    expect(on_budget).to_have_text(re.compile(r"^The last reply is paused"))
    expect(page.locator("#composer-hint [data-busy-text]")).to_be_hidden()
    screenshot(page, "usage-paused-run")
