"""Safe by construction, on the source side (issue 11): a run never sends what it did not read,
and the CRM is read only, whatever the mapping holds.

Every planning command checks the mapping against the columns its queries really return before
it reads a row or calls Proto, and refuses (exit 2, the mapping's line) a column that is not
there. Every source session is read only, enforced by the database on SQLite, PostgreSQL and
MariaDB, and a mapping query holding a second statement is refused when the file is read.
Each test runs through the `crmsync` command where its point is an exit code, and asserts what
the sandbox received and what the CRM holds afterwards.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import Sandbox
from tests.crm import MAPPING, TICKETS_MAPPING, contacts, make_crm, write_mapping
from tests.test_sync_flow import Harness
from worker.errors import ConfigError
from worker.jobs import plan_run, planner
from worker.runtime import Runtime
from worker.source.mapping import one_statement, parse_mapping
from worker.source.reader import SourceReader, source_engine

READ_ONLY_ERROR = re.compile(r"read.?only", re.IGNORECASE)  # each database's own words for it
# The reproduction of issue 11: a query that closes crmsync's wrapper and adds statements of its own.
SMUGGLED = (
    "SELECT * FROM contacts) AS x; UPDATE contacts SET city = 'X' WHERE id = 'C00003'; COMMIT; "
    "SELECT * FROM (SELECT * FROM contacts"
)


def crmsync(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the command as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], env=env, capture_output=True, text=True, timeout=180
    )


@pytest.fixture
def crm(source_url: str) -> sa.Engine:
    """Six contacts with tags, and two cases for `tickets:`, on each dialect; a writable engine."""
    engine = make_crm(source_url, 6)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE cases (case_id VARCHAR(20), title VARCHAR(60), contact_id VARCHAR(40))"))
        conn.execute(sa.text("INSERT INTO cases VALUES ('K1', 'Refund', 'C00001'), ('K2', 'Broken', 'C00002')"))
    yield engine
    engine.dispose()


@pytest.fixture
def env(crm_env: dict[str, str], source_url: str, crm: sa.Engine, tmp_path: Path) -> dict[str, str]:
    """Settings for the command: the CRM of `crm`, the sandbox, a migrated state DB, MAPPING."""
    crm_env.update(CRMSYNC_SOURCE_URL=source_url, CRMSYNC_MAPPING=str(write_mapping(tmp_path)))
    assert crmsync(crm_env, "init").returncode == 0
    return crm_env


def city_of(engine: sa.Engine, key: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.select(contacts.c.city).where(contacts.c.id == key)).scalar()


def runs(env: dict[str, str]) -> list[dict[str, Any]]:
    done = crmsync(env, "runs", "list", "--json")
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


# -- a run never sends what it did not read -------------------------------------------------------

# (what the mapping gets wrong, the edit that makes it so, its line in the file, the column named)
MISSING_COLUMNS = [
    ("customer.location", ("location: city", "location: town"), 10, "town"),
    ("customer.name part", ("name: [first_name, last_name]", "name: [first_name, surname]"), 7, "surname"),
    ("source.key", ("key: id", "key: contact_id"), 3, "contact_id"),
    ("source.updated_at", ("updated_at: date_modified", "updated_at: modified_at"), 4, "modified_at"),
    ("source.deleted", ("deleted: deleted", "deleted: is_deleted"), 5, "is_deleted"),
    ("custom field column", ("column: ltv", "column: lifetime"), 15, "lifetime"),
    (
        "tags column",
        ("  query: SELECT contact_id, tag_name FROM contact_tags", "  column: tag_list"),
        13,
        "tag_list",
    ),
    ("tickets subject", ("subject: title", "subject: headline"), 21, "headline"),
]


@pytest.mark.parametrize(("what", "edit", "line", "column"), MISSING_COLUMNS, ids=[m[0] for m in MISSING_COLUMNS])
def test_a_mapped_column_the_source_lacks_is_refused_at_its_line_before_any_read_or_call(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path, what: str, edit: tuple[str, str], line: int, column: str
) -> None:
    mapping = write_mapping(tmp_path, (MAPPING + TICKETS_MAPPING).replace(*edit))
    for args in (("sync", "full", "--dry-run"), ("sync", "incremental", "--dry-run"), ("sync", "full", "--wait")):
        done = crmsync(env, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert f"{mapping}:{line}: column {column!r} is not returned by the" in done.stderr, args
        assert "Traceback" not in done.stderr and "KeyError" not in done.stderr
    assert sandbox.calls() == 0
    # The refused run is on record as failed, with the line at fault: what `crmsync status` shows.
    (run,) = runs(env)
    assert run["status"] == "failed" and f"{mapping}:{line}: column {column!r}" in run["error"]


def test_a_typo_deployed_after_a_good_sync_fails_the_run_and_never_blanks_a_field(
    env: dict[str, str], sandbox: Sandbox, source_url: str, harness_on: Callable[..., Harness], tmp_path: Path
) -> None:
    harness_on(source_url).sync()  # on the state DB of `env`: Proto holds every contact's city
    before = sandbox.customers()
    assert before["C00001"]["location"] == "Lyon"
    calls = sandbox.calls()

    write_mapping(tmp_path, MAPPING.replace("location: city", "location: town"))
    for args in (("sync", "full", "--force", "--wait"), ("sync", "incremental", "--wait", "--json")):
        done = crmsync(env, *args)
        assert done.returncode == 2 and "column 'town' is not returned" in done.stderr
    assert sandbox.calls() == calls
    assert sandbox.customers() == before


def test_beat_rereads_the_mapping_each_run_and_a_typo_fails_that_run_without_sending(
    source_url: str, crm: sa.Engine, harness_on: Callable[..., Harness], sandbox: Sandbox
) -> None:
    h = harness_on(source_url)
    first = h.sync("incremental")  # a run on the mapping as deployed
    assert first["counts"]["enqueued"] == 6
    Path(str(h.rt.settings.mapping)).write_text(MAPPING.replace("column: ltv", "column: lifetime"))
    calls = sandbox.calls()

    rt = Runtime(h.rt.settings)  # what beat's tasks call: plan_run builds a planner, reading the file again
    with pytest.raises(ConfigError, match=r"mapping.yaml:15: column 'lifetime' is not returned"):
        plan_run("incremental", rt=rt)
    latest = rt.store.runs(limit=1)[0]  # the run beat opened is closed failed, with the line at fault
    assert latest["id"] != first["run_id"] and latest["status"] == "failed"
    assert "mapping.yaml:15: column 'lifetime'" in latest["error"]
    assert sandbox.calls() == calls
    rt.close()


def test_dlq_replay_and_reconcile_refuse_a_mapping_typo_and_leave_the_letters_dead(
    env: dict[str, str],
    sandbox: Sandbox,
    source_url: str,
    crm: sa.Engine,
    harness_on: Callable[..., Harness],
    tmp_path: Path,
) -> None:
    with crm.begin() as conn:  # a row Proto would refuse: a dead letter before any call
        conn.execute(contacts.update().where(contacts.c.id == "C00004").values(email1="not-an-email"))
    h = harness_on(source_url)
    h.sync()
    calls = sandbox.calls()
    broken = MAPPING.replace("email: email1", "email: email_address")
    write_mapping(tmp_path, broken)
    Path(str(h.rt.settings.mapping)).write_text(broken)

    done = crmsync(env, "dlq", "replay", "--all")
    assert done.returncode == 2 and "mapping.yaml:8: column 'email_address' is not returned" in done.stderr
    letters = json.loads(crmsync(env, "dlq", "list", "--json").stdout)
    assert [(d["provided_unique_id"], d["state"]) for d in letters] == [("C00004", "dead")]

    # The reconciler re-plans a stalled run's keys into that run: the same check comes first.
    rt = Runtime(h.rt.settings)
    run_id = rt.store.start_run("full")
    with pytest.raises(ConfigError, match="email_address"):
        planner(rt).plan("full", keys=["C00001"], into_run=run_id)
    assert sandbox.calls() == calls
    rt.close()


def test_check_and_planning_share_one_verdict_on_missing_columns(env: dict[str, str], tmp_path: Path) -> None:
    mapping = write_mapping(tmp_path, MAPPING.replace("location: city", "location: town"))
    done = crmsync(env, "check")
    assert done.returncode == 1
    assert f"FAIL  {mapping}:10: column 'town' is not returned by the source query" in done.stdout


# -- read only, enforced by the database ----------------------------------------------------------


def test_a_source_connection_refuses_a_write_from_the_database_itself(source_url: str, crm: sa.Engine) -> None:
    engine = source_engine(source_url)
    try:
        with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as info:
            conn.execute(sa.text("UPDATE contacts SET city = 'X' WHERE id = 'C00003'"))
            conn.commit()
        assert READ_ONLY_ERROR.search(str(info.value.orig)), info.value.orig
        with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as info:  # a new session: read only too
            conn.execute(sa.text("DELETE FROM contacts"))
            conn.commit()
        assert READ_ONLY_ERROR.search(str(info.value.orig))
    finally:
        engine.dispose()
    assert city_of(crm, "C00003") == "Kigali"  # contact 3's city, as make_crm wrote it
    with crm.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(contacts)).scalar() == 6


def test_a_write_smuggled_into_a_single_select_fails_on_the_database(
    env: dict[str, str], source_url: str, crm: sa.Engine, tmp_path: Path, sandbox: Sandbox
) -> None:
    """A function that writes, called by the mapping's one SELECT: the read-only session refuses it."""
    dialect = crm.dialect.name
    if dialect == "sqlite":
        pytest.skip("SQLite has no SQL-defined function that writes; the direct write is refused above")
    with crm.begin() as conn:
        if dialect == "postgresql":
            conn.execute(
                sa.text(
                    "CREATE FUNCTION bump() RETURNS int LANGUAGE sql VOLATILE AS "
                    "$$ UPDATE contacts SET city = 'X' WHERE id = 'C00003'; SELECT 1 $$"
                )
            )
        else:
            conn.execute(sa.text("SET @@session.sql_log_bin = 0"))
            conn.execute(
                sa.text(
                    "CREATE FUNCTION bump() RETURNS INT MODIFIES SQL DATA NOT DETERMINISTIC "
                    "BEGIN UPDATE contacts SET city = 'X' WHERE id = 'C00003'; RETURN 1; END"
                )
            )
    write_mapping(tmp_path, MAPPING.replace("  table: contacts", "  query: SELECT c.*, bump() AS b FROM contacts c"))
    for args in (("sync", "full", "--dry-run"), ("sync", "full", "--wait")):
        done = crmsync(env, *args)
        assert done.returncode == 1, done.stderr
        assert READ_ONLY_ERROR.search(done.stderr), done.stderr
    assert city_of(crm, "C00003") == "Kigali"
    assert sandbox.calls() == 0


