"""The benchmark command keeps working: `python -m benchmarks --quick` (what `make bench` runs,
at tiny sizes) bakes a project, starts its servers, runs each benchmark in it and writes a sane
report for each; the latency benchmark bakes its own two projects and drives them in Chromium.
No timing assertions: the figures live in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pytest

from benchmarks.run_polling import FLOOR as POLLING_FLOOR
from benchmarks.run_workers import CPU_TABLE as WORKERS_CPU
from benchmarks.run_workers import DRAIN_TABLE as WORKERS_DRAIN
from scripts.bake import TEMPLATE
from tests.conftest import run

pytestmark = pytest.mark.xdist_group("benchmarks")
LATENCY_REPORTS = ("latency-sqlite-database", "latency-postgres-rq")


def rows(report: dict) -> list[dict]:
    return [row for table in report["tables"] for row in table["rows"]]


def assert_timed(row: dict) -> None:
    assert row["n"] == 1
    assert 0 < row["min_ms"] <= row["median_ms"] <= row["p95_ms"]


@dataclass
class Bench:
    reports: dict[str, dict]  # by report: overhead, polling, ..., latency-sqlite-database
    stdout: str


def quick(tmp_path_factory, names: tuple[str, ...], reports: tuple[str, ...]) -> Bench:
    """Run `python -m benchmarks --quick --only <names>`; read the reports it wrote."""
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--only", *names]
    result = run(command, cwd=TEMPLATE)
    by_name = {name: json.loads((out / f"{name}.json").read_text()) for name in reports}
    return Bench(by_name, result.stdout)


@pytest.fixture(scope="session")  # once per test process, whatever runs between
def bench(tmp_path_factory) -> Bench:
    names = (
        *("overhead", "polling", "events", "workers", "streams", "concurrency", "inspector"),
        "reference",
    )
    return quick(tmp_path_factory, names, names)


@pytest.fixture(scope="session")  # once per test process, whatever runs between
def latency(tmp_path_factory) -> Bench:
    """Both combinations, about 30 s each on a loaded 2-core machine."""
    return quick(tmp_path_factory, ("latency",), LATENCY_REPORTS)


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


def test_reference_report(bench):
    """The reference package (agentic-django 0.5.1 from PyPI, in a virtualenv of its own)
    runs the same scripted agent, each side over its own SDK floor."""
    report = bench.reports["reference"]
    [table] = report["tables"]
    assert table["title"] == "chat run, PostgreSQL"
    by_variant = {row["variant"]: row for row in table["rows"]}
    assert by_variant.keys() == {
        "public path",
        "services.create_run",
        "reference: submit_agent_run",
    }
    for row in by_variant.values():
        assert row["over_floor"] > 0 and row["over_bare"] > 0 and row["queries"] >= 4
    assert len(report["targets"]) == 5


def test_polling_report(bench):
    by_variant = {row["variant"]: row for row in rows(bench.reports["polling"])}
    assert by_variant[POLLING_FLOOR]["queries"] >= 1  # the session lookup, at least
    assert {"run-fragment, completed (286)", "run-detail JSON, running"} <= by_variant.keys()
    for row in by_variant.values():
        assert_timed(row)
    assert "## Polling cost" in bench.stdout


def test_inspector_report(bench):
    by_variant = {row["variant"]: row for row in rows(bench.reports["inspector"])}
    assert {"run-inspect, 500 spans", "run-trace JSON, 500 spans"} <= by_variant.keys()
    for row in by_variant.values():
        assert_timed(row)
    # The page reads the same few rows whatever the number of spans.
    assert (
        by_variant["run-inspect, 500 spans"]["queries"]
        == by_variant["run-inspect, 20 spans"]["queries"]
    )
    assert "## Run inspector" in bench.stdout


def test_events_report(bench):
    (row,) = rows(bench.reports["events"])
    assert row["agent"] == "tool"
    assert row["events_per_run"] >= 1
    assert row["on_queries"] > row["off_queries"]
    assert row["off_median_ms"] > 0 and row["on_median_ms"] > 0


def test_workers_report(bench):
    report = bench.reports["workers"]
    tables = {table["title"]: table["rows"] for table in report["tables"]}
    by_backend = {row["backend"]: row for row in tables[WORKERS_DRAIN]}
    # The database worker always; RQ's against the Redis the command started.
    assert {"database", "rq", "rq-simple"} <= by_backend.keys()
    for backend, row in by_backend.items():
        assert (row["workers"], row["completed"]) == (1, 2), backend
        assert row["runs_per_s"] > 0
        # CPU from /proc, lock waits sampled from pg_locks (PostgreSQL) while the runs drained.
        assert row["worker_cpu_ms_per_run"] >= 0 and row["lock_samples"] >= 1, backend
        assert 0 <= row["lock_wait_percent"] <= 100, backend
    assert [row["backend"] for row in tables[WORKERS_CPU]] == list(by_backend)
    assert any(
        target["target"].startswith("database: samples with a lock wait")
        for target in report["targets"]
    )
    assert report["in_process_ms"] > 0


def test_streams_report(bench):
    report = bench.reports["streams"]
    (row,) = rows(report)
    assert (row["streams"], row["deltas"]) == (20, 2)  # every client got every delta
    assert 0 < row["p50_ms"] <= row["p95_ms"] and row["idle_cpu_percent"] >= 0
    assert row["connections"] >= 1  # the listener, at least (PostgreSQL)
    assert [target["target"] for target in report["targets"]] == [
        "connections held",
        "p95 delta -> client",
        "idle CPU of the web process",
    ]
    assert "## Open run streams on one web process" in bench.stdout


def test_concurrency_report(bench):
    report = bench.reports["concurrency"]
    wall, delta, processes, floor = (table["rows"] for table in report["tables"])
    # --quick: 1 run, then 4 runs twice through one worker, 4 runs through two workers.
    assert [(row["processes"], row["runs"]) for row in wall] == [(1, 1), (1, 4), (1, 4), (2, 4)]
    assert all(row["completed"] == f"{row['runs']}/{row['runs']}" for row in wall)
    assert all(row["wall_s"] >= row["floor_s"] > 0 for row in wall)
    # Every run's first text was noted, and the fake server's first piece came before it.
    assert [row["n"] for row in delta] == [1, 4, 4, 4]
    assert all(row["missing"] == 0 and row["model_p50"] > 0 for row in delta)
    for row in processes:
        assert 1 <= row["listening"] <= row["connections"], row
        assert row["pooled"] <= row["pool_limit"] and row["rss_mb"] > 0, row
    assert len(floor) == 6 and all(row["wall_s"] > 0 for row in floor)
    assert len(report["targets"]) == 4
    assert "## Many runs per worker" in bench.stdout


@pytest.mark.xdist_group("benchmarks-latency")  # its own projects: beside the others
@pytest.mark.parametrize("name", LATENCY_REPORTS)
def test_latency_report(latency, name):
    report = latency.reports[name]
    database, backend = name.removeprefix("latency-").split("-")
    assert report["benchmark"] == "latency"
    assert report["combo"] == {
        "database": "postgresql" if database == "postgres" else "sqlite",
        "backend": backend,
    }
    cold, warm, dev, idle = (table["rows"] for table in report["tables"])
    (first,) = cold  # --quick: the one process pair that stays up
    assert 0 < first["ready_to_loaded_ms"] < first["ready_to_reply_ms"]
    assert first["start_to_ready_ms"] > 0
    by_measure = {row["measure"]: row for row in warm}
    # Every warm measure has its samples, in order: pickup < Enter -> reply.
    for row in warm:
        assert row["n"] >= 1 and row["missing"] == 0, row
        assert row["min_ms"] <= row["p50_ms"] <= row["max_ms"], row
    reply = by_measure["Enter -> complete reply on screen"]
    assert by_measure["  Enter -> run started (server)"]["p50_ms"] < reply["p50_ms"]
    assert by_measure["every delta: model wrote it -> on screen"]["n"] == 8  # all the pieces
    assert [row["process"] for row in idle] == [
        "agentic_django_worker",
        "stock db_worker" if backend == "database" else "stock rqworker",
        "web (uvicorn)",
    ]
    assert all(row["window_s"] >= 1 and row["cpu_s"] >= 0 for row in idle)
    # --quick: one start of `make dev`, one code change, one Ctrl-C that ends every process.
    (dev_start,) = dev
    assert 0 < dev_start["noticed_to_answer_ms"] <= dev_start["change_to_answer_ms"], dev_start
    assert dev_start["start_to_answer_ms"] > 0 and dev_start["ctrl_c_to_gone_ms"] is not None
    assert len(report["targets"]) == 5
    assert f"## {report['title']}" in latency.stdout
