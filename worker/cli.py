"""The `crmsync` command."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigError, CrmsyncError
from .progress import RunProgress, Ticker

log = logging.getLogger("crmsync")


# What must not reach a terminal raw: C0 and C1 controls (ESC starts a sequence that can rewrite
# the screen, \r overwrites a line, \n forges one), DEL, line and paragraph separators, the bidi
# controls that reorder what follows (U+202E shows "exe.txt" as "txt.exe"), and lone surrogates
# (from bytes that were not UTF-8, which print() cannot encode).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(value: object) -> str:
    """`value` as text fit for a terminal: secrets redacted, control characters shown as escapes.

    The one function every line the command prints goes through (tables, messages, errors); a
    cell that is padded goes through it first, so that its escapes are counted in the padding.
    It is idempotent. --json output does not use it: JSON escapes the same characters itself.
    """
    from .logs import redact

    return _UNPRINTABLE.sub(_escape, redact(str(value)))


def _say(line: object, **kwargs: Any) -> None:
    """Print one line, made printable: a newline inside it is shown as ``\\n``, never a new line."""
    print(printable(line), **kwargs)


def _say_lines(text: str) -> None:
    """Print a block of lines (indented JSON, say), each made printable."""
    for line in text.splitlines():
        _say(line)


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=_json_default, sort_keys=True))


# -- commands ----------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    """Migrate the state DB to the latest schema."""
    from .settings import load_settings
    from .state.db import migrate

    settings = load_settings()
    rev = migrate(settings.state_url)
    _say(f"state database ready at revision {rev}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate settings, mapping, source, state DB and the Proto connection."""
    from .checks import run_checks
    from .settings import load_settings

    load_settings()  # settings that do not load are a ConfigError (exit 2), as in every command
    ok = True
    for line_ok, text in run_checks():
        ok &= line_ok
        _say(("ok    " if line_ok else "FAIL  ") + text)
    return 0 if ok else 1


def cmd_sync(args: argparse.Namespace) -> int:
    """Plan a full or incremental run; with --wait, see it through.

    A full sync asked for while a full run is open starts nothing: it names that run, and with
    --wait follows it to its end instead.
    """
    from .jobs import RunInProgress, embedded_worker, plan_run, wait_for_run
    from .runtime import runtime

    rt = runtime()
    started()  # after the imports: planning a large CRM makes garbage
    tick = Ticker(args.json)
    try:
        result = plan_run(
            args.kind,
            force=args.force,
            dry_run=args.dry_run,
            progress=lambda c: tick(f"planning: read {c['read']}, to send {c['enqueued']}, unchanged {c['unchanged']}"),
        )
    except RunInProgress as exc:
        if exc.run is None or args.kind != "full":
            raise
        return _follow(exc.run, rt, args, embedded_worker, wait_for_run)
    if args.dry_run or not args.wait or not result["counts"]["enqueued"]:
        run = rt.store.run(result["run_id"]) if result["run_id"] else None
        return _report(result, rt, args, run)
    return _see_through(result, rt, args, embedded_worker, wait_for_run)


def _follow(
    run: dict[str, Any],
    rt: Any,
    args: argparse.Namespace,
    embedded_worker: Callable[..., Any],
    wait_for_run: Callable[..., dict[str, Any]],
) -> int:
    """Say which run is open and how far it is; with --wait, see that run through."""
    from .state.store import RUN_COUNTS

    if run["status"] == "planning":
        how_far = f"being planned since {run['started_at']:%Y-%m-%d %H:%M:%S} UTC"
    else:
        progress = rt.store.run_progress(run["id"])
        done = sum(n for status, n in progress.items() if status != "queued")
        how_far = f"{run['status']}: {done} of {run['enqueued']} contacts done, {progress.get('queued', 0)} queued"
    result = {
        "kind": run["kind"],
        "run_id": run["id"],
        "counts": {k: run.get(k, 0) for k in RUN_COUNTS},
        "preview": [],
        "already_open": True,
    }
    if not args.json:
        following = "following it" if args.wait else "not starting another"
        print(f"{run['kind']} run {run['id']} is already open ({how_far}): {following}", flush=True)
    if not args.wait:
        if args.json:
            _print_json({**result, "run": run})
        return 0
    return _see_through(result, rt, args, embedded_worker, wait_for_run)


