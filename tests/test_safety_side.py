"""One bad row is one bad row, for side rows and ticket cases (issue 11, item 3).

- A tag or custom-field row that the database matches to a contact but whose key reads as other
  text (DECIMAL 2.00 beside INTEGER 2, PostgreSQL's padded CHAR, a case-blind MariaDB collation)
  has no contact of its exact text: that contact is refused as `side_key_mismatch`, naming the
  query and the row's key, never sent without those rows; every other contact syncs with its tags.
  A row whose exact key is another contact's stays that contact's, on every page and run kind.
- A ticket case whose key the state DB cannot keep (empty, over 255 characters, a NUL) is skipped,
  counted and logged; one whose customer key no customer can have is `refused` with the reason.
  The run finishes and every other ticket is opened.

Asserted: what the sandbox holds, the dead letters and the tickets table, on real dialects.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import Sandbox
from tests.test_safety_keys import (
    MAPPING,
    TICKETS,
    Build,
    cases,
    closed_run,
    make_crm,
    open_letters,
    person,
    tickets_in_proto,
)
from tests.test_sync_flow import Harness
from worker.tickets import send_ticket

NUMBER_MAPPING = """\
source:
  table: people
  key: id
customer:
  name: name
tags:
  query: SELECT cid, tag FROM people_tags
custom_fields:
  - query: SELECT cid, name, value FROM people_notes
