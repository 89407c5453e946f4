"""Circuit breakers: stop calling an API that is down, probe it, resume by itself.

After `threshold` failures in a row (5xx, timeouts, dropped connections; not 429s, which
the limiter handles), the breaker opens: calls fail fast with CircuitOpen, except one probe
per `probe_every` seconds. The first success closes it. `RedisBreaker` shares this among
every worker process, so an outage costs one probe a second, not one per worker thread.

A refusal of the credentials (401/403, `on_auth_failure`) pauses the sub-company the same way,
for every process: calls are held with AuthPaused, which carries the refusal's message, and one
probe goes out after `auth_probe_first` seconds, then after twice as long at each refused probe,
up to `auth_probe_max`. A process that has never called yet probes at once (it may be the one
started with the fixed token). Any answer that is not a refusal lifts the pause.

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

from ..errors import AuthPaused, CircuitOpen

AUTH_PROBE_FIRST = 1.0
AUTH_PROBE_MAX = 30.0
# How long a call waits before asking an unreachable breaker or limiter store again, at first and at most.
STORE_RETRY_FIRST = 0.1
STORE_RETRY_MAX = 2.0


class Breaker(Protocol):
    """What the client needs of a circuit breaker."""

    def before_call(self) -> None:
        """Raise CircuitOpen (AuthPaused when paused by a refusal) unless the call may go out."""

    def on_success(self) -> None:
        """The API answered: close, and lift a pause for refused credentials."""

    def on_failure(self) -> None:
        """The API failed (retryable): count toward opening."""

    def on_auth_failure(self, message: str) -> None:
        """The API refused the credentials (401/403): pause every call, `message` saying why."""

    def is_open(self) -> bool:
        """True while calls are held."""


def auth_held(reason: str, wait: float) -> AuthPaused:
    """The error of a call held by a pause for refused credentials, `wait` s before the next probe."""
    return AuthPaused(reason, retry_after=max(0.05, wait))


def store_unreachable(what: str, exc: Exception, wait: float) -> CircuitOpen:
    """The error of a call that could not ask the shared limiter or breaker: held, never sent."""
    return CircuitOpen(f"the shared {what} (Redis) is unreachable ({exc}): calls wait", retry_after=wait)


class LocalBreaker:
    """A breaker shared by the threads of one process."""

    def __init__(
        self,
        threshold: int = 5,
        probe_every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        auth_probe_first: float = AUTH_PROBE_FIRST,
        auth_probe_max: float = AUTH_PROBE_MAX,
    ) -> None:
        self.threshold = threshold
        self.probe_every = probe_every
        self.auth_probe_first = auth_probe_first
        self.auth_probe_max = auth_probe_max
        self._clock = clock
        self._failures = 0
        self._opened = False
        self._next_probe = 0.0
        self._auth: str | None = None  # the refusal's message while paused
        self._auth_every = 0.0
        self._auth_armed = 0.0  # when the interval was last set
        self._auth_next_probe = 0.0
        self._lock = threading.Lock()

    def before_call(self) -> None:
        """Let the call through when closed and not paused, or when it is the next probe."""
        with self._lock:
            now = self._clock()
            if self._auth is not None:
                if now >= self._auth_next_probe:
                    self._auth_next_probe = now + self._auth_every  # this call is the probe
                    return
                raise auth_held(self._auth, self._auth_next_probe - now)
            if not self._opened:
                return
            if now >= self._next_probe:
                self._next_probe = now + self.probe_every
                return
            wait = self._next_probe - now
        raise CircuitOpen(f"the Proto API is failing: calls held, next probe in {wait:.1f} s", retry_after=wait)

    def on_success(self) -> None:
        """Close, and lift the pause."""
        with self._lock:
            self._failures = 0
            self._opened = False
            self._auth = None

    def on_auth_failure(self, message: str) -> None:
        """Pause; a refused probe (a full interval after the pause was armed) doubles the interval."""
        with self._lock:
            now = self._clock()
            if self._auth is None:
                self._auth_every = self.auth_probe_first
            elif now - self._auth_armed >= self._auth_every:
                self._auth_every = min(self._auth_every * 2, self.auth_probe_max)
            else:
                self._auth = message  # another call refused within the interval: not a probe
                return
            self._auth, self._auth_armed, self._auth_next_probe = message, now, now + self._auth_every

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


class StoreBackoff:
    """How long a call waits before asking an unreachable Redis again: doubling, up to a cap.

    Shared by the threads of a process; a reply from Redis starts it over. The wait is a hold
    (CircuitOpen), so the retry policy's time on hold bounds it and the task defers past it.
    """

    def __init__(self, first: float = STORE_RETRY_FIRST, most: float = STORE_RETRY_MAX) -> None:
        self.first, self.most = first, most
        self._failures = 0

    def next_wait(self) -> float:
        """Count a failure; the wait before the next try."""
        self._failures += 1
        return min(self.most, self.first * 2 ** (self._failures - 1))

    def reset(self) -> None:
        """Redis answered."""
        self._failures = 0


# The breaker's check as a Lua function, for any script to run before its own work: nil when the
# call may go (closed and not paused, or the caller just won the next probe), else {milliseconds to
# the next probe, the refusal's message or ''}. `fresh` ('1'): the caller's process has not called
# yet, and probes a pause for refused credentials at once (it may carry the fixed token).
HOLD_CHECK = """
local function breaker_holds(open_key, probe_key, probe_ms, auth_key, auth_probe_key, fresh)
  local auth = redis.call('HMGET', auth_key, 'message', 'every')
  if auth[1] then
    if fresh == '1' or redis.call('SET', auth_probe_key, '1', 'NX', 'PX', auth[2]) then return nil end
    return {redis.call('PTTL', auth_probe_key), auth[1]}
  end
  if redis.call('EXISTS', open_key) == 0 then return nil end
  if redis.call('SET', probe_key, '1', 'NX', 'PX', probe_ms) then return nil end
  return {redis.call('PTTL', probe_key), ''}