def _see_through(
    result: dict[str, Any],
    rt: Any,
    args: argparse.Namespace,
    embedded_worker: Callable[..., Any],
    wait_for_run: Callable[..., dict[str, Any]],
) -> int:
    total = result["counts"]["enqueued"]
    with RunProgress(total, f"{result['kind']} sync", quiet=args.json) as bar:

        def on_progress(p: dict[str, int]) -> None:
            bar.update(max(total - p["waiting"], 0), p.get("synced", 0), p.get("dead", 0))

        if rt.settings.embedded_broker:
            with embedded_worker(rt) as alive:
                run = wait_for_run(rt, result["run_id"], on_progress, alive)
        else:
            run = wait_for_run(rt, result["run_id"], on_progress)
    return _report(result, rt, args, run)


def _report(result: dict[str, Any], rt: Any, args: argparse.Namespace, run: dict[str, Any] | None) -> int:
    """Print a run's counts (one JSON object with --json); exit 1 for a run that failed."""
    from .state.store import RUN_COUNTS

    if run:
        result = {**result, "run": run}
        # A followed run was open when this command began: its counts are the ones it ended with.
        taken = RUN_COUNTS if result.get("already_open") else ("synced", "dead", "failed")
        for k in taken:
            result["counts"][k] = run.get(k, 0)
        if run.get("finished_at") and run.get("started_at"):
            result["seconds"] = round((run["finished_at"] - run["started_at"]).total_seconds(), 2)
    failed = bool(run and run["status"] == "failed")
    if failed:
        assert run is not None
        print(f"crmsync: error: run {run['id']} failed: {run.get('error') or 'no error recorded'}", file=sys.stderr)
    if getattr(args, "json", False):
        _print_json(result)
        return 1 if failed else 0
    c = result["counts"]
    what = "dry run" if getattr(args, "dry_run", False) else f"run {result['run_id']}"
    _say(
        f"{result['kind']} {what}: read {c.get('read', 0)}, new {c.get('new', 0)}, changed {c.get('changed', 0)}, "
        f"unchanged {c.get('unchanged', 0)}, invalid {c.get('invalid', 0)}, deleted {c.get('deleted', 0)}, "
        f"enqueued {c.get('enqueued', 0)}"
    )
    parts = ", ".join(f"{p} {c.get('part_' + p, 0)}" for p in ("profile", "tags", "fields"))
    _say(f"  parts to send: {parts}")
    if run:
        _say(
            f"  {'failed' if failed else 'finished'}: synced {run.get('synced', 0)}, "
            f"dead-lettered {run.get('dead', 0)}" + (f" in {result['seconds']} s" if "seconds" in result else "")
        )
    for item in result.get("preview", [])[:5] if getattr(args, "dry_run", False) else []:
        _say(f"  {'new' if item['new'] else 'changed'} {item['key']}: {', '.join(item['parts'])}")
    return 1 if failed else 0


# prometheus-client's multiprocess mode (see worker/metrics.py): named here, as it must be set
# before anything imports prometheus_client.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a Celery worker serving the priority queue ahead of the bulk queue."""
    if args.metrics_port is not None:
        from .settings import load_settings

        # Every worker of the host writes its figures in one directory, and whichever of them
        # answers a scrape serves their sum.
        os.environ.setdefault(METRICS_DIR_ENV, str(load_settings().data_dir / "metrics"))
    from .celery_app import app
    from .observe import serve_metrics
    from .queues import Queue
    from .runtime import runtime

    rt = runtime()
    rt.check_timing()
    rt.store  # noqa: B018 - refuse to start on a state DB that is not migrated, rather than fail every task
    settings = rt.settings
    if args.metrics_port is not None:
        serve_metrics(rt, args.metrics_port, count_runs=True)
    return run_worker(
        app,
        concurrency=args.concurrency or settings.worker_concurrency,
        queues=[q.value for q in Queue],
        loglevel=args.loglevel,
        hostname=f"crmsync-{os.getpid()}@%h",
    )


