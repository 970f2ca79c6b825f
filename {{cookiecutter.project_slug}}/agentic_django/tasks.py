"""Background tasks of agentic_django (Django 6 tasks; works with every configured backend)."""

from __future__ import annotations

from django.tasks import TaskContext, task

from agentic_django.execution import execute


@task(takes_context=True)
def execute_agent_run(context: TaskContext, run_id: str) -> str:
    """Execute the run if it can be claimed now; return its status (or "skipped")."""
    return execute(str(run_id), task_id=str(context.task_result.id))
