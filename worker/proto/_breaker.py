"""Circuit breakers: stop calling an API that is down, probe it, resume by itself.

After `threshold` failures in a row (5xx, timeouts, dropped connections; not 429s, which
the limiter handles), the breaker opens: calls fail fast with CircuitOpen, except one probe
per `probe_every` seconds. The first success closes it. `RedisBreaker` shares this among
every worker process, so an outage costs one probe a second, not one per worker thread.

`RedisBreaker`'s check is one Lua function (`HOLD_CHECK`), which `RedisLimiter` runs inside the
script that books the call's slot: a worker asks Redis once before a call (twice if it sleeps to
its slot), and once after it, a DEL, when the API answered.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import CircuitOpen, RetryableError


class Breaker(Protocol):
    """What the client needs of a circuit breaker."""

    def before_call(self) -> None:
        """Raise CircuitOpen unless the call may go out (closed, or this is the probe)."""

    def on_success(self) -> None:
        """The API answered: close."""

    def on_failure(self) -> None:
        """The API failed (retryable): count toward opening."""

    def is_open(self) -> bool:
        """True while calls are held."""


class LocalBreaker:
    """A breaker shared by the threads of one process."""

    def __init__(
        self, threshold: int = 5, probe_every: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.probe_every = probe_every
        self._clock = clock
        self._failures = 0
        self._opened = False
        self._next_probe = 0.0
        self._lock = threading.Lock()

    def before_call(self) -> None:
        """Let the call through when closed, or when it is the next probe."""
        with self._lock:
            if not self._opened:
                return
            now = self._clock()
            if now >= self._next_probe:
                self._next_probe = now + self.probe_every
                return
            wait = self._next_probe - now
        raise CircuitOpen(f"the Proto API is failing: calls held, next probe in {wait:.1f} s", retry_after=wait)

    def on_success(self) -> None:
        """Close."""
        with self._lock:
            self._failures = 0
            self._opened = False

    def on_failure(self) -> None:
        """Count a failure; open at the threshold."""
        with self._lock:
            self._failures += 1
            if self._failures >= self.threshold and not self._opened:
                self._opened = True
                self._next_probe = self._clock() + self.probe_every

    def is_open(self) -> bool:
        """True while open."""
        return self._opened


# The breaker's check as a Lua function, for any script to run before its own work: nil when the
# call may go (closed, or the caller just won the next probe), else milliseconds to the next probe.
HOLD_CHECK = """
local function breaker_holds(open_key, probe_key, probe_ms)
  if redis.call('EXISTS', open_key) == 0 then return nil end
  if redis.call('SET', probe_key, '1', 'NX', 'PX', probe_ms) then return nil end
  return redis.call('PTTL', probe_key)
end
"""

_BEFORE_CALL = HOLD_CHECK + "return breaker_holds(KEYS[1], KEYS[2], ARGV[1])"


class RedisBreaker:
    """A breaker whose state lives in Redis, shared by every worker process."""

    def __init__(self, redis_client: Any, name: str, threshold: int = 5, probe_every: float = 1.0) -> None:
        import redis

        self._errors = (redis.RedisError,)
        self.redis = redis_client
        self.threshold = threshold
        self.probe_every = probe_every
        prefix = f"crmsync:breaker:{name}"
        self._failures, self._open, self._probe = f"{prefix}:failures", f"{prefix}:open", f"{prefix}:probe"
        # What a script running HOLD_CHECK needs: breaker_holds(hold_keys[1], hold_keys[2], probe_ms).
        self.hold_keys = [self._open, self._probe]
        self.probe_ms = max(1, int(self.probe_every * 1000))
        self._before_call = redis_client.register_script(_BEFORE_CALL)

    def before_call(self) -> None:
        """Let the call through when closed, or when this process wins the next probe."""
        try:
            wait_ms = self._before_call(keys=self.hold_keys, args=[self.probe_ms])
        except self._errors as exc:
            raise RetryableError(f"the shared circuit breaker (Redis) failed: {exc}") from None
        if wait_ms is not None:
            raise self.held(int(wait_ms))

    def held(self, wait_ms: int) -> CircuitOpen:
        """The error of a call that HOLD_CHECK held, `wait_ms` before the next probe."""
        wait = max(0.05, wait_ms / 1000)
        return CircuitOpen(f"the Proto API is failing: calls held, next probe in {wait:.1f} s", retry_after=wait)

    def on_success(self) -> None:
        """Close, for every process."""
        # A success needs no bookkeeping to be a success: a Redis error here is let go.
        # One DEL whatever the state: deleting keys that do not exist writes nothing.
        with contextlib.suppress(*self._errors):
            self.redis.delete(self._failures, self._open)

    def on_failure(self) -> None:
        """Count a failure; open at the threshold, for every process."""
        try:
            pipe = self.redis.pipeline()
            pipe.incr(self._failures)
            pipe.expire(self._failures, 60)
            failures = pipe.execute()[0]
            if failures >= self.threshold:
                self.redis.set(self._open, str(time.time()), nx=True)
        except self._errors:
            pass  # the error itself is already on its way to the caller

    def is_open(self) -> bool:
        """True while open."""
        try:
            return bool(self.redis.exists(self._open))
        except self._errors:
            return False
