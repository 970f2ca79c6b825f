"""Operations: the cleanup command and the admin (fast pages, safe actions)."""

from __future__ import annotations

import gc
import logging
import re
import threading
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from agentic_django import lifecycle
from agentic_django.events import EventRecorder
from agentic_django.models import (
    AgentEvent,
    AgentRun,
    AgentSession,
    AgentSessionItem,
    AgentSpan,
    AgentUsage,
)
from agentic_django.services import create_run
from agentic_django.sessions import SessionWriteRejected, session_for_run
from tests.core.conftest import call, register, running_elsewhere, text, worker_died
from tests.core.faults import ITEM_INSERT, database_faults, lock_waiters
from tests.waiting import PATIENCE, in_thread, wait_for

pytestmark = pytest.mark.django_db

Status = AgentRun.Status


def age(model, pk, days: int, *fields: str) -> None:
    when = timezone.now() - timedelta(days=days)
    model.objects.filter(pk=pk).update(**{field: when for field in fields})


def make_run(session: AgentSession, status: str, days_old: int, events: int = 0) -> AgentRun:
    run = AgentRun.objects.create(
        session=session, owner=session.owner, agent_key="demo", input_payload="hi", status=status
    )
    AgentEvent.objects.bulk_create(
        AgentEvent(run=run, sequence=n, event_type="message_output", payload={"text": str(n)})
        for n in range(1, events + 1)
    )
    age(AgentRun, run.pk, days_old, "created_at", "finished_at")
    AgentEvent.objects.filter(run=run).update(created_at=timezone.now() - timedelta(days=days_old))
    return run


@pytest.fixture
def old_data(user):
    """Finished and active runs, events and sessions of various ages."""
    old_session = AgentSession.objects.create(owner=user, session_key="old")
    data = {
        "old_done": make_run(old_session, Status.COMPLETED, 40, events=3),
        "old_failed": make_run(old_session, Status.FAILED, 40),
        "old_pending": make_run(old_session, Status.PENDING, 40),
        "recent_done": make_run(
            AgentSession.objects.create(owner=user, session_key="recent"), Status.COMPLETED, 1, 2
        ),
        "idle_empty": AgentSession.objects.create(owner=user, session_key="idle"),
        "idle_with_runs": AgentSession.objects.create(owner=user, session_key="idle-runs"),
    }
    make_run(data["idle_with_runs"], Status.COMPLETED, 1)
    age(AgentSession, data["idle_empty"].pk, 100, "updated_at")
    age(AgentSession, data["idle_with_runs"].pk, 100, "updated_at")
    return data


def cleanup(*args: str) -> str:
    out = StringIO()
    call_command("agentic_django_cleanup", *args, stdout=out)
    return out.getvalue()


def test_cleanup_applies_the_policy_in_batches(old_data):
    output = cleanup("--batch-size", "1")
    assert output.strip() == "Deleted 3 events, 2 runs, 1 sessions, 0 trace spans."
    remaining = set(AgentRun.objects.values_list("pk", flat=True))
    assert old_data["old_done"].pk not in remaining
    assert old_data["old_failed"].pk not in remaining
    assert old_data["old_pending"].pk in remaining  # active runs are never pruned
    assert old_data["recent_done"].pk in remaining
    assert AgentEvent.objects.filter(run=old_data["recent_done"]).count() == 2
    assert not AgentSession.objects.filter(pk=old_data["idle_empty"].pk).exists()
    assert AgentSession.objects.filter(pk=old_data["idle_with_runs"].pk).exists()


def test_cleanup_dry_run_deletes_nothing(old_data):
    before = (AgentRun.objects.count(), AgentEvent.objects.count(), AgentSession.objects.count())
    assert (
        cleanup("--dry-run").strip() == "Would delete 3 events, 2 runs, 1 sessions, 0 trace spans."
    )
    after = (AgentRun.objects.count(), AgentEvent.objects.count(), AgentSession.objects.count())
    assert before == after


def test_cleanup_flags_override_the_policy(old_data, settings):
    settings.AGENTIC_DJANGO_CLEANUP_POLICY = {"sessions_require_empty": False}
    output = cleanup("--events-days", "60", "--runs-days", "60", "--sessions-days", "50")
    # Nothing is 60 days old; idle sessions go even with (finished) runs in them.
    assert output.strip() == "Deleted 0 events, 0 runs, 2 sessions, 0 trace spans."
    assert not AgentSession.objects.filter(pk=old_data["idle_with_runs"].pk).exists()


