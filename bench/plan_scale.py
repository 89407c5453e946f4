#!/usr/bin/env python
"""Planning at scale: how long, and how much memory, does the planner take over a large CRM?

The planner as `crmsync sync full|incremental` runs it (`worker.jobs.planner` + `plan_lock` +
`Planner.plan`: read, hash, diff against the state DB, record the invalid rows, mark the planned
contacts queued in the state DB, build every task message, advance the watermark, close the
run's planning), with no API call: the custom fields are registered in the state registry
beforehand. What receives the messages is chosen with `--enqueue`:

- `count` (default): a function that counts them. The timed window is the planner's own work;
  publishing to the broker is measured apart, because Celery's publish costs about a
  millisecond per message on Redis, which alone is ~15 minutes for a million.
- `redis`: the real publisher (`worker.jobs.celery_enqueue`) into a Redis database of the
  bench's own (`--redis-url`, default db 10, flushed before and after every step); the
  messages found on the queues are checked against the count.
Source and state are on the same dialect: SQLite files in a temporary folder, or new
PostgreSQL databases (dropped afterwards). The CRM is the schema and mapping of tests/crm.py
(contacts with 3 custom fields from columns, 0-3 tags each in a contact_tags table), with an
index on `date_modified`, the mapping's `updated_at` (the cookbook asks for one: without it,
every incremental page scans the whole table).

Measured steps, each in a fresh subprocess (so that its peak RSS, from
`getrusage(RUSAGE_SELF).ru_maxrss`, is its own); the timer covers what `crmsync sync` does
per run after start-up: build the planner (mapping, source engine), take the plan lock, plan.

1. first full plan: N contacts against an empty state DB (fresh state DB each repeat);
2. rerun full plan: every contact synced (the workers simulated by a bulk write of the
   planned hashes), 1% of the contacts' profiles changed in the CRM (a new 1% each repeat);
   it must enqueue exactly that 1%;
3. incremental plan: 100 contacts touched after the watermark; it must enqueue those 100.

Setup (populating the CRM, simulating the workers) is not measured; population time is printed.

    python bench/plan_scale.py [--contacts N] [--dialect sqlite|postgresql|both] [--repeats R]
                               [--enqueue count|redis] [--redis-url URL] [--profile DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from tests.crm import BASE_TIME, MAPPING, contact_row, contact_tags, contacts, md, write_mapping  # noqa: E402
from worker.state.models import utcnow  # noqa: E402
from worker.state.store import STATE  # noqa: E402

DEFAULT_REDIS = "redis://127.0.0.1:6379/10"
PG_ADMIN = os.environ.get("CRMSYNC_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
FIELDS = [  # the mapping's custom fields, as if list-custom-fields had returned them
    ("lifetime_value", "bench-cf-ltv", "number", []),
    ("plan", "bench-cf-plan", "select", ["free", "pro", "enterprise"]),
    ("vip", "bench-cf-vip", "toggle", []),
]
TAGS = ["vip", "newsletter", "beta"]
INCREMENTAL_CHANGES = 100
TARGET_FULL_SECONDS = 30.0
TARGET_FULL_RSS_MB = 300.0
TARGET_INCREMENTAL_SECONDS = 0.5
STEP_TIMEOUT = 3600.0  # seconds for one measured subprocess
STEPS = {
    "full_first": "1. first full plan",
    "full_rerun": "2. rerun full plan, 1% changed",
    "incremental": f"3. incremental plan, {INCREMENTAL_CHANGES} changed",
}


def step_name(step: str, processes: int, variants: list[int]) -> str:
    """A step measured with one CRMSYNC_PLAN_PROCESSES value (named plainly when only one is)."""
    return step if len(variants) == 1 else f"{step}@{processes}"


def step_names(variants: list[int]) -> list[str]:
    full = [step_name(s, p, variants) for s in ("full_first", "full_rerun") for p in variants]
    return [*full, "incremental"]


def step_label(name: str) -> str:
    step, _, processes = name.partition("@")
    return STEPS[step] + (f", {processes} process{'es' if processes != '1' else ''}" if processes else "")


def key(i: int) -> str:
    return f"C{i:08d}"


def log(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


# -- the measured step (runs in a subprocess) ---------------------------------------------------


def child(spec: dict[str, Any]) -> None:
    """Plan one run as `crmsync sync` would, enqueue into a counter; print the figures as JSON."""
    from worker.jobs import plan_lock, planner
    from worker.runtime import Runtime
    from worker.settings import Settings

    settings = Settings(
        _env_file=None,
        source_url=spec["source"],
        state_url=spec["state"],
        mapping=Path(spec["mapping"]),
        plan_processes=spec["processes"],
    )
    rt = Runtime(settings)
    rt.store  # noqa: B018 - the schema check, which a long-lived process makes once, is not timed
    if spec.get("enqueue") == "redis":
        # Imported once by any process that publishes (a worker running beat's planner task too).
        import worker.celery_app
        import worker.tasks  # noqa: F401
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    plan = planner(rt)
    if spec.get("enqueue") != "redis":  # else worker.jobs.celery_enqueue, to CRMSYNC_BROKER_URL
        plan.enqueue = discard
    with plan_lock(rt, spec["kind"]):
        result = plan.plan(spec["kind"])
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if profiler:
        profiler.dump_stats(spec["profile"])
    print(
        json.dumps(
            {
                "vm_hwm_mb": vm_hwm_kb() / 1024,
                "seconds": seconds,
                "cpu_seconds": (cpu1.ru_utime - cpu0.ru_utime)
                + (cpu1.ru_stime - cpu0.ru_stime)
                + (kids1.ru_utime - kids0.ru_utime)
                + (kids1.ru_stime - kids0.ru_stime),
                # This process's peak plus the largest planning process's: both were alive at once.
                "peak_rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + kids1.ru_maxrss) / 1024,
                "self_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "base_rss_mb": base_rss / 1024,
                "counts": dict(result.counts),
                "enqueued": {"messages": result.counts["enqueued"]},
            }
        )
    )


def discard(_queue: Any, _msgs: list[dict[str, Any]]) -> None:
    """The bench's enqueue: the planner counts what it enqueues; a module function, so that the
    planning processes of key ranges import it too."""


def vm_hwm_kb() -> int:
    """This process's own peak RSS (VmHWM: per address space, so it starts afresh at exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


