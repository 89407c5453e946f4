"""Celery tasks: wiring only. Each calls a plain function of sync.py or jobs.py.

Every line a task logs (Celery's own included) carries its task_id; a sync task's lines also
carry its run_id and contact key.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.signals import task_prerun

from .celery_app import app
from .errors import CircuitOpen, RateLimited
from .logs import bind_context, clear_context
from .runtime import runtime
from .sync import sync_contact

# Well below the broker's visibility timeout, so a deferred task is never delivered twice.
DEFER_SECONDS = 15


@task_prerun.connect(weak=False)
def _bind_task(task_id: str | None = None, task: Task | None = None, **_: Any) -> None:
    """Start each task's log context afresh: pool threads are reused from task to task."""
    clear_context()
    bind_context(task_id=task_id, task=task.name if task is not None else None)


@app.task(name="crmsync.sync_customer", bind=True, max_retries=None)
def sync_customer(self: Task, msg: dict[str, Any]) -> str:
    """Sync one customer from the payload it was planned with.

    While the circuit breaker holds the API, or the API keeps answering 429 past a call's time
    on hold, the task defers itself: delayed, never failed.
    """
    bind_context(run_id=msg.get("run_id"), key=msg.get("contact", {}).get("key"))
    try:
        return sync_contact(runtime(), msg).value
    except (CircuitOpen, RateLimited) as exc:
        raise self.retry(countdown=DEFER_SECONDS, exc=exc) from None


@app.task(name="crmsync.plan_full")
def plan_full(force: bool = False) -> dict[str, Any]:
    """Beat's nightly full sync; skipped while another full run is being planned."""
    from .jobs import RunInProgress, plan_run  # planning needs the source: imported where used

    try:
        return plan_run("full", force=force)
    except RunInProgress as exc:
        return {"skipped": str(exc)}


@app.task(name="crmsync.plan_incremental")
def plan_incremental() -> dict[str, Any]:
    """Beat's frequent incremental sync; skipped while another is being planned."""
    from .jobs import RunInProgress, plan_run

    try:
        return plan_run("incremental")
    except RunInProgress as exc:
        return {"skipped": str(exc)}


@app.task(name="crmsync.reconcile")
def reconcile_runs() -> dict[str, int]:
    """Beat's check for runs whose tasks were lost (killed worker, Redis restarted empty)."""
    from .jobs import reconcile

    return reconcile()


@app.task(name="crmsync.create_ticket")
def create_ticket(key: str) -> str:
    """Open one CRM case as a Proto ticket, exactly once."""
    from .tickets import send_ticket

    return send_ticket(runtime(), key)
