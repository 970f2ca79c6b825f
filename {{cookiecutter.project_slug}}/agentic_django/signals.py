"""Signals of agentic_django, sent with ``send_robust``: a failing receiver is logged and never
changes a run's state.

All are sent from synchronous code after the state change is committed, so receivers can use
the ORM. Keyword arguments: ``run`` (an ``AgentRun``) for the run signals, plus ``event``
(an ``AgentEvent``) for ``agent_run_event``; ``session`` for ``agent_session_created``.
"""

from __future__ import annotations

import logging
from typing import Any

from django.dispatch import Signal

logger = logging.getLogger(__name__)

agent_run_started = Signal()
agent_run_completed = Signal()
agent_run_failed = Signal()
agent_run_cancelled = Signal()
agent_run_event = Signal()
agent_session_created = Signal()
# A run paused on tool calls that need approval, and a paused run going on once decided.
agent_run_awaiting_approval = Signal()
agent_run_resumed = Signal()
# Usage and budgets (see ``usage``): ``usage`` (an ``AgentUsage`` row) once a model call is in
# the ledger; ``user_id``, ``run`` and ``standing`` (a ``usage.Standing``) when a call takes a
# user past the soft threshold of a cap (at least once per crossing: two runs of one user
# crossing it together may both send it); ``run`` and ``reason`` (its message) when a run
# reaches a hard cap and pauses (or fails, with ``on_exceeded: "fail"``).
agent_usage_recorded = Signal()
agent_budget_threshold_reached = Signal()
agent_budget_exceeded = Signal()


def send_safely(signal: Signal, sender: type, **kwargs: Any) -> None:
    """Send ``signal`` to every receiver, logging (never raising) receiver errors."""
    for receiver, result in signal.send_robust(sender=sender, **kwargs):
        if isinstance(result, Exception):
            logger.error(
                "agentic_django signal receiver %r raised; ignored",
                receiver,
                exc_info=(type(result), result, result.__traceback__),
            )
