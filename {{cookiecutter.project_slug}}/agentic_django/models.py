"""Persistence of agentic_django: sessions with their items, runs, and run events."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models


class AgentSession(models.Model):
    """A conversation owned by one user; its items are the agent's memory."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="agent_sessions"
    )
    session_key = models.CharField(max_length=255)
    metadata = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "session_key"], name="agentic_session_owner_key_unique"
            )
        ]
        indexes = [
            models.Index(fields=["owner", "-updated_at"], name="agentic_session_owner_upd"),
            models.Index(fields=["updated_at"], name="agentic_session_updated"),
        ]

    def __str__(self) -> str:
        return self.session_key


class AgentSessionItem(models.Model):
    """One SDK input item of a session, in conversation order."""

    session = models.ForeignKey(AgentSession, on_delete=models.CASCADE, related_name="items")
    sequence = models.PositiveBigIntegerField()
    payload = models.JSONField(encoder=DjangoJSONEncoder)
    # The run that wrote this item, so a requeued run can roll back its partial history.
    run = models.ForeignKey(
        "AgentRun",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="session_items",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["sequence"]
        constraints = [
            models.UniqueConstraint(
                fields=["session", "sequence"], name="agentic_item_session_seq_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.session_id}#{self.sequence}"


class AgentRun(models.Model):
    """One execution of an agent on a session, processed by a background task."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        # Paused on tool calls that need a person's approval: blocks its session, holds no
        # worker slot; resumes (back to pending) once every call is decided.
        AWAITING_APPROVAL = "awaiting_approval", "Awaiting approval"
        # Paused before a model call its owner's or its own budget cannot pay for (see
        # ``usage``): blocks its session, holds no worker slot; resumes once the budget allows.
        BUDGET_EXCEEDED = "budget_exceeded", "Budget exceeded"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    TERMINAL_STATUSES = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
    # Paused: waiting for a person (approvals) or for money (a budget), not for a worker.
    PAUSED_STATUSES = frozenset({Status.AWAITING_APPROVAL, Status.BUDGET_EXCEEDED})

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey(AgentSession, on_delete=models.CASCADE, related_name="runs")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="agent_runs"
    )
    agent_key = models.CharField(max_length=100)
    status = models.CharField(max_length=32, choices=Status.choices, default=Status.PENDING)
    input_payload = models.JSONField(encoder=DjangoJSONEncoder)
    run_options = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    final_output = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder)
    # What users see: short, never a traceback or a provider's own words.
    error = models.TextField(blank=True)
    # The full story (exception, traceback) for the admin and the logs only.
    error_detail = models.TextField(blank=True)

    requests = models.PositiveIntegerField(default=0)
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    total_tokens = models.PositiveBigIntegerField(default=0)

    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    task_id = models.CharField(max_length=255, blank=True)
    # When the current task was handed to the queue (database clock); a pending run whose
    # task is older than a lease may have lost it and is dispatched again.
    dispatched_at = models.DateTimeField(null=True, blank=True)
    # The fence: each claim increments it, and every write an attempt makes names it.
    attempt = models.PositiveIntegerField(default=0)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    last_response_id = models.CharField(max_length=255, blank=True)
    # A paused run fails once its approvals are not decided by then.
    approval_expires_at = models.DateTimeField(null=True, blank=True)
    # Where the last checkpoint (AgentCheckpoint) stands: the session items and events the run
    # had written by then. A retry resumes there and drops what came after.
    checkpoint_item_sequence = models.PositiveBigIntegerField(default=0)
    checkpoint_event_sequence = models.PositiveIntegerField(default=0)
    checkpoint_usage_sequence = models.PositiveIntegerField(default=0)
    # The assistant text streaming in right now (written at most ~10 times a second), and the
    # event sequence it follows; emptied when the message is complete. A run that fails or is
    # cancelled mid-message keeps it as its partial output.
    stream_text = models.TextField(blank=True, default="")
    # With events: the event the streaming message follows. Without: the number of the
    # message, counted up by each new one, so clients can tell two messages apart.
    stream_sequence = models.PositiveIntegerField(default=0)
    # Times the run was retried after its worker died (capped by AGENTIC_DJANGO_MAX_ATTEMPTS),
    # and the seconds its earlier attempts ran (AGENTIC_DJANGO_RUN_TIMEOUT covers them all).
    retries = models.PositiveIntegerField(default=0)
    elapsed_seconds = models.FloatField(default=0)
    # Times what an attempt wrote after the checkpoint was rolled back (its items deleted, its
    # events superseded): streams compare ``attempt + rollbacks`` with what a client was sent.
    rollbacks = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "created_at"], name="agentic_run_status_created"),
            models.Index(
                fields=["session", "status", "created_at"], name="agentic_run_session_status"
            ),
            models.Index(fields=["owner", "-created_at"], name="agentic_run_owner_created"),
            models.Index(fields=["status", "lease_expires_at"], name="agentic_run_status_lease"),
            models.Index(fields=["status", "finished_at"], name="agentic_run_status_finished"),
            models.Index(
                fields=["status", "approval_expires_at"], name="agentic_run_status_approval"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.agent_key} run {self.id} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        """True once the run completed, failed or was cancelled."""
        return self.status in self.TERMINAL_STATUSES

    @property
    def is_paused(self) -> bool:
        """True while the run waits for approvals or for its budget."""
        return self.status in self.PAUSED_STATUSES

    def pending_approvals(self) -> list[AgentApproval]:
        """The tool calls this run waits on (a query only while it is paused)."""
        if self.status != self.Status.AWAITING_APPROVAL:
            return []
        return list(self.approvals.filter(decision=AgentApproval.Decision.PENDING))


class AgentEvent(models.Model):
    """A semantic event of a run (tool call, tool output, message, handoff, agent change)."""

    run = models.ForeignKey(AgentRun, on_delete=models.CASCADE, related_name="events")
    sequence = models.PositiveIntegerField()
    # The attempt that wrote it.
    attempt = models.PositiveIntegerField(default=1)
    # Written by an attempt that died after the run's last checkpoint: the retry does that
    # part again, so clients never see it (it stays stored for the admin).
    superseded = models.BooleanField(default=False)
    event_type = models.CharField(max_length=64)
    payload = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run", "sequence"]
        constraints = [
            models.UniqueConstraint(fields=["run", "sequence"], name="agentic_event_run_seq_unique")
        ]
        indexes = [models.Index(fields=["created_at"], name="agentic_event_created")]

    def __str__(self) -> str:
        return f"{self.event_type} #{self.sequence}"


class AgentUsage(models.Model):
    """The ledger: one row per model call a run made, written under the attempt's fence.

    Rows are numbered per run like events. A row an attempt wrote after the run's checkpoint
    and before its worker died is marked ``superseded`` when the run is retried: the retry
    makes that call again, and the run's own totals (what the SDK reports) count it once. The
    money was spent all the same, so spending totals and budgets count every row.
    """

    # Kept when the run or its conversation is deleted (agentic_django_cleanup prunes finished
    # runs after a month): spending is billing data, pruned only by its own policy.
    run = models.ForeignKey(
        AgentRun, on_delete=models.SET_NULL, null=True, blank=True, related_name="usage_records"
    )
    sequence = models.PositiveIntegerField()
    attempt = models.PositiveIntegerField()
    # The model turn of the run (1 for its first model call).
    turn = models.PositiveIntegerField()
    superseded = models.BooleanField(default=False)
    # Denormalized from the run so that spending per user and per conversation is one index.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="agent_usage"
    )
    session = models.ForeignKey(
        AgentSession, on_delete=models.SET_NULL, null=True, blank=True, related_name="usage"
    )
    agent_name = models.CharField(max_length=255, blank=True)
    model = models.CharField(max_length=255, blank=True)
    provider = models.CharField(max_length=255, blank=True)
    requests = models.PositiveIntegerField(default=1)
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    reasoning_tokens = models.PositiveBigIntegerField(default=0)
    total_tokens = models.PositiveBigIntegerField(default=0)
    # In US dollars; NULL when the model's price is unknown (never shown as 0).
    cost = models.DecimalField(max_digits=18, decimal_places=9, null=True, blank=True)
    # Where the price came from: "settings" (AGENTIC_DJANGO_MODEL_PRICES), "genai-prices", or
    # "" (unknown).
    price_source = models.CharField(max_length=32, blank=True)
    # When the call was priced (the price table in force then).
    priced_at = models.DateTimeField()
    created_at = models.DateTimeField()

    class Meta:
        verbose_name = "usage record"
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["run", "sequence"], name="agentic_usage_run_seq_unique")
        ]
        indexes = [
            models.Index(fields=["owner", "created_at"], name="agentic_usage_owner_created"),
            models.Index(fields=["created_at"], name="agentic_usage_created"),
        ]

    def __str__(self) -> str:
        return f"{self.model or 'model'} call #{self.sequence} of {self.run_id}"


class AgentSpan(models.Model):
    """One step of a run as the Agents SDK traced it: an agent, a model call, a tool call, a
    handoff, a guardrail, or a custom span -- and one row per trace (``kind="trace"``, its
    ``span_id`` the trace id): each attempt of a run, and each part of a run after an approval,
    is a trace of its own.

    Written in batches by ``agentic_django.tracing`` off the run's path, only while the attempt
    that traced them still holds the run (an attempt that lost its run writes none), once each
    (``run``, ``span_id`` is unique). Spans of an attempt whose worker died stay as far as they
    were written; the spans still open then are not recorded.
    """

    run = models.ForeignKey(AgentRun, on_delete=models.CASCADE, related_name="spans")
    attempt = models.PositiveIntegerField()
    trace_id = models.CharField(max_length=64)
    span_id = models.CharField(max_length=64)
    # The enclosing span ("" at the top of a trace; a trace row's parent is "").
    parent_id = models.CharField(max_length=64, blank=True)
    # "trace", "agent", "generation", "response", "function", "handoff", "guardrail",
    # "custom", ... (the SDK's span type).
    kind = models.CharField(max_length=32)
    name = models.CharField(max_length=255, blank=True)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    # What the span recorded (inputs and outputs only when sensitive data is kept).
    data = models.JSONField(default=dict, blank=True)
    error = models.JSONField(null=True, blank=True)

    class Meta:
        verbose_name = "trace span"
        ordering = ["started_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["run", "span_id"], name="agentic_span_run_span_unique")
        ]
        indexes = [
            models.Index(fields=["run", "started_at"], name="agentic_span_run_started"),
            models.Index(fields=["started_at"], name="agentic_span_started"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.name}".strip()

    @property
    def duration_ms(self) -> float | None:
        if self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds() * 1000


class AgentCheckpoint(models.Model):
    """The serialized SDK ``RunState`` a run resumes from: saved before each model call after
    the first, and when the run pauses for approvals. Server-side only, never from a client."""

    run = models.OneToOneField(
        AgentRun, on_delete=models.CASCADE, primary_key=True, related_name="checkpoint"
    )
    state = models.TextField()
    # The SDK's RunState schema version the state was written with.
    schema_version = models.CharField(max_length=16)
    turn = models.PositiveIntegerField()
    attempt = models.PositiveIntegerField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"checkpoint of {self.run_id} (turn {self.turn})"


class AgentApproval(models.Model):
    """A tool call a paused run waits on, and the decision taken on it.

    ``kind`` says what is asked: may the tool run (``approval``), or -- for a call that
    started in an attempt whose worker died before the tool returned -- should it run again
    (approve) or count as done with the message as its output (reject)? (``in_doubt``)
    """

    class Kind(models.TextChoices):
        APPROVAL = "approval", "Approval"
        IN_DOUBT = "in_doubt", "In doubt"

    class Decision(models.TextChoices):
        PENDING = "pending", "Pending"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"
        EXPIRED = "expired", "Expired"

    # Decisions someone took (an expired call was never answered: it is asked again).
    ANSWERS = (Decision.APPROVED, Decision.REJECTED)

    run = models.ForeignKey(AgentRun, on_delete=models.CASCADE, related_name="approvals")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.APPROVAL)
    call_id = models.CharField(max_length=255)
    tool_name = models.CharField(max_length=255)
    arguments = models.JSONField(encoder=DjangoJSONEncoder)
    agent_name = models.CharField(max_length=255, blank=True)
    requested_at = models.DateTimeField()
    decision = models.CharField(max_length=16, choices=Decision.choices, default=Decision.PENDING)
    # Approve (or reject) every later call of this tool in the same run too.
    always = models.BooleanField(default=False)
    # Sent to the model on a rejection.
    message = models.TextField(blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["run", "requested_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["run", "call_id"], name="agentic_approval_run_call")
        ]

    def __str__(self) -> str:
        return f"{self.tool_name} ({self.decision})"


class AgentToolCall(models.Model):
    """A tool call, recorded as started before the tool runs and as finished (with its
    output) the moment it returns: a resumed or retried run returns the output instead of
    calling the tool again, and a call that started but never finished is in doubt."""

    run = models.ForeignKey(AgentRun, on_delete=models.CASCADE, related_name="tool_calls")
    call_id = models.CharField(max_length=255)
    tool_name = models.CharField(max_length=255)
    arguments = models.TextField()
    # The model turn it belongs to, so a turn that is asked again can match its calls.
    turn = models.PositiveIntegerField()
    # Which of the turn's calls of this tool with these arguments it is (0 for the first).
    occurrence = models.PositiveIntegerField(default=0)
    # The key tools pass to what they act on (toolcalls.idempotency_key): kept for every
    # retry of the call.
    idempotency_key = models.CharField(max_length=64, blank=True)
    output = models.JSONField(null=True, encoder=DjangoJSONEncoder)
    # The attempt that (last) started it.
    attempt = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    # None while the tool runs (or if its worker died inside it).
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        # Not unique: some servers reuse call ids; a call is matched by id, tool and arguments.
        indexes = [models.Index(fields=["run", "call_id"], name="agentic_toolcall_run_call_ix")]

    def __str__(self) -> str:
        return f"{self.tool_name} {self.call_id}"


class DispatchLock(models.Model):
    """A single row locked while claiming a run, so the concurrency limit holds across workers.

    It also holds the concurrency limit in force for the whole deployment, recorded by the
    most recently started worker (see ``lifecycle.record_concurrency_limit``); empty for
    "auto": the slots of the live workers (``AgentWorker``).
    """

    name = models.CharField(max_length=32, primary_key=True)
    concurrency_limit = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        verbose_name = "dispatch lock"

    def __str__(self) -> str:
        return self.name


class AgentWorker(models.Model):
    """A worker process that is (or was) taking runs, and how many it runs at once.

    Each worker announces itself when it starts and renews ``heartbeat_at`` every half lease;
    one whose heartbeat is older than a lease is gone (its row is removed by the next sweep,
    or by the worker itself when it stops). With ``AGENTIC_DJANGO_CONCURRENCY_LIMIT`` unset,
    the slots of the live workers are the deployment's concurrency limit.
    """

    id = models.CharField(max_length=64, primary_key=True)
    hostname = models.CharField(max_length=255, blank=True)
    pid = models.PositiveIntegerField(default=0)
    slots = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField()

    class Meta:
        verbose_name = "worker"
        ordering = ["started_at"]

    def __str__(self) -> str:
        return f"{self.hostname}:{self.pid} ({self.slots} slots)"
