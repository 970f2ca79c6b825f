"""The chat pages: a conversation with the agents, and the sidebar of past conversations."""

from __future__ import annotations

import uuid

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from agentic_django.conf import get_config
from agentic_django.http import api_view
from agentic_django.validation import MAX_SESSION_KEY_LENGTH, is_storable_text
from chat.conversations import find_session, recent_conversations


def _chat_page(request: HttpRequest, session_key: str) -> HttpResponse:
    session = find_session(request.user, session_key)
    context = {
        "session": session,
        "session_key": session_key,
        "conversations": recent_conversations(request.user),
        "max_input_chars": get_config().max_input_bytes,
    }
    return render(request, "chat/chat.html", context)


@login_required
@require_GET
def index(request: HttpRequest) -> HttpResponse:
    """A new, empty conversation; it is saved when the first message is sent."""
    return _chat_page(request, uuid.uuid4().hex)


@login_required
@require_GET
def conversation(request: HttpRequest, session_key: str) -> HttpResponse:
    """One of the user's conversations (empty if nothing was sent under this key yet)."""
    if len(session_key) > MAX_SESSION_KEY_LENGTH or not is_storable_text(session_key):
        raise Http404("No such conversation.")
    return _chat_page(request, session_key)


@api_view("GET")
def conversation_list(request: HttpRequest) -> HttpResponse:
    """The sidebar list, reloaded by htmx whenever a run starts or finishes."""
    context = {
        "conversations": recent_conversations(request.user),
        "session_key": request.GET.get("current", ""),
    }
    return render(request, "chat/partials/conversation_list.html", context)
