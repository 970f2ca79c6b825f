"""Statements compiled once per process: the lifecycle's most frequent queries.

The lifecycle's conditional statements carry subqueries (the session order, the slots, the
deployment's limit), and the ORM builds and compiles them again on every call -- which costs
more CPU than the database spends running them (about 4 ms each on a 2-core machine, a third
of a chat run's CPU). A ``Statement`` is the same ORM query compiled once per database, with
marker values where a call's values go; a call puts its values in their places and runs the
SQL. The SQL is the ORM's own, so the conditions stay written once, in ``lifecycle``; it is
compiled again whenever the settings change (the lease and the limits are part of it).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import connections, router
from django.db.models import Field
from django.db.models.sql import UpdateQuery
from django.db.transaction import TransactionManagementError

from agentic_django.conf import get_config


def _marker(name: str, field: Field) -> Any:
    """A value of ``field``'s type that no call passes (unique per name)."""
    digest = hashlib.sha256(f"agentic-django:{name}".encode()).digest()
    internal = field.get_internal_type()
    if internal == "UUIDField":
        return uuid.UUID(bytes=digest[:16])
    if internal.endswith(("IntegerField", "AutoField")):
        # Inside every integer field's range (the ORM drops a lookup outside it).
        return (1 << 29) + int.from_bytes(digest[:3], "big")
    if internal in {"CharField", "TextField", "JSONField"}:
        return f"agentic-django-marker-{digest.hex()[:16]}"
    if internal == "DateTimeField":
        micro = int.from_bytes(digest[:3], "big") % 1_000_000
        # As aware as the project's datetimes (SQLite refuses an aware one without USE_TZ).
        return datetime(2001, 2, 3, 4, 5, 6, micro, tzinfo=UTC if settings.USE_TZ else None)
    raise TypeError(f"no marker for a {internal} value ({name})")


@dataclass(frozen=True)
class _Compiled:
    sql: str
    params: tuple[Any, ...]
    # Where each call value goes: (parameter index, value name).
    slots: tuple[tuple[int, str], ...]
    # Columns a call reads back: (index, expression, converters), as the ORM converts them.
    converters: tuple[tuple[int, Any, list[Any]], ...]
    returning_params: Any


