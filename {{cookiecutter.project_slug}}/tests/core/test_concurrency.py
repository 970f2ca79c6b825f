"""Concurrency rules under real parallelism: worker threads racing on the database
(PostgreSQL, or SQLite in a file as the project uses it).

Each thread plays a worker process: it executes the task (ImmediateBackend runs it inline)
on its own database connection, so claims race exactly as they would across workers.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from agents import Agent
from agents.testing import ModelStep, ScriptedModel, assistant_message
from django.db import connection, transaction
from django.utils import timezone

from agentic_django import lifecycle
from agentic_django.models import AgentRun, AgentSession
from agentic_django.tasks import execute_agent_run
from tests.core import registry
from tests.core.conftest import echo_steps, text
from tests.core.faults import lock_waiters
from tests.waiting import PATIENCE, in_thread, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def race(targets: list[Callable[[], object]]) -> None:
    """Start every target at the same moment in its own thread; re-raise the first error."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def worker(target: Callable[[], object]) -> None:
        try:
            barrier.wait()
            target()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]


def pending_run(
    session: AgentSession, agent_key: str, text_input: str, offset: int = 0
) -> AgentRun:
    run = AgentRun.objects.create(
        session=session, owner=session.owner, agent_key=agent_key, input_payload=text_input
    )
    # Distinct, increasing submission times, as separate requests would have.
    AgentRun.objects.filter(pk=run.pk).update(created_at=timezone.now() + timedelta(seconds=offset))
    return run


def test_workers_racing_for_one_run_execute_it_once(user, scripted_agent):
    agent = scripted_agent([text("exactly once")])
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = pending_run(session, agent.key, "hi")

    race([lambda: execute_agent_run.enqueue(str(run.id)) for _ in range(6)])

    run.refresh_from_db()
    assert run.status == "completed"
    assert run.attempt == 1
    assert len(agent.model.calls) == 1
    assert session.items.count() == 2


def test_concurrent_runs_on_one_session_keep_submission_order(user, scripted_agent):
    count = 5
    agent = scripted_agent(echo_steps(count))
    session = AgentSession.objects.create(owner=user, session_key="k")
    runs = [pending_run(session, agent.key, f"msg {n}", offset=n) for n in range(count)]

    # Workers pick the runs up in reverse order; only the head of the session may start.
    race([lambda run=run: execute_agent_run.enqueue(str(run.id)) for run in reversed(runs)])

    for run in runs:
        run.refresh_from_db()
    assert [r.status for r in runs] == ["completed"] * count
    assert [r.final_output for r in runs] == [f"echo: msg {n}" for n in range(count)]
    for earlier, later in itertools.pairwise(runs):
        assert earlier.finished_at <= later.started_at
    history = list(session.items.values_list("payload", flat=True))
    users = [p["content"] for p in history if p.get("role") == "user"]
    assert users == [f"msg {n}" for n in range(count)]
    last_call_users = [i["content"] for i in agent.model.calls[-1].input if i.get("role") == "user"]
    assert last_call_users == users


def test_the_concurrency_limit_holds_across_workers(user, settings):
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 2
    lock = threading.Lock()
    in_flight = {"now": 0, "max": 0}

    async def slow_reply(model_call):
        with lock:
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
        await asyncio.sleep(0.2)
        with lock:
            in_flight["now"] -= 1
        return [assistant_message("done")]

    def build() -> Agent:
        return Agent(
            name="Slow", instructions="", model=ScriptedModel([ModelStep.respond(slow_reply)])
        )

    registry.FACTORIES["slow"] = build
    runs = [
        pending_run(AgentSession.objects.create(owner=user, session_key=f"s{n}"), "slow", "go", n)
        for n in range(6)
    ]

    race([lambda run=run: execute_agent_run.enqueue(str(run.id)) for run in runs])

    statuses = list(AgentRun.objects.values_list("status", flat=True))
    assert statuses == ["completed"] * 6
    assert 1 <= in_flight["max"] <= 2


