"""HTTP endpoints of agentic_django (namespace ``agents``): parse, call a service, render.

Every lookup is scoped to ``request.user``, so another user's ids are 404. JSON clients get
JSON, htmx gets HTML fragments (errors included) and run-update triggers.
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import RequestDataTooBig
from django.db import transaction
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseRedirect,
    JsonResponse,
    StreamingHttpResponse,
)
from django.http.request import RawPostDataException
from django.shortcuts import render
from django.template.loader import render_to_string
from django.urls import reverse
from django_htmx.http import HttpResponseStopPolling, trigger_client_event

from agentic_django import inspector, services
from agentic_django.conf import get_config
from agentic_django.events import visible_events
from agentic_django.exceptions import (
    ApprovalAlreadyDecided,
    ApprovalExpired,
    ApprovalNotFound,
    RunNotAwaitingApproval,
    RunNotCancellable,
)
from agentic_django.http import (
    TOO_MANY_FIELDS,
    TOO_MANY_FIELDS_ERRORS,
    ApiError,
    api_view,
    error_response,
    is_htmx,
    json_error,
    parse_page,
    safe_next_url,
)
from agentic_django.models import AgentRun, AgentSession
from agentic_django.presentation import (
    DetailedRun,
    PolledRun,
    conversation,
    detailed_run,
    polled_run,
    run_version,
    run_view,
    spend_meter,
)
from agentic_django.ratelimit import enforce_rate_limit
from agentic_django.recovery import recover_if_stuck
from agentic_django.serializers import (
    event_to_dict,
    item_to_dict,
    run_to_dict,
    session_to_dict,
    spending_to_dict,
    totals_to_dict,
)
from agentic_django.streams import Position, seen_to_the_end
from agentic_django.streams import run_events as stream_events
from agentic_django.usage import session_totals, standing
from agentic_django.validation import MAX_SESSION_KEY_LENGTH, is_storable_text

RUN_FRAGMENT_TEMPLATE = "agentic_django/partials/run_fragment.html"
CONVERSATION_TEMPLATE = "agentic_django/partials/conversation.html"
USAGE_TEMPLATE = "agentic_django/partials/usage.html"
INSPECTOR_TEMPLATE = "agentic_django/inspector.html"
RUN_UPDATE_EVENT = "run-update"
CREATE_FIELDS = frozenset(
    {"input", "session_key", "agent_key", "run_options", "multitask_strategy"}
)
# Reject absurd bodies before parsing them; the precise limit is MAX_INPUT_BYTES (413 too).
BODY_OVERHEAD_BYTES = 64 * 1024


def _run_pk(run_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(run_id)
    except ValueError:
        raise ApiError(400, "invalid_run_id", "The run id is not a valid UUID.") from None


def _owned_run(request: HttpRequest, run_id: str, *, staff_may_view: bool = False) -> AgentRun:
    """The user's run (``staff_may_view``: or any run, for staff allowed to view runs)."""
    run = AgentRun.objects.select_related("session").filter(pk=_run_pk(run_id)).first()
    if run is None:
        raise ApiError(404, "not_found", "No such run.")
    if run.owner_id != request.user.pk and not (staff_may_view and _views_any_run(request)):
        raise ApiError(404, "not_found", "No such run.")
    return run


def _views_any_run(request: HttpRequest) -> bool:
    """Staff allowed to view runs: they see any run's inspector, and the agents' instructions
    in it (a run's owner sees the rest of what their own runs did)."""
    return request.user.is_staff and request.user.has_perm("agentic_django.view_agentrun")


def _polled_run(request: HttpRequest, run_id: str) -> PolledRun:
    polled = polled_run(_run_pk(run_id), request.user.pk)
    if polled is None:
        raise ApiError(404, "not_found", "No such run.")
    return polled


def _owned_session(request: HttpRequest, session_key: str) -> AgentSession:
    if len(session_key) > MAX_SESSION_KEY_LENGTH:
        raise ApiError(400, "invalid_session_key", "The session key is too long.")
    if not is_storable_text(session_key):
        raise ApiError(404, "not_found", "No such session.")  # no stored key can match it
    session = AgentSession.objects.filter(owner=request.user, session_key=session_key).first()
    if session is None:
        raise ApiError(404, "not_found", "No such session.")
    return session


def _run_fragment(
    request: HttpRequest, run: AgentRun, *, status: int = 200, notice: str = ""
) -> HttpResponse:
    context = {"run": run, "view": run_view(run), "notice": notice}
    return render(request, RUN_FRAGMENT_TEMPLATE, context, status=status)