# Linux carries the RSS high-water mark of the address space a process had before exec into
# its ru_maxrss: a child started by this (large) process would report at least our RSS. The
# measured steps are therefore started by a small launcher process, started first.
LAUNCHER = r"""
import json, subprocess, sys
for line in sys.stdin:
    job = json.loads(line)
    try:
        p = subprocess.run(job["argv"], capture_output=True, text=True, env=job["env"], cwd=job["cwd"],
                           timeout=job["timeout"])
        out = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    except subprocess.TimeoutExpired:
        out = {"rc": -9, "stdout": "", "stderr": "timed out after %s s" % job["timeout"]}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""


class Launcher:
    """A small process that starts the measured steps, so that their ru_maxrss is their own."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, argv: list[str], env: dict[str, str], cwd: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "cwd": cwd, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the launcher process died")
        out: dict[str, Any] = json.loads(line)
        return out

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


LAUNCH: Launcher | None = None


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [float(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measured step in a fresh Python process; its figures plus the machine's CPU use."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_")}
    if spec.get("enqueue") == "redis":
        env["CRMSYNC_BROKER_URL"] = spec["redis_url"]
        flush_broker(spec["redis_url"])
    assert LAUNCH is not None
    busy0, total0 = cpu_times()
    proc = LAUNCH.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], env, spec["cwd"], STEP_TIMEOUT
    )
    busy1, total1 = cpu_times()
    if proc["rc"] != 0:
        raise RuntimeError(f"measured step {spec['kind']} exited {proc['rc']}:\n{proc['stderr'][-3000:]}")
    out: dict[str, Any] = json.loads(proc["stdout"].strip().splitlines()[-1])
    if abs(out["self_rss_mb"] - out["vm_hwm_mb"]) > 5:
        log(f"warning: ru_maxrss {out['peak_rss_mb']:.0f} MB but VmHWM {out['vm_hwm_mb']:.0f} MB")
    out["machine_busy"] = (busy1 - busy0) / max(total1 - total0, 1.0)
    if spec.get("enqueue") == "redis":
        waiting = flush_broker(spec["redis_url"])
        expect(waiting == out["enqueued"]["messages"], f"{waiting} messages on the broker, {out['enqueued']} enqueued")
    return out


