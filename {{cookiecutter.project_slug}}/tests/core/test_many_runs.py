"""Many runs in one worker process: each in a slot of its own, none in the way of the others.

The in-process tests run pending runs through a worker's ``Slots`` exactly as the workers do
(``execute`` in a thread per slot); the last one kills a real worker process with 50 runs in
flight. Faults come from the database (``tests.core.faults``), the model (scripted steps that
wait or block) and the process (SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from agents import function_tool
from agents.testing import ModelStep, ScriptedModel, assistant_message
from django.conf import settings
from django.db import OperationalError, connection
from django.db.models import F

from agentic_django import eventloop
from agentic_django.execution import execute
from agentic_django.models import (
    AgentCheckpoint,
    AgentEvent,
    AgentRun,
    AgentSession,
    AgentToolCall,
    AgentWorker,
)
from agentic_django.services import cancel_run, create_run
from agentic_django.workers import Slots
from tests.core import registry
from tests.core.crowd_registry import ANSWER, QUICK
from tests.core.faults import RENEW, database_faults
from tests.core.test_faults import async_wait_for
from tests.core.test_worker import configured_backend, database_url
from tests.waiting import PATIENCE, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}


def register_each(key: str, steps: Callable[[], Sequence[Any]], tools: Sequence[Any] = ()) -> None:
    """Register ``key``: every run gets its own scripted model playing ``steps()``."""
    from agents import Agent

    registry.FACTORIES[key] = lambda: Agent(
        name="Clerk", instructions="Test.", model=ScriptedModel(list(steps())), tools=list(tools)
    )


def pending_runs(user: Any, agent_key: str, count: int, prefix: str = "c") -> list[AgentRun]:
    """``count`` pending runs, one per conversation (none waits for another)."""
    runs = []
    for index in range(count):
        session = AgentSession.objects.create(owner=user, session_key=f"{prefix}{index}")
        runs.append(
            AgentRun.objects.create(
                session=session, owner=user, agent_key=agent_key, input_payload="go"
            )
        )
    return runs


@pytest.fixture
def queue(settings) -> Iterator[None]:
    """The test plays the worker: its runs share one event loop, as a worker's do, and a run
    that finishes dispatches into a queue nobody takes."""
    from agentic_django.execution import DaemonThreadExecutor

    settings.TASKS = QUEUE
    eventloop.share(DaemonThreadExecutor)
    try:
        yield
    finally:
        eventloop.unshare()


def start(slots: Slots, runs: Sequence[AgentRun]) -> None:
    """Hand each run to a free slot, as a worker does with the tasks it takes."""
    for run in runs:
        assert slots.acquire(PATIENCE), "no slot freed"
        slots.start(execute, str(run.pk))


def statuses(runs: Sequence[AgentRun]) -> list[str]:
    return [AgentRun.objects.get(pk=run.pk).status for run in runs]


def connections_held() -> int:
    """Connections to this test database (only this process uses it)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        return cursor.fetchone()[0]


def test_slots_taken_together_are_only_the_free_ones():
    slots = Slots(3)
    assert slots.acquire(timeout=0)
    assert (slots.acquire_free(5), slots.busy) == (2, 3)
    assert (slots.acquire_free(1), slots.busy) == (0, 3)
    slots.release(2)
    assert (slots.busy, slots.acquire_free(0)) == (1, 0)


