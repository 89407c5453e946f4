"""No stuck run, and `sync --wait` keeps its promise (issue 11, items 6 and 7).

Through the `crmsync` command as an operator runs it: real processes (killed with SIGKILL where
the case is a dead planner), the sandbox over HTTP, real source and state databases, and a real
PostgreSQL state DB made unreachable by stopping the TCP proxy in front of it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import PG_ADMIN, Sandbox, make_database
from tests.crm import MAPPING, make_crm, write_mapping
from tests.tcp_proxy import TcpProxy
from tests.test_end_to_end import crmsync, json_lines, wait_for, workers  # noqa: F401 - `workers` is a fixture
from tests.test_metrics import free_port
from worker.errors import CrmsyncError
from worker.jobs import wait_for_run
from worker.runtime import Runtime
from worker.settings import Settings
from worker.state.db import CONNECT_TIMEOUT, migrate, state_engine
from worker.state.store import StateStore

# The cases of a PostgreSQL CRM, whose tickets query divides by zero at one case: PostgreSQL refuses
# it when planning reaches that row, after every contact is enqueued.
FAILING_TICKETS = """\
tickets:
  query: SELECT case_id, title, contact_id FROM cases WHERE 1 / (CASE WHEN case_id = 'K2' THEN 0 ELSE 1 END) = 1
  key: case_id
  subject: title
  customer: contact_id
