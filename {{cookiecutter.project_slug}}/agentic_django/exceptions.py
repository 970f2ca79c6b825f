"""Named errors of agentic_django; each carries a short, user-facing ``message``."""

from __future__ import annotations


class AgenticDjangoError(Exception):
    """Base class of every error agentic_django raises on purpose."""

    message = "The agent request could not be processed."
    status_code = 400

    def __init__(self, message: str | None = None) -> None:
        if message is not None:
            self.message = message
        super().__init__(self.message)


class InvalidRunInput(AgenticDjangoError):
    """The input of a new run was rejected."""

    message = "The input is not valid."


class InputTooLarge(InvalidRunInput):
    """The input is larger than ``AGENTIC_DJANGO_MAX_INPUT_BYTES``."""

    message = "The input is too large."
    status_code = 413


class TooManyInputItems(InvalidRunInput):
    """The input list holds more than ``AGENTIC_DJANGO_MAX_INPUT_ITEMS`` items."""

    message = "The input has too many items."
    status_code = 413


class UnknownAgent(InvalidRunInput):
    """The agent key is not in the registry."""

    message = "Unknown agent."


class InvalidRunOptions(InvalidRunInput):
    """Run options hold keys outside the allowlist or out-of-range values."""

    message = "Invalid run options."


class InvalidMultitaskStrategy(InvalidRunInput):
    """``multitask_strategy`` is not one of enqueue, reject, interrupt, rollback."""

    message = "`multitask_strategy` must be one of enqueue, reject, interrupt, rollback."


class ConversationBusy(AgenticDjangoError):
    """A run of the conversation is in progress and the new one asked to be rejected then."""

    message = "This conversation has a run in progress; wait for it or cancel it first."
    status_code = 409

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = str(run_id)
        self.details = {"run_id": self.run_id}


class RunNotCancellable(AgenticDjangoError):
    """The run already finished."""

    message = "The run already finished and cannot be cancelled."
    status_code = 409


class AgentRegistryError(AgenticDjangoError):
    """The configured registry could not be loaded or did not return a mapping."""

    message = "The agent registry is misconfigured."
    status_code = 500


class RunTimedOut(AgenticDjangoError):
    """The run exceeded ``AGENTIC_DJANGO_RUN_TIMEOUT``."""

    message = "The run took too long and was stopped."
    status_code = 504


class EnqueueFailed(AgenticDjangoError):
    """The task backend refused the run (e.g. the broker is down)."""

    message = "The run could not be queued: the task queue is unavailable. Try again shortly."
    status_code = 503


class UnstorableContent(AgenticDjangoError):
    """The agent produced text the database cannot store (e.g. a NUL character)."""

    message = (
        "The agent produced text the database cannot store (a NUL character or an invalid "
        "Unicode code point), so the run was stopped."
    )
    status_code = 500


class ApprovalNotFound(AgenticDjangoError):
    """The run has no tool call with that id waiting for a decision."""

    message = "This run has no such tool call to decide."
    status_code = 404


class ApprovalAlreadyDecided(AgenticDjangoError):
    """Someone (another tab, a double click) decided this tool call already."""

    message = "This tool call was already decided; the first decision counts."
    status_code = 409


class ApprovalExpired(AgenticDjangoError):
    """The decision came after the run's approval deadline: the run failed as expired."""

    message = "This run waited too long for a decision and was stopped; start a new one."
    status_code = 410


class RunNotAwaitingApproval(AgenticDjangoError):
    """The run is not paused for approvals (any more)."""

    message = "This run is not waiting for an approval."
    status_code = 409
