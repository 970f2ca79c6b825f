"""The benchmark command keeps working: `python -m benchmarks --quick` (what `make bench` runs,
at tiny sizes) bakes a project, starts its servers, runs each benchmark in it and writes a sane
report for each. No timing assertions: the figures live in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pytest

from benchmarks.run_polling import FLOOR as POLLING_FLOOR
from scripts.bake import TEMPLATE
from tests.conftest import run

pytestmark = pytest.mark.xdist_group("benchmarks")


def rows(report: dict) -> list[dict]:
    return [row for table in report["tables"] for row in table["rows"]]


def assert_timed(row: dict) -> None:
    assert row["n"] == 1
    assert 0 < row["min_ms"] <= row["median_ms"] <= row["p95_ms"]


@dataclass
class Bench:
    reports: dict[str, dict]  # by benchmark: overhead, polling, events, workers
    stdout: str


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    out = tmp_path_factory.mktemp("bench")
    result = run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=TEMPLATE)
    names = ("overhead", "polling", "events", "workers")
    reports = {name: json.loads((out / f"{name}.json").read_text()) for name in names}
    return Bench(reports, result.stdout)


def test_overhead_report(bench):
    report = bench.reports["overhead"]
    assert report["benchmark"] == "overhead"
    assert "## Per-run overhead" in bench.stdout
    assert [table["title"] for table in report["tables"]] == ["chat run"]
    for row in rows(report):
        assert_timed(row)
        assert row["ratio"] > 0
    public = [row for row in rows(report) if row["variant"] == "public path"]
    # A run's session, run row, claim and result are all written: a few queries at least.
    assert public and all(row["queries"] >= 4 for row in public)
    assert {target["target"] for target in report["targets"]} >= {"chat: SQL queries per run"}
    assert report["machine"]["database"].startswith("PostgreSQL")


def test_polling_report(bench):
    by_variant = {row["variant"]: row for row in rows(bench.reports["polling"])}
    assert by_variant[POLLING_FLOOR]["queries"] >= 1  # the session lookup, at least
    assert {"run-fragment, completed (286)", "run-detail JSON, running"} <= by_variant.keys()
    for row in by_variant.values():
        assert_timed(row)
    assert "## Polling cost" in bench.stdout


def test_events_report(bench):
    (row,) = rows(bench.reports["events"])
    assert row["agent"] == "tool"
    assert row["events_per_run"] >= 1
    assert row["on_queries"] > row["off_queries"]
    assert row["off_median_ms"] > 0 and row["on_median_ms"] > 0


def test_workers_report(bench):
    report = bench.reports["workers"]
    by_backend = {row["backend"]: row for row in rows(report)}
    # The database worker always; RQ's against the Redis the command started.
    assert {"database", "rq", "rq-simple"} <= by_backend.keys()
    for backend, row in by_backend.items():
        assert (row["workers"], row["completed"]) == (1, 2), backend
        assert row["runs_per_s"] > 0
    assert report["in_process_ms"] > 0
