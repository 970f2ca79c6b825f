"""Delete old events, finished runs, idle sessions and traces (and, if asked, usage records),
in batches."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.utils import timezone

from agentic_django.conf import get_config
from agentic_django.lifecycle import expire_approvals, lock_and_delete
from agentic_django.models import AgentEvent, AgentRun, AgentSession, AgentSpan, AgentUsage

ACTIVE_STATUSES = (
    AgentRun.Status.PENDING,
    AgentRun.Status.RUNNING,
    *AgentRun.PAUSED_STATUSES,
)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


class Command(BaseCommand):
    help = "Prune old agent data following AGENTIC_DJANGO_CLEANUP_POLICY (flags override it)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--events-days", type=_positive, help="Delete events older than N days."
        )
        parser.add_argument(
            "--runs-days", type=_positive, help="Delete finished runs older than N days."
        )
        parser.add_argument(
            "--sessions-days", type=_positive, help="Delete sessions idle for N days."
        )
        parser.add_argument(
            "--usage-days",
            type=_positive,
            help="Delete usage ledger rows older than N days (kept by default: billing data).",
        )
        parser.add_argument(
            "--trace-days",
            type=_positive,
            help="Delete the run inspector's steps (trace spans) older than N days.",
        )
        parser.add_argument("--batch-size", type=_positive, help="Rows deleted per query.")
        parser.add_argument(
            "--dry-run", action="store_true", help="Report what would be deleted; delete nothing."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        policy = get_config().cleanup_policy
        events_days = options["events_days"] or policy.events_days
        runs_days = options["runs_days"] or policy.runs_days
        sessions_days = options["sessions_days"] or policy.sessions_days
        usage_days = options["usage_days"] or policy.usage_days
        trace_days = options["trace_days"] or policy.trace_days
        batch_size = options["batch_size"] or policy.batch_size
        dry_run = options["dry_run"]
        if not any((events_days, runs_days, sessions_days, usage_days, trace_days)):
            raise CommandError("Nothing to clean: every age threshold is disabled.")
        now = timezone.now()
        results: list[tuple[str, int]] = []
        # Paused runs nobody decided on in time end first (workers do it too, on their sweep).
        if not dry_run and (expired := expire_approvals()):
            self.stdout.write(f"Failed {len(expired)} paused run(s) whose approvals expired.")
        if events_days:
            events = AgentEvent.objects.filter(created_at__lt=now - timedelta(days=events_days))
            results.append(("events", self._delete(events, batch_size, dry_run)))
        if runs_days:
            cutoff = now - timedelta(days=runs_days)
            runs = AgentRun.objects.filter(status__in=policy.runs_statuses).filter(
                Q(finished_at__lt=cutoff) | Q(finished_at__isnull=True, created_at__lt=cutoff)
            )
            results.append(("runs", self._delete(runs, batch_size, dry_run)))
        if sessions_days:
            sessions = AgentSession.objects.filter(
                updated_at__lt=now - timedelta(days=sessions_days)
            ).exclude(
                Exists(AgentRun.objects.filter(session=OuterRef("pk"), status__in=ACTIVE_STATUSES))
            )
            if policy.sessions_require_empty:
                sessions = sessions.exclude(Exists(AgentRun.objects.filter(session=OuterRef("pk"))))
            results.append(("sessions", self._delete(sessions, batch_size, dry_run)))
        if usage_days:
            rows = AgentUsage.objects.filter(created_at__lt=now - timedelta(days=usage_days))
            results.append(("usage records", self._delete(rows, batch_size, dry_run)))
        if trace_days:
            cutoff = now - timedelta(days=trace_days)
            results.append(("trace spans", self._delete_traces(cutoff, batch_size, dry_run)))
        verb = "Would delete" if dry_run else "Deleted"
        summary = ", ".join(f"{count} {name}" for name, count in results)
        self.stdout.write(self.style.SUCCESS(f"{verb} {summary}."))

    def _delete_traces(self, cutoff: datetime, batch_size: int, dry_run: bool) -> int:
        """Whole traces started before ``cutoff`` (an attempt's spans go with its root), of
        runs no longer in progress, and spans left without their root."""
        done = AgentSpan.objects.exclude(run__status__in=ACTIVE_STATUSES)
        roots = done.filter(kind="trace", started_at__lt=cutoff)
        same_trace = {"run": OuterRef("run"), "trace_id": OuterRef("trace_id")}
        rootless = done.filter(started_at__lt=cutoff).exclude(
            Exists(AgentSpan.objects.filter(kind="trace", **same_trace))
        )
        if dry_run:
            in_old_traces = done.filter(Exists(roots.filter(**same_trace)))
            return in_old_traces.count() + rootless.count()
        total = 0
        while batch := list(roots.order_by("pk").values_list("run_id", "trace_id")[:batch_size]):
            traces = Q()
            for run_id, trace_id in batch:
                traces |= Q(run_id=run_id, trace_id=trace_id)
            total += AgentSpan.objects.filter(traces).delete()[0]
        return total + self._delete(rootless, batch_size, dry_run=False)

    def _delete(self, queryset: QuerySet, batch_size: int, dry_run: bool) -> int:
        if dry_run:
            return queryset.count()
        model = queryset.model
        total = 0
        while True:
            ids = list(queryset.order_by("pk").values_list("pk", flat=True)[:batch_size])
            if not ids:
                return total
            if model in (AgentRun, AgentSession):
                # Locked first, and still matching then: a run can be writing to them, and a
                # message can arrive for an idle conversation (which then is no longer idle).
                batch = queryset.filter(pk__in=ids)
                deleted = lock_and_delete(batch, recheck=True)[1].get(model._meta.label, 0)
                total += deleted
                if deleted < len(ids):
                    queryset = queryset.exclude(pk__in=ids)  # the ones kept, kept
            else:
                model.objects.filter(pk__in=ids).delete()
                total += len(ids)