@pytest.mark.parametrize("where", ["source.query", "tags.query"])
def test_a_second_statement_in_a_mapping_query_is_refused_at_its_line_and_never_runs(
    env: dict[str, str], crm: sa.Engine, tmp_path: Path, sandbox: Sandbox, where: str
) -> None:
    if where == "source.query":
        text, line = MAPPING.replace("  table: contacts", f"  query: {SMUGGLED}"), 2
    else:
        tags = f"  query: SELECT contact_id, tag_name FROM contact_tags) AS s; {SMUGGLED.split('; ', 1)[1]}"
        text, line = MAPPING.replace("  query: SELECT contact_id, tag_name FROM contact_tags", tags), 13
    mapping = write_mapping(tmp_path, text)
    for args in (("sync", "full", "--dry-run"), ("sync", "incremental", "--dry-run"), ("sync", "full", "--wait")):
        done = crmsync(env, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert f"{mapping}:{line}: {where}: holds more than one SQL statement" in done.stderr
    assert sandbox.calls() == 0
    done = crmsync(env, "check")
    assert done.returncode == 1 and f"FAIL  {mapping}:{line}: {where}: holds more than one SQL statement" in done.stdout
    assert city_of(crm, "C00003") == "Kigali"


QUERY_SECTIONS = {
    "source.query": (MAPPING.replace("  table: contacts", "  query: {q}"), 2),
    "tags.query": (MAPPING.replace("  query: SELECT contact_id, tag_name FROM contact_tags", "  query: {q}"), 13),
    "custom_fields.3.query": (MAPPING + "  - query: {q}\n", 18),
    "tickets.query": (MAPPING + TICKETS_MAPPING.replace("SELECT case_id, title, contact_id FROM cases", "{q}"), 19),
}


@pytest.mark.parametrize("where", sorted(QUERY_SECTIONS))
@pytest.mark.parametrize(
    "query",
    [
        SMUGGLED,
        "SELECT * FROM contacts; DELETE FROM contacts",
        "SELECT 1 -- x\n; DELETE FROM contacts",  # a line comment ends at its line
        "SELECT '\\'; DELETE FROM contacts; -- '",  # MySQL reads a backslash as an escape
        "SELECT 1 # x\n; DELETE FROM contacts",  # MySQL's `#` comment ends at its line too
        "SELECT 1 /*! ; DELETE FROM contacts */",  # MySQL runs an executable comment's body
        "SELECT 1 /* /* */ ' */ ; DELETE FROM contacts; -- '",  # PostgreSQL nests comments
        "SELECT a$b$ FROM contacts; DELETE FROM contacts; SELECT $b$",  # `$b$` in a name is no quote
        "SELECT 1 --1; DELETE FROM contacts",  # for MySQL, `--1` is minus minus one
        "SELECT 1;;",
    ],
)
def test_every_mapping_query_holding_a_second_statement_is_refused_when_the_file_is_read(
    where: str, query: str
) -> None:
    template, line = QUERY_SECTIONS[where]
    text = template.replace("{q}", json.dumps(query))  # a JSON string is a YAML string
    with pytest.raises(ConfigError, match=rf"^m.yaml:{line}: {re.escape(where)}: holds more than one SQL statement"):
        parse_mapping(text, "m.yaml")


@pytest.mark.parametrize(
    "query",
    [
        "SELECT id, city FROM contacts",
        "SELECT id, city FROM contacts;\n",
        "SELECT id, 'a;b' AS note, \"x;y\" AS z FROM contacts",
        "SELECT id, 'it''s; fine' AS note FROM contacts -- a note; with a semicolon",
        "SELECT id /* a; comment */ FROM contacts",
        "SELECT id, `odd;name` FROM contacts",
    ],
)
def test_one_select_with_semicolons_in_its_quotes_or_comments_is_accepted(query: str) -> None:
    assert ";" not in one_statement(query).removesuffix(";")[-1:]
    parse_mapping(MAPPING.replace("  table: contacts", f"  query: {json.dumps(query)}"))


# -- a query's errors at the query's line ---------------------------------------------------------


def test_a_custom_field_query_error_is_reported_at_that_querys_line(
    env: dict[str, str], tmp_path: Path, sandbox: Sandbox
) -> None:
    mapping = write_mapping(tmp_path, MAPPING + "  - query: SELECT contact_id, nope, tag_name FROM contact_tags\n")
    done = crmsync(env, "check")
    assert done.returncode == 1
    assert f"FAIL  {mapping}:18: the custom-field query failed: " in done.stdout
    assert "nope" in done.stdout and f"{mapping}:1:" not in done.stdout
    calls = sandbox.calls()  # check asks Proto for its custom fields
    done = crmsync(env, "sync", "full", "--dry-run")
    assert done.returncode == 1 and f"{mapping}:18: the custom-field query failed: " in done.stderr
    assert sandbox.calls() == calls


def test_a_side_query_returning_too_few_columns_is_refused_at_its_line(
    env: dict[str, str], tmp_path: Path, sandbox: Sandbox
) -> None:
    text = MAPPING.replace("SELECT contact_id, tag_name FROM contact_tags", "SELECT contact_id FROM contact_tags")
    mapping = write_mapping(tmp_path, text + "  - query: SELECT contact_id, tag_name FROM contact_tags\n")
    done = crmsync(env, "sync", "full", "--dry-run")
    assert done.returncode == 2
    assert f"{mapping}:13: the tags query returns 1 columns (contact_id); it must return 2: key, tag" in done.stderr
    assert f"{mapping}:18: the custom-field query returns 2 columns" in done.stderr
    assert sandbox.calls() == 0


def test_a_bad_value_from_a_custom_field_query_is_reported_at_that_querys_line(
    env: dict[str, str], crm: sa.Engine, tmp_path: Path
) -> None:
    with crm.begin() as conn:
        conn.execute(sa.text("CREATE TABLE contact_fields (contact_id VARCHAR(40), name VARCHAR(40), val VARCHAR(40))"))
        conn.execute(sa.text("INSERT INTO contact_fields VALUES ('C00001', 'score', 'high')"))
    query = "  - query: SELECT contact_id, name, val FROM contact_fields\n    types: {score: number}\n"
    mapping = write_mapping(tmp_path, MAPPING + query)
    done = crmsync(env, "check")
    assert done.returncode == 1
    assert f"FAIL  {mapping}:19: custom field 'score' (number) cannot hold 'high'" in done.stdout


def test_the_reader_verifies_before_any_read_so_no_path_reads_a_missing_column_as_null(
    source_url: str, crm: sa.Engine
) -> None:
    located = parse_mapping(MAPPING.replace("location: city", "location: town"), "m.yaml")
    reader = SourceReader(source_engine(source_url), located.mapping)
    reads: list[Callable[[], object]] = [
        lambda: next(reader.pages()),
        lambda: next(reader.raw_pages(keys=["C00001"])),
        reader.max_updated,
        lambda: reader.key_splits(2, 1),
    ]
    try:
        for read in reads:
            with pytest.raises(ConfigError, match=r"^m.yaml:10: column 'town'"):
                read()
    finally:
        reader.engine.dispose()
