"""The Celery application: broker, queues, delivery guarantees and beat schedule. No logic."""

from __future__ import annotations

from celery import Celery
from celery.schedules import crontab
from kombu import Queue as KombuQueue

from .queues import Queue
from .settings import Settings, load_settings


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from `settings`."""
    app = Celery("crmsync", broker=settings.celery_broker_url, include=["worker.tasks"])
    transport: dict[str, object] = {}
    # Redis keeps a task until a worker acknowledges it after running it, so a killed
    # worker's tasks are delivered again; the embedded broker hides a message once taken
    # and cannot, and its worker loop would only process late acks every 2 s.
    acks_late = not settings.embedded_broker
    if settings.embedded_broker:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport = "worker.embedded_broker:EmbeddedTransport"
    else:
        # Consume queues in the order the worker lists them: priority before bulk.
        transport.update(
            visibility_timeout=settings.visibility_timeout,
            queue_order_strategy="priority",
            # Look for tasks of dead workers every 10 s (kombu's default scans 1 call in 10).
            unacked_restore_interval=10,
            unacked_restore_throttle=1,
        )
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=acks_late,
        task_reject_on_worker_lost=acks_late,
        worker_prefetch_multiplier=1 if acks_late else 8,
        task_default_queue=Queue.PRIORITY.value,
        task_queues=[KombuQueue(q.value) for q in Queue],
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        beat_schedule={
            "incremental-sync": {
                "task": "crmsync.plan_incremental",
                "schedule": settings.incremental_every,
                "options": {"queue": Queue.PRIORITY.value, "expires": settings.incremental_every},
            },
            "reconcile": {
                "task": "crmsync.reconcile",
                "schedule": settings.reconcile_after,
                "options": {"queue": Queue.PRIORITY.value, "expires": settings.reconcile_after},
            },
            "full-sync": {
                "task": "crmsync.plan_full",
                "schedule": crontab(*settings.full_sync_cron.split()),
                "options": {"queue": Queue.PRIORITY.value},
            },
        },
    )
    return app


app = create_app(load_settings())
