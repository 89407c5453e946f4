"""A contact in canonical form: the same CRM data gives the same payload and hashes whatever the
dialect or driver returned (Decimal or float, naive or aware datetime, str or bytes), and a row
that cannot be sent is an InvalidRecord with a stable code, never a crash."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest

from worker.contact import Contact, build_contact, field_value, payload_hash, version_text
from worker.errors import InvalidRecord
from worker.source.mapping import Mapping, parse_mapping

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
  external_customer_id: id
tags:
  column: tag_list
  separator: ";"
custom_fields:
  - {name: ltv, column: ltv, type: number}
  - {name: plan, column: plan, type: select, options: [free, pro, enterprise]}
  - {name: vip, column: is_vip, type: toggle}
  - {name: signed_up, column: signed_up, type: date}
  - {name: notes, column: notes}
  - query: SELECT contact_id, field, value FROM contact_fields
    types: {score: number}
"""


@pytest.fixture(scope="module")
def mapping() -> Mapping:
    return parse_mapping(MAPPING).mapping


def row(**values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": 42,
        "first_name": "Ada",
        "last_name": "Lovelace",
        "email": "ada@example.com",
        "city": "London",
        "tag_list": "vip;newsletter",
        "ltv": Decimal("12.50"),
        "plan": "pro",
        "is_vip": 1,
        "signed_up": dt.date(2024, 3, 5),
        "notes": "likes engines",
        "modified": dt.datetime(2024, 3, 5, 10, 30, 0, 123456),
        "deleted": 0,
    }
    base.update(values)
    return base


def invalid(mapping: Mapping, **values: Any) -> InvalidRecord:
    with pytest.raises(InvalidRecord) as info:
        build_contact(mapping, row(**values))
    return info.value


def refused(spec_type: str, value: Any, options: tuple[str, ...] | None = None) -> InvalidRecord:
    with pytest.raises(InvalidRecord) as info:
        field_value(spec_type, options, "f", value)
    return info.value


# -- a whole contact ----------------------------------------------------------------------------------


def test_a_row_becomes_a_contact_with_every_mapped_part(mapping: Mapping) -> None:
    c = build_contact(mapping, row(), extra_fields=[("score", "7"), ("nickname", "Ada")])

    assert c.key == "42"
    assert c.version == "2024-03-05T10:30:00.123456"
    assert c.deleted is False
    assert c.profile == {
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "location": "London",
        "external_customer_id": "42",
    }
    assert c.tags == ["newsletter", "vip"]
    assert c.fields == {
        "ltv": 12.5,
        "plan": "pro",
        "vip": True,
        "signed_up": "2024-03-05",
        "notes": "likes engines",
        "score": 7,
        "nickname": "Ada",
    }
    assert set(c.hashes) == {"profile", "tags", "fields"}


def test_a_name_from_several_columns_is_joined_with_spaces_skipping_nulls(mapping: Mapping) -> None:
    assert build_contact(mapping, row(first_name=None)).profile["name"] == "Lovelace"
    assert build_contact(mapping, row(last_name=None)).profile["name"] == "Ada"
    assert build_contact(mapping, row(first_name="  ", last_name="Lovelace")).profile["name"] == "Lovelace"
    assert build_contact(mapping, row(first_name=" Ada ", last_name="Lovelace ")).profile["name"] == ("Ada Lovelace")
    assert build_contact(mapping, row(first_name=None, last_name=None)).profile["name"] is None


def test_null_columns_give_null_profile_fields_and_no_custom_field(mapping: Mapping) -> None:
    c = build_contact(mapping, row(email=None, ltv=None, plan=None, is_vip=None, tag_list=None))

    assert c.profile["email"] is None
    assert c.tags == []
    assert "ltv" not in c.fields and "plan" not in c.fields and "vip" not in c.fields


@pytest.mark.parametrize("key", [None, "", "   ", b"  "], ids=["null", "empty", "spaces", "bytes"])
def test_a_null_or_blank_key_is_an_invalid_record_missing_key(mapping: Mapping, key: Any) -> None:
    err = invalid(mapping, id=key)

    assert err.code == "missing_key"
    assert err.field == "source.key"


