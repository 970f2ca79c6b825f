"""The worker of ``django_tasks_rq.RQBackend``: an RQ worker that preloads and sweeps.

RQ runs each job in a forked "work horse", which inherits everything the parent imported.
The parent must not share a database connection with its horses, so it sweeps from its own
loop (RQ's maintenance step, between jobs and while it waits for one) and closes its
connections after each sweep; no thread runs in a process that forks.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from rq.worker import Worker

from agentic_django.workers import start_worker, sweep_interval, sweep_safely


class RQWorker(Worker):
    """``rq.Worker`` that preloads the agent stack once and sweeps every half lease."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("maintenance_interval", max(1, int(sweep_interval())))
        super().__init__(*args, **kwargs)
        self._next_sweep = 0.0

    def work(self, *args: Any, **kwargs: Any) -> bool:
        start_worker()
        # Keep the preloaded objects out of the collector: a horse's GC would otherwise touch
        # (and copy) every inherited page.
        gc.freeze()
        self._next_sweep = time.monotonic() + sweep_interval()
        return super().work(*args, **kwargs)

    @property
    def dequeue_timeout(self) -> int:
        # Wake up from waiting for a job often enough to sweep on time.
        return max(1, min(super().dequeue_timeout, int(sweep_interval())))

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + sweep_interval()
            sweep_safely()
