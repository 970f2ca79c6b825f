"""The app's URLs alone, in a project that sets no ``handler400``/``handler500``."""

from django.urls import include, path

urlpatterns = [path("agents/", include("agentic_django.urls"))]
