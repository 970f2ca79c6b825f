"""Usage ledger, prices and budgets.

Every model call a run makes is one ``AgentUsage`` row, inserted under the attempt's fence in
the same statement that numbers it (so an attempt that lost its run records nothing, and a
retried run's repeated call is told apart from the first by its attempt). A run's own totals
-- what the SDK reports for it -- are its rows not superseded; money spent is every row,
superseded or not: a call made by an attempt whose worker died after it was paid for.

Prices come from ``AGENTIC_DJANGO_MODEL_PRICES`` (US dollars per million tokens, for models
of your own) and else from the price table of the ``genai-prices`` package, shipped with it
(nothing is downloaded at run time). A call whose price neither knows has no cost (NULL),
shown as unknown, never as 0; the token caps still count it.

Budgets (``AGENTIC_DJANGO_BUDGETS``) are checked before every model call: a run overshoots a
cap by at most the call in flight (with several runs of one user at once, one call per run).
Periods are calendar days or months in ``TIME_ZONE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import threading
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    transaction,
)
from django.db.models import Count, Q, Sum
from django.utils import timezone
from django.utils.module_loading import import_string

from agentic_django.conf import Budgets, get_config
from agentic_django.exceptions import AgenticDjangoError
from agentic_django.lifecycle import Fence
from agentic_django.models import AgentRun, AgentUsage
from agentic_django.signals import (
    agent_budget_threshold_reached,
    agent_usage_recorded,
    send_safely,
)

logger = logging.getLogger(__name__)

MILLION = Decimal(1_000_000)
OPENAI_HOST = "api.openai.com"


# --- What one call used, and what it cost ----------------------------------------------------


@dataclass(frozen=True)
class CallUsage:
    """The usage the SDK reports for one model call (``ModelResponse.usage``)."""

    requests: int = 1
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, usage: Any) -> CallUsage:
        def number(value: Any) -> int:
            return value if isinstance(value, int) and value > 0 else 0

        input_details = getattr(usage, "input_tokens_details", None)
        output_details = getattr(usage, "output_tokens_details", None)
        input_tokens = number(getattr(usage, "input_tokens", 0))
        output_tokens = number(getattr(usage, "output_tokens", 0))
        return cls(
            requests=number(getattr(usage, "requests", 1)),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_tokens=number(getattr(input_details, "cached_tokens", 0)),
            reasoning_tokens=number(getattr(output_details, "reasoning_tokens", 0)),
            total_tokens=number(getattr(usage, "total_tokens", 0)) or input_tokens + output_tokens,
        )


def model_of(model: Any) -> tuple[str, str]:
    """``(model name, provider)`` of a model a call went to (a ``Model``, or a model name for
    the SDK's default provider, OpenAI); "" where it cannot be told.

    The provider is "openai" for OpenAI's API, the genai-prices id of a provider whose API the
    client's base URL is (e.g. "deepseek"), else the URL's host (a server of your own)."""
    if model is None or isinstance(model, str):
        return (model or ""), "openai"
    name = getattr(model, "model", None) or getattr(model, "name", None)
    if not isinstance(name, str):
        name = ""
    client = getattr(model, "_client", None)
    base_url = str(getattr(client, "base_url", "") or "")
    if not base_url:
        return name, ""
    return name, provider_of_url(base_url)


@functools.cache
def provider_of_url(base_url: str) -> str:
    """The genai-prices provider id of the API at ``base_url``, else its host."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    # Scheme and host compared in lower case, as they are meant.
    base_url = parts._replace(scheme=parts.scheme.lower(), netloc=parts.netloc.lower()).geturl()
    if host == OPENAI_HOST:
        return "openai"
    try:
        from genai_prices import data_snapshot

        providers = data_snapshot.get_snapshot().providers
    except Exception:
        return host
    for provider in providers:
        pattern = getattr(provider, "api_pattern", None)
        if pattern and _is_api(pattern, base_url):
            return provider.id
    return host


def _is_api(pattern: str, base_url: str) -> bool:
    """Whether ``base_url`` is the API ``pattern`` describes -- its whole host: the patterns
    match an address's start, and "api.openai.com.gateway.internal" is a server of your own."""
    found = re.match(pattern, base_url)
    if found is None:
        return False
    matched, rest = found.group(0), base_url[found.end() :]
    if not rest or rest[0] in "/:?#" or matched.endswith("/"):
        return True
    if matched.endswith("."):  # a pattern that leaves the top-level domain open
        return "." not in re.split(r"[/:?#]", rest, maxsplit=1)[0]
    return False


@dataclass(frozen=True)
class Price:
    cost: Decimal | None
    source: str  # "settings", "genai-prices" or "" (unknown)


def price(model: str, provider: str, used: CallUsage, at: datetime | None = None) -> Price:
    """What a call cost: ``AGENTIC_DJANGO_MODEL_PRICES`` first, then genai-prices -- only for
    a provider it lists (OpenAI's API, or one whose API URL it knows): a model served from
    anywhere else (your own server, an unknown host) has no known price, whatever its name."""
    custom = get_config().model_prices.get(model)
    reported = used.input_tokens or used.output_tokens or used.total_tokens
    if not reported and not (custom is not None and not (custom.input or custom.output)):
        # The server reported no usage (some ignore include_usage): the cost is unknown, not
        # $0 (a free model excepted).
        return Price(None, "")
    if custom is not None:
        cached = min(used.cached_tokens, used.input_tokens)
        cost = (
            (used.input_tokens - cached) * custom.input
            + cached * custom.cached_input
            + used.output_tokens * custom.output
        ) / MILLION
        return Price(cost, "settings")
    if not model or not _known_provider(provider):
        # A self-hosted "deepseek-r1:7b" is not DeepSeek's API: never price it as if it were.
        return Price(None, "")
    try:
        from genai_prices import Usage, calc_price

        calculated = calc_price(
            Usage(
                input_tokens=used.input_tokens,
                output_tokens=used.output_tokens,
                cache_read_tokens=min(used.cached_tokens, used.input_tokens) or None,
            ),
            model_ref=model,
            provider_id=provider,
            genai_request_timestamp=at,
        )
    except LookupError:
        return Price(None, "")
    except Exception:
        logger.exception("agentic_django: pricing a call of %s failed; cost unknown", model)
        return Price(None, "")
    return Price(Decimal(calculated.total_price), "genai-prices")


@functools.cache
def _known_provider(provider: str) -> bool:
    if not provider:
        return False
    try:
        from genai_prices import data_snapshot

        providers = data_snapshot.get_snapshot().providers
    except Exception:
        return provider == "openai"
    return any(known.id == provider for known in providers)


# --- The ledger ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who a run's calls are charged to (from the run, read once per attempt)."""

    owner_id: Any
    session_id: Any

    @classmethod
    def of(cls, run: AgentRun) -> Caller:
        return cls(owner_id=run.owner_id, session_id=run.session_id)


def record(fence: Fence, caller: Caller, **call: Any) -> AgentUsage | None:
    """Write one call's ledger row (``call_row(fence, caller, **call)``, then ``store``);
    None if it could not be."""
    return store(fence, call_row(fence, caller, **call))


def call_row(
    fence: Fence,
    caller: Caller,
    *,
    turn: int,
    agent_name: str,
    model: str,
    provider: str,
    used: CallUsage,
) -> AgentUsage:
    """The (unsaved) ledger row of one call, priced now."""
    now = timezone.now()
    priced = price(model, provider, used, now)
    return AgentUsage(
        run_id=fence.run_id,
        attempt=fence.attempt,
        turn=turn,
        owner_id=caller.owner_id,
        session_id=caller.session_id,
        agent_name=agent_name[:255],
        model=model[:255],
        provider=provider[:255],
        requests=used.requests,
        input_tokens=used.input_tokens,
        output_tokens=used.output_tokens,
        cached_tokens=used.cached_tokens,
        reasoning_tokens=used.reasoning_tokens,
        total_tokens=used.total_tokens,
        cost=priced.cost,
        price_source=priced.source,
        priced_at=now,
        created_at=now,
    )


def store(fence: Fence, row: AgentUsage, *, again: bool = False) -> AgentUsage | None:
    """Insert ``row`` under the fence (one statement that also numbers it).

    An attempt that lost its run (recovery took it over, or it ended meanwhile) still paid for
    the call: its row goes in marked ``superseded`` -- spending, never the run's own totals
    (the attempt that holds the run makes its calls again). ``again``: a retry of a store
    whose outcome is unknown (the connection dropped): a row already stored is not stored
    twice. None if the row cannot be stored at all (its run or owner is gone).
    ``agent_usage_recorded`` is sent once it is stored."""
    if again and _already_stored(row):
        # Stored, but the answer was lost with the connection: nobody was told yet.
        send_safely(agent_usage_recorded, AgentUsage, usage=row)
        return row
    row.superseded = False
    if not _insert(fence, row) and not _insert_superseded(row):
        logger.warning(
            "agentic_django: dropped the usage of a model call of run %s attempt %s (the run "
            "or its owner is gone)",
            fence.run_id,
            fence.attempt,
        )
        return None
    send_safely(agent_usage_recorded, AgentUsage, usage=row)
    return row


def _already_stored(row: AgentUsage) -> bool:
    """Whether ``row`` is in the ledger: its attempt's row of the same moment (``created_at``
    is the microsecond the call was recorded, kept across retries of its store)."""
    found = (
        AgentUsage.objects.filter(
            run_id=row.run_id,
            attempt=row.attempt,
            created_at=row.created_at,
            total_tokens=row.total_tokens,
            agent_name=row.agent_name,
        )
        .values_list("pk", "sequence", "superseded")
        .first()
    )
    if found is None:
        return False
    row.pk, row.sequence, row.superseded = found
    return True


VALUE_FIELDS = (
    "run",
    "attempt",
    "turn",
    "superseded",
    "owner",
    "session",
    "agent_name",
    "model",
    "provider",
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost",
    "price_source",
    "priced_at",
    "created_at",
)


@functools.cache
def _insert_sql(vendor: str, condition_sql: str) -> str:
    meta = AgentUsage._meta
    qn = connection.ops.quote_name
    columns = [qn(meta.get_field(name).column) for name in ("sequence", *VALUE_FIELDS)]
    table, run_column = qn(meta.db_table), qn(meta.get_field("run").column)
    sequence = qn(meta.get_field("sequence").column)
    values = ", ".join(["%s"] * len(VALUE_FIELDS))
    # Only quoted model names are interpolated; every value is a parameter.
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608
        f"SELECT base.last + 1, {values} FROM "
        f"(SELECT COALESCE(MAX({sequence}), 0) AS last FROM {table} WHERE {run_column} = %s) base "
        f"WHERE {condition_sql} RETURNING {qn(meta.pk.column)}, {sequence}"
    )


