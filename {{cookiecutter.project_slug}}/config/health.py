"""Health endpoints: ``/healthz/`` (liveness) and ``/readyz/`` (readiness).

``/healthz/`` answers whether this web process serves requests and reaches its database: the
container health check (docker/healthcheck.py). ``/readyz/`` answers whether the deployment
can take and execute runs: the database, the broker (Redis, with the RQ backend) and at least
one live worker (any backend but the immediate one, which runs tasks inside the request). Both
are cheap (short timeouts, no import of the Agents SDK) and never cached; neither shows an
error's text (it could hold an address or a password): details go to the log.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

logger = logging.getLogger(__name__)

RQ_BACKEND = "django_tasks_rq.RQBackend"
# Backends that run tasks without a worker process.
WORKERLESS_BACKENDS = (
    "django.tasks.backends.immediate.ImmediateBackend",
    "django.tasks.backends.dummy.DummyBackend",
)
# Seconds a readiness check waits for the database (a pooled connection) or for Redis.
CHECK_TIMEOUT = 1.0
OK = "ok"


@require_GET
@never_cache
def healthz(request):
    """Liveness and database reachability, for container health checks."""
    try:
        _database()
    except Exception:
        return JsonResponse({"status": "error", "database": "unreachable"}, status=503)
    return JsonResponse({"status": "ok"})


@require_GET
@never_cache
def readyz(request):
    """Readiness: ``{"status": "ok", "checks": {...}}`` with 200 when every check is "ok", else
    503 with ``"status": "unavailable"`` and ``"failing"``, the names of the others."""
    backend = settings.TASKS.get("default", {}).get("BACKEND", "")
    checks = {"database": _check("database", _database)}
    if backend == RQ_BACKEND:
        checks["broker"] = _check("broker", _redis)
    if backend not in WORKERLESS_BACKENDS:
        database_up = checks["database"] == OK
        checks["workers"] = _check("workers", _workers, "error") if database_up else "unknown"
    failing = [name for name, state in checks.items() if state != OK]
    if failing:
        return JsonResponse(
            {"status": "unavailable", "checks": checks, "failing": failing}, status=503
        )
    return JsonResponse({"status": "ok", "checks": checks})


def _check(name, probe, failed="unreachable"):
    """``probe()``'s verdict; ``failed`` when it raises (logged, without a traceback)."""
    try:
        return probe()
    except Exception as exc:
        logger.warning("Readiness: %s check failed (%s: %s)", name, type(exc).__name__, exc)
        return failed


def _database():
    pool = getattr(connection, "pool", None)  # PostgreSQL with a connection pool
    if pool is not None and connection.connection is None:
        # A pooled connection within CHECK_TIMEOUT, rather than the pool's own (long) wait.
        pool.open()  # as Django does before it takes a connection (no-op once open)
        with pool.connection(timeout=CHECK_TIMEOUT) as pooled:
            pooled.execute("SELECT 1")
        return OK
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return OK


def _redis():
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=CHECK_TIMEOUT,
        socket_connect_timeout=CHECK_TIMEOUT,
        retry=Retry(NoBackoff(), 0),  # one try: a probe is asked again soon enough
    )
    try:
        client.ping()
    finally:
        client.close()
    return OK


def _workers():
    from agentic_django.lifecycle import live_workers

    return OK if live_workers().exists() else "no live worker"