def flush_broker(url: str) -> int:
    """The messages waiting on the crmsync queues of the bench's Redis database, then empty it."""
    import redis

    from worker.queues import Queue

    client = redis.Redis.from_url(url)
    try:
        waiting = sum(int(client.llen(q.value)) for q in Queue)
        client.flushdb()
    finally:
        client.close()
    return waiting


# -- databases ---------------------------------------------------------------------------------


class Databases:
    """Creates SQLite files or PostgreSQL databases, and removes them all at the end."""

    def __init__(self, dialect: str, folder: Path) -> None:
        self.dialect = dialect
        self.folder = folder
        self.pg_names: list[str] = []
        self.engines: list[sa.Engine] = []

    def new(self, label: str) -> str:
        if self.dialect == "sqlite":
            return f"sqlite:///{self.folder / (label + '-' + uuid.uuid4().hex[:6] + '.db')}"
        name = f"crmsync_bench_{label}_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        admin.dispose()
        self.pg_names.append(name)
        return PG_ADMIN.rsplit("/", 1)[0] + "/" + name

    def engine(self, url: str, **kw: Any) -> sa.Engine:
        engine = sa.create_engine(url, **kw)
        self.engines.append(engine)
        return engine

    def drop(self, url: str) -> None:
        """Drop a PostgreSQL database made by `new` (a SQLite file stays in the temp folder)."""
        if self.dialect != "postgresql":
            return
        name = url.rsplit("/", 1)[1]
        admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
        self.pg_names.remove(name)

    def close(self) -> None:
        for engine in self.engines:
            engine.dispose()
        admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in self.pg_names:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def rows_of(lo: int, hi: int) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """Contacts lo..hi-1 (tests/crm.py's rows, wider keys) with their 0-3 tags."""
    for i in range(lo, hi):
        yield contact_row(i, id=key(i)), TAGS[: i % 4]


# The CRM's index for incremental reads, made after the bulk load (faster than during it).
UPDATED_AT_INDEX = "CREATE INDEX ix_contacts_date_modified ON contacts (date_modified)"


