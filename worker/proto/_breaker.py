"""Circuit breakers: stop calling an API that is down, probe it, resume by itself.

After `threshold` failures in a row (5xx, timeouts, dropped connections; not 429s, which
the limiter handles), the breaker opens: calls fail fast with CircuitOpen, except one probe
per `probe_every` seconds. The first success closes it. `RedisBreaker` shares this among
every worker process, so an outage costs one probe a second, not one per worker thread.
"""

from __future__ import annotations

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


class RedisBreaker:
    """A breaker whose state lives in Redis, shared by every worker process."""

    def __init__(self, redis_client: Any, name: str, threshold: int = 5, probe_every: float = 1.0) -> None:
        import redis

        self._errors = (redis.RedisError,)
        self._redis = redis_client
        self.threshold = threshold
        self.probe_every = probe_every
        prefix = f"crmsync:breaker:{name}"
        self._failures, self._open, self._probe = f"{prefix}:failures", f"{prefix}:open", f"{prefix}:probe"

    def before_call(self) -> None:
        """Let the call through when closed, or when this process wins the next probe."""
        try:
            if not self._redis.exists(self._open):
                return
            if self._redis.set(self._probe, "1", nx=True, px=int(self.probe_every * 1000)):
                return
            wait = max(0.05, (self._redis.pttl(self._probe) or 0) / 1000)
        except self._errors as exc:
            raise RetryableError(f"the shared circuit breaker (Redis) failed: {exc}") from None
        raise CircuitOpen(f"the Proto API is failing: calls held, next probe in {wait:.1f} s", retry_after=wait)

    def on_success(self) -> None:
        """Close, for every process."""
        try:
            if self._redis.exists(self._open) or self._redis.exists(self._failures):
                self._redis.delete(self._failures, self._open)
        except self._errors:
            pass  # a success needs no bookkeeping to be a success

    def on_failure(self) -> None:
        """Count a failure; open at the threshold, for every process."""
        try:
            pipe = self._redis.pipeline()
            pipe.incr(self._failures)
            pipe.expire(self._failures, 60)
            failures = pipe.execute()[0]
            if failures >= self.threshold:
                self._redis.set(self._open, str(time.time()), nx=True)
        except self._errors:
            pass  # the error itself is already on its way to the caller

    def is_open(self) -> bool:
        """True while open."""
        try:
            return bool(self._redis.exists(self._open))
        except self._errors:
            return False
