"""Per-user rate limit of run creation (``AGENTIC_DJANGO_RATE_LIMIT``, e.g. ``"20/m"``).

The limit is a sliding window over the user's own runs, so it needs no extra storage and holds
across every web process. It is atomic: the check locks the user's row (on SQLite the
IMMEDIATE transaction already serializes writers), so concurrent requests cannot all slip in
before the run that would exceed the limit is counted.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from agentic_django.conf import get_config
from agentic_django.exceptions import AgenticDjangoError
from agentic_django.models import AgentRun


class RateLimited(AgenticDjangoError):
    """The user created too many runs recently; ``retry_after`` is in whole seconds."""

    status_code = 429

    def __init__(self, retry_after: int) -> None:
        self.retry_after = max(1, retry_after)
        super().__init__(
            f"Too many requests: wait {_duration(self.retry_after)} before starting another run."
        )


def _duration(seconds: int) -> str:
    for unit, size, threshold in (("hour", 3600, 5400), ("minute", 60, 90)):
        if seconds >= threshold:
            count = math.ceil(seconds / size)
            return f"{count} {unit}s"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def enforce_rate_limit(user: Any) -> None:
    """Raise ``RateLimited`` if ``user`` may not create another run now.

    Call it inside the ``transaction.atomic()`` block that creates the run, so the lock taken
    here is held until the new run is committed.
    """
    limit = get_config().rate_limit
    if limit is None:
        return
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("enforce_rate_limit() must run inside transaction.atomic().")
    # Serializes run creation per user; the count below then sees every committed run.
    list(get_user_model().objects.select_for_update().filter(pk=user.pk).values_list("pk"))
    now = timezone.now()
    window_start = now - timedelta(seconds=limit.seconds)
    recent = list(
        AgentRun.objects.filter(owner=user, created_at__gt=window_start)
        .order_by("-created_at")
        .values_list("created_at", flat=True)[: limit.count]
    )
    if len(recent) < limit.count:
        return
    # The oldest run still inside the window leaves it at created_at + window.
    frees_at = recent[-1] + timedelta(seconds=limit.seconds)
    raise RateLimited(math.ceil((frees_at - now).total_seconds()))
