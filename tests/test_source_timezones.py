"""The incremental watermark `(updated_at, key)` over time-zone-aware and naive updated_at columns,
on SQLite, PostgreSQL and MariaDB: planner and sync task together against the sandbox.

Edits are stamped by applications in several UTC offsets, so that the order of their wall clocks
is not the order of the moments. Each incremental sync must send exactly the rows changed since
the watermark minus the lookback (compared as moments), nothing else: what is checked is what
the sandbox received and was called for, what the planner enqueued, and the versions and the
watermark the state DB holds.

How each column holds a moment (what docs/mapping-cookbook.md, "Time zones", promises):
- naive columns (`DATETIME`, `timestamp`, SQLite text without offset) hold the UTC wall clock;
- PostgreSQL `timestamptz` holds the moment, read back in the reader's session time zone (UTC,
  or New York, set by the source URL: `?options=-c timezone=...`);
- MariaDB `TIMESTAMP` holds the moment, written and read in each session's time zone: the
  writers' are +02:00 and -05:00, the reader's UTC, set by the source URL
  (`?init_command=SET time_zone='+00:00'`). Read in another zone its values would come back as
  that zone's wall clock, which crmsync takes for UTC: not covered here, as that is wrong today.
- SQLite text with offsets is compared as text by SQLite: the mapping turns it into UTC text
  (`MAPPING_SQLITE_TEXT_IN_UTC`); the raw column is not covered here, as that is wrong today.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import Sandbox
from tests.crm import BASE_TIME, MAPPING, MAPPING_SQLITE_TEXT_IN_UTC, IsoText, contacts_with_date_type, make_crm
from tests.test_sync_flow import Harness

LOOKBACK = 300.0


def moment(text: str) -> dt.datetime:
    """An aware datetime from ISO text with its offset."""
    value = dt.datetime.fromisoformat(text)
    assert value.tzinfo is not None
    return value


def utc_text(value: dt.datetime) -> str:
    """A moment as crmsync's version text: UTC, naive, microseconds."""
    return value.astimezone(dt.UTC).replace(tzinfo=None).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Column:
    """One way a CRM keeps updated_at: a column type of a dialect, how its applications stamp a
    row with a moment, and the settings the reader connects with."""

    name: str
    dialect: str
    date_type: Callable[[], sa.types.TypeEngine[Any]]
    # utc: the UTC wall clock (naive columns); moment: the aware value itself (the column or the
    # driver keeps the offset); session: the wall clock, in a session set to the moment's offset.
    stamp: str
    reader_query: str = ""
    mapping: str = MAPPING

    def reader_url(self, url: str) -> str:
        if not self.reader_query:
            return url
        return url + ("&" if "?" in url else "?") + self.reader_query

    def write(self, engine: sa.Engine, table: sa.Table, key: str, at: dt.datetime, **values: Any) -> None:
        """Change a contact as an application in `at`'s time zone would, stamping it `at`."""
        if self.stamp == "utc":
            stamp: dt.datetime = at.astimezone(dt.UTC).replace(tzinfo=None)
        elif self.stamp == "moment":
            stamp = at
        else:
            stamp = at.replace(tzinfo=None)
        with engine.begin() as conn:
            if self.stamp == "session":
                offset = at.strftime("%z")
                conn.execute(sa.text(f"SET time_zone = '{offset[:3]}:{offset[3:]}'"))
            conn.execute(table.update().where(table.c.id == key).values(date_modified=stamp, **values))


NEW_YORK_SESSION = "options=-c%20timezone%3DAmerica/New_York"
COLUMNS = [
    Column("sqlite-datetime", "sqlite", sa.DateTime, "utc"),
    Column("sqlite-utc-text", "sqlite", IsoText, "utc"),
    Column("sqlite-offset-text-normalised-by-the-mapping", "sqlite", IsoText, "moment", "", MAPPING_SQLITE_TEXT_IN_UTC),
    Column("postgresql-timestamp", "postgresql", sa.DateTime, "utc"),
    Column("postgresql-timestamptz", "postgresql", lambda: sa.DateTime(timezone=True), "moment"),
    Column(
        "postgresql-timestamptz-new-york-session",
        "postgresql",
        lambda: sa.DateTime(timezone=True),
        "moment",
        NEW_YORK_SESSION,
    ),
    Column("mariadb-datetime", "mariadb", sa.DateTime, "utc"),
    Column("mariadb-timestamp", "mariadb", sa.TIMESTAMP, "session", "init_command=SET time_zone='%2B00:00'"),
    # A session in another zone (the server's own, say): crmsync reads TIMESTAMP in UTC all the same.
    Column(
        "mariadb-timestamp-minus-5-session", "mariadb", sa.TIMESTAMP, "session", "init_command=SET time_zone='-05:00'"
    ),
]


class Sync:
    """A harness on one CRM, with what each run enqueued and cost."""

    def __init__(self, harness: Harness, sandbox: Sandbox) -> None:
        self.h = harness
        self.sandbox = sandbox

    def run(self, kind: str) -> tuple[dict[str, Any], list[str], int]:
        """Plan and drain a run: its counts, the keys it enqueued, the API calls it cost."""
        before = self.sandbox.calls()
        result = self.h.plan(kind)
        keys = sorted(m["contact"]["key"] for _, m in self.h.queued)
        self.h.drain()
        return result["counts"], keys, self.sandbox.calls() - before

    def watermark(self) -> dt.datetime:
        """The stored watermark as a moment (naive text is UTC)."""
        text = self.h.rt.store.cursor()
        assert text is not None
        value = dt.datetime.fromisoformat(text)
        return value.replace(tzinfo=value.tzinfo or dt.UTC)

    def version(self, key: str) -> str:
        state = self.h.rt.store.customer(key)
        assert state is not None and state["status"] == "synced"
        return str(state["source_version"])