def _read_create_request(request: HttpRequest) -> dict[str, Any]:
    max_bytes = get_config().max_input_bytes
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ApiError(400, "invalid_request", "The Content-Length header is not valid.") from None
    if max_bytes is not None and length > max_bytes * 4 + BODY_OVERHEAD_BYTES:
        raise ApiError(413, "input_too_large", "The request body is too large.")
    try:
        return _parse_create_request(request)
    except RequestDataTooBig:
        # Django's own cap (DATA_UPLOAD_MAX_MEMORY_SIZE) still applies without ours.
        raise ApiError(413, "input_too_large", "The request body is too large.") from None


def _parse_create_request(request: HttpRequest) -> dict[str, Any]:
    if request.content_type == "application/json":
        try:
            data = json.loads(request.body or b"null")
        except (ValueError, RawPostDataException):
            raise ApiError(400, "invalid_json", "The body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_json", "The body must be a JSON object.")
        unknown = sorted(set(data) - CREATE_FIELDS)
        if unknown:
            raise ApiError(400, "unknown_field", f"Unknown field(s): {', '.join(unknown)}.")
        return data
    # Form fields are text: the message is taken literally, never parsed as JSON.
    data = {
        name: request.POST[name]
        for name in ("input", "session_key", "agent_key", "multitask_strategy")
        if name in request.POST
    }
    if not data.get("agent_key"):
        data.pop("agent_key", None)
    return data


