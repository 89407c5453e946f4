"""End to end through the `crmsync` command, as an operator runs it.

On Redis: a PostgreSQL CRM, a PostgreSQL state DB, real `crmsync worker` processes and the
sandbox over HTTP. On the embedded defaults: SQLite and the embedded broker, no service.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import SUBCOMPANY, TOKEN, Sandbox, make_database
from tests.crm import MAPPING, contact_row, contacts, make_crm, write_mapping


def crmsync(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the command as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def sync_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = crmsync(env, "sync", *args, "--wait", "--json")
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture
def workers(crm_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """Start real worker processes with crm_env; kill them all at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(n: int = 1) -> None:
        for _ in range(n):
            log = open(tmp_path / f"worker-{len(procs)}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "worker.cli", "worker", "--concurrency", "4"],
                    env=crm_env,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            )

    yield start
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    logs = "".join((tmp_path / f"worker-{i}.log").read_text(errors="replace") for i in range(len(procs)))
    assert TOKEN not in logs


@pytest.mark.services
def test_full_sync_on_redis_and_postgresql_reaches_proto_exactly(
    crm_env: dict[str, str], sandbox: Sandbox, redis_url: str, tmp_path: Path, workers: Any
) -> None:
    dbs = [make_database("postgresql", tmp_path) for _ in range(2)]
    source_url, state_url = (next(g) for g in dbs)
    try:
        engine = make_crm(source_url, 40)
        with engine.begin() as conn:  # one contact Proto would refuse: recorded before any call
            conn.execute(contacts.update().where(contacts.c.id == "C00013").values(email1="nope"))
        crm_env.update(
            CRMSYNC_SOURCE_URL=source_url,
            CRMSYNC_STATE_URL=state_url,
            CRMSYNC_BROKER_URL=redis_url,
            CRMSYNC_MAPPING=str(write_mapping(tmp_path)),
        )
        assert crmsync(crm_env, "init").returncode == 0
        workers(2)

        first = sync_json(crm_env, "full")
        assert first["counts"]["enqueued"] == 39 and first["counts"]["invalid"] == 1
        assert first["counts"]["synced"] == 39 and first["counts"]["dead"] == 1

        customers = sandbox.customers()
        assert sorted(customers) == sorted(f"C{i:05d}" for i in range(40) if i != 13)
        for i in (0, 5, 17):
            row, got = contact_row(i), customers[f"C{i:05d}"]
            assert (got["name"], got["email"], got["location"]) == (
                f"Ada Test{i}",
                row["email1"],
                row["city"],
            )
            assert got["custom_fields"]["plan"] == row["plan"]
        state = sa.create_engine(state_url)
        with state.connect() as conn:
            statuses = dict(
                conn.execute(sa.text("SELECT status, count(*) FROM customer_sync_state GROUP BY status")).all()
            )
        state.dispose()
        assert statuses == {"synced": 39, "dead": 1}

        before = sandbox.calls()
        assert sync_json(crm_env, "full")["counts"]["enqueued"] == 0
        assert sandbox.calls() == before

        listed = json.loads(crmsync(crm_env, "dlq", "list", "--json").stdout)
        assert [d["provided_unique_id"] for d in listed] == ["C00013"]
        assert listed[0]["error_class"] == "InvalidRecord.invalid_email" and "email" in listed[0]["message"]
        with engine.begin() as conn:
            conn.execute(contacts.update().where(contacts.c.id == "C00013").values(email1="c13@example.org"))
        replayed = crmsync(crm_env, "dlq", "replay", "--all", "--wait", "--json")
        assert replayed.returncode == 0, replayed.stderr
        assert sandbox.customers()["C00013"]["email"] == "c13@example.org"
        assert json.loads(crmsync(crm_env, "dlq", "list", "--json").stdout) == []
        engine.dispose()
    finally:
        for g in dbs:
            g.close()


def test_sync_wait_on_embedded_defaults_needs_no_service(
    crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 25)
    crm_env.update(CRMSYNC_SOURCE_URL=crm, CRMSYNC_MAPPING=str(write_mapping(tmp_path)))
    assert crmsync(crm_env, "init").returncode == 0
    result = sync_json(crm_env, "full")
    assert result["counts"]["synced"] == 25
    assert len(sandbox.customers()) == 25
    status = json.loads(crmsync(crm_env, "status", "--json").stdout)
    assert status["customers"] == {"synced": 25}
    assert status["runs"][0]["status"] == "finished"


def test_dry_run_prints_counts_and_calls_nothing(crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 12)
    crm_env.update(CRMSYNC_SOURCE_URL=crm, CRMSYNC_MAPPING=str(write_mapping(tmp_path)))
    crmsync(crm_env, "init")
    done = crmsync(crm_env, "sync", "full", "--dry-run")
    assert done.returncode == 0
    assert "read 12, new 12" in done.stdout
    assert sandbox.calls() == 0


def test_a_malformed_setting_stops_with_one_line_naming_it(crm_env: dict[str, str]) -> None:
    crm_env["CRMSYNC_RATE_LIMIT"] = "fast"
    done = crmsync(crm_env, "status")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "CRMSYNC_RATE_LIMIT" in done.stderr


def test_a_missing_setting_is_named(crm_env: dict[str, str]) -> None:
    done = crmsync(crm_env, "sync", "full")
    assert done.returncode == 2 and "CRMSYNC_SOURCE_URL is not set" in done.stderr