"""


@pytest.fixture
def proxied_state(tmp_path: Path) -> Iterator[tuple[str, TcpProxy]]:
    """A migrated PostgreSQL state DB, and its URL through a TCP proxy the test can stop."""
    for url in make_database("postgresql", tmp_path):
        migrate(url)
        parsed = sa.engine.make_url(url)
        proxy = TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
        proxy.start()
        try:
            yield parsed.set(port=proxy.port).render_as_string(hide_password=False), proxy
        finally:
            proxy.stop()


def runs(env: dict[str, str]) -> list[dict[str, Any]]:
    done = crmsync(env, "runs", "list", "--json")
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def assert_one_line_error(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("crmsync: ")]
    assert len(errors) == 1, done.stderr


def store_of(url: str) -> StateStore:
    return StateStore(state_engine(url))


# -- a. a run whose planning fails is closed failed, degraded, with its error -------------------------


def _down_source(dialect: str, tmp_path: Path) -> str:
    """A source URL of `dialect` whose database cannot be reached."""
    if dialect == "sqlite":
        return f"sqlite:///{tmp_path / 'no-such-folder' / 'crm.db'}"
    if dialect == "postgresql":
        return f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/crm"
    return f"mysql+pymysql://root@127.0.0.1:{free_port()}/crm"


@pytest.mark.services
@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mariadb"])
def test_a_full_sync_whose_source_is_down_closes_its_run_failed_and_degraded(
    dialect: str, crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    crm_env.update(CRMSYNC_SOURCE_URL=_down_source(dialect, tmp_path), CRMSYNC_MAPPING=str(write_mapping(tmp_path)))
    assert crmsync(crm_env, "init").returncode == 0

    done = crmsync(crm_env, "sync", "full", "--wait")

    assert_one_line_error(done)
    assert all(r["status"] == "failed" and r["degraded"] and r["error"] for r in runs(crm_env))
    status = crmsync(crm_env, "status")
    assert "planning" not in status.stdout and "running" not in status.stdout.split("runs:")[-1]
    state = store_of(crm_env["CRMSYNC_STATE_URL"])
    counted = state.claim_uncounted_runs()  # what a worker serving metrics counts: crmsync_runs_degraded_total
    assert [(r["kind"], r["status"], r["degraded"]) for r in counted] == [("full", "failed", True)] * len(counted)
    assert sandbox.calls() == 0


@pytest.mark.services
def test_a_planning_that_fails_after_its_contacts_are_enqueued_closes_its_run_failed(
    crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    databases = make_database("postgresql", tmp_path)
    source_url = next(databases)
    try:
        engine = make_crm(source_url, 10)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE cases (case_id TEXT PRIMARY KEY, title TEXT, contact_id TEXT)"))
            conn.execute(sa.text("INSERT INTO cases VALUES ('K1', 'a', 'C00001'), ('K2', 'b', 'C00002')"))
        engine.dispose()
        crm_env.update(
            CRMSYNC_SOURCE_URL=source_url, CRMSYNC_MAPPING=str(write_mapping(tmp_path, MAPPING + FAILING_TICKETS))
        )
        assert crmsync(crm_env, "init").returncode == 0

        done = crmsync(crm_env, "sync", "full", "--wait")

        assert_one_line_error(done)
        assert "division by zero" in done.stderr
        [run] = runs(crm_env)
        assert (run["status"], run["degraded"]) == ("failed", True) and "division by zero" in run["error"]
        assert "DEGRADED" in crmsync(crm_env, "status").stdout
        # And the next full sync is not refused: it plans (and fails the same way, with its own run).
        assert_one_line_error(crmsync(crm_env, "sync", "full"))
        assert [r["status"] for r in runs(crm_env)] == ["failed", "failed"]
    finally:
        next(databases, None)


# -- b. a planner killed mid-planning: its run is failed within the lease, the next full sync proceeds -


@pytest.mark.services
def test_a_planner_killed_mid_planning_leaves_a_failed_run_within_its_lease_and_the_next_full_sync_proceeds(
    crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 1500).dispose()
    lease = 8.0
    crm_env.update(
        CRMSYNC_SOURCE_URL=crm,
        CRMSYNC_MAPPING=str(write_mapping(tmp_path)),
        CRMSYNC_BATCH_SIZE="1",  # a page a contact: planning takes seconds
        CRMSYNC_PLAN_PROCESSES="1",
        CRMSYNC_PLAN_LEASE=str(lease),
        CRMSYNC_RATE_LIMIT="5000",
    )
    assert crmsync(crm_env, "init").returncode == 0
    state = store_of(crm_env["CRMSYNC_STATE_URL"])
    planner = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "sync", "full", "--wait"],
        env=crm_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for("contacts planned", lambda: state.status_counts().get("queued", 0) >= 20)
        os.killpg(planner.pid, signal.SIGKILL)
    finally:
        planner.wait()
    killed_at = time.monotonic()
    [dead] = state.runs()
    assert dead["status"] == "planning"

    crm_env["CRMSYNC_BATCH_SIZE"] = "500"  # the next commands need not be slow
    # Asked for while the lease runs: nothing starts; the command names the open run and follows it.
    follower = crmsync(crm_env, "sync", "full", "--wait")
    failed_within = time.monotonic() - killed_at

    assert follower.returncode == 1, follower.stdout + follower.stderr
    assert f"full run {dead['id']} is already open (being planned" in follower.stdout
    assert f"run {dead['id']} failed: its planner stopped during planning" in follower.stderr
    assert "Traceback" not in follower.stderr
    assert failed_within < lease + 10  # the lease, and one look of the follower's (every 5 s)
    [closed] = state.runs()
    assert (closed["id"], closed["status"], closed["degraded"]) == (dead["id"], "failed", True)

    # The next full sync plans a run of its own and sees it through.
    done = crmsync(crm_env, "sync", "full", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # The follower's worker synced some of the dead run's contacts: the rest are this run's.
    assert result["run_id"] != dead["id"] and result["run"]["status"] == "finished"
    assert result["counts"]["synced"] + result["counts"]["unchanged"] == 1500
    assert len(sandbox.customers()) == 1500
    assert state.status_counts() == {"synced": 1500}
    state.engine.dispose()


def helpers_of(state_url: str) -> list[int]:
    """Pids of the planning helper processes (spawned Pythons) whose environment plans into `state_url`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except (OSError, ValueError):
            continue
        if b"multiprocessing.spawn" in cmdline and f"CRMSYNC_STATE_URL={state_url}".encode() in environ:
            found.append(int(entry.name))
    return found


