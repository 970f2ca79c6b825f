"""Every model call of a run through its ``UsageMeter``: the run's own and those of the agents
it runs in turn -- an agent used as a tool (``Agent.as_tool``), a ``Runner.run`` inside a
tool. The run's hooks see only its own calls; the model every call goes to is resolved by one
function of the SDK, which ``install`` wraps: while a run's meter is active (in the run's
context, which its tools and their nested runs inherit), the model comes back wrapped in a
``MeteredModel`` that checks the budgets before the call and records the call after it.

Imports the Agents SDK: only for workers (``execution``), never on a request path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from agents import Model
from agents.run_internal import run_loop
from django.core.exceptions import ImproperlyConfigured

from agentic_django.usage import UsageMeter, model_of

_current: ContextVar[UsageMeter | None] = ContextVar("agentic_django_usage_meter", default=None)
_WRAPPED = "_agentic_django_metered"


def install() -> None:
    """Wrap the SDK's model resolution (once per process)."""
    resolve = getattr(run_loop, "get_model", None)
    if resolve is None:
        # Runs must not go unmetered: a budget would stop nothing.
        raise ImproperlyConfigured(
            "This openai-agents version resolves models elsewhere: agentic_django cannot meter "
            "model calls (it needs openai-agents 0.24.0)."
        )
    if getattr(resolve, _WRAPPED, False):
        return

    def get_model(agent: Any, run_config: Any) -> Model:
        model = resolve(agent, run_config)
        meter = _current.get()
        return model if meter is None else metered(meter, model, agent)

    setattr(get_model, _WRAPPED, True)
    run_loop.get_model = get_model


@contextmanager
def metering(meter: UsageMeter) -> Iterator[None]:
    """Meter every model call made in this context (and the tasks it starts) meanwhile."""
    install()
    token = _current.set(meter)
    try:
        yield
    finally:
        _current.reset(token)


def metered(meter: UsageMeter, model: Model, agent: Any) -> Model:
    """``model`` as ``agent`` calls it in the metered run (one wrapper each, kept)."""
    if isinstance(model, MeteredModel):
        return model
    name = getattr(agent, "name", "") or ""
    key = (id(model), name)
    wrapper = meter.models.get(key)
    if wrapper is None:
        wrapper = meter.models[key] = MeteredModel(model, meter, name)
    return wrapper


class MeteredModel(Model):
    """A model that asks the meter before each call and tells it what the call used.

    Anything else is the wrapped model's (``__getattr__``)."""

    def __init__(self, model: Model, meter: UsageMeter, agent_name: str) -> None:
        self._inner = model
        self._meter = meter
        self._agent_name = agent_name
        self._model_name, self._provider = model_of(model)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    async def get_response(self, *args: Any, **kwargs: Any) -> Any:
        await self._meter.before_call()
        response = await self._inner.get_response(*args, **kwargs)
        usage = getattr(response, "usage", None)
        await self._meter.after_call(self._agent_name, self._model_name, self._provider, usage)
        return response

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        await self._meter.before_call()
        stream = self._inner.stream_response(*args, **kwargs)
        completed = None
        try:
            async for event in stream:
                if getattr(event, "type", None) == "response.completed":
                    completed = event
                yield event
            if completed is not None:
                usage = getattr(getattr(completed, "response", None), "usage", None)
                self._meter.answered(self._agent_name, self._model_name, self._provider, usage)
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def get_retry_advice(self, request: Any) -> Any:
        return self._inner.get_retry_advice(request)

    async def close(self) -> None:
        await self._inner.close()

    async def _cleanup_on_run_end(self, owner: object) -> None:
        await self._inner._cleanup_on_run_end(owner)
