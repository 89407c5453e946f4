"""Syncing one customer: send the parts that changed, record what Proto now holds.

A task message carries everything needed (the payload it was planned with), so a worker
never queries the CRM. Running the same message twice sends nothing the second time:
each part is compared with the hash recorded after its last successful call.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

from .contact import PARTS, Contact, payload_hash
from .errors import AuthError, AuthPaused, CircuitOpen, MissingCustomField, PermanentError, ProtoError, RateLimited
from .fields import heal_fields
from .logs import redact
from .metrics import counts_outcome
from .runtime import Runtime
from .state.store import PartHashes

log = logging.getLogger(__name__)
# The hold of a task whose own call was refused: about when the pause's first probe goes.
AUTH_RETRY_AFTER = 1.0


class Outcome(StrEnum):
    """How a sync task ended."""

    SYNCED = "synced"
    SKIPPED = "skipped"
    DEAD = "dead"


def message(
    run_id: str,
    contact: Contact,
    *,
    kind: str | None = None,
    was_dead: bool = False,
    force: bool = False,
    update_only: bool = False,
    tickets: bool = False,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """The task message for `contact` planned by `run_id` (JSON primitives only).

    `kind` is the run's (full, incremental, replay), for the lag metric; `force` resends every
    part whatever Proto is recorded to hold; `update_only` skips a customer that Proto does not
    have yet; `tickets` sends the customer's waiting tickets after it; `fingerprint` (of the
    source row) is recorded once the contact is synced.
    """
    msg = {"run_id": run_id, "contact": contact.to_payload(), "was_dead": was_dead, "force": force}
    if kind:
        msg["kind"] = kind
    if fingerprint:
        msg["fingerprint"] = fingerprint
    if update_only:
        msg["update_only"] = True
    if tickets:
        msg["tickets"] = True
    return msg


@counts_outcome
def sync_contact(rt: Runtime, msg: dict[str, Any]) -> Outcome:
    """Bring one Proto customer in line with the contact in `msg`; its outcome is counted in the metrics."""
    contact = Contact.from_payload(msg["contact"])
    run_id = msg.get("run_id")
    if run_id and not rt.store.knows_run(run_id):
        # Another deployment's task on a shared broker, or one queued before this state DB was
        # reset: sending it would put data this deployment did not plan into its Proto.
        log.warning(
            "skipped the task of %s: its run %s is not in this state DB (a broker shared with another "
            "deployment, or a state DB replaced while tasks were queued?)",
            contact.key,
            run_id,
        )
        return Outcome.SKIPPED
    state = rt.store.lookup([contact.key]).get(contact.key)
    if state and _superseded(contact.version, state):
        # A later plan read a newer row: its own task syncs it (and owns the state row).
        return Outcome.SKIPPED
    sent: dict[str, str | None] = {p: state.get(p) if state and not msg.get("force") else None for p in PARTS}
    try:
        if msg.get("update_only") and sent["profile"] is None and not _in_proto(rt, contact.key):
            # Remembered like a dead letter's payload: not asked again until the contact changes.
            rt.store.record_outcome(
                contact.key,
                run_id,
                "skipped",
                sent,
                None,
                error="not in Proto (update-only mode)",
                failed_hash=payload_hash(contact),
            )
            return Outcome.SKIPPED
        for part in PARTS:
            if contact.hashes[part] != sent[part]:
                _send(rt, contact, part)
                sent[part] = contact.hashes[part]
    except AuthError as exc:
        # The sub-company's credentials were refused, not this contact: it stays queued, its run
        # fails naming the setting, and the task defers like a held one (the client paused sending).
        _held(rt, contact, run_id, sent, exc)
        raise AuthPaused(str(exc), retry_after=AUTH_RETRY_AFTER) from None
    except (CircuitOpen, RateLimited) as exc:
        # Held by the breaker, or throttled past the call's time on hold: keep what was sent;
        # the task defers itself and comes back. Never a dead letter: the API said "later".
        _held(rt, contact, run_id, sent, exc)
        raise
    except ProtoError as exc:
        _dead_letter(rt, msg, contact, run_id, sent, exc)
        return Outcome.DEAD
    rt.store.record_outcome(contact.key, run_id, "synced", sent, contact.version, fingerprint=msg.get("fingerprint"))
    if msg.get("was_dead"):
        rt.store.resolve_dead_letters(contact.key, planned_by=run_id)
    if msg.get("tickets"):
        # The customer exists now: its waiting tickets can go, each claimed before its call.
        from .tickets import send_ticket

        for key in rt.store.ready_tickets(customer=contact.key):
            send_ticket(rt, key)
    return Outcome.SYNCED


def _held(rt: Runtime, contact: Contact, run_id: str | None, sent: dict[str, str | None], exc: ProtoError) -> None:
    """Leave the contact queued with what was sent; a refusal of the credentials also fails its run."""
    rt.store.record_outcome(contact.key, run_id, "queued", sent, None)
    reason = exc.reason if isinstance(exc, AuthPaused) else str(exc) if isinstance(exc, AuthError) else None
    if reason and run_id and rt.store.fail_run(run_id, redact(reason)):
        # Once per run (only an open run is failed): its one error names the setting to fix.
        log.error("run %s failed: %s", run_id, redact(reason))


def _in_proto(rt: Runtime, key: str) -> bool:
    """Whether Proto has a customer with this unique id (one get-customer call)."""
    try:
        rt.client.get_customer(key)
    except PermanentError as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _send(rt: Runtime, contact: Contact, part: str) -> None:
    """One API call for one part; an empty tag list or field set needs none."""
    client = rt.client
    if part == "profile":
        client.upsert_customer(contact.key, contact.profile)
    elif part == "tags" and contact.tags:
        client.add_tags(contact.key, contact.tags)
    elif part == "fields" and contact.fields:
        ids = _field_ids(rt, contact)
        try:
            client.add_custom_fields(contact.key, [(ids[n], v) for n, v in contact.fields.items()])
        except MissingCustomField as exc:
            # A field deleted in Proto since it was registered: ensure it again (once), send again.
            heal_fields(rt, ids, exc.field_id)
            ids = _field_ids(rt, contact)
            client.add_custom_fields(contact.key, [(ids[n], v) for n, v in contact.fields.items()])


def _field_ids(rt: Runtime, contact: Contact) -> dict[str, str]:
    """The registered Proto id of each custom field of the contact, by name."""
    ids = {}
    for name in contact.fields:
        field_id = rt.field_id(name)
        if field_id is None:
            raise PermanentError(f"custom field {name!r} is not registered; run `crmsync sync` to create it")
        ids[name] = field_id
    return ids


def _dead_letter(
    rt: Runtime,
    msg: dict[str, Any],
    contact: Contact,
    run_id: str | None,
    sent: dict[str, str | None],
    exc: ProtoError,
) -> None:
    error = redact(str(exc))
    log.warning("customer %s dead-lettered: %s", contact.key, error)
    rt.store.record_dead(
        contact.key,
        run_id,
        sent,
        payload_hash(contact),
        msg["contact"],
        error_class=_error_class(exc),
        message=error,
        http_status=exc.status,
        response_body=redact(str(exc.body)) if exc.body is not None else None,
    )


def _error_class(exc: Exception) -> str:
    """A stable, filterable name: the exception class, with the status when there is one."""
    status = getattr(exc, "status", None)
    return f"{type(exc).__name__}" + (f".{status}" if status else "")


def _superseded(version: str | None, state: PartHashes) -> bool:
    """Whether a later plan of this customer exists, so that this task must not send.

    The task of the latest plan always sends, even when the CRM's updated_at went backwards:
    the latest read is the row as it stands. An earlier plan's task is superseded when its
    version is older than the one planned or synced since.
    """
    if version is None or version == state.planned_version:
        return False
    return any(other is not None and version < other for other in (state.planned_version, state.source_version))
