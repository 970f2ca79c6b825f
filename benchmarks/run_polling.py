"""Polling cost: run-fragment (htmx) and run-detail (JSON) versus an authenticated constant view.

    python -m benchmarks.run_polling --runs 500

Requests go through Django's full stack (every middleware, session and user lookup) with the
test ``Client``, logged in as the run's owner. The floor is ``benchmarks.urls.floor``: a
``login_required`` view returning a constant, so the ratio is what reading and rendering the
run adds to the least any authenticated poll costs. The running run is polled both as htmx
does in steady state (``v`` = the version it already shows: 204) and without ``v`` (full
render); the completed run answers 286 (stop polling) to htmx. Both runs are in one session,
the running one after the completed one: a fragment must render its own run only, never the
conversation. Targets (issue 11), for every run-fragment request: at most 3 SQL statements
and 2x the floor. run-detail (JSON) is measured alongside, without targets.

References (``benchmarks/urls.py``, no targets) show what one owner-scoped read of the run's
status costs through the ORM and as hand-written SQL.
"""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from benchmarks import common

FLOOR = "authenticated constant view"
# Yardsticks (benchmarks/urls.py), not product views: no targets apply to them.
REFERENCE = "reference:"
QUERY_LIMIT = 3
RATIO_LIMIT = 2.0
HTMX = {"HX-Request": "true"}
RUN_ARTICLE = b'<article id="agent-run-'
STEADY = "run-fragment, running, unchanged (204)"
FINISHED = "run-fragment, completed (286)"
_VERSION_RE = re.compile(r'"v":\s*"([^"]+)"')


def _request(
    client: Any, url: str, expected: int, *, own_run_only: bool = False, **kwargs: Any
) -> Callable[[], common.Check]:
    def call() -> common.Check:
        response = client.get(url, **kwargs)

        def check() -> None:
            if response.status_code != expected:
                raise AssertionError(f"GET {url}: {response.status_code}, expected {expected}")
            # A fragment renders its own run, not the conversation around it.
            if own_run_only and response.content.count(RUN_ARTICLE) != 1:
                raise AssertionError(f"GET {url}: {response.content.count(RUN_ARTICLE)} runs")

        return check

    return call


def _running_version(client: Any, url: str) -> str | None:
    """The version a running fragment shows (sent back by htmx as ``v``), from its HTML."""
    html = client.get(url, headers=HTMX).content.decode()
    match = _VERSION_RE.search(html)
    return match.group(1) if match else None


def _runs(user: Any) -> tuple[Any, Any]:
    """A completed chat run, and after it in the same session a healthy running one that has
    written its input item (claimed, with a lease that outlives the benchmark)."""
    from django.utils import timezone

    from agentic_django.models import AgentRun, AgentSessionItem
    from agentic_django.services import create_run

    completed = create_run(
        owner=user, session_key=uuid.uuid4().hex, input_payload="Hi", agent_key="chat"
    )
    completed.refresh_from_db()
    if completed.status != AgentRun.Status.COMPLETED:
        raise RuntimeError(f"the completed run is {completed.status}: {completed.error}")
    now = timezone.now()
    running = AgentRun.objects.create(
        session=completed.session,
        owner=user,
        agent_key="chat",
        input_payload="And now?",
        status=AgentRun.Status.RUNNING,
        attempt=1,
        started_at=now,
        heartbeat_at=now,
        lease_expires_at=now + timedelta(hours=1),
    )
    last = AgentSessionItem.objects.filter(session=completed.session).order_by("sequence").last()
    AgentSessionItem.objects.create(
        session=completed.session,
        run=running,
        sequence=(last.sequence if last else 0) + 1,
        payload={"role": "user", "content": "And now?"},
    )
    return running, completed


def build_variants(client: Any, *, user: Any) -> list[common.Variant]:
    """The floor plus the fragment and detail requests for a running and a completed run."""
    from django.urls import reverse

    running, completed = _runs(user)

    def url(name: str, run: Any) -> str:
        prefix = "" if name.startswith("bench-") else "agents:"
        return reverse(f"{prefix}{name}", args=[run.id])

    def fragment(label: str, run: Any, expected: int, **kwargs: Any) -> common.Variant:
        own = expected != 204
        call = _request(
            client, url("run-fragment", run), expected, own_run_only=own, headers=HTMX, **kwargs
        )
        return common.Variant(label, call)

    variants = [common.Variant(FLOOR, _request(client, reverse("bench-floor"), 200))]
    steady = {"v": _running_version(client, url("run-fragment", running))}
    variants += [
        fragment(STEADY, running, 204, data=steady),
        fragment("run-fragment, running (changed)", running, 200),
        fragment(FINISHED, completed, 286),
        common.Variant(
            "run-detail JSON, running", _request(client, url("run-detail", running), 200)
        ),
        common.Variant(
            "run-detail JSON, completed", _request(client, url("run-detail", completed), 200)
        ),
        common.Variant(
            f"{REFERENCE} ORM status read",
            _request(client, url("bench-run-orm", running), 200),
        ),
        common.Variant(
            f"{REFERENCE} raw SQL status read",
            _request(client, url("bench-run-sql", running), 200),
        ),
    ]
    return variants


def measure(*, runs: int, block: int, warmup: int, profile: str | None = None) -> dict[str, Any]:
    """Time and count queries for every polled view and the floor; return the report."""
    from django.test import Client

    user = common.bench_user()
    client = Client()
    client.force_login(user)
    variants = build_variants(client, user=user)
    timings = common.interleave(variants, runs=runs, block=block, warmup=warmup)
    profiles = common.profile(variants, profile, runs=runs)
    rows, targets = [], []
    for variant in variants:
        queries = common.count_queries(variant)
        floor = FLOOR if variant.name != FLOOR else None
        rows.append(common.row(timings, variant.name, floor=floor, queries=queries))
    for item in rows[1:]:
        if not item["variant"].startswith("run-fragment"):
            continue  # targets apply to the polled fragment; references are yardsticks
        targets.append(
            common.target(f"{item['variant']} / floor", value=item["ratio"], limit=RATIO_LIMIT)
        )
        targets.append(
            common.target(f"{item['variant']}: queries", value=item["queries"], limit=QUERY_LIMIT)
        )
    return {
        "title": "Polling cost",
        "benchmark": "polling",
        "tables": [{"title": "GET requests", "columns": common.RUN_COLUMNS, "rows": rows}],
        "targets": targets,
        "profiles": profiles,
        "notes": [
            "queries/run counts every SQL statement per request, the floor's session and user "
            "lookups included.",
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the benchmark, print (and optionally save) its report."""
    argv = sys.argv[1:] if argv is None else argv
    args = common.parser(
        __doc__.splitlines()[0], runs=500, block=25, warmup=20, introspect=True
    ).parse_args(argv)
    with common.environment():
        report = measure(runs=args.runs, block=args.block, warmup=args.warmup, profile=args.profile)
        report["machine"] = common.machine()
    return common.emit(
        report, argv=["benchmarks.run_polling", *argv], json_path=args.json_path, show_sql=args.sql
    )


if __name__ == "__main__":
    main()
