"""The chaos scenarios of tests/chaos at full size, with their figures.

Each scenario is a fresh deployment on this machine (a PostgreSQL CRM and state DB, Redis,
`crmsync sandbox`, `crmsync worker` processes) damaged while `crmsync sync full --wait` runs:
workers SIGKILLed, Redis flushed, the API down for a while, a noisy API, two beats at once.
It prints the command that reproduces the run, one line per scenario as it ends (stderr), then a
Markdown table: contacts, faults injected, time to converge, lost, duplicated, unexpected dead
letters, tickets. Exit status 1 when any guarantee did not hold.

    python bench/chaos.py [--contacts 1000] [--scenarios kill,flushdb,outage,noisy,two-beats]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.chaos import harness  # noqa: E402
from tests.chaos.harness import Cluster, Figures  # noqa: E402

# Full-size parameters of each scenario; the tests use smaller ones (tests/chaos/test_chaos.py).
SCENARIOS: dict[str, Callable[[Cluster], Figures]] = {
    "kill": lambda c: harness.scenario_kill(c, kills=5, timeout=900),
    "flushdb": lambda c: harness.scenario_flushdb(c, at=0.4, timeout=900),
    "outage": lambda c: harness.scenario_outage(c, at=0.3, outage=20.0, timeout=900),
    "noisy": lambda c: harness.scenario_noisy(c, timeout=1800),
    "two-beats": lambda c: harness.scenario_two_beats(c, every=2.0, window=20.0, touched=20),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contacts", type=int, default=1000, help="valid contacts in the CRM (default 1000)")
    p.add_argument("--bad-rows", type=int, default=10, help="planted rows Proto refuses (default 10)")
    p.add_argument("--workers", type=int, default=2, help="crmsync worker processes (default 2)")
    p.add_argument("--concurrency", type=int, default=8, help="threads per worker (default 8)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, of: " + ", ".join(SCENARIOS))
    p.add_argument("--keep", action="store_true", help="keep every log (their folder is printed)")
    args = p.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def reproduce(args: argparse.Namespace) -> str:
    """The command line that runs this again."""
    parts = ["python", "bench/chaos.py", "--contacts", str(args.contacts), "--bad-rows", str(args.bad_rows)]
    parts += ["--workers", str(args.workers), "--concurrency", str(args.concurrency), "--scenarios", args.scenarios]
    return shlex.join(parts)


def table(figures: list[Figures], bad_rows: int) -> str:
    """The figures as a Markdown table."""
    head = (
        "| scenario | contacts (+bad) | faults injected | converged in | lost | duplicated | dead letters "
        "(unexpected) | tickets created / cases (twice, unknown) | extra 2xx calls | reconciled | held |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for f in figures:
        faults = ", ".join(f"{k} {v}" for k, v in f.faults.items() if k != "planted_bad")
        secs = f"{f.seconds:.0f} s" if f.seconds is not None else "—"
        lines.append(
            f"| {f.scenario} | {f.contacts} (+{bad_rows}) | {faults} | {secs} | {f.lost} | {f.duplicated} | "
            f"{f.dead} ({f.unexpected_dead}) | {f.tickets_created} / {f.tickets} ({f.tickets_duplicated}, "
            f"{f.tickets_unknown}) | {f.extra_calls} | {f.reconciled} | {'yes' if f.ok else 'NO'} |"
        )
    return "\n".join(lines)


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally`, which stop the processes


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    work = Path(tempfile.mkdtemp(prefix="crmsync-bench-chaos-"))
    print(f"# runs in {work}", file=sys.stderr)
    figures: list[Figures] = []
    started = time.monotonic()
    try:
        for name in args.scenarios.split(","):
            with harness.cluster(
                work / name,
                contacts=args.contacts,
                bad_rows=args.bad_rows,
                workers=args.workers,
                concurrency=args.concurrency,
            ) as c:
                fig = SCENARIOS[name](c)
            figures.append(fig)
            print(f"{fig.line()} [{time.monotonic() - started:.0f} s]", file=sys.stderr, flush=True)
        leaks = harness.token_leaks([work])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(reproduce(args))
    print()
    print(
        f"{dt.date.today().isoformat()}, {os.cpu_count()} CPUs, {args.contacts} contacts + {args.bad_rows} planted bad "
        f"rows, {args.workers} workers × {args.concurrency} threads, PostgreSQL CRM and state DB, Redis broker"
    )
    print()
    print(table(figures, args.bad_rows))
    print()
    print(f"bearer token found in {len(leaks)} of the files every process wrote")
    for f in figures:
        for problem in f.problems:
            print(f"- {f.scenario}: {problem}")
    return 0 if all(f.ok for f in figures) and not leaks else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
