"""Change detection on a source of each dialect (SQLite, PostgreSQL, MariaDB): planner and sync
task together, in-process, against the sandbox.

A row edited while a run reads the CRM (on a page the run has read already) is sent by the next
incremental sync, and rows sharing one updated_at across page boundaries are each sent once,
even when a run stops between two of those pages. What is checked is what the planner
enqueued, what the sandbox received and was called for, and what the state DB holds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import Sandbox
from tests.crm import MAPPING, MAPPING_SQLITE_TEXT_IN_UTC, IsoText, contacts_with_date_type, make_crm, touch
from tests.test_sync_flow import Harness
from worker.plan import PlanningFailed

LATER = dt.datetime(2026, 6, 1)


@pytest.fixture
def harness(source_url: str, harness_on: Callable[..., Harness]) -> Harness:
    """The harness of test_sync_flow (30 contacts, pages of 7, a 5 s lookback) on each dialect."""
    make_crm(source_url, 30).dispose()
    return harness_on(source_url, batch_size=7, lookback_seconds=5)


def crm_engine(h: Harness) -> sa.Engine:
    return h.crm_engine


def run(h: Harness, kind: str, sandbox: Sandbox, **kw: Any) -> tuple[dict[str, Any], list[str], int]:
    """Plan and drain a run: its counts, the keys it enqueued (in order), the API calls it cost."""
    before = sandbox.calls()
    counts = h.plan(kind, **kw)["counts"]
    keys = [m["contact"]["key"] for _, m in h.queued]
    h.drain()
    return counts, keys, sandbox.calls() - before


def version(h: Harness, key: str) -> str:
    state = h.rt.store.customer(key)
    assert state is not None and state["status"] == "synced"
    return str(state["source_version"])


def micro(value: dt.datetime) -> str:
    return value.isoformat(timespec="microseconds")


# -- a row updated during a run ---------------------------------------------------------------------


def test_a_row_updated_during_a_full_sync_is_sent_by_the_next_incremental(harness: Harness, sandbox: Sandbox) -> None:
    # While the full sync reads page 2 onwards, C00001 (page 1, already read) and C00020 (a page
    # not read yet) change in the CRM. The run reads C00020 as changed; the next incremental
    # must still find C00001, although a row the run read (C00020) is newer than it.
    engine = crm_engine(harness)
    edits: list[str] = []

    def edit_once(_counts: Any) -> None:
        if not edits:
            touch(engine, ["C00001"], LATER, city="Osaka")
            touch(engine, ["C00020"], LATER + dt.timedelta(hours=1), city="Lima")
            edits.append("done")

    counts, keys, _ = run(harness, "full", sandbox, progress=edit_once)
    assert counts["new"] == 30 and len(keys) == 30
    customers = sandbox.customers()
    assert customers["C00001"]["location"] != "Osaka" and customers["C00020"]["location"] == "Lima"
    # The watermark stops at the newest row when the run began, not at C00020's edit.
    assert harness.rt.store.cursor() == dt.datetime(2026, 1, 1, 0, 0, 29).isoformat()

    counts, keys, calls = run(harness, "incremental", sandbox)

    assert keys == ["C00001"] and counts["changed"] == 1 and calls == 1  # its profile, nothing else
    # Read again, not resent: C00020 (newer than the watermark) and C00024-C00029 (the lookback).
    assert counts["unchanged"] == 7
    assert sandbox.customers()["C00001"]["location"] == "Osaka"
    assert version(harness, "C00001") == micro(LATER)
    counts, keys, calls = run(harness, "incremental", sandbox)
    assert keys == [] and calls == 0


def test_a_row_updated_during_an_incremental_sync_is_read_again_at_its_new_place(
    harness: Harness, sandbox: Sandbox
) -> None:
    run(harness, "full", sandbox)
    engine = crm_engine(harness)
    touch(engine, [f"C{i:05d}" for i in range(10)], LATER, city="Osaka")
    edits: list[str] = []

    def edit_once(_counts: Any) -> None:
        if not edits:  # C00000 was on the first page: its new version sorts after every other row
            touch(engine, ["C00000"], LATER + dt.timedelta(minutes=1), city="Lima")
            edits.append("done")

    counts, keys, _ = run(harness, "incremental", sandbox, progress=edit_once)

    assert counts["enqueued"] == 11 and sorted(keys) == sorted([f"C{i:05d}" for i in range(10)] + ["C00000"])
    assert keys[-1] == "C00000"  # planned again last, as it is now
    assert sandbox.customers()["C00000"]["location"] == "Lima"
    assert version(harness, "C00000") == micro(LATER + dt.timedelta(minutes=1))
    assert harness.rt.store.cursor() == (LATER + dt.timedelta(minutes=1)).isoformat()
    counts, keys, calls = run(harness, "incremental", sandbox)
    assert keys == [] and calls == 0


# -- equal updated_at across page boundaries ----------------------------------------------------------

DATE_TYPES = [
    pytest.param("sqlite", sa.DateTime, MAPPING, id="sqlite-datetime"),
    # Text in another form than SQLAlchemy writes (no fraction of a second, as CURRENT_TIMESTAMP),
    # as it is and as a mapping query gives it in SQLAlchemy's form.
    pytest.param("sqlite", IsoText, MAPPING, id="sqlite-text-as-written"),
    pytest.param("sqlite", IsoText, MAPPING_SQLITE_TEXT_IN_UTC, id="sqlite-text-normalised-by-the-mapping"),
    pytest.param("postgresql", sa.DateTime, MAPPING, id="postgresql-timestamp"),
    pytest.param("mariadb", sa.DateTime, MAPPING, id="mariadb-datetime"),
]


@pytest.mark.parametrize(("source_url", "date_type", "mapping"), DATE_TYPES, indirect=["source_url"])
def test_rows_sharing_an_updated_at_across_pages_are_each_sent_once_even_when_a_run_stops_between_them(
    source_url: str,
    date_type: Callable[[], sa.types.TypeEngine[Any]],
    mapping: str,
    harness_on: Callable[..., Harness],
    sandbox: Sandbox,
) -> None:
    table = contacts_with_date_type(date_type())
    crm = make_crm(source_url, 30, table=table)
    # No lookback: the next run reads from the watermark itself, so the rows that share it and
    # were not planned yet must be read at or after it.
    h = harness_on(source_url, mapping, batch_size=7, lookback_seconds=0)
    try:
        run(h, "full", sandbox)
        same = [f"C{i:05d}" for i in range(3, 20)]  # 17 rows, after C00029: pages of 7 hold 6 + 7 + 4
        with crm.begin() as conn:
            conn.execute(table.update().where(table.c.id.in_(same)).values(date_modified=LATER, city="Osaka"))

        def stop_after_the_first_page(_counts: Any) -> None:
            raise RuntimeError("planner killed")

        with pytest.raises(PlanningFailed, match="planner killed"):  # the run closed failed, the error named
            h.plan("incremental", progress=stop_after_the_first_page)
        first = [m["contact"]["key"] for _, m in h.queued]
        h.drain()
        assert first == same[:6]  # the page began with C00029, at the watermark itself
        assert h.rt.store.cursor() == LATER.isoformat()  # the first page was planned: it moved

        counts, rest, calls = run(h, "incremental", sandbox)

        assert rest == same[6:] and calls == 11  # the other eleven, in key order
        assert counts["read"] == 17 and counts["unchanged"] == 6  # the first six again, not resent
        customers = sandbox.customers()
        assert {k: customers[k]["location"] for k in same} == dict.fromkeys(same, "Osaka")
        assert {version(h, k) for k in same} == {micro(LATER)}

        counts, keys, calls = run(h, "incremental", sandbox)
        assert keys == [] and calls == 0 and counts["read"] == 17
    finally:
        crm.dispose()
