"""Operations: the cleanup command and the admin (fast pages, safe actions)."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from agentic_django.models import (
    AgentEvent,
    AgentRun,
    AgentSession,
    AgentSessionItem,
    AgentSpan,
    AgentUsage,
)

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
