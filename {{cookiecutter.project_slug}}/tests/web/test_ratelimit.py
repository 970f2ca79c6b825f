"""AGENTIC_DJANGO_RATE_LIMIT: per user, 429 with Retry-After, atomic under concurrency."""

from __future__ import annotations

import json
import threading

import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse

from agentic_django.models import AgentRun
from tests.web.conftest import HTMX

CREATE = reverse("agents:run-create")


def _create(client, headers=None):
    return client.post(
        CREATE,
        data=json.dumps({"input": "hi", "session_key": "rl"}),
        content_type="application/json",
        headers=headers or {},
    )


@pytest.mark.django_db(transaction=True)
def test_over_the_limit_is_429_with_retry_after(api, settings):
    settings.AGENTIC_DJANGO_RATE_LIMIT = "2/m"
    assert _create(api).status_code == 201
    assert _create(api).status_code == 201

    response = _create(api)
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(response["Retry-After"]) <= 60
    assert AgentRun.objects.count() == 2

    htmx = api.post(CREATE, {"input": "hi", "session_key": "rl"}, headers=HTMX)
    assert htmx.status_code == 429
    assert htmx["Retry-After"]
    assert "Too many requests" in htmx.content.decode()


@pytest.mark.django_db(transaction=True)
def test_the_limit_is_per_user(api, settings, other_user):
    settings.AGENTIC_DJANGO_RATE_LIMIT = "1/h"
    assert _create(api).status_code == 201
    assert _create(api).status_code == 429

    other = Client()
    other.force_login(other_user)
    assert _create(other).status_code == 201


@pytest.mark.django_db(transaction=True)
def test_the_limit_holds_under_concurrent_requests(user, settings):
    settings.AGENTIC_DJANGO_RATE_LIMIT = "3/m"
    # Keep runs pending: the point is how many get created, not executing them.
    settings.TASKS = {"default": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
    threads_count = 8
    clients = []
    for _ in range(threads_count):
        client = Client()
        client.force_login(user)
        clients.append(client)
    barrier = threading.Barrier(threads_count, timeout=30)
    results: list[int | BaseException] = []
    lock = threading.Lock()

    def worker(client: Client) -> None:
        try:
            barrier.wait()
            result: int | BaseException = _create(client).status_code
        except BaseException as exc:  # reported below; a thread must not die silently
            result = exc
        finally:
            connection.close()
        with lock:
            results.append(result)

    threads = [threading.Thread(target=worker, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    statuses = [r for r in results if isinstance(r, int)]
    assert len(statuses) == threads_count, results
    assert sorted(statuses) == [201] * 3 + [429] * 5
    assert AgentRun.objects.filter(owner=user).count() == 3
