from __future__ import annotations

from typing import Any

import pytest

from agentic_django.models import AgentRun, AgentSession

HTMX = {"HX-Request": "true"}
BROWSER = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture(autouse=True)
def _web_settings(settings):
    settings.AGENTIC_DJANGO_AGENT_REGISTRY = "tests.web.registry.get_agent_registry"
    settings.AGENTIC_DJANGO_DEFAULT_AGENT_KEY = "assistant"
    settings.AGENTIC_DJANGO_RATE_LIMIT = None
    settings.AGENTIC_DJANGO_ENABLE_EVENTS = True


@pytest.fixture
def api(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def make_run(db):
    """A run stored directly, without enqueueing it (so it stays as created)."""

    def make(owner: Any, *, session_key: str = "s1", **fields: Any) -> AgentRun:
        session, _ = AgentSession.objects.get_or_create(owner=owner, session_key=session_key)
        fields.setdefault("agent_key", "assistant")
        fields.setdefault("input_payload", "hello")
        return AgentRun.objects.create(session=session, owner=owner, **fields)

    return make
