"""Many runs per worker: 200 streaming runs through one worker process, 1,000 through two.

    DATABASE_URL=postgres://... python -m benchmarks.run_concurrency

Workers are started as users start them: ``manage.py agentic_django_worker`` on the database
backend, with the benchmark settings, ``AGENTIC_DJANGO_WORKER_CONCURRENCY`` set to ``--slots``
(default 200) and the project's connection pool (``DATABASE_POOL_SIZE``, default 10). Their
agent (``stream`` in ``benchmarks/registry.py``) has the project's own model: the real
``openai`` client streaming over HTTP from the project's fake OpenAI server
(``tests/fakes/openai_server.py``, served from this process), which thinks ``THINK_SECONDS``
and then streams its reply in ``PIECES`` pieces, ``REPLY_SECONDS`` in all. One after another:

- ``1 run``: a run alone, ``--single`` times, through one worker;
- ``200 runs / 100 conversations``: created together, two per conversation (a conversation's
  runs run one after another), through the same worker;
- ``200 runs streaming at once``: 200 conversations of one run each, through the same worker;
- ``1,000 runs / 2 workers``: two fresh worker processes, 500 conversations of two runs.

Measured: the wall time from just before the runs are created to the last one's
``finished_at``; per run, the first delta: from its task being queued (``dispatched_at``) to
its first streamed text in the database (noted by a trigger in the benchmark's database), and
the parts of that from its claim (``started_at``) and from the fake server writing it; the
PostgreSQL connections of the worker processes (``pg_stat_activity``, by the
``application_name`` each gets in its ``DATABASE_URL``), their RSS (``/proc``), both sampled
every ``SAMPLE_SECONDS``, and their CPU time.

Targets (issue 18): 200 runs over 100 conversations take at most 3x one run's wall time; the
first delta's p50 with 200 runs streaming is at most 2x its p50 with one run; the workers'
pooled connections stay within their pools. PostgreSQL only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import ssl
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.run_workers import WORKER_KINDS, workers

THINK_SECONDS = 0.5  # the fake model's wait before its first piece
PIECES = 31
REPLY_SECONDS = 2.0  # from the request to the last piece
REPLY = (
    "Many runs share one worker process: each of them waits on its model nearly all the "
    "time, and the database connections they use come from the process's pool."
)
WALL_RATIO_LIMIT = 3.0
FIRST_DELTA_RATIO_LIMIT = 2.0
SAMPLE_SECONDS = 0.05
POLL_SECONDS = 0.1
TIMEOUT = 600.0
TOKEN = re.compile(r"bench-run-([0-9a-f]{32})")
LISTEN = "LISTEN "


# --- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """How long the fake model takes: to its first piece, and to its last."""

    think_s: float = THINK_SECONDS
    reply_s: float = REPLY_SECONDS

    def reply(self) -> Any:
        from tests.fakes.openai_server import Text

        delay = (self.reply_s - self.think_s) / (PIECES - 1)
        return Text(REPLY, deltas=PIECES, delay=delay, first_delay=self.think_s)


def fake_model(model: Model, *, tls: ssl.SSLContext | None = None) -> Any:
    """The project's fake OpenAI server answering as ``model`` (over HTTPS with ``tls``),
    noting when it writes each run's first text delta (by the run's token, in the request)."""
    from tests.fakes import openai_server

    class TimedHandler(openai_server._Handler):
        def _answer(self, api: str, body: dict[str, Any], reply: Any) -> None:
            tokens = TOKEN.findall(json.dumps(body))
            self.token = tokens[-1] if tokens else ""  # a run's history has earlier tokens
            self.sent_text = False
            super()._answer(api, body, reply)

        def _write_chunk(self, data: bytes) -> None:
            # Noted before the write: on a busy machine the run can store the text before this
            # thread runs again, and the piece must never seem to arrive before it was sent.
            if not self.sent_text and b'"response.output_text.delta"' in data:
                self.sent_text = True
                self.server.fake.first_delta[self.token] = time.time()
            super()._write_chunk(data)

    fake = openai_server.FakeOpenAI(tls=tls)
    fake.model = model
    fake.first_delta = {}
    fake._server.RequestHandlerClass = TimedHandler
    return fake


# --- the database ---------------------------------------------------------------------------


def note_first_text() -> None:
    """A trigger noting (database clock) when each run's streamed text first appears."""
    from django.db import connection

    from agentic_django.models import AgentRun

    table = connection.ops.quote_name(AgentRun._meta.db_table)
    pk = connection.ops.quote_name(AgentRun._meta.pk.column)
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE bench_first_text (run_id text PRIMARY KEY, at timestamptz NOT NULL)"
        )
        cursor.execute(
            "CREATE FUNCTION bench_first_text() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"INSERT INTO bench_first_text VALUES (NEW.{pk}::text, clock_timestamp()) "
            "ON CONFLICT DO NOTHING; RETURN NULL; END $$"
        )
        cursor.execute(
            f"CREATE TRIGGER bench_first_text AFTER UPDATE OF stream_text ON {table} "
            "FOR EACH ROW WHEN (OLD.stream_text = '' AND NEW.stream_text <> '') "
            "EXECUTE FUNCTION bench_first_text()"
        )


