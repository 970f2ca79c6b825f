"""The project's provider settings pointed at a fake OpenAI-compatible server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.openai_server import FakeOpenAI


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """A running fake server; the test fails if a request found no scripted reply."""
    with FakeOpenAI() as fake:
        yield fake
    assert fake.errors == [], "the fake server failed to answer"
    assert fake.unexpected == [], "requests the test did not script a reply for"


@pytest.fixture(params=["responses", "chat_completions"])
def api_mode(request) -> str:
    return request.param


@pytest.fixture
def provider(settings, fake_openai, api_mode) -> FakeOpenAI:
    """Settings as `.env` would give them for a local OpenAI-compatible server (no key), with
    the project's own agent registry; each scripted reply answers exactly one request."""
    settings.OPENAI_API_KEY = ""
    settings.OPENAI_BASE_URL = fake_openai.url
    settings.OPENAI_API_MODE = api_mode
    settings.OPENAI_MODEL = "fake-model"
    settings.OPENAI_TIMEOUT = 10.0
    settings.OPENAI_MAX_RETRIES = 0
    settings.OPENAI_TRACING = None
    settings.AGENTIC_DJANGO_AGENT_REGISTRY = "chat.registry.get_agent_registry"
    settings.AGENTIC_DJANGO_ENABLE_EVENTS = True
    settings.AGENTIC_DJANGO_RATE_LIMIT = None
    return fake_openai
