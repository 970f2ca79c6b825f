"""The engine's documented example works verbatim against this project's own registry."""

import pytest

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_documented_example_runs_with_the_sample_registry(user):
    from agentic_django.models import AgentRun, AgentSession
    from agentic_django.services import enqueue_agent_run

    session, _ = AgentSession.objects.get_or_create(owner=user, session_key="k")
    run = AgentRun.objects.create(session=session, owner=user, agent_key="demo", input_payload="hi")
    enqueue_agent_run(str(run.id))  # safe inside a transaction: enqueues on commit
    run.refresh_from_db()

    assert run.status == "completed"
    assert run.final_output.startswith("Hello!")
    assert [item.payload["role"] for item in session.items.order_by("sequence")][:1] == ["user"]
