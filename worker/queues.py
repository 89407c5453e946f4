"""The Celery queues, in one place: the app's routes, the worker's -Q and ops/ use these names."""

from __future__ import annotations

from enum import StrEnum


class Queue(StrEnum):
    """Workers serve PRIORITY ahead of BULK, so a nightly backlog never delays a fresh change."""

    PRIORITY = "crmsync.priority"
    BULK = "crmsync.bulk"


def queue_for(kind: str) -> Queue:
    """The queue of a run's tasks: full syncs are bulk work, the rest is near-real-time."""
    return Queue.BULK if kind == "full" else Queue.PRIORITY
