"""The source reader on SQLite, PostgreSQL and MariaDB: keyset pages that read every contact
exactly once, side queries for tags and custom fields, incremental reads from a watermark, and
bad rows reported beside good ones. Every test runs on the three dialects (`source_url`)."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from worker.contact import Contact
from worker.errors import SourceError
from worker.source.mapping import parse_mapping
from worker.source.reader import Page, SourceReader

T0 = dt.datetime(2024, 3, 1, 9, 0, 0)

MAPPING = """\
source:
  table: contacts
  key: id
  updated_at: modified
  deleted: deleted
customer:
  name: [first_name, last_name]
  email: email
  location: city
"""


def contacts_table(metadata: sa.MetaData, key_type: Any = sa.Integer) -> sa.Table:
    # No primary key: the tests put NULL and duplicated keys in it, as a CRM view may.
    return sa.Table(
        "contacts",
        metadata,
        sa.Column("id", key_type),
        sa.Column("first_name", sa.String(50)),
        sa.Column("last_name", sa.String(50)),
        sa.Column("email", sa.String(100)),
        sa.Column("city", sa.String(50)),
        sa.Column("company_id", sa.Integer),
        sa.Column("tag_list", sa.String(200)),
        sa.Column("ltv", sa.Numeric(10, 2)),
        sa.Column("plan", sa.String(20)),
        sa.Column("is_vip", sa.Integer),
        sa.Column("modified", sa.DateTime),
        sa.Column("deleted", sa.Integer),
    )


def person(key: Any, n: int = 0, **values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": key,
        "first_name": f"First{n}",
        "last_name": f"Last{n}",
        "email": f"p{n}@example.com",
        "city": "Paris",
        "company_id": None,
        "tag_list": None,
        "ltv": Decimal(n) + Decimal("0.50"),
        "plan": "free",
        "is_vip": n % 2,
        "modified": T0 + dt.timedelta(minutes=n),
        "deleted": 0,
    }
    base.update(values)
    return base


@pytest.fixture
def engine(source_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(source_url)
    yield eng
    eng.dispose()


def create(engine: sa.Engine, *tables_rows: tuple[sa.Table, list[dict[str, Any]]]) -> None:
    metadata = tables_rows[0][0].metadata
    metadata.create_all(engine)
    with engine.begin() as conn:
        for table, rows in tables_rows:
            if rows:
                conn.execute(table.insert(), rows)


def setup_contacts(engine: sa.Engine, rows: list[dict[str, Any]], key_type: Any = sa.Integer) -> sa.Table:
    table = contacts_table(sa.MetaData(), key_type)
    create(engine, (table, rows))
    return table


def make_reader(engine: sa.Engine, mapping: str = MAPPING, batch_size: int = 1000) -> SourceReader:
    return SourceReader(engine, parse_mapping(mapping).mapping, batch_size=batch_size)


def contacts(pages: list[Page]) -> list[Contact]:
    return [c for p in pages for c in p.contacts]


def keys(pages: list[Page]) -> list[str]:
    return [c.key for c in contacts(pages)]


def quote(engine: sa.Engine, name: str) -> str:
    return f"`{name}`" if engine.dialect.name in ("mysql", "mariadb") else f'"{name}"'


# -- full reads -----------------------------------------------------------------------------------


def test_every_contact_is_read_exactly_once_in_key_order_across_many_pages(engine: sa.Engine) -> None:
    ids = list(range(1, 51))
    random.Random(7).shuffle(ids)
    setup_contacts(engine, [person(i, i) for i in ids])

    pages = list(make_reader(engine, batch_size=7).pages())

    assert [len(p) for p in pages] == [7] * 7 + [1]
    assert keys(pages) == [str(i) for i in range(1, 51)]
    assert all(not p.invalid and not p.deleted for p in pages)
    assert pages[0].last is not None and pages[0].last[1] == 7
    c = contacts(pages)[9]
    assert c.key == "10"
    assert c.profile == {"name": "First10 Last10", "email": "p10@example.com", "location": "Paris"}
    assert c.version == "2024-03-01T09:10:00.000000"


def test_a_read_whose_size_is_a_multiple_of_the_page_size_ends_cleanly(engine: sa.Engine) -> None:
    setup_contacts(engine, [person(i, i) for i in range(1, 15)])

    pages = list(make_reader(engine, batch_size=7).pages())

    assert keys(pages) == [str(i) for i in range(1, 15)]
    assert sum(len(p) for p in pages) == 14


def test_an_empty_source_gives_no_contacts(engine: sa.Engine) -> None:
    setup_contacts(engine, [])

    assert contacts(list(make_reader(engine, batch_size=7).pages())) == []


def test_string_keys_are_read_exactly_once_in_key_order(engine: sa.Engine) -> None:
    codes = [f"C-{i:04d}" for i in range(1, 51)]
    random.Random(3).shuffle(codes)
    setup_contacts(engine, [person(code, n) for n, code in enumerate(codes)], key_type=sa.String(20))

    pages = list(make_reader(engine, batch_size=7).pages())

    assert keys(pages) == sorted(codes)
    assert len(pages) == 8


def test_a_query_with_a_join_feeds_the_contacts(engine: sa.Engine) -> None:
    metadata = sa.MetaData()
    table = contacts_table(metadata)
    companies = sa.Table(
        "companies",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50)),
    )
    rows = [person(i, i, company_id=1 + i % 3) for i in range(1, 21)]
    rows.append(person(99, 99, company_id=None))  # no company: the inner join drops it
    create(
        engine,
        (companies, [{"id": 1, "name": "Acme"}, {"id": 2, "name": "Globex"}, {"id": 3, "name": "Initech"}]),
        (table, rows),
    )
    mapping = """\
