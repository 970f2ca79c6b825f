"""The served OpenAPI description matches the views: routes, methods, statuses, error codes, bodies.

Every documented (operation, status) pair is produced by a real request below, each response is
checked against the description (status, media type, required headers, JSON schema), and every
documented error code is answered by some request. A route, method, status or field the views
gain or lose without the description following makes one of these tests fail.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from django.test import Client
from django.urls import URLPattern, reverse
from jsonschema import Draft202012Validator

from agentic_django import services, urls
from agentic_django.models import AgentApproval, AgentRun
from agentic_django.openapi import ERROR_CODES, build_spec
from agentic_django.presentation import run_view
from tests.core.faults import database_faults
from tests.reliability import spec
from tests.reliability.conftest import HTMX

pytestmark = pytest.mark.django_db

BROWSER = {"Accept": "text/html,application/xhtml+xml"}
JSON_BODY = "application/json"
METHODS = ("get", "post", "put", "patch", "delete", "head", "options")


@dataclass
class World:
    api: Client
    anonymous: Client
    strict: Client  # enforces CSRF like a real browser
    finished: AgentRun
    pending: AgentRun
    foreign: AgentRun
    paused: AgentRun  # waits on the approval of tool call "call-1"


@pytest.fixture
def world(client, user, other_user, make_run, settings, django_capture_on_commit_callbacks):
    client.force_login(user)
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    with django_capture_on_commit_callbacks(execute=True):
        finished = services.create_run(owner=user, session_key="chat", input_payload="hi there")
    finished.refresh_from_db()
    assert finished.status == AgentRun.Status.COMPLETED, finished.error
    return World(
        api=client,
        anonymous=Client(),
        strict=strict,
        finished=finished,
        pending=make_run(user, session_key="chat"),
        foreign=make_run(other_user, session_key="chat", input_payload="not yours"),
        paused=paused_run(make_run(user, session_key="paused", status="awaiting_approval")),
    )


def paused_run(run: AgentRun) -> AgentRun:
    AgentApproval.objects.create(
        run=run,
        call_id="call-1",
        tool_name="send_team_note",
        arguments={"text": "hi"},
        requested_at=run.created_at,
    )
    return run


def url(name: str, *args: Any) -> str:
    return reverse(f"agents:{name}", args=args)


def post_json(client: Client, path: str, body: Any, **extra: Any) -> Any:
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post(path, data=data, content_type=JSON_BODY, **extra)


@dataclass(frozen=True)
class Recipe:
    operation: str
    status: int
    code: str | None  # the JSON (or fragment) error code, if an error
    call: Callable[[World, Any], Any]
    htmx_error: bool = False

    @property
    def id(self) -> str:
        suffix = "-htmx" if self.htmx_error else ""
        return f"{self.operation}-{self.status}-{self.code or 'ok'}{suffix}"


CREATE = url("run-create")


def _detail(w: World) -> str:
    return url("run-detail", w.finished.id)


RECIPES = [
    # --- run-create
    Recipe("run-create", 201, None, lambda w, s: post_json(w.api, CREATE, {"input": "hi"})),
    Recipe("run-create", 200, None, lambda w, s: w.api.post(CREATE, {"input": "hi"}, headers=HTMX)),
    Recipe(
        "run-create", 302, None, lambda w, s: w.api.post(CREATE, {"input": "hi", "next": "/c/x/"})
    ),
    Recipe("run-create", 400, "invalid_json", lambda w, s: post_json(w.api, CREATE, "{")),
    Recipe("run-create", 400, "unknown_field", lambda w, s: post_json(w.api, CREATE, {"x": 1})),
    Recipe("run-create", 400, "missing_input", lambda w, s: post_json(w.api, CREATE, {})),
    Recipe(
        "run-create",
        400,
        "invalid_session_key",
        lambda w, s: post_json(w.api, CREATE, {"input": "hi", "session_key": 5}),
    ),
    Recipe(
        "run-create",
        400,
        "invalid_agent_key",
        lambda w, s: post_json(w.api, CREATE, {"input": "hi", "agent_key": 5}),
    ),
    Recipe(
        "run-create",
        400,
        "invalid_run_input",
        lambda w, s: post_json(w.api, CREATE, {"input": " "}),
    ),
    Recipe(
        "run-create",
        400,
        "unknown_agent",
        lambda w, s: post_json(w.api, CREATE, {"input": "hi", "agent_key": "nobody"}),
    ),
    Recipe(
        "run-create",
        400,
        "invalid_run_options",
        lambda w, s: post_json(w.api, CREATE, {"input": "hi", "run_options": {"model": "x"}}),
    ),
    Recipe(
        "run-create",
        400,
        "invalid_multitask_strategy",
        lambda w, s: post_json(w.api, CREATE, {"input": "hi", "multitask_strategy": "later"}),
    ),
    Recipe(
        "run-create",
        409,
        "conversation_busy",
        lambda w, s: post_json(
            w.api,
            CREATE,
            {"input": "hi", "session_key": "chat", "multitask_strategy": "reject"},
        ),
    ),
    Recipe(
        "run-create",
        400,
        "invalid_request",
        lambda w, s: post_json(w.api, CREATE, {"input": "hi"}, CONTENT_LENGTH="many"),
    ),
    Recipe(
        "run-create",
        400,
        "invalid_run_input",
        lambda w, s: w.api.post(CREATE, {"input": ""}, headers=HTMX),
        htmx_error=True,
    ),
    Recipe(
        "run-create",
        401,
        "not_authenticated",
        lambda w, s: post_json(w.anonymous, CREATE, {"input": "hi"}),
    ),
    Recipe("run-create", 403, None, lambda w, s: post_json(w.strict, CREATE, {"input": "hi"})),
    Recipe(
        "run-create",
        413,
        "input_too_large",
        lambda w, s: post_json(
            w.api, CREATE, {"input": "x" * (s.AGENTIC_DJANGO_MAX_INPUT_BYTES + 1)}
        ),
    ),
    Recipe(
        "run-create",
        413,
        "too_many_input_items",
        lambda w, s: post_json(
            w.api,
            CREATE,
            {"input": [{"role": "user", "content": "hi"}] * (s.AGENTIC_DJANGO_MAX_INPUT_ITEMS + 1)},
        ),
    ),
    Recipe("run-create", 429, "rate_limited", lambda w, s: _over_the_rate_limit(w, s)),
    Recipe("run-create", 402, "budget_exceeded", lambda w, s: _over_the_budget(w, s)),
    # --- run-detail
    Recipe("run-detail", 200, None, lambda w, s: w.api.get(_detail(w))),
    Recipe("run-detail", 302, None, lambda w, s: w.anonymous.get(_detail(w), headers=BROWSER)),
    Recipe("run-detail", 400, "invalid_run_id", lambda w, s: w.api.get(url("run-detail", "nope"))),
    Recipe("run-detail", 401, "not_authenticated", lambda w, s: w.anonymous.get(_detail(w))),
    Recipe("run-detail", 404, "not_found", lambda w, s: w.api.get(url("run-detail", w.foreign.id))),
    Recipe(
        "run-detail",
        404,
        "not_found",
        lambda w, s: w.api.get(url("run-detail", w.foreign.id), headers=HTMX),
        htmx_error=True,
    ),
    # --- run-inspect, run-trace
    *(
        recipe
        for name in ("run-inspect", "run-trace")
        for recipe in (
            Recipe(name, 200, None, lambda w, s, n=name: w.api.get(url(n, w.finished.id))),
            Recipe(
                name,
                302,
                None,
                lambda w, s, n=name: w.anonymous.get(url(n, w.finished.id), headers=BROWSER),
            ),
            Recipe(name, 400, "invalid_run_id", lambda w, s, n=name: w.api.get(url(n, "nope"))),
            Recipe(
                name,
                401,
                "not_authenticated",
                lambda w, s, n=name: w.anonymous.get(url(n, w.finished.id)),
            ),
            Recipe(name, 404, "not_found", lambda w, s, n=name: w.api.get(url(n, w.foreign.id))),
        )
    ),
    # --- run-fragment
    Recipe("run-fragment", 200, None, lambda w, s: w.api.get(url("run-fragment", w.finished.id))),
    Recipe(
        "run-fragment",
        204,
        None,
        lambda w, s: w.api.get(
            url("run-fragment", w.pending.id), {"v": run_view(w.pending).version}, headers=HTMX
        ),
    ),
    Recipe(
        "run-fragment",
        286,
        None,
        lambda w, s: w.api.get(url("run-fragment", w.finished.id), headers=HTMX),
    ),
    Recipe(
        "run-fragment",
        302,
        None,
        lambda w, s: w.anonymous.get(url("run-fragment", w.finished.id), headers=BROWSER),
    ),
    Recipe("run-fragment", 400, "invalid_run_id", lambda w, s: w.api.get(url("run-fragment", "1"))),
    Recipe(
        "run-fragment",
        401,
        "not_authenticated",
        lambda w, s: w.anonymous.get(url("run-fragment", w.finished.id)),
    ),
    Recipe(
        "run-fragment", 404, "not_found", lambda w, s: w.api.get(url("run-fragment", w.foreign.id))
    ),
    # --- run-events
    Recipe("run-events", 200, None, lambda w, s: w.api.get(url("run-events", w.finished.id))),
    Recipe(
        "run-events",
        302,
        None,
        lambda w, s: w.anonymous.get(url("run-events", w.finished.id), headers=BROWSER),
    ),
    Recipe(
        "run-events",
        400,
        "invalid_after",
        lambda w, s: w.api.get(url("run-events", w.finished.id), {"after": "-1"}),
    ),
    Recipe(
        "run-events",
        400,
        "invalid_limit",
        lambda w, s: w.api.get(url("run-events", w.finished.id), {"limit": "0"}),
    ),
    Recipe(
        "run-events",
        401,
        "not_authenticated",
        lambda w, s: w.anonymous.get(url("run-events", w.finished.id)),
    ),
    Recipe("run-events", 404, "not_found", lambda w, s: w.api.get(url("run-events", w.foreign.id))),
    # --- run-cancel
    Recipe("run-cancel", 200, None, lambda w, s: w.api.post(url("run-cancel", w.pending.id))),
    Recipe(
        "run-cancel",
        302,
        None,
        lambda w, s: w.anonymous.post(url("run-cancel", w.pending.id), headers=BROWSER),
    ),
    Recipe("run-cancel", 400, "invalid_run_id", lambda w, s: w.api.post(url("run-cancel", "x"))),
    Recipe(
        "run-cancel",
        401,
        "not_authenticated",
        lambda w, s: w.anonymous.post(url("run-cancel", w.pending.id)),
    ),
    Recipe("run-cancel", 403, None, lambda w, s: w.strict.post(url("run-cancel", w.pending.id))),
    Recipe(
        "run-cancel", 404, "not_found", lambda w, s: w.api.post(url("run-cancel", w.foreign.id))
    ),
    Recipe(
        "run-cancel",
        409,
        "run_not_cancellable",
        lambda w, s: w.api.post(url("run-cancel", w.finished.id)),
    ),
    # --- session-items
    Recipe("session-items", 200, None, lambda w, s: w.api.get(url("session-items", "chat"))),
    Recipe(
        "session-items",
        302,
        None,
        lambda w, s: w.anonymous.get(url("session-items", "chat"), headers=BROWSER),
    ),
    Recipe(
        "session-items",
        400,
        "invalid_session_key",
        lambda w, s: w.api.get(url("session-items", "k" * 256)),
    ),
    Recipe(
        "session-items",
        401,
        "not_authenticated",
        lambda w, s: w.anonymous.get(url("session-items", "chat")),
    ),
    Recipe("session-items", 404, "not_found", lambda w, s: w.api.get(url("session-items", "nope"))),
    # --- usage
    Recipe("usage", 200, None, lambda w, s: w.api.get(url("usage"), {"session_key": "chat"})),
    Recipe("usage", 302, None, lambda w, s: w.anonymous.get(url("usage"), headers=BROWSER)),
    Recipe(
        "usage",
        400,
        "invalid_session_key",
        lambda w, s: w.api.get(url("usage"), {"session_key": "k" * 256}),
    ),
    Recipe("usage", 401, "not_authenticated", lambda w, s: w.anonymous.get(url("usage"))),
    Recipe("usage", 404, "not_found", lambda w, s: w.api.get(url("usage"), {"session_key": "x"})),
    # --- run-stream
    Recipe("run-stream", 200, None, lambda w, s: _stream(w.api, w.finished.id)),
    Recipe("run-stream", 204, None, lambda w, s: _stream_after_its_end(w.api, w.finished.id)),
    Recipe("run-stream", 400, "invalid_run_id", lambda w, s: w.api.get(url("run-stream", "x"))),
    Recipe(
        "run-stream",
        401,
        "not_authenticated",
        lambda w, s: w.anonymous.get(url("run-stream", w.finished.id)),
    ),
    Recipe("run-stream", 404, "not_found", lambda w, s: w.api.get(url("run-stream", w.foreign.id))),
    # --- run-approve, run-reject
    *(
        recipe
        for name in ("run-approve", "run-reject")
        for recipe in (
            Recipe(name, 200, None, lambda w, s, n=name: _decide(w.api, n, w.paused)),
            Recipe(
                name,
                302,
                None,
                lambda w, s, n=name: w.anonymous.post(url(n, w.paused.id), headers=BROWSER),
            ),
            Recipe(name, 400, "invalid_run_id", lambda w, s, n=name: _decide(w.api, n, "x")),
            Recipe(
                name, 400, "invalid_call_id", lambda w, s, n=name: _decide(w.api, n, w.paused, {})
            ),
            Recipe(
                name,
                401,
                "not_authenticated",
                lambda w, s, n=name: _decide(w.anonymous, n, w.paused),
            ),
            Recipe(name, 403, None, lambda w, s, n=name: _decide(w.strict, n, w.paused)),
            Recipe(name, 404, "not_found", lambda w, s, n=name: _decide(w.api, n, w.foreign)),
            Recipe(
                name,
                409,
                "run_not_awaiting_approval",
                lambda w, s, n=name: _decide(w.api, n, w.finished),
            ),
        )
    ),
    Recipe(
        "run-approve",
        400,
        "invalid_always",
        lambda w, s: _decide(w.api, "run-approve", w.paused, {"call_id": "call-1", "always": 1}),
    ),
    Recipe(
        "run-approve",
        400,
        "unknown_field",
        lambda w, s: _decide(w.api, "run-approve", w.paused, {"call_id": "call-1", "message": ""}),
    ),
    Recipe(
        "run-approve",
        404,
        "approval_not_found",
        lambda w, s: _decide(w.api, "run-approve", w.paused, {"call_id": "call-9"}),
    ),
    Recipe("run-approve", 409, "approval_already_decided", lambda w, s: _decide_twice(w)),
    Recipe("run-approve", 410, "approval_expired", lambda w, s: _decide_too_late(w, "run-approve")),
    Recipe("run-reject", 410, "approval_expired", lambda w, s: _decide_too_late(w, "run-reject")),
    Recipe(
        "run-reject",
        400,
        "invalid_message",
        lambda w, s: _decide(w.api, "run-reject", w.paused, {"call_id": "c", "message": 5}),
    ),
    Recipe(
        "run-reject",
        400,
        "invalid_text",
        lambda w, s: _decide(w.api, "run-reject", w.paused, {"call_id": "c", "message": "\x00"}),
    ),
    Recipe(
        "run-reject",
        400,
        "invalid_json",
        lambda w, s: post_json(w.api, url("run-reject", w.paused.id), "[1"),
    ),
    # --- every endpoint that reads the database: 503 while it is unreachable
    *(
        Recipe(name, 503, "database_unavailable", lambda w, s, call=call: _database_down(w, call))
        for name, call in (
            ("run-create", lambda w: post_json(w.api, CREATE, {"input": "hi"})),
            ("run-detail", lambda w: w.api.get(_detail(w))),
            ("run-fragment", lambda w: w.api.get(url("run-fragment", w.finished.id))),
            ("run-events", lambda w: w.api.get(url("run-events", w.finished.id))),
            ("run-inspect", lambda w: w.api.get(url("run-inspect", w.finished.id))),
            ("run-trace", lambda w: w.api.get(url("run-trace", w.finished.id))),
            ("run-stream", lambda w: w.api.get(url("run-stream", w.finished.id))),
            ("run-cancel", lambda w: w.api.post(url("run-cancel", w.pending.id))),
            ("run-approve", lambda w: _decide(w.api, "run-approve", w.paused)),
            ("run-reject", lambda w: _decide(w.api, "run-reject", w.paused)),
            ("session-items", lambda w: w.api.get(url("session-items", "chat"))),
            ("usage", lambda w: w.api.get(url("usage"))),
        )
    ),
    # --- openapi
    Recipe("openapi", 200, None, lambda w, s: w.anonymous.get(url("openapi"))),
]


def _over_the_budget(w: World, settings: Any) -> Any:
    settings.AGENTIC_DJANGO_BUDGETS = {"user_cost": "0"}  # nothing to spend: no new run
    return post_json(w.api, CREATE, {"input": "hi"})


def _stream(client: Client, run_id: Any) -> Any:
    """A finished run's whole stream (it ends by itself)."""
    from asgiref.sync import async_to_sync

    response = client.get(url("run-stream", run_id))

    async def read() -> bytes:
        return b"".join([chunk async for chunk in response.streaming_content])

    response.body = async_to_sync(read)()
    assert b"event: end" in response.body
    return response


