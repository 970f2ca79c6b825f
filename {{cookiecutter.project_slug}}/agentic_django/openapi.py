"""OpenAPI 3.1 description of the agentic_django HTTP API, built from the live settings.

``build_spec()`` returns the document as a dict; ``openapi_view`` serves it as JSON. Limits in
the schemas (page size, session key length, input items) come from the same constants and
settings the views enforce, and ``tests/reliability/test_openapi_sync.py`` keeps the two in step.
"""

from __future__ import annotations

import contextlib
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET

from agentic_django.conf import ALLOWED_RUN_OPTIONS, MULTITASK_STRATEGIES, get_config
from agentic_django.exceptions import AgentRegistryError
from agentic_django.http import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from agentic_django.models import AgentRun
from agentic_django.registry import get_registry
from agentic_django.validation import MAX_SESSION_KEY_LENGTH

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1"
JSON = "application/json"
HTML = "text/html"
FORM = "application/x-www-form-urlencoded"
# A run stream's event ids (agentic_django.streams.Position).
EVENT_ID_PATTERN = r"^\d+(:\d+:\d+(:end)?)?$"
# Paging parameters longer than 18 digits are rejected (agentic_django.http).
MAX_CURSOR = 10**18 - 1
# US dollars as a string (JSON numbers would round them to floats).
DOLLARS = {"type": "string", "pattern": r"^\d+(\.\d+)?$", "description": "US dollars."}
USER_CAPS = ["user_cost", "user_tokens"]

# Every `error.code` the endpoints answer with; a new one must be documented here.
ERROR_CODES = (
    "approval_already_decided",
    "approval_expired",
    "approval_not_found",
    "budget_exceeded",
    "conversation_busy",
    "database_unavailable",
    "input_too_large",
    "invalid_after",
    "invalid_agent_key",
    "invalid_always",
    "invalid_call_id",
    "invalid_json",
    "invalid_limit",
    "invalid_message",
    "invalid_multitask_strategy",
    "invalid_request",
    "invalid_run_id",
    "invalid_run_input",
    "invalid_run_options",
    "invalid_session_key",
    "invalid_text",
    "method_not_allowed",
    "missing_input",
    "not_authenticated",
    "not_found",
    "rate_limited",
    "run_not_awaiting_approval",
    "run_not_cancellable",
    "too_many_input_items",
    "unknown_agent",
    "unknown_field",
)

ERROR_DESCRIPTIONS = {
    400: "The request is not valid (malformed id, body, field or paging parameter).",
    401: "Not logged in (API clients). htmx gets 200 with `HX-Redirect` to the login page.",
    402: "The user's budget for the period is used up (`error.reason`: the cap reached): no new "
    "run starts before `error.resets_at`; retry after `Retry-After` seconds.",
    403: "CSRF verification failed: send the `csrftoken` cookie and its `X-CSRFToken` header.",
    404: "No such run or session among the current user's: another user's ids are 404 too.",
    409: "Nothing changed: the run already finished (cancel), the tool call was decided "
    "already or the run is not waiting for approval (approve, reject), or the conversation "
    "has a run in progress and `multitask_strategy` is `reject` (create: `error.run_id`).",
    410: "Too late: the run waited past its approval deadline and is now failed (approve, reject).",
    413: "The input is larger than the byte limit or has too many items.",
    429: "The user created too many runs recently; retry after `Retry-After` seconds.",
    503: "The database is unreachable; retry after `Retry-After` seconds.",
}

