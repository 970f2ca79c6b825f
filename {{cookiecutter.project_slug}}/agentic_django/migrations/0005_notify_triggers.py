"""PostgreSQL: every change of a run's row and every new event NOTIFY ``agentic_runs`` with
the run id, so streams wake at once whichever process wrote (see agentic_django.notify)."""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION agentic_django_notify_run() RETURNS trigger AS $$
BEGIN
  IF TG_TABLE_NAME = 'agentic_django_agentevent' THEN
    PERFORM pg_notify('agentic_runs', NEW.run_id::text);
  ELSE
    PERFORM pg_notify('agentic_runs', NEW.id::text);
  END IF;
  RETURN NULL;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER agentic_django_run_changed AFTER UPDATE ON agentic_django_agentrun
  FOR EACH ROW EXECUTE FUNCTION agentic_django_notify_run();
CREATE TRIGGER agentic_django_event_added AFTER INSERT ON agentic_django_agentevent
  FOR EACH ROW EXECUTE FUNCTION agentic_django_notify_run();
"""
DROP = """
DROP TRIGGER IF EXISTS agentic_django_run_changed ON agentic_django_agentrun;
DROP TRIGGER IF EXISTS agentic_django_event_added ON agentic_django_agentevent;
DROP FUNCTION IF EXISTS agentic_django_notify_run();
"""


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [("agentic_django", "0004_streamed_text")]

    operations = [migrations.RunPython(create, drop)]
