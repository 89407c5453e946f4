"""What `crmsync status` and `crmsync runs` show: one place that reads it all, for text or JSON."""

from __future__ import annotations

import datetime as dt
from typing import Any

from .runtime import Runtime


def _as_utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """A run row with its duration in seconds (None while it runs)."""
    end = run.get("finished_at")
    seconds = (end - run["started_at"]).total_seconds() if end else None
    return {**run, "seconds": None if seconds is None else round(seconds, 2)}


def status(rt: Runtime, limit: int = 10) -> dict[str, Any]:
    """Everything an operator looks at first: runs, lag, queue, dead letters, limiter."""
    from .jobs import queue_depth

    store = rt.store
    store.close_done_runs()
    watermark = store.cursor()
    lag = None
    if watermark:
        lag = round((dt.datetime.now(dt.UTC) - _as_utc(dt.datetime.fromisoformat(watermark))).total_seconds(), 1)
    try:
        depth: int | str = queue_depth()
    except Exception as exc:  # the broker being down is itself the news
        depth = f"unavailable ({type(exc).__name__})"
    limiter: dict[str, Any] = {"rate_limit": rt.settings.rate_limit, "shared": rt.redis is not None}
    if rt.redis is not None:
        limiter["cooldown_seconds"] = round(rt.limiter.paused_for(rt.redis), 2)  # type: ignore[attr-defined]
        limiter["breaker_open"] = rt.breaker.is_open()
    return {
        "runs": [run_summary(r) for r in store.runs(limit)],
        "customers": store.status_counts(),
        "dead_letters": store.dead_letter_classes(),
        "watermark": watermark,
        "lag_seconds": lag,
        "queue_depth": depth,
        "limiter": limiter,
        "tickets": store.ticket_counts(),
    }


def run_detail(rt: Runtime, run_id: str) -> dict[str, Any] | None:
    """One run: its counts, its customers by status, its dead letters by class."""
    run = rt.store.run(run_id)
    if run is None:
        return None
    return {
        **run_summary(run),
        "progress": rt.store.run_progress(run_id),
        "dead_letters": rt.store.dead_letter_classes(run_id=run_id),
    }
