"""Worker throughput: M runs drained by 1 and by 2 workers of the database and RQ backends.

    DATABASE_URL=postgres://... REDIS_URL=redis://... python -m benchmarks.run_workers --runs 100

Workers are started as users start them, with the benchmark settings and database: ``database``
and ``rq-preload`` (``manage.py agentic_django_worker`` on the database and the RQ backend, as
compose.yaml runs it: the Agents SDK preloaded), ``rq`` (plain ``manage.py rqworker --job-class
django_tasks_rq.Job default``: each forked work horse imports the SDK) and ``rq-simple`` (rq's
non-forking ``SimpleWorker``, a reference). After a warm-up batch (which also waits out each
worker's start), M chat runs are created through the public path in one transaction, and the
clock stops when all are finished. The per-job overhead is the wall time per run with one
worker minus the median time of the same run executed in-process (immediate backend), measured
in this process just before. The plain ``rq`` worker, which takes seconds per job, drains only
10 runs per worker so the benchmark stays short.

Use throwaway servers: the benchmark creates a ``test_*`` database on the Postgres server and
uses the ``default`` queue of the Redis at ``REDIS_URL``.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.overrides import TASK_BACKENDS, available_backends

OVERHEAD_LIMIT_MS = 50.0
RQ_WORKER = ["rqworker", "--job-class", "django_tasks_rq.Job"]
PROJECT_WORKER = ("agentic_django_worker",)


@dataclass(frozen=True)
class WorkerKind:
    """How to start one kind of worker: its task backend and its ``manage.py`` command."""

    name: str
    backend: str
    command: tuple[str, ...]
    description: str
    # Workers known to take seconds per job drain fewer runs, so the benchmark stays short.
    max_runs_per_worker: int | None = None


WORKER_KINDS = {
    kind.name: kind
    for kind in (
        WorkerKind(
            "database",
            "database",
            PROJECT_WORKER,
            "manage.py agentic_django_worker (database backend)",
        ),
        WorkerKind(
            "rq",
            "rq",
            (*RQ_WORKER, "--worker-class", "rq.worker.Worker", "default"),
            "rqworker, rq's forking Worker (10 runs per worker: each job imports the SDK)",
            max_runs_per_worker=10,
        ),
        WorkerKind(
            "rq-preload",
            "rq",
            PROJECT_WORKER,
            "manage.py agentic_django_worker (RQ backend, compose.yaml)",
        ),
        WorkerKind(
            "rq-simple",
            "rq",
            (*RQ_WORKER, "--worker-class", "rq.worker.SimpleWorker", "default"),
            "rqworker with rq's non-forking SimpleWorker (reference)",
        ),
    )
}


def available_kinds() -> list[str]:
    """Worker kinds this environment can run (packages installed, project worker present)."""
    backends = available_backends()
    return [kind.name for kind in WORKER_KINDS.values() if kind.backend in backends]


@contextmanager
def workers(
    kind: WorkerKind,
    count: int,
    *,
    database: str,
    logdir: Path,
    env_of: Callable[[int], dict[str, str]] | None = None,
):
    """Start ``count`` worker processes of ``kind`` (``env_of(index)``: more environment for
    each); stop them (by pid) on exit."""
    from django.conf import settings

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": common.SETTINGS_MODULE,
        "BENCH_TASK_BACKEND": kind.backend,
        "BENCH_DB_NAME": database,
        "OPENAI_AGENTS_DISABLE_TRACING": "1",
    }
    env.setdefault("BENCH_BASE_SETTINGS", "config.settings")
    processes = []
    try:
        for index in range(count):
            # The child keeps its own copy of the log's descriptor.
            with (logdir / f"{kind.name}-{count}-{index}.log").open("wb") as log:
                process = subprocess.Popen(  # our interpreter, fixed arguments
                    [sys.executable, "manage.py", *kind.command],
                    cwd=settings.BASE_DIR,
                    env={**env, **(env_of(index) if env_of else {})},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            processes.append(process)
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                # A forked RQ work horse may outlive its parent: end the worker's own group.
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def submit(count: int, *, user: Any) -> list[str]:
    """Create ``count`` chat runs through the public path in one transaction; return their ids."""
    from django.db import transaction

    from agentic_django.models import AgentRun, AgentSession
    from agentic_django.services import enqueue_agent_run

    ids = []
    with transaction.atomic():
        for _ in range(count):
            session = AgentSession.objects.create(owner=user, session_key=uuid.uuid4().hex)
            run = AgentRun.objects.create(
                session=session, owner=user, agent_key="chat", input_payload="Hi"
            )
            enqueue_agent_run(str(run.id))
            ids.append(str(run.id))
    return ids


def wait_finished(ids: list[str], *, timeout: float, processes: list[Any]) -> float:
    """Poll until every run in ``ids`` is terminal; return the monotonic time it happened."""
    from agentic_django.models import AgentRun

    deadline = time.monotonic() + timeout
    terminal = list(AgentRun.TERMINAL_STATUSES)
    while True:
        done = AgentRun.objects.filter(pk__in=ids, status__in=terminal).count()
        now = time.monotonic()
        if done == len(ids):
            return now
        if now > deadline:
            raise TimeoutError(f"{done}/{len(ids)} runs finished after {timeout:.0f}s")
        if any(process.poll() is not None for process in processes):
            raise RuntimeError("a worker exited early; see its log")
        time.sleep(0.01)


def tasks_enqueued(backend: str) -> int:
    """How many tasks the backend has ever been given (finished, running or waiting)."""
    if backend == "database":
        from django_tasks_db.models import DBTaskResult

        return DBTaskResult.objects.count()
    import django_rq

    queue = django_rq.get_queue("default")
    registries = (
        queue.finished_job_registry,
        queue.failed_job_registry,
        queue.started_job_registry,
    )
    return queue.count + sum(registry.count for registry in registries)


def in_process_ms(*, user: Any, runs: int) -> float:
    """Median wall time of one chat run through the public path with the immediate backend."""
    from agentic_django.models import AgentRun

    times = []
    for _ in range(runs + 3):
        start = time.perf_counter()
        (run_id,) = submit(1, user=user)
        times.append(time.perf_counter() - start)
        status = AgentRun.objects.get(pk=run_id).status
        if status != AgentRun.Status.COMPLETED:
            raise RuntimeError(f"in-process run {run_id} is {status}")
    return statistics.median(times[3:]) * 1000


def drain(
    kind: WorkerKind, count: int, *, runs: int, user: Any, database: str, logdir: Path
) -> dict[str, Any]:
    """Start ``count`` workers, warm them up, then time ``runs`` runs; return a report row."""
    from django.test.utils import override_settings

    from agentic_django.models import AgentRun

    with (
        override_settings(TASKS={"default": dict(TASK_BACKENDS[kind.backend])}),
        workers(kind, count, database=database, logdir=logdir) as processes,
    ):
        try:
            started = time.monotonic()
            wait_finished(submit(count, user=user), timeout=300, processes=processes)
            warmup_s = time.monotonic() - started
            # A second round once every worker is up: first-job costs stay out of the timing.
            wait_finished(submit(count, user=user), timeout=300, processes=processes)
            if kind.max_runs_per_worker:
                runs = min(runs, kind.max_runs_per_worker * count)
            tasks_before = tasks_enqueued(kind.backend)
            start = time.monotonic()
            ids = submit(runs, user=user)
            end = wait_finished(ids, timeout=max(120, runs * 10), processes=processes)
            tasks = tasks_enqueued(kind.backend) - tasks_before
        except Exception:
            for log in sorted(logdir.glob(f"{kind.name}-{count}-*.log")):
                sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}\n")
            raise
    completed = AgentRun.objects.filter(pk__in=ids, status=AgentRun.Status.COMPLETED).count()
    elapsed = end - start
    return {
        "backend": kind.name,
        "workers": count,
        "runs": runs,
        "completed": completed,
        "elapsed_s": elapsed,
        "runs_per_s": runs / elapsed,
        "ms_per_run_per_worker": elapsed * 1000 * count / runs,
        "tasks_per_run": tasks / runs,
        "warmup_s": warmup_s,
    }


def measure(
    *, runs: int, worker_counts: list[int], kinds: list[str], database: str, logdir: Path
) -> dict[str, Any]:
    """Drain ``runs`` runs with each backend and worker count; return the report."""
    user = common.bench_user()
    reference = in_process_ms(user=user, runs=min(30, max(3, runs)))
    rows, targets, notes = [], [], []
    for backend in kinds:
        kind = WORKER_KINDS[backend]
        for count in worker_counts:
            item = drain(kind, count, runs=runs, user=user, database=database, logdir=logdir)
            item["overhead_ms"] = item["ms_per_run_per_worker"] - reference
            rows.append(item)
        by_count = {item["workers"]: item for item in rows if item["backend"] == backend}
        if 1 in by_count:
            targets.append(
                common.target(
                    f"{backend}: per-job overhead, 1 worker",
                    value=by_count[1]["overhead_ms"],
                    limit=OVERHEAD_LIMIT_MS,
                    unit=" ms",
                )
            )
            if 2 in by_count:
                scaling = by_count[2]["runs_per_s"] / by_count[1]["runs_per_s"]
                for item in by_count.values():
                    item["scaling"] = item["runs_per_s"] / by_count[1]["runs_per_s"]
                notes.append(f"{backend}: 1 -> 2 workers scale throughput by {scaling:.2f}x")
    if any(item["overhead_ms"] > 1000 for item in rows):
        notes.append("an overhead above a second per job means the worker imports the SDK per job")
    columns = [
        ("backend", "backend"),
        ("workers", "workers"),
        ("runs", "runs"),
        ("completed", "completed"),
        ("elapsed_s", "elapsed s"),
        ("runs_per_s", "runs/s"),
        ("ms_per_run_per_worker", "ms/run/worker"),
        ("overhead_ms", "overhead ms/job"),
        ("tasks_per_run", "tasks/run"),
        ("scaling", "scaling vs 1"),
        ("warmup_s", "warm-up s"),
    ]
    return {
        "title": "Worker throughput",
        "benchmark": "workers",
        "in_process_ms": reference,
        "tables": [{"title": "drain M chat runs", "columns": columns, "rows": rows}],
        "targets": targets,
        "notes": [
            "tasks/run: tasks enqueued per run during the drain; above 1, the extra tasks find "
            "their run already claimed and return 'skipped'.",
            f"in-process reference (immediate backend, same database): {reference:.2f} ms/run",
            *(f"{name}: {WORKER_KINDS[name].description}" for name in kinds),
            *notes,
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the benchmark, print (and optionally save) its report."""
    argv = sys.argv[1:] if argv is None else argv
    options = common.parser(__doc__.splitlines()[0], runs=100, block=1, warmup=0)
    options.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    options.add_argument(
        "--backends", nargs="+", choices=sorted(WORKER_KINDS), help="default: all available"
    )
    args = options.parse_args(argv)
    kinds = args.backends or available_kinds()
    with common.environment() as env:
        report = measure(
            runs=args.runs,
            worker_counts=args.workers,
            kinds=kinds,
            database=env["database"],
            logdir=env["workdir"],
        )
        report["machine"] = common.machine()
    return common.emit(report, argv=["benchmarks.run_workers", *argv], json_path=args.json_path)


if __name__ == "__main__":
    main()
