"""Reads and writes of the state database, in batches where the hot paths need them.

The planner looks a page of keys up in one query and marks a page queued in one upsert;
a task reads one row and writes one row. Nothing here calls the API or the CRM.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..proto import CustomField
from ..settings import DEFAULT_DEGRADED_THRESHOLD, DEFAULT_PLAN_LEASE
from ..sqlkeys import one_of
from .models import CustomerSyncState, CustomFieldRecord, DeadLetter, Lock, SyncCursor, SyncRun, Ticket, utcnow

STATE = cast(sa.Table, CustomerSyncState.__table__)
RUNS = cast(sa.Table, SyncRun.__table__)
DEAD = cast(sa.Table, DeadLetter.__table__)
CURSORS = cast(sa.Table, SyncCursor.__table__)
FIELDS = cast(sa.Table, CustomFieldRecord.__table__)
LOCKS = cast(sa.Table, Lock.__table__)
TICKETS = cast(sa.Table, Ticket.__table__)

OPEN_STATUSES = ("planning", "running")
RUN_COUNTS = (
    "read",
    "changed",
    "enqueued",
    "unchanged",
    "invalid",
    "deleted",
    "synced",
    "skipped",
    "failed",
    "dead",
)


@dataclass(frozen=True)
class PartHashes:
    """What crmsync last sent to Proto for one customer."""

    profile: str | None
    tags: str | None
    fields: str | None
    source_version: str | None
    status: str
    failed_hash: str | None
    planned_version: str | None = None  # the version the latest plan of this customer read
    fingerprint: str | None = None  # the raw row's fingerprint when it was last synced

    def unchanged_since_synced(self, fingerprint: str) -> bool:
        """Whether Proto holds the contact of a source row with this fingerprint."""
        return self.status == "synced" and self.fingerprint == fingerprint

    def get(self, part: str) -> str | None:
        """The synced hash of `part` (profile, tags or fields)."""
        value: str | None = getattr(self, part)
        return value


# What a lookup reads of a customer: the key, then PartHashes' fields in order.
_LOOKUP_COLUMNS = (
    STATE.c.provided_unique_id,
    STATE.c.profile_hash,
    STATE.c.tags_hash,
    STATE.c.fields_hash,
    STATE.c.source_version,
    STATE.c.status,
    STATE.c.failed_hash,
    STATE.c.planned_version,
    STATE.c.source_fingerprint,
)
# A sync task's two statements (its customer's lookup, its outcome), built once: building them
# for every task was a tenth of a worker's CPU at 200 calls/s (BENCHMARKS.md, rate limit).
_LOOKUP_ONE = sa.select(*_LOOKUP_COLUMNS).where(STATE.c.provided_unique_id == sa.bindparam("key"))
_OUTCOME_COLUMNS = ("status", "last_error", "updated_at", "profile_hash", "tags_hash", "fields_hash", "failed_hash")
_SYNCED_COLUMNS = ("source_version", "synced_at", "source_fingerprint")


def _outcome_update(synced: bool) -> sa.Update:
    names = _OUTCOME_COLUMNS + (_SYNCED_COLUMNS if synced else ())
    return (
        STATE.update()
        .where(STATE.c.provided_unique_id == sa.bindparam("key"))
        .values(attempts=STATE.c.attempts + 1, **{n: sa.bindparam(n, type_=STATE.c[n].type) for n in names})
    )


_OUTCOME_UPDATES = {synced: _outcome_update(synced) for synced in (False, True)}


def _upsert(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]], keys: Sequence[str]) -> None:
    """Insert rows, or update the ones whose `keys` exist, in one statement per dialect."""
    if not rows:
        return
    cols = tuple(c for c in rows[0] if c not in keys)
    conn.execute(_upsert_statement(conn.dialect.name, table, cols, tuple(keys)), rows)


@functools.lru_cache(maxsize=64)
def _upsert_statement(dialect: str, table: sa.Table, cols: tuple[str, ...], keys: tuple[str, ...]) -> Any:
    """The upsert of `cols` keyed on `keys`, built once: the planner writes one per page."""
    stmt: Any
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(table)
        return stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in cols})
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(table)
        return stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in cols})
    if dialect in ("mysql", "mariadb"):
        from sqlalchemy.dialects.mysql import insert as mysql_insert

        stmt = mysql_insert(table)
        return stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in cols})
    raise NotImplementedError(f"state DB dialect {dialect} is not supported")  # pragma: no cover


def _bulk_upsert(
    conn: sa.Connection,
    table: sa.Table,
    columns: tuple[str, ...],
    rows: Sequence[tuple[Any, ...]],
    keys: tuple[str, ...],
    constants: dict[str, Any],
    insert_only: tuple[tuple[str, str], ...] = (),
) -> None:
    """Insert or update many rows of `columns` (the conflict `keys` first), each with the same
    `constants` (column: value); `insert_only` holds (column, SQL literal) pairs set on insert
    only (the NOT NULL columns the rows leave out).

    SQLAlchemy's executemany builds and processes one parameter set per row (~8 µs each, most of
    the cost of marking a million contacts queued): here the statement is compiled once per shape
    and the constants are processed once. On PostgreSQL the rows go as one array a column in one
    statement (a statement a row cost the server more than the client spent); elsewhere through
    the driver's executemany.
    """
    if not rows:
        return
    shape = (table, columns, keys, tuple(constants), insert_only)
    dialect = conn.dialect
    if dialect.name == "postgresql":
        # One statement may not update a row twice: the last of a key's rows wins, as in executemany.
        unique = list({r[: len(keys)]: r for r in rows}.values())
        params = {f"c{i}": [r[i] for r in unique] for i in range(len(columns))}
        params |= {f"k{i}": value for i, value in enumerate(constants.values())}
        conn.exec_driver_sql(_unnest_upsert_sql(dialect, *shape), params)
        return
    fixed = tuple(_bound(dialect, table.c[c], v) for c, v in constants.items())
    processors = [(i, p) for i, c in enumerate(columns) if (p := _processor(dialect, table.c[c])) is not None]
    if processors:
        rows = [_apply(processors, r) for r in rows]
    conn.exec_driver_sql(_bulk_upsert_sql(dialect, *shape), [(*r, *fixed) for r in rows])


def _processor(dialect: Any, column: sa.Column[Any]) -> Any:
    return column.type.dialect_impl(dialect).bind_processor(dialect)


def _bound(dialect: Any, column: sa.Column[Any], value: Any) -> Any:
    """`value` as the driver takes it for `column` (SQLite takes datetimes as text, say)."""
    process = _processor(dialect, column)
    return process(value) if process is not None else value


def _apply(processors: list[tuple[int, Any]], row: tuple[Any, ...]) -> tuple[Any, ...]:
    out = list(row)
    for i, process in processors:
        out[i] = process(out[i])
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _unnest_upsert_sql(
    dialect: Any,
    table: sa.Table,
    columns: tuple[str, ...],
    keys: tuple[str, ...],
    constants: tuple[str, ...],
    insert_only: tuple[tuple[str, str], ...],
) -> str:
    """PostgreSQL: INSERT ... SELECT FROM unnest(an array a column) ... ON CONFLICT DO UPDATE."""
    quote = dialect.identifier_preparer.quote

    def sql_type(name: str) -> str:
        return str(table.c[name].type.compile(dialect=dialect))

    arrays = ", ".join(f"%(c{i})s::{sql_type(c)}[]" for i, c in enumerate(columns))
    targets = [*columns, *constants, *(c for c, _ in insert_only)]
    values = [
        *(quote(c) for c in columns),
        *(f"%(k{i})s::{sql_type(c)}" for i, c in enumerate(constants)),
        *(literal for _, literal in insert_only),
    ]
    updates = ", ".join(f"{quote(c)} = EXCLUDED.{quote(c)}" for c in [*columns, *constants] if c not in keys)
    return (
        f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in targets)}) "
        f"SELECT {', '.join(values)} FROM unnest({arrays}) AS page ({', '.join(quote(c) for c in columns)}) "
        f"ON CONFLICT ({', '.join(quote(k) for k in keys)}) DO UPDATE SET {updates}"
    )


@functools.lru_cache(maxsize=16)
def _bulk_upsert_sql(
    dialect: Any,
    table: sa.Table,
    columns: tuple[str, ...],
    keys: tuple[str, ...],
    constants: tuple[str, ...],
    insert_only: tuple[tuple[str, str], ...],
) -> str:
    """The upsert for a driver's executemany, its parameters in the order `columns` + `constants`."""
    names = (*columns, *constants)
    base = _upsert_statement(dialect.name, table, tuple(c for c in names if c not in keys), keys)
    values: dict[str, Any] = {c: sa.bindparam(c, type_=table.c[c].type) for c in names}
    values |= {c: sa.literal_column(literal) for c, literal in insert_only}
    compiled = base.values(values).compile(dialect=dialect)
    if compiled.positiontup is None or list(compiled.positiontup) != list(names):
        raise NotImplementedError(f"bulk upserts need a positional driver in column order ({dialect.name})")
    return str(compiled.string)