def _insert(fence: Fence, row: AgentUsage) -> bool:
    """Insert ``row`` while the fence holds; False if it does not."""
    return _numbered(row, *fence.exists_sql())


def _run_exists_sql() -> str:
    meta = AgentRun._meta
    qn = connection.ops.quote_name
    return f"EXISTS (SELECT 1 FROM {qn(meta.db_table)} WHERE {qn(meta.pk.column)} = %s)"  # noqa: S608


# Tries of an insert that lost the race for its sequence number to another writer (an
# attempt that lost its run storing a late call beside the attempt that holds it).
INSERT_TRIES = 3


def _insert_superseded(row: AgentUsage) -> bool:
    """Insert ``row`` marked superseded, fence or not (its run exists); False if it cannot."""
    row.superseded = True
    run_id = AgentRun._meta.pk.get_db_prep_value(row.run_id, connection)
    return _numbered(row, _run_exists_sql(), (run_id,))


def _numbered(row: AgentUsage, condition_sql: str, condition_params: Any) -> bool:
    """Insert ``row`` where the condition holds, numbered after the run's last row; numbered
    again when another writer took that number meanwhile. False if it cannot be stored."""
    for _ in range(INSERT_TRIES):
        # Inside a transaction, a savepoint: a clash must not spoil it (none needed outside).
        inside = transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext()
        try:
            with inside:
                return _insert_where(row, condition_sql, condition_params)
        except IntegrityError:
            # Another writer took the same number, or the run or the owner was deleted
            # meanwhile: number it again (or give up).
            continue
    return False