def populate(dbs: Databases, url: str, n: int) -> None:
    """The CRM: n contacts, their tags; executemany in chunks on SQLite, COPY on PostgreSQL."""
    chunk = 50_000
    if dbs.dialect == "sqlite":
        engine = dbs.engine(url)

        @sa.event.listens_for(engine, "connect")
        def _fast(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute("PRAGMA synchronous=OFF")
            dbapi_conn.execute("PRAGMA journal_mode=MEMORY")

        md.create_all(engine)
        with engine.begin() as conn:
            for lo in range(0, n, chunk):
                batch = list(rows_of(lo, min(n, lo + chunk)))
                conn.execute(contacts.insert(), [r for r, _ in batch])
                tags = [{"contact_id": r["id"], "tag_name": t} for r, ts in batch for t in ts]
                if tags:
                    conn.execute(contact_tags.insert(), tags)
            conn.execute(sa.text(UPDATED_AT_INDEX))
        engine.dispose()
        return
    engine = dbs.engine(url)
    md.create_all(engine)
    cols = [c.name for c in contacts.columns]
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        with cur.copy(f"COPY contacts ({', '.join(cols)}) FROM STDIN") as copy:
            for row, _ in rows_of(0, n):
                copy.write_row([row[c] for c in cols])
        with cur.copy("COPY contact_tags (contact_id, tag_name) FROM STDIN") as copy:
            for row, row_tags in rows_of(0, n):
                for t in row_tags:
                    copy.write_row((row["id"], t))
        cur.execute(UPDATED_AT_INDEX)
        raw.commit()
    finally:
        raw.close()
    vacuum(dbs, url, "contacts", "contact_tags")


def vacuum(dbs: Databases, url: str, *tables: str) -> None:
    """VACUUM ANALYZE on PostgreSQL, so that autovacuum does not wake up inside a measured step."""
    if dbs.dialect != "postgresql":
        return
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for table in tables:
            conn.execute(sa.text(f"VACUUM ANALYZE {table}"))
    engine.dispose()


def new_state(dbs: Databases) -> str:
    """A new, migrated state DB with the mapping's custom fields registered."""
    from worker.state.db import migrate, state_engine
    from worker.state.store import StateStore

    url = dbs.new("state")
    migrate(url)
    engine = state_engine(url)
    StateStore(engine).register_fields(FIELDS)
    engine.dispose()
    return url


# -- simulating the workers --------------------------------------------------------------------


def settle(dbs: Databases, source_url: str, state_url: str, mapping_path: Path, keys: list[str] | None) -> int:
    """Record the contacts (all, or `keys`) as synced with their current hashes, in bulk.

    The bulk equivalent of each worker's `StateStore.record_outcome(key, run, "synced", hashes,
    version, fingerprint=...)`: one upsert per page. The hashes come from the same reader and contact code the
    planner used, so they are the planned ones. Then the runs with nothing queued are closed,
    as `sync --wait` would.
    """
    from worker.source.mapping import load_mapping
    from worker.source.reader import SourceReader
    from worker.state.db import state_engine
    from worker.state.store import StateStore

    reader = SourceReader(sa.create_engine(source_url), load_mapping(mapping_path).mapping)
    engine = state_engine(state_url)
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    stmt = insert(STATE)
    updated = [
        "profile_hash",
        "tags_hash",
        "fields_hash",
        "source_version",
        "source_fingerprint",
        "status",
        "synced_at",
        "updated_at",
    ]
    stmt = stmt.on_conflict_do_update(
        index_elements=["provided_unique_id"],
        set_={c: stmt.excluded[c] for c in updated}
        | {"attempts": STATE.c.attempts + 1, "last_error": None, "failed_hash": None},
    )
    done = 0
    for raw in reader.raw_pages(keys=keys):
        page = reader.build_page(raw, verdict=lambda _key, _fingerprint: None)  # every row, fingerprinted
        now = utcnow()
        rows = [
            {
                "provided_unique_id": c.key,
                "profile_hash": c.hashes["profile"],
                "tags_hash": c.hashes["tags"],
                "fields_hash": c.hashes["fields"],
                "source_version": c.version,
                "source_fingerprint": page.fingerprints[c.key],
                "status": "synced",
                "attempts": 1,
                "synced_at": now,
                "updated_at": now,
            }
            for c in page.contacts
        ]
        if rows:
            with engine.begin() as conn:
                conn.execute(stmt, rows)
        done += len(rows)
    StateStore(engine).close_done_runs()
    engine.dispose()
    reader.engine.dispose()
    vacuum(dbs, state_url, "customer_sync_state")
    return done


def change(engine: sa.Engine, indexes: list[int], at: dt.datetime, **values: Any) -> None:
    """Change contacts (values with {i} formatted) and move their updated_at to `at` + 10 s apart."""
    stmt = (
        contacts.update()
        .where(contacts.c.id == sa.bindparam("k"))
        .values({c: sa.bindparam("v_" + c) for c in values} | {"date_modified": sa.bindparam("at")})
    )
    rows = [
        {"k": key(i), "at": at + dt.timedelta(seconds=10 * j)} | {"v_" + c: v.format(i=i) for c, v in values.items()}
        for j, i in enumerate(indexes)
    ]
    with engine.begin() as conn:
        conn.execute(stmt, rows)


# -- one dialect -------------------------------------------------------------------------------


@dataclass
class Step:
    """The figures of one measured step over its repeats."""

    runs: list[dict[str, Any]] = field(default_factory=list)

    def seconds(self) -> list[float]:
        return [r["seconds"] for r in self.runs]

    def median(self) -> float:
        return statistics.median(self.seconds())

    def peak_rss(self) -> float:
        return max(r["peak_rss_mb"] for r in self.runs)

    def read(self) -> float:
        return statistics.median(r["counts"].get("read", 0) for r in self.runs)

    def cpu(self) -> float:
        return statistics.median(r["cpu_seconds"] for r in self.runs)

    def busy(self) -> float:
        return statistics.median(r["machine_busy"] for r in self.runs)


def report(dialect: str, step: str, rep: int, out: dict[str, Any], started: float) -> None:
    c = out["counts"]
    log(
        f"{dialect} {step} #{rep + 1}: {out['seconds']:.3f} s (CPU {out['cpu_seconds']:.1f} s), "
        f"peak RSS {out['peak_rss_mb']:.0f} MB (before planning {out['base_rss_mb']:.0f} MB), "
        f"read {c.get('read', 0)}, new {c.get('new', 0)}, changed {c.get('changed', 0)}, "
        f"unchanged {c.get('unchanged', 0)}, enqueued {out['enqueued']['messages']}, "
        f"{c.get('key_ranges', 1)} key range(s); machine CPU busy {100 * out['machine_busy']:.0f}% "
        f"[{time.monotonic() - started:.0f} s]"
    )


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"check failed: {what}")


