"""The usage ledger in the admin: read-only rows, totals of what the filters select, usage
summed per user, agent, model or day, and the run page's totals; fast with many rows."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from itertools import count
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from agentic_django.models import AgentRun, AgentUsage

pytestmark = pytest.mark.django_db

PARIS = ZoneInfo("Europe/Paris")
CHANGELIST = "admin:agentic_django_agentusage_changelist"
_sequence = count(1)


def usage_row(
    run: AgentRun, at: datetime, model: str, tokens: tuple[int, int], cost: str | None, **fields
) -> AgentUsage:
    sequence = next(_sequence)
    return AgentUsage.objects.create(
        run=run,
        sequence=sequence,
        attempt=fields.pop("attempt", 1),
        turn=sequence,
        owner_id=run.owner_id,
        session_id=run.session_id,
        agent_name=fields.pop("agent_name", "assistant"),
        model=model,
        provider="openai",
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        total_tokens=sum(tokens),
        cost=None if cost is None else Decimal(cost),
        price_source="" if cost is None else "genai-prices",
        priced_at=at,
        created_at=at,
        **fields,
    )


def paris(day: int, hour: int) -> datetime:
    return datetime(2025, 3, day, hour, 30, tzinfo=PARIS)


@pytest.fixture
def ledger(settings, user, other_user, make_run):
    settings.TIME_ZONE = "Europe/Paris"
    alice = make_run(user)
    mallory = make_run(other_user, session_key="m")
    usage_row(alice, paris(1, 10), "gpt-4.1", (100, 20), "0.0012")
    usage_row(alice, paris(1, 11), "gpt-4.1", (200, 30), "0.0023", agent_name="triage")
    # 23:30 UTC on 1 March, 2 March in Paris; nobody knows its price.
    usage_row(alice, paris(2, 0), "local-llm", (50, 10), None)
    usage_row(mallory, paris(2, 9), "gpt-4.1", (1000, 500), "0.015")
    return {"alice": alice, "mallory": mallory}


@pytest.fixture
def staff(client, django_user_model):
    root = django_user_model.objects.create_superuser("root", "root@example.com", "pw-123456789")
    client.force_login(root)
    return client


def changelist(client, **params):
    response = client.get(reverse(CHANGELIST), params)
    assert response.status_code == 200
    return response


def test_the_list_shows_every_call_and_unknown_costs_as_unknown(staff, ledger):
    response = changelist(staff)
    rows = list(response.context["cl"].result_list)
    assert len(rows) == 4
    html = response.content.decode()
    assert html.count('<td class="field-cost_display">unknown</td>') == 1
    assert '<td class="field-cost_display">$0.0012</td>' in html
    alice_run = reverse("admin:agentic_django_agentrun_change", args=[ledger["alice"].pk])
    assert f'href="{alice_run}"' in html
    assert response.context["usage_totals"] == {
        "calls": "4",
        "input_tokens": "1,350",
        "output_tokens": "560",
        "cached_tokens": "0",
        "reasoning_tokens": "0",
        "total_tokens": "1,910",
        "cost": "$0.0185 + 1 unpriced call(s)",
        "unpriced": "1",
    }
    assert '<td class="cost">$0.0185 + 1 unpriced call(s)</td>' in html


@pytest.mark.parametrize(
    ("params", "calls", "tokens", "cost"),
    [
        ({"model": "gpt-4.1"}, "3", "1,850", "$0.0185"),
        ({"q": "alice"}, "3", "410", "$0.0035 + 1 unpriced call(s)"),
        ({"q": "alice", "model": "local-llm"}, "1", "60", "unknown"),
        ({"price_source": "unknown"}, "1", "60", "unknown"),
        (
            {"created_at__year": "2025", "created_at__month": "3", "created_at__day": "2"},
            "2",
            "1,560",
            "$0.015 + 1 unpriced call(s)",
        ),
    ],
)
def test_totals_follow_the_filters(staff, ledger, params, calls, tokens, cost):
    totals = changelist(staff, **params).context["usage_totals"]
    assert (totals["calls"], totals["total_tokens"], totals["cost"]) == (calls, tokens, cost)


def test_searching_by_run_id(staff, ledger):
    response = changelist(staff, q=str(ledger["mallory"].pk))
    assert response.context["usage_totals"]["calls"] == "1"


def summary(client, group, **params):
    response = changelist(client, group=group, **params)
    return [
        (row["name"], row["calls"], row["total_tokens"], row["cost"], row["unpriced"])
        for row in response.context["usage_group_rows"]
    ]


def test_usage_by_user_is_sorted_by_cost_or_as_asked(staff, ledger):
    assert summary(staff, "user") == [
        ("mallory", "1", "1,500", "$0.015", "0"),
        ("alice", "3", "410", "$0.0035 + 1 unpriced call(s)", "1"),
    ]
    assert [row[0] for row in summary(staff, "user", group_sort="name")] == ["alice", "mallory"]
    assert [row[0] for row in summary(staff, "user", group_sort="calls")] == ["alice", "mallory"]


def test_usage_by_model_agent_and_local_day(staff, ledger):
    assert summary(staff, "model") == [
        ("gpt-4.1", "3", "1,850", "$0.0185", "0"),
        ("local-llm", "1", "60", "unknown", "1"),
    ]
    assert summary(staff, "agent", group_sort="tokens") == [
        ("assistant", "3", "1,680", "$0.0162 + 1 unpriced call(s)", "1"),
        ("triage", "1", "230", "$0.0023", "0"),
    ]
    assert summary(staff, "day") == [
        ("2025-03-01", "2", "350", "$0.0035", "0"),
        ("2025-03-02", "2", "1,560", "$0.015 + 1 unpriced call(s)", "1"),
    ]


def test_a_summary_keeps_the_filters_and_drills_down_to_its_rows(staff, ledger):
    assert summary(staff, "model", q="alice") == [
        ("gpt-4.1", "2", "350", "$0.0035", "0"),
        ("local-llm", "1", "60", "unknown", "1"),
    ]
    response = changelist(staff, group="day", q="alice")
    html = response.content.decode()
    assert 'id="usage-groups"' in html
    # Filter links keep the grouping; a group's link lists its rows with the same filters.
    assert "group=day" in response.context["cl"].get_query_string({"model": "x"})
    second_day = response.context["usage_group_rows"][1]
    assert "group" not in second_day["url"]
    drilled = staff.get(reverse(CHANGELIST) + second_day["url"])
    assert [row.model for row in drilled.context["cl"].result_list] == ["local-llm"]
    assert drilled.context["usage_totals"]["cost"] == "unknown"


def test_only_staff_see_the_ledger(client, user, ledger):
    for params in ({}, {"group": "user"}):
        assert client.get(reverse(CHANGELIST), params).status_code == 302
    client.force_login(user)
    for params in ({}, {"group": "user"}):
        response = client.get(reverse(CHANGELIST), params)
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("admin:login"))


def test_the_ledger_cannot_be_added_to_changed_or_deleted(staff, ledger):
    row = AgentUsage.objects.get(model="local-llm")
    change = reverse("admin:agentic_django_agentusage_change", args=[row.pk])
    page = staff.get(change)
    assert page.status_code == 200
    assert b'name="_save"' not in page.content  # a read-only view
    assert staff.post(change, {"model": "free", "cost": "0"}).status_code == 403
    delete = reverse("admin:agentic_django_agentusage_delete", args=[row.pk])
    assert staff.post(delete, {"post": "yes"}).status_code == 403
    assert staff.get(reverse("admin:agentic_django_agentusage_add")).status_code == 403
    staff.post(reverse(CHANGELIST), {"action": "delete_selected", "_selected_action": [row.pk]})
    row.refresh_from_db()
    assert (row.model, row.cost) == ("local-llm", None)
    assert AgentUsage.objects.count() == 4


def test_rows_outlive_their_run_and_go_with_their_user(staff, ledger, other_user):
    run = ledger["mallory"]
    delete_run = reverse("admin:agentic_django_agentrun_delete", args=[run.pk])
    assert staff.post(delete_run, {"post": "yes"}).status_code == 302
    assert not AgentRun.objects.filter(pk=run.pk).exists()
    kept = AgentUsage.objects.get(owner=other_user)
    assert kept.run_id is None
    html = changelist(staff, q="mallory").content.decode()
    assert '<td class="field-run_link">deleted</td>' in html
    # Deleting a user is not blocked by the ledger's read-only admin: the rows go with them.
    delete_user = reverse("admin:auth_user_delete", args=[other_user.pk])
    assert staff.post(delete_user, {"post": "yes"}).status_code == 302
    assert not AgentUsage.objects.filter(pk=kept.pk).exists()
    assert AgentUsage.objects.count() == 3


def test_the_changelist_makes_no_more_queries_with_many_rows(
    staff, ledger, django_assert_max_num_queries
):
    pages = ({"q": "alice"}, {"group": "user"}, {"group": "day", "model": "gpt-4.1"})
    few = []
    for params in pages:
        with CaptureQueriesContext(connection) as captured:
            changelist(staff, **params)
        few.append(len(captured))
    assert max(few) <= 12
    AgentUsage.objects.bulk_create(
        AgentUsage(
            run=run,
            sequence=1000 + n,
            attempt=1,
            turn=n,
            owner_id=run.owner_id,
            session_id=run.session_id,
            agent_name=f"agent-{n % 7}",
            model="gpt-4.1" if n % 2 else f"model-{n % 5}",
            provider="openai",
            input_tokens=n,
            total_tokens=n,
            cost=Decimal("0.001") if n % 3 else None,
            priced_at=paris(1 + n % 20, 12),
            created_at=paris(1 + n % 20, 12),
        )
        for n in range(120)
        for run in ledger.values()
    )
    for params, queries in zip(pages, few, strict=True):
        with django_assert_max_num_queries(queries):
            response = changelist(staff, **params)
        assert int(response.context["usage_totals"]["calls"].replace(",", "")) > 100


def test_the_run_page_shows_what_the_run_used_and_spent(staff, ledger):
    alice = ledger["alice"]
    # A call of a dead attempt, made again by the retry: paid twice, counted once as the run's.
    usage_row(alice, paris(1, 12), "gpt-4.1", (300, 100), "0.004", attempt=2, superseded=True)
    response = staff.get(reverse("admin:agentic_django_agentrun_change", args=[alice.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    assert (
        "Used (each call once): 3 call(s), 410 tokens (350 input, 60 output, 0 cached, "
        "0 reasoning), cost $0.0035 + 1 unpriced call(s)"
    ) in html
    assert (
        "Spent (every attempt): 4 call(s), 810 tokens (650 input, 160 output, 0 cached, "
        "0 reasoning), cost $0.0075 + 1 unpriced call(s)"
    ) in html
    mallory = staff.get(
        reverse("admin:agentic_django_agentrun_change", args=[ledger["mallory"].pk])
    )
    assert b"Spent (every attempt)" not in mallory.content
