"""Fault tests on the compose stack run natively (postgres + rq): a short load, one fault in
the middle of it, then the audit of every run the load created (scripts/stack.py `audit`).

Each test starts fresh servers and processes from one baked project; web and workers are
restarted when they exit, as compose's `restart: unless-stopped` does. Leases last 6 s so a
killed worker's run is recoverable quickly. The documented outcome of each fault is in
docs/reliability.md; run with `-rP` to see each test's figures.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable, Container, Iterator
from dataclasses import asdict
from pathlib import Path

import psycopg
import pytest

from scripts.loadtest import LoadConfig, LoadTest
from scripts.stack import (
    DATABASE_POSTGRES,
    LEASE_SECONDS,
    LOAD_PASSWORD,
    RQ_POSTGRES,
    AuditResult,
    BuiltProject,
    Deployment,
    ambiguous_creates,
    audit,
    build_project,
    native_stack,
    wait_until_settled,
)
from tests.test_stack import PASSWORD, USERNAME, Client, has_slow_path

pytestmark = [pytest.mark.stack, pytest.mark.xdist_group("faults")]

USERS = 6
LOAD_SECONDS = 20.0
# Runs completed before a fault is injected, so the load is in full swing.
WARM_RUNS = 4
SETTLE_SECONDS = LEASE_SECONDS * 5
ENQUEUE_FAILED = "The run could not be queued: the task queue is unavailable. Try again shortly."
SLOW_SECONDS = 8


class BackgroundLoad:
    """The load test in a thread, so the test can inject a fault while it runs."""

    def __init__(self, config: LoadConfig) -> None:
        self.load = LoadTest(config)
        self.report: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="load", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.report = asyncio.run(self.load.run())
        except BaseException as error:  # surfaced by join()
            self.error = error

    def completed(self) -> int:
        return self.load.stats.terminal["completed"]

    def wait_for_completed(self, count: int, timeout: float = 120.0) -> None:
        stop = time.monotonic() + timeout
        while self.completed() < count:
            assert self.thread.is_alive(), f"the load ended early: {self.error!r}"
            assert time.monotonic() < stop, f"only {self.completed()} runs completed"
            time.sleep(0.2)

    def join(self) -> dict:
        self.thread.join(timeout=LOAD_SECONDS + 180)
        if self.error is not None:
            raise self.error
        assert self.report is not None, "the load did not finish"
        return self.report


@pytest.fixture(scope="session")  # once per test process, whatever runs between
def rq_project(tmp_path_factory) -> BuiltProject:
    return build_project(tmp_path_factory.mktemp("faults-rq"), RQ_POSTGRES)


@pytest.fixture(scope="session")  # once per test process, whatever runs between
def database_project(tmp_path_factory) -> BuiltProject:
    return build_project(tmp_path_factory.mktemp("faults-db"), DATABASE_POSTGRES)


def _deployment(built: BuiltProject, tmp_path: Path) -> Iterator[Deployment]:
    with native_stack(built, tmp_path / "logs", workers=2, web_workers=2) as deployment:
        try:
            yield deployment
        finally:
            # Shown by pytest only when the test failed.
            for name in deployment.slots:
                print(f"--- {name} log (tail) ---\n{deployment.log(name)[-4000:]}")


@pytest.fixture
def rq_stack(rq_project, tmp_path) -> Iterator[Deployment]:
    yield from _deployment(rq_project, tmp_path)


@pytest.fixture
def database_stack(database_project, tmp_path) -> Iterator[Deployment]:
    yield from _deployment(database_project, tmp_path)


def start_load(deployment: Deployment, tag: str, seconds: float = LOAD_SECONDS) -> BackgroundLoad:
    users = [f"{tag}-user-{number}" for number in range(USERS)]
    deployment.create_users(users)
    config = LoadConfig(
        base_url=deployment.base_url,
        users=[(name, LOAD_PASSWORD) for name in users],
        seconds=seconds,
        drain_seconds=90,
        tag=tag,
    )
    load = BackgroundLoad(config)
    load.wait_for_completed(WARM_RUNS)
    return load


def finish(
    deployment: Deployment,
    load: BackgroundLoad,
    tmp_path: Path,
    *,
    allowed_retries: int = 0,
    extra_users: tuple[str, ...] = (),
    extra_runs: tuple[str, ...] = (),
    outcome: dict | None = None,
) -> tuple[dict, AuditResult]:
    """End the load, wait until every run settled, audit; print and keep the figures."""
    report = load.join()
    users = [name for name, _ in load.load.config.users] + list(extra_users)
    left = wait_until_settled(deployment.database_url, users, timeout=SETTLE_SECONDS)
    result = audit(
        deployment.database_url,
        users,
        client_runs=report["runs"] + [{"id": run_id} for run_id in extra_runs],
        allowed_retries=allowed_retries,
        ambiguous_creates=ambiguous_creates(report),
    )
    figures = {
        "runs_created": report["runs_created"],
        "runs_terminal": report["runs_terminal"],
        "runs_per_second": report["runs_per_second"],
        "poll_latency": report["poll_latency"],
        "errors": report["errors"],
        "unexpected_restarts": {name: slot.restarts for name, slot in deployment.slots.items()},
        "unsettled_before_audit": left,
        "audit": asdict(result),
        "outcome": outcome or {},
    }
    (tmp_path / "fault-report.json").write_text(json.dumps(figures, indent=2, default=str))
    print(json.dumps(figures, indent=2, default=str))
    return report, result


def submit_slow_run(deployment: Deployment, session_key: str) -> tuple[Client, str]:
    """A run that takes SLOW_SECONDS in the demo model, once it is running."""
    deployment.create_users([USERNAME], PASSWORD)
    client = Client(deployment.stack.web_port)
    client.login()
    run_id = client.submit(session_key, f"/slow {SLOW_SECONDS}")
    client.wait_for(run_id, lambda run: run["status"] == "running", "running")
    return client, run_id


def catch_running_run(
    deployment: Deployment,
    act: Callable[[str], None],
    *,
    prefer: str | None = None,
    exclude: Container[str] = (),
    tries: int = 40,
    patience: float = 60.0,
) -> tuple[str, str, int] | None:
    """Find a worker executing a run and `act(slot)` on it at once, until the run was still
    running (same attempt) right after the act: at most `tries` acts, within `patience`
    seconds. Returns (slot, run id, number of acts), None if never caught.

    RQ tells one current job per worker (its `execution`), not each of the runs it runs at
    once, and with quick runs that job has often just ended: the search waits for a moment
    it names a running one instead of giving up after a number of polls."""
    acts = 0
    deadline = time.monotonic() + patience
    while acts < tries and time.monotonic() < deadline:
        busy = [pair for pair in deployment.busy_workers() if pair[0] not in exclude]
        busy.sort(key=lambda pair: pair[1] != prefer)
        if not busy:
            time.sleep(0.02)
            continue
        slot, run_id = busy[0]
        attempt = final_run(deployment, run_id)["attempt"]
        act(slot)
        acts += 1
        now = final_run(deployment, run_id)
        if now["status"] == "running" and now["attempt"] == attempt:
            return slot, run_id, acts
    return None


def running_runs(deployment: Deployment) -> int:
    with psycopg.connect(deployment.database_url) as connection:
        cursor = connection.execute(
            "SELECT count(*) FROM agentic_django_agentrun WHERE status = 'running'"
        )
        return cursor.fetchone()[0]


def final_run(deployment: Deployment, run_id: str) -> dict:
    with psycopg.connect(deployment.database_url) as connection:
        cursor = connection.execute(
            "SELECT status, attempt, error FROM agentic_django_agentrun WHERE id = %s", (run_id,)
        )
        return dict(zip(("status", "attempt", "error"), cursor.fetchone(), strict=True))


# --- (a) worker SIGKILL mid-run -----------------------------------------------------------


def test_worker_sigkill_mid_run_is_requeued_once(rq_stack: Deployment, tmp_path: Path):
    """A worker killed mid-run (with every run it had in flight) comes back (restart policy);
    once the lease expired the run is requeued (AGENTIC_DJANGO_STARTUP_RECOVERY=requeue,
    applied by the next task or by the client polling the run) and completes on attempt 2,
    its history written once."""
    load = start_load(rq_stack, "kill9")
    slow = None
    if has_slow_path(rq_stack.stack.project):
        client, slow = submit_slow_run(rq_stack, "victim")
    in_flight: list[int] = []

    def kill(slot: str) -> None:
        # A worker runs many runs at once: a kill costs each run in flight a retry. Counted
        # right after the kill (a run the worker took just before it is still "running"),
        # across the deployment (the database does not say which worker holds a run), so
        # this is a ceiling.
        rq_stack.kill(slot)
        in_flight.append(running_runs(rq_stack))

    caught = catch_running_run(rq_stack, kill, prefer=slow)
    assert caught, "never caught a worker in the middle of a run"
    slot, victim, kills = caught
    if slow:
        # Its user waits for the answer (load users poll their own runs).
        client.wait_for(slow, lambda run: run["is_terminal"], "terminal")
    report, result = finish(
        rq_stack,
        load,
        tmp_path,
        # Every run in flight when a worker was killed may be retried.
        allowed_retries=sum(in_flight),
        extra_users=(USERNAME,) if slow else (),
        extra_runs=(slow,) if slow else (),
        outcome={"killed": slot, "kills": kills, "victim": victim, "slow_victim": bool(slow)},
    )
    assert result.ok, result.problems
    assert final_run(rq_stack, victim) == {"status": "completed", "attempt": 2, "error": ""}
    assert rq_stack.slots[slot].restarts >= 1
    assert report["server_errors_5xx"] == 0, report["errors"]


def test_idle_stack_recovers_a_killed_workers_run(rq_stack: Deployment):
    """With no other traffic, a run whose worker was SIGKILLed still ends once its lease
    expired: the client polling it is what notices (recovery on observation)."""
    client = Client(rq_stack.stack.web_port)
    rq_stack.create_users([USERNAME], PASSWORD)
    client.login()
    kills: list[str] = []

    def kill(slot: str) -> None:
        kills.append(slot)
        rq_stack.kill(slot)

    caught = None
    if has_slow_path(rq_stack.stack.project):
        slow = client.submit("idle-victim", f"/slow {SLOW_SECONDS}")
        client.wait_for(slow, lambda run: run["status"] == "running", "running")
        caught = catch_running_run(rq_stack, kill, prefer=slow)
    else:
        # One run at a time until a kill lands in the middle of one.
        for number in range(30):
            run_id = client.submit(f"idle-{number}", f"Hello {number}")
            caught = catch_running_run(rq_stack, kill)
            if caught:
                break
            client.wait_for(run_id, lambda run: run["is_terminal"], "terminal")
    assert caught, "never caught a worker in the middle of a run"
    victim = caught[1]
    done = client.wait_for(
        victim, lambda run: run["is_terminal"], "terminal", deadline=LEASE_SECONDS * 5
    )
    assert done["status"] == "completed"
    assert final_run(rq_stack, victim)["attempt"] == 2
    result = audit(rq_stack.database_url, [USERNAME], allowed_retries=len(kills))
    assert result.ok, result.problems


# --- (b) worker SIGTERM -------------------------------------------------------------------


def test_worker_sigterm_finishes_the_current_run(rq_stack: Deployment, tmp_path: Path):
    """`docker compose stop/restart worker`: SIGTERM to the worker's main process only. RQ's
    warm shutdown lets the work horse finish the current run (attempt 1, completed), then exits;
    the tasks still queued stay in Redis for the other worker and the restarted one."""
    load = start_load(rq_stack, "term")
    slow = None
    if has_slow_path(rq_stack.stack.project):
        _, slow = submit_slow_run(rq_stack, "victim")
    exits: dict[str, float] = {}

    def terminate(slot: str) -> None:
        # Signal now; the wait for the exit (and the restart) happens after the check below.
        rq_stack.process(slot).send_signal(signal.SIGTERM)
        exits[slot] = time.monotonic()

    with rq_stack.held("worker-1"), rq_stack.held("worker-2"):
        caught = catch_running_run(rq_stack, terminate, prefer=slow, exclude=exits)
        assert caught, "never caught a worker in the middle of a run"
        slot, victim, _ = caught
        rq_stack.process(slot).wait(timeout=70)  # compose's stop_grace_period is 1 minute
        at_exit = final_run(rq_stack, victim)
        # A worker signalled while idle (a missed catch) has exited too; start them all again.
        for name in exits:
            rq_stack.process(name).wait(timeout=70)
            rq_stack.start_slot(name, "worker")
    log = rq_stack.log(slot)
    report, result = finish(
        rq_stack,
        load,
        tmp_path,
        extra_users=(USERNAME,) if slow else (),
        extra_runs=(slow,) if slow else (),
        outcome={"stopped": sorted(exits), "victim": victim, "slow_victim": bool(slow)},
    )
    assert result.ok, result.problems
    assert "warm shut down requested" in log
    # The stopping worker finished the run before it exited, on the first attempt.
    assert at_exit == {"status": "completed", "attempt": 1, "error": ""}
    assert final_run(rq_stack, victim) == at_exit
    assert rq_stack.slots[slot].restarts == 0, "the worker died instead of stopping"
    assert report["server_errors_5xx"] == 0, report["errors"]


# --- (c) Redis restarted ------------------------------------------------------------------


def test_redis_restart_fails_unqueueable_runs_clearly(rq_stack: Deployment, tmp_path: Path):
    """Redis stops (SIGTERM, as `docker compose restart redis`; its append-only file keeps the
    queue) for a few seconds mid-load. A run whose task cannot be queued meanwhile ends failed
    at once with a clear message, or (if it had to wait for a slot anyway) is queued when Redis
    is back; none stays pending. Workers exit and are restarted; queued tasks survive."""
    rq_stack.create_users([USERNAME], PASSWORD)
    client = Client(rq_stack.stack.web_port)
    client.login()
    load = start_load(rq_stack, "redis")
    assert rq_stack.redis is not None
    restart = threading.Thread(target=rq_stack.redis.restart, kwargs={"down_for": 4.0})
    restart.start()
    time.sleep(1.5)
    # A run submitted while Redis is down: the answer says it failed, and why.
    response = client.post(
        "/agents/runs/", json_body={"session_key": "during-outage", "input": "Hello, outage"}
    )
    restart.join()
    after = client.submit("after-outage", "Hello after the outage")
    report, result = finish(
        rq_stack,
        load,
        tmp_path,
        extra_users=(USERNAME,),
        extra_runs=(response.json().get("id", ""), after),
        outcome={"during_outage_response": response.status},
    )
    assert result.ok, result.problems
    assert response.status == 201, response.text
    # Failed at once if its task could not be queued, else queued when Redis was back.
    during = final_run(rq_stack, response.json()["id"])
    assert during in (
        {"status": "failed", "attempt": 0, "error": ENQUEUE_FAILED},
        {"status": "completed", "attempt": 1, "error": ""},
    ), during
    assert final_run(rq_stack, after)["status"] == "completed"
    with psycopg.connect(rq_stack.database_url) as connection:
        errors = {
            error
            for (error,) in connection.execute(
                "SELECT DISTINCT error FROM agentic_django_agentrun WHERE status = 'failed'"
            )
        }
    assert errors == {ENQUEUE_FAILED}, errors
    assert report["server_errors_5xx"] == 0, report["errors"]


# --- (d) Postgres restarted ---------------------------------------------------------------


def test_postgres_restart_loses_and_doubles_nothing(rq_stack: Deployment, tmp_path: Path):
    """PostgreSQL stops (SIGINT: fast shutdown, the postgres image's stop signal) for a few
    seconds, with runs in flight, and comes back with the same data as the load window ends:
    users then only wait for their answers. Requests meanwhile fail or wait; afterwards every
    run must end, with at most one retry per worker."""
    load = start_load(rq_stack, "pg")
    # The outage must catch runs in flight (on a busy machine the clients may also just wait
    # it out without an error, so their errors cannot tell that the fault happened).
    while not runs_in_flight(rq_stack.database_url):
        assert load.thread.is_alive(), f"the load ended early: {load.error!r}"
        time.sleep(0.02)
    # Users who got their answer send no more messages: nothing but the engine can finish
    # the runs that were in flight.
    load.load.stop_creating(after=1.0)
    rq_stack.postgres.restart(signal.SIGINT, down_for=3.0)
    _report, result = finish(rq_stack, load, tmp_path, allowed_retries=len(rq_stack.workers()))
    assert result.ok, result.problems


def runs_in_flight(database_url: str) -> int:
    """Runs waiting or running, read straight from the database."""
    with psycopg.connect(database_url) as connection:
        (count,) = connection.execute(
            "SELECT count(*) FROM agentic_django_agentrun WHERE status IN ('pending', 'running')"
        ).fetchone()
    return count


# --- (e) web killed -----------------------------------------------------------------------


def test_web_sigkill_loses_no_run(rq_stack: Deployment, tmp_path: Path):
    """All web processes are SIGKILLed mid-load and restarted by the restart policy. Clients
    see broken connections meanwhile; every run created (even one whose answer was lost) ends
    once, and the workers never notice."""
    load = start_load(rq_stack, "web")
    rq_stack.kill("web")
    report, result = finish(rq_stack, load, tmp_path)
    assert result.ok, result.problems
    transport_errors = {key for key in report["errors"] if not key[:1].isdigit()}
    assert transport_errors, f"no client saw the web go away: {report['errors']}"
    assert rq_stack.slots["web"].restarts == 1


# --- the database task backend ------------------------------------------------------------


def test_database_backend_worker_and_web_killed(database_stack: Deployment, tmp_path: Path):
    """The database backend (`db_worker`): both workers and the web are SIGKILLed mid-load,
    one of them in the middle of a slow run, and restarted; the slow run is requeued and
    completes on attempt 2, every run ends once, at most one retry per run in flight."""
    if not has_slow_path(database_stack.stack.project):
        pytest.skip("the demo model has no slow path ('/slow N') to kill a db_worker mid-run")
    load = start_load(database_stack, "dbkill")
    client, slow = submit_slow_run(database_stack, "victim")
    for name in database_stack.workers():
        database_stack.kill(name)
    # Every run the workers had in flight (each worker runs many at once) may be retried: the
    # runs still "running" right after the kills, before a lease expired (a ceiling, should a
    # worker be back already and have started more).
    in_flight = running_runs(database_stack)
    database_stack.kill("web")
    database_stack.wait_healthy()
    # Its user waits for the answer.
    done = client.wait_for(slow, lambda run: run["is_terminal"], "terminal")
    _, result = finish(
        database_stack,
        load,
        tmp_path,
        allowed_retries=in_flight,
        extra_users=(USERNAME,),
        extra_runs=(slow,),
    )
    assert result.ok, result.problems
    assert done["status"] == "completed"
    assert final_run(database_stack, slow)["attempt"] == 2


# --- the audit itself ---------------------------------------------------------------------


def test_audit_reports_every_broken_rule(rq_stack: Deployment, tmp_path: Path):
    """The audit is only worth its pass if it fails: break each rule in the database after a
    clean load and check that each break is reported."""
    users = [f"audit-user-{number}" for number in range(2)]
    rq_stack.create_users(users)
    client_runs: list[dict] = []
    for burst in range(6):  # a loaded machine may finish only a few runs in one short burst
        config = LoadConfig(
            base_url=rq_stack.base_url,
            users=[(name, LOAD_PASSWORD) for name in users],
            seconds=4,
            tag=f"audit{burst}",
        )
        client_runs += BackgroundLoad(config).join()["runs"]
        if sum(1 for run in client_runs if run["id"]) >= 4:
            break
    assert wait_until_settled(rq_stack.database_url, users, timeout=SETTLE_SECONDS) == []
    clean = audit(rq_stack.database_url, users, client_runs=client_runs)
    assert clean.ok, clean.problems
    assert clean.runs >= 4

    seen = [run for run in client_runs if run["id"]]
    with psycopg.connect(rq_stack.database_url, autocommit=True) as connection:
        sql = connection.execute
        # A user message stored twice (as a retry that kept the dead attempt's items would).
        sql(
            "INSERT INTO agentic_django_agentsessionitem"
            " (session_id, sequence, payload, run_id, created_at)"
            " SELECT session_id, sequence + 1000, payload, run_id, created_at"
            " FROM agentic_django_agentsessionitem WHERE run_id = %s ORDER BY sequence LIMIT 1",
            (seen[0]["id"],),
        )
        # A run left behind; a run executed twice; a hole in an event log.
        sql("UPDATE agentic_django_agentrun SET status = 'pending' WHERE id = %s", (seen[1]["id"],))
        sql("UPDATE agentic_django_agentrun SET attempt = 2 WHERE id = %s", (seen[2]["id"],))
        sql(
            "DELETE FROM agentic_django_agentevent WHERE run_id = %s AND sequence = 1",
            (seen[3]["id"],),
        )
        # A run that ended again after its client saw it end.
        sql(
            "UPDATE agentic_django_agentrun SET finished_at = finished_at + interval '1 second'"
            " WHERE id = %s",
            (seen[3]["id"],),
        )
    problems = "\n".join(audit(rq_stack.database_url, users, client_runs=client_runs).problems)
    expected = [
        f"run {seen[0]['id']}: 2 user messages",
        "stored 2x",
        f"run {seen[1]['id']} is still pending",
        "1 extra attempt(s), but the faults explain 0",
        f"run {seen[3]['id']}: event sequences",
        f"run {seen[3]['id']}: a client saw it end",
    ]
    for text in expected:
        assert text in problems, f"{text!r} not reported in:\n{problems}"
