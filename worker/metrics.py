"""Prometheus metrics of crmsync: module-level metric objects and cheap helpers to update them.

Every helper only touches memory (in multiprocess mode, a memory-mapped file: no system
call), so they are safe on the hot path of a sync task. Nothing here raises into the caller
for a metric's sake: a run or an API call never fails because it could not be counted.

Several worker processes on one host
------------------------------------
Each ``crmsync worker`` is a process of its own, and a host may run several. Prometheus
scrapes one port per host, so the processes' figures have to be added up before they are
served. prometheus-client does that in its *multiprocess mode*: when the environment variable
``PROMETHEUS_MULTIPROC_DIR`` names a directory **before this module is first imported**, each
process writes its values to files of its own in that directory, and :func:`start_metrics_server`
serves the sum of every file there. The worker command sets it (unless it is already set) to a
directory per host, ``<data dir>/metrics``, shared by every worker of the host; then every
worker binds the same ``--metrics-port`` (``SO_REUSEPORT``), and whichever of them answers a
scrape serves the same totals, so a worker that restarts never leaves the port dark.

- Counters and histograms of processes that have exited stay in the sum (a counter must never
  go down). The gauges (queue depth, breaker) are read when scraped, by the process that
  answers, and never added up. Only empty the directory
  when no worker of the host runs (at boot: a tmpfs such as ``/run`` does it by itself).
- Without ``PROMETHEUS_MULTIPROC_DIR`` the process uses a plain in-memory registry and serves
  only its own figures: right for one process per host, and what tests and commands use.
- Set the variable for worker processes only: a short command run with it leaves its files
  behind too (harmless, but they pile up).

Reading the figures
-------------------
Every worker host reports the same queue depth (it is the broker's) and the same open dead
letters (the state DB's): aggregate them with ``max by (...)``, not ``sum``.
``crmsync_sync_lag_seconds{kind}`` measures from the CRM's ``updated_at`` of a contact to the
moment it is synced, by the kind of run that planned it: read ``kind="incremental"`` for
freshness; full syncs and replays send old rows too, whose ages land in the top buckets.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar, cast
from wsgiref.simple_server import WSGIRequestHandler, make_server

import httpx
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import Collector

from .errors import CircuitOpen, ConfigError, RateLimited

log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OUTCOMES = ("synced", "skipped", "dead")
RUN_KINDS = ("full", "incremental", "replay")
RETRY_REASONS = (
    "rate_limited",
    "circuit_open",
    "server_error",
    "timeout",
    "connection",
    "invalid_response",
    "other",
)

_MULTIPROC_DIR = os.environ.get(MULTIPROC_ENV)
if _MULTIPROC_DIR:
    # The values' files are opened as metrics are built: the directory must exist first.
    os.makedirs(_MULTIPROC_DIR, exist_ok=True)


# -- the metrics -------------------------------------------------------------------------------------

API_CALLS = Counter(
    "crmsync_api_calls",
    "Proto API calls that got an answer or failed on the way, by route and status: the HTTP "
    "status, 2xx for a success, or timeout, connection_error, invalid_response, error.",
    ["route", "status"],
)
"""Proto API calls by route and status (every try: a retried call counts once per try)."""

API_CALL_SECONDS = Histogram(
    "crmsync_api_call_seconds",
    "Seconds one Proto API call took on the wire (rate-limiter waits and retries excluded), by route.",
    ["route"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
"""Latency of one API call on the wire, by route."""

API_RATE_LIMITED = Counter(
    "crmsync_api_rate_limited",
    "Proto API calls answered 429 (rate limited), by route.",
    ["route"],
)
"""429 answers, by route."""

API_RETRIES = Counter(
    "crmsync_api_retries",
    "Proto API calls tried again, by reason: " + ", ".join(RETRY_REASONS) + ".",
    ["reason"],
)
"""Retries of API calls, by reason (one per wait before another try)."""

CUSTOMERS = Counter(
    "crmsync_customers",
    "Sync tasks by outcome: synced, skipped (a later plan read a newer version), dead (dead-lettered).",
    ["outcome"],
)
"""Customers synced, skipped or dead-lettered by sync tasks."""

SYNC_LAG_SECONDS = Histogram(
    "crmsync_sync_lag_seconds",
    "Seconds from a contact's updated_at in the CRM to its sync to Proto, by the kind of run that sent it.",
    ["kind"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400),
)
"""End-to-end lag: the source's updated_at of a contact to the moment it was synced."""

