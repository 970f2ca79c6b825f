"""PostgreSQL: a run's row notifies ``agentic_runs`` only when a column a stream reads changed
(``streams.STREAM_FIELDS``), not on every lease renewal, task id or dispatch mark: those
UPDATEs no longer queue on the server's one NOTIFY lock when they commit."""

from django.db import migrations

TRIGGER = """
DROP TRIGGER IF EXISTS agentic_django_run_changed ON agentic_django_agentrun;
CREATE TRIGGER agentic_django_run_changed AFTER UPDATE ON agentic_django_agentrun
  FOR EACH ROW {when} EXECUTE FUNCTION agentic_django_notify_run();
"""
# The columns of streams.STREAM_FIELDS (tests/core/test_notify.py keeps the two together).
STREAMED_COLUMNS = (
    "status",
    "attempt",
    "rollbacks",
    "stream_text",
    "stream_sequence",
    "error",
    "finished_at",
)
WHEN = "WHEN ({})".format(
    " OR ".join(f"OLD.{column} IS DISTINCT FROM NEW.{column}" for column in STREAMED_COLUMNS)
)


def only_streamed_changes(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(TRIGGER.format(when=WHEN))


def every_change(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(TRIGGER.format(when=""))


class Migration(migrations.Migration):
    dependencies = [("agentic_django", "0007_workers")]

    operations = [migrations.RunPython(only_streamed_changes, every_change)]