end
"""

_BEFORE_CALL = HOLD_CHECK + "return breaker_holds(KEYS[1], KEYS[2], ARGV[1], KEYS[3], KEYS[4], ARGV[2])"

# KEYS: auth, auth_probe; ARGV: message, first ms, max ms. The first refusal arms the pause; a
# refusal a full interval after the last arming is a probe's, and doubles the interval; others
# (calls in flight when the pause began) only refresh the message.
_AUTH_FAILED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('HMGET', KEYS[1], 'every', 'armed')
local every, armed = tonumber(cur[1]), tonumber(cur[2])
if not every then
  every = tonumber(ARGV[2])
elseif now - armed >= every then
  every = math.min(every * 2, tonumber(ARGV[3]))
else
  redis.call('HSET', KEYS[1], 'message', ARGV[1])
  return every
end
redis.call('HSET', KEYS[1], 'message', ARGV[1], 'every', every, 'armed', now)
redis.call('SET', KEYS[2], '1', 'PX', every)
return every
"""


class RedisBreaker:
    """A breaker whose state lives in Redis, shared by every worker process."""

    def __init__(
        self,
        redis_client: Any,
        name: str,
        threshold: int = 5,
        probe_every: float = 1.0,
        auth_probe_first: float = AUTH_PROBE_FIRST,
        auth_probe_max: float = AUTH_PROBE_MAX,
    ) -> None:
        import redis

        self._errors = (redis.RedisError,)
        self.redis = redis_client
        self.threshold = threshold
        self.probe_every = probe_every
        prefix = f"crmsync:breaker:{name}"
        self._failures, self._open, self._probe = f"{prefix}:failures", f"{prefix}:open", f"{prefix}:probe"
        self._auth, self._auth_probe = f"{prefix}:auth", f"{prefix}:auth-probe"
        # What a script running HOLD_CHECK needs: breaker_holds(hold_keys[1], hold_keys[2], probe_ms,
        # hold_keys[3], hold_keys[4], fresh), with fresh from `hold_args()`.
        self.hold_keys = [self._open, self._probe, self._auth, self._auth_probe]
        self.probe_ms = max(1, int(self.probe_every * 1000))
        self._auth_ms = [max(1, int(auth_probe_first * 1000)), max(1, int(auth_probe_max * 1000))]
        self._before_call = redis_client.register_script(_BEFORE_CALL)
        self._auth_failed = redis_client.register_script(_AUTH_FAILED)
        self._fresh = True
        self._fresh_lock = threading.Lock()
        self.backoff = StoreBackoff()

    def hold_args(self) -> list[Any]:
        """The arguments of HOLD_CHECK after the keys: probe_ms, and '1' for this process's first call only."""
        with self._fresh_lock:
            fresh, self._fresh = self._fresh, False
        return [self.probe_ms, "1" if fresh else "0"]

    def before_call(self) -> None:
        """Let the call through when closed and not paused, or when this process wins the next probe."""
        try:
            held = self._before_call(keys=self.hold_keys, args=self.hold_args())
        except self._errors as exc:
            raise store_unreachable("circuit breaker", exc, self.backoff.next_wait()) from None
        self.backoff.reset()
        if held is not None:
            raise self.held(held)

    def held(self, held: list[Any]) -> CircuitOpen:
        """The error of a call that HOLD_CHECK held: its answer {ms to the next probe, refusal or ''}."""
        wait = max(0.05, int(held[0]) / 1000)
        message = held[1].decode() if isinstance(held[1], bytes) else str(held[1])
        if message:
            return auth_held(message, wait)
        return CircuitOpen(f"the Proto API is failing: calls held, next probe in {wait:.1f} s", retry_after=wait)

    def on_success(self) -> None:
        """Close, and lift a pause, for every process."""
        # A success needs no bookkeeping to be a success: a Redis error here is let go.
        # One DEL whatever the state: deleting keys that do not exist writes nothing.
        with contextlib.suppress(*self._errors):
            self.redis.delete(self._failures, self._open, self._auth)

    def on_auth_failure(self, message: str) -> None:
        """Pause every process; a refused probe doubles the time to the next one."""
        # Best effort, like on_failure: the refusal itself is already on its way to the caller.
        with contextlib.suppress(*self._errors):
            self._auth_failed(keys=[self._auth, self._auth_probe], args=[message, *self._auth_ms])

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
