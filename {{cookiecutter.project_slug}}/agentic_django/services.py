"""Public facade of agentic_django: create, enqueue and cancel runs.

The work happens in ``lifecycle`` (every status change), ``dispatch`` (queueing),
``execution`` (claim, run, finish) and ``recovery``; this module only composes them for
callers such as views.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from agentic_django import dispatch, lifecycle, usage
from agentic_django.exceptions import RunNotCancellable
from agentic_django.models import AgentRun, AgentSession
from agentic_django.registry import resolve_agent_key
from agentic_django.signals import agent_session_created, send_safely
from agentic_django.validation import (
    validate_input_payload,
    validate_multitask_strategy,
    validate_session_key,
    validate_user_run_options,
)

__all__ = [
    "approve_tool_call",
    "cancel_run",
    "create_run",
    "enqueue_agent_run",
    "reject_tool_call",
    "requeue_run",
]


def enqueue_agent_run(run_id: str) -> None:
    """Queue a pending run for background execution once the current transaction commits."""
    dispatch.enqueue_on_commit(str(run_id))


def create_run(
    *,
    owner: Any,
    session_key: str,
    input_payload: str | list[dict[str, Any]],
    agent_key: str | None = None,
    run_options: dict[str, Any] | None = None,
    multitask_strategy: str | None = None,
) -> AgentRun:
    """Validate the request, create a pending run on the owner's session and enqueue it.

    ``multitask_strategy`` (default ``AGENTIC_DJANGO_MULTITASK_STRATEGY``) says what happens
    to the session's runs in progress: ``enqueue`` (the new run waits for them), ``reject``
    (``ConversationBusy``, 409), ``interrupt`` (they stop after their current step and keep
    their partial output) or ``rollback`` (they stop at once and their history is deleted);
    see ``lifecycle.make_way``. Raises a subclass of ``InvalidRunInput`` (with a user-facing
    ``message``) on bad input, and ``usage.BudgetExceeded`` (402) while the owner's budget for
    the period is used up.
    """
    session_key = validate_session_key(session_key)
    payload = validate_input_payload(input_payload)
    options = validate_user_run_options(run_options)
    strategy = validate_multitask_strategy(multitask_strategy)
    key = resolve_agent_key(agent_key)
    # A user whose budget for the period is used up starts nothing (BudgetExceeded, 402).
    usage.check_new_run(owner)
    with transaction.atomic():
        # Locked (no key: the conversation's writers are not held): a delete of the
        # conversation waits for this run, or has committed and the post starts a new one.
        conversation = AgentSession.objects.select_for_update(no_key=True)
        session, created = conversation.get_or_create(owner=owner, session_key=session_key)
        interrupted = lifecycle.make_way(session.pk, strategy)
        run = AgentRun.objects.create(
            session=session,
            owner=owner,
            agent_key=key,
            input_payload=payload,
            run_options=options,
        )
        if created:
            transaction.on_commit(
                lambda: send_safely(agent_session_created, AgentSession, session=session)
            )
        enqueue_agent_run(str(run.id))
        if interrupted:
            transaction.on_commit(dispatch.dispatch_next)  # freed slots go to waiting runs
    return run


def cancel_run(run: AgentRun) -> AgentRun:
    """Cancel a pending run at once, or ask a running one to stop after its current turn.

    Raises ``RunNotCancellable`` if the run already finished. Returns the refreshed run.
    """
    if not dispatch.cancel(run) and run.is_terminal:
        raise RunNotCancellable()
    return run


def requeue_run(run: AgentRun) -> bool:
    """Put a stale (lease expired) or failed run back in the queue; False if it is not safe."""
    from agentic_django.recovery import requeue

    return requeue(run)


def approve_tool_call(
    run: AgentRun, call_id: str, *, always: bool = False, user: Any = None
) -> bool:
    """Approve a tool call a paused run waits on; True if that was the last one to decide
    (the run then goes on, dispatched like any run).

    ``always`` approves every later call of the same tool in this run. Raises
    ``ApprovalNotFound``, ``ApprovalAlreadyDecided`` or ``RunNotAwaitingApproval``.
    """
    return _decide(run, call_id, approve=True, always=always, message="", user=user)


def reject_tool_call(
    run: AgentRun, call_id: str, *, message: str = "", always: bool = False, user: Any = None
) -> bool:
    """Reject a tool call a paused run waits on (``message`` is what the model is told); True
    if that was the last one to decide. Errors as for ``approve_tool_call``."""
    return _decide(run, call_id, approve=False, always=always, message=message, user=user)


def _decide(run: AgentRun, call_id: str, **decision: Any) -> bool:
    from agentic_django import lifecycle

    resumed = lifecycle.decide(run, call_id, **decision)
    if resumed:
        enqueue_agent_run(str(run.pk))
    return resumed
