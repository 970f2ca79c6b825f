"""The project's URLs plus the floor the polling views are compared with."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.urls import include, path


@login_required
def floor(request: HttpRequest) -> HttpResponse:
    """An authenticated view that returns a constant: the least a polled view can cost."""
    return HttpResponse("ok", content_type="text/plain")


urlpatterns = [
    path("__bench__/floor/", floor, name="bench-floor"),
    path("", include("config.urls")),
]