@pytest.mark.parametrize("limit", [1, None])
def test_racing_claims_never_exceed_the_concurrency_limit(user, settings, limit):
    """Six workers claim six startable runs at the same moment, with one slot: one wins. On
    PostgreSQL each claim counts the running runs in its own snapshot, so without the lock
    they all take before counting, several would see the slot free. The limit is an integer,
    or "auto" in a process that is no worker (the immediate backend): one worker's slots."""

    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = limit
    settings.AGENTIC_DJANGO_WORKER_CONCURRENCY = 1
    lifecycle.record_concurrency_limit(limit)
    runs = [
        pending_run(AgentSession.objects.create(owner=user, session_key=f"c{n}"), "demo", "go", n)
        for n in range(6)
    ]
    for _ in range(10):
        claimed: list[object] = []
        race([lambda run=run, out=claimed: out.append(lifecycle.claim(run.pk)) for run in runs])
        assert sum(run is not None for run in claimed) == 1
        assert AgentRun.objects.filter(status=AgentRun.Status.RUNNING).count() == 1
        AgentRun.objects.update(status=AgentRun.Status.PENDING, lease_expires_at=None)


@pytest.fixture
def worker_claims(monkeypatch) -> Iterator[threading.Event]:
    """Claims made as a worker process makes them (PostgreSQL: SQLite runs one writer at a
    time anyway); the event, set at the end, lets go of whatever held a claim up."""
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: SQLite runs one writer at a time anyway")
    monkeypatch.setattr(lifecycle, "claims_hold_slots", True)  # as a worker process sets it
    done = threading.Event()
    yield done
    done.set()


@pytest.mark.parametrize(("limit", "recorded"), [(None, None), (5, 5), (None, 5)])
def test_a_workers_claims_take_turns_only_under_an_integer_limit(
    user, settings, worker_claims, limit, recorded
):
    """A worker claims a run only for a free slot of its own. With the limit "auto" (the live
    workers' slots) that bounds the runs already, and two claims of different conversations
    go on at once; an integer limit is counted under the deployment's lock, one claim at a
    time -- also the limit another worker recorded when this one has none."""
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = limit
    lifecycle.record_concurrency_limit(recorded)
    first, second = (
        pending_run(AgentSession.objects.create(owner=user, session_key=f"t{n}"), "demo", "go", n)
        for n in range(2)
    )
    holding, done = threading.Event(), worker_claims
    claimed: list[object] = []

    def claim_and_hold() -> None:
        with transaction.atomic():  # a claim whose commit is slow to come
            claimed.append(lifecycle.claim(first.pk))
            holding.set()
            done.wait(PATIENCE * 2)

    holder = in_thread(claim_and_hold)
    wait_for(holding.is_set, "the first claim")
    other = in_thread(lambda: claimed.append(lifecycle.claim(second.pk)))
    if recorded is None:
        wait_for(lambda: not other.is_alive(), "the second claim, beside the first")
    else:
        wait_for(lambda: lock_waiters() == 1, "the second claim to wait for the lock")
        assert other.is_alive()
    done.set()
    holder.join(PATIENCE)
    other.join(PATIENCE)
    assert [run.pk for run in claimed] == [first.pk, second.pk]


@pytest.mark.parametrize("limit", [None, 5])
def test_a_slow_claim_and_a_run_submitted_meanwhile_never_run_together(
    user, settings, worker_claims, limit
):
    """A conversation's only pending run is being claimed, slowly (something holds its row).
    Meanwhile a run that comes before it (its web host's clock runs behind) commits and is
    claimed by another worker: whichever claim goes first, the other sees it, and one run of
    the conversation runs."""
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = limit
    lifecycle.record_concurrency_limit(limit)
    session = AgentSession.objects.create(owner=user, session_key="k")
    later = pending_run(session, "demo", "go", 10)
    holding, done = threading.Event(), worker_claims

    def hold_the_row() -> None:
        with transaction.atomic():
            list(AgentRun.objects.select_for_update().filter(pk=later.pk).values_list("pk"))
            holding.set()
            done.wait(PATIENCE * 2)

    holder = in_thread(hold_the_row)
    wait_for(holding.is_set, "the row held")
    slow = in_thread(lambda: lifecycle.claim(later.pk))
    wait_for(lambda: lock_waiters() == 1, "the slow claim")
    earlier = pending_run(session, "demo", "go", 0)
    other = in_thread(lambda: lifecycle.claim(earlier.pk))
    wait_for(lambda: not other.is_alive() or lock_waiters() == 2, "the other claim")
    done.set()
    for thread in (holder, slow, other):
        thread.join(PATIENCE)
    assert AgentRun.objects.filter(session=session, status="running").count() == 1
