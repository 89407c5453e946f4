"""The rate limiters: exact schedules on a fake clock, real threads, real Redis, real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from worker.errors import CircuitOpen
from worker.proto import LocalLimiter, RedisLimiter

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """A monotonic clock that only moves when told to, with a sleep that moves it (or not)."""

    def __init__(self, now: float = 100.0, *, sleep_advances: bool = True) -> None:
        self.now = now
        self.sleeps: list[float] = []
        self._advance = sleep_advances

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self._advance:
            self.now += seconds


def acquire_times(limiter: LocalLimiter, clock: FakeClock, n: int) -> list[float]:
    """The fake time at which each of `n` back-to-back acquires returned."""
    times = []
    for _ in range(n):
        limiter.acquire()
        times.append(clock.now)
    return times


# -- LocalLimiter on a fake clock ----------------------------------------------------------------


def test_acquires_are_paced_one_interval_apart() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(10, clock=clock, sleep=clock.sleep)

    assert acquire_times(limiter, clock, 5) == pytest.approx([100.0, 100.1, 100.2, 100.3, 100.4])
    assert clock.sleeps == pytest.approx([0.1, 0.1, 0.1, 0.1])


def test_simultaneous_callers_each_reserve_the_next_slot() -> None:
    # Callers arriving at the same instant (threads): each sleeps until a slot of its own.
    clock = FakeClock(sleep_advances=False)
    limiter = LocalLimiter(4, clock=clock, sleep=clock.sleep)

    for _ in range(5):
        limiter.acquire()

    assert clock.sleeps == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_burst_acquires_go_back_to_back_then_pacing_resumes() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(10, burst=3, clock=clock, sleep=clock.sleep)

    assert acquire_times(limiter, clock, 5) == pytest.approx([100.0, 100.0, 100.0, 100.1, 100.2])

    clock.now = 110.0  # idle long enough to earn the burst back, and no more
    assert acquire_times(limiter, clock, 5) == pytest.approx([110.0, 110.0, 110.0, 110.1, 110.2])


def test_an_idle_limiter_does_not_save_up_more_than_its_burst() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(10, clock=clock, sleep=clock.sleep)
    limiter.acquire()
    clock.now = 200.0

    assert acquire_times(limiter, clock, 3) == pytest.approx([200.0, 200.1, 200.2])


def test_pause_pushes_every_later_slot_back() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(10, clock=clock, sleep=clock.sleep)
    acquire_times(limiter, clock, 2)  # 100.0, 100.1

    limiter.pause(2.0)  # at 100.1

    assert acquire_times(limiter, clock, 3) == pytest.approx([102.1, 102.2, 102.3])


def test_a_shorter_pause_neither_shortens_a_longer_one_nor_pulls_booked_slots_forward() -> None:
    clock = FakeClock(sleep_advances=False)
    limiter = LocalLimiter(10, clock=clock, sleep=clock.sleep)
    for _ in range(5):  # slots booked up to 100.4
        limiter.acquire()

    limiter.pause(0.2)  # ends before the booked slots do
    limiter.acquire()
    assert clock.sleeps[-1] == pytest.approx(0.5)

    limiter.pause(3.0)
    limiter.pause(1.0)  # does not shorten the 3 s pause
    limiter.acquire()
    assert clock.sleeps[-1] == pytest.approx(3.0)


# -- LocalLimiter with real threads --------------------------------------------------------------


def test_threads_share_one_schedule() -> None:
    limiter = LocalLimiter(500)
    returned: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for _ in range(25):
            limiter.acquire()
            with lock:
                returned.append(time.monotonic())

    threads = [threading.Thread(target=work) for _ in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started

    assert len(returned) == 200
    assert 0.38 <= elapsed < 0.8  # 199 intervals of 2 ms
    # The k-th acquire to return did so no earlier than its slot, k intervals after the first.
    returned.sort()
    assert all(t - returned[0] >= k * 0.002 - 1e-3 for k, t in enumerate(returned))


# -- RedisLimiter on real Redis ------------------------------------------------------------------

_CHILD = """
import json, sys, time
import redis
from worker.proto import RedisLimiter