def _insert_where(row: AgentUsage, condition_sql: str, condition_params: Any) -> bool:
    meta = AgentUsage._meta
    fields = [meta.get_field(name) for name in VALUE_FIELDS]
    params = [field.get_db_prep_save(getattr(row, field.attname), connection) for field in fields]
    run_id = meta.get_field("run").get_db_prep_value(row.run_id, connection)
    with connection.cursor() as cursor:
        cursor.execute(
            _insert_sql(connection.vendor, condition_sql), [*params, run_id, *condition_params]
        )
        found = cursor.fetchone()
    if found is None:
        return False
    row.pk, row.sequence = found
    return True


# --- Totals ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    """Sums over ledger rows. ``cost`` counts priced calls only; ``unpriced`` says how many
    calls had no known price (then the cost is a lower bound)."""

    calls: int = 0
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost: Decimal = Decimal(0)
    unpriced: int = 0

    @property
    def cost_known(self) -> bool:
        return self.unpriced == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "total_tokens": self.total_tokens,
            # A string: JSON numbers would round dollars to floats.
            "cost": decimal_string(self.cost),
            "cost_known": self.cost_known,
            "unpriced_calls": self.unpriced,
        }


TOTAL_FIELDS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
)


def totals_aggregates() -> dict[str, Any]:
    """The aggregates ``totals`` reads (also for ``values(...).annotate(**...)`` reports):
    ``calls``, ``unpriced``, ``cost_total`` and ``<field>_total`` of each token count."""
    return {
        "calls": Count("pk"),
        **{f"{name}_total": Sum(name) for name in TOTAL_FIELDS},
        "cost_total": Sum("cost"),
        "unpriced": Count("pk", filter=Q(cost__isnull=True)),
    }


def totals_of(row: dict[str, Any]) -> Totals:
    """``Totals`` from one row of ``totals_aggregates()``."""
    return Totals(
        calls=row.get("calls") or 0,
        **{name: row.get(f"{name}_total") or 0 for name in TOTAL_FIELDS},
        cost=Decimal(row.get("cost_total") or 0),
        unpriced=row.get("unpriced") or 0,
    )


def totals(rows: Any) -> Totals:
    """``Totals`` of a queryset of ``AgentUsage`` rows."""
    return totals_of(rows.aggregate(**totals_aggregates()))


def run_totals(run: AgentRun | Any) -> Totals:
    """What the run used as the SDK counts it: each call once, retries and resumes included."""
    run_id = getattr(run, "pk", run)
    return totals(AgentUsage.objects.filter(run_id=run_id, superseded=False))


def run_spend(run_id: Any) -> Totals:
    """What the run cost: every call paid for, a dead attempt's repeated ones included."""
    return totals(AgentUsage.objects.filter(run_id=run_id))