MULTITASK_DESCRIPTION = (
    "What this run does to the conversation's runs in progress: `enqueue` waits for them, "
    "`reject` answers 409, `interrupt` stops them after their current step (they keep their "
    "partial output), `rollback` stops them at once and deletes their history. Empty or "
    "absent: the `AGENTIC_DJANGO_MULTITASK_STRATEGY` setting."
)
HTMX_LOGIN_REDIRECT = "without a session, an empty body with `HX-Redirect` to the login page."
LOGIN_REDIRECT = {
    "description": "Anonymous browser navigation (`Accept: text/html`): redirect to the login page."
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(properties: dict[str, Any], *, required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


def _timestamp() -> dict[str, Any]:
    return {"type": "string", "format": "date-time"}


def _agent_key() -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "description": "A key of the agent registry."}
    # A broken registry still gets a description; creating runs reports the misconfiguration.
    with contextlib.suppress(AgentRegistryError):
        schema["enum"] = sorted(get_registry())
    return schema


def _schemas() -> dict[str, Any]:
    config = get_config()
    counter = {"type": "integer", "minimum": 0}
    return {
        "Error": _obj(
            {
                "error": _obj(
                    {
                        "code": {"type": "string", "enum": list(ERROR_CODES)},
                        "message": {"type": "string", "minLength": 1},
                        "run_id": {
                            "type": "string",
                            "format": "uuid",
                            "description": "`conversation_busy`: the run in progress.",
                        },
                        "reason": {
                            "type": "string",
                            "enum": USER_CAPS,
                            "description": "`budget_exceeded`: the cap that is reached.",
                        },
                        "resets_at": {
                            **_timestamp(),
                            "description": "`budget_exceeded`: when the period starts anew.",
                        },
                    },
                    required=["code", "message"],
                )
            }
        ),
        "Usage": _obj(
            {
                "calls": {**counter, "description": "Model calls in the ledger."},
                "requests": counter,
                "input_tokens": counter,
                "output_tokens": counter,
                "cached_tokens": counter,
                "reasoning_tokens": counter,
                "total_tokens": counter,
                "cost": {
                    **DOLLARS,
                    "description": "US dollars, of the calls whose price is known.",
                },
                "cost_known": {
                    "type": "boolean",
                    "description": "False if some call's price is unknown: then `cost` is a "
                    "lower bound.",
                },
                "unpriced_calls": counter,
            }
        ),
        "Span": _obj(
            {
                "span_id": {"type": "string"},
                "parent_id": _nullable({"type": "string"}),
                "trace_id": {"type": "string"},
                "attempt": {"type": "integer", "minimum": 1},
                "kind": {
                    "type": "string",
                    "description": "`trace` (one attempt, or one part after an approval), "
                    "`task`, `agent`, `turn`, `generation` or `response` (a model call), "
                    "`function` (a tool call), `handoff`, `guardrail`, `custom`, ...",
                },
                "name": {"type": "string"},
                "started_at": _timestamp(),
                "ended_at": _nullable(_timestamp()),
                "duration_ms": _nullable({"type": "number", "minimum": 0}),
                "data": {
                    "type": "object",
                    "description": "What the span recorded; inputs and outputs only while "
                    "AGENTIC_DJANGO_TRACING keeps sensitive data.",
                },
                "error": _nullable({"type": "object"}),
            }
        ),
        "Trace": _obj(
            {
                "run_id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": list(AgentRun.Status.values)},
                "attempts": {"type": "integer", "minimum": 0},
                "spans": {
                    "type": "array",
                    "items": _ref("Span"),
                    "description": "Each trace in order, its spans depth first.",
                },
                "truncated": {"type": "boolean"},
            }
        ),
        "Spending": _obj(
            {
                "period": {"type": "string", "enum": ["day", "month"]},
                "period_start": _timestamp(),
                "resets_at": _timestamp(),
                "limits": _obj(
                    {
                        "cost": _nullable(DOLLARS),
                        "tokens": _nullable({"type": "integer", "minimum": 1}),
                    }
                ),
                "spent": _ref("Usage"),
                "warning": {
                    "type": "boolean",
                    "description": "At or past the soft threshold of a cap.",
                },
                "exceeded": _nullable({"type": "string", "enum": USER_CAPS}),
                "session": {
                    **_obj({"session_key": {"type": "string"}, "spent": _ref("Usage")}),
                    "description": "With `session_key`: all that conversation spent.",
                },
            },
            required=[
                "period",
                "period_start",
                "resets_at",
                "limits",
                "spent",
                "warning",
                "exceeded",
            ],
        ),
        "RunInput": {
            "description": "Text, or a list of Agents SDK input items."
            + (
                f" At most {config.max_input_bytes} bytes as JSON (else 413)."
                if config.max_input_bytes is not None
                else ""
            ),
            "anyOf": [
                {"type": "string", "minLength": 1, "pattern": r"\S"},
                {
                    "type": "array",
                    "items": {"type": "object"},
                    "minItems": 1,
                    **(
                        {"maxItems": config.max_input_items}
                        if config.max_input_items is not None
                        else {}
                    ),
                },
            ],
        },
        "Run": _obj(
            {
                "id": {"type": "string", "format": "uuid"},
                "session_key": {"type": "string"},
                "agent_key": {"type": "string"},
                "status": {"type": "string", "enum": list(AgentRun.Status.values)},
                "is_terminal": {"type": "boolean"},
                "input": {"description": "The input as submitted (text or items)."},
                "partial_output": _nullable(
                    {
                        "type": "string",
                        "description": "Text streamed before the run failed or was "
                        "cancelled mid-message (marked incomplete).",
                    }
                ),
                "final_output": {"description": "The agent's final output (any JSON), or null."},
                "error": _nullable(
                    {
                        "type": "string",
                        "description": "Why the run failed or was cancelled, or (while "
                        "`budget_exceeded`) the budget it waits for.",
                    }
                ),
                "usage": {
                    **_ref("Usage"),
                    "description": "What the run used, each model call once (retries included).",
                },
                "created_at": _timestamp(),
                "started_at": _nullable(_timestamp()),
                "finished_at": _nullable(_timestamp()),
                "cancel_requested": {"type": "boolean"},
                "approvals": {
                    "type": "array",
                    "items": _ref("Approval"),
                    "description": "The tool calls the run waits on (while awaiting_approval).",
                },
                "approval_expires_at": _nullable(_timestamp()),
                "attempt": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "How many times a worker started the run (retries add one).",
                },
                "last_response_id": _nullable({"type": "string"}),
            }
        ),
        "Approval": _obj(
            {
                "kind": {
                    "type": "string",
                    "enum": ["approval", "in_doubt"],
                    "description": "approval: may the tool run? in_doubt: the call started in "
                    "an attempt whose worker died before the tool returned, so it may or may "
                    "not have happened; approve runs it again, reject counts it as done with "
                    "`message` as its output, cancelling the run stops it.",
                },
                "call_id": {"type": "string"},
                "tool": {"type": "string"},
                "arguments": {"description": "The arguments the model gave (any JSON)."},
                "agent": _nullable({"type": "string"}),
                "requested_at": _timestamp(),
                "decision": {
                    "type": "string",
                    "enum": ["pending", "approved", "rejected", "expired"],
                },
            }
        ),
        "Decision": _obj(
            {
                "call_id": {"type": "string", "minLength": 1, "maxLength": 255},
                "always": {
                    "type": "boolean",
                    "description": "Decide every later call of this tool in the run the same way.",
                },
                "message": {
                    "type": "string",
                    "maxLength": 2000,
                    "description": "Rejections only: what the model is told.",
                },
            },
            required=["call_id"],
        ),
        "DecisionForm": {
            "type": "object",
            "properties": {
                "call_id": {"type": "string", "minLength": 1, "maxLength": 255},
                "always": {"type": "string", "enum": ["on", "true", "1", ""]},
                "message": {"type": "string", "maxLength": 2000},
            },
            "required": ["call_id"],
        },
        "RunCreate": _obj(
            {
                "input": _ref("RunInput"),
                "session_key": _nullable(
                    {
                        "type": "string",
                        "maxLength": MAX_SESSION_KEY_LENGTH,
                        "pattern": r"^$|\S",
                        "description": "The conversation; empty or absent starts a new one.",
                    }
                ),
                "agent_key": {
                    "anyOf": [_agent_key(), {"const": ""}, {"type": "null"}],
                    "description": "Empty or null: the default agent.",
                },
                "run_options": _nullable(
                    {
                        "type": "object",
                        "properties": {
                            "max_turns": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": config.max_turns,
                            }
                        },
                        "additionalProperties": False,
                        "description": "Allowed keys: " + ", ".join(sorted(ALLOWED_RUN_OPTIONS)),
                    }
                ),
                "multitask_strategy": _nullable(
                    {
                        "type": "string",
                        "enum": ["", *MULTITASK_STRATEGIES],
                        "description": MULTITASK_DESCRIPTION,
                    }
                ),
            },
            required=["input"],
        ),
        "RunCreateForm": {
            "type": "object",
            "properties": {
                "input": {"type": "string", "minLength": 1, "pattern": r"\S"},
                "session_key": {
                    "type": "string",
                    "maxLength": MAX_SESSION_KEY_LENGTH,
                    "pattern": r"^$|\S",
                },
                "agent_key": {"anyOf": [_agent_key(), {"const": ""}]},
                "multitask_strategy": {
                    "type": "string",
                    "enum": ["", *MULTITASK_STRATEGIES],
                    "description": MULTITASK_DESCRIPTION,
                },
                "next": {
                    "type": "string",
                    "description": "A path on this site to redirect to (302); else ignored.",
                },
            },
            "required": ["input"],
        },
        "Event": _obj(
            {
                "sequence": {"type": "integer", "minimum": 1},
                "attempt": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "The attempt that wrote it; only the run's current "
                    "attempt's events are listed.",
                },
                "type": {"type": "string"},
                "payload": {"description": "Event details (any JSON)."},
                "created_at": _timestamp(),
            }
        ),
        "EventPage": _obj(
            {
                "run_id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": list(AgentRun.Status.values)},
                "events": {"type": "array", "items": _ref("Event"), "maxItems": MAX_PAGE_SIZE},
                "next_after": {"type": "integer", "minimum": 0},
                "has_more": {"type": "boolean"},
            }
        ),
        "Session": _obj(
            {
                "session_key": {"type": "string"},
                "metadata": {"type": "object"},
                "created_at": _timestamp(),
                "updated_at": _timestamp(),
            }
        ),
        "Item": _obj(
            {
                "sequence": {"type": "integer", "minimum": 0},
                "payload": {"description": "One Agents SDK input item."},
                "run_id": _nullable({"type": "string", "format": "uuid"}),
                "created_at": _timestamp(),
            }
        ),
        "ItemPage": _obj(
            {
                "session": _ref("Session"),
                "items": {"type": "array", "items": _ref("Item"), "maxItems": MAX_PAGE_SIZE},
                "next_after": {"type": "integer", "minimum": 0},
                "has_more": {"type": "boolean"},
            }
        ),
    }


