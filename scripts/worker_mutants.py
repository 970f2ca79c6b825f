"""Hand-written mutants of the engine's worker code, and whether the engine's tests notice them.

    .venv/bin/python -m scripts.worker_mutants                        # both backends, every mutant
    .venv/bin/python -m scripts.worker_mutants --backend rq --only rq_no_release_on_stop
    .venv/bin/python -m scripts.worker_mutants --jobs 2 --stop-at 02:40   # backends side by side
    .venv/bin/python -m scripts.worker_mutants --list                 # the mutants, nothing run
    .venv/bin/python -m scripts.worker_mutants --check                # bake, check they apply

mutmut (scripts/mutation.py) cannot follow code that runs in a worker process the tests start,
and the worker code (``agentic_django/workers``, the stream and dispatch paths they drive) runs
there. So these mutants are written by hand: each replaces an exact piece of code (found exactly
once, or the script stops: the list must stay true to the code) with a small, realistic bug.

For each backend (task_backend=database and task_backend=rq, on PostgreSQL) a project is baked
into ``.cache/worker-mutants/<backend>``; its tests run with this virtualenv, which holds every
generated project's dependencies (requirements.txt), as scripts/mutation.py does. A throwaway
PostgreSQL (and Redis for rq) is started unless ``--database-url``/``--redis-url`` name running
ones (give Redis a database index nothing else uses: the tests' workers take every job of it).

First the tests of the selected mutants run once unmutated (the baseline: a test failing there
kills nothing, and its time sets the mutants' timeouts); then each mutant is applied, its tests
run (``-x``: the first failure kills it; a timeout counts as killed) and the file is restored,
always. The results go to ``.cache/worker-mutants/results-<backend>.json`` (a later run with
``--only`` updates them) and the report to ``.cache/worker-mutants/report.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from scripts.bake import TEMPLATE, bake
from scripts.native_stack import kill_tree
from scripts.servers import start_postgres, start_redis

BACKENDS = ("database", "rq")
WORKDIR = TEMPLATE / ".cache" / "worker-mutants"
# Tests that run the mutated code in the test process, on a task backend the test sets itself:
# their outcome cannot depend on the project's backend, so they run on one project only.
IN_PROCESS = ("database",)

# The tests the mutants run (files or node ids of the baked project); a file the project does
# not have (test_database_worker.py on rq) is left out of that backend's selection.
DB_WORKER = "tests/core/test_database_worker.py"
IDLE_WORKER = "tests/core/test_worker.py"
MANY = "tests/core/test_many_runs.py::"
SLOTS_TOGETHER = MANY + "test_slots_taken_together_are_only_the_free_ones"
BLOCKING_TOOL = MANY + "test_a_blocking_sync_tool_costs_its_run_one_slot"
SHARED_LOOP = MANY + "test_runs_sharing_a_worker_event_loop_outlive_one_that_blocks_it"
BOUNDED_POOL = MANY + "test_a_worker_runs_its_slots_at_once_on_a_bounded_pool"
ONE_POLL = MANY + "test_one_poll_tells_a_workers_runs_of_a_cancellation_and_a_lost_claim"
DROPPED = MANY + "test_a_worker_rides_out_a_database_that_drops_its_connections"
STOPPING = MANY + "test_a_stopping_worker_lets_its_runs_finish_then_hands_the_rest_on"
KILLED_50 = MANY + "test_a_worker_killed_with_50_runs_in_flight_loses_none_and_repeats_no_call"
LOOP_TIMEOUT = "tests/core/test_faults.py::test_a_timeout_ends_a_run_whose_event_loop_is_blocked"
BROKER_OUTAGE = (
    "tests/core/test_faults.py::"
    "test_a_broker_outage_fails_only_the_run_it_refused_and_dispatch_stays_flat"
)
APPEND = "tests/core/test_lifecycle.py::test_streamed_text_is_added_only_while_the_fence_holds"
DELTA = (
    "tests/core/test_execution.py::test_streamed_text_is_written_less_often_the_more_runs_stream"
)
TURN = (
    "tests/core/test_dispatch.py::"
    "test_one_thread_of_a_process_dispatches_for_the_runs_ending_beside_it"
)
CONCURRENCY = "tests/core/test_concurrency.py"
CLAIM_TURNS = CONCURRENCY + "::test_a_workers_claims_take_turns_only_under_an_integer_limit"
RACING_CLAIMS = CONCURRENCY + "::test_racing_claims_never_exceed_the_concurrency_limit"
SLOW_CLAIM = CONCURRENCY + "::test_a_slow_claim_and_a_run_submitted_meanwhile_never_run_together"

WORKERS = "agentic_django/workers/__init__.py"
DATABASE = "agentic_django/workers/database.py"
RQ = "agentic_django/workers/rq.py"
EXECUTION = "agentic_django/execution.py"
LIFECYCLE = "agentic_django/lifecycle.py"
DISPATCH = "agentic_django/dispatch.py"
EVENTLOOP = "agentic_django/eventloop.py"
DB = "agentic_django/db.py"
PROVIDERS = "chat/providers.py"
ADMIN = "agentic_django/admin.py"
OPERATIONS = "tests/core/test_operations.py::"
DELETE_RACES = OPERATIONS + "test_the_admin_deletes_what_a_running_run_is_writing_to"
DELETE_RECOVERY = OPERATIONS + "test_a_delete_that_meets_recovery_lets_it_go_first"
DELETE_REQUESTS = OPERATIONS + "test_a_users_request_racing_the_admins_delete"
DELETE_BEFORE_ANSWER = OPERATIONS + "test_a_run_deleted_before_its_post_answers_is_a_404"
DELETE_WHILE_RUNNING = (
    OPERATIONS + "test_a_run_whose_conversation_is_deleted_while_it_runs_stops_cleanly"
)
CLEANUP = "agentic_django/management/commands/agentic_django_cleanup.py"
CLEANUP_RACE = OPERATIONS + "test_cleanup_keeps_an_idle_conversation_a_message_arrives_for"
UNREAD_ERROR = (
    "tests/core/test_sessions.py::test_a_cancelled_caller_whose_write_fails_leaves_no_error_unread"
)
KEPT = "tests/providers/test_openai_compatible.py::"
KEPT_REUSED = KEPT + "test_a_workers_runs_reuse_their_connections_to_the_provider"
KEPT_PER_LOOP = KEPT + "test_a_loop_that_replaces_another_opens_connections_of_its_own"


@dataclass(frozen=True)
class Mutant:
    """One small bug: ``old`` (exactly once in ``file``) becomes ``new``; ``also`` holds further
    (old, new) edits of the same file that belong to the same bug."""

    name: str
    file: str
    old: str
    new: str
    description: str
    tests: tuple[str, ...]
    backends: tuple[str, ...] = BACKENDS
    also: tuple[tuple[str, str], ...] = ()

    @property
    def edits(self) -> tuple[tuple[str, str], ...]:
        return ((self.old, self.new), *self.also)


MUTANTS = (
    # --- The pool's check before it lends a connection (db.py) ---------------------------------
    Mutant(
        "pool_lends_dropped_connections",
        DB,
        "    if _readable(conn.fileno()):",
        "    if False:",
        "the pool lends a connection the server has closed (a restart, a failover)",
        (DROPPED,),
    ),
    # --- Connections to the model provider kept per shared loop (providers.py, eventloop.py) --
    Mutant(
        "provider_connections_never_kept",
        PROVIDERS,
        "            return await (kept or self.own).handle_async_request(request)",
        "            return await self.own.handle_async_request(request)",
        "a worker's runs open a new connection (TCP and TLS handshakes) for every model call",
        (KEPT_REUSED,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "loop_resources_shared_across_loops",
        EVENTLOOP,
        "    shared = _loops.get(asyncio.get_running_loop())\n",
        "    shared = _loops.get(asyncio.get_running_loop())\n"
        "    if shared is not None:\n"
        "        shared = next(iter(_loops.values()))\n",
        "a loop uses connections another loop opened (a loop that replaced a stuck one)",
        (KEPT_PER_LOOP,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "loop_resources_never_closed",
        EVENTLOOP,
        "            shared.closers.append(lambda: close(made))",
        "            pass",
        "a shared loop that ends leaves its kept connections open",
        (KEPT_PER_LOOP,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "stuck_loop_never_ended",
        EVENTLOOP,
        "        if loop.answers(STALL_SECONDS) and loop.end_when_idle():",
        "        if False:",
        "a loop that was replaced keeps its thread and its kept connections for good",
        (SHARED_LOOP,),
    ),
    Mutant(
        "stuck_loop_ended_with_runs_on_it",
        EVENTLOOP,
        "            if self.owners or self.ended:",
        "            if self.ended:",
        "a replaced loop is ended as soon as it answers, with its runs still on it",
        (SHARED_LOOP,),
    ),
    # --- The worker's shared event loop (eventloop.py) ----------------------------------------
    Mutant(
        "stuck_loop_kept",
        EVENTLOOP,
        "            fresh = _replace(loop)\n",
        "            fresh = None\n",
        "a loop a run blocks is never replaced: new runs wait for it too",
        (SHARED_LOOP,),
    ),
    Mutant(
        "steps_keep_connections",
        EVENTLOOP,
        "        return self.steps.submit(_then_release, fn, *args, **kwargs)",
        "        return self.steps.submit(fn, *args, **kwargs)",
        "a run's sync_to_async step keeps its pooled connection until the run ends",
        (BOUNDED_POOL,),
        IN_PROCESS,
    ),
    Mutant(
        "poller_ignores_cancellation",
        EXECUTION,
        "            if state is not False:",
        "            if state is None:",
        "the process's poll does not pass a cancellation request on to the run",
        (ONE_POLL,),
        IN_PROCESS,
    ),
    Mutant(
        "poller_ignores_lost_claims",
        EXECUTION,
        "            if state is not False:",
        "            if state:",
        "the process's poll does not tell an attempt that it lost its run",
        (ONE_POLL,),
        IN_PROCESS,
    ),
    Mutant(
        "poll_ignores_status",
        LIFECYCLE,
        "pk__in={fence.run_id for fence in fences}, status=Status.RUNNING",
        "pk__in={fence.run_id for fence in fences}",
        "a run another process ended still counts as held by its attempt",
        (ONE_POLL,),
        IN_PROCESS,
    ),
    Mutant(
        "claims_always_locked",
        LIFECYCLE,
        "    if claims_hold_slots and get_config().concurrency_limit is None:",
        "    if False:",
        "a worker's claims take the deployment's lock under the auto limit too",
        (CLAIM_TURNS,),
        IN_PROCESS,
    ),
    Mutant(
        "claims_skip_lock_under_a_limit",
        LIFECYCLE,
        "    if claims_hold_slots and get_config().concurrency_limit is None:",
        "    if claims_hold_slots:",
        "a worker's claims skip the lock under an integer limit",
        (CLAIM_TURNS,),
        IN_PROCESS,
    ),
    Mutant(
        "claims_skip_lock_outside_workers",
        LIFECYCLE,
        "    if claims_hold_slots and get_config().concurrency_limit is None:",
        "    if get_config().concurrency_limit is None:",
        "claims of a process that is no worker skip the lock under the auto limit",
        (RACING_CLAIMS,),
        IN_PROCESS,
    ),
    Mutant(
        "claims_without_conversation_lock",
        LIFECYCLE,
        "            locked = _SESSION_LOCK.rows(run_id=run_id)\n"
        "            if locked and locked[0][0] is not None:\n"
        "                _LOCK.rows()\n",
        "            locked = []\n",
        "a worker's claims under the auto limit skip their conversation's row too",
        (SLOW_CLAIM,),
        IN_PROCESS,
    ),
    Mutant(
        "claims_ignore_recorded_limit",
        LIFECYCLE,
        "            if locked and locked[0][0] is not None:",
        "            if False:",
        "a worker with no limit of its own skips the lock under a limit another one recorded",
        (CLAIM_TURNS,),
        IN_PROCESS,
    ),
    Mutant(
        "leftover_tasks_live_on",
        EVENTLOOP,
        "    if not leftovers:\n        return",
        "    if True:\n        return",
        "a task a run leaves behind keeps running on the shared loop after the run ended",
        (SHARED_LOOP,),
    ),
    # --- The database worker's batch claim (workers/database.py) ------------------------------
    Mutant(
        "claim_one_at_a_time",
        DATABASE,
        "taken = 1 + self.slots.acquire_free(CLAIM_BATCH - 1)",
        "taken = 1",
        "each claim takes one task, however many slots are free",
        (DB_WORKER, KILLED_50),
        ("database",),
    ),
    Mutant(
        "claim_error_keeps_slots",
        DATABASE,
        "                self.slots.release(taken)\n"
        '                logger.warning("Could not claim a task; trying again", exc_info=True)',
        '                logger.warning("Could not claim a task; trying again", exc_info=True)',
        "a claim the database refuses keeps the slots it took",
        (DB_WORKER,),
        ("database",),
    ),
    Mutant(
        "claim_releases_all",
        DATABASE,
        "self.slots.release(taken - len(task_results))",
        "self.slots.release(taken)",
        "a claim that found fewer tasks than slots gives back all its slots, used ones too",
        (DB_WORKER,),
        ("database",),
    ),
    Mutant(
        "claim_ignores_limit",
        DATABASE,
        "list(tasks.select_for_update(skip_locked=True)[:limit])",
        "list(tasks.select_for_update(skip_locked=True))",
        "a claim takes every ready task, not only as many as it has slots for",
        (DB_WORKER,),
        ("database",),
    ),
    Mutant(
        "claim_marks_nothing",
        DATABASE,
        "                task_result.claim(self.worker_id)",
        "                pass",
        "the tasks read for a claim are never marked claimed (RUNNING, this worker)",
        (DB_WORKER,),
        ("database",),
    ),
    # --- Slots (workers/__init__.py), and a lost run's slot (execution.py) --------------------
    Mutant(
        "acquire_free_ignores_busy",
        WORKERS,
        "taken = max(0, min(limit, self.size - self.busy))",
        "taken = max(0, min(limit, self.size))",
        "acquire_free takes up to its limit, as if no slot were busy",
        (SLOTS_TOGETHER, DB_WORKER),
        IN_PROCESS,
    ),
    Mutant(
        "release_one_only",
        WORKERS,
        "self.busy -= count",
        "self.busy -= 1",
        "release(count) gives back one slot whatever the count",
        (SLOTS_TOGETHER, DB_WORKER),
        IN_PROCESS,
    ),
    Mutant(
        "release_wakes_nobody",
        WORKERS,
        "            self.busy -= count\n            self._changed.notify_all()",
        "            self.busy -= count",
        "a freed slot does not wake a thread waiting for one (it sees it at its timeout)",
        (BLOCKING_TOOL,),
        IN_PROCESS,
    ),
    Mutant(
        "slot_freed_twice",
        WORKERS,
        "                if freed:\n                    return\n                freed = True",
        "                freed = True",
        "a run's slot is freed again when its thread ends after its keeper already freed it",
        (LOOP_TIMEOUT,),
        IN_PROCESS,
    ),
    Mutant(
        "lost_run_keeps_slot",
        EXECUTION,
        "    if slot_of_thread.release is not None:\n"
        "        keeper.on_lost(slot_of_thread.release)\n",
        "",
        "a run its lease keeper timed out keeps its slot while its thread stays blocked",
        (LOOP_TIMEOUT,),
        IN_PROCESS,
    ),
    # --- The raw append of streamed text (lifecycle._append_sql) ------------------------------
    Mutant(
        "append_without_attempt",
        LIFECYCLE,
        'f"WHERE {pk} = %s AND {attempt} = %s AND {status} = %s"',
        'f"WHERE {pk} = %s AND {status} = %s"',
        "the append is not fenced on the attempt (a taken-over attempt still streams)",
        (APPEND,),
        IN_PROCESS,
        also=(
            (
                "return [text, run_id, fence.attempt, Status.RUNNING.value]",
                "return [text, run_id, Status.RUNNING.value]",
            ),
        ),
    ),
    Mutant(
        "append_without_status",
        LIFECYCLE,
        'f"WHERE {pk} = %s AND {attempt} = %s AND {status} = %s"',
        'f"WHERE {pk} = %s AND {attempt} = %s"',
        "the append is not fenced on the status (a finished run still gets text)",
        (APPEND,),
        IN_PROCESS,
        also=(
            (
                "return [text, run_id, fence.attempt, Status.RUNNING.value]",
                "return [text, run_id, fence.attempt]",
            ),
        ),
    ),
    Mutant(
        "append_without_pk",
        LIFECYCLE,
        'f"WHERE {pk} = %s AND {attempt} = %s AND {status} = %s"',
        'f"WHERE {attempt} = %s AND {status} = %s"',
        "the append is not limited to its run (every running run of that attempt gets the text)",
        (APPEND,),
        IN_PROCESS,
        also=(
            (
                "return [text, run_id, fence.attempt, Status.RUNNING.value]",
                "return [text, fence.attempt, Status.RUNNING.value]",
            ),
        ),
    ),
    Mutant(
        "append_replaces",
        LIFECYCLE,
        "SET {text} = {text} || %s",
        "SET {text} = %s",
        "the follow-up text replaces the streamed text instead of appending to it",
        (APPEND,),
        IN_PROCESS,
    ),
    Mutant(
        "append_ignores_rowcount",
        LIFECYCLE,
        "        return cursor.rowcount > 0",
        "        return True",
        "stream_text reports success even when the fence matched no row",
        (APPEND,),
        IN_PROCESS,
    ),
    # --- DeltaWriter's interval and open writers (execution.py) -------------------------------
    Mutant(
        "delta_fixed_interval",
        EXECUTION,
        "return max(cls.INTERVAL, cls._open / cls.WRITES_PER_SECOND)",
        "return cls.INTERVAL",
        "a writer writes every INTERVAL however many writers stream in the process",
        (DELTA,),
        IN_PROCESS,
    ),
    Mutant(
        "delta_never_closed",
        EXECUTION,
        "        if not self._closed:\n"
        "            self._closed = True\n"
        "            with DeltaWriter._open_lock:\n"
        "                DeltaWriter._open -= 1\n",
        "",
        "a closed writer still counts as open (the interval only ever grows)",
        (DELTA,),
        IN_PROCESS,
    ),
    # --- dispatch_next's process-wide turn (dispatch.py) --------------------------------------
    Mutant(
        "turn_released_only_at_exit",
        DISPATCH,
        "                if not turn.again:\n"
        "                    turn.owner = None  # checked and released together: no request"
        " is lost\n",
        "                if not turn.again:\n",
        "the dispatching thread gives up its turn after the check, not with it (finally does)",
        (TURN,),
        IN_PROCESS,
    ),
    Mutant(
        "turn_kept_after_broker_error",
        DISPATCH,
        "            with turn.lock:\n"
        "                if turn.owner == me:\n"
        "                    turn.owner = None\n",
        "            pass\n",
        "a dispatching thread that stops on a broker error keeps the turn for good",
        (TURN, BROKER_OUTAGE),
        IN_PROCESS,
    ),
    Mutant(
        "turn_again_ignored",
        DISPATCH,
        "            turn.again = True\n            return 0",
        "            return 0",
        "a call while another thread dispatches does not ask it for another round",
        (TURN,),
        IN_PROCESS,
    ),
    Mutant(
        "turn_coalesces_in_transaction",
        DISPATCH,
        "elif turn.owner == me or not connection.in_atomic_block:",
        "elif turn.owner is not None:",
        "a call inside a transaction leaves its dispatch to a thread that cannot see its changes",
        (TURN,),
        IN_PROCESS,
    ),
    Mutant(
        "turn_shared_with_immediate",
        DISPATCH,
        "    if not isinstance(execute_agent_run.get_backend(), ImmediateBackend):\n"
        "        return _turn\n",
        "    return _turn\n",
        "with the immediate backend threads share one turn (a dispatcher runs whole runs)",
        (TURN, CONCURRENCY),
        IN_PROCESS,
    ),
    # --- A worker's limit, presence and heartbeat (workers/__init__.py) -----------------------
    Mutant(
        "limit_not_recorded",
        WORKERS,
        "        lifecycle.record_concurrency_limit(get_config().concurrency_limit)\n",
        "",
        "a starting worker does not record the deployment's concurrency limit",
        (IDLE_WORKER,),
    ),
    Mutant(
        "announced_at_first_heartbeat",
        WORKERS,
        "        lifecycle.record_concurrency_limit(get_config().concurrency_limit)\n"
        "        presence.announce()\n",
        "        lifecycle.record_concurrency_limit(get_config().concurrency_limit)\n",
        "a worker is announced only at its first heartbeat, half a lease after it started",
        (IDLE_WORKER,),
    ),
    Mutant(
        "heartbeat_never_renewed",
        WORKERS,
        "        if self.retired:\n            return\n        try:\n",
        "        if not self.retired:\n            return\n        try:\n",
        "a live worker's heartbeat is never renewed (its slots stop counting after a lease)",
        (KILLED_50,),
    ),
    Mutant(
        "not_retired_when_done",
        WORKERS,
        "    if finished:\n        presence.retire()\n        return",
        "    if finished:\n        return",
        "a worker whose runs finished within the grace period does not retire its row",
        (STOPPING,),
    ),
    # --- Stopping and the grace period (workers/__init__.py) ----------------------------------
    Mutant(
        "second_signal_always_forces",
        WORKERS,
        "        if time.monotonic() - self._first >= 1.0:\n            self.forced.set()",
        "        self.forced.set()",
        "a second signal within a second of the first (Ctrl-C plus a supervisor) stops at once",
        (STOPPING,),
    ),
    Mutant(
        "never_forced",
        WORKERS,
        "            self.forced.set()\n        return False",
        "            pass\n        return False",
        "a second signal never cuts the grace period short",
        (STOPPING,),
    ),
    Mutant(
        "grace_even_when_forced",
        WORKERS,
        "grace = 0 if stopping.forced.is_set() else get_config().worker_shutdown_grace",
        "grace = get_config().worker_shutdown_grace",
        "a worker forced before it starts stopping still gets the grace period",
        (STOPPING,),
    ),
    Mutant(
        "grace_not_cut_short",
        WORKERS,
        "finished = slots.wait_idle(grace, cut_short=stopping.forced)",
        "finished = slots.wait_idle(grace)",
        "the wait for the runs in flight ignores a second signal",
        (STOPPING,),
    ),
    Mutant(
        "no_grace",
        WORKERS,
        "grace = 0 if stopping.forced.is_set() else get_config().worker_shutdown_grace",
        "grace = 0",
        "the first signal gives the runs in flight no time to finish",
        (STOPPING,),
    ),
    Mutant(
        "leases_not_ended",
        WORKERS,
        "    stop_in_flight()\n    presence.retire()",
        "    presence.retire()",
        "a worker stopping before its runs finished leaves their leases to run out",
        (STOPPING,),
    ),
    # --- Abandoning the runs in flight (execution.py) -----------------------------------------
    Mutant(
        "abandon_keeps_renewing",
        EXECUTION,
        "    for _, keeper in abandoned:\n        keeper.abandon()\n",
        "",
        "the runs given up keep their lease keepers renewing until the process exits",
        (STOPPING,),
    ),
    Mutant(
        "abandon_gives_up_nothing",
        EXECUTION,
        "return [fence for fence, _ in abandoned]",
        "return []",
        "abandon_in_flight hands no fences to give_up",
        (STOPPING,),
    ),
    # --- The RQ worker (workers/rq.py) --------------------------------------------------------
    Mutant(
        "rq_busy_ignores_stop",
        RQ,
        "                self.heartbeat()\n"
        "                if self._stop_requested:\n"
        "                    raise StopRequested()",
        "                self.heartbeat()",
        "a worker whose slots are all busy only sees a stop request once a slot frees",
        (STOPPING,),
        ("rq",),
    ),
    Mutant(
        "rq_stop_raised_when_busy",
        RQ,
        "        if self._waiting_for_jobs:\n"
        "            raise StopRequested()\n"
        "        self._stop_requested = True",
        "        raise StopRequested()",
        "the signal handler raises StopRequested wherever the main thread is",
        (STOPPING,),
        ("rq",),
    ),
    Mutant(
        "rq_no_release_on_stop",
        RQ,
        "            except BaseException:\n"
        "                self.slots.release()\n"
        "                raise",
        "            except BaseException:\n                raise",
        "a stop (or error) while waiting for a job keeps the slot the wait took",
        (STOPPING,),
        ("rq",),
    ),
    Mutant(
        "rq_job_never_untracked",
        RQ,
        "self._executing.pop(execution.id, None)",
        "self._executing.get(execution.id)",
        "a finished job stays in the jobs whose RQ heartbeats the worker renews",
        (STOPPING,),
        ("rq",),
    ),
    Mutant(
        "rq_job_never_tracked",
        RQ,
        "            self._executing[execution.id] = (job, execution)",
        "            pass",
        "the jobs running in threads are never renewed in RQ's registry",
        (KILLED_50,),
        ("rq",),
    ),
    Mutant(
        "rq_slow_busy_poll",
        RQ,
        "BUSY_POLL_SECONDS = 1.0",
        "BUSY_POLL_SECONDS = 30.0",
        "a busy worker looks at its heartbeat, job renewals and stop requests every 30 s",
        (KILLED_50, STOPPING),
        ("rq",),
    ),
    # --- Deletes that lock what they delete first (lifecycle.lock_and_delete, admin) ---------
    Mutant(
        "delete_run_unlocked",
        LIFECYCLE,
        "                if model is AgentRun:\n                    _lock(rows)\n",
        "                if model is AgentRun:\n                    pass\n",
        "deleting a run does not lock it: an event it writes meanwhile fails the delete",
        (DELETE_RACES,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "delete_conversation_unlocked",
        LIFECYCLE,
        "                    _lock(runs)\n                    _lock(rows)\n",
        "                    _lock(runs)\n",
        "deleting a conversation does not lock it (a run created meanwhile is not held off)",
        (DELETE_RACES,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "delete_runs_locked_once",
        LIFECYCLE,
        "                    _lock(runs)  # a run created",
        "                    pass  # a run created",
        "runs created before the conversation was locked are not locked",
        (DELETE_RACES,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "delete_conversation_before_runs",
        LIFECYCLE,
        "                    _lock(runs)\n                    _lock(rows)\n"
        "                    _lock(runs)",
        "                    _lock(rows)\n                    _lock(runs)",
        "a conversation's delete locks it before its runs, the other way round from writers",
        (DELETE_RECOVERY,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "delete_locks_busy_not_retried",
        LIFECYCLE,
        "            if not busy or time.monotonic()",
        "            if True or time.monotonic()",
        "a delete that finds a row locked by recovery or a claim fails (500 in the admin)",
        (DELETE_RECOVERY,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "delete_locks_wait",
        LIFECYCLE,
        "select_for_update(nowait=True, of=",
        "select_for_update(of=",
        "a delete waits for locks while holding others: recovery dies as a deadlock's victim",
        (DELETE_RECOVERY,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "post_reads_conversation_unlocked",
        "agentic_django/services.py",
        "AgentSession.objects.select_for_update(no_key=True)",
        "AgentSession.objects",
        "a post to a conversation being deleted fails at commit (500)",
        (DELETE_REQUESTS,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "cancel_of_a_deleted_run_is_a_500",
        "agentic_django/views.py",
        "    except AgentRun.DoesNotExist:\n"
        '        raise ApiError(404, "not_found", "No such run.") from None  # deleted meanwhile\n',
        "",
        "a cancel racing the run's delete answers 500, not 404",
        (DELETE_REQUESTS,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "post_of_a_deleted_run_is_a_500",
        "agentic_django/views.py",
        "    try:\n        run.refresh_from_db()\n    except AgentRun.DoesNotExist:\n"
        '        raise ApiError(404, "not_found", "No such run.") from None\n',
        "    run.refresh_from_db()\n",
        "a post whose run is deleted before it answers answers 500, not 404",
        (DELETE_BEFORE_ANSWER,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "claimed_run_deleted_crashes",
        EXECUTION,
        '            logger.warning("agentic_django: run %s was deleted as it was claimed", '
        'run.pk)\n            return "skipped"\n',
        '            logger.warning("agentic_django: run %s was deleted as it was claimed", '
        "run.pk)\n            raise\n",
        "a run deleted as it is claimed fails its task with a traceback",
        (DELETE_WHILE_RUNNING,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "run_write_to_deleted_conversation_errors",
        "agentic_django/sessions.py",
        "        if self._fence is not None:\n            self._reject()\n"
        "        raise AgentSession",
        "        raise AgentSession",
        "a run whose conversation was deleted is logged as failed, with a traceback",
        (DELETE_WHILE_RUNNING,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "cleanup_deletes_without_recheck",
        CLEANUP,
        "lock_and_delete(batch, recheck=True)",
        "lock_and_delete(batch)",
        "the cleanup deletes an idle conversation a message arrived for meanwhile",
        (CLEANUP_RACE,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "cleanup_deletes_unlocked",
        CLEANUP,
        "            if model in (AgentRun, AgentSession):",
        "            if False:",
        "the cleanup deletes runs and conversations without locking them first",
        (CLEANUP_RACE,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "cancelled_write_error_unread",
        "agentic_django/sessions.py",
        "            task.exception()  # retrieved",
        "            pass  # retrieved",
        "asyncio logs that nobody read the error of a cancelled caller's write",
        (UNREAD_ERROR,),
        backends=IN_PROCESS,
    ),
    Mutant(
        "admin_deletes_unlocked",
        ADMIN,
        "        lifecycle.lock_and_delete(type(obj).objects.filter(pk=obj.pk))",
        "        obj.delete()",
        "the admin's delete page deletes without locking first",
        (DELETE_RACES,),
        backends=IN_PROCESS,
        also=(("        lifecycle.lock_and_delete(queryset)", "        queryset.delete()"),),
    ),
)


class MutantMismatch(RuntimeError):
    """A mutant's ``old`` text is not in its file exactly once: the list must follow the code."""