"""


def test_a_field_row_keyed_as_another_number_refuses_its_contact_alone_and_the_others_sync_with_tags(
    harness_on: Build, sandbox: Sandbox, source_url: str
) -> None:
    engine = sa.create_engine(source_url)
    sqlite = engine.dialect.name == "sqlite"
    key_type = "REAL" if sqlite else "DECIMAL(8,2)"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE people (id {key_type} PRIMARY KEY, name VARCHAR(20))"))
        conn.execute(sa.text(f"CREATE TABLE people_tags (cid {key_type}, tag VARCHAR(20))"))
        conn.execute(sa.text("CREATE TABLE people_notes (cid INTEGER, name VARCHAR(20), value VARCHAR(20))"))
        conn.execute(sa.text("INSERT INTO people VALUES (2, 'Ada'), (3, 'Bob'), (4, 'Cy')"))
        conn.execute(sa.text("INSERT INTO people_tags VALUES (2, 'vip'), (3, 'vip'), (4, 'new')"))
        conn.execute(sa.text("INSERT INTO people_notes VALUES (2, 'tier', 'gold')"))  # keyed 2, not 2.00
    engine.dispose()
    two, three, four = (f"{n}.0" if sqlite else f"{n}.00" for n in (2, 3, 4))
    h = harness_on(source_url, NUMBER_MAPPING)

    result = h.sync("full")

    assert closed_run(h, result)["status"] == "finished" and result["counts"]["invalid"] == 1
    held = sandbox.customers()
    assert sorted(held) == [three, four]
    assert held[three]["tags"] == ["vip"] and held[four]["tags"] == ["new"]
    assert open_letters(h) == {two: "InvalidRecord.side_key_mismatch"}
    (letter,) = h.rt.store.dead_letters()
    assert "the custom-field query returned rows keyed '2'" in letter["message"]
    assert f"matches to key {two!r}" in letter["message"] and "Cast the key column" in letter["message"]

    h.sync("full")  # an unchanged CRM: still refused, still never sent
    assert sorted(sandbox.customers()) == [three, four] and open_letters(h) == {two: "InvalidRecord.side_key_mismatch"}


def test_a_tag_row_goes_to_its_exact_key_and_one_only_a_collation_matches_refuses_that_contact(
    harness_on: Build, sandbox: Sandbox, source_url: str
) -> None:
    rows = [person("x", "Lower", 0), person("X", "Upper", 1), person("Ann", "Ann", 2)]
    engine = make_crm(source_url, rows, [("x", "lower"), ("X", "upper"), ("ANN", "vip")])
    mariadb = engine.dialect.name in ("mysql", "mariadb")
    h = harness_on(source_url, MAPPING, batch_size=1)

    h.sync("full")

    held = sandbox.customers()
    assert held["x"]["tags"] == ["lower"] and held["X"]["tags"] == ["upper"]
    if mariadb:  # its collation holds 'ANN' equal to 'Ann': the row is Ann's there, but not by its text
        assert "Ann" not in held and open_letters(h) == {"Ann": "InvalidRecord.side_key_mismatch"}
    else:  # elsewhere 'ANN' is no contact's key: nothing to refuse
        assert held["Ann"]["tags"] == [] and open_letters(h) == {}
    letters = open_letters(h)

    # An incremental page holding 'x' alone: the database still returns X's rows for it, and
    # they stay X's (a contact of their exact text), not a reason to refuse 'x'.
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE people SET name = 'Lowest', modified = :m WHERE pid = 'x'"), {"m": dt.datetime(2026, 3, 2)}
        )
    result = h.sync("incremental")

    assert closed_run(h, result)["status"] == "finished" and open_letters(h) == letters
    held = sandbox.customers()
    assert held["x"]["name"] == "Lowest" and held["x"]["tags"] == ["lower"] and held["X"]["tags"] == ["upper"]


def test_a_padded_char_key_in_a_tag_query_is_refused_where_it_reads_padded_and_its_tag_elsewhere(
    harness_on: Build, sandbox: Sandbox, source_url: str
) -> None:
    engine = make_crm(source_url, [person("k1", "Ada", 0), person("k22", "Bob", 1)])
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE padded (pid CHAR(5), tag VARCHAR(20))"))
        conn.execute(sa.text("INSERT INTO padded VALUES ('k1', 'vip'), ('k22', 'new')"))
    h = harness_on(source_url, MAPPING.replace("FROM labels", "FROM padded"))

    result = h.sync("full")

    assert closed_run(h, result)["status"] == "finished"
    held = sandbox.customers()
    if engine.dialect.name == "postgresql":  # CHAR(5) reads as 'k1   ', which PostgreSQL matches to 'k1'
        assert held == {} and open_letters(h) == {
            "k1": "InvalidRecord.side_key_mismatch",
            "k22": "InvalidRecord.side_key_mismatch",
        }
        assert "the tags query returned rows keyed 'k1   '" in h.rt.store.dead_letters()[0]["message"]
    else:  # SQLite keeps the text as written, MariaDB strips CHAR padding when read
        assert held["k1"]["tags"] == ["vip"] and held["k22"]["tags"] == ["new"] and open_letters(h) == {}


# -- ticket cases the state DB cannot keep ---------------------------------------------------------


def ticket_harness(harness_on: Build, tmp_path: Any, state_url: str, case_rows: list[dict[str, Any]]) -> Harness:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = make_crm(url, [person("c1", "Ann", 0), person("c2", "Bob", 1)])
    with engine.begin() as conn:
        conn.execute(cases.insert(), case_rows)
    engine.dispose()
    h = harness_on(url, MAPPING + TICKETS, state_url=state_url)

    def send_now(keys: list[str]) -> None:
        for key in keys:
            send_ticket(h.rt, key)

    h.planner.enqueue_tickets = send_now
    return h


def test_a_case_whose_key_cannot_be_kept_is_skipped_and_logged_and_the_other_tickets_are_opened(
    harness_on: Build, sandbox: Sandbox, tmp_path: Any, state_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    long_key = "L" * 300
    h = ticket_harness(
        harness_on,
        tmp_path,
        state_url,
        [
            {"case_id": "K1", "title": "Refund", "contact_id": "c1"},
            {"case_id": long_key, "title": "Too long", "contact_id": "c1"},
            {"case_id": "", "title": "No key", "contact_id": "c1"},
            {"case_id": "   ", "title": "Blank key", "contact_id": "c2"},
            {"case_id": "K\x00", "title": "NUL key", "contact_id": "c2"},
            {"case_id": "K2", "title": "Hello", "contact_id": "c2"},
        ],
    )

    with caplog.at_level(logging.WARNING, logger="worker.tickets"):
        result = h.sync("full")

    assert closed_run(h, result)["status"] == "finished"
    assert result["counts"]["tickets_skipped"] == 4 and result["counts"]["tickets_new"] == 2
    assert tickets_in_proto(sandbox) == [("Hello", "c2"), ("Refund", "c1")]
    assert sorted(t["key"] for t in h.rt.store.tickets()) == ["K1", "K2"]
    logged = [r.getMessage() for r in caplog.records]
    assert any("1 cases skipped" in m and "is 300 characters (at most 255)" in m for m in logged)
    assert any("2 cases skipped" in m and "is empty" in m for m in logged)
    assert any("holds a NUL character" in m for m in logged)
    where = h.planner.reader.mapping.where(("tickets", "key"))  # the mapping line of `key:`
    assert all(m.startswith(f"{where}: ") for m in logged if "skipped" in m)


def test_a_case_whose_customer_key_no_customer_can_have_is_refused_until_it_is_fixed(
    harness_on: Build, sandbox: Sandbox, tmp_path: Any, state_url: str
) -> None:
    h = ticket_harness(
        harness_on,
        tmp_path,
        state_url,
        [
            {"case_id": "K1", "title": "Refund", "contact_id": "c" * 300},
            {"case_id": "K2", "title": "Bad\x00subject", "contact_id": "c2"},
            {"case_id": "K3", "title": "Hello", "contact_id": "c2"},
        ],
    )

    result = h.sync("full")

    assert closed_run(h, result)["status"] == "finished" and result["counts"]["tickets_refused"] == 2
    assert tickets_in_proto(sandbox) == [("Hello", "c2")]
    by_key = {t["key"]: t for t in h.rt.store.tickets()}
    assert by_key["K1"]["status"] == "refused" and by_key["K1"]["customer"] is None
    assert "customer key is 300 characters (at most 255)" in by_key["K1"]["error"]
    assert by_key["K2"]["status"] == "refused" and "NUL" in by_key["K2"]["error"]

    with h.crm_engine.begin() as conn:  # the CRM is fixed: each refusal lifts by itself
        conn.execute(cases.update().where(cases.c.case_id == "K1").values(contact_id="c1"))
        conn.execute(cases.update().where(cases.c.case_id == "K2").values(title="Good subject"))
    h.sync("full")

    assert tickets_in_proto(sandbox) == [("Good subject", "c2"), ("Hello", "c2"), ("Refund", "c1")]
    assert {t["status"] for t in h.rt.store.tickets()} == {"created"}
