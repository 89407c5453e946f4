"""The command's rough edges (issue 11, item 11), tried as a user would: through `crmsync` itself.

- A malformed setting (a URL, a port, a number, an empty value, a token file) is one line on
  stderr naming the setting and what is wrong, exit 2, no traceback, never the secret.
- No URL any command prints or logs carries its password: one redactor for the whole code.
- A malformed dead-letter id is exit 2, an unknown one exit 1, and nothing is shown or changed.
- Control characters in what the CRM holds (keys, messages) reach no terminal raw: every line the
  command prints escapes them, while --json keeps the raw values.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SUBCOMPANY, TOKEN, make_database
from worker.proto import ProtoClient
from worker.runtime import Runtime
from worker.settings import Settings
from worker.state.store import StateStore

ROOT = Path(__file__).resolve().parents[1]
DATABASE_SHAPE = "dialect[+driver]://user:password@host:port/database"
BROKER_SHAPE = "redis://host:port/db; unset for the embedded broker"
EMPTY = "is empty (unset it for its default, or give a value)"
PORT = "the port is not a number from 1 to 65535"
# What no terminal may receive raw (the newline ending each line aside).
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def crmsync(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the command as a user would, in a folder of its own (no stray `.env` file read)."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def error_line(done: subprocess.CompletedProcess[str], returncode: int) -> str:
    """The one line the command wrote on stderr, after checking it failed with `returncode` and nothing else."""
    assert done.returncode == returncode, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def assert_printable(text: str) -> None:
    """Nothing in `text` that a terminal would act on."""
    found = RAW_CONTROL.findall(text)
    assert not found, f"raw control characters reached the terminal: {found!r}"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment with no CRMSYNC_ setting but a state DB in `tmp_path` (not migrated)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_")}
    clean["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    clean["CRMSYNC_STATE_URL"] = f"sqlite:///{tmp_path / 'state.db'}"
    return clean


# -- a. malformed settings -------------------------------------------------------------------------

MALFORMED = [
    ("CRMSYNC_SOURCE_URL", "postgresql://x:notaport/db", f"the port is not a number ({DATABASE_SHAPE})"),
    ("CRMSYNC_STATE_URL", "postgresql://x:notaport/db", f"the port is not a number ({DATABASE_SHAPE})"),
    ("CRMSYNC_STATE_URL", "htp:/x", f"is not a database URL ({DATABASE_SHAPE})"),
    ("CRMSYNC_SOURCE_URL", "htp://x/crm", "names no database SQLAlchemy knows ('htp')"),
    ("CRMSYNC_STATE_URL", "postgresql://crm@db:70000/state", "the port is not between 1 and 65535"),
    ("CRMSYNC_SOURCE_URL", "", EMPTY),
    ("CRMSYNC_STATE_URL", "   ", EMPTY),
    ("CRMSYNC_BROKER_URL", "htp:/x", f"is not a URL ({BROKER_SHAPE})"),
    ("CRMSYNC_BROKER_URL", "htp://x", f"names no broker Celery knows ('htp'; {BROKER_SHAPE})"),
    ("CRMSYNC_BROKER_URL", "redis://127.0.0.1:notaport/0", PORT),
    ("CRMSYNC_BROKER_URL", "redis://127.0.0.1:6379/zero", "the Redis database (after the host) is not a number"),
    ("CRMSYNC_BROKER_URL", "", EMPTY),
    ("CRMSYNC_PROTO_BASE_URL", "htp:/x", "is not a URL (https://host/api/platform)"),
    ("CRMSYNC_PROTO_BASE_URL", "ftp://host/api", "is not an http(s) URL with a host (https://host/api/platform)"),
    ("CRMSYNC_PROTO_BASE_URL", "https://host:99999/api", PORT),
    ("CRMSYNC_PROTO_BASE_URL", "https://host:0/api", PORT),
    ("CRMSYNC_PROTO_BASE_URL", "", EMPTY),
    ("CRMSYNC_RATE_LIMIT", "abc", "Input should be a valid number, unable to parse string as a number"),
    ("CRMSYNC_RATE_LIMIT", "inf", "Input should be a finite number"),
    ("CRMSYNC_REQUEST_TIMEOUT", "nan", "Input should be a finite number"),
    ("CRMSYNC_LOOKBACK_SECONDS", "1e400", "Input should be a finite number"),
    ("CRMSYNC_BATCH_SIZE", "1.5", "Input should be a valid integer, unable to parse string as an integer"),
    ("CRMSYNC_BATCH_SIZE", "", EMPTY),
    ("CRMSYNC_WORKER_CONCURRENCY", "0", "Input should be greater than or equal to 1"),
    ("CRMSYNC_PROTO_TOKEN", "", EMPTY),
]


@pytest.mark.parametrize(("name", "value", "problem"), MALFORMED, ids=[f"{n[8:]}={v!r}" for n, v, _ in MALFORMED])
def test_a_malformed_setting_is_one_line_naming_it_with_exit_2(
    env: dict[str, str], tmp_path: Path, name: str, value: str, problem: str
) -> None:
    done = crmsync({**env, name: value}, "status", cwd=tmp_path)
    assert error_line(done, 2) == f"crmsync: setting {name}: {problem}"


@pytest.mark.parametrize("command", [["check"], ["sync", "full", "--dry-run"], ["dlq", "list"], ["worker"], ["beat"]])
def test_every_command_refuses_malformed_settings_the_same_way(
    env: dict[str, str], tmp_path: Path, command: list[str]
) -> None:
    done = crmsync({**env, "CRMSYNC_BROKER_URL": "redis://127.0.0.1:notaport/0"}, *command, cwd=tmp_path)
    assert error_line(done, 2) == f"crmsync: setting CRMSYNC_BROKER_URL: {PORT}"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read it (No such file or directory)"),
        ("", "the file is empty"),
        (" \n\t\n", "the file is empty"),
        ("two words\n", "the token in the file holds whitespace or control characters"),
        ("tok\x1b[2Jen\n", "the token in the file holds whitespace or control characters"),
    ],
    ids=["missing", "empty", "whitespace-only", "inner-space", "control-character"],
)
def test_a_bad_token_file_is_one_line_with_exit_2(
    env: dict[str, str], tmp_path: Path, content: str | None, problem: str
) -> None:
    token_file = tmp_path / "proto-token"
    if content is not None:
        token_file.write_text(content)
    done = crmsync({**env, "CRMSYNC_PROTO_TOKEN_FILE": str(token_file)}, "status", cwd=tmp_path)
    assert error_line(done, 2) == f"crmsync: setting CRMSYNC_PROTO_TOKEN_FILE: {problem}"


def test_a_token_file_that_is_a_folder_is_one_line_with_exit_2(env: dict[str, str], tmp_path: Path) -> None:
    done = crmsync({**env, "CRMSYNC_PROTO_TOKEN_FILE": str(tmp_path)}, "status", cwd=tmp_path)
    assert error_line(done, 2) == "crmsync: setting CRMSYNC_PROTO_TOKEN_FILE: cannot read it (Is a directory)"


def test_a_good_token_file_is_read_stripped(tmp_path: Path) -> None:
    token_file = tmp_path / "proto-token"
    token_file.write_text(f"\n  {TOKEN}\n")
    settings = Settings(_env_file=None, proto_token_file=token_file)
    assert settings.proto_token is not None and settings.proto_token.get_secret_value() == TOKEN


SECRETS_IN_SETTINGS = [
    # The host forgotten: SQLAlchemy reads the password as the port.
    ("CRMSYNC_SOURCE_URL", "postgresql://crm:hunter2/crm", f"the port is not a number ({DATABASE_SHAPE})"),
    ("CRMSYNC_BROKER_URL", "redis://:hunter2@127.0.0.1:63 79/0", PORT),
    (
        "CRMSYNC_PROTO_BASE_URL",
        "https://user:hunter2@v3-api.proto.cx/api/platform",
        "carries a user or password (user:password@host): the API takes CRMSYNC_PROTO_TOKEN only",
    ),
    ("CRMSYNC_PROTO_TOKEN", "hunter2 hunter2", "holds whitespace or control characters"),
]


@pytest.mark.parametrize(
    ("name", "value", "problem"), SECRETS_IN_SETTINGS, ids=[n[8:] for n, _, _ in SECRETS_IN_SETTINGS]
)
def test_a_setting_error_never_repeats_the_secret(
    env: dict[str, str], tmp_path: Path, name: str, value: str, problem: str
) -> None:
    for command in ("status", "check"):
        done = crmsync({**env, name: value}, command, cwd=tmp_path)
        assert error_line(done, 2) == f"crmsync: setting {name}: {problem}"
        assert "hunter2" not in done.stderr


def test_a_state_folder_that_cannot_be_made_is_one_line_with_exit_2(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    url = f"sqlite:///{tmp_path / 'a-file' / 'sub' / 'state.db'}"
    done = crmsync({**env, "CRMSYNC_STATE_URL": url}, "status", cwd=tmp_path)
    assert error_line(done, 2) == (
        "crmsync: setting CRMSYNC_STATE_URL: cannot create the folder of the SQLite file (Not a directory)"
    )


@pytest.mark.parametrize("port", ["70000", "0", "http"])
def test_a_port_flag_out_of_range_is_refused_by_the_parser(env: dict[str, str], tmp_path: Path, port: str) -> None:
    done = crmsync(env, "sandbox", "--port", port, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"crmsync sandbox: error: argument --port: not a port number from 1 to 65535: {port!r}"
    )


# -- b. credentials hidden in every URL --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://user:hunter2@host/api", "https://user:[REDACTED]@host/api"),
        ("postgresql+psycopg://crm:hun@ter2@db:5432/crm", "postgresql+psycopg://crm:[REDACTED]@db:5432/crm"),
        ("mysql+pymysql://root:hun/ter2@db/crm", "mysql+pymysql://root:[REDACTED]@db/crm"),
        ("broker redis://:hunter2@127.0.0.1:6379/0 down", "broker redis://:[REDACTED]@127.0.0.1:6379/0 down"),
        ("redis://127.0.0.1/0?password=hunter2&db=1", "redis://127.0.0.1/0?password=[REDACTED]&db=1"),
        ("'amqp://guest:hunter2@mq//' refused", "'amqp://guest:[REDACTED]@mq//' refused"),
        ("Authorization: Bearer hunter2.sig==", "Authorization: Bearer [REDACTED]"),
        # What carries no credential is left as it is.
        ("postgresql://crm@db:5432/crm", "postgresql://crm@db:5432/crm"),
        ("http://127.0.0.1:8700/api/platform", "http://127.0.0.1:8700/api/platform"),
        ("sqlite:////var/lib/crmsync/state.db", "sqlite:////var/lib/crmsync/state.db"),
    ],
)
def test_one_redactor_hides_every_url_password_and_bearer_token(text: str, shown: str) -> None:
    from worker.logs import redact

    assert redact(text) == shown


def test_the_token_of_every_client_is_known_to_the_one_redactor() -> None:
    """A 422 that echoes the token and a database URL: the error and its body, recorded in a dead
    letter as they are, hold neither (ProtoClient uses the project's redactor, not one of its own)."""
    from worker.errors import PermanentError
    from worker.logs import redact

    token = "tok-client-only-7f3a9"
    echo = f"bad token {token} for postgresql://crm:hunter2@db/crm"

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"detail": echo})

    client = ProtoClient("https://proto.test/api/platform", SUBCOMPANY, token, transport=httpx.MockTransport(answer))
    with client, pytest.raises(PermanentError) as caught:
        client.get_customer("k1")
    for text in (str(caught.value), str(caught.value.body), redact(f"later, elsewhere: {token}")):
        assert token not in text and "hunter2" not in text
        assert "[REDACTED]" in text