# --- Applying a mutant -----------------------------------------------------------------------


def mutated(mutant: Mutant, source: str) -> str:
    for old, new in mutant.edits:
        count = source.count(old)
        if count != 1:
            raise MutantMismatch(
                f"{mutant.name}: expected exactly one occurrence in {mutant.file}, "
                f"found {count}:\n{old}"
            )
        source = source.replace(old, new)
    return source


def check(project: Path, mutants: list[Mutant]) -> None:
    """Every mutant applies to ``project`` (fails loudly, listing every mismatch)."""
    problems = []
    for mutant in mutants:
        try:
            mutated(mutant, (project / mutant.file).read_text())
        except (MutantMismatch, OSError) as error:
            problems.append(str(error))
    if problems:
        raise MutantMismatch("\n\n".join(problems))


def _drop_bytecode(path: Path) -> None:
    for cached in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        cached.unlink(missing_ok=True)


@contextlib.contextmanager
def applied(project: Path, mutant: Mutant):
    """The mutant in place for the duration; the original file back afterwards, always."""
    path = project / mutant.file
    original = path.read_bytes()
    try:
        path.write_text(mutated(mutant, original.decode()))
        _drop_bytecode(path)
        yield
    finally:
        path.write_bytes(original)
        _drop_bytecode(path)
        if path.read_bytes() != original:  # pragma: no cover - a disk that lies
            raise RuntimeError(f"could not restore {path}")