def test_a_worker_runs_its_slots_at_once_on_a_bounded_pool(user, settings, queue):
    """20 runs that each wait until all 20 started: only a worker running them at once
    finishes them. They look with ``sync_to_async`` ORM reads, as a tool would: on PostgreSQL
    each read gives its connection back, so 20 runs share a pool of 10, and the process never
    holds more connections than its pool allows."""
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 20
    runs = pending_runs(user, "together", 20)
    peak: list[int] = []

    async def together(model_call: Any) -> Any:
        # Every run started (some may finish before the others look again).
        everyone = await async_wait_for(
            lambda: AgentRun.objects.filter(started_at__isnull=False).count() == len(runs)
        )
        if connection.vendor == "postgresql":
            peak.append(await asyncio.to_thread(connections_held))
        return [assistant_message("together" if everyone else "alone")]

    register_each("together", lambda: [ModelStep.respond(together)])
    slots = Slots(20)
    start(slots, runs)
    assert slots.wait_idle(PATIENCE), [
        (r.status, r.error, r.attempt) for r in AgentRun.objects.all()
    ]
    for run in runs:
        run.refresh_from_db()
        assert (run.status, run.final_output, run.attempt) == ("completed", "together", 1)
    if connection.vendor == "postgresql":
        pool = settings.DATABASES["default"]["OPTIONS"]["pool"]["max_size"]
        # The pool, the test's own connection and the one sampling.
        assert max(peak) <= pool + 2


def test_a_blocking_sync_tool_costs_its_run_one_slot(user, queue):
    """A sync tool that blocks holds its own slot only: every other run of the worker starts
    and finishes meanwhile, on the event loop they share. (An async tool blocking that loop:
    ``test_runs_sharing_a_worker_event_loop_outlive_one_that_blocks_it``.)"""
    release = threading.Event()

    @function_tool
    def wait_in_thread() -> str:
        """Block in the tool's thread."""
        release.wait(PATIENCE)
        return "thread released"

    from agents.testing import function_call

    register_each(
        "sync",
        lambda: [
            [function_call(wait_in_thread.name, {}, call_id="c1")],
            [assistant_message("blocked no one")],
        ],
        [wait_in_thread],
    )
    register_each("quick", lambda: [[assistant_message("quick")]])
    blocked = pending_runs(user, "sync", 2, "s")
    quick = pending_runs(user, "quick", 6, "q")
    slots = Slots(4)
    start(slots, blocked)
    wait_for(
        lambda: AgentToolCall.objects.filter(run__in=blocked).count() == 2, "both tools to block"
    )
    start(slots, quick)  # six runs through the two slots left
    wait_for(lambda: statuses(quick) == ["completed"] * 6, "the other runs")
    assert statuses(blocked) == ["running", "running"]
    release.set()
    assert slots.wait_idle(PATIENCE)
    assert [AgentRun.objects.get(pk=r.pk).final_output for r in blocked] == ["blocked no one"] * 2


def test_a_failing_renewal_of_one_run_leaves_the_others_alone(user, settings, queue):
    """The lease renewal of one run fails twice on a transient database error: it retries and
    keeps its run; the runs beside it never notice. All finish in their first attempt."""
    settings.AGENTIC_DJANGO_LEASE_SECONDS = 5  # renewals every 1.7 s
    runs = pending_runs(user, "renewing", 3)
    flaky = runs[0]
    with database_faults() as faults:
        rule = faults.fail(
            RENEW, OperationalError("server closed the connection unexpectedly"), times=2
        )
        rule.thread_name = f"agentic-django-lease-{flaky.pk}"

        async def after_the_hiccups(model_call: Any) -> Any:
            await async_wait_for(
                lambda: (
                    rule.fired == 2
                    and AgentRun.objects.get(pk=flaky.pk).heartbeat_at
                    > AgentRun.objects.get(pk=flaky.pk).started_at
                )
            )
            return [assistant_message("kept")]

        register_each("renewing", lambda: [ModelStep.respond(after_the_hiccups)])
        slots = Slots(3)
        start(slots, runs)
        assert slots.wait_idle(PATIENCE)
    assert rule.fired == 2
    for run in runs:
        run.refresh_from_db()
        assert (run.status, run.final_output, run.attempt) == ("completed", "kept", 1)


