"""Project settings: one module, configured from the environment (12-factor).

Local values live in `.env` (git-ignored); `.env.example` documents every variable.
"""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

BASE_DIR = Path(__file__).resolve().parent.parent
PROJECT_NAME = "{{ cookiecutter.project_name }}"

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")

SECRET_KEY = env("SECRET_KEY")
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
{%- if cookiecutter.task_backend == "database" %}
    "django_tasks_db",
{%- elif cookiecutter.task_backend == "rq" %}
    "django_rq",
{%- endif %}
    "agentic_django.apps.AgenticDjangoConfig",
    "chat",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Database unreachable: 503 with Retry-After (JSON, htmx fragment or page), not 500.
    "agentic_django.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.csp",
                "chat.context_processors.project",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
# No connection outlives its request or its use: under ASGI every request runs in a thread of
# its own, and a connection kept by a thread that is gone would stay open, unused, until the
# database runs out of them. PostgreSQL connections come from a pool per process instead, so
# a process never holds more than DATABASE_POOL_SIZE, whatever its load (see the README).
DATABASES["default"]["CONN_MAX_AGE"] = 0
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    from agentic_django.db import check_pooled_connection

    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": env.int("DATABASE_POOL_SIZE", default=10),
        # A process that needs a connection waits this long for one before it errors.
        "timeout": env.float("DATABASE_POOL_TIMEOUT", default=20.0),
        # A connection the server dropped while it waited in the pool (a restart, a failover)
        # is replaced before use, instead of failing the first query given to it.
        "check": check_pooled_connection,
    }
elif DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web process read while a worker writes; IMMEDIATE avoids lock upgrades.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:index"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}

CACHES = {"default": env.cache("CACHE_URL", default="locmemcache://")}

# Agents (see chat/registry.py) and their model (chat/providers.py). Neither OPENAI_API_KEY nor
# OPENAI_BASE_URL set: the offline demo model answers.
OPENAI_API_KEY = env("OPENAI_API_KEY", default="")
# Any OpenAI-compatible server, e.g. http://localhost:11434/v1 (Ollama); it may need no key.
OPENAI_BASE_URL = env("OPENAI_BASE_URL", default="")
OPENAI_API_MODE = env("OPENAI_API_MODE", default="responses")  # or chat_completions
OPENAI_MODEL = env("OPENAI_MODEL", default="gpt-4.1-mini")
# Seconds to wait for the server: for an answer, and between two chunks of a stream.
OPENAI_TIMEOUT = env.float("OPENAI_TIMEOUT", default=60.0)
OPENAI_MAX_RETRIES = env.int("OPENAI_MAX_RETRIES", default=2)  # on 429, 5xx and timeouts
# True: send traces of runs to OpenAI's dashboard (only with a key and OpenAI as the provider).
OPENAI_TRACING = env.bool("OPENAI_TRACING", default=None)
AGENTIC_DJANGO_AGENT_REGISTRY = "chat.registry.get_agent_registry"
AGENTIC_DJANGO_DEFAULT_AGENT_KEY = "assistant"
AGENTIC_DJANGO_DEFAULT_RUN_OPTIONS = {"max_turns": 6}
# Unset: the slots of the live workers (see the README's sizing notes).
AGENTIC_DJANGO_CONCURRENCY_LIMIT = env.int("AGENTIC_DJANGO_CONCURRENCY_LIMIT", default=None)
# Runs one worker process executes at once: runs wait on model providers nearly all the time,
# so one process holds many (a thread each; database connections come from its pool).
AGENTIC_DJANGO_WORKER_CONCURRENCY = env.int("AGENTIC_DJANGO_WORKER_CONCURRENCY", default=50)
# Seconds a stopping worker lets its runs finish; the rest are retried by another worker.
AGENTIC_DJANGO_WORKER_SHUTDOWN_GRACE = env.int("AGENTIC_DJANGO_WORKER_SHUTDOWN_GRACE", default=25)
AGENTIC_DJANGO_ENABLE_EVENTS = env.bool("AGENTIC_DJANGO_ENABLE_EVENTS", default=True)
AGENTIC_DJANGO_RATE_LIMIT = env("AGENTIC_DJANGO_RATE_LIMIT", default="20/m")
AGENTIC_DJANGO_MAX_INPUT_BYTES = 20_000
AGENTIC_DJANGO_MAX_INPUT_ITEMS = 20
AGENTIC_DJANGO_STARTUP_RECOVERY = env("AGENTIC_DJANGO_STARTUP_RECOVERY", default="requeue")
# What a new message does to its conversation's run in progress, unless the request says:
# enqueue, reject, interrupt or rollback (the chat always sends interrupt).
AGENTIC_DJANGO_MULTITASK_STRATEGY = env("AGENTIC_DJANGO_MULTITASK_STRATEGY", default="enqueue")
AGENTIC_DJANGO_MAX_TURNS = 20  # cap on the max_turns a caller may request
# Seconds a run may take in all (model calls, tools, retries) before it fails and frees its
# worker; keep it below the task backend's own job timeout.
AGENTIC_DJANGO_RUN_TIMEOUT = env.int("AGENTIC_DJANGO_RUN_TIMEOUT", default=300)
# Attempts a run gets in all: a run whose worker dies this many times fails instead of
# being retried (a tool that exhausts memory must not take down workers forever).
AGENTIC_DJANGO_MAX_ATTEMPTS = env.int("AGENTIC_DJANGO_MAX_ATTEMPTS", default=3)
# Seconds a run paused on tool calls that need approval waits for a decision, then fails.
AGENTIC_DJANGO_APPROVAL_TIMEOUT = env.int("AGENTIC_DJANGO_APPROVAL_TIMEOUT", default=86_400)
# A run whose worker stops renewing its lease this long is recoverable.
AGENTIC_DJANGO_LEASE_SECONDS = env.int("AGENTIC_DJANGO_LEASE_SECONDS", default=60)
AGENTIC_DJANGO_CLEANUP_POLICY = {
    "events_days": 7,
    "runs_days": 30,
    "runs_statuses": ["completed", "failed", "cancelled"],
    "sessions_days": 90,
    "sessions_require_empty": True,
    "usage_days": None,  # the usage ledger (billing data) outlives its runs: kept
    "trace_days": env.int("AGENTIC_DJANGO_TRACE_DAYS", default=30),  # the run inspector's steps
    "batch_size": 500,
}
# The run inspector (README: "Inspecting runs"): each run's trace -- its agents, model calls,
# tool calls, handoffs -- kept in this database, whatever the provider; nothing is sent anywhere.
AGENTIC_DJANGO_TRACING = {
    "enabled": env.bool("AGENTIC_DJANGO_TRACING", default=True),
    # False: timings, names, tokens and errors only, no inputs or outputs.
    "include_sensitive_data": env.bool("AGENTIC_DJANGO_TRACE_SENSITIVE_DATA", default=True),
}
# Costs and budgets (README: "Costs and budgets"). Every model call is priced in the usage
# ledger; caps (US dollars and/or tokens, unset = none) are checked before every model call.
# Periods are calendar days or months in TIME_ZONE. A run that reaches a cap pauses
# ("budget_exceeded") and goes on once the cap is raised or the period rolls over.
AGENTIC_DJANGO_BUDGETS = {
    "period": env("AGENTIC_DJANGO_BUDGET_PERIOD", default="month"),
    "user_cost": env("AGENTIC_DJANGO_USER_BUDGET", default=None),
    "user_tokens": env.int("AGENTIC_DJANGO_USER_TOKEN_BUDGET", default=None),
    "run_cost": env("AGENTIC_DJANGO_RUN_BUDGET", default=None),
    "run_tokens": env.int("AGENTIC_DJANGO_RUN_TOKEN_BUDGET", default=None),
    "warn_at": 0.8,
    "on_exceeded": "pause",
}
# Prices (US dollars per million tokens) of models the maintained price table (genai-prices)
# does not know, e.g. a self-hosted one; the offline demo model is free.
AGENTIC_DJANGO_MODEL_PRICES = {"demo": {"input": 0, "output": 0}}

