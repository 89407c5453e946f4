"""worker.metrics: the helpers update the right series, /metrics serves them over real HTTP,
and in multiprocess mode one scrape sums the figures of several real processes."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from kombu import Queue as KombuQueue
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from worker import metrics
from worker.contact import version_text
from worker.errors import CircuitOpen, ConfigError, PermanentError, RateLimited, RetryableError
from worker.proto import LocalBreaker

ROOT = Path(__file__).resolve().parents[1]


def value(name: str, **labels: str) -> float:
    """The current value of one series of the default registry (0 when it does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics over HTTP: every sample, keyed by (name, sorted labels)."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def timeout_error() -> RetryableError:
    """A RetryableError as the client raises it for a read timeout (`from None`, context kept)."""
    try:
        try:
            raise httpx.ReadTimeout("read timed out")
        except httpx.TimeoutException:
            raise RetryableError("upsert_customer: timed out (ReadTimeout)", route="upsert_customer") from None
    except RetryableError as exc:
        return exc


def connection_error() -> RetryableError:
    try:
        try:
            raise httpx.ConnectError("refused")
        except httpx.TransportError:
            raise RetryableError("connection failed", route="add_tags", not_sent=True) from None
    except RetryableError as exc:
        return exc


@pytest.fixture
def route() -> str:
    """A route label of this test's own, so that tests in one process never see each other's calls."""
    return f"route_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def metrics_server() -> Iterator[int]:
    port = free_port()
    metrics.start_metrics_server(port, addr="127.0.0.1")
    yield port
    metrics.stop_metrics_servers()


@pytest.fixture
def scrape_sources() -> Iterator[None]:
    """Forget the queue-depth and breaker sources a test registers."""
    yield
    metrics.register_queue_depth(None)
    metrics.register_breaker(None)


# -- helpers update the right series ---------------------------------------------------------------


def test_observe_call_counts_the_call_its_latency_and_429s(route: str) -> None:
    metrics.observe_call(route, 200, 0.03)
    metrics.observe_call(route, 200, 0.2)
    metrics.observe_call(route, 429, 0.01)

    assert value("crmsync_api_calls_total", route=route, status="200") == 2
    assert value("crmsync_api_calls_total", route=route, status="429") == 1
    assert value("crmsync_api_call_seconds_count", route=route) == 3
    assert value("crmsync_api_call_seconds_sum", route=route) == pytest.approx(0.24)
    assert value("crmsync_api_call_seconds_bucket", route=route, le="0.05") == 2
    assert value("crmsync_api_rate_limited_total", route=route) == 1


def test_timed_call_labels_successes_http_statuses_and_failures_without_an_answer(route: str) -> None:
    with metrics.timed_call(route):
        pass
    failures = [
        RateLimited("HTTP 429", retry_after=1.0, status=429),
        PermanentError("HTTP 422", status=422),
        RetryableError("HTTP 503", status=503),
        RetryableError("the answer was not JSON", status=200),
        timeout_error(),
        connection_error(),
        RuntimeError("a bug"),
    ]
    for exc in failures:
        with pytest.raises(type(exc)) as raised, metrics.timed_call(route):
            raise exc
        assert raised.value is exc  # the call's error goes on its way untouched

    for status in ("2xx", "429", "422", "503", "invalid_response", "timeout", "connection_error", "error"):
        assert value("crmsync_api_calls_total", route=route, status=status) == 1, status
    assert value("crmsync_api_rate_limited_total", route=route) == 1
    assert value("crmsync_api_call_seconds_count", route=route) == 1 + len(failures)


def test_retries_are_counted_by_reason() -> None:
    cases = {
        "rate_limited": RateLimited("HTTP 429", retry_after=1.0, status=429),
        "circuit_open": CircuitOpen("held", retry_after=1.0),
        "server_error": RetryableError("HTTP 502", status=502),
        "timeout": timeout_error(),
        "connection": connection_error(),
        "invalid_response": RetryableError("not JSON", status=200),
    }
    before = {reason: value("crmsync_api_retries_total", reason=reason) for reason in metrics.RETRY_REASONS}
    for exc in cases.values():
        metrics.observe_retry(exc)
    metrics.observe_retry(RetryableError("HTTP 408", status=408))
    metrics.observe_retry(None)

    after = {reason: value("crmsync_api_retries_total", reason=reason) for reason in metrics.RETRY_REASONS}
    assert {r: after[r] - before[r] for r in after} == {
        "rate_limited": 1,
        "circuit_open": 1,
        "server_error": 1,
        "timeout": 2,
        "connection": 1,
        "invalid_response": 1,
        "other": 1,
    }


def test_outcomes_are_counted_and_a_synced_contact_feeds_the_lag_of_its_runs_kind() -> None:
    outcomes = {o: value("crmsync_customers_total", outcome=o) for o in metrics.OUTCOMES}
    lag = {k: value("crmsync_sync_lag_seconds_count", kind=k) for k in (*metrics.RUN_KINDS, "unknown")}
    lag_sum = value("crmsync_sync_lag_seconds_sum", kind="incremental")
    under_two_minutes = value("crmsync_sync_lag_seconds_bucket", kind="incremental", le="120.0")
    updated = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=90)

    metrics.observe_outcome("synced", version_text(updated), "incremental")
    metrics.observe_outcome("synced", version_text(updated - dt.timedelta(days=30)), "full")
    metrics.observe_outcome("synced", version_text(updated))  # a message planned before kinds
    metrics.observe_outcome("skipped", version_text(updated), "incremental")  # no lag: nothing was sent
    metrics.observe_outcome("dead", version_text(updated), "incremental")
    metrics.observe_outcome("synced", None, "incremental")  # a mapping without updated_at
    metrics.observe_outcome("synced", "not a time", "incremental")

    assert {o: value("crmsync_customers_total", outcome=o) - outcomes[o] for o in outcomes} == {
        "synced": 5,
        "skipped": 1,
        "dead": 1,
    }
    assert {k: value("crmsync_sync_lag_seconds_count", kind=k) - lag[k] for k in lag} == {
        "full": 1,
        "incremental": 1,
        "replay": 0,
        "unknown": 1,
    }
    assert 89 <= value("crmsync_sync_lag_seconds_sum", kind="incremental") - lag_sum < 120
    assert value("crmsync_sync_lag_seconds_bucket", kind="incremental", le="120.0") - under_two_minutes == 1