@pytest.mark.parametrize(
    ("source_url", "column"), [pytest.param(c.dialect, c, id=c.name) for c in COLUMNS], indirect=["source_url"]
)
def test_incremental_syncs_send_exactly_the_rows_changed_since_the_watermark_in_any_offset(
    source_url: str, column: Column, harness_on: Callable[..., Harness], sandbox: Sandbox
) -> None:
    table = contacts_with_date_type(column.date_type())
    crm = make_crm(source_url, 12, table=table)
    h = harness_on(column.reader_url(source_url), column.mapping, batch_size=4, lookback_seconds=LOOKBACK)
    sync = Sync(h, sandbox)
    try:
        counts, _, _ = sync.run("full")
        assert counts["new"] == 12
        assert sync.watermark() == (BASE_TIME + dt.timedelta(seconds=11)).replace(tzinfo=dt.UTC)

        # Three edits whose wall clocks (14:30, 08:00, 16:00) are not in the order of their moments.
        first = {
            "C00002": moment("2026-06-01 14:30:00+02:00"),  # 12:30 UTC
            "C00005": moment("2026-06-01 08:00:00-05:00"),  # 13:00 UTC
            "C00008": moment("2026-06-01 16:00:00+02:00"),  # 14:00 UTC: the new watermark
        }
        for key, at in first.items():
            column.write(crm, table, key, at, city=f"Moved {key}")

        counts, keys, calls = sync.run("incremental")

        assert keys == sorted(first) and counts["changed"] == 3 and calls == 3  # the profile part of each
        customers = sandbox.customers()
        assert {k: customers[k]["location"] for k in first} == {k: f"Moved {k}" for k in first}
        assert {k: sync.version(k) for k in first} == {k: utc_text(at) for k, at in first.items()}
        assert sync.watermark() == moment("2026-06-01 14:00:00+00:00")

        second = {
            # 15:00 UTC: after the watermark, though its wall clock (10:00) is before the
            # watermark's own (16:00, in +02:00).
            "C00003": moment("2026-06-01 10:00:00-05:00"),
            # 13:57 UTC: before the watermark but within the lookback (a late commit).
            "C00006": moment("2026-06-01 15:57:00+02:00"),
        }
        # 13:50 UTC: before the watermark minus the lookback (13:55): left to the next full sync.
        outside = ("C00009", moment("2026-06-01 08:50:00-05:00"))
        for key, at in [*second.items(), outside]:
            column.write(crm, table, key, at, city=f"Moved {key}")

        counts, keys, calls = sync.run("incremental")

        assert keys == sorted(second) and calls == 2
        assert counts["read"] == 3 and counts["unchanged"] == 1  # C00008 (14:00) re-read, not resent
        assert {k: sync.version(k) for k in second} == {k: utc_text(at) for k, at in second.items()}
        assert sync.watermark() == moment("2026-06-01 15:00:00+00:00")

        counts, keys, calls = sync.run("incremental")  # nothing changed: unchanged rows cost nothing
        assert keys == [] and calls == 0 and counts["read"] == 1  # C00003, within the lookback

        counts, keys, calls = sync.run("full")
        assert keys == ["C00009"] and calls == 1 and counts["unchanged"] == 11
        assert sandbox.customers()["C00009"]["location"] == "Moved C00009"
        assert sync.watermark() == moment("2026-06-01 15:00:00+00:00")
    finally:
        crm.dispose()


# The session's offset changes between two runs (summer time ends, +02:00 -> +01:00): TIMESTAMP
# is read in UTC whatever the session, so a row changed after the change is not taken for older.
@pytest.mark.parametrize("source_url", ["mariadb"], indirect=True)
def test_mariadb_timestamp_row_changed_after_summer_time_ends_is_sent(
    source_url: str, harness_on: Callable[..., Harness], sandbox: Sandbox
) -> None:
    summer = Column("summer", "mariadb", sa.TIMESTAMP, "session", "init_command=SET time_zone='%2B02:00'")
    winter = Column("winter", "mariadb", sa.TIMESTAMP, "session", "init_command=SET time_zone='%2B01:00'")
    table = contacts_with_date_type(sa.TIMESTAMP())
    crm = make_crm(source_url, 12, table=table)
    try:
        before = Sync(harness_on(summer.reader_url(source_url), lookback_seconds=300), sandbox)
        before.run("full")
        summer.write(crm, table, "C00002", moment("2026-10-25 00:30:00+00:00"), city="Before")
        assert before.run("incremental")[1] == ["C00002"]
        assert before.version("C00002") == "2026-10-25T00:30:00.000000"
        after = Sync(harness_on(winter.reader_url(source_url), lookback_seconds=300), sandbox)
        winter.write(crm, table, "C00005", moment("2026-10-25 01:20:00+00:00"), city="After")  # 50 min later
        _, keys, calls = after.run("incremental")
        assert keys == ["C00005"] and calls == 1  # not read as 02:20, before 02:30 - 5 min
        assert sandbox.customers()["C00005"]["location"] == "After"
    finally:
        crm.dispose()
