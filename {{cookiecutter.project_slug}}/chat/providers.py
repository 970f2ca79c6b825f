"""The model behind the sample agents, chosen by settings (config/settings.py, from `.env`).

- No `OPENAI_API_KEY` and no `OPENAI_BASE_URL`: the offline `DemoModel`.
- Otherwise `OPENAI_MODEL` through the `openai` client: OpenAI itself, or any OpenAI-compatible
  server at `OPENAI_BASE_URL` (Ollama, vLLM, LiteLLM, ...), which may need no key. The server
  is spoken to with the Responses API or, for servers without it, Chat Completions
  (`OPENAI_API_MODE`). `OPENAI_TIMEOUT` bounds each wait for the server (for a stream: the
  silence between two chunks) and `OPENAI_MAX_RETRIES` retries 429s, 5xx and timeouts.
- Traces of runs go to OpenAI's dashboard only when `OPENAI_TRACING=True` and the provider is
  OpenAI itself, with a key: a prompt sent to your own server, or to the demo model, stays on
  this machine. `configure_tracing()` applies that to the Agents SDK; `build_model()` calls it,
  so it is in force before any sample agent runs.

The Agents SDK and the `openai` client load when a model is built (in a worker), not when
this module is imported: `manage.py check` (and `migrate`, which runs the checks) only reads
the settings here.
"""

from __future__ import annotations

import functools
import os
import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from agents import Model, ModelSettings
    from openai import AsyncOpenAI

API_MODES = ("responses", "chat_completions")
OPENAI_URL = "https://api.openai.com/v1"
# The openai client will not start without a key; servers that need none ignore this one.
NO_KEY = "no-key-needed"
CONNECT_TIMEOUT = 5.0


def uses_demo_model() -> bool:
    """True when no provider is configured: the agents answer offline."""
    return not (settings.OPENAI_API_KEY or settings.OPENAI_BASE_URL)


def talks_to_openai() -> bool:
    """True when requests go to OpenAI itself (no base URL, or OpenAI's own)."""
    base_url = settings.OPENAI_BASE_URL
    return not base_url or urlsplit(base_url).hostname == urlsplit(OPENAI_URL).hostname


def exports_traces() -> bool:
    """Whether traces of runs are sent to OpenAI: only when asked (OPENAI_TRACING=True), with
    a key, and when the runs talk to OpenAI itself."""
    return bool(settings.OPENAI_TRACING and settings.OPENAI_API_KEY and talks_to_openai())


def configure_tracing() -> None:
    """Apply `exports_traces()` to the Agents SDK (process-wide). The run inspector's own
    record of each run (`agentic_django.tracing`) stays on either way: it is kept in this
    project's database and sent nowhere."""
    from agents import set_tracing_export_api_key
    from agents.tracing.processors import default_processor

    from agentic_django import tracing

    # The SDK's own switch, OPENAI_AGENTS_DISABLE_TRACING, still stops the export.
    if exports_traces() and not sdk_tracing_disabled():
        set_tracing_export_api_key(settings.OPENAI_API_KEY)
        tracing.install(exporters=[default_processor()])
    else:
        tracing.install(exporters=[])


def sdk_tracing_disabled() -> bool:
    """Whether the environment turns the Agents SDK's tracing off."""
    return os.environ.get("OPENAI_AGENTS_DISABLE_TRACING", "").lower() in ("1", "true")


