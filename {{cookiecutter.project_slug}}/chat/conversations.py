"""Queries behind the chat pages: the user's conversations and one conversation's session."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import OuterRef, Subquery

from agentic_django.models import AgentRun, AgentSession

TITLE_CHARS = 60


@dataclass(frozen=True)
class ConversationSummary:
    """One entry of the sidebar."""

    session_key: str
    title: str
    updated_at: datetime


def _title(first_input: Any) -> str:
    text = ""
    if isinstance(first_input, str):
        text = first_input
    elif isinstance(first_input, list):
        for item in first_input:
            content = item.get("content") if isinstance(item, dict) else None
            if isinstance(content, str) and item.get("role") == "user":
                text = content
                break
    text = " ".join(text.split())
    if not text:
        return "New conversation"
    return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1] + "…"


def recent_conversations(user: Any, limit: int = 50) -> list[ConversationSummary]:
    """The user's most recently active conversations, titled by their first message."""
    first_input = AgentRun.objects.filter(session=OuterRef("pk")).order_by("created_at", "id")
    sessions = (
        AgentSession.objects.filter(owner=user)
        .annotate(first_input=Subquery(first_input.values("input_payload")[:1]))
        .order_by("-updated_at", "-id")[:limit]
    )
    return [
        ConversationSummary(session.session_key, _title(session.first_input), session.updated_at)
        for session in sessions
    ]


def find_session(user: Any, session_key: str) -> AgentSession | None:
    """The user's session with this key, or None while the conversation has no message yet."""
    return AgentSession.objects.filter(owner=user, session_key=session_key).first()