def test_counts_outcome_counts_whatever_a_sync_function_returns_with_the_messages_version() -> None:
    @metrics.counts_outcome
    def sync_contact(rt: object, msg: dict[str, Any]) -> str:
        if msg["contact"]["key"] == "held":
            raise CircuitOpen("held", retry_after=1.0)
        return str(msg["contact"]["key"])

    synced = value("crmsync_customers_total", outcome="synced")
    skipped = value("crmsync_customers_total", outcome="skipped")
    lag_count = value("crmsync_sync_lag_seconds_count", kind="incremental")
    recent = version_text(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5))

    assert sync_contact(None, {"kind": "incremental", "contact": {"key": "synced", "version": recent}}) == "synced"
    assert sync_contact(None, msg={"contact": {"key": "skipped", "version": recent}}) == "skipped"
    with pytest.raises(CircuitOpen):
        sync_contact(None, {"contact": {"key": "held", "version": recent}})

    assert value("crmsync_customers_total", outcome="synced") - synced == 1
    assert value("crmsync_customers_total", outcome="skipped") - skipped == 1
    assert value("crmsync_sync_lag_seconds_count", kind="incremental") - lag_count == 1
    assert sync_contact.__name__ == "sync_contact"


def test_lag_reads_version_text_as_utc_and_never_goes_negative() -> None:
    now = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC).timestamp()
    assert metrics.lag_seconds("2024-05-01T11:59:00.000000", now=now) == pytest.approx(60)
    assert metrics.lag_seconds("2024-05-01T12:05:00.000000", now=now) == 0
    assert metrics.lag_seconds("garbage", now=now) is None


