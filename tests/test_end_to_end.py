"""End to end through the `crmsync` command, as an operator runs it.

On Redis: a PostgreSQL CRM, a PostgreSQL state DB, real `crmsync worker` processes and the
sandbox over HTTP. On the embedded defaults: SQLite and the embedded broker, no service.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import SUBCOMPANY, TOKEN, Sandbox, make_database
from tests.crm import BASE_TIME, MAPPING, add_tag, contact_row, contacts, make_crm, touch, write_mapping
from tests.test_metrics import free_port, scrape
from worker.proto._wire import ROUTES


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

    def start(n: int = 1, *args: str) -> list[subprocess.Popen[bytes]]:
        started = []
        for _ in range(n):
            log = open(tmp_path / f"worker-{len(procs)}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "worker.cli", "worker", "--concurrency", "4", *args],
                    env=crm_env,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            )
            started.append(procs[-1])
        return started

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


def test_dry_run_json_prints_only_the_counts_and_changes_nothing(
    crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = make_crm(crm, 12)
    crm_env.update(CRMSYNC_SOURCE_URL=crm, CRMSYNC_MAPPING=str(write_mapping(tmp_path)))
    crmsync(crm_env, "init")
    assert sync_json(crm_env, "full")["counts"]["synced"] == 12
    calls = sandbox.calls()
    touch(engine, ["C00003"], dt.datetime(2026, 6, 1), city="Osaka")

    done = crmsync(crm_env, "sync", "full", "--dry-run", "--json")

    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)  # one JSON object and nothing else
    assert plan["run_id"] is None and plan["kind"] == "full"
    counts = plan["counts"]
    assert (counts["read"], counts["changed"], counts["unchanged"], counts["new"]) == (12, 1, 11, 0)
    assert (counts["enqueued"], counts["part_profile"], counts["part_tags"]) == (0, 1, 0)
    assert plan["preview"] == [{"key": "C00003", "parts": ["profile"], "new": False}]
    assert sandbox.calls() == calls
    status = json.loads(crmsync(crm_env, "status", "--json").stdout)
    assert len(status["runs"]) == 1  # the dry run opened no run


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
    assert status["runs"][0]["degraded"] is True and "DEGRADED" in text  # 1 invalid of 10 is past 1 %
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


# -- metrics and logs, on real processes -------------------------------------------------------------

WORKER_ROUTES = ("upsert_customer", "add_tags", "add_custom_fields")


def wait_for(what: str, check: Any, timeout: float = 30.0) -> Any:
    """Poll `check()` until it returns something truthy (and return it), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if result := check():
                return result
        except httpx.TransportError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The log lines of a worker's output, each one JSON object (Celery's banner and shutdown
    notice go to stdout, not through logging: they are left out)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def by_status(counts: dict[str, float]) -> dict[str, float]:
    """Statuses as the metrics label them: every success is 2xx."""
    out: dict[str, float] = {}
    for status, n in counts.items():
        label = "2xx" if status.startswith("2") else status
        out[label] = out.get(label, 0) + n
    return out


