"""The retry policy of API calls, as data: what is retried, how long to wait, when to stop.

A 429 waits exactly its Retry-After and does not spend the error budget; other retryable
errors back off exponentially with jitter, up to `max_attempts` tries in all. Waits the API
asks for (429s, an open breaker) are bounded in time, so a task always fits its time limit:
past `max_held`, the call gives up with the 429 or CircuitOpen and its task defers itself. Each retry is
counted in `worker.metrics` by its reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tenacity
from tenacity import RetryCallState

from ..errors import CircuitOpen, RateLimited, RetryableError
from ..metrics import observe_retry


@dataclass(frozen=True)
class RetryPolicy:
    """How one API call is retried."""

    max_attempts: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    # 429s are free, but not endless: an API that never lets us through is an outage.
    max_rate_limited: int = 50
    # Seconds one call may be held by 429s and an open circuit breaker before it gives up
    # (the task then defers itself: held work is delayed, never failed).
    max_held: float = 20.0

    def longest_delay(self) -> float:
        """The longest total a call may spend waiting between error retries."""
        return sum(min(self.max_backoff, self.initial_backoff * 2**i) + 1 for i in range(self.max_attempts))

    def retrying(
        self, sleep: Callable[[float], None] = tenacity.nap.sleep, retry_ticket: bool = True
    ) -> tenacity.Retrying:
        """A tenacity Retrying for one call.

        `retry_ticket=False` retries only what surely never reached the API (429,
        connection refused): a POST without an idempotency key must not be sent twice.
        """
        backoff = tenacity.wait_exponential_jitter(multiplier=self.initial_backoff, max=self.max_backoff)
        # One Retrying per call, so these tallies are the call's own. They are counted in `retry`,
        # which tenacity runs first and once per failure (`wait` runs before `stop`), so that
        # `wait` and `stop` both see the failure at hand.
        tally = {"errors": 0, "limited": 0, "held": 0.0}

        def stop(state: RetryCallState) -> bool:
            return (
                tally["errors"] >= self.max_attempts
                or tally["limited"] > self.max_rate_limited
                or tally["held"] > self.max_held
            )

        def wait(state: RetryCallState) -> float:
            exc = _exception(state)
            if isinstance(exc, RateLimited | CircuitOpen):
                return exc.retry_after
            # 429s do not grow the backoff: it follows the error attempts alone.
            return backoff(_Attempt(tally["errors"]))  # type: ignore[arg-type]

        def retry(state: RetryCallState) -> bool:
            exc = _exception(state)
            if not isinstance(exc, RetryableError):
                return False
            limited = isinstance(exc, RateLimited)
            if not (retry_ticket or limited or exc.not_sent):
                return False
            if isinstance(exc, RateLimited | CircuitOpen):
                tally["held"] += exc.retry_after  # a wait the API or the breaker asked for
            if limited:
                tally["limited"] += 1
            elif not isinstance(exc, CircuitOpen):
                tally["errors"] += 1
            return True

        def before_sleep(state: RetryCallState) -> None:
            # Only here is a retry sure to happen (`retry` may be overruled by `stop`).
            observe_retry(_exception(state))

        return tenacity.Retrying(
            wait=wait, stop=stop, retry=retry, sleep=sleep, before_sleep=before_sleep, reraise=True
        )


def _exception(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome else None


class _Attempt:
    """Just enough of a RetryCallState for tenacity's backoff strategies."""

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number