RUN_SECONDS = Histogram(
    "crmsync_run_duration_seconds",
    "Seconds from the start of a run's planning to its close, by kind (full, incremental, replay).",
    ["kind"],
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600),
)
"""Duration of finished runs, by kind."""

RUNS_DEGRADED = Counter(
    "crmsync_runs_degraded",
    "Finished runs that left more than CRMSYNC_DEGRADED_THRESHOLD of their contacts unsynced "
    "(dead-lettered, invalid or failed), and runs whose planning failed, by kind.",
    ["kind"],
)
"""Runs that finished degraded, by kind."""


class ScrapeTimeGauge(Collector):
    """A gauge read from a callable when /metrics is scraped, never on a task's path.

    The callable (set with :meth:`read_from`) returns a number, or for a labelled gauge a
    mapping of label value to number. Until one is set, or while it fails, the gauge has no
    sample (so an alert on its absence fires). Read at scrape time by the one process that
    answers, it is never added up across processes.
    """

    def __init__(self, name: str, documentation: str, label: str | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.source: Callable[[], Any] | None = None
        self._failing = False

    def read_from(self, source: Callable[[], Any] | None) -> None:
        """Read the gauge from `source()` at each scrape from now on (None: no sample)."""
        self.source = source

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=[self.label] if self.label else None)

    def describe(self) -> Iterable[Metric]:
        """The metric's name and type, without calling the source."""
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        """Call the source now and yield its reading."""
        family = self._family()
        source = self.source
        if source is not None:
            try:
                reading = source()
                if self.label:
                    samples = [([str(k)], float(v)) for k, v in sorted(dict(reading).items())]
                else:
                    samples = [([], float(reading))]
            except Exception as exc:
                if not self._failing:
                    log.warning("cannot read %s for metrics: %s", self.name, exc)
                self._failing = True
            else:
                self._failing = False
                for labels, number in samples:
                    family.add_metric(labels, number)
        yield family


QUEUE_DEPTH = ScrapeTimeGauge(
    "crmsync_queue_depth", "Sync tasks waiting on the broker, by queue (in-flight tasks not included).", "queue"
)
"""Queue depth by queue: read from the callable given to :func:`register_queue_depth` at scrape time."""

BREAKER_OPEN = ScrapeTimeGauge(
    "crmsync_breaker_open", "1 while the circuit breaker holds Proto API calls (the API is failing), else 0."
)
"""1 while the circuit breaker is open: read from the breaker given to :func:`register_breaker` at scrape time."""

DEAD_LETTERS = ScrapeTimeGauge(
    "crmsync_dead_letters",
    "Open dead letters (waiting for an operator) in the state DB, by error class.",
    "error_class",
)
"""Open dead letters by error class: read from the state DB given to :func:`register_dead_letters` at scrape time."""

SCRAPE_TIME_GAUGES = (QUEUE_DEPTH, BREAKER_OPEN, DEAD_LETTERS)
for _gauge in SCRAPE_TIME_GAUGES:
    REGISTRY.register(_gauge)


# -- helpers -------------------------------------------------------------------------------------------


def observe_call(route: str, status: int | str, seconds: float) -> None:
    """Count one API call of `route` ending in `status`, taking `seconds` on the wire."""
    API_CALLS.labels(route, str(status)).inc()
    API_CALL_SECONDS.labels(route).observe(seconds)
    if str(status) == "429":
        API_RATE_LIMITED.labels(route).inc()


@contextmanager
def timed_call(route: str) -> Iterator[None]:
    """Time the block as one API call of `route` and count it with the status it ends in.

    A block that returns is a ``2xx``; one that raises is counted with :func:`call_status`
    of its exception, which then goes on its way.
    """
    start = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        observe_call(route, call_status(exc), time.perf_counter() - start)
        raise
    observe_call(route, "2xx", time.perf_counter() - start)


