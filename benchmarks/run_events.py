"""Event persistence cost: the public path with ``AGENTIC_DJANGO_ENABLE_EVENTS`` on versus off.

    python -m benchmarks.run_events --runs 200

Both settings are timed in the same process, in alternating blocks (the setting is switched
between blocks, outside the timed region), for the chat and the tool agent. The report gives
the added time and queries per run and the number of events each run stored.
"""

from __future__ import annotations

import statistics
import sys
import uuid
from typing import Any

from benchmarks import common
from benchmarks.run_overhead import AGENTS

OFF = "events off"
ON = "events on"


def build_variants(agent_key: str, *, user: Any, events: list[int]) -> list[common.Variant]:
    """The public path with events off and on; ``events`` collects events stored per run."""
    from django.test.utils import override_settings

    from agentic_django.models import AgentEvent, AgentRun, AgentSession
    from agentic_django.services import enqueue_agent_run

    def public_path(expect_events: bool) -> common.Call:
        def call() -> common.Check:
            session, _ = AgentSession.objects.get_or_create(
                owner=user, session_key=uuid.uuid4().hex
            )
            run = AgentRun.objects.create(
                session=session, owner=user, agent_key=agent_key, input_payload="Hi"
            )
            enqueue_agent_run(str(run.id))

            def check() -> None:
                run.refresh_from_db()
                if run.status != AgentRun.Status.COMPLETED:
                    raise AssertionError(f"run {run.id} is {run.status}: {run.error}")
                stored = AgentEvent.objects.filter(run=run).count()
                if bool(stored) != expect_events:
                    raise AssertionError(f"{stored} events stored with events={expect_events}")
                if expect_events:
                    events.append(stored)

            return check

        return call

    return [
        common.Variant(
            OFF,
            public_path(False),
            around=lambda: override_settings(AGENTIC_DJANGO_ENABLE_EVENTS=False),
        ),
        common.Variant(
            ON,
            public_path(True),
            around=lambda: override_settings(AGENTIC_DJANGO_ENABLE_EVENTS=True),
        ),
    ]


def measure(*, runs: int, block: int, warmup: int, agents: tuple[str, ...]) -> dict[str, Any]:
    """Time both settings for each agent; return the report."""
    user = common.bench_user()
    rows = []
    for agent_key in agents:
        events: list[int] = []
        variants = build_variants(agent_key, user=user, events=events)
        timings = common.interleave(variants, runs=runs, block=block, warmup=warmup)
        off_queries = common.count_queries(variants[0]).per_call
        on_queries = common.count_queries(variants[1]).per_call
        off, on = timings.stats(OFF), timings.stats(ON)
        rows.append(
            {
                "agent": agent_key,
                "off_median_ms": off.median_ms,
                "on_median_ms": on.median_ms,
                "added_ms": on.median_ms - off.median_ms,
                "ratio": timings.ratio(ON, OFF),
                "off_queries": off_queries,
                "on_queries": on_queries,
                "events_per_run": statistics.median(events) if events else 0,
                "n": off.n,
            }
        )
    columns = [
        ("agent", "agent"),
        ("off_median_ms", "off: median ms"),
        ("on_median_ms", "on: median ms"),
        ("added_ms", "added ms/run"),
        ("ratio", "on/off"),
        ("off_queries", "off: queries/run"),
        ("on_queries", "on: queries/run"),
        ("events_per_run", "events/run"),
        ("n", "n"),
    ]
    return {
        "title": "Event persistence cost",
        "benchmark": "events",
        "tables": [{"title": "public path, events on vs off", "columns": columns, "rows": rows}],
        "targets": [],
        "notes": ["on/off: median over blocks of the block medians' ratio."],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the benchmark, print (and optionally save) its report."""
    argv = sys.argv[1:] if argv is None else argv
    options = common.parser(__doc__.splitlines()[0], runs=200, block=10, warmup=5)
    options.add_argument("--agent", choices=[*AGENTS, "both"], default="both")
    args = options.parse_args(argv)
    agents = AGENTS if args.agent == "both" else (args.agent,)
    with common.environment():
        report = measure(runs=args.runs, block=args.block, warmup=args.warmup, agents=agents)
        report["machine"] = common.machine()
    return common.emit(report, argv=["benchmarks.run_events", *argv], json_path=args.json_path)


if __name__ == "__main__":
    main()
