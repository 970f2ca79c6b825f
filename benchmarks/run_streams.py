"""Open run streams on one web process: its database connections, delta fan-out, idle CPU.

    DATABASE_URL=postgres://... python -m benchmarks.run_streams --streams 1000

One uvicorn process (the project's ASGI application with the benchmark settings, production
mode) serves N server-sent event streams of one running run. They are opened from this process
(one event loop in a thread, plain sockets), one after another. Measured while they are open:

- the database connections the web process holds (``pg_stat_activity``, by the
  ``application_name`` its ``DATABASE_URL`` gives it), sampled throughout; PostgreSQL only;
- delta fan-out: this process writes the run's streamed text (one ``UPDATE``, as a worker
  does) ``--deltas`` times, each once every client got the one before; per client, the time
  from just before the write to the delta's arrival (p50, p95), and per delta the time until
  the last client had it;
- idle CPU: the web process's CPU time (every thread, ``/proc``) over ``--idle-seconds`` with
  every stream open and nothing written, in percent of one core; the default 20 s take in the
  heartbeat every stream sends 15 s after its last event.

Targets (issue 18): at most 5 connections, p95 fan-out 500 ms, idle CPU under 5 % of a core.
The web process's pool is the project's (``DATABASE_POOL_SIZE``, default 10). Clients and
server share the machine's cores, so fan-out times include the clients' own reading.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.run_latency import group_cpu_seconds

CONNECTION_LIMIT = 5
FANOUT_P95_LIMIT_MS = 500.0
IDLE_CPU_LIMIT_PERCENT = 5.0
POLL_SECONDS = 0.01


def _enough_file_descriptors(streams: int) -> None:
    """Room for a socket per stream here and in the web process (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = streams + 512
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def _running_run(user: Any) -> Any:
    """A run a worker has claimed and that streams text (so its streams stay open)."""
    import uuid

    from agentic_django.models import AgentRun, AgentSession

    session = AgentSession.objects.create(owner=user, session_key=uuid.uuid4().hex)
    return AgentRun.objects.create(
        session=session,
        owner=user,
        agent_key="chat",
        input_payload="Hi",
        status=AgentRun.Status.RUNNING,
        attempt=1,
    )


def _cookie(user: Any) -> str:
    from django.conf import settings
    from django.test import Client

    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


class Sampler:
    """The web process's connection counts, taken whenever the benchmark waits."""

    def __init__(self, application_name: str, *, postgres: bool) -> None:
        self.application_name = application_name
        self.postgres = postgres
        self.counts: list[int] = []

    def sample(self) -> None:
        if self.postgres:
            from tests.web.live import held_connections

            self.counts.append(len(held_connections(self.application_name)))

    def wait(self, condition: Any, what: str, *, web: Any, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            web.check()
            self.sample()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(POLL_SECONDS)


def measure(*, streams: int, deltas: int, idle_seconds: float) -> dict[str, Any]:
    """Open the streams, write the deltas, watch the idle process; return the report."""
    from django.conf import settings
    from django.db import connection
    from django.urls import reverse

    from agentic_django.models import AgentRun
    from agentic_django.streams import READ_THREADS
    from tests.web.live import ClientLoop, StreamClient, web_process

    _enough_file_descriptors(streams)
    user = common.bench_user()
    run = _running_run(user)
    cookie = _cookie(user)
    path = reverse("agents:run-stream", args=[run.pk])
    postgres = connection.vendor == "postgresql"
    clients = [StreamClient() for _ in range(streams)]
    with (
        web_process(
            Path.cwd(),
            settings_module=common.SETTINGS_MODULE,
            database=connection.settings_dict,
            env={"SECRET_KEY": settings.SECRET_KEY},
        ) as web,
        ClientLoop() as loop,
    ):
        sampler = Sampler(web.application_name, postgres=postgres)
        started = time.perf_counter()
        for client in clients:
            loop.run(client.open(web, path, cookie))
        opened_s = time.perf_counter() - started
        sampler.sample()

        latencies: list[float] = []
        last_client: list[float] = []
        for number in range(1, deltas + 1):
            written = time.perf_counter()
            AgentRun.objects.filter(pk=run.pk).update(stream_text="word " * number)
            sampler.wait(
                lambda n=number: all(len(c.got("delta")) >= n for c in clients),
                f"delta {number} on every stream",
                web=web,
            )
            arrivals = [client.got("delta")[number - 1].at - written for client in clients]
            latencies += arrivals
            last_client.append(max(arrivals))

        idle_from = time.monotonic()
        before = group_cpu_seconds(web.popen.pid)
        sampler.wait(lambda: time.monotonic() - idle_from >= idle_seconds, "idle", web=web)
        idle_cpu = group_cpu_seconds(web.popen.pid) - before
        idle_elapsed = time.monotonic() - idle_from
        loop.run(_close(clients))

    latencies.sort()
    row = {
        "streams": streams,
        "open_s": opened_s,
        "connections": max(sampler.counts) if sampler.counts else None,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": common.percentile(latencies, 95) * 1000,
        "all_p50_ms": statistics.median(last_client) * 1000,
        "all_max_ms": max(last_client) * 1000,
        "idle_cpu_percent": idle_cpu / idle_elapsed * 100,
        "deltas": deltas,
    }
    columns = [
        ("streams", "open streams"),
        ("open_s", "opened in s"),
        ("connections", "connections held (max)"),
        ("p50_ms", "delta -> client p50 ms"),
        ("p95_ms", "p95 ms"),
        ("all_p50_ms", "delta -> all clients p50 ms"),
        ("all_max_ms", "max ms"),
        ("idle_cpu_percent", "idle CPU % of a core"),
        ("deltas", "deltas"),
    ]
    targets = [
        common.target(
            "p95 delta -> client", value=row["p95_ms"], limit=FANOUT_P95_LIMIT_MS, unit=" ms"
        ),
        common.target(
            "idle CPU of the web process",
            value=row["idle_cpu_percent"],
            limit=IDLE_CPU_LIMIT_PERCENT,
            unit=" %",
        ),
    ]
    if row["connections"] is not None:
        targets.insert(
            0, common.target("connections held", value=row["connections"], limit=CONNECTION_LIMIT)
        )
    return {
        "title": "Open run streams on one web process",
        "benchmark": "streams",
        "tables": [{"title": f"{streams} streams of one run", "columns": columns, "rows": [row]}],
        "targets": targets,
        "notes": [
            f"Reads run on {READ_THREADS} shared threads"
            + ("; one LISTEN connection per process." if postgres else " (SQLite)."),
            "Fan-out is timed from just before the UPDATE to each client's receipt.",
            f"Idle CPU over {idle_elapsed:.1f} s (a stream sends a heartbeat 15 s after its last "
            "event).",
        ],
    }


async def _close(clients: list[Any]) -> None:
    for client in clients:
        await client.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, run the benchmark, print (and optionally save) its report."""
    argv = sys.argv[1:] if argv is None else argv
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--streams", type=int, default=1000, help="open streams")
    options.add_argument("--deltas", type=int, default=10, help="deltas written, one at a time")
    options.add_argument("--idle-seconds", type=float, default=20.0)
    options.add_argument("--json", dest="json_path", help="also write the report as JSON here")
    args = options.parse_args(argv)
    with common.environment():
        report = measure(streams=args.streams, deltas=args.deltas, idle_seconds=args.idle_seconds)
        report["machine"] = common.machine()
    return common.emit(report, argv=["benchmarks.run_streams", *argv], json_path=args.json_path)


if __name__ == "__main__":
    main()
