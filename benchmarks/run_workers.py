"""Worker throughput: M runs drained by 1 and by 2 workers of the database and RQ backends.

    DATABASE_URL=postgres://... REDIS_URL=redis://... python -m benchmarks.run_workers --runs 100
    # issue 19: 400 runs over 100 conversations, 1, 2 and 4 database workers
    python -m benchmarks.run_workers --backends database --workers 1 2 4 \
        --runs 400 --conversations 100

Workers are started as users start them, with the benchmark settings and database: ``database``
and ``rq-preload`` (``manage.py agentic_django_worker`` on the database and the RQ backend, as
compose.yaml runs it: the Agents SDK preloaded), ``rq`` (plain ``manage.py rqworker --job-class
django_tasks_rq.Job default``: each forked work horse imports the SDK) and ``rq-simple`` (rq's
non-forking ``SimpleWorker``, a reference). After a warm-up batch (which also waits out each
worker's start), M chat runs are created through the public path in one transaction, and the
clock stops when all are finished. The per-job overhead is the wall time per run with one
worker minus the median time of the same run executed in-process (immediate backend), measured
in this process just before. The plain ``rq`` worker, which takes seconds per job, drains only
10 runs per worker so the benchmark stays short. With ``--conversations C`` the M runs go to C
conversations (a conversation's runs run one after another, each dispatched as the one before
it finishes); by default each run has a conversation of its own.

While the M runs drain, the benchmark also measures the CPU time of the worker processes
(``/proc``: their threads, and the work horses an RQ worker forks) and, on PostgreSQL, of the
database's backends and of this process, all per run, and samples ``pg_locks`` every
``--lock-interval`` seconds (``benchmarks/pglocks.py``): the share of samples in which a backend
of the benchmark's database waited for a lock, and on which (the NOTIFY queue's lock, a row
lock, ...), and what the backend it waited for was doing. Target (issue 19): lock waits in at
most 2 % of the samples; 4 database workers drain at least 2.5x one worker's runs/s on a
machine with 4 cores or more.

Use throwaway servers: the benchmark creates a ``test_*`` database on the Postgres server and
uses the ``default`` queue of the Redis at ``REDIS_URL``.
"""

from __future__ import annotations

import contextlib
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

from benchmarks import common, pglocks
from benchmarks.overrides import TASK_BACKENDS, available_backends

OVERHEAD_LIMIT_MS = 50.0
LOCK_WAIT_LIMIT_PERCENT = 2.0
SCALING_WORKERS, SCALING_LIMIT = 4, 2.5  # 4 workers: at least 2.5x one worker's runs/s
POLL_SECONDS = 0.02
DRAIN_TABLE, CPU_TABLE = "drain M chat runs", "CPU per run and lock waits"
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


def submit(count: int, *, user: Any, conversations: int | None = None) -> list[str]:
    """Create ``count`` chat runs through the public path in one transaction, over
    ``conversations`` new conversations (default: one each; a conversation's first runs
    first); return their ids."""
    from django.db import transaction

    from agentic_django.models import AgentRun, AgentSession
    from agentic_django.services import enqueue_agent_run

    ids = []
    conversations = min(conversations or count, count)
    with transaction.atomic():
        sessions = [
            AgentSession.objects.create(owner=user, session_key=uuid.uuid4().hex)
            for _ in range(conversations)
        ]
        for index in range(count):
            run = AgentRun.objects.create(
                session=sessions[index % conversations],
                owner=user,
                agent_key="chat",
                input_payload="Hi",
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
        time.sleep(POLL_SECONDS)


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


def own_cpu_seconds() -> float:
    """CPU time so far of this process (the benchmark: its polls and the lock sampler)."""
    times = os.times()
    return times.user + times.system


def drain(
    kind: WorkerKind,
    count: int,
    *,
    runs: int,
    conversations: int | None = None,
    user: Any,
    database: str,
    logdir: Path,
    sampler: pglocks.LockSampler | None = None,
) -> dict[str, Any]:
    """Start ``count`` workers, warm them up, then time ``runs`` runs (over ``conversations``)
    with their CPU time and, given a ``sampler``, the lock waits; return a report row."""
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
            load_start = os.getloadavg()[0]
            cpu_before = sum(pglocks.cpu_seconds(process.pid) for process in processes)
            own_before = own_cpu_seconds()
            with sampler.measuring() if sampler else contextlib.nullcontext() as locks:
                start = time.monotonic()
                ids = submit(runs, user=user, conversations=conversations)
                end = wait_finished(ids, timeout=max(120, runs * 10), processes=processes)
            worker_cpu = sum(pglocks.cpu_seconds(process.pid) for process in processes)
            worker_cpu -= cpu_before
            own_cpu = own_cpu_seconds() - own_before
            tasks = tasks_enqueued(kind.backend) - tasks_before
        except Exception:
            for log in sorted(logdir.glob(f"{kind.name}-{count}-*.log")):
                sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}\n")
            raise
    completed = AgentRun.objects.filter(pk__in=ids, status=AgentRun.Status.COMPLETED).count()
    elapsed = end - start
    item = {
        "backend": kind.name,
        "workers": count,
        "runs": runs,
        "conversations": min(conversations or runs, runs),
        "completed": completed,
        "elapsed_s": elapsed,
        "runs_per_s": runs / elapsed,
        "ms_per_run_per_worker": elapsed * 1000 * count / runs,
        "tasks_per_run": tasks / runs,
        "warmup_s": warmup_s,
        "worker_cpu_ms_per_run": worker_cpu * 1000 / runs,
        "bench_cpu_ms_per_run": own_cpu * 1000 / runs,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }
    if locks is not None:
        item.update(lock_columns(locks, runs=runs))
        cpu = worker_cpu + own_cpu + (locks.backend_cpu_s or 0.0)
        item["cpu_percent_of_cores"] = 100 * cpu / (elapsed * (os.cpu_count() or 1))
    return item


