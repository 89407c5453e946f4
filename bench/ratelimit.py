#!/usr/bin/env python
"""Rate limit benchmark: how close do crmsync's workers keep the sandbox to its request limit?

For each sandbox rate limit, latency and number of `crmsync worker` processes, one run is:
a fresh CRM (SQLite, the schema of tests/crm.py), a fresh state DB, a flushed Redis database
(the Celery broker and the shared limiter), a fresh `crmsync sandbox`; `crmsync init`; the
workers started and waited for (each log says "ready"); then, timed, `crmsync sync full --wait
--json`. The figures come from the sandbox's `/_sandbox/stats`:

- end-to-end: successful (2xx) calls / wall time of the `sync` command, divided by the limit;
- steady state: the sandbox's `requests_per_second` (requests between its first and last)
  times the share of them that succeeded, divided by the limit;
- the share of 429s among all requests;
- CPU per call: the CPU seconds the workers (together) and the sandbox spent during the timed
  part, from /proc, divided by the API requests the sandbox saw.

Beside them, in the same run, a naive client against its own fresh sandbox: a sequential loop
of plain `httpx.put` calls (a new connection per call, no limiter, no retries) sending each
contact's create-customer, add-tags and add-custom-fields as crmsync would.

Every configuration runs `--repeats` times (interleaved) and the median is reported. Every
process started is in its own process group and is killed on the way out, whatever happens.

    python bench/ratelimit.py [--quick] [--repeats N] [--contacts N]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import redis  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from tests.crm import MAPPING, make_crm, write_mapping  # noqa: E402
from worker.proto import _wire  # noqa: E402
from worker.sandbox.config import API_BASE_PATH  # noqa: E402
from worker.sandbox.server import sandbox_subprocess  # noqa: E402
from worker.source.mapping import parse_mapping  # noqa: E402
from worker.source.reader import SourceReader  # noqa: E402

SUBCOMPANY = "01HSWE652DMW6REJ1FB1135PRZ"
TOKEN = "bench-secret-" + uuid.uuid4().hex[:12]
DEFAULT_REDIS = "redis://127.0.0.1:6379/12"
DEFAULT_PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

WORKER_READY_TIMEOUT = 90.0  # seconds for one worker's log to say "ready"
COMMAND_TIMEOUT = 180.0  # `crmsync init` and other short commands
STOP_TIMEOUT = 10.0  # SIGTERM to SIGKILL
HTTP_TIMEOUT = 30.0  # each request of the naive client and each stats read
SAMPLE_EVERY = 0.05  # seconds between two reads of /_sandbox/stats during a timed part


# -- processes ---------------------------------------------------------------------------------


class Processes:
    """Every process this script starts, each in a session (process group) of its own."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=out, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[subprocess.Popen[bytes]] | None = None) -> None:
        """SIGTERM each group, SIGKILL what is left after STOP_TIMEOUT; forget them."""
        targets = list(self.procs if procs is None else procs)
        for p in targets:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for p in targets:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(STOP_TIMEOUT)
            # Threads or children left in the group (a worker's pool) go too.
            _signal_group(p, signal.SIGKILL)
            if p in self.procs:
                self.procs.remove(p)


