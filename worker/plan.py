"""Planning a run: read the source, compare each contact with what Proto holds, enqueue the changes.

A full sync reads every contact in key order; an incremental sync reads from the stored
watermark minus a lookback window, in (updated_at, key) order; a replay reads given keys.
Each page is compared with the state in one query, marked queued in one write, then
enqueued; only then does the watermark move past it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .contact import PARTS, Contact, payload_hash, with_tag
from .errors import InvalidRecord
from .queues import Queue, queue_for
from .runtime import Runtime
from .source.mapping import Mapping
from .source.reader import InvalidRow, Page, SourceReader, earlier_of
from .state.models import utcnow
from .sync import message
from .tickets import plan_tickets

log = logging.getLogger(__name__)

Enqueue = Callable[[Queue, list[dict[str, Any]]], None]
EnqueueTickets = Callable[[list[str]], None]
Progress = Callable[[Counter[str]], None]
PREVIEW = 10
# Tasks marked queued and published at a time: the first reach the workers while the page is still
# being published. Each chunk of a page is twice the one before, so a full page of a full sync costs
# a handful of state writes (50, 100, 200, 400, 250), not twenty.
ENQUEUE_CHUNK = 50
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
        lost tasks) instead of opening a new one.
        """
        store = self.rt.store
        if into_run:
            result = PlanResult(kind, into_run)
        else:
            store.close_done_runs()
            result = PlanResult(kind, None if dry_run else store.start_run(kind))
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
        newest: dt.datetime | None = None
        full_read = since is None and result.run_id is not None and not into_run and not keys
        # A full read goes in key order: a row changed while it runs may be on a page already read.
        # The watermark stops at the newest row that existed when it began (the signpost).
        signpost = self.reader.max_updated() if full_read else None
        try:
            for page in self.reader.pages(since=since, keys=keys):
                self._plan_page(page, result, registry, force=force, dry_run=dry_run)
                if page.max_updated is not None and (newest is None or page.max_updated > newest):
                    newest = page.max_updated
                if progress:
                    progress(result.counts)
        except Exception as exc:
            if result.run_id:
                store.fail_run(result.run_id, self.rt.redact(str(exc)))
            raise
        if self.mapping.tickets and result.run_id and not into_run and kind != "replay" and self.enqueue_tickets:
            result.counts.update(plan_tickets(self.rt, self.reader, self.mapping.tickets, self.enqueue_tickets))
        if full_read:
            # Every contact was read: the watermark may move, and this mapping is now the baseline.
            if newest is not None and signpost is not None:
                store.advance_cursor(earlier_of(newest, signpost))
            store.record_mapping(self.mapping.part_fingerprints())
        if result.run_id and not into_run:
            c = result.counts
            store.update_run(
                result.run_id,
                status="running",
                planned_at=utcnow(),
                read=c["read"],
                changed=c["changed"],
                enqueued=c["enqueued"],
                unchanged=c["unchanged"],
                invalid=c["invalid"],
                deleted=c["deleted"],
            )
            if not c["enqueued"]:
                store.finish_run(result.run_id)
        return result

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
        self, page: Page, result: PlanResult, registry: dict[str, str], *, force: bool, dry_run: bool
    ) -> None:
        counts = result.counts
        counts["read"] += len(page)
        counts["deleted"] += len(page.deleted)
        settings = self.rt.settings
        state = self.rt.store.lookup(c.key for c in [*page.contacts, *page.deleted])
        # Proto cannot delete: a deleted contact already in Proto is tagged, or left as it is.
        candidates = list(page.contacts)
        if settings.deleted_policy == "tag":
            candidates += [with_tag(c, settings.deleted_tag) for c in page.deleted if c.key in state]
        planned: list[tuple[Contact, bool]] = []
        for contact in candidates:
            synced = state.get(contact.key)
            if settings.sync_mode == "create-only" and synced is not None and synced.profile is not None:
                counts["skipped_existing"] += 1
                continue
            parts = [p for p in PARTS if force or synced is None or contact.hashes[p] != synced.get(p)]
            retry_dead = force or result.kind == "replay"
            if not parts or (not retry_dead and synced and synced.failed_hash == payload_hash(contact)):
                # Unchanged, or dead-lettered as it stands: only a change or a replay resends it.
                counts["unchanged"] += 1
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
        if planned:
            self._ensure_fields(planned, registry)
            update_only = settings.sync_mode == "update-only"
            tickets = self.mapping.tickets is not None
            # A run that reads every contact is bulk work, whatever its kind: fresh changes go first.
            queue = queue_for("full") if result.counts["mapping_changed"] else queue_for(result.kind)
            # In growing chunks, so that workers start on the first tasks while the rest are published.
            start, size = 0, ENQUEUE_CHUNK
            while start < len(planned):
                chunk = planned[start : start + size]
                self.rt.store.mark_queued(run_id, [(c.key, c.version) for c, _ in chunk])
                msgs = [
                    message(run_id, c, was_dead=d, force=force, update_only=update_only, tickets=tickets)
                    for c, d in chunk
                ]
                self.enqueue(queue, msgs)
                counts["enqueued"] += len(msgs)
                start, size = start + size, size * 2
        if page.max_updated is not None and result.kind == "incremental":
            # Pages come in updated_at order: all before this point is durably planned.
            self.rt.store.advance_cursor(page.max_updated)

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
        keyed = [r.key for r in rows if r.key is not None]
        if keyed:
            self.rt.store.mark_dead(keyed, run_id, "invalid record")

    def _ensure_fields(self, planned: list[tuple[Contact, bool]], registry: dict[str, str]) -> None:
        """Create in Proto the custom fields these contacts use and the registry lacks."""
        needed = {name for c, _ in planned for name in c.fields} - set(registry)
        if not needed:
            return
        client = self.rt.client
        existing = {f.name: f for f in client.list_custom_fields()}
        specs = {f.name: f for f in self.mapping.column_fields}
        found = []
        for name in sorted(needed):
            if name in existing:
                f = existing[name]
            else:
                spec = specs.get(name)
                type_ = spec.type if spec else self.mapping.query_field_type(name)
                f = client.create_custom_field(name, type_, spec.options if spec else None)
                log.info("created custom field %s (%s) in Proto", name, type_)
            found.append((f.name, f.id, f.type, f.select_options))
            registry[f.name] = f.id
        self.rt.store.register_fields(found)
