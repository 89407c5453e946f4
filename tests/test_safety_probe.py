"""Issue 11, tried by an adversary: variants of each reproduction that the first fixes missed.

Each test is named for the behaviour it protects and runs, where its point is what a user sees,
through the `crmsync` command against the sandbox and real SQLite, PostgreSQL and MariaDB CRMs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import Sandbox
from tests.crm import MAPPING, write_mapping
from tests.test_safety_source import city_of, crm, crmsync, env  # noqa: F401 (fixtures)
from worker.errors import ConfigError
from worker.source.mapping import one_statement, parse_mapping
from worker.source.reader import source_engine

# -- one statement per query, whatever its quoting ------------------------------------------------

# Each closes crmsync's wrapper, ends the read-only transaction and writes, hidden from all three
# lexes of `one_statement` by quoting that PostgreSQL reads otherwise.
SMUGGLED_PAST_THE_LEXER = {
    # `name'\'` is the name literal `\` (the E ends a type name: no escape string); `$$'$$` a dollar
    # quote (the standard and MySQL lexes see a quote open); `#` PostgreSQL's XOR (MySQL: a comment).
    "E ending a type name": (
        r"SELECT c.*, name'\' AS z, $$'$$ AS w, 1 # 2 AS v FROM contacts c) AS x; COMMIT; "
        "UPDATE contacts SET city = chr(88) WHERE id = chr(67) || '00003'; SELECT * FROM (SELECT * FROM contacts"
    ),
    # PostgreSQL takes any non-ASCII character in a name: `€$$` is a name, no dollar quote.
    "dollar sign after a non-ASCII name character": (
        "SELECT c.*, 1 AS €$$, $$'$$ AS w FROM contacts c) AS x; COMMIT; "
        "UPDATE contacts SET city = chr(88) WHERE id = chr(67) || chr(48) || chr(48) || chr(48) || chr(48) || chr(51); "
        "SELECT * FROM (SELECT * FROM contacts"
    ),
}


@pytest.mark.parametrize("query", SMUGGLED_PAST_THE_LEXER.values(), ids=SMUGGLED_PAST_THE_LEXER.keys())
def test_a_second_statement_hidden_by_postgresql_quoting_is_refused_when_the_file_is_read(query: str) -> None:
    text = MAPPING.replace("  table: contacts", f"  query: {json.dumps(query)}")
    with pytest.raises(ConfigError, match=r"^m.yaml:2: source.query: holds more than one SQL statement"):
        parse_mapping(text, "m.yaml")


@pytest.mark.parametrize(
    "query",
    [
        "SELECT E'a;b' AS note, e'c;d' AS other FROM contacts",  # escape strings standing alone
        "SELECT 1 AS a1, 'x;y' AS note FROM contacts",
        "SELECT 1 AS x$y, ';' AS note FROM contacts",  # `$` inside a name
    ],
)
def test_postgresql_quoting_that_really_hides_a_semicolon_is_still_accepted(query: str) -> None:
    assert one_statement(query) == query


def test_a_postgresql_source_connection_runs_one_statement_per_query_whatever_its_text(
    crm: sa.Engine,  # noqa: F811
) -> None:
    """The database refuses a second statement itself: the lexer is not the only guard."""
    if crm.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's driver is the one that runs a text of several statements at once")
    engine = source_engine(crm.url.render_as_string(hide_password=False))
    sql = "SELECT 1; COMMIT; UPDATE contacts SET city = 'X' WHERE id = 'C00003'; SELECT 1"
    with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="multiple commands"):
        conn.execute(sa.text(sql))
    engine.dispose()
    assert city_of(crm, "C00003") == "Kigali"


@pytest.mark.parametrize("query", SMUGGLED_PAST_THE_LEXER.values(), ids=SMUGGLED_PAST_THE_LEXER.keys())
def test_check_and_dry_run_never_write_what_a_smuggled_query_holds(
    env: dict[str, str],  # noqa: F811
    crm: sa.Engine,  # noqa: F811
    tmp_path: Path,
    sandbox: Sandbox,
    query: str,
) -> None:
    write_mapping(tmp_path, MAPPING.replace("  table: contacts", f"  query: {json.dumps(query)}"))
    for args in (("check",), ("sync", "full", "--dry-run")):
        done = crmsync(env, *args)
        assert done.returncode != 0, (args, done.stdout, done.stderr)
        assert "holds more than one SQL statement" in done.stdout + done.stderr, args
    assert city_of(crm, "C00003") == "Kigali"
    assert sandbox.customers() == {}


# `source.table` is put into SQL as written: the same wrapper-closing text as the issue's.
TABLE_SMUGGLED = (
    "contacts) AS x; COMMIT; UPDATE contacts SET city = 'X' WHERE id = 'C00003'; SELECT * FROM (SELECT * FROM contacts"
)


def test_a_source_table_that_is_not_a_table_name_is_refused_at_its_line_and_never_runs(
    env: dict[str, str],  # noqa: F811
    crm: sa.Engine,  # noqa: F811
    tmp_path: Path,
    sandbox: Sandbox,
) -> None:
    mapping = write_mapping(tmp_path, MAPPING.replace("  table: contacts", f"  table: {json.dumps(TABLE_SMUGGLED)}"))
    for args in (("check",), ("sync", "full", "--dry-run"), ("sync", "full", "--wait")):
        done = crmsync(env, *args)
        assert done.returncode == (1 if args == ("check",) else 2), (args, done.stdout, done.stderr)
        assert f"{mapping}:2: source.table: is not a table name" in done.stdout + done.stderr, args
    assert city_of(crm, "C00003") == "Kigali"
    assert sandbox.customers() == {}


@pytest.mark.parametrize("table", ["contacts", "crm.contacts", '"My Contacts"', "`odd name`", 'public."Kunden_ü"'])
def test_a_source_table_name_plain_qualified_or_quoted_is_accepted(table: str) -> None:
    mapping = parse_mapping(MAPPING.replace("  table: contacts", f"  table: {json.dumps(table)}")).mapping
    assert mapping.source.select_sql() == f"SELECT * FROM {table}"


@pytest.mark.parametrize("table", ["contacts WHERE 1 = 1", "contacts -- x", '"a;b"', "contacts;", "(SELECT 1)"])
def test_a_source_table_holding_sql_is_refused(table: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("m.yaml:2: source.table: is not a table name")):
        parse_mapping(MAPPING.replace("  table: contacts", f"  table: {json.dumps(table)}"), "m.yaml")


# -- the custom-field registry against Proto ------------------------------------------------------


def test_check_reports_a_queried_field_whose_declared_type_differs_in_proto(
    env: dict[str, str],  # noqa: F811
    tmp_path: Path,
    sandbox: Sandbox,
) -> None:
    """`types:` of a custom-field query is checked against Proto like a column field's `type:`."""
    from worker.proto import ProtoClient

    if "sqlite" not in env["CRMSYNC_SOURCE_URL"]:
        pytest.skip("a check of Proto's fields, whatever the source")
    with ProtoClient(sandbox.base_url, env["CRMSYNC_PROTO_SUBCOMPANY_ID"], env["CRMSYNC_PROTO_TOKEN"]) as client:
        client.create_custom_field("signup", "text", None)  # made by hand in Proto, as text
    query = "  - query: SELECT id, 'signup', '2024-03-01' FROM contacts\n    types: {signup: date}\n"
    mapping = write_mapping(tmp_path, MAPPING + query)
    done = crmsync(env, "check")
    assert done.returncode == 1, done.stdout
    assert (
        f"FAIL  {mapping}:19: custom field 'signup' is text in Proto, not date; types cannot change once created"
        in done.stdout
    ), done.stdout