class Statement:
    """One ORM query, compiled once per database and settings, run with each call's values.

    ``build(**markers)`` returns the query: a ``QuerySet`` to read (``rows``), or a pair
    ``(queryset, updates)`` to update (``update``; ``update_returning`` reads the updated rows
    back, as ``QuerySet.update`` cannot). ``values`` names the call's values and the field
    each one is stored in or compared with (it prepares them for the database).
    """

    def __init__(
        self,
        build: Callable[..., Any],
        *,
        values: dict[str, Field] | None = None,
        returning: tuple[Field, ...] = (),
    ) -> None:
        self._build = build
        self._values = values or {}
        self._returning = returning
        self._cache: dict[str, tuple[Any, _Compiled]] = {}

    # --- Calls -----------------------------------------------------------------------------

    def rows(self, **values: Any) -> list[tuple[Any, ...]]:
        """The rows the query selects, converted as the ORM would. A locking read
        (``select_for_update``) goes where the ORM sends it, to the database for writes, and
        only inside a transaction there."""
        model = self._model()
        alias = (router.db_for_write if self._locking else router.db_for_read)(model)
        connection = connections[alias]
        if self._locking and connection.get_autocommit():
            raise TransactionManagementError(
                "select_for_update cannot be used outside of a transaction."
            )
        compiled, params = self._prepare(alias, values)
        with connection.cursor() as cursor:
            cursor.execute(compiled.sql, params)
            rows = cursor.fetchall()
        return _convert(rows, compiled, connection)

    def update(self, **values: Any) -> int:
        """Run the UPDATE; how many rows it changed."""
        alias = router.db_for_write(self._model())
        compiled, params = self._prepare(alias, values)
        with connections[alias].cursor() as cursor:
            cursor.execute(compiled.sql, params)
            return cursor.rowcount

    def update_returning(self, **values: Any) -> list[Any]:
        """Run the UPDATE; the updated rows as model instances (``returning`` is every concrete
        field of the model)."""
        model = self._model()
        alias = router.db_for_write(model)
        compiled, params = self._prepare(alias, values)
        connection = connections[alias]
        with connection.cursor() as cursor:
            cursor.execute(compiled.sql, params)
            rows = connection.ops.fetch_returned_rows(cursor, compiled.returning_params)
        names = [field.attname for field in self._returning]
        return [model.from_db(alias, names, row) for row in _convert(rows, compiled, connection)]

    def sql(self, **values: Any) -> tuple[str, list[Any]]:
        """The SQL and its parameters (to embed the query in a raw statement)."""
        alias = router.db_for_write(self._model())
        compiled, params = self._prepare(alias, values)
        return compiled.sql, params

    # --- Compiling -------------------------------------------------------------------------

    def _model(self) -> Any:
        model = getattr(self, "_model_class", None)
        if model is None:
            markers = {name: _marker(name, field) for name, field in self._values.items()}
            built = self._build(**markers)
            queryset = built[0] if isinstance(built, tuple) else built
            self._locking = bool(queryset.query.select_for_update)
            model = self._model_class = queryset.model
        return model

    def _prepare(self, alias: str, values: dict[str, Any]) -> tuple[_Compiled, list[Any]]:
        config = get_config()
        cached = self._cache.get(alias)
        if cached is None or cached[0] is not config:
            cached = (config, self._compile(alias))
            self._cache[alias] = cached
        compiled = cached[1]
        connection = connections[alias]
        params = list(compiled.params)
        prepared = {
            name: self._values[name].get_db_prep_save(value, connection)
            for name, value in values.items()
        }
        for index, name in compiled.slots:
            params[index] = prepared[name]
        return compiled, params

    def _compile(self, alias: str) -> _Compiled:
        connection = connections[alias]
        markers = {name: _marker(name, field) for name, field in self._values.items()}
        built = self._build(**markers)
        if isinstance(built, tuple):
            queryset, updates = built
            query = queryset.query.chain(UpdateQuery)
            query.add_update_values(updates)
            compiler = query.get_compiler(alias)
            if self._returning and connection.features.can_return_rows_from_update:
                compiler.returning_fields = list(self._returning)
            elif self._returning:
                raise NotImplementedError("UPDATE ... RETURNING is not supported here")
            sql, params = compiler.as_sql()
            table = queryset.model._meta.db_table
            columns = [field.get_col(table) for field in self._returning]
            returning_params = getattr(compiler, "returning_params", None)
        else:
            compiler = built.query.get_compiler(alias)
            sql, params = compiler.as_sql()
            columns = [select[0] for select in compiler.select]
            returning_params = None
        converters = column_converters(columns, connection)
        slots = []
        for name, marker in markers.items():
            prepared = self._values[name].get_db_prep_save(marker, connection)
            found = [i for i, param in enumerate(params) if _same(param, prepared)]
            if not found:
                raise ValueError(f"the compiled statement does not take the value {name!r}")
            slots.extend((index, name) for index in found)
        return _Compiled(sql, tuple(params), tuple(slots), tuple(converters), returning_params)


def _same(param: Any, prepared: Any) -> bool:
    """Whether a compiled parameter is the prepared marker (a JSON adapter: its object)."""
    if type(param) is not type(prepared):
        return False
    if hasattr(prepared, "obj"):  # psycopg's Json/Jsonb wrappers do not compare by value
        return param.obj == prepared.obj
    return param == prepared


def column_converters(columns: list[Any], connection: Any) -> list[tuple[int, Any, list[Any]]]:
    """(index, column, converters) of the columns whose values need converting: the backend's
    converters, then the field's, as the ORM's compiler applies them."""
    converters = []
    for index, column in enumerate(columns):
        found = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
        if found:
            converters.append((index, column, found))
    return converters


def convert_row(row: Any, converters: Any, connection: Any) -> list[Any]:
    """``row``'s values converted by ``column_converters``'s result."""
    values = list(row)
    for index, column, found in converters:
        for converter in found:
            values[index] = converter(values[index], column, connection)
    return values


def _convert(rows: list[Any], compiled: _Compiled, connection: Any) -> list[tuple[Any, ...]]:
    return [tuple(convert_row(row, compiled.converters, connection)) for row in rows]
