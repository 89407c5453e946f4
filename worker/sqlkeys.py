"""Lists of keys in SQL: one condition for "this column is one of these keys", as cheap as
each dialect allows, and PostgreSQL arrays sent in the cheap format."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

# On PostgreSQL, `col IN (:k1, ..., :k1000)` sends a thousand parameters and plans a thousand-item
# list on every page; `col = ANY(:keys)` sends one array (measured 5.7 ms against 3.4 ms a page).
_ARRAY_TYPES: dict[type, Any] = {str: sa.Text, int: sa.BigInteger}


def one_of(column: Any, keys: Sequence[Any], dialect: str) -> Any:
    """`column IN keys`, as one array parameter on PostgreSQL when the keys are text or integers.

    Keys of several Python types (SQLite holds a float beside text in an untyped column) go as
    one list per type: one list takes the type of its first value, and binding text as a float
    fails the whole query ("could not convert string to float").
    """
    kinds = {type(k) for k in keys}
    if dialect == "postgresql" and len(kinds) == 1 and (kind := kinds.pop()) in _ARRAY_TYPES:
        from sqlalchemy.dialects.postgresql import ARRAY  # here: SQLite-only processes never load it

        return column == sa.any_(sa.bindparam(None, list(keys), type_=ARRAY(_ARRAY_TYPES[kind]())))
    if len(kinds) > 1:
        by_kind: dict[type, list[Any]] = {}
        for key in keys:
            by_kind.setdefault(type(key), []).append(key)
        return sa.or_(*(column.in_(group) for group in by_kind.values()))
    return column.in_(list(keys))


def text_forms(keys: Iterable[Any]) -> list[Any]:
    """The keys, and the SQLite values of other storage classes with the same key text.

    A provided_unique_id is the key's text: integer 1 and text '1' are one customer, and so
    are real 1.5 and text '1.5'. SQLite compares them as different values (an untyped column
    keeps each as written), so a query for rows "with this key" asks for every form of it.
    Blobs are left out: a key stored as a blob is not a key a CRM writes.
    """
    forms: dict[tuple[type, Any], Any] = {}
    for key in keys:
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        forms[(type(key), key)] = key
        forms[(str, text)] = text
        for parse in (int, float):
            try:
                number = parse(text)
            except (ValueError, OverflowError):
                continue
            if str(number) == text:  # only the number whose own text is this key
                forms[(parse, number)] = number
    return list(forms.values())


def binary_arrays(engine: Engine) -> Engine:
    """Have psycopg send Python lists to PostgreSQL as binary arrays; other engines are untouched.

    psycopg's default for a list is a text array, each element quoted and escaped in Python:
    1.5 ms for the 2,000 keys and versions of a page marked queued, against 0.3 ms in binary,
    and the planner sends four such lists a page (lookup, side rows, state upsert). Every array
    crmsync binds carries its SQL type (`::TEXT[]`, `::VARCHAR(255)[]`), so the format changes
    no comparison.
    """
    if engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg":
        sa.event.listen(engine, "connect", _register_binary_lists)
    return engine


def _register_binary_lists(dbapi_connection: Any, _record: Any) -> None:
    from psycopg.types.array import ListBinaryDumper

    # Registered last, it is what psycopg picks for a list under the automatic `%s` placeholder.
    dbapi_connection.adapters.register_dumper(list, ListBinaryDumper)
