"""The run inspector: rendering a run of 500 steps, and what storing traces costs a run.

    python -m benchmarks.run_inspector --runs 30

Requests go through Django's full stack with the test ``Client``, logged in as the runs' owner,
against a run whose stored trace has 500 spans (ten turns, each a model call and 48 tool calls,
nested as the SDK nests them) and a run of 20; the floor is an authenticated constant view.
Target (issue 21): the inspector page of the 500-span run renders in at most 1 s (median).
The tracing overhead per run is in ``run_overhead`` (variant ``public path, no trace``).
"""

from __future__ import annotations

import sys
import uuid
from datetime import timedelta
from typing import Any

from benchmarks import common
from benchmarks.run_polling import FLOOR, _request

RENDER_LIMIT_MS = 1000.0
BIG = 500


def traced_run(user: Any, spans: int) -> Any:
    """A completed run whose stored trace has ``spans`` spans: a trace, its task and agent,
    then turns of one model call and tool calls each."""
    from django.utils import timezone

    from agentic_django.models import AgentRun, AgentSession, AgentSpan

    session = AgentSession.objects.create(owner=user, session_key=uuid.uuid4().hex)
    now = timezone.now()
    run = AgentRun.objects.create(
        session=session,
        owner=user,
        agent_key="chat",
        input_payload="Hi",
        status=AgentRun.Status.COMPLETED,
        attempt=1,
        started_at=now,
        finished_at=now + timedelta(seconds=60),
    )
    rows: list[Any] = []

    def add(kind: str, name: str, parent: str, start_ms: float, ms: float, data: dict) -> str:
        span_id = f"span_{len(rows):06d}"
        began = now + timedelta(milliseconds=start_ms)
        rows.append(
            AgentSpan(
                run=run, attempt=1, trace_id="trace_bench", span_id=span_id, parent_id=parent,
                kind=kind, name=name, started_at=began, ended_at=began + timedelta(milliseconds=ms),
                data=data,
            )
        )  # fmt: skip
        return span_id

    rows.append(
        AgentSpan(
            run=run, attempt=1, trace_id="trace_bench", span_id="trace_bench", kind="trace",
            name="chat", started_at=now, ended_at=now + timedelta(seconds=60),
        )
    )  # fmt: skip
    task = add("task", "chat", "trace_bench", 0, 60_000, {})
    agent = add("agent", "Assistant", task, 1, 59_990, {"tools": ["lookup"]})
    turns = max(1, -(-(spans - 3) // 50))  # 50 spans a turn: itself, a model call, 48 tools
    turn_ms = 59_000 / turns
    for turn in range(turns):
        start = 2 + turn * turn_ms
        turn_id = add("turn", f"turn {turn + 1}", agent, start, turn_ms - 5, {"turn": turn + 1})
        add(
            "generation", "gpt-4o-mini", turn_id, start + 1, turn_ms / 3,
            {"usage": {"input_tokens": 1200, "output_tokens": 80}, "input": "x" * 2000},
        )  # fmt: skip
        for call in range(48):
            add(
                "function", "lookup", turn_id, start + turn_ms / 3 + call * 10, 8,
                {"input": '{"topic": "tides"}', "output": "notes " * 40},
            )  # fmt: skip
    AgentSpan.objects.bulk_create(rows[:spans])
    return run


def measure(*, runs: int, block: int, warmup: int, profile: str | None = None) -> dict[str, Any]:
    from django.test import Client
    from django.urls import reverse

    from agentic_django.models import AgentSpan

    user = common.bench_user()
    client = Client()
    client.force_login(user)
    big, small = traced_run(user, BIG), traced_run(user, 20)
    assert AgentSpan.objects.filter(run=big).count() == BIG

    def get(name: str, run: Any) -> Any:
        return _request(client, reverse(f"agents:{name}", args=[run.id]), 200)

    variants = [
        common.Variant(FLOOR, _request(client, reverse("bench-floor"), 200)),
        common.Variant(f"run-inspect, {BIG} spans", get("run-inspect", big)),
        common.Variant("run-inspect, 20 spans", get("run-inspect", small)),
        common.Variant(f"run-trace JSON, {BIG} spans", get("run-trace", big)),
    ]
    timings = common.interleave(variants, runs=runs, block=block, warmup=warmup)
    profiles = common.profile(variants, profile, runs=runs)
    rows = []
    for variant in variants:
        floor = FLOOR if variant.name != FLOOR else None
        rows.append(
            common.row(timings, variant.name, floor=floor, queries=common.count_queries(variant))
        )
    page = rows[1]
    targets = [
        common.target(
            f"run-inspect, {BIG} spans: median", value=page["median_ms"], limit=RENDER_LIMIT_MS,
            unit="ms",
        ),
    ]  # fmt: skip
    return {
        "title": "Run inspector",
        "benchmark": "inspector",
        "tables": [{"title": "GET requests", "columns": common.RUN_COLUMNS, "rows": rows}],
        "targets": targets,
        "profiles": profiles,
        "notes": ["The page's SQL statements do not grow with the number of spans."],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = common.parser(
        __doc__.splitlines()[0], runs=30, block=5, warmup=3, introspect=True
    ).parse_args(argv)
    with common.environment():
        report = measure(runs=args.runs, block=args.block, warmup=args.warmup, profile=args.profile)
        report["machine"] = common.machine()
    return common.emit(
        report,
        argv=["benchmarks.run_inspector", *argv],
        json_path=args.json_path,
        show_sql=args.sql,
    )


if __name__ == "__main__":
    main()