@pytest.mark.services
def test_the_helpers_of_a_planner_killed_alone_stop_at_their_next_page_and_enqueue_nothing_more(
    crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 3000).dispose()
    crm_env.update(
        CRMSYNC_SOURCE_URL=crm,
        CRMSYNC_MAPPING=str(write_mapping(tmp_path)),
        CRMSYNC_BATCH_SIZE="1",  # a page a contact: planning takes seconds
        CRMSYNC_PLAN_PROCESSES="2",
    )
    assert crmsync(crm_env, "init").returncode == 0
    state = store_of(crm_env["CRMSYNC_STATE_URL"])
    planner = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "sync", "full"],
        env=crm_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for("the helper planning", lambda: bool(helpers_of(crm_env["CRMSYNC_STATE_URL"])))
        wait_for("contacts planned", lambda: state.status_counts().get("queued", 0) >= 200)
        os.kill(planner.pid, signal.SIGKILL)  # the planner alone, as the OOM killer would
    finally:
        planner.wait()

    wait_for("the helpers to stop", lambda: not helpers_of(crm_env["CRMSYNC_STATE_URL"]), timeout=15)
    planned = state.status_counts().get("queued", 0)
    time.sleep(2)
    assert state.status_counts().get("queued", 0) == planned < 3000
    state.engine.dispose()


# -- c. `sync --wait` returns only when every contact it planned is done ------------------------------


