"""Shared machinery of the benchmarks: environment, interleaved timing, statistics, reports.

Absolute times drift on shared machines, so every benchmark times its variants in one process,
in alternating blocks, and reports ratios against a floor measured in the same blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SETTINGS_MODULE = "benchmarks.settings"
PACKAGES = (
    "django",
    "openai-agents",
    "django-tasks",
    "django-tasks-db",
    "django-tasks-rq",
    "django-rq",
    "rq",
    "redis",
    "psycopg",
    "uvicorn",
    "playwright",
)

# A variant's call does the timed work and may return a check to run after the clock stops.
Check = Callable[[], None]
Call = Callable[[], Check | None]


@dataclass
class Variant:
    """One thing to time: ``call`` once per sample, inside ``around`` (entered per block)."""

    name: str
    call: Call
    around: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext


@dataclass
class Stats:
    """Summary of one variant's samples, in milliseconds."""

    n: int
    median_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float


@dataclass
class Timings:
    """Samples (seconds) per variant, and each block's median per variant in block order."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    block_medians: dict[str, list[float]] = field(default_factory=dict)

    def stats(self, name: str) -> Stats:
        """Median, p95, mean and min of ``name``'s samples."""
        values = sorted(self.samples[name])
        return Stats(
            n=len(values),
            median_ms=statistics.median(values) * 1000,
            p95_ms=percentile(values, 95) * 1000,
            mean_ms=statistics.fmean(values) * 1000,
            min_ms=values[0] * 1000,
        )

    def ratio(self, name: str, floor: str) -> float:
        """Median over blocks of (block median of ``name``) / (block median of ``floor``)."""
        pairs = zip(self.block_medians[name], self.block_medians[floor], strict=True)
        return statistics.median(value / base for value, base in pairs)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def interleave(variants: list[Variant], *, runs: int, block: int, warmup: int) -> Timings:
    """Time ``runs`` calls of each variant in blocks of ``block``, alternating the variants.

    The starting variant rotates every round so none always runs first after a GC pass.
    """
    for variant in variants:
        with variant.around():
            for _ in range(warmup):
                _checked(variant.call)
    timings = Timings(
        samples={v.name: [] for v in variants}, block_medians={v.name: [] for v in variants}
    )
    rounds = max(1, math.ceil(runs / block))
    for index in range(rounds):
        size = min(block, runs - index * block)
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            with variant.around():
                gc.collect()
                times = []
                for _ in range(size):
                    start = time.perf_counter()
                    check = variant.call()
                    times.append(time.perf_counter() - start)
                    if check is not None:
                        check()
            timings.samples[variant.name].extend(times)
            timings.block_medians[variant.name].append(statistics.median(times))
    return timings


def _checked(call: Call) -> None:
    check = call()
    if check is not None:
        check()


@dataclass
class QueryCount:
    """SQL statements per call (mean over the counted calls) and the SQL of the last call."""

    per_call: float
    transaction_control: float
    last_sql: list[str]


TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE SAVEPOINT")


def count_queries(variant: Variant, *, repeat: int = 3) -> QueryCount:
    """Count the SQL statements of ``repeat`` (untimed) calls, transaction control included."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    counts: list[int] = []
    control: list[int] = []
    last: list[str] = []
    with variant.around():
        for _ in range(repeat):
            with CaptureQueriesContext(connection) as captured:
                check = variant.call()
            last = [query["sql"] for query in captured.captured_queries]
            counts.append(len(last))
            control.append(sum(sql.upper().startswith(TRANSACTION_CONTROL) for sql in last))
            if check is not None:
                check()
    return QueryCount(statistics.fmean(counts), statistics.fmean(control), last)


def profile(variants: list[Variant], pattern: str | None, *, runs: int) -> list[str]:
    """Profiles of ``runs`` calls of each variant whose name contains ``pattern``: pyinstrument's
    when it is installed, else cProfile's."""
    if not pattern:
        return []
    try:
        from pyinstrument import Profiler
    except ImportError:
        Profiler = None
    outputs = []
    for variant in variants:
        if pattern not in variant.name:
            continue
        with variant.around():
            if Profiler is None:
                text = _cprofile(variant, runs)
            else:
                profiler = Profiler(interval=0.0005)
                profiler.start()
                for _ in range(runs):
                    variant.call()
                profiler.stop()
                text = profiler.output_text(unicode=False, color=False)
        outputs.append(f"Profile of {runs} calls, {variant.name}:\n{text}")
    return outputs


