"""Function tools for the sample agents: small, deterministic and safe to expose to users.

Each tool is a plain function (easy to test and to reuse) wrapped with `function_tool` in
`TOOLS`. Add your own here and list them on an agent in `chat/registry.py`.

`send_team_note` acts on the world, so it needs a person's approval (`needs_approval=True`):
the run pauses until someone approves or rejects the call in the chat, the JSON API or the
admin. It stores its note under `idempotency_key(context)`, so a call run again after a crash
finds the note it already made instead of sending a second one.

A worker can die while a tool runs. The tools that only compute are declared `repeatable`:
such a call simply runs again on the retry. For any other tool, the retried run pauses and
asks its user whether the call happened (run it again, count it as done, or stop the run).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agents import FunctionTool, RunContextWrapper, function_tool
from asgiref.sync import sync_to_async

from agentic_django.toolcalls import idempotency_key, repeatable

MAX_EXPRESSION_LENGTH = 200
MAX_EXPONENT = 100
MAX_MAGNITUDE = 1e100
MAX_NOTE_LENGTH = 500


class ToolInputError(ValueError):
    """Raised for input a tool cannot handle; its message is shown to the model."""


def current_utc_time() -> str:
    """Return the current date and time in UTC (ISO 8601), with the weekday."""
    now = datetime.now(tz=UTC).replace(microsecond=0)
    return f"{now.strftime('%A')} {now.isoformat()}"


_BINARY_OPERATORS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPERATORS: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPERATORS:
        return _UNARY_OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        # Huge powers would hang the worker: refuse them before computing.
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolInputError(f"Exponents are limited to {MAX_EXPONENT}.")
        try:
            result = _BINARY_OPERATORS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolInputError("Division by zero.") from None
        if isinstance(result, complex):
            raise ToolInputError("The result is not a real number.")
        if abs(result) > MAX_MAGNITUDE:
            raise ToolInputError("The result is too large.")
        return result
    raise ToolInputError("Only numbers, + - * / // % ** and parentheses are allowed.")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression such as `(2 + 3) * 4.5` or `2 ** 10`.

    Supports + - * / // % ** and parentheses on integers and decimals; `^` means power.
    """
    expression = expression.strip().replace("^", "**").replace("\u00d7", "*").replace("\u00f7", "/")
    if not expression:
        raise ToolInputError("The expression is empty.")
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise ToolInputError(f"Expressions are limited to {MAX_EXPRESSION_LENGTH} characters.")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolInputError(f"Cannot parse {expression!r} as arithmetic.") from None
    result = _evaluate(tree)
    if isinstance(result, float):
        if not math.isfinite(result):
            raise ToolInputError("The result is not a finite number.")
        if result.is_integer() and abs(result) < 1e15:
            return str(int(result))
        return f"{result:.10g}"
    return str(result)


# Factors to a base unit per dimension; temperatures are converted separately.
_UNITS: dict[str, tuple[str, float]] = {
    "mm": ("length", 0.001),
    "cm": ("length", 0.01),
    "m": ("length", 1.0),
    "km": ("length", 1000.0),
    "in": ("length", 0.0254),
    "ft": ("length", 0.3048),
    "yd": ("length", 0.9144),
    "mi": ("length", 1609.344),
    "mg": ("mass", 0.001),
    "g": ("mass", 1.0),
    "kg": ("mass", 1000.0),
    "oz": ("mass", 28.349523125),
    "lb": ("mass", 453.59237),
    "ml": ("volume", 0.001),
    "l": ("volume", 1.0),
    "gal": ("volume", 3.785411784),
    "cup": ("volume", 0.2365882365),
    "ms": ("time", 0.001),
    "s": ("time", 1.0),
    "min": ("time", 60.0),
    "h": ("time", 3600.0),
    "day": ("time", 86400.0),
    "week": ("time", 604800.0),
}
_TEMPERATURES = {"c", "f", "k"}
_ALIASES = {
    "millimeter": "mm",
    "centimeter": "cm",
    "meter": "m",
    "metre": "m",
    "kilometer": "km",
    "kilometre": "km",
    "inch": "in",
    "inches": "in",
    "foot": "ft",
    "feet": "ft",
    "yard": "yd",
    "mile": "mi",
    "milligram": "mg",
    "gram": "g",
    "kilogram": "kg",
    "kilo": "kg",
    "ounce": "oz",
    "pound": "lb",
    "lbs": "lb",
    "milliliter": "ml",
    "liter": "l",
    "litre": "l",
    "gallon": "gal",
    "second": "s",
    "sec": "s",
    "minute": "min",
    "hour": "h",
    "hr": "h",
    "d": "day",
    "celsius": "c",
    "°c": "c",
    "fahrenheit": "f",
    "°f": "f",
    "kelvin": "k",
}
UNIT_NAMES = sorted({*_UNITS, *_TEMPERATURES, *_ALIASES})


