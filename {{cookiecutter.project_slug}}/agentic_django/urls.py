"""URLs of agentic_django; include them under a prefix with the ``agents`` namespace."""

from django.urls import path

from agentic_django import openapi, views

app_name = "agents"
urlpatterns = [
    path("runs/", views.run_create, name="run-create"),
    path("runs/<str:run_id>/", views.run_detail, name="run-detail"),
    path("runs/<str:run_id>/fragment/", views.run_fragment, name="run-fragment"),
    path("runs/<str:run_id>/inspect/", views.run_inspect, name="run-inspect"),
    path("runs/<str:run_id>/trace/", views.run_trace, name="run-trace"),
    path("runs/<str:run_id>/events/", views.run_events, name="run-events"),
    path("runs/<str:run_id>/stream/", views.run_stream, name="run-stream"),
    path("runs/<str:run_id>/cancel/", views.run_cancel, name="run-cancel"),
    path("runs/<str:run_id>/approve/", views.run_approve, name="run-approve"),
    path("runs/<str:run_id>/reject/", views.run_reject, name="run-reject"),
    path("sessions/<str:session_key>/items/", views.session_items, name="session-items"),
    path("usage/", views.usage_summary, name="usage"),
    path("openapi.json", openapi.openapi_view, name="openapi"),
]
