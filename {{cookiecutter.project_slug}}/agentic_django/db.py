"""Database connections of a process that runs many things at once.

A worker runs many runs at once, each in a thread of its own, and a web process serves many
streams; neither may hold a connection per run or per stream. With PostgreSQL, Django takes
connections from a pool per process (``OPTIONS["pool"]``, see the project's settings), and a
thread gives its connection back as soon as it is done with it: ``released`` /
``run_sync`` for the database work a run's event loop hands to its thread, and
``release_connection`` after the steps of a run in between. So a worker holds at most its
pool's size, whatever its concurrency.

Without a pool (SQLite), connections are cheap files and stay with their thread until it
ends; SQLite serializes the writes itself.
"""

from __future__ import annotations

import functools
import select
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection


def pooled() -> bool:
    """Whether this process takes its connections from a pool."""
    return bool(connection.settings_dict.get("OPTIONS", {}).get("pool"))


def release_connection() -> None:
    """Give this thread's connection back to the pool, unless a transaction still needs it
    (without a pool, the connection stays)."""
    if connection.connection is not None and pooled() and not connection.in_atomic_block:
        connection.close()


def released[**P, R](fn: Callable[P, R]) -> Callable[P, R]:
    """``fn``, giving the connection back to the pool when it returns."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        finally:
            release_connection()

    return call


def run_sync[**P, R](fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """``sync_to_async(fn)`` (in the run's own thread) that gives the connection back."""
    return sync_to_async(released(fn))


def check_pooled_connection(conn: Any) -> None:
    """The pool's check before it lends a connection (``OPTIONS["pool"]["check"]``): raise
    if the connection is gone, so the pool replaces it.

    An idle connection has nothing to read, unless the server has closed it or said why it is
    about to (a restart, a failover, ``pg_terminate_backend``): only then does it cost the
    round trip of psycopg's ``ConnectionPool.check_connection``, where that check made one on
    every borrow (a worker borrows for every database step of every run).
    """
    if conn.closed or conn.broken:
        raise conn.OperationalError("the connection is closed")  # psycopg's own class
    if _readable(conn.fileno()):
        from psycopg_pool import ConnectionPool

        ConnectionPool.check_connection(conn)


def _readable(fd: int) -> bool:
    """Whether the socket ``fd`` has something to read (or was closed) right now."""
    if not hasattr(select, "poll"):  # Windows: select() takes sockets there
        return bool(select.select([fd], [], [], 0)[0])
    poller = select.poll()  # unlike select(), any descriptor number
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))
