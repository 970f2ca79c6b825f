"""The worker of ``django_tasks_db.DatabaseBackend``: django-tasks-db's loop plus a sweeper."""

from __future__ import annotations

from typing import Any

from django_tasks_db.management.commands.db_worker import Worker

from agentic_django.workers import Sweeper, start_worker, sweep_interval


class DatabaseWorker(Worker):
    """``db_worker``'s worker, preloaded, sweeping from a thread while it works."""

    def run(self) -> None:
        start_worker()
        sweeper = Sweeper(sweep_interval())
        sweeper.start()
        try:
            super().run()
        finally:
            sweeper.stop()


def run_database_worker(**options: Any) -> None:
    """Run a ``DatabaseWorker`` until SIGINT/SIGTERM (graceful: the current task finishes)."""
    worker = DatabaseWorker(**options)
    worker.configure_signals()
    worker.run()
