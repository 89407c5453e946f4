"""The chaos harness: a whole crmsync deployment on this machine, faults to inject, figures to check.

One `Cluster` is a fresh PostgreSQL CRM (the schema and mapping of tests/crm.py), a fresh
PostgreSQL state DB, a flushed Redis database (broker, shared limiter, shared breaker), a
`crmsync sandbox` process of its own and `crmsync worker` processes, each in a process group
of its own, every output in a log file. The scenario functions (`scenario_*`) start
`crmsync sync full --wait --json`, do their damage while it runs, and return `Figures`: what
the sandbox holds compared with the source, field by field, and what the state DB says.
The CRM has a case on every CASE_EVERY-th contact and the mapping a `tickets:` section, so
every scenario also checks that no case became two tickets.

The tests in this folder call them at a reduced size; `bench/chaos.py` at full size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import redis
import sqlalchemy as sa

from tests.conftest import SUBCOMPANY, TOKEN, Sandbox, make_database
from tests.crm import MAPPING, TICKETS_MAPPING, contact_tags, contacts, make_crm, touch, write_mapping
from tests.test_end_to_end import crmsync

ROOT = Path(__file__).resolve().parents[2]
# A database of its own: the rest of the suite flushes 13, the benchmarks 12.
REDIS_URL = os.environ.get("CRMSYNC_CHAOS_REDIS", "redis://127.0.0.1:6379/11")
RECONCILE_AFTER = 5.0
REQUEST_TIMEOUT = 3.0
MAX_ATTEMPTS = 6  # 12% of calls fail in the noisy scenario: 4 tries dead-lettered a contact about 1 run in 12
STOP_TIMEOUT = 5.0
READY_TIMEOUT = 60.0
FIELDS_SETUP_CALLS = 4  # list-custom-fields + one create per field of the mapping (3)
BAD_EMAIL = "not-an-email"
# Every CASE_EVERY-th contact (planted bad rows included) has a CRM case that becomes a ticket.
CASE_EVERY = 4
TICKETS_SETTLE = 20.0  # seconds for the ticket sends that follow a run's last customers

# The folder of every Cluster of this process (its logs and outputs), for the token check.
ALL_WORKDIRS: list[Path] = []


def token_leaks(folders: list[Path]) -> list[Path]:
    """Every file under `folders` that holds the bearer token."""
    secret = TOKEN.encode()
    return [p for d in folders for p in sorted(d.rglob("*")) if p.is_file() and secret in p.read_bytes()]


def timing_settings(max_attempts: int = MAX_ATTEMPTS, request_timeout: float = REQUEST_TIMEOUT) -> dict[str, str]:
    """The smallest task time limit and visibility timeout `Runtime.check_timing` accepts.

    Validated with the project's own check, so a change of the retry policy shows up here
    as a clear error rather than workers that refuse to start.
    """
    from worker.proto import RetryPolicy
    from worker.runtime import Runtime
    from worker.settings import Settings

    policy = RetryPolicy(max_attempts=max_attempts)
    worst = 3 * (policy.longest_delay() + policy.max_held + max_attempts * request_timeout)
    limit = math.ceil(worst) + 1
    settings = Settings(
        _env_file=None,
        broker_url="redis://x",
        max_attempts=max_attempts,
        request_timeout=request_timeout,
        task_time_limit=limit,
        visibility_timeout=limit + 60,
    )
    Runtime(settings).check_timing()
    names = ("max_attempts", "request_timeout", "task_time_limit", "visibility_timeout")
    return {f"CRMSYNC_{n.upper()}": str(getattr(settings, n)) for n in names}


# -- figures -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Figures:
    """What one chaos run did and what it left behind."""

    scenario: str
    contacts: int
    faults: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float | None = None  # from `sync --wait` start to its exit (or to the timeout)
    exit_code: int | None = None
    lost: int = 0  # valid contacts not in Proto, or not synced in the state DB
    wrong: int = 0  # in Proto, but a profile field, a tag or a custom field differs
    duplicated: int = 0  # a unique id (or a custom-field name) held twice by Proto
    unexpected: int = 0  # customers in Proto the source does not have (planted bad rows included)
    dead: int = 0  # open dead letters
    unexpected_dead: int = 0  # dead letters of contacts that were not planted bad
    stuck: int = 0  # state rows still queued (or failed) at the end
    calls: int = 0  # API requests the sandbox saw
    ok_calls: int = 0  # of which 2xx
    extra_calls: int = 0  # 2xx calls beyond the minimum the data needs (resent work)
    reconciled: int = 0  # contacts the reconciler re-sent (from the `sync` command's log)
    tickets: int = 0  # cases whose customer is valid: each should become one ticket
    tickets_created: int = 0  # tickets Proto holds
    tickets_duplicated: int = 0  # tickets Proto holds twice (or more) for one case
    tickets_unknown: int = 0  # outcome unknown (a 5xx, a dropped answer, a killed worker): left to an operator
    token_leaks: int = 0  # files holding the bearer token
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every guarantee held."""
        return not self.problems

    def line(self) -> str:
        """One human line."""
        faults = ", ".join(f"{k}={v}" for k, v in self.faults.items())
        secs = f"{self.seconds:.1f}" if self.seconds is not None else "?"
        return (
            f"[chaos] {self.scenario}: {self.contacts} contacts; faults: {faults or 'none'}; converged in {secs} s; "
            f"lost {self.lost}, wrong {self.wrong}, duplicated {self.duplicated}, unexpected {self.unexpected}, "
            f"dead {self.dead} (unexpected {self.unexpected_dead}), stuck {self.stuck}; calls {self.calls} "
            f"(2xx {self.ok_calls}, extra {self.extra_calls}); reconciled {self.reconciled}; "
            f"tickets {self.tickets_created}/{self.tickets} (duplicated {self.tickets_duplicated}, "
            f"unknown {self.tickets_unknown}); token leaks {self.token_leaks}"
            + (f"; PROBLEMS: {'; '.join(self.problems)}" if self.problems else "")
        )


