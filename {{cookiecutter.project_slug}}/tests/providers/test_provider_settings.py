"""Provider settings: read from the environment, checked at startup, and turned into the model
the sample agents use and the tracing they do."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest
from agents import OpenAIChatCompletionsModel, OpenAIResponsesModel
from django.conf import settings as django_settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from chat import providers
from chat.demo_model import DemoModel
from chat.providers import build_model

OLLAMA = "http://localhost:11434/v1"


@pytest.fixture(autouse=True)
def _no_provider(settings):
    settings.OPENAI_API_KEY = ""
    settings.OPENAI_BASE_URL = ""
    settings.OPENAI_API_MODE = "responses"
    settings.OPENAI_TIMEOUT = 60.0
    settings.OPENAI_MAX_RETRIES = 2
    settings.OPENAI_TRACING = None


@pytest.fixture
def tracing_calls(monkeypatch) -> list[tuple[str, object]]:
    """What configure_tracing asks of the Agents SDK and of the engine's tracing (recorded,
    not applied), with the SDK's own switch off unless a test sets it."""
    import agents  # configure_tracing imports it from the SDK when it runs

    from agentic_django import tracing

    calls: list[tuple[str, object]] = []
    monkeypatch.delenv("OPENAI_AGENTS_DISABLE_TRACING", raising=False)
    monkeypatch.setattr(
        agents, "set_tracing_export_api_key", lambda v: calls.append(("export_key", v))
    )
    monkeypatch.setattr(
        tracing,
        "install",
        lambda exporters=None: calls.append(("exporters", [type(e).__name__ for e in exporters])),
    )
    return calls


def test_settings_come_from_the_environment():
    environment = {
        **os.environ,
        "OPENAI_API_KEY": "sk-from-env",
        "OPENAI_BASE_URL": OLLAMA,
        "OPENAI_API_MODE": "chat_completions",
        "OPENAI_MODEL": "llama3.2",
        "OPENAI_TIMEOUT": "12.5",
        "OPENAI_MAX_RETRIES": "0",
        "OPENAI_TRACING": "false",
        "AGENTIC_DJANGO_RUN_TIMEOUT": "90",
    }
    result = subprocess.run(  # a fresh process: settings are read once, at startup
        [sys.executable, "manage.py", "diffsettings"],
        cwd=django_settings.BASE_DIR,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    lines = re.findall(
        r"(?m)^((?:OPENAI|AGENTIC_DJANGO_RUN)_\w+) = (.*?)(?:  ###)?$", result.stdout
    )

    assert {name: ast.literal_eval(value) for name, value in lines} == {
        "OPENAI_API_KEY": "sk-from-env",
        "OPENAI_BASE_URL": OLLAMA,
        "OPENAI_API_MODE": "chat_completions",
        "OPENAI_MODEL": "llama3.2",
        "OPENAI_TIMEOUT": 12.5,
        "OPENAI_MAX_RETRIES": 0,
        "OPENAI_TRACING": False,
        "AGENTIC_DJANGO_RUN_TIMEOUT": 90,
    }


def test_without_a_key_or_a_base_url_the_agents_answer_offline():
    assert isinstance(build_model(), DemoModel)


@pytest.mark.parametrize(
    ("mode", "model_class"),
    [("responses", OpenAIResponsesModel), ("chat_completions", OpenAIChatCompletionsModel)],
)
def test_a_base_url_needs_no_key(settings, mode, model_class):
    settings.OPENAI_BASE_URL = OLLAMA
    settings.OPENAI_API_MODE = mode
    settings.OPENAI_MODEL = "llama3.2"

    model = build_model()

    assert type(model) is model_class
    assert model.model == "llama3.2"
    client = providers.build_client()
    assert str(client.base_url) == f"{OLLAMA}/"
    assert client.api_key == providers.NO_KEY


def test_a_key_alone_talks_to_openai_with_the_configured_timeout_and_retries(settings):
    settings.OPENAI_API_KEY = "sk-test"
    settings.OPENAI_TIMEOUT = 30.0
    settings.OPENAI_MAX_RETRIES = 5

    client = providers.build_client()

    assert str(client.base_url) == "https://api.openai.com/v1/"
    assert client.api_key == "sk-test"
    assert (client.timeout.read, client.timeout.connect) == (30.0, providers.CONNECT_TIMEOUT)
    assert client.max_retries == 5


@pytest.mark.parametrize(
    ("key", "base_url", "tracing", "exports"),
    [
        ("sk-test", "", True, True),  # asked for, with OpenAI itself
        ("sk-test", "https://api.openai.com/v1", True, True),
        ("sk-test", "", None, False),  # not asked for
        ("sk-test", "https://api.openai.com/v1", None, False),
        ("sk-test", OLLAMA, None, False),  # another server: prompts stay there
        ("sk-test", OLLAMA, False, False),
        ("sk-test", OLLAMA, True, False),  # ...even when asked for
        ("sk-test", "https://llm.example.com/v1", True, False),
        ("sk-test", "", False, False),  # turned off
        ("", "", True, False),  # no key to export with: the demo model
    ],
)
def test_traces_go_to_openai_only_when_asked_for_and_talking_to_openai(
    settings, tracing_calls, key, base_url, tracing, exports
):
    settings.OPENAI_API_KEY = key
    settings.OPENAI_BASE_URL = base_url
    settings.OPENAI_TRACING = tracing

    build_model()

    assert providers.exports_traces() is exports
    if exports:
        assert tracing_calls == [("export_key", key), ("exporters", ["BatchTraceProcessor"])]
    else:
        assert tracing_calls == [("exporters", [])]  # the local record only


def test_the_sdks_own_switch_still_stops_the_export(settings, tracing_calls, monkeypatch):
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    settings.OPENAI_API_KEY = "sk-test"
    settings.OPENAI_TRACING = True

    build_model()

    assert tracing_calls == [("exporters", [])]


@pytest.mark.parametrize(
    ("setting", "value", "problem"),
    [
        ("OPENAI_API_MODE", "completions", "OPENAI_API_MODE must be one of responses, chat_"),
        ("OPENAI_BASE_URL", "localhost:11434/v1", "OPENAI_BASE_URL must be an http(s) URL"),
        ("OPENAI_TIMEOUT", 0.0, "OPENAI_TIMEOUT must be a positive number"),
        ("OPENAI_MAX_RETRIES", -1, "OPENAI_MAX_RETRIES must be 0 or more"),
    ],
)
@pytest.mark.django_db  # some of the project's other checks read the database
def test_bad_provider_settings_are_reported_at_startup(settings, setting, value, problem):
    settings.OPENAI_API_KEY = "sk-test"
    setattr(settings, setting, value)

    [error] = [message for message in checks.run_checks() if message.id == "chat.E001"]

    assert error.msg.startswith(problem)
    with pytest.raises(ImproperlyConfigured, match=setting):
        build_model()


@pytest.mark.django_db
def test_good_provider_settings_pass_the_checks(settings):
    settings.OPENAI_BASE_URL = OLLAMA
    settings.OPENAI_API_MODE = "chat_completions"

    assert [message for message in checks.run_checks() if message.id == "chat.E001"] == []
