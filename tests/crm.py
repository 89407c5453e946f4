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

# MAPPING over a SQLite CRM whose date_modified is text in any ISO form (`2026-06-01 16:00:00+02:00`,
# `2026-06-01T14:00:00`, with or without a fraction or an offset): the query turns it into UTC text
# of the form SQLAlchemy writes and binds, since SQLite compares the text (docs/mapping-cookbook.md).
MAPPING_SQLITE_TEXT_IN_UTC = MAPPING.replace(
    "  table: contacts\n",
    "  query: SELECT c.*, strftime('%Y-%m-%d %H:%M:%f', c.date_modified) || '000' AS changed_at FROM contacts c\n",
).replace("updated_at: date_modified", "updated_at: changed_at")

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


def make_crm(url: str, n: int, tags_per_contact: int = 2, table: sa.Table = contacts) -> sa.Engine:
    """Create the schema at `url` with `n` valid contacts, each with a few tags.

    `table` is `contacts` or a copy of it from `contacts_with_date_type`.
    """
    engine = sa.create_engine(url)
    meta = table.metadata
    meta.drop_all(engine)
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [contact_row(i) for i in range(n)])
        tags = [
            {"contact_id": f"C{i:05d}", "tag_name": t}
            for i in range(n)
            for t in ["vip", "newsletter", "beta"][: (i % (tags_per_contact + 1))]
        ]
        if tags:
            conn.execute(meta.tables["contact_tags"].insert(), tags)
    return engine


class IsoText(sa.types.TypeDecorator[dt.datetime]):
    """updated_at kept as text the way another application writes it: ISO 8601 with a space,
    no fraction of a second when there is none, and the writer's UTC offset when it has one
    (`2026-06-01 16:00:00+02:00`, `2026-01-01 00:00:05`); SQLite CRMs often hold such text."""

    impl = sa.String(40)
    cache_ok = True

    def __init__(self, naive_as: dt.tzinfo | None = None) -> None:
        """`naive_as`: the offset to write beside naive values (none by default)."""
        super().__init__()
        self.naive_as = naive_as

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> str | None:
        if value is not None and value.tzinfo is None and self.naive_as is not None:
            value = value.replace(tzinfo=self.naive_as)
        return None if value is None else value.isoformat(sep=" ")


def contacts_with_date_type(date_type: sa.types.TypeEngine[Any]) -> sa.Table:
    """A copy of `contacts` (in a MetaData of its own, with `contact_tags`) whose `date_modified`
    is of `date_type`: `sa.DateTime(timezone=True)`, `sa.TIMESTAMP()`, `IsoText()`..."""
    meta = sa.MetaData()
    contact_tags.to_metadata(meta)
    table = contacts.to_metadata(meta)
    table.c.date_modified.type = date_type
    return table


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
