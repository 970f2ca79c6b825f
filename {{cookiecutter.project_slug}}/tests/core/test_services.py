"""create_run validates input before anything is stored; serializers return JSON-safe dicts."""

from __future__ import annotations

import json

import pytest

from agentic_django import signals
from agentic_django.exceptions import (
    InputTooLarge,
    InvalidRunInput,
    InvalidRunOptions,
    TooManyInputItems,
    UnknownAgent,
)
from agentic_django.models import AgentRun, AgentSession
from agentic_django.serializers import event_to_dict, item_to_dict, run_to_dict, session_to_dict
from agentic_django.services import create_run

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "status_code"),
    [
        ({"input_payload": "x" * 30_000}, InputTooLarge, 413),
        ({"input_payload": [{"role": "user", "content": "x"}] * 21}, TooManyInputItems, 413),
        ({"input_payload": "   "}, InvalidRunInput, 400),
        ({"input_payload": []}, InvalidRunInput, 400),
        ({"input_payload": ["not an item"]}, InvalidRunInput, 400),
        ({"input_payload": 42}, InvalidRunInput, 400),
        ({"input_payload": "hi", "agent_key": "nope"}, UnknownAgent, 400),
        ({"input_payload": "hi", "run_options": {"tools": []}}, InvalidRunOptions, 400),
        ({"input_payload": "hi", "run_options": {"max_turns": 999}}, InvalidRunOptions, 400),
        ({"input_payload": "hi", "run_options": {"max_turns": "3"}}, InvalidRunOptions, 400),
        ({"input_payload": "hi", "run_options": ["max_turns"]}, InvalidRunOptions, 400),
        ({"input_payload": "hi", "session_key": ""}, InvalidRunInput, 400),
        ({"input_payload": "hi", "session_key": "k" * 300}, InvalidRunInput, 400),
    ],
)
def test_invalid_requests_are_rejected_before_anything_is_stored(user, kwargs, error, status_code):
    kwargs = {"session_key": "k", **kwargs}
    with pytest.raises(error) as raised:
        create_run(owner=user, **kwargs)
    assert raised.value.status_code == status_code
    assert raised.value.message
    assert not AgentRun.objects.exists()
    assert not AgentSession.objects.exists()


def test_list_input_and_allowed_options_are_accepted(user):
    run = create_run(
        owner=user,
        session_key="k",
        input_payload=[{"role": "user", "content": "hello"}],
        run_options={"max_turns": 3},
    )
    run.refresh_from_db()
    assert run.status == "completed"
    assert run.run_options == {"max_turns": 3}
    assert run.agent_key == "demo"  # AGENTIC_DJANGO_DEFAULT_AGENT_KEY


def test_session_created_signal_is_sent_once_per_new_session(user):
    created = []

    def on_created(sender, session, **kwargs):
        created.append(session.session_key)

    signals.agent_session_created.connect(on_created)
    try:
        first = create_run(owner=user, session_key="k", input_payload="one")
        second = create_run(owner=user, session_key="k", input_payload="two")
    finally:
        signals.agent_session_created.disconnect(on_created)
    assert created == ["k"]
    assert first.session_id == second.session_id


def test_sessions_are_per_owner(user, other_user):
    mine = create_run(owner=user, session_key="k", input_payload="hi")
    theirs = create_run(owner=other_user, session_key="k", input_payload="hi")
    assert mine.session_id != theirs.session_id


def test_serializers_are_json_safe(user):
    run = create_run(owner=user, session_key="k", input_payload="hi")
    run.refresh_from_db()
    data = run_to_dict(run)
    assert data["status"] == "completed"
    assert data["is_terminal"] is True
    assert data["session_key"] == "k"
    assert "task_id" not in data and "lease_expires_at" not in data
    payload = {
        "run": data,
        "events": [event_to_dict(e) for e in run.events.all()],
        "items": [item_to_dict(i) for i in run.session.items.all()],
        "session": session_to_dict(run.session),
    }
    assert json.loads(json.dumps(payload))["items"][0]["payload"] == {
        "role": "user",
        "content": "hi",
    }
