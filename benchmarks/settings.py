"""Settings module of benchmark processes: the project's settings plus ``overrides``.

The base module is ``BENCH_BASE_SETTINGS`` (default ``config.settings``); ``BENCH_TASK_BACKEND``
picks immediate, database or rq; ``BENCH_DB_NAME`` points workers at the benchmark's database.
"""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ.setdefault("DJANGO_LOG_LEVEL", "WARNING")
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")

_base = importlib.import_module(os.environ.get("BENCH_BASE_SETTINGS", "config.settings"))
globals().update({name: getattr(_base, name) for name in dir(_base) if name.isupper()})

from benchmarks.overrides import BACKEND_APPS, available_backends, overrides  # noqa: E402

_backend = os.environ.get("BENCH_TASK_BACKEND", "immediate")
globals().update(overrides(globals(), task_backend=_backend))

INSTALLED_APPS = list(INSTALLED_APPS)  # noqa: F821 - copied from the base settings above
for _name in available_backends():
    if BACKEND_APPS[_name] not in INSTALLED_APPS:
        INSTALLED_APPS.insert(
            INSTALLED_APPS.index("agentic_django.apps.AgenticDjangoConfig"), BACKEND_APPS[_name]
        )

if os.environ.get("BENCH_DB_NAME"):
    DATABASES["default"]["NAME"] = os.environ["BENCH_DB_NAME"]  # noqa: F821
# django_rq is installed for the worker benchmark even when the project uses another backend.
RQ_QUEUES = {"default": {"URL": REDIS_URL, "DEFAULT_TIMEOUT": 900}}  # noqa: F821
