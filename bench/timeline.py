#!/usr/bin/env python
"""Timeline of the contract's rate-limit scenario: where the seconds before the first call and after the last go.

It runs what `../shared/contract/scenario.py ratelimit` runs, with that file's own code (its CRM,
mapping, sandbox and `crmsync` commands from PATH): the sandbox, `crmsync init`, N `crmsync worker`
processes started and, at once (or with `--warm`, once their logs say "ready"), the timed
`crmsync sync full --wait --json`. Meanwhile a thread reads `/_sandbox/stats` and the CPU time of
every process every 20 ms. It prints, in seconds from the start of the `sync` command:

- when each worker logged "ready" (and the CPU seconds it had spent by then);
- the first API call (the planner's custom fields), the first task call (the first call past
  the planner's), the last call, the command's exit, and the `sync` command's CPU seconds;
- calls/s between the first task call and the last; the figure the scenario prints.

    flock /tmp/crmsync-bench.lock python bench/timeline.py [--repeats N] [--warm] [--workers 4] [--n 300]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCENARIO = ROOT.parent / "shared" / "contract" / "scenario.py"
SAMPLE_EVERY = 0.02
# The planner's calls before any task's: list the custom fields, create the mapping's three.
PLANNER_CALLS = 4
TICKS = os.sysconf("SC_CLK_TCK")


def load_scenario(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("contract_scenario", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (its threads included), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS


class Sampler(threading.Thread):
    """Reads the sandbox's request count and the processes' CPU time every SAMPLE_EVERY s."""

    def __init__(self, env: Any) -> None:
        super().__init__(daemon=True)
        self.env = env
        self.calls: list[tuple[float, int]] = []
        self.cpu: dict[int, list[tuple[float, float]]] = {}
        self.pids: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            with contextlib.suppress(Exception):  # a read that failed is a sample missed
                self.calls.append((now, int(self.env.stats()["total"])))
            for pid in list(self.pids):
                s = cpu_seconds(pid)
                if s is not None:
                    self.cpu.setdefault(pid, []).append((now, s))
            self.stop.wait(SAMPLE_EVERY)

    def first_above(self, level: int) -> float | None:
        return next((t for t, n in self.calls if n > level), None)

    def reached(self, level: int) -> float | None:
        return next((t for t, n in self.calls if n >= level), None)

    def cpu_at(self, pid: int, when: float) -> float:
        best = 0.0
        for t, s in self.cpu.get(pid, []):
            if t > when:
                break
            best = s
        return best


def ready_times(log: Path, wall0: float, mono0: float) -> dict[int, float]:
    """Monotonic time each worker's log said "ready", by worker pid (from the JSON log lines)."""
    out: dict[int, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if " ready." not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        text = str(event.get("event", ""))
        if not text.startswith("crmsync-") or "timestamp" not in event:
            continue
        pid = int(text.removeprefix("crmsync-").split("@", 1)[0])
        stamp = dt.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()
        out[pid] = mono0 + (stamp - wall0)
    return out


def one_run(sc: Any, args: argparse.Namespace) -> dict[str, float]:
    ns = argparse.Namespace(
        n=args.n,
        source_url=None,
        state_url=None,
        broker_url=args.broker_url,
        workers=args.workers,
        rate_limit=args.rate_limit,
    )
    env = sc.Env(ns)
    try:
        sc.Source(env.env["CRMSYNC_SOURCE_URL"], args.n)
        env.sandbox("--rate-limit", str(args.rate_limit))
        code, out = env.run("init", timeout=120)
        if code:
            raise SystemExit(f"crmsync init exited {code}: {out[-300:]}")
        sampler = Sampler(env)
        sampler.start()
        wall_at, mono_at = time.time(), time.monotonic()
        workers = [env.start("worker") for _ in range(args.workers)]
        sampler.pids.extend(p.pid for p in workers)
        log = Path(env.dir) / "procs.log"
        if args.warm:
            deadline = time.monotonic() + 60
            while len(ready_times(log, wall_at, mono_at)) < args.workers and time.monotonic() < deadline:
                env.log.flush()
                time.sleep(0.05)
        t0 = time.monotonic()
        proc = subprocess.Popen(
            ["crmsync", "sync", "full", "--wait", "--json"],
            env=env.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        sampler.pids.append(proc.pid)
        sync_cpu = 0.0
        while proc.poll() is None:
            sync_cpu = cpu_seconds(proc.pid) or sync_cpu
            time.sleep(0.01)
        t_end = time.monotonic()
        _, stderr = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"sync exited {proc.returncode}: {stderr[-500:]}")
        time.sleep(0.1)
        sampler.stop.set()
        sampler.join()
        stats = env.stats()
        total = int(stats["total"])
        limited = int(stats.get("by_status", {}).get("429", 0))
        env.log.flush()
        ready = ready_times(log, wall_at, mono_at)
        first = sampler.first_above(0) or t_end
        first_task = sampler.first_above(PLANNER_CALLS) or t_end
        last = sampler.reached(total) or t_end
        took = t_end - t0
        row = dict(
            ok=total - limited,
            limited=limited,
            took=took,
            ratio=(total - limited) / took / args.rate_limit,
            first_call=first - t0,
            first_task_call=first_task - t0,
            last_call=last - t0,
            tail=t_end - last,
            rate=(total - PLANNER_CALLS) / (last - first_task) if last > first_task else 0.0,
            sync_cpu=sync_cpu,
            ready_first=min(ready.values(), default=t_end) - t0,
            ready_last=max(ready.values(), default=t_end) - t0,
            worker_cpu_ready=statistics.mean(sampler.cpu_at(p, ready.get(p, t_end)) for p in sampler.pids[:-1]),
        )
        print(
            f"# {row['ok']} calls in {took:.2f} s = {row['ratio']:.3f} of the limit; 429s {limited}; "
            f"workers ready {row['ready_first']:+.2f}..{row['ready_last']:+.2f} s "
            f"({row['worker_cpu_ready']:.2f} CPU s each); first call {row['first_call']:.2f}, first task call "
            f"{row['first_task_call']:.2f}, last call {row['last_call']:.2f}, exit {took:.2f} "
            f"(tail {row['tail']:.2f}); "
            f"{row['rate']:.1f} calls/s between; sync command {sync_cpu:.2f} CPU s",
            file=sys.stderr,
            flush=True,
        )
        return row
    finally:
        env.close()
        env.log.close()
        shutil.rmtree(env.dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--scenario", type=Path, default=DEFAULT_SCENARIO)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rate-limit", type=float, default=50.0)
    ap.add_argument("--broker-url", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warm", action="store_true", help="wait for the workers' 'ready' before the timed sync")
    args = ap.parse_args()
    sc = load_scenario(args.scenario)
    rows = [one_run(sc, args) for _ in range(args.repeats)]
    print(
        f"median of {len(rows)} ({'warm' if args.warm else 'cold'} workers: "
        f"{'waited for' if args.warm else 'started with the command'}), seconds from the sync command's start:"
    )
    for key in (
        "ratio",
        "took",
        "ready_first",
        "ready_last",
        "worker_cpu_ready",
        "first_call",
        "first_task_call",
        "last_call",
        "tail",
        "rate",
        "sync_cpu",
        "limited",
    ):
        values = [r[key] for r in rows]
        print(f"  {key:<18} {statistics.median(values):8.3f}  ({min(values):.3f}–{max(values):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
