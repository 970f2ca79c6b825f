"""The database task backend's worker (``agentic_django.workers.database``), in this process.

Generated only for projects on the database task backend (the others do not install
django-tasks-db); its worker processes are tested with the other backends' in
``test_many_runs``.
"""

from __future__ import annotations

import pytest
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext
from django_tasks_db.models import DBTaskResult

from agentic_django.notify import TaskWaiter
from agentic_django.workers.database import DatabaseWorker
from tests.core.faults import database_faults
from tests.core.test_many_runs import crowd, real_queue, statuses  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db(transaction=True)


def new_worker() -> DatabaseWorker:
    return DatabaseWorker(
        queue_names=["default"],
        interval=1,
        batch=True,  # until nothing is queued or running
        backend_name="default",
        startup_delay=False,
        max_tasks=None,
        worker_id="w",
        excluded_queue_names=[],
    )


@pytest.mark.usefixtures("real_queue")
def test_one_claim_takes_up_to_its_free_slots_of_ready_tasks_in_queue_order(user):
    runs = crowd(user, 3, "b")
    worker = new_worker()
    with CaptureQueriesContext(connection) as queries:
        first = worker._claim(2)
    assert sum(q["sql"].startswith("SELECT") for q in queries.captured_queries) == 1
    second, third = worker._claim(2), worker._claim(2)
    assert (len(first), len(second), third) == (2, 1, [])
    claimed = [*first, *second]
    rows = DBTaskResult.objects.filter(pk__in=[task.pk for task in claimed])
    assert [task.status for task in rows] == ["RUNNING"] * 3
    assert [task.args_kwargs["args"][0] for task in claimed] == [str(run.pk) for run in runs]


@pytest.mark.usefixtures("real_queue")
def test_a_worker_that_cannot_claim_for_a_moment_carries_on(user, tmp_path, monkeypatch):
    """The database refuses the worker's claims (down, or the pool empty for its timeout):
    the worker waits a moment and claims again, never exits."""
    monkeypatch.setenv("TOOL_LOG", str(tmp_path / "tools.log"))
    monkeypatch.setenv("HOLD_FILE", str(tmp_path / "no-hold"))
    runs = crowd(user, 2, "c")
    worker = new_worker()
    with database_faults() as faults:
        claim = r'^SELECT .* FROM "django_tasks_database_dbtaskresult"'
        rule = faults.fail(claim, OperationalError("couldn't get a connection"), times=2)
        worker._work(TaskWaiter())
    assert rule.fired == 2
    assert statuses(runs) == ["completed"] * 2
