"""The mapping file: the contract between a CRM and crmsync (DESIGN.md, "The mapping file").

Every refusal names `file:line` of the fault, so that a wrong mapping is fixed at
`crmsync check`, not discovered at row 40,000.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.source.mapping import LocatedMapping, Mapping, load_mapping, parse_mapping

# The example of DESIGN.md, verbatim except that `tags` takes one of its two alternatives
# (the example shows both, joined by "or"); `{TAGS}` is replaced by one of them.
DESIGN_EXAMPLE = """\
source:
  query: |                 # any SELECT with one row per contact (joins welcome), or `table: contacts`
    SELECT id, first_name, last_name, email1, phone_work, city, date_modified, deleted FROM contacts
  key: id                  # column that becomes provided_unique_id
  updated_at: date_modified  # column for the incremental watermark
  deleted: deleted         # optional: a truthy value means the contact is deleted in the CRM
customer:                  # Proto field: a column, or a list of columns joined with spaces
  name: [first_name, last_name]
  email: email1
  phone_number: phone_work
  location: city
  external_customer_id: id
tags:
{TAGS}
custom_fields:
  - {name: lifetime_value, column: ltv, type: number}
  - {name: plan, column: plan, type: select, options: [free, pro, enterprise]}
  - {name: vip, column: is_vip, type: toggle}
  - query: SELECT contact_id AS key, field AS name, value FROM contact_fields   # (key, name, value) rows
"""
TAGS_COLUMN = "  column: tag_list         # a delimited column (with `separator`), or"
TAGS_QUERY = "  query: SELECT contact_id AS key, tag_name AS tag FROM contact_tags   # (key, tag) rows"


def design_example(tags: str = TAGS_COLUMN) -> str:
    return DESIGN_EXAMPLE.replace("{TAGS}", tags)


MINIMAL = """\
source:
  table: contacts
  key: id
customer:
  name: full_name
