"""Lock waits sampled from PostgreSQL's ``pg_locks`` while a benchmark phase runs.

A thread of the benchmark process, on a connection of its own to the benchmark's database,
reads every ``interval`` seconds the locks not granted to the database's other backends
(``pg_locks`` joined to ``pg_stat_activity`` by pid: the NOTIFY lock has no database of its
own), and, for each waiter, what it waits on and what the backends blocking it are doing
(``pg_blocking_pids``). It also notes the backends waiting on anything else
(``pg_stat_activity.wait_event``: lightweight locks such as ``NotifyQueueLock`` or
``WALWrite``, and I/O), which ``pg_locks`` does not show, and the CPU time of the database's
backends (``/proc``, when the server runs on this machine).

What a wait is called:

- ``object pg_database #0 AccessExclusiveLock (NOTIFY queue)``: a commit that has sent
  notifications takes this lock (``PreCommit_Notify`` in PostgreSQL's ``async.c``: a shared
  object lock on ``pg_database`` with object id 0, database 0) and holds it through its
  commit, so the queue keeps commit order: committing notifiers queue on it;
- ``transactionid ShareLock: <statement> <table>``: a row lock -- the waiter's statement
  (``SELECT ... FOR UPDATE``, ``UPDATE``, ...) needs a row another transaction has locked and
  waits for that transaction to end; the table is read from the waiter's statement;
- ``tuple <table> <mode>``: the second and later waiters on one row queue on the tuple;
- ``relation <table> <mode>``, ``advisory ...``: a table lock, an advisory lock.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INTERVAL = 0.025  # seconds between samples
NOTIFY_LOCK = "object pg_database #0 AccessExclusiveLock (NOTIFY queue)"
WAITS = """
SELECT l.locktype, l.mode, l.relation::regclass::text, l.classid::regclass::text, l.objid,
       a.query, (
           SELECT string_agg(coalesce(b.wait_event_type || ':' || b.wait_event, 'CPU')
                             || E'\t' || left(b.query, 200), E'\n')
           FROM pg_stat_activity b WHERE b.pid = ANY(pg_blocking_pids(l.pid))
       )
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE NOT l.granted AND a.datname = current_database() AND a.pid <> pg_backend_pid()
"""
# Every backend of the database (for their CPU time), and the waits of the active ones.
BACKENDS = """
SELECT pid, CASE WHEN state = 'active'
                  AND wait_event_type NOT IN ('Lock', 'Client', 'Activity', 'Extension')
             THEN wait_event_type || ':' || wait_event END
FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
"""
TABLE = re.compile(r'\b(?:FROM|UPDATE|INTO)\s+"?([A-Za-z0-9_]+)"?', re.IGNORECASE)


@dataclass
class LockStats:
    """What the samples of one phase saw."""

    samples: int = 0
    waiting: int = 0  # samples with at least one lock not granted
    waiters: int = 0  # lock waits over all samples (a sample may have several)
    kinds: Counter[str] = field(default_factory=Counter)  # samples with each kind of wait
    blockers: Counter[str] = field(default_factory=Counter)  # "<kind> <- <blocker doing>"
    other: Counter[str] = field(default_factory=Counter)  # samples with each non-lock wait
    elapsed_s: float = 0.0
    # CPU seconds of each backend of the database: when first and when last seen in the phase
    # (a backend that ends between two samples loses at most one interval of its time).
    cpu_first: dict[int, float] = field(default_factory=dict)
    cpu_last: dict[int, float] = field(default_factory=dict)

    @property
    def backend_cpu_s(self) -> float | None:
        """CPU time of the database's backends (other than the sampler's) during the phase;
        None if their ``/proc`` cannot be read (a server on another host)."""
        if not self.cpu_last:
            return None
        return sum(self.cpu_last[pid] - self.cpu_first[pid] for pid in self.cpu_last)

    @property
    def waiting_share(self) -> float:
        return self.waiting / self.samples if self.samples else 0.0

    def share(self, counter: Counter[str], key: str) -> float:
        return counter[key] / self.samples if self.samples else 0.0

    def top(self, counter: Counter[str], count: int = 3) -> str:
        """The ``count`` most frequent entries of ``counter`` with their share of samples."""
        return "; ".join(
            f"{name} {100 * self.share(counter, name):.1f} %"
            for name, _ in counter.most_common(count)
        )


def statement(query: str) -> str:
    """A waiter's or blocker's statement in short: its verb, its first table, FOR UPDATE."""
    text = " ".join(query.split())
    verb = text.split(" ", 1)[0].upper() if text else "?"
    table = TABLE.search(text)
    locking = " FOR UPDATE" if "FOR UPDATE" in text.upper() else ""
    return f"{verb} {table.group(1)}{locking}" if table else verb


def kind_of(
    locktype: str, mode: str, relation: str | None, classid: str | None, objid: Any, query: str
) -> str:
    """What a lock wait is on, in words (see the module's docstring)."""
    if locktype == "object" and classid == "pg_database" and objid == 0:
        return NOTIFY_LOCK
    if locktype == "transactionid":
        return f"transactionid {mode}: {statement(query)}"
    if locktype in ("relation", "tuple"):
        return f"{locktype} {relation} {mode}"
    if locktype == "object":
        return f"object {classid} #{objid} {mode}"
    return f"{locktype} {mode}"


def blocker_of(blocking: str | None) -> str:
    """What the backends blocking a waiter are doing, each as ``wait_event statement``."""
    if not blocking:
        return "?"
    doing = set()
    for part in blocking.split("\n"):
        event, _, query = part.partition("\t")
        doing.add(f"{event} {statement(query)}")
    return ", ".join(sorted(doing))


class LockSampler:
    """Samples lock waits from a thread of its own while ``measuring()``."""

    def __init__(self, conninfo: str, *, interval: float = INTERVAL) -> None:
        self.conninfo = conninfo
        self.interval = interval
        self.phase: LockStats | None = None
        self.known: set[int] = set()  # backends seen before the current phase began
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-pg-locks", daemon=True)

    def __enter__(self) -> LockSampler:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def measuring(self) -> Iterator[LockStats]:
        stats = LockStats()
        started = time.monotonic()
        self.phase = stats
        try:
            yield stats
        finally:
            time.sleep(self.interval * 2)  # a last sample, for the backends' CPU
            self.phase = None
            stats.elapsed_s = time.monotonic() - started
            if self.error is not None:
                raise RuntimeError("the pg_locks sampler failed") from self.error

    def _run(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.conninfo, autocommit=True) as db:
                self._ready.set()
                while not self._stop.wait(self.interval):
                    stats = self.phase
                    if stats is not None:
                        self._sample(db, stats)
                    else:
                        self.known = {pid for pid, _ in db.execute(BACKENDS).fetchall()}
        except BaseException as error:  # reported by measuring()
            self.error = error
        finally:
            self._ready.set()

    def _sample(self, db: Any, stats: LockStats) -> None:
        rows = db.execute(WAITS).fetchall()
        backends = db.execute(BACKENDS).fetchall()
        events = [event for _, event in backends if event]
        for pid, _ in backends:
            with contextlib.suppress(OSError, ValueError):
                cpu = cpu_seconds(pid, children=False)
                # A backend that started during the phase counts from zero.
                stats.cpu_first.setdefault(pid, cpu if pid in self.known else 0.0)
                stats.cpu_last[pid] = cpu
        stats.samples += 1
        stats.waiters += len(rows)
        if rows:
            stats.waiting += 1
        kinds, blockers = set(), set()
        for locktype, mode, relation, classid, objid, query, blocking in rows:
            kind = kind_of(locktype, mode, relation, classid, objid, query or "")
            kinds.add(kind)
            blockers.add(f"{kind} <- {blocker_of(blocking)}")
        stats.kinds.update(kinds)
        stats.blockers.update(blockers)
        stats.other.update(set(events))


def conninfo(settings: dict[str, Any], application_name: str = "bench-pg-locks") -> str:
    """A libpq connection string for Django's database ``settings``."""
    from psycopg.conninfo import make_conninfo

    params = {
        "dbname": settings["NAME"],
        "user": settings.get("USER") or None,
        "password": settings.get("PASSWORD") or None,
        "host": settings.get("HOST") or None,
        "port": str(settings["PORT"]) if settings.get("PORT") else None,
        "application_name": application_name,
    }
    return make_conninfo(**{key: value for key, value in params.items() if value is not None})


def cpu_seconds(pid: int, *, children: bool = True) -> float:
    """CPU time so far of process ``pid``: its threads (ended ones too) and, if ``children``,
    the children it waited for (an RQ work horse), from ``/proc`` (in ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = fields[11:15] if children else fields[11:13]
    return sum(int(value) for value in ticks) / os.sysconf("SC_CLK_TCK")
