"""The API rate limit across real `crmsync worker` processes on Redis, against the sandbox over HTTP.

Several workers share one limiter, one 429 cool-down and one circuit breaker through Redis:
the sandbox's own counts show the limit kept, 429s paused everywhere, an outage held and
every contact synced, with no error budget spent on rate limiting.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import SUBCOMPANY, TOKEN, Sandbox, make_database
from tests.crm import MAPPING, make_crm, write_mapping
from tests.test_end_to_end import crmsync, sync_json

# A database of its own: workers outlive single tests here, and the suite's fixture flushes 13.
REDIS_URL = os.environ.get("CRMSYNC_TEST_WORKERS_REDIS", "redis://127.0.0.1:6379/9")
CONTACTS = 40  # 40 create-customer and 27 add-tags calls
# No custom fields: their ids live in the state DB and in each worker, and each test resets the sandbox.
PROFILE_AND_TAGS = MAPPING.split("custom_fields:")[0]
WORKERS = 3
THREADS = 4  # per worker: 12 calls in flight at most
READY_TIMEOUT = 60.0

pytestmark = pytest.mark.services


class Deployment:
    """A CRM, a PostgreSQL state DB, Redis and `WORKERS` worker processes, restarted on new settings."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.redis = redis.Redis.from_url(REDIS_URL)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._settings: dict[str, str] | None = None
        self._started = 0

    def workers(self, **settings: str) -> list[Path]:
        """Have `WORKERS` workers running with these extra settings; returns their log files."""
        if settings != self._settings:
            self.stop()
            env = {**self.env, **settings}
            for _ in range(WORKERS):
                log = self.logs / f"worker-{self._started}.log"
                self._started += 1
                with open(log, "wb") as out:
                    self._procs.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "worker.cli", "worker", "--concurrency", str(THREADS)],
                            env=env,
                            stdout=out,
                            stderr=out,
                            start_new_session=True,
                        )
                    )
            self._settings = settings
            for i, proc in enumerate(self._procs):
                _wait_ready(self.logs / f"worker-{self._started - WORKERS + i}.log", proc)
        return [self.logs / f"worker-{self._started - WORKERS + i}.log" for i in range(WORKERS)]

    def fresh(self, sandbox: Sandbox) -> None:
        """Forget the last test: an empty sandbox, no cool-down or breaker state left in Redis."""
        for key in self.redis.scan_iter("crmsync:*"):
            self.redis.delete(key)
        sandbox.reset()

    def sync(self) -> dict[str, Any]:
        """A full sync of every contact (`--force`: a test before may have synced them), waited for."""
        return sync_json(self.env, "full", "--force")

    def stop(self) -> None:
        """Stop the workers (SIGTERM, then SIGKILL)."""
        for p in self._procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in self._procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self._procs = []
        self._settings = None


