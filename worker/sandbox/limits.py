"""What stands between an API request and its handler: auth, the rate limit and injected faults.

:class:`ApiGate` is an ASGI middleware rather than a FastAPI dependency because FastAPI parses
the JSON body before it runs dependencies: as a dependency, a malformed body would answer 422
ahead of a missing token, and a dropped connection needs the raw ASGI ``send``. The gate also
counts every API request, whatever its fate, for /_sandbox/stats.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import CrmsyncError
from ..proto._wire import ROUTES
from .config import API_BASE_PATH, ULID_PATTERN, SandboxConfig, is_ulid
from .store import RequestStats

# (route name of _wire.ROUTES, path parameters) of the API route a request is for.
Resolved = tuple[str, Mapping[str, Any]]
Resolver = Callable[[Scope], Resolved | None]

FAIL_STATUSES = (500, 502, 503)


class DroppedConnection(CrmsyncError):
    """Raised after a response has started, so that uvicorn closes the connection mid-answer."""


class TokenBucket:
    """`rate` tokens a second, at most `capacity` saved up; starts full."""

    def __init__(self, rate: float, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = float(capacity)
        self._updated = clock()

    def take(self) -> float:
        """Take one token: 0.0 if there was one, else the seconds until there will be."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


class RateLimiter:
    """One token bucket per sub-company; a rate of 0 means no limit."""

    def __init__(self, rate: float, capacity: int) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}
        self.configure(rate, capacity)

    def configure(self, rate: float, capacity: int) -> None:
        """Change the limit; every bucket starts again full."""
        with self._lock:
            self._rate = rate
            self._capacity = capacity
            self._buckets.clear()

    def reset(self) -> None:
        """Refill every bucket."""
        with self._lock:
            self._buckets.clear()

    def take(self, key: str) -> float:
        """0.0 if `key` may make a request now, else the seconds until it may."""
        if self._rate <= 0:
            return 0.0
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(self._rate, self._capacity)
            return bucket.take()


def retry_after(wait: float) -> str:
    """The Retry-After header for a wait: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(wait)))


class FaultInjector:
    """Draws the random part of faults from one seeded generator."""

    def __init__(self, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    def delay(self, config: SandboxConfig) -> float:
        """Seconds to hold the request: latency ± a uniform jitter, never negative."""
        if config.latency_ms <= 0 and config.jitter_ms <= 0:
            return 0.0
        with self._lock:
            jitter = self._rng.uniform(-config.jitter_ms, config.jitter_ms) if config.jitter_ms else 0.0
        return max(0.0, config.latency_ms + jitter) / 1000.0

    def failure(self, config: SandboxConfig) -> int | None:
        """A 5xx status to answer with instead of handling the request, or None."""
        with self._lock:
            if config.fail_rate > 0 and self._rng.random() < config.fail_rate:
                return self._rng.choice(FAIL_STATUSES)
        return None

    def throttle(self, config: SandboxConfig) -> bool:
        """True if this request is to be answered 429 although the rate limit lets it through."""
        with self._lock:
            return config.throttle_rate > 0 and self._rng.random() < config.throttle_rate

    def drop(self, config: SandboxConfig) -> bool:
        """True if this request's connection is to be dropped."""
        with self._lock:
            return config.drop_rate > 0 and self._rng.random() < config.drop_rate


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None if absent or malformed."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _ulid_error(value: str) -> dict[str, Any]:
    """The 422 body FastAPI gives for a path parameter that fails a `pattern`."""
    return {
        "detail": [
            {
                "type": "string_pattern_mismatch",
                "loc": ["path", "subcompany_id"],
                "msg": f"String should match pattern '{ULID_PATTERN}'",
                "input": value,
                "ctx": {"pattern": ULID_PATTERN},
            }
        ]
    }


class ApiGate:
    """ASGI middleware for everything under /api/platform: stats, auth, rate limit, faults.

    Order, for a request that matches an API route: 401 (no or malformed bearer token),
    422 (sub-company id not a ULID), 403 (token not the sub-company's), 429 (rate limit, or a random
    one of `throttle_rate`),
    then the faults (outage 503, latency, random 5xx, dropped connection), then the handler.
    Requests matching no route go straight to the app (404/405) but are still counted.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        resolve: Resolver,
        config: Callable[[], SandboxConfig],
        limiter: RateLimiter,
        faults: FaultInjector,
        stats: RequestStats,
    ) -> None:
        self.app = app
        self._resolve = resolve
        self._config = config
        self._limiter = limiter
        self._faults = faults
        self._stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass non-API requests through; guard and count the API ones."""
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path + "/").startswith(API_BASE_PATH + "/"):
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        resolved = self._resolve(scope)
        method: str = scope["method"]
        route_key = f"{method} {ROUTES[resolved[0]][1]}" if resolved else f"{method} (unmatched)"
        statuses: list[int] = []

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            await send(message)

        dropped = False
        try:
            if resolved is None:
                await self.app(scope, receive, counting_send)
            else:
                await self._guarded(scope, receive, counting_send, resolved[1])
        except DroppedConnection:
            dropped = True
            raise
        finally:
            # A handler that raised before answering gets a 500 from ServerErrorMiddleware.
            self._stats.record(route_key, None if dropped else (statuses[0] if statuses else 500), arrived)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, params: Mapping[str, Any]) -> None:
        async def reply(status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
            await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)

        config = self._config()  # one snapshot per request: /_sandbox/faults swaps it whole
        token = bearer_token(Headers(scope=scope).get("authorization"))
        if token is None:
            await reply(401, {"detail": "Not authenticated"}, {"WWW-Authenticate": "Bearer"})
            return
        sid = str(params.get("subcompany_id", ""))
        if not is_ulid(sid):
            await reply(422, _ulid_error(sid))
            return
        expected = config.tenants.get(sid)
        if expected is None or not hmac.compare_digest(expected.encode(), token.encode()):
            await reply(403, {"detail": "The bearer token does not grant access to this sub-company"})
            return
        wait = self._limiter.take(sid)
        if wait > 0 or self._faults.throttle(config):
            await reply(429, {"detail": "Rate limit exceeded"}, {"Retry-After": retry_after(wait)})
            return
        if config.outage:
            await reply(503, {"detail": "Service unavailable (sandbox outage)"})
            return
        delay = self._faults.delay(config)
        if delay > 0:
            await asyncio.sleep(delay)
        status = self._faults.failure(config)
        if status is not None:
            await reply(status, {"detail": f"Injected failure ({status})"})
            return
        if self._faults.drop(config):
            # Headers go out, then the exception makes uvicorn close the socket: the client
            # sees a response cut short, a transport error, never a status it could trust.
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            raise DroppedConnection("sandbox: connection dropped on purpose")
        await self.app(scope, receive, send)
