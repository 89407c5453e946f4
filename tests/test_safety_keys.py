"""Keys are compared as the text that becomes `provided_unique_id` (issue 11, items 3 and 4).

- One odd key is one bad row: a float key beside text keys in an untyped SQLite column is one
  customer, its tags matched by text, and the run goes on.
- A key held by several rows (integer 1 and text '1' are one key) has every row dead-lettered
  as `duplicate_key`, whatever the page size and the run kind: no winner, no flip-flop. Its
  letter is resolved only once the key is unique again and its row syncs.
- Keys that MariaDB's collation holds equal (`x`, `X`, `x `) never stall the keyset pages, on
  any page size, and stay distinct customers (a provided_unique_id is exact text).
- Two cases with one key in `tickets:` are refused, that ticket alone; the run goes on.

Asserted: what the sandbox holds, and what the state tables hold.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import SUBCOMPANY, Sandbox
from tests.test_sync_flow import Harness
from worker.tickets import send_ticket

T0 = dt.datetime(2026, 3, 1, 9, 0, 0)

MAPPING = """\
source:
  query: SELECT * FROM people
  key: pid
  updated_at: modified
customer:
  name: name
  email: email
tags:
  query: SELECT pid, tag FROM labels
"""
TICKETS = """\
tickets:
  query: SELECT case_id, title, contact_id FROM cases
  key: case_id
  subject: title
  customer: contact_id
"""

md = sa.MetaData()
people = sa.Table(
    "people",
    md,
    sa.Column("pid", sa.String(40)),  # no primary key: a CRM view may hold a key twice
    sa.Column("name", sa.String(60)),
    sa.Column("email", sa.String(120)),
    sa.Column("modified", sa.DateTime),
)
labels = sa.Table("labels", md, sa.Column("pid", sa.String(40)), sa.Column("tag", sa.String(60)))
cases = sa.Table(
    "cases",
    md,
    sa.Column("case_id", sa.String(40)),
    sa.Column("title", sa.String(60)),
    sa.Column("contact_id", sa.String(40)),
)

Build = Callable[..., Harness]


def person(pid: Any, name: str, minutes: int = 0) -> dict[str, Any]:
    return {
        "pid": pid,
        "name": name,
        "email": f"{name.lower()}@example.org",
        "modified": T0 + dt.timedelta(minutes=minutes),
    }


def make_crm(url: str, rows: list[dict[str, Any]], tags: Sequence[tuple[str, str]] = ()) -> sa.Engine:
    engine = sa.create_engine(url)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(people.insert(), rows)
        if tags:
            conn.execute(labels.insert(), [{"pid": k, "tag": t} for k, t in tags])
    return engine


def untyped_sqlite_crm(url: str, rows: list[tuple[Any, str, int]], tags: list[tuple[Any, str]]) -> sa.Engine:
    """A SQLite CRM whose key columns have no type: each value keeps the storage class written."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE people (pid, name, email, modified)"))
        conn.execute(sa.text("CREATE TABLE labels (pid, tag)"))
        for pid, name, minutes in rows:
            conn.execute(
                sa.text("INSERT INTO people VALUES (:p, :n, :e, :m)"),
                {"p": pid, "n": name, "e": f"{name.lower()}@example.org", "m": str(T0 + dt.timedelta(minutes=minutes))},
            )
        for pid, tag in tags:
            conn.execute(sa.text("INSERT INTO labels VALUES (:p, :t)"), {"p": pid, "t": tag})
    return engine


def open_letters(h: Harness) -> dict[str | None, str]:
    """Open dead letters: provided_unique_id -> error class."""
    return {d["provided_unique_id"]: d["error_class"] for d in h.rt.store.dead_letters()}


def status(h: Harness, key: str) -> str | None:
    row = h.rt.store.customer(key)
    return None if row is None else str(row["status"])


def closed_run(h: Harness, result: dict[str, Any]) -> dict[str, Any]:
    """The run of a plan, once every task of it is done."""
    h.rt.store.close_done_runs()
    run = h.rt.store.run(result["run_id"])
    assert run is not None
    return run