class StateStore:
    """The state database, as the planner, the tasks and the CLI use it."""

    def __init__(self, engine: Engine, degraded_threshold: float = DEFAULT_DEGRADED_THRESHOLD) -> None:
        self.engine = engine
        self.degraded_threshold = degraded_threshold
        # SQLite takes one writer at a time and its busy handler sleeps in coarse steps:
        # queueing this process's writers on a lock is much faster than letting them collide.
        self._write_lock = threading.Lock() if engine.dialect.name == "sqlite" else None
        self._known_runs: set[str] = set()  # runs are never deleted: a run found stays known

    @contextlib.contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        with self._write_lock or contextlib.nullcontext(), self.engine.begin() as conn:
            yield conn

    # -- customers -------------------------------------------------------------------------------

    def lookup(self, keys: Iterable[str]) -> dict[str, PartHashes]:
        """Synced hashes of the given customers, in one query per thousand keys (250 on PostgreSQL)."""
        keys = list(keys)
        out: dict[str, PartHashes] = {}
        with self.engine.connect() as conn:
            if len(keys) == 1:  # a sync task's own customer
                rows: Iterable[Any] = conn.execute(_LOOKUP_ONE, {"key": keys[0]})
            else:
                rows = self._lookup_many(conn, keys)
            for row in rows:
                out[row[0]] = PartHashes(*row[1:])
        return out

    def _lookup_many(self, conn: sa.Connection, keys: list[str]) -> Iterator[Any]:
        # PostgreSQL plans a thousand-key lookup as a scan of the whole table while the table has
        # no statistics yet (a first full sync fills it faster than autovacuum analyses it): 19 ms
        # a page at 200,000 rows, growing with the table. 250 keys keep it on the index (0.3 ms).
        step = 250 if self.engine.dialect.name == "postgresql" else 1000
        for i in range(0, len(keys), step):
            match = one_of(STATE.c.provided_unique_id, keys[i : i + step], self.engine.dialect.name)
            yield from conn.execute(sa.select(*_LOOKUP_COLUMNS).where(match))

    def has_customers(self) -> bool:
        """Whether any customer has a state row (none before a first full sync)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(STATE.c.provided_unique_id).limit(1)).first() is not None

    def mark_queued(self, run_id: str, planned: Sequence[tuple[str, str | None]]) -> None:
        """Mark (key, version) pairs queued by `run_id`, keeping what was synced before."""
        now = utcnow()
        constants = {"status": "queued", "last_run_id": run_id, "queued_at": now, "updated_at": now}
        with self._begin() as conn:
            _bulk_upsert(
                conn,
                STATE,
                ("provided_unique_id", "planned_version"),
                planned,
                ("provided_unique_id",),
                constants,
                insert_only=(("attempts", "0"),),
            )

    def record_outcome(
        self,
        key: str,
        run_id: str | None,
        status: str,
        hashes: dict[str, str | None],
        source_version: str | None,
        error: str | None = None,
        failed_hash: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        """Write the result of one sync task: the hashes now in Proto, the status, the error.

        A synced outcome also records the `fingerprint` of the source row it was built from
        (None when unknown: a replayed payload, a task planned before fingerprints).
        """
        with self._begin() as conn:
            _write_outcome(conn, key, run_id, status, hashes, error, failed_hash, source_version, fingerprint)

    def record_dead(
        self,
        key: str,
        run_id: str | None,
        hashes: dict[str, str | None],
        failed_hash: str,
        payload: dict[str, Any],
        error_class: str,
        message: str,
        http_status: int | None = None,
        response_body: str | None = None,
    ) -> int:
        """A sync task that failed for good: the customer `dead` and its letter, in one transaction.

        Written apart, a process dying between the two would leave a customer dead with no
        letter in front of an operator. Returns the letter's id.
        """
        with self._begin() as conn:
            _write_outcome(conn, key, run_id, "dead", hashes, message, failed_hash)
            return _write_dead_letter(conn, key, run_id, payload, error_class, message, http_status, response_body, 1)

    def refresh_fingerprints(self, rows: Sequence[tuple[str, str, dict[str, str]]]) -> None:
        """Record (key, fingerprint, hashes): the row with this fingerprint builds these hashes.

        Written only where the customer is synced with exactly these hashes, so a fingerprint
        is never paired with hashes that another run's task has written since they were read.
        """
        if not rows:
            return
        stmt = (
            STATE.update()
            .where(
                STATE.c.provided_unique_id == sa.bindparam("k"),
                STATE.c.status == "synced",
                STATE.c.profile_hash == sa.bindparam("p"),
                STATE.c.tags_hash == sa.bindparam("t"),
                STATE.c.fields_hash == sa.bindparam("f"),
            )
            .values(source_fingerprint=sa.bindparam("fp"))
        )
        params = [{"k": k, "fp": fp, "p": h["profile"], "t": h["tags"], "f": h["fields"]} for k, fp, h in rows]
        with self._begin() as conn:
            conn.execute(stmt, params)

    def mark_dead(self, keys: Sequence[str], run_id: str, error: str) -> None:
        """Mark customers dead-lettered before any call was made (invalid rows)."""
        now = utcnow()
        rows = [
            {
                "provided_unique_id": k,
                "status": "dead",
                "last_error": error[:2000],
                "last_run_id": run_id,
                "updated_at": now,
            }
            for k in keys
        ]
        with self._begin() as conn:
            _upsert(conn, STATE, rows, ["provided_unique_id"])

    def customer(self, key: str) -> dict[str, Any] | None:
        """The whole state row of one customer."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(STATE).where(STATE.c.provided_unique_id == key)).mappings().first()
        return dict(row) if row else None

    def status_counts(self) -> dict[str, int]:
        """Customers by status."""
        with self.engine.connect() as conn:
            return {s: n for s, n in conn.execute(sa.select(STATE.c.status, sa.func.count()).group_by(STATE.c.status))}

    # -- runs ------------------------------------------------------------------------------------

    def start_run(self, kind: str, lease: float = DEFAULT_PLAN_LEASE) -> str:
        """Open a run of `kind`, `planning`, with its planning lease for `lease` seconds; returns its id.

        The lease (`run_lease(id)`, in the same transaction: no run is ever planning without one)
        is the planner's sign of life: whoever plans the run renews it (`renewed`), and once it
        has expired `close_done_runs` closes the run as failed.
        """
        run_id = uuid.uuid4().hex[:16]
        now = utcnow()
        with self._begin() as conn:
            conn.execute(RUNS.insert().values(id=run_id, kind=kind, status="planning", started_at=now))
            expires = now + dt.timedelta(seconds=lease)
            conn.execute(LOCKS.insert().values(name=run_lease(run_id), holder=run_id, expires_at=expires))
        return run_id

    def update_run(self, run_id: str, *, only_from: str | None = None, **values: Any) -> bool:
        """Set columns of a run (counts, status, timestamps), if it is in status `only_from` when given.

        Returns whether the run was changed.
        """
        query = RUNS.update().where(RUNS.c.id == run_id)
        if only_from:
            query = query.where(RUNS.c.status == only_from)
        with self._begin() as conn:
            return bool(conn.execute(query.values(**values)).rowcount)

    def knows_run(self, run_id: str) -> bool:
        """Whether `run_id` is a run of this state DB (asked once per process and run)."""
        if run_id in self._known_runs:
            return True
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(RUNS.c.id).where(RUNS.c.id == run_id)).first() is not None
        if found:
            self._known_runs.add(run_id)
        return found

    def run(self, run_id: str) -> dict[str, Any] | None:
        """One run as a dict."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(RUNS).where(RUNS.c.id == run_id)).mappings().first()
        return dict(row) if row else None

    def runs(self, limit: int = 10) -> list[dict[str, Any]]:
        """The latest runs, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(RUNS).order_by(RUNS.c.started_at.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows]

    def run_progress(self, run_id: str) -> dict[str, int]:
        """Customers last planned by `run_id`, by status (queued, synced, failed, dead)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(STATE.c.status, sa.func.count()).where(STATE.c.last_run_id == run_id).group_by(STATE.c.status)
            )
            return {status: n for status, n in rows}

    def run_waiting(self, run_id: str) -> int:
        """Customers still queued that `run_id` waits for: queued by it, or by any run opened after it.

        A later run that plans a customer again takes it over (its `last_run_id`) while the first
        run's task for it may still be on its way: the first run's contacts are not all done until
        those are too. Runs opened before it are not waited for (an incremental run does not wait
        for the nightly full sync it overlaps).
        """
        with self.engine.connect() as conn:
            return int(conn.execute(self._waiting(run_id, sa.func.count())).scalar() or 0)

    @staticmethod
    def _waiting(run_id: str, *columns: Any) -> sa.Select[Any]:
        started = sa.select(RUNS.c.started_at).where(RUNS.c.id == run_id).scalar_subquery()
        later = sa.select(RUNS.c.id).where(RUNS.c.started_at >= started)
        return sa.select(*columns).where(
            STATE.c.status == "queued", sa.or_(STATE.c.last_run_id == run_id, STATE.c.last_run_id.in_(later))
        )

    def stalled_keys(self, run_id: str, quiet_for: float) -> list[str]:
        """Customers still queued by a run in which nothing has moved for `quiet_for` seconds."""
        cutoff = utcnow() - dt.timedelta(seconds=quiet_for)
        in_run = STATE.c.last_run_id == run_id
        with self.engine.connect() as conn:
            last = conn.execute(sa.select(sa.func.max(STATE.c.updated_at)).where(in_run)).scalar()
            if last is None or last > cutoff:
                return []
            query = sa.select(STATE.c.provided_unique_id).where(in_run, STATE.c.status == "queued")
            return list(conn.execute(query).scalars())

    def running_runs(self) -> list[dict[str, Any]]:
        """Runs whose customers are not all done yet."""
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.select(RUNS).where(RUNS.c.status == "running")).mappings()]

    def open_runs(self, kind: str) -> list[dict[str, Any]]:
        """Runs of `kind` being planned or synced, oldest first."""
        query = sa.select(RUNS).where(RUNS.c.kind == kind, RUNS.c.status.in_(OPEN_STATUSES))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query.order_by(RUNS.c.started_at)).mappings()]

    def close_done_runs(self) -> list[str]:
        """Close the open runs that are over; returns their ids.

        A running run with no customer left that it waits for (nobody waited on it) is finished;
        a planning run whose planning lease expired (its planner died) is failed.
        """
        abandoned = self.fail_abandoned_runs()
        with self.engine.connect() as conn:
            running = list(conn.execute(sa.select(RUNS.c.id).where(RUNS.c.status == "running")).scalars())
        done = [r for r in running if not self._has_queued(r)]
        for run_id in done:
            self.finish_run(run_id)
        return abandoned + done

    def fail_abandoned_runs(self) -> list[str]:
        """Fail the runs left `planning` by a planner that stopped renewing their lease; returns their ids."""
        now = utcnow()
        with self.engine.connect() as conn:
            planning = list(conn.execute(sa.select(RUNS.c.id).where(RUNS.c.status == "planning")).scalars())
            if not planning:
                return []
            live = sa.select(LOCKS.c.holder).where(
                LOCKS.c.name.in_([run_lease(r) for r in planning]), LOCKS.c.expires_at >= now
            )
            alive = set(conn.execute(live).scalars())
        failed = []
        for run_id in (r for r in planning if r not in alive):
            error = "its planner stopped during planning (no sign of life within its lease, CRMSYNC_PLAN_LEASE)"
            if self.fail_run(run_id, error, only_from="planning"):
                failed.append(run_id)
            self.release_lock(run_lease(run_id), run_id)
        return failed

    def _has_queued(self, run_id: str) -> bool:
        """Whether a customer the run waits for is still queued (see `run_waiting`): one row found, not counted."""
        with self.engine.connect() as conn:
            return conn.execute(self._waiting(run_id, STATE.c.provided_unique_id).limit(1)).first() is not None

    def finish_run(self, run_id: str) -> dict[str, Any]:
        """Close a run whose customers are all done, with its final counts and its degraded verdict.

        A run is closed once: closing it again (another process waited on it too) changes nothing.
        """
        progress = self.run_progress(run_id)
        counts = {k: progress.get(k, 0) for k in ("synced", "failed", "dead")}
        with self._begin() as conn:
            run = conn.execute(sa.select(RUNS.c.read, RUNS.c.enqueued).where(RUNS.c.id == run_id)).first()
            if run is not None:
                # Its dead letters: invalid rows (keyed or not) and failed sends, each once.
                letters = conn.execute(sa.select(sa.func.count()).where(DEAD.c.run_id == run_id)).scalar() or 0
                degraded = is_degraded(
                    unsynced=letters + counts["failed"],
                    read=run.read,
                    enqueued=run.enqueued,
                    threshold=self.degraded_threshold,
                )
                still_open = RUNS.c.status.in_(("planning", "running"))
                conn.execute(
                    RUNS.update()
                    .where(RUNS.c.id == run_id, still_open)
                    .values(status="finished", finished_at=utcnow(), degraded=degraded, **counts)
                )
        closed = self.run(run_id)
        assert closed is not None
        return closed

    def fail_run(self, run_id: str, error: str, only_from: str | None = None) -> bool:
        """Close an open run whose planning stopped on an error: a failed run is degraded.

        A closed run stays as it was closed; `only_from` narrows it to one open status. Returns
        whether the run was failed by this call.
        """
        query = RUNS.update().where(RUNS.c.id == run_id, RUNS.c.status.in_([only_from] if only_from else OPEN_STATUSES))
        with self._begin() as conn:
            values = {"status": "failed", "finished_at": utcnow(), "error": error, "degraded": True}
            return bool(conn.execute(query.values(**values)).rowcount)

    def claim_uncounted_runs(self) -> list[dict[str, Any]]:
        """Closed runs no metrics have counted yet, each claimed by this call alone (across processes)."""
        with self.engine.connect() as conn:
            closed = sa.and_(RUNS.c.finished_at.is_not(None), RUNS.c.counted_at.is_(None))
            candidates = list(conn.execute(sa.select(RUNS.c.id).where(closed)).scalars())
        claimed = []
        for run_id in candidates:
            with self._begin() as conn:
                won = conn.execute(
                    RUNS.update().where(RUNS.c.id == run_id, RUNS.c.counted_at.is_(None)).values(counted_at=utcnow())
                ).rowcount
            if won:
                claimed.append(run_id)
        return [run for run_id in claimed if (run := self.run(run_id)) is not None]

    # -- incremental watermark -------------------------------------------------------------------

    def cursor(self, source: str = "default") -> str | None:
        """The stored watermark (updated_at as ISO text), or None before the first run."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(CURSORS.c.updated_at).where(CURSORS.c.source == source)).scalar()

    def advance_cursor(self, value: dt.datetime, source: str = "default") -> None:
        """Move the watermark forward to `value`; never backward."""
        text = value.isoformat()
        current = self.cursor(source)
        if current is not None and _as_utc(dt.datetime.fromisoformat(current)) >= _as_utc(value):
            return
        with self._begin() as conn:
            _upsert(conn, CURSORS, [{"source": source, "updated_at": text, "moved_at": utcnow()}], ["source"])

    def mapping_fingerprints(self, source: str = "default") -> dict[str, str] | None:
        """The mapping fingerprints recorded by the last full sync."""
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(CURSORS.c.mapping).where(CURSORS.c.source == source)).scalar()
        return dict(value) if value else None

    def record_mapping(self, fingerprints: dict[str, str], source: str = "default") -> None:
        """Remember the mapping a full sync planned with."""
        with self._begin() as conn:
            done = conn.execute(
                CURSORS.update().where(CURSORS.c.source == source).values(mapping=fingerprints, moved_at=utcnow())
            ).rowcount
            if not done:
                conn.execute(CURSORS.insert().values(source=source, mapping=fingerprints, moved_at=utcnow()))

    # -- custom-field registry -------------------------------------------------------------------

    def field_ids(self) -> dict[str, str]:
        """Registered custom fields: name -> Proto id."""
        with self.engine.connect() as conn:
            return {n: i for n, i in conn.execute(sa.select(FIELDS.c.name, FIELDS.c.proto_id))}

    def registered_fields(self) -> dict[str, CustomField]:
        """Registered custom fields with their type and options: name -> definition."""
        cols = (FIELDS.c.proto_id, FIELDS.c.name, FIELDS.c.type, FIELDS.c.select_options)
        with self.engine.connect() as conn:
            return {n: CustomField(i, n, t, tuple(o or ())) for i, n, t, o in conn.execute(sa.select(*cols))}

    def register_fields(self, fields: Iterable[tuple[str, str, str, Sequence[str]]]) -> None:
        """Record (name, id, type, options) of custom fields that exist in Proto."""
        rows = [
            {"name": n, "proto_id": i, "type": t, "select_options": list(o), "registered_at": utcnow()}
            for n, i, t, o in fields
        ]
        with self._begin() as conn:
            _upsert(conn, FIELDS, rows, ["name"])

    # -- dead letters ----------------------------------------------------------------------------

    def add_dead_letter(
        self,
        key: str | None,
        run_id: str | None,
        payload: dict[str, Any],
        error_class: str,
        message: str,
        http_status: int | None = None,
        response_body: str | None = None,
        attempts: int = 1,
    ) -> int:
        """Record a contact that failed for good.

        An open letter for the same key (dead, or replayed and failing again) is updated and
        back to dead, so a contact has at most one letter in front of an operator. A row without
        a key has no identity but its content: its letter is the open one of the same class
        holding the same payload, so each nightly run does not add another.
        """
        with self._begin() as conn:
            return _write_dead_letter(
                conn, key, run_id, payload, error_class, message, http_status, response_body, attempts
            )

    def dead_letters(
        self,
        state: str | None = "dead",
        ids: Sequence[int] | None = None,
        error_class: str | None = None,
        run_id: str | None = None,
        since: dt.datetime | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Dead letters matching every filter given, oldest first."""
        query = sa.select(DEAD).order_by(DEAD.c.id)
        if state:
            query = query.where(DEAD.c.state == state)
        if ids:
            query = query.where(DEAD.c.id.in_(list(ids)))
        if error_class:
            query = query.where(DEAD.c.error_class == error_class)
        if run_id:
            query = query.where(DEAD.c.run_id == run_id)
        if since:
            query = query.where(DEAD.c.last_failed_at >= since)
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def dead_letter_classes(self, run_id: str | None = None) -> dict[str, int]:
        """Open dead letters by error class (of one run, if given)."""
        query = sa.select(DEAD.c.error_class, sa.func.count()).where(DEAD.c.state == "dead")
        if run_id:
            query = query.where(DEAD.c.run_id == run_id)
        with self.engine.connect() as conn:
            return {c: n for c, n in conn.execute(query.group_by(DEAD.c.error_class))}

    def set_dead_letter_state(self, ids: Sequence[int], state: str, only_from: str | None = None) -> int:
        """Mark dead letters replayed, resolved or discarded; returns how many changed."""
        query = DEAD.update().where(DEAD.c.id.in_(list(ids)))
        if only_from:
            query = query.where(DEAD.c.state == only_from)
        with self._begin() as conn:
            return int(conn.execute(query.values(state=state)).rowcount)

    def resolve_dead_letters(self, key: str, planned_by: str | None = None) -> None:
        """A customer synced at last: its replayed or open letters are resolved.

        With `planned_by` (the run of the task that synced it), only the letters of failures
        before that run began: a task planned before its key was found duplicated (still on
        the queue then) did not sync the key as it now stands, and leaves that letter open.
        """
        open_letters = sa.and_(DEAD.c.provided_unique_id == key, DEAD.c.state.in_(["dead", "replayed"]))
        if planned_by is not None:
            began = sa.select(RUNS.c.started_at).where(RUNS.c.id == planned_by).scalar_subquery()
            open_letters = sa.and_(open_letters, DEAD.c.last_failed_at <= began)
        with self._begin() as conn:
            conn.execute(DEAD.update().where(open_letters).values(state="resolved"))

    # -- tickets ---------------------------------------------------------------------------------

    def add_tickets(
        self, cases: Sequence[tuple[str, str, str | None]], refused: AbcMapping[str, str] | None = None
    ) -> int:
        """Record (key, subject, customer) cases not seen before as pending; returns how many.

        A key in `refused` (with the reason: held by several cases of the tickets query, say)
        opens no ticket: its ticket is `refused`, with the reason, new or still pending (never
        one already sent or being sent). A refused ticket whose key is no longer refused is
        pending again, with its case's subject and customer.
        """
        refused = refused or {}
        unique = {k: (s, c) for k, s, c in cases if k not in refused}
        firsts = {k: (s, c) for k, s, c in reversed(cases) if k in refused}  # the first case of each
        now = utcnow()
        with self._begin() as conn:
            held = {
                k: status
                for k, status in conn.execute(
                    sa.select(TICKETS.c.key, TICKETS.c.status).where(TICKETS.c.key.in_([*unique, *firsts]))
                )
            }
            rows = [
                {
                    "key": k,
                    "subject": s,
                    "customer": c,
                    "status": "pending",
                    "error": None,  # every row of one insert has the same columns
                    "attempts": 0,
                    "created_at": now,
                    "updated_at": now,
                }
                for k, (s, c) in unique.items()
                if k not in held
            ]
            rows += [
                {
                    "key": k,
                    "subject": s,
                    "customer": c,
                    "status": "refused",
                    "error": refused[k],
                    "attempts": 0,
                    "created_at": now,
                    "updated_at": now,
                }
                for k, (s, c) in firsts.items()
                if k not in held
            ]
            if rows:
                conn.execute(TICKETS.insert(), rows)
            for k in (k for k in firsts if held.get(k) in ("pending", "refused")):
                conn.execute(
                    TICKETS.update()
                    .where(TICKETS.c.key == k, TICKETS.c.status.in_(("pending", "refused")))
                    .values(status="refused", error=refused[k], updated_at=now)
                )
            for k in (k for k in unique if held.get(k) == "refused"):
                subject, customer = unique[k]
                conn.execute(
                    TICKETS.update()
                    .where(TICKETS.c.key == k, TICKETS.c.status == "refused")
                    .values(status="pending", subject=subject, customer=customer, error=None, updated_at=now)
                )
        return sum(1 for r in rows if r["status"] == "pending")

    def ready_tickets(self, customer: str | None = None) -> list[str]:
        """Pending tickets whose customer Proto already has (of one customer, if given)."""
        query = (
            sa.select(TICKETS.c.key)
            .join(STATE, STATE.c.provided_unique_id == TICKETS.c.customer)
            .where(TICKETS.c.status == "pending", STATE.c.profile_hash.is_not(None))
            .order_by(TICKETS.c.key)
        )
        if customer is not None:
            query = query.where(TICKETS.c.customer == customer)
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def claim_ticket(self, key: str) -> dict[str, Any] | None:
        """Move a pending ticket to `sending`, committed before any call; None if not ours to send."""
        with self._begin() as conn:
            won = conn.execute(
                TICKETS.update()
                .where(TICKETS.c.key == key, TICKETS.c.status == "pending")
                .values(status="sending", attempts=TICKETS.c.attempts + 1, updated_at=utcnow())
            ).rowcount
            if not won:
                return None
            return dict(conn.execute(sa.select(TICKETS).where(TICKETS.c.key == key)).mappings().one())

    def finish_ticket(self, key: str, status: str, proto_id: str | None = None, error: str | None = None) -> None:
        """Record how a send ended: created, pending (not sent), unknown or failed."""
        with self._begin() as conn:
            conn.execute(
                TICKETS.update()
                .where(TICKETS.c.key == key)
                .values(status=status, proto_id=proto_id, error=error and error[:2000], updated_at=utcnow())
            )

    def ticket_counts(self) -> dict[str, int]:
        """Tickets by status."""
        with self.engine.connect() as conn:
            return {
                s: n for s, n in conn.execute(sa.select(TICKETS.c.status, sa.func.count()).group_by(TICKETS.c.status))
            }

    def tickets(self, status: str | None = None) -> list[dict[str, Any]]:
        """Tickets, of one status if given."""
        query = sa.select(TICKETS).order_by(TICKETS.c.key)
        if status:
            query = query.where(TICKETS.c.status == status)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def set_ticket_status(self, keys: Sequence[str], status: str, from_: Sequence[str], **values: Any) -> int:
        """An operator's decision: move tickets in one of `from_` statuses to `status`."""
        with self._begin() as conn:
            return int(
                conn.execute(
                    TICKETS.update()
                    .where(TICKETS.c.key.in_(list(keys)), TICKETS.c.status.in_(list(from_)))
                    .values(status=status, updated_at=utcnow(), **values)
                ).rowcount
            )

    def abandon_sending_tickets(self, older_than: float) -> int:
        """Sends whose worker died mid-call: their outcome is unknown, and stays for an operator."""
        cutoff = utcnow() - dt.timedelta(seconds=older_than)
        with self._begin() as conn:
            return int(
                conn.execute(
                    TICKETS.update()
                    .where(TICKETS.c.status == "sending", TICKETS.c.updated_at < cutoff)
                    .values(status="unknown", error="the worker stopped during the call: outcome unknown")
                ).rowcount
            )

    # -- locks -----------------------------------------------------------------------------------

    def acquire_lock(self, name: str, holder: str, ttl: float) -> bool:
        """Take the lease `name` for `ttl` seconds unless someone else holds a live one."""
        now = utcnow()
        expires = now + dt.timedelta(seconds=ttl)
        with self._begin() as conn:
            taken = conn.execute(
                LOCKS.update()
                .where(LOCKS.c.name == name, sa.or_(LOCKS.c.expires_at < now, LOCKS.c.holder == holder))
                .values(holder=holder, expires_at=expires)
            ).rowcount
            if taken:
                return True
            try:
                with conn.begin_nested():
                    conn.execute(LOCKS.insert().values(name=name, holder=holder, expires_at=expires))
                return True
            except sa.exc.IntegrityError:
                return False

    @contextlib.contextmanager
    def holding(self, name: str, ttl: float = 60.0, wait: float = 60.0) -> Iterator[None]:
        """Hold the lease `name` for a short piece of work, waiting up to `wait` s for it."""
        holder = uuid.uuid4().hex
        deadline = time.monotonic() + wait
        while not self.acquire_lock(name, holder, ttl):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the lease {name!r} stayed held by another process for {wait:.0f} s")
            time.sleep(0.05)
        try:
            yield
        finally:
            self.release_lock(name, holder)

    def release_lock(self, name: str, holder: str) -> None:
        """Give the lease back."""
        with self._begin() as conn:
            conn.execute(LOCKS.delete().where(LOCKS.c.name == name, LOCKS.c.holder == holder))

    @contextlib.contextmanager
    def renewed(self, name: str, holder: str, ttl: float, on_lost: Callable[[], None]) -> Iterator[None]:
        """Keep a held lease renewed (every `ttl` / 3 s) while the block runs; release it after.

        `on_lost` is called, once, when the lease is lost: another holder has it, or no renewal
        reached the state DB for `ttl` seconds (a shorter outage costs nothing). The block goes
        on; the caller decides what a lost lease means. A release the state DB does not take is
        left to expire: the block's own outcome (or error) is what the caller sees.
        """
        stop = threading.Event()

        def renew() -> None:
            renewed_at = time.monotonic()
            while not stop.wait(ttl / 3):
                try:
                    if not self.acquire_lock(name, holder, ttl):
                        break
                    renewed_at = time.monotonic()
                except sa.exc.SQLAlchemyError:
                    if time.monotonic() - renewed_at >= ttl:
                        break
            else:
                return
            on_lost()

        threading.Thread(target=renew, name=f"crmsync-lease-{name}", daemon=True).start()
        try:
            yield
        finally:
            stop.set()
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self.release_lock(name, holder)


def run_lease(run_id: str) -> str:
    """The name of a run's planning lease (see `StateStore.start_run`)."""
    return f"run:{run_id}"


def is_degraded(*, unsynced: int, read: int, enqueued: int, threshold: float) -> bool:
    """Whether more than `threshold` of a run's contacts ended unsynced (invalid, dead-lettered, failed).

    The share is of the contacts the run read (a replay as recorded reads none: of those it sent),
    so a few bad rows in a nightly full sync of a big CRM do not make every night degraded.
    """
    return unsynced > threshold * max(read, enqueued, 1)


def _as_utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _write_outcome(
    conn: sa.Connection,
    key: str,
    run_id: str | None,
    status: str,
    hashes: dict[str, str | None],
    error: str | None,
    failed_hash: str | None,
    source_version: str | None = None,
    fingerprint: str | None = None,
) -> None:
    """Update the customer's state row with a task's outcome, or insert it (a first sight)."""
    now = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "last_error": error,
        "updated_at": now,
        "profile_hash": hashes.get("profile"),
        "tags_hash": hashes.get("tags"),
        "fields_hash": hashes.get("fields"),
        "failed_hash": failed_hash,
    }
    synced = status == "synced"
    if synced:
        values.update(source_version=source_version, synced_at=now, source_fingerprint=fingerprint)
    updated = conn.execute(_OUTCOME_UPDATES[synced], {"key": key, **values}).rowcount
    if not updated:
        conn.execute(STATE.insert().values(provided_unique_id=key, last_run_id=run_id, attempts=1, **values))