def test_a_key_longer_than_proto_takes_is_an_invalid_record_key_too_long(mapping: Mapping) -> None:
    err = invalid(mapping, id="k" * 300)

    assert err.code == "key_too_long"
    assert "300" in str(err)


def test_a_key_of_the_longest_length_proto_takes_is_accepted(mapping: Mapping) -> None:
    assert build_contact(mapping, row(id="k" * 255)).key == "k" * 255


def test_keys_of_any_type_become_text(mapping: Mapping) -> None:
    assert build_contact(mapping, row(id=Decimal("42"))).key == "42"
    assert build_contact(mapping, row(id=b"C-42")).key == "C-42"
    assert build_contact(mapping, row(id="C-42")).key == "C-42"


# -- custom-field values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("12.50"), 12.5),
        (Decimal("12.00"), 12),
        (12, 12),
        (12.5, 12.5),
        (-3.0, -3),
        ("12.5", 12.5),
        (" 7 ", 7),
        ("-1e3", -1000),
        (b"12.5", 12.5),
    ],
)
def test_a_number_is_read_from_decimal_int_float_or_numeric_text(value: Any, expected: Any) -> None:
    got = field_value("number", None, "ltv", value)

    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize("value", ["twelve", "12 eur", True])
def test_a_number_field_holding_text_is_an_invalid_record_field_type(value: Any) -> None:
    err = refused("number", value)

    assert err.code == "field_type"
    assert err.field == "f"
    assert "number" in str(err)


@pytest.mark.parametrize("spec_type", ["number", "toggle", "date", "select"])
@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_cell_in_a_typed_field_means_no_value(spec_type: str, value: str) -> None:
    assert field_value(spec_type, ("a",), "f", value) is None


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), float("-inf"), Decimal("NaN"), Decimal("Infinity"), "nan", "inf", "1e400"],
)
def test_nan_and_infinity_are_refused_as_numbers(value: Any) -> None:
    assert refused("number", value).code == "field_type"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, True),
        (0, False),
        ("yes", True),
        ("no", False),
        (" Yes ", True),
        ("FALSE", False),
        (True, True),
        (False, False),
        (Decimal("1"), True),
        (1.0, True),
        (b"1", True),
        (b"no", False),
    ],
)
def test_a_toggle_is_read_from_numbers_words_and_booleans(value: Any, expected: bool) -> None:
    assert field_value("toggle", None, "vip", value) is expected


@pytest.mark.parametrize("value", ["maybe", 2, "-1"])
def test_a_toggle_that_is_neither_true_nor_false_is_refused(value: Any) -> None:
    err = refused("toggle", value)

    assert err.code == "field_type"
    assert "toggle" in str(err)


def test_a_select_value_among_its_options_is_kept() -> None:
    assert field_value("select", ("free", "pro"), "plan", "pro") == "pro"
    assert field_value("select", ("1", "2"), "tier", Decimal("2")) == "2"
    assert field_value("select", ("free", "pro"), "plan", b"free") == "free"


def test_a_select_value_outside_its_options_is_an_invalid_record_field_option() -> None:
    err = refused("select", "gold", ("free", "pro"))

    assert err.code == "field_option"
    assert err.field == "f"
    assert "'gold'" in str(err) and "free, pro" in str(err)


def test_a_select_value_outside_its_options_refuses_the_whole_contact(mapping: Mapping) -> None:
    err = invalid(mapping, plan="platinum")

    assert err.code == "field_option"
    assert err.field == "plan"


@pytest.mark.parametrize(
    "value",
    [
        dt.date(2024, 3, 5),
        dt.datetime(2024, 3, 5, 23, 59),
        "2024-03-05",
        "2024-03-05T08:00:00",
        " 2024-03-05 08:00:00 ",
        b"2024-03-05",
    ],
)
def test_a_date_is_read_from_a_date_a_datetime_or_iso_text(value: Any) -> None:
    assert field_value("date", None, "signed_up", value) == "2024-03-05"


@pytest.mark.parametrize("value", ["05/03/2024", "2024-02-30", "soon"])
def test_an_unparseable_date_is_refused(value: Any) -> None:
    err = refused("date", value)

    assert err.code == "field_type"
    assert "date" in str(err)