# -- a. mixed key types ----------------------------------------------------------------------------


def test_a_float_key_beside_text_keys_fails_no_run_and_gets_its_tags_by_key_text(
    harness_on: Build, sandbox: Sandbox, sqlite_state: str, tmp_path: Any
) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = untyped_sqlite_crm(
        url,
        [(1.5, "Real", 0), ("abc", "Text", 1), ("zed", "Zed", 2), (7, "Int", 3)],
        [(1.5, "as-real"), ("1.5", "as-text"), ("1.50", "not-it"), ("abc", "a"), (7, "seven"), ("7", "seven-text")],
    )
    h = harness_on(url, MAPPING, batch_size=2)

    full = h.sync("full")

    assert closed_run(h, full)["status"] == "finished"
    got = sandbox.customers()
    assert sorted(got) == ["1.5", "7", "abc", "zed"]
    assert sorted(got["1.5"]["tags"]) == ["as-real", "as-text"]  # '1.50' is another key's text
    assert sorted(got["7"]["tags"]) == ["seven", "seven-text"]
    assert got["abc"]["tags"] == ["a"] and got["zed"]["tags"] == []
    assert open_letters(h) == {}

    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE people SET name = 'Real Two', modified = :m WHERE pid = 1.5"),
            {"m": str(T0 + dt.timedelta(hours=1))},
        )
    incremental = h.sync("incremental")

    assert incremental["counts"]["enqueued"] == 1 and closed_run(h, incremental)["status"] == "finished"
    assert sandbox.customers()["1.5"]["name"] == "Real Two"
    assert open_letters(h) == {} and status(h, "1.5") == "synced"


# -- b. duplicates by their Proto identity ---------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 3, 100])
def test_integer_one_and_text_one_are_one_key_and_both_rows_are_dead_lettered(
    harness_on: Build, sandbox: Sandbox, tmp_path: Any, batch_size: int
) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    # SQLite orders numbers before text: 1 and '1' are far apart in key order, on other pages.
    engine = untyped_sqlite_crm(
        url, [(1, "Int", 0), (2, "Two", 1), (3, "Three", 2), ("1", "Text", 3), ("b", "Bee", 4)], [(1, "t")]
    )
    h = harness_on(url, MAPPING, batch_size=batch_size, lookback_seconds=0)

    full = h.sync("full")

    assert full["counts"]["invalid"] == 2
    assert sorted(sandbox.customers()) == ["2", "3", "b"]
    assert open_letters(h) == {"1": "InvalidRecord.duplicate_key"}
    assert status(h, "1") == "dead"
    [letter] = h.rt.store.dead_letters()
    assert "2 rows" in letter["message"]

    with engine.begin() as conn:  # the text row changes: an incremental run reads it alone
        conn.execute(sa.text("UPDATE people SET modified = :m WHERE pid = '1'"), {"m": str(T0 + dt.timedelta(hours=1))})
    incremental = h.sync("incremental")

    assert incremental["counts"]["invalid"] == 1 and incremental["counts"]["enqueued"] == 0
    assert "1" not in sandbox.customers()
    assert open_letters(h) == {"1": "InvalidRecord.duplicate_key"} and len(h.rt.store.dead_letters()) == 1


