"""Per-run cost against the reference package: this project's engine versus agentic-django
0.5.1 (PyPI), each over the same SDK floor.

    PYTHONPATH=<template> python -m benchmarks.compare_reference --runs 100

Both sides run the scripted ``chat`` and ``tool`` agents of ``benchmarks/scripted.py``, events
off, every run in a new conversation, on the database ``DATABASE_URL`` names (an SQLite file by
default; on PostgreSQL each side gets a throwaway database of its own), with the same database
settings. This side times ``public path`` (``run_overhead``'s: run + ``enqueue_agent_run``,
immediate task backend) and ``services.create_run``; the reference times
``submit_agent_run`` as its README sets it up (``benchmarks/reference.py``), in a process and a
virtualenv of its own (the packages share the module name ``agentic_django``), created once
with pip under ``--cache`` (default ``~/.cache/agentic-django-bench``; needs PyPI). Each side
also times the SDK floor (``Runner.run`` + the SDK's ``SQLiteSession``) in the same blocks, so
the comparison is the ratio of the two ratios to their own floors -- the processes' absolute
times need not agree; the direct ratio of medians is shown beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from typing import Any

from benchmarks import common, scripted

REFERENCE = "agentic-django==0.5.1"
# The reference's own dependencies, pinned to this project's versions.
REFERENCE_DEPENDENCIES = (
    "django==6.1.3",
    "django-tasks==0.12.0",
    "openai-agents==0.24.0",
    "psycopg[binary]==3.3.9",
    "psycopg-pool==3.3.3",
)
OURS = ("public path", "services.create_run")
LIMIT = 1.0
COLUMNS = [
    ("variant", "variant"),
    ("median_ms", "median ms"),
    ("floor_ms", "floor median ms"),
    ("over_floor", "x its floor"),
    ("over_bare", "x its Runner.run"),
    ("queries", "SQL/run"),
]


def reference_python(cache: Path) -> Path:
    """The interpreter of a virtualenv with the reference package (created once)."""
    home = cache / "reference-0.5.1"
    python = home / "bin" / "python"
    marker = home / ".installed"
    if not marker.exists():
        venv.create(home, with_pip=True, clear=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", REFERENCE, *REFERENCE_DEPENDENCIES],
            check=True,
        )
        marker.touch()
    return python


def measure_reference(args: Any, database: dict[str, Any]) -> dict[str, Any]:
    """Run ``benchmarks.reference`` in the reference's virtualenv; its report."""
    python = reference_python(Path(args.cache).expanduser())
    database = {**database, "NAME": f"{database['NAME']}_reference"}
    if database["ENGINE"].endswith("sqlite3"):
        database["NAME"] = str(Path(tempfile.gettempdir()) / "agentic-reference.sqlite3")
    template = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="agentic-compare-") as workdir:
        out = Path(workdir) / "reference.json"
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("DJANGO_", "VIRTUAL_ENV"))
        }
        env.update({"PYTHONPATH": str(template), "OPENAI_AGENTS_DISABLE_TRACING": "1"})
        command = [str(python), "-m", "benchmarks.reference", "--out", str(out)]
        command += ["--runs", str(args.runs), "--block", str(args.block)]
        command += ["--warmup", str(args.warmup), "--database", json.dumps(plain(database))]
        subprocess.run(command, check=True, env=env, cwd=workdir)
        return json.loads(out.read_text())


def plain(settings: dict[str, Any]) -> dict[str, Any]:
    """Database settings as JSON can carry them: without callables (a pool's ``check``)."""
    return {
        key: plain(value) if isinstance(value, dict) else value
        for key, value in settings.items()
        if not callable(value)
    }


