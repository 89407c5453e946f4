"""Planning a run: read the source, compare each contact with what Proto holds, enqueue the changes.

A full sync reads every contact in key order; an incremental sync reads from the stored
watermark minus a lookback window, in (updated_at, key) order; a replay reads given keys.
Each page is compared with the state in one query, marked queued in one write, then
enqueued; only then does the watermark move past it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import multiprocessing
import pickle
import queue as queue_module
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .contact import PARTS, Contact, key_text, payload_hash, with_tag
from .errors import CrmsyncError, InvalidRecord, SourceError
from .fields import FIELDS_LOCK, FieldSpec, create_missing
from .logs import redact
from .queues import Queue, queue_for
from .runtime import Runtime
from .settings import Settings
from .source.mapping import Mapping
from .source.reader import InvalidRow, RawPage, SourceReader, Verdict, earlier_of, later_of
from .state.models import utcnow
from .state.store import PartHashes, run_lease
from .sync import message
from .tickets import plan_tickets

log = logging.getLogger(__name__)

Enqueue = Callable[[Queue, list[dict[str, Any]]], None]
EnqueueTickets = Callable[[list[str]], None]
Progress = Callable[[Counter[str]], None]
PREVIEW = 10
# Tasks marked queued and published at a time: the first reach the workers while the first page is
# still being published. Each chunk of a run is twice the one before, up to a page: the first page
# costs a handful of state writes (50, 100, 200, 400, 250), every later page one (each a commit,
# which on PostgreSQL waits for its log to reach the disk).
ENQUEUE_CHUNK = 50
# A full read is planned in parallel key ranges when each range has at least this many pages:
# below it, starting a process (about a second of imports) costs more than it saves.
PARALLEL_MIN_PAGES = 20
# Ranges a process, taken from one shared list by whichever process is free: a process that
# starts late (a second of imports) or runs slow (a busy core) takes fewer.
RANGES_PER_PROCESS = 4
COUNTS = (
    "read",
    "new",
    "changed",
    "unchanged",
    "invalid",
    "deleted",
    "enqueued",
    "part_profile",
    "part_tags",
    "part_fields",
)


@dataclass
class PlanResult:
    """What planning found and did."""

    kind: str
    run_id: str | None
    counts: Counter[str] = field(default_factory=Counter)
    preview: list[dict[str, Any]] = field(default_factory=list)
    chunk: int = ENQUEUE_CHUNK  # the next enqueue chunk's size (see ENQUEUE_CHUNK)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary; every standard count is present, zero or not."""
        counts = {k: self.counts[k] for k in COUNTS} | dict(self.counts)
        return {"kind": self.kind, "run_id": self.run_id, "counts": counts, "preview": self.preview}


