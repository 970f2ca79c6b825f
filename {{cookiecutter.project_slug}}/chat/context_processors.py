from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest


def project(request: HttpRequest) -> dict[str, Any]:
    """The project's display name, for page titles and the header."""
    return {"project_name": settings.PROJECT_NAME}
