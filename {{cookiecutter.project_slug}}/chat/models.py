"""The sample app's one table: notes the agents send to the team (after a person approved)."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class TeamNote(models.Model):
    """A note an agent sent on a user's behalf: the effect of an approved tool call."""

    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="team_notes"
    )
    text = models.TextField()
    # The same for every retry of one tool call: a retried call finds its note, never a twin.
    idempotency_key = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.text[:60]
