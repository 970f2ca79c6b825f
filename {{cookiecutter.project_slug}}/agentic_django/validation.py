"""Checks applied to user-supplied run input before a run is created."""

from __future__ import annotations

import json
from typing import Any

from agentic_django.conf import MULTITASK_STRATEGIES, get_config, validate_run_options
from agentic_django.exceptions import (
    InputTooLarge,
    InvalidMultitaskStrategy,
    InvalidRunInput,
    InvalidRunOptions,
    TooManyInputItems,
)

MAX_SESSION_KEY_LENGTH = 255


def is_storable_text(text: str) -> bool:
    """Whether every database can store ``text``: no NUL character, valid UTF-8."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\ud800" escape
        return False
    return True


def is_storable(value: Any) -> bool:
    """Whether every string in a JSON-safe ``value`` (keys included) is storable text."""
    if isinstance(value, str):
        return is_storable_text(value)
    if isinstance(value, dict):
        return all(is_storable(key) and is_storable(item) for key, item in value.items())
    if isinstance(value, list):
        return all(is_storable(item) for item in value)
    return True


def storable_copy(value: Any) -> Any:
    """``value`` (JSON-safe) with NUL and lone surrogates replaced by U+FFFD, for logs."""
    if isinstance(value, str):
        if is_storable_text(value):
            return value
        text = value.replace("\x00", "\ufffd")
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, dict):
        return {storable_copy(key): storable_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [storable_copy(item) for item in value]
    return value


def validate_session_key(session_key: Any) -> str:
    """Return a usable session key or raise ``InvalidRunInput``."""
    if not isinstance(session_key, str) or not session_key.strip():
        raise InvalidRunInput("A session key is required.")
    if len(session_key) > MAX_SESSION_KEY_LENGTH:
        raise InvalidRunInput(f"The session key is longer than {MAX_SESSION_KEY_LENGTH} chars.")
    if not is_storable_text(session_key):
        raise InvalidRunInput("The session key contains a NUL or an invalid character.")
    return session_key


def validate_input_payload(payload: Any) -> str | list[dict[str, Any]]:
    """Accept a non-empty string or a list of SDK input items (dicts) within the size limits."""
    config = get_config()
    if isinstance(payload, str):
        if not payload.strip():
            raise InvalidRunInput("The input is empty.")
    elif isinstance(payload, list):
        if not payload:
            raise InvalidRunInput("The input is empty.")
        if config.max_input_items is not None and len(payload) > config.max_input_items:
            raise TooManyInputItems(
                f"The input has {len(payload)} items; at most {config.max_input_items} allowed."
            )
        if not all(isinstance(item, dict) for item in payload):
            raise InvalidRunInput("Each input item must be an object.")
    else:
        raise InvalidRunInput("The input must be text or a list of items.")
    if not is_storable(payload):
        raise InvalidRunInput("The input contains a NUL or an invalid character.")
    try:
        size = len(json.dumps(payload, ensure_ascii=False).encode())
    except (TypeError, ValueError) as exc:
        raise InvalidRunInput("The input must be JSON-serializable.") from exc
    if config.max_input_bytes is not None and size > config.max_input_bytes:
        raise InputTooLarge(
            f"The input is {size} bytes; at most {config.max_input_bytes} bytes allowed."
        )
    return payload


def validate_user_run_options(options: Any) -> dict[str, Any]:
    """Keep only allowlisted run options (e.g. ``max_turns`` within the configured cap)."""
    try:
        return validate_run_options(options, max_turns=get_config().max_turns, source="Run options")
    except ValueError as exc:
        raise InvalidRunOptions(str(exc)) from exc


def validate_multitask_strategy(strategy: Any) -> str:
    """The strategy asked for (``None`` or ``""``: the configured default), or
    ``InvalidMultitaskStrategy``."""
    if strategy is None or strategy == "":
        return get_config().multitask_strategy
    if strategy not in MULTITASK_STRATEGIES:
        raise InvalidMultitaskStrategy()
    return strategy