def _write_dead_letter(
    conn: sa.Connection,
    key: str | None,
    run_id: str | None,
    payload: dict[str, Any],
    error_class: str,
    message: str,
    http_status: int | None,
    response_body: str | None,
    attempts: int,
) -> int:
    """Add or update the contact's one open letter on `conn` (see `StateStore.add_dead_letter`)."""
    now = utcnow()
    open_letters = sa.select(DEAD.c.id).where(DEAD.c.state.in_(["dead", "replayed"]))
    if key is not None:
        existing = conn.execute(open_letters.where(DEAD.c.provided_unique_id == key)).scalar()
    else:
        keyless = open_letters.add_columns(DEAD.c.payload).where(
            DEAD.c.provided_unique_id.is_(None), DEAD.c.error_class == error_class
        )
        existing = next((i for i, held in conn.execute(keyless) if held == payload), None)
    values = {
        "run_id": run_id,
        "payload": payload,
        "error_class": error_class,
        "message": message[:2000],
        "http_status": http_status,
        "response_body": (response_body or None) and response_body[:2000],
        "last_failed_at": now,
    }
    if existing is not None:
        again = DEAD.update().where(DEAD.c.id == existing)
        conn.execute(again.values(state="dead", attempts=DEAD.c.attempts + attempts, **values))
        return int(existing)
    result = conn.execute(
        DEAD.insert().values(provided_unique_id=key, attempts=attempts, first_failed_at=now, state="dead", **values)
    )
    return int(result.inserted_primary_key[0])  # type: ignore[index]