# Background tasks (Django 6 tasks).
REDIS_URL = env("REDIS_URL", default="redis://localhost:6379/0")
{%- if cookiecutter.task_backend == "rq" %}
TASKS = {"default": {"BACKEND": "django_tasks_rq.RQBackend", "QUEUES": ["default"]}}
# RQ kills a job after DEFAULT_TIMEOUT: it must outlive the run timeout (a checked rule).
RQ_QUEUES = {"default": {"URL": REDIS_URL, "DEFAULT_TIMEOUT": AGENTIC_DJANGO_RUN_TIMEOUT + 120}}
# Preloads the Agents SDK in the parent and sweeps for dead runs (agentic_django.workers.rq);
# `manage.py agentic_django_worker` uses it, so does a plain `rqworker`.
RQ = {"WORKER_CLASS": "agentic_django.workers.rq.RQWorker"}
{%- elif cookiecutter.task_backend == "database" %}
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default"]}}
{%- else %}
# Runs tasks inside the request: for development and tests only.
TASKS = {"default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}}
{%- endif %}

# Strict Content Security Policy: no inline scripts or styles, everything served locally.
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF],
    "img-src": [CSP.SELF, "data:"],
    "connect-src": [CSP.SELF],
    "font-src": [CSP.SELF],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.SELF],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
}

# Secure defaults whenever DEBUG is off.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^healthz/$", r"^readyz/$"]
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
SESSION_COOKIE_HTTPONLY = True
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=not DEBUG)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

# LOG_FORMAT=json: one JSON object per line (time, level, logger, message, exc_info) for log
# collectors; text (the default): one line each. Either way, a line logged while a run executes
# carries its run_id, attempt, session and trace_id (agentic_django.logcontext).
LOG_FORMAT = env("LOG_FORMAT", default="text")
if LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be text or json, not {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"run": {"()": "agentic_django.logcontext.ContextFilter"}},
    "formatters": {
        "text": {
            "()": "agentic_django.logcontext.TextFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
        },
        "json": {"()": "agentic_django.logcontext.JsonFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["run"]}
    },
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django": {"level": env("DJANGO_LOG_LEVEL", default="INFO"), "propagate": True},
        # Lines that runserver and uvicorn would otherwise print in their own formats.
        "django.server": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "uvicorn": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "uvicorn.access": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