def _wait_ready(log: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if log.exists() and " ready." in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        time.sleep(0.05)
    raise AssertionError(f"a worker was not ready within {READY_TIMEOUT:.0f} s")


@pytest.fixture(scope="module")
def deployment(_sandbox_server: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One deployment for the module: each test picks its worker settings and resets the rest."""
    tmp = tmp_path_factory.mktemp("rate-limit-workers")
    redis.Redis.from_url(REDIS_URL).flushdb()
    crm = f"sqlite:///{tmp / 'crm.db'}"
    make_crm(crm, CONTACTS).dispose()
    for state_url in make_database("postgresql", tmp):  # dropped when the loop ends
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_")}
        env.update(
            CRMSYNC_PROTO_BASE_URL=_sandbox_server.base_url,
            CRMSYNC_PROTO_SUBCOMPANY_ID=SUBCOMPANY,
            CRMSYNC_PROTO_TOKEN=TOKEN,
            CRMSYNC_SOURCE_URL=crm,
            CRMSYNC_STATE_URL=state_url,
            CRMSYNC_BROKER_URL=REDIS_URL,
            CRMSYNC_MAPPING=str(write_mapping(tmp, PROFILE_AND_TAGS)),
            CRMSYNC_REQUEST_TIMEOUT="3",
        )
        assert crmsync(env, "init").returncode == 0
        dep = Deployment(env, tmp)
        try:
            yield dep
        finally:
            dep.stop()
            redis.Redis.from_url(REDIS_URL).flushdb()
        logs = "".join(p.read_text(errors="replace") for p in tmp.glob("worker-*.log"))
        assert TOKEN not in logs


def _by_status(sandbox: Sandbox) -> dict[str, int]:
    return {str(k): int(v) for k, v in sandbox.stats()["by_status"].items()}


def _workers_that_synced(logs: list[Path]) -> int:
    return sum("crmsync.sync_customer" in p.read_text(errors="replace").split(" ready.", 1)[-1] for p in logs)


def _assert_every_contact_synced(deployment: Deployment, run: dict[str, Any], sandbox: Sandbox) -> None:
    letters = crmsync(deployment.env, "dlq", "list", "--json").stdout
    assert run["counts"]["synced"] == CONTACTS and not run["counts"].get("dead"), letters[:2000]
    assert len(sandbox.customers()) == CONTACTS


def test_workers_in_three_processes_keep_to_one_shared_limit_without_a_429(
    deployment: Deployment, sandbox: Sandbox
) -> None:
    deployment.fresh(sandbox)
    # A burst of 200 ms of requests: a busy test machine can stall a process that long, and the
    # requests it held then leave together (the sandbox's own rate below is the strict check).
    sandbox.faults(rate_limit=40, burst=8)
    logs = deployment.workers(CRMSYNC_RATE_LIMIT="40", CRMSYNC_MAX_ATTEMPTS="1")

    run = deployment.sync()

    _assert_every_contact_synced(deployment, run, sandbox)
    stats = sandbox.stats()
    assert stats["rate_limited"] == 0
    # Requests between the sandbox's first and last: never above the limit (one slot of slack).
    assert stats["requests_per_second"] <= 40 * stats["total"] / (stats["total"] - 1) + 0.5
    assert stats["requests_per_second"] >= 25  # and the limit kept busy
    assert _workers_that_synced(logs) >= 2  # the work really was shared


def test_a_429_pauses_every_worker_and_429s_spend_no_error_budget(deployment: Deployment, sandbox: Sandbox) -> None:
    deployment.fresh(sandbox)
    # Proto allows less than crmsync was told: 429s with Retry-After 1, run after run.
    sandbox.faults(rate_limit=20, burst=10)
    # One try per call: a single 429 counted as an error would dead-letter its contact.
    logs = deployment.workers(CRMSYNC_RATE_LIMIT="40", CRMSYNC_MAX_ATTEMPTS="1")
    paused_seen = threading.Event()
    done = threading.Event()

    def watch() -> None:
        key = f"crmsync:limiter:{SUBCOMPANY}:paused"
        while not done.is_set():
            if deployment.redis.exists(key):
                paused_seen.set()
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        run = deployment.sync()
    finally:
        done.set()
        watcher.join()
    elapsed = time.monotonic() - started

    _assert_every_contact_synced(deployment, run, sandbox)
    statuses = _by_status(sandbox)
    assert statuses.get("429", 0) > 0 and paused_seen.is_set()
    # Each 429 holds all three workers for its Retry-After (1 s), and the calls already booked
    # too: a handful of 429s per pause, not one per thread and retry (12 threads at 40/s).
    assert statuses["429"] <= 3 * (elapsed + 1)
    assert _workers_that_synced(logs) >= 2


def test_an_outage_opens_the_shared_breaker_and_the_run_completes_once_it_closes(
    deployment: Deployment, sandbox: Sandbox
) -> None:
    deployment.fresh(sandbox)
    deployment.workers(CRMSYNC_RATE_LIMIT="40", CRMSYNC_MAX_ATTEMPTS="3")
    open_key = f"crmsync:breaker:{SUBCOMPANY}:open"
    seen: dict[str, float] = {}

    def outage() -> None:
        deadline = time.monotonic() + 60
        while not sandbox.customers() and time.monotonic() < deadline:  # mid-run: once customers arrive
            time.sleep(0.05)
        sandbox.faults(outage=True)
        began = time.monotonic()
        while time.monotonic() - began < 2.5:
            if deployment.redis.exists(open_key):
                seen.setdefault("opened", time.monotonic() - began)
            time.sleep(0.02)
        sandbox.faults(outage=False)

    breaker = threading.Thread(target=outage, daemon=True)
    breaker.start()
    run = deployment.sync()
    breaker.join()

    _assert_every_contact_synced(deployment, run, sandbox)
    assert "opened" in seen and seen["opened"] < 1.0  # opened within a second of the outage
    assert not deployment.redis.exists(open_key)  # and closed after it
    # 2.5 s of outage: the failures that open it (12 calls in flight at most, each retried
    # at most once before it opens), then about one probe a second, not one per thread.
    assert 5 <= _by_status(sandbox).get("503", 0) <= 5 + 2 * WORKERS * THREADS + 4