def _signal_group(p: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


PROCS = Processes()


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally`, which stop the processes


def crmsync_argv(*args: str) -> list[str]:
    """`crmsync ARGS` with the interpreter running this script."""
    exe = Path(sys.executable).with_name("crmsync")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "worker.cli", *args]


# -- configuration and results -----------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    limit: float
    latency_ms: float
    workers: int  # 0: the naive client

    @property
    def jitter_ms(self) -> float:
        return 10.0 if self.latency_ms > 0 else 0.0

    def sandbox_args(self) -> list[str]:
        args = ["--subcompany-id", SUBCOMPANY, "--token", TOKEN, "--rate-limit", f"{self.limit:g}"]
        args += ["--latency-ms", f"{self.latency_ms:g}", "--jitter-ms", f"{self.jitter_ms:g}"]
        return args


@dataclass
class Result:
    total: int  # API requests the sandbox saw
    ok: int  # 2xx among them
    limited: int  # 429s among them
    wall: float  # seconds of the timed part
    rps: float  # the sandbox's requests_per_second
    note: str = ""
    run_seconds: float | None = None  # the run's own duration as crmsync records it (--json "seconds")
    mid_rate: float = 0.0  # successful calls/s between 10% and 90% of them (sampled stats)
    first_call: float = 0.0  # seconds from the start of the timed part to the first API request
    tail: float = 0.0  # seconds from the last API request to the end of the timed part
    cpu_busy: float = 0.0  # share of the machine's CPU time busy during the timed part
    worker_cpu: float = 0.0  # CPU seconds of all workers during the timed part
    sandbox_cpu: float = 0.0  # CPU seconds of the sandbox during the timed part
    command_cpu: float = 0.0  # CPU seconds of the `sync` command, start to exit

    def e2e(self, limit: float) -> float:
        return self.ok / self.wall / limit if self.wall > 0 else 0.0

    def steady(self, limit: float) -> float:
        return self.rps * (self.ok / self.total) / limit if self.total else 0.0

    def mid(self, limit: float) -> float:
        return self.mid_rate / limit

    def share_429(self) -> float:
        return self.limited / self.total if self.total else 0.0

    def ms_per_call(self, cpu: float) -> float:
        return 1000 * cpu / self.total if self.total else 0.0


def get_json(url: str) -> Any:
    r = httpx.get(url, timeout=HTTP_TIMEOUT, trust_env=False)
    r.raise_for_status()
    return r.json()


def read_stats(root: str) -> dict[str, Any]:
    return get_json(f"{root}/_sandbox/stats")


def result_from(stats: dict[str, Any], wall: float, note: str = "") -> Result:
    by_status = {str(k): int(v) for k, v in stats.get("by_status", {}).items()}
    ok = sum(v for k, v in by_status.items() if k.startswith("2"))
    return Result(
        total=int(stats["total"]),
        ok=ok,
        limited=by_status.get("429", 0),
        wall=wall,
        rps=float(stats.get("requests_per_second") or 0.0),
        note=note,
    )


class Sampler:
    """Polls /_sandbox/stats every SAMPLE_EVERY s in a thread, and the machine's CPU counters.

    Gives what the sandbox's own `requests_per_second` cannot separate: when the first and the
    last request came relative to the timed part, and the rate in the middle of the run.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, total, 2xx)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self.started = time.monotonic()
        self._cpu0 = _cpu_times()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ended = time.monotonic()
        self._stop.set()
        self._thread.join(HTTP_TIMEOUT)
        busy0, all0 = self._cpu0
        busy1, all1 = _cpu_times()
        self.cpu_busy = (busy1 - busy0) / (all1 - all0) if all1 > all0 else 0.0

    def _run(self) -> None:
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            while not self._stop.is_set():
                try:
                    st = client.get(f"{self.root}/_sandbox/stats").json()
                except (httpx.HTTPError, ValueError):
                    st = None
                if st is not None:
                    ok = sum(int(v) for k, v in st.get("by_status", {}).items() if str(k).startswith("2"))
                    self.samples.append((time.monotonic(), int(st["total"]), ok))
                self._stop.wait(SAMPLE_EVERY)

    def fill(self, result: Result) -> None:
        """Set the sampled figures of `result` (final counts from `result`)."""
        pts = [(self.started, 0, 0), *self.samples]
        first = next((t for t, total, _ in pts if total > 0), self.ended)
        last = next((t for t, total, _ in pts if total >= result.total), self.ended)
        result.first_call = max(0.0, first - self.started)
        result.tail = max(0.0, self.ended - last)
        result.cpu_busy = self.cpu_busy
        lo, hi = _crossing(pts, 0.1 * result.ok), _crossing(pts, 0.9 * result.ok)
        if lo is not None and hi is not None and hi > lo:
            result.mid_rate = 0.8 * result.ok / (hi - lo)


def _crossing(pts: list[tuple[float, int, int]], level: float) -> float | None:
    """When the 2xx count reached `level`, interpolated between samples."""
    for (t0, _, a), (t1, _, b) in itertools.pairwise(pts):
        if a < level <= b:
            return t0 + (t1 - t0) * (level - a) / (b - a)
    return None


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat (zeros where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far, from /proc (0 where there is none)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Fields after the command name, which is in brackets and may hold spaces.
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def children_cpu() -> float:
    """CPU seconds of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- one run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def state_database(kind: str, run_dir: Path, pg_admin: str) -> Iterator[str]:
    """A fresh state DB: a SQLite file in the run's folder, or a new PostgreSQL database."""
    if kind == "sqlite":
        yield f"sqlite:///{run_dir / 'state.db'}"
        return
    name = "crmsync_bench_" + uuid.uuid4().hex[:10]
    admin = sa.create_engine(pg_admin, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def base_env() -> dict[str, str]:
    """This process's environment without any CRMSYNC_ setting (the runs set their own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_")}


def run_command(argv: list[str], env: dict[str, str], cwd: Path, log: Path, timeout: float) -> None:
    """Run a short command to completion, bounded by `timeout`; its output goes to `log`."""
    proc = PROCS.start(argv, env, cwd, log)  # in the registry, so an interruption kills it too
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"'{shlex.join(argv[-4:])}' did not finish within {timeout:.0f} s; see {log}") from None
    finally:
        PROCS.stop([proc])
    if proc.returncode != 0:
        raise RuntimeError(f"'{shlex.join(argv[-4:])}' exited {proc.returncode}; see {log}")


def wait_ready(log: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Block until the worker's log says "ready"; fail if it dies or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and " ready." in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"a worker exited ({proc.returncode}) before it was ready; see {log}")
        time.sleep(0.1)
    raise RuntimeError(f"a worker was not ready within {timeout:.0f} s; see {log}")


def run_crmsync(cfg: Config, contacts: int, run_dir: Path, opts: argparse.Namespace) -> Result:
    """One timed full sync by `cfg.workers` crmsync workers against a fresh sandbox."""
    redis.Redis.from_url(opts.redis_url).flushdb()
    crm_url = f"sqlite:///{run_dir / 'crm.db'}"
    make_crm(crm_url, contacts).dispose()
    mapping = write_mapping(run_dir, MAPPING)
    workers: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        state_url = stack.enter_context(state_database(opts.state, run_dir, opts.pg_admin))
        env = base_env()
        env.update(
            CRMSYNC_SOURCE_URL=crm_url,
            CRMSYNC_STATE_URL=state_url,
            CRMSYNC_BROKER_URL=opts.redis_url,
            CRMSYNC_MAPPING=str(mapping),
            CRMSYNC_PROTO_SUBCOMPANY_ID=SUBCOMPANY,
            CRMSYNC_PROTO_TOKEN=TOKEN,
            CRMSYNC_RATE_LIMIT=f"{cfg.limit:g}",
        )
        if opts.concurrency:
            env["CRMSYNC_WORKER_CONCURRENCY"] = str(opts.concurrency)
        base, sandbox = stack.enter_context(sandbox_subprocess(*cfg.sandbox_args(), env=env))
        root = base.removesuffix(API_BASE_PATH)
        env["CRMSYNC_PROTO_BASE_URL"] = base
        run_command(crmsync_argv("init"), env, run_dir, run_dir / "init.log", COMMAND_TIMEOUT)
        try:
            logs = []
            for i in range(cfg.workers):
                log = run_dir / f"worker-{i}.log"
                workers.append(PROCS.start(crmsync_argv("worker"), env, run_dir, log))
                logs.append(log)
            for proc, log in zip(workers, logs, strict=True):
                wait_ready(log, proc, WORKER_READY_TIMEOUT)
            before = read_stats(root)
            if before["total"]:
                raise RuntimeError(f"the sandbox saw {before['total']} requests before the sync")
            # Generous but bounded: ten times the ideal duration, and at least two minutes.
            timeout = max(120.0, 10 * contacts * 3 / cfg.limit)
            argv = crmsync_argv("sync", "full", "--wait", "--json")
            log = run_dir / "sync.log"
            servers = [sandbox.pid, *(w.pid for w in workers)]
            cpu_before = [process_cpu(pid) for pid in servers]
            waited_before = children_cpu()
            with open(run_dir / "sync.out", "wb") as out, open(log, "ab") as err, Sampler(root) as sampler:
                started = time.monotonic()
                proc = subprocess.Popen(argv, env=env, cwd=run_dir, stdout=out, stderr=err, start_new_session=True)
                PROCS.procs.append(proc)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    raise RuntimeError(f"the sync did not finish within {timeout:.0f} s; see {run_dir}") from None
                finally:
                    wall = time.monotonic() - started
                    PROCS.stop([proc])
            cpu_used = [process_cpu(pid) - before for pid, before in zip(servers, cpu_before, strict=True)]
            command_cpu = children_cpu() - waited_before  # the command, the one child waited for meanwhile
            if proc.returncode != 0:
                raise RuntimeError(f"the sync exited {proc.returncode}; see {log}")
            stats = read_stats(root)
        finally:
            PROCS.stop(workers)
    summary = json.loads((run_dir / "sync.out").read_text())
    counts = summary.get("counts", {})
    note = ""
    if counts.get("synced") != contacts or counts.get("dead"):
        note = f"synced {counts.get('synced')}/{contacts}, dead-lettered {counts.get('dead')}"
    result = result_from(stats, wall, note)
    result.run_seconds = summary.get("seconds")
    result.sandbox_cpu, result.worker_cpu, result.command_cpu = cpu_used[0], sum(cpu_used[1:]), command_cpu
    sampler.fill(result)
    return result


def run_naive(cfg: Config, contacts: int, run_dir: Path, opts: argparse.Namespace) -> Result:
    """A sequential loop of plain httpx calls, new connection each, no limiter, no retries."""
    crm_url = f"sqlite:///{run_dir / 'crm.db'}"
    engine = make_crm(crm_url, contacts)
    mapping = parse_mapping(MAPPING).mapping
    people = [c for page in SourceReader(engine, mapping).pages() for c in page.contacts]
    engine.dispose()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    errors = 0
    with sandbox_subprocess(*cfg.sandbox_args(), env=base_env()) as (base, sandbox):
        root = base.removesuffix(API_BASE_PATH)
        sandbox_before = process_cpu(sandbox.pid)

        def call(method: str, route: str, body: Any, **params: str) -> httpx.Response | None:
            nonlocal errors
            url = base + _wire.path(route, SUBCOMPANY, **params)
            try:
                send = httpx.put if method == "PUT" else httpx.post  # a new connection each time
                return send(url, json=body, headers=headers, timeout=HTTP_TIMEOUT, trust_env=False)
            except httpx.HTTPError:
                errors += 1
                return None

        with Sampler(root) as sampler:
            started = time.monotonic()
            # The custom fields must exist before values are set: one POST each, as crmsync's plan does.
            field_ids: dict[str, str] = {}
            for spec in mapping.column_fields:
                assert spec.name is not None
                body = _wire.create_field_body(spec.name, spec.type, spec.options)
                r = call("POST", "create_custom_field", body)
                if r is not None and r.is_success:
                    field_ids[spec.name] = str(r.json()["id"])
            for c in people:
                call("PUT", "upsert_customer", _wire.customer_body(c.profile), provided_unique_id=c.key)
                if c.tags:
                    call("PUT", "add_tags", _wire.tags_body(c.tags), provided_unique_id=c.key)
                if c.fields:
                    # A field whose creation failed (a 429) is named instead: the sandbox accepts both.
                    values = [
                        {"id": field_ids[k], "value": v} if k in field_ids else {"name": k, "value": v}
                        for k, v in c.fields.items()
                    ]
                    call("PUT", "add_custom_fields", {"custom_fields": values}, provided_unique_id=c.key)
            wall = time.monotonic() - started
        stats = read_stats(root)
        sandbox_cpu = process_cpu(sandbox.pid) - sandbox_before
    result = result_from(stats, wall, f"{errors} transport errors" if errors else "")
    result.sandbox_cpu = sandbox_cpu
    sampler.fill(result)
    return result


def connection_costs(calls: int, repeats: int) -> str:
    """Milliseconds per sequential create-customer call: a new connection each, or one kept alive.

    Against a fresh sandbox with no rate limit and no latency, so that only the client's own
    cost per call shows (what a worker thread spends between two of its requests).
    """
    headers = {"Authorization": f"Bearer {TOKEN}"}
    args = ["--subcompany-id", SUBCOMPANY, "--token", TOKEN, "--rate-limit", "0"]
    per_call: dict[str, list[float]] = {"new connection per call (httpx.put)": [], "one keep-alive client": []}
    with sandbox_subprocess(*args, env=base_env()) as (base, _):
        for rep in range(repeats):
            for label in per_call:
                urls = [
                    base + _wire.path("upsert_customer", SUBCOMPANY, provided_unique_id=f"k{rep}-{i}")
                    for i in range(calls)
                ]
                body = {"name": "Ada"}
                started = time.perf_counter()
                if label.startswith("new"):
                    for url in urls:
                        httpx.put(url, json=body, headers=headers, trust_env=False).raise_for_status()
                else:
                    with httpx.Client(headers=headers, trust_env=False) as client:
                        for url in urls:
                            client.put(url, json=body).raise_for_status()
                per_call[label].append(1000 * (time.perf_counter() - started) / calls)
    lines = ["| client | ms per call (median) | min–max |", "|---|---:|---:|"]
    for label, values in per_call.items():
        lines.append(f"| {label} | {statistics.median(values):.2f} | {min(values):.2f}–{max(values):.2f} |")
    return "\n".join(lines)


# -- the benchmark -----------------------------------------------------------------------------


def table(results: dict[Config, list[Result]], configs: list[Config], repeats: int) -> str:
    head = (
        "| limit (req/s) | latency | client | ok calls | wall s | end-to-end ÷ limit | steady ÷ limit "
        "| 429 share | mid-run ÷ limit | 1st call after s | CPU busy | workers CPU ms/call | sandbox CPU ms/call |"
    )
    lines = [head, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cfg in configs:
        rs = results.get(cfg, [])
        latency = f"{cfg.latency_ms:g} ± {cfg.jitter_ms:g} ms" if cfg.latency_ms else "0 ms"
        client = "naive loop" if cfg.workers == 0 else f"crmsync, {cfg.workers} worker{'s' if cfg.workers > 1 else ''}"
        if not rs:
            lines.append(f"| {cfg.limit:g} | {latency} | {client}: failed | | | | | | | | | | |")
            continue

        def ratio(values: list[float]) -> str:
            text = f"{statistics.median(values):.2f}"
            return text + (f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else "")

        failed = f", {repeats - len(rs)} failed" if len(rs) < repeats else ""
        notes = "; ".join(sorted({r.note for r in rs if r.note}))
        client += failed + (f" ({notes})" if notes else "")
        med = statistics.median
        lines.append(
            f"| {cfg.limit:g} | {latency} | {client} | {med(r.ok for r in rs):.0f} | {med(r.wall for r in rs):.1f} "
            f"| {ratio([r.e2e(cfg.limit) for r in rs])} | {ratio([r.steady(cfg.limit) for r in rs])} "
            f"| {100 * med(r.share_429() for r in rs):.2f}% | {ratio([r.mid(cfg.limit) for r in rs])} "
            f"| {med(r.first_call for r in rs):.2f} | {100 * med(r.cpu_busy for r in rs):.0f}% "
            f"| {'–' if cfg.workers == 0 else f'{med(r.ms_per_call(r.worker_cpu) for r in rs):.2f}'} "
            f"| {med(r.ms_per_call(r.sandbox_cpu) for r in rs):.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer contacts (60) and 1 repeat: a smoke run")
    ap.add_argument("--repeats", type=int, help="runs per configuration, median reported (default 3)")
    ap.add_argument("--contacts", type=int, help="contacts per run (default 225: ~600 API calls)")
    ap.add_argument("--limits", default="50,200", help="sandbox rate limits, requests/s (default 50,200)")
    ap.add_argument("--latencies", default="0,100", help="sandbox latencies, ms (default 0,100; jitter 10 when > 0)")
    ap.add_argument("--workers", default="1,2,4", help="crmsync worker process counts (default 1,2,4)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive-loop baseline")
    ap.add_argument(
        "--connections",
        action="store_true",
        help="only measure the cost of a call with a new connection each vs one kept alive (sequential, no limit)",
    )
    ap.add_argument("--concurrency", type=int, help="CRMSYNC_WORKER_CONCURRENCY (default: crmsync's, 16)")
    ap.add_argument("--state", choices=["sqlite", "postgres"], default="sqlite", help="state DB (default sqlite)")
    ap.add_argument("--pg-admin", default=DEFAULT_PG_ADMIN, help="PostgreSQL admin URL for --state postgres")
    ap.add_argument("--redis-url", default=DEFAULT_REDIS, help=f"broker and limiter; FLUSHED (default {DEFAULT_REDIS})")
    ap.add_argument("--keep", action="store_true", help="keep the runs' folders (logs, databases)")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.contacts is None:
        args.contacts = 60 if args.quick else 225
    return args


def reproduce(args: argparse.Namespace) -> str:
    parts = ["python", "bench/ratelimit.py", "--repeats", str(args.repeats), "--contacts", str(args.contacts)]
    parts += ["--limits", args.limits, "--latencies", args.latencies, "--workers", args.workers]
    parts += ["--state", args.state, "--redis-url", args.redis_url]
    if args.concurrency:
        parts += ["--concurrency", str(args.concurrency)]
    if args.no_naive:
        parts.append("--no-naive")
    return shlex.join(parts)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.connections:
        print(shlex.join(["python", "bench/ratelimit.py", "--connections", "--repeats", str(args.repeats)]))
        print()
        print(
            f"{dt.date.today().isoformat()}, {os.cpu_count()} CPUs, 300 sequential calls per run, "
            f"median of {args.repeats}"
        )
        print()
        print(connection_costs(300, args.repeats))
        return 0
    limits = [float(x) for x in args.limits.split(",")]
    latencies = [float(x) for x in args.latencies.split(",")]
    counts = [int(x) for x in args.workers.split(",")]
    configs = [
        Config(limit, latency, n)
        for limit in limits
        for latency in latencies
        for n in ([] if args.no_naive else [0]) + counts
    ]
    results: dict[Config, list[Result]] = {}
    work = Path(tempfile.mkdtemp(prefix="crmsync-bench-ratelimit-"))
    started = time.monotonic()
    print(f"# runs in {work}", file=sys.stderr)
    try:
        for rep in range(args.repeats):
            for cfg in configs:  # interleaved: machine noise spreads over every configuration
                run_dir = work / f"r{rep}-l{cfg.limit:g}-d{cfg.latency_ms:g}-w{cfg.workers}"
                run_dir.mkdir()
                runner = run_naive if cfg.workers == 0 else run_crmsync
                try:
                    r = runner(cfg, args.contacts, run_dir, args)
                except (RuntimeError, OSError, httpx.HTTPError, redis.RedisError, sa.exc.SQLAlchemyError) as exc:
                    print(f"# {run_dir.name}: FAILED: {exc}", file=sys.stderr)
                    continue
                results.setdefault(cfg, []).append(r)
                print(
                    f"# {run_dir.name}: {r.ok} ok / {r.total} requests in {r.wall:.1f} s; "
                    f"e2e {r.e2e(cfg.limit):.2f}, steady {r.steady(cfg.limit):.2f}, mid {r.mid(cfg.limit):.2f}, "
                    f"429 {100 * r.share_429():.2f}%; first call after {r.first_call:.2f} s, "
                    f"tail {r.tail:.2f} s, crmsync run {r.run_seconds} s, CPU busy {100 * r.cpu_busy:.0f}%; "
                    f"CPU s: workers {r.worker_cpu:.2f}, sandbox {r.sandbox_cpu:.2f}, command {r.command_cpu:.2f} "
                    f"{r.note}[{time.monotonic() - started:.0f} s]",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        PROCS.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(reproduce(args))
    print()
    print(
        f"{dt.date.today().isoformat()}, {os.cpu_count()} CPUs, {args.contacts} contacts per run, "
        f"median of {args.repeats} (min–max in brackets), state DB {args.state}, broker and limiter on Redis"
    )
    print()
    print(table(results, configs, args.repeats))
    return 0 if all(len(results.get(c, [])) == args.repeats for c in configs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