def run_dialect(dialect: str, args: argparse.Namespace, folder: Path, started: float) -> dict[str, Step]:
    n, repeats, variants = args.contacts, args.repeats, args.plan_processes
    one_percent = n // 100
    rng = random.Random(20260101)
    reruns = repeats * len(variants)
    picks = rng.sample(range(n), reruns * one_percent + repeats * INCREMENTAL_CHANGES)
    changed_sets = [picks[r * one_percent : (r + 1) * one_percent] for r in range(reruns)]
    rest = picks[reruns * one_percent :]
    touched_sets = [rest[r * INCREMENTAL_CHANGES : (r + 1) * INCREMENTAL_CHANGES] for r in range(repeats)]
    after_all = BASE_TIME + dt.timedelta(seconds=n)  # the last initial updated_at is n - 1 s after BASE_TIME
    steps = {name: Step() for name in step_names(variants)}
    work = folder / dialect
    work.mkdir()
    mapping = write_mapping(work, MAPPING)
    dbs = Databases(dialect, work)
    try:
        source = dbs.new("src")
        t0 = time.perf_counter()
        populate(dbs, source, n)
        log(f"{dialect}: populated {n} contacts (+ tags) in {time.perf_counter() - t0:.1f} s (not measured)")
        src_engine = dbs.engine(source)
        with src_engine.connect() as conn:
            n_tags = conn.execute(sa.select(sa.func.count()).select_from(contact_tags)).scalar()
        log(f"{dialect}: {n_tags} tag rows")

        def spec(kind: str, state: str, step: str, rep: int, processes: int = variants[-1]) -> dict[str, Any]:
            s: dict[str, Any] = {"kind": kind, "source": source, "state": state, "mapping": str(mapping)}
            s["processes"] = processes
            s["cwd"] = str(work)
            s["enqueue"] = args.enqueue
            s["redis_url"] = args.redis_url
            if args.profile:
                s["profile"] = str(Path(args.profile).resolve() / f"{dialect}-{step}-{rep + 1}.prof")
            return s

        # 1. first full plan, each repeat against a new empty state DB; the variants side by side
        state = ""
        for rep in range(repeats):
            for processes in variants:
                if state:
                    dbs.drop(state)
                state = new_state(dbs)
                name = step_name("full_first", processes, variants)
                out = measure(spec("full", state, name, rep, processes))
                report(dialect, name, rep, out, started)
                expect(
                    out["enqueued"]["messages"] == n and out["counts"].get("new") == n, f"first plan enqueues all {n}"
                )
                steps[name].runs.append(out)

        t0 = time.perf_counter()
        settled = settle(dbs, source, state, mapping, None)
        expect(settled == n, f"settled {settled} of {n}")
        log(f"{dialect}: all {n} recorded synced in {time.perf_counter() - t0:.1f} s (setup)")

        # 2. rerun full plan with a new 1% of profiles changed each time; the variants side by side
        for i, indexes in enumerate(changed_sets):
            rep, processes = divmod(i, len(variants))[0], variants[i % len(variants)]
            name = step_name("full_rerun", processes, variants)
            change(src_engine, indexes, after_all + dt.timedelta(days=30 * (i + 1)), last_name="Changed{i}-" + str(i))
            out = measure(spec("full", state, name, rep, processes))
            report(dialect, name, rep, out, started)
            c = out["counts"]
            expect(
                out["enqueued"]["messages"] == one_percent
                and c.get("changed") == one_percent
                and c.get("part_profile") == one_percent
                and not c.get("part_tags")
                and not c.get("part_fields")
                and c.get("read") == n,
                f"rerun enqueues exactly the {one_percent} changed profiles",
            )
            steps[name].runs.append(out)
            t0 = time.perf_counter()
            settle(dbs, source, state, mapping, [key(i) for i in indexes])
            log(f"{dialect}: {len(indexes)} recorded synced in {time.perf_counter() - t0:.1f} s (setup)")

        # 3. incremental plans of 100 contacts touched after the watermark (never in key ranges)
        for rep, indexes in enumerate(touched_sets):
            at = after_all + dt.timedelta(days=30 * (reruns + rep + 1))
            change(src_engine, indexes, at, city="Touched{i}-" + str(rep))
            out = measure(spec("incremental", state, "incremental", rep))
            report(dialect, "incremental", rep, out, started)
            expect(
                out["enqueued"]["messages"] == INCREMENTAL_CHANGES,
                f"incremental enqueues exactly the {INCREMENTAL_CHANGES} touched",
            )
            steps["incremental"].runs.append(out)
            settle(dbs, source, state, mapping, [key(i) for i in indexes])
    finally:
        dbs.close()
    return steps


