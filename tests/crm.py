"""A small CRM schema for tests: contacts, their tags, and the mapping that reads them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import sqlalchemy as sa

MAPPING = """\
source:
  table: contacts
  key: id
  updated_at: date_modified
  deleted: deleted
customer:
  name: [first_name, last_name]
  email: email1
  phone_number: phone_work
  location: city
  external_customer_id: id
tags:
  query: SELECT contact_id, tag_name FROM contact_tags
custom_fields:
  - {name: lifetime_value, column: ltv, type: number}
  - {name: plan, column: plan, type: select, options: [free, pro, enterprise]}
  - {name: vip, column: is_vip, type: toggle}
"""
# The optional `tickets:` section over a `cases (case_id, title, contact_id)` table of the CRM.
TICKETS_MAPPING = """\
tickets:
  query: SELECT case_id, title, contact_id FROM cases
  key: case_id
  subject: title
  customer: contact_id
"""

BASE_TIME = dt.datetime(2026, 1, 1)
md = sa.MetaData()
contacts = sa.Table(
    "contacts",
    md,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("first_name", sa.String(60)),
    sa.Column("last_name", sa.String(60)),
    sa.Column("email1", sa.String(120)),
    sa.Column("phone_work", sa.String(40)),
    sa.Column("city", sa.String(60)),
    sa.Column("ltv", sa.Numeric(12, 2)),
    sa.Column("plan", sa.String(20)),
    sa.Column("is_vip", sa.Integer),
    sa.Column("date_modified", sa.DateTime),
    sa.Column("deleted", sa.Integer, default=0),
)
contact_tags = sa.Table(
    "contact_tags",
    md,
    sa.Column("contact_id", sa.String(40), index=True),
    sa.Column("tag_name", sa.String(60)),
)


def contact_row(i: int, **overrides: Any) -> dict[str, Any]:
    """Contact number `i`, valid unless overridden."""
    row = dict(
        id=f"C{i:05d}",
        first_name="Ada",
        last_name=f"Test{i}",
        email1=f"c{i}@example.org",
        phone_work=f"+1 555 {i:07d}",
        city=["Kigali", "Lyon", None][i % 3],
        ltv=i * 10 + 0.5,
        plan=["free", "pro", "enterprise"][i % 3],
        is_vip=i % 2,
        date_modified=BASE_TIME + dt.timedelta(seconds=i),
        deleted=0,
    )
    row.update(overrides)
    return row


def make_crm(url: str, n: int, tags_per_contact: int = 2) -> sa.Engine:
    """Create the schema at `url` with `n` valid contacts, each with a few tags."""
    engine = sa.create_engine(url)
    md.drop_all(engine)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(contacts.insert(), [contact_row(i) for i in range(n)])
        tags = [
            {"contact_id": f"C{i:05d}", "tag_name": t}
            for i in range(n)
            for t in ["vip", "newsletter", "beta"][: (i % (tags_per_contact + 1))]
        ]
        if tags:
            conn.execute(contact_tags.insert(), tags)
    return engine


def write_mapping(folder: Path, text: str = MAPPING) -> Path:
    """Write the mapping file into `folder`; returns its path."""
    path = folder / "mapping.yaml"
    path.write_text(text)
    return path


def touch(engine: sa.Engine, ids: list[str], at: dt.datetime, **values: Any) -> None:
    """Change contacts and move their updated_at to `at`."""
    with engine.begin() as conn:
        conn.execute(contacts.update().where(contacts.c.id.in_(ids)).values(date_modified=at, **values))


def add_tag(engine: sa.Engine, contact_id: str, tag: str, at: dt.datetime) -> None:
    """Tag a contact (and bump its updated_at, as a CRM would)."""
    with engine.begin() as conn:
        conn.execute(contact_tags.insert().values(contact_id=contact_id, tag_name=tag))
        conn.execute(contacts.update().where(contacts.c.id == contact_id).values(date_modified=at))


def expected_customer(row: dict[str, Any], tags: list[str]) -> dict[str, Any]:
    """What the sandbox should hold for a contact row."""
    return {
        "name": f"{row['first_name']} {row['last_name']}",
        "email": row["email1"],
        "phone_number": row["phone_work"],
        "location": row["city"],
        "tags": sorted(tags),
    }
