"""Streams contacts out of the CRM database in keyset-paginated pages, on any SQLAlchemy dialect.

The mapping's query is wrapped as a derived table, so any SELECT works (joins included).
A page costs one query for the rows, plus one per tag or custom-field query, filtered to the
page's keys: never a query per row, never the whole table in memory.

A page is read raw first (rows and side rows as the driver returned them), then built into
canonical contacts. Between the two, the planner may rule rows out by their fingerprint (a
hash of the raw values), so that an unchanged row is never canonicalised.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..contact import CANONICAL_FORM, Contact, build_contact, is_deleted, key_text, unique_id
from ..errors import ConfigError, InvalidRecord, SourceError
from ..sqlkeys import binary_arrays, one_of, text_forms
from .mapping import Mapping, TicketsSpec, one_statement

log = logging.getLogger(__name__)

# What the errors of the query at a mapping path call it.
_QUERY_NAMES = {
    "source": "source query",
    "tags": "tags query",
    "custom_fields": "custom-field query",
    "tickets": "tickets query",
}


@dataclass(frozen=True)
class InvalidRow:
    """A source row that cannot become a contact, with the reason and what was read of it."""

    key: str | None
    error: InvalidRecord
    row: dict[str, Any]


@dataclass
class RawPage:
    """One page as read: the rows, and the side rows (tags, queried fields) grouped by key text."""

    rows: list[dict[str, Any]]
    tags: dict[str, list[tuple[Any, ...]]]
    fields: dict[str, list[tuple[Any, ...]]]
    last: tuple[Any, Any] | None = None
    max_updated: Any = None
    # Rows of the whole source by key text, for the page's keys, where the page alone cannot tell.
    source_counts: dict[str, int] = field(default_factory=dict)
    # Page key text -> side rows the database matched to it whose key text differs (see
    # `SourceReader._strays`): (the mapping part, `tags` or `custom_fields`; the query, as
    # `file:line: the tags query`; the rows' key text).
    strays: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Keys:
    """How a page matches its keys as text (the provided_unique_id they become).

    `mixed`: the column holds keys of several SQLite storage classes, so a key is also looked
    for in its other forms (1 as '1', see `text_forms`); `count`: the page counts the rows of
    its keys in the whole source (see `SourceReader._keys`).
    """

    column: Any
    mixed: bool = False
    count: bool = False

    def copies(self, conn: sa.Connection, raw_keys: Sequence[Any]) -> dict[str, int]:
        """How many rows of the whole source hold each of these keys, by key text: one query."""
        wanted = text_forms(raw_keys) if self.mixed else list(raw_keys)
        query = sa.select(self.column).where(one_of(self.column, wanted, conn.dialect.name))
        try:
            found = _fetch(conn, query)[1]
        except sa.exc.SQLAlchemyError as exc:
            raise SourceError(f"reading contacts failed: {_reason(exc)}") from None
        # Grouped here, not by the database: MariaDB's collation would count `x` and `X` as one.
        return dict(Counter(key_text(row[0]) for row in found))


_Page = TypeVar("_Page")


@dataclass(frozen=True)
class TicketPage:
    """One page of the tickets query: its cases, and the case keys it holds more than once."""

    cases: list[tuple[str, str, str | None]]
    duplicated: dict[str, int]  # case key -> how many cases the query holds with it


@dataclass
class Page:
    """One page of contacts, in the order read; `last` is the keyset position after it.

    `fingerprints` holds the fingerprint of each built contact's raw row, when asked for;
    `ruled_out` counts the rows the caller's verdict kept from being built, by verdict.
    """

    contacts: list[Contact] = field(default_factory=list)
    invalid: list[InvalidRow] = field(default_factory=list)
    deleted: list[Contact] = field(default_factory=list)
    last: tuple[Any, Any] | None = None
    max_updated: Any = None
    fingerprints: dict[str, str] = field(default_factory=dict)
    ruled_out: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.contacts) + len(self.invalid) + len(self.deleted) + sum(self.ruled_out.values())


# Given a contact's key and its row's fingerprint: a reason not to build it ("unchanged"), or None.
Verdict = Callable[[str, str], str | None]


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if v is None or isinstance(v, bool | int | float | str):
            out[k] = v if not isinstance(v, str) else v[:500]
        else:
            out[k] = str(v)[:500]
    return out


class SourceReader:
    """Reads the contacts that `mapping` describes from `engine`."""

    def __init__(self, engine: Engine, mapping: Mapping, batch_size: int = 1000) -> None:
        self.engine = engine
        self.mapping = mapping
        self.batch_size = batch_size
        self._columns: list[str] | None = None
        self._side_columns: dict[str, list[str]] = {}
        self._verified = False

    # -- shape ---------------------------------------------------------------------------------

    def _probe(self, sql: str, loc: tuple[str | int, ...]) -> list[str]:
        """Column names of the query at `loc` of the mapping, without reading a row."""
        probe = sa.text(f"SELECT * FROM ({sql}) AS probe WHERE 1 = 0")
        with self._connect() as conn:
            try:
                return list(conn.execute(probe).keys())
            except sa.exc.SQLAlchemyError as exc:
                raise SourceError(f"{self._query_at(loc)} failed: {_reason(exc)}") from None

    def _query_at(self, loc: tuple[str | int, ...]) -> str:
        """`file:line: the tags query` (say) for the query at `loc`: where its errors point."""
        return f"{self.mapping.where(loc)}: the {_QUERY_NAMES[str(loc[0])]}"

    def columns(self) -> list[str]:
        """The columns the contact query returns."""
        if self._columns is None:
            src = self.mapping.source
            self._columns = self._probe(src.select_sql(), ("source", "query" if src.query else "table"))
        return self._columns

    def _side_names(self, sql: str, loc: tuple[str | int, ...]) -> list[str]:
        """The columns a tag, custom-field or tickets query returns (probed once per reader)."""
        names = self._side_columns.get(sql)
        if names is None:
            names = self._side_columns[sql] = self._probe(one_statement(sql), loc)
        return names

    def faults(self) -> list[str]:
        """Every column the mapping names that its query does not return, as `file:line: ...`.

        Empty when the source returns all of them. A query that fails raises SourceError
        naming its line. Never reads a row.
        """
        mapping = self.mapping
        columns = self.columns()
        faults = [
            f"{mapping.where(loc)}: column {col!r} is not returned by the source query (it returns: {_listed(columns)})"
            for col, loc in mapping.columns_used()
            if col not in columns
        ]
        for sql, loc, needed in mapping.side_queries():
            names = self._side_names(sql, loc)
            if len(names) < len(needed):
                faults.append(
                    f"{self._query_at(loc)} returns {len(names)} columns ({_listed(names)}); it must return "
                    f"{len(needed)}: {', '.join(needed)}, in that order"
                )
        if spec := mapping.tickets:
            names = self._side_names(spec.query, ("tickets", "query"))
            faults.extend(
                f"{mapping.where(('tickets', attr))}: column {col!r} is not returned by the tickets query "
                f"(it returns: {_listed(names)})"
                for attr in ("key", "subject", "customer")
                if (col := getattr(spec, attr)) not in names
            )
        return faults

    def verify(self) -> None:
        """Refuse (ConfigError) a mapping that names a column its query does not return.

        Every read goes through here first, so a missing column is never read as NULL: a
        mapping typo stops the run at its line instead of blanking a field in Proto. Checked
        once per reader (each run builds its own).
        """
        if self._verified:
            return
        if faults := self.faults():
            raise ConfigError("\n".join(faults))
        self._verified = True

    def _contacts_table(self) -> sa.Subquery:
        self.verify()
        src = self.mapping.source
        # SQLite keeps a datetime as the text its writer chose ("2026-06-01 00:00:00", with or without
        # a fraction or a "T"): it is read as that text, so the keyset binds back exactly what it
        # read (a reparsed value, bound with a fraction, never equals text written without one),
        # and is parsed where a moment is needed (`moment`). Other drivers return datetimes.
        typed = self.engine.dialect.name != "sqlite"
        cols = [sa.column(c, sa.DateTime()) if typed and c == src.updated_at else sa.column(c) for c in self.columns()]
        return sa.text(src.select_sql()).columns(*cols).subquery("src")

    def _since_bound(self, since: Any) -> Any:
        """`since` as the updated_at column compares it: on SQLite, text shaped as the CRM writes it.

        SQLite compares the stored text; `since` written in another shape ("T" for " ", another
        number of decimals) would compare wrong at its own second (rows there missed) or over a
        whole day ("T" sorts after " "). So it takes the shape of a stored value: the separator,
        the decimals (cut, never rounded up: a bound a little early only re-reads a row).
        """
        if self.engine.dialect.name != "sqlite" or not isinstance(since, dt.datetime):
            return since
        if since.tzinfo is not None:
            since = since.astimezone(dt.UTC).replace(tzinfo=None)
        shape = _TEXT_SHAPE.match(self._stored_sample or "")
        if shape is None:
            return since
        separator, decimals, zone = shape.group(1), len(shape.group(2) or ".") - 1, shape.group(3)
        text = since.strftime(f"%Y-%m-%d{separator}%H:%M:%S")
        if decimals:
            text += "." + f"{since.microsecond:06d}"[:decimals].ljust(decimals, "0")
        return text + (zone if zone in ("Z", "+00:00") else "")

    @functools.cached_property
    def _stored_sample(self) -> str | None:
        """One updated_at as SQLite stores it (the newest), or None when not text."""
        src = self.mapping.source
        table = self._contacts_table()
        column = table.c[src.updated_at]  # type: ignore[index]
        with self._connect() as conn:
            value = conn.execute(sa.select(column).where(column.is_not(None)).order_by(column.desc()).limit(1)).scalar()
        return value if isinstance(value, str) else None

    @functools.cached_property
    def fingerprint_salt(self) -> bytes:
        """What besides the raw values decides a contact: the mapping and the canonical form."""
        parts = sorted(self.mapping.part_fingerprints().items())
        return f"{CANONICAL_FORM}:{parts}".encode()

    # -- reading -------------------------------------------------------------------------------

    def max_updated(self) -> Any:
        """The largest updated_at in the source now (None without one): a full read's signpost.

        A full read goes in key order, so a row changed while it runs may sit on a page already
        read; its watermark must stop at what existed when it started.
        """
        src = self.mapping.source
        if not src.updated_at:
            return None
        table = self._contacts_table()
        with self._connect() as conn:
            try:
                return moment(conn.execute(sa.select(sa.func.max(table.c[src.updated_at]))).scalar())
            except sa.exc.SQLAlchemyError as exc:
                raise SourceError(f"reading contacts failed: {_reason(exc)}") from None

    def pages(self, since: Any = None, keys: Sequence[Any] | None = None) -> Iterator[Page]:
        """Every contact, page by page, built (see `raw_pages` for what is read)."""
        for raw in self.raw_pages(since=since, keys=keys):
            yield self.build_page(raw)

    def key_splits(self, parts: int, min_rows: int) -> list[Any]:
        """Keys that cut the keyed rows into `parts` ranges of equal size, in key order.

        None when there are fewer than `min_rows` rows a part: not worth splitting.
        """
        table = self._contacts_table()
        key_col = table.c[self.mapping.source.key]
        keyed = sa.select(key_col).where(key_col.is_not(None))
        with self._connect() as conn:
            try:
                total = conn.execute(sa.select(sa.func.count()).select_from(keyed.subquery())).scalar() or 0
                if parts < 2 or total < parts * min_rows:
                    return []
                splits: list[Any] = []
                for i in range(1, parts):  # each from the one before: the index is walked once
                    after = keyed.where(key_col > splits[-1]) if splits else keyed
                    step = total * i // parts - total * (i - 1) // parts - (1 if splits else 0)
                    splits.append(conn.execute(after.order_by(key_col).limit(1).offset(step)).scalar())
                return splits
            except sa.exc.SQLAlchemyError as exc:
                raise SourceError(f"reading contacts failed: {_reason(exc)}") from None

    def raw_pages(
        self,
        since: Any = None,
        keys: Sequence[Any] | None = None,
        *,
        start_after: Any = None,
        stop_at: Any = None,
    ) -> Iterator[RawPage]:
        """Every source row with its side rows, page by page, as the driver returned them.

        With `since` (an updated_at value), only rows updated at or after it, in
        (updated_at, key) order; with `keys`, only those keys; otherwise all, in key order,
        or the range of keys after `start_after` up to `stop_at` (see `key_splits`). Rows
        without a key come last, in the range that has no `start_after`.

        A page tells, in `source_counts`, how many rows the whole source holds of each of its
        keys wherever the page alone cannot tell (see `_counted`): a key held twice is a
        duplicate whichever of its rows a run reads.
        """
        src = self.mapping.source
        table = self._contacts_table()
        key_col = table.c[src.key]
        if keys is not None:
            yield from self._pages_of_keys(table, key_col, keys)
            return
        base = sa.select(table).where(key_col.is_not(None))
        if since is not None:
            if not src.updated_at:
                raise SourceError("an incremental sync needs `source.updated_at` in the mapping")
            upd_col = table.c[src.updated_at]
            order = [upd_col, key_col]
            base = base.where(upd_col >= self._since_bound(since))
        else:
            order = [key_col]
        if start_after is not None:
            base = base.where(key_col > start_after)
        if stop_at is not None:
            base = base.where(key_col <= stop_at)
        counted = self._keys(table, key_col, incremental=since is not None)

        def read(conn: sa.Connection, query: sa.Select[Any]) -> RawPage:
            page = self._read_page(conn, query, counted)
            if page.rows:
                last = page.rows[-1]
                page.last = (last[src.updated_at] if since is not None and src.updated_at else None, last[src.key])
            return page

        for page in self._keyset_pages(base, order, read):
            if page.rows:
                yield page
        if start_after is None:
            yield from self._keyless_pages(table, key_col, since)

    def _pages_of_keys(self, table: sa.Subquery, key_col: Any, keys: Sequence[Any]) -> Iterator[RawPage]:
        """The rows of the given keys (a replay), a page of keys at a time.

        Keys come as text (provided_unique_ids) and are compared as text, whatever the column
        type: every row of a key is on the page of that key, so the page counts its copies.
        """
        keys_of = self._keys(table, key_col, incremental=False)
        for i in range(0, len(keys), self.batch_size):
            wanted = [str(k) for k in keys[i : i + self.batch_size]]
            query = sa.select(table).where(sa.cast(key_col, sa.String(255)).in_(wanted)).order_by(key_col)
            with self._connect() as conn:
                yield self._read_page(conn, query, replace(keys_of, count=False))

    def _keyset_pages(
        self,
        base: sa.Select[Any],
        order: list[Any],
        read: Callable[[sa.Connection, sa.Select[Any]], _Page],
        what: str = "reading contacts",
    ) -> Iterator[_Page]:
        """The rows of `base` in `order`, a page at a time, each read by `read` on one connection.

        A page is a closed range of positions, after the last page's edge up to its own, both
        as the database compares them: its edge is the position of its `batch_size`-th row,
        and every row the database holds equal to the edge is on the page. The database may
        hold equal what differs in Python (MariaDB's collations: `x`, `X` and `x `), and
        rows it holds equal come in no set order: a boundary between them would skip some and
        repeat others, for ever when there are more of them than a page. So a boundary never
        falls between them, the next page starts past them, and the read always advances. A
        page is longer than `batch_size` only by such rows.
        """
        after: tuple[Any, ...] | None = None
        while True:
            query = base if after is None else base.where(_past(order, after))
            edge_query = query.with_only_columns(*order).order_by(*order).offset(self.batch_size - 1).limit(1)
            with self._connect() as conn:
                try:
                    found = _fetch(conn, edge_query)[1]
                except sa.exc.SQLAlchemyError as exc:
                    raise SourceError(f"{what} failed: {_reason(exc)}") from None
                edge = tuple(found[0]) if found else None
                page = read(conn, (query if edge is None else query.where(_up_to(order, edge))).order_by(*order))
            # Yielded once the connection is back in the pool: the CRM holds no transaction (nor,
            # on MariaDB, metadata locks) while the page is planned, nor after a planner stopped.
            yield page
            if edge is None:
                return
            after = edge

    def _keys(self, table: sa.Subquery, key_col: Any, *, incremental: bool) -> _Keys:
        """What a page must do to match its keys as text: count their copies elsewhere or not.

        A full read in key order has every row the database holds equal to a key on that key's
        page (see `_keyset_pages`), and on PostgreSQL and MariaDB a key column has one type, so
        rows of one key text are equal there: the page sees all the copies. Not so for an
        incremental read (only changed rows, in updated_at order), nor on SQLite when the key
        column mixes storage classes (1 and '1': numbers sort before text). Those pages count
        their keys' rows in the whole source, with one query on the key column.
        """
        mixed = self._mixed_classes(table, key_col)
        return _Keys(key_col, mixed, count=incremental or mixed)

    def _mixed_classes(self, table: sa.Subquery, key_col: Any) -> bool:
        """Whether SQLite holds keys of several storage classes in the column (numbers and text).

        SQLite orders numbers before text and text before blobs: the smallest and the largest
        key tell, two lookups on the column's index.
        """
        if self.engine.dialect.name != "sqlite":
            return False
        keyed = sa.select(key_col).where(key_col.is_not(None)).limit(1)
        with self._connect() as conn:
            try:
                ends = [_fetch(conn, keyed.order_by(o))[1] for o in (key_col.asc(), key_col.desc())]
            except sa.exc.SQLAlchemyError as exc:
                raise SourceError(f"reading contacts failed: {_reason(exc)}") from None
        classes = {_storage_class(rows[0][0]) for rows in ends if rows}
        return len(classes) > 1

    def _keyless_pages(self, table: sa.Subquery, key_col: Any, since: Any) -> Iterator[RawPage]:
        """The rows whose key is NULL, as pages of invalid rows (by offset: they have no keyset)."""
        query = sa.select(table).where(key_col.is_(None))
        if since is not None:
            upd_col = table.c[self.mapping.source.updated_at]  # type: ignore[index]
            query = query.where(upd_col >= self._since_bound(since)).order_by(upd_col)
        offset = 0
        while True:
            with self._connect() as conn:
                page = self._read_page(conn, query.limit(self.batch_size).offset(offset), _Keys(key_col))
            if not page.rows:
                return
            yield page
            if len(page.rows) < self.batch_size:
                return
            offset += len(page.rows)

    def _read_page(self, conn: sa.Connection, query: sa.Select[Any], counted: _Keys) -> RawPage:
        """The rows of `query` and their side rows, on one connection (one checkout a page)."""
        try:
            names, fetched = _fetch(conn, query)
        except sa.exc.SQLAlchemyError as exc:
            raise SourceError(f"reading contacts failed: {_reason(exc)}") from None
        rows = [dict(zip(names, row, strict=True)) for row in fetched]
        return self._raw_page(conn, rows, counted)

    def _raw_page(self, conn: sa.Connection, rows: list[dict[str, Any]], counted: _Keys) -> RawPage:
        src = self.mapping.source
        raw_keys = [r[src.key] for r in rows if r.get(src.key) is not None]
        mixed = counted.mixed
        tags: dict[str, list[tuple[Any, ...]]] = {}
        fields: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        strays: list[tuple[tuple[str | int, ...], Any]] = []
        for sql, loc, _ in self.mapping.side_queries():
            side = self._side_rows(conn, sql, loc, raw_keys, mixed, strays)
            if loc[0] == "tags":
                tags = side
            else:
                for k, vals in side.items():
                    fields[k].extend(vals)
        page = RawPage(rows, tags, fields)
        if counted.count and raw_keys:
            page.source_counts = counted.copies(conn, raw_keys)
        if strays:
            page.strays = self._strays(conn, counted, raw_keys, strays)
        if src.updated_at:
            for row in rows:
                upd = moment(row.get(src.updated_at))
                if isinstance(upd, dt.datetime) and (page.max_updated is None or _later(upd, page.max_updated)):
                    page.max_updated = upd
        return page

    def build_page(self, raw: RawPage, verdict: Verdict | None = None) -> Page:
        """Canonical contacts of a raw page, with its invalid rows and their reasons.

        With `verdict`, each row's fingerprint is taken first, and a row the verdict rules out
        is counted under its reason instead of built; the fingerprints of the built contacts
        are kept on the page.
        """
        src = self.mapping.source
        page = Page(last=raw.last, max_updated=raw.max_updated)
        no_side: list[tuple[Any, ...]] = []
        copies = Counter(key_text(r[src.key]) for r in raw.rows if r.get(src.key) is not None)
        for text, held in raw.source_counts.items():
            copies[text] = max(copies[text], held)
        for row in raw.rows:
            raw_key = row.get(src.key)
            skey = None if raw_key is None else key_text(raw_key)
            tags = raw.tags.get(skey, no_side) if skey is not None else no_side
            fields = raw.fields.get(skey, no_side) if skey is not None else no_side
            try:
                if skey is not None and copies[skey] > 1:
                    unique_id(raw_key)  # a key that cannot be sent says so first
                    # No row of the key wins: which one a run would send depends on its order
                    # (key or updated_at) and its page size, and each run would undo the last.
                    raise InvalidRecord(
                        "duplicate_key",
                        f"key {skey!r} is held by {copies[skey]} rows of the source: "
                        "none of them is sent until only one is left",
                        "source.key",
                    )
                if skey is not None and skey in raw.strays:
                    raise _unattributed(skey, raw.strays[skey])
                fingerprint = None
                if verdict is not None and skey is not None:
                    fingerprint = row_fingerprint(row, tags, fields, self.fingerprint_salt)
                    reason = verdict(skey, fingerprint)
                    # A deleted row is always built: it is counted as deleted, whatever its fate.
                    if reason is not None and not is_deleted(self.mapping, row):
                        page.ruled_out[reason] = page.ruled_out.get(reason, 0) + 1
                        continue
                contact = build_contact(
                    self.mapping,
                    row,
                    tags=[t[0] for t in tags if t[0] is not None],
                    extra_fields=fields,  # names as read: build_contact refuses a NULL or bad one
                )
            except InvalidRecord as exc:
                page.invalid.append(InvalidRow(skey, exc, _json_safe(row)))
                continue
            if fingerprint is not None:
                page.fingerprints[contact.key] = fingerprint
            (page.deleted if contact.deleted else page.contacts).append(contact)
        return page

    def tickets(self, spec: TicketsSpec) -> Iterator[TicketPage]:
        """The cases of the `tickets:` query as (key, subject, customer key), in keyset pages.

        Each page says which of its case keys the query holds more than once (compared as
        text, like contact keys): no ticket can be opened for such a key, whichever case it is.
        """
        self.verify()
        names = self._side_names(spec.query, ("tickets", "query"))
        table = sa.text(one_statement(spec.query)).columns(*[sa.column(n) for n in names]).subquery("cases")
        key = table.c[spec.key]
        keys_of = self._keys(table, key, incremental=False)
        base = sa.select(key, table.c[spec.subject], table.c[spec.customer]).where(key.is_not(None))

        def read(conn: sa.Connection, query: sa.Select[Any]) -> TicketPage:
            try:
                rows: Sequence[Any] = _fetch(conn, query)[1]
            except sa.exc.SQLAlchemyError as exc:
                raise SourceError(f"{self._query_at(('tickets', 'query'))} failed: {_reason(exc)}") from None
            cases = [(key_text(k), str(s or ""), None if c is None else key_text(c)) for k, s, c in rows]
            copies = Counter(k for k, _, _ in cases)
            if keys_of.count and rows:
                for text, held in keys_of.copies(conn, [r[0] for r in rows]).items():
                    copies[text] = max(copies[text], held)
            return TicketPage(cases, {k: n for k, n in copies.items() if n > 1})

        for page in self._keyset_pages(base, [key], read, what="the tickets query"):
            if page.cases:
                yield page

    def _side_rows(
        self,
        conn: sa.Connection,
        sql: str,
        loc: tuple[str | int, ...],
        raw_keys: list[Any],
        mixed: bool,
        strays: list[tuple[tuple[str | int, ...], Any]],
    ) -> dict[str, list[tuple[Any, ...]]]:
        """Rows of the `(key, ...)` query at `loc` for the given keys, grouped by key text.

        Matched as the text the key becomes (the provided_unique_id): the database finds the
        candidates on its own terms (every form of a key on SQLite when the key column mixes
        storage classes; `X` for `x` under MariaDB's collations), and only a side row whose
        key has exactly a page key's text belongs to it. The key of each other row the
        database found (one per key text) is added to `strays`, with `loc`: see `_strays`.
        """
        if not raw_keys:
            return {}
        names = self._side_names(sql, loc)
        side = sa.text(one_statement(sql)).columns(*[sa.column(n) for n in names]).subquery("side")
        wanted = text_forms(raw_keys) if mixed else raw_keys
        query = sa.select(*side.c).where(one_of(side.c[names[0]], wanted, self.engine.dialect.name))
        out: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        page_texts = {key_text(k) for k in raw_keys}
        stray_texts: set[str] = set()
        try:
            for row in _fetch(conn, query)[1]:
                if row[0] is None:
                    continue
                text = key_text(row[0])
                if text in page_texts:
                    out[text].append(tuple(row[1:]))
                elif text not in stray_texts:
                    stray_texts.add(text)
                    strays.append((loc, row[0]))
        except sa.exc.SQLAlchemyError as exc:
            raise SourceError(f"{self._query_at(loc)} failed: {_reason(exc)}") from None
        return out

    def _strays(
        self,
        conn: sa.Connection,
        counted: _Keys,
        raw_keys: list[Any],
        strays: list[tuple[tuple[str | int, ...], Any]],
    ) -> dict[str, list[tuple[str, str, str]]]:
        """The page's contacts that side rows without an owner of their exact key text belong to.

        The database matched each stray row to a page key on its own terms (DECIMAL 2.00 is
        INTEGER 2, PostgreSQL's CHAR(5) 'k1   ' is 'k1', MariaDB's collations hold 'X' equal
        to 'x'), but a key is its exact text: sending the contact without those rows would lose
        them without a word. A stray whose text is another contact's key (MariaDB's 'X' rows,
        read for 'x' while 'X' is on no page of this run) is that contact's and is left alone;
        each other stray goes to the page keys it equals as the database compares (see
        `_loose_forms`), which are then refused (`_unattributed`). One query, on a page with
        strays only.
        """
        texts = sorted({key_text(raw) for _, raw in strays})
        # Compared as text, like a replay's keys: no type of the key column can fail this lookup.
        query = sa.select(counted.column).where(sa.cast(counted.column, sa.String(255)).in_(texts))
        try:
            owned = {key_text(row[0]) for row in _fetch(conn, query)[1] if row[0] is not None}
        except sa.exc.SQLAlchemyError as exc:
            raise SourceError(f"reading contacts failed: {_reason(exc)}") from None
        by_form: dict[tuple[str, Any], set[str]] = defaultdict(set)
        for key in raw_keys:
            for form in _loose_forms(key):
                by_form[form].add(key_text(key))
        out: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for loc, raw in strays:
            text = key_text(raw)
            if text in owned:
                continue
            where = self._query_at(loc)
            matched = set().union(*(by_form.get(form, set()) for form in _loose_forms(raw)))
            if not matched:  # a comparison `_loose_forms` does not know (an accent-blind collation...)
                log.warning(
                    "%s returned rows keyed %r, which the database matched to a contact whose key text "
                    "differs; they are not sent: cast the key column in that query so it reads as the key",
                    where,
                    text,
                )
            for owner in sorted(matched):
                out[owner].append((str(loc[0]), where, text))
        return dict(out)

    def _connect(self) -> sa.Connection:
        try:
            return self.engine.connect()
        except sa.exc.SQLAlchemyError as exc:
            raise SourceError(f"cannot connect to the source database: {_reason(exc)}") from None


def _fetch(conn: sa.Connection, query: Any) -> tuple[list[str], Sequence[sa.Row[Any]]]:
    """The column names and every row of `query` (fetchall: row by row costs twice as much).

    SQLite fails a whole query over one text value that is not UTF-8; that query is read again
    with such values as bytes, so that only their rows are refused (invalid_utf8), not the page.
    """
    try:
        result = conn.execute(query)
        return list(result.keys()), result.fetchall()
    except sa.exc.OperationalError as exc:
        if conn.dialect.name != "sqlite" or "decode to UTF-8" not in str(exc.orig):
            raise
    sqlite = conn.connection.dbapi_connection
    sqlite.text_factory = _text_or_bytes  # type: ignore[union-attr]
    try:
        result = conn.execute(query)
        return list(result.keys()), result.fetchall()
    finally:
        sqlite.text_factory = str  # type: ignore[union-attr]


def _past(order: list[Any], position: tuple[Any, ...]) -> Any:
    """`order`'s columns after `position`, compared as the database compares them."""
    if len(order) == 1:
        return order[0] > position[0]
    return sa.or_(order[0] > position[0], sa.and_(order[0] == position[0], order[1] > position[1]))


def _up_to(order: list[Any], position: tuple[Any, ...]) -> Any:
    """`order`'s columns up to `position` included, compared as the database compares them."""
    if len(order) == 1:
        return order[0] <= position[0]
    return sa.or_(order[0] < position[0], sa.and_(order[0] == position[0], order[1] <= position[1]))


def _storage_class(value: Any) -> str:
    """SQLite's storage class of a value as the driver returned it (int and float: numbers)."""
    if isinstance(value, int | float):
        return "number"
    return "blob" if isinstance(value, bytes) else "text"


def _loose_forms(value: Any) -> set[tuple[str, Any]]:
    """What a key value equals as databases compare keys, beyond its exact text.

    Numbers by value (DECIMAL 2.00, REAL 2.0 and INTEGER 2; text that reads as a number too, as
    MySQL and SQLite's affinities compare it), text without trailing spaces (CHAR padding,
    PAD SPACE collations), case and accents (MariaDB's `_ci` collations). Wider than any one
    database: it only picks, among the contacts a database matched a side row to, which.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    forms: set[tuple[str, Any]] = set()
    number: Decimal | None = None
    if isinstance(value, int | float | Decimal):
        number = Decimal(value)
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            number = None
    if number is not None and number.is_finite():
        forms.add(("number", number))
    text = unicodedata.normalize("NFKD", str(value))
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold().rstrip(" ")
    forms.add(("text", text))
    return forms


def _unattributed(key: str, strays: Sequence[tuple[str, str, str]]) -> InvalidRecord:
    """The letter of a contact that side rows the database matched to it could not be given to."""
    shown = "; ".join(f"{where} returned rows keyed {text!r}" for _, where, text in strays[:3])
    more = f" (and {len(strays) - 3} more)" if len(strays) > 3 else ""
    fields = sorted({part for part, _, _ in strays})
    return InvalidRecord(
        "side_key_mismatch",
        f"{shown}{more}, which the database matches to key {key!r} but whose text is not {key!r}: "
        "the contact is not sent without them. Cast the key column in that query so it reads as "
        "the same text as source.key (the same type, no CHAR padding, the same case)",
        ", ".join(fields),
    )


def _text_or_bytes(value: bytes) -> str | bytes:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def row_fingerprint(
    row: dict[str, Any], tags: Sequence[tuple[Any, ...]], fields: Sequence[tuple[Any, ...]], salt: bytes = b""
) -> str:
    """A hash of a row's raw values and side rows: equal fingerprints build equal contacts.

    Taken from the values' repr, which is stable for what drivers return (str, numbers,
    Decimal, datetime, bytes); a value whose repr is not (an object shown by its address)
    only makes the row look changed, which costs a build, never a missed change. Side rows
    come in no set order, so they are sorted first. The salt carries the mapping and the
    canonical form, so a changed mapping or canonical form never matches an old fingerprint.
    """
    side = (sorted(map(repr, tags)), sorted(map(repr, fields))) if tags or fields else None
    blob = repr((tuple(row.values()), side)).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(salt + b"\0" + blob, digest_size=16).hexdigest()


def earlier_of(a: Any, b: Any) -> Any:
    """The earlier of two updated_at values (naive beside aware compared as UTC); a non-datetime loses."""
    if not isinstance(b, dt.datetime):
        return a
    if not isinstance(a, dt.datetime):
        return b
    return b if _later(a, b) else a


# ISO text as SQLite holds a datetime: separator, decimals, zone.
_TEXT_SHAPE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ])\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?$")


def moment(value: Any) -> Any:
    """An updated_at value as a datetime: ISO text (SQLite's) parsed; anything unparseable as it is."""
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    return value


def later_of(a: Any, b: Any) -> Any:
    """The later of two updated_at values (naive beside aware compared as UTC); None loses."""
    if b is None:
        return a
    if a is None:
        return b
    return b if _later(b, a) else a


def _later(a: dt.datetime, b: dt.datetime) -> bool:
    try:
        return a > b
    except TypeError:  # naive beside aware: compare as UTC
        return a.replace(tzinfo=a.tzinfo or dt.UTC) > b.replace(tzinfo=b.tzinfo or dt.UTC)


def _listed(columns: Sequence[str]) -> str:
    return ", ".join(sorted(columns)) or "nothing"


def _reason(exc: sa.exc.SQLAlchemyError) -> str:
    """The driver's message, without the SQL text or bound parameters (which may hold data)."""
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else str(exc).split("\n")[0]
    return text.strip().split("\n")[0][:300]


# The statement each dialect runs on every new source connection, so that the database itself
# refuses any write on it: whatever a mapping's query holds, its session can only read (with
# psycopg, each transaction is begun read only instead: `_psycopg_read_only`). A SELECT cannot
# turn this off (a `set_config` is undone by the rollback that ends each read); only a second
# statement could, and the mapping refuses those (`one_statement`).
_READ_ONLY = {
    "sqlite": "PRAGMA query_only = ON",
    "postgresql": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "mysql": "SET SESSION TRANSACTION READ ONLY",
    "mariadb": "SET SESSION TRANSACTION READ ONLY",
}


class _OneStatementCursor(psycopg.Cursor[Any]):
    """A psycopg cursor that sends every query by the extended protocol, whose Parse message
    holds one statement: PostgreSQL itself refuses a second one ("cannot insert multiple
    commands into a prepared statement"), whatever quoting fooled `one_statement`.

    psycopg sends a query without parameters by the simple protocol, which runs any number of
    statements: a smuggled `COMMIT; UPDATE ...` would end the read-only transaction and write.
    """

    def _execute_send(self, query: Any, *, force_extended: bool = False, binary: bool | None = None) -> None:
        super()._execute_send(query, force_extended=True, binary=binary)


def _psycopg_read_only(dbapi_connection: Any, _record: Any) -> None:
    """psycopg (3) begins every transaction `BEGIN READ ONLY`: read only with no session state,
    so it also holds behind a transaction-pooling PgBouncer, where a session setting would reach
    another client's connection and miss ours. Its cursors run one statement per query."""
    dbapi_connection.read_only = True
    dbapi_connection.cursor_factory = _OneStatementCursor


def source_engine(url: str) -> Engine:
    """An engine for the CRM database: read-only sessions, small pool, pre-ping.

    Every connection it opens is read only, enforced by the database (see `_READ_ONLY`); a
    dialect crmsync cannot make read only is refused.
    """
    try:
        engine = (
            sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)
            if not url.startswith("sqlite")
            else sa.create_engine(url)
        )
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise SourceError(f"CRMSYNC_SOURCE_URL is not a usable database URL: {exc}") from None
    read_only = _READ_ONLY.get(engine.dialect.name)
    if read_only is None:
        raise ConfigError(
            f"CRMSYNC_SOURCE_URL: crmsync reads only SQLite, PostgreSQL and MySQL/MariaDB sources, "
            f"which it can open read only; not {engine.dialect.name}"
        )
    binary_arrays(engine)
    if engine.dialect.name in ("mysql", "mariadb"):
        # MySQL and MariaDB return TIMESTAMP columns in the session's time zone, without saying
        # which: in UTC they are what crmsync takes naive times to be, and no summer time moves them.
        sa.event.listen(engine, "connect", _utc_session)
    if engine.dialect.driver == "psycopg":
        sa.event.listen(engine, "connect", _psycopg_read_only)
    else:
        sa.event.listen(engine, "connect", functools.partial(_session_setup, read_only))
    return engine


def _utc_session(dbapi_connection: Any, _record: Any) -> None:
    _session_setup("SET time_zone = '+00:00'", dbapi_connection, _record)


def _session_setup(statement: str, dbapi_connection: Any, _record: Any) -> None:
    """Run `statement` on a new DBAPI connection and commit it (psycopg opened a transaction for it)."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(statement)
    finally:
        cursor.close()
    dbapi_connection.commit()