# -- the report --------------------------------------------------------------------------------


def fmt_seconds(step: Step) -> str:
    s = step.seconds()
    med = step.median()
    text = f"{med:.3f}" if med < 10 else f"{med:.1f}"
    if len(s) > 1:
        lo, hi = min(s), max(s)
        text += f" ({lo:.3f}–{hi:.3f})" if med < 10 else f" ({lo:.1f}–{hi:.1f})"
    return text


def table(results: dict[str, dict[str, Step]], n: int) -> str:
    lines = [
        "| dialect | step | seconds, median (min–max) | rows/s | peak RSS MB | CPU s | machine busy | target | met? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dialect, steps in results.items():
        for name, step in steps.items():
            label = step_label(name)
            if not step.runs:
                continue
            med = step.median()
            rss = step.peak_rss()
            if name.startswith("incremental"):
                rows = step.read()
                target = f"≤ {TARGET_INCREMENTAL_SECONDS:g} s"
                met: bool | None = med <= TARGET_INCREMENTAL_SECONDS
                rate = f"{rows / med:,.0f} ({rows:.0f} read)"
            else:
                target = f"≤ {TARGET_FULL_SECONDS:g} s, ≤ {TARGET_FULL_RSS_MB:g} MB"
                met = med <= TARGET_FULL_SECONDS and rss <= TARGET_FULL_RSS_MB
                rate = f"{n / med:,.0f}"
                if n != 1_000_000:
                    target += " (for 1,000,000)"
                    met = None
            lines.append(
                f"| {dialect} | {label} | {fmt_seconds(step)} | {rate} | {rss:.0f} | {step.cpu():.1f} | "
                f"{100 * step.busy():.0f}% | {target} | {'n/a' if met is None else 'yes' if met else '**no**'} |"
            )
    return "\n".join(lines)


def code_version() -> str:
    """The commit measured, and whether worker/ had uncommitted changes (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--", "worker"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(unknown commit)"
    return f"{head}{' + uncommitted changes in worker/' if dirty else ''}"


def reproduce(args: argparse.Namespace) -> str:
    parts = ["python", "bench/plan_scale.py", "--contacts", str(args.contacts), "--dialect", args.dialect]
    parts += ["--repeats", str(args.repeats), "--plan-processes", ",".join(map(str, args.plan_processes))]
    if args.enqueue != "count":
        parts += ["--enqueue", args.enqueue]
        if args.redis_url != DEFAULT_REDIS:
            parts += ["--redis-url", args.redis_url]
    if args.profile:
        parts += ["--profile", args.profile]
    return shlex.join(parts)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--contacts", type=int, default=1_000_000, help="contacts in the CRM (default 1,000,000)")
    ap.add_argument("--dialect", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=3, help="measured runs of each step (default 3)")
    ap.add_argument(
        "--enqueue",
        choices=["count", "redis"],
        default="count",
        help="count the task messages (default), or publish them to Redis with crmsync's publisher",
    )
    ap.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS,
        help=f"the Redis database --enqueue redis flushes and fills (default {DEFAULT_REDIS})",
    )
    ap.add_argument(
        "--plan-processes",
        type=lambda text: sorted({int(v) for v in text.split(",")}),
        default=[1, 2],
        help="CRMSYNC_PLAN_PROCESSES values to measure the full plans with, side by side (default 1,2)",
    )
    ap.add_argument("--profile", metavar="DIR", help="run each measured step under cProfile, dumps in DIR")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (SQLite files, mapping)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is None:
        needed = args.repeats * (args.contacts // 100 + INCREMENTAL_CHANGES)
        if args.repeats < 1 or args.contacts < 100 or needed > args.contacts:
            ap.error(f"--contacts must be at least 100 and cover {args.repeats} x (1% + {INCREMENTAL_CHANGES})")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return 0
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    dialects = ["sqlite", "postgresql"] if args.dialect == "both" else [args.dialect]
    folder = Path(tempfile.mkdtemp(prefix="crmsync-bench-plan-"))
    log(f"work in {folder}; {args.contacts} contacts, {args.repeats} repeats, dialects {', '.join(dialects)}")
    version = code_version()
    log(f"measuring crmsync {version}")
    started = time.monotonic()
    results: dict[str, dict[str, Step]] = {}
    global LAUNCH
    LAUNCH = Launcher()
    try:
        for dialect in dialects:
            results[dialect] = run_dialect(dialect, args, folder, started)
    finally:
        LAUNCH.close()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    load = os.getloadavg()
    if code_version() != version:
        log(f"warning: the code changed during the run (it started on {version}, ends on {code_version()})")
    print(reproduce(args))
    print()
    print(
        f"{dt.date.today().isoformat()}, crmsync {version}, {platform.machine()} {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, SQLAlchemy {sa.__version__}; {args.contacts:,} contacts, "
        f"{args.repeats} repeat(s), peak RSS is the largest of the repeats; load average at the end "
        f"{load[0]:.2f}"
    )
    print()
    window = (
        "publishing each message to Redis with crmsync's publisher"
        if args.enqueue == "redis"
        else "counting the task messages (no broker)"
    )
    print(
        "Timed: planner set-up, the planning lease, Planner.plan (read, hash, diff, state writes, task "
        f"messages), {window}. CPU s: the planning processes' CPU time (median); peak RSS: the planning "
        "process's peak plus the largest key-range process's; machine busy: all cores during the step "
        "(median; other work on the machine shows here)."
    )
    print()
    print(table(results, args.contacts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