def run_worker(app: Any, *, concurrency: int, queues: list[str], loglevel: str, hostname: str) -> int:
    """Run a Celery worker of `app` in this process until it stops; returns its exit code.

    The same worker as `celery worker --pool threads --without-gossip --without-mingle` with
    these options, built through Celery's API rather than its command line: that command line
    imports every celery subcommand (the amqp shell's prompt_toolkit and pygments among them),
    about 0.1 s of CPU per worker, paid at every start for nothing.
    """
    from celery.platforms import maybe_drop_privileges
    from celery.utils.nodenames import default_nodename, host_format

    maybe_drop_privileges()  # what `celery worker` checks first: refuses an euid/uid mix-up
    worker = app.Worker(
        hostname=host_format(default_nodename(hostname)),
        pool_cls="threads",
        concurrency=concurrency,
        queues=queues,
        loglevel=loglevel,
        without_gossip=True,
        without_mingle=True,
    )
    started()
    worker.start()
    return int(worker.exitcode or 0)


def cmd_beat(args: argparse.Namespace) -> int:
    """Run Celery beat: incremental syncs every N seconds, a full sync on a cron."""
    from .celery_app import app
    from .jobs import scheduler_lease
    from .observe import serve_metrics
    from .runtime import runtime

    rt = runtime()
    data = rt.settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    if args.metrics_port is not None:
        # Beat runs no task: it serves the gauges (queue depth, breaker, dead letters), and serves
        # them while it stands by too.
        serve_metrics(rt, args.metrics_port, count_runs=False)

    def standing_by() -> None:
        print("another crmsync beat holds the schedule: standing by", file=sys.stderr, flush=True)

    with scheduler_lease(rt, on_wait=standing_by):
        app.start(["beat", "--loglevel", args.loglevel, "--schedule", str(data / "beat-schedule")])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Last runs, lag, queue depth, customers by status, dead letters, limiter."""
    from .report import status
    from .runtime import runtime

    st = status(runtime(), args.limit)
    if args.json:
        _print_json(st)
        return 0
    lag = st["lag_seconds"]
    _say(f"customers:    {_counts(st['customers']) or 'none yet'}")
    _say(f"watermark:    {st['watermark'] or 'none yet'}" + (f" (lag {lag:.0f} s)" if lag is not None else ""))
    _say(f"queue:        {st['queue_depth']} tasks waiting")
    _say(
        f"dead letters: {sum(st['dead_letters'].values())}"
        + (f" ({_counts(st['dead_letters'])})" if st["dead_letters"] else "")
    )
    if st["tickets"]:
        _say(f"tickets:      {_counts(st['tickets'])}")
    lim = st["limiter"]
    extra = (
        f", cool-down {lim['cooldown_seconds']} s, breaker {'OPEN' if lim['breaker_open'] else 'closed'}"
        if lim["shared"]
        else ""
    )
    where = " shared in Redis" if lim["shared"] else " per process"
    _say(f"limiter:      {lim['rate_limit']:g} requests/s{where}{extra}")
    _say("runs:")
    for r in st["runs"]:
        _print_run_line(r)
    return 0


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _print_run_line(r: dict[str, Any]) -> None:
    took = f"{r['seconds']:.1f} s" if r["seconds"] is not None else "running"
    _say(
        f"  {printable(r['id'])} {printable(r['kind']):<11} {printable(r['status']):<9} "
        f"{r['started_at']:%Y-%m-%d %H:%M:%S} {took:>9}  "
        f"read {r['read']} sent {r['enqueued']} synced {r['synced']} dead {r['dead']} invalid {r['invalid']}"
        + ("  DEGRADED" if r.get("degraded") else "")
    )


def cmd_runs(args: argparse.Namespace) -> int:
    """Run history: a list, or one run in detail."""
    from .report import run_detail, run_summary
    from .runtime import runtime

    rt = runtime()
    if args.action == "list":
        rt.store.close_done_runs()
        runs = [run_summary(r) for r in rt.store.runs(args.limit)]
        if args.json:
            _print_json(runs)
        else:
            for r in runs:
                _print_run_line(r)
        return 0
    if not args.id:
        raise ConfigError("name the run to show: crmsync runs show ID")
    detail = run_detail(rt, args.id)
    if detail is None:
        raise CrmsyncError(f"no run with id {args.id}")
    if args.json:
        _print_json(detail)
    else:
        _say_lines(json.dumps(detail, default=_json_default, indent=2))
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    """List, show, replay or discard dead letters.

    A malformed id is a ConfigError (exit 2); an id no letter has, or (for replay and discard)
    a letter that is not open, is an error (exit 1); nothing is shown or changed then.
    """
    from .jobs import embedded_worker, replay, wait_for_run
    from .runtime import runtime

    ids = _letter_ids(args.ids)  # before any connection: a typo is told at once
    rt = runtime()
    store = rt.store
    if args.action == "list":
        letters = store.dead_letters(
            state=None if args.all_states else "dead",
            error_class=args.error_class,
            run_id=args.run,
            since=_iso_time("--since", args.since) if args.since else None,
        )
        if args.json:
            _print_json(letters)
            return 0
        if not letters:
            _say("no dead letters")
        for d in letters:
            _say(
                f"{d['id']:>6}  {printable(d['provided_unique_id'] or '(no key)'):<24} "
                f"{printable(d['error_class']):<32} {printable(d['message'])[:90]}"
            )
        return 0
    if args.action == "show":
        if not ids:
            raise ConfigError("name the dead letters to show: crmsync dlq show ID...")
        for d in _named_letters(store, ids, action=None):
            if args.json:
                _print_json(d)
            else:
                _say_lines(json.dumps(d, default=_json_default, indent=2, ensure_ascii=False))
        return 0
    if args.action == "discard":
        if not ids and not args.all:
            raise ConfigError("name the dead letters to discard (IDs) or give --all")
        if ids:
            _named_letters(store, ids, action="discarded")
        targets = ids or [d["id"] for d in store.dead_letters(state="dead")]
        n = store.set_dead_letter_state(targets, "discarded", only_from="dead")
        _say(f"discarded {n} dead letters")
        return 0
    if not ids and not args.all and not args.error_class:
        raise ConfigError("name the dead letters to replay (IDs), or give --all or --error-class")
    if ids:
        _named_letters(store, ids, action="replayed")
    tick = Ticker(args.json)
    result = replay(
        ids,
        error_class=args.error_class,
        as_recorded=args.as_recorded,
        progress=lambda c: tick(f"re-reading: {c['read']} read, {c['enqueued']} to send"),
    )
    if result["run_id"] is None and not args.json:
        # --all or --error-class found no open letter (or another command took them first).
        _say("no open dead letters to replay")
        return 0
    if result["run_id"] and result["counts"].get("enqueued") and (args.wait or rt.settings.embedded_broker):
        # On the embedded broker nobody else would drain the queue: see the replay through.
        return _see_through(result, rt, args, embedded_worker, wait_for_run)
    return _report(result, rt, args, rt.store.run(result["run_id"]) if result["run_id"] else None)


# A letter id as the state DB holds it: ASCII digits (int() would also take "٣" or " 3"), no more
# than a 64-bit integer holds (the state DB would refuse a bigger one with an OverflowError).
_LETTER_ID = re.compile(r"[0-9]{1,18}")


def _letter_ids(raw: Sequence[str]) -> list[int]:
    """The dead-letter ids of the command line, or a ConfigError naming the first malformed one."""
    for text in raw:
        if not _LETTER_ID.fullmatch(text):
            raise ConfigError(f"not a dead-letter id: {text!r} (ids are the numbers `crmsync dlq list` shows)")
    return [int(text) for text in raw]


def _named_letters(store: Any, ids: list[int], action: str | None) -> list[dict[str, Any]]:
    """The letters of `ids`; an error if one is unknown, or (with an `action`) is not open for it."""
    letters = store.dead_letters(state=None, ids=ids)
    unknown = sorted(set(ids) - {d["id"] for d in letters})
    if unknown:
        raise CrmsyncError(f"no dead letter with id {', '.join(map(str, unknown))}")
    closed = [d for d in letters if d["state"] != "dead"]
    if action and closed:
        states = ", ".join(f"{d['id']} is {d['state']}" for d in closed)
        raise CrmsyncError(f"only open dead letters can be {action}: {states}")
    return letters


def _iso_time(option: str, text: str) -> dt.datetime:
    """`text` read as an ISO 8601 time, or a ConfigError naming the option."""
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{option}: not an ISO time such as 2024-03-01T09:30: {text!r}") from None


def cmd_tickets(args: argparse.Namespace) -> int:
    """List tickets, confirm those whose outcome is unknown, or send them again."""
    from .jobs import celery_enqueue_tickets
    from .runtime import runtime

    rt = runtime()
    store = rt.store
    if args.action == "list":
        tickets = store.tickets(args.status)
        if args.json:
            _print_json(tickets)
            return 0
        if not tickets:
            _say("no tickets")
        for t in tickets:
            _say(
                f"{printable(t['key']):<20} {printable(t['status']):<8} customer {printable(t['customer']):<16} "
                f"{printable(t['proto_id'] or ''):<28} {printable(t['error'] or t['subject'])[:60]}"
            )
        return 0
    if not args.keys:
        raise ConfigError(f"name the tickets to {args.action} (their CRM case keys)")
    if args.action == "confirm":
        # The operator saw the ticket in Proto: it is created, and must never be sent again.
        n = store.set_ticket_status(args.keys, "created", ["unknown"], proto_id=args.proto_id)
        _say(f"confirmed {n} tickets as created")
        return 0
    n = store.set_ticket_status(args.keys, "pending", ["unknown", "failed"], error=None)
    if rt.settings.embedded_broker:
        from .tickets import send_ticket

        # No worker drains the embedded broker between runs: send them from here.
        for key in args.keys:
            _say(f"{key}: {send_ticket(rt, key)}")
        return 0
    celery_enqueue_tickets(list(args.keys))
    _say(f"sending {n} tickets again")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Read a sample of customers back from Proto and report drift from the CRM."""
    from .audit import NOTE, audit, sample_contacts
    from .jobs import planner
    from .runtime import runtime

    rt = runtime()
    contacts = sample_contacts(planner(rt).reader, args.sample, args.seed)
    report = audit(rt, contacts)
    if args.json:
        _print_json(report.as_dict())
    else:
        _say(
            f"checked {report.checked} customers: {len(report.missing)} missing in Proto, "
            f"{len(report.drift)} differing fields"
        )
        for key in report.missing:
            _say(f"  missing  {key}")
        for d in report.drift:
            _say(f"  differs  {d['key']} {d['field']}: CRM {d['crm']!r}, Proto {d['proto']!r}")
        for key, tags in report.extra_tags.items():
            _say(f"  extra tags in Proto (cannot be removed) {key}: {', '.join(tags)}")
        _say(f"note: {NOTE}")
    return 1 if report.missing or report.drift else 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    """Serve the local Proto API sandbox."""
    from .sandbox import SandboxConfig, serve

    config = SandboxConfig.from_env(
        args.subcompany_id,
        args.token,
        rate_limit=args.rate_limit,
        fail_rate=args.fail_rate,
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        drop_rate=args.drop_rate,
        burst=args.burst,
    )
    _say(
        f"Proto sandbox on http://{args.host}:{args.port}/api/platform "
        f"(sub-companies: {', '.join(config.tenants)}; rate limit {config.rate_limit:g}/s)",
        flush=True,
    )
    serve(config, host=args.host, port=args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Everything on embedded defaults: a sample CRM, the sandbox, a worker, the three uses."""
    from .demo import run_demo

    return run_demo(size=args.size, keep=args.keep)


# Commands that call `started()` themselves, once their start-up is over.
_START_THEMSELVES = frozenset({cmd_sync, cmd_worker})


# -- parser --------------------------------------------------------------------------------------------


def _port(text: str) -> int:
    """An argparse type: a TCP port to listen on, 1 to 65535 (a bigger one would be a traceback at bind)."""
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"not a port number from 1 to 65535: {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from .settings import DEFAULT_RATE_LIMIT

    p = argparse.ArgumentParser(prog="crmsync", description="Keep Proto AICX customers in step with a CRM database.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("init", help="create or migrate the state database").set_defaults(func=cmd_init)
    sub.add_parser("check", help="validate settings, mapping, source, state DB and Proto").set_defaults(func=cmd_check)

    s = sub.add_parser("sync", help="plan a sync run (and with --wait, see it through)")
    s.add_argument("kind", choices=["full", "incremental"])
    s.add_argument("--dry-run", action="store_true", help="count what would be sent; call nothing, change nothing")
    s.add_argument("--force", action="store_true", help="send every part of every contact, changed or not")
    s.add_argument("--wait", action="store_true", help="block until every contact is synced or dead-lettered")
    s.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    s.set_defaults(func=cmd_sync)

    w = sub.add_parser("worker", help="run a worker process")
    w.add_argument("--concurrency", type=int, help="threads (default CRMSYNC_WORKER_CONCURRENCY)")
    w.add_argument("--loglevel", default="INFO")
    w.add_argument(
        "--metrics-port",
        type=_port,
        help="serve Prometheus metrics on this port (give every worker of a host the same)",
    )
    w.set_defaults(func=cmd_worker)

    b = sub.add_parser("beat", help="run the scheduler")
    b.add_argument("--loglevel", default="INFO")
    b.add_argument("--metrics-port", type=_port, help="serve Prometheus metrics on this port (not a worker's)")
    b.set_defaults(func=cmd_beat)

    st = sub.add_parser("status", help="runs, customers, dead letters, watermark")
    st.add_argument("--json", action="store_true")
    st.add_argument("--limit", type=int, default=10)
    st.set_defaults(func=cmd_status)

    r = sub.add_parser("runs", help="run history: list, or show one")
    r.add_argument("action", choices=["list", "show"])
    r.add_argument("id", nargs="?")
    r.add_argument("--limit", type=int, default=20)
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_runs)

    d = sub.add_parser("dlq", help="dead letters: list, show, replay, discard")
    d.add_argument("action", choices=["list", "show", "replay", "discard"])
    d.add_argument("ids", nargs="*", help="dead-letter ids")
    d.add_argument("--all", action="store_true", help="every open dead letter")
    d.add_argument("--error-class", help="only letters of this error class")
    d.add_argument("--run", help="only letters of this run")
    d.add_argument("--since", help="only letters failed since this ISO time")
    d.add_argument("--all-states", action="store_true", help="list replayed, resolved and discarded letters too")
    d.add_argument("--as-recorded", action="store_true", help="resend the payload as recorded, not the CRM row")
    d.add_argument("--wait", action="store_true", help="block until the replayed contacts are done")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_dlq, dry_run=False)

    a = sub.add_parser("audit", help="compare a sample of Proto customers with the CRM")
    a.add_argument("--sample", type=int, default=100, help="how many contacts to check (one API call each)")
    a.add_argument("--seed", type=int, help="seed of the sample, to check the same contacts again")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_audit)

    t = sub.add_parser("tickets", help="tickets: list, confirm (outcome unknown), retry")
    t.add_argument("action", choices=["list", "confirm", "retry"])
    t.add_argument("keys", nargs="*", help="CRM case keys")
    t.add_argument("--status", help="list only tickets in this status (pending, sending, created, unknown, failed)")
    t.add_argument("--proto-id", help="with confirm: the id of the ticket found in Proto")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_tickets)

    sb = sub.add_parser("sandbox", help="serve the local Proto API sandbox")
    sb.add_argument("--host", default="127.0.0.1")
    sb.add_argument("--port", type=_port, default=8700)
    sb.add_argument("--subcompany-id", help="accepted sub-company (default CRMSYNC_PROTO_SUBCOMPANY_ID)")
    sb.add_argument("--token", help="its bearer token (default CRMSYNC_PROTO_TOKEN)")
    sb.add_argument("--rate-limit", type=float, default=DEFAULT_RATE_LIMIT, help="requests/s per sub-company (0: none)")
    sb.add_argument("--burst", type=int, help="requests allowed back to back (default: 100 ms worth)")
    sb.add_argument("--fail-rate", type=float, default=0.0, help="share of requests answered 5xx")
    sb.add_argument("--drop-rate", type=float, default=0.0, help="share of connections dropped")
    sb.add_argument("--latency-ms", type=float, default=0.0)
    sb.add_argument("--jitter-ms", type=float, default=0.0)
    sb.set_defaults(func=cmd_sandbox)

    dm = sub.add_parser("demo", help="run everything on embedded defaults")
    dm.add_argument("--size", type=int, default=300, help="contacts in the sample CRM")
    dm.add_argument("--keep", action="store_true", help="keep the demo's folder")
    dm.set_defaults(func=cmd_demo)
    return p


def setup_logging(level: str) -> None:
    """Send every log line of this process through worker.logs: JSON or readable, token redacted.

    CRMSYNC_LOG_FORMAT chooses; `auto` writes JSON unless stderr is a terminal, so that services
    (systemd, Docker, a log file) get lines a machine parses and a person at a prompt reads them.
    """
    from .logs import configure_logging, wants_json
    from .settings import load_settings

    try:
        fmt = load_settings().log_format
    except ConfigError:
        fmt = "auto"  # the command reports the bad setting itself
    configure_logging(json=wants_json(fmt), level=level)


def started() -> None:
    """The command's start-up is over: from now on the cyclic garbage collector runs as usual.

    `main` starts every command with the collector off: start-up builds hundreds of thousands of
    objects that live as long as the process (modules, classes, settings, engines) and next to no
    garbage, so the collector's passes over them (growing with every import) are pure cost, about
    15% of the CPU of a worker's or a `sync`'s start-up. They are frozen here, so that later passes
    skip them too. Called by a command once started (worker, sync), else by `main` before the command.
    """
    gc.freeze()
    gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `crmsync` command."""
    gc.disable()  # until `started()`
    args = build_parser().parse_args(argv)
    try:
        # Commands speak on stdout and log only what goes wrong; worker and beat log their work.
        setup_logging(getattr(args, "loglevel", "WARNING"))
        if args.func not in _START_THEMSELVES:
            started()
        return int(args.func(args))
    except ConfigError as exc:
        _say(f"crmsync: {exc}", file=sys.stderr)
        return 2
    except CrmsyncError as exc:
        _say(f"crmsync: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of the output left (`crmsync dlq list | head`): nothing more to tell, and
        # nothing to flush at exit either (a second BrokenPipeError would be printed there).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command that a closed pipe stopped
    finally:
        _on_exit()


def _on_exit() -> None:
    """Release this process's connections, and spare the interpreter a last collection at exit.

    The state DB's pool, the API client and Redis are closed here, in order. What is left is
    the memory of every module (SQLAlchemy, Celery, pydantic...), freed by the process's exit:
    without `gc.freeze()` the interpreter would first walk it all for reference cycles, about
    0.15 s between a command's last line and its exit (what `sync --wait` makes a script wait).
    """
    if "worker.runtime" in sys.modules:
        from .runtime import close_runtime

        try:
            close_runtime()
        except Exception as exc:  # the command's outcome is decided: a connection that will not close is no failure
            log.debug("closing this process's connections at exit: %s", exc)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to tell
            stream.flush()
    gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