def problems() -> list[str]:
    """What is wrong with the provider settings (shown by `manage.py check`)."""
    found = []
    if settings.OPENAI_API_MODE not in API_MODES:
        found.append(
            f"OPENAI_API_MODE must be one of {', '.join(API_MODES)}, "
            f"got {settings.OPENAI_API_MODE!r}."
        )
    base_url = settings.OPENAI_BASE_URL
    if base_url and (urlsplit(base_url).scheme not in ("http", "https") or "://" not in base_url):
        found.append(
            f"OPENAI_BASE_URL must be an http(s) URL such as http://localhost:11434/v1, "
            f"got {base_url!r}."
        )
    if not settings.OPENAI_TIMEOUT > 0:
        found.append(f"OPENAI_TIMEOUT must be a positive number, got {settings.OPENAI_TIMEOUT!r}.")
    if settings.OPENAI_MAX_RETRIES < 0:
        found.append(f"OPENAI_MAX_RETRIES must be 0 or more, got {settings.OPENAI_MAX_RETRIES!r}.")
    return found


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every client of the process: building one loads the CA bundle,
    tens of milliseconds of CPU that each run would otherwise pay."""
    import httpx2

    return httpx2.create_ssl_context()


def build_client() -> AsyncOpenAI:
    """An `openai` client for the configured server, for one run."""
    from openai import AsyncOpenAI, Timeout

    timeout = Timeout(
        settings.OPENAI_TIMEOUT, connect=min(CONNECT_TIMEOUT, settings.OPENAI_TIMEOUT)
    )
    return AsyncOpenAI(
        api_key=settings.OPENAI_API_KEY or NO_KEY,
        base_url=settings.OPENAI_BASE_URL or OPENAI_URL,
        timeout=timeout,
        max_retries=settings.OPENAI_MAX_RETRIES,
        http_client=_http_client_class()(timeout=timeout, verify=tls_context()),
    )


@functools.cache
def _http_client_class() -> type:
    """The HTTP client of `build_client()`: its requests go through connections kept open
    for every run of a worker's event loop (``agentic_django.eventloop``), so a model call
    reuses one an earlier call opened instead of paying a new TCP and TLS handshake, a round
    trip or two to the provider each. Only the connections are shared: cookies, redirects and
    proxies stay the run's own client's, as before. A run with an event loop of its own (the
    immediate backend, a test) opens a connection per request and keeps none: its loop ends
    with it, and a connection kept open would outlive it."""
    import httpx2
    from openai import DefaultAsyncHttpxClient

    from agentic_django import eventloop

    # The openai client's own limits (1,000 connections, 100 kept open), as one client for the
    # whole process would have them, but an idle connection is given up after 4 s: servers
    # behind uvicorn (vLLM, LiteLLM, most FastAPI gateways) close one after 5 s, and a request
    # sent on a connection the server is closing fails (OPENAI_MAX_RETRIES sends it again).
    kept_limits = httpx2.Limits(
        max_connections=1000, max_keepalive_connections=100, keepalive_expiry=4.0
    )

    class LoopSharedTransport(httpx2.AsyncBaseTransport):
        """The connections of the running shared loop, else the run client's own."""

        def __init__(self, own: Any, verify: Any) -> None:
            self.own = own
            self.verify = verify

        async def handle_async_request(self, request: Any) -> Any:
            kept = eventloop.resource(KEPT_CONNECTIONS, self._kept, _close_kept)
            return await (kept or self.own).handle_async_request(request)

        def _kept(self) -> Any:
            return httpx2.AsyncHTTPTransport(verify=self.verify, limits=kept_limits)

        async def aclose(self) -> None:
            await self.own.aclose()

    class LoopSharedClient(DefaultAsyncHttpxClient):
        def __init__(self, *, verify: Any, **kwargs: Any) -> None:
            # Its own connections (used outside a shared loop) are never kept.
            no_keepalive = httpx2.Limits(max_keepalive_connections=0)
            super().__init__(limits=no_keepalive, verify=verify, **kwargs)
            # A proxy from the environment (HTTPS_PROXY) is a mount of its own and keeps
            # working through it, one connection per request.
            self._transport = LoopSharedTransport(self._transport, verify)

    return LoopSharedClient


# The shared loop's resource key of the kept connections (``_http_client_class``).
KEPT_CONNECTIONS = "chat.providers.kept_connections"


async def _close_kept(transport: Any) -> None:
    await transport.aclose()


def model_settings() -> ModelSettings:
    """Settings every sample agent's model calls use: a streamed Chat Completions answer
    carries its token usage only when asked (`include_usage`), and the usage ledger and
    budgets need it (the SDK asks by itself only when the server is OpenAI's)."""
    from agents import ModelSettings

    if not uses_demo_model() and settings.OPENAI_API_MODE == "chat_completions":
        return ModelSettings(include_usage=True)
    return ModelSettings()


def build_model() -> Model:
    """The model every sample agent uses: the configured provider, else the offline demo."""
    from agents import OpenAIChatCompletionsModel, OpenAIResponsesModel

    from chat.demo_model import DemoModel

    configure_tracing()
    if uses_demo_model():
        return DemoModel()
    found = problems()
    if found:
        raise ImproperlyConfigured(" ".join(found))
    model_class = (
        OpenAIResponsesModel
        if settings.OPENAI_API_MODE == "responses"
        else OpenAIChatCompletionsModel
    )
    return model_class(model=settings.OPENAI_MODEL, openai_client=build_client())