def call_status(exc: BaseException) -> int | str:
    """The status label of a failed call: its HTTP status, or what went wrong without one."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return "invalid_response" if status < 300 else status
    cause = exc.__cause__ or exc.__context__  # the client raises its errors `from None`: the context stays
    if isinstance(exc, httpx.TimeoutException) or isinstance(cause, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.TransportError) or isinstance(cause, httpx.TransportError):
        return "connection_error"
    return "error"


def retry_reason(exc: BaseException | None) -> str:
    """The reason label of a retry caused by `exc` (one of RETRY_REASONS)."""
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, CircuitOpen):
        return "circuit_open"
    if exc is None:
        return "other"
    status = call_status(exc)
    if isinstance(status, int):
        if status >= 500:
            return "server_error"
        return "timeout" if status == 408 else "other"
    if status == "connection_error":
        return "connection"
    return status if status in ("timeout", "invalid_response") else "other"


def observe_retry(cause: BaseException | str | None) -> None:
    """Count one retry, by the exception that caused it (or a reason given as text)."""
    reason = cause if isinstance(cause, str) else retry_reason(cause)
    API_RETRIES.labels(reason).inc()


def observe_outcome(outcome: str, version: str | None, kind: str | None = None) -> None:
    """Count one sync task's outcome (synced, skipped, dead).

    For a synced contact, `version` (its source updated_at, as `worker.contact.version_text`
    gives it: UTC ISO text without offset) also feeds the end-to-end lag, labelled with the
    `kind` of the run that planned it: only an incremental run's lag says how fresh Proto is
    (a full sync also sends rows that changed long ago without moving their updated_at).
    """
    CUSTOMERS.labels(str(outcome)).inc()
    if version and str(outcome) == "synced":
        lag = lag_seconds(version)
        if lag is not None:
            SYNC_LAG_SECONDS.labels(kind if kind in RUN_KINDS else "unknown").observe(lag)


def counts_outcome(fn: _F) -> _F:
    """Decorate `sync_contact(rt, msg)`: count the outcome it returns, with the contact's version from `msg`.

    Every return of the function is counted, whatever path it took; an exception (a call held
    by the breaker, a bug) is no outcome and counts nothing.
    """

    @functools.wraps(fn)
    def counted(*args: Any, **kwargs: Any) -> Any:
        outcome = fn(*args, **kwargs)
        msg = kwargs["msg"] if "msg" in kwargs else args[1]
        msg = msg if isinstance(msg, Mapping) else {}
        contact = msg.get("contact")
        observe_outcome(outcome, contact.get("version") if isinstance(contact, Mapping) else None, msg.get("kind"))
        return outcome

    return cast(_F, counted)


def lag_seconds(version: str, now: float | None = None) -> float | None:
    """Seconds from `version` (UTC ISO text, naive) to `now` (epoch seconds); None if unreadable.

    A version from the future (a clock ahead of ours) counts as no lag.
    """
    try:
        moment = dt.datetime.fromisoformat(version)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return max(0.0, (time.time() if now is None else now) - moment.timestamp())


def observe_run(kind: str, seconds: float, degraded: bool) -> None:
    """Count one finished run of `kind`: its duration, and whether it ended degraded."""
    RUN_SECONDS.labels(kind).observe(max(0.0, seconds))
    if degraded:
        RUNS_DEGRADED.labels(kind).inc()


def observe_finished_run(run: Mapping[str, Any]) -> None:
    """:func:`observe_run` for a closed run as the state store returns it (`StateStore.claim_uncounted_runs`).

    Degraded is the verdict the store recorded when it closed the run (CRMSYNC_DEGRADED_THRESHOLD).
    Never raises.
    """
    try:
        seconds = (run["finished_at"] - run["started_at"]).total_seconds()
        observe_run(str(run["kind"]), seconds, bool(run.get("degraded")))
    except Exception as exc:  # a metric must not fail the run it measures
        log.debug("run not counted in metrics: %s", exc)


def register_queue_depth(source: Callable[[], Mapping[str, float]] | None) -> None:
    """Have ``crmsync_queue_depth`` read `source()` (queue name -> depth) at each scrape; None stops it.

    For the Celery broker: ``register_queue_depth(lambda: broker_queue_depths(app, [q.value for q in Queue]))``.
    """
    QUEUE_DEPTH.read_from(source)


def register_breaker(is_open: Callable[[], bool] | None) -> None:
    """Have ``crmsync_breaker_open`` read `is_open()` at each scrape (say ``rt.breaker.is_open``); None stops it.

    Read when scraped, it is right even while every call is held, and it costs the calls nothing.
    With the Redis breaker every process reads the same shared state.
    """
    BREAKER_OPEN.read_from(is_open)


def register_dead_letters(source: Callable[[], Mapping[str, float]] | None) -> None:
    """Have ``crmsync_dead_letters`` read `source()` (error class -> open letters) at each scrape; None stops it.

    For the state DB: ``register_dead_letters(rt.store.dead_letter_classes)``. Like the queue depth,
    every host reports the same figure: aggregate it with ``max``.
    """
    DEAD_LETTERS.read_from(source)


def broker_queue_depths(app: Any, queues: Iterable[str]) -> dict[str, int]:
    """Tasks waiting in each of `queues` on the broker of the Celery `app` (a queue never declared: 0)."""
    depths: dict[str, int] = {}
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        for queue in queues:
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except conn.channel_errors:
                depths[queue] = 0
    return depths


# -- serving ---------------------------------------------------------------------------------------------


def multiprocess_mode() -> bool:
    """True when this process writes its values to PROMETHEUS_MULTIPROC_DIR."""
    return getattr(values.ValueClass, "_multiprocess", False) is True


class _QuietHandler(WSGIRequestHandler):
    """Serves scrapes without logging each one."""

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""


_servers: list[Any] = []
_servers_lock = threading.Lock()


def serving_registry() -> CollectorRegistry:
    """The registry ``/metrics`` serves: every process's files in multiprocess mode, else this process's."""
    if not multiprocess_mode():
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    for gauge in SCRAPE_TIME_GAUGES:
        registry.register(gauge)
    return registry


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on `addr`:`port` from a daemon thread of this process.

    In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before this module was imported)
    it serves the sum over every process of the directory, and every worker of the host may
    bind the same port. Otherwise it serves this process alone, and a port in use is an error.
    Raises ConfigError when the port cannot be had or the mode was set up too late.
    """
    directory = os.environ.get(MULTIPROC_ENV)
    if directory and not multiprocess_mode():
        raise ConfigError(
            f"{MULTIPROC_ENV} was set after prometheus_client was imported: set it before "
            "anything imports worker.metrics (or in the environment), or workers would serve their own figures only"
        )
    _preset_series()
    registry = serving_registry()
    shared = multiprocess_mode()

    class _Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        allow_reuse_port = shared and hasattr(socket, "SO_REUSEPORT")

    try:
        server = make_server(addr, port, make_wsgi_app(registry), _Server, handler_class=_QuietHandler)
    except OSError as exc:
        hint = "" if shared else f" (several workers on one host share it only with {MULTIPROC_ENV} set)"
        raise ConfigError(f"metrics port {port}: cannot listen on {addr}: {exc.strerror or exc}{hint}") from None
    thread = threading.Thread(target=server.serve_forever, name=f"crmsync-metrics-{port}", daemon=True)
    thread.start()
    with _servers_lock:
        _servers.append(server)
    log.info(
        "serving metrics on http://%s:%d/metrics (%s)",
        addr,
        server.server_port,
        f"every process of {directory}" if shared else "this process",
    )


def stop_metrics_servers() -> None:
    """Stop every metrics server this process started."""
    with _servers_lock:
        servers, _servers[:] = list(_servers), []
    for server in servers:
        server.shutdown()
        server.server_close()


def _preset_series() -> None:
    """Create the fixed series at zero, so that rates and absences read right from the first scrape."""
    for outcome in OUTCOMES:
        CUSTOMERS.labels(outcome)
    for reason in RETRY_REASONS:
        API_RETRIES.labels(reason)
    for kind in RUN_KINDS:
        RUNS_DEGRADED.labels(kind)
        RUN_SECONDS.labels(kind)
        SYNC_LAG_SECONDS.labels(kind)
