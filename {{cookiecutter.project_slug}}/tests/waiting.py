"""Waiting in tests: for a condition (never a fixed sleep), and for work in another thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from django.db import connection

# Generous: under a CPU hog a condition can take many times longer than on an idle machine.
PATIENCE = 60.0


def wait_for(condition: Callable[[], object], what: str, timeout: float = PATIENCE) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def in_thread(target: Callable[[], object]) -> threading.Thread:
    """Run ``target`` as another worker process would: its own thread and connection."""

    def run() -> None:
        try:
            target()
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