@pytest.mark.parametrize("batch_size", [1, 2, 3, 50])
def test_every_row_of_a_duplicated_key_is_dead_lettered_in_every_run_kind_and_page_size(
    harness_on: Build, sandbox: Sandbox, source_url: str, batch_size: int
) -> None:
    rows = [person("a", "Ann", 1), person("k1", "Newer", 60), person("k1", "Older", 0), person("z", "Zoe", 2)]
    rows += [person(f"m{i}", f"Mid{i}", 3 + i) for i in range(3)]  # keys between, pages of any size
    engine = make_crm(source_url, rows, [("k1", "vip"), ("a", "x")])
    h = harness_on(source_url, MAPPING, batch_size=batch_size)

    steps = [("full", None), ("incremental", "Older"), ("full", None), ("incremental", "Newer")]
    for step, (kind, touch) in enumerate(steps):
        if touch:  # the named row changes and becomes the newer one
            with engine.begin() as conn:
                later = dt.datetime(2026, 6, 1) + dt.timedelta(hours=step)
                conn.execute(people.update().where(people.c.name == touch).values(modified=later))
        result = h.sync(kind)
        held = sandbox.customers()
        assert "k1" not in held, (kind, touch)  # no winner, in no run
        assert result["counts"]["invalid"] >= (2 if kind == "full" else 1), kind
        assert open_letters(h) == {"k1": "InvalidRecord.duplicate_key"}, kind
        assert status(h, "k1") == "dead"
        assert closed_run(h, result)["status"] == "finished"
    assert sorted(held) == ["a", "m0", "m1", "m2", "z"]
    assert len(h.rt.store.dead_letters(state=None)) == 1  # one letter for the key, kept up to date


@pytest.mark.parametrize("stays", ["the synced row", "the new row"])
def test_a_duplicate_letter_is_resolved_only_when_the_key_is_unique_again_and_its_row_syncs(
    harness_on: Build, sandbox: Sandbox, source_url: str, stays: str
) -> None:
    engine = make_crm(source_url, [person("k1", "Ada", 0), person("b", "Bob", 1)])
    h = harness_on(source_url, MAPPING, batch_size=1)
    h.sync("full")
    assert sandbox.customers()["k1"]["name"] == "Ada"

    with engine.begin() as conn:  # a second row for k1 appears
        conn.execute(people.insert(), [person("k1", "Eve", 120)])
    for kind in ("incremental", "full", "incremental", "full"):  # the twin never syncs: no resolution
        h.sync(kind)
        assert sandbox.customers()["k1"]["name"] == "Ada", kind
        assert open_letters(h) == {"k1": "InvalidRecord.duplicate_key"} and status(h, "k1") == "dead", kind

    gone = "Eve" if stays == "the synced row" else "Ada"
    with engine.begin() as conn:
        conn.execute(people.delete().where(people.c.name == gone))
    result = h.sync("full")

    assert result["counts"]["enqueued"] == 1 and closed_run(h, result)["status"] == "finished"
    assert sandbox.customers()["k1"]["name"] == ("Ada" if stays == "the synced row" else "Eve")
    assert status(h, "k1") == "synced" and open_letters(h) == {}
    assert [d["state"] for d in h.rt.store.dead_letters(state=None)] == ["resolved"]
    assert h.sync("full")["counts"]["enqueued"] == 0  # settled


def test_a_task_planned_before_its_key_was_duplicated_leaves_the_duplicate_letter_open(
    harness_on: Build, sandbox: Sandbox, tmp_path: Any
) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = make_crm(url, [{**person("k1", "Ada", 0), "email": "not-an-email"}])
    h = harness_on(url, MAPPING)
    h.sync("full")
    assert open_letters(h) == {"k1": "InvalidRecord.invalid_email"}

    with engine.begin() as conn:
        conn.execute(people.update().values(email="ada@example.org"))
    h.plan("full")  # k1 is planned again (its letter to resolve), its task still on the queue
    with engine.begin() as conn:
        conn.execute(people.insert(), [person("k1", "Eve", 5)])
    h.planner.plan("full")  # a later run finds k1 twice: the same open letter, now a duplicate
    h.drain()  # the first run's task syncs the row it was planned with

    assert open_letters(h) == {"k1": "InvalidRecord.duplicate_key"}
    h.sync("full")
    assert status(h, "k1") == "dead" and open_letters(h) == {"k1": "InvalidRecord.duplicate_key"}


# -- c. keys that MariaDB's collation holds equal --------------------------------------------------

