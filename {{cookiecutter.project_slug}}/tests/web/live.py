"""A real web process -- uvicorn, as compose runs it -- on a database, many clients of its run
streams in one event loop over plain sockets, and the database connections the process holds
(PostgreSQL's ``pg_stat_activity``, by the ``application_name`` its ``DATABASE_URL`` gives it).

Used by tests/web/test_stream_connections.py and by the template's stream benchmark; nothing
here needs pytest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

# Long enough for a loaded machine; a process that died is noticed at once.
TIMEOUT = 60.0


@dataclass
class WebProcess:
    """The process, where it listens, and the name its database connections carry."""

    popen: subprocess.Popen[bytes]
    host: str
    port: int
    application_name: str

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"the web process exited with {self.popen.returncode}")


def database_url(settings: dict[str, Any], application_name: str) -> str:
    """A ``DATABASE_URL`` for the database ``settings`` (Django's) describe; on PostgreSQL its
    connections carry ``application_name``."""
    if settings["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{settings['NAME']}"
    user = quote(settings.get("USER") or "", safe="")
    password = settings.get("PASSWORD")
    credentials = f"{user}:{quote(password, safe='')}@" if password else f"{user}@" if user else ""
    host = settings.get("HOST") or "localhost"
    port = f":{settings['PORT']}" if settings.get("PORT") else ""
    name = quote(settings["NAME"], safe="")
    return f"postgres://{credentials}{host}{port}/{name}?application_name={application_name}"


@contextlib.contextmanager
def web_process(
    project: Path, *, settings_module: str, database: dict[str, Any], env: dict[str, str]
) -> Iterator[WebProcess]:
    """uvicorn serving the project's ASGI application (without the Agents SDK preload of
    ``config.asgi``, which streams do not need) on a socket bound here, so clients can connect
    at once: the kernel queues them until the process accepts."""
    listening = socket.create_server(("127.0.0.1", 0), backlog=4096)
    name = f"agentic-web-{uuid.uuid4().hex[:12]}"
    process_env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": settings_module,
        "DATABASE_URL": database_url(database, name),
        "SECURE_SSL_REDIRECT": "false",
        "LOG_LEVEL": "WARNING",
        "DJANGO_LOG_LEVEL": "WARNING",
        "PYTHONWARNINGS": "ignore:No directory at",  # whitenoise: no collectstatic here
        **env,
    }
    argv = [sys.executable, "-m", "uvicorn", "--factory", "django.core.asgi:get_asgi_application"]
    argv += ["--fd", str(listening.fileno()), "--lifespan", "off", "--no-access-log"]
    argv += ["--log-level", "warning", "--timeout-graceful-shutdown", "2"]
    popen = subprocess.Popen(  # noqa: S603 (this interpreter, fixed arguments)
        argv,
        cwd=project,
        env=process_env,
        pass_fds=[listening.fileno()],
        start_new_session=True,
    )
    host, port = listening.getsockname()[:2]
    listening.close()  # the child has its own copy
    try:
        yield WebProcess(popen, host, port, name)
    finally:
        popen.terminate()
        try:
            popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def held_connections(application_name: str) -> list[tuple[int, str]]:
    """(backend pid, last statement) of every connection the process holds to the server."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, query FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        )
        return list(cursor.fetchall())


def get(web: WebProcess, path: str, cookie: str) -> int:
    """A plain GET with ``cookie`` (``name=value``); its status code."""
    with socket.create_connection((web.host, web.port), timeout=TIMEOUT) as connection:
        connection.sendall(_request(path, cookie))
        head = b""
        while b"\r\n" not in head:
            chunk = connection.recv(4096)
            if not chunk:
                break
            head += chunk
        while connection.recv(65536):
            pass  # the whole answer, so the request has ended when this returns
    return int(head.split(b" ", 2)[1])


def _request(path: str, cookie: str, accept: str = "application/json") -> bytes:
    # HTTP/1.0: no chunked framing, the connection closes after the answer.
    return (
        f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\nCookie: {cookie}\r\n\r\n"
    ).encode()


@dataclass
class Received:
    kind: str
    data: str
    at: float  # time.perf_counter() when it arrived


@dataclass
class StreamClient:
    """One client of a run's stream: the server-sent events it got, as they came."""

    events: list[Received] = field(default_factory=list)
    writer: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None

    def got(self, kind: str) -> list[Received]:
        return [event for event in self.events if event.kind == kind]

    async def open(self, web: WebProcess, path: str, cookie: str) -> None:
        """Connect and return once the stream has begun (its ``retry`` line came)."""
        reader, self.writer = await asyncio.open_connection(web.host, web.port)
        self.writer.write(_request(path, cookie, accept="text/event-stream"))
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            raise RuntimeError(f"the stream answered {head.splitlines()[0]!r}")
        began = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._read(reader, began))
        await began

    async def _read(self, reader: asyncio.StreamReader, began: asyncio.Future[None]) -> None:
        buffer = b""
        while chunk := await reader.read(65536):
            buffer += chunk
            *blocks, buffer = buffer.split(b"\n\n")
            now = time.perf_counter()
            for block in blocks:
                fields = dict(
                    line.split(": ", 1) for line in block.decode().split("\n") if ": " in line
                )
                if not began.done() and block.startswith(b"retry:"):
                    began.set_result(None)
                if "event" in fields:
                    self.events.append(Received(fields["event"], fields.get("data", ""), now))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


class ClientLoop:
    """An event loop in a thread of its own, for clients; the caller's thread stays free for
    Django (which refuses database work inside a running loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="clients", daemon=True)

    def __enter__(self) -> ClientLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(_cancel_the_rest())  # the stream's LISTEN connection closes with its task
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()

    def start[T](self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run[T](self, coroutine: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
        return self.start(coroutine).result(timeout)


async def _cancel_the_rest() -> None:
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