def _error(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERROR_DESCRIPTIONS[status],
        "content": {
            JSON: {"schema": _ref("Error")},
            HTML: {"schema": {"type": "string", "description": "htmx: a visible error fragment."}},
        },
    }
    if status == 403:
        response["content"] = {HTML: {"schema": {"type": "string"}}}
    if status in (402, 429, 503):
        response["headers"] = {
            "Retry-After": {"schema": {"type": "integer", "minimum": 1}, "required": True}
        }
    return response


def _errors(*statuses: int) -> dict[str, Any]:
    """Error answers: 400, 401 and 503 (database unreachable) on every endpoint, plus these."""
    return {str(status): _error(status) for status in sorted({400, 401, 503, *statuses})}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref(schema)}}}


def _ok(schema: str, description: str, *, htmx: str = HTMX_LOGIN_REDIRECT) -> dict[str, Any]:
    """200: JSON for API clients; HTML for htmx (``htmx`` says what it holds)."""
    return {
        "description": f"{description} htmx: {htmx}",
        "content": {JSON: {"schema": _ref(schema)}, HTML: {"schema": {"type": "string"}}},
    }


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {HTML: {"schema": {"type": "string"}}}}


def _page_parameters() -> list[dict[str, Any]]:
    return [
        {
            "name": "after",
            "in": "query",
            "description": "Return entries whose sequence is greater than this.",
            "schema": {"type": "integer", "minimum": 0, "maximum": MAX_CURSOR, "default": 0},
        },
        {
            "name": "limit",
            "in": "query",
            "description": f"Page size, capped at {MAX_PAGE_SIZE}.",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_CURSOR,
                "default": DEFAULT_PAGE_SIZE,
            },
        },
    ]