url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = redis.Redis.from_url(url)
client.ping()
limiter = RedisLimiter(client, name, 100)
print("ready", flush=True)
sys.stdin.readline()
times = []
for _ in range(n):
    limiter.acquire()
    times.append(time.time())
print(json.dumps(times), flush=True)
"""


def test_two_processes_on_one_name_share_one_schedule(redis_url: str) -> None:
    name = "shared-" + uuid.uuid4().hex[:8]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, redis_url, name, "100"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        started = time.time()
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        runs = [json.loads(child.communicate(timeout=20)[0]) for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait()

    assert [len(run) for run in runs] == [100, 100]
    finished = max(max(run) for run in runs)
    assert finished - started >= 1.9  # 200 slots, 10 ms apart; alone each would take 1 s
    # Both ran throughout, interleaved: neither simply went after the other.
    overlap = min(max(run) for run in runs) - max(min(run) for run in runs)
    assert overlap > 1.5
    merged = sorted(runs[0] + runs[1])
    assert all(t - merged[0] >= k * 0.01 - 0.01 for k, t in enumerate(merged))


def test_pause_on_one_instance_holds_the_other(redis_url: str) -> None:
    name = "pause-" + uuid.uuid4().hex[:8]
    one = RedisLimiter(redis.Redis.from_url(redis_url), name, 100)
    other_client = redis.Redis.from_url(redis_url)
    other = RedisLimiter(other_client, name, 100)

    one.pause(0.5)
    assert 0.3 < other.paused_for(other_client) <= 0.5
    started = time.monotonic()
    other.acquire()
    elapsed = time.monotonic() - started

    assert 0.45 <= elapsed < 0.9


def test_different_names_do_not_interfere(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    busy = RedisLimiter(client, "busy-" + uuid.uuid4().hex[:8], 1)
    busy.acquire()  # books its next slot a second away
    busy.pause(10)

    idle = RedisLimiter(client, "idle-" + uuid.uuid4().hex[:8], 1)
    started = time.monotonic()
    idle.acquire()
    elapsed = time.monotonic() - started

    assert elapsed < 0.1
    assert idle.paused_for(client) == 0.0
    assert busy.paused_for(client) > 9


def test_a_redis_outage_holds_the_call_unsent_and_a_cool_down_is_best_effort() -> None:
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    limiter = RedisLimiter(dead, "any", 10)
    waits = []
    for _ in range(3):
        with pytest.raises(CircuitOpen, match="rate limiter") as held:
            limiter.acquire()
        assert held.value.not_sent  # nothing left: a ticket's call is safe to make again
        waits.append(held.value.retry_after)
    assert waits[0] < waits[1] < waits[2]  # asked again with backoff
    limiter.pause(1.0)  # the caller that met the 429 waits anyway: not an error of its own


# -- a pause that begins while a caller sleeps to its slot -----------------------------------------


def test_a_pause_that_begins_while_a_caller_waits_for_its_slot_holds_that_caller_too() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(10, clock=clock, sleep=clock.sleep)
    limiter.acquire()  # 100.0; the next slot is 100.1

    def sleep_then_429(seconds: float) -> None:
        if not clock.sleeps:
            limiter.pause(2.0)  # another thread's 429, while this one sleeps: until 102.0
        clock.sleep(seconds)

    limiter._sleep = sleep_then_429
    limiter.acquire()

    assert clock.now == pytest.approx(102.0)  # not 100.1, inside the pause


def test_a_redis_pause_holds_callers_already_booked_in_every_process(redis_url: str) -> None:
    name = "booked-" + uuid.uuid4().hex[:8]
    waiter = RedisLimiter(redis.Redis.from_url(redis_url), name, 4)  # slots 250 ms apart
    other = RedisLimiter(redis.Redis.from_url(redis_url), name, 4)
    waiter.acquire()
    threading.Timer(0.05, lambda: other.pause(1.0)).start()  # a 429 elsewhere, mid-wait
    started = time.monotonic()
    waiter.acquire()  # booked for +250 ms, before the pause began

    assert time.monotonic() - started >= 1.0
