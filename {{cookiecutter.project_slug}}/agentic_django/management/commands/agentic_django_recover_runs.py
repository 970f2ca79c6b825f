"""Recover runs left ``running`` by a worker that stopped (their lease expired)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from agentic_django.conf import get_config
from agentic_django.dispatch import dispatch_next
from agentic_django.recovery import recover_runs, stale_runs


class Command(BaseCommand):
    help = (
        "Fail or requeue runs whose worker stopped (lease expired), then dispatch waiting runs. "
        "Runs still renewing their lease in another process are never touched."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--mode",
            choices=["fail", "requeue"],
            help="What to do with stale runs (default: AGENTIC_DJANGO_STARTUP_RECOVERY).",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Only report how many runs are stale."
        )

    def handle(self, *args: Any, mode: str | None, dry_run: bool, **options: Any) -> None:
        mode = mode or get_config().startup_recovery
        if mode not in ("fail", "requeue"):
            raise CommandError("Pass --mode=fail or --mode=requeue.")
        if dry_run:
            self.stdout.write(f"{stale_runs().count()} stale run(s) would be {mode}d.")
            return
        count = recover_runs(mode=mode)
        dispatched = dispatch_next()
        verb = "requeued" if mode == "requeue" else "failed"
        self.stdout.write(
            self.style.SUCCESS(f"{count} stale run(s) {verb}; {dispatched} waiting run(s) queued.")
        )
