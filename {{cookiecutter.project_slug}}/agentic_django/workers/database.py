"""The worker of ``django_tasks_db.DatabaseBackend``: django-tasks-db's worker, preloaded,
running up to ``AGENTIC_DJANGO_WORKER_CONCURRENCY`` tasks at once, sweeping from a thread, and
woken by the database when a task is queued.

django-tasks-db runs one task at a time and sleeps a fixed interval when there was none; here
the worker claims a task whenever a slot is free, and the idle wait ends as soon as a task is
queued (PostgreSQL NOTIFY, or the SQLite file changing, see ``agentic_django.notify``) or a
slot frees. The task is still claimed with django-tasks-db's own locking.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from types import FrameType
from typing import Any

from django.db import DatabaseError, close_old_connections, connections
from django.db.utils import OperationalError
from django_tasks_db.management.commands.db_worker import Worker
from django_tasks_db.models import DBTaskResult
from django_tasks_db.utils import exclusive_transaction, is_locked_database_exception

from agentic_django.conf import get_config
from agentic_django.notify import TaskWaiter
from agentic_django.workers import (
    Presence,
    Slots,
    Stopping,
    Sweeper,
    start_worker,
    stop_worker,
    sweep_interval,
)

logger = logging.getLogger("agentic_django.workers")

# The longest an idle worker waits before it looks again without a wake-up.
IDLE_SECONDS = 1.0
# The most tasks one claim takes (no more than the free slots): a busy worker claims in
# rounds of a transaction each, so a burst of runs starts without a round per run.
CLAIM_BATCH = 10


class DatabaseWorker(Worker):
    """``db_worker``'s worker, preloaded, concurrent, sweeping, woken when a task is queued."""

    def __init__(self, *args: Any, concurrency: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots = Slots(concurrency or get_config().worker_concurrency)
        self.presence = Presence(self.slots.size, self.worker_id)
        self.stopping = Stopping()
        self.taking_tasks = False

    def run(self) -> None:
        start_worker(self.presence)
        sweeper = Sweeper(sweep_interval(), self.presence)
        sweeper.start()
        waiter = TaskWaiter()
        logger.info(
            "Starting worker worker_id=%s queues=%s slots=%d",
            self.worker_id,
            self.queue_names,
            self.slots.size,
        )
        self.taking_tasks = True
        try:
            self._work(waiter)
        finally:
            waiter.close()
            stop_worker(self.slots, self.presence, sweeper, self.stopping)

    def _work(self, waiter: TaskWaiter) -> None:
        while self.running:
            if not self.slots.acquire(timeout=IDLE_SECONDS):
                continue  # every slot busy: look again (or stop) once one frees
            taken = 1 + self.slots.acquire_free(CLAIM_BATCH - 1)
            try:
                task_results = self._claim(taken)
            except DatabaseError:
                # The database is away or busy (a restart, a full pool): the worker stays,
                # and looks again once it may be back.
                self.slots.release(taken)
                logger.warning("Could not claim a task; trying again", exc_info=True)
                connections.close_all()
                time.sleep(IDLE_SECONDS)
                continue
            except BaseException:
                self.slots.release(taken)
                raise
            finally:
                close_old_connections()
            for task_result in task_results:
                self.slots.start(self.run_task, task_result)
            if len(task_results) < taken:
                self.slots.release(taken - len(task_results))
            if task_results:
                continue
            if self.batch:
                if not self.slots.busy:
                    return  # nothing queued, nothing running: the burst is over
                self.slots.wait_for_change(IDLE_SECONDS)  # a run ending may queue the next
            elif self.running:
                waiter.wait(self.interval)

    def _claim(self, limit: int) -> list[Any]:
        """Claim up to ``limit`` ready tasks, in django-tasks-db's order and with its locking
        (one transaction, however many)."""
        tasks = DBTaskResult.objects.ready().filter(
            backend_name=self.backend_name, queue_name__in=self.queue_names
        )
        with exclusive_transaction(tasks.db):
            try:
                task_results = list(tasks.select_for_update(skip_locked=True)[:limit])
            except OperationalError as error:
                if is_locked_database_exception(error):
                    return []  # another worker holds the lock: look again
                raise
            for task_result in task_results:
                task_result.claim(self.worker_id)
        return task_results

    def shutdown(self, signum: int, frame: FrameType | None) -> None:
        """First signal: take no more tasks and let the runs in flight finish (the main loop
        stops within a second); a second one cuts the wait short. Before the worker takes
        tasks (while it loads the Agents SDK) a signal stops it at once."""
        name = signal.strsignal(signum)
        if not self.taking_tasks:
            logger.warning("Received %s - exiting now.", name)
            self.reset_signals()
            sys.exit(1)
        if self.stopping.request():
            logger.warning(
                "Received %s - finishing %d run(s), taking no more (again to stop now)",
                name,
                self.slots.busy,
            )
            self.running = False
        elif self.stopping.forced.is_set():
            logger.warning("Received %s - stopping now.", name)


def run_database_worker(**options: Any) -> None:
    """Run a ``DatabaseWorker`` until SIGINT/SIGTERM (graceful: the runs in flight finish)."""
    worker = DatabaseWorker(**options)
    worker.configure_signals()
    worker.run()