def normalize_unit(unit: str) -> str:
    """Return the canonical symbol for a unit name such as "miles" or "°C", or raise."""
    name = unit.strip().lower()
    for candidate in (name, name.removesuffix("s"), name.removesuffix("es")):
        candidate = _ALIASES.get(candidate, candidate)
        if candidate in _UNITS or candidate in _TEMPERATURES:
            return candidate
    raise ToolInputError(f"Unknown unit {unit!r}.")


def _to_kelvin(value: float, unit: str) -> float:
    return {"c": value + 273.15, "f": (value - 32) * 5 / 9 + 273.15, "k": value}[unit]


def _from_kelvin(value: float, unit: str) -> float:
    return {"c": value - 273.15, "f": (value - 273.15) * 9 / 5 + 32, "k": value}[unit]


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a value between units of length, mass, volume, time or temperature.

    Units: mm cm m km in ft yd mi, mg g kg oz lb, ml l gal cup, s min h day week, C F K
    (full names such as "miles" or "celsius" work too).
    """
    source, target = normalize_unit(from_unit), normalize_unit(to_unit)
    if source in _TEMPERATURES or target in _TEMPERATURES:
        if not (source in _TEMPERATURES and target in _TEMPERATURES):
            raise ToolInputError(f"Cannot convert {from_unit} to {to_unit}.")
        result = _from_kelvin(_to_kelvin(value, source), target)
    else:
        (source_kind, source_factor), (target_kind, target_factor) = _UNITS[source], _UNITS[target]
        if source_kind != target_kind:
            raise ToolInputError(f"Cannot convert {source_kind} to {target_kind}.")
        result = value * source_factor / target_factor
    return f"{value:g} {source} = {result:.6g} {target}"


_WORD = re.compile(r"[\w'\u2019-]+")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


def word_count(text: str) -> str:
    """Count the words, characters and sentences of a text."""
    stripped = text.strip()
    words = len(_WORD.findall(stripped))
    sentences = len(_SENTENCE_END.findall(stripped)) or (1 if stripped else 0)
    return f"{words} words, {len(stripped)} characters, {sentences} sentences"


def _tool_error(context: RunContextWrapper[Any], error: Exception) -> str:
    # Input errors are safe and useful for the model; anything else stays generic.
    if isinstance(error, ToolInputError):
        return f"Error: {error}"
    return "Error: the tool failed unexpectedly."


async def send_team_note(context: RunContextWrapper[Any], text: str) -> str:
    """Send a short note to the team on the user's behalf (a person approves it first)."""
    text = text.strip()
    if not text:
        raise ToolInputError("The note is empty.")
    if len(text) > MAX_NOTE_LENGTH:
        raise ToolInputError(f"Notes are limited to {MAX_NOTE_LENGTH} characters.")
    key = idempotency_key(context)
    owner_id = context.context.owner_id

    # Async with sync_to_async: the ORM runs on the run's own database connection.
    @sync_to_async
    def store() -> None:
        from chat.models import TeamNote

        TeamNote.objects.get_or_create(
            idempotency_key=key, defaults={"author_id": owner_id, "text": text}
        )

    await store()
    return f"Note sent to the team: {text}"


TOOLS: list[FunctionTool] = [
    # They only compute: safe to run again if a worker dies inside one (`repeatable`).
    *(
        repeatable(function_tool(tool, failure_error_function=_tool_error))
        for tool in (current_utc_time, calculate, convert_units, word_count)
    ),
    # Not declared repeatable: if a worker dies inside it, the run asks its user whether the
    # note went out (its idempotency key would make a second send harmless, but this shows
    # the question your own tools with side effects get).
    function_tool(send_team_note, failure_error_function=_tool_error, needs_approval=True),
]
