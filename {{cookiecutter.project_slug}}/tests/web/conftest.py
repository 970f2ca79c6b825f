from __future__ import annotations

import pytest

HTMX = {"HX-Request": "true"}
BROWSER = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture(autouse=True)
def _web_settings(settings):
    settings.AGENTIC_DJANGO_AGENT_REGISTRY = "tests.web.registry.get_agent_registry"
    settings.AGENTIC_DJANGO_RATE_LIMIT = None
    settings.AGENTIC_DJANGO_ENABLE_EVENTS = True


@pytest.fixture
def api(client, user):
    client.force_login(user)
    return client
