"""Celery tasks: wiring only. Each calls a plain function of sync.py or jobs.py."""

from __future__ import annotations

from typing import Any

from .celery_app import app
from .jobs import RunInProgress, plan_run, runtime
from .sync import sync_contact


@app.task(name="crmsync.sync_customer")
def sync_customer(msg: dict[str, Any]) -> str:
    """Sync one customer from the payload it was planned with."""
    return sync_contact(runtime(), msg).value


@app.task(name="crmsync.plan_full")
def plan_full(force: bool = False) -> dict[str, Any]:
    """Beat's nightly full sync; skipped while another full run is being planned."""
    try:
        return plan_run("full", force=force)
    except RunInProgress as exc:
        return {"skipped": str(exc)}


@app.task(name="crmsync.plan_incremental")
def plan_incremental() -> dict[str, Any]:
    """Beat's frequent incremental sync; skipped while another is being planned."""
    try:
        return plan_run("incremental")
    except RunInProgress as exc:
        return {"skipped": str(exc)}