def test_a_text_field_takes_any_value_as_canonical_text() -> None:
    assert field_value("text", None, "notes", "hello") == "hello"
    assert field_value("text", None, "notes", Decimal("12.50")) == "12.5"
    assert field_value("text", None, "notes", 12.5) == "12.5"
    assert field_value("text", None, "notes", Decimal("12.00")) == field_value("text", None, "notes", 12.0)
    assert field_value("text", None, "notes", 7) == "7"
    assert field_value("text", None, "notes", Decimal("Infinity")) == "Infinity"  # PostgreSQL numeric
    assert field_value("text", None, "notes", None) is None


def test_a_null_value_is_no_value_for_every_type() -> None:
    for spec_type in ("text", "number", "toggle", "select", "date"):
        assert field_value(spec_type, ("a",), "f", None) is None


def test_a_bad_value_in_a_queried_field_refuses_the_contact_with_the_field_named(mapping: Mapping) -> None:
    with pytest.raises(InvalidRecord) as info:
        build_contact(mapping, row(), extra_fields=[("score", "high")])

    assert info.value.code == "field_type"
    assert info.value.field == "score"


# -- tags ----------------------------------------------------------------------------------------


def test_delimited_tags_are_split_stripped_deduplicated_and_sorted(mapping: Mapping) -> None:
    c = build_contact(mapping, row(tag_list=" vip ;newsletter;;vip; beta ;  "))

    assert c.tags == ["beta", "newsletter", "vip"]


def test_queried_tags_are_stripped_deduplicated_and_sorted_too() -> None:
    m = parse_mapping(MAPPING.replace('  column: tag_list\n  separator: ";"\n', "  query: SELECT 1\n")).mapping
    c = build_contact(m, row(), tags=["vip", " vip", "beta", "  ", "", b"gold"])

    assert c.tags == ["beta", "gold", "vip"]


# -- hashes: canonical content ----------------------------------------------------------------------


def test_hashes_are_the_same_for_decimal_and_float_of_one_value(mapping: Mapping) -> None:
    from_decimal = build_contact(mapping, row(ltv=Decimal("12.50"), city=Decimal("12.50")))
    from_float = build_contact(mapping, row(ltv=12.5, city=12.5))
    from_text = build_contact(mapping, row(ltv="12.5"))

    assert from_decimal.hashes == from_float.hashes
    assert from_decimal.hashes["fields"] == from_text.hashes["fields"]


def test_hashes_are_the_same_for_str_and_bytes_of_one_value(mapping: Mapping) -> None:
    as_text = build_contact(mapping, row())
    as_bytes = build_contact(
        mapping,
        row(id=b"42", first_name=b"Ada", email=b"ada@example.com", tag_list=b"vip;newsletter", plan=b"pro"),
    )

    assert as_bytes == as_text


def test_bytes_values_are_decoded_as_utf8(mapping: Mapping) -> None:
    c = build_contact(mapping, row(city="Zürich".encode(), notes="café".encode(), tag_list="été;vip".encode()))

    assert c.profile["location"] == "Zürich"
    assert c.fields["notes"] == "café"
    assert c.tags == ["vip", "été"]


def test_tag_order_does_not_change_the_hash(mapping: Mapping) -> None:
    a = build_contact(mapping, row(tag_list="a;b;c"))
    b = build_contact(mapping, row(tag_list="c;a;b;a"))

    assert a.hashes == b.hashes


@pytest.mark.parametrize(
    ("part", "change"),
    [
        ("profile", {"email": "ada@lovelace.org"}),
        ("profile", {"last_name": "King"}),
        ("tags", {"tag_list": "vip"}),
        ("fields", {"ltv": 13}),
        ("fields", {"is_vip": 0}),
    ],
)
def test_hashes_differ_only_for_the_part_that_changed(mapping: Mapping, part: str, change: dict[str, Any]) -> None:
    before = build_contact(mapping, row())
    after = build_contact(mapping, row(**change))

    assert after.hashes[part] != before.hashes[part]
    assert {k: v for k, v in after.hashes.items() if k != part} == {k: v for k, v in before.hashes.items() if k != part}
    assert payload_hash(after) != payload_hash(before)


def test_the_version_and_the_deleted_flag_do_not_change_the_hashes(mapping: Mapping) -> None:
    before = build_contact(mapping, row())
    after = build_contact(mapping, row(modified=dt.datetime(2030, 1, 1), deleted=1))

    assert after.hashes == before.hashes
    assert payload_hash(after) == payload_hash(before)


