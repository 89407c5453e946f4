"""RetryPolicy as data: which failures are retried, how long each wait is, when it stops."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from worker.errors import PermanentError, RateLimited, RetryableError
from worker.proto import RetryPolicy

Outcome = BaseException | str


def error(not_sent: bool = False) -> RetryableError:
    return RetryableError("HTTP 503", status=503, not_sent=not_sent)


def limited(retry_after: float = 1.0) -> RateLimited:
    return RateLimited("HTTP 429", retry_after=retry_after, status=429)


class Script:
    """A call that fails or answers as scripted, one outcome per try."""

    def __init__(self, outcomes: Sequence[Outcome]) -> None:
        self.outcomes = list(outcomes)
        self.tries = 0

    def __call__(self) -> str:
        outcome = self.outcomes[self.tries]
        self.tries += 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def run(policy: RetryPolicy, outcomes: Sequence[Outcome], *, retry_ticket: bool = True) -> tuple[Script, list]:
    """Run the script under `policy`; returns it (for its tries) and the waits slept, in order."""
    script = Script(outcomes)
    sleeps: list[float] = []
    result = policy.retrying(sleep=sleeps.append, retry_ticket=retry_ticket)(script)
    assert result == "ok"
    return script, sleeps


def run_failing(
    policy: RetryPolicy, outcomes: Sequence[Outcome], *, retry_ticket: bool = True
) -> tuple[Script, list[float], BaseException]:
    """Run a script that ends in failure; returns it, the waits, and the exception raised."""
    script = Script(outcomes)
    sleeps: list[float] = []
    with pytest.raises(BaseException) as caught:
        policy.retrying(sleep=sleeps.append, retry_ticket=retry_ticket)(script)
    return script, sleeps, caught.value


def test_errors_are_tried_max_attempts_times_then_the_last_is_raised() -> None:
    last = error()
    script, sleeps, raised = run_failing(RetryPolicy(max_attempts=3), [error(), error(), last, "ok"])
    assert script.tries == 3
    assert raised is last
    assert len(sleeps) == 2


def test_max_attempts_counts_only_errors_not_429s() -> None:
    outcomes = [error(), limited(), limited(), error(), limited(), error(), "ok"]
    script, sleeps, raised = run_failing(RetryPolicy(max_attempts=3), outcomes)
    assert script.tries == 6
    assert raised is outcomes[5]
    assert len(sleeps) == 5
    assert [sleeps[1], sleeps[2], sleeps[4]] == [1.0, 1.0, 1.0]  # the 429s' own waits

    script, _ = run(RetryPolicy(max_attempts=2), [limited(), limited(), limited(), error(), limited(), "ok"])
    assert script.tries == 6


def test_a_single_try_still_waits_out_every_429() -> None:
    script, sleeps = run(RetryPolicy(max_attempts=1), [limited(2.0), limited(3.0), limited(4.0), "ok"])
    assert script.tries == 4
    assert sleeps == [2.0, 3.0, 4.0]


def test_429s_are_not_endless() -> None:
    script, sleeps, raised = run_failing(RetryPolicy(max_rate_limited=3), [limited()] * 10)
    assert script.tries == 4
    assert isinstance(raised, RateLimited)
    assert sleeps == [1.0, 1.0, 1.0]


def test_429_waits_are_bounded_in_time_by_the_time_on_hold() -> None:
    script, sleeps, raised = run_failing(RetryPolicy(max_held=2.5), [limited(1.0)] * 10)
    assert isinstance(raised, RateLimited)
    assert sleeps == [1.0, 1.0]  # a third second of waiting would pass 2.5 s on hold
    assert script.tries == 3


def test_a_429_waits_exactly_its_retry_after() -> None:
    policy = RetryPolicy(initial_backoff=100.0, max_backoff=1000.0)
    _, sleeps = run(policy, [limited(2.5), limited(0.0), limited(7.0), "ok"])
    assert sleeps == [2.5, 0.0, 7.0]


def test_backoff_grows_with_error_attempts_only() -> None:
    # Jitter adds at most 1 s, so with a 10 s start each step is told apart from the next.
    policy = RetryPolicy(max_attempts=5, initial_backoff=10.0, max_backoff=1000.0)
    outcomes = [error(), limited(3.0), error(), limited(3.0), limited(3.0), error(), error(), "ok"]
    _, sleeps = run(policy, outcomes)

    assert len(sleeps) == 7
    error_waits = [sleeps[0], sleeps[2], sleeps[5], sleeps[6]]
    assert [sleeps[1], sleeps[3], sleeps[4]] == [3.0, 3.0, 3.0]
    for wait, base in zip(error_waits, [10.0, 20.0, 40.0, 80.0], strict=True):
        assert base <= wait <= base + 1.0


def test_backoff_is_capped_at_max_backoff() -> None:
    policy = RetryPolicy(max_attempts=6, initial_backoff=1.0, max_backoff=3.0)
    _, sleeps = run(policy, [error()] * 5 + ["ok"])
    assert all(0 < wait <= 3.0 for wait in sleeps)
    assert sleeps[-2:] == [3.0, 3.0]


def test_permanent_errors_and_foreign_exceptions_are_never_retried() -> None:
    for retry_ticket in (True, False):
        for exc in (PermanentError("HTTP 404", status=404), ValueError("a bug")):
            script, sleeps, raised = run_failing(RetryPolicy(), [exc, "ok"], retry_ticket=retry_ticket)
            assert (script.tries, sleeps, raised) == (1, [], exc)


def test_without_retry_ticket_only_429s_and_unsent_requests_are_retried() -> None:
    policy = RetryPolicy(max_attempts=5)

    maybe_sent = error(not_sent=False)
    script, sleeps, raised = run_failing(policy, [maybe_sent, "ok"], retry_ticket=False)
    assert (script.tries, sleeps, raised) == (1, [], maybe_sent)

    script, _ = run(policy, [error(not_sent=True), limited(), error(not_sent=True), "ok"], retry_ticket=False)
    assert script.tries == 4

    # A 429 on the way does not make a maybe-sent failure retryable.
    script, _, raised = run_failing(policy, [limited(), maybe_sent, "ok"], retry_ticket=False)
    assert (script.tries, raised) == (2, maybe_sent)


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(),
        RetryPolicy(max_attempts=1),
        RetryPolicy(max_attempts=8, initial_backoff=0.01, max_backoff=0.05),
        RetryPolicy(max_attempts=10, initial_backoff=2.0, max_backoff=5.0),
        RetryPolicy(max_attempts=4, initial_backoff=0.0, max_backoff=0.0),
    ],
    ids=repr,
)
def test_longest_delay_bounds_the_waits_of_a_failing_call(policy: RetryPolicy) -> None:
    for _ in range(50):  # the jitter is random: try it many times
        script, sleeps, _ = run_failing(policy, [error()] * (policy.max_attempts + 1))
        assert script.tries == policy.max_attempts
        assert len(sleeps) == policy.max_attempts - 1
        assert sum(sleeps) <= policy.longest_delay()


def test_each_call_gets_its_own_error_budget() -> None:
    policy = RetryPolicy(max_attempts=2)
    first, _, _ = run_failing(policy, [error(), error(), "ok"])
    second, _ = run(policy, [error(), "ok"])
    assert (first.tries, second.tries) == (2, 2)