def _stream_after_its_end(client: Client, run_id: Any) -> Any:
    """The stream of a finished run, reconnecting with the id of the end it got."""
    end_id = re.search(r"event: end\nid: (\S+)", _stream(client, run_id).body.decode())[1]
    return client.get(url("run-stream", run_id), headers={"Last-Event-ID": end_id})


def _decide(client: Client, name: str, run: Any, body: Any = None) -> Any:
    run_id = getattr(run, "id", run)
    return post_json(client, url(name, run_id), {"call_id": "call-1"} if body is None else body)


def _decide_twice(w: World) -> Any:
    assert _decide(w.api, "run-approve", w.paused).status_code == 200
    # The run went on meanwhile; the call stays decided.
    AgentRun.objects.filter(pk=w.paused.pk).update(status="awaiting_approval")
    return _decide(w.api, "run-approve", w.paused)


def _decide_too_late(w: World, name: str) -> Any:
    from datetime import timedelta

    from django.db.models.functions import Now

    AgentRun.objects.filter(pk=w.paused.pk).update(approval_expires_at=Now() - timedelta(seconds=1))
    return _decide(w.api, name, w.paused)


def _database_down(w: World, call: Callable[[World], Any]) -> Any:
    from django.db import OperationalError

    with database_faults() as faults:
        faults.fail(r".", OperationalError("could not connect to server"), times=float("inf"))
        return call(w)


