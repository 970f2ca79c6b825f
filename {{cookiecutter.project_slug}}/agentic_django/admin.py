"""Admin for sessions, runs, events and the usage ledger: read-mostly, fast with large tables,
safe actions."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_user_model
from django.core.paginator import Paginator
from django.db.models import DurationField, ExpressionWrapper, F, QuerySet
from django.db.models.functions import TruncDate
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join

from agentic_django import lifecycle
from agentic_django.exceptions import (
    ApprovalAlreadyDecided,
    ApprovalExpired,
    ApprovalNotFound,
    RunNotAwaitingApproval,
    RunNotCancellable,
)
from agentic_django.models import (
    AgentApproval,
    AgentEvent,
    AgentRun,
    AgentSession,
    AgentSessionItem,
    AgentUsage,
)
from agentic_django.services import (
    approve_tool_call,
    cancel_run,
    reject_tool_call,
    requeue_run,
)
from agentic_django.usage import (
    Totals,
    run_spend,
    run_totals,
    totals,
    totals_aggregates,
    totals_of,
)

INLINE_LIMIT = 50


def _preview(value: Any, length: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= length else text[: length - 1] + "…"


def dollars(amount: Decimal) -> str:
    """Exact US dollars, at least to the cent: ``$0.000123``, ``$1.50``."""
    whole, _, fraction = f"{amount.normalize():f}".partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


def cost_text(found: Totals) -> str:
    """The cost of some calls: "unknown" if none had a price, never $0 for unpriced calls."""
    if found.calls and found.unpriced == found.calls:
        return "unknown"
    if found.unpriced:
        return f"{dollars(found.cost)} + {found.unpriced} unpriced call(s)"
    return dollars(found.cost)


def describe(found: Totals) -> str:
    if not found.calls:
        return "no model calls"
    return (
        f"{found.calls:,} call(s), {found.total_tokens:,} tokens ({found.input_tokens:,} input, "
        f"{found.output_tokens:,} output, {found.cached_tokens:,} cached, "
        f"{found.reasoning_tokens:,} reasoning), cost {cost_text(found)}"
    )


class LatestRowsFormSet(BaseInlineFormSet):
    """Shows only the newest ``INLINE_LIMIT`` rows, so pages stay fast with thousands of rows."""

    order_field = "-pk"

    def get_queryset(self) -> QuerySet:
        if not hasattr(self, "_queryset"):
            self._queryset = self.queryset.order_by(self.order_field)[:INLINE_LIMIT]
        return self._queryset


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False
    formset = LatestRowsFormSet

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ItemFormSet(LatestRowsFormSet):
    order_field = "-sequence"


class EventFormSet(LatestRowsFormSet):
    order_field = "-sequence"


class SessionItemInline(ReadOnlyInline):
    model = AgentSessionItem
    formset = ItemFormSet
    fields = ("sequence", "payload_preview", "run", "created_at")
    readonly_fields = fields
    verbose_name_plural = f"items (latest {INLINE_LIMIT})"

    @admin.display(description="payload")
    def payload_preview(self, obj: AgentSessionItem) -> str:
        return _preview(obj.payload)


class RunEventInline(ReadOnlyInline):
    model = AgentEvent
    formset = EventFormSet
    fields = ("sequence", "attempt", "superseded", "event_type", "payload_preview", "created_at")
    readonly_fields = fields
    verbose_name_plural = f"events (latest {INLINE_LIMIT})"

    @admin.display(description="payload")
    def payload_preview(self, obj: AgentEvent) -> str:
        return _preview(obj.payload)


class ApprovalInline(ReadOnlyInline):
    model = AgentApproval
    fields = (
        "kind",
        "call_id",
        "tool_name",
        "arguments",
        "agent_name",
        "requested_at",
        "decision",
        "always",
        "message",
        "decided_by",
        "decided_at",
    )
    readonly_fields = fields
    verbose_name_plural = f"tool calls awaiting a decision (latest {INLINE_LIMIT})"


class LockedDelete:
    """Deletes lock what they delete first, so a run writing meanwhile cannot fail them."""

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        lifecycle.lock_and_delete(type(obj).objects.filter(pk=obj.pk))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        lifecycle.lock_and_delete(queryset)


@admin.register(AgentSession)
class AgentSessionAdmin(LockedDelete, admin.ModelAdmin):
    list_display = ("session_key", "owner", "created_at", "updated_at")
    list_filter = ("created_at", "updated_at")
    search_fields = ("session_key", "owner__username", "owner__email")
    raw_id_fields = ("owner",)
    list_select_related = ("owner",)
    readonly_fields = ("created_at", "updated_at", "runs_link")
    inlines = (SessionItemInline,)
    show_full_result_count = False

    @admin.display(description="runs")
    def runs_link(self, obj: AgentSession) -> str:
        url = reverse("admin:agentic_django_agentrun_changelist") + f"?session__id__exact={obj.pk}"
        return format_html('<a href="{}">All runs of this session</a>', url)


class DurationFilter(admin.SimpleListFilter):
    """Runs by how long they took, start to finish (slow ones first to look at)."""

    title = "duration"
    parameter_name = "duration"
    BUCKETS = {
        "lt10": ("under 10 s", None, 10),
        "10to60": ("10 s to 1 min", 10, 60),
        "1to5m": ("1 to 5 min", 60, 300),
        "gt5m": ("over 5 min", 300, None),
    }

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(key, label) for key, (label, _, _) in self.BUCKETS.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[AgentRun]) -> QuerySet[AgentRun]:
        bucket = self.BUCKETS.get(self.value() or "")
        if bucket is None:
            return queryset
        _, low, high = bucket
        took = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
        queryset = queryset.filter(finished_at__isnull=False, started_at__isnull=False)
        queryset = queryset.annotate(took=took)
        if low is not None:
            queryset = queryset.filter(took__gte=timedelta(seconds=low))
        if high is not None:
            queryset = queryset.filter(took__lt=timedelta(seconds=high))
        return queryset


@admin.register(AgentRun)
class AgentRunAdmin(LockedDelete, admin.ModelAdmin):
    list_display = (
        "id",
        "agent_key",
        "status",
        "owner",
        "session",
        "created_at",
        "finished_at",
        "total_tokens",
        "inspect_link",
    )
    list_filter = ("status", "agent_key", DurationFilter, "created_at")
    search_fields = ("=id", "agent_key", "owner__username", "session__session_key", "task_id")
    raw_id_fields = ("owner", "session")
    list_select_related = ("owner", "session")
    date_hierarchy = "created_at"
    show_full_result_count = False
    inlines = (ApprovalInline, RunEventInline)
    actions = ("cancel_selected", "requeue_selected", "approve_selected", "reject_selected")
    readonly_fields = (
        "id",
        "status",
        "input_payload",
        "final_output",
        "error",
        "error_detail",
        "requests",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "created_at",
        "started_at",
        "finished_at",
        "task_id",
        "dispatched_at",
        "attempt",
        "retries",
        "elapsed_seconds",
        "lease_expires_at",
        "heartbeat_at",
        "cancel_requested_at",
        "last_response_id",
        "approval_expires_at",
        "checkpoint_item_sequence",
        "checkpoint_event_sequence",
        "checkpoint_usage_sequence",
        "usage_summary",
        "events_link",
        "inspect_link",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Runs are created through agentic_django.services so they get validated and queued.
        return False

    @admin.display(description="steps")
    def inspect_link(self, obj: AgentRun) -> str:
        url = reverse("agents:run-inspect", args=[obj.pk])
        return format_html('<a href="{}">Inspect</a>', url)

    @admin.display(description="events")
    def events_link(self, obj: AgentRun) -> str:
        url = reverse("admin:agentic_django_agentevent_changelist") + f"?run__id__exact={obj.pk}"
        return format_html('<a href="{}">All events of this run</a>', url)

    @admin.display(description="usage")
    def usage_summary(self, obj: AgentRun) -> str:
        own, spent = run_totals(obj), run_spend(obj.pk)
        url = reverse("admin:agentic_django_agentusage_changelist") + f"?run__id__exact={obj.pk}"
        lines = [("Used (each call once)", describe(own))]
        if spent != own:
            # A dead attempt's calls were made again by the retry: paid for twice.
            lines.append(("Spent (every attempt)", describe(spent)))
        return format_html(
            '{}<a href="{}">All model calls of this run</a>',
            format_html_join("", "{}: {}<br>", lines),
            url,
        )

    @admin.action(description="Cancel selected runs", permissions=["change"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[AgentRun]) -> None:
        cancelled = skipped = 0
        for run in queryset:
            try:
                cancel_run(run)
            except RunNotCancellable:
                skipped += 1
            else:
                cancelled += 1
        self.message_user(
            request, f"Cancelled or asked to stop {cancelled} run(s); {skipped} already finished."
        )

    @admin.action(description="Requeue selected stale or failed runs", permissions=["change"])
    def requeue_selected(self, request: HttpRequest, queryset: QuerySet[AgentRun]) -> None:
        requeued = sum(1 for run in queryset if requeue_run(run))
        skipped = queryset.count() - requeued
        level = messages.SUCCESS if not skipped else messages.WARNING
        self.message_user(
            request,
            f"Requeued {requeued} run(s); skipped {skipped} (live, finished successfully, "
            "or followed by a later run of the same session).",
            level,
        )

    @admin.action(
        description="Approve the tool calls selected runs wait on", permissions=["change"]
    )
    def approve_selected(self, request: HttpRequest, queryset: QuerySet[AgentRun]) -> None:
        self._decide_all(request, queryset, approve=True)

    @admin.action(description="Reject the tool calls selected runs wait on", permissions=["change"])
    def reject_selected(self, request: HttpRequest, queryset: QuerySet[AgentRun]) -> None:
        self._decide_all(request, queryset, approve=False)

    def _decide_all(
        self, request: HttpRequest, queryset: QuerySet[AgentRun], *, approve: bool
    ) -> None:
        decided = skipped = 0
        for run in queryset:
            for approval in run.pending_approvals():
                try:
                    if approve:
                        approve_tool_call(run, approval.call_id, user=request.user)
                    else:
                        reject_tool_call(
                            run,
                            approval.call_id,
                            message="Rejected by an administrator.",
                            user=request.user,
                        )
                except (
                    ApprovalAlreadyDecided,
                    ApprovalExpired,
                    ApprovalNotFound,
                    RunNotAwaitingApproval,
                ):
                    skipped += 1
                else:
                    decided += 1
        verb = "Approved" if approve else "Rejected"
        level = messages.SUCCESS if not skipped else messages.WARNING
        self.message_user(
            request, f"{verb} {decided} tool call(s); {skipped} were decided meanwhile.", level
        )


@admin.register(AgentEvent)
class AgentEventAdmin(admin.ModelAdmin):
    list_display = ("run", "sequence", "attempt", "superseded", "event_type", "created_at")
    list_filter = ("event_type", "superseded", "created_at")
    search_fields = ("=run__id", "event_type")
    raw_id_fields = ("run",)
    list_select_related = ("run",)
    readonly_fields = (
        "run",
        "sequence",
        "attempt",
        "superseded",
        "event_type",
        "payload",
        "created_at",
    )
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(AgentSessionItem)
class AgentSessionItemAdmin(admin.ModelAdmin):
    list_display = ("session", "sequence", "run", "created_at")
    search_fields = ("=session__id", "session__session_key")
    raw_id_fields = ("session", "run")
    list_select_related = ("session", "run")
    readonly_fields = ("session", "sequence", "payload", "run", "created_at")
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# --- The usage ledger ------------------------------------------------------------------------

# Filter values are read from the newest rows: a DISTINCT over the whole ledger reads it all.
RECENT_VALUES_ROWS = 10_000
# Rows of a grouped summary ("usage by user", ...) shown at most.
GROUP_LIMIT = 500
GROUP_VAR = "group"
GROUP_SORT_VAR = "group_sort"
# How a summary's rows may be sorted: by their name (user, agent, model, day) or the most first.
GROUP_ORDERINGS: dict[str, tuple[Any, ...]] = {
    "name": ("name",),
    "calls": ("-calls", "name"),
    "tokens": ("-total_tokens_total", "name"),
    "cost": (F("cost_total").desc(nulls_last=True), "name"),
}


class RecentValuesFilter(admin.AllValuesFieldListFilter):
    """The values of the newest ``RECENT_VALUES_ROWS`` calls (and the one chosen)."""

    def __init__(self, field, request, params, model, model_admin, field_path) -> None:
        super().__init__(field, request, params, model, model_admin, field_path)
        rows = model_admin.get_queryset(request)
        newest = rows.order_by("-pk").values("pk")[:RECENT_VALUES_ROWS]
        found = set(
            rows.filter(pk__in=newest).order_by().values_list(field_path, flat=True).distinct()
        )
        found.update(self.lookup_val or ())
        self.lookup_choices = sorted(found)

    def choices(self, changelist: ChangeList) -> Any:
        for choice in super().choices(changelist):
            yield {**choice, "display": choice["display"] or "(none)"}


class PriceSourceFilter(admin.SimpleListFilter):
    title = "price source"
    parameter_name = "price_source"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("settings", "settings (AGENTIC_DJANGO_MODEL_PRICES)"),
            ("genai-prices", "genai-prices"),
            ("unknown", "unknown (no price)"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value == "unknown":
            return queryset.filter(cost__isnull=True)
        if value in ("settings", "genai-prices"):
            return queryset.filter(price_source=value)
        return queryset


class TotalsPaginator(Paginator):
    """Counts the filtered rows with the totals shown above them: one aggregate, not two."""

    @cached_property
    def totals(self) -> Totals:
        return totals(self.object_list)

    @cached_property
    def count(self) -> int:
        return self.totals.calls


class UsageChangeList(ChangeList):
    """The changelist, with the grouped summary's parameters kept out of the row filters (and
    kept in every filter link, so a summary stays grouped while it is filtered)."""

    def get_filters_params(self, params: Any = None) -> dict[str, Any]:
        lookup_params = super().get_filters_params(params)
        for name in (GROUP_VAR, GROUP_SORT_VAR):
            lookup_params.pop(name, None)
        return lookup_params


@admin.register(AgentUsage)
class AgentUsageAdmin(admin.ModelAdmin):
    """The ledger, read-only: totals of the filtered rows above the list, and the same rows
    summed per user, agent, model or day (``?group=``)."""

    list_display = (
        "created_at",
        "owner",
        "run_link",
        "attempt",
        "turn",
        "agent_name",
        "model",
        "provider",
        "input_tokens",
        "output_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "total_tokens",
        "cost_display",
        "price_source",
        "superseded",
    )
    list_filter = (
        ("model", RecentValuesFilter),
        ("provider", RecentValuesFilter),
        ("agent_name", RecentValuesFilter),
        PriceSourceFilter,
        "superseded",
        "created_at",
    )
    date_hierarchy = "created_at"
    search_fields = ("owner__username", "owner__email", "=run__id")
    search_help_text = "A user's name or email, or a run's id."
    list_select_related = ("owner",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    paginator = TotalsPaginator
    groups = ("user", "agent", "model", "day")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Never on the ledger's own pages; rows go with the user they belong to, for those
        allowed to delete usage records (Django asks here for each row)."""
        name = getattr(request.resolver_match, "url_name", None) or ""
        if name.startswith(f"{self.opts.app_label}_{self.opts.model_name}_"):
            return False
        return super().has_delete_permission(request, obj)

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return UsageChangeList

    @admin.display(description="run", ordering="run")
    def run_link(self, obj: AgentUsage) -> str:
        if obj.run_id is None:
            return "deleted"  # the row outlives its run: spending is billing data
        url = reverse("admin:agentic_django_agentrun_change", args=[obj.run_id])
        return format_html('<a href="{}" title="{}">{}</a>', url, obj.run_id, str(obj.run_id)[:8])

    @admin.display(description="cost (USD)", ordering="cost")
    def cost_display(self, obj: AgentUsage) -> str:
        return "unknown" if obj.cost is None else dollars(obj.cost)

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None) or {}
        cl = context.get("cl")
        if cl is None:  # a redirect or an error page
            return response
        group = request.GET.get(GROUP_VAR)
        context["usage_totals"] = self._totals_row(cl.paginator.totals)
        context["usage_groups"] = [
            {
                "label": f"by {name}",
                "url": cl.get_query_string({GROUP_VAR: name}, [GROUP_SORT_VAR]),
                "selected": name == group,
            }
            for name in self.groups
        ]
        context["usage_all_url"] = cl.get_query_string(remove=[GROUP_VAR, GROUP_SORT_VAR])
        if group in self.groups:
            context.update(self._grouped(cl, group, request.GET.get(GROUP_SORT_VAR)))
        return response

    def _totals_row(self, found: Totals) -> dict[str, Any]:
        return {
            "calls": f"{found.calls:,}",
            **{
                name: f"{getattr(found, name):,}"
                for name in (
                    "input_tokens",
                    "output_tokens",
                    "cached_tokens",
                    "reasoning_tokens",
                    "total_tokens",
                )
            },
            "cost": cost_text(found),
            "unpriced": f"{found.unpriced:,}",
        }

    def _grouped(self, cl: ChangeList, group: str, sort: str | None) -> dict[str, Any]:
        """The changelist's rows (its filters, search and date) summed per ``group``."""
        rows = cl.queryset.order_by()
        if group == "user":
            username = f"owner__{get_user_model().USERNAME_FIELD}"
            rows = rows.values("owner", name=F(username))
        elif group == "day":
            rows = rows.values(name=TruncDate("created_at"))
        else:
            rows = rows.values(name=F("agent_name" if group == "agent" else "model"))
        if sort not in GROUP_ORDERINGS:
            sort = "name" if group == "day" else "cost"
        rows = rows.annotate(**totals_aggregates()).order_by(*GROUP_ORDERINGS[sort])
        found = list(rows[: GROUP_LIMIT + 1])
        return {
            "usage_group": group,
            "usage_group_rows": [
                {
                    "name": str(row["name"]) if row["name"] not in ("", None) else "(none)",
                    "url": cl.get_query_string(
                        self._drill_down(group, row), [GROUP_VAR, GROUP_SORT_VAR]
                    ),
                    **self._totals_row(totals_of(row)),
                }
                for row in found[:GROUP_LIMIT]
            ],
            "usage_group_truncated": len(found) > GROUP_LIMIT,
            "usage_group_limit": GROUP_LIMIT,
            "usage_group_sorts": [
                {
                    "label": {"name": group, "tokens": "total tokens", "cost": "cost (USD)"}.get(
                        key, key
                    ),
                    "url": cl.get_query_string({GROUP_SORT_VAR: key}),
                    "selected": key == sort,
                }
                for key in GROUP_ORDERINGS
            ],
        }

    def _drill_down(self, group: str, row: dict[str, Any]) -> dict[str, Any]:
        """The filters that show one group's rows in the changelist."""
        if group == "user":
            return {"owner__exact": row["owner"]}
        if group == "day":
            day = row["name"]
            return {
                "created_at__year": day.year,
                "created_at__month": day.month,
                "created_at__day": day.day,
            }
        return {"agent_name" if group == "agent" else "model": row["name"]}