def lock_columns(locks: pglocks.LockStats, *, runs: int) -> dict[str, Any]:
    """A row's figures from the lock samples of its drain."""
    backend_cpu = locks.backend_cpu_s
    return {
        "db_cpu_ms_per_run": None if backend_cpu is None else backend_cpu * 1000 / runs,
        "lock_samples": locks.samples,
        "lock_wait_percent": 100 * locks.waiting_share,
        "notify_lock_percent": 100 * locks.share(locks.kinds, pglocks.NOTIFY_LOCK),
        "waiters_per_sample": locks.waiters / locks.samples if locks.samples else 0.0,
        "top_wait": locks.top(locks.kinds, 1) or "-",
        "lock_kinds": {name: 100 * locks.share(locks.kinds, name) for name in locks.kinds},
        "lock_blockers": {name: 100 * locks.share(locks.blockers, name) for name in locks.blockers},
        "other_waits": {name: 100 * locks.share(locks.other, name) for name in locks.other},
    }


def wait_rows(rows: list[dict[str, Any]], key: str, *, top: int = 6) -> list[dict[str, Any]]:
    """The ``top`` entries of each row's ``key`` (kind of wait -> % of samples), largest first."""
    result = []
    for item in rows:
        entries = sorted(item.get(key, {}).items(), key=lambda entry: -entry[1])[:top]
        result.extend(
            {
                "backend": item["backend"],
                "workers": item["workers"],
                "wait": name.replace("|", "/"),
                "percent": percent,
            }
            for name, percent in entries
        )
    return result


@contextlib.contextmanager
def lock_sampler(interval: float) -> Any:
    """A ``pg_locks`` sampler of the benchmark's database on PostgreSQL; None elsewhere."""
    from django.db import connection

    if connection.vendor != "postgresql" or interval <= 0:
        yield None
        return
    with pglocks.LockSampler(
        pglocks.conninfo(connection.settings_dict), interval=interval
    ) as sampler:
        yield sampler


def measure(
    *,
    runs: int,
    worker_counts: list[int],
    kinds: list[str],
    database: str,
    logdir: Path,
    conversations: int | None = None,
    lock_interval: float = pglocks.INTERVAL,
) -> dict[str, Any]:
    """Drain ``runs`` runs with each backend and worker count; return the report."""
    user = common.bench_user()
    reference = in_process_ms(user=user, runs=min(30, max(3, runs)))
    rows, targets, notes = [], [], []
    with lock_sampler(lock_interval) as sampler:
        for backend in kinds:
            kind = WORKER_KINDS[backend]
            for count in worker_counts:
                item = drain(
                    kind,
                    count,
                    runs=runs,
                    conversations=conversations,
                    user=user,
                    database=database,
                    logdir=logdir,
                    sampler=sampler,
                )
                item["overhead_ms"] = item["ms_per_run_per_worker"] - reference
                rows.append(item)
    for backend in kinds:
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
            for item in by_count.values():
                item["scaling"] = item["runs_per_s"] / by_count[1]["runs_per_s"]
            for count, item in sorted(by_count.items()):
                if count > 1:
                    notes.append(
                        f"{backend}: 1 -> {count} workers scale throughput by "
                        f"{item['scaling']:.2f}x"
                    )
            if backend == "database" and SCALING_WORKERS in by_count:
                targets.append(scaling_target(by_count[SCALING_WORKERS]["scaling"], notes))
        if backend == "database":
            targets.extend(
                common.target(
                    f"{backend}: samples with a lock wait, {item['workers']} worker(s)",
                    value=item["lock_wait_percent"],
                    limit=LOCK_WAIT_LIMIT_PERCENT,
                    unit=" %",
                )
                for item in by_count.values()
                if "lock_wait_percent" in item
            )
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
    tables = [{"title": DRAIN_TABLE, "columns": columns, "rows": rows}]
    if any("lock_samples" in item for item in rows):
        tables.extend(lock_tables(rows))
        notes.append(
            f"lock waits: pg_locks sampled every {lock_interval * 1000:.0f} ms while the M runs "
            "drained; a sample counts when any backend of the benchmark's database waited for "
            "a lock (benchmarks/pglocks.py). CPU of the cores: workers + database backends + "
            f"this process over elapsed x {os.cpu_count()} cores."
        )
    return {
        "title": "Worker throughput",
        "benchmark": "workers",
        "in_process_ms": reference,
        "tables": tables,
        "targets": targets,
        "notes": [
            "tasks/run: tasks enqueued per run during the drain; above 1, the extra tasks find "
            "their run already claimed and return 'skipped'.",
            f"in-process reference (immediate backend, same database): {reference:.2f} ms/run",
            *(f"{name}: {WORKER_KINDS[name].description}" for name in kinds),
            *notes,
        ],
    }


