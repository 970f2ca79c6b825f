"""Template tags of agentic_django: ``{% load agentic_django_tags %}``.

``{% agent_run_fragment run %}`` renders a run (polling itself while it works),
``{% agent_conversation session %}`` a whole conversation and ``{% agent_spend_meter %}`` the
user's spending against their budget; ``|agentic_markdown`` renders Markdown to sanitized HTML.
"""

from __future__ import annotations

from typing import Any

from django import template
from django.utils.safestring import SafeString

from agentic_django.models import AgentRun, AgentSession
from agentic_django.presentation import conversation, render_markdown, run_view, spend_meter

register = template.Library()


def _passthrough(context: template.Context) -> dict[str, Any]:
    # Fragments contain forms (cancel) that need the page's request and CSRF token.
    return {"request": context.get("request"), "csrf_token": context.get("csrf_token")}


@register.inclusion_tag("agentic_django/partials/run_fragment.html", takes_context=True)
def agent_run_fragment(context: template.Context, run: AgentRun) -> dict[str, Any]:
    """Render one run: its messages, tool calls, live status, output or error."""
    return {**_passthrough(context), "run": run, "view": run_view(run)}


@register.inclusion_tag("agentic_django/partials/conversation.html", takes_context=True)
def agent_conversation(context: template.Context, session: AgentSession | None) -> dict[str, Any]:
    """Render a session's conversation, one run fragment per run."""
    return {**_passthrough(context), **conversation(session)}


@register.inclusion_tag("agentic_django/partials/usage.html", takes_context=True)
def agent_spend_meter(context: template.Context) -> dict[str, Any]:
    """Render the user's spending this period against their cap (nothing without a cap)."""
    request = context.get("request")
    return {"meter": spend_meter(getattr(request, "user", None))}


@register.filter
def agentic_markdown(text: str) -> SafeString:
    """Markdown to sanitized HTML."""
    return render_markdown(str(text or ""))