def session_totals(session_id: Any) -> Totals:
    return totals(AgentUsage.objects.filter(session_id=session_id))


def user_spend(owner_id: Any, since: datetime) -> Totals:
    return totals(AgentUsage.objects.filter(owner_id=owner_id, created_at__gte=since))


# --- Budgets ---------------------------------------------------------------------------------


def period_bounds(period: str, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The calendar period (``day`` or ``month``) holding ``now``: ``(start, next start)``.

    In ``TIME_ZONE`` always, never the time zone a request activated: the web (402s, the
    meter, ``resets_at``) and the workers (the checks before each call) count the same days.
    """
    tz = timezone.get_default_timezone()
    now = now or timezone.now()
    # Without USE_TZ, times are TIME_ZONE's wall clock already (naive).
    local = timezone.localtime(now, tz) if timezone.is_aware(now) else now
    start = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    if period == "day":
        end = start + timedelta(days=1)
    else:
        start = start.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    if not settings.USE_TZ:
        return start, end
    # Localized again: a DST change between start and end must not shift midnight.
    return timezone.make_aware(start, tz), timezone.make_aware(end, tz)


@dataclass(frozen=True)
class UserLimits:
    cost: Decimal | None
    tokens: int | None


def user_limits(owner: Any, budgets: Budgets | None = None) -> UserLimits:
    """The user's caps: ``user_limits`` (a callable of the project) or the settings."""
    budgets = budgets or get_config().budgets
    limits = UserLimits(budgets.user_cost, budgets.user_tokens)
    if budgets.user_limits is None:
        return limits
    if not hasattr(owner, "pk"):
        from django.contrib.auth import get_user_model

        owner = get_user_model().objects.filter(pk=owner).first()
    if owner is None:
        return limits
    from agentic_django.conf import _money, _optional_positive_int

    try:
        found = import_string(budgets.user_limits)(owner)
        if not found:
            return limits
        if not isinstance(found, dict):
            raise TypeError(f"expected a dict, got {type(found).__name__}")
        return UserLimits(
            cost=_money("user_limits()['user_cost']", found.get("user_cost", limits.cost)),
            tokens=_optional_positive_int(
                "user_limits()['user_tokens']", found.get("user_tokens", limits.tokens)
            ),
        )
    except Exception:
        # A bug in the project's callable must not stop the site, nor the sweep that resumes
        # every user's paused runs: this user gets the settings' caps until it is fixed.
        logger.exception(
            "agentic_django: %s failed for user %s; the settings' caps apply",
            budgets.user_limits,
            getattr(owner, "pk", owner),
        )
        return limits


@dataclass(frozen=True)
class Standing:
    """Where a user (and a run) stands against the budgets."""

    period: str
    period_start: datetime
    resets_at: datetime
    limits: UserLimits
    spent: Totals
    run_spent: Totals | None = None
    exceeded: str = ""  # "user_cost", "user_tokens", "run_cost", "run_tokens" or ""
    warn_at: float = 0.8

    @property
    def over(self) -> bool:
        return bool(self.exceeded)

    @property
    def warning(self) -> bool:
        """At or past the soft threshold of a user cap."""
        cost, tokens = self.limits.cost, self.limits.tokens
        return (cost is not None and self.spent.cost >= cost * Decimal(str(self.warn_at))) or (
            tokens is not None and self.spent.total_tokens >= tokens * self.warn_at
        )

    @property
    def message(self) -> str:
        return exceeded_message(self)

    def as_dict(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "period_start": self.period_start.isoformat(),
            "resets_at": self.resets_at.isoformat(),
            "limits": {
                "cost": decimal_string(self.limits.cost),
                "tokens": self.limits.tokens,
            },
            "spent": self.spent.as_dict(),
            "warning": self.warning,
            "exceeded": self.exceeded or None,
        }


def standing(
    owner: Any,
    run: AgentRun | None = None,
    *,
    now: datetime | None = None,
    limits: UserLimits | None = None,
) -> Standing:
    """The owner's spending this period against the caps (and the run's, if given);
    ``limits``: the owner's ``user_limits``, when the caller has them already."""
    budgets = get_config().budgets
    start, end = period_bounds(budgets.period, now)
    owner_id = getattr(owner, "pk", owner)
    if limits is None:
        limits = user_limits(owner, budgets)
    checks_user = limits.cost is not None or limits.tokens is not None
    spent = user_spend(owner_id, start) if checks_user or run is None else Totals()
    exceeded = ""
    if limits.cost is not None and spent.cost >= limits.cost:
        exceeded = "user_cost"
    elif limits.tokens is not None and spent.total_tokens >= limits.tokens:
        exceeded = "user_tokens"
    run_spent = None
    if run is not None and any(cap is not None for cap in budgets.run_caps):
        run_spent = run_spend(run.pk)
        if not exceeded and budgets.run_cost is not None and run_spent.cost >= budgets.run_cost:
            exceeded = "run_cost"
        elif (
            not exceeded
            and budgets.run_tokens is not None
            and run_spent.total_tokens >= budgets.run_tokens
        ):
            exceeded = "run_tokens"
    return Standing(
        period=budgets.period,
        period_start=start,
        resets_at=end,
        limits=limits,
        spent=spent,
        run_spent=run_spent,
        exceeded=exceeded,
        warn_at=budgets.warn_at,
    )


def exceeded_message(found: Standing) -> str:
    budgets = get_config().budgets
    when = timezone.localtime(found.resets_at).strftime("%Y-%m-%d %H:%M %Z")
    period = "today's" if found.period == "day" else "this month's"
    if found.exceeded == "user_cost":
        return (
            f"You have used {period} budget (${format_money(found.spent.cost)} of "
            f"${format_money(found.limits.cost)}). It resets at {when}."
        )
    if found.exceeded == "user_tokens":
        return (
            f"You have used {period} tokens ({found.spent.total_tokens:,} of "
            f"{found.limits.tokens:,}). They reset at {when}."
        )
    if found.exceeded == "run_cost":
        return f"This run reached its cost limit (${format_money(budgets.run_cost)})."
    if found.exceeded == "run_tokens":
        return f"This run reached its token limit ({budgets.run_tokens:,} tokens)."
    return ""


def decimal_string(amount: Decimal | None) -> str | None:
    """An amount for JSON and CSV: a plain decimal string, never an exponent ("0E-9") or a
    float, the same on every database ("0.0021", "0", "20")."""
    if amount is None:
        return None
    return format(amount.normalize(), "f")


def format_money(amount: Decimal | None) -> str:
    """Dollars as people read them: cents, or the first digits of a fraction of a cent
    ("0.20", "12.50", "0.0021"); "unknown" for None."""
    if amount is None:
        return "unknown"
    if amount == 0 or abs(amount) >= Decimal("0.01"):
        return f"{amount.quantize(Decimal('0.01')):f}"
    return f"{amount.quantize(Decimal('0.000001')).normalize():f}"


class BudgetExceeded(AgenticDjangoError):
    """The user has no budget left this period (HTTP 402, with when it resets)."""

    message = "You have used your budget."
    status_code = 402

    def __init__(self, found: Standing) -> None:
        super().__init__(found.message)
        seconds = max(1, int((found.resets_at - timezone.now()).total_seconds()))
        # Only a user cap blocks new runs, and it lifts when its period rolls over.
        self.retry_after = seconds
        self.details = {"reason": found.exceeded, "resets_at": found.resets_at.isoformat()}


def check_new_run(owner: Any) -> None:
    """Raise ``BudgetExceeded`` if the owner may not start a run now (a user cap is used up)."""
    budgets = get_config().budgets
    if budgets.user_limits is None and budgets.user_cost is None and budgets.user_tokens is None:
        return
    found = standing(owner)
    if found.exceeded in ("user_cost", "user_tokens"):
        raise BudgetExceeded(found)


class BudgetGuard:
    """Checks a run's budgets before each of its model calls, and warns once a call takes its
    owner past the soft threshold (``agent_budget_threshold_reached``)."""

    def __init__(self, run: AgentRun) -> None:
        self.run = run
        self.active = get_config().budgets.any
        self._last: Standing | None = None

    def before_call(self) -> Standing | None:
        """The standing if a cap is reached (the call must not be made), else None."""
        if not self.active:
            return None
        found = standing(self.run.owner_id, self.run)
        self._last = found
        return found if found.over else None

    def after_call(self, row: AgentUsage | None) -> None:
        before = self._last
        if before is None or row is None or before.warning or row.total_tokens == 0:
            return
        spent = before.spent
        after = Totals(
            calls=spent.calls + 1,
            total_tokens=spent.total_tokens + row.total_tokens,
            cost=spent.cost + (row.cost or 0),
        )
        crossed = replace(before, spent=after)
        if crossed.warning:
            send_safely(
                agent_budget_threshold_reached,
                AgentUsage,
                user_id=self.run.owner_id,
                run=self.run,
                standing=crossed,
            )


def resume_within_budgets() -> int:
    """Put back to pending every run paused on a budget that allows it now (its cap was
    raised, or the period rolled over); how many. Part of the periodic sweep."""
    from agentic_django import lifecycle

    paused = AgentRun.objects.filter(status=AgentRun.Status.BUDGET_EXCEEDED).order_by("created_at")
    resumed = 0
    for run in paused.only("pk", "owner_id", "session_id", "created_at"):
        try:
            if not standing(run.owner_id, run).over and lifecycle.resume_within_budget(run.pk):
                resumed += 1
        except DatabaseError:
            raise  # the database is away: the whole sweep waits for the next one
        except Exception:
            # One run's trouble must not keep the others paused, nor the sweep from going on.
            logger.exception("agentic_django: could not look at paused run %s", run.pk)
    return resumed


# Pauses between attempts to write a ledger row (None: the last attempt).
RECORD_RETRY_DELAYS = (0.2, 1.0, 3.0, None)


def _drop_connection() -> None:
    """Close this thread's connection unless a transaction holds it (the next query opens a
    fresh one)."""
    if not connection.in_atomic_block:
        connection.close()


class BudgetStop(Exception):
    """Raised before a model call a budget cannot pay for: the run stops there."""

    def __init__(self, found: Standing) -> None:
        super().__init__(found.message)
        self.standing = found


class UsageMeter:
    """One attempt's ledger and budget checks around each of its model calls: the run's own
    and those of the agents it runs in turn (an agent used as a tool, a ``Runner.run`` in a
    tool), whose models ``agentic_django.metering`` wraps. On the run's event loop (or a
    tool's); the database work in a thread."""

    def __init__(self, run: AgentRun, fence: Fence) -> None:
        self.fence = fence
        self.caller = Caller.of(run)
        self.guard = BudgetGuard(run)
        # The run's model turn (the hooks keep it current): a call an agent used as a tool
        # makes counts in the turn of the run that called the tool.
        self.turn = 1
        # Calls made at once (parallel tool calls) number their rows one at a time.
        self._store_lock = threading.Lock()
        # Streamed calls that answered, recorded at the next ``settle``.
        self._answered: deque[tuple[int, str, str, str, Any]] = deque()

    async def before_call(self) -> None:
        await self.settle()  # the calls made so far count
        if not self.guard.active:
            return
        from agentic_django.db import run_sync

        found = await run_sync(self.guard.before_call)()
        if found is not None:
            raise BudgetStop(found)

    def answered(self, agent_name: str, model: str, provider: str, usage: Any) -> None:
        """A streamed call answered: record it at the next ``settle`` -- once the run took
        the answer (the run's hooks settle as the SDK is done with a response, before its
        tools run; and before each checkpoint and call, and as the attempt ends)."""
        self._answered.append((self.turn, agent_name, model, provider, usage))

    async def settle(self) -> None:
        """Record the calls that answered and are not recorded yet."""
        while self._answered:
            turn, *call = self._answered.popleft()
            await self.after_call(*call, turn=turn)

    async def after_call(
        self, agent_name: str, model: str, provider: str, usage: Any, *, turn: int | None = None
    ) -> None:
        """Record a call that answered (``usage``: what the provider reported)."""
        from agentic_django.db import run_sync

        row = call_row(
            self.fence,
            self.caller,
            turn=self.turn if turn is None else turn,
            agent_name=agent_name,
            model=model,
            provider=provider,
            used=CallUsage.of(usage),
        )
        # The call is paid for: a moment's database trouble (a restart, a dropped connection)
        # must not lose its row, nor -- a store that did happen though its answer was lost --
        # store it twice. Retried a few times, a fresh connection each time; past that the
        # attempt stops and the run is retried (database_unavailable).
        stored = None
        for tries, delay in enumerate(RECORD_RETRY_DELAYS):
            try:
                stored = await run_sync(self._store)(row, tries > 0)
                break
            except (OperationalError, InterfaceError):
                if delay is None:
                    raise
                logger.warning("agentic_django: could not record a model call; retrying")
                await run_sync(_drop_connection)()
                await asyncio.sleep(delay)
        self.guard.after_call(stored)

    def _store(self, row: AgentUsage, again: bool) -> AgentUsage | None:
        with self._store_lock:
            return store(self.fence, row, again=again)
