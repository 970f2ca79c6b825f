"""Admin for sessions, runs and events: read-mostly, fast with large tables, safe actions."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

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
)
from agentic_django.services import (
    approve_tool_call,
    cancel_run,
    reject_tool_call,
    requeue_run,
)

INLINE_LIMIT = 50


def _preview(value: Any, length: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= length else text[: length - 1] + "…"


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


@admin.register(AgentSession)
class AgentSessionAdmin(admin.ModelAdmin):
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


@admin.register(AgentRun)
class AgentRunAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "agent_key",
        "status",
        "owner",
        "session",
        "created_at",
        "finished_at",
        "total_tokens",
    )
    list_filter = ("status", "agent_key", "created_at")
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
        "events_link",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Runs are created through agentic_django.services so they get validated and queued.
        return False

    @admin.display(description="events")
    def events_link(self, obj: AgentRun) -> str:
        url = reverse("admin:agentic_django_agentevent_changelist") + f"?run__id__exact={obj.pk}"
        return format_html('<a href="{}">All events of this run</a>', url)

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