def test_a_logged_url_carries_no_password() -> None:
    from worker.logs import configure_logging

    out = io.StringIO()
    configure_logging(json=True, level="INFO", stream=out)
    logging.getLogger("crmsync.test").warning("broker %s unreachable", "redis://:hunter2@10.0.0.9:6379/0")
    line = json.loads(out.getvalue().splitlines()[-1])
    assert line["event"] == "broker redis://:[REDACTED]@10.0.0.9:6379/0 unreachable"


@pytest.fixture
def pg_unmigrated(tmp_path: Path) -> Iterator[str]:
    """A PostgreSQL database that exists but is not migrated, its URL with a password (trust ignores it)."""
    from sqlalchemy.engine import make_url

    for url in make_database("postgresql", tmp_path):
        yield make_url(url).set(password="hunter2").render_as_string(hide_password=False)


def test_the_state_db_is_named_without_its_password(env: dict[str, str], tmp_path: Path, pg_unmigrated: str) -> None:
    done = crmsync({**env, "CRMSYNC_STATE_URL": pg_unmigrated}, "status", cwd=tmp_path)
    shown = pg_unmigrated.replace(":hunter2@", ":[REDACTED]@")
    assert error_line(done, 2) == (
        f"crmsync: the state database {shown} is not initialised or not up to date: run `crmsync init`"
    )