HTMX_HEADER = {
    "name": "HX-Request",
    "in": "header",
    "description": "`true` when sent by htmx: answers become HTML fragments, errors included.",
    "schema": {"type": "string"},
}
RUN_ID = {
    "name": "run_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
SESSION_KEY = {
    "name": "session_key",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_SESSION_KEY_LENGTH},
}
# Django's CSRF protection is double-submit: the cookie and the same token in the header.
WRITE_SECURITY = [{"sessionCookie": [], "csrfCookie": [], "csrfHeader": []}]


def _decision_path(operation_id: str, summary: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "description": "Owner only. The first decision on a call counts; a second is 409, "
            "one after the run's approval deadline 410 (the run fails as expired). Once no call "
            "is pending, the run is queued again and goes on.",
            "security": WRITE_SECURITY,
            "parameters": [RUN_ID, HTMX_HEADER],
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {"schema": _ref("Decision")},
                    FORM: {"schema": _ref("DecisionForm")},
                },
            },
            "responses": {
                "200": _ok("Run", "The run.", htmx="the run fragment."),
                "302": LOGIN_REDIRECT,
                **_errors(400, 403, 404, 409, 410),
            },
        }
    }


def _paths() -> dict[str, Any]:
    return {
        "/runs/": {
            "post": {
                "operationId": "run-create",
                "summary": "Create a run on one of the user's sessions and queue it",
                "security": WRITE_SECURITY,
                "parameters": [HTMX_HEADER],
                "requestBody": {
                    "required": True,
                    "content": {
                        JSON: {"schema": _ref("RunCreate")},
                        FORM: {"schema": _ref("RunCreateForm")},
                    },
                },
                "responses": {
                    "200": _html(
                        "htmx: the run fragment (with `HX-Trigger: run-update`), or "
                        + HTMX_LOGIN_REDIRECT
                    ),
                    "201": {
                        **_json("Run", "The new run."),
                        "headers": {
                            "Location": {
                                "schema": {"type": "string"},
                                "required": True,
                                "description": "The run's detail URL.",
                            }
                        },
                    },
                    "302": {"description": "Form post with a local-path `next`: redirect there."},
                    **_errors(402, 403, 409, 413, 429),
                },
            }
        },
        "/runs/{run_id}/": {
            "get": {
                "operationId": "run-detail",
                "summary": "A run's status, output, error and usage",
                "parameters": [RUN_ID, HTMX_HEADER],
                "responses": {"200": _ok("Run", "The run."), "302": LOGIN_REDIRECT, **_errors(404)},
            }
        },
        "/runs/{run_id}/fragment/": {
            "get": {
                "operationId": "run-fragment",
                "summary": "The run as an HTML fragment, for htmx polling",
                "parameters": [
                    RUN_ID,
                    HTMX_HEADER,
                    {
                        "name": "v",
                        "in": "query",
                        "description": "The version last shown: 204 while it is unchanged.",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _html("The run fragment."),
                    "204": {"description": "Nothing changed since version `v`: keep polling."},
                    "286": _html("htmx: the finished run's fragment; htmx stops polling."),
                    "302": LOGIN_REDIRECT,
                    **_errors(404),
                },
            }
        },
        "/runs/{run_id}/inspect/": {
            "get": {
                "operationId": "run-inspect",
                "summary": "The run inspector: a timeline of what the run did (HTML page)",
                "description": "For the run's owner, and for staff allowed to view runs.",
                "parameters": [RUN_ID],
                "responses": {
                    "200": _html("The inspector page."),
                    "302": LOGIN_REDIRECT,
                    **_errors(404),
                },
            }
        },
        "/runs/{run_id}/trace/": {
            "get": {
                "operationId": "run-trace",
                "summary": "The run's stored trace: every step of every attempt",
                "parameters": [RUN_ID],
                "responses": {
                    "200": _json("Trace", "The run's spans."),
                    "302": LOGIN_REDIRECT,
                    **_errors(404),
                },
            }
        },
        "/runs/{run_id}/events/": {
            "get": {
                "operationId": "run-events",
                "summary": "A page of the run's persisted events",
                "parameters": [RUN_ID, *_page_parameters(), HTMX_HEADER],
                "responses": {
                    "200": _ok("EventPage", "Events after `after`, oldest first."),
                    "302": LOGIN_REDIRECT,
                    **_errors(404),
                },
            }
        },
        "/runs/{run_id}/stream/": {
            "get": {
                "operationId": "run-stream",
                "summary": "The run's events and streamed text as server-sent events",
                "description": (
                    "Events: `event` (a run event, as in run-events; id `<sequence>`), "
                    '`delta` (`{"text": ...}` of the assistant message streaming in; id '
                    "`<sequence>:<offset>:<epoch>`), `reset` (the run was retried: what came "
                    'after the id is void), `end` (`{"status", "error"}`: finished or '
                    "paused; the stream closes; id `<sequence>:<offset>:<epoch>:end`). "
                    "Reconnect with `Last-Event-ID` (or `?after=`) to get exactly what was "
                    "missed: after the `end` of a finished run, nothing (204). Comments keep "
                    "an idle connection alive; a connection lasts at most a few minutes."
                ),
                "parameters": [
                    RUN_ID,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "schema": {"type": "string", "pattern": EVENT_ID_PATTERN},
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "description": "As Last-Event-ID, for clients that cannot set it.",
                        "schema": {"type": "string", "pattern": EVENT_ID_PATTERN},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The stream.",
                        "content": {
                            "text/event-stream": {
                                "schema": {
                                    "description": "One server-sent event.",
                                    "type": "object",
                                    "properties": {
                                        "event": {"type": "string"},
                                        "data": {
                                            "type": "string",
                                            "contentMediaType": JSON,
                                        },
                                        "id": {"type": "string", "pattern": EVENT_ID_PATTERN},
                                        "retry": {"type": "integer", "minimum": 0},
                                    },
                                }
                            }
                        },
                    },
                    "204": {
                        "description": "The client got the end of the finished run (its "
                        "`Last-Event-ID` is the `end`'s): nothing more will come."
                    },
                    **_errors(404),
                },
            }
        },
        "/runs/{run_id}/approve/": _decision_path(
            "run-approve", "Approve a tool call the paused run waits on"
        ),
        "/runs/{run_id}/reject/": _decision_path(
            "run-reject", "Reject a tool call the paused run waits on (`message` to the model)"
        ),
        "/runs/{run_id}/cancel/": {
            "post": {
                "operationId": "run-cancel",
                "summary": "Cancel a pending run, or ask a running one to stop",
                "security": WRITE_SECURITY,
                "parameters": [RUN_ID, HTMX_HEADER],
                "responses": {
                    "200": _ok("Run", "The run.", htmx="the run fragment."),
                    "302": LOGIN_REDIRECT,
                    **_errors(403, 404, 409),
                },
            }
        },
        "/sessions/{session_key}/items/": {
            "get": {
                "operationId": "session-items",
                "summary": "A page of the conversation's items",
                "parameters": [SESSION_KEY, *_page_parameters(), HTMX_HEADER],
                "responses": {
                    "200": _ok(
                        "ItemPage", "Items after `after`.", htmx="the conversation as HTML."
                    ),
                    "302": LOGIN_REDIRECT,
                    **_errors(404),
                },
            }
        },
        "/usage/": {
            "get": {
                "operationId": "usage",
                "summary": "The user's spending this period against their budget",
                "parameters": [
                    {
                        "name": "session_key",
                        "in": "query",
                        "description": "Also what this conversation of the user spent.",
                        "schema": {"type": "string", "maxLength": MAX_SESSION_KEY_LENGTH},
                    },
                    HTMX_HEADER,
                ],
                "responses": {
                    "200": _ok(
                        "Spending",
                        "Spending and caps.",
                        htmx="the spend meter (empty without a user cap).",
                    ),
                    "302": LOGIN_REDIRECT,
                    **_errors(404),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This description",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document.",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


def _csrf_header() -> str:
    # CSRF_HEADER_NAME is a WSGI META key such as HTTP_X_CSRFTOKEN.
    name = settings.CSRF_HEADER_NAME.removeprefix("HTTP_")
    return "X-CSRFToken" if name == "X_CSRFTOKEN" else name.replace("_", "-").title()


def build_spec(*, server_url: str = "/agents/") -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API mounted at ``server_url``."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "agentic_django API",
            "version": API_VERSION,
            "description": (
                "Runs of agents on the logged-in user's conversations. Authenticate with the "
                "session cookie; unsafe methods also need the CSRF token in `X-CSRFToken`. "
                'Errors are `{"error": {"code": ..., "message": ...}}` (HTML fragments for '
                "htmx). Other HTTP methods than the documented ones answer 405 with `Allow`."
            ),
        },
        "servers": [{"url": server_url}],
        "security": [{"sessionCookie": []}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "sessionCookie": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": settings.SESSION_COOKIE_NAME,
                },
                "csrfCookie": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": settings.CSRF_COOKIE_NAME,
                },
                "csrfHeader": {"type": "apiKey", "in": "header", "name": _csrf_header()},
            },
        },
    }


@csrf_exempt  # read-only: unsafe methods get a plain 405, not a CSRF 403
@require_GET
def openapi_view(request: HttpRequest) -> HttpResponse:
    """Serve the description with the URL prefix this app is mounted at."""
    server_url = request.path.removesuffix("openapi.json")
    return JsonResponse(build_spec(server_url=server_url), json_dumps_params={"indent": 2})