def _over_the_rate_limit(w: World, settings: Any) -> Any:
    existing = AgentRun.objects.filter(owner=w.finished.owner).count()
    settings.AGENTIC_DJANGO_RATE_LIMIT = f"{existing + 1}/h"
    assert post_json(w.api, CREATE, {"input": "first"}).status_code == 201
    return post_json(w.api, CREATE, {"input": "second"})


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: recipe.id)
def test_each_response_matches_the_description(world, settings, recipe):
    response = recipe.call(world, settings)

    assert response.status_code == recipe.status, response.content[:500]
    assert spec.response_problems(recipe.operation, response) == []
    if recipe.code is None:
        return
    if recipe.htmx_error:
        assert f'data-code="{recipe.code}"' in response.content.decode()
        assert 'class="agentic-error"' in response.content.decode()
    else:
        assert response.json()["error"]["code"] == recipe.code


def test_every_documented_status_is_produced_by_a_real_request():
    produced = {(recipe.operation, recipe.status) for recipe in RECIPES}
    assert produced == spec.documented_statuses()


def test_every_documented_error_code_is_answered_by_some_request():
    # method_not_allowed is answered by test_undocumented_methods_are_405_with_allow.
    produced = {recipe.code for recipe in RECIPES if recipe.code} | {"method_not_allowed"}
    assert produced == set(ERROR_CODES)


