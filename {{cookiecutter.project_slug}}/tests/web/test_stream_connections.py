"""A web process serves any number of run streams on a handful of database connections: one
that listens, and short reads on a few shared threads -- none held per stream or per request."""

from __future__ import annotations

import json

import pytest
from django.conf import settings
from django.db import connection
from django.test import Client
from django.urls import reverse

from agentic_django.models import AgentRun
from agentic_django.streams import READ_THREADS
from tests.waiting import wait_for
from tests.web.live import ClientLoop, StreamClient, get, held_connections, web_process

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

STREAMS = 50
GETS = 40
LISTENER = 1
# The pool's min_size in config/settings.py: what it keeps open when nothing uses it.
POOL_MIN_SIZE = 1


@pytest.fixture(autouse=True)
def _needs_postgres() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs DATABASE_URL pointing at PostgreSQL")


@pytest.fixture
def web(transactional_db):
    with web_process(
        settings.BASE_DIR,
        settings_module="tests.web.live_settings",
        database=connection.settings_dict,
        env={"SECRET_KEY": settings.SECRET_KEY},  # the session's signature must hold there
    ) as process:
        yield process


def test_many_streams_hold_one_listener_and_a_few_short_reads(web, user, make_run):
    run = make_run(user, status="running")
    client = Client()
    client.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    streams = [StreamClient() for _ in range(STREAMS)]
    counts: list[int] = []

    def count() -> int:
        counts.append(len(held_connections(web.application_name)))
        return counts[-1]

    with ClientLoop() as clients:
        for stream in streams:  # one request at a time: each stream gives its connection back
            clients.run(stream.open(web, reverse("agents:run-stream", args=[run.pk]), cookie))
            count()
        # Another process writes a delta: every stream shows it (from about one shared read).
        AgentRun.objects.filter(pk=run.pk).update(stream_text="Hello")

        def everyone_has_the_delta() -> bool:
            web.check()
            count()
            return all(stream.got("delta") for stream in streams)

        wait_for(everyone_has_the_delta, "the delta to reach every stream")
        held = held_connections(web.application_name)
        clients.run(_close(streams))

    hello = {"text": "Hello", "start": True}
    assert all(json.loads(stream.got("delta")[0].data) == hello for stream in streams)
    assert max(counts) <= LISTENER + READ_THREADS + 1, counts
    assert sum(query.startswith("LISTEN") for _, query in held) == LISTENER, held

    detail = reverse("agents:run-detail", args=[run.pk])
    assert all(get(web, detail, cookie) == 200 for _ in range(GETS))

    def only_the_pool_minimum_and_the_listener() -> bool:
        web.check()
        return count() <= POOL_MIN_SIZE + LISTENER

    wait_for(only_the_pool_minimum_and_the_listener, "the web process to give its connections back")


async def _close(streams: list[StreamClient]) -> None:
    for stream in streams:
        await stream.close()
