"""Settings of agentic_django: the only module that reads ``AGENTIC_DJANGO_*`` settings.

``get_config()`` validates every setting once and returns a frozen ``AgenticConfig``;
the cache is dropped whenever a setting changes (tests, ``override_settings``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

PREFIX = "AGENTIC_DJANGO_"
RECOVERY_MODES = ("requeue", "fail", "ignore")
# What a new message does to its conversation's run in progress ("double texting").
MULTITASK_STRATEGIES = ("enqueue", "reject", "interrupt", "rollback")
# Run options a caller may set; anything else is rejected instead of reaching Runner.run.
ALLOWED_RUN_OPTIONS = frozenset({"max_turns"})
RUN_STATUSES = (
    "pending",
    "running",
    "awaiting_approval",
    "budget_exceeded",
    "completed",
    "failed",
    "cancelled",
)
TERMINAL_STATUSES = ("completed", "failed", "cancelled")
# Seconds past AGENTIC_DJANGO_RUN_TIMEOUT an attempt may take to wind down before its lease
# keeper ends the run itself (a task backend's job timeout must leave room for both).
TIMEOUT_GRACE_SECONDS = 10

_RATE_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
}
_RATE_RE = re.compile(r"^(\d+)/(\d*)([a-z]+)$")

DEFAULTS: dict[str, Any] = {
    "AGENT_REGISTRY": None,
    "DEFAULT_AGENT_KEY": "default",
    "DEFAULT_RUN_OPTIONS": {},
    "CONCURRENCY_LIMIT": None,
    "WORKER_CONCURRENCY": 50,
    "WORKER_SHUTDOWN_GRACE": 25,
    "ENABLE_EVENTS": False,
    "RATE_LIMIT": None,
    "MAX_INPUT_BYTES": 20_000,
    "MAX_INPUT_ITEMS": 20,
    "MAX_TURNS": 20,
    "STARTUP_RECOVERY": "requeue",
    "CLEANUP_POLICY": {},
    "RUN_TIMEOUT": 600,
    "MAX_ATTEMPTS": 3,
    "LEASE_SECONDS": 60,
    "APPROVAL_TIMEOUT": 86_400,
    "SESSION_SERIALIZER": None,
    "MULTITASK_STRATEGY": "enqueue",
    "BUDGETS": {},
    "MODEL_PRICES": {},
    "TRACING": {},
}

TRACING_DEFAULTS: dict[str, Any] = {
    # Store each run's trace (its agents, model calls, tool calls, handoffs, guardrails) in
    # the database, for the run inspector; works with every provider, nothing leaves the server.
    "enabled": True,
    # Keep the inputs and outputs of model and tool calls in the spans (the conversation is
    # in the database already); False keeps timings, names, tokens and errors only.
    "include_sensitive_data": True,
}

BUDGET_DEFAULTS: dict[str, Any] = {
    # Calendar periods in TIME_ZONE: "day" (resets at midnight) or "month" (on the 1st).
    "period": "month",
    "user_cost": None,  # US dollars a user may spend per period (None: no cap)
    "user_tokens": None,  # tokens a user may use per period
    "run_cost": None,  # US dollars one run may spend (all its attempts)
    "run_tokens": None,  # tokens one run may use
    "warn_at": 0.8,  # the soft threshold, as a fraction of each user cap
    "on_exceeded": "pause",  # "pause" (resumes once the budget allows) or "fail"
    # Dotted path to a callable(user) -> {"user_cost": ..., "user_tokens": ...} (or None for
    # the defaults): per-user caps, e.g. from a billing plan.
    "user_limits": None,
}
BUDGET_PERIODS = ("day", "month")
PRICE_KEYS = ("input", "output", "cached_input")

CLEANUP_DEFAULTS: dict[str, Any] = {
    "events_days": 7,
    "runs_days": 30,
    "runs_statuses": ["completed", "failed", "cancelled"],
    "sessions_days": 90,
    "sessions_require_empty": True,
    # The usage ledger outlives the runs it counts (spending is billing data): kept forever
    # unless this says how many days.
    "usage_days": None,
    # Traces of runs (the inspector's spans), whatever became of the runs.
    "trace_days": 30,
    "batch_size": 500,
}


@dataclass(frozen=True)
class RateLimit:
    """At most ``count`` requests per ``seconds``."""

    count: int
    seconds: int


@dataclass(frozen=True)
class CleanupPolicy:
    """Age thresholds (in days; ``None`` disables that part) for ``agentic_django_cleanup``."""

    events_days: int | None
    runs_days: int | None
    runs_statuses: tuple[str, ...]
    sessions_days: int | None
    sessions_require_empty: bool
    batch_size: int
    usage_days: int | None = None
    trace_days: int | None = None


@dataclass(frozen=True)
class Tracing:
    """``AGENTIC_DJANGO_TRACING``: what the run inspector keeps."""

    enabled: bool = True
    include_sensitive_data: bool = True


@dataclass(frozen=True)
class Budgets:
    """``AGENTIC_DJANGO_BUDGETS``: caps on spending, checked before every model call."""

    period: str = "month"
    user_cost: Decimal | None = None
    user_tokens: int | None = None
    run_cost: Decimal | None = None
    run_tokens: int | None = None
    warn_at: float = 0.8
    on_exceeded: str = "pause"
    user_limits: str | None = None

    @property
    def any(self) -> bool:
        """Whether any cap is set (else nothing is checked before model calls)."""
        return self.user_limits is not None or any(
            cap is not None for cap in (self.user_cost, self.user_tokens, *self.run_caps)
        )

    @property
    def run_caps(self) -> tuple[Decimal | None, int | None]:
        return self.run_cost, self.run_tokens


@dataclass(frozen=True)
class ModelPrice:
    """US dollars per million tokens of one model (``AGENTIC_DJANGO_MODEL_PRICES``)."""

    input: Decimal
    output: Decimal
    cached_input: Decimal


@dataclass(frozen=True)
class AgenticConfig:
    """Validated ``AGENTIC_DJANGO_*`` settings."""

    agent_registry: str | None
    default_agent_key: str
    default_run_options: dict[str, Any]
    # This process's view; the limit in force is the one the latest worker recorded in the
    # database (lifecycle.record_concurrency_limit). None ("auto"): the slots of the live
    # workers, or one worker's slots while none has announced itself.
    concurrency_limit: int | None
    enable_events: bool
    rate_limit: RateLimit | None
    max_input_bytes: int | None
    max_input_items: int | None
    max_turns: int
    startup_recovery: str
    cleanup_policy: CleanupPolicy
    run_timeout_seconds: int
    lease_seconds: int
    session_serializer: str | None = None
    approval_timeout_seconds: int = DEFAULTS["APPROVAL_TIMEOUT"]
    # Attempts a run gets in all: its first, and retries after its worker died.
    max_attempts: int = DEFAULTS["MAX_ATTEMPTS"]
    # Runs one worker process executes at once (its slots).
    worker_concurrency: int = DEFAULTS["WORKER_CONCURRENCY"]
    # Seconds a stopping worker lets its runs in flight finish before it gives them up.
    worker_shutdown_grace: int = DEFAULTS["WORKER_SHUTDOWN_GRACE"]
    # What a new run does to the runs its conversation has in progress (MULTITASK_STRATEGIES).
    multitask_strategy: str = DEFAULTS["MULTITASK_STRATEGY"]
    budgets: Budgets = field(default_factory=Budgets)
    # Model name -> its price, over the maintained price table (genai-prices).
    model_prices: dict[str, ModelPrice] = field(default_factory=dict)
    tracing: Tracing = field(default_factory=Tracing)


def _setting(name: str) -> Any:
    return getattr(settings, PREFIX + name, DEFAULTS[name])


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ImproperlyConfigured(f"{name} must be a positive integer, got {value!r}.")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ImproperlyConfigured(f"{name} must be a whole number of seconds, got {value!r}.")
    return value


def _optional_positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ImproperlyConfigured(f"{name} must be a positive integer or None, got {value!r}.")
    return value


def parse_rate_limit(value: Any) -> RateLimit | None:
    """Parse ``"20/m"``, ``"100/h"``, ``"5/10s"`` or ``None`` (no limit) into a ``RateLimit``."""
    if value in (None, ""):
        return None
    text = "".join(value.lower().split()) if isinstance(value, str) else ""
    match = _RATE_RE.match(text)
    unit = _RATE_UNITS.get(match.group(3)) if match else None
    multiplier = int(match.group(2) or 1) if match else 0
    if match is None or unit is None or int(match.group(1)) < 1 or multiplier < 1:
        raise ImproperlyConfigured(
            f"{PREFIX}RATE_LIMIT must look like '20/m', '100/h' or '5/10s' (a count per "
            f"second, minute, hour or day) or be None, got {value!r}."
        )
    return RateLimit(count=int(match.group(1)), seconds=unit * multiplier)


def validate_run_options(options: Any, *, max_turns: int, source: str) -> dict[str, Any]:
    """Return ``options`` if it only holds allowlisted, well-typed keys; raise ``ValueError``."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"{source} must be an object, got {type(options).__name__}.")
    unknown = sorted(set(options) - ALLOWED_RUN_OPTIONS)
    if unknown:
        allowed = ", ".join(sorted(ALLOWED_RUN_OPTIONS))
        raise ValueError(f"{source} has unsupported keys {unknown}; allowed: {allowed}.")
    if "max_turns" in options:
        turns = options["max_turns"]
        if isinstance(turns, bool) or not isinstance(turns, int) or not 1 <= turns <= max_turns:
            raise ValueError(f"{source}: max_turns must be an integer from 1 to {max_turns}.")
    return dict(options)