def _documented_path(pattern: URLPattern) -> str:
    return "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", str(pattern.pattern))


def test_the_description_lists_exactly_the_routes():
    routes = {_documented_path(pattern) for pattern in urls.urlpatterns}
    assert routes == set(spec.spec()["paths"])
    for pattern in urls.urlpatterns:
        path = _documented_path(pattern)
        names = set(re.findall(r"{(\w+)}", path))
        for operation in spec.spec()["paths"][path].values():
            documented = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert documented == names, path


def _sample_path(path: str, world: World) -> str:
    return "/agents" + path.format(run_id=world.finished.id, session_key="chat")


def test_the_description_lists_exactly_the_methods_each_route_answers(world):
    for path, item in spec.spec()["paths"].items():
        answered = {
            method
            for method in METHODS
            if getattr(world.api, method)(_sample_path(path, world)).status_code != 405
        }
        assert answered == set(item), path


def test_undocumented_methods_are_405_with_allow(world):
    for path, item in spec.spec()["paths"].items():
        for method in set(METHODS) - set(item):
            response = getattr(world.api, method)(_sample_path(path, world))
            assert response.status_code == 405, (method, path)
            assert set(response["Allow"].replace(" ", "").split(",")) == {m.upper() for m in item}
            if path != "/openapi.json" and method != "head":
                assert response.json()["error"]["code"] == "method_not_allowed"
                assert (
                    spec.schema_errors({"$ref": "#/components/schemas/Error"}, response.json())
                    == []
                )


def test_the_description_is_served_and_is_valid_openapi_3_1(client):
    response = client.get(url("openapi"))

    assert response.status_code == 200
    served = response.json()
    assert served == json.loads(json.dumps(build_spec(server_url="/agents/")))
    assert served["openapi"].startswith("3.1.")
    for schema in served["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    # Every $ref points at a schema that exists.
    refs = set(re.findall(r'"\$ref": "#/components/schemas/(\w+)"', json.dumps(served)))
    assert refs <= set(served["components"]["schemas"])
    loaded = schemathesis.openapi.from_dict(served)
    assert [result.ok().label for result in loaded.get_all_operations()]
