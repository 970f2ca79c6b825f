"""Attempts are counted and timed, events of dead attempts are marked, tool calls are recorded
as they start, and a paused run can ask about a call in doubt."""

from django.db import migrations, models
from django.db.models import F


def finish_recorded_calls(apps, schema_editor):
    """Calls recorded before this migration were recorded when they finished."""
    calls = apps.get_model("agentic_django", "AgentToolCall")
    calls.objects.filter(finished_at__isnull=True).update(finished_at=F("created_at"))


class Migration(migrations.Migration):
    dependencies = [
        ("agentic_django", "0005_notify_triggers"),
    ]

    operations = [
        migrations.AddField(
            model_name="agentapproval",
            name="kind",
            field=models.CharField(
                choices=[("approval", "Approval"), ("in_doubt", "In doubt")],
                default="approval",
                max_length=16,
            ),
        ),
        migrations.AddField(
            model_name="agentevent",
            name="superseded",
            field=models.BooleanField(default=False),
        ),
        migrations.AddField(
            model_name="agentrun",
            name="elapsed_seconds",
            field=models.FloatField(default=0),
        ),
        migrations.AddField(
            model_name="agentrun",
            name="rollbacks",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name="agentrun",
            name="retries",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name="agenttoolcall",
            name="finished_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="agenttoolcall",
            name="idempotency_key",
            field=models.CharField(blank=True, max_length=64),
        ),
        migrations.AddField(
            model_name="agenttoolcall",
            name="occurrence",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.RemoveConstraint(
            model_name="agenttoolcall",
            name="agentic_toolcall_run_call",
        ),
        migrations.AddIndex(
            model_name="agenttoolcall",
            index=models.Index(fields=["run", "call_id"], name="agentic_toolcall_run_call_ix"),
        ),
        migrations.RunPython(finish_recorded_calls, migrations.RunPython.noop),
    ]
