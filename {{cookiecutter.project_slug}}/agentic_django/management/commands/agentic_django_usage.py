"""Report model usage and cost from the ledger, grouped per user, model, day (or as chosen)."""

from __future__ import annotations

import argparse
import csv
from datetime import date, datetime, time, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import F, QuerySet
from django.db.models.functions import TruncDate
from django.utils import timezone

from agentic_django.conf import get_config
from agentic_django.models import AgentUsage
from agentic_django.usage import (
    Totals,
    decimal_string,
    period_bounds,
    totals,
    totals_aggregates,
    totals_of,
)

# What a report can be grouped by.
GROUPS = ("user", "agent", "model", "provider", "day", "run")
COLUMNS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost",
    "unpriced_calls",
)


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got {value!r}") from None


def _days(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of days (1 or more), got {value!r}"
        )
    return number


def _groups(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in GROUPS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct names among {', '.join(GROUPS)} separated by commas, got {value!r}"
        )
    return names


def _midnight(day: date) -> datetime:
    """The start of ``day`` in TIME_ZONE."""
    return timezone.make_aware(datetime.combine(day, time.min))


class Command(BaseCommand):
    help = (
        "Report model calls, tokens and cost from the usage ledger, by default for the current "
        "budget period grouped per user, model and day. Dates are in TIME_ZONE."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--by",
            type=_groups,
            default=("user", "model", "day"),
            help=f"Group by these, comma-separated, among {', '.join(GROUPS)} "
            "(default: user,model,day).",
        )
        parser.add_argument("--since", type=_date, help="From this day on (YYYY-MM-DD).")
        parser.add_argument("--until", type=_date, help="Up to and including this day.")
        parser.add_argument(
            "--days", type=_days, help="The last N days, today included (instead of the period)."
        )
        parser.add_argument("--user", help="Only this user (username or id).")
        parser.add_argument(
            "--csv", action="store_true", help="Write CSV (exact costs) instead of a table."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        start, end = self._bounds(options["since"], options["until"], options["days"])
        rows = AgentUsage.objects.all()
        if start is not None:
            rows = rows.filter(created_at__gte=start)
        if end is not None:
            rows = rows.filter(created_at__lt=end)
        if options["user"] is not None:
            rows = rows.filter(owner=self._user(options["user"]))
        groups = options["by"]
        found = [(self._keys(row, groups), totals_of(row)) for row in self._grouped(rows, groups)]
        if options["csv"]:
            self._write_csv(groups, found)
        else:
            self._write_table(groups, found, totals(rows), _describe(start, end))

    def _bounds(
        self, since: date | None, until: date | None, days: int | None
    ) -> tuple[datetime | None, datetime | None]:
        """``[start, end)``: of the dates given, else of the last ``days``, else of the budget
        period in progress. A missing side is open."""
        if days is not None and (since or until):
            raise CommandError("Give either --days or --since/--until, not both.")
        if since and until and since > until:
            raise CommandError(f"--since ({since}) is after --until ({until}).")
        try:
            if days is not None:
                today = timezone.localdate()
                start = _midnight(today - timedelta(days=days - 1))
                return start, _midnight(today + timedelta(days=1))
            if since or until:
                return (
                    _midnight(since) if since else None,
                    _midnight(until + timedelta(days=1)) if until else None,
                )
        except OverflowError:
            raise CommandError("The dates asked for are out of range.") from None
        return period_bounds(get_config().budgets.period)

    def _user(self, value: str) -> Any:
        users = get_user_model()._default_manager
        found = users.filter(**{users.model.USERNAME_FIELD: value}).first()
        if found is None and value.isdigit():
            found = users.filter(pk=int(value)).first()
        if found is None:
            raise CommandError(f"No user with the username or id {value!r}.")
        return found

    def _grouped(self, rows: QuerySet, groups: tuple[str, ...]) -> list[dict[str, Any]]:
        username = f"owner__{get_user_model().USERNAME_FIELD}"
        expressions = {
            "user": F(username),
            "agent": F("agent_name"),
            "model": F("model"),
            "provider": F("provider"),
            "day": TruncDate("created_at"),
            "run": F("run_id"),
        }
        # A user is grouped by id: two users never merge, even under one name.
        fields = {f"by_{name}": expressions[name] for name in groups}
        extra = ("owner_id",) if "user" in groups else ()
        keys = [*fields, *extra]
        return list(
            rows.order_by().values(*extra, **fields).annotate(**totals_aggregates()).order_by(*keys)
        )

    def _keys(self, row: dict[str, Any], groups: tuple[str, ...]) -> list[str]:
        return ["" if row[f"by_{name}"] is None else str(row[f"by_{name}"]) for name in groups]

    def _write_csv(self, groups: tuple[str, ...], found: list[tuple[list[str], Totals]]) -> None:
        writer = csv.writer(self.stdout, lineterminator="\n")
        writer.writerow([*groups, *COLUMNS])
        for keys, row in found:
            # Empty, not 0, when no call of the row had a price.
            cost = "" if row.unpriced == row.calls else decimal_string(row.cost)
            writer.writerow([*keys, *_counts(row), cost, row.unpriced])

    def _write_table(
        self,
        groups: tuple[str, ...],
        found: list[tuple[list[str], Totals]],
        total: Totals,
        when: str,
    ) -> None:
        if not found:
            self.stdout.write(f"No model calls {when}.")
            return
        header = [*groups, *(name.replace("_", " ") for name in COLUMNS)]
        lines = [[*(key or "-" for key in keys), *_shown(row)] for keys, row in found]
        footer = ["total", *[""] * (len(groups) - 1), *_shown(total)]
        widths = [
            max(len(line[i]) for line in (header, *lines, footer)) for i in range(len(header))
        ]
        rule = ["-" * width for width in widths]

        def aligned(cells: list[str]) -> str:
            # Names to the left, numbers to the right.
            return "  ".join(
                cell.ljust(width) if i < len(groups) else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        self.stdout.write(f"Model usage {when}, by {', '.join(groups)} (costs in US dollars):")
        for line in (header, rule, *lines, rule, footer):
            self.stdout.write(aligned(line))


def _counts(row: Totals) -> list[int]:
    return [
        row.calls,
        row.input_tokens,
        row.output_tokens,
        row.cached_tokens,
        row.reasoning_tokens,
        row.total_tokens,
    ]


def _shown(row: Totals) -> list[str]:
    """A table row's numbers; the cost of calls none of which had a price is "unknown"."""
    cost = "unknown" if row.unpriced == row.calls else decimal_string(row.cost)
    return [*(f"{number:,}" for number in _counts(row)), cost, f"{row.unpriced:,}"]


def _describe(start: datetime | None, end: datetime | None) -> str:
    def day(moment: datetime) -> str:
        return timezone.localtime(moment).strftime("%Y-%m-%d")

    if start is None and end is None:
        return "of all time"
    if end is None:
        return f"from {day(start)} on"
    last = day(end - timedelta(microseconds=1))
    if start is None:
        return f"up to {last}"
    return f"from {day(start)} to {last}"