def scaling_target(scaling: float, notes: list[str]) -> dict[str, Any]:
    """Issue 19's target: ``SCALING_WORKERS`` database workers drain at least
    ``SCALING_LIMIT`` x one worker's runs/s -- on a machine with a core for each."""
    cores = os.cpu_count() or 1
    if cores < SCALING_WORKERS:
        notes.append(
            f"database: {SCALING_WORKERS} workers at {scaling:.2f}x one worker's runs/s; the "
            f"target of {SCALING_LIMIT}x needs {SCALING_WORKERS} cores, this machine has "
            f"{cores}: see the worker CPU per run and the lock waits instead"
        )
    result = common.target(
        f"database: runs/s of {SCALING_WORKERS} workers over 1 worker's (at least "
        f"{SCALING_LIMIT}x, with {SCALING_WORKERS} cores; {cores} here)",
        value=scaling,
        limit=SCALING_LIMIT,
        unit="x",
    )
    result["met"] = scaling >= SCALING_LIMIT
    return result


def lock_tables(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The CPU and lock-wait tables of the rows that were sampled."""
    sampled = [item for item in rows if "lock_samples" in item]
    columns = [
        ("backend", "backend"),
        ("workers", "workers"),
        ("conversations", "conversations"),
        ("runs_per_s", "runs/s"),
        ("worker_cpu_ms_per_run", "worker CPU ms/run"),
        ("db_cpu_ms_per_run", "database CPU ms/run"),
        ("bench_cpu_ms_per_run", "benchmark CPU ms/run"),
        ("cpu_percent_of_cores", "CPU % of the cores"),
        ("lock_samples", "samples"),
        ("lock_wait_percent", "samples with a lock wait %"),
        ("notify_lock_percent", "NOTIFY lock %"),
        ("waiters_per_sample", "waiters/sample"),
        ("load_start", "load avg start"),
        ("load_end", "end"),
    ]
    wait_columns = [
        ("backend", "backend"),
        ("workers", "workers"),
        ("wait", "wait"),
        ("percent", "% of samples"),
    ]
    waits = [
        ("lock waits (pg_locks): what the waiters wait on", "lock_kinds"),
        (
            "lock waits: what the backend they wait for is doing (wait event, statement)",
            "lock_blockers",
        ),
        ("other waits of active backends (pg_stat_activity: LWLock, IO, IPC)", "other_waits"),
    ]
    tables = [{"title": CPU_TABLE, "columns": columns, "rows": sampled}]
    for title, key in waits:
        found = wait_rows(sampled, key)
        if found:  # none seen: no table
            tables.append({"title": title, "columns": wait_columns, "rows": found})
    return tables


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the benchmark, print (and optionally save) its report."""
    argv = sys.argv[1:] if argv is None else argv
    options = common.parser(__doc__.splitlines()[0], runs=100, block=1, warmup=0)
    options.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    options.add_argument(
        "--conversations",
        type=int,
        help="spread the M runs over this many conversations (default: one per run)",
    )
    options.add_argument(
        "--lock-interval",
        type=float,
        default=pglocks.INTERVAL,
        help="seconds between pg_locks samples (PostgreSQL; 0: no sampling)",
    )
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
            conversations=args.conversations,
            lock_interval=args.lock_interval,
        )
        report["machine"] = common.machine()
    return common.emit(report, argv=["benchmarks.run_workers", *argv], json_path=args.json_path)


if __name__ == "__main__":
    main()
