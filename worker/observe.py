"""Serving the metrics of a worker or beat process: the endpoint, its scrape-time gauges, closed runs.

The metric objects and their helpers live in `worker.metrics`; this module connects them to
this process's runtime (broker, breaker, state DB).
"""

from __future__ import annotations

import logging
import threading
import time

from .queues import Queue
from .runtime import Runtime

log = logging.getLogger(__name__)
# How soon a closed run shows in the metrics of the workers.
RUN_METRICS_EVERY = 2.0


def serve_metrics(rt: Runtime, port: int, *, count_runs: bool) -> None:
    """Serve ``/metrics`` on `port` from this process, with its scrape-time gauges read from `rt`.

    `count_runs` (workers): a thread also closes finished runs and counts each closed run in the
    metrics once, whichever process closed it (a `sync --wait` command, `status`, a planner),
    claimed in the state DB so that no two workers count the same run.
    """
    from . import metrics
    from .celery_app import app

    metrics.register_queue_depth(lambda: metrics.broker_queue_depths(app, [q.value for q in Queue]))
    metrics.register_breaker(rt.breaker.is_open)
    metrics.register_dead_letters(rt.store.dead_letter_classes)
    metrics.start_metrics_server(port)
    if count_runs:
        threading.Thread(target=_count_runs, args=(rt,), name="crmsync-run-metrics", daemon=True).start()


def _count_runs(rt: Runtime, every: float = RUN_METRICS_EVERY) -> None:
    from .metrics import observe_finished_run

    while True:
        try:
            rt.store.close_done_runs()
            for run in rt.store.claim_uncounted_runs():
                observe_finished_run(run)
        except Exception as exc:  # the state DB may be away for a while: the metrics wait for it
            log.warning("cannot count closed runs in the metrics: %s", exc)
        time.sleep(every)