def measure_ours(args: Any, workdir: Path) -> dict[str, Any]:
    """This project's public paths and floors, as ``run_overhead`` times them."""
    from benchmarks.run_overhead import build_variants

    user = common.bench_user()
    report: dict[str, Any] = {}
    for agent_key in run_agents(args):
        chosen = [
            variant
            for variant in build_variants(agent_key, user=user, workdir=workdir)
            if variant.name in (scripted.BARE, scripted.FLOOR, *OURS)
        ]
        report[agent_key] = scripted.timed(
            chosen, runs=args.runs, block=args.block, warmup=args.warmup, queried=OURS
        )
    return report


def run_agents(args: Any) -> tuple[str, ...]:
    return tuple(scripted.AGENTS) if args.agent == "both" else (args.agent,)


def over(side: dict[str, Any], name: str, floor: str) -> float:
    """Median over blocks of (block median of ``name``) / (block median of ``floor``)."""
    pairs = zip(side[name]["blocks"], side[floor]["blocks"], strict=True)
    ratios = sorted(value / floor for value, floor in pairs)
    middle = len(ratios) // 2
    return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2


def report_of(ours: dict[str, Any], theirs: dict[str, Any], vendor: str) -> dict[str, Any]:
    from benchmarks.reference import PUBLIC

    tables, targets = [], []
    for agent_key in ours:
        rows = []
        for side, name in [(ours, name) for name in OURS] + [(theirs, PUBLIC)]:
            rows.append(
                {
                    "variant": name,
                    "median_ms": side[agent_key][name]["median_ms"],
                    "floor_ms": side[agent_key][scripted.FLOOR]["median_ms"],
                    "over_floor": over(side[agent_key], name, scripted.FLOOR),
                    "over_bare": over(side[agent_key], name, scripted.BARE),
                    "queries": side[agent_key][name]["queries"],
                }
            )
        tables.append({"title": f"{agent_key} run, {vendor}", "columns": COLUMNS, "rows": rows})
        reference = rows[-1]
        for row in rows[:-1]:
            for key, floor in (("over_floor", "its floor"), ("over_bare", "its Runner.run")):
                targets.append(
                    common.target(
                        f"{agent_key}: {row['variant']} / reference (each over {floor})",
                        value=row[key] / reference[key],
                        limit=LIMIT,
                    )
                )
        targets.append(
            common.target(
                f"{agent_key}: public path / reference (medians, two processes)",
                value=rows[0]["median_ms"] / reference["median_ms"],
                limit=LIMIT,
            )
        )
    return {
        "title": "Per-run cost against the reference package (agentic-django 0.5.1)",
        "benchmark": "compare_reference",
        "tables": tables,
        "targets": targets,
        "profiles": [],
        "notes": [
            "x its floor / x its Runner.run: median over blocks of the variant's block median "
            f"over the floor's ({scripted.FLOOR}; {scripted.BARE}, no memory, CPU only), timed "
            "in the same blocks of the same process.",
            "The reference runs as its README configures it (django-tasks' immediate "
            "backend), events off on both sides.",
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    options = common.parser(__doc__.splitlines()[0], runs=100, block=10, warmup=5)
    options.add_argument("--agent", choices=[*scripted.AGENTS, "both"], default="both")
    options.add_argument("--cache", default="~/.cache/agentic-django-bench")
    args = options.parse_args(argv)
    # Events off on both sides, as the reference runs by default.
    os.environ["AGENTIC_DJANGO_ENABLE_EVENTS"] = "false"
    with common.environment() as env:
        from django.db import connection

        database = {
            key: value
            for key, value in connection.settings_dict.items()
            if key in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT", "OPTIONS")
        }
        database["NAME"] = str(database["NAME"]).removeprefix("test_")
        vendor = connection.vendor
        ours = measure_ours(args, env["workdir"])
        machine = common.machine()
    theirs = measure_reference(args, database)
    report = report_of(ours, theirs, "PostgreSQL" if vendor == "postgresql" else "SQLite")
    report["machine"] = machine
    return common.emit(
        report, argv=["benchmarks.compare_reference", *argv], json_path=args.json_path
    )


if __name__ == "__main__":
    main()