# -- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("written", ["\ufeff{t}\r\n", "\ufeff{t}", "{t}\r\n\r\n"], ids=["bom-crlf", "bom", "crlf"])
def test_a_token_file_saved_by_a_windows_editor_is_read_as_its_token(tmp_path: Path, written: str) -> None:
    from tests.conftest import TOKEN
    from worker.settings import Settings

    token_file = tmp_path / "proto-token"
    token_file.write_bytes(written.format(t=TOKEN).encode("utf-8"))
    settings = Settings(_env_file=None, proto_token_file=token_file)
    assert settings.proto_token is not None and settings.proto_token.get_secret_value() == TOKEN


# -- side rows of a key the database matches ------------------------------------------------------


def test_a_tag_row_the_database_matches_to_a_contact_is_never_dropped_silently(source_url: str) -> None:
    from worker.source.reader import SourceReader

    engine = sa.create_engine(source_url)
    key_type = "REAL" if engine.dialect.name == "sqlite" else "DECIMAL(8,2)"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE people (id {key_type} PRIMARY KEY, name VARCHAR(20))"))
        conn.execute(sa.text("CREATE TABLE people_tags (cid INTEGER, tag VARCHAR(20))"))
        conn.execute(sa.text("INSERT INTO people VALUES (2, 'Ada')"))
        conn.execute(sa.text("INSERT INTO people_tags VALUES (2, 'vip')"))
    engine.dispose()
    text = (
        "source:\n  table: people\n  key: id\ncustomer:\n  name: name\n"
        "tags:\n  query: SELECT cid, tag FROM people_tags\n"
    )
    reader = SourceReader(source_engine(source_url), parse_mapping(text).mapping)
    (page,) = list(reader.pages())
    # The key reads as 2.00 (2.0 on SQLite), the tag row's as 2: refused with the reason, never
    # sent without its tag.
    assert page.contacts == [] and [row.error.code for row in page.invalid] == ["side_key_mismatch"]
    (refused,) = page.invalid
    assert refused.error.field == "tags"
    message = str(refused.error)
    assert "the tags query returned rows keyed '2'" in message and "Cast the key column" in message
    reader.engine.dispose()
