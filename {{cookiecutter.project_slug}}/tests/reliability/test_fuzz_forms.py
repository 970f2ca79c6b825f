"""Hypothesis drives the form/htmx paths the chat UI uses, and every query and path parameter.

Nothing a browser can send may cause a 5xx; every rejection is a documented 4xx, shown to htmx
users as a visible error fragment (never an empty swap or a raw traceback).
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote, urlsplit

import pytest
from django.urls import reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentic_django.models import AgentRun
from agentic_django.openapi import ERROR_CODES
from tests.reliability import spec
from tests.reliability.conftest import HTMX

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

CREATE = reverse("agents:run-create")
BROWSER = {"Accept": "text/html,application/xhtml+xml"}
MAX_INPUT_BYTES = 20_000

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Text a browser can put in a form field: anything but lone surrogates (NUL included).
CHARACTERS = st.characters(exclude_categories=["Cs"])
FIELD = st.text(CHARACTERS, max_size=300)
INPUTS = st.one_of(
    FIELD,
    st.sampled_from(["", " ", "\n\t", "What is (12 + 7) * 3?", "Convert 10 km to miles"]),
    st.just("x" * (MAX_INPUT_BYTES + 1)),
)
SESSION_KEYS = st.one_of(st.none(), FIELD, st.just("k" * 256))
AGENT_KEYS = st.one_of(st.none(), st.sampled_from(["", "assistant", "toolsmith"]), FIELD)
# Hostile and odd redirect targets, plus anything at all.
NEXT_URLS = st.one_of(
    st.sampled_from(
        [
            "/c/abc/",
            "//evil.example/",
            "https://evil.example/",
            "http://testserver/c/ok/",
            "/\\evil.example",
            "\\\\evil.example",
            "javascript:alert(1)",
            "data:text/html,x",
            " https://evil.example",
            "/%0d%0aSet-Cookie:x=1",
        ]
    ),
    FIELD,
)
PAGE_VALUES = st.one_of(st.none(), st.integers(-5, 10**20).map(str), FIELD)


def assert_documented(operation: str, response, *, htmx: bool) -> None:
    assert response.status_code < 500, response.content[:300]
    assert spec.response_problems(operation, response) == []
    if response.status_code >= 400 and htmx:
        html = response.content.decode()
        assert 'class="agentic-error"' in html and 'role="alert"' in html, html
        code = re.search(r'data-code="([a-z_]+)"', html)
        assert code and code[1] in ERROR_CODES, html


@pytest.fixture
def api(client, user, django_capture_on_commit_callbacks):
    client.force_login(user)
    return client


def test_htmx_create_answers_a_fragment_or_a_visible_documented_error(
    api, django_capture_on_commit_callbacks
):
    seen: set[int] = set()

    @FUZZ
    @given(message=INPUTS, session_key=SESSION_KEYS, agent_key=AGENT_KEYS)
    def create(message: str, session_key: str | None, agent_key: str | None) -> None:
        form = {"input": message}
        if session_key is not None:
            form["session_key"] = session_key
        if agent_key is not None:
            form["agent_key"] = agent_key
        # The run executes (in-process task backend), so odd input also reaches the agent.
        with django_capture_on_commit_callbacks(execute=True):
            response = api.post(CREATE, form, headers=HTMX)

        seen.add(response.status_code)
        assert_documented("run-create", response, htmx=True)
        if response.status_code != 200:
            assert response.status_code in (400, 413)
            return
        assert "run-update" in response["HX-Trigger"]
        run_id = re.search(r'data-run-id="([0-9a-f-]+)"', response.content.decode())[1]
        # The finished run's fragment renders whatever the agent answered.
        fragment = api.get(reverse("agents:run-fragment", args=[run_id]), headers=HTMX)
        assert_documented("run-fragment", fragment, htmx=True)
        assert fragment.status_code == 286

    create()
    assert {200, 400, 413} <= seen


@FUZZ
@given(next_url=NEXT_URLS)
def test_browser_create_redirects_only_to_same_site_urls(api, next_url):
    response = api.post(CREATE, {"input": "hi", "next": next_url})

    assert_documented("run-create", response, htmx=False)
    if response.status_code == 302:
        target = urlsplit(response["Location"])
        assert target.scheme in ("", "http") and target.netloc in ("", "testserver")
        assert not response["Location"].startswith(("//", "/\\"))
    else:
        assert response.status_code == 201


@pytest.mark.parametrize("next_url", ["chat", "null", "admin:index", "logout"])
def test_a_next_value_that_looks_like_a_view_name_is_not_followed(api, next_url):
    # Found by fuzzing: redirect() used to resolve such values as URL names (a 500, or a
    # redirect to that view).
    response = api.post(CREATE, {"input": "hi", "next": next_url})

    assert response.status_code == 201


@pytest.fixture
def finished(user, make_run):
    return make_run(user, session_key="chat", status=AgentRun.Status.COMPLETED, with_event=True)


@FUZZ
@given(after=PAGE_VALUES, limit=PAGE_VALUES, htmx=st.booleans())
def test_paging_parameters_never_fail(api, finished, after, limit, htmx):
    query = {k: v for k, v in {"after": after, "limit": limit}.items() if v is not None}
    headers = HTMX if htmx else {}
    for operation, path in (
        ("run-events", reverse("agents:run-events", args=[finished.id])),
        ("session-items", reverse("agents:session-items", args=["chat"])),
    ):
        response = api.get(path, query, headers=headers)

        assert_documented(operation, response, htmx=htmx)
        assert response.status_code in (200, 400)


@FUZZ
@given(version=FIELD, htmx=st.booleans())
def test_the_fragment_version_parameter_never_fails(api, finished, version, htmx):
    path = reverse("agents:run-fragment", args=[finished.id])
    response = api.get(path, {"v": version}, headers=HTMX if htmx else {})

    assert_documented("run-fragment", response, htmx=htmx)
    assert response.status_code == (286 if htmx else 200)


@FUZZ
@given(key=st.text(CHARACTERS, min_size=1, max_size=300))
def test_any_path_parameter_is_a_4xx_never_a_5xx(api, key):
    quoted = quote(key, safe="")
    for operation, path in (
        ("run-detail", f"/agents/runs/{quoted}/"),
        ("run-fragment", f"/agents/runs/{quoted}/fragment/"),
        ("run-events", f"/agents/runs/{quoted}/events/"),
        ("session-items", f"/agents/sessions/{quoted}/items/"),
    ):
        for headers in ({}, HTMX):
            response = api.get(path, headers=headers)

            assert response.status_code in (400, 404), (path, response.status_code)
            if "/" not in key:  # a "/" makes the URL miss the route: Django's own 404 page
                assert_documented(operation, response, htmx=bool(headers))
    response = api.post(f"/agents/runs/{quoted}/cancel/", headers=HTMX)
    assert response.status_code in (400, 404)


NUL_REQUESTS = {
    "json-input": ("json", {"input": "a\x00b"}),
    "json-item": ("json", {"input": [{"role": "user", "content": "\x00"}]}),
    "json-session-key": ("json", {"input": "hi", "session_key": "k\x00"}),
    "htmx-input": ("htmx", {"input": "a\x00b"}),
    "htmx-session-key": ("htmx", {"input": "hi", "session_key": "k\x00"}),
    "session-items": ("get", "/agents/sessions/k%00/items/"),
    "chat-conversation": ("get", "/c/k%00/"),
}


@pytest.mark.parametrize("case", NUL_REQUESTS)
def test_nul_characters_are_a_4xx_not_a_500(api, case):
    """PostgreSQL cannot store U+0000 in text or jsonb: it is rejected before any query."""
    kind, payload = NUL_REQUESTS[case]
    api.raise_request_exception = False
    if kind == "json":
        response = api.post(CREATE, json.dumps(payload), content_type="application/json")
    elif kind == "htmx":
        response = api.post(CREATE, payload, headers=HTMX)
    else:
        response = api.get(payload)

    assert response.status_code == (404 if kind == "get" else 400)
    assert not AgentRun.objects.exists()
