"""The JSON run detail (``agents:run-detail``): one statement reads the run, its session key
and its usage, and its JSON is byte for byte what the run serializer makes of the whole row."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.http import JsonResponse
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from agentic_django import presentation
from agentic_django.models import AgentApproval, AgentRun, AgentUsage
from agentic_django.presentation import detailed_run
from agentic_django.serializers import run_to_dict

pytestmark = pytest.mark.django_db

SECRET = "the secret is 1234"


def spend(run, cost, tokens=100, *, superseded=False, owner=None, cached=0, reasoning=0):
    """One ledger row of ``run`` (None: a price nobody knew)."""
    now = timezone.now()
    return AgentUsage.objects.create(
        run=run,
        sequence=AgentUsage.objects.filter(run=run).count() + 1,
        attempt=1,
        turn=1,
        superseded=superseded,
        owner_id=(owner or run.owner).pk,
        session_id=run.session_id,
        requests=1,
        input_tokens=tokens - tokens // 4,
        output_tokens=tokens // 4,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
        total_tokens=tokens,
        cost=None if cost is None else Decimal(cost),
        priced_at=now,
        created_at=now,
    )


def serialized(run):
    """What the serializer makes of the run read whole through the ORM (the reference)."""
    whole = AgentRun.objects.select_related("session").get(pk=run.pk)
    return JsonResponse(run_to_dict(whole)).content


def _finished(make_run, user, status, **fields):
    now = timezone.now()
    return make_run(
        user,
        status=status,
        started_at=now - timedelta(seconds=3, microseconds=123),
        finished_at=now,
        **fields,
    )


def _scenarios(make_run, user):
    now = timezone.now()
    runs = {}
    runs["completed"] = _finished(
        make_run,
        user,
        AgentRun.Status.COMPLETED,
        input_payload=[{"role": "user", "content": 'Ünïcode and "quotes" <b>'}],
        final_output={"answer": 42, "items": [1.5, None, "x"]},
        stream_text="streamed",
        last_response_id="resp_1",
        requests=2,
        input_tokens=10,
        output_tokens=5,
        total_tokens=15,
        error_detail="never shown",
    )
    spend(runs["completed"], "0.0015", 1000, cached=7, reasoning=3)
    spend(runs["completed"], "0.000600000", 234)
    spend(runs["completed"], "0.0100", 5000, superseded=True)
    runs["completed, unpriced call"] = _finished(
        make_run, user, AgentRun.Status.COMPLETED, final_output="plain text"
    )
    spend(runs["completed, unpriced call"], None, 50)
    spend(runs["completed, unpriced call"], "0.25", 10)
    runs["completed, free"] = _finished(make_run, user, AgentRun.Status.COMPLETED)
    spend(runs["completed, free"], "0", 10)
    runs["completed, older than the ledger"] = _finished(
        make_run,
        user,
        AgentRun.Status.COMPLETED,
        final_output=["a", {"b": True}],
        requests=3,
        input_tokens=70,
        output_tokens=30,
        total_tokens=100,
    )
    runs["completed, nothing used"] = _finished(make_run, user, AgentRun.Status.COMPLETED)
    runs["completed, only superseded rows"] = _finished(
        make_run, user, AgentRun.Status.COMPLETED, total_tokens=9
    )
    spend(runs["completed, only superseded rows"], "1", 9, superseded=True)
    runs["failed"] = _finished(
        make_run,
        user,
        AgentRun.Status.FAILED,
        error="The model provider failed.",
        stream_text="half a sen",
        attempt=3,
    )
    spend(runs["failed"], "0.5", 20)
    runs["cancelled"] = _finished(
        make_run,
        user,
        AgentRun.Status.CANCELLED,
        cancel_requested_at=now,
        stream_text="",
    )
    runs["running"] = make_run(
        user,
        status=AgentRun.Status.RUNNING,
        started_at=now,
        lease_expires_at=now + timedelta(minutes=5),
        cancel_requested_at=now,
        stream_text="not shown while it runs",
    )
    spend(runs["running"], "0.001", 40)
    runs["pending"] = make_run(user, dispatched_at=now, input_payload={"weird": ["input"]})
    runs["awaiting_approval"] = make_run(
        user,
        status=AgentRun.Status.AWAITING_APPROVAL,
        approval_expires_at=now + timedelta(hours=1),
    )
    for call_id, decision in (("call-1", "pending"), ("call-2", "approved"), ("call-3", "pending")):
        AgentApproval.objects.create(
            run=runs["awaiting_approval"],
            call_id=call_id,
            tool_name="delete_everything",
            arguments={"really": True},
            agent_name="Ops" if call_id == "call-1" else "",
            requested_at=now,
            decision=decision,
        )
    spend(runs["awaiting_approval"], "0.002", 60)
    runs["budget_exceeded"] = make_run(
        user,
        status=AgentRun.Status.BUDGET_EXCEEDED,
        error="This run reached its cost limit ($0.50).",
        stream_text="paused mid-way",
    )
    spend(runs["budget_exceeded"], "0.5", 1000)
    return runs


def test_the_json_detail_is_the_serializers_json_in_one_statement(api, make_run, user):
    runs = _scenarios(make_run, user)

    for name, run in runs.items():
        url = reverse("agents:run-detail", args=[run.id])
        with CaptureQueriesContext(connection) as queries:
            response = api.get(url)
        assert response.status_code == 200, name
        assert response.content == serialized(run), name
        # The session and user lookups, then one statement (and a paused run's approvals).
        paused = run.status == AgentRun.Status.AWAITING_APPROVAL
        assert len(queries) == (4 if paused else 3), (name, [q["sql"] for q in queries])
    body = json.loads(api.get(reverse("agents:run-detail", args=[runs["completed"].id])).content)
    assert (body["usage"]["calls"], body["usage"]["total_tokens"]) == (2, 1234)
    assert body["usage"]["cost"] == "0.0021"
    assert body["partial_output"] == "streamed"
    running = api.get(reverse("agents:run-detail", args=[runs["running"].id])).json()
    assert running["partial_output"] is None and running["cancel_requested"] is True
    waiting = api.get(reverse("agents:run-detail", args=[runs["awaiting_approval"].id])).json()
    assert [a["call_id"] for a in waiting["approvals"]] == ["call-1", "call-3"]


def test_the_statement_reads_only_what_the_json_shows(make_run, user):
    run = make_run(user, status=AgentRun.Status.RUNNING, stream_text="long text", error_detail="x")

    found = detailed_run(run.pk, user.pk)

    deferred = found.run.get_deferred_fields()
    assert {"stream_text", "error_detail", "run_options", "task_id"} <= deferred
    assert {"status", "lease_expires_at", "dispatched_at", "created_at"}.isdisjoint(deferred)
    AgentRun.objects.filter(pk=run.pk).update(status=AgentRun.Status.FAILED)
    assert "stream_text" not in detailed_run(run.pk, user.pk).run.get_deferred_fields()


def test_another_users_run_is_404_and_never_read(api, make_run, user, other_user):
    theirs = make_run(other_user, status=AgentRun.Status.COMPLETED, final_output=SECRET)
    spend(theirs, "9.99", 999)
    mine = make_run(user, status=AgentRun.Status.COMPLETED, final_output="mine")

    response = api.get(reverse("agents:run-detail", args=[theirs.id]))

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert SECRET not in response.content.decode()
    assert detailed_run(theirs.pk, user.pk) is None
    assert detailed_run(theirs.pk, other_user.pk).run.final_output == SECRET
    # One's own run never counts ledger rows of another run, whoever's they are.
    assert api.get(reverse("agents:run-detail", args=[mine.id])).json()["usage"]["calls"] == 0


def test_staff_allowed_to_view_runs_still_get_404_for_someone_elses_detail(
    client, make_run, user, other_user
):
    run = make_run(user, status=AgentRun.Status.COMPLETED, final_output=SECRET)
    other_user.is_staff = True
    other_user.save()
    other_user.user_permissions.add(Permission.objects.get(codename="view_agentrun"))
    client.force_login(other_user)

    response = client.get(reverse("agents:run-detail", args=[run.id]))

    assert response.status_code == 404
    assert SECRET not in response.content.decode()
    # The inspector is what such staff may open.
    assert client.get(reverse("agents:run-inspect", args=[run.id])).status_code == 200


def test_errors_are_unchanged(client, make_run, user):
    run = make_run(user)
    url = reverse("agents:run-detail", args=[run.id])
    anonymous = client.get(url)
    assert (anonymous.status_code, anonymous.json()["error"]["code"]) == (401, "not_authenticated")
    client.force_login(user)
    invalid = client.get(reverse("agents:run-detail", args=["nope"]))
    assert (invalid.status_code, invalid.json()["error"]["code"]) == (400, "invalid_run_id")
    missing = client.get(
        reverse("agents:run-detail", args=["6f1c5f5e-0000-4000-8000-000000000000"])
    )
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    posted = client.post(url)
    assert (posted.status_code, posted["Allow"]) == (405, "GET")


def test_the_statement_is_built_once_and_again_when_the_settings_change(make_run, user, settings):
    run = make_run(user, status=AgentRun.Status.COMPLETED, final_output="ok")
    key = (presentation._run_detail_query, "default")

    detailed_run(run.pk, user.pk)
    built = presentation._BUILT[key]
    detailed_run(run.pk, user.pk)
    assert presentation._BUILT[key] is built
    settings.AGENTIC_DJANGO_RUN_TIMEOUT = 123
    assert detailed_run(run.pk, user.pk).run.final_output == "ok"
    assert presentation._BUILT[key] is not built