def diff(mutant: Mutant) -> str:
    lines = []
    for old, new in mutant.edits:
        lines += [f"-{line}" for line in old.splitlines()]
        lines += [f"+{line}" for line in new.splitlines()]
    return "\n".join(lines)


# --- Running tests -----------------------------------------------------------------------------


@dataclass
class Outcome:
    result: str  # killed, survived, timeout, error, not run
    seconds: float = 0.0
    failed: tuple[str, ...] = ()
    note: str = ""


def selection(project: Path, mutant: Mutant) -> list[str]:
    """The mutant's tests this project has."""
    return [test for test in mutant.tests if (project / test.split("::")[0]).exists()]


def _project_processes(project: Path) -> list[int]:
    """Processes (started by these tests) still working in the project directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "cwd")).is_relative_to(project):
                found.append(int(entry.name))
    return found


def pytest(
    project: Path, env: dict[str, str], tests: list[str], log: Path, timeout: float, *extra: str
) -> tuple[int | None, float]:
    """Run ``tests`` in ``project``; (exit status, or None on timeout; seconds). Whatever
    happens, no process of the run is left behind (worker processes included: the tests start
    them in sessions of their own)."""
    argv = [sys.executable, "-m", "pytest", "-m", "", "-p", "no:cacheprovider", "-p", "no:xdist"]
    argv += ["-q", "-rfE", *extra, *tests]
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("wb") as output:
        output.write(f"$ {' '.join(argv)}\n".encode())
        output.flush()
        process = subprocess.Popen(
            argv, cwd=project, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            if process.poll() is None:
                kill_tree(process)
            for pid in _project_processes(project):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    return status, time.monotonic() - started


def failures(log: Path) -> tuple[str, ...]:
    text = log.read_text(errors="replace")
    return tuple(dict.fromkeys(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.MULTILINE)))


def durations(junit: Path) -> tuple[dict[str, float], set[str]]:
    """Seconds per test node id, and the node ids that failed, from a JUnit XML report."""
    seconds: dict[str, float] = {}
    failed: set[str] = set()
    for case in ET.parse(junit).iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        node = f"{module}.py::{case.get('name')}"
        seconds[node] = float(case.get("time") or 0)
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(node)
    return seconds, failed


def covered(test: str, node: str) -> bool:
    """Whether the selection ``test`` (a file or a node id) runs test ``node``."""
    if "::" not in test:
        return node.startswith(test + "::")
    return node == test or node.startswith(test + "[")


# --- One backend -------------------------------------------------------------------------------


def backend_database_url(base: str, backend: str) -> str:
    """A database of its own for ``backend`` on the server of ``base`` (created if missing), so
    that two backends tested side by side never share a test database."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(base)
    name = f"{parts.path.lstrip('/') or 'postgres'}_wm_{backend}"
    with psycopg.connect(base, autocommit=True) as connection:
        found = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        if found.fetchone() is None:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return urlunsplit(parts._replace(path=f"/{name}"))