# Equal under MariaDB's default collations (case- and trailing-space-insensitive); distinct texts.
EQUAL_KEYS = ["x", "X", "x ", "X ", "x  ", "X  ", "x   ", "X   ", "x    ", "X    "]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
def test_collation_equal_keys_beyond_a_page_are_read_once_and_stay_distinct_customers(
    harness_on: Build, sandbox: Sandbox, source_url: str, batch_size: int
) -> None:
    rows = [person(k, f"Key{i}", i) for i, k in enumerate(EQUAL_KEYS)]
    rows += [person("X", "Twin", 30), person("a", "Ann", 31), person("y", "Yan", 32)]  # 'X' twice
    make_crm(source_url, rows, [("x", "lower"), ("X", "upper"), ("x ", "spaced")])
    h = harness_on(source_url, MAPPING, batch_size=batch_size)
    reader = h.planner.reader

    for since in (None, T0 - dt.timedelta(days=1)):
        pages = reader.raw_pages(since=since)
        read = list(itertools.islice(pages, len(rows) + 1))  # bounded: never an endless read
        assert next(pages, None) is None and sum(len(p.rows) for p in read) == len(rows), since

    full = h.sync("full")

    held = sandbox.customers()
    assert sorted(held) == sorted({"a", "y", *EQUAL_KEYS} - {"X"})
    assert held["x"]["tags"] == ["lower"] and held["x "]["tags"] == ["spaced"] and held["X "]["tags"] == []
    assert full["counts"]["read"] == len(rows) and full["counts"]["invalid"] == 2
    assert open_letters(h) == {"X": "InvalidRecord.duplicate_key"}

    incremental = h.sync("incremental")  # every row re-read through the lookback window
    assert incremental["counts"]["read"] == len(rows) and incremental["counts"]["enqueued"] == 0
    assert open_letters(h) == {"X": "InvalidRecord.duplicate_key"}


# -- d. duplicate ticket keys ----------------------------------------------------------------------


def tickets_in_proto(sandbox: Sandbox) -> list[tuple[str, str]]:
    got = httpx.get(f"{sandbox.root}/_sandbox/tickets/{SUBCOMPANY}").json()
    return sorted((t["subject"], t["provided_unique_id"]) for t in got)


@pytest.mark.parametrize("batch_size", [1, 50])
def test_two_cases_with_one_key_are_refused_that_ticket_alone_and_the_run_goes_on(
    harness_on: Build, sandbox: Sandbox, source_url: str, batch_size: int
) -> None:
    engine = make_crm(source_url, [person("c1", "Ann", 0), person("c2", "Bob", 1)])
    with engine.begin() as conn:
        conn.execute(
            cases.insert(),
            [
                {"case_id": "K1", "title": "Refund", "contact_id": "c1"},
                {"case_id": "K1", "title": "Broken", "contact_id": "c2"},
                {"case_id": "K2", "title": "Hello", "contact_id": "c2"},
            ],
        )
    h = harness_on(source_url, MAPPING + TICKETS, batch_size=batch_size)

    def send_now(keys: list[str]) -> None:
        for key in keys:
            send_ticket(h.rt, key)

    h.planner.enqueue_tickets = send_now

    first = h.sync("full")

    assert closed_run(h, first)["status"] == "finished" and first["counts"]["tickets_refused"] == 1
    assert tickets_in_proto(sandbox) == [("Hello", "c2")]
    by_key = {t["key"]: t for t in h.rt.store.tickets()}
    assert by_key["K2"]["status"] == "created"
    assert by_key["K1"]["status"] == "refused" and "duplicate_key" in by_key["K1"]["error"]
    assert "2 cases" in by_key["K1"]["error"]

    h.sync("full")  # still two cases: still refused, nothing sent
    assert tickets_in_proto(sandbox) == [("Hello", "c2")]

    with engine.begin() as conn:
        conn.execute(cases.delete().where(cases.c.title == "Refund"))
    again = h.sync("full")

    assert closed_run(h, again)["status"] == "finished"
    assert tickets_in_proto(sandbox) == [("Broken", "c2"), ("Hello", "c2")]
    assert {t["key"]: t["status"] for t in h.rt.store.tickets()} == {"K1": "created", "K2": "created"}