@pytest.mark.services
def test_two_workers_on_one_port_serve_the_sum_of_their_calls_and_it_equals_the_sandbox_count(
    crm_env: dict[str, str], sandbox: Sandbox, redis_url: str, tmp_path: Path, workers: Any
) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = make_crm(crm, 20)
    with engine.begin() as conn:  # one invalid row of 20: past the 1 % threshold, the run is degraded
        conn.execute(contacts.update().where(contacts.c.id == "C00013").values(email1="nope"))
    engine.dispose()
    crm_env.update(CRMSYNC_SOURCE_URL=crm, CRMSYNC_BROKER_URL=redis_url, CRMSYNC_MAPPING=str(write_mapping(tmp_path)))
    # 15% of 5xx below: with the default 4 tries, one call in 2,000 fails them all and its contact is
    # dead-lettered (about one run in 30 of this test); 6 tries make that one in 90,000 (a local
    # sandbox answers fast: short timeouts keep the tries within the task time limit).
    crm_env.update(CRMSYNC_MAX_ATTEMPTS="6", CRMSYNC_REQUEST_TIMEOUT="2")
    assert crmsync(crm_env, "init").returncode == 0
    port = free_port()
    procs = workers(2, "--metrics-port", str(port))
    logs = [tmp_path / "worker-0.log", tmp_path / "worker-1.log"]
    wait_for("both workers ready", lambda: all("ready." in log.read_text() for log in logs))
    sandbox.faults(fail_rate=0.15, throttle_rate=0.02)  # 5xx and 429s to count, retried
    try:
        run = sync_json(crm_env, "full")
    finally:
        sandbox.faults(fail_rate=0, throttle_rate=0)
    assert run["counts"]["synced"] == 19
    stats = sandbox.stats()

    # A worker counts the closed run within seconds, whichever process closed it (here the command).
    full_runs = ("crmsync_run_duration_seconds_count", (("kind", "full"),))
    samples = wait_for("the run in the metrics", lambda: (s := scrape(port)).get(full_runs) == 1 and s)
    for route in WORKER_ROUTES:
        method, path = ROUTES[route]
        sent = by_status(stats["by_route"].get(f"{method} {path}", {}))
        counted = {
            dict(labels)["status"]: n
            for (name, labels), n in samples.items()
            if name == "crmsync_api_calls_total" and dict(labels)["route"] == route
        }
        assert counted == sent, route
        assert samples[("crmsync_api_call_seconds_count", (("route", route),))] == sum(sent.values())
        limited = samples.get(("crmsync_api_rate_limited_total", (("route", route),)), 0)
        assert limited == sent.get("429", 0)
    worker_calls = [by_status(stats["by_route"].get(" ".join(ROUTES[r]), {})) for r in WORKER_ROUTES]
    errors = sum(c.get(s, 0) for c in worker_calls for s in c if s.startswith("5"))
    assert errors > 0 and samples[("crmsync_api_retries_total", (("reason", "server_error"),))] == errors
    throttled = sum(c.get("429", 0) for c in worker_calls)
    assert samples[("crmsync_api_retries_total", (("reason", "rate_limited"),))] == throttled
    assert samples[("crmsync_customers_total", (("outcome", "synced"),))] == 19
    assert samples[("crmsync_runs_degraded_total", (("kind", "full"),))] == 1
    assert samples[("crmsync_sync_lag_seconds_count", (("kind", "full"),))] == 19
    assert samples[("crmsync_queue_depth", (("queue", "crmsync.bulk"),))] == 0
    assert samples[("crmsync_breaker_open", ())] == 0
    assert samples[("crmsync_dead_letters", (("error_class", "InvalidRecord.invalid_email"),))] == 1
    for _ in range(6):  # whichever process answers, the same sum
        assert scrape(port)[("crmsync_customers_total", (("outcome", "synced"),))] == 19

    # Two processes wrote the figures (one file each in the host's directory), both did work,
    # and each sync task's lines carry its task, run and contact.
    files = {f.name for f in (tmp_path / "state.crmsync" / "metrics").iterdir()}
    assert {f"counter_{p.pid}.db" for p in procs} <= files
    for log in logs:
        tasks = [line for line in json_lines(log.read_text()) if line.get("run_id") == run["run_id"]]
        assert tasks and all(line["task_id"] and line["key"].startswith("C") for line in tasks)
    shown = json.loads(crmsync(crm_env, "runs", "show", run["run_id"], "--json").stdout)
    assert shown["degraded"] is True


@pytest.mark.services
def test_the_token_is_in_no_log_line_no_output_and_no_dead_letter(
    crm_env: dict[str, str], sandbox: Sandbox, redis_url: str, tmp_path: Path, workers: Any
) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = make_crm(crm, 6)
    crm_env.update(
        CRMSYNC_SOURCE_URL=crm,
        CRMSYNC_BROKER_URL=redis_url,
        CRMSYNC_MAPPING=str(write_mapping(tmp_path)),
        CRMSYNC_LOG_FORMAT="json",
    )
    outputs: list[subprocess.CompletedProcess[str]] = []

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        outputs.append(done := crmsync(crm_env, *args))
        return done

    run("init")
    workers(1)
    assert json.loads(run("sync", "full", "--wait", "--json").stdout)["counts"]["synced"] == 6
    # Proto loses its customers; a tag added in the CRM then meets a 404 with a response body.
    sandbox.reset()
    add_tag(engine, "C00002", "renewal", BASE_TIME + dt.timedelta(days=1))
    engine.dispose()
    failed = json.loads(run("sync", "incremental", "--wait", "--json").stdout)
    assert failed["counts"]["dead"] == 1
    state = sa.create_engine(crm_env["CRMSYNC_STATE_URL"])
    with state.connect() as conn:
        stored = [dict(r) for r in conn.execute(sa.text("SELECT * FROM dead_letters")).mappings()]
    state.dispose()
    assert [d["provided_unique_id"] for d in stored] == ["C00002"]
    shown = json.loads(run("dlq", "show", str(stored[0]["id"]), "--json").stdout)
    assert shown["http_status"] == 404 and "not found" in shown["response_body"].lower()
    run("status")
    assert run("dlq", "show", "999").returncode == 1  # an error message, on stderr

    worker_log = (tmp_path / "worker-0.log").read_text()
    dead = [line for line in json_lines(worker_log) if "dead-lettered" in line["event"]]
    assert [(d["run_id"], d["key"], d["level"]) for d in dead] == [(failed["run_id"], "C00002", "warning")]
    assert dead[0]["task_id"]
    everything = [worker_log, *(o.stdout + o.stderr for o in outputs), *(json.dumps(r, default=str) for r in stored)]
    assert not [text[:200] for text in everything if TOKEN in text]


