"""A worker killed (SIGKILL) inside its tools: the call that may or may not have happened is
never run again silently. A tool declared repeatable runs again on the retry; for the others
the retried run pauses and its user decides, per call: run it again (with the same
idempotency key) or count it as done. Real worker processes, against the test database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

from agentic_django import recovery
from agentic_django.models import AgentApproval, AgentRun, AgentSession, AgentToolCall
from agentic_django.services import approve_tool_call, reject_tool_call
from tests.core.conftest import worker_died
from tests.core.kill_registry import ANSWER
from tests.core.test_worker import database_url
from tests.waiting import PATIENCE, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

QUEUE = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
# A worker process executing one run with the kill registry's agents.
WORKER = """
import sys, django
django.setup()
from django.conf import settings
settings.AGENTIC_DJANGO_AGENT_REGISTRY = "tests.core.kill_registry.get_agent_registry"
settings.AGENTIC_DJANGO_ENABLE_EVENTS = True
from agentic_django.execution import execute
print("run ended", execute(sys.argv[1]), flush=True)
"""


def start_worker(run: AgentRun, log: Path, *, hang: bool) -> subprocess.Popen:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url(),
        "OPENAI_API_KEY": "",
        "OPENAI_AGENTS_DISABLE_TRACING": "1",
        "TOOL_LOG": str(log),
    }
    env.pop("HANG_TOOLS", None)
    if hang:
        env["HANG_TOOLS"] = "1"
    return subprocess.Popen(  # noqa: S603 (this interpreter, a fixed script)
        [sys.executable, "-c", WORKER, str(run.pk)],
        cwd=settings.BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=PATIENCE)
    assert process.returncode == 0 and "run ended" in output, output[-3000:]
    return output


def world(log: Path) -> list[tuple[str, str]]:
    """What the outside world saw: (tool, idempotency key) for every call that started."""
    return [tuple(line.split()) for line in log.read_text().splitlines()]


def test_a_worker_killed_inside_its_tools_never_repeats_a_call_silently(user, settings, tmp_path):
    settings.TASKS = QUEUE  # the test plays the task queue; the workers are real processes
    log = tmp_path / "world.log"
    log.touch()
    run = AgentRun.objects.create(
        session=AgentSession.objects.create(owner=user, session_key="k"),
        owner=user,
        agent_key="tickets",
        input_payload="two tickets at $5, and where is order 7?",
    )

    # 1. The worker is killed while all three calls are inside their tools.
    first = start_worker(run, log, hang=True)
    try:
        wait_for(
            lambda: AgentToolCall.objects.filter(run=run).count() == 3 and len(world(log)) == 3,
            "three calls inside their tools",
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = world(log)
    charge_keys = [key for tool, key in before if tool == "charge"]
    assert len(set(charge_keys)) == 2  # two equal calls, two keys

    # 2. Its lease runs out; the retry asks about the charges before anything else.
    worker_died(run)
    assert recovery.recover_runs(mode="requeue") == 1
    finished(start_worker(run, log, hang=False))
    run.refresh_from_db()
    assert run.status == "awaiting_approval"
    assert world(log) == before  # nothing ran again, not even the repeatable lookup
    questions = run.pending_approvals()
    assert [(q.kind, q.tool_name) for q in questions] == [("in_doubt", "charge")] * 2
    assert all(q.call_id.endswith("@1") for q in questions)

    # 3. The user: the first charge did not go through (run it again), the second did.
    rerun, done = sorted(questions, key=lambda q: q.call_id)  # "first-…" < "second-…"
    assert approve_tool_call(run, rerun.call_id, user=user) is False
    assert reject_tool_call(run, done.call_id, message="Charged at 9:02.", user=user) is True
    finished(start_worker(run, log, hang=False))
    run.refresh_from_db()
    assert (run.status, run.final_output) == ("completed", ANSWER), run.error_detail
    after = world(log)[len(before) :]
    rerun_call = AgentToolCall.objects.get(run=run, call_id=rerun.call_id.split("@")[0])
    lookup_key = next(k for tool, k in before if tool == "lookup")
    assert rerun_call.idempotency_key in charge_keys  # the key it had when it was killed
    assert sorted(after) == sorted([("charge", rerun_call.idempotency_key), ("lookup", lookup_key)])
    outputs = [item.get("output") for item in run.session.items.values_list("payload", flat=True)]
    assert outputs.count("Charged at 9:02.") == 1 and outputs.count("charged 500") == 1
    assert AgentApproval.objects.filter(run=run, decision="pending").count() == 0