# -- the deleted flag ------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", [1, True, "1", "yes", "Y", "deleted", Decimal("1")])
def test_a_truthy_deleted_flag_marks_the_contact_deleted(mapping: Mapping, flag: Any) -> None:
    assert build_contact(mapping, row(deleted=flag)).deleted is True


@pytest.mark.parametrize("flag", [None, 0, False, "0", "no", "N", "false", "", Decimal("0")])
def test_a_false_deleted_flag_keeps_the_contact(mapping: Mapping, flag: Any) -> None:
    assert build_contact(mapping, row(deleted=flag)).deleted is False


# -- versions ---------------------------------------------------------------------------------------


def test_version_text_of_a_naive_datetime_is_taken_as_utc() -> None:
    assert version_text(dt.datetime(2024, 3, 5, 10, 30)) == "2024-03-05T10:30:00.000000"


def test_version_text_of_an_aware_datetime_is_converted_to_utc() -> None:
    paris = dt.timezone(dt.timedelta(hours=2))
    aware = dt.datetime(2024, 3, 5, 12, 30, 0, 5, tzinfo=paris)

    assert version_text(aware) == "2024-03-05T10:30:00.000005"
    assert version_text(aware) == version_text(dt.datetime(2024, 3, 5, 10, 30, 0, 5))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-05 10:30:00", "2024-03-05T10:30:00.000000"),
        ("2024-03-05T10:30:00.25", "2024-03-05T10:30:00.250000"),
        ("2024-03-05T12:30:00+02:00", "2024-03-05T10:30:00.000000"),
        ("2024-03-05T10:30:00Z", "2024-03-05T10:30:00.000000"),
    ],
)
def test_version_text_of_a_string_is_parsed_and_normalised(text: str, expected: str) -> None:
    assert version_text(text) == expected


def test_version_text_of_dates_none_and_unparseable_text() -> None:
    assert version_text(dt.date(2024, 3, 5)) == "2024-03-05T00:00:00.000000"
    assert version_text(None) is None
    assert version_text("last tuesday") == "last tuesday"


def test_versions_sort_in_time_order() -> None:
    times = [dt.datetime(2024, 1, 1, 9, 59, 59, 999999), dt.datetime(2024, 1, 1, 10), dt.datetime(2025, 1, 1)]
    texts = [version_text(t) for t in times]

    assert texts == sorted(texts)


def test_a_mapping_without_updated_at_gives_no_version() -> None:
    m = parse_mapping("source: {table: c, key: id}\ncustomer: {name: n}\n").mapping

    assert build_contact(m, {"id": 1, "n": "x"}).version is None


# -- the payload a task carries -------------------------------------------------------------------


def test_a_contact_survives_the_round_trip_through_a_json_task_payload(mapping: Mapping) -> None:
    c = build_contact(mapping, row(), extra_fields=[("score", 3)])
    wire = json.loads(json.dumps(c.to_payload()))
    back = Contact.from_payload(wire)

    assert back == c
    assert back.hashes == c.hashes
    assert payload_hash(back) == payload_hash(c)
    assert back.part("profile") == c.profile
    assert back.part("tags") == c.tags
    assert back.part("fields") == c.fields


def test_the_payload_holds_the_dataclass_fields_and_survives_json(mapping: Mapping) -> None:
    import dataclasses
    import json

    c = build_contact(mapping, row(), extra_fields=[("score", 3)])
    payload = c.to_payload()

    assert payload == dataclasses.asdict(c)
    assert Contact.from_payload(json.loads(json.dumps(payload))) == c


def test_hashes_are_those_of_canonical_json() -> None:
    import hashlib

    from worker.contact import content_hash

    value = {"b": [1, 2.5, None, True], "a": "é", "c": {"z": "x", "y": ""}}
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    assert content_hash(value) == hashlib.sha256(blob.encode()).hexdigest()[:32]


@pytest.mark.parametrize("year", [1, 999, 1000, 2026, 9999])
def test_versions_keep_one_text_form_in_every_year(year: int) -> None:
    value = dt.datetime(year, 3, 4, 5, 6, 7, 89)

    assert version_text(value) == value.strftime("%Y-%m-%dT%H:%M:%S.%f")
