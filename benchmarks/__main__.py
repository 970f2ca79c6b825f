"""Bake a project, start throwaway servers, and measure agentic_django in it (`make bench`).

    make bench                                 # every benchmark at its default size
    make bench ARGS="--database sqlite"        # SQLite instead of PostgreSQL
    make bench ARGS="--only overhead polling"  # some of them
    make bench ARGS="--quick"                  # tiny sizes: checks that each one runs
    make bench ARGS="--only latency"           # the project as `make dev` runs it, in Chromium

The project is baked with `task_backend=rq` (its worker code included) and the chosen database;
PostgreSQL (for `--database postgres`) and Redis (for the RQ workers) start on loopback. Each
benchmark is a process of its own inside the project, with its settings and engine, and this
directory on PYTHONPATH for the `benchmarks` package. The latency benchmark measures projects
baked as users bake them instead, one per combination in `OWN_PROJECTS` (whatever `--database`
says), with their own settings. Markdown tables go to stdout (paste-ready for
docs/benchmarks.md), JSON reports to `--out` (`<name>.json`, `latency-<database>-<backend>.json`).
`--workdir DIR` keeps the baked projects.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.bake import TEMPLATE, bake
from scripts.servers import start_postgres, start_redis

BENCHMARKS = {
    "overhead": "run_overhead",
    "polling": "run_polling",
    "events": "run_events",
    "workers": "run_workers",
    "latency": "run_latency",
    "streams": "run_streams",
    "concurrency": "run_concurrency",
    "inspector": "run_inspector",
    "reference": "compare_reference",
}
# Benchmarks that bake projects of their own, one per (task_backend, database).
OWN_PROJECTS = {"latency": [("database", "sqlite"), ("rq", "postgres")]}
TINY = ["--runs", "1", "--block", "1", "--warmup", "0"]
QUICK = {
    "overhead": [*TINY, "--agent", "chat"],
    "polling": TINY,
    "events": [*TINY, "--agent", "tool"],
    "workers": ["--runs", "2", "--workers", "1"],
    "latency": ["--quick"],
    "streams": ["--streams", "20", "--deltas", "2", "--idle-seconds", "1"],
    "inspector": TINY,
    "reference": [*TINY, "--agent", "chat"],
    "concurrency": [
        *("--runs", "4", "--many", "4", "--single", "1", "--slots", "4"),
        *("--reply-seconds", "0.5", "--think-seconds", "0.2"),
    ],
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--database", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no meaningful figures")
    parser.add_argument("--out", type=Path, default=TEMPLATE / ".cache" / "bench")
    parser.add_argument("--workdir", type=Path, help="bake the project here and keep it")
    return parser.parse_args(argv)


@dataclass
class Job:
    """One benchmark process: where it runs, with which environment, and its report's name."""

    name: str
    label: str
    project: Path
    env: dict[str, str]
    report: str


def jobs(
    args: argparse.Namespace, workdir: Path, env: dict[str, str], postgres_url: str | None
) -> list[Job]:
    """Bake the projects the chosen benchmarks need; one job per benchmark and project."""
    result, shared = [], None
    for name in args.only:
        if name in OWN_PROJECTS:
            for backend, database in OWN_PROJECTS[name]:
                combo = f"{database}-{backend}"
                directory = workdir / f"{name}-{combo}"
                directory.mkdir(parents=True, exist_ok=True)
                project = bake(directory, task_backend=backend, database=database, ci="none")
                own_env = {**env, "DATABASE_URL": postgres_url} if database == "postgres" else env
                result.append(Job(name, f"{name} {combo}", project, own_env, f"{name}-{combo}"))
            continue
        if shared is None:
            shared = bake(workdir, task_backend="rq", database=args.database, ci="none")
            if args.database == "postgres":
                env = {**env, "DATABASE_URL": postgres_url}
        result.append(Job(name, name, shared, env, name))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        env = {**os.environ, "PYTHONPATH": str(TEMPLATE), "OPENAI_AGENTS_DISABLE_TRACING": "1"}
        for name in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "REDIS_URL"):
            env.pop(name, None)
        databases = {database for name in args.only for _, database in OWN_PROJECTS.get(name, [])}
        if any(name not in OWN_PROJECTS for name in args.only):
            databases.add(args.database)
        postgres_url = None
        if "postgres" in databases:
            postgres = start_postgres()
            stack.callback(postgres.stop)
            postgres_url = postgres.url
        redis = start_redis()
        stack.callback(redis.stop)
        env["REDIS_URL"] = redis.url
        for job in jobs(args, workdir, env, postgres_url):
            started = time.monotonic()
            print(f"Measuring {job.project} ({job.label}); JSON in {args.out}", flush=True)
            command = [sys.executable, "-m", f"benchmarks.{BENCHMARKS[job.name]}"]
            command += [
                *(QUICK[job.name] if args.quick else []),
                "--json",
                str(args.out / f"{job.report}.json"),
            ]
            if subprocess.run(command, cwd=job.project, env=job.env).returncode != 0:
                print(f"benchmark {job.label!r} failed: {' '.join(command[1:])}", file=sys.stderr)
                return 1
            print(f"({job.label}: {time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
