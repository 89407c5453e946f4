"""Rate limiters: pace API calls so the sub-company's limit is kept busy but never exceeded.

Both limiters implement GCRA with reservations: `acquire()` books the next free slot and
sleeps until it, so waiting callers are served in order with no polling, and a 429's
`Retry-After` pushes every later slot back (`pause`).

A caller that slept to a slot booked before a pause began does not send: it books again,
after the pause. So a 429 holds the requests already booked as well as the later ones.

`acquire(breaker)` asks the circuit breaker first: a call it holds takes no slot. When both
live in the same Redis, one script does both, so a call costs one round trip to be booked
(and one more, a GET, if it had to sleep).

A Redis that cannot be reached holds the call (CircuitOpen, never sent), to be asked again after
a wait that doubles up to a cap: the retry policy's time on hold bounds it, and the task then
defers itself. A call is never failed, nor a ticket left `unknown`, for want of a slot.

`RedisLimiter` shares one schedule among every process on every host. A Lua script is used
rather than a library: pyrate-limiter and limits answer "allowed now or not", which makes
waiters poll and bunch up at window edges; GCRA with a reservation tells each caller exactly
how long to sleep, which is what keeps the limiter busy without bursts that trip 429s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ._breaker import HOLD_CHECK, Breaker, RedisBreaker, StoreBackoff, store_unreachable

log = logging.getLogger(__name__)


class Limiter(Protocol):
    """What the client needs of a rate limiter."""

    def acquire(self, breaker: Breaker | None = None) -> None:
        """Block until the caller may send one request.

        `breaker` is asked first: a call it holds raises CircuitOpen and takes no slot.
        """

    def pause(self, seconds: float) -> None:
        """Send nothing for `seconds` (a 429's Retry-After), in every process sharing the limiter."""


class LocalLimiter:
    """An in-process GCRA limiter, shared by the threads of one process."""

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = 1.0 / rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tat = 0.0
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def acquire(self, breaker: Breaker | None = None) -> None:
        """Ask `breaker`, book the next slot and sleep until it; book again if a pause began meanwhile."""
        if breaker is not None:
            breaker.before_call()
        while True:
            with self._lock:
                now = self._clock()
                paused = self._paused_until
                slot = max(now, paused, self._tat - (self.burst - 1) * self.interval)
                self._tat = max(self._tat, slot) + self.interval
            if slot <= now:
                return
            self._sleep(slot - now)
            with self._lock:
                if self._paused_until == paused:
                    return

    def pause(self, seconds: float) -> None:
        """Hold every caller for `seconds` from now."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)


# KEYS: tat, paused[, the breaker's hold_keys]; ARGV: interval, burst[, the breaker's hold_args()].
# With the breaker's keys, a call it holds books nothing: the answer is {'held', HOLD_CHECK's answer...}.
_GCRA = (
    HOLD_CHECK
    + """
if KEYS[3] then
  local held = breaker_holds(KEYS[3], KEYS[4], ARGV[3], KEYS[5], KEYS[6], ARGV[4])
  if held then return {'held', held[1], held[2]} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
local slot = math.max(now, paused, tat - (burst - 1) * interval)
local new_tat = math.max(tat, slot) + interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return {tostring(slot - now), tostring(paused)}
"""
)

_PAUSE = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ > cur then
  redis.call('SET', KEYS[1], tostring(until_), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
return tostring(until_)
"""


class RedisLimiter:
    """A GCRA limiter whose schedule lives in Redis, shared by every worker process."""

    def __init__(self, redis_client: Any, name: str, rate: float, burst: int = 1) -> None:
        import redis

        self._redis_errors = (redis.RedisError,)
        self._redis = redis_client
        self.interval = 1.0 / rate
        self.burst = burst
        self._keys = [f"crmsync:limiter:{name}:tat", f"crmsync:limiter:{name}:paused"]
        self._gcra = redis_client.register_script(_GCRA)
        self._pause = redis_client.register_script(_PAUSE)
        self._backoff = StoreBackoff()

    def acquire(self, breaker: Breaker | None = None) -> None:
        """Ask `breaker`, book the next shared slot and sleep until it; book again if a pause began meanwhile.

        A RedisBreaker on the same Redis client is asked in the booking's script (one round trip
        for both); any other breaker by itself, first. The check after the sleep costs one GET,
        and only to callers that slept.
        """
        shared = breaker if isinstance(breaker, RedisBreaker) and breaker.redis is self._redis else None
        keys: list[str] = self._keys
        args: list[Any] = [self.interval, self.burst]
        if shared is not None:
            keys, args = [*keys, *shared.hold_keys], [*args, *shared.hold_args()]
        elif breaker is not None:
            breaker.before_call()
        try:
            while True:
                booked = self._gcra(keys=keys, args=args)
                if shared is not None and len(booked) == 3:  # held by the breaker: no slot was booked
                    raise shared.held(booked[1:])
                wait, paused = booked
                # The breaker was asked once: a caller booking again after a pause may be its probe.
                keys, args = self._keys, args[:2]
                if float(wait) <= 0:
                    break
                time.sleep(float(wait))
                # A pause only ever moves later: a different value is a pause newer than our slot.
                now_paused = self._redis.get(self._keys[1])
                if float(now_paused or 0) == float(paused):
                    break
        except self._redis_errors as exc:
            # Nothing was sent: the call waits (held) and asks again, rather than fail.
            raise store_unreachable("rate limiter", exc, self._backoff.next_wait()) from None
        self._backoff.reset()

    def pause(self, seconds: float) -> None:
        """Hold every process for `seconds` from now; best effort when Redis is unreachable.

        The caller that met the 429 waits its Retry-After anyway: only the other processes
        would not know, and their own 429s tell them.
        """
        try:
            self._pause(keys=self._keys[1:], args=[seconds])
        except self._redis_errors as exc:
            log.warning("could not share a %.1f s cool-down through Redis: %s", seconds, exc)

    def paused_for(self, redis_client: Any) -> float:
        """Seconds left of a shared cool-down (0 when none)."""
        value = redis_client.get(self._keys[1])
        return max(0.0, float(value) - time.time()) if value else 0.0
