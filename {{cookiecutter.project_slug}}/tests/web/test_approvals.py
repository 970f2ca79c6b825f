"""Deciding on tool calls over HTTP: JSON for API clients, fragments for htmx, owner only."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import reverse

from agentic_django.models import AgentApproval, AgentRun
from chat.models import TeamNote
from tests.web.conftest import HTMX

pytestmark = pytest.mark.django_db(transaction=True)

NOTE = "Send a note to the team: the release is out"


def paused_run(api) -> AgentRun:
    response = api.post(
        reverse("agents:run-create"),
        data=json.dumps({"input": NOTE, "agent_key": "toolsmith"}),
        content_type="application/json",
    )
    run = AgentRun.objects.get(pk=response.json()["id"])
    assert run.status == "awaiting_approval", run.error
    return run


def decide(client, run, verb: str, **body):
    return client.post(
        reverse(f"agents:run-{verb}", args=[run.pk]),
        data=json.dumps({"call_id": run.pending_approvals()[0].call_id, **body}),
        content_type="application/json",
    )


def test_the_paused_run_lists_its_pending_calls(api):
    run = paused_run(api)
    body = api.get(reverse("agents:run-detail", args=[run.pk])).json()
    assert body["status"] == "awaiting_approval"
    (approval,) = body["approvals"]
    assert approval["tool"] == "send_team_note"
    assert approval["arguments"] == {"text": "the release is out"}
    assert approval["decision"] == "pending"
    assert body["approval_expires_at"]


def test_approving_sends_the_note_once(api, user):
    run = paused_run(api)
    response = decide(api, run, "approve")
    assert response.status_code == 200
    assert response.json()["status"] == "completed"
    assert "Note sent to the team: the release is out" in json.dumps(response.json())
    assert list(TeamNote.objects.values_list("text", "author")) == [("the release is out", user.pk)]
    # A second click on the same call changes nothing and says why.
    again = api.post(
        reverse("agents:run-approve", args=[run.pk]),
        data=json.dumps({"call_id": AgentApproval.objects.get(run=run).call_id}),
        content_type="application/json",
    )
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "run_not_awaiting_approval"
    assert TeamNote.objects.count() == 1


def test_rejecting_with_a_reason_tells_the_model(api):
    run = paused_run(api)
    response = decide(api, run, "reject", message="Not before Friday.")
    assert response.json()["status"] == "completed"
    assert "The note was not sent: Not before Friday." in json.dumps(response.json())
    assert not TeamNote.objects.exists()


def test_htmx_buttons_get_the_fragment_and_a_clear_conflict(api):
    run = paused_run(api)
    fragment = api.get(reverse("agents:run-fragment", args=[run.pk]), headers=HTMX).content
    html = fragment.decode()
    assert "send_team_note" in html and "Approve" in html and "Reject" in html
    call_id = run.pending_approvals()[0].call_id
    url = reverse("agents:run-approve", args=[run.pk])
    first = api.post(url, {"call_id": call_id}, headers=HTMX)
    assert first.status_code == 200 and "run-update" in first["HX-Trigger"]
    assert 'data-status="completed"' in first.content.decode()
    second = api.post(url, {"call_id": call_id}, headers=HTMX)  # the double click
    assert second.status_code == 409
    assert "This run is not waiting for an approval." in second.content.decode()


def test_another_users_run_is_404_and_stays_paused(api, other_user):
    run = paused_run(api)
    intruder = Client()
    intruder.force_login(other_user)
    response = decide(intruder, run, "approve")
    assert response.status_code == 404
    assert AgentRun.objects.get(pk=run.pk).status == "awaiting_approval"


def test_decisions_need_the_csrf_token(user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    run_client = Client()
    run_client.force_login(user)
    run = paused_run(run_client)
    assert decide(client, run, "approve").status_code == 403
    assert AgentRun.objects.get(pk=run.pk).status == "awaiting_approval"


def test_a_note_in_doubt_asks_with_its_own_buttons_and_sends_it_once(api, user):
    """The worker died while send_team_note ran (a call started, never finished): the retried
    run asks in the chat with "Run it again", "It was done" and "Stop the run". Running it
    again reuses the call's idempotency key, so the note is stored once."""
    from agentic_django import lifecycle, recovery
    from agentic_django.models import AgentToolCall
    from tests.core.conftest import worker_died

    run = paused_run(api)
    assert decide(api, run, "approve").status_code == 200
    call = AgentToolCall.objects.get(run=run)
    assert TeamNote.objects.count() == 1
    # As a worker killed inside the tool, just after the note was stored, leaves it: the call
    # started and never finished, the run running with an expired lease.
    AgentToolCall.objects.filter(pk=call.pk).update(finished_at=None, output=None)
    AgentRun.objects.filter(pk=run.pk).update(status="running", final_output=None)
    worker_died(run)
    assert lifecycle.requeue(AgentRun.objects.get(pk=run.pk), stale_only=True)
    recovery.sweep()  # the retry (in-process here) pauses on the call in doubt
    run.refresh_from_db()
    assert run.status == "awaiting_approval"
    page = api.get(reverse("agents:run-fragment", args=[run.pk]), headers=HTMX).content.decode()
    for label in ("may or may not have acted", "Run it again", "It was done", "Stop the run"):
        assert label in page, label
    assert decide(api, run, "approve").json()["status"] == "completed"
    assert TeamNote.objects.count() == 1  # the same key: the note was not sent twice