def _check_types(data: dict[str, Any]) -> None:
    if "input" not in data:
        raise ApiError(400, "missing_input", "The `input` field is required.")
    for name in ("session_key", "agent_key", "multitask_strategy"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise ApiError(400, f"invalid_{name}", f"`{name}` must be a string.")


@api_view("POST")
def run_create(request: HttpRequest) -> HttpResponse:
    """Create a run on one of the user's sessions (JSON body or form) and enqueue it."""
    data = _read_create_request(request)
    _check_types(data)
    session_key = data.get("session_key") or uuid.uuid4().hex
    with transaction.atomic():
        enforce_rate_limit(request.user)
        run = services.create_run(
            owner=request.user,
            session_key=session_key,
            input_payload=data["input"],
            agent_key=data.get("agent_key"),
            run_options=data.get("run_options"),
            multitask_strategy=data.get("multitask_strategy"),
        )
    # With an in-process task backend the run may already have finished (or been deleted
    # with its conversation, in the admin, as it was created).
    try:
        run.refresh_from_db()
    except AgentRun.DoesNotExist:
        raise ApiError(404, "not_found", "No such run.") from None
    if is_htmx(request):
        return trigger_client_event(_run_fragment(request, run), RUN_UPDATE_EVENT)
    if request.content_type != "application/json":
        next_url = safe_next_url(request, request.POST.get("next"))
        if next_url:
            # Not redirect(): it would try a bare word such as "chat" as a URL name.
            return HttpResponseRedirect(next_url)
    response = JsonResponse(run_to_dict(run), status=201)
    response["Location"] = reverse("agents:run-detail", args=[run.id])
    return response


@api_view("GET")
def run_detail(request: HttpRequest, run_id: str) -> HttpResponse:
    """The run's status, output, error and usage as JSON.

    One query reads the user's run (the columns the JSON shows), its session key and its usage
    totals, so a poll costs the request's session and user lookups plus one statement (and one
    more for the tool calls a paused run waits on)."""
    found = _detailed_run(request, run_id)
    if recover_if_stuck(found.run):
        found = _detailed_run(request, run_id)
    body = run_to_dict(found.run, session_key=found.session_key, used=found.usage)
    return JsonResponse(body)


def _detailed_run(request: HttpRequest, run_id: str) -> DetailedRun:
    found = detailed_run(_run_pk(run_id), request.user.pk)
    if found is None:
        raise ApiError(404, "not_found", "No such run.")
    return found


@api_view("GET")
def run_fragment(request: HttpRequest, run_id: str) -> HttpResponse:
    """The run as an HTML fragment for htmx polling; 286 (stop polling) once it finished.

    One query reads the run, the count of its items, their payloads and its usage, so a poll
    costs the request's session and user lookups plus one statement; a steady poll (``v`` = the
    version the page shows) answers 204 without decoding the items or rendering anything."""
    polled = _polled_run(request, run_id)
    if recover_if_stuck(polled.run):
        polled = _polled_run(request, run_id)
    run = polled.run
    if not run.is_terminal and request.GET.get("v") == run_version(run, polled.item_count):
        return HttpResponse(status=204)  # unchanged: htmx keeps the element and polls again
    html = render_to_string(
        RUN_FRAGMENT_TEMPLATE,
        {"run": run, "view": run_view(run, polled.payloads, polled.usage)},
        request,
    )
    if not (run.is_terminal and is_htmx(request)):
        return HttpResponse(html)
    return trigger_client_event(HttpResponseStopPolling(html), RUN_UPDATE_EVENT)


@api_view("GET")
def run_inspect(request: HttpRequest, run_id: str) -> HttpResponse:
    """The run inspector: a timeline of what the run did, step by step (its owner, or staff
    allowed to view runs)."""
    run = _owned_run(request, run_id, staff_may_view=True)
    context = {
        "run": run,
        "inspection": inspector.inspect(run, instructions=_views_any_run(request)),
        "back_url": safe_next_url(request, request.GET.get("next") or _referrer(request)),
    }
    return render(request, INSPECTOR_TEMPLATE, context)


def _referrer(request: HttpRequest) -> str | None:
    """The page of this site the user came from, as a path (a link back to it)."""
    parts = urlsplit(request.META.get("HTTP_REFERER", ""))
    if parts.netloc != request.get_host():
        return None
    return parts.path + (f"?{parts.query}" if parts.query else "")


@api_view("GET")
def run_trace(request: HttpRequest, run_id: str) -> HttpResponse:
    """The run's stored trace as JSON: every span (each attempt a trace of its own) and the
    approvals it asked for."""
    run = _owned_run(request, run_id)
    inspection = inspector.inspect(run, instructions=_views_any_run(request))
    return JsonResponse(
        {
            "run_id": str(run.id),
            "status": run.status,
            "attempts": run.attempt,
            "spans": [
                inspector.span_to_dict(step)
                for section in inspection.sections
                for step in section.steps
            ],
            "truncated": inspection.truncated,
        }
    )


@api_view("GET")
def run_events(request: HttpRequest, run_id: str) -> HttpResponse:
    """Events of the run after the ``after`` sequence, at most ``limit`` (capped) per page."""
    run = _owned_run(request, run_id)
    after, limit = parse_page(request)
    events = list(visible_events(run).filter(sequence__gt=after).order_by("sequence")[: limit + 1])
    page = events[:limit]
    return JsonResponse(
        {
            "run_id": str(run.id),
            "status": run.status,
            "events": [event_to_dict(event) for event in page],
            "next_after": page[-1].sequence if page else after,
            "has_more": len(events) > limit,
        }
    )


@api_view("POST")
def run_cancel(request: HttpRequest, run_id: str) -> HttpResponse:
    """Cancel a pending run, or ask a running one to stop; 409 if it already finished."""
    run = _owned_run(request, run_id)
    try:
        run = services.cancel_run(run)
    except AgentRun.DoesNotExist:
        raise ApiError(404, "not_found", "No such run.") from None  # deleted meanwhile
    except RunNotCancellable as error:
        if not is_htmx(request):
            raise
        # Keep the finished run on screen and say why nothing was cancelled.
        run.refresh_from_db()
        response = _run_fragment(request, run, status=409, notice=error.message)
        return trigger_client_event(response, RUN_UPDATE_EVENT)
    if is_htmx(request):
        return trigger_client_event(_run_fragment(request, run), RUN_UPDATE_EVENT)
    return JsonResponse(run_to_dict(run))


DECISION_FIELDS = frozenset({"call_id", "always", "message"})
MAX_REJECTION_MESSAGE = 2000


def _read_decision(request: HttpRequest, *, with_message: bool) -> dict[str, Any]:
    """``call_id``, ``always`` and (rejections) ``message`` from a JSON body or a form."""
    if request.content_type == "application/json":
        try:
            data = json.loads(request.body or b"null")
        except ValueError:
            raise ApiError(400, "invalid_json", "The body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_json", "The body must be a JSON object.")
        allowed = DECISION_FIELDS if with_message else DECISION_FIELDS - {"message"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ApiError(400, "unknown_field", f"Unknown field(s): {', '.join(unknown)}.")
        always = data.get("always", False)
        if not isinstance(always, bool):
            raise ApiError(400, "invalid_always", "`always` must be true or false.")
    else:
        data = {name: request.POST.get(name) for name in DECISION_FIELDS if name in request.POST}
        always = data.get("always") in ("on", "true", "1")
    call_id, message = data.get("call_id"), data.get("message") or ""
    if not isinstance(call_id, str) or not call_id or len(call_id) > 255:
        raise ApiError(400, "invalid_call_id", "`call_id` must name the tool call to decide.")
    if not isinstance(message, str) or len(message) > MAX_REJECTION_MESSAGE:
        raise ApiError(
            400, "invalid_message", f"`message` must be text of at most {MAX_REJECTION_MESSAGE}."
        )
    if not is_storable_text(call_id) or not is_storable_text(message):
        raise ApiError(400, "invalid_text", "The request contains a NUL or an invalid character.")
    return {"call_id": call_id, "always": always, "message": message}


def _decide(request: HttpRequest, run_id: str, *, approve: bool) -> HttpResponse:
    run = _owned_run(request, run_id)
    decision = _read_decision(request, with_message=not approve)
    call_id, always = decision["call_id"], decision["always"]
    try:
        if approve:
            services.approve_tool_call(run, call_id, always=always, user=request.user)
        else:
            message = decision["message"]
            services.reject_tool_call(
                run, call_id, message=message, always=always, user=request.user
            )
    except (
        ApprovalAlreadyDecided,
        ApprovalExpired,
        RunNotAwaitingApproval,
        ApprovalNotFound,
    ) as error:
        if not is_htmx(request):
            raise
        # Keep the run on screen (as it is now) and say why nothing changed.
        run.refresh_from_db()
        response = _run_fragment(request, run, status=error.status_code, notice=error.message)
        return trigger_client_event(response, RUN_UPDATE_EVENT)
    run.refresh_from_db()
    if is_htmx(request):
        return trigger_client_event(_run_fragment(request, run), RUN_UPDATE_EVENT)
    return JsonResponse(run_to_dict(run))


@api_view("POST")
def run_approve(request: HttpRequest, run_id: str) -> HttpResponse:
    """Approve a tool call the paused run waits on; the run goes on once all are decided."""
    return _decide(request, run_id, approve=True)


@api_view("POST")
def run_reject(request: HttpRequest, run_id: str) -> HttpResponse:
    """Reject a tool call the paused run waits on (``message`` goes to the model)."""
    return _decide(request, run_id, approve=False)


async def run_stream(request: HttpRequest, run_id: str) -> HttpResponse:
    """The run's events and streamed text as server-sent events (see ``streams``)."""
    if request.method != "GET":
        response = json_error(405, "method_not_allowed", "Use GET for this endpoint.")
        response["Allow"] = "GET"
        return response
    user = await request.auser()
    if not user.is_authenticated:
        return json_error(401, "not_authenticated", "Log in to use this endpoint.")
    try:
        pk = uuid.UUID(run_id)
    except ValueError:
        return json_error(400, "invalid_run_id", "The run id is not a valid UUID.")
    if not await AgentRun.objects.filter(pk=pk, owner=user).aexists():
        return json_error(404, "not_found", "No such run.")
    try:
        given = [request.headers.get("Last-Event-ID"), request.GET.get("after")]
    except TOO_MANY_FIELDS_ERRORS:
        return error_response(request, TOO_MANY_FIELDS)
    positions = [Position.parse(raw) for raw in given if raw is not None]
    if None in positions:
        return json_error(400, "invalid_after", "Resume from an event id, e.g. 12 or 12:40:1.")
    # A reconnecting EventSource sends the header; the first connection may use the query.
    position = positions[0] if positions else Position()
    if await seen_to_the_end(pk, position):
        return HttpResponse(status=204)  # an EventSource stops reconnecting
    response = StreamingHttpResponse(stream_events(pk, position), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # proxies must pass each event on at once
    return response


run_stream.agentic_api = True  # type: ignore[attr-defined]  (see middleware.bad_request)


@api_view("GET")
def session_items(request: HttpRequest, session_key: str) -> HttpResponse:
    """The conversation: an HTML partial for htmx, else items as JSON (``after``/``limit``)."""
    session = _owned_session(request, session_key)
    if is_htmx(request):
        return render(request, CONVERSATION_TEMPLATE, conversation(session))
    after, limit = parse_page(request)
    items = list(session.items.filter(sequence__gt=after).order_by("sequence")[: limit + 1])
    page = items[:limit]
    return JsonResponse(
        {
            "session": session_to_dict(session),
            "items": [item_to_dict(item) for item in page],
            "next_after": page[-1].sequence if page else after,
            "has_more": len(items) > limit,
        }
    )


@api_view("GET")
def usage_summary(request: HttpRequest) -> HttpResponse:
    """The user's spending this period against their caps as JSON, with what one of their
    conversations spent if ``session_key`` names it; htmx gets the spend meter."""
    if is_htmx(request):
        return render(request, USAGE_TEMPLATE, {"meter": spend_meter(request.user)})
    session_key = request.GET.get("session_key")
    session = _owned_session(request, session_key) if session_key is not None else None
    body = spending_to_dict(standing(request.user))
    if session is not None:
        spent = totals_to_dict(session_totals(session.pk))
        body["session"] = {"session_key": session.session_key, "spent": spent}
    return JsonResponse(body)