# -- processes -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Proc:
    """A process started by the cluster, in a process group of its own."""

    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path
    started: float

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A crmsync deployment on this machine; see the module docstring. Build it with `cluster()`."""

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        source_url: str,
        state_url: str,
        redis_url: str,
        bad_ids: list[str],
        contacts: int,
        concurrency: int,
    ) -> None:
        self.workdir = workdir
        self.logdir = workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.source = sa.create_engine(source_url)
        self.state = sa.create_engine(state_url)
        self.redis_url = redis_url
        self.bad_ids = bad_ids
        self.case_keys: list[str] = []
        self.contacts = contacts
        self.concurrency = concurrency
        self.procs: list[Proc] = []
        self.workers: list[Proc] = []
        ALL_WORKDIRS.append(workdir)
        self._n = 0
        self.sandbox: Sandbox | None = None

    # processes ---------------------------------------------------------------------------

    def _log(self, name: str, suffix: str = ".log") -> Path:
        """A new log file path in this cluster's folder, numbered in the order things happened."""
        self._n += 1
        return self.logdir / f"{self._n:03d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:60]}{suffix}"

    def spawn(self, name: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Proc:
        """Start `crmsync ARGS` in a process group of its own, stdout and stderr to log files."""
        out = self._log(name, ".out")
        err = out.with_suffix(".err")
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", *args],
                env=env or self.env,
                cwd=cwd or self.workdir,
                stdout=fo,
                stderr=fe,
                start_new_session=True,
            )
        proc = Proc(name, popen, out, err, time.monotonic())
        self.procs.append(proc)
        return proc

    def command(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a one-shot `crmsync` command (tests.test_end_to_end.crmsync), its output logged."""
        done = crmsync(self.env, *args, timeout=timeout)
        self._log("cmd-" + "-".join(args)).write_text(
            f"$ crmsync {' '.join(args)}\n[exit {done.returncode}]\n{done.stdout}\n{done.stderr}"
        )
        return done

    def start_worker(self, loglevel: str = "INFO") -> Proc:
        proc = self.spawn(
            f"worker-{len(self.procs)}", "worker", "--concurrency", str(self.concurrency), "--loglevel", loglevel
        )
        self.workers.append(proc)
        return proc

    def wait_ready(self, procs: list[Proc], timeout: float = READY_TIMEOUT) -> None:
        """Block until each worker's log says it is ready."""
        deadline = time.monotonic() + timeout
        for p in procs:
            while "ready" not in p.text():
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited {p.popen.returncode}: {p.text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{p.name} not ready after {timeout:.0f} s: {p.text()[-2000:]}")
                time.sleep(0.1)

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group of `proc` and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(STOP_TIMEOUT)
        if proc in self.workers and not proc.alive():
            self.workers.remove(proc)

    def stop(self, proc: Proc) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(STOP_TIMEOUT)
        # Whatever it left behind in its group (a Celery pool, a child) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(STOP_TIMEOUT)

    def start_sync(self, kind: str = "full", *extra: str) -> Proc:
        return self.spawn(f"sync-{kind}", "sync", kind, *extra, "--wait", "--json")

    def wait_sync(self, proc: Proc, timeout: float) -> tuple[int | None, dict[str, Any] | None]:
        """(exit code, its JSON) once it exits; (None, None) if it is still running at `timeout`."""
        try:
            code = proc.popen.wait(max(0.1, timeout))
        except subprocess.TimeoutExpired:
            return None, None
        try:
            return code, dict(json.loads(proc.out.read_text()))
        except ValueError:
            return code, None

    # state -------------------------------------------------------------------------------

    def statuses(self) -> dict[str, int]:
        """State rows by status."""
        with self.state.connect() as conn:
            rows = conn.execute(sa.text("SELECT status, count(*) FROM customer_sync_state GROUP BY status"))
            return {s: int(n) for s, n in rows}

    def done(self) -> int:
        """Contacts synced or dead so far."""
        s = self.statuses()
        return s.get("synced", 0) + s.get("dead", 0)

    def wait_done(self, share: float, proc: Proc, timeout: float = 60) -> int:
        """Block until `share` of the contacts are done (or the sync exits); returns how many are."""
        deadline = time.monotonic() + timeout
        target = share * (self.contacts + len(self.bad_ids))
        while time.monotonic() < deadline and proc.alive():
            n = self.done()
            if n >= target:
                return n
            time.sleep(0.05)
        return self.done()

    def runs(self) -> list[dict[str, Any]]:
        with self.state.connect() as conn:
            return [dict(r) for r in conn.execute(sa.text("SELECT * FROM sync_runs ORDER BY started_at")).mappings()]

    def flushdb(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        client.flushdb()
        client.close()

    # what Proto should hold ----------------------------------------------------------------

    def expected(self) -> dict[str, dict[str, Any]]:
        """Each valid contact of the source as the sandbox should show it, read straight from the CRM."""
        tags: dict[str, set[str]] = defaultdict(set)
        out: dict[str, dict[str, Any]] = {}
        with self.source.connect() as conn:
            for cid, tag in conn.execute(sa.select(contact_tags.c.contact_id, contact_tags.c.tag_name)):
                tags[cid].add(tag)
            for r in conn.execute(sa.select(contacts)).mappings():
                if r["id"] in self.bad_ids or r["deleted"]:
                    continue
                out[r["id"]] = {
                    "name": f"{r['first_name']} {r['last_name']}",
                    "email": r["email1"],
                    "phone_number": r["phone_work"],
                    "location": r["city"],
                    "external_customer_id": r["id"],
                    "tags": tags[r["id"]],
                    "custom_fields": {
                        "lifetime_value": float(r["ltv"]),
                        "plan": r["plan"],
                        "vip": bool(r["is_vip"]),
                    },
                }
        return out

    def minimal_calls(self, expected: dict[str, dict[str, Any]]) -> int:
        """API calls a clean first sync needs: the field setup, then one per non-empty part."""
        return FIELDS_SETUP_CALLS + sum(2 + (1 if c["tags"] else 0) for c in expected.values())

    def leaks(self) -> list[Path]:
        """Files of this cluster's folder (logs, command outputs, beat's schedule) holding the token."""
        return token_leaks([self.workdir])

    def state_leaks(self) -> list[str]:
        """State DB columns that hold the bearer token (errors and bodies stored for operators)."""
        columns = {
            "dead_letters": ("payload", "message", "response_body"),
            "customer_sync_state": ("last_error",),
            "tickets": ("error",),
            "sync_runs": ("error",),
        }
        found = []
        with self.state.connect() as conn:
            for table, cols in columns.items():
                for col in cols:
                    query = f"SELECT count(*) FROM {table} WHERE CAST({col} AS TEXT) LIKE :pattern"
                    if conn.execute(sa.text(query), {"pattern": f"%{TOKEN}%"}).scalar_one():
                        found.append(f"{table}.{col}")
        return found

    def tickets(self) -> dict[str, str]:
        """Ticket statuses in the state DB, by case key."""
        with self.state.connect() as conn:
            return {k: s for k, s in conn.execute(sa.text("SELECT key, status FROM tickets"))}

    def _tickets_in_flight(self) -> int:
        """Tickets being sent, or pending while their customer is in Proto (their send follows)."""
        with self.state.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM tickets t JOIN customer_sync_state s "
                        "ON s.provided_unique_id = t.customer WHERE t.status = 'sending' "
                        "OR (t.status = 'pending' AND s.profile_hash IS NOT NULL)"
                    )
                ).scalar_one()
            )

    def verify_tickets(self, fig: Figures) -> None:
        """No case opened twice; what Proto holds and what the state DB says agree.

        A run's last tickets are sent after its last customers are recorded synced, so this
        first gives them a few seconds. A ticket whose outcome was unknown is not lost: it is
        in front of an operator (`crmsync tickets`), as designed; it must simply never be sent
        again by crmsync, which the state's status guarantees.
        """
        assert self.sandbox is not None
        deadline = time.monotonic() + TICKETS_SETTLE
        while self._tickets_in_flight() and time.monotonic() < deadline:
            time.sleep(0.2)
        in_proto = self.sandbox.http.get(f"/_sandbox/tickets/{SUBCOMPANY}").json()
        subjects = [t["subject"] for t in in_proto]
        held = set(subjects)
        state = self.tickets()
        cases = {case_subject(k): k for k in state}
        valid = {case_subject(k) for k in self.case_keys if case_customer(k) not in self.bad_ids}
        fig.tickets = len(valid)
        fig.tickets_created = len(held)
        fig.tickets_duplicated = len(subjects) - len(held)
        fig.tickets_unknown = sum(1 for s in state.values() if s in ("unknown", "sending"))
        problems = fig.problems
        if fig.tickets_duplicated:
            twice = sorted({s for s in subjects if subjects.count(s) > 1})
            problems.append(f"{fig.tickets_duplicated} tickets created twice, e.g. {twice[:5]}")
        if held - valid:
            problems.append(f"tickets of cases that should not have one: {sorted(held - valid)[:5]}")
        # Proto holds it, yet crmsync would send it again: a duplicate waiting to happen.
        resendable = sorted(s for s in held if state.get(cases.get(s, ""), "pending") == "pending")
        if resendable:
            problems.append(f"tickets in Proto but still pending in the state DB: {resendable[:5]}")
        vanished = sorted(s for s, k in cases.items() if state[k] == "created" and s not in held)
        if vanished:
            problems.append(f"tickets recorded created but not in Proto: {vanished[:5]}")
        settled = {s for s, k in cases.items() if state[k] in ("created", "unknown", "sending")}
        lost = sorted(valid - held - settled)
        if lost:
            problems.append(
                f"{len(lost)} cases neither in Proto nor left to an operator, e.g. "
                f"{[(s, state.get(cases.get(s, ''))) for s in lost[:5]]}"
            )

    def verify(self, fig: Figures, sync: Proc | None = None, result: dict[str, Any] | None = None) -> Figures:
        """Fill `fig` with the comparison of the sandbox with the source and the state DB's verdicts."""
        assert self.sandbox is not None
        problems = fig.problems
        expected = self.expected()
        rows = self.sandbox.http.get(f"/_sandbox/customers/{SUBCOMPANY}").json()
        ids = [c["provided_unique_id"] for c in rows]
        got = {c["provided_unique_id"]: c for c in rows}
        fields = self.sandbox.http.get(f"/_sandbox/custom-fields/{SUBCOMPANY}").json()
        names = [f["name"] for f in fields]
        fig.duplicated = (len(ids) - len(got)) + (len(names) - len(set(names)))
        if fig.duplicated:
            problems.append(f"duplicated: ids {len(ids) - len(got)}, custom fields {sorted(names)}")
        missing = sorted(set(expected) - set(got))
        wrong = []
        for key, want in expected.items():
            have = got.get(key)
            if have is not None:
                diff = _diff(want, have)
                if diff:
                    wrong.append(f"{key}: {diff}")
        unexpected = sorted(set(got) - set(expected))
        with self.state.connect() as conn:
            rows = conn.execute(sa.text("SELECT provided_unique_id, status FROM customer_sync_state"))
            state = {k: s for k, s in rows}
            letters = list(
                conn.execute(
                    sa.text("SELECT provided_unique_id, error_class, message FROM dead_letters WHERE state = 'dead'")
                )
            )
        not_synced = sorted(k for k in expected if state.get(k) != "synced")
        fig.lost = len(set(missing) | set(not_synced))
        fig.wrong = len(wrong)
        fig.unexpected = len(unexpected)
        fig.stuck = sum(1 for s in state.values() if s not in ("synced", "dead"))
        fig.dead = len(letters)
        dead_ids = {k for k, _, _ in letters}
        fig.unexpected_dead = len(dead_ids - set(self.bad_ids))
        if missing:
            problems.append(
                f"{len(missing)} contacts not in Proto, e.g. {missing[:5]} (state: "
                f"{[state.get(k) for k in missing[:5]]})"
            )
        if not_synced:
            problems.append(
                f"{len(not_synced)} contacts not synced in the state DB, e.g. "
                f"{[(k, state.get(k)) for k in not_synced[:5]]}"
            )
        if wrong:
            problems.append(f"{len(wrong)} customers differ from the source, e.g. {wrong[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} customers in Proto the source lacks, e.g. {unexpected[:5]}")
        if fig.unexpected_dead:
            extra = [(k, c, m[:160]) for k, c, m in letters if k not in self.bad_ids]
            problems.append(f"{fig.unexpected_dead} unexpected dead letters, e.g. {extra[:3]}")
        missed = sorted(set(self.bad_ids) - dead_ids)
        if missed:
            problems.append(f"planted bad rows not dead-lettered: {missed}")
        if fig.stuck:
            problems.append(f"{fig.stuck} state rows still {sorted({s for s in state.values()} - {'synced', 'dead'})}")
        self.verify_tickets(fig)  # first: it waits for the last tickets, whose calls count below
        stats = self.sandbox.stats()
        fig.calls = int(stats["total"])
        fig.ok_calls = sum(n for s, n in stats["by_status"].items() if s.startswith("2"))
        fig.extra_calls = fig.ok_calls - self.minimal_calls(expected) - fig.tickets_created
        if sync is not None:
            text = sync.err.read_text(errors="replace") if sync.err.exists() else ""
            fig.reconciled = sum(int(n) for n in re.findall(r": (\d+) contacts made no progress", text))
            if fig.exit_code is None:
                problems.append(
                    f"`crmsync sync --wait` still running after {fig.seconds:.0f} s (hang); state {self.statuses()}"
                )
            elif fig.exit_code != 0:
                problems.append(f"`crmsync sync --wait` exited {fig.exit_code}: {text.strip()[-400:]}")
            elif result is None:
                problems.append("`crmsync sync --wait --json` printed no JSON")
        leaks = [str(p.relative_to(self.workdir)) for p in self.leaks()] + self.state_leaks()
        fig.token_leaks = len(leaks)
        if leaks:
            problems.append(f"the bearer token appears in {leaks}")
        return fig


