"""Settings are validated in one place and reported by a system check at startup."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core.checks.registry import registry
from django.core.exceptions import ImproperlyConfigured

from agentic_django.checks import check_settings
from agentic_django.conf import Budgets, ModelPrice, RateLimit, get_config, parse_rate_limit


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


def test_an_unimportable_user_limits_callable_is_reported_at_startup(settings):
    settings.AGENTIC_DJANGO_BUDGETS = {"user_limits": "billing.plans.no_such_function"}
    errors = agentic_errors()
    assert len(errors) == 1
    assert errors[0].startswith("AGENTIC_DJANGO_BUDGETS['user_limits'] 'billing.plans.")


def test_an_rq_job_timeout_shorter_than_the_run_timeout_is_reported(settings):
    settings.TASKS = {"default": {"BACKEND": "django_tasks_rq.RQBackend", "QUEUES": ["default"]}}
    settings.AGENTIC_DJANGO_RUN_TIMEOUT = 300
    settings.RQ_QUEUES = {"default": {"URL": "redis://localhost:6379/0", "DEFAULT_TIMEOUT": 300}}
    (warning,) = check_settings()
    assert warning.id == "agentic_django.W001"
    assert "DEFAULT_TIMEOUT'] to at least 310" in warning.hint
    settings.RQ_QUEUES = {"default": {"URL": "redis://localhost:6379/0", "DEFAULT_TIMEOUT": 310}}
    assert check_settings() == []


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("AGENTIC_DJANGO_BUDGETS", [], "BUDGETS must be a dict, got list"),
        ("AGENTIC_DJANGO_BUDGETS", {"daily_cost": 5}, "unknown keys ['daily_cost']"),
        ("AGENTIC_DJANGO_BUDGETS", {"period": "week"}, "['period'] must be one of day, month"),
        ("AGENTIC_DJANGO_BUDGETS", {"user_cost": -1}, "['user_cost'] must be zero or more"),
        ("AGENTIC_DJANGO_BUDGETS", {"run_cost": "-0.01"}, "['run_cost'] must be zero or more"),
        ("AGENTIC_DJANGO_BUDGETS", {"user_cost": "NaN"}, "['user_cost'] must be zero or more"),
        ("AGENTIC_DJANGO_BUDGETS", {"user_cost": "lots"}, "must be an amount in US dollars"),
        ("AGENTIC_DJANGO_BUDGETS", {"run_cost": True}, "must be an amount in US dollars"),
        ("AGENTIC_DJANGO_BUDGETS", {"user_tokens": 0}, "['user_tokens'] must be a positive"),
        ("AGENTIC_DJANGO_BUDGETS", {"run_tokens": 1.5}, "['run_tokens'] must be a positive"),
        ("AGENTIC_DJANGO_BUDGETS", {"warn_at": 0}, "['warn_at'] must be a fraction"),
        ("AGENTIC_DJANGO_BUDGETS", {"warn_at": 1.5}, "['warn_at'] must be a fraction"),
        ("AGENTIC_DJANGO_BUDGETS", {"warn_at": "0.8"}, "['warn_at'] must be a fraction"),
        ("AGENTIC_DJANGO_BUDGETS", {"warn_at": True}, "['warn_at'] must be a fraction"),
        ("AGENTIC_DJANGO_BUDGETS", {"on_exceeded": "stop"}, "must be 'pause' or 'fail'"),
        ("AGENTIC_DJANGO_BUDGETS", {"user_limits": "plans"}, "must be a dotted path"),
        ("AGENTIC_DJANGO_MODEL_PRICES", ["my-llm"], "MODEL_PRICES must be a dict, got list"),
        ("AGENTIC_DJANGO_MODEL_PRICES", {"": {"input": 1, "output": 1}}, "must be model names"),
        ("AGENTIC_DJANGO_MODEL_PRICES", {"my-llm": 3}, "must be a dict with 'input' and 'output'"),
        ("AGENTIC_DJANGO_MODEL_PRICES", {"my-llm": {"input": 1}}, "with 'input' and 'output'"),
        (
            "AGENTIC_DJANGO_MODEL_PRICES",
            {"my-llm": {"input": 1, "output": 2, "cache_read": 0.1}},
            "['my-llm'] has unknown keys ['cache_read']",
        ),
        (
            "AGENTIC_DJANGO_MODEL_PRICES",
            {"my-llm": {"input": None, "output": 2}},
            "['my-llm']['input'] must be an amount in US dollars per million tokens",
        ),
        (
            "AGENTIC_DJANGO_MODEL_PRICES",
            {"my-llm": {"input": 1, "output": "1e400"}},
            "['my-llm']['output'] must be at most 10000 US dollars",
        ),
        (
            "AGENTIC_DJANGO_MODEL_PRICES",
            {"my-llm": {"input": -1, "output": 2}},
            "['my-llm']['input'] must be zero or more US dollars",
        ),
        (
            "AGENTIC_DJANGO_MODEL_PRICES",
            {"my-llm": {"input": 1, "output": "free"}},
            "['my-llm']['output'] must be an amount in US dollars",
        ),
    ],
)
def test_invalid_budgets_and_prices_are_reported_clearly(settings, name, value, fragment):
    setattr(settings, name, value)
    errors = agentic_errors()
    assert len(errors) == 1
    assert name in errors[0]
    assert fragment in errors[0]
    with pytest.raises(ImproperlyConfigured, match=name):
        get_config()


def test_budgets_and_prices_are_parsed_to_exact_decimals(settings):
    settings.AGENTIC_DJANGO_BUDGETS = {
        "period": "day",
        "user_cost": "5.50",
        "run_cost": 0.1,
        "user_tokens": 100_000,
        "warn_at": 1,
        "on_exceeded": "fail",
        "user_limits": "tests.core.test_usage.plan_limits",
    }
    settings.AGENTIC_DJANGO_MODEL_PRICES = {
        "my-llm": {"input": "0.5", "output": 2},
        "my-cached-llm": {"input": 1.25, "output": 10, "cached_input": "0.125"},
    }
    assert agentic_errors() == []
    config = get_config()
    assert config.budgets == Budgets(
        period="day",
        user_cost=Decimal("5.50"),
        user_tokens=100_000,
        run_cost=Decimal("0.1"),  # the float's shortest repr, not 0.1000000000000000055...
        run_tokens=None,
        warn_at=1.0,
        on_exceeded="fail",
        user_limits="tests.core.test_usage.plan_limits",
    )
    assert config.budgets.any
    assert config.model_prices == {
        # Without a price for cached input, cached tokens cost what input does.
        "my-llm": ModelPrice(input=Decimal("0.5"), output=Decimal(2), cached_input=Decimal("0.5")),
        "my-cached-llm": ModelPrice(
            input=Decimal("1.25"), output=Decimal(10), cached_input=Decimal("0.125")
        ),
    }


def test_no_budgets_means_nothing_is_checked(settings):
    settings.AGENTIC_DJANGO_BUDGETS = None
    settings.AGENTIC_DJANGO_MODEL_PRICES = None
    assert agentic_errors() == []
    assert get_config().budgets == Budgets()
    assert not get_config().budgets.any
    assert get_config().model_prices == {}
    settings.AGENTIC_DJANGO_BUDGETS = {"run_tokens": 1}
    assert get_config().budgets.any
