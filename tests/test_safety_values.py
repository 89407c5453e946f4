"""Values are sent exactly or refused, naming the field (issue 11, items 3 and 5).

A value that does not read as its field's type, or that the wire format cannot carry exactly,
is an invalid record of its contact, with a code and the field named; a custom-field query that
returns a bad field name refuses that contact, never the run. Each test stores its rows in a CRM
on SQLite, PostgreSQL and MariaDB and asserts what the sandbox received and what the dead-letter
table holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import SUBCOMPANY, Sandbox
from tests.test_sync_flow import Harness
from worker.contact import field_value
from worker.errors import ConfigError, InvalidRecord
from worker.source.mapping import parse_mapping

MAPPING = """\
source:
  table: crm_people
  key: id
customer:
  name: name
custom_fields:
  - {name: amount, column: amount, type: number}
  - {name: big, column: big, type: number}
  - {name: exact, column: exact, type: number}
  - {name: digits, column: digits, type: text}
  - {name: since, column: since, type: date}
  - query: SELECT id, fname, fvalue FROM crm_fields
"""

md = sa.MetaData()
people = sa.Table(
    "crm_people",
    md,
    sa.Column("id", sa.String(20), primary_key=True),
    sa.Column("name", sa.Text),
    sa.Column("amount", sa.Text),  # numbers kept as text, as many CRMs keep them
    sa.Column("big", sa.BigInteger),
    sa.Column("exact", sa.Numeric(40, 20)),
    sa.Column("digits", sa.Numeric(40, 20)),
    sa.Column("since", sa.Text),
)
crm_fields = sa.Table(
    "crm_fields",
    md,
    sa.Column("id", sa.String(20)),
    sa.Column("fname", sa.Text),
    sa.Column("fvalue", sa.Text),
)


def synced(
    source_url: str,
    harness_on: Callable[..., Harness],
    rows: dict[str, dict[str, Any]],
    fields: Sequence[tuple[str, Any, Any]] = (),
) -> tuple[Harness, dict[str, Any]]:
    """Store `rows` (by key) and the custom-field query's (key, name, value) rows; sync them in full."""
    engine = sa.create_engine(source_url)
    md.create_all(engine)
    with engine.begin() as conn:
        blank = dict.fromkeys(people.c.keys())  # one set of columns for every row of the insert
        conn.execute(
            people.insert(), [{**blank, "name": f"Contact {key}", **row, "id": key} for key, row in rows.items()]
        )
        if fields:
            conn.execute(crm_fields.insert(), [{"id": k, "fname": n, "fvalue": v} for k, n, v in fields])
    engine.dispose()
    h = harness_on(source_url, MAPPING)
    return h, h.sync()


def letters(h: Harness) -> dict[str, tuple[str, str]]:
    """Open dead letters by key, as (error class, message)."""
    return {d["provided_unique_id"]: (d["error_class"], d["message"]) for d in h.rt.store.dead_letters()}


def test_a_date_with_trailing_text_is_refused_not_sent_as_its_day(
    source_url: str, harness_on: Callable[..., Harness], sandbox: Sandbox
) -> None:
    rows = {"ok": {"since": "2024-03-01"}, "bad": {"since": "2024-03-01garbage"}, "basic": {"since": "20240301"}}

    h, _ = synced(source_url, harness_on, rows)

    customers = sandbox.customers()
    assert sorted(customers) == ["ok"] and customers["ok"]["custom_fields"] == {"since": "2024-03-01"}
    dead = letters(h)
    assert sorted(dead) == ["bad", "basic"]
    assert dead["bad"][0] == "InvalidRecord.field_type" and dead["bad"][1].startswith("since: ")
    assert "'2024-03-01garbage'" in dead["bad"][1]


def test_numbers_with_underscores_or_non_ascii_digits_are_refused_not_read_as_numbers(
    source_url: str, harness_on: Callable[..., Harness], sandbox: Sandbox
) -> None:
    rows = {
        "ok": {"amount": "1000"},
        "underscore": {"amount": "1_000"},
        "arabic": {"amount": "\u0661\u0662\u0663"},  # ١٢٣, which float() reads as 123
        "fullwidth": {"amount": "\uff11\uff12"},
        "nan": {"amount": "NaN"},
    }

    h, _ = synced(source_url, harness_on, rows)

    customers = sandbox.customers()
    assert sorted(customers) == ["ok"]
    assert customers["ok"]["custom_fields"] == {"amount": 1000}
    assert {k: (c, m.split(":")[0]) for k, (c, m) in letters(h).items()} == {
        key: ("InvalidRecord.field_type", "amount") for key in ("underscore", "arabic", "fullwidth", "nan")
    }


def test_an_integer_json_cannot_carry_exactly_is_refused_not_rounded(
    source_url: str, harness_on: Callable[..., Harness], sandbox: Sandbox
) -> None:
    rows = {
        "max": {"big": 2**53 - 1},
        "min": {"big": -(2**53 - 1)},
        "over": {"big": 2**53 + 1},  # 9007199254740993, which float() makes 9007199254740992.0
        "text": {"amount": "9007199254740993"},
    }

    h, _ = synced(source_url, harness_on, rows)

    customers = sandbox.customers()
    assert sorted(customers) == ["max", "min"]
    received = [customers[k]["custom_fields"]["big"] for k in ("max", "min")]
    assert received == [9007199254740991, -9007199254740991] and {type(v) for v in received} == {int}
    dead = letters(h)
    assert dead["over"][0] == dead["text"][0] == "InvalidRecord.field_precision"
    assert dead["over"][1].startswith("big: ") and "9007199254740993" in dead["over"][1]
    assert dead["text"][1].startswith("amount: ")
    fields_sent = sandbox.stats()["by_route"][
        "PUT /v1/customers/{subcompany_id}/customer/{provided_unique_id}/add-custom-fields"
    ]
    assert fields_sent == {"200": 2}  # the refused ones cost no call


