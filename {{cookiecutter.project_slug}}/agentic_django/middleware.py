"""Answer 503 (not 500) while the database is unreachable, with a ``Retry-After`` header.

API clients get the usual JSON error, htmx a visible error fragment, browsers a short page.
Add ``agentic_django.middleware.DatabaseUnavailableMiddleware`` to ``MIDDLEWARE``; errors that
happen outside views (in other middleware) reach ``server_error`` below when the project sets
``handler500 = "agentic_django.middleware.server_error"``, which answers the same way
(and ``handler400 = "agentic_django.middleware.bad_request"``: the app's endpoints answer a
request Django refuses to read as JSON too).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import Resolver404, resolve
from django.views import defaults

from agentic_django.http import (
    TOO_MANY_FIELDS,
    TOO_MANY_FIELDS_ERRORS,
    ApiError,
    error_response,
    is_browser_navigation,
)

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5
UNAVAILABLE = ApiError(
    503,
    "database_unavailable",
    "The service is temporarily unavailable. Try again in a few seconds.",
    {"Retry-After": str(RETRY_AFTER_SECONDS)},
)
PAGE_TEMPLATE = "agentic_django/unavailable.html"


def is_database_unavailable(exc: BaseException | None) -> bool:
    """Whether ``exc`` means the database cannot be reached (rather than a bug)."""
    return isinstance(exc, OperationalError | InterfaceError)


def unavailable_response(request: HttpRequest) -> HttpResponse:
    """The 503 answer for this kind of client."""
    if is_browser_navigation(request):
        response = render(request, PAGE_TEMPLATE, {"message": UNAVAILABLE.message}, status=503)
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
    return error_response(request, UNAVAILABLE)


class DatabaseUnavailableMiddleware:
    """Turns a database connection error raised by a view into a 503."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not is_database_unavailable(exception):
            return None
        logger.error("Database unavailable: %s", exception)
        return unavailable_response(request)


def server_error(request: HttpRequest) -> HttpResponse:
    """``handler500``: a 503 when the database is unreachable, else Django's own 500 page."""
    if is_database_unavailable(sys.exc_info()[1]):
        return unavailable_response(request)
    return defaults.server_error(request)


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    """``handler400``: a request to one of the app's endpoints that Django refused to read
    before the view ran (too many fields: the CSRF middleware reads a form first) gets the
    app's error (JSON, or a fragment for htmx); anything else Django's own 400 page."""
    if isinstance(exception, TOO_MANY_FIELDS_ERRORS) and _is_app_endpoint(request):
        return error_response(request, TOO_MANY_FIELDS)
    return defaults.bad_request(request, exception)


def _is_app_endpoint(request: HttpRequest) -> bool:
    try:
        view = resolve(request.path_info).func
    except Resolver404:
        return False
    return getattr(view, "agentic_api", False)