class Planner:
    """Plans runs of one mapping against one state DB."""

    def __init__(
        self,
        rt: Runtime,
        mapping: Mapping,
        reader: SourceReader,
        enqueue: Enqueue,
        enqueue_tickets: EnqueueTickets | None = None,
    ) -> None:
        self.rt = rt
        self.mapping = mapping
        self.reader = reader
        self.enqueue = enqueue
        self.enqueue_tickets = enqueue_tickets
        self.queue: Queue | None = None  # set: every task goes there (a key range of a full run)
        # True while a full read runs over a state DB that held no customer when it began (a first
        # sync): no page has anything to look up. Only this run's own tasks add state rows then,
        # for keys it has read already, and each task checks the state again before it calls.
        self.state_was_empty = False

    def plan(
        self,
        kind: str,
        *,
        force: bool = False,
        dry_run: bool = False,
        keys: Sequence[str] | None = None,
        progress: Progress | None = None,
        into_run: str | None = None,
    ) -> PlanResult:
        """Plan one run of `kind` (full, incremental, replay); returns its counts.

        `into_run` plans `keys` again into that existing run (the reconciler's re-send of
        lost tasks) instead of opening a new one. Whatever stops the planning of a run (an
        error, its planner's death) closes it failed: see `planning_run`.
        """
        options: dict[str, Any] = dict(force=force, dry_run=dry_run, keys=keys, progress=progress)
        if dry_run:
            result = PlanResult(kind, None)
            self._plan(result, into_run=False, **options)
            return result
        if into_run:
            result = PlanResult(kind, into_run)
            try:
                self._plan(result, into_run=True, **options)
            except Exception as exc:
                self.rt.store.fail_run(into_run, redact(str(exc)))
                raise
            return result
        self.rt.store.close_done_runs()
        with planning_run(self.rt, kind) as run_id:
            result = PlanResult(kind, run_id)
            self._plan(result, into_run=False, **options)
        return result

    def _plan(
        self,
        result: PlanResult,
        *,
        force: bool,
        dry_run: bool,
        keys: Sequence[str] | None,
        progress: Progress | None,
        into_run: bool,
    ) -> None:
        """Plan `result`'s run: read, compare, enqueue; then move the watermark and close the planning."""
        # First of all: a mapping naming a column the source does not return reads and sends nothing.
        self.reader.verify()
        store = self.rt.store
        kind = result.kind
        since = self._since() if kind == "incremental" else None
        changed = self.mapping_changes()
        if kind == "incremental" and changed and since is not None:
            # Rows untouched since the last run may now map differently: read them all once.
            log.warning(
                "the mapping changed (%s) since the last full sync: this run reads every contact", ", ".join(changed)
            )
            result.counts["mapping_changed"] = 1
            since = None
        registry = store.field_ids()
        full_read = since is None and result.run_id is not None and not into_run and not keys
        # A full read goes in key order: a row changed while it runs may be on a page already read.
        # The watermark stops at the newest row that existed when it began (the signpost).
        signpost = self.reader.max_updated() if full_read else None
        self.state_was_empty = full_read and not store.has_customers()
        splits = self._key_splits() if full_read else []
        if splits:
            newest = self._plan_in_parallel(splits, result, registry, force=force, progress=progress)
        else:
            pages = self.reader.raw_pages(since=since, keys=keys)
            newest = self._plan_pages(pages, result, registry, force=force, dry_run=dry_run, progress=progress)
        if self.mapping.tickets and result.run_id and not into_run and kind != "replay" and self.enqueue_tickets:
            result.counts.update(plan_tickets(self.rt, self.reader, self.mapping.tickets, self.enqueue_tickets))
        if full_read:
            # Every contact was read: the watermark may move, and this mapping is now the baseline.
            if newest is not None and signpost is not None:
                store.advance_cursor(earlier_of(newest, signpost))
            store.record_mapping(self.mapping.part_fingerprints())
        if result.run_id and not into_run:
            c = result.counts
            planned = store.update_run(
                result.run_id,
                only_from="planning",
                status="running",
                planned_at=utcnow(),
                read=c["read"],
                changed=c["changed"],
                enqueued=c["enqueued"],
                unchanged=c["unchanged"],
                invalid=c["invalid"],
                deleted=c["deleted"],
            )
            if not planned:
                # Its lease lapsed (the state DB was away longer than CRMSYNC_PLAN_LEASE) and another
                # process closed it: its tasks still sync, but the run stays as that process closed it.
                raise PlanningFailed(f"run {result.run_id} was closed as failed while it was being planned")
            if not c["enqueued"]:
                store.finish_run(result.run_id)

    def _plan_pages(
        self,
        pages: Iterable[RawPage],
        result: PlanResult,
        registry: dict[str, str],
        *,
        force: bool,
        dry_run: bool,
        progress: Progress | None,
        between_pages: Callable[[], None] | None = None,
    ) -> Any:
        """Plan each page in turn; returns the newest updated_at read."""
        newest = None
        for page in pages:
            self._plan_page(page, result, registry, force=force, dry_run=dry_run)
            newest = later_of(newest, page.max_updated)
            if between_pages:
                between_pages()
            if progress:
                progress(result.counts)
        return newest

    def _key_splits(self) -> list[Any]:
        """Where to cut a full read into one key range per planning process (none: plan here)."""
        processes = self.rt.settings.plan_processes
        if processes < 2 or multiprocessing.current_process().daemon:
            return []  # a daemonic process (a prefork pool's child) may not start processes
        try:
            pickle.dumps(self.enqueue)  # the other processes import it by name: a closure cannot go
        except (pickle.PicklingError, AttributeError, TypeError):
            log.debug("planning in one process: the enqueue function %r cannot be sent to another", self.enqueue)
            return []
        min_rows = PARALLEL_MIN_PAGES * self.reader.batch_size
        return self.reader.key_splits(processes * RANGES_PER_PROCESS, min_rows=min_rows // RANGES_PER_PROCESS)

    def _plan_in_parallel(
        self, splits: list[Any], result: PlanResult, registry: dict[str, str], *, force: bool, progress: Progress | None
    ) -> Any:
        """Plan a full read as key ranges, in this process and CRMSYNC_PLAN_PROCESSES - 1 others.

        The canonical form, the diff and the state writes are plain Python, bound to one core;
        ranges planned side by side use the others. Every process takes the next range from one
        shared list when it is free, writes its contacts' state and enqueues their tasks; this
        one also merges the counts as they come, and waits for every range.
        """
        assert result.run_id is not None
        context = multiprocessing.get_context("spawn")  # no fork: this process holds threads and pools
        events: Any = context.Queue()
        todo: Any = context.SimpleQueue()  # written at once, no feeder thread: what is put is there
        ranges = list(zip([None, *splits], [*splits, None], strict=True))
        helpers = self.rt.settings.plan_processes - 1
        for index in range(len(ranges)):
            todo.put(index)
        for _ in range(helpers + 1):
            todo.put(None)  # one "no more" for each process, this one included, after every range
        queue = self._queue(result)
        job = RangeJob(
            self.rt.settings,
            self.mapping,
            self.enqueue,
            result.run_id,
            queue,
            force,
            ranges,
            state_was_empty=self.state_was_empty,
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        procs = [
            context.Process(target=plan_ranges, args=(job, todo, events), name=f"crmsync-plan-{i}", daemon=True)
            for i in range(1, helpers + 1)
        ]
        for proc in procs:
            proc.start()
        result.counts["key_ranges"] = len(ranges)
        done: dict[int, tuple[list[dict[str, Any]], Any]] = {}

        def collect(wait: float = 0.0) -> None:
            while True:
                try:
                    kind, index, payload = events.get(timeout=wait) if wait else events.get_nowait()
                except queue_module.Empty:
                    return
                wait = 0.0
                if kind == "counts":
                    result.counts.update(payload)
                elif kind == "done":
                    done[index] = payload
                else:
                    raise RangeFailed(ranges[index], payload)

        try:
            newest = None
            while (index := todo.get()) is not None:
                pages = self.reader.raw_pages(start_after=ranges[index][0], stop_at=ranges[index][1])
                try:
                    here = self._plan_pages(
                        pages, result, registry, force=force, dry_run=False, progress=progress, between_pages=collect
                    )
                except RangeFailed:
                    raise
                except SourceError as exc:
                    raise RangeFailed(ranges[index], str(exc)) from exc
                done[index] = ([], here)
            while len(done) < len(ranges):
                collect(wait=1.0)
                if len(done) < len(ranges) and not any(proc.is_alive() for proc in procs):
                    collect()  # their last words, if they had time to say them
                    if len(done) < len(ranges):
                        codes = ", ".join(str(proc.exitcode) for proc in procs)
                        raise SourceError(f"a planning process died (exit codes {codes})")
                if progress:
                    progress(result.counts)
        finally:
            for proc in procs:
                if proc.is_alive() and len(done) < len(ranges):
                    proc.terminate()
                proc.join()
        for index in sorted(done):
            preview, range_newest = done[index]
            result.preview.extend(preview[: max(0, PREVIEW - len(result.preview))])
            newest = later_of(newest, range_newest)
        return newest

    def mapping_changes(self) -> list[str]:
        """Parts (profile, tags, fields) whose mapping changed since the last full sync."""
        before = self.rt.store.mapping_fingerprints()
        if before is None:
            return []
        now = self.mapping.part_fingerprints()
        return [part for part in now if before.get(part) != now[part]]

    def _since(self) -> dt.datetime | None:
        cursor = self.rt.store.cursor()
        if cursor is None:
            return None  # no watermark yet: read everything once
        return dt.datetime.fromisoformat(cursor) - dt.timedelta(seconds=self.rt.settings.lookback_seconds)

    def _plan_page(
        self, raw: RawPage, result: PlanResult, registry: dict[str, str], *, force: bool, dry_run: bool
    ) -> None:
        counts = result.counts
        settings = self.rt.settings
        key_column = self.mapping.source.key
        state = (
            {}
            if self.state_was_empty
            else self.rt.store.lookup({key_text(r[key_column]) for r in raw.rows if r.get(key_column) is not None})
        )
        page = self.reader.build_page(raw, self._verdict(state, force=force))
        counts["read"] += len(page)
        counts["deleted"] += len(page.deleted)
        counts.update(page.ruled_out)
        # Proto cannot delete: a deleted contact already in Proto is tagged, or left as it is.
        candidates = list(page.contacts)
        if settings.deleted_policy == "tag":
            candidates += [with_tag(c, settings.deleted_tag) for c in page.deleted if c.key in state]
        planned: list[tuple[Contact, bool]] = []
        refreshed: list[tuple[str, str, dict[str, str]]] = []
        for contact in candidates:
            synced = state.get(contact.key)
            if settings.sync_mode == "create-only" and synced is not None and synced.profile is not None:
                counts["skipped_existing"] += 1
                continue
            parts = [p for p in PARTS if force or synced is None or contact.hashes[p] != synced.get(p)]
            retry_dead = force or result.kind == "replay"
            # Dead (an invalid row, a duplicated key) though Proto holds this very contact: its
            # task sends nothing, records it synced and resolves its letters.
            revived = not parts and synced is not None and synced.status == "dead"
            if not revived and (
                not parts or (not retry_dead and synced and synced.failed_hash == payload_hash(contact))
            ):
                # Unchanged, or dead-lettered as it stands: only a change or a replay resends it.
                counts["unchanged"] += 1
                fingerprint = page.fingerprints.get(contact.key)
                if (
                    fingerprint
                    and not parts
                    and synced
                    and synced.status == "synced"
                    and fingerprint != synced.fingerprint
                ):
                    refreshed.append((contact.key, fingerprint, contact.hashes))
                continue
            counts["new" if synced is None else "changed"] += 1
            counts.update(f"part_{p}" for p in parts)
            planned.append((contact, synced is not None and synced.status == "dead"))
            if len(result.preview) < PREVIEW:
                result.preview.append({"key": contact.key, "parts": parts, "new": synced is None})
        counts["invalid"] += len(page.invalid)
        if dry_run or result.run_id is None:
            return
        run_id = result.run_id
        self._record_invalid(page.invalid, run_id)
        # A row edited outside the mapping's view builds the contact Proto holds: remember its new
        # fingerprint, or every later full sync builds it again.
        self.rt.store.refresh_fingerprints(refreshed)
        if planned:
            self._ensure_fields(planned, registry)
            update_only = settings.sync_mode == "update-only"
            tickets = self.mapping.tickets is not None
            queue = self.queue or self._queue(result)
            # In growing chunks, so that workers start on the first tasks while the rest are published.
            start, size = 0, result.chunk
            while start < len(planned):
                chunk = planned[start : start + size]
                self.rt.store.mark_queued(run_id, [(c.key, c.version) for c, _ in chunk])
                msgs = [
                    message(
                        run_id,
                        c,
                        kind=result.kind,
                        was_dead=d,
                        force=force,
                        update_only=update_only,
                        tickets=tickets,
                        fingerprint=page.fingerprints.get(c.key),
                    )
                    for c, d in chunk
                ]
                self.enqueue(queue, msgs)
                counts["enqueued"] += len(msgs)
                start, size = start + size, size * 2
                result.chunk = min(size, self.reader.batch_size)
        if raw.max_updated is not None and result.kind == "incremental":
            # Pages come in updated_at order: all before this point is durably planned.
            self.rt.store.advance_cursor(raw.max_updated)

    @staticmethod
    def _queue(result: PlanResult) -> Queue:
        """A run that reads every contact is bulk work, whatever its kind: fresh changes go first."""
        return queue_for("full") if result.counts["mapping_changed"] else queue_for(result.kind)

    def _verdict(self, state: dict[str, PartHashes], *, force: bool) -> Verdict:
        """Which rows need no building: the ones whose contact is known not to be sent.

        In create-only mode, a customer already in Proto; otherwise (unless forced) a row
        whose fingerprint is the one of the row last synced in full.
        """
        create_only = self.rt.settings.sync_mode == "create-only"

        def verdict(key: str, fingerprint: str) -> str | None:
            synced = state.get(key)
            if synced is None:
                return None
            if create_only and synced.profile is not None:
                return "skipped_existing"
            if not force and synced.unchanged_since_synced(fingerprint):
                return "unchanged"
            return None

        return verdict

    def _record_invalid(self, rows: list[InvalidRow], run_id: str) -> None:
        for row in rows:
            err: InvalidRecord = row.error
            self.rt.store.add_dead_letter(
                row.key,
                run_id,
                {"row": row.row},
                error_class=f"InvalidRecord.{err.code}",
                message=f"{err.field}: {err}" if err.field else str(err),
            )
        keyed = list(dict.fromkeys(r.key for r in rows if r.key is not None))  # a duplicated key once
        if keyed:
            self.rt.store.mark_dead(keyed, run_id, "invalid record")

    def _ensure_fields(self, planned: list[tuple[Contact, bool]], registry: dict[str, str]) -> None:
        """Create in Proto the custom fields these contacts use and the registry lacks."""
        needed = {name for c, _ in planned for name in c.fields} - set(registry)
        if not needed:
            return
        # Held while creating: another planner (a key range of this run, an incremental run)
        # may need the same field now, and Proto would take a second field of the same name.
        with self.rt.store.holding(FIELDS_LOCK):
            registry.update(self.rt.store.field_ids())
            if needed := needed - set(registry):
                self._create_fields(needed, registry)

    def _create_fields(self, needed: set[str], registry: dict[str, str]) -> None:
        specs = {f.name: f for f in self.mapping.column_fields}
        wanted: dict[str, FieldSpec] = {}
        for name in needed:
            spec = specs.get(name)
            wanted[name] = (spec.type, spec.options) if spec else (self.mapping.query_field_type(name), None)
        registry.update(create_missing(self.rt, wanted))


class PlanningFailed(CrmsyncError):
    """A run's planning stopped on an error from below crmsync (the run is closed failed)."""


@contextlib.contextmanager
def planning_run(rt: Runtime, kind: str) -> Iterator[str]:
    """Open a run of `kind` for the block that plans it; yields the run's id.

    The run's planning lease is renewed while the block runs, so that a planner that dies
    (SIGKILL, a lost host) leaves a run that the next `close_done_runs` (the next planning,
    beat's reconciler, `status`) fails once CRMSYNC_PLAN_LEASE has passed. An error in the
    block fails the run at once, with the error, and goes on up: a CrmsyncError as it is, any
    other error as a PlanningFailed that names the run (one line, no traceback, for the CLI).
    """
    store = rt.store
    ttl = rt.settings.plan_lease
    run_id = store.start_run(kind, lease=ttl)

    def lost() -> None:
        log.error("run %s: its planning lease was lost (state DB unreachable?): it may be closed as failed", run_id)

    try:
        with store.renewed(run_lease(run_id), run_id, ttl, lost):
            yield run_id
    except BaseException as exc:
        error = redact(str(exc) if isinstance(exc, CrmsyncError) else f"{type(exc).__name__}: {exc}")
        try:
            store.fail_run(run_id, error)
        except Exception as closing:  # the state DB is away: the lease expires, and the run is failed then
            log.warning("run %s: cannot record its failure now (%s): it is once its lease expires", run_id, closing)
        if isinstance(exc, Exception) and not isinstance(exc, CrmsyncError):
            log.debug("planning run %s failed", run_id, exc_info=exc)
            raise PlanningFailed(f"run {run_id} failed: {error.splitlines()[0]}") from exc
        raise


class PlannerGone(CrmsyncError):
    """A planning helper process found the process it plans for dead."""


class RangeFailed(SourceError):
    """Planning one key range of a full run failed (in this process or another)."""

    def __init__(self, key_range: tuple[Any, Any], reason: str) -> None:
        first, upto = key_range
        super().__init__(f"planning the keys after {first!r} up to {upto!r} failed: {reason}")


@dataclass(frozen=True)
class RangeJob:
    """A full run's key ranges, planned by processes of their own (see Planner._plan_in_parallel)."""

    settings: Settings
    mapping: Mapping
    enqueue: Enqueue
    run_id: str
    queue: Queue
    force: bool
    ranges: list[tuple[Any, Any]]  # (start_after, stop_at) of each
    state_was_empty: bool = False  # see Planner.state_was_empty
    log_level: int = logging.WARNING


def plan_ranges(job: RangeJob, todo: Any, events: Any) -> None:
    """Plan the ranges taken from `todo` until it says no more (None).

    Reports the counts after each page, ("done", index, (preview, newest)) after each range,
    or ("failed", index, reason) and stops.
    """
    from .logs import configure_logging, wants_json  # in the new process
    from .runtime import Runtime
    from .source.reader import source_engine

    configure_logging(json=wants_json(job.settings.log_format), level=logging.getLevelName(job.log_level))
    index = -1
    try:
        rt = Runtime(job.settings)
        reader = SourceReader(source_engine(str(job.settings.source_url)), job.mapping, job.settings.batch_size)
        planner = Planner(rt, job.mapping, reader, job.enqueue)
        planner.queue = job.queue
        planner.state_was_empty = job.state_was_empty
        registry = rt.store.field_ids()
        while (index := todo.get()) is not None:
            events.put(("done", index, _plan_range(planner, job, index, registry, events)))
    except Exception as exc:  # reported to the planning process, which fails the run
        log.exception("planning key range %d failed", index)
        events.put(("failed", index, f"{type(exc).__name__}: {exc}"))


def _plan_range(planner: Planner, job: RangeJob, index: int, registry: dict[str, str], events: Any) -> tuple[Any, Any]:
    """Plan range `index` of `job`, its counts reported after each page; returns (preview, newest)."""
    result = PlanResult("full", job.run_id)
    reported: Counter[str] = Counter()

    def report() -> None:
        events.put(("counts", index, result.counts - reported))
        reported.update(result.counts - reported)

    parent = multiprocessing.parent_process()

    def between_pages() -> None:
        # A planner killed outright (SIGKILL, the OOM killer) cannot stop its helpers: each stops
        # itself at its next page, so that nothing more is enqueued under the run being failed.
        if parent is not None and not parent.is_alive():
            raise PlannerGone(f"the planning process of run {job.run_id} died: key range {index} stopped")
        report()

    start_after, stop_at = job.ranges[index]
    pages = planner.reader.raw_pages(start_after=start_after, stop_at=stop_at)
    newest = planner._plan_pages(
        pages, result, registry, force=job.force, dry_run=False, progress=None, between_pages=between_pages
    )
    report()
    return result.preview, newest
