"""Settings are validated in one place and reported by a system check at startup."""

from __future__ import annotations

import pytest
from django.core.checks.registry import registry
from django.core.exceptions import ImproperlyConfigured

from agentic_django.checks import check_settings
from agentic_django.conf import RateLimit, get_config, parse_rate_limit


def agentic_errors() -> list[str]:
    return [message.msg for message in check_settings()]


def test_the_check_runs_at_startup():
    assert check_settings in registry.get_checks()


def test_valid_settings_pass_the_check():
    assert agentic_errors() == []
    config = get_config()
    assert config.concurrency_limit == 4
    assert config.default_run_options == {"max_turns": 6}
    assert config.cleanup_policy.batch_size > 0


def test_config_follows_setting_changes(settings):
    assert get_config().enable_events is True
    settings.AGENTIC_DJANGO_ENABLE_EVENTS = False
    assert get_config().enable_events is False


def test_concurrency_none_means_auto_and_workers_get_slots(settings):
    settings.AGENTIC_DJANGO_CONCURRENCY_LIMIT = None
    assert get_config().concurrency_limit is None
    assert get_config().worker_concurrency == 50
    settings.AGENTIC_DJANGO_WORKER_CONCURRENCY = 0
    assert "AGENTIC_DJANGO_WORKER_CONCURRENCY" in " ".join(agentic_errors())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20/m", RateLimit(20, 60)),
        ("100/h", RateLimit(100, 3600)),
        ("5/10s", RateLimit(5, 10)),
        ("3 / 2 minutes", RateLimit(3, 120)),
        ("1000/day", RateLimit(1000, 86400)),
    ],
)
def test_rate_limit_parsing(value, expected):
    assert parse_rate_limit(value) == expected
    assert parse_rate_limit(None) is None


@pytest.mark.parametrize("value", ["20/ms", "5/0s", "0/m", "20/mm", "20/", "/m", "20/week", 20])
def test_rate_limits_are_parsed_strictly(value):
    with pytest.raises(ImproperlyConfigured, match="must look like '20/m'"):
        parse_rate_limit(value)


def test_none_disables_the_input_limits(settings):
    settings.AGENTIC_DJANGO_MAX_INPUT_BYTES = None
    settings.AGENTIC_DJANGO_MAX_INPUT_ITEMS = None
    assert agentic_errors() == []
    assert (get_config().max_input_bytes, get_config().max_input_items) == (None, None)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("AGENTIC_DJANGO_STARTUP_RECOVERY", "restart", "must be one of requeue, fail, ignore"),
        ("AGENTIC_DJANGO_RATE_LIMIT", "lots", "must look like '20/m'"),
        ("AGENTIC_DJANGO_CONCURRENCY_LIMIT", 0, "must be a positive integer or None"),
        ("AGENTIC_DJANGO_MAX_INPUT_BYTES", "20kb", "must be a positive integer"),
        ("AGENTIC_DJANGO_MAX_INPUT_ITEMS", -1, "must be a positive integer"),
        ("AGENTIC_DJANGO_ENABLE_EVENTS", "yes", "must be True or False"),
        ("AGENTIC_DJANGO_DEFAULT_RUN_OPTIONS", {"model": "x"}, "unsupported keys ['model']"),
        ("AGENTIC_DJANGO_DEFAULT_RUN_OPTIONS", {"max_turns": 500}, "max_turns must be"),
        ("AGENTIC_DJANGO_CLEANUP_POLICY", {"event_days": 3}, "unknown keys ['event_days']"),
        ("AGENTIC_DJANGO_CLEANUP_POLICY", {"runs_statuses": ["running"]}, "runs_statuses"),
        ("AGENTIC_DJANGO_CLEANUP_POLICY", {"batch_size": 0}, "batch_size'] must be"),
        ("AGENTIC_DJANGO_AGENT_REGISTRY", "registry", "must be a dotted path"),
        ("AGENTIC_DJANGO_DEFAULT_AGENT_KEY", "", "must be a non-empty string"),
        ("AGENTIC_DJANGO_RUN_TIMEOUT", 0, "AGENTIC_DJANGO_RUN_TIMEOUT must be"),
        ("AGENTIC_DJANGO_LEASE_SECONDS", 1, "at least 5 seconds"),
        ("AGENTIC_DJANGO_WORKER_CONCURRENCY", "50", "WORKER_CONCURRENCY must be"),
        ("AGENTIC_DJANGO_WORKER_SHUTDOWN_GRACE", -1, "WORKER_SHUTDOWN_GRACE must be"),
        ("AGENTIC_DJANGO_WORKER_SHUTDOWN_GRACE", True, "WORKER_SHUTDOWN_GRACE must be"),
        ("AGENTIC_DJANGO_SESSION_SERIALIZER", "json", "must be a dotted path"),
    ],
)
def test_invalid_settings_are_reported_clearly(settings, name, value, fragment):
    setattr(settings, name, value)
    errors = agentic_errors()
    assert len(errors) == 1
    assert fragment in errors[0]
    with pytest.raises(ImproperlyConfigured, match="AGENTIC_DJANGO_"):
        get_config()


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("AGENTIC_DJANGO_AGENT_REGISTRY", "no_such_module.registry.get_agent_registry"),
        ("AGENTIC_DJANGO_AGENT_REGISTRY", "tests.core.registry.no_such_function"),
        ("AGENTIC_DJANGO_SESSION_SERIALIZER", "agentic_django.sessions.NoSuchSerializer"),
        ("AGENTIC_DJANGO_SESSION_SERIALIZER", "no_such_module.Serializer"),
    ],
)
def test_unimportable_paths_are_reported_at_startup(settings, name, path):
    setattr(settings, name, path)
    errors = agentic_errors()
    assert len(errors) == 1
    assert errors[0].startswith(f"{name} {path!r} cannot be imported")


def test_an_rq_job_timeout_shorter_than_the_run_timeout_is_reported(settings):
    settings.TASKS = {"default": {"BACKEND": "django_tasks_rq.RQBackend", "QUEUES": ["default"]}}
    settings.AGENTIC_DJANGO_RUN_TIMEOUT = 300
    settings.RQ_QUEUES = {"default": {"URL": "redis://localhost:6379/0", "DEFAULT_TIMEOUT": 300}}
    (warning,) = check_settings()
    assert warning.id == "agentic_django.W001"
    assert "DEFAULT_TIMEOUT'] to at least 310" in warning.hint
    settings.RQ_QUEUES = {"default": {"URL": "redis://localhost:6379/0", "DEFAULT_TIMEOUT": 310}}
    assert check_settings() == []