def first_texts(ids: list[str]) -> dict[str, datetime]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT run_id, at FROM bench_first_text WHERE run_id = ANY(%s)", [list(ids)]
        )
        return dict(cursor.fetchall())


def pool_size() -> int:
    from django.db import connection

    return connection.settings_dict["OPTIONS"]["pool"]["max_size"]


# --- the worker processes -------------------------------------------------------------------


@dataclass
class Sample:
    """The highest values seen while a phase ran, over all the worker processes."""

    connections: int = 0  # all of them
    listening: int = 0  # of which LISTEN connections (outside the pools)
    pooled: int = 0  # the rest
    rss_mb: float = 0.0  # the largest process


class Sampler:
    """Samples the worker processes' connections and RSS from a thread of its own."""

    def __init__(self, names: dict[int, str], *, database: dict[str, Any]) -> None:
        self.names = names  # pid -> application_name
        self.database = database
        self.phase: Sample | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def measuring(self) -> Iterator[Sample]:
        sample = Sample()
        self.phase = sample
        try:
            yield sample
        finally:
            time.sleep(SAMPLE_SECONDS * 2)
            self.phase = None

    def _run(self) -> None:
        import psycopg

        from tests.web.live import database_url

        url = database_url(self.database, "bench-sampler")
        with psycopg.connect(url, autocommit=True) as db:
            while not self._stop.wait(SAMPLE_SECONDS):
                sample = self.phase
                if sample is None:
                    continue
                rows = db.execute(
                    "SELECT query FROM pg_stat_activity WHERE application_name = ANY(%s)",
                    [list(self.names.values())],
                ).fetchall()
                listening = sum(query.startswith(LISTEN) for (query,) in rows)
                sample.connections = max(sample.connections, len(rows))
                sample.listening = max(sample.listening, listening)
                sample.pooled = max(sample.pooled, len(rows) - listening)
                sample.rss_mb = max(sample.rss_mb, *(rss_mb(pid) for pid in self.names))


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """CPU time so far of process ``pid``, its ended threads included (``/proc``, in ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def worker_pool(
    count: int, *, slots: int, model_url: str, database: dict[str, Any], logdir: Path
) -> Iterator[tuple[list[Any], Sampler]]:
    """``count`` database-backend workers of ``slots`` slots each, talking to the fake model;
    a sampler of their connections and RSS."""
    from tests.web.live import database_url

    prefix = f"agentic-worker-{uuid.uuid4().hex[:8]}"

    def env_of(index: int) -> dict[str, str]:
        return {
            "DATABASE_URL": database_url(database, f"{prefix}-{index}"),
            "AGENTIC_DJANGO_WORKER_CONCURRENCY": str(slots),
            "OPENAI_BASE_URL": model_url,
            "OPENAI_API_MODE": "responses",
            "OPENAI_MODEL": "fake-model",
            "OPENAI_API_KEY": "",
            "OPENAI_MAX_RETRIES": "0",
        }

    kind = WORKER_KINDS["database"]
    with workers(kind, count, database=database["NAME"], logdir=logdir, env_of=env_of) as processes:
        names = {process.pid: f"{prefix}-{index}" for index, process in enumerate(processes)}
        try:
            with Sampler(names, database=database) as sampler:
                yield processes, sampler
        except Exception:
            for log in sorted(logdir.glob(f"{kind.name}-{count}-*.log")):
                sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}\n")
            raise


# --- runs -----------------------------------------------------------------------------------


@dataclass
class Batch:
    """Runs created together: their ids, tokens (run id -> token) and creation time."""

    name: str
    conversations: int
    submitted: float  # time.time() just before the first was created
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return list(self.tokens)


def submit(name: str, conversations: int, per_conversation: int, *, user: Any) -> Batch:
    """Create ``per_conversation`` runs in each of ``conversations`` new sessions through the
    public path, in one transaction (a session's first runs first); each task is queued as it
    commits."""
    from django.db import transaction

    from agentic_django.models import AgentRun, AgentSession
    from agentic_django.services import enqueue_agent_run

    batch = Batch(name, conversations, time.time())
    with transaction.atomic():
        sessions = [
            AgentSession.objects.create(owner=user, session_key=uuid.uuid4().hex)
            for _ in range(conversations)
        ]
        for _ in range(per_conversation):
            for session in sessions:
                token = uuid.uuid4().hex
                run = AgentRun.objects.create(
                    session=session,
                    owner=user,
                    agent_key="stream",
                    input_payload=f"Hello bench-run-{token}",
                )
                enqueue_agent_run(str(run.id))
                batch.tokens[str(run.id)] = token
    return batch


def wait_finished(batch: Batch, *, processes: list[Any]) -> None:
    from agentic_django.models import AgentRun

    deadline = time.monotonic() + TIMEOUT
    terminal = list(AgentRun.TERMINAL_STATUSES)
    runs = AgentRun.objects.filter(pk__in=batch.ids)
    while True:
        done = runs.filter(status__in=terminal).count()
        if done == len(batch.ids):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{batch.name}: {done}/{len(batch.ids)} runs finished")
        if any(process.poll() is not None for process in processes):
            raise RuntimeError("a worker exited early; see its log")
        time.sleep(POLL_SECONDS)


@dataclass
class Result:
    """What one batch measured, raw: wall time and, per run, first-delta times in seconds."""

    runs: int = 0
    completed: int = 0
    wall_s: float = 0.0
    queued: list[float] = field(default_factory=list)  # task queued -> first text in the run
    claimed: list[float] = field(default_factory=list)  # claimed -> first text in the run
    model: list[float] = field(default_factory=list)  # the server wrote it -> in the run
    missing: int = 0  # completed runs without a first text noted
    errors: list[str] = field(default_factory=list)


def result_of(batch: Batch, fake: Any) -> Result:
    from agentic_django.models import AgentRun

    rows = list(
        AgentRun.objects.filter(pk__in=batch.ids).values(
            "id", "status", "error", "dispatched_at", "started_at", "finished_at"
        )
    )
    texts = first_texts(batch.ids)
    result = Result(runs=len(rows))
    result.wall_s = max(row["finished_at"].timestamp() for row in rows) - batch.submitted
    for row in rows:
        run_id = str(row["id"])
        if row["status"] != AgentRun.Status.COMPLETED:
            result.errors.append(f"{run_id}: {row['status']} {row['error']}")
            continue
        result.completed += 1
        text = texts.get(run_id)
        if text is None:
            result.missing += 1
            continue
        result.queued.append((text - row["dispatched_at"]).total_seconds())
        result.claimed.append((text - row["started_at"]).total_seconds())
        written = fake.first_delta.get(batch.tokens[run_id])
        if written is not None:
            result.model.append(text.timestamp() - written)
    return result


@dataclass
class Phase:
    """One measured batch (or several, for single runs) with its workers' samples."""

    name: str
    processes: int
    slots: int
    conversations: int
    per_conversation: int
    result: Result
    sample: Sample
    cpu_s: float
    floor_s: float  # the model's time alone: waves of its reply time
    model_connections: int = 0  # connections the workers opened to the model server


def run_phase(
    name: str,
    *,
    conversations: int,
    per_conversation: int,
    repeat: int = 1,
    slots: int,
    processes: list[Any],
    sampler: Sampler,
    fake: Any,
    user: Any,
) -> Phase:
    """Submit the batch ``repeat`` times (one after another), wait for each; the wall time is
    the median of the batches'."""
    runs = conversations * per_conversation
    fake.reply(fake.model.reply(), repeat=runs * repeat)
    combined, walls = Result(), []
    cpu_before = sum(cpu_seconds(process.pid) for process in processes)
    connections_before = fake.connections_opened
    with sampler.measuring() as sample:
        for _ in range(repeat):
            batch = submit(name, conversations, per_conversation, user=user)
            wait_finished(batch, processes=processes)
            result = result_of(batch, fake)
            walls.append(result.wall_s)
            for name_ in ("queued", "claimed", "model", "errors"):
                getattr(combined, name_).extend(getattr(result, name_))
            combined.runs += result.runs
            combined.completed += result.completed
            combined.missing += result.missing
    cpu_s = sum(cpu_seconds(process.pid) for process in processes) - cpu_before
    combined.wall_s = statistics.median(walls)
    total_slots = slots * len(processes)
    waves = max(per_conversation, math.ceil(runs / total_slots))
    return Phase(
        name,
        len(processes),
        slots,
        conversations,
        per_conversation,
        combined,
        sample,
        cpu_s / repeat,
        waves * fake.model.reply_s,
        fake.connections_opened - connections_before,
    )


def warm_up(processes: list[Any], fake: Any, *, user: Any) -> None:
    """Two runs per worker process, twice: the workers' start and first-run costs."""
    for _ in range(2):
        fake.reply(fake.model.reply(), repeat=2 * len(processes))
        batch = submit("warm-up", 2 * len(processes), 1, user=user)
        wait_finished(batch, processes=processes)


# --- the floor: the SDK alone ---------------------------------------------------------------

# How the floor process runs its runs: all on one event loop, or each on a thread and event
# loop of its own (as a worker ran them before it shared a loop); with a new SSL context per
# run's client, or with the project's client (one SSL context shared by the process); all at
# once, or two after another in each of half as many conversations (the wall-time phase's
# shape). The last is the floor of the engine's targets: how the SDK alone fares against them.
FLOOR_VARIANTS = (
    ("loop", False, 1, 1),
    ("loop", False, None, 1),
    ("threads", False, None, 1),
    ("loop", True, None, 1),
    ("threads", True, None, 1),
    ("loop", True, None, 2),
)
# The floors the engine's targets compare with: how its worker runs the wall-time phase (two
# runs a conversation) and the streaming phase (all at once) -- (how, shared SSL, per conversation).
WALL_FLOOR = ["loop", True, 2]
FIRST_DELTA_FLOOR = ["loop", True, 1]


def floor(fake: Any, *, runs: int, logdir: Path) -> list[dict[str, Any]]:
    """The same agent's runs without the engine or a database, in a process of their own
    (the fake server's threads stay out of its interpreter), one variant after another."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": common.SETTINGS_MODULE,
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_API_MODE": "responses",
        "OPENAI_MODEL": "fake-model",
        "OPENAI_API_KEY": "",
        "OPENAI_MAX_RETRIES": "0",
    }
    # Each variant runs one untimed run first.
    fake.reply(fake.model.reply(), repeat=sum(1 + (n or runs) for *_, n, _ in FLOOR_VARIANTS))
    argv = [sys.executable, "-m", "benchmarks.run_concurrency", "--floor-only", "--runs", str(runs)]
    with (logdir / "floor.log").open("ab") as log:
        done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=log, check=True)
    return json.loads(done.stdout.decode().splitlines()[-1])


def floor_process(runs: int) -> list[dict[str, Any]]:
    """Each of ``FLOOR_VARIANTS``: its runs of the ``stream`` agent at once (after one
    untimed), their events drained like a worker's; wall time, first deltas, CPU."""
    import asyncio

    import django

    django.setup()
    from agents import RunConfig, Runner

    from benchmarks.registry import build_stream
    from chat import providers

    shared_context = providers.tls_context

    def new_context() -> ssl.SSLContext:
        return shared_context.__wrapped__()  # not cached: one per client

    async def one() -> float:
        started = time.monotonic()
        result = Runner.run_streamed(
            build_stream(), "Hello", run_config=RunConfig(tracing_disabled=True)
        )
        first = 0.0
        async for event in result.stream_events():
            data = getattr(event, "data", None)
            if not first and getattr(data, "type", "") == "response.output_text.delta":
                first = time.monotonic() - started
        return first

    rows: list[dict[str, Any]] = []
    for how, shared_ssl, count, per_conversation in FLOOR_VARIANTS:
        count = count or runs
        providers.tls_context = shared_context if shared_ssl else new_context
        firsts: list[float] = [0.0] * count

        async def conversation(per: int = per_conversation) -> list[float]:
            return [await one() for _ in range(per)]

        async def together(count: int = count, per: int = per_conversation) -> list[float]:
            done = await asyncio.gather(*(conversation() for _ in range(count // per)))
            return [first for firsts in done for first in firsts]

        def alone(index: int, firsts: list[float] = firsts) -> None:
            firsts[index] = asyncio.run(one())

        asyncio.run(one())
        cpu_before, started = cpu_seconds(os.getpid()), time.monotonic()
        if how == "loop":
            firsts = asyncio.run(together())
        else:
            threads = [threading.Thread(target=alone, args=(i,)) for i in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        wall = time.monotonic() - started
        where = "one event loop" if how == "loop" else "a thread and event loop each"
        shape = f" / {count // per_conversation} conversations" if per_conversation > 1 else ""
        alone = rows[0] if rows else None
        first_p50 = ms(firsts, 50)
        rows.append(
            {
                "variant": f"{count} run{'s' * (count > 1)}{shape} in {where}"
                + (", shared SSL context" if shared_ssl else ""),
                "shape": [how, shared_ssl, per_conversation],
                "runs": count,
                "wall_s": wall,
                "wall_x": wall / alone["wall_s"] if alone else 1.0,
                "first_p50": first_p50,
                "first_p95": ms(firsts, 95),
                "first_x": first_p50 / alone["first_p50"] if alone else 1.0,
                "cpu_ms_per_run": (cpu_seconds(os.getpid()) - cpu_before) * 1000 / count,
            }
        )
    return rows


FLOOR_COLUMNS = [
    ("variant", "the SDK alone, no engine or database"),
    ("wall_s", "wall s"),
    ("wall_x", "x one run"),
    ("first_p50", "start -> first delta p50 ms"),
    ("first_p95", "p95 ms"),
    ("first_x", "p50 x one run"),
    ("cpu_ms_per_run", "CPU ms/run"),
]


# --- report ---------------------------------------------------------------------------------


def ms(values: list[float], q: float) -> float | None:
    return common.percentile(sorted(values), q) * 1000 if values else None


def rows_of(phases: list[Phase], pool: int) -> dict[str, list[dict[str, Any]]]:
    single = phases[0]
    wall, delta, resources = [], [], []
    for phase in phases:
        result = phase.result
        runs = phase.conversations * phase.per_conversation
        base = {"phase": phase.name}
        wall.append(
            {
                **base,
                "processes": phase.processes,
                "slots": phase.slots,
                "runs": runs,
                "conversations": phase.conversations,
                "completed": f"{result.completed}/{result.runs}",
                "wall_s": result.wall_s,
                "floor_s": phase.floor_s,
                "vs_one": result.wall_s / single.result.wall_s,
                "runs_per_s": runs / result.wall_s,
            }
        )
        delta.append(
            {
                **base,
                "n": len(result.queued),
                "queued_p50": ms(result.queued, 50),
                "queued_p95": ms(result.queued, 95),
                "vs_one": (
                    ms(result.queued, 50) / ms(single.result.queued, 50)
                    if result.queued and single.result.queued
                    else None
                ),
                "claimed_p50": ms(result.claimed, 50),
                "claimed_p95": ms(result.claimed, 95),
                "model_p50": ms(result.model, 50),
                "model_p95": ms(result.model, 95),
                "missing": result.missing,
            }
        )
        resources.append(
            {
                **base,
                "connections": phase.sample.connections,
                "pooled": phase.sample.pooled,
                "listening": phase.sample.listening,
                "pool_limit": pool * phase.processes,
                "rss_mb": phase.sample.rss_mb,
                "cpu_ms_per_run": phase.cpu_s * 1000 / runs,
                "model_connections_per_run": phase.model_connections / max(result.runs, 1),
            }
        )
    return {"wall": wall, "delta": delta, "resources": resources}


WALL_COLUMNS = [
    ("phase", "phase"),
    ("processes", "worker processes"),
    ("slots", "slots each"),
    ("runs", "runs"),
    ("conversations", "conversations"),
    ("completed", "completed"),
    ("wall_s", "wall s"),
    ("floor_s", "model alone s"),
    ("vs_one", "x one run"),
    ("runs_per_s", "runs/s"),
]
DELTA_COLUMNS = [
    ("phase", "phase"),
    ("n", "runs"),
    ("queued_p50", "queued -> first text p50 ms"),
    ("queued_p95", "p95 ms"),
    ("vs_one", "p50 x one run"),
    ("claimed_p50", "claimed -> first text p50 ms"),
    ("claimed_p95", "p95 ms"),
    ("model_p50", "model wrote it -> in the run p50 ms"),
    ("model_p95", "p95 ms"),
]
RESOURCE_COLUMNS = [
    ("phase", "phase"),
    ("connections", "connections (max)"),
    ("pooled", "pooled (max)"),
    ("listening", "LISTEN"),
    ("pool_limit", "pool size x processes"),
    ("rss_mb", "worker RSS max MB"),
    ("cpu_ms_per_run", "worker CPU ms/run"),
    ("model_connections_per_run", "connections to the model / run"),
]


def report_of(
    phases: list[Phase],
    floors: list[dict[str, Any]],
    *,
    pool: int,
    model: Model,
    loads: list[float],
) -> dict[str, Any]:
    rows = rows_of(phases, pool)
    by_name = {phase.name: phase for phase in phases}
    single, conversations, streaming = (by_name[name] for name in list(by_name)[:3])
    targets = [
        common.target(
            f"{conversations.name}: wall time / one run's",
            value=conversations.result.wall_s / single.result.wall_s,
            limit=WALL_RATIO_LIMIT,
            unit="x",
        ),
        common.target(
            f"{streaming.name}: first delta p50 / one run's",
            value=ms(streaming.result.queued, 50) / ms(single.result.queued, 50),
            limit=FIRST_DELTA_RATIO_LIMIT,
            unit="x",
        ),
    ]
    for phase in phases:
        if phase is single or phase is conversations:
            continue  # the same worker as the streaming phase
        targets.append(
            common.target(
                f"{phase.name}: pooled connections (max)",
                value=phase.sample.pooled,
                limit=pool * phase.processes,
            )
        )
    errors = [error for phase in phases for error in phase.result.errors]
    notes = [
        f"The fake model answers every request in {model.reply_s:.1f} s: "
        f"{model.think_s:.1f} s before its first piece, then {PIECES} pieces; 'model alone' is "
        "that time per wave of runs (a conversation's runs are waves; so are runs beyond the "
        "slots).",
        "First delta: from the run's task being queued (dispatched_at) to its first streamed "
        "text in the database; 'claimed' starts at the worker's claim, 'model wrote it' when "
        "the fake server wrote the first piece.",
        "Connections: every connection of the worker processes (pg_stat_activity); each process "
        "also holds one LISTEN connection for task wake-ups, outside its pool.",
        f"Wall time of '{single.name}': median of its runs, each alone.",
        "Load average (1 min) at the start and the end: "
        + ", ".join(f"{load:.1f}" for load in loads),
    ]
    if floors:
        waves, at_once = (
            next(row for row in floors if row["shape"] == shape)
            for shape in (WALL_FLOOR, FIRST_DELTA_FLOOR)
        )
        notes.append(
            f"The SDK alone against the same targets (floor table): {waves['variant']}: "
            f"wall {waves['wall_x']:.2f}x one run's; {at_once['variant']}: first delta p50 "
            f"{at_once['first_x']:.2f}x one run's."
        )
    if errors:
        notes.append(f"{len(errors)} run(s) did not complete, e.g. {errors[0]}")
    return {
        "title": "Many runs per worker",
        "benchmark": "concurrency",
        "tables": [
            {"title": "wall time", "columns": WALL_COLUMNS, "rows": rows["wall"]},
            {"title": "first delta", "columns": DELTA_COLUMNS, "rows": rows["delta"]},
            {
                "title": "worker processes",
                "columns": RESOURCE_COLUMNS,
                "rows": rows["resources"],
            },
            {"title": "floor", "columns": FLOOR_COLUMNS, "rows": floors},
        ],
        "targets": targets,
        "notes": notes,
    }


def server_tls(logdir: Path) -> ssl.SSLContext:
    """A TLS context for the fake model with a certificate for 127.0.0.1 made for this run (by
    ``openssl``), which the processes started from here trust (``SSL_CERT_FILE``) and
    nothing else does."""
    cert, key = logdir / "model-cert.pem", logdir / "model-key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    os.environ["SSL_CERT_FILE"] = str(cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def measure(args: argparse.Namespace, *, logdir: Path) -> dict[str, Any]:
    from django.db import connection

    loads = [os.getloadavg()[0]]
    note_first_text()
    user = common.bench_user()
    pool = pool_size()
    database = dict(connection.settings_dict)
    phases = []
    model = Model(think_s=args.think_seconds, reply_s=args.reply_seconds)
    with fake_model(model, tls=server_tls(logdir) if args.tls else None) as fake:
        with worker_pool(
            1, slots=args.slots, model_url=fake.url, database=database, logdir=logdir
        ) as (processes, sampler):
            warm_up(processes, fake, user=user)
            common_args = {"slots": args.slots, "processes": processes, "sampler": sampler}
            phases.append(
                run_phase(
                    "1 run",
                    conversations=1,
                    per_conversation=1,
                    repeat=args.single,
                    fake=fake,
                    user=user,
                    **common_args,
                )
            )
            phases.append(
                run_phase(
                    f"{args.runs} runs / {args.runs // 2} conversations",
                    conversations=args.runs // 2,
                    per_conversation=2,
                    fake=fake,
                    user=user,
                    **common_args,
                )
            )
            phases.append(
                run_phase(
                    f"{args.runs} runs streaming at once",
                    conversations=args.runs,
                    per_conversation=1,
                    fake=fake,
                    user=user,
                    **common_args,
                )
            )
        if args.many:
            with worker_pool(
                2, slots=args.slots, model_url=fake.url, database=database, logdir=logdir
            ) as (processes, sampler):
                warm_up(processes, fake, user=user)
                phases.append(
                    run_phase(
                        f"{args.many} runs / 2 workers",
                        conversations=args.many // 2,
                        per_conversation=2,
                        slots=args.slots,
                        processes=processes,
                        sampler=sampler,
                        fake=fake,
                        user=user,
                    )
                )
        floors = floor(fake, runs=args.runs, logdir=logdir) if args.floor else []
        if fake.unexpected or fake.errors:
            raise RuntimeError(f"fake model: {fake.unexpected[:1]} {fake.errors[:1]}")
    loads.append(os.getloadavg()[0])
    return report_of(phases, floors, pool=pool, model=model, loads=loads)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the benchmark, print (and optionally save) its report."""
    argv = sys.argv[1:] if argv is None else argv
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument(
        "--runs", type=int, default=200, help="runs through one worker (even: 2 per conversation)"
    )
    options.add_argument("--many", type=int, default=1000, help="runs through 2 workers (0: no)")
    options.add_argument("--single", type=int, default=5, help="runs alone, one at a time")
    options.add_argument("--slots", type=int, default=200, help="WORKER_CONCURRENCY")
    options.add_argument("--reply-seconds", type=float, default=REPLY_SECONDS)
    options.add_argument("--think-seconds", type=float, default=THINK_SECONDS)
    options.add_argument(
        "--no-floor", dest="floor", action="store_false", help="skip the SDK-alone floor"
    )
    options.add_argument(
        "--tls", action="store_true", help="the fake model serves HTTPS (as providers do)"
    )
    options.add_argument("--json", dest="json_path", help="also write the report as JSON here")
    # The floor's own process (see ``floor``).
    options.add_argument("--floor-only", action="store_true", help=argparse.SUPPRESS)
    args = options.parse_args(argv)
    if args.floor_only:
        rows = floor_process(args.runs)
        print(json.dumps(rows))
        return {"floor": rows}
    with common.environment(task_backend="database") as env:
        from django.db import connection

        if connection.vendor != "postgresql":
            report = {
                "title": "Many runs per worker",
                "benchmark": "concurrency",
                "tables": [],
                "notes": ["PostgreSQL only: not measured on " + connection.vendor],
            }
        else:
            report = measure(args, logdir=env["workdir"])
        report["machine"] = common.machine()
    return common.emit(report, argv=["benchmarks.run_concurrency", *argv], json_path=args.json_path)


if __name__ == "__main__":
    main()
