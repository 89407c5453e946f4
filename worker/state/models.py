"""Tables of the local state database (SQLite for one host, PostgreSQL for several).

Alembic migrations in `migrations/` create them; this metadata is their target.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """Naive UTC now: the one clock of the state database."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: sa.JSON, list[Any]: sa.JSON}


class SyncRun(Base):
    """One run: a full sync, an incremental sync or a replay, with its counts."""

    __tablename__ = "sync_runs"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16), default="planning")
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    planned_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    read: Mapped[int] = mapped_column(default=0)
    changed: Mapped[int] = mapped_column(default=0)
    enqueued: Mapped[int] = mapped_column(default=0)
    unchanged: Mapped[int] = mapped_column(default=0)
    invalid: Mapped[int] = mapped_column(default=0)
    deleted: Mapped[int] = mapped_column(default=0)
    synced: Mapped[int] = mapped_column(default=0)
    skipped: Mapped[int] = mapped_column(default=0)
    failed: Mapped[int] = mapped_column(default=0)
    dead: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(sa.Text)
    # The verdict at close (CRMSYNC_DEGRADED_THRESHOLD then), kept so a changed setting rewrites no history.
    degraded: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    # When a worker serving metrics counted the closed run: each run is counted once, whoever closed it.
    counted_at: Mapped[dt.datetime | None] = mapped_column(index=True)


class CustomerSyncState(Base):
    """What Proto holds of each customer, as far as crmsync knows: a hash per part sent."""

    __tablename__ = "customer_sync_state"

    provided_unique_id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    profile_hash: Mapped[str | None] = mapped_column(sa.String(32))
    tags_hash: Mapped[str | None] = mapped_column(sa.String(32))
    fields_hash: Mapped[str | None] = mapped_column(sa.String(32))
    # The payload hash of a dead-lettered attempt: the same payload is not retried by a run.
    failed_hash: Mapped[str | None] = mapped_column(sa.String(32))
    source_version: Mapped[str | None] = mapped_column(sa.String(40))
    planned_version: Mapped[str | None] = mapped_column(sa.String(40))
    # The fingerprint of the raw source row whose contact was last synced in full: an equal
    # fingerprint at the next full sync means the contact is unchanged, without building it.
    source_fingerprint: Mapped[str | None] = mapped_column(sa.String(32))
    status: Mapped[str] = mapped_column(sa.String(16), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    last_run_id: Mapped[str | None] = mapped_column(sa.String(32), index=True)
    queued_at: Mapped[dt.datetime | None]
    synced_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class DeadLetter(Base):
    """A contact whose sync failed for good, kept for an operator to inspect and replay."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    provided_unique_id: Mapped[str | None] = mapped_column(sa.String(255), index=True)
    run_id: Mapped[str | None] = mapped_column(sa.String(32), index=True)
    payload: Mapped[dict[str, Any]]
    error_class: Mapped[str] = mapped_column(sa.String(64), index=True)
    message: Mapped[str] = mapped_column(sa.Text)
    http_status: Mapped[int | None]
    response_body: Mapped[str | None] = mapped_column(sa.Text)
    attempts: Mapped[int] = mapped_column(default=1)
    first_failed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_failed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    state: Mapped[str] = mapped_column(sa.String(16), default="dead", index=True)


class SyncCursor(Base):
    """The incremental watermark of a source: the last (updated_at, key) durably planned."""

    __tablename__ = "sync_cursors"

    source: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    updated_at: Mapped[str | None] = mapped_column(sa.String(40))
    key: Mapped[str | None] = mapped_column(sa.String(255))
    # Fingerprint per part of the mapping of the last full sync: a changed mapping is noticed.
    mapping: Mapped[dict[str, Any] | None]
    moved_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class CustomFieldRecord(Base):
    """The registry of Proto custom fields: name -> id, filled by list/create-custom-field."""

    __tablename__ = "custom_fields"

    name: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    proto_id: Mapped[str] = mapped_column(sa.String(64))
    type: Mapped[str] = mapped_column(sa.String(16))
    select_options: Mapped[list[Any]] = mapped_column(default=list)
    registered_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Lock(Base):
    """A named lease, so two planners of the same kind never run at once."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(sa.String(64))
    expires_at: Mapped[dt.datetime]


class Ticket(Base):
    """A CRM case to open as a Proto ticket, exactly once.

    create-ticket has no idempotency key, so the status moves to `sending` (committed) before
    the call; a call whose outcome is unknown leaves `unknown` for an operator, never a retry.
    Statuses: pending, sending, created, unknown, failed, refused (its case key is held by
    several cases: nothing is sent until it is one case's).
    """

    __tablename__ = "tickets"

    key: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    customer: Mapped[str | None] = mapped_column(sa.String(255), index=True)
    subject: Mapped[str] = mapped_column(sa.Text)
    status: Mapped[str] = mapped_column(sa.String(16), default="pending", index=True)
    proto_id: Mapped[str | None] = mapped_column(sa.String(64))
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