def test_runs_feed_duration_by_kind_and_degraded_runs_are_counted() -> None:
    count = value("crmsync_run_duration_seconds_count", kind="replay")
    total = value("crmsync_run_duration_seconds_sum", kind="replay")
    degraded = value("crmsync_runs_degraded_total", kind="replay")
    start = dt.datetime(2024, 5, 1, 2, 0, 0)

    metrics.observe_run("replay", 12.5, degraded=False)
    metrics.observe_finished_run(
        {"kind": "replay", "started_at": start, "finished_at": start + dt.timedelta(seconds=30), "degraded": True}
    )
    metrics.observe_finished_run(
        {"kind": "replay", "started_at": start, "finished_at": start + dt.timedelta(seconds=7), "degraded": False}
    )
    metrics.observe_finished_run({"kind": "replay", "started_at": start, "finished_at": "broken"})  # never raises

    assert value("crmsync_run_duration_seconds_count", kind="replay") - count == 3
    assert value("crmsync_run_duration_seconds_sum", kind="replay") - total == pytest.approx(49.5)
    assert value("crmsync_runs_degraded_total", kind="replay") - degraded == 1


def test_runs_closed_by_the_store_are_judged_by_the_threshold_and_counted_once(sqlite_state: str) -> None:
    from worker.state.db import state_engine
    from worker.state.store import StateStore

    store = StateStore(state_engine(sqlite_state), degraded_threshold=0.1)
    clean, degraded, failed = (store.start_run("incremental") for _ in range(3))
    for run_id, letters in ((clean, 2), (degraded, 3)):  # of 20 read: 10 % is not past 0.1, 15 % is
        store.update_run(run_id, status="running", read=20, enqueued=20)
        for i in range(letters):
            store.add_dead_letter(f"{run_id}-{i}", run_id, {}, error_class="PermanentError.422", message="refused")
        store.finish_run(run_id)
    store.fail_run(failed, "the CRM was unreachable")
    assert [store.run(r)["degraded"] for r in (clean, degraded, failed)] == [False, True, True]  # type: ignore[index]
    finished_at = store.run(clean)["finished_at"]  # type: ignore[index]
    store.finish_run(clean)  # closed once: a second close changes nothing
    assert store.run(clean)["finished_at"] == finished_at  # type: ignore[index]
    count = value("crmsync_run_duration_seconds_count", kind="incremental")
    bad = value("crmsync_runs_degraded_total", kind="incremental")

    for run in store.claim_uncounted_runs():
        metrics.observe_finished_run(run)
    assert store.claim_uncounted_runs() == []  # another worker finds nothing left to count

    assert value("crmsync_run_duration_seconds_count", kind="incremental") - count == 3
    assert value("crmsync_runs_degraded_total", kind="incremental") - bad == 2


def test_breaker_gauge_reads_the_breaker_when_scraped(scrape_sources: None) -> None:
    breaker = LocalBreaker(threshold=2)
    assert REGISTRY.get_sample_value("crmsync_breaker_open") is None  # no breaker given: no sample
    metrics.register_breaker(breaker.is_open)
    assert value("crmsync_breaker_open") == 0
    breaker.on_failure()
    breaker.on_failure()
    assert value("crmsync_breaker_open") == 1
    breaker.on_success()
    assert value("crmsync_breaker_open") == 0


def test_queue_depth_is_read_from_the_given_callable_at_each_scrape(scrape_sources: None) -> None:
    depths = {"crmsync.priority": 3, "crmsync.bulk": 250}
    metrics.register_queue_depth(lambda: depths)
    assert value("crmsync_queue_depth", queue="crmsync.bulk") == 250
    depths["crmsync.bulk"] = 10
    assert value("crmsync_queue_depth", queue="crmsync.bulk") == 10
    assert value("crmsync_queue_depth", queue="crmsync.priority") == 3


def test_a_failing_queue_depth_source_leaves_the_metric_empty_not_the_scrape_broken(scrape_sources: None) -> None:
    def broker_down() -> dict[str, int]:
        raise ConnectionError("broker unreachable")

    metrics.register_queue_depth(broker_down)
    metrics.register_breaker(lambda: False)
    assert REGISTRY.get_sample_value("crmsync_queue_depth", {"queue": "crmsync.bulk"}) is None
    assert value("crmsync_breaker_open") == 0  # the rest of the registry still collects


def test_broker_queue_depths_reads_each_queue_of_a_celery_broker() -> None:
    app = Celery("depth-test", broker="memory://")
    busy, idle = f"busy-{uuid.uuid4().hex[:6]}", f"idle-{uuid.uuid4().hex[:6]}"
    with app.connection_for_write() as conn:
        producer = conn.Producer()
        for i in range(3):
            producer.publish({"n": i}, routing_key=busy, declare=[KombuQueue(busy)])
    assert metrics.broker_queue_depths(app, [busy, idle]) == {busy: 3, idle: 0}


