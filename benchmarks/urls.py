"""The project's URLs plus the floor the polling views are compared with, and two references.

The references show what one owner-scoped read of a run costs on top of the floor: through the
ORM, and as one hand-written SQL statement. They are yardsticks for the analysis, not features.
"""

from __future__ import annotations

import uuid

from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path


@login_required
def floor(request: HttpRequest) -> HttpResponse:
    """An authenticated view that returns a constant: the least a polled view can cost."""
    return HttpResponse("ok", content_type="text/plain")


@login_required
def run_status_orm(request: HttpRequest, run_id: uuid.UUID) -> JsonResponse:
    """The run's status through the ORM, scoped to the owner (one query)."""
    from agentic_django.models import AgentRun

    status = (
        AgentRun.objects.filter(pk=run_id, owner_id=request.user.pk)
        .values_list("status", flat=True)
        .first()
    )
    if status is None:
        raise Http404
    return JsonResponse({"status": status})


@login_required
def run_status_sql(request: HttpRequest, run_id: uuid.UUID) -> JsonResponse:
    """The run's status with one hand-written statement: no ORM compilation."""
    from agentic_django.models import AgentRun

    meta = AgentRun._meta
    pk = meta.pk.get_db_prep_value(run_id, connection)
    # The table name comes from the model.
    sql = f"SELECT status FROM {meta.db_table} WHERE id = %s AND owner_id = %s"
    with connection.cursor() as cursor:
        cursor.execute(sql, [pk, request.user.pk])
        row = cursor.fetchone()
    if row is None:
        raise Http404
    return JsonResponse({"status": row[0]})


urlpatterns = [
    path("__bench__/floor/", floor, name="bench-floor"),
    path("__bench__/runs/<uuid:run_id>/orm/", run_status_orm, name="bench-run-orm"),
    path("__bench__/runs/<uuid:run_id>/sql/", run_status_sql, name="bench-run-sql"),
    path("", include("config.urls")),
]
