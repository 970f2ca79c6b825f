"""The worker of ``django_tasks_rq.RQBackend``: an RQ worker that runs up to
``AGENTIC_DJANGO_WORKER_CONCURRENCY`` jobs at once, each in a thread of its own, preloads the
agent stack and sweeps.

RQ's own workers fork a "work horse" per job and run one job at a time. An agent run waits on
its model provider nearly all the time, so here a job runs in a thread of the worker process
(as RQ's ``SimpleWorker`` does, without forking), and the worker dequeues the next job as soon
as a slot is free. The broker stays transport and wake-up: the run's row decides whether a job
may run (``lifecycle.claim``), its lease keeper times it out (no RQ death penalty: signals
reach only the main thread), and a worker that dies is recovered from the run table.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import BaseDeathPenalty
from rq.worker import SimpleWorker

from agentic_django.conf import get_config
from agentic_django.workers import (
    Presence,
    Slots,
    Stopping,
    Sweeper,
    start_worker,
    stop_worker,
    sweep_interval,
)

logger = logging.getLogger("agentic_django.workers")

# How often a worker whose slots are all busy looks at its heartbeat and stop requests.
BUSY_POLL_SECONDS = 1.0


class NoDeathPenalty(BaseDeathPenalty):
    """Jobs are not killed by RQ: a run's lease keeper ends it at its timeout."""

    def setup_death_penalty(self) -> None:
        return None

    def cancel_death_penalty(self) -> None:
        return None


class RQWorker(SimpleWorker):
    """``rq.SimpleWorker`` running jobs in threads, up to its slots, preloaded and sweeping."""

    death_penalty_class = NoDeathPenalty

    def __init__(self, *args: Any, concurrency: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots = Slots(concurrency or get_config().worker_concurrency)
        self.presence = Presence(self.slots.size)
        self.stopping = Stopping()
        self._waiting_for_jobs = False
        self._executing: dict[str, tuple[Job, Execution]] = {}
        self._executing_lock = threading.Lock()
        self._jobs_renewed_at = time.monotonic()
        # Jobs are renewed with the worker's presence: every half lease (at most rq's interval).
        self.job_monitoring_interval = max(
            1, min(self.job_monitoring_interval, int(sweep_interval()))
        )

    def work(self, *args: Any, **kwargs: Any) -> bool:
        start_worker(self.presence)
        sweeper = Sweeper(sweep_interval(), self.presence)
        sweeper.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            stop_worker(self.slots, self.presence, sweeper, self.stopping)

    def request_stop(self, signum: int, frame: Any) -> None:
        """First signal (RQ's warm shutdown): take no more jobs, let those running finish."""
        self.stopping.request()
        super().request_stop(signum, frame)

    def _shutdown(self) -> None:
        # RQ raises StopRequested from the signal handler when the worker is not busy; here
        # jobs run in threads, so only while the main thread waits for the next job is that
        # safe (the wait gives its slot back). Elsewhere the loop sees the request itself.
        if self._waiting_for_jobs:
            raise StopRequested()
        self._stop_requested = True

    def request_force_stop(self, signum: int, frame: Any) -> None:
        """A second signal cuts the wait for the jobs running short (RQ's cold shutdown would
        raise in whatever the main thread is doing, a step of the shutdown included)."""
        if not self.stopping.request() and self.stopping.forced.is_set():
            logger.warning("Worker %s: cold shut down", self.name)

    @property
    def dequeue_timeout(self) -> int:
        # Jobs run in threads, so the worker is "busy" while it waits for the next: a stop
        # request only ends the wait when it times out, which it does often.
        return max(1, min(super().dequeue_timeout, int(BUSY_POLL_SECONDS * 2)))

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """The next job, once a slot is free for it (the slot is then taken)."""
        while True:
            while not self.slots.acquire(timeout=BUSY_POLL_SECONDS):
                self.heartbeat()
                if self._stop_requested:
                    raise StopRequested()
            if self._stop_requested:
                self.slots.release()
                raise StopRequested()
            self._waiting_for_jobs = True
            try:
                result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except BaseException:
                self.slots.release()
                raise
            finally:
                self._waiting_for_jobs = False
            if result is not None:
                return result
            self.slots.release()
            if timeout is not None or not self.slots.busy:
                return None  # idle too long, or a burst with nothing queued nor running
            # A burst: a job still running may queue the next run of its conversation.
            self.slots.wait_for_change(BUSY_POLL_SECONDS)

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Start the job in the slot its dequeue took."""
        execution = self.prepare_execution(job)
        with self._executing_lock:
            self._executing[execution.id] = (job, execution)
        self.slots.start(self._perform, job, queue, execution)

    def _perform(self, job: Job, queue: Queue, execution: Execution) -> None:
        try:
            self.perform_job(job, queue, execution)
        finally:
            with self._executing_lock:
                self._executing.pop(execution.id, None)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # A run is timed out by its lease keeper, not by the job's RQ timeout: its job stays
        # "started" for as long as it runs.
        return self.job_monitoring_interval + 60

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """The worker's heartbeat (the main thread sends one at least every two seconds); every
        ``job_monitoring_interval`` it also renews the jobs running in its threads, which
        rq's forking worker does from its wait for the work horse: otherwise RQ would take a
        run longer than that for abandoned and fail its job."""
        super().heartbeat(timeout, pipeline)
        if pipeline is not None:
            return  # part of a job's own heartbeat
        if time.monotonic() - self._jobs_renewed_at < self.job_monitoring_interval:
            return
        self._jobs_renewed_at = time.monotonic()
        with self._executing_lock:
            executing = list(self._executing.values())
        for job, execution in executing:
            try:
                self.maintain_heartbeats(job, execution)
            except Exception:
                logger.warning("Could not renew the heartbeat of job %s", job.id, exc_info=True)
