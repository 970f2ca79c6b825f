"""The run inspector over HTTP: the timeline page (its owner, or staff allowed to view runs),
the trace as JSON (owner only), what each step shows, and clear errors for bad requests."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from agentic_django.models import AgentApproval, AgentSpan, AgentUsage
from tests.web.conftest import BROWSER, HTMX

pytestmark = pytest.mark.django_db


def span(run, kind, name, parent, *, start, ms, attempt=1, trace="trace_a", **fields):
    began = run.created_at + timedelta(milliseconds=start)
    return AgentSpan.objects.create(
        run=run,
        attempt=attempt,
        trace_id=trace,
        span_id=fields.pop("span_id", f"{trace}-{kind}-{start}"),
        parent_id=parent,
        kind=kind,
        name=name,
        started_at=began,
        ended_at=None if ms is None else began + timedelta(milliseconds=ms),
        **fields,
    )


def traced(run):
    """A run that looked something up, asked for approval, and was resumed."""
    root = span(run, "trace", "assistant", "", start=0, ms=900, span_id="trace_a")
    agent = span(run, "agent", "Assistant", root.span_id, start=5, ms=890)
    turn = span(run, "turn", "turn 1", agent.span_id, start=10, ms=800, data={"turn": 1})
    span(
        run,
        "function",
        "lookup",
        turn.span_id,
        start=400,
        ms=300,
        data={"input": '{"topic": "tides"}', "output": "notes <b>on</b> tides"},
    )
    AgentApproval.objects.create(
        run=run,
        call_id="c2",
        tool_name="refund",
        arguments={"n": 1},
        requested_at=run.created_at + timedelta(seconds=1),
        decision="approved",
        decided_at=run.created_at + timedelta(seconds=61),
    )
    later = run.created_at + timedelta(seconds=62)
    root2 = AgentSpan.objects.create(
        run=run, attempt=2, trace_id="trace_b", span_id="trace_b", kind="trace",
        name="assistant", started_at=later, ended_at=later + timedelta(seconds=1),
    )  # fmt: skip
    AgentSpan.objects.create(
        run=run, attempt=2, trace_id="trace_b", span_id="s-refund", parent_id=root2.span_id,
        kind="function", name="refund", started_at=later, ended_at=None,
        error={"message": "Still running when the attempt ended."},
    )  # fmt: skip
    now = timezone.now()
    AgentUsage.objects.create(
        run=run, sequence=1, attempt=1, turn=1, owner_id=run.owner_id, session_id=run.session_id,
        model="gpt-test", input_tokens=900, output_tokens=334, total_tokens=1234,
        cost=Decimal("0.0042"), price_source="settings", priced_at=now, created_at=now,
    )  # fmt: skip


def inspect_url(run):
    return reverse("agents:run-inspect", args=[run.pk])


def trace_url(run):
    return reverse("agents:run-trace", args=[run.pk])


def test_the_owner_sees_each_attempt_as_a_timeline_of_nested_steps(api, make_run, user):
    run = make_run(user, status="completed", attempt=2)
    traced(run)

    response = api.get(inspect_url(run), headers=BROWSER)

    assert response.status_code == 200
    page = response.content.decode()
    assert page.count('class="agentic-trace"') == 2
    assert "Attempt 1" in page and "Attempt 2" in page
    # Nested to scale: the tool starts at 400 of 900 ms, is 300 ms long, three levels down.
    assert "agentic-span--function agentic-span--depth-3" in page
    assert '<rect x="444.4" y="0" width="333.3"' in page
    assert "300 ms" in page
    # A turn's tokens and cost come from the ledger.
    assert "1,234 tokens · $0.0042" in page
    # What came between the attempts, and a step that never finished.
    assert "refund: approved after 1.0 min" in page
    assert "unfinished" in page
    # Recorded text is shown as text.
    assert "notes &lt;b&gt;on&lt;/b&gt; tides" in page


def test_someone_elses_run_is_not_found_unless_staff_may_view_runs(
    client, make_run, user, other_user
):
    run = make_run(user, status="completed")
    traced(run)
    client.force_login(other_user)
    assert client.get(inspect_url(run)).status_code == 404
    assert client.get(trace_url(run)).status_code == 404

    other_user.is_staff = True
    other_user.save()
    assert client.get(inspect_url(run)).status_code == 404  # staff, but no permission
    other_user.user_permissions.add(Permission.objects.get(codename="view_agentrun"))
    response = client.get(inspect_url(run))
    assert response.status_code == 200
    assert "lookup" in response.content.decode()
    # The JSON trace stays the owner's.
    assert client.get(trace_url(run)).status_code == 404


def test_the_trace_as_json_lists_every_span_in_timeline_order(api, make_run, user):
    run = make_run(user, status="completed", attempt=2)
    traced(run)

    body = api.get(trace_url(run)).json()

    assert (body["run_id"], body["status"], body["attempts"]) == (str(run.pk), "completed", 2)
    assert [(s["attempt"], s["kind"], s["name"]) for s in body["spans"]] == [
        (1, "trace", "assistant"),
        (1, "agent", "Assistant"),
        (1, "turn", "turn 1"),
        (1, "function", "lookup"),
        (2, "trace", "assistant"),
        (2, "function", "refund"),
    ]
    lookup = body["spans"][3]
    assert lookup["duration_ms"] == 300.0
    assert lookup["data"]["output"] == "notes <b>on</b> tides"
    assert body["spans"][0]["parent_id"] is None
    assert body["spans"][5]["ended_at"] is None and body["spans"][5]["error"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("get", "/agents/runs/not-a-uuid/trace/", 400, "invalid_run_id"),
        ("get", "/agents/runs/00000000-0000-0000-0000-000000000000/trace/", 404, "not_found"),
        ("post", "/agents/runs/00000000-0000-0000-0000-000000000000/trace/", 405, None),
        ("get", "/agents/runs/not-a-uuid/inspect/", 400, "invalid_run_id"),
    ],
)
def test_bad_requests_get_clear_errors(api, method, path, status, code):
    response = getattr(api, method)(path)
    assert response.status_code == status
    if code:
        assert response.json()["error"]["code"] == code


def test_anonymous_clients_are_asked_to_log_in(client, make_run, user):
    run = make_run(user, status="completed")
    assert client.get(trace_url(run)).status_code == 401
    response = client.get(inspect_url(run), headers=BROWSER)
    assert response.status_code == 302 and "login" in response["Location"]


def test_a_run_without_steps_says_so(api, make_run, user):
    run = make_run(user)
    page = api.get(inspect_url(run), headers=BROWSER).content.decode()
    assert "No steps recorded for this run yet" in page


def test_the_page_costs_the_same_queries_whatever_the_number_of_steps(api, make_run, user):
    small, large = make_run(user, status="completed"), make_run(user, status="completed")
    traced(small)
    root = span(large, "trace", "assistant", "", start=0, ms=60_000, span_id="trace_a")
    AgentSpan.objects.bulk_create(
        AgentSpan(
            run=large, attempt=1, trace_id="trace_a", span_id=f"s{i}", parent_id=root.span_id,
            kind="function", name=f"tool {i}",
            started_at=large.created_at + timedelta(milliseconds=100 * i),
            ended_at=large.created_at + timedelta(milliseconds=100 * i + 50),
        )
        for i in range(300)
    )  # fmt: skip
    counts = []
    for run in (small, large):
        with CaptureQueriesContext(connection) as queries:
            assert api.get(inspect_url(run)).status_code == 200
        counts.append(len(queries))
    assert counts[0] == counts[1]


def test_each_finished_reply_links_to_its_details(api, make_run, user):
    run = make_run(user, status="completed", final_output="hi")
    html = api.get(reverse("agents:run-fragment", args=[run.pk]), headers=HTMX).content.decode()
    assert inspect_url(run) in html


def test_staff_find_slow_runs_in_the_admin_and_open_the_inspector(
    client, make_run, user, django_user_model
):
    admin_user = django_user_model.objects.create_superuser("root", "r@example.com", "pw-12345678")
    client.force_login(admin_user)
    now = timezone.now()
    quick = make_run(user, status="completed", started_at=now, finished_at=now)
    slow = make_run(
        user, status="completed", started_at=now - timedelta(minutes=2), finished_at=now
    )
    changelist = reverse("admin:agentic_django_agentrun_changelist")

    page = client.get(changelist, {"duration": "1to5m"}).content.decode()

    assert str(slow.pk) in page and str(quick.pk) not in page
    assert inspect_url(slow) in page
    change = client.get(reverse("admin:agentic_django_agentrun_change", args=[slow.pk]))
    assert inspect_url(slow) in change.content.decode()
    assert client.get(inspect_url(slow)).status_code == 200


def test_a_runs_owner_sees_its_model_calls_without_the_agents_instructions(
    client, make_run, user, other_user
):
    run = make_run(user, status="completed")
    root = span(run, "trace", "assistant", "", start=0, ms=900, span_id="trace_a")
    prompt = [
        {"role": "system", "content": "Secret house rules: never refund."},
        {"role": "user", "content": "Can I get a refund?"},
    ]
    span(run, "generation", "gpt-test", root.span_id, start=5, ms=800, data={"input": prompt})
    client.force_login(user)
    for body in (client.get(trace_url(run)), client.get(inspect_url(run))):
        text = body.content.decode()
        assert "Can I get a refund?" in text and "house rules" not in text
        assert "shown to staff only" in text

    other_user.is_staff = True
    other_user.save()
    other_user.user_permissions.add(Permission.objects.get(codename="view_agentrun"))
    client.force_login(other_user)
    assert "Secret house rules" in client.get(inspect_url(run)).content.decode()


@pytest.mark.parametrize(
    ("status", "ending"),
    [("completed", "Completed (its last steps were not recorded)"), ("running", "Running")],
)
def test_an_attempt_whose_end_was_not_recorded_is_not_called_a_dead_worker(
    api, make_run, user, status, ending
):
    run = make_run(user, status=status)
    root = span(run, "trace", "assistant", "", start=0, ms=None, span_id="trace_a")
    span(run, "function", "lookup", root.span_id, start=5, ms=10)
    page = api.get(inspect_url(run)).content.decode()
    assert ending in page and "worker stopped" not in page