def _with_defaults(name: str, value: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """A dict setting (None: empty) over its ``defaults``; unknown keys are an error."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ImproperlyConfigured(f"{name} must be a dict, got {type(value).__name__}.")
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise ImproperlyConfigured(
            f"{name} has unknown keys {unknown}; expected some of {sorted(defaults)}."
        )
    return {**defaults, **value}


def _cleanup_policy(value: Any) -> CleanupPolicy:
    name = f"{PREFIX}CLEANUP_POLICY"
    merged = _with_defaults(name, value, CLEANUP_DEFAULTS)
    days = {
        key: _optional_positive_int(f"{name}['{key}']", merged[key])
        for key in ("events_days", "runs_days", "sessions_days", "usage_days", "trace_days")
    }
    statuses = merged["runs_statuses"]
    if (
        not isinstance(statuses, list | tuple)
        or not statuses
        or any(s not in TERMINAL_STATUSES for s in statuses)
    ):
        raise ImproperlyConfigured(
            f"{name}['runs_statuses'] must be a non-empty list of {list(TERMINAL_STATUSES)}, "
            f"got {statuses!r}."
        )
    if not isinstance(merged["sessions_require_empty"], bool):
        raise ImproperlyConfigured(f"{name}['sessions_require_empty'] must be True or False.")
    return CleanupPolicy(
        events_days=days["events_days"],
        runs_days=days["runs_days"],
        runs_statuses=tuple(statuses),
        sessions_days=days["sessions_days"],
        sessions_require_empty=merged["sessions_require_empty"],
        batch_size=_positive_int(f"{name}['batch_size']", merged["batch_size"]),
        usage_days=days["usage_days"],
        trace_days=days["trace_days"],
    )


def _tracing(value: Any) -> Tracing:
    name = f"{PREFIX}TRACING"
    merged = _with_defaults(name, value, TRACING_DEFAULTS)
    for key in TRACING_DEFAULTS:
        if not isinstance(merged[key], bool):
            raise ImproperlyConfigured(f"{name}['{key}'] must be True or False.")
    return Tracing(**merged)


def _money(name: str, value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ImproperlyConfigured(f"{name} must be an amount in US dollars, got {value!r}.")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ImproperlyConfigured(
            f"{name} must be an amount in US dollars, got {value!r}."
        ) from None
    if not amount.is_finite() or amount < 0:
        raise ImproperlyConfigured(f"{name} must be zero or more US dollars, got {value!r}.")
    return amount


def _budgets(value: Any) -> Budgets:
    name = f"{PREFIX}BUDGETS"
    merged = _with_defaults(name, value, BUDGET_DEFAULTS)
    if merged["period"] not in BUDGET_PERIODS:
        raise ImproperlyConfigured(
            f"{name}['period'] must be one of {', '.join(BUDGET_PERIODS)}, "
            f"got {merged['period']!r}."
        )
    if merged["on_exceeded"] not in ("pause", "fail"):
        raise ImproperlyConfigured(
            f"{name}['on_exceeded'] must be 'pause' or 'fail', got {merged['on_exceeded']!r}."
        )
    warn_at = merged["warn_at"]
    if isinstance(warn_at, bool) or not isinstance(warn_at, int | float) or not 0 < warn_at <= 1:
        raise ImproperlyConfigured(f"{name}['warn_at'] must be a fraction above 0 up to 1.")
    limits = merged["user_limits"]
    if limits is not None and (not isinstance(limits, str) or "." not in limits):
        raise ImproperlyConfigured(
            f"{name}['user_limits'] must be a dotted path to a callable(user) or None."
        )
    return Budgets(
        period=merged["period"],
        user_cost=_money(f"{name}['user_cost']", merged["user_cost"]),
        user_tokens=_optional_positive_int(f"{name}['user_tokens']", merged["user_tokens"]),
        run_cost=_money(f"{name}['run_cost']", merged["run_cost"]),
        run_tokens=_optional_positive_int(f"{name}['run_tokens']", merged["run_tokens"]),
        warn_at=float(warn_at),
        on_exceeded=merged["on_exceeded"],
        user_limits=limits,
    )


# US dollars per million tokens no model costs (the ledger's cost column holds 10^9 dollars).
MAX_PRICE = Decimal(10_000)


def _model_prices(value: Any) -> dict[str, ModelPrice]:
    name = f"{PREFIX}MODEL_PRICES"
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ImproperlyConfigured(f"{name} must be a dict, got {type(value).__name__}.")
    prices = {}
    for model, price in value.items():
        where = f"{name}[{model!r}]"
        if not isinstance(model, str) or not model:
            raise ImproperlyConfigured(f"{name} keys must be model names, got {model!r}.")
        if not isinstance(price, dict) or not {"input", "output"} <= set(price):
            raise ImproperlyConfigured(
                f"{where} must be a dict with 'input' and 'output' (and optionally "
                "'cached_input'): US dollars per million tokens."
            )
        unknown = sorted(set(price) - set(PRICE_KEYS))
        if unknown:
            raise ImproperlyConfigured(f"{where} has unknown keys {unknown}.")
        amounts = {key: _money(f"{where}['{key}']", price.get(key)) for key in PRICE_KEYS}
        for key, amount in amounts.items():
            if amount is None and key != "cached_input":
                raise ImproperlyConfigured(
                    f"{where}['{key}'] must be an amount in US dollars per million tokens."
                )
            if amount is not None and amount > MAX_PRICE:
                raise ImproperlyConfigured(
                    f"{where}['{key}'] must be at most {MAX_PRICE} US dollars per million "
                    f"tokens, got {price[key]!r}."
                )
        prices[model] = ModelPrice(
            input=amounts["input"],
            output=amounts["output"],
            cached_input=amounts["cached_input"]
            if amounts["cached_input"] is not None
            else amounts["input"],
        )
    return prices


def load_config() -> AgenticConfig:
    """Read and validate every setting; raise ``ImproperlyConfigured`` on the first bad one."""
    registry = _setting("AGENT_REGISTRY")
    if registry is not None and (not isinstance(registry, str) or "." not in registry):
        raise ImproperlyConfigured(
            f"{PREFIX}AGENT_REGISTRY must be a dotted path to a callable returning "
            f"{{agent_key: factory}}, got {registry!r}."
        )
    default_key = _setting("DEFAULT_AGENT_KEY")
    if not isinstance(default_key, str) or not default_key:
        raise ImproperlyConfigured(f"{PREFIX}DEFAULT_AGENT_KEY must be a non-empty string.")
    max_turns = _positive_int(f"{PREFIX}MAX_TURNS", _setting("MAX_TURNS"))
    try:
        default_options = validate_run_options(
            _setting("DEFAULT_RUN_OPTIONS"),
            max_turns=max_turns,
            source=f"{PREFIX}DEFAULT_RUN_OPTIONS",
        )
    except ValueError as exc:
        raise ImproperlyConfigured(str(exc)) from exc
    limit = _optional_positive_int(f"{PREFIX}CONCURRENCY_LIMIT", _setting("CONCURRENCY_LIMIT"))
    enable_events = _setting("ENABLE_EVENTS")
    if not isinstance(enable_events, bool):
        raise ImproperlyConfigured(f"{PREFIX}ENABLE_EVENTS must be True or False.")
    recovery = _setting("STARTUP_RECOVERY")
    if recovery not in RECOVERY_MODES:
        raise ImproperlyConfigured(
            f"{PREFIX}STARTUP_RECOVERY must be one of {', '.join(RECOVERY_MODES)}, "
            f"got {recovery!r}."
        )
    serializer = _setting("SESSION_SERIALIZER")
    if serializer is not None and (not isinstance(serializer, str) or "." not in serializer):
        raise ImproperlyConfigured(
            f"{PREFIX}SESSION_SERIALIZER must be a dotted path to an item serializer class "
            f"or None, got {serializer!r}."
        )
    strategy = _setting("MULTITASK_STRATEGY")
    if strategy not in MULTITASK_STRATEGIES:
        raise ImproperlyConfigured(
            f"{PREFIX}MULTITASK_STRATEGY must be one of {', '.join(MULTITASK_STRATEGIES)}, "
            f"got {strategy!r}."
        )
    lease = _positive_int(f"{PREFIX}LEASE_SECONDS", _setting("LEASE_SECONDS"))
    if lease < 5:
        raise ImproperlyConfigured(f"{PREFIX}LEASE_SECONDS must be at least 5 seconds.")
    return AgenticConfig(
        agent_registry=registry,
        default_agent_key=default_key,
        default_run_options=default_options,
        concurrency_limit=limit,
        enable_events=enable_events,
        rate_limit=parse_rate_limit(_setting("RATE_LIMIT")),
        max_input_bytes=_optional_positive_int(
            f"{PREFIX}MAX_INPUT_BYTES", _setting("MAX_INPUT_BYTES")
        ),
        max_input_items=_optional_positive_int(
            f"{PREFIX}MAX_INPUT_ITEMS", _setting("MAX_INPUT_ITEMS")
        ),
        max_turns=max_turns,
        startup_recovery=recovery,
        cleanup_policy=_cleanup_policy(_setting("CLEANUP_POLICY")),
        run_timeout_seconds=_positive_int(f"{PREFIX}RUN_TIMEOUT", _setting("RUN_TIMEOUT")),
        lease_seconds=lease,
        approval_timeout_seconds=_positive_int(
            f"{PREFIX}APPROVAL_TIMEOUT", _setting("APPROVAL_TIMEOUT")
        ),
        session_serializer=serializer,
        max_attempts=_positive_int(f"{PREFIX}MAX_ATTEMPTS", _setting("MAX_ATTEMPTS")),
        worker_concurrency=_positive_int(
            f"{PREFIX}WORKER_CONCURRENCY", _setting("WORKER_CONCURRENCY")
        ),
        worker_shutdown_grace=_non_negative_int(
            f"{PREFIX}WORKER_SHUTDOWN_GRACE", _setting("WORKER_SHUTDOWN_GRACE")
        ),
        multitask_strategy=strategy,
        budgets=_budgets(_setting("BUDGETS")),
        model_prices=_model_prices(_setting("MODEL_PRICES")),
        tracing=_tracing(_setting("TRACING")),
    )


@cache
def get_config() -> AgenticConfig:
    """Return the validated settings (cached until a setting changes)."""
    return load_config()


@receiver(setting_changed)
def _clear_config_cache(*, setting: str, **kwargs: Any) -> None:
    if setting.startswith(PREFIX) or setting == "TASKS":
        get_config.cache_clear()