source:
  query: |
    SELECT c.id AS contact_id, c.first_name, c.last_name, co.name AS company, c.modified
    FROM contacts c JOIN companies co ON co.id = c.company_id
    WHERE c.deleted = 0;
  key: contact_id
  updated_at: modified
customer:
  name: [first_name, last_name]
  location: company
"""
    pages = list(make_reader(engine, mapping, batch_size=6).pages())

    assert keys(pages) == [str(i) for i in range(1, 21)]
    by_key = {c.key: c for c in contacts(pages)}
    assert by_key["3"].profile == {"name": "First3 Last3", "location": "Acme"}
    assert by_key["4"].profile["location"] == "Globex"
    assert by_key["5"].profile["location"] == "Initech"


# -- tags and custom fields -----------------------------------------------------------------------


def tag_rows() -> list[dict[str, Any]]:
    return [
        {"contact_id": i, "tag_name": tag}
        for i in range(1, 21)
        for tag in (["vip", "newsletter"] if i % 2 else ["newsletter"]) + (["beta"] if i % 5 == 0 else [])
    ]


@pytest.mark.parametrize("alias", ["contact_key", "who", "key"])
def test_tags_come_from_a_key_tag_query_whose_first_column_is_the_key_whatever_its_name(
    engine: sa.Engine, alias: str
) -> None:
    metadata = sa.MetaData()
    table = contacts_table(metadata)
    tags = sa.Table("contact_tags", metadata, sa.Column("contact_id", sa.Integer), sa.Column("tag_name", sa.String(50)))
    # Contact 21 has no tag; tags of contact 500 belong to no contact.
    create(
        engine,
        (table, [person(i, i) for i in range(1, 22)]),
        (tags, [*tag_rows(), {"contact_id": 500, "tag_name": "orphan"}]),
    )
    column = quote(engine, alias) if alias == "key" else alias  # `key` is reserved in MariaDB
    mapping = MAPPING + f"tags:\n  query: SELECT contact_id AS {column}, tag_name AS tag FROM contact_tags\n"

    by_key = {c.key: c for c in contacts(list(make_reader(engine, mapping, batch_size=7).pages()))}

    assert len(by_key) == 21
    assert by_key["1"].tags == ["newsletter", "vip"]
    assert by_key["2"].tags == ["newsletter"]
    assert by_key["5"].tags == ["beta", "newsletter", "vip"]
    assert by_key["10"].tags == ["beta", "newsletter"]
    assert by_key["21"].tags == []
    assert all("orphan" not in c.tags for c in by_key.values())


def test_text_keys_with_quotes_commas_braces_and_accents_find_their_tags(engine: sa.Engine) -> None:
    # The page's keys go to the tag query as one array on PostgreSQL: each must arrive as it is.
    awkward = ["a,b", 'x"y', "{z}", "o'neil", "é-ñ", "back\\slash", "NULL", "sp ace"]
    metadata = sa.MetaData()
    table = contacts_table(metadata, sa.String(40))
    tags = sa.Table(
        "contact_tags", metadata, sa.Column("contact_id", sa.String(40)), sa.Column("tag_name", sa.String(50))
    )
    create(
        engine,
        (table, [person(k, i) for i, k in enumerate(awkward)]),
        (tags, [{"contact_id": k, "tag_name": f"t{i}"} for i, k in enumerate(awkward)]),
    )
    mapping = MAPPING + "tags:\n  query: SELECT contact_id, tag_name FROM contact_tags\n"

    by_key = {c.key: c.tags for c in contacts(list(make_reader(engine, mapping, batch_size=3).pages()))}

    assert by_key == {k: [f"t{i}"] for i, k in enumerate(awkward)}


def test_tags_from_a_binary_column_are_decoded(engine: sa.Engine) -> None:
    metadata = sa.MetaData()
    table = contacts_table(metadata)
    tags = sa.Table(
        "contact_tags", metadata, sa.Column("contact_id", sa.Integer), sa.Column("tag_name", sa.LargeBinary)
    )
    create(
        engine,
        (table, [person(1, 1), person(2, 2)]),
        (tags, [{"contact_id": 1, "tag_name": "été".encode()}, {"contact_id": 1, "tag_name": b" vip "}]),
    )
    mapping = MAPPING + "tags:\n  query: SELECT contact_id, tag_name FROM contact_tags\n"

    by_key = {c.key: c for c in contacts(list(make_reader(engine, mapping).pages()))}

    assert by_key["1"].tags == ["vip", "été"]
    assert by_key["2"].tags == []


def test_sqlite_text_that_is_not_utf8_refuses_its_row_and_reads_the_rest(tmp_path: Path) -> None:
    # SQLite stores whatever bytes it is given as TEXT, and its driver then fails the whole query.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    metadata = sa.MetaData()
    table = contacts_table(metadata)
    tags = sa.Table("contact_tags", metadata, sa.Column("contact_id", sa.Integer), sa.Column("tag_name", sa.Text))
    create(engine, (table, [person(i, i) for i in range(1, 6)]), (tags, [{"contact_id": 1, "tag_name": "vip"}]))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE contacts SET city = CAST(X'FF41' AS TEXT) WHERE id = 2"))
        conn.execute(sa.text("INSERT INTO contact_tags VALUES (4, CAST(X'6361FE' AS TEXT))"))
    mapping = MAPPING + "tags:\n  query: SELECT contact_id, tag_name FROM contact_tags\n"

    pages = list(make_reader(engine, mapping).pages())

    assert keys(pages) == ["1", "3", "5"] and contacts(pages)[0].tags == ["vip"]
    bad = {r.key: (r.error.code, r.error.field) for p in pages for r in p.invalid}
    assert bad == {"2": ("invalid_utf8", "customer.location"), "4": ("invalid_utf8", "tags")}
    engine.dispose()


def test_tags_come_from_a_delimited_column(engine: sa.Engine) -> None:
    setup_contacts(
        engine,
        [
            person(1, 1, tag_list="vip| newsletter |vip"),
            person(2, 2, tag_list=""),
            person(3, 3, tag_list=None),
            person(4, 4, tag_list="beta"),
        ],
    )
    mapping = MAPPING + "tags:\n  column: tag_list\n  separator: '|'\n"

    by_key = {c.key: c for c in contacts(list(make_reader(engine, mapping, batch_size=3).pages()))}

    assert by_key["1"].tags == ["newsletter", "vip"]
    assert by_key["2"].tags == []
    assert by_key["3"].tags == []
    assert by_key["4"].tags == ["beta"]


def test_custom_fields_come_from_columns_and_from_a_key_name_value_query(engine: sa.Engine) -> None:
    metadata = sa.MetaData()
    table = contacts_table(metadata)
    fields = sa.Table(
        "contact_fields",
        metadata,
        sa.Column("contact_id", sa.Integer),
        sa.Column("field", sa.String(50)),
        sa.Column("value", sa.String(100)),
    )
    field_rows = [{"contact_id": i, "field": "score", "value": str(i * 10)} for i in range(1, 11)]
    field_rows += [{"contact_id": 3, "field": "nickname", "value": "Trey"}]
    create(
        engine,
        (table, [person(i, i, plan="pro" if i % 3 == 0 else "free") for i in range(1, 12)]),
        (fields, field_rows),
    )
    mapping = MAPPING + (
        "custom_fields:\n"
        "  - {name: ltv, column: ltv, type: number}\n"
        "  - {name: plan, column: plan, type: select, options: [free, pro]}\n"
        "  - {name: vip, column: is_vip, type: toggle}\n"
        "  - query: SELECT contact_id AS contact_key, field AS name, value FROM contact_fields\n"
        "    types: {score: number}\n"
    )

    by_key = {c.key: c for c in contacts(list(make_reader(engine, mapping, batch_size=4).pages()))}

    assert len(by_key) == 11
    assert by_key["3"].fields == {"ltv": 3.5, "plan": "pro", "vip": True, "score": 30, "nickname": "Trey"}
    assert by_key["4"].fields == {"ltv": 4.5, "plan": "free", "vip": False, "score": 40}
    assert by_key["11"].fields == {"ltv": 11.5, "plan": "free", "vip": True}


def test_a_value_that_does_not_fit_its_field_makes_an_invalid_row_and_the_rest_is_read(engine: sa.Engine) -> None:
    setup_contacts(engine, [person(i, i, plan="platinum" if i == 3 else "free") for i in range(1, 6)])
    mapping = MAPPING + "custom_fields:\n  - {name: plan, column: plan, type: select, options: [free, pro]}\n"

    pages = list(make_reader(engine, mapping, batch_size=10).pages())

    assert keys(pages) == ["1", "2", "4", "5"]
    [bad] = pages[0].invalid
    assert bad.key == "3"
    assert bad.error.code == "field_option"
    assert bad.row["plan"] == "platinum"


# -- incremental reads ---------------------------------------------------------------------------


def test_since_reads_only_rows_updated_at_or_after_it_in_updated_at_then_key_order(engine: sa.Engine) -> None:
    # Keys in the opposite order of their times, so that the two orders differ.
    rows = [person(i, i, modified=T0 + dt.timedelta(minutes=100 - i)) for i in range(1, 41)]
    setup_contacts(engine, rows)
    since = T0 + dt.timedelta(minutes=80)  # exactly the time of contact 20

    pages = list(make_reader(engine, batch_size=7).pages(since=since))

    assert keys(pages) == [str(i) for i in range(20, 0, -1)]
    assert all(len(p) <= 7 for p in pages)


def test_rows_with_an_equal_updated_at_across_page_boundaries_are_neither_lost_nor_repeated(
    engine: sa.Engine,
) -> None:
    same = T0 + dt.timedelta(hours=1)
    rows = [person(i, i, modified=same) for i in range(1, 31)]
    rows += [person(i, i, modified=same + dt.timedelta(seconds=i)) for i in range(31, 41)]
    rows += [person(i, i, modified=T0) for i in range(41, 46)]  # before `since`
    random.Random(11).shuffle(rows)
    setup_contacts(engine, rows)

    pages = list(make_reader(engine, batch_size=7).pages(since=same))

    assert keys(pages) == [str(i) for i in range(1, 41)]
    assert len(pages) == 6


def test_rows_without_updated_at_are_skipped_by_since_but_read_by_a_full_read(engine: sa.Engine) -> None:
    rows = [person(i, i) for i in range(1, 11)]
    rows[2]["modified"] = None
    rows[7]["modified"] = None
    setup_contacts(engine, rows)
    reader = make_reader(engine, batch_size=3)

    incremental = keys(list(reader.pages(since=T0)))
    full = list(reader.pages())

    assert incremental == ["1", "2", "4", "5", "6", "7", "9", "10"]
    assert keys(full) == [str(i) for i in range(1, 11)]
    assert {c.key: c.version for c in contacts(full)}["3"] is None


def test_an_incremental_read_needs_an_updated_at_column(engine: sa.Engine) -> None:
    setup_contacts(engine, [person(1, 1)])
    mapping = MAPPING.replace("  updated_at: modified\n", "")

    with pytest.raises(SourceError, match="updated_at"):
        list(make_reader(engine, mapping).pages(since=T0))


def test_max_updated_is_the_largest_updated_at_of_each_page(engine: sa.Engine) -> None:
    times = [T0 + dt.timedelta(minutes=m) for m in (5, 1, 9, 3, 7, 2, 8)]
    rows = [person(i, i, modified=t) for i, t in enumerate(times, 1)]
    rows.append(person(8, 8, modified=None))
    setup_contacts(engine, rows)

    full = list(make_reader(engine, batch_size=4).pages())
    incremental = list(make_reader(engine, batch_size=4).pages(since=T0 + dt.timedelta(minutes=2)))

    assert [p.max_updated for p in full] == [T0 + dt.timedelta(minutes=9), T0 + dt.timedelta(minutes=8)]
    assert [p.max_updated for p in incremental] == [T0 + dt.timedelta(minutes=7), T0 + dt.timedelta(minutes=9)]


def test_the_signpost_of_a_full_read_is_the_largest_updated_at_in_the_source(engine: sa.Engine) -> None:
    times = [T0 + dt.timedelta(minutes=m) for m in (5, 1, 9, 3)]
    setup_contacts(engine, [person(i, i, modified=t) for i, t in enumerate(times, 1)] + [person(5, 5, modified=None)])

    assert make_reader(engine).max_updated() == T0 + dt.timedelta(minutes=9)


def test_an_empty_source_or_a_mapping_without_updated_at_has_no_signpost(engine: sa.Engine) -> None:
    setup_contacts(engine, [])
    assert make_reader(engine).max_updated() is None
    assert make_reader(engine, MAPPING.replace("  updated_at: modified\n", "")).max_updated() is None


# -- reading chosen keys (replay) -------------------------------------------------------------------


def test_pages_with_keys_reads_just_those_keys(engine: sa.Engine) -> None:
    setup_contacts(engine, [person(i, i) for i in range(1, 31)])
    reader = make_reader(engine, batch_size=4)

    as_text = keys(list(reader.pages(keys=["3", "17", "5", "29", "12", "404"])))
    as_ints = keys(list(reader.pages(keys=[8, 2])))

    assert sorted(as_text, key=int) == ["3", "5", "12", "17", "29"]
    assert sorted(as_ints, key=int) == ["2", "8"]


def test_pages_with_string_keys_reads_just_those_keys(engine: sa.Engine) -> None:
    setup_contacts(engine, [person(f"C-{i:03d}", i) for i in range(1, 21)], key_type=sa.String(20))

    got = keys(list(make_reader(engine, batch_size=2).pages(keys=["C-007", "C-001", "C-020", "C-999"])))

    assert sorted(got) == ["C-001", "C-007", "C-020"]


def test_pages_with_an_empty_key_list_reads_nothing(engine: sa.Engine) -> None:
    setup_contacts(engine, [person(i, i) for i in range(1, 6)])

    assert contacts(list(make_reader(engine, batch_size=2).pages(keys=[]))) == []


# -- bad rows --------------------------------------------------------------------------------------


def test_a_null_key_and_a_duplicated_key_become_invalid_rows_and_the_rest_of_the_page_is_fine(
    engine: sa.Engine,
) -> None:
    rows = [person(i, i) for i in range(1, 9)]
    rows.append(person(None, 50))
    rows.append(person(4, 51, email="other@example.com"))
    setup_contacts(engine, rows)

    pages = list(make_reader(engine, batch_size=20).pages())

    # No row of a duplicated key wins: both rows of 4 are invalid.
    assert keys(pages) == [str(i) for i in range(1, 9) if i != 4]
    assert sorted((r.key, r.error.code, r.row["email"]) for r in pages[0].invalid) == [
        ("4", "duplicate_key", "other@example.com"),
        ("4", "duplicate_key", "p4@example.com"),
    ]
    assert len(pages[0]) == 9  # seven good contacts beside the two rows of the duplicate
    # A NULL key has no place in key order: it comes on a page of its own, after the others.
    [keyless] = [r for p in pages[1:] for r in p.invalid]
    assert (keyless.key, keyless.error.code) == (None, "missing_key")
    assert keyless.row["email"] == "p50@example.com"
    assert sum(len(p) for p in pages) == 10


def duplicates(pages: list[Page]) -> list[tuple[str | None, str]]:
    return [(r.key, r.row["email"]) for p in pages for r in p.invalid if r.error.code == "duplicate_key"]


def test_a_key_duplicated_across_a_page_boundary_is_flagged_not_skipped(engine: sa.Engine) -> None:
    rows = [person(i, i) for i in range(1, 8)]
    rows.append(person(2, 20, email="second2@example.com"))  # pages of 2 would cut [1, 2] [2, 3] ...
    rows += [person(5, 50 + n, email=f"copy{n}of5@example.com") for n in range(4)]  # 5 on three pages
    setup_contacts(engine, rows)

    pages = list(make_reader(engine, batch_size=2).pages())

    assert keys(pages) == ["1", "3", "4", "6", "7"]  # no row of a duplicated key is built
    found = duplicates(pages)
    assert sorted(k for k, _ in found) == ["2", "2", "5", "5", "5", "5", "5"]  # every row of each
    assert sum(len(p) for p in pages) == len(rows)  # every row read exactly once


def test_a_key_duplicated_at_one_updated_at_across_a_page_boundary_is_flagged_in_an_incremental_read(
    engine: sa.Engine,
) -> None:
    rows = [person(i, i) for i in range(1, 6)]
    rows.append(person(2, 2, email="second2@example.com"))  # same key, same updated_at as key 2
    setup_contacts(engine, rows)

    pages = list(make_reader(engine, batch_size=2).pages(since=T0))

    assert keys(pages) == ["1", "3", "4", "5"]
    assert [k for k, _ in duplicates(pages)] == ["2", "2"]
    assert sum(len(p) for p in pages) == len(rows)


def test_null_keys_at_a_page_boundary_do_not_stop_the_read(engine: sa.Engine) -> None:
    rows = [person(None, 100 + n) for n in range(5)]
    rows += [person(i, i) for i in range(1, 21)]
    setup_contacts(engine, rows)

    for batch_size in (1, 3, 5, 7):
        pages = list(make_reader(engine, batch_size=batch_size).pages())
        assert keys(pages) == [str(i) for i in range(1, 21)], batch_size
        assert sum(len(p.invalid) for p in pages) == 5, batch_size


def test_null_keys_at_a_page_boundary_do_not_hide_rows_of_an_incremental_read(engine: sa.Engine) -> None:
    same = T0 + dt.timedelta(hours=1)
    rows = [person(None, 100 + n, modified=same) for n in range(3)]
    rows += [person(i, i, modified=same) for i in range(1, 11)]
    setup_contacts(engine, rows)

    for batch_size in (1, 2, 3, 4):
        pages = list(make_reader(engine, batch_size=batch_size).pages(since=same))
        assert keys(pages) == [str(i) for i in range(1, 11)], batch_size
        assert sum(len(p.invalid) for p in pages) == 3, batch_size


def test_a_deleted_flag_puts_the_contact_in_page_deleted(engine: sa.Engine) -> None:
    setup_contacts(engine, [person(i, i, deleted=1 if i in (2, 5) else 0) for i in range(1, 7)])

    pages = list(make_reader(engine, batch_size=10).pages())

    assert keys(pages) == ["1", "3", "4", "6"]
    assert [c.key for c in pages[0].deleted] == ["2", "5"]
    assert all(c.deleted for c in pages[0].deleted)
    assert len(pages[0]) == 6


# -- errors and the shape of the query -------------------------------------------------------------


def url_with_password(engine: sa.Engine, source_url: str, password: str) -> Iterator[str]:
    """The source URL with a password that the server accepts (a user made for it on MariaDB)."""
    url = sa.make_url(source_url)
    if url.get_backend_name() == "postgresql":  # trust auth: the password is sent, not checked
        yield url.set(password=password).render_as_string(hide_password=False)
        return
    user = "crm_" + uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"))
        conn.execute(sa.text(f"GRANT SELECT ON `{url.database}`.* TO '{user}'@'%'"))
    try:
        yield url.set(username=user, password=password).render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP USER '{user}'@'%'"))


def test_a_wrong_query_raises_source_error_with_a_clear_message_and_never_the_password(
    engine: sa.Engine, source_url: str
) -> None:
    setup_contacts(engine, [person(1, 1)])
    password = "S3cret-" + uuid.uuid4().hex[:10]
    mapping = MAPPING.replace("table: contacts", "query: SELECT id, first_name, nope FROM contacts")
    urls = [source_url] if engine.dialect.name == "sqlite" else url_with_password(engine, source_url, password)

    for url in urls:
        secret_engine = sa.create_engine(url)
        try:
            with pytest.raises(SourceError) as info:
                make_reader(secret_engine, mapping).columns()
            with pytest.raises(SourceError) as info_pages:
                list(make_reader(secret_engine, mapping).pages())
        finally:
            secret_engine.dispose()

        for err in (info.value, info_pages.value):
            msg = str(err)
            assert msg.startswith("<mapping>:2: the source query failed: ")  # the query's line first
            assert "nope" in msg
            assert password not in msg
            assert "FROM contacts" not in msg  # the reason, not the SQL


def test_a_wrong_tag_query_raises_source_error(engine: sa.Engine) -> None:
    setup_contacts(engine, [person(1, 1)])
    mapping = MAPPING + "tags:\n  query: SELECT contact_id, tag_name FROM no_such_tags\n"

    with pytest.raises(SourceError) as info:
        list(make_reader(engine, mapping).pages())

    assert "no_such_tags" in str(info.value)


def test_an_unreachable_database_raises_source_error_without_the_password(engine: sa.Engine, tmp_path: Any) -> None:
    password = "S3cret-" + uuid.uuid4().hex[:10]
    url = sa.make_url(str(engine.url))
    if url.get_backend_name() == "sqlite":
        bad = f"sqlite:///{tmp_path / 'missing' / 'dir' / 'crm.db'}"
    else:
        bad = url.set(password=password, host="127.0.0.1", port=1).render_as_string(hide_password=False)
    dead = sa.create_engine(bad)
    try:
        with pytest.raises(SourceError) as info:
            list(make_reader(dead).pages())
    finally:
        dead.dispose()

    assert str(info.value).startswith("cannot connect to the source database: ")
    assert password not in str(info.value)


def test_columns_are_the_columns_the_query_returns_in_order(engine: sa.Engine) -> None:
    setup_contacts(engine, [person(1, 1)])
    mapping = MAPPING.replace("table: contacts", "query: SELECT id, modified, email, first_name AS given FROM contacts")

    assert make_reader(engine, mapping).columns() == ["id", "modified", "email", "given"]


def test_a_mapped_column_the_query_does_not_return_is_found_with_its_line(engine: sa.Engine) -> None:
    setup_contacts(engine, [person(1, 1)])
    text = MAPPING.replace(
        "table: contacts", "query: SELECT id, first_name, last_name, modified, deleted FROM contacts"
    )
    text = text.replace("email: email", "email: emial")
    located = parse_mapping(text, "crm.yaml")
    reader = SourceReader(engine, located.mapping)

    returned = set(reader.columns())
    missing = [(col, located.where(path)) for col, path in located.mapping.columns_used() if col not in returned]

    line = text.splitlines().index("  email: emial") + 1
    assert missing == [("emial", f"crm.yaml:{line}"), ("city", f"crm.yaml:{line + 1}")]
