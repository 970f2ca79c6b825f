"""What a failed run tells its user, and what it keeps for the admin.

``describe(exc)`` returns a short message that is safe to show anyone -- no traceback, no
provider's own words (which can echo prompts, keys or account details), no server paths,
whatever ``DEBUG`` says -- and the full detail (exception and traceback) that goes to the log
and to ``AgentRun.error_detail``, which only the admin shows.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

from agentic_django.exceptions import AgenticDjangoError

MAX_DETAIL_LENGTH = 20_000
UNEXPECTED = "The agent failed unexpectedly. The details are in the server log."
STORE_FAILED = "The run's result could not be saved. The details are in the server log."


@dataclass(frozen=True)
class Failure:
    message: str
    detail: str


def describe(exc: BaseException) -> Failure:
    """The user-facing message and the admin-only detail of ``exc``."""
    detail = "".join(traceback.format_exception(exc))
    if len(detail) > MAX_DETAIL_LENGTH:
        detail = detail[: MAX_DETAIL_LENGTH // 2] + "\n…\n" + detail[-MAX_DETAIL_LENGTH // 2 :]
    return Failure(message=user_message(exc), detail=detail.replace("\x00", "\\x00"))


def user_message(exc: BaseException) -> str:
    """A short message for ``exc`` that reveals nothing about the server or the provider."""
    if isinstance(exc, AgenticDjangoError):
        return exc.message
    return _provider_message(exc) or _sdk_message(exc) or UNEXPECTED


def _provider_message(exc: BaseException) -> str | None:
    try:
        import openai
    except ImportError:  # pragma: no cover - the Agents SDK depends on openai
        return None
    # Order matters: the timeout error is a connection error, the named statuses are
    # status errors.
    if isinstance(exc, openai.APITimeoutError):
        return "The model provider did not answer in time. Try again shortly."
    if isinstance(exc, openai.APIConnectionError):
        if _broke_off(exc.__cause__):
            return "The connection to the model provider broke off. Try again shortly."
        return "The model provider could not be reached. Try again shortly."
    if isinstance(exc, openai.RateLimitError):
        return "The model provider is limiting requests right now. Try again shortly."
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return "The model provider refused the configured credentials."
    if isinstance(exc, openai.NotFoundError):
        return "The model provider does not offer the configured model."
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code >= 500:
            return f"The model provider had an error (HTTP {exc.status_code}). Try again shortly."
        return f"The model provider rejected the request (HTTP {exc.status_code})."
    if isinstance(exc, openai.APIError):
        return "The model provider returned an error."
    return None


def _broke_off(cause: BaseException | None) -> bool:
    """True when the connection was made and then lost (say, in the middle of a streamed
    answer), rather than never made. Decided by the class names of the HTTP library's
    exceptions (httpx and its successor httpx2, which the openai client may use, share them)."""
    if cause is None:
        return False
    names = {cls.__name__ for cls in type(cause).__mro__}
    return "TransportError" in names and not names & {
        "ConnectError",
        "ConnectTimeout",
        "UnsupportedProtocol",
    }


def _sdk_message(exc: BaseException) -> str | None:
    try:
        from agents import exceptions as sdk
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, sdk.InputGuardrailTripwireTriggered | sdk.OutputGuardrailTripwireTriggered):
        return "A guardrail stopped the agent."
    if isinstance(exc, sdk.ModelBehaviorError):
        return "The model answered in a way the agent could not use."
    if isinstance(exc, sdk.UserError):
        return "The agent is misconfigured. The details are in the server log."
    return None
