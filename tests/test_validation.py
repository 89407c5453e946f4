"""Bad rows: each gets a clear, specific error recorded against its contact; the run goes on."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import SUBCOMPANY, TOKEN, Sandbox
from worker.contact import build_contact
from worker.errors import InvalidRecord
from worker.jobs import planner
from worker.runtime import Runtime
from worker.settings import Settings
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
"""

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
    modified=dt.datetime(2026, 1, 1),
)

# (case, column overrides, expected error code, expected field)
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
]


@pytest.fixture(scope="module")
def mapping() -> Any:
    return parse_mapping(MAPPING).mapping


def test_a_good_row_is_valid(mapping: Any) -> None:
    contact = build_contact(mapping, GOOD)
    assert contact.profile["name"] == "Ada Lovelace" and contact.tags == ["beta", "vip"]
    assert contact.fields == {"ltv": 12.5, "plan": "pro", "vip": True, "since": "2024-03-05", "note": "ok"}


@pytest.mark.parametrize(("case", "overrides", "code", "field"), BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_every_bad_row_gets_a_specific_error(
    mapping: Any, case: str, overrides: dict[str, Any], code: str, field: str
) -> None:
    with pytest.raises(InvalidRecord) as err:
        build_contact(mapping, {**GOOD, **overrides})
    assert (err.value.code, err.value.field) == (code, field)
    assert str(err.value)  # a sentence an operator can act on


@pytest.mark.parametrize(
    "overrides",
    [{"email": ""}, {"email": "   "}, {"town": None}, {"labels": ";;"}, {"ltv": ""}, {"vip": None}, {"since": " "}],
    ids=["empty e-mail", "blank e-mail", "no town", "empty tags", "empty number", "no toggle", "blank date"],
)
def test_empty_cells_are_no_value_not_errors(mapping: Any, overrides: dict[str, Any]) -> None:
    build_contact(mapping, {**GOOD, **overrides})


def test_bad_rows_are_recorded_and_the_rest_of_the_run_syncs(
    sandbox: Sandbox, sqlite_state: str, tmp_path: Path
) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = sa.create_engine(crm)
    cols = list(GOOD)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE people ({', '.join(cols)})"))
        insert = sa.text(f"INSERT INTO people VALUES ({', '.join(':' + c for c in cols)})")
        rows = [{**GOOD, "pid": f"G{i}"} for i in range(5)]
        rows += [{**GOOD, "pid": f"B{i:02d}", **o} for i, (_, o, _, _) in enumerate(BAD_ROWS) if "pid" not in o]
        rows += [{**GOOD, **o} for _, o, _, _ in BAD_ROWS if "pid" in o]
        rows.append({**GOOD, "pid": "G0"})  # a key duplicated in the source
        rows.append({**GOOD, "pid": "ZZ-tagless", "labels": None})
        conn.execute(insert, rows)
    (tmp_path / "m.yaml").write_text(MAPPING)
    settings = Settings(
        source_url=crm,
        state_url=sqlite_state,
        mapping=tmp_path / "m.yaml",
        proto_base_url=sandbox.base_url,
        proto_subcompany_id=SUBCOMPANY,
        proto_token=TOKEN,
        rate_limit=1000,
    )
    rt = Runtime(settings)
    plan = planner(rt)
    queued: list[dict[str, Any]] = []
    plan.enqueue = lambda _q, msgs: queued.extend(msgs)
    result = plan.plan("full")
    # Both rows of the duplicated G0 are invalid (no first-wins), under one letter for the key.
    assert result.counts["invalid"] == len(BAD_ROWS) + 2
    assert sorted(m["contact"]["key"] for m in queued) == ["G1", "G2", "G3", "G4", "ZZ-tagless"]
    letters = rt.store.dead_letters()
    assert len(letters) == len(BAD_ROWS) + 1
    assert {d["error_class"] for d in letters} >= {f"InvalidRecord.{code}" for _, _, code, _ in BAD_ROWS}
    assert any(d["error_class"] == "InvalidRecord.duplicate_key" for d in letters)
    assert all(d["message"] for d in letters)