def test_a_decimal_is_sent_as_its_exact_value_or_refused(
    source_url: str, harness_on: Callable[..., Harness], sandbox: Sandbox
) -> None:
    if source_url.startswith("sqlite"):
        pytest.skip("SQLite stores a NUMERIC with more digits than a double as the nearest double")
    many_digits = Decimal("0.12345678901234567890")
    rows = {"ok": {"exact": Decimal("12345678.90"), "digits": many_digits}, "bad": {"exact": many_digits}}

    h, _ = synced(source_url, harness_on, rows)

    customers = sandbox.customers()
    assert sorted(customers) == ["ok"]
    assert customers["ok"]["custom_fields"] == {"exact": 12345678.9, "digits": "0.1234567890123456789"}
    error, message = letters(h)["bad"]
    assert error == "InvalidRecord.field_precision" and message.startswith("exact: ")


def test_a_null_field_name_from_a_query_is_refused_per_contact_never_a_field_named_none(
    source_url: str, harness_on: Callable[..., Harness], sandbox: Sandbox
) -> None:
    rows: dict[str, dict[str, Any]] = {"nameless": {}, "ok": {}}
    fields = [("nameless", None, "x"), ("nameless", "nickname", "Al"), ("ok", "nickname", "Ada")]

    h, result = synced(source_url, harness_on, rows, fields)

    assert result["counts"]["invalid"] == 1 and result["counts"]["enqueued"] == 1
    assert letters(h) == {
        "nameless": (
            "InvalidRecord.invalid_field_name",
            "custom_fields: a custom-field query returned a NULL field name",
        )
    }
    customers = sandbox.customers()
    assert sorted(customers) == ["ok"] and customers["ok"]["custom_fields"] == {"nickname": "Ada"}
    names = [f["name"] for f in sandbox.http.get(f"/_sandbox/custom-fields/{SUBCOMPANY}").json()]
    assert names == ["nickname"]


def test_bad_field_names_from_a_query_are_refused_per_contact_and_the_run_goes_on(
    source_url: str, harness_on: Callable[..., Harness], sandbox: Sandbox
) -> None:
    bad_names = {"empty": "", "long": "n" * 256, "control": "nick\tname", "escape": "\x1b[2J"}
    rows: dict[str, dict[str, Any]] = {key: {} for key in [*bad_names, "ok"]}
    fields = [(key, name, "x") for key, name in bad_names.items()] + [("ok", "nickname", "Ada")]

    h, result = synced(source_url, harness_on, rows, fields)

    assert result["counts"]["invalid"] == len(bad_names) and result["counts"]["enqueued"] == 1
    dead = letters(h)
    assert {k: c for k, (c, _) in dead.items()} == dict.fromkeys(bad_names, "InvalidRecord.invalid_field_name")
    assert "256 characters long (at most 255)" in dead["long"][1] and "empty" in dead["empty"][1]
    assert "control characters" in dead["control"][1] and "control characters" in dead["escape"][1]
    assert sorted(sandbox.customers()) == ["ok"]
    created = sandbox.stats()["by_route"]["POST /v1/custom-fields/{subcompany_id}/create-custom-field"]
    assert created == {"200": 1}  # nickname only: no name Proto would refuse with a 422 for the run


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "-0",
        "+5",
        " 7 ",
        "12.5",
        ".5",
        "5.",
        "0.1",
        "1e3",
        "-1E-7",
        "2.5e-3",
        "9007199254740991",
        "5e-324",
        "123456789012345.6",
        "000000000000000000012.5",
        "1e-99",
    ],
)
def test_a_number_read_from_text_is_sent_as_the_number_the_text_writes(text: str) -> None:
    sent = field_value("number", None, "amount", text)

    assert Decimal(repr(sent)) == Decimal(text.strip())  # the JSON text of what is sent, read back


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("1_000", "field_type"),
        ("\u0661\u0662\u0663", "field_type"),
        ("infinity", "field_type"),
        ("1e400", "field_type"),
        (Decimal("NaN"), "field_type"),
        (True, "field_type"),
        (9007199254740993, "field_precision"),
        ("1e20", "field_precision"),  # whole, and beyond the range every JSON reader holds exactly
        ("0.12345678901234567890", "field_precision"),
        ("1e-400", "field_precision"),
        ("9007199254740992", "field_precision"),
        ("1e16", "field_precision"),
        (Decimal("1E+20"), "field_precision"),
    ],
)
def test_a_number_that_would_reach_proto_changed_is_refused_with_its_code(value: Any, code: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        field_value("number", None, "amount", value)

    assert (err.value.code, err.value.field) == (code, "amount")


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ('{name: "nick\\tname", column: nick}', "contains control characters"),
        ("{name: " + "n" * 256 + ", column: nick}", "256 characters long (at most 255)"),
        ("{name: '  ', column: nick}", "the custom-field name is empty"),
        ('{query: SELECT id, fname, fvalue FROM crm_fields, types: {"a\\x1bb": number}}', "control characters"),
    ],
    ids=["control character", "over 255 characters", "blank", "in types"],
)
def test_a_mapping_field_name_proto_would_refuse_is_refused_at_its_line(entry: str, problem: str) -> None:
    text = MAPPING.replace("  - {name: amount,", f"  - {entry}\n  - {{name: amount,")

    with pytest.raises(ConfigError) as err:
        parse_mapping(text, "mapping.yaml")

    assert str(err.value).startswith("mapping.yaml:7: custom_fields.0") and problem in str(err.value)