def _diff(want: dict[str, Any], have: dict[str, Any]) -> str:
    out = []
    for f in ("name", "email", "phone_number", "location", "external_customer_id"):
        if (have.get(f) or None) != (want[f] or None):
            out.append(f"{f} {have.get(f)!r} != {want[f]!r}")
    if set(have.get("tags") or []) != want["tags"]:
        out.append(f"tags {sorted(have.get('tags') or [])} != {sorted(want['tags'])}")
    cf = have.get("custom_fields") or {}
    for name, value in want["custom_fields"].items():
        got = cf.get(name)
        if isinstance(value, bool):
            same = got is value
        elif isinstance(value, float):
            same = isinstance(got, int | float) and not isinstance(got, bool) and abs(got - value) < 0.005
        else:
            same = got == value
        if not same:
            out.append(f"{name} {got!r} != {value!r}")
    return ", ".join(out)


@contextlib.contextmanager
def cluster(
    workdir: Path,
    *,
    contacts: int,
    bad_rows: int = 0,
    workers: int = 2,
    concurrency: int = 4,
    rate_limit: float = 500.0,
    settings: dict[str, str] | None = None,
    sandbox_args: tuple[str, ...] = ("--rate-limit", "0"),
    redis_url: str = REDIS_URL,
) -> Iterator[Cluster]:
    """A fresh deployment with `contacts` valid contacts (+ `bad_rows` Proto would refuse), migrated,
    its sandbox up and `workers` workers ready. Everything is stopped and dropped on the way out.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        source_url = stack.enter_context(contextlib.contextmanager(make_database)("postgresql", workdir))
        state_url = stack.enter_context(contextlib.contextmanager(make_database)("postgresql", workdir))
        engine = make_crm(source_url, contacts + bad_rows)
        case_keys = add_cases(engine, contacts + bad_rows)
        bad_ids = [f"C{i:05d}" for i in range(contacts, contacts + bad_rows)]
        if bad_ids:
            with engine.begin() as conn:
                conn.execute(contacts_table_update(bad_ids))
        engine.dispose()
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_")}
        env.update(
            PYTHONPATH=str(ROOT),
            CRMSYNC_SOURCE_URL=source_url,
            CRMSYNC_STATE_URL=state_url,
            CRMSYNC_BROKER_URL=redis_url,
            CRMSYNC_MAPPING=str(write_mapping(workdir, MAPPING + TICKETS_MAPPING)),
            CRMSYNC_PROTO_BASE_URL=f"http://127.0.0.1:{port}/api/platform",
            CRMSYNC_PROTO_SUBCOMPANY_ID=SUBCOMPANY,
            CRMSYNC_PROTO_TOKEN=TOKEN,
            CRMSYNC_RATE_LIMIT=str(rate_limit),
            CRMSYNC_RECONCILE_AFTER=str(RECONCILE_AFTER),
            CRMSYNC_WORKER_CONCURRENCY=str(concurrency),
            **timing_settings(),
        )
        env.update(settings or {})
        c = Cluster(workdir, env, source_url, state_url, redis_url, bad_ids, contacts, concurrency)
        c.case_keys = case_keys
        c.flushdb()
        stack.callback(c.flushdb)
        stack.callback(c.source.dispose)
        stack.callback(c.state.dispose)

        def stop_all() -> None:
            for p in reversed(c.procs):
                c.stop(p)

        stack.callback(stop_all)
        box = c.spawn("sandbox", "sandbox", "--port", str(port), *sandbox_args)
        c.sandbox = Sandbox(f"http://127.0.0.1:{port}/api/platform")
        stack.callback(c.sandbox.http.close)
        _wait_sandbox(c.sandbox, box)
        init = c.command("init")
        if init.returncode != 0:
            raise RuntimeError(f"crmsync init failed: {init.stderr}")
        started = [c.start_worker() for _ in range(workers)]
        c.wait_ready(started)
        yield c


def add_cases(engine: sa.Engine, n: int) -> list[str]:
    """A CRM case for every CASE_EVERY-th of the `n` contacts; returns the case keys."""
    cases = sa.Table(
        "cases",
        sa.MetaData(),
        sa.Column("case_id", sa.String(20), primary_key=True),
        sa.Column("title", sa.String(80)),
        sa.Column("contact_id", sa.String(40)),
    )
    keys = [f"K{i:05d}" for i in range(0, n, CASE_EVERY)]
    cases.create(engine)
    with engine.begin() as conn:
        conn.execute(
            cases.insert(), [{"case_id": k, "title": case_subject(k), "contact_id": case_customer(k)} for k in keys]
        )
    return keys


def case_subject(key: str) -> str:
    """The ticket subject of case `key`: unique, so a ticket opened twice shows."""
    return f"Call back about case {key}"


def case_customer(key: str) -> str:
    """The contact of case `key` (K00012 belongs to C00012)."""
    return "C" + key[1:]


def contacts_table_update(ids: list[str]) -> Any:
    """The planted bad rows: an e-mail Proto refuses, recorded as a dead letter before any call."""
    return contacts.update().where(contacts.c.id.in_(ids)).values(email1=BAD_EMAIL)


def _wait_sandbox(box: Sandbox, proc: Proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"the sandbox exited: {proc.text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if box.http.get("/_sandbox/stats").status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("the sandbox did not answer")


# -- scenarios -----------------------------------------------------------------------------------

Chaos = Callable[[Cluster, Proc], dict[str, Any]]


def run_sync_with(c: Cluster, name: str, chaos: Chaos, timeout: float) -> Figures:
    """Start `sync full --wait --json`, do `chaos` while it runs, wait for it, verify everything."""
    fig = Figures(name, c.contacts)
    t0 = time.monotonic()
    sync = c.start_sync("full")
    try:
        fig.faults = chaos(c, sync)
    finally:
        code, result = c.wait_sync(sync, timeout - (time.monotonic() - t0))
        fig.seconds = round(time.monotonic() - t0, 1)
        fig.exit_code = code
        if code is None:
            fig.faults["state_at_timeout"] = c.statuses()
            c.stop(sync)
    return c.verify(fig, sync, result)


def scenario_kill(c: Cluster, kills: int = 5, timeout: float = 90) -> Figures:
    """SIGKILL a worker's whole process group `kills` times mid-run, restarting it each time.

    The kills are spread over the run's progress (at 1/6, 2/6... of the contacts done for five),
    not over time: a fast machine finishes a small run before a clock-spaced fifth kill.
    """

    def chaos(c: Cluster, sync: Proc) -> dict[str, Any]:
        done = 0
        for i in range(kills):
            now = c.wait_done((i + 1) / (kills + 1), sync)
            if not sync.alive() or now >= c.contacts + len(c.bad_ids):
                break
            c.kill(c.workers[0])  # the longest running: a worker busy with tasks, not one still booting
            done += 1
            c.start_worker()  # not waited for: the others keep working meanwhile
        return {"sigkills": done}

    fig = run_sync_with(c, "kill", chaos, timeout)
    if fig.faults.get("sigkills", 0) < kills:
        fig.problems.append(f"only {fig.faults.get('sigkills')} of {kills} kills happened before the run ended")
    return fig


def scenario_flushdb(c: Cluster, at: float = 0.4, timeout: float = 60) -> Figures:
    """FLUSHDB the broker's Redis database once `at` of the contacts are done."""

    def chaos(c: Cluster, sync: Proc) -> dict[str, Any]:
        done = c.wait_done(at, sync)
        if not sync.alive():
            return {"flushdb": 0}
        c.flushdb()
        return {"flushdb": 1, "done_at_flush": done}

    fig = run_sync_with(c, "flushdb", chaos, timeout)
    if not fig.faults.get("flushdb"):
        fig.problems.append("the run ended before the flush")
    return fig


