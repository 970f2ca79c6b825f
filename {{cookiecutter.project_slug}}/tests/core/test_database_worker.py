"""The database task backend's worker (``agentic_django.workers.database``), in this process.

Generated only for projects on the database task backend (the others do not install
django-tasks-db); its worker processes are tested with the other backends' in
``test_many_runs``.
"""

from __future__ import annotations

import pytest
from django.db import OperationalError

from agentic_django.notify import TaskWaiter
from agentic_django.workers.database import DatabaseWorker
from tests.core.faults import database_faults
from tests.core.test_many_runs import crowd, real_queue, statuses  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.usefixtures("real_queue")
def test_a_worker_that_cannot_claim_for_a_moment_carries_on(user, tmp_path, monkeypatch):
    """The database refuses the worker's claims (down, or the pool empty for its timeout):
    the worker waits a moment and claims again, never exits."""
    monkeypatch.setenv("TOOL_LOG", str(tmp_path / "tools.log"))
    monkeypatch.setenv("HOLD_FILE", str(tmp_path / "no-hold"))
    runs = crowd(user, 2, "c")
    worker = DatabaseWorker(
        queue_names=["default"],
        interval=1,
        batch=True,  # until nothing is queued or running
        backend_name="default",
        startup_delay=False,
        max_tasks=None,
        worker_id="w",
        excluded_queue_names=[],
    )
    with database_faults() as faults:
        claim = r'^SELECT .* FROM "django_tasks_database_dbtaskresult"'
        rule = faults.fail(claim, OperationalError("couldn't get a connection"), times=2)
        worker._work(TaskWaiter())
    assert rule.fired == 2
    assert statuses(runs) == ["completed"] * 2
