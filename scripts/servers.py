"""Start real PostgreSQL and Redis servers on loopback (for the template's tests, the stack runs
and the benchmarks); stop them by pid.

Nothing needs to be running: these helpers use the Debian packages `make test` installs.
PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """The server binaries are missing or the server did not come up."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise ServerUnavailable(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if not found:
        raise ServerUnavailable(f"{name} not found: apt-get install postgresql")
    return found


def _as_postgres_user(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen
    workdir: Path
    extra: dict = field(default_factory=dict)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self, stop_signal: int = signal.SIGTERM, down_for: float = 0.0) -> None:
        """Stop the server with `stop_signal`, wait `down_for` seconds, start it again on the
        same port with the same data."""
        if self.process.poll() is None:
            # The server itself: `runuser` (PostgreSQL as root) does not pass SIGINT on.
            pidfile = self.extra.get("pidfile")
            pid = int(pidfile.read_text().split()[0]) if pidfile else self.process.pid
            os.kill(pid, stop_signal)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        time.sleep(down_for)
        log = open(self.extra["log"], "ab")  # noqa: SIM115 - kept open for the server's life
        self.process = subprocess.Popen(
            self.extra["argv"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for_port(self.port)
        if "psql" in self.extra:
            _wait_for_sql(self.extra["psql"], self.port, "SELECT 1")
        if self.extra.get("redis"):
            _wait_for_redis(self.port)


def start_postgres(port: int | None = None) -> Server:
    """A fresh cluster with trust auth on 127.0.0.1; the URL names database `app` owned by `app`."""
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="pg-"))
    data = workdir / "data"
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
    initdb = _as_postgres_user(
        [_postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
    )
    subprocess.run(initdb, check=True, capture_output=True)
    argv = _as_postgres_user(
        [
            _postgres_bin("postgres"),
            "-D", str(data),
            "-h", "127.0.0.1",
            "-p", str(port),
            "-k", str(workdir),
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]
    )  # fmt: skip
    log = open(workdir / "postgres.log", "wb")  # noqa: SIM115 - kept open for the server's life
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(url="", port=port, process=process, workdir=workdir, extra={"argv": argv})
    server.extra.update(log=workdir / "postgres.log", pidfile=data / "postmaster.pid")
    try:
        wait_for_port(port)
        psql = server.extra["psql"] = _postgres_bin("psql")
        _wait_for_sql(psql, port, "CREATE ROLE app LOGIN SUPERUSER PASSWORD 'app'")
        _wait_for_sql(psql, port, "CREATE DATABASE app OWNER app")
    except Exception:
        server.stop()
        raise
    server.url = f"postgres://app:app@127.0.0.1:{port}/app"
    return server


def _wait_for_sql(psql: str, port: int, sql: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        argv = [psql, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres"]
        result = subprocess.run(
            [*argv, "-c", sql],
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            return
        if "starting up" not in result.stderr or time.monotonic() > deadline:
            raise ServerUnavailable(f"{sql!r} failed: {result.stderr.strip()}")
        time.sleep(0.2)


def _wait_for_redis(port: int, timeout: float = 30.0) -> None:
    """Until Redis answers PING: a Redis loading its append-only file listens at once but
    answers every command with `-LOADING` until done (seconds on a busy machine)."""
    deadline = time.monotonic() + timeout
    answer = b""
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(128)
        if answer.startswith(b"+PONG"):
            return
        time.sleep(0.1)
    raise ServerUnavailable(f"Redis on 127.0.0.1:{port} still answers {answer!r} after {timeout}s")


def start_redis(port: int | None = None, *, appendonly: bool = False) -> Server:
    """A throwaway Redis on 127.0.0.1; no persistence unless `appendonly` (as in compose)."""
    binary = shutil.which("redis-server")
    if not binary:
        raise ServerUnavailable("redis-server not found: apt-get install redis-server")
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="redis-"))
    argv = [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--dir", str(workdir),
    ]  # fmt: skip
    log = open(workdir / "redis.log", "wb")  # noqa: SIM115 - kept open for the server's life
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(
        url=f"redis://127.0.0.1:{port}/0",
        port=port,
        process=process,
        workdir=workdir,
        extra={"argv": argv, "log": workdir / "redis.log", "redis": True},
    )
    try:
        wait_for_port(port)
        _wait_for_redis(port)
    except Exception:
        server.stop()
        raise
    return server