def scenario_outage(c: Cluster, at: float = 0.3, outage: float = 5.0, timeout: float = 90) -> Figures:
    """Every API request answers 503 for `outage` seconds once `at` of the contacts are done."""
    assert c.sandbox is not None
    box = c.sandbox

    def chaos(c: Cluster, sync: Proc) -> dict[str, Any]:
        done = c.wait_done(at, sync)
        if not sync.alive():
            return {"outage_s": 0}
        box.faults(outage=True)
        t = time.monotonic()
        try:
            time.sleep(outage)
        finally:
            box.faults(outage=False)
        return {"outage_s": round(time.monotonic() - t, 1), "done_at_outage": done}

    fig = run_sync_with(c, "outage", chaos, timeout)
    fig.faults["503"] = box.stats()["by_status"].get("503", 0)
    if not fig.faults.get("outage_s"):
        fig.problems.append("the run ended before the outage")
    return fig


def scenario_noisy(
    c: Cluster,
    fail_rate: float = 0.10,
    throttle_rate: float = 0.05,
    drop_rate: float = 0.02,
    timeout: float = 120,
) -> Figures:
    """Over the whole run, `fail_rate` of the requests answered 5xx, `throttle_rate` 429 (with
    Retry-After) and `drop_rate` cut after the response headers."""
    assert c.sandbox is not None
    box = c.sandbox
    box.faults(fail_rate=fail_rate, throttle_rate=throttle_rate, drop_rate=drop_rate)

    def chaos(c: Cluster, sync: Proc) -> dict[str, Any]:
        return {}

    fig = run_sync_with(c, "noisy-api", chaos, timeout)
    box.faults(fail_rate=0, throttle_rate=0, drop_rate=0)
    stats = box.stats()
    total = max(1, int(stats["total"]))
    by = stats["by_status"]
    five = sum(n for s, n in by.items() if s.startswith("5"))
    fig.faults = {
        "5xx": f"{five} ({100 * five / total:.1f}%)",
        "429": f"{by.get('429', 0)} ({100 * by.get('429', 0) / total:.1f}%)",
        "dropped": f"{stats['dropped']} ({100 * stats['dropped'] / total:.1f}%)",
        "planted_bad": len(c.bad_ids),
    }
    return fig


