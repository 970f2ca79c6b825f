"""A database-backed implementation of the Agents SDK ``Session`` protocol.

``DatabaseSession(agent_session)`` can be passed straight to ``Runner.run(..., session=...)``.
Items are stored as ``AgentSessionItem`` rows, numbered in the statement that inserts them
(after the session's last item). On SQLite, which runs one writer at a time, that statement is
atomic on its own. On PostgreSQL a write is one statement too: a concurrent writer that
numbered its items first makes it fail on the (session, sequence) unique constraint, and it is
written again with the ``AgentSession`` row locked (where a one-statement write that takes the
same numbers meanwhile makes it try again, in a savepoint), so concurrent writers never
interleave or collide. A run's handle checks its run's claim in the same statement, with a
share lock on the run's row: recovery, which changes the claim with an UPDATE of that row,
waits for the write, or the write sees the claim as recovery left it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, NoReturn, Protocol

from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from agentic_django.conf import get_config
from agentic_django.db import run_sync
from agentic_django.exceptions import UnstorableContent
from agentic_django.lifecycle import Fence
from agentic_django.models import AgentRun, AgentSession, AgentSessionItem
from agentic_django.prepared import Statement
from agentic_django.serializers import json_safe
from agentic_django.validation import is_storable


class ItemSerializer(Protocol):
    """Converts SDK items to JSON-storable payloads and back."""

    def dumps(self, item: Any) -> Any: ...

    def loads(self, payload: Any) -> Any: ...


class JSONItemSerializer:
    """Stores items as plain JSON (pydantic models, datetimes, decimals made JSON-safe)."""

    def dumps(self, item: Any) -> Any:
        return json_safe(item)

    def loads(self, payload: Any) -> Any:
        return payload


class SessionWriteRejected(RuntimeError):
    """The run that owns this session handle lost its claim (recovered or finished)."""


async def _until_done[T](awaitable: Awaitable[T]) -> T:
    """Await a mutation to its end even if the caller is cancelled meanwhile.

    The write runs in a thread that cancellation cannot stop; returning early would let the
    caller believe it did not happen. A cancellation is re-raised once the write is over.
    """
    task = asyncio.ensure_future(awaitable)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: the caller's cancellation is what it gets
        raise cancelled
    return task.result()


class DatabaseSession:
    """SDK session storing its history in ``AgentSessionItem`` rows of one ``AgentSession``.

    ``run`` (optional) tags written items with the run that wrote them and rejects writes once
    that run no longer holds its claim, so a stale worker cannot append to a requeued run.
    Mutations are cancellation-safe: a cancelled caller still waits for the write to end.
    """

    session_settings: Any = None

    def __init__(
        self,
        session: AgentSession | int,
        *,
        run: AgentRun | None = None,
        serializer: ItemSerializer | str | None = None,
        session_settings: Any = None,
    ) -> None:
        self.session_pk = session.pk if isinstance(session, AgentSession) else int(session)
        self.session_id = str(self.session_pk)
        self.session_settings = session_settings
        self._run_pk = run.pk if run is not None else None
        self._fence = Fence.of(run) if run is not None else None
        if isinstance(serializer, str):
            serializer = import_string(serializer)()
        self.serializer: ItemSerializer = serializer or JSONItemSerializer()
        self._touched = False

    async def get_items(self, limit: int | None = None) -> list[Any]:
        """Return the history oldest first; with ``limit``, only the latest ``limit`` items."""
        if limit is None and self.session_settings is not None:
            limit = getattr(self.session_settings, "limit", None)
        return await run_sync(self.get_items_sync)(limit)

    async def add_items(self, items: list[Any]) -> None:
        """Append ``items`` at the end of the history."""
        await _until_done(run_sync(self.add_items_sync)(items))

    async def pop_item(self) -> Any | None:
        """Remove and return the latest item, or None if the history is empty."""
        return await _until_done(run_sync(self.pop_item_sync)())

    async def clear_session(self) -> None:
        """Delete the whole history."""
        await _until_done(run_sync(self.clear_session_sync)())

    def get_items_sync(self, limit: int | None = None) -> list[Any]:
        """Synchronous ``get_items`` for code outside an event loop."""
        items = AgentSessionItem.objects.filter(session_id=self.session_pk)
        if limit is not None:
            if limit <= 0:
                return []
            payloads = list(items.order_by("-sequence").values_list("payload", flat=True)[:limit])
            payloads.reverse()
        else:
            payloads = [row[0] for row in _HISTORY.rows(session_id=self.session_pk)]
        return [self.serializer.loads(payload) for payload in payloads]

    def add_items_sync(self, items: list[Any]) -> None:
        """Synchronous ``add_items``."""
        if not items:
            return
        payloads = [self.serializer.dumps(item) for item in items]
        if not is_storable(payloads):
            raise UnstorableContent()
        inserted = None
        if connection.vendor == "sqlite":
            # SQLite runs one writer at a time, so one INSERT ... SELECT is atomic on its own.
            inserted = self._insert(payloads)
        elif not connection.in_atomic_block:
            # One statement, no lock on the session: a writer that numbered the same
            # sequences first (or a session deleted meanwhile) makes it fail, and the locked
            # write below tells which.
            try:
                inserted = self._insert(payloads, lock_run=True)
            except IntegrityError:
                inserted = None
        if inserted is None:
            with transaction.atomic():
                # Row lock (serializes writers on the session) and touch in one statement.
                if not _TOUCH.update(session_id=self.session_pk, now=timezone.now()):
                    self._gone()
                self._touched = True
                inserted = self._insert_locked(payloads)
        elif inserted and not self._touched:
            _TOUCH.update(session_id=self.session_pk, now=timezone.now())
            self._touched = True
        if not inserted:
            if not AgentSession.objects.filter(pk=self.session_pk).exists():
                self._gone()
            self._reject()

    def _insert(self, payloads: list[Any], *, lock_run: bool = False) -> int:
        """Append ``payloads`` after the last sequence, if the claim still holds; rows written.

        Sequence, claim check and insert are one statement, so they see the same state.
        ``lock_run`` (PostgreSQL, without the session's lock): the claim is checked on the
        run's row share-locked, as a change of the claim last committed it.
        """
        item_meta = AgentSessionItem._meta
        qn = connection.ops.quote_name

        def column(meta: Any, name: str) -> str:
            return qn(meta.get_field(name).column)

        payload_field = item_meta.get_field("payload")
        rows = " UNION ALL ".join(
            f"SELECT {offset} AS k, %s AS payload" for offset in range(1, len(payloads) + 1)
        )
        item_table = qn(item_meta.db_table)
        session_table = qn(AgentSession._meta.db_table)
        item_session, sequence = column(item_meta, "session"), column(item_meta, "sequence")
        columns = ", ".join(
            column(item_meta, name)
            for name in ("session", "sequence", "payload", "run", "created_at")
        )
        session_pk = column(AgentSession._meta, "id")
        # Only quoted model names and placeholders are interpolated; every value is a parameter.
        sql = (
            f"INSERT INTO {item_table} ({columns}) "  # noqa: S608
            f"SELECT %s, base.last + v.k, v.payload, %s, %s FROM ({rows}) v, "
            f"(SELECT COALESCE(MAX({sequence}), 0) AS last FROM {item_table} "
            f"WHERE {item_session} = %s) base "
            f"WHERE EXISTS (SELECT 1 FROM {session_table} WHERE {session_pk} = %s)"
        )
        params: list[Any] = [
            self.session_pk,
            item_meta.get_field("run").get_db_prep_value(self._run_pk, connection),
            item_meta.get_field("created_at").get_db_prep_value(timezone.now(), connection),
            *(payload_field.get_db_prep_value(payload, connection) for payload in payloads),
            self.session_pk,
            self.session_pk,
        ]
        if self._fence is not None:
            fence_sql, fence_params = self._fence.exists_sql(lock=lock_run)
            sql += f" AND {fence_sql}"
            params += fence_params
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount

    def _insert_locked(self, payloads: list[Any]) -> int:
        """``_insert`` under the session's lock. A one-statement write takes no lock, so one
        that commits while this INSERT runs can take its numbers: the INSERT is tried again
        (in a savepoint, reading what committed since), a few times at most."""
        tries = 0
        while True:
            try:
                with transaction.atomic():
                    return self._insert(payloads)
            except IntegrityError as exc:
                tries += 1
                if tries == COLLISION_TRIES or not _numbers_taken(exc):
                    raise

    def _gone(self) -> NoReturn:
        """The session was deleted: a run's write is rejected like a lost claim's (its run
        went with it); any other caller is told the session does not exist."""
        if self._fence is not None:
            self._reject()
        raise AgentSession.DoesNotExist(f"Agent session {self.session_pk} does not exist.")

    def _reject(self) -> None:
        raise SessionWriteRejected(
            f"Run {self._run_pk} no longer holds its claim; its session write was dropped."
        )

    def pop_item_sync(self) -> Any | None:
        """Synchronous ``pop_item``."""
        with transaction.atomic():
            self._lock_session()
            self._check_claim()
            item = (
                AgentSessionItem.objects.filter(session_id=self.session_pk)
                .order_by("-sequence")
                .first()
            )
            if item is None:
                return None
            item.delete()
        return self.serializer.loads(item.payload)

    def clear_session_sync(self) -> None:
        """Synchronous ``clear_session``."""
        with transaction.atomic():
            self._lock_session()
            self._check_claim()
            AgentSessionItem.objects.filter(session_id=self.session_pk).delete()

    def _lock_session(self) -> None:
        # The session row lock serializes writers; SQLite serializes writes on its own.
        locked = AgentSession.objects.select_for_update().filter(pk=self.session_pk)
        if not list(locked.values_list("pk", flat=True)):
            raise AgentSession.DoesNotExist(f"Agent session {self.session_pk} does not exist.")

    def _check_claim(self) -> None:
        # Under the session lock: recovery takes it too before it changes the run's claim.
        if self._fence is not None and not self._fence.runs().exists():
            self._reject()


# How often a write under the session's lock tries again when one-statement writes keep
# taking its numbers (each try reads what committed before it).
COLLISION_TRIES = 5
SEQUENCE_CONSTRAINT = "agentic_item_session_seq_unique"


def _numbers_taken(exc: IntegrityError) -> bool:
    """Whether ``exc`` is the (session, sequence) unique constraint's violation."""
    diag = getattr(exc.__cause__, "diag", None)
    return getattr(diag, "constraint_name", None) == SEQUENCE_CONSTRAINT


# A run's most frequent session statements, compiled once (see ``prepared``).
_HISTORY = Statement(
    lambda session_id: (
        AgentSessionItem.objects.filter(session_id=session_id)
        .order_by("sequence")
        .values_list("payload")
    ),
    values={"session_id": AgentSession._meta.pk},
)
_TOUCH = Statement(
    lambda session_id, now: (AgentSession.objects.filter(pk=session_id), {"updated_at": now}),
    values={"session_id": AgentSession._meta.pk, "now": AgentSession._meta.get_field("updated_at")},
)


def session_for_run(run: AgentRun) -> DatabaseSession:
    """The session handle a claimed run uses: writes are tagged with and fenced by the run.

    Items are serialized by ``AGENTIC_DJANGO_SESSION_SERIALIZER`` (default: plain JSON).
    """
    return DatabaseSession(run.session_id, run=run, serializer=get_config().session_serializer)
