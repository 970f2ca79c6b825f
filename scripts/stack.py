"""The compose stack of a generated project, run natively, under load, then audited.

Bakes a project (postgres + rq by default), starts PostgreSQL and Redis on loopback (Redis with
the append-only file, as compose runs it), then the project's migrate, web (uvicorn, several
workers) and N task workers with the commands and environment `docker compose config` gives
them. Web and workers are restarted when they exit, like compose's `restart: unless-stopped`.
Everything is stopped by pid at the end.

The long load run (figures in docs/reliability.md):

    .venv/bin/python scripts/stack.py load --users 20 --seconds 60 --workers 2

`tests/test_faults.py` uses the same pieces (`native_stack`, `audit`) for its fault tests; the
baking, the build steps and the servers are shared with tests/test_stack.py
(scripts/native_stack.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from scripts.bake import Combo  # noqa: E402
from scripts.loadtest import LoadConfig, LoadTest, create_users, print_summary  # noqa: E402
from scripts.native_stack import (  # noqa: E402
    BuiltProject,
    Stack,
    build_project,
    kill_tree,
    running_servers,
)
from scripts.servers import Server  # noqa: E402

RQ_POSTGRES = Combo("rq", "postgres", "none")
DATABASE_POSTGRES = Combo("database", "postgres", "none")
TERMINAL = ("completed", "failed", "cancelled")
LOAD_PASSWORD = "load-test-password-42"
# Short leases make recovery after a killed worker quick; below ~10 s a live worker starved of
# CPU on a loaded 2-core machine can miss its renewals and lose its run (fenced, but retried).
LEASE_SECONDS = 10
STACK_ENV = {
    "AGENTIC_DJANGO_LEASE_SECONDS": str(LEASE_SECONDS),
    # Load users create runs back to back; the per-user limit itself is tested elsewhere.
    "AGENTIC_DJANGO_RATE_LIMIT": "100000/m",
}


@dataclass
class NativeStack(Stack):
    """`Stack` whose web service runs several uvicorn worker processes."""

    web_workers: int = 1

    def argv(self, service: str) -> list[str]:
        command = super().argv(service)
        if service == "web" and self.web_workers > 1:
            command += ["--workers", str(self.web_workers)]
        return command


@dataclass
class Slot:
    """One long-running service instance (e.g. `worker-1`) across its restarts."""

    name: str
    service: str
    process: subprocess.Popen | None = None
    generation: int = 0
    held: bool = False
    restarts: int = 0


class Deployment:
    """A running stack: servers, app processes in slots, and a restart-policy supervisor."""

    def __init__(
        self, stack: NativeStack, combo: Combo, postgres: Server, redis: Server | None
    ) -> None:
        self.stack = stack
        self.combo = combo
        self.postgres = postgres
        self.redis = redis
        self.slots: dict[str, Slot] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def database_url(self) -> str:
        return self.postgres.url

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.stack.web_port}"

    def start_slot(self, name: str, service: str) -> subprocess.Popen:
        """Start (or start again) the process of `name`; logs go to `<name>.<generation>.log`."""
        with self._lock:
            slot = self.slots.setdefault(name, Slot(name, service))
            slot.generation += 1
            slot.process = self.stack.start(service, name=f"{name}.{slot.generation}")
            return slot.process

    def process(self, name: str) -> subprocess.Popen:
        process = self.slots[name].process
        assert process is not None
        return process

    def workers(self) -> list[str]:
        return [name for name, slot in self.slots.items() if slot.service == "worker"]

    def busy_workers(self) -> list[tuple[str, str]]:
        """(slot, run id) for each RQ worker of ours executing a claimed (running) run now."""
        from redis import Redis
        from rq import Worker

        assert self.redis is not None, "only RQ workers report their current job"
        with Redis.from_url(self.redis.url) as connection:
            jobs = {}
            for worker in Worker.all(connection=connection):
                job_id = worker.get_current_job_id()
                if job_id:
                    jobs[job_id] = worker.pid
        if not jobs:
            return []
        with psycopg.connect(self.database_url, connect_timeout=5) as connection:
            rows = connection.execute(
                "SELECT id, task_id FROM agentic_django_agentrun"
                " WHERE status = 'running' AND task_id = ANY(%s)",
                (list(jobs),),
            ).fetchall()
        # Registrations of killed workers linger in Redis: only live processes of ours count.
        slots = {
            slot.process.pid: name
            for name, slot in self.slots.items()
            if slot.process is not None and slot.process.poll() is None
        }
        return [(slots[jobs[task]], str(run)) for run, task in rows if jobs[task] in slots]

    def log(self, name: str) -> str:
        """Every generation's log of the slot, oldest first."""
        slot = self.slots[name]
        return "".join(
            self.stack.log(f"{name}.{generation}") for generation in range(1, slot.generation + 1)
        )

    def supervise(self) -> None:
        """Restart exited app processes (compose's `restart: unless-stopped`) until stopped."""
        self._supervisor = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._supervisor.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                for slot in self.slots.values():
                    if slot.held or slot.process is None or slot.process.poll() is None:
                        continue
                    slot.restarts += 1
                    self.start_slot(slot.name, slot.service)

    @contextlib.contextmanager
    def held(self, name: str) -> Iterator[Slot]:
        """The supervisor leaves this slot alone (an operator is stopping/starting it)."""
        with self._lock:
            slot = self.slots[name]
            slot.held = True
        try:
            yield slot
        finally:
            with self._lock:
                slot.held = False

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the slot at once (`docker kill`); the supervisor restarts it."""
        kill_tree(self.process(name), sig)

    def wait_healthy(self, timeout: float = 90.0) -> None:
        stop = time.monotonic() + timeout
        while not self.stack.healthy():
            if time.monotonic() > stop:
                raise RuntimeError(f"web never became healthy:\n{self.log('web')[-4000:]}")
            time.sleep(0.3)

    def create_users(self, names: list[str], password: str = LOAD_PASSWORD) -> None:
        create_users(
            self.stack.project,
            names,
            password,
            python="python",
            env=self.stack.env_for("web"),
        )

    def shutdown(self) -> None:
        """Stop restarting processes, then stop them all."""
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        self.stack.stop()


@contextlib.contextmanager
def native_stack(
    built: BuiltProject,
    logs: Path,
    *,
    workers: int = 2,
    web_workers: int = 2,
    env: dict[str, str] | None = None,
) -> Iterator[Deployment]:
    """Fresh servers, migrate, web and `workers` task workers, supervised; all stopped after."""
    logs.mkdir(parents=True, exist_ok=True)
    stack = NativeStack(
        project=built.project,
        services=built.services,
        base_env=built.base_env,
        logs=logs,
        web_workers=web_workers,
    )
    # compose runs Redis with the append-only file: queued tasks survive a restart.
    with running_servers(
        stack, built.combo, redis_appendonly=True, env={**STACK_ENV, **(env or {})}
    ) as servers:
        redis = servers[1] if len(servers) > 1 else None
        deployment = Deployment(stack, built.combo, servers[0], redis)
        try:
            stack.run_once("migrate")
            deployment.start_slot("web", "web")
            for number in range(1, workers + 1):
                deployment.start_slot(f"worker-{number}", "worker")
            deployment.wait_healthy()
            deployment.supervise()
            yield deployment
        finally:
            deployment.shutdown()


# --- the audit ---------------------------------------------------------------------------


@dataclass
class AuditResult:
    """What the database holds for the load's users, and every rule it breaks."""

    runs: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    sessions: int = 0
    items: int = 0
    events: int = 0
    runs_unknown_to_clients: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _text(payload: dict) -> str:
    content = payload.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def _is_assistant_message(payload: dict) -> bool:
    return payload.get("role") == "assistant" and payload.get("type", "message") == "message"