def test_the_usage_ledger_outlives_the_runs_it_counts(old_data):
    """Finished runs go after a month; what they spent stays (billing data) until its own
    threshold says otherwise."""
    run = old_data["old_done"]
    now = timezone.now()
    AgentUsage.objects.create(
        run=run,
        session=run.session,
        owner=run.owner,
        sequence=1,
        attempt=1,
        turn=1,
        total_tokens=10,
        cost=Decimal("0.01"),
        priced_at=now,
        created_at=now - timedelta(days=40),
    )
    assert cleanup().strip() == "Deleted 3 events, 2 runs, 1 sessions, 0 trace spans."
    kept = AgentUsage.objects.get()
    assert (kept.run_id, kept.session_id, kept.cost) == (None, run.session_id, Decimal("0.01"))
    assert "1 usage records" in cleanup("--usage-days", "30")
    assert not AgentUsage.objects.exists()


def test_traces_go_after_their_own_threshold_whatever_became_of_their_runs(old_data):
    """The inspector's steps of a run kept for its own sake go after trace_days (30 by
    default); those of a pruned run go with it."""
    now = timezone.now()
    for run, days in ((old_data["recent_done"], 40), (old_data["recent_done"], 1)):
        AgentSpan.objects.create(
            run=run,
            attempt=1,
            trace_id="trace_x",
            span_id=f"s{days}",
            kind="function",
            name="lookup",
            started_at=now - timedelta(days=days),
        )
    assert cleanup("--trace-days", "30").strip().endswith(", 1 trace spans.")
    assert list(AgentSpan.objects.values_list("span_id", flat=True)) == ["s1"]


def test_cleanup_rejects_bad_flags():
    with pytest.raises(CommandError):
        call_command("agentic_django_cleanup", "--runs-days", "0")


