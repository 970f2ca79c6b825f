"""While the database is unreachable, every kind of client gets a 503 with Retry-After."""

from __future__ import annotations

import json
import uuid

import pytest
from django.db import OperationalError
from django.urls import reverse

from agentic_django.middleware import RETRY_AFTER_SECONDS, server_error
from tests.core.faults import database_faults
from tests.web.conftest import BROWSER, HTMX
from tests.web.test_api import CREATE, assert_htmx_error, assert_json_error, post_json

DOWN = OperationalError('connection to server at "db" (10.0.0.5), port 5432 failed: refused')
EVERY_STATEMENT = r"."


@pytest.fixture
def database_down():
    with database_faults() as faults:
        faults.fail(EVERY_STATEMENT, DOWN, times=float("inf"))
        yield


def assert_unavailable(response) -> None:
    assert response["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert "10.0.0.5" not in response.content.decode()  # nothing of the connection leaks


def test_api_clients_get_a_json_503(api, database_down):
    for response in (
        api.get(reverse("agents:run-detail", args=[uuid.uuid4()])),
        post_json(api, {"input": "hi"}),
    ):
        assert_json_error(response, 503, "database_unavailable")
        assert_unavailable(response)


def test_htmx_gets_a_visible_503_fragment(api, database_down):
    response = api.post(CREATE, {"input": "hi"}, headers=HTMX)
    assert_htmx_error(response, 503, "temporarily unavailable")
    assert_unavailable(response)


def test_browsers_get_a_503_page(api, database_down):
    response = api.get(reverse("chat:index"), headers=BROWSER)
    assert response.status_code == 503
    assert "Temporarily unavailable" in response.content.decode()
    assert_unavailable(response)


def test_handler500_answers_503_for_errors_raised_outside_the_views(rf):
    """Middleware that reaches the database before any view does ends in handler500."""
    request = rf.get("/agents/openapi.json", headers={"Accept": "application/json"})
    try:
        raise DOWN
    except OperationalError:
        response = server_error(request)
    assert response.status_code == 503
    assert json.loads(response.content)["error"]["code"] == "database_unavailable"
    assert_unavailable(response)
    try:
        raise ValueError("a bug")
    except ValueError:
        assert server_error(request).status_code == 500