def test_a_full_sync_asked_for_while_one_is_open_follows_it_and_both_return_when_every_contact_is_done(
    crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 600).dispose()
    crm_env.update(CRMSYNC_SOURCE_URL=crm, CRMSYNC_MAPPING=str(write_mapping(tmp_path)), CRMSYNC_RATE_LIMIT="400")
    assert crmsync(crm_env, "init").returncode == 0
    command = [sys.executable, "-m", "worker.cli", "sync", "full", "--wait"]
    first = subprocess.Popen([*command, "--json"], env=crm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.8)
    second = subprocess.Popen(command, env=crm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_out, first_err = first.communicate(timeout=180)
    second_out, second_err = second.communicate(timeout=180)

    assert first.returncode == 0, first_err
    result = json.loads(first_out)
    run_id = result["run_id"]
    # Every contact it planned was done when it returned: none was taken over by another run.
    assert (result["counts"]["enqueued"], result["counts"]["synced"], result["counts"]["dead"]) == (600, 600, 0)
    assert second.returncode == 0, second_err
    assert f"full run {run_id} is already open (" in second_out and "following it" in second_out
    assert f"full run {run_id}: read 600" in second_out and "finished: synced 600" in second_out
    assert [r["id"] for r in runs(crm_env)] == [run_id]  # the second started nothing
    assert len(sandbox.customers()) == 600
    assert store_of(crm_env["CRMSYNC_STATE_URL"]).status_counts() == {"synced": 600}

    # Without --wait, a full sync while one is open says so and exits 0; with it done, one plans again.
    state = store_of(crm_env["CRMSYNC_STATE_URL"])
    state.update_run(run_id, status="running")
    state.mark_queued(run_id, [("C00001", None)])
    told = crmsync(crm_env, "sync", "full")
    assert told.returncode == 0, told.stderr
    assert f"full run {run_id} is already open (running: 599 of 600 contacts done, 1 queued)" in told.stdout
    assert [r["id"] for r in runs(crm_env)] == [run_id]


def test_a_run_waits_for_its_contacts_that_a_later_run_took_over(state_url: str) -> None:
    store = store_of(state_url)
    earlier = store.start_run("replay")
    store.mark_queued(earlier, [("e0", None)])
    time.sleep(0.01)
    full = store.start_run("full")
    store.mark_queued(full, [(f"k{i}", None) for i in range(10)])
    store.update_run(full, status="running")
    time.sleep(0.01)
    incremental = store.start_run("incremental")
    store.mark_queued(incremental, [(f"k{i}", "v2") for i in range(4)])  # changed since: planned again
    store.update_run(incremental, status="running")
    for i in range(4, 10):
        store.record_outcome(f"k{i}", full, "synced", {"profile": "h"}, None)

    # The full run's own rows are all synced, but four of its contacts are still on their way.
    assert store.run_progress(full) == {"synced": 6}
    assert store.run_waiting(full) == 4
    assert store.close_done_runs() == []
    assert store.run_waiting(incremental) == 4
    for i in range(4):
        store.record_outcome(f"k{i}", incremental, "synced", {"profile": "h2"}, "v2")

    assert store.run_waiting(full) == store.run_waiting(incremental) == 0
    # A run does not wait for a run opened before it; the earlier one still has its contact queued.
    assert sorted(store.close_done_runs()) == sorted([full, incremental])
    assert store.run_waiting(earlier) == 1
    store.engine.dispose()


# -- d. `sync --wait` rides out a state DB outage ----------------------------------------------------


@pytest.mark.services
def test_sync_wait_rides_out_a_state_db_outage_of_a_minute(
    crm_env: dict[str, str],
    sandbox: Sandbox,
    redis_url: str,
    proxied_state: tuple[str, TcpProxy],
    tmp_path: Path,
    workers: Any,  # noqa: F811 - the fixture
) -> None:
    state_url, proxy = proxied_state
    direct = store_of(sa.engine.make_url(state_url).set(port=sa.engine.make_url(PG_ADMIN).port).render_as_string(False))
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 200).dispose()
    crm_env.update(
        CRMSYNC_SOURCE_URL=crm,
        CRMSYNC_STATE_URL=state_url,
        CRMSYNC_BROKER_URL=redis_url,
        CRMSYNC_MAPPING=str(write_mapping(tmp_path)),
        CRMSYNC_RATE_LIMIT="20",  # about 25 s of calls
        CRMSYNC_RECONCILE_AFTER="5",
    )
    workers(2)
    waiting = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "sync", "full", "--wait", "--json"],
        env=crm_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    planned = lambda: [r["status"] for r in direct.runs()] == ["running"]  # noqa: E731
    wait_for("the first contacts in Proto", lambda: planned() and len(sandbox.customers()) >= 10, timeout=60)
    proxy.stop()
    time.sleep(62)
    proxy.start()
    out, err = waiting.communicate(timeout=240)

    assert waiting.returncode == 0, err
    assert "Traceback" not in err
    said = [line["event"] for line in json_lines(err)]
    assert sum("state DB unreachable, retrying" in m for m in said) == 1, said
    result = json.loads(out)
    assert result["counts"]["enqueued"] == 200 and result["run"]["status"] == "finished"
    assert result["counts"]["synced"] == 200
    assert len(sandbox.customers()) == 200
    assert direct.status_counts() == {"synced": 200}
    direct.engine.dispose()


@pytest.mark.services
def test_the_wait_gives_up_on_a_state_db_out_of_reach_past_its_limit_with_a_clear_error(
    proxied_state: tuple[str, TcpProxy],
) -> None:
    state_url, proxy = proxied_state
    rt = Runtime(Settings(state_url=state_url))
    run_id = rt.store.start_run("full")
    rt.store.mark_queued(run_id, [("k1", None)])
    rt.store.update_run(run_id, status="running")
    proxy.stop()
    began = time.monotonic()

    with pytest.raises(
        CrmsyncError, match=f"state DB stayed unreachable for [0-9]+ s: stopped waiting for run {run_id}"
    ):
        wait_for_run(rt, run_id, outage_limit=3)

    assert 3 <= time.monotonic() - began < 15
    rt.close()


def test_a_state_db_that_accepts_but_never_answers_fails_a_connect_in_bounded_time() -> None:
    """A server that drops packets or hangs would stall a command's outage handling for ever."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever answers the startup message
    try:
        engine = state_engine(f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/crmsync")
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
        assert time.monotonic() - started < CONNECT_TIMEOUT + 5
        engine.dispose()
    finally:
        silent.close()