def test_check_output_carries_no_password_or_token(env: dict[str, str], tmp_path: Path) -> None:
    """`check` with a source, a state DB and an API it cannot use: each line says so, no secret in any."""
    from tests.crm import write_mapping

    mapping = write_mapping(tmp_path)
    done = crmsync(
        {
            **env,
            "CRMSYNC_SOURCE_URL": "postgresql+psycopg://crm:hunter2@127.0.0.1:1/crm",
            "CRMSYNC_MAPPING": str(mapping),
            "CRMSYNC_PROTO_BASE_URL": "http://127.0.0.1:1/api/platform",
            "CRMSYNC_PROTO_SUBCOMPANY_ID": SUBCOMPANY,
            "CRMSYNC_PROTO_TOKEN": TOKEN,
            "CRMSYNC_MAX_ATTEMPTS": "1",
        },
        "check",
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "hunter2" not in done.stdout + done.stderr and TOKEN not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["ok    settings", f"ok    mapping {mapping}"]
    assert lines[2].startswith("FAIL  cannot connect to the source database")  # not a fault of a mapping line
    assert lines[3:] == [
        "FAIL  state database is not migrated: run `crmsync init`",
        "FAIL  Proto API at http://127.0.0.1:1/api/platform: list_custom_fields: connection failed (ConnectError)",
    ]


# -- c. dead-letter ids ------------------------------------------------------------------------------

KEYS = [
    "plain",
    "esc\x1b[2Jcls",
    "cr\roverwrite",
    "nl\nforged row",
    "nul\x00x",
    "bidi\u202eexe.txt",
    "c1\x9b31m",
    "tab\tx",
]


@pytest.fixture
def letters(env: dict[str, str], sqlite_state: str) -> dict[str, str]:
    """A migrated state DB holding one open dead letter per key of KEYS (ids 1 to 8), as env."""
    store = _store(sqlite_state)
    run = store.start_run("full")
    for key in KEYS:
        store.add_dead_letter(key, run, {"key": key}, "PermanentError_422", f"upsert_customer: HTTP 422: {key}")
    store.engine.dispose()
    return {**env, "CRMSYNC_STATE_URL": sqlite_state}


def _store(state_url: str) -> StateStore:
    return Runtime(Settings(_env_file=None, state_url=state_url)).store


def _state(env: dict[str, str], letter_id: int) -> str:
    """The state of one dead letter, as the state DB holds it now."""
    store = _store(env["CRMSYNC_STATE_URL"])
    try:
        return str(store.dead_letters(state=None, ids=[letter_id])[0]["state"])
    finally:
        store.engine.dispose()


@pytest.mark.parametrize(
    ("action", "letter_id"),
    [
        ("show", "abc"),
        ("replay", "abc"),
        ("discard", "abc"),
        ("show", "-1"),
        ("show", "1.5"),
        ("show", "\u0663"),  # ARABIC-INDIC DIGIT THREE: int() would take it for 3
        ("discard", "99999999999999999999"),  # more than the state DB's integer holds
        ("replay", "1\x1b[2J"),
    ],
)
def test_a_malformed_letter_id_is_exit_2_and_changes_nothing(
    letters: dict[str, str], tmp_path: Path, action: str, letter_id: str
) -> None:
    done = crmsync(letters, "dlq", action, "1", letter_id, cwd=tmp_path)
    assert error_line(done, 2) == (
        f"crmsync: not a dead-letter id: {letter_id!r} (ids are the numbers `crmsync dlq list` shows)"
    )
    assert_printable(done.stderr)
    assert _state(letters, 1) == "dead"


@pytest.mark.parametrize("action", ["show", "replay", "discard"])
def test_an_unknown_letter_id_is_exit_1_and_changes_nothing(
    letters: dict[str, str], tmp_path: Path, action: str
) -> None:
    done = crmsync(letters, "dlq", action, "1", "99999", "424242", cwd=tmp_path)
    assert error_line(done, 1) == "crmsync: error: no dead letter with id 99999, 424242"
    assert _state(letters, 1) == "dead"


def test_a_closed_letter_is_not_discarded_or_replayed_again(letters: dict[str, str], tmp_path: Path) -> None:
    done = crmsync(letters, "dlq", "discard", "1", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, "discarded 1 dead letters\n")
    for action, verb in (("discard", "discarded"), ("replay", "replayed")):
        done = crmsync(letters, "dlq", action, "1", cwd=tmp_path)
        assert error_line(done, 1) == f"crmsync: error: only open dead letters can be {verb}: 1 is discarded"
    assert _state(letters, 1) == "discarded"


def test_replay_with_no_open_letter_says_so(env: dict[str, str], sqlite_state: str, tmp_path: Path) -> None:
    done = crmsync({**env, "CRMSYNC_STATE_URL": sqlite_state}, "dlq", "replay", "--all", cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "no open dead letters to replay\n", "")


def test_a_malformed_since_is_exit_2(letters: dict[str, str], tmp_path: Path) -> None:
    done = crmsync(letters, "dlq", "list", "--since", "yesterday", cwd=tmp_path)
    assert error_line(done, 2) == "crmsync: --since: not an ISO time such as 2024-03-01T09:30: 'yesterday'"


# -- d. control characters escaped in every table ------------------------------------------------------


def test_dlq_list_escapes_control_characters_in_its_rows(letters: dict[str, str], tmp_path: Path) -> None:
    done = crmsync(letters, "dlq", "list", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_printable(done.stdout)
    escaped = [
        "plain",
        "esc\\x1b[2Jcls",
        "cr\\roverwrite",
        "nl\\nforged row",
        "nul\\x00x",
        "bidi\\u202eexe.txt",
        "c1\\x9b31m",
        "tab\\tx",
    ]
    assert done.stdout.splitlines() == [
        f"{i:>6}  {key:<24} {'PermanentError_422':<32} upsert_customer: HTTP 422: {key}"
        for i, key in enumerate(escaped, start=1)
    ]


def test_dlq_list_json_keeps_the_raw_values(letters: dict[str, str], tmp_path: Path) -> None:
    done = crmsync(letters, "dlq", "list", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_printable(done.stdout)
    assert [d["provided_unique_id"] for d in json.loads(done.stdout)] == KEYS


def test_dlq_show_escapes_control_characters(letters: dict[str, str], tmp_path: Path) -> None:
    done = crmsync(letters, "dlq", "show", "2", "6", "7", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_printable(done.stdout)
    lines = done.stdout.splitlines()
    assert '  "provided_unique_id": "esc\\u001b[2Jcls",' in lines
    assert '  "provided_unique_id": "bidi\\u202eexe.txt",' in lines
    assert '  "provided_unique_id": "c1\\x9b31m",' in lines
    shown = json.loads(crmsync(letters, "dlq", "show", "6", "--json", cwd=tmp_path).stdout)
    assert shown["provided_unique_id"] == "bidi\u202eexe.txt"


def test_runs_status_and_tickets_escape_control_characters(
    env: dict[str, str], sqlite_state: str, tmp_path: Path
) -> None:
    store = _store(sqlite_state)
    run = store.start_run("full\x1b[31m")
    store.update_run(run, status="running\r")
    store.add_tickets([("case\x1b]0;pwned\x07", "subject\nforged line", "cust\u202ex")])
    store.engine.dispose()
    env = {**env, "CRMSYNC_STATE_URL": sqlite_state}

    runs = crmsync(env, "runs", "list", cwd=tmp_path)
    status = crmsync(env, "status", cwd=tmp_path)
    tickets = crmsync(env, "tickets", "list", cwd=tmp_path)
    for done in (runs, status, tickets):
        assert done.returncode == 0, done.stderr
        assert_printable(done.stdout)
    row = f"  {run} full\\x1b[31m running\\r "
    assert runs.stdout.startswith(row)
    assert f"\n{row}" in status.stdout
    key, customer = "case\\x1b]0;pwned\\x07", "cust\\u202ex"
    assert tickets.stdout.splitlines() == [
        f"{key:<20} {'pending':<8} customer {customer:<16} {'':<28} subject\\nforged line"
    ]
    json_runs = json.loads(crmsync(env, "runs", "list", "--json", cwd=tmp_path).stdout)
    assert json_runs[0]["kind"] == "full\x1b[31m"


def test_an_error_naming_what_the_user_typed_is_escaped(env: dict[str, str], sqlite_state: str, tmp_path: Path) -> None:
    done = crmsync({**env, "CRMSYNC_STATE_URL": sqlite_state}, "runs", "show", "\x1b[2J\u202eid", cwd=tmp_path)
    assert error_line(done, 1) == "crmsync: error: no run with id \\x1b[2J\\u202eid"
