"""Statements compiled once (``agentic_django.prepared``): each call's values land where the ORM
would put them, and a settings change compiles them again (the lease and the limit are in them).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.db import transaction
from django.db.models.functions import Now
from django.db.transaction import TransactionManagementError

from agentic_django import lifecycle
from agentic_django.lifecycle import Fence
from agentic_django.models import AgentRun, AgentSession
from agentic_django.prepared import Statement

pytestmark = pytest.mark.django_db(transaction=True)


def new_run(owner, key: str) -> AgentRun:
    session = AgentSession.objects.create(owner=owner, session_key=key)
    return AgentRun.objects.create(session=session, owner=owner, agent_key="demo", input_payload="")


def db_now():
    return AgentRun.objects.annotate(now=Now()).values_list("now", flat=True).first()


def test_a_changed_limit_or_lease_is_in_the_next_claim_and_renewal(user, settings):
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 1
    first, second = new_run(user, "a"), new_run(user, "b")
    claimed = lifecycle.claim(first.pk)
    assert claimed is not None
    assert lifecycle.claim(second.pk) is None  # compiled with a limit of 1
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 2
    assert lifecycle.claim(second.pk) is not None
    settings.AGENTIC_DJANGO_LEASE_SECONDS = 3600
    assert lifecycle.renew(Fence.of(claimed))
    left = AgentRun.objects.get(pk=claimed.pk).lease_expires_at - db_now()
    assert timedelta(minutes=50) < left <= timedelta(hours=1)


@pytest.mark.parametrize("output", [{"answer": [1, "two", None]}, None, "done", 7])
def test_every_value_of_a_finish_lands_in_its_own_column(user, output):
    claimed = lifecycle.claim(new_run(user, "a").pk)
    usage = {"requests": 2, "input_tokens": 30, "output_tokens": 4, "total_tokens": 34}
    finished = lifecycle.finish(
        Fence.of(claimed),
        status="failed",
        error="It broke.",
        error_detail="Traceback ...",
        final_output=output,
        last_response_id="resp_9",
        usage=usage,
    )
    stored = AgentRun.objects.get(pk=claimed.pk)
    for run in (finished, stored):
        assert (run.status, run.error, run.error_detail) == ("failed", "It broke.", "Traceback ...")
        assert (run.final_output, run.last_response_id) == (output, "resp_9")
        assert {name: getattr(run, name) for name in usage} == usage
    assert finished.finished_at == stored.finished_at


def test_a_statement_must_take_every_value_it_declares(user):
    pk = AgentRun._meta.pk
    ignores_its_value = Statement(
        lambda run_id: AgentRun.objects.filter(status="pending").values_list("pk"),
        values={"run_id": pk},
    )
    with pytest.raises(ValueError, match="run_id"):
        ignores_its_value.rows(run_id=new_run(user, "a").pk)
    takes_it = Statement(
        lambda run_id: AgentRun.objects.filter(pk=run_id).values_list("pk", "created_at"),
        values={"run_id": pk},
    )
    run = new_run(user, "b")
    assert takes_it.rows(run_id=run.pk) == [(run.pk, run.created_at)]  # converted as the ORM does
    assert takes_it.rows(run_id=str(run.pk)) == [(run.pk, run.created_at)]


class ReadsFromAReplica:
    """A primary/replica router; the replica alias does not exist here, so a statement sent
    to it fails at once."""

    def db_for_read(self, model, **hints):
        return "replica"

    def db_for_write(self, model, **hints):
        return "default"


@pytest.mark.postgres
def test_a_locking_read_goes_to_the_database_for_writes_inside_the_transaction(user, settings):
    run = new_run(user, "a")
    settings.DATABASE_ROUTERS = [f"{__name__}.ReadsFromAReplica"]
    assert lifecycle.claim(run.pk) is not None  # its lock row is read FOR UPDATE on "default"
    locking = Statement(
        lambda: AgentSession.objects.select_for_update().filter(pk=0).values_list("pk")
    )
    with transaction.atomic():
        assert locking.rows() == []  # compiled here
    with pytest.raises(TransactionManagementError):
        locking.rows()  # as the ORM: no row lock outside a transaction, compiled or not


def test_statements_with_datetimes_work_with_naive_datetimes_too(user, settings):
    settings.USE_TZ = False
    session = AgentSession.objects.create(owner=user, session_key="naive")
    touch = Statement(
        lambda pk, now: (AgentSession.objects.filter(pk=pk), {"updated_at": now}),
        values={"pk": AgentSession._meta.pk, "now": AgentSession._meta.get_field("updated_at")},
    )
    moment = datetime(2030, 1, 2, 3, 4, 5)
    assert touch.update(pk=session.pk, now=moment) == 1
    assert AgentSession.objects.get(pk=session.pk).updated_at == moment
