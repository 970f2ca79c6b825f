"""The reference package's per-run cost: agentic-django 0.5.1 from PyPI, timed as
``run_overhead`` times this project (``compare_reference`` runs this module in a virtualenv of
the reference's own; the two packages share the module name ``agentic_django``).

    python -m benchmarks.reference --runs 100 --database '{"ENGINE": ...}' --out report.json

Configured as the reference's README configures it (its app, the immediate task backend of
``django-tasks``, events off), on the database settings it is given (a throwaway test database
named after them), with the scripted agents and SDK floors of ``benchmarks.scripted``. Its
public path: ``services.submit_agent_run`` (the run executes after commit, in the immediate
backend), checked afterwards for the scripted answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from benchmarks import common, scripted

PUBLIC = "reference: submit_agent_run"


def configure(database: dict[str, Any]) -> None:
    """Django settings of the reference package's quick start, on ``database``."""
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        SECRET_KEY="reference-benchmark",
        USE_TZ=True,
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "agentic_django.apps.AgenticDjangoConfig",
        ],
        DATABASES={"default": database},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        TASKS={"default": {"BACKEND": "django_tasks.backends.immediate.ImmediateBackend"}},
        AGENTIC_DJANGO_AGENT_REGISTRY="benchmarks.reference.agent_registry",
        AGENTIC_DJANGO_DEFAULT_AGENT_KEY="chat",
        AGENTIC_DJANGO_ENABLE_EVENTS=False,
        LOGGING_CONFIG=None,
    )
    django.setup()


def agent_registry() -> dict[str, Any]:
    """``AGENTIC_DJANGO_AGENT_REGISTRY``: the scripted agents."""
    from benchmarks import scripted

    return dict(scripted.AGENTS)


def variants(agent_key: str, *, user: Any, workdir: Path) -> list[common.Variant]:
    """The SDK floors and the reference's public path for ``agent_key``."""
    from agentic_django.services import submit_agent_run
    from benchmarks import scripted

    def public() -> common.Check:
        run = submit_agent_run(
            owner=user, session_key=uuid.uuid4().hex, agent_key=agent_key, input_payload="Hi"
        )
        return scripted.run_check(run, agent_key)

    return [*scripted.sdk_variants(agent_key, workdir), common.Variant(PUBLIC, public)]


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Timings (ms) and statements per run of every variant, per agent."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    if connection.vendor == "sqlite":
        connection.settings_dict.setdefault("TEST", {})["NAME"] = str(workdir / "ref.sqlite3")
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        call_command("migrate", verbosity=0)
        user, _ = get_user_model().objects.get_or_create(username="bench")
        return {
            agent_key: scripted.timed(
                variants(agent_key, user=user, workdir=workdir),
                runs=args.runs,
                block=args.block,
                warmup=args.warmup,
                queried=(PUBLIC,),
            )
            for agent_key in args.agents
        }
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)


def main(argv: list[str] | None = None) -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--runs", type=int, default=100)
    options.add_argument("--block", type=int, default=10)
    options.add_argument("--warmup", type=int, default=5)
    options.add_argument("--agents", nargs="+", default=["chat", "tool"])
    options.add_argument("--database", required=True, help="Django DATABASES['default'], JSON")
    options.add_argument("--out", type=Path, required=True)
    args = options.parse_args(sys.argv[1:] if argv is None else argv)
    configure(json.loads(args.database))
    with tempfile.TemporaryDirectory(prefix="agentic-reference-") as workdir:
        report = measure(args, Path(workdir))
    args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
