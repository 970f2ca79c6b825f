"""Bake a project, start throwaway servers, and measure agentic_django in it (`make bench`).

    make bench                                 # every benchmark at its default size
    make bench ARGS="--database sqlite"        # SQLite instead of PostgreSQL
    make bench ARGS="--only overhead polling"  # some of them
    make bench ARGS="--quick"                  # tiny sizes: checks that each one runs

The project is baked with `task_backend=rq` (its worker code included) and the chosen database;
PostgreSQL (for `--database postgres`) and Redis (for the RQ workers) start on loopback. Each
benchmark is a process of its own inside the project, with its settings and engine, and this
directory on PYTHONPATH for the `benchmarks` package. Markdown tables go to stdout (paste-ready
for docs/benchmarks.md), JSON reports to `--out`. `--workdir DIR` keeps the baked project.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.bake import TEMPLATE, bake
from scripts.servers import start_postgres, start_redis

BENCHMARKS = {
    "overhead": "run_overhead",
    "polling": "run_polling",
    "events": "run_events",
    "workers": "run_workers",
}
TINY = ["--runs", "1", "--block", "1", "--warmup", "0"]
QUICK = {
    "overhead": [*TINY, "--agent", "chat"],
    "polling": TINY,
    "events": [*TINY, "--agent", "tool"],
    "workers": ["--runs", "2", "--workers", "1"],
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


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        project = bake(workdir, task_backend="rq", database=args.database, ci="none")
        env = {**os.environ, "PYTHONPATH": str(TEMPLATE), "OPENAI_AGENTS_DISABLE_TRACING": "1"}
        for name in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "REDIS_URL"):
            env.pop(name, None)
        if args.database == "postgres":
            postgres = start_postgres()
            stack.callback(postgres.stop)
            env["DATABASE_URL"] = postgres.url
        redis = start_redis()
        stack.callback(redis.stop)
        env["REDIS_URL"] = redis.url
        print(f"Measuring {project} ({args.database}); JSON reports in {args.out}", flush=True)
        for name in args.only:
            started = time.monotonic()
            command = [sys.executable, "-m", f"benchmarks.{BENCHMARKS[name]}"]
            command += [
                *(QUICK[name] if args.quick else []),
                "--json",
                str(args.out / f"{name}.json"),
            ]
            if subprocess.run(command, cwd=project, env=env).returncode != 0:
                print(f"benchmark {name!r} failed: {' '.join(command[1:])}", file=sys.stderr)
                return 1
            print(f"({name}: {time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