@pytest.fixture
def admin_client_logged_in(client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw-123456789")
    client.force_login(admin)
    return client


def test_admin_pages_stay_small_and_fast_with_thousands_of_rows(
    admin_client_logged_in, user, django_assert_max_num_queries
):
    session = AgentSession.objects.create(owner=user, session_key="big")
    run = make_run(session, Status.COMPLETED, 0, events=2000)
    AgentSessionItem.objects.bulk_create(
        AgentSessionItem(session=session, sequence=n, payload={"role": "user", "content": str(n)})
        for n in range(1, 2001)
    )
    pages = [
        (reverse("admin:agentic_django_agentrun_change", args=[run.pk]), "events"),
        (reverse("admin:agentic_django_agentsession_change", args=[session.pk]), "items"),
    ]
    for url, prefix in pages:
        with django_assert_max_num_queries(30):
            response = admin_client_logged_in.get(url)
        assert response.status_code == 200
        rows = re.findall(rf'id="{prefix}-(\d+)"'.encode(), response.content)
        assert len(rows) == 50  # only the newest rows are rendered
    for name in ("agentrun", "agentevent", "agentsession", "agentsessionitem"):
        url = reverse(f"admin:agentic_django_{name}_changelist")
        for params in ({}, {"q": "not-a-uuid"}, {"q": str(run.pk)}):
            with django_assert_max_num_queries(30):
                response = admin_client_logged_in.get(url, params)
            assert response.status_code == 200


def test_admin_cancel_action(admin_client_logged_in, user):
    session = AgentSession.objects.create(owner=user, session_key="k")
    pending = make_run(session, Status.PENDING, 0)
    done = make_run(session, Status.COMPLETED, 0)
    response = admin_client_logged_in.post(
        reverse("admin:agentic_django_agentrun_changelist"),
        {"action": "cancel_selected", "_selected_action": [pending.pk, done.pk]},
        follow=True,
    )
    assert response.status_code == 200
    pending.refresh_from_db()
    done.refresh_from_db()
    assert pending.status == "cancelled"
    assert done.status == "completed"


# --- Deleting what a run is writing ---------------------------------------------------------------

# Django's collector deletes (or unlinks) a run's events and history first, then the runs: a
# row a run writes in between points at a run about to go.
RUN_DELETE = r'^DELETE FROM "agentic_django_agentrun" WHERE'
SESSION_LOCK = r'^SELECT .* FROM "agentic_django_agentsession" WHERE .* FOR UPDATE'
RUN_BY_ID = r'^SELECT .* FROM "agentic_django_agentrun" WHERE "agentic_django_agentrun"."id" = %s'
SESSION_BY_ID = (
    r'^SELECT .* FROM "agentic_django_agentsession" WHERE "agentic_django_agentsession"."id" = %s'
    r" LIMIT 21$"
)
QUEUE = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def post_message(user: Any, session_key: str) -> Any:
    body = {"session_key": session_key, "input": "hello again"}
    return logged_in(user).post(reverse("agents:run-create"), body, content_type="application/json")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("deleted", "write", "how"),
    [
        ("conversation", "event", "page"),
        ("conversation", "history", "page"),
        ("conversation", "event", "action, run started meanwhile"),
        ("run", "event", "page"),
        ("run", "history", "action"),
    ],
)
def test_the_admin_deletes_what_a_running_run_is_writing_to(
    admin_client_logged_in, user, deleted, write, how
):
    """A run writes an event or a history item after the admin's delete dealt with that table
    and before it deletes the run: the delete still succeeds (it locks the runs and the
    conversation first, so what a run writes is either deleted with them or refused), and the
    run's write is refused as a lost claim's. Also for a run started while the delete began."""
    session = AgentSession.objects.create(owner=user, session_key="k")
    runs: list[AgentRun] = []
    written: list[object] = []

    def start_run() -> None:
        runs.append(running_elsewhere(session))
        AgentSessionItem.objects.create(session=session, run=runs[0], sequence=1, payload={})

    def run_writes() -> None:
        if write == "event":
            written.append(EventRecorder(runs[0]).record("message_output", {"text": "late"}))
            return
        try:
            session_for_run(runs[0]).add_items_sync([{"role": "assistant", "content": "late"}])
            written.append("item")
        except SessionWriteRejected:
            written.append(None)
        except Exception as exc:
            written.append(exc)

    writer: list[threading.Thread] = []

    def meanwhile() -> None:
        """Just before the delete: the run writes (or waits for the delete, if it must)."""
        writer.append(in_thread(run_writes))
        wait_for(lambda: written or lock_waiters() > 0, "the run's write to end or wait")

    with database_faults() as faults:
        deleting = threading.current_thread()
        if "meanwhile" in how:
            # Its conversation is not locked yet: the run commits before the delete gathers.
            faults.before(SESSION_LOCK, lambda: in_thread(start_run).join(), thread=deleting)
        else:
            start_run()
        faults.before(RUN_DELETE, meanwhile, thread=deleting)
        model = "agentrun" if deleted == "run" else "agentsession"
        pk = session.pk if deleted == "conversation" else runs[0].pk
        if how == "page":
            url, data = reverse(f"admin:agentic_django_{model}_delete", args=[pk]), {"post": "yes"}
        else:
            url = reverse(f"admin:agentic_django_{model}_changelist")
            data = {"action": "delete_selected", "_selected_action": [pk], "post": "yes"}
        response = admin_client_logged_in.post(url, data)
    assert response.status_code == 302
    writer[0].join(PATIENCE)
    run = runs[0]
    assert not AgentRun.objects.filter(pk=run.pk).exists()
    assert not AgentEvent.objects.filter(run_id=run.pk).exists()
    if deleted == "conversation":
        assert not AgentSession.objects.filter(pk=session.pk).exists()
        assert not AgentSessionItem.objects.filter(session_id=session.pk).exists()
    else:
        assert not AgentSessionItem.objects.filter(run_id=run.pk).exists()
    assert written == [None]  # refused, as a lost claim's


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_delete_that_meets_recovery_lets_it_go_first(admin_client_logged_in, user):
    """Recovery locks a conversation, then its run; a delete locks the runs, then the
    conversation. A delete that finds the conversation taken lets go of its runs and tries
    again, so neither waits for the other (a deadlock, which PostgreSQL would end by failing
    one of them: recovery, the first to wait)."""
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = running_elsewhere(session)
    worker_died(run)
    recovered: list[object] = []

    def recover() -> None:
        try:
            recovered.append(lifecycle.requeue(run, stale_only=True))
        except Exception as exc:
            recovered.append(exc)

    def meanwhile() -> None:
        """The delete holds the run: recovery takes the conversation and waits for the run."""
        in_thread(recover)
        wait_for(lambda: lock_waiters() > 0, "recovery to wait for the run")

    with database_faults() as faults:
        faults.before(SESSION_LOCK, meanwhile, thread=threading.current_thread())
        response = admin_client_logged_in.post(
            reverse("admin:agentic_django_agentsession_delete", args=[session.pk]), {"post": "yes"}
        )
    assert response.status_code == 302
    assert recovered == [True]
    assert not AgentSession.objects.filter(pk=session.pk).exists()
    assert not AgentRun.objects.filter(pk=run.pk).exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("request_made", ["post to the conversation", "cancel its run"])
