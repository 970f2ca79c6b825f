"""A run whose worker died, or whose task was lost, recovers when someone polls it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.cache import cache
from django.utils import timezone

from agentic_django import recovery
from agentic_django.models import AgentRun, AgentSession
from tests.core.conftest import running_elsewhere, text, worker_died

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _process_already_started():
    """This process dispatched before the worker died: startup recovery is behind it."""
    cache.clear()
    recovery.ensure_startup_recovery()


def lost_task_run(user, agent_key: str, *, age_seconds: int) -> AgentRun:
    """A pending run created ``age_seconds`` ago whose task never reached a worker."""
    session = AgentSession.objects.create(owner=user, session_key=f"lost-{age_seconds}")
    run = AgentRun.objects.create(
        session=session, owner=user, agent_key=agent_key, input_payload="hello?"
    )
    AgentRun.objects.filter(pk=run.pk).update(
        created_at=timezone.now() - timedelta(seconds=age_seconds)
    )
    run.refresh_from_db()
    return run


def test_polling_a_run_whose_worker_died_requeues_it(user, scripted_agent):
    agent = scripted_agent([text("second attempt")])
    dead = running_elsewhere(
        AgentSession.objects.create(owner=user, session_key="s"), agent_key=agent.key
    )
    worker_died(dead)
    dead.refresh_from_db()

    assert recovery.recover_if_stuck(dead) is True

    dead.refresh_from_db()
    assert (dead.status, dead.attempt, dead.final_output) == ("completed", 2, "second attempt")


def test_polling_a_healthy_run_costs_no_query_and_changes_nothing(user, django_assert_num_queries):
    live = running_elsewhere(AgentSession.objects.create(owner=user, session_key="s"))
    fresh = lost_task_run(user, "demo", age_seconds=0)
    with django_assert_num_queries(0):
        assert recovery.recover_if_stuck(live) is False
        assert recovery.recover_if_stuck(fresh) is False
    live.refresh_from_db()
    assert (live.status, live.attempt) == ("running", 1)


def test_a_run_whose_task_was_lost_is_dispatched_again(user, scripted_agent, settings):
    settings.AGENTIC_DJANGO_LEASE_SECONDS = 30
    agent = scripted_agent([text("finally")])
    run = lost_task_run(user, agent.key, age_seconds=31)

    assert recovery.recover_if_stuck(run) is True

    run.refresh_from_db()
    assert (run.status, run.final_output) == ("completed", "finally")


def test_a_waiting_run_polled_while_the_task_queue_is_down_stays_queued(user, settings, client):
    """Its task was lost and the broker is down as its owner polls: the run waits for the
    next sweep. Only a run its user is submitting right now may fail on a refused task."""
    settings.AGENTIC_DJANGO_LEASE_SECONDS = 30
    run = lost_task_run(user, "demo", age_seconds=31)
    settings.TASKS = {"default": {"BACKEND": "tests.core.faults.UnavailableBackend"}}
    client.force_login(user)
    assert client.get(f"/agents/runs/{run.pk}/").status_code == 200
    run.refresh_from_db()
    assert (run.status, run.error, run.task_id) == ("pending", "", "")


def test_a_waiting_run_is_dispatched_again_at_most_once_per_lease(user, settings):
    settings.AGENTIC_DJANGO_LEASE_SECONDS = 30
    waiting = lost_task_run(user, "demo", age_seconds=31)
    running_elsewhere(waiting.session)  # live work ahead of it in the session

    assert recovery.recover_if_stuck(waiting) is True
    assert recovery.recover_if_stuck(waiting) is False

    waiting.refresh_from_db()
    assert waiting.status == "pending"
    # The limit is per run: another stuck run is looked at all the same.
    other = lost_task_run(user, "demo", age_seconds=40)
    running_elsewhere(other.session)
    assert recovery.recover_if_stuck(other) is True


def test_ignore_mode_never_recovers_on_poll(user, settings, scripted_agent):
    settings.AGENTIC_DJANGO_STARTUP_RECOVERY = "ignore"
    dead = running_elsewhere(AgentSession.objects.create(owner=user, session_key="s"))
    worker_died(dead)
    dead.refresh_from_db()
    assert recovery.recover_if_stuck(dead) is False
    dead.refresh_from_db()
    assert dead.status == "running"