def unsettled_runs(database_url: str, usernames: list[str]) -> list[tuple[str, str]]:
    """(id, status) of the users' runs that are not terminal yet."""
    with psycopg.connect(database_url, connect_timeout=5) as connection:
        rows = connection.execute(
            "SELECT r.id, r.status FROM agentic_django_agentrun r"
            " JOIN auth_user u ON u.id = r.owner_id"
            " WHERE u.username = ANY(%s) AND r.status <> ALL(%s)",
            (usernames, list(TERMINAL)),
        ).fetchall()
    return [(str(run_id), status) for run_id, status in rows]


def wait_until_settled(
    database_url: str, usernames: list[str], timeout: float
) -> list[tuple[str, str]]:
    """Wait until every run of these users is terminal; return those that are not after all."""
    stop = time.monotonic() + timeout
    while True:
        try:
            left = unsettled_runs(database_url, usernames)
        except psycopg.OperationalError:
            left = [("?", "database unreachable")]
        if not left or time.monotonic() > stop:
            return left
        time.sleep(0.5)


def audit(
    database_url: str,
    usernames: list[str],
    *,
    client_runs: list[dict] | None = None,
    allowed_retries: int = 0,
    ambiguous_creates: int = 0,
) -> AuditResult:
    """Check, straight in PostgreSQL, that the users' runs ended exactly once, history intact.

    - every run is terminal (with `finished_at`); a completed run has an output and no error;
    - extra attempts (a run executed again after its worker died) are at most `allowed_retries`;
    - a completed run's session items are its user message once, first, and its assistant reply
      last, whose text is the run's final output; items of one run are contiguous, runs follow
      each other in submission order, and no message is stored twice in a session;
    - each run's event sequence is 1..n without gaps;
    - with `client_runs` (the load report's runs): every run a client saw created exists, and
      the terminal status and `finished_at` a client saw are the final ones (it never ended
      twice); runs no client knows of are at most `ambiguous_creates` (requests without answer).
    """
    result = AuditResult()
    problems = result.problems
    with psycopg.connect(database_url, connect_timeout=5) as connection:
        runs = connection.execute(
            "SELECT r.id, r.status, r.attempt, r.input_payload, r.final_output, r.error,"
            " r.finished_at, r.created_at, r.session_id"
            " FROM agentic_django_agentrun r JOIN auth_user u ON u.id = r.owner_id"
            " WHERE u.username = ANY(%s) ORDER BY r.created_at, r.id",
            (usernames,),
        ).fetchall()
        session_ids = sorted({row[8] for row in runs})
        items = connection.execute(
            "SELECT session_id, sequence, payload, run_id FROM agentic_django_agentsessionitem"
            " WHERE session_id = ANY(%s) ORDER BY session_id, sequence",
            (session_ids,),
        ).fetchall()
        events = connection.execute(
            "SELECT run_id, array_agg(sequence ORDER BY sequence)"
            " FROM agentic_django_agentevent WHERE run_id = ANY(%s) GROUP BY run_id",
            ([row[0] for row in runs],),
        ).fetchall()

    result.runs, result.sessions, result.items = len(runs), len(session_ids), len(items)
    result.statuses = dict(Counter(row[1] for row in runs))
    result.attempts = dict(sorted(Counter(row[2] for row in runs).items()))
    result.events = sum(len(sequences) for _, sequences in events)
    by_id = {str(row[0]): row for row in runs}
    items_by_run: dict[str, list[dict]] = defaultdict(list)
    items_by_session: dict[int, list[tuple[int, dict, str | None]]] = defaultdict(list)
    for session_id, sequence, payload, run_id in items:
        items_by_session[session_id].append((sequence, payload, str(run_id) if run_id else None))
        if run_id:
            items_by_run[str(run_id)].append(payload)

    retries = 0
    for run_id, status, attempt, input_payload, output, error, finished_at, _, _ in runs:
        run_id = str(run_id)
        if status not in TERMINAL:
            problems.append(f"run {run_id} is still {status} (attempt {attempt})")
            continue
        if finished_at is None:
            problems.append(f"run {run_id} is {status} without finished_at")
        retries += max(0, attempt - 1)
        if status != "completed":
            continue
        if attempt < 1 or output is None or error:
            problems.append(f"completed run {run_id}: attempt {attempt}, error {error!r}")
        own = items_by_run.get(run_id, [])
        users = [payload for payload in own if payload.get("role") == "user"]
        if not own or own[0].get("role") != "user" or _text(own[0]) != input_payload:
            problems.append(f"completed run {run_id}: its items do not start with its message")
        if len(users) != 1:
            problems.append(f"completed run {run_id}: {len(users)} user messages among its items")
        if not own or not _is_assistant_message(own[-1]):
            problems.append(f"completed run {run_id}: its items do not end with a reply")
        elif isinstance(output, str) and _text(own[-1]) != output:
            problems.append(f"completed run {run_id}: the last reply is not its final output")
    if retries > allowed_retries:
        problems.append(f"{retries} extra attempt(s), but the faults explain {allowed_retries}")

    for session_id, rows in items_by_session.items():
        finished_blocks: set[str] = set()
        order: list[str] = []
        current = None
        texts = Counter()
        for _, payload, run_id in rows:
            if run_id is None:
                problems.append(f"session {session_id}: an item belongs to no run")
            if payload.get("role") == "user":
                texts[_text(payload)] += 1
            if run_id != current:
                if run_id in finished_blocks:
                    problems.append(f"session {session_id}: items of run {run_id} interleaved")
                if current is not None:
                    finished_blocks.add(current)
                current = run_id
                order.append(run_id)
        created = [by_id[run_id][7] for run_id in order if run_id in by_id]
        if created != sorted(created):
            problems.append(f"session {session_id}: runs' items are not in submission order")
        for text, count in texts.items():
            if count > 1:
                problems.append(f"session {session_id}: message {text[:60]!r} stored {count}x")

    for run_id, sequences in events:
        if list(sequences) != list(range(1, len(sequences) + 1)):
            problems.append(f"run {run_id}: event sequences {list(sequences)} are not 1..n")

    if client_runs is not None:
        seen = set()
        for record in client_runs:
            if not record.get("id"):
                continue
            seen.add(record["id"])
            row = by_id.get(record["id"])
            if row is None:
                problems.append(f"run {record['id']} was created (201) but is not stored")
                continue
            if record.get("finished_at") is None:
                continue
            observed = datetime.fromisoformat(record["finished_at"])
            if record["status"] != row[1] or observed != row[6]:
                problems.append(
                    f"run {record['id']}: a client saw it end {record['status']} at"
                    f" {record['finished_at']}, it is now {row[1]} at {row[6]}"
                )
        result.runs_unknown_to_clients = len(set(by_id) - seen)
        if result.runs_unknown_to_clients > ambiguous_creates:
            problems.append(
                f"{result.runs_unknown_to_clients} run(s) no client knows of, but only"
                f" {ambiguous_creates} create request(s) went unanswered"
            )
    return result


