"""Efficiency rules of the engine: one task per run, a fixed SQL budget per chat run, and one
statement per JSON run-detail poll after the login's lookups."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.tasks.backends.immediate import ImmediateBackend
from django.urls import reverse
from django.utils import timezone

from agentic_django.dispatch import dispatch_next
from agentic_django.execution import execute
from agentic_django.models import AgentRun, AgentSession
from agentic_django.services import create_run, enqueue_agent_run
from tests.core.conftest import echo_steps, running_elsewhere, text

pytestmark = pytest.mark.django_db(transaction=True)

ENQUEUED: Counter[str] = Counter()
COUNTING_TASKS = {"default": {"BACKEND": "tests.core.test_efficiency.CountingBackend"}}
# Statements of one chat run through the README's code, events on, BEGIN/COMMIT included.
# One statement per model call is its ledger row (issue 20); one reads the run's session key,
# which its log lines carry (agentic_django.logcontext); one stores its trace for the run
# inspector (agentic_django.tracing). On PostgreSQL a history write is one statement (it was a
# transaction of four: the session's lock, the touch, the insert, the commit).
SQL_BUDGET = {"sqlite": 18, "postgresql": 21}
# A JSON run-detail poll: the session and user lookups, then the run with its session key and
# its usage in one statement (presentation.detailed_run).
DETAIL_POLL_SQL = 3


class CountingBackend(ImmediateBackend):
    """The immediate backend, counting the tasks enqueued for each run."""

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        ENQUEUED[str(args[0])] += 1
        return super().enqueue(task, args, kwargs)


@pytest.fixture
def counting(settings: Any) -> Counter[str]:
    settings.TASKS = COUNTING_TASKS
    ENQUEUED.clear()
    return ENQUEUED


def test_each_run_of_a_queued_session_gets_exactly_one_task(user, scripted_agent, counting):
    agent = scripted_agent(echo_steps(3))
    with transaction.atomic():
        runs = [
            create_run(owner=user, session_key="k", input_payload=f"m{n}", agent_key=agent.key)
            for n in range(3)
        ]
    assert set(AgentRun.objects.values_list("status", flat=True)) == {"completed"}
    assert counting == {str(run.pk): 1 for run in runs}


def test_runs_waiting_for_a_slot_get_one_task_each(user, scripted_agent, counting, settings):
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 1
    agent = scripted_agent([text("ok")] * 3)
    blocker = running_elsewhere(AgentSession.objects.create(owner=user, session_key="busy"))
    runs = [
        create_run(owner=user, session_key=f"s{n}", input_payload="hi", agent_key=agent.key)
        for n in range(3)
    ]
    assert counting == {}  # no slot: nothing enqueued while the other worker runs
    AgentRun.objects.filter(pk=blocker.pk).update(status="completed")
    dispatch_next()
    assert [AgentRun.objects.get(pk=r.pk).status for r in runs] == ["completed"] * 3
    assert counting == {str(run.pk): 1 for run in runs}


def test_a_task_that_cannot_claim_its_run_leaves_it_to_the_next_dispatch(user, scripted_agent):
    agent = scripted_agent([text("ok")])
    session = AgentSession.objects.create(owner=user, session_key="k")
    blocker = running_elsewhere(session)
    run = AgentRun.objects.create(
        session=session, owner=user, agent_key=agent.key, input_payload="hi", task_id="t-1"
    )
    assert execute(str(run.pk), task_id="t-1") == "skipped"
    run.refresh_from_db()
    # No task is waiting for it any more, so a finishing run must dispatch it again.
    assert (run.status, run.task_id) == ("pending", "")
    AgentRun.objects.filter(pk=blocker.pk).update(status="completed")
    assert dispatch_next() == 1
    run.refresh_from_db()
    assert run.status == "completed"


def test_a_chat_run_stays_within_its_sql_budget(
    user, scripted_agent, django_assert_max_num_queries
):
    agent = scripted_agent([text("first")])
    scripted_agent([text("second")], key="warm")
    # Warm the process (startup recovery, first-use imports) as a long-lived worker would be.
    warm = AgentSession.objects.create(owner=user, session_key="warm")
    enqueue_agent_run(
        str(
            AgentRun.objects.create(
                session=warm, owner=user, agent_key="warm", input_payload="x"
            ).pk
        )
    )
    with django_assert_max_num_queries(SQL_BUDGET[connection.vendor]):
        session, _ = AgentSession.objects.get_or_create(owner=user, session_key="k")
        run = AgentRun.objects.create(
            session=session, owner=user, agent_key=agent.key, input_payload="hi"
        )
        enqueue_agent_run(str(run.id))
    run.refresh_from_db()
    assert (run.status, run.final_output) == ("completed", "first")
    assert session.items.count() == 2 and run.events.count() == 2


def test_a_json_run_detail_poll_is_one_statement_after_the_login(
    client, user, scripted_agent, django_assert_num_queries
):
    agent = scripted_agent(
        [text("first", requests=1, input_tokens=30, output_tokens=12, total_tokens=42)]
    )
    finished = create_run(owner=user, session_key="k", input_payload="hi", agent_key=agent.key)
    now = timezone.now()
    running = AgentRun.objects.create(
        session=finished.session,
        owner=user,
        agent_key=agent.key,
        input_payload="and now?",
        status=AgentRun.Status.RUNNING,
        attempt=1,
        lease_expires_at=now + timedelta(minutes=5),
    )
    client.force_login(user)

    with django_assert_num_queries(DETAIL_POLL_SQL):
        body = client.get(reverse("agents:run-detail", args=[finished.pk])).json()
    with django_assert_num_queries(DETAIL_POLL_SQL):
        assert client.get(reverse("agents:run-detail", args=[running.pk])).status_code == 200

    assert (body["status"], body["final_output"], body["session_key"]) == (
        "completed",
        "first",
        "k",
    )
    assert (body["usage"]["calls"], body["usage"]["total_tokens"]) == (1, 42)