def test_one_poll_tells_a_workers_runs_of_a_cancellation_and_a_lost_claim(user, settings, queue):
    """Four runs wait on their model in one worker. One is cancelled, one is taken over by a
    later attempt (as recovery does), one is ended by another process (recovery giving up on
    it): each hears of it from the process's poll -- the leases are long, so no renewal could
    tell them -- while the fourth runs on untouched."""
    settings.AGENTIC_DJANGO_LEASE_SECONDS = 600  # renewals every 200 s
    runs = pending_runs(user, "waiting", 4, "p")
    cancelled, taken, ended, untouched = runs
    release = threading.Event()

    async def wait_for_release(model_call: Any) -> Any:
        while not release.is_set():
            await asyncio.sleep(0.05)
        return [assistant_message("untouched")]

    register_each("waiting", lambda: [ModelStep.respond(wait_for_release)])
    slots = Slots(4)
    start(slots, runs)
    # Each waits on its model, its first event stored (no write of theirs is due to come).
    wait_for(
        lambda: AgentEvent.objects.filter(run__in=runs).values("run").distinct().count() == 4,
        "the runs to wait on their model",
    )
    cancel_run(AgentRun.objects.get(pk=cancelled.pk))
    AgentRun.objects.filter(pk=taken.pk).update(attempt=F("attempt") + 1)
    AgentRun.objects.filter(pk=ended.pk).update(status="failed", error="Given up elsewhere.")
    wait_for(lambda: statuses([cancelled]) == ["cancelled"], "the cancellation to be heard")
    wait_for(lambda: slots.busy == 1, "the attempts that lost their runs to stop")
    release.set()
    assert slots.wait_idle(PATIENCE)
    # The later attempt's run stays its own; the ended one keeps what ended it.
    assert statuses(runs) == ["cancelled", "running", "failed", "completed"]
    assert AgentRun.objects.get(pk=ended.pk).error == "Given up elsewhere."
    assert AgentRun.objects.get(pk=untouched.pk).final_output == "untouched"


# A worker process of this project's task backend, serving the crowd registry's agent.
WORKER = """
import django
django.setup()
from django.conf import settings
settings.AGENTIC_DJANGO_AGENT_REGISTRY = "tests.core.crowd_registry.get_agent_registry"
from django.core.management import call_command
call_command("agentic_django_worker")
"""


WORKER_APP = "agentic-django-test-worker"


