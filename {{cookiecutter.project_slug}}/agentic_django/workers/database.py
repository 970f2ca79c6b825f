"""The worker of ``django_tasks_db.DatabaseBackend``: django-tasks-db's worker, preloaded,
sweeping from a thread, and woken by the database when a task is queued.

django-tasks-db looks for a task, then sleeps a fixed interval when there was none; here the
idle wait ends as soon as a task is queued (PostgreSQL NOTIFY, or the SQLite file changing,
see ``agentic_django.notify``), so an idle worker starts a new run at once and costs next to
nothing while it waits. The task is still claimed with django-tasks-db's own locking.
"""

from __future__ import annotations

from typing import Any

from django.db import close_old_connections
from django.db.utils import OperationalError
from django_tasks_db.management.commands.db_worker import Worker, logger
from django_tasks_db.models import DBTaskResult
from django_tasks_db.utils import exclusive_transaction, is_locked_database_exception

from agentic_django.notify import TaskWaiter
from agentic_django.workers import Sweeper, start_worker, sweep_interval

# The longest an idle worker waits before it looks again without a wake-up.
IDLE_SECONDS = 1.0


class DatabaseWorker(Worker):
    """``db_worker``'s worker, preloaded, sweeping, woken when a task is queued."""

    def run(self) -> None:
        start_worker()
        sweeper = Sweeper(sweep_interval())
        sweeper.start()
        waiter = TaskWaiter()
        logger.info("Starting worker worker_id=%s queues=%s", self.worker_id, self.queue_names)
        try:
            while self.running:
                close_old_connections()
                task_result = self._claim_next()
                if task_result is not None:
                    self.run_task(task_result)
                elif self.batch:
                    return
                close_old_connections()
                if self.running and task_result is None:
                    waiter.wait(self.interval)
        finally:
            waiter.close()
            sweeper.stop()

    def _claim_next(self) -> Any:
        tasks = DBTaskResult.objects.ready().filter(
            backend_name=self.backend_name, queue_name__in=self.queue_names
        )
        with exclusive_transaction(tasks.db):
            try:
                task_result = tasks.get_locked()
            except OperationalError as error:
                if is_locked_database_exception(error):
                    return None  # another worker holds the lock: look again
                raise
            if task_result is not None:
                task_result.claim(self.worker_id)
        return task_result


def run_database_worker(**options: Any) -> None:
    """Run a ``DatabaseWorker`` until SIGINT/SIGTERM (graceful: the current task finishes)."""
    worker = DatabaseWorker(**options)
    worker.configure_signals()
    worker.run()