def _cprofile(variant: Variant, runs: int, lines: int = 40) -> str:
    """The standard library's profile, by cumulative time (without pyinstrument)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(runs):
        variant.call()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(lines)
    return out.getvalue()


@contextlib.contextmanager
def environment(*, task_backend: str = "immediate") -> Iterator[dict[str, Any]]:
    """Configure Django with ``benchmarks.settings`` and create a throwaway test database (an
    SQLite file, or ``test_<name>`` on the server ``DATABASE_URL`` names); drop it after.

    A benchmark is a process of its own, started in the baked project (``python -m benchmarks``).
    """
    # Whitenoise warns that STATIC_ROOT was never collected; benchmarks serve no static files.
    warnings.filterwarnings("ignore", message="No directory at", category=UserWarning)
    workdir = Path(tempfile.mkdtemp(prefix="agentic-bench-"))
    try:
        with _standalone(task_backend, workdir) as database:
            yield {"database": database, "workdir": workdir}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _standalone(task_backend: str, workdir: Path) -> Iterator[str]:
    base_module = os.environ.get("DJANGO_SETTINGS_MODULE")
    if base_module and base_module != SETTINGS_MODULE:
        os.environ["BENCH_BASE_SETTINGS"] = base_module
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
    os.environ["BENCH_TASK_BACKEND"] = task_backend
    import django

    django.setup()
    from django.db import connection

    if connection.vendor == "sqlite":
        # A file, like the project's default database, not the in-memory test database.
        connection.settings_dict.setdefault("TEST", {})["NAME"] = str(workdir / "bench.sqlite3")
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        yield connection.settings_dict["NAME"]
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)


def bench_user(username: str = "bench") -> Any:
    """The user that owns every benchmark run (created once)."""
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(username=username)
    return user


def parser(
    description: str, *, runs: int, block: int, warmup: int, introspect: bool = False
) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares (``--sql``/``--profile`` too
    when ``introspect``)."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--runs", type=int, default=runs, help="samples per variant")
    result.add_argument("--block", type=int, default=block, help="samples per block")
    result.add_argument("--warmup", type=int, default=warmup, help="untimed calls per variant")
    result.add_argument("--json", dest="json_path", help="also write the report as JSON here")
    if introspect:
        result.add_argument(
            "--sql", action="store_true", help="print the SQL statements of one call per variant"
        )
        result.add_argument(
            "--profile",
            metavar="VARIANT",
            help="also profile the variants named like VARIANT (pyinstrument, else cProfile)",
        )
    return result


def machine() -> dict[str, Any]:
    """The machine, Python, package versions and database server a report was measured on."""
    from django.db import connection

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    connection.ensure_connection()
    if connection.vendor == "postgresql":
        server = f"PostgreSQL {connection.pg_version // 10000}.{connection.pg_version % 10000}"
    else:
        server = f"{connection.vendor} {connection.Database.sqlite_version}"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "database": server,
        "packages": versions,
    }


def row(
    timings: Timings, name: str, *, floor: str | None, queries: QueryCount | None
) -> dict[str, Any]:
    """One report row: the stats of ``name``, its ratio to ``floor`` and its queries per call."""
    result: dict[str, Any] = {"variant": name, **asdict(timings.stats(name))}
    result["ratio"] = timings.ratio(name, floor) if floor else None
    result["floor"] = floor
    result["queries"] = queries.per_call if queries else None
    result["transaction_queries"] = queries.transaction_control if queries else None
    result["sql"] = queries.last_sql if queries else None
    return result


def target(name: str, *, value: float, limit: float, unit: str = "") -> dict[str, Any]:
    """A target line of a report: met when ``value`` is at most ``limit``."""
    return {"target": name, "value": value, "limit": limit, "unit": unit, "met": value <= limit}


def emit(
    report: dict[str, Any], *, argv: list[str], json_path: str | None, show_sql: bool = False
) -> dict[str, Any]:
    """Print ``report`` as Markdown (paste-ready for docs/benchmarks.md); write JSON if asked."""
    report = {"command": "python -m " + " ".join(argv), **report}
    out = sys.stdout
    out.write(f"\n## {report['title']}\n\n`{report['command']}`\n\n")
    machine_info = report.get("machine", {})
    if machine_info:
        packages = ", ".join(f"{k} {v}" for k, v in machine_info["packages"].items())
        out.write(
            f"{machine_info['cpu']} ({machine_info['cores']} cores), Python "
            f"{machine_info['python']}, {machine_info['database']}; {packages}\n\n"
        )
    for table in report["tables"]:
        out.write(f"**{table['title']}**\n\n")
        columns = table["columns"]
        out.write("| " + " | ".join(label for _, label in columns) + " |\n")
        out.write("|" + "---|" * len(columns) + "\n")
        for item in table["rows"]:
            out.write("| " + " | ".join(_cell(item.get(key)) for key, _ in columns) + " |\n")
        out.write("\n")
    for item in report.get("targets", []):
        verdict = "met" if item["met"] else "MISSED"
        out.write(
            f"- {item['target']}: {_cell(item['value'])}{item['unit']} "
            f"(limit {_cell(item['limit'])}{item['unit']}) - {verdict}\n"
        )
    for note in report.get("notes", []):
        out.write(f"- {note}\n")
    for text in report.get("profiles", []):
        out.write(f"\n{text}")
    if show_sql:
        for table in report["tables"]:
            for item in table["rows"]:
                if item.get("sql"):
                    out.write(f"\nSQL of one call, {table['title']}, {item['variant']}:\n")
                    out.writelines(f"  {sql}\n" for sql in item["sql"])
    out.flush()
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2, default=str))
    return report


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


RUN_COLUMNS = [
    ("variant", "variant"),
    ("median_ms", "median ms"),
    ("p95_ms", "p95 ms"),
    ("ratio", "ratio"),
    ("floor", "vs floor"),
    ("queries", "SQL/run"),
    ("transaction_queries", "of which BEGIN/COMMIT"),
    ("n", "n"),
]