def prepare(backend: str) -> Path:
    """A freshly baked project of ``backend`` (so no earlier run's edit can linger)."""
    output = WORKDIR / backend
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    return bake(output, task_backend=backend, database="postgres", ci="none")


def results_path(backend: str) -> Path:
    return WORKDIR / f"results-{backend}.json"


def load_results(backend: str) -> dict[str, dict]:
    path = results_path(backend)
    return json.loads(path.read_text()) if path.exists() else {}


def run_backend(backend: str, mutants: list[Mutant], args: argparse.Namespace) -> None:
    def say(message: str) -> None:
        print(f"[{backend}] {message}", flush=True)

    project = prepare(backend)
    check(project, [m for m in MUTANTS if backend in m.backends])
    mutants = [m for m in mutants if backend in m.backends]
    if not mutants:
        return
    logs = WORKDIR / "logs" / backend
    shutil.rmtree(logs, ignore_errors=True)
    env = {
        **os.environ,
        "OPENAI_AGENTS_DISABLE_TRACING": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # a mutant's bytecode must never outlive it
        "DATABASE_URL": backend_database_url(args.database_url, backend),
        # One test database per backend, kept between the mutants' sessions (--reuse-db).
        "AGENTIC_TEST_DB_DIR": str(WORKDIR / f"test-db-{backend}"),
    }
    if backend == "rq":
        env["REDIS_URL"] = args.redis_url
    results = load_results(backend)
    known = {m.name for m in MUTANTS}
    results = {name: result for name, result in results.items() if name in known}
    stop_at = args.stop_at
    create_db = True  # the first session builds the test database afresh

    expected: dict[str, float] = {}  # seconds a mutant's tests took unmutated
    broken: set[str] = set()  # mutants whose tests fail unmutated
    if args.baseline:
        tests = list(dict.fromkeys(t for m in mutants for t in selection(project, m)))
        junit = logs / "baseline.xml"
        say(f"baseline: {len(tests)} test selection(s), unmutated")
        status, seconds = pytest(
            project, env, tests, logs / "baseline.log", args.baseline_timeout,
            "--create-db", f"--junitxml={junit}",
        )  # fmt: skip
        create_db = status is None
        if status is None or not junit.exists():
            raise SystemExit(f"[{backend}] the baseline did not finish: see {logs}/baseline.log")
        times, failed = durations(junit)
        say(f"baseline: {len(times)} tests in {seconds:.0f}s, {len(failed)} failed")
        for mutant in mutants:
            chosen = selection(project, mutant)
            nodes = [n for n in times if any(covered(t, n) for t in chosen)]
            expected[mutant.name] = sum(times[n] for n in nodes) + 15  # + session start
            if any(n in failed for n in nodes):
                broken.add(mutant.name)

    for index, mutant in enumerate(mutants, 1):
        tests = selection(project, mutant)
        if mutant.name in expected:
            estimate = expected[mutant.name]
            timeout = args.timeout or max(120.0, 60 + 3 * estimate)
        else:
            timeout = args.timeout or 600.0
            estimate = timeout / 3
        if not tests:
            outcome = Outcome("not run", note="none of its tests is in this project")
        elif mutant.name in broken:
            outcome = Outcome("not run", note="a test of it failed unmutated (baseline)")
        elif stop_at and time.time() + estimate > stop_at:
            outcome = Outcome("not run", note="no time left before --stop-at")
        else:
            log = logs / f"{mutant.name}.log"
            extra = ["-x", "--create-db" if create_db else "--reuse-db"]
            allowed = min(timeout, stop_at - time.time()) if stop_at else timeout
            with applied(project, mutant):
                status, seconds = pytest(project, env, tests, log, allowed, *extra)
            create_db = status is None  # a session killed midway may leave rows behind
            if status is None and allowed < timeout:
                outcome = Outcome("not run", seconds, note="cut short by --stop-at")
            elif status is None:
                outcome = Outcome("timeout", seconds, note=f"killed after {timeout:.0f}s")
            elif status == 0:
                outcome = Outcome("survived", seconds)
            elif status == 1:
                outcome = Outcome("killed", seconds, failures(log))
            else:
                outcome = Outcome("error", seconds, failures(log), f"pytest exit status {status}")
        say(
            f"{index}/{len(mutants)} {mutant.name}: {outcome.result}"
            + (f" in {outcome.seconds:.0f}s" if outcome.seconds else "")
            + (f" ({outcome.note})" if outcome.note else "")
        )
        results[mutant.name] = {
            "result": outcome.result,
            "seconds": round(outcome.seconds, 1),
            "failed": list(outcome.failed),
            "note": outcome.note,
            "tests": tests,
            "at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        }
        results_path(backend).write_text(json.dumps(results, indent=2) + "\n")


# --- Report ------------------------------------------------------------------------------------


def report() -> str:
    results = {backend: load_results(backend) for backend in BACKENDS}
    lines = [
        "# Worker mutants",
        "",
        "Hand-written mutants of the worker code (`scripts/worker_mutants.py`); a timeout counts",
        "as killed. `-`: the mutant does not apply to that backend (its code is not there, or its",
        "tests run the code in the test process, whatever the project's backend).",
        "",
        "| backend | mutants | killed | timeout | survived | not run / error | score |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for backend in BACKENDS:
        applicable = [m for m in MUTANTS if backend in m.backends]
        counts = {"killed": 0, "timeout": 0, "survived": 0}
        other = 0
        for mutant in applicable:
            result = results[backend].get(mutant.name, {}).get("result", "not run")
            if result in counts:
                counts[result] += 1
            else:
                other += 1
        ran = sum(counts.values())
        score = f"{100 * (counts['killed'] + counts['timeout']) / ran:.0f}%" if ran else "-"
        lines.append(
            f"| {backend} | {len(applicable)} | {counts['killed']} | {counts['timeout']} "
            f"| {counts['survived']} | {other} | {score} |"
        )
    lines += [
        "",
        "| mutant | file | description | database | rq |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mutant in MUTANTS:
        cells = []
        for backend in BACKENDS:
            if backend not in mutant.backends:
                cells.append("-")
            else:
                cells.append(results[backend].get(mutant.name, {}).get("result", "not run"))
        file = mutant.file.removeprefix("agentic_django/")
        lines.append(
            f"| `{mutant.name}` | {file} | {mutant.description} | {cells[0]} | {cells[1]} |"
        )
    lines += ["", "## Each mutant", ""]
    for mutant in MUTANTS:
        lines += [f"### `{mutant.name}` ({mutant.file})", "", mutant.description, ""]
        lines += ["```diff", diff(mutant), "```", ""]
        for backend in mutant.backends:
            result = results[backend].get(mutant.name)
            if result is None:
                lines.append(f"- {backend}: not run")
                continue
            seconds = f" in {result['seconds']:.0f}s" if result["seconds"] else ""
            text = f"- {backend}: **{result['result']}**{seconds} ({result['at']})"
            if result["failed"]:
                text += "; failed: " + ", ".join(f"`{f}`" for f in result["failed"])
            if result["note"]:
                text += f"; {result['note']}"
            lines.append(text)
            lines.append("  tests: " + ", ".join(f"`{t}`" for t in result["tests"]))
        lines.append("")
    return "\n".join(lines)


def summary() -> str:
    results = {backend: load_results(backend) for backend in BACKENDS}
    width = max(len(m.name) for m in MUTANTS)
    rows = [f"{'mutant':<{width}}  {'database':<9} {'rq':<9}"]
    for mutant in MUTANTS:
        cells = [
            results[b].get(mutant.name, {}).get("result", "not run")
            if b in mutant.backends
            else "-"
            for b in BACKENDS
        ]
        rows.append(f"{mutant.name:<{width}}  {cells[0]:<9} {cells[1]:<9}")
    return "\n".join(rows)


def write_report() -> None:
    WORKDIR.mkdir(parents=True, exist_ok=True)
    (WORKDIR / "report.md").write_text(report())
    print(summary())
    print(f"Report: {WORKDIR / 'report.md'}")


# --- Main --------------------------------------------------------------------------------------


def stop_time(text: str | None) -> float | None:
    """``HH:MM`` (UTC, today or tomorrow) as a timestamp."""
    if not text:
        return None
    now = datetime.now(UTC)
    hour, minute = (int(part) for part in text.split(":"))
    at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    stamp = at.timestamp()
    return stamp if stamp > now.timestamp() else stamp + 86_400


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--check", action="store_true", help="bake, check that every mutant applies, and exit"
    )
    parser.add_argument("--database-url", help="a running PostgreSQL (superuser) to use")
    parser.add_argument("--redis-url", help="a running Redis database nothing else uses")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default: from baseline)")
    parser.add_argument("--baseline-timeout", type=float, default=3600.0)
    parser.add_argument(
        "--no-baseline", dest="baseline", action="store_false", help="skip the unmutated run"
    )
    parser.add_argument("--stop-at", help="HH:MM UTC: start no mutant that would end later")
    parser.add_argument("--jobs", type=int, default=1, help="2: test the two backends side by side")
    args = parser.parse_args(argv)
    names = {m.name for m in MUTANTS}
    unknown = set(args.only or ()) - names
    if unknown:
        parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name:<30} {','.join(mutant.backends):<12} {mutant.description}")
        return 0
    if args.check:
        for backend in args.backend:
            check(prepare(backend), [m for m in MUTANTS if backend in m.backends])
            print(f"[{backend}] every mutant applies")
        return 0
    args.stop_at = stop_time(args.stop_at)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    backends = [b for b in args.backend if any(b in m.backends for m in mutants)]
    with contextlib.ExitStack() as stack:
        try:
            if not args.database_url:
                postgres = start_postgres()
                stack.callback(postgres.stop)
                args.database_url = postgres.url
            if "rq" in backends and not args.redis_url:
                redis = start_redis()
                stack.callback(redis.stop)
                args.redis_url = redis.url
            if args.jobs > 1 and len(backends) > 1:
                run_side_by_side(backends, args, argv)
            else:
                for backend in backends:
                    run_backend(backend, mutants, args)
        except KeyboardInterrupt:
            print("Interrupted: every mutated file is restored.", file=sys.stderr)
            write_report()
            return 130
    write_report()
    return 0


def run_side_by_side(backends: list[str], args: argparse.Namespace, argv: list[str] | None):
    """One process per backend, on the servers started here."""
    passed = list(sys.argv[1:] if argv is None else argv)
    passed = _without_options(passed, ("--backend", "--jobs", "--database-url", "--redis-url"))
    children = []
    for backend in backends:
        command = [sys.executable, "-m", "scripts.worker_mutants", *passed, "--backend", backend]
        command += ["--database-url", args.database_url]
        if args.redis_url:
            command += ["--redis-url", args.redis_url]
        children.append(subprocess.Popen(command, cwd=TEMPLATE))
    try:
        for child in children:
            child.wait()
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)  # it restores its file, then exits
                child.wait()


def _without_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without ``options`` and their values."""
    kept, skipping = [], False
    for item in argv:
        if item.startswith("--"):
            skipping = item.split("=")[0] in options
        if not skipping:
            kept.append(item)
    return kept


if __name__ == "__main__":
    sys.exit(main())
