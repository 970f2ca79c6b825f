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
from collections.abc import Awaitable, Callable

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
