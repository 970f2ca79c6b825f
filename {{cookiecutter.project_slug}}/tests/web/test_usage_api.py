"""Usage and budgets over HTTP: the spending endpoint, 402 on creating a run over the cap, what
each reply used (run JSON, fragments, the conversation page) and the chat page's spend meter."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from agentic_django.models import AgentRun, AgentUsage
from agentic_django.usage import period_bounds
from tests.web.conftest import HTMX

pytestmark = pytest.mark.django_db

USAGE = reverse("agents:usage")
CREATE = reverse("agents:run-create")
DOLLARS = re.compile(r"^\d+(\.\d+)?$")


def spend(run, cost, tokens=100, *, at=None, superseded=False):
    """One ledger row of ``run``: a model call of ``tokens`` that cost ``cost`` (None: unknown)."""
    when = at or timezone.now()
    return AgentUsage.objects.create(
        run=run,
        sequence=run.usage_records.count() + 1,
        attempt=1,
        turn=1,
        superseded=superseded,
        owner_id=run.owner_id,
        session_id=run.session_id,
        model="gpt-test",
        input_tokens=tokens - tokens // 4,
        output_tokens=tokens // 4,
        total_tokens=tokens,
        cost=None if cost is None else Decimal(cost),
        price_source="" if cost is None else "settings",
        priced_at=when,
        created_at=when,
    )


def assert_json_error(response, status, code):
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code


def test_usage_needs_a_login(client):
    assert_json_error(client.get(USAGE), 401, "not_authenticated")


def test_usage_is_the_users_own_spending_this_period(api, make_run, user, other_user, settings):
    settings.AGENTIC_DJANGO_BUDGETS = {"user_cost": "2.00", "user_tokens": 10_000}
    start, end = period_bounds("month")
    mine = make_run(user, session_key="mine", status="completed")
    spend(mine, "0.50", 1000)
    spend(mine, None, 200)  # no known price: counted in tokens, never as free
    spend(mine, "0.25", 300, superseded=True)  # a dead attempt's call: paid for all the same
    elsewhere = make_run(user, session_key="elsewhere", status="completed")
    spend(elsewhere, "1.00", 500)
    spend(elsewhere, "5.00", 9000, at=start - timedelta(seconds=1))  # last month
    spend(make_run(other_user, session_key="secret", status="completed"), "7.00", 7000)

    body = api.get(USAGE).json()

    assert body["period"] == "month"
    assert body["period_start"] == start.isoformat()
    assert body["resets_at"] == end.isoformat()
    assert body["limits"] == {"cost": "2", "tokens": 10_000}
    spent = body["spent"]
    assert (spent["calls"], spent["total_tokens"], spent["unpriced_calls"]) == (4, 2000, 1)
    assert DOLLARS.match(spent["cost"]) and Decimal(spent["cost"]) == Decimal("1.75")
    assert spent["cost_known"] is False
    assert body["warning"] is True  # 1.75 of 2.00 is past the 80% threshold
    assert body["exceeded"] is None
    assert "session" not in body

    body = api.get(USAGE, {"session_key": "mine"}).json()

    assert body["session"]["session_key"] == "mine"
    assert body["session"]["spent"]["calls"] == 3
    assert body["session"]["spent"]["total_tokens"] == 1500
    assert Decimal(body["session"]["spent"]["cost"]) == Decimal("0.75")
    assert body["spent"] == spent
    assert_json_error(api.get(USAGE, {"session_key": "secret"}), 404, "not_found")
    assert_json_error(api.get(USAGE, {"session_key": "nope"}), 404, "not_found")


def test_creating_a_run_over_the_cap_is_402_with_when_it_resets(api, make_run, user, settings):
    settings.AGENTIC_DJANGO_BUDGETS = {"user_cost": "1.00"}
    spend(make_run(user, status="completed"), "1.00")
    _, end = period_bounds("month")
    runs = AgentRun.objects.count()

    response = api.post(CREATE, data=json.dumps({"input": "hi"}), content_type="application/json")

    assert_json_error(response, 402, "budget_exceeded")
    error = response.json()["error"]
    assert error["reason"] == "user_cost"
    assert error["resets_at"] == end.isoformat()
    assert "budget ($1.00 of $1.00)" in error["message"]
    left = (end - timezone.now()).total_seconds()
    assert left - 60 < int(response["Retry-After"]) <= left + 1

    response = api.post(CREATE, {"input": "hi", "session_key": "s1"}, headers=HTMX)

    assert response.status_code == 402
    html = response.content.decode()
    assert 'class="agentic-error" role="alert"' in html
    assert 'data-code="budget_exceeded"' in html
    assert "Budget reached" in html
    assert "budget ($1.00 of $1.00)" in html
    assert response["Retry-After"]
    assert AgentRun.objects.count() == runs


def test_each_reply_shows_what_it_used_in_json_fragments_and_the_page(api, make_run, user):
    priced = make_run(user, session_key="talk", status="completed")
    spend(priced, "0.0015", 1000)
    spend(priced, "0.0006", 234)
    spend(priced, "0.0100", 5000, superseded=True)  # made again by the retry: counted once
    unpriced = make_run(user, session_key="talk", status="completed")
    spend(unpriced, None, 50)
    free = make_run(user, session_key="talk", status="completed")
    spend(free, "0", 10)

    used = api.get(reverse("agents:run-detail", args=[priced.id])).json()["usage"]

    assert (used["calls"], used["requests"], used["total_tokens"]) == (2, 2, 1234)
    assert (used["input_tokens"], used["output_tokens"]) == (926, 308)
    assert DOLLARS.match(used["cost"]) and Decimal(used["cost"]) == Decimal("0.0021")
    assert used["cost_known"] is True
    assert (
        api.get(reverse("agents:run-detail", args=[unpriced.id])).json()["usage"]["cost_known"]
        is False
    )
    # Free is "0", written out: never an exponent such as 0E-9.
    assert DOLLARS.match(
        api.get(reverse("agents:run-detail", args=[free.id])).json()["usage"]["cost"]
    )

    fragment = api.get(reverse("agents:run-fragment", args=[priced.id]), headers=HTMX)
    assert (
        '<span class="agentic-run__usage">1,234 tokens · $0.0021</span>'
        in fragment.content.decode()
    )

    page = api.get(reverse("chat:conversation", args=["talk"])).content.decode()
    labels = re.findall(r'<span class="agentic-run__usage">([^<]*)</span>', page)
    assert labels == ["1,234 tokens · $0.0021", "50 tokens · cost unknown", "10 tokens · $0.00"]


def conversation_queries(api, key: str) -> int:
    url = reverse("chat:conversation", args=[key])
    api.get(url)
    with CaptureQueriesContext(connection) as queries:
        assert api.get(url).status_code == 200
    return len(queries)


def test_the_conversation_page_reads_all_usage_without_a_query_per_run(
    api, make_run, user, settings
):
    spend(make_run(user, session_key="talk", status="completed"), "0.01")
    one_run = conversation_queries(api, "talk")
    for _ in range(4):
        spend(make_run(user, session_key="talk", status="completed"), "0.01")

    # Session, user, the conversation list, the session, its runs with their usage, their
    # items, the items outside runs: as before the ledger.
    assert conversation_queries(api, "talk") == one_run == 7
    settings.AGENTIC_DJANGO_BUDGETS = {"user_cost": "1.00"}
    assert conversation_queries(api, "talk") == one_run + 1  # the spend meter's sum


def test_the_spend_meter_shows_the_period_against_the_cap(api, make_run, user, settings):
    page = api.get(reverse("chat:index")).content.decode()
    assert 'id="agentic-spend"' not in page  # no cap, no meter

    settings.AGENTIC_DJANGO_BUDGETS = {"user_cost": "1.00"}
    run = make_run(user, status="completed")
    spend(run, "0.85")
    page = api.get(reverse("chat:index")).content.decode()

    assert "agentic-spend agentic-spend--warning" in page
    assert "$0.85 of $1.00 this month" in page
    assert 'value="0.850"' in page
    assert f'hx-get="{USAGE}" hx-trigger="run-update from:body"' in page

    spend(run, "0.20")
    meter = api.get(USAGE, headers=HTMX).content.decode()

    assert "agentic-spend agentic-spend--exceeded" in meter
    assert "$1.05 of $1.00 this month" in meter
    assert "It resets at" in meter


LIMITS_ASKED: list[int] = []


def counting_limits(user):
    """A project's ``user_limits`` that counts how often it is asked."""
    LIMITS_ASKED.append(user.pk)
    return {"user_cost": "1.00"}