# --- the load command --------------------------------------------------------------------


def ambiguous_creates(report: dict) -> int:
    """Create requests whose outcome the client could not know (no answer, or a 5xx)."""
    failed = sum(1 for run in report["runs"] if run["create_status"] == "no response")
    return failed + report["server_errors_5xx"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="start the stack, run the load test, audit, stop")
    load.add_argument("--users", type=int, default=20)
    load.add_argument("--seconds", type=float, default=60.0)
    load.add_argument("--max-requests", type=int, default=1_000_000)
    load.add_argument("--workers", type=int, default=2, help="task worker processes")
    load.add_argument("--web-workers", type=int, default=2, help="uvicorn worker processes")
    load.add_argument("--backend", choices=["rq", "database"], default="rq")
    load.add_argument("--report", type=Path, default=Path("load-report.json"))
    load.add_argument("--workdir", type=Path, help="keep the baked project and logs here")
    args = parser.parse_args(argv)

    combo = RQ_POSTGRES if args.backend == "rq" else DATABASE_POSTGRES
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="agentic-stack-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"load{uuid.uuid4().hex[:6]}"
    users = [f"{tag}-user-{number}" for number in range(args.users)]
    started = time.monotonic()
    built = build_project(workdir, combo)
    with native_stack(
        built, workdir / "logs", workers=args.workers, web_workers=args.web_workers
    ) as deployment:
        print(f"stack up in {time.monotonic() - started:.0f}s: {deployment.base_url}", flush=True)
        deployment.create_users(users)
        config = LoadConfig(
            base_url=deployment.base_url,
            users=[(name, LOAD_PASSWORD) for name in users],
            seconds=args.seconds,
            max_requests=args.max_requests,
            tag=tag,
        )
        report = asyncio.run(LoadTest(config).run())
        left = wait_until_settled(deployment.database_url, users, timeout=LEASE_SECONDS * 5)
        result = audit(
            deployment.database_url,
            users,
            client_runs=report["runs"],
            ambiguous_creates=ambiguous_creates(report),
        )
        restarts = {name: slot.restarts for name, slot in deployment.slots.items()}
    report["stack"] = {
        "combo": combo.id,
        "task_workers": args.workers,
        "web_workers": args.web_workers,
        "unexpected_restarts": restarts,
        "cpus": os.cpu_count(),
    }
    report["audit"] = asdict(result) | {"ok": result.ok, "unsettled_before_audit": len(left)}
    args.report.write_text(json.dumps(report, indent=2, default=str))
    print_summary(report)
    summary = {key: value for key, value in report["audit"].items() if key != "problems"}
    print(f"audit: {summary}")
    for problem in result.problems[:50]:
        print(f"  PROBLEM: {problem}")
    print(f"report: {args.report}  logs: {workdir / 'logs'}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