def test_a_users_request_racing_the_admins_delete(
    admin_client_logged_in, user, settings, request_made
):
    """The delete holds its locks when the request comes: a post waits, then starts a new
    conversation under the same key (201); a cancel of the deleted run answers 404."""
    settings.TASKS = QUEUE
    session = AgentSession.objects.create(owner=user, session_key="k")
    run = running_elsewhere(session)
    answers: list[Any] = []

    def user_asks() -> None:
        if request_made == "cancel its run":
            answers.append(logged_in(user).post(reverse("agents:run-cancel", args=[run.pk])))
        else:
            answers.append(post_message(user, "k"))

    def meanwhile() -> None:
        in_thread(user_asks)
        wait_for(lambda: answers or lock_waiters() > 0, "the request to wait for the delete")

    with database_faults() as faults:
        faults.before(RUN_DELETE, meanwhile, thread=threading.current_thread())
        response = admin_client_logged_in.post(
            reverse("admin:agentic_django_agentsession_delete", args=[session.pk]), {"post": "yes"}
        )
    assert response.status_code == 302
    wait_for(lambda: answers, "the user's answer")
    if request_made == "cancel its run":
        assert answers[0].status_code == 404
        assert answers[0].json()["error"]["code"] == "not_found"
        return
    assert answers[0].status_code == 201
    new_run = AgentRun.objects.get(pk=answers[0].json()["id"])
    assert new_run.session.session_key == "k"
    assert new_run.session_id != session.pk
    assert not AgentSession.objects.filter(pk=session.pk).exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_run_deleted_before_its_post_answers_is_a_404(user, settings):
    """The conversation is deleted between the post's commit and its answer."""
    settings.TASKS = QUEUE
    answers: list[Any] = []
    poster = threading.Thread(target=lambda: answers.append(post_message(user, "k")))

    def delete_conversation() -> None:
        in_thread(lambda: lifecycle.lock_and_delete(AgentSession.objects.all())).join(PATIENCE)

    with database_faults() as faults:
        faults.before(RUN_BY_ID, delete_conversation, thread=poster)
        poster.start()
        poster.join(PATIENCE)
    assert answers[0].status_code == 404
    assert answers[0].json()["error"]["code"] == "not_found"
    assert not AgentRun.objects.exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_cleanup_keeps_an_idle_conversation_a_message_arrives_for(user, settings):
    """The message comes after the cleanup picked the conversation and before it locked it:
    it is no longer idle then, and stays, with its new run."""
    settings.TASKS = QUEUE
    idle = AgentSession.objects.create(owner=user, session_key="idle")
    age(AgentSession, idle.pk, 100, "updated_at")
    answers: list[Any] = []

    def message_arrives() -> None:
        in_thread(lambda: answers.append(post_message(user, "idle"))).join(PATIENCE)

    with database_faults() as faults:
        faults.before(SESSION_LOCK, message_arrives, thread=threading.current_thread())
        output = cleanup("--sessions-days", "30")
    assert answers[0].status_code == 201
    assert ", 0 sessions," in output
    assert AgentRun.objects.filter(pk=answers[0].json()["id"], session=idle).exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("when", ["as it is claimed", "before a history write", "in a tool"])
def test_a_run_whose_conversation_is_deleted_while_it_runs_stops_cleanly(user, caplog, when):
    """Its writes are refused as a lost claim's: its worker comes back without an error (none
    logged either) and runs the next run."""
    from agents import function_tool

    in_tool, release = threading.Event(), threading.Event()

    @function_tool
    def waits() -> str:
        """Waits for the test."""
        in_tool.set()
        release.wait(PATIENCE)
        return "done"

    register("waits", [call("waits", {}), text("never stored")], tools=[waits])
    register("next", [text("next answered")])
    errors: list[BaseException] = []

    def work() -> None:
        try:  # the immediate task backend runs it here, as a worker would
            create_run(owner=user, agent_key="waits", input_payload="go", session_key="doomed")
        except BaseException as exc:
            errors.append(exc)

    def delete() -> None:
        in_thread(lambda: lifecycle.lock_and_delete(AgentSession.objects.all())).join(PATIENCE)

    gc.collect()  # what earlier tests left behind says its piece now, not below
    caplog.clear()
    with database_faults() as faults:
        if when == "as it is claimed":
            # The first read of the run's conversation once it runs: its log fields.
            faults.before(SESSION_BY_ID, delete)
        elif when == "before a history write":
            faults.before(ITEM_INSERT, delete)  # the run's input, its first
        worker = in_thread(work)
        if when == "in a tool":
            assert in_tool.wait(PATIENCE)
            delete()
            release.set()
        worker.join(PATIENCE)
    assert not worker.is_alive()
    assert errors == []
    assert not AgentRun.objects.exists()
    assert not AgentSessionItem.objects.exists()
    assert not AgentEvent.objects.exists()
    gc.collect()  # an asyncio task whose error nobody read says so when it is collected
    errors_logged = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR
        and (r.name != "asyncio" or "never retrieved" in r.getMessage())
    ]
    assert errors_logged == []

    other = create_run(owner=user, agent_key="next", input_payload="hi", session_key="other")
    other.refresh_from_db()
    assert (other.status, other.final_output) == ("completed", "next answered")
