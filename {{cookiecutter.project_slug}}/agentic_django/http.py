"""HTTP plumbing of the agentic_django views: content negotiation, errors and authentication.

Three kinds of clients share the endpoints: HTMX (HTML fragments, errors as visible fragments),
browsers (full pages and login redirects) and API clients (JSON, errors as
``{"error": {"code": ..., "message": ...}}``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import TooManyFieldsSent, TooManyFilesSent
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render, resolve_url
from django.utils.http import url_has_allowed_host_and_scheme
from django_htmx.http import HttpResponseClientRedirect

from agentic_django.exceptions import AgenticDjangoError

logger = logging.getLogger(__name__)

ERROR_TEMPLATE = "agentic_django/partials/error.html"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

_TITLES = {
    400: "That request was not valid",
    401: "Please log in",
    402: "Budget reached",
    403: "Not allowed",
    404: "Not found",
    405: "Not supported",
    409: "Already done",
    413: "Too large",
    429: "Slow down",
    503: "Temporarily unavailable",
}
# Titles of errors whose status alone would mislead.
_CODE_TITLES = {"conversation_busy": "A reply is on its way"}


class ApiError(Exception):
    """An HTTP error with a stable machine-readable ``code`` and a short human ``message``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details or {}  # more fields of the JSON error object (e.g. run_id)

    @classmethod
    def from_exception(cls, error: AgenticDjangoError) -> ApiError:
        """Map one of agentic_django's named errors to its HTTP status and code."""
        code = re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()
        status = getattr(error, "status_code", 400)
        headers = {}
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        message = error.message
        if status == 500 and not settings.DEBUG:
            # Misconfiguration details (module paths) are for the logs, not for users.
            logger.error("agentic_django: %s", error.message)
            message = "The server is misconfigured; the details are in its log."
        return cls(status, code, message, headers, getattr(error, "details", None))


# Django refuses to parse a query string or form with more than DATA_UPLOAD_MAX_NUMBER_FIELDS
# fields (or files): a 400, answered like the app's other errors, not as Django's HTML page.
TOO_MANY_FIELDS_ERRORS = (TooManyFieldsSent, TooManyFilesSent)
TOO_MANY_FIELDS = ApiError(
    400, "too_many_fields", "The request has too many parameters or form fields."
)


def is_htmx(request: HttpRequest) -> bool:
    """True for requests made by htmx (with or without django-htmx's middleware)."""
    return request.headers.get("HX-Request") == "true"


def is_browser_navigation(request: HttpRequest) -> bool:
    """True for a plain browser request (not htmx) that accepts an HTML page."""
    return not is_htmx(request) and "text/html" in request.headers.get("Accept", "")


def json_error(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    details: dict[str, Any] | None = None,
) -> JsonResponse:
    """The JSON error body every endpoint uses."""
    body = {"code": code, "message": message, **(details or {})}
    response = JsonResponse({"error": body}, status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def error_response(request: HttpRequest, error: ApiError) -> HttpResponse:
    """Render ``error`` as a visible fragment for htmx, else as JSON."""
    if not is_htmx(request):
        return json_error(error.status, error.code, error.message, error.headers, error.details)
    context = {
        "status": error.status,
        "code": error.code,
        "title": _CODE_TITLES.get(error.code) or _TITLES.get(error.status, "Something went wrong"),
        "message": error.message,
    }
    response = render(request, ERROR_TEMPLATE, context, status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


def _login_redirect_target(request: HttpRequest) -> str:
    # htmx reports the page the user is on; send them back there after logging in.
    current = request.headers.get("HX-Current-URL", "")
    if current:
        parts = urlsplit(current)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        if url_has_allowed_host_and_scheme(path, allowed_hosts={request.get_host()}):
            return path
    return resolve_url(settings.LOGIN_REDIRECT_URL)


def api_view(*methods: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Allow only ``methods``, require a logged-in user and turn errors into HTTP responses.

    Anonymous API clients get 401 JSON, htmx an ``HX-Redirect`` to the login page and browsers
    the usual login redirect. ``ApiError`` and agentic_django's named errors become 4xx/5xx.
    """

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                error = ApiError(
                    405, "method_not_allowed", f"Use {' or '.join(methods)} for this endpoint."
                )
                response = error_response(request, error)
                response["Allow"] = ", ".join(methods)
                return response
            if not request.user.is_authenticated:
                if is_htmx(request):
                    return HttpResponseClientRedirect(
                        redirect_to_login(_login_redirect_target(request)).url
                    )
                if is_browser_navigation(request):
                    return redirect_to_login(request.get_full_path())
                return json_error(401, "not_authenticated", "Log in to use this endpoint.")
            try:
                return view(request, *args, **kwargs)
            except ApiError as error:
                return error_response(request, error)
            except AgenticDjangoError as error:
                return error_response(request, ApiError.from_exception(error))
            except TOO_MANY_FIELDS_ERRORS:
                return error_response(request, TOO_MANY_FIELDS)

        wrapper.agentic_api = True  # type: ignore[attr-defined]  (see middleware.bad_request)
        return wrapper

    return decorator


def parse_non_negative_int(request: HttpRequest, name: str, default: int) -> int:
    """Read an integer query parameter that must be >= 0."""
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise ApiError(400, f"invalid_{name}", f"`{name}` must be a non-negative integer.")
    return int(raw)


def parse_page(request: HttpRequest) -> tuple[int, int]:
    """``(after, limit)`` of a cursor-paginated list; ``limit`` is capped at ``MAX_PAGE_SIZE``."""
    after = parse_non_negative_int(request, "after", 0)
    limit = parse_non_negative_int(request, "limit", DEFAULT_PAGE_SIZE)
    if limit < 1:
        raise ApiError(400, "invalid_limit", "`limit` must be at least 1.")
    return after, min(limit, MAX_PAGE_SIZE)


def safe_next_url(request: HttpRequest, candidate: str | None) -> str | None:
    """``candidate`` if it is a path on this site a form may redirect to, else ``None``."""
    if not candidate or not candidate.startswith("/") or candidate.startswith("//"):
        return None
    if url_has_allowed_host_and_scheme(
        candidate, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return candidate
    return None
