"""The benchmark scripts keep working: each runs with a tiny N and produces a sane report.

No timing assertions: the numbers live in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from django.conf import settings

from benchmarks import run_events, run_overhead, run_polling

TINY = ["--runs", "1", "--block", "1", "--warmup", "0"]

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def _rows(report: dict) -> list[dict]:
    return [row for table in report["tables"] for row in table["rows"]]


def _assert_timed(row: dict, n: int = 1) -> None:
    assert row["n"] == n
    assert 0 < row["min_ms"] <= row["median_ms"] <= row["p95_ms"]


def test_overhead_report(tmp_path, capsys):
    path = tmp_path / "overhead.json"
    report = run_overhead.main([*TINY, "--agent", "chat", "--json", str(path)])
    assert json.loads(path.read_text())["benchmark"] == "overhead"
    assert "Per-run overhead" in capsys.readouterr().out
    assert [table["title"] for table in report["tables"]] == ["chat run"]
    for row in _rows(report):
        _assert_timed(row)
        assert row["ratio"] > 0
    public = [row for row in _rows(report) if row["variant"] == "public path"]
    # A run's session, run row, claim and result are all written: a few queries at least.
    assert all(row["queries"] >= 4 for row in public)
    assert {target["target"] for target in report["targets"]} >= {"chat: SQL queries per run"}


def test_polling_report(capsys):
    report = run_polling.main(TINY)
    rows = {row["variant"]: row for row in _rows(report)}
    assert run_polling.FLOOR in rows
    assert rows[run_polling.FLOOR]["queries"] >= 1  # the session lookup, at least
    assert {"run-fragment, completed (286)", "run-detail JSON, running"} <= rows.keys()
    for row in rows.values():
        _assert_timed(row)
    assert "Polling cost" in capsys.readouterr().out


def test_events_report():
    report = run_events.main([*TINY, "--agent", "tool"])
    (row,) = _rows(report)
    assert row["agent"] == "tool"
    assert row["events_per_run"] >= 1
    assert row["on_queries"] > row["off_queries"]
    assert row["off_median_ms"] > 0 and row["on_median_ms"] > 0


def _worker_backend() -> tuple[str, dict[str, str]] | None:
    if importlib.util.find_spec("django_tasks_db"):
        return "database", {}
    redis_url = os.environ.get("REDIS_URL")
    if redis_url and importlib.util.find_spec("django_rq"):
        import redis

        try:
            redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
        except redis.exceptions.ConnectionError:
            return None
        return "rq", {"REDIS_URL": redis_url}
    return None


def test_workers_report(tmp_path):
    found = _worker_backend()
    if found is None:
        pytest.skip("needs django-tasks-db, or django-rq with a reachable REDIS_URL")
    backend, extra_env = found
    path = tmp_path / "workers.json"
    env = {
        **os.environ,
        **extra_env,
        # Its own SQLite file: the workers are separate processes and need a real database.
        "DATABASE_URL": f"sqlite:///{tmp_path / 'bench.sqlite3'}",
        "DJANGO_SETTINGS_MODULE": "config.settings",
    }
    command = [sys.executable, "-m", "benchmarks.run_workers", "--runs", "2", "--workers", "1"]
    command += ["--backends", backend, "--json", str(path)]
    done = subprocess.run(  # noqa: S603 - our interpreter and fixed arguments
        command, cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(path.read_text())
    (row,) = _rows(report)
    assert (row["backend"], row["workers"], row["completed"]) == (backend, 1, 2)
    assert row["runs_per_s"] > 0
    assert report["in_process_ms"] > 0
