"""The circuit breaker: an outage costs one probe a second, and work resumes by itself."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import redis

from tests.conftest import SUBCOMPANY, TOKEN, Sandbox
from worker.errors import CircuitOpen
from worker.proto import LocalBreaker, LocalLimiter, ProtoClient, RedisBreaker, RedisLimiter, RetryPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_failures_and_lets_one_probe_a_second() -> None:
    clock = FakeClock()
    breaker = LocalBreaker(threshold=3, probe_every=1.0, clock=clock)
    for _ in range(3):
        breaker.before_call()
        breaker.on_failure()
    assert breaker.is_open()
    clock.now = 1.0
    breaker.before_call()  # the probe
    with pytest.raises(CircuitOpen) as held:
        breaker.before_call()
    assert 0 < held.value.retry_after <= 1.0
    breaker.on_success()
    assert not breaker.is_open()
    breaker.before_call()


def test_a_success_resets_the_count_of_failures() -> None:
    breaker = LocalBreaker(threshold=3)
    breaker.on_failure()
    breaker.on_failure()
    breaker.on_success()
    breaker.on_failure()
    assert not breaker.is_open()


def test_redis_breaker_is_shared_by_every_process(redis_url: str) -> None:
    one = RedisBreaker(redis.Redis.from_url(redis_url), "shared", threshold=2, probe_every=5)
    other = RedisBreaker(redis.Redis.from_url(redis_url), "shared", threshold=2, probe_every=5)
    one.on_failure()
    other.on_failure()
    assert one.is_open() and other.is_open()
    one.before_call()  # wins the probe
    with pytest.raises(CircuitOpen):
        other.before_call()
    other.on_success()
    assert not one.is_open()
    one.before_call()


def test_calls_are_held_during_an_outage_and_resume_when_the_api_is_back(sandbox: Sandbox, redis_url: str) -> None:
    client = ProtoClient(
        sandbox.base_url,
        SUBCOMPANY,
        TOKEN,
        limiter=LocalLimiter(1000),
        breaker=RedisBreaker(redis.Redis.from_url(redis_url), SUBCOMPANY, threshold=3, probe_every=0.5),
        retry=RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02, max_held=30),
    )
    sandbox.faults(outage=True)
    threading.Timer(2.0, lambda: sandbox.faults(outage=False)).start()
    started = time.monotonic()
    client.upsert_customer("held-1", {"name": "Held"})  # would fail after 3 tries without the breaker
    assert time.monotonic() - started >= 1.9
    assert "held-1" in sandbox.customers()
    # ~2 s of outage: 3 failures open it, then a probe every 0.5 s; not a request per retry.
    assert sandbox.stats()["by_status"].get("503", 0) <= 3 + 5
    client.close()


# -- the breaker asked in the limiter's booking script ---------------------------------------------


class CountingRedis(redis.Redis):
    """A real Redis client that remembers the name of every command it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return super().execute_command(*args, **options)


@pytest.mark.parametrize("same_client", [True, False], ids=["in-the-booking-script", "by-itself"])
def test_a_call_the_shared_breaker_holds_books_no_rate_limit_slot(redis_url: str, same_client: bool) -> None:
    name = "held-" + uuid.uuid4().hex[:8]
    client = redis.Redis.from_url(redis_url)
    limiter = RedisLimiter(client, name, 1)  # slots a second apart
    breaker = RedisBreaker(client if same_client else redis.Redis.from_url(redis_url), name, threshold=1, probe_every=5)
    breaker.on_failure()  # open

    limiter.acquire(breaker)  # the probe: it books the first slot, now
    for _ in range(3):
        with pytest.raises(CircuitOpen) as held:
            limiter.acquire(breaker)
        assert 4 < held.value.retry_after <= 5
    breaker.on_success()  # the probe's answer closes it
    started = time.monotonic()
    limiter.acquire(breaker)

    # The slot after the probe's, a second on: the three held calls booked none.
    assert 0.8 <= time.monotonic() - started < 1.5


def test_a_probe_that_books_again_after_a_pause_is_not_held_by_its_own_probe(redis_url: str) -> None:
    name = "reprobe-" + uuid.uuid4().hex[:8]
    client = redis.Redis.from_url(redis_url)
    limiter = RedisLimiter(client, name, 4)  # slots 250 ms apart
    breaker = RedisBreaker(client, name, threshold=1, probe_every=5)
    limiter.acquire()
    breaker.on_failure()
    threading.Timer(0.05, lambda: limiter.pause(0.5)).start()  # a 429 elsewhere, mid-wait
    started = time.monotonic()
    limiter.acquire(breaker)  # wins the probe, booked for +250 ms, books again after the pause

    assert time.monotonic() - started >= 0.5


def test_an_answered_call_asks_redis_twice_when_limiter_and_breaker_share_it(sandbox: Sandbox, redis_url: str) -> None:
    counting = CountingRedis.from_url(redis_url)
    client = ProtoClient(
        sandbox.base_url,
        SUBCOMPANY,
        TOKEN,
        limiter=RedisLimiter(counting, SUBCOMPANY, 1000, burst=10),
        breaker=RedisBreaker(counting, SUBCOMPANY),
    )
    with client:
        client.upsert_customer("rt-0", {"name": "Warm"})  # loads the scripts into Redis
        counting.sent.clear()
        client.upsert_customer("rt-1", {"name": "Ada"})

    # The breaker's check and the slot in one script, then the success: not five round trips.
    assert counting.sent == ["EVALSHA", "DEL"]