def scenario_two_beats(c: Cluster, every: float = 2.0, window: float = 10.0, touched: int = 5) -> Figures:
    """A clean full sync, then two `crmsync beat` processes at once for `window` seconds, with
    `touched` contacts changed in the CRM meanwhile. Counts the incremental runs they cause."""
    fig = Figures("two-beats", c.contacts)
    t0 = time.monotonic()
    first = c.start_sync("full")
    code, _ = c.wait_sync(first, 60)
    if code != 0:
        fig.problems.append(f"the first full sync exited {code}: {first.text()[-400:]}")
        return c.verify(fig)
    before = len(c.runs())
    calls_before = c.sandbox.calls() if c.sandbox else 0
    beats = []
    env = {**c.env, "CRMSYNC_INCREMENTAL_EVERY": str(every)}
    for i in range(2):
        home = c.workdir / f"beat-{i}"  # two hosts: a schedule file each
        home.mkdir(exist_ok=True)
        beats.append(c.spawn(f"beat-{i}", "beat", cwd=home, env=env))
    # One schedules ("Starting..."), the other waits for the lease ("standing by").
    deadline = time.monotonic() + READY_TIMEOUT
    while not all("Starting..." in b.text() or "standing by" in b.text() for b in beats):
        if time.monotonic() > deadline or not all(b.alive() for b in beats):
            fig.problems.append(f"the beats did not start: {[b.text()[-400:] for b in beats]}")
            break
        time.sleep(0.1)
    active = sum("Starting..." in b.text() for b in beats)
    start = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    time.sleep(window / 2)
    engine = sa.create_engine(c.env["CRMSYNC_SOURCE_URL"])
    keys = [f"C{i:05d}" for i in range(touched)]
    touch(engine, keys, dt.datetime(2026, 6, 1), last_name="Renamed")
    engine.dispose()
    time.sleep(window / 2)
    for b in beats:
        c.stop(b)
    end = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    # Let the last tasks finish: every run closed, nothing queued.
    deadline = time.monotonic() + 30
    while c.statuses().get("queued") and time.monotonic() < deadline:
        time.sleep(0.2)
    c.command("status")
    runs = [r for r in c.runs()[before:] if r["kind"] == "incremental"]
    in_window = [r for r in runs if start <= r["started_at"] <= end]
    one_beat = window / every
    fig.seconds = round(time.monotonic() - t0, 1)
    fig.exit_code = code
    fig.faults = {
        "beats": 2,
        "scheduling": active,
        "every_s": every,
        "window_s": window,
        "incremental_runs": len(in_window),
        "one_beat_would": round(one_beat),
        "touched": touched,
        "touched_calls": (c.sandbox.calls() - calls_before) if c.sandbox else 0,
    }
    c.verify(fig)
    fig.extra_calls -= touched  # the changes made meanwhile: needed calls, not resent work
    if active != 1:
        fig.problems.append(f"{active} beats started scheduling (want exactly 1)")
    if not in_window:
        fig.problems.append("no incremental run in the window: beat scheduled nothing")
    if len(in_window) > one_beat + 2:
        fig.problems.append(
            f"two beats scheduled {len(in_window)} incremental runs in {window:.0f} s where one scheduler "
            f"would make {one_beat:.0f}: no single-scheduler guard"
        )
    if fig.faults["touched_calls"] > touched:
        fig.problems.append(
            f"{touched} profile changes cost {fig.faults['touched_calls']} calls (want {touched}): "
            "the same change was sent more than once"
        )
    return fig