# -- /metrics over HTTP --------------------------------------------------------------------------------


def test_metrics_server_serves_the_series_over_http(metrics_server: int, route: str, scrape_sources: None) -> None:
    metrics.observe_call(route, 201, 0.05)
    metrics.observe_call(route, 429, 0.01)
    metrics.register_queue_depth(lambda: {"crmsync.priority": 7})
    metrics.register_breaker(lambda: True)

    samples = scrape(metrics_server)

    assert samples[("crmsync_api_calls_total", (("route", route), ("status", "201")))] == 1
    assert samples[("crmsync_api_rate_limited_total", (("route", route),))] == 1
    assert samples[("crmsync_api_call_seconds_count", (("route", route),))] == 2
    assert samples[("crmsync_queue_depth", (("queue", "crmsync.priority"),))] == 7
    # The fixed series exist from the start, at zero or more.
    for outcome in metrics.OUTCOMES:
        assert ("crmsync_customers_total", (("outcome", outcome),)) in samples
    assert ("crmsync_runs_degraded_total", (("kind", "full"),)) in samples
    assert samples[("crmsync_breaker_open", ())] == 1


def test_a_second_server_on_a_taken_port_is_a_config_error_without_multiprocess_mode(metrics_server: int) -> None:
    with pytest.raises(ConfigError, match="PROMETHEUS_MULTIPROC_DIR"):
        metrics.start_metrics_server(metrics_server, addr="127.0.0.1")


def test_multiprocess_dir_set_after_import_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="before"):
        metrics.start_metrics_server(free_port(), addr="127.0.0.1")


# -- multiprocess mode: several real processes, one sum --------------------------------------------

RECORD_AND_EXIT = """
from worker import metrics
assert metrics.multiprocess_mode()
for _ in range({calls}):
    metrics.observe_call("upsert_customer", "2xx", 0.02)
metrics.observe_call("add_tags", 429, 0.01)
metrics.observe_outcome("synced", None)
metrics.observe_run("full", 60.0, degraded=True)
"""

RECORD_AND_SERVE = """
import sys
from worker import metrics
assert metrics.multiprocess_mode()
for _ in range({calls}):
    metrics.observe_call("upsert_customer", "2xx", 0.02)
metrics.observe_outcome("synced", None)
metrics.register_queue_depth(lambda: {{"crmsync.bulk": 42}})  # the broker's figure, read when scraped
metrics.start_metrics_server({port}, addr="127.0.0.1")
print("serving", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def python(code: str, env: dict[str, str], **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,  # type: ignore[call-overload]
    )


def test_one_scrape_sums_the_calls_of_every_worker_process_of_the_host(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"  # created by the first process that imports worker.metrics
    env = {**os.environ, metrics.MULTIPROC_ENV: str(directory)}
    port = free_port()

    # A worker that recorded calls and has since exited: its counters stay in the sum.
    exited = python(RECORD_AND_EXIT.format(calls=3), env)
    _out, err = exited.communicate(timeout=60)
    assert exited.returncode == 0, err

    # Two live workers, both serving the same port (as every worker of a host does).
    servers = [python(RECORD_AND_SERVE.format(calls=n, port=port), env) for n in (5, 4)]
    try:
        for proc in servers:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "serving", proc.stderr.read() if proc.stderr else ""

        for _ in range(8):  # new connections each time: whichever process answers, the sum is the same
            samples = scrape(port)
            assert samples[("crmsync_api_calls_total", (("route", "upsert_customer"), ("status", "2xx")))] == 12
            assert samples[("crmsync_api_call_seconds_count", (("route", "upsert_customer"),))] == 12
            assert samples[("crmsync_api_rate_limited_total", (("route", "add_tags"),))] == 1
            assert samples[("crmsync_customers_total", (("outcome", "synced"),))] == 3
            assert samples[("crmsync_run_duration_seconds_count", (("kind", "full"),))] == 1
            assert samples[("crmsync_runs_degraded_total", (("kind", "full"),))] == 1
            # A reading taken at scrape time is the answering process's, never a sum.
            assert samples[("crmsync_queue_depth", (("queue", "crmsync.bulk"),))] == 42
    finally:
        for proc in servers:
            proc.communicate(input="", timeout=30)
    assert [p.returncode for p in servers] == [0, 0]
