"""Owner isolation: every endpoint, in every format, answers 404 for another user's ids."""

from __future__ import annotations

import json

import pytest
from django.urls import reverse

from agentic_django.models import AgentEvent, AgentRun, AgentSession
from tests.web.conftest import HTMX

pytestmark = pytest.mark.django_db

FORMATS = {
    "json": {"Accept": "application/json"},
    "htmx": HTMX,
}


@pytest.fixture
def victims_run(make_run, other_user):
    run = make_run(other_user, session_key="secret-plans", input_payload="the secret is 1234")
    AgentEvent.objects.create(run=run, sequence=1, event_type="tool_called", payload={})
    return run


def _requests(run):
    return {
        "run-detail": ("get", reverse("agents:run-detail", args=[run.id])),
        "run-fragment": ("get", reverse("agents:run-fragment", args=[run.id])),
        "run-events": ("get", reverse("agents:run-events", args=[run.id])),
        "run-cancel": ("post", reverse("agents:run-cancel", args=[run.id])),
        "session-items": ("get", reverse("agents:session-items", args=["secret-plans"])),
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "endpoint", ["run-detail", "run-fragment", "run-events", "run-cancel", "session-items"]
)
def test_another_users_ids_are_404(api, victims_run, endpoint, fmt):
    method, url = _requests(victims_run)[endpoint]
    response = getattr(api, method)(url, headers=FORMATS[fmt])

    assert response.status_code == 404
    body = response.content.decode()
    assert "the secret is 1234" not in body
    if fmt == "json":
        assert json.loads(body)["error"]["code"] == "not_found"
    else:
        assert 'class="agentic-error"' in body
    victims_run.refresh_from_db()
    assert victims_run.status == AgentRun.Status.PENDING  # cancel did nothing


def test_creating_with_another_users_session_key_uses_a_session_of_ones_own(api, user, victims_run):
    response = api.post(
        reverse("agents:run-create"),
        data=json.dumps({"input": "hi", "session_key": "secret-plans"}),
        content_type="application/json",
    )

    assert response.status_code == 201
    run = AgentRun.objects.get(pk=response.json()["id"])
    assert run.session.owner == user
    assert run.session != victims_run.session
    assert AgentSession.objects.filter(session_key="secret-plans").count() == 2
    assert victims_run.session.runs.count() == 1


def test_the_chat_page_never_shows_another_users_conversation(api, victims_run):
    response = api.get(reverse("chat:conversation", args=["secret-plans"]))

    assert response.status_code == 200
    assert "the secret is 1234" not in response.content.decode()
    listing = api.get(reverse("chat:conversation-list"), headers=HTMX).content.decode()
    assert "the secret is 1234" not in listing