def start_worker(
    tmp_path: Path, name: str, grace: int = 25, concurrency: int = 50
) -> subprocess.Popen:
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 (the process owns it)
    env = {
        "AGENTIC_DJANGO_WORKER_SHUTDOWN_GRACE": str(grace),
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url(),
        "OPENAI_API_KEY": "",
        "OPENAI_AGENTS_DISABLE_TRACING": "1",
        "AGENTIC_DJANGO_LEASE_SECONDS": "5",
        "AGENTIC_DJANGO_WORKER_CONCURRENCY": str(concurrency),
        "AGENTIC_DJANGO_CONCURRENCY_LIMIT": "60",  # the worker's slots are the tighter bound
        "TOOL_LOG": str(tmp_path / "tools.log"),
        "HOLD_FILE": str(tmp_path / "hold"),
        "RELEASE_FILE": str(tmp_path / "release"),
        "LEFTOVER_LOG": str(tmp_path / "leftovers.log"),
        "PGAPPNAME": WORKER_APP,  # its PostgreSQL connections, told apart from the test's
    }
    return subprocess.Popen(  # noqa: S603 (this interpreter, a fixed script)
        [sys.executable, "-c", WORKER],
        cwd=settings.BASE_DIR,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
    process.wait(timeout=PATIENCE)


@pytest.fixture
def real_queue(settings) -> None:
    """Runs are queued on the project's task backend, for real worker processes."""
    import config.settings as project_settings

    if "Immediate" in configured_backend():
        pytest.skip("the immediate task backend has no worker")
    settings.TASKS = project_settings.TASKS
    settings.AGENTIC_DJANGO_AGENT_REGISTRY = "tests.core.crowd_registry.get_agent_registry"


def rq_started_jobs(runs: Sequence[AgentRun]) -> dict[str, float] | None:
    """The runs' jobs in RQ's registry of started jobs (job id: when its entry expires);
    None on another backend."""
    if "RQBackend" not in configured_backend():
        return None
    import django_rq
    from rq.registry import StartedJobRegistry

    connection = django_rq.get_connection("default")
    entries = connection.zrange(
        StartedJobRegistry("default", connection=connection).key, 0, -1, withscores=True
    )
    jobs = set(
        AgentRun.objects.filter(pk__in=[r.pk for r in runs]).values_list("task_id", flat=True)
    )
    expiries = {entry.decode().split(":")[0]: at for entry, at in entries}
    return {job: at for job, at in expiries.items() if job in jobs}


def crowd(user: Any, count: int, prefix: str, agent_key: str = "crowd") -> list[AgentRun]:
    return [
        create_run(owner=user, session_key=f"{prefix}{i}", input_payload="go", agent_key=agent_key)
        for i in range(count)
    ]


def held(runs: Sequence[AgentRun]) -> int:
    """How many of the runs called their tool, which finished: they wait for their second
    model turn."""
    return AgentToolCall.objects.filter(run__in=runs, finished_at__isnull=False).count()


def all_held(runs: Sequence[AgentRun]) -> bool:
    return held(runs) == len(runs)


@pytest.mark.slow
def test_a_stopping_worker_lets_its_runs_finish_then_hands_the_rest_on(user, tmp_path, real_queue):
    """SIGTERM: the worker takes no more tasks and its runs finish within the grace period;
    at a second signal, the leases of those in flight end at once, so the next worker
    retries them without waiting."""
    hold = tmp_path / "hold"
    hold.touch()
    # Two slots for two runs: a worker whose slots are all busy must still hear the signal.
    patient = start_worker(tmp_path, "patient", grace=int(PATIENCE * 2), concurrency=2)
    try:
        wait_for(lambda: AgentWorker.objects.exists(), "the worker to start", PATIENCE * 2)
        finishing = crowd(user, 2, "f")
        wait_for(lambda: all_held(finishing), "both runs in flight")
        os.killpg(patient.pid, signal.SIGTERM)
        wait_for(lambda: "waiting up to" in (tmp_path / "patient.log").read_text(), "SIGTERM")
        hold.unlink()
        assert patient.wait(timeout=PATIENCE) == 0
    finally:
        stop(patient, signal.SIGKILL)
    assert statuses(finishing) == ["completed", "completed"]
    assert {AgentRun.objects.get(pk=r.pk).attempt for r in finishing} == {1}
    assert not AgentWorker.objects.exists()  # it retired: its slots count no more

    # An operator who does not want to wait signals again: the worker exits at once (status
    # 1), its runs handed on.
    hold.touch()
    hasty = start_worker(tmp_path, "hasty", grace=3600)
    try:
        wait_for(lambda: AgentWorker.objects.exists(), "the worker to start", PATIENCE * 2)
        handed_on = crowd(user, 2, "h")
        wait_for(lambda: all_held(handed_on), "both runs in flight")
        quick_runs = ended_beside(user, handed_on)
        os.killpg(hasty.pid, signal.SIGTERM)
        wait_for(lambda: "waiting up to" in (tmp_path / "hasty.log").read_text(), "SIGTERM")
        while hasty.poll() is None:  # (RQ ignores a second signal within a second of the first)
            os.killpg(hasty.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                hasty.wait(timeout=1)
        assert hasty.returncode == 1
    finally:
        stop(hasty, signal.SIGKILL)
    assert not AgentWorker.objects.exists()
    from agentic_django import lifecycle

    assert set(lifecycle.stale_runs().values_list("pk", flat=True)) == {r.pk for r in handed_on}
    hold.unlink()
    last = start_worker(tmp_path, "last")
    try:
        wait_for(lambda: statuses(handed_on) == ["completed"] * 2, "the retries", PATIENCE * 2)
    finally:
        stop(last)
    assert {AgentRun.objects.get(pk=r.pk).attempt for r in handed_on} == {2}
    # No call ran twice.
    assert len((tmp_path / "tools.log").read_text().split()) == 4 + len(quick_runs)


def rq_execution_keys(run: AgentRun) -> list[bytes]:
    """The keys RQ keeps for the run's job's executions."""
    import django_rq

    job = AgentRun.objects.get(pk=run.pk).task_id
    return django_rq.get_connection("default").keys(f"rq:execution:{job}:*")


def ended_beside(user: Any, running: Sequence[AgentRun]) -> list[AgentRun]:
    """RQ: a run that ends while others go on is done with for good -- the worker stops
    renewing its job, whose execution RQ deleted. The runs it created (none elsewhere)."""
    if rq_started_jobs(running) is None:
        return []
    quick = create_run(owner=user, session_key="q", input_payload=QUICK, agent_key="crowd")
    wait_for(lambda: AgentRun.objects.get(pk=quick.pk).is_terminal, "the quick run to end")
    wait_for(lambda: not rq_execution_keys(quick), "RQ to delete its job's execution")
    ended = rq_started_jobs(running)
    wait_for(
        lambda: all(rq_started_jobs(running).get(job, 0) > at for job, at in ended.items()),
        "the running jobs' next renewal",
    )
    assert not rq_started_jobs([quick]) and not rq_execution_keys(quick)
    return [quick]


@pytest.mark.slow
def test_a_worker_rides_out_a_database_that_drops_its_connections(user, tmp_path, real_queue):
    """PostgreSQL drops every connection of the worker (a restart, a failover) while runs are
    in flight: the worker stays, its runs finish in their first attempt, and it takes the
    next ones."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: SQLite has no connections to drop")
    hold = tmp_path / "hold"
    hold.touch()
    worker = start_worker(tmp_path, "worker")
    try:
        wait_for(lambda: AgentWorker.objects.exists(), "the worker to start", PATIENCE * 2)
        runs = crowd(user, 3, "d")
        # Each run waits on its model (its checkpoint before the call is stored): none writes
        # when the connections drop. (A write cut short is retried: another test.)
        wait_for(lambda: AgentCheckpoint.objects.filter(run__in=runs).count() == 3, "the runs")
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s",
                [WORKER_APP],
            )
            assert cursor.fetchone()[0] >= 1
        hold.unlink()
        wait_for(lambda: statuses(runs) == ["completed"] * 3, "the runs in flight to finish")
        later = crowd(user, 2, "e")
        wait_for(lambda: statuses(later) == ["completed"] * 2, "the next runs")
        assert worker.poll() is None
    finally:
        stop(worker)
    assert {AgentRun.objects.get(pk=r.pk).attempt for r in runs + later} == {1}
    assert len((tmp_path / "tools.log").read_text().split()) == 5  # each call once


@pytest.mark.slow
def test_runs_sharing_a_worker_event_loop_outlive_one_that_blocks_it(user, tmp_path, real_queue):
    """A worker's runs share one event loop. A run whose async tool blocks it (a sync wait)
    holds the runs on it until it goes on, each in its first attempt; runs that start once the
    loop is found stuck run on a new one meanwhile. A task a run leaves behind is cancelled
    when the run ends. Once the stuck loop goes on and its runs are done, it ends."""
    hold = tmp_path / "hold"
    hold.touch()
    worker = start_worker(tmp_path, "worker")
    log = tmp_path / "worker.log"
    try:
        wait_for(lambda: AgentWorker.objects.exists(), "the worker to start", PATIENCE * 2)
        (leaver,) = crowd(user, 1, "l", agent_key="leaver")
        wait_for(lambda: statuses([leaver]) == ["completed"], "the run leaving a task")
        wait_for(lambda: (tmp_path / "leftovers.log").exists(), "its task to be cancelled")
        waiting = crowd(user, 2, "w")
        wait_for(lambda: all_held(waiting), "two runs waiting on their model")
        (blocker,) = crowd(user, 1, "b", agent_key="blocker")
        wait_for(lambda: AgentToolCall.objects.filter(run=blocker).exists(), "the loop blocked")
        hold.unlink()  # they could answer now, but their loop is stuck
        # (The log names the run blocking it; an RQ worker's log names every run it takes.)
        wait_for(lambda: "has not answered" in log.read_text(), "the stuck loop found", PATIENCE)
        assert str(blocker.pk) in log.read_text().split("has not answered", 1)[1]
        later = crowd(user, 2, "n")
        wait_for(lambda: statuses(later) == ["completed"] * 2, "the next runs, on a new loop")
        assert statuses([*waiting, blocker]) == ["running"] * 3
        (tmp_path / "release").touch()
        wait_for(lambda: statuses([*waiting, blocker]) == ["completed"] * 3, "the stuck loop")
        # Its runs done, the stuck loop ends (closing what they shared, such as connections).
        wait_for(lambda: "that was stuck went on" in log.read_text(), "the stuck loop to end")
        assert worker.poll() is None
    finally:
        stop(worker)
    assert (tmp_path / "leftovers.log").read_text() == "cancelled\n"
    runs = [leaver, blocker, *waiting, *later]
    assert {AgentRun.objects.get(pk=r.pk).attempt for r in runs} == {1}
    keys = (tmp_path / "tools.log").read_text().split()
    assert len(keys) == len(set(keys)) == 4  # each tally once: 2 waiting runs, 2 later ones


@pytest.mark.slow
def test_a_worker_killed_with_50_runs_in_flight_loses_none_and_repeats_no_call(
    user, tmp_path, real_queue
):
    hold = tmp_path / "hold"
    hold.touch()
    first = start_worker(tmp_path, "first")
    try:
        wait_for(lambda: AgentWorker.objects.exists(), "the first worker to start", PATIENCE * 2)
        runs = crowd(user, 51, "k")
        wait_for(lambda: held(runs) == 50, "50 runs in flight at once in one worker", PATIENCE * 2)
        assert AgentRun.objects.filter(status="running").count() == 50
        # The 51st waits for a free slot: the worker takes a task only when it has one.
        (late,) = AgentRun.objects.filter(pk__in=[r.pk for r in runs], status="pending")
        # Its presence is renewed while it works (its slots count in the concurrency limit).
        wait_for(
            lambda: AgentWorker.objects.filter(heartbeat_at__gt=F("started_at")).exists(),
            "the worker's heartbeat",
        )
        started = rq_started_jobs([r for r in runs if r.pk != late.pk])
        if started is not None:
            # RQ's own view: the jobs stay "started" while their runs go on (their entries are
            # renewed from the worker's main thread), never taken for abandoned.
            assert len(started) == 50
            wait_for(
                lambda: all(rq_started_jobs(runs).get(job, 0) > at for job, at in started.items()),
                "the jobs' heartbeats",
            )
    finally:
        stop(first, signal.SIGKILL)
    hold.unlink()
    second = start_worker(tmp_path, "second")
    try:
        wait_for(
            lambda: all(
                r.is_terminal for r in AgentRun.objects.filter(pk__in=[r.pk for r in runs])
            ),
            "every run recovered and finished",
            PATIENCE * 3,
        )
        # The dead worker no longer counts, and a sweep removes it.
        wait_for(lambda: not AgentWorker.objects.filter(pid=first.pid).exists(), "forgotten")
    finally:
        stop(second)
    for run in AgentRun.objects.filter(pk__in=[r.pk for r in runs]):
        attempt = 1 if run.pk == late.pk else 2  # the late one never started in the first
        assert (run.status, run.final_output, run.attempt) == ("completed", ANSWER, attempt)
        assert run.session.items.filter(payload__role="assistant").count() == 1
    # Each call ran once, in the attempt that died (or the late run's), never again.
    keys = (tmp_path / "tools.log").read_text().split()
    assert len(keys) == len(set(keys)) == 51
    assert AgentToolCall.objects.count() == 51
    assert not AgentWorker.objects.exists()  # the second one retired