def test_check_names_the_mapping_line_of_a_column_the_source_lacks(
    crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 3)
    mapping = write_mapping(tmp_path, MAPPING.replace("city", "town"))
    crm_env.update(CRMSYNC_SOURCE_URL=crm, CRMSYNC_MAPPING=str(mapping))
    crmsync(crm_env, "init")
    done = crmsync(crm_env, "check")
    assert done.returncode == 1
    assert f"{mapping}:10: column 'town' is not returned by the source query" in done.stdout
    assert TOKEN not in done.stdout


def test_check_passes_on_a_good_setup(crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 3)
    crm_env.update(CRMSYNC_SOURCE_URL=crm, CRMSYNC_MAPPING=str(write_mapping(tmp_path)))
    crmsync(crm_env, "init")
    done = crmsync(crm_env, "check")
    assert done.returncode == 0, done.stdout
    assert "FAIL" not in done.stdout


def test_demo_runs_on_embedded_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_")}
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--size", "60"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Demo finished" in done.stdout


@pytest.mark.services
def test_two_beats_schedule_once(
    crm_env: dict[str, str], sandbox: Sandbox, redis_url: str, tmp_path: Path, workers: Any
) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 3)
    crm_env.update(
        CRMSYNC_SOURCE_URL=crm,
        CRMSYNC_MAPPING=str(write_mapping(tmp_path)),
        CRMSYNC_BROKER_URL=redis_url,
        CRMSYNC_INCREMENTAL_EVERY="1",
    )
    assert crmsync(crm_env, "init").returncode == 0
    workers(1)
    beats = []
    for i in range(2):
        log = open(tmp_path / f"beat-{i}.log", "wb")  # noqa: SIM115 - closed with the process
        beats.append(
            subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "beat"],
                env=crm_env,
                stdout=log,
                stderr=log,
                start_new_session=True,
                cwd=tmp_path,
            )
        )
    try:
        import time

        time.sleep(8)
    finally:
        for b in beats:
            os.killpg(b.pid, signal.SIGTERM)
            b.wait(20)
    logs = [(tmp_path / f"beat-{i}.log").read_text() for i in range(2)]
    assert sum("standing by" in text for text in logs) == 1
    runs = json.loads(crmsync(crm_env, "status", "--json", "--limit", "100").stdout)["runs"]
    incremental = [r for r in runs if r["kind"] == "incremental"]
    assert 3 <= len(incremental) <= 9  # one schedule at 1/s over ~8 s, not two


def test_status_and_runs_report_what_a_run_left(crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = make_crm(crm, 10)
    with engine.begin() as conn:
        conn.execute(contacts.update().where(contacts.c.id == "C00004").values(email1="broken"))
    crm_env.update(CRMSYNC_SOURCE_URL=crm, CRMSYNC_MAPPING=str(write_mapping(tmp_path)))
    crmsync(crm_env, "init")
    run = sync_json(crm_env, "full")
    status = json.loads(crmsync(crm_env, "status", "--json").stdout)
    assert status["customers"] == {"synced": 9, "dead": 1}
    assert status["dead_letters"] == {"InvalidRecord.invalid_email": 1}
    assert status["queue_depth"] == 0 and status["lag_seconds"] > 0
    assert status["watermark"].startswith("2026-01-01")
    assert status["runs"][0]["id"] == run["run_id"] and status["runs"][0]["seconds"] >= 0
    detail = json.loads(crmsync(crm_env, "runs", "show", run["run_id"], "--json").stdout)
    assert detail["progress"] == {"synced": 9, "dead": 1} and detail["invalid"] == 1
    assert detail["dead_letters"] == {"InvalidRecord.invalid_email": 1}
    text = crmsync(crm_env, "status").stdout
    assert "lag" in text and "dead letters: 1" in text and run["run_id"] in text
    listed = json.loads(crmsync(crm_env, "runs", "list", "--json").stdout)
    assert [r["id"] for r in listed] == [run["run_id"]]


def test_audit_finds_customers_missing_in_proto(crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 8)
    crm_env.update(CRMSYNC_SOURCE_URL=crm, CRMSYNC_MAPPING=str(write_mapping(tmp_path)))
    crmsync(crm_env, "init")
    sync_json(crm_env, "full")
    clean = crmsync(crm_env, "audit", "--sample", "8", "--json")
    assert clean.returncode == 0 and json.loads(clean.stdout)["checked"] == 8
    sandbox.http.post("/_sandbox/reset")  # Proto lost everything: every customer is missing
    done = crmsync(crm_env, "audit", "--sample", "8", "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 1 and len(report["missing"]) == 8
    assert "custom-field values are not returned" in report["note"]


def test_audit_reports_a_differing_field_and_extra_tags(
    crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    from worker.proto import ProtoClient

    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 4)
    crm_env.update(CRMSYNC_SOURCE_URL=crm, CRMSYNC_MAPPING=str(write_mapping(tmp_path)))
    crmsync(crm_env, "init")
    sync_json(crm_env, "full")
    with ProtoClient(sandbox.base_url, SUBCOMPANY, TOKEN) as client:
        client.upsert_customer("C00003", {"name": "Someone Else"})
        client.add_tags("C00002", ["manual"])
    report = json.loads(crmsync(crm_env, "audit", "--sample", "4", "--json").stdout)
    assert report["drift"] == [{"key": "C00003", "field": "name", "crm": "Ada Test3", "proto": "Someone Else"}]
    assert report["extra_tags"] == {"C00002": ["manual"]}
