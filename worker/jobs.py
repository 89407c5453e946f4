"""The jobs behind the commands and the beat tasks: plan a run, replay dead letters, wait for a run.

Each builds what it needs from the settings of this process and nothing more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import sqlalchemy as sa

from .contact import Contact
from .errors import ConfigError, CrmsyncError
from .plan import Planner, PlanResult, Progress, planning_run
from .queues import Queue, queue_for
from .runtime import Runtime, runtime
from .source.mapping import load_mapping
from .source.reader import SourceReader, source_engine
from .sync import message
from .tickets import resend_ready_tickets

log = logging.getLogger(__name__)
RECONCILE_EVERY = 5.0
# How long `sync --wait` rides out a state DB it cannot reach before it gives up (the run goes on).
STATE_OUTAGE_LIMIT = 300.0


class RunInProgress(CrmsyncError):
    """Another run of the same kind is open (being planned, or a full run being synced): none was started.

    `run` is that run, when it is known.
    """

    def __init__(self, message: str, run: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.run = run


def celery_enqueue(queue: Queue, msgs: list[dict[str, Any]]) -> None:
    """Publish one sync task per message, over one broker connection, in pipelined batches.

    On Redis, kombu's publish batch sends the messages in a few round trips instead of one (and
    a new client object) each; a transport without batches (the embedded broker) publishes them
    one by one as before. The task's `argsrepr` names the contact and the run instead of the
    repr of the whole payload: cheaper to build, and no profile data in the message headers.
    """
    from .celery_app import app
    from .tasks import sync_customer

    with app.producer_or_acquire() as producer, producer.batch():
        for msg in msgs:
            sync_customer.apply_async(
                args=[msg], queue=queue.value, producer=producer, argsrepr=_argsrepr(msg), kwargsrepr="{}"
            )


def _argsrepr(msg: dict[str, Any]) -> str:
    """What Celery shows of a sync task's arguments (events, inspect): the contact's key and the run."""
    return f"[<contact {msg['contact']['key']!r} of run {msg.get('run_id')}>]"


def celery_enqueue_tickets(keys: list[str]) -> None:
    """Publish one create-ticket task per case key."""
    from .celery_app import app
    from .tasks import create_ticket

    with app.producer_or_acquire() as producer:
        for key in keys:
            create_ticket.apply_async(args=[key], queue=Queue.PRIORITY.value, producer=producer)


def planner(rt: Runtime) -> Planner:
    """A Planner for the configured source and mapping."""
    rt.settings.require("source_url", "mapping")
    located = load_mapping(str(rt.settings.mapping))
    reader = SourceReader(source_engine(str(rt.settings.source_url)), located.mapping, rt.settings.batch_size)
    return Planner(rt, located.mapping, reader, celery_enqueue, celery_enqueue_tickets)


@contextlib.contextmanager
def plan_lock(rt: Runtime, kind: str) -> Iterator[None]:
    """Hold the planning lease of `kind` (renewed while planning), or raise RunInProgress.

    The lease is short and renewed, so a planner killed mid-run blocks the next one for
    CRMSYNC_PLAN_LEASE seconds at most.
    """
    name, holder, ttl = f"plan:{kind}", uuid.uuid4().hex, rt.settings.plan_lease
    if not rt.store.acquire_lock(name, holder, ttl):
        planning = [r for r in rt.store.open_runs(kind) if r["status"] == "planning"]
        raise RunInProgress(
            f"another {kind} run is being planned; try again when it has finished", planning[-1] if planning else None
        )

    def lost() -> None:
        log.error("the %s planning lease was lost (the state DB was unreachable?): another run may start", kind)

    with rt.store.renewed(name, holder, ttl, lost):
        yield


@contextlib.contextmanager
def scheduler_lease(rt: Runtime, on_wait: Callable[[], None] = lambda: None, ttl: float = 30.0) -> Iterator[None]:
    """Be the one scheduler: wait for the lease, keep it renewed, stop this process if it is lost.

    The lease lives in the state DB, which every host shares, so two `crmsync beat` never
    schedule at once; a standby takes over within `ttl` seconds of the active one dying.
    """
    holder = f"{socket.gethostname()}:{os.getpid()}"
    told = False
    while not rt.store.acquire_lock("beat", holder, ttl):
        if not told:
            on_wait()
            told = True
        time.sleep(ttl / 3)

    def lost() -> None:
        log.error("the scheduler lease was lost: stopping so that only one scheduler runs")
        os.kill(os.getpid(), signal.SIGTERM)

    with rt.store.renewed("beat", holder, ttl, lost):
        yield


def plan_run(
    kind: str,
    *,
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    rt: Runtime | None = None,
) -> dict[str, Any]:
    """Plan a full or incremental run (under its lock); returns its summary.

    A full run is one at a time: while one is open (planned, or its contacts being synced),
    another would plan them all again and take them over. RunInProgress names the open one.
    """
    rt = rt or runtime()
    plan = planner(rt)
    if dry_run:
        return plan.plan(kind, force=force, dry_run=True, progress=progress).as_dict()
    with plan_lock(rt, kind):
        if kind == "full":
            rt.store.close_done_runs()  # one whose planner died, or whose contacts are all done, is over
            if open_runs := rt.store.open_runs("full"):
                raise RunInProgress(f"full run {open_runs[0]['id']} is still open", open_runs[0])
        return plan.plan(kind, force=force, progress=progress).as_dict()


def replay(
    ids: Sequence[int] = (),
    *,
    error_class: str | None = None,
    as_recorded: bool = False,
    progress: Progress | None = None,
    rt: Runtime | None = None,
    using: Planner | None = None,
) -> dict[str, Any]:
    """Replay dead letters: re-read their rows from the CRM (or resend them as recorded).

    `using` is the planner that re-reads them (default: one for the configured source).
    """
    rt = rt or runtime()
    letters = rt.store.dead_letters(state="dead", ids=ids or None, error_class=error_class)
    if not letters:
        return PlanResult("replay", None).as_dict()
    keys = sorted({str(d["provided_unique_id"]) for d in letters if d["provided_unique_id"] is not None})
    letter_ids = [d["id"] for d in letters]
    # Marked before any task can run: a contact failing again sets its letter back to dead,
    # which marking afterwards would hide.
    rt.store.set_dead_letter_state(letter_ids, "replayed", only_from="dead")
    try:
        if as_recorded:
            result = _replay_as_recorded(rt, letters)
        else:
            with plan_lock(rt, "replay"):
                result = (using or planner(rt)).plan("replay", keys=keys, progress=progress)
    except BaseException:
        rt.store.set_dead_letter_state(letter_ids, "dead", only_from="replayed")
        raise
    not_taken: set[int] = set()
    for letter in letters:
        row = rt.store.customer(str(letter["provided_unique_id"])) if letter["provided_unique_id"] else None
        if not row or row["last_run_id"] != result.run_id:
            not_taken.add(letter["id"])
    # A letter the run did not take (its row is gone from the CRM, say) stays in front of the operator.
    rt.store.set_dead_letter_state(sorted(not_taken), "dead", only_from="replayed")
    replayed = [i for i in letter_ids if i not in not_taken]
    summary = result.as_dict()
    summary["counts"]["letters"] = len(letters)
    summary["counts"]["replayed"] = len(replayed)
    return summary


def _replay_as_recorded(rt: Runtime, letters: list[dict[str, Any]]) -> PlanResult:
    with planning_run(rt, "replay") as run_id:
        result = PlanResult("replay", run_id)
        contacts = [Contact.from_payload(d["payload"]) for d in letters if "key" in d["payload"]]
        rt.store.mark_queued(run_id, [(c.key, c.version) for c in contacts])
        celery_enqueue(
            queue_for("replay"), [message(run_id, c, kind=result.kind, was_dead=True, force=True) for c in contacts]
        )
        result.counts.update(read=len(contacts), enqueued=len(contacts))
        rt.store.update_run(run_id, status="running", enqueued=len(contacts), read=len(contacts))
    return result


def queue_depth() -> int:
    """Tasks waiting on the broker, over every crmsync queue (in-flight tasks not included)."""
    from .celery_app import app
    from .metrics import broker_queue_depths

    return sum(broker_queue_depths(app, [q.value for q in Queue]).values())


def reconcile(rt: Runtime | None = None, run_id: str | None = None) -> dict[str, int]:
    """Re-send the tasks of stalled runs: planned, not done, nothing moving, nothing queued.

    A task is lost when a worker is killed with it, or Redis restarts empty. Re-sending is
    safe: a task that turns up after all finds the customer synced and sends nothing. Pending
    tickets whose customer is in Proto go again too (a send is claimed: never opened twice).
    """
    rt = rt or runtime()
    if failed := rt.store.fail_abandoned_runs():
        log.warning("runs %s: their planner stopped during planning: closed as failed", ", ".join(failed))
    if abandoned := rt.store.abandon_sending_tickets(older_than=rt.settings.task_time_limit):
        log.warning("%d tickets were being sent by a worker that stopped: left `unknown` for an operator", abandoned)
    runs = [r for r in rt.store.running_runs() if run_id in (None, r["id"])]
    stalled = {r["id"]: (r["kind"], rt.store.stalled_keys(r["id"], rt.settings.reconcile_after)) for r in runs}
    stalled = {k: v for k, v in stalled.items() if v[1]}
    tickets_waiting = bool(rt.store.ready_tickets())
    if not (stalled or tickets_waiting) or queue_depth() > 0:
        return {}
    if tickets_waiting and (sent := resend_ready_tickets(rt, celery_enqueue_tickets)):
        log.info("%d tickets whose customer is in Proto were still pending: sending them", sent)
    resent = {}
    for rid, (kind, keys) in stalled.items():
        log.warning(
            "run %s: %d contacts made no progress for %.0f s with nothing queued: re-sending them",
            rid,
            len(keys),
            rt.settings.reconcile_after,
        )
        resent[rid] = planner(rt).plan(kind, keys=keys, into_run=rid).counts["enqueued"]
    return resent


def wait_for_run(
    rt: Runtime,
    run_id: str,
    on_progress: Callable[[dict[str, int]], None] | None = None,
    alive: Callable[[], bool] = lambda: True,
    poll: float = 0.2,
    min_poll: float = 0.02,
    outage_limit: float = STATE_OUTAGE_LIMIT,
) -> dict[str, Any]:
    """Block until every contact the run planned is synced or dead-lettered; returns the closed run.

    A run still being planned is not done, however few of its contacts are queued; a run that
    failed is done (the caller tells its error). A contact the run planned and a later run
    planned again counts until that one's task is done too (see StateStore.run_waiting).

    The run's progress is read every `poll` seconds, and more often as its end nears (down to
    `min_poll`: see `next_poll`), so that the command returns soon after the last contact.
    Every few seconds it closes runs whose planner died (this one, say), and on Redis it
    reconciles the run, so tasks lost with a killed worker are re-sent once the run stalls,
    not when Redis's visibility timeout expires. A state DB out of reach is waited for, up to
    `outage_limit` seconds in a row: the run goes on meanwhile.
    """
    next_check = time.monotonic() + RECONCILE_EVERY
    first: tuple[float, int] | None = None
    outage = StateOutage(outage_limit, run_id)
    while True:
        try:
            if time.monotonic() >= next_check:
                if rt.settings.embedded_broker:
                    rt.store.fail_abandoned_runs()
                else:
                    reconcile(rt, run_id)  # which fails abandoned runs first
                next_check = time.monotonic() + RECONCILE_EVERY
            asked = time.monotonic()
            run = rt.store.run(run_id)
            if run is None:
                raise CrmsyncError(f"no run with id {run_id}")
            progress = rt.store.run_progress(run_id)
            # Contacts a later run took over are counted once the run's own are done: one query a poll till then.
            waiting = progress.get("queued", 0) or rt.store.run_waiting(run_id)
            progress["waiting"] = waiting
            if run["status"] != "failed" and run["status"] != "planning" and not waiting:
                run = rt.store.finish_run(run_id)
        except sa.exc.DBAPIError as exc:
            if not (isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) or exc.connection_invalidated):
                raise
            time.sleep(outage.failed(exc))
            continue
        outage.over()
        now = time.monotonic()
        if on_progress:
            on_progress(progress)
        if run["status"] in ("finished", "failed"):
            return run
        if not alive():
            raise CrmsyncError("the worker stopped before the run finished; see its log")
        first = first or (now, waiting)
        rate = (first[1] - waiting) / (now - first[0]) if now > first[0] else 0.0
        time.sleep(next_poll(waiting, rate, query_seconds=now - asked, poll=poll, min_poll=min_poll))


class StateOutage:
    """The state DB out of reach of a wait: said once, waited for, given up on after `limit` seconds."""

    RETRY_EVERY = 1.0

    def __init__(self, limit: float, run_id: str) -> None:
        self.limit = limit
        self.run_id = run_id
        self.since: float | None = None

    def failed(self, exc: Exception) -> float:
        """A read failed for want of the state DB: returns how long to wait before the next, or raises."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
            log.warning("state DB unreachable, retrying (for up to %.0f s): %s", self.limit, _first_line(exc))
        elif now - self.since >= self.limit:
            raise CrmsyncError(
                f"the state DB stayed unreachable for {now - self.since:.0f} s: stopped waiting for run "
                f"{self.run_id}, which goes on without this command ({_first_line(exc)})"
            )
        return self.RETRY_EVERY

    def over(self) -> None:
        """A read went through: the next failure starts a new outage."""
        if self.since is not None:
            log.warning("state DB reachable again after %.0f s", time.monotonic() - self.since)
            self.since = None


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def next_poll(queued: int, rate: float, *, query_seconds: float, poll: float, min_poll: float) -> float:
    """Seconds before the next read of a run's progress.

    `poll` while the end is far; once the contacts left would be done within two polls at the
    `rate` seen so far (contacts/s), half the time they should take, down to `min_poll`: the
    command then notices the last one within a few tens of milliseconds, not up to `poll` late.
    Never less than twice the last read took, so that a large run's progress query never keeps
    the state DB more than a third of the time busy.
    """
    wait = poll if rate <= 0 else min(poll, max(min_poll, queued / rate / 2))
    return max(wait, 2 * query_seconds)


@contextlib.contextmanager
def embedded_worker(rt: Runtime) -> Iterator[Callable[[], bool]]:
    """A real `crmsync worker` process on the embedded broker, for as long as the block runs.

    Yields a function telling whether it is still alive. Its output goes to a log file
    beside the state DB, so that the command's own output stays readable (and parseable).
    """
    if not rt.settings.embedded_broker:
        raise ConfigError("an embedded worker is only started without CRMSYNC_BROKER_URL")
    rt.settings.data_dir.mkdir(parents=True, exist_ok=True)
    log: IO[bytes] = open(rt.settings.data_dir / "worker.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "worker"],
        stdout=log,
        stderr=log,
        start_new_session=True,
        env={**os.environ, "CRMSYNC_STATE_URL": rt.settings.state_url},
    )
    try:
        yield lambda: proc.poll() is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