"""


def refusal(text: str, path: str = "crm.yaml") -> str:
    """The message of the ConfigError that parsing `text` raises."""
    with pytest.raises(ConfigError) as info:
        parse_mapping(text, path)
    return str(info.value)


def line_of(text: str, needle: str) -> int:
    """1-based line number of the only line of `text` containing `needle`."""
    found = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(found) == 1, (needle, found)
    return found[0]


# -- the example and the two origins ----------------------------------------------------------------


def test_the_design_example_parses_into_every_part_it_names() -> None:
    located = parse_mapping(design_example(), "crm.yaml")
    m = located.mapping

    assert isinstance(located, LocatedMapping)
    assert located.path == "crm.yaml"
    assert m.source.key == "id"
    assert m.source.updated_at == "date_modified"
    assert m.source.deleted == "deleted"
    assert m.source.table is None
    assert m.source.select_sql().startswith("SELECT id, first_name, last_name")
    assert m.customer == {
        "name": ["first_name", "last_name"],
        "email": "email1",
        "phone_number": "phone_work",
        "location": "city",
        "external_customer_id": "id",
    }
    assert m.tags is not None
    assert (m.tags.column, m.tags.separator, m.tags.query) == ("tag_list", ",", None)
    assert [(f.name, f.column, f.type) for f in m.column_fields] == [
        ("lifetime_value", "ltv", "number"),
        ("plan", "plan", "select"),
        ("vip", "is_vip", "toggle"),
    ]
    assert m.column_fields[1].options == ("free", "pro", "enterprise")
    assert m.field_queries == ["SELECT contact_id AS key, field AS name, value FROM contact_fields"]


def test_the_design_example_takes_tags_from_a_query_instead() -> None:
    m = parse_mapping(design_example(TAGS_QUERY)).mapping

    assert m.tags is not None
    assert m.tags.column is None
    assert m.tags.query == "SELECT contact_id AS key, tag_name AS tag FROM contact_tags"


def test_a_table_source_selects_every_column_of_the_table() -> None:
    m = parse_mapping(MINIMAL).mapping

    assert m.source.table == "contacts"
    assert m.source.query is None
    assert m.source.select_sql() == "SELECT * FROM contacts"
    assert m.tags is None
    assert m.custom_fields == []


def test_a_query_source_is_used_as_written_without_its_trailing_semicolon() -> None:
    text = MINIMAL.replace("table: contacts", "query: 'SELECT c.id, c.full_name FROM contacts c;  '")
    m = parse_mapping(text).mapping

    assert m.source.table is None
    assert m.source.select_sql() == "SELECT c.id, c.full_name FROM contacts c"


def test_load_mapping_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "crm.yaml"
    path.write_text(design_example(), encoding="utf-8")

    located = load_mapping(path)

    assert located.path == str(path)
    assert located.mapping.source.key == "id"


# -- every refusal names the file and the line at fault ------------------------------------------


def test_a_missing_key_is_refused_with_the_line_of_its_source_section() -> None:
    text = MINIMAL.replace("  key: id\n", "")
    msg = refusal(text)

    assert msg.startswith(f"crm.yaml:{line_of(text, 'source:')}: source.key: ")
    assert "required" in msg.lower()


def test_query_and_table_together_are_refused_with_the_line_of_their_source() -> None:
    text = MINIMAL.replace("  table: contacts\n", "  table: contacts\n  query: SELECT * FROM contacts\n")
    msg = refusal(text)

    assert msg.startswith(f"crm.yaml:{line_of(text, 'source:')}: source: ")
    assert "exactly one of `query` or `table`" in msg


def test_neither_query_nor_table_is_refused() -> None:
    msg = refusal(MINIMAL.replace("  table: contacts\n", ""))

    assert msg.startswith("crm.yaml:1: source: ")
    assert "exactly one of `query` or `table`" in msg


def test_an_unknown_customer_field_is_refused_with_its_own_line() -> None:
    text = MINIMAL + "  emial: email1\n"
    msg = refusal(text)

    assert msg.startswith(f"crm.yaml:{line_of(text, 'emial')}: customer.emial: ")
    assert "unknown Proto customer field 'emial'" in msg
    assert "email" in msg  # lists the known fields


def test_an_empty_customer_field_name_is_refused_not_crashed() -> None:
    text = MINIMAL + "  '': 5\n"
    msg = refusal(text)

    assert msg.startswith(f"crm.yaml:{line_of(text, chr(39) * 2)}: ")


def test_a_customer_column_that_is_not_text_is_refused_with_its_line() -> None:
    text = MINIMAL.replace("name: full_name", "name: 5")
    msg = refusal(text)

    assert msg.startswith(f"crm.yaml:{line_of(text, 'name: 5')}: customer.name")


def test_an_unknown_setting_is_refused_with_its_line() -> None:
    text = MINIMAL.replace("  key: id\n", "  key: id\n  updated: modified\n")
    msg = refusal(text)

    assert msg.startswith(f"crm.yaml:{line_of(text, 'updated:')}: source.updated: ")


def test_a_select_field_without_options_is_refused_with_its_line() -> None:
    text = MINIMAL + (
        "custom_fields:\n  - {name: ltv, column: ltv, type: number}\n  - {name: plan, column: plan, type: select}\n"
    )
    msg = refusal(text)

    assert msg.startswith(f"crm.yaml:{line_of(text, 'name: plan')}: custom_fields.1: ")
    assert "`options` is required for type select" in msg


def test_options_on_a_field_that_is_not_a_select_are_refused_with_their_line() -> None:
    text = MINIMAL + (
        "custom_fields:\n"
        "  - {name: ltv, column: ltv, type: number}\n"
        "  - name: vip\n"
        "    column: is_vip\n"
        "    type: toggle\n"
        "    options: [gold, silver]\n"
    )
    msg = refusal(text)

    assert msg.startswith(f"crm.yaml:{line_of(text, 'name: vip')}: custom_fields.1: ")
    assert "only for it" in msg


def test_a_field_of_an_unknown_type_is_refused_with_the_line_of_its_type() -> None:
    text = MINIMAL + "custom_fields:\n  - name: ltv\n    column: ltv\n    type: money\n"
    msg = refusal(text)

    assert msg.startswith(f"crm.yaml:{line_of(text, 'type: money')}: custom_fields.0.type: ")


def test_a_query_custom_field_entry_with_a_name_is_refused_with_its_line() -> None:
    text = MINIMAL + (
        "custom_fields:\n"
        "  - {name: ltv, column: ltv, type: number}\n"
        "  - query: SELECT contact_id, field, value FROM contact_fields\n"
        "    name: extras\n"
    )
    msg = refusal(text)

    assert msg.startswith(f"crm.yaml:{line_of(text, 'query: SELECT contact_id')}: custom_fields.1: ")
    assert "takes no `name` or `column`" in msg


def test_a_custom_field_without_a_column_is_refused_with_its_line() -> None:
    text = MINIMAL + "custom_fields:\n  - {name: ltv, type: number}\n"
    msg = refusal(text)

    assert msg.startswith(f"crm.yaml:{line_of(text, 'name: ltv')}: custom_fields.0: ")


def test_tags_with_both_a_column_and_a_query_are_refused_with_their_line() -> None:
    text = design_example(TAGS_COLUMN + "\n" + TAGS_QUERY)
    msg = refusal(text)

    assert msg.startswith(f"crm.yaml:{line_of(text, 'tags:')}: tags: ")
    assert "exactly one of `column` or `query`" in msg


def test_invalid_yaml_is_refused_with_the_line_of_the_syntax_error() -> None:
    text = "source:\n  table: contacts\n  key: [id\ncustomer:\n  name: full_name\n"
    msg = refusal(text)

    assert re.match(r"crm\.yaml:[34]: not valid YAML: ", msg), msg


def test_a_tab_indented_file_is_refused_with_its_line() -> None:
    msg = refusal("source:\n  table: contacts\n\tkey: id\n")

    assert msg.startswith("crm.yaml:3: not valid YAML: ")


@pytest.mark.parametrize(
    "text",
    ["- source\n- customer\n", "just some text\n", "", "# only a comment\n"],
    ids=["list", "scalar", "empty", "comment"],
)
def test_a_document_that_is_not_a_mapping_is_refused_at_its_first_line(text: str) -> None:
    msg = refusal(text)

    assert msg.startswith("crm.yaml:1: ")
    assert "must be a YAML mapping" in msg


def test_a_missing_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "crm.yaml"
    with pytest.raises(ConfigError) as info:
        load_mapping(path)

    assert str(path) in str(info.value)
    assert "No such file" in str(info.value)


def test_a_file_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "crm.yaml"
    text = MINIMAL + "  emial: email1\n"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_mapping(path)

    assert str(info.value).startswith(f"{path}:{line_of(text, 'emial')}: ")


# -- what the mapping tells the rest of crmsync --------------------------------------------------


def test_columns_used_names_every_mapped_column_with_its_yaml_path() -> None:
    m = parse_mapping(design_example()).mapping

    assert m.columns_used() == [
        ("id", ("source", "key")),
        ("date_modified", ("source", "updated_at")),
        ("deleted", ("source", "deleted")),
        ("first_name", ("customer", "name", 0)),
        ("last_name", ("customer", "name", 1)),
        ("email1", ("customer", "email")),
        ("phone_work", ("customer", "phone_number")),
        ("city", ("customer", "location")),
        ("id", ("customer", "external_customer_id")),
        ("tag_list", ("tags", "column")),
        ("ltv", ("custom_fields", 0, "column")),
        ("plan", ("custom_fields", 1, "column")),
        ("is_vip", ("custom_fields", 2, "column")),
    ]


def test_columns_used_leaves_out_what_side_queries_return() -> None:
    m = parse_mapping(design_example(TAGS_QUERY)).mapping
    used = {col for col, _ in m.columns_used()}

    assert "tag_list" not in used
    assert not {"contact_id", "key", "tag", "name", "value"} & used


def test_each_column_used_path_points_at_the_line_naming_the_column() -> None:
    text = design_example()
    located = parse_mapping(text, "crm.yaml")
    where = dict((path, located.where(path)) for _, path in located.mapping.columns_used())

    assert where[("source", "key")] == f"crm.yaml:{line_of(text, 'key: id')}"
    assert where[("customer", "name", 0)] == f"crm.yaml:{line_of(text, 'name: [first_name')}"
    assert where[("customer", "email")] == f"crm.yaml:{line_of(text, 'email: email1')}"
    assert where[("tags", "column")] == f"crm.yaml:{line_of(text, 'column: tag_list')}"
    assert where[("custom_fields", 2, "column")] == f"crm.yaml:{line_of(text, 'column: is_vip')}"


EDITS = {
    "profile": [
        ("email: email1", "email: email2"),
        ("name: [first_name, last_name]", "name: [last_name, first_name]"),
        ("key: id   ", "key: contact_no"),
    ],
    "tags": [("column: tag_list ", "column: labels "), ("column: tag_list ", "separator: ';'\n  column: tag_list ")],
    "fields": [
        ("type: number", "type: text"),
        ("[free, pro, enterprise]", "[free, pro]"),
        ("AS name, value", "AS name, value_text AS value"),
    ],
}


@pytest.mark.parametrize(
    ("part", "old", "new"),
    [(part, old, new) for part, edits in EDITS.items() for old, new in edits],
)
def test_part_fingerprints_change_only_for_the_part_whose_mapping_changed(part: str, old: str, new: str) -> None:
    before_text = design_example()
    assert old in before_text
    before = parse_mapping(before_text).mapping.part_fingerprints()
    after = parse_mapping(before_text.replace(old, new, 1)).mapping.part_fingerprints()

    assert set(before) == {"profile", "tags", "fields"}
    assert after[part] != before[part]
    assert {k: v for k, v in after.items() if k != part} == {k: v for k, v in before.items() if k != part}


def test_part_fingerprints_ignore_comments_order_and_the_watermark_column() -> None:
    text = design_example()
    reordered = (
        text.replace("  email: email1\n", "")
        .replace("  location: city\n", "  location: city\n  email: email1\n")
        .replace("# column that becomes provided_unique_id", "")
        .replace("updated_at: date_modified", "updated_at: modified_at")
    )
    assert reordered != text

    assert parse_mapping(reordered).mapping.part_fingerprints() == parse_mapping(text).mapping.part_fingerprints()


def test_fingerprints_are_stable_across_parses() -> None:
    a = parse_mapping(design_example()).mapping.part_fingerprints()
    b = parse_mapping(design_example()).mapping.part_fingerprints()

    assert a == b
    assert all(re.fullmatch(r"[0-9a-f]{12}", v) for v in a.values())


def test_query_field_type_is_the_declared_type_of_a_queried_field_or_text() -> None:
    text = MINIMAL + (
        "custom_fields:\n"
        "  - {name: ltv, column: ltv, type: number}\n"
        "  - query: SELECT contact_id, field, value FROM contact_fields\n"
        "    types: {score: number, active: toggle, since: date}\n"
    )
    m: Mapping = parse_mapping(text).mapping

    assert m.query_field_type("score") == "number"
    assert m.query_field_type("active") == "toggle"
    assert m.query_field_type("since") == "date"
    assert m.query_field_type("nickname") == "text"
    # A column field's type is not a queried field's type.
    assert m.query_field_type("ltv") == "text"


def test_a_queried_field_of_an_unknown_type_is_refused_with_its_line() -> None:
    text = MINIMAL + (
        "custom_fields:\n  - query: SELECT contact_id, field, value FROM contact_fields\n    types: {score: money}\n"
    )
    msg = refusal(text)

    assert msg.startswith(f"crm.yaml:{line_of(text, 'types:')}: custom_fields.0.types.score: ")
