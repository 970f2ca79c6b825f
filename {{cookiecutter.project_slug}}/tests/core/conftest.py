"""Fixtures for the agentic_django engine tests: a ScriptedModel-backed registry, helpers to
build scripted agents, and automatic skipping of ``@pytest.mark.postgres`` tests elsewhere."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from agentic_django import recovery
from agentic_django.models import AgentRun, AgentSession
from tests.core import registry

REGISTRY_PATH = "tests.core.registry.get_agent_registry"


@pytest.fixture(autouse=True)
def _skip_unless_postgres(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("postgres") and connection.vendor != "postgresql":
        pytest.skip("needs DATABASE_URL pointing at PostgreSQL")


@pytest.fixture(autouse=True)
def _core_settings(settings: Any) -> Iterator[None]:
    settings.AGENTIC_DJANGO_AGENT_REGISTRY = REGISTRY_PATH
    settings.AGENTIC_DJANGO_DEFAULT_AGENT_KEY = "demo"
    settings.AGENTIC_DJANGO_DEFAULT_RUN_OPTIONS = {"max_turns": 6}
    settings.AGENTIC_DJANGO_ENABLE_EVENTS = True
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = 4
    settings.AGENTIC_DJANGO_STARTUP_RECOVERY = "requeue"
    settings.AGENTIC_DJANGO_RUN_TIMEOUT = 60
    # Each test starts like a fresh process: startup recovery has not run yet.
    recovery.reset_startup_recovery()
    yield
    registry.FACTORIES.clear()


@dataclass
class Scripted:
    """A registered agent key and the ScriptedModel every run of it shares."""

    key: str
    model: Any
    tool_calls: list[tuple[str, Any]] = field(default_factory=list)


@pytest.fixture
def scripted_agent() -> Callable[..., Scripted]:
    """Register ``key`` -> an Agent whose model plays ``steps`` (shared across its runs)."""
    from agents import Agent
    from agents.testing import ScriptedModel

    def make(
        steps: Sequence[Any],
        *,
        key: str = "scripted",
        tools: Sequence[Any] = (),
        output_type: Any = None,
        name: str = "Scripted",
    ) -> Scripted:
        model = ScriptedModel(list(steps))
        options: dict[str, Any] = {"tools": list(tools)}
        if output_type is not None:
            options["output_type"] = output_type

        def build() -> Agent:
            return Agent(name=name, instructions="Test agent.", model=model, **options)

        registry.FACTORIES[key] = build
        return Scripted(key=key, model=model)

    return make


def text(reply: str, **usage: int) -> Any:
    """One model step answering ``reply`` (optionally with usage numbers)."""
    from agents.testing import ModelStep, assistant_message
    from agents.usage import Usage

    return ModelStep(output=[assistant_message(reply)], usage=Usage(**usage) if usage else Usage())


def call(tool: str, arguments: dict[str, Any], call_id: str = "call-1") -> Any:
    """One model step calling ``tool``."""
    from agents.testing import function_call

    return [function_call(tool, arguments, call_id=call_id)]


def used(input_tokens: int, output_tokens: int) -> Any:
    """What a model call reports having used: one request, these tokens."""
    from agents.usage import Usage

    return Usage(
        requests=1,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
    )


class Refunds:
    """A tool with a side effect (a refund) that needs approval, counting how often it really
    ran."""

    def __init__(self) -> None:
        from agents import function_tool

        self.done: list[str] = []
        self.tool = function_tool(self.refund, needs_approval=True)

    def refund(self, order: str) -> str:
        """Refund an order."""
        self.done.append(order)
        return f"refunded {order}"


@pytest.fixture
def refunds() -> Refunds:
    return Refunds()


def register(key: str, steps: Sequence[Any], tools: Sequence[Any] = ()) -> Any:
    """Register ``key`` -> an agent "Clerk" whose ScriptedModel plays ``steps``; the model."""
    from agents import Agent
    from agents.testing import ScriptedModel

    model = ScriptedModel(list(steps))
    registry.FACTORIES[key] = lambda: Agent(
        name="Clerk", instructions="Test.", model=model, tools=list(tools)
    )
    return model


def dies() -> Any:
    """A model step that kills the worker process (as SIGKILL would) when it is reached."""
    from agents.testing import ModelStep

    def kill(model_call: Any) -> Any:
        raise SystemExit("worker killed")

    return ModelStep.respond(kill)


def echo_steps(count: int) -> list[Any]:
    """Steps replying ``echo: <latest user message>``, to check what history each run saw."""
    from agents.testing import ModelStep, assistant_message

    def respond(model_call: Any) -> Any:
        items = model_call.input if isinstance(model_call.input, list) else []
        users = [i["content"] for i in items if isinstance(i, dict) and i.get("role") == "user"]
        return [assistant_message(f"echo: {users[-1] if users else model_call.input}")]

    return [ModelStep.respond(respond) for _ in range(count)]


def running_elsewhere(
    session: AgentSession, *, agent_key: str = "demo", text_input: str = "elsewhere"
) -> AgentRun:
    """A run claimed by a live worker in another process (lease valid for minutes)."""
    now = timezone.now()
    return AgentRun.objects.create(
        session=session,
        owner=session.owner,
        agent_key=agent_key,
        input_payload=text_input,
        status=AgentRun.Status.RUNNING,
        started_at=now,
        attempt=1,
        lease_expires_at=now + timedelta(minutes=5),
        heartbeat_at=now,
    )


def worker_died(run: AgentRun) -> None:
    """The worker holding ``run`` stopped renewing its lease, which has now expired."""
    AgentRun.objects.filter(pk=run.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
