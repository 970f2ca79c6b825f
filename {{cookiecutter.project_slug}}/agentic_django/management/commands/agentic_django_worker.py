"""Run the background worker of the configured task backend, ready for agent runs."""

from __future__ import annotations

from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.tasks import task_backends
from django.utils.module_loading import import_string

RQ_BACKEND = "django_tasks_rq.RQBackend"
DATABASE_BACKEND = "django_tasks_db.DatabaseBackend"


def _backend_path() -> str:
    """The dotted path of the 'default' backend's class, as settings name it."""
    backend = task_backends["default"]
    for path in (DATABASE_BACKEND, RQ_BACKEND):
        try:
            backend_class = import_string(path)
        except ImportError:
            continue
        if isinstance(backend, backend_class):
            return path
    return f"{type(backend).__module__}.{type(backend).__qualname__}"


class Command(BaseCommand):
    help = (
        "Run the worker of the 'default' task backend (django-tasks-db or RQ) with the Agents "
        "SDK preloaded and a recovery sweep every half lease (see agentic_django.workers)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--queue", default="default", help="Queue to work on (default: default)."
        )
        parser.add_argument(
            "--burst",
            action="store_true",
            help="Run the queued tasks, then exit (for scripts and tests).",
        )
        parser.add_argument(
            "--check",
            action="store_true",
            help=(
                "Exit 0 if a worker on this host renewed its heartbeat within the last lease, "
                "else 1 (a container health check; starts no worker, imports no Agents SDK)."
            ),
        )

    def handle(self, *args: Any, queue: str, burst: bool, check: bool, **options: Any) -> None:
        if check:
            self.check_alive()
            return
        backend = _backend_path()
        if backend == DATABASE_BACKEND:
            from django.utils.crypto import get_random_string

            from agentic_django.workers.database import IDLE_SECONDS, run_database_worker

            run_database_worker(
                queue_names=[queue],
                interval=IDLE_SECONDS,
                batch=burst,
                backend_name="default",
                startup_delay=False,
                max_tasks=None,
                worker_id=get_random_string(32),
                excluded_queue_names=[],
            )
        elif backend == RQ_BACKEND:
            call_command(
                "rqworker",
                queue,
                job_class="django_tasks_rq.Job",
                worker_class="agentic_django.workers.rq.RQWorker",
                burst=burst,
                verbosity=options["verbosity"],
            )
        else:
            raise CommandError(
                f"The 'default' task backend ({backend}) runs tasks without a worker; "
                f"agentic_django_worker serves {DATABASE_BACKEND} and {RQ_BACKEND}."
            )

    def check_alive(self) -> None:
        """A live worker announced itself from this host (in a container: this container)."""
        import socket

        from django.db import DatabaseError

        from agentic_django.lifecycle import live_workers

        hostname = socket.gethostname()
        try:
            alive = live_workers().filter(hostname=hostname).exists()
        except DatabaseError as exc:
            raise CommandError(f"Cannot read the workers' heartbeats: {exc}") from exc
        if not alive:
            raise CommandError(f"No worker on {hostname} renewed its heartbeat within a lease.")
        self.stdout.write(f"A worker on {hostname} is alive.")