@pytest.mark.services
def test_a_full_sync_planned_in_three_key_ranges_syncs_every_contact_exactly_once(
    crm_env: dict[str, str], sandbox: Sandbox, redis_url: str, tmp_path: Path, workers: Any
) -> None:
    # Pages of 2 rows: planning is worth a process from 40 rows, so 130 rows plan in 3 processes,
    # two of them started for it, which create custom fields and enqueue too.
    source_url = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = make_crm(source_url, 130)
    with engine.begin() as conn:  # an invalid row in the last range: recorded by that process
        conn.execute(contacts.update().where(contacts.c.id == "C00117").values(email1="nope"))
    crm_env.update(
        CRMSYNC_SOURCE_URL=source_url,
        CRMSYNC_BROKER_URL=redis_url,
        CRMSYNC_MAPPING=str(write_mapping(tmp_path)),
        CRMSYNC_BATCH_SIZE="2",
        CRMSYNC_PLAN_PROCESSES="3",
    )
    assert crmsync(crm_env, "init").returncode == 0
    workers(2)

    first = sync_json(crm_env, "full")

    assert first["counts"]["key_ranges"] == 12  # 4 a process, taken by whichever is free
    assert first["counts"]["read"] == 130 and first["counts"]["new"] == 129
    assert first["counts"]["enqueued"] == 129 and first["counts"]["invalid"] == 1
    assert first["counts"]["synced"] == 129 and first["counts"]["dead"] == 1
    assert sorted(sandbox.customers()) == sorted(f"C{i:05d}" for i in range(130) if i != 117)
    by_route = sandbox.stats()["by_route"]
    upserts = by_route[ROUTES["upsert_customer"][0] + " " + ROUTES["upsert_customer"][1]]
    assert sum(upserts.values()) == 129  # no contact planned twice, none missed
    created = by_route[" ".join(ROUTES["create_custom_field"])]
    assert sum(created.values()) == 3  # each field once, though three processes needed them
    before = sandbox.calls()
    assert sync_json(crm_env, "full")["counts"]["unchanged"] == 129
    assert sandbox.calls() == before


@pytest.mark.services
def test_a_key_range_that_fails_fails_the_run_and_names_its_keys(
    crm_env: dict[str, str], sandbox: Sandbox, redis_url: str, tmp_path: Path
) -> None:
    # The tag query divides by zero for the keys of the last range only: PostgreSQL refuses
    # it there, in a planning process of its own, and the whole run must fail, not hang.
    databases = make_database("postgresql", tmp_path)
    source_url = next(databases)
    try:
        make_crm(source_url, 130).dispose()
        failing = "SELECT contact_id, tag_name, 1 / (CASE WHEN contact_id > 'C00100' THEN 0 ELSE 1 END) AS boom"
        crm_env.update(
            CRMSYNC_SOURCE_URL=source_url,
            CRMSYNC_BROKER_URL=redis_url,
            CRMSYNC_MAPPING=str(write_mapping(tmp_path, MAPPING.replace("SELECT contact_id, tag_name", failing))),
            CRMSYNC_BATCH_SIZE="2",
            CRMSYNC_PLAN_PROCESSES="3",
        )
        assert crmsync(crm_env, "init").returncode == 0

        done = crmsync(crm_env, "sync", "full", "--json", timeout=60)

        assert done.returncode != 0
        assert "planning the keys after" in done.stderr and "division by zero" in done.stderr
        assert TOKEN not in done.stdout + done.stderr  # the range process logs through the same redaction
        runs = json.loads(crmsync(crm_env, "runs", "list", "--json").stdout)
        assert runs[0]["status"] == "failed" and "division by zero" in runs[0]["error"]
    finally:
        next(databases, None)
