"""Per-run overhead: the public path versus bare ``Runner.run`` with the same scripted model.

    python -m benchmarks.run_overhead --runs 200

Variants, interleaved in blocks in one process (immediate task backend, so the run executes
inside ``enqueue_agent_run`` after commit):

- ``Runner.run``: ``Runner.run_sync(agent, "Hi")``, no memory;
- ``Runner.run + SQLiteSession``: the same with the SDK's own ``SQLiteSession`` on a file, as
  the SDK configures it (WAL, ``synchronous=FULL``: an fsync per commit) -- the issue's floor;
- ``Runner.run + SQLiteSession, synchronous=NORMAL``: the same floor with the durability the
  project's SQLite database uses (WAL, ``synchronous=NORMAL``), so disk flushes weigh the same
  on both sides;
- ``Runner.run_streamed + SQLiteSession, synchronous=NORMAL``: streamed and drained through
  ``async_to_sync`` as the engine runs the SDK (a reference, not a target);
- ``public path``: ``AgentSession.objects.get_or_create`` + ``AgentRun.objects.create`` +
  ``enqueue_agent_run`` (the README's example);
- ``services.create_run``: the validated facade the views use;
- ``public path, no ledger``: the public path with the usage ledger's write skipped (patched
  out for the block): what one ledger row per model call costs (issue 20's goal: at most
  1.1x);
- ``public path, no trace``: the public path with ``AGENTIC_DJANGO_TRACING`` disabled (the
  setting, for the block): what the SDK's tracing and the run inspector's stored spans cost
  (issue 21's goal: at most 1.15x).

Every run gets a new session; each timed run is checked afterwards (untimed) for its output.
``DATABASE_URL`` picks the database (default: a throwaway SQLite file).
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.scripted import BARE, FLOOR, FLOOR_NORMAL, STREAMED

REFERENCES = (BARE, FLOOR, FLOOR_NORMAL, STREAMED)
# The SDK-default floor fsyncs every commit, so it moves with disk load; the ratios to the
# NORMAL floor and to the CPU-only bare Runner.run are the steadier ones to track.
COLUMNS = [
    *common.RUN_COLUMNS[:5],
    ("ratio_normal", "x NORMAL floor"),
    ("ratio_bare", "x Runner.run"),
    *common.RUN_COLUMNS[5:],
]
AGENTS = ("chat", "tool")
QUERY_LIMIT_CHAT = 12
RATIO_LIMIT = 1.3
NO_LEDGER = "public path, no ledger"
LEDGER_LIMIT = 1.1
NO_TRACE = "public path, no trace"
TRACE_LIMIT = 1.15


@contextlib.contextmanager
def without_tracing() -> Iterator[None]:
    """No trace of runs at all: the setting a project would turn off."""
    from django.test import override_settings

    with override_settings(AGENTIC_DJANGO_TRACING={"enabled": False}):
        yield


@contextlib.contextmanager
def without_ledger() -> Iterator[None]:
    """Skip the usage ledger's row after each model call (a benchmark's comparison only)."""
    from agentic_django.usage import UsageMeter

    recording = UsageMeter.after_call

    async def skip(self: Any, *call: Any, **where: Any) -> None:
        return None

    UsageMeter.after_call = skip  # type: ignore[method-assign]
    try:
        yield
    finally:
        UsageMeter.after_call = recording  # type: ignore[method-assign]


def build_variants(agent_key: str, *, user: Any, workdir: Path) -> list[common.Variant]:
    """The floors, the reference and the two public paths for ``agent_key``."""
    from agentic_django.models import AgentRun, AgentSession
    from agentic_django.services import create_run, enqueue_agent_run
    from benchmarks import scripted

    def check_run(run: Any) -> common.Check:
        return scripted.run_check(run, agent_key)

    def public_path() -> common.Check:
        session, _ = AgentSession.objects.get_or_create(owner=user, session_key=uuid.uuid4().hex)
        run = AgentRun.objects.create(
            session=session, owner=user, agent_key=agent_key, input_payload="Hi"
        )
        enqueue_agent_run(str(run.id))
        return check_run(run)

    def service() -> common.Check:
        run = create_run(
            owner=user, session_key=uuid.uuid4().hex, input_payload="Hi", agent_key=agent_key
        )
        return check_run(run)

    return [
        *scripted.sdk_variants(agent_key, workdir),
        common.Variant("public path", public_path),
        common.Variant("services.create_run", service),
        common.Variant(NO_LEDGER, public_path, around=without_ledger),
        common.Variant(NO_TRACE, public_path, around=without_tracing),
    ]


def measure(
    *,
    runs: int,
    block: int,
    warmup: int,
    agents: tuple[str, ...],
    workdir: Path,
    profile: str | None = None,
) -> dict[str, Any]:
    """Time and count queries for every variant of each agent; return the report."""
    from agentic_django.conf import get_config

    user = common.bench_user()
    tables, targets, profiles = [], [], []
    for agent_key in agents:
        variants = build_variants(agent_key, user=user, workdir=workdir)
        timings = common.interleave(variants, runs=runs, block=block, warmup=warmup)
        profiles += common.profile(variants, profile, runs=runs)
        rows = []
        for variant in variants:
            queries = None
            if variant.name not in REFERENCES:
                queries = common.count_queries(variant)
            floor = FLOOR if variant.name != FLOOR else BARE
            item = common.row(timings, variant.name, floor=floor, queries=queries)
            item["ratio_normal"] = timings.ratio(variant.name, FLOOR_NORMAL)
            item["ratio_bare"] = timings.ratio(variant.name, BARE)
            rows.append(item)
        tables.append({"title": f"{agent_key} run", "columns": COLUMNS, "rows": rows})
        public = next(item for item in rows if item["variant"] == "public path")
        targets.append(
            common.target(
                f"{agent_key}: public path / {FLOOR}", value=public["ratio"], limit=RATIO_LIMIT
            )
        )
        targets.append(
            common.target(
                f"{agent_key}: public path / {FLOOR_NORMAL}",
                value=public["ratio_normal"],
                limit=RATIO_LIMIT,
            )
        )
        targets.append(
            common.target(
                f"{agent_key}: public path / {NO_LEDGER}",
                value=timings.ratio("public path", NO_LEDGER),
                limit=LEDGER_LIMIT,
            )
        )
        targets.append(
            common.target(
                f"{agent_key}: public path / {NO_TRACE}",
                value=timings.ratio("public path", NO_TRACE),
                limit=TRACE_LIMIT,
            )
        )
        if agent_key == "chat":
            targets.append(
                common.target(
                    "chat: SQL queries per run", value=public["queries"], limit=QUERY_LIMIT_CHAT
                )
            )
    return {
        "title": "Per-run overhead",
        "benchmark": "overhead",
        "settings": {"enable_events": get_config().enable_events, "task_backend": "immediate"},
        "tables": tables,
        "targets": targets,
        "profiles": profiles,
        "notes": [
            "ratio: median over blocks of the block medians' ratio; 'vs floor' names the floor; "
            "'x NORMAL floor' and 'x Runner.run': the same ratio against those variants.",
            f"events {'on' if get_config().enable_events else 'off'} "
            "(AGENTIC_DJANGO_ENABLE_EVENTS); see run_events for the difference.",
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the benchmark, print (and optionally save) its report."""
    argv = sys.argv[1:] if argv is None else argv
    options = common.parser(__doc__.splitlines()[0], runs=200, block=10, warmup=5, introspect=True)
    options.add_argument("--agent", choices=[*AGENTS, "both"], default="both")
    args = options.parse_args(argv)
    agents = AGENTS if args.agent == "both" else (args.agent,)
    with common.environment() as env:
        report = measure(
            runs=args.runs,
            block=args.block,
            warmup=args.warmup,
            agents=agents,
            workdir=env["workdir"],
            profile=args.profile,
        )
        report["machine"] = common.machine()
    return common.emit(
        report, argv=["benchmarks.run_overhead", *argv], json_path=args.json_path, show_sql=args.sql
    )


if __name__ == "__main__":
    main()