def test_the_spend_meter_asks_the_projects_user_limits_once(api, user, settings):
    settings.AGENTIC_DJANGO_BUDGETS = {"user_limits": f"{__name__}.counting_limits"}
    LIMITS_ASKED.clear()
    meter = api.get(USAGE, headers=HTMX).content.decode()
    assert "$0.00 of $1.00 this month" in meter
    assert len(LIMITS_ASKED) == 1


def test_a_run_paused_on_its_budget_says_why_and_polls_slowly(api, make_run, user):
    reason = "This run reached its cost limit ($0.50)."
    run = make_run(user, status=AgentRun.Status.BUDGET_EXCEEDED, error=reason)

    html = api.get(reverse("agents:run-fragment", args=[run.id]), headers=HTMX).content.decode()

    assert "Paused: the budget is used up" in html
    assert reason in html
    # Its own cap does not reset with the period: the page does not promise that it will.
    assert "once this run's limit is raised" in html and "by itself" not in html
    user_paused = make_run(
        user, session_key="s2", status=AgentRun.Status.BUDGET_EXCEEDED, error="You have used..."
    )
    other = api.get(reverse("agents:run-fragment", args=[user_paused.id]), headers=HTMX)
    assert "It goes on by itself once the budget allows it." in other.content.decode()
    assert 'hx-trigger="every 5s, agentic:refresh"' in html
    assert "data-stream-url" not in html
    assert "agentic-spinner" not in html
    assert f'hx-post="{reverse("agents:run-cancel", args=[run.id])}"' in html
    body = api.get(reverse("agents:run-detail", args=[run.id])).json()
    assert (body["status"], body["error"], body["is_terminal"]) == (
        "budget_exceeded",
        reason,
        False,
    )
