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

from agents import Model, ModelBehaviorError
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
    """``model`` as ``agent`` calls it in the metered run (the SDK resolves a model for each
    call, a new one for a model given by name: so is its wrapper)."""
    if isinstance(model, MeteredModel):
        return model
    return MeteredModel(model, meter, getattr(agent, "name", "") or "")


# The events that end a streamed call with its response, and so its usage: a call cut short
# (its output tokens used up, a content filter) was paid for all the same.
TERMINAL_EVENTS = {"response.completed", "response.incomplete", "response.failed"}
# What the SDK's error says when a call it did not stream ended so (it keeps no usage).
TERMINAL_FAILURES = ("`response.incomplete`", "`response.failed`")


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
        try:
            response = await self._inner.get_response(*args, **kwargs)
        except ModelBehaviorError as exc:
            if any(failure in str(exc) for failure in TERMINAL_FAILURES):
                # Answered and paid for, but the SDK kept no usage: a call of unknown cost.
                await self._meter.after_call(
                    self._agent_name, self._model_name, self._provider, None
                )
            raise
        usage = getattr(response, "usage", None)
        await self._meter.after_call(self._agent_name, self._model_name, self._provider, usage)
        return response

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        await self._meter.before_call()
        stream = self._inner.stream_response(*args, **kwargs)
        try:
            async for event in stream:
                if getattr(event, "type", None) in TERMINAL_EVENTS:
                    # Noted before the run sees the event: it may stop reading right there
                    # (a cancel, a lost lease, a timeout, an error at the end of the call).
                    usage = getattr(getattr(event, "response", None), "usage", None)
                    self._meter.answered(self._agent_name, self._model_name, self._provider, usage)
                yield event
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
