"""Bad rows: each gets a clear, specific error recorded against its contact; the run goes on.

The BAD_ROWS table is the bad-input suite: each case is checked on its own (build_contact), then
all of them are stored in one CRM on each dialect (SQLite, PostgreSQL, MariaDB) and synced
beside good rows, which reach the sandbox exactly as stored.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import SUBCOMPANY, Sandbox
from tests.test_sync_flow import Harness
from worker.contact import build_contact
from worker.errors import InvalidRecord
from worker.source.mapping import parse_mapping

MAPPING = """\
source:
  query: SELECT * FROM people
  key: pid
  updated_at: modified
customer:
  name: [given, family]
  email: email
  phone_number: phone
  location: town
  avatar: avatar
tags:
  column: labels
  separator: ";"
custom_fields:
  - {name: ltv, column: ltv, type: number}
  - {name: plan, column: plan, type: select, options: [free, pro]}
  - {name: vip, column: vip, type: toggle}
  - {name: since, column: since, type: date}
  - {name: note, column: note, type: text}
  - {name: big, column: big, type: number}
  - {name: exact, column: exact, type: number}
  - query: SELECT pid, fname, fvalue FROM people_fields
    types: {score: number}
"""
# The pseudo-column of a case that holds the (name, value) rows of the custom-field query.
FIELDS = "fields"

GOOD: dict[str, Any] = dict(
    pid="P1",
    given="Ada",
    family="Lovelace",
    email="ada@example.org",
    phone="+44 (0)20 7946-0000",
    town="London",
    avatar="https://example.org/a.png",
    labels="vip;beta",
    ltv="12.5",
    plan="pro",
    vip="yes",
    since="2024-03-05",
    note="ok",
    big=9007199254740991,  # the largest integer JSON carries exactly
    exact=Decimal("12345678.90"),
    modified=dt.datetime(2026, 1, 1),
)
GOOD_FIELDS: list[tuple[Any, Any]] = [("score", "7"), ("nickname", "Countess")]
# What Proto must hold for a good row, value for value and type for type.
GOOD_PROTO_FIELDS = {
    "ltv": 12.5,
    "plan": "pro",
    "vip": True,
    "since": "2024-03-05",
    "note": "ok",
    "big": 9007199254740991,
    "exact": 12345678.9,
    "score": 7,
    "nickname": "Countess",
}

# (case, column overrides, expected error code, expected field). An override names a column of the
# `people` row, or FIELDS: the rows of the custom-field query for the contact (GOOD_FIELDS if not).
BAD_ROWS: list[tuple[str, dict[str, Any], str, str]] = [
    ("null key", {"pid": None}, "missing_key", "source.key"),
    ("empty key", {"pid": ""}, "missing_key", "source.key"),
    ("blank key", {"pid": "   "}, "missing_key", "source.key"),
    ("key over 255 characters", {"pid": "k" * 256}, "key_too_long", "source.key"),
    ("10,000-character name", {"given": "A" * 10_000}, "invalid_name", "customer.name"),
    ("name with a NUL", {"given": "Ada\x00"}, "invalid_name", "customer.name"),
    ("name with a newline", {"family": "Love\nlace"}, "invalid_name", "customer.name"),
    ("name with an escape character", {"family": "\x1b[31mred"}, "invalid_name", "customer.name"),
    ("e-mail without @", {"email": "ada.example.org"}, "invalid_email", "customer.email"),
    ("e-mail without domain", {"email": "ada@"}, "invalid_email", "customer.email"),
    ("e-mail without a dot in the domain", {"email": "ada@localhost"}, "invalid_email", "customer.email"),
    ("e-mail with spaces", {"email": "ada lovelace@example.org"}, "invalid_email", "customer.email"),
    ("e-mail over 255 characters", {"email": "a" * 250 + "@example.org"}, "invalid_email", "customer.email"),
    ("phone with letters", {"phone": "call me"}, "invalid_phone_number", "customer.phone_number"),
    ("phone over 50 characters", {"phone": "1" * 51}, "invalid_phone_number", "customer.phone_number"),
    ("location with a tab", {"town": "Lon\tdon"}, "invalid_location", "customer.location"),
    ("avatar over 2048 characters", {"avatar": "https://x/" + "a" * 2048}, "invalid_avatar", "customer.avatar"),
    ("tag over 100 characters", {"labels": "t" * 101}, "invalid_tag", "tags"),
    ("tag with a control character", {"labels": "vip;be\x07ta"}, "invalid_tag", "tags"),
    ("number holding text", {"ltv": "a lot"}, "field_type", "ltv"),
    ("number holding a unit", {"ltv": "12 EUR"}, "field_type", "ltv"),
    ("number that is NaN", {"ltv": "NaN"}, "field_type", "ltv"),
    ("number that is infinite", {"ltv": "inf"}, "field_type", "ltv"),
    ("select value outside its options", {"plan": "enterprise"}, "field_option", "plan"),
    ("select value in another case", {"plan": "PRO"}, "field_option", "plan"),
    ("toggle holding maybe", {"vip": "maybe"}, "field_type", "vip"),
    ("toggle holding 2", {"vip": 2}, "field_type", "vip"),
    ("unparseable date", {"since": "05/03/2024"}, "field_type", "since"),
    ("impossible date", {"since": "2024-02-30"}, "field_type", "since"),
    ("date holding words", {"since": "last spring"}, "field_type", "since"),
    ("name that is not UTF-8 (bytes from the driver)", {"given": b"\xffAda"}, "invalid_utf8", "customer.name"),
    ("tag that is not UTF-8", {"labels": b"vip;\xfe"}, "invalid_utf8", "tags"),
    ("text field that is not UTF-8", {"note": b"caf\xe9"}, "invalid_utf8", "note"),
    # Numbers are ASCII digits, exact, or refused (int() and float() take the first three).
    ("number with underscores", {"ltv": "1_000"}, "field_type", "ltv"),
    ("number in Arabic-Indic digits", {"ltv": "\u0661\u0662\u0663"}, "field_type", "ltv"),
    ("number in fullwidth digits", {"ltv": "\uff11\uff12"}, "field_type", "ltv"),
    ("number with a thousands separator", {"ltv": "1,000"}, "field_type", "ltv"),
    ("hexadecimal number", {"ltv": "0x1F"}, "field_type", "ltv"),
    ("number that is -Infinity", {"ltv": "-Infinity"}, "field_type", "ltv"),
    ("number with two decimal points", {"ltv": "12.5.3"}, "field_type", "ltv"),
    ("number with a dangling exponent", {"ltv": "12e"}, "field_type", "ltv"),
    ("integer text beyond 2**53", {"ltv": "9007199254740993"}, "field_precision", "ltv"),
    ("decimal text with more digits than a double holds", {"ltv": "0.12345678901234567890"}, "field_precision", "ltv"),
    ("number that rounds to zero", {"ltv": "1e-400"}, "field_precision", "ltv"),
    ("BIGINT beyond 2**53", {"big": 9007199254740993}, "field_precision", "big"),
    ("negative BIGINT beyond 2**53", {"big": -9007199254740993}, "field_precision", "big"),
    (
        "NUMERIC with more digits than a double holds",
        {"exact": Decimal("0.12345678901234567890")},
        "field_precision",
        "exact",
    ),
    # Dates match as a whole: date.fromisoformat(text[:10]) took the first three.
    ("date with trailing text", {"since": "2024-03-01garbage"}, "field_type", "since"),
    ("date and time with trailing words", {"since": "2024-03-01 10:00 tomorrow"}, "field_type", "since"),
    ("date in ISO basic form", {"since": "20240301"}, "field_type", "since"),
    ("ISO week date", {"since": "2024-W09-5"}, "field_type", "since"),
    (
        "date in Arabic-Indic digits",
        {"since": "\u0662\u0660\u0662\u0664-\u0660\u0663-\u0660\u0661"},
        "field_type",
        "since",
    ),
    ("datetime at hour 25", {"since": "2024-03-01T25:00:00"}, "field_type", "since"),
    ("toggle holding yes please", {"vip": "yes please"}, "field_type", "vip"),
    ("toggle holding an Arabic-Indic one", {"vip": "\u0661"}, "field_type", "vip"),
    # Names from a custom-field query: refused for the contact, never a field "None" or a failed run.
    ("queried field with a NULL name", {FIELDS: [(None, "x")]}, "invalid_field_name", "custom_fields"),
    ("queried field with an empty name", {FIELDS: [("", "x")]}, "invalid_field_name", "custom_fields"),
    ("queried field with a blank name", {FIELDS: [("   ", "x")]}, "invalid_field_name", "custom_fields"),
    ("queried field name over 255 characters", {FIELDS: [("n" * 256, "x")]}, "invalid_field_name", "custom_fields"),
    ("queried field name with a newline", {FIELDS: [("nick\nname", "x")]}, "invalid_field_name", "custom_fields"),
    ("queried field name with a C1 control", {FIELDS: [("nick\x85", "x")]}, "invalid_field_name", "custom_fields"),
    ("queried field name that is not UTF-8", {FIELDS: [(b"nick\xff", "x")]}, "invalid_utf8", "custom_fields"),
    ("queried number with underscores", {FIELDS: [("score", "1_000")]}, "field_type", "score"),
    ("queried number beyond 2**53", {FIELDS: [("score", "-9007199254740993")]}, "field_precision", "score"),
]


@pytest.fixture(scope="module")
def mapping() -> Any:
    return parse_mapping(MAPPING).mapping


def split(overrides: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[Any, Any]]]:
    """A case as (people row, custom-field query rows)."""
    row = {**GOOD, **overrides}
    return row, row.pop(FIELDS, GOOD_FIELDS)


def test_a_good_row_is_valid(mapping: Any) -> None:
    contact = build_contact(mapping, GOOD, extra_fields=GOOD_FIELDS)
    assert contact.profile["name"] == "Ada Lovelace" and contact.tags == ["beta", "vip"]
    assert contact.fields == GOOD_PROTO_FIELDS


def test_the_suite_has_at_least_50_distinct_cases() -> None:
    assert len({case for case, *_ in BAD_ROWS}) == len(BAD_ROWS) >= 50


@pytest.mark.parametrize(("case", "overrides", "code", "field"), BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_every_bad_row_gets_a_specific_error(
    mapping: Any, case: str, overrides: dict[str, Any], code: str, field: str
) -> None:
    row, fields = split(overrides)
    with pytest.raises(InvalidRecord) as err:
        build_contact(mapping, row, extra_fields=fields)
    assert (err.value.code, err.value.field) == (code, field)
    assert str(err.value)  # a sentence an operator can act on


@pytest.mark.parametrize(
    "overrides",
    [{"email": ""}, {"email": "   "}, {"town": None}, {"labels": ";;"}, {"ltv": ""}, {"vip": None}, {"since": " "}],
    ids=["empty e-mail", "blank e-mail", "no town", "empty tags", "empty number", "no toggle", "blank date"],
)
def test_empty_cells_are_no_value_not_errors(mapping: Any, overrides: dict[str, Any]) -> None:
    build_contact(mapping, {**GOOD, **overrides}, extra_fields=GOOD_FIELDS)


def storable(dialect: str, overrides: dict[str, Any]) -> bool:
    """Whether a case's values can be stored in a CRM of `dialect` as the case means them.

    Bytes that are not UTF-8 exist only in SQLite's untyped text; PostgreSQL text holds no NUL;
    SQLite keeps a NUMERIC with more digits than a double as the nearest double.
    """
    values = [v for k, v in overrides.items() if k != FIELDS]
    values += [x for pair in overrides.get(FIELDS, ()) for x in pair]
    if any(isinstance(v, bytes) for v in values):
        return dialect == "sqlite"
    if any(isinstance(v, str) and "\x00" in v for v in values):
        return dialect != "postgresql"
    return dialect != "sqlite" or not any(isinstance(v, Decimal) for v in values)


def people_tables() -> tuple[sa.MetaData, sa.Table, sa.Table]:
    """The CRM of the suite: text columns (as CRMs often keep everything) and a few typed ones."""
    md = sa.MetaData()
    typed = {"big": sa.BigInteger(), "exact": sa.Numeric(40, 20), "modified": sa.DateTime()}
    people = sa.Table("people", md, *(sa.Column(c, typed.get(c, sa.Text())) for c in GOOD))
    fields = sa.Table("people_fields", md, *(sa.Column(c, sa.Text()) for c in ("pid", "fname", "fvalue")))
    return md, people, fields


def test_bad_rows_are_recorded_and_the_rest_of_the_run_syncs(
    source_url: str, harness_on: Callable[..., Harness], sandbox: Sandbox
) -> None:
    backend = sa.make_url(source_url).get_backend_name()
    dialect = "mariadb" if backend == "mysql" else backend
    cases = [(f"B{i:02d}", *c) for i, c in enumerate(BAD_ROWS) if storable(dialect, c[1])]
    good = [f"G{i}" for i in range(5)] + ["ZZ-tagless"]
    rows = [{**GOOD, "pid": key} for key in good[:-1]] + [{**GOOD, "pid": "ZZ-tagless", "labels": None}]
    side = [(key, GOOD_FIELDS) for key in good]
    for key, _, overrides, _, _ in cases:
        row, fields = split({"pid": key, **overrides})
        rows.append(row)
        side.append((row["pid"], fields))
    rows += [{**GOOD, "pid": "D0"}, {**GOOD, "pid": "D0", "given": "Twin"}]  # a key twice in the source
    md, people, people_fields = people_tables()
    engine = sa.create_engine(source_url)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(people.insert(), rows)
        conn.execute(
            people_fields.insert(),
            [{"pid": key, "fname": n, "fvalue": v} for key, fields in side if key is not None for n, v in fields],
        )
    engine.dispose()
    h = harness_on(source_url, MAPPING)

    h.sync()

    letters = {d["provided_unique_id"]: d for d in h.rt.store.dead_letters()}
    assert set(letters) == {o.get("pid", key) for key, _, o, _, _ in cases} | {"D0"}
    for key, case, overrides, code, field in cases:
        letter = letters[overrides.get("pid", key)]
        assert (letter["error_class"], letter["message"].split(":")[0]) == (f"InvalidRecord.{code}", field), case
    assert letters["D0"]["error_class"] == "InvalidRecord.duplicate_key"
    customers = sandbox.customers()
    assert "D0" not in customers  # a duplicated key sends none of its rows
    assert sorted(customers) == good
    for key in good:
        assert customers[key]["custom_fields"] == GOOD_PROTO_FIELDS
        assert [type(customers[key]["custom_fields"][n]) for n in ("big", "score")] == [int, int]
    assert customers["G0"]["name"] == "Ada Lovelace" and sorted(customers["G0"]["tags"]) == ["beta", "vip"]
    assert "None" not in {f["name"] for f in sandbox.http.get("/_sandbox/custom-fields/" + SUBCOMPANY).json()}
    assert {key: (h.rt.store.customer(key) or {}).get("status") for key in good} == dict.fromkeys(good, "synced")
