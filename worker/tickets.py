"""Tickets, exactly once: CRM cases opened as Proto tickets with create-ticket.

create-ticket is a POST with no idempotency key, so a blind retry can open a ticket twice.
Each case is claimed (`pending` -> `sending`, committed) before the call; only one claim can
win, and a call whose outcome is unknown (a timeout after the request left, a 5xx) is left
`unknown` for an operator to confirm or retry: never retried by crmsync itself. A call that
surely never reached Proto (held, refused credentials, connection refused) is `pending` again.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from .errors import AuthError, PermanentError, ProtoError
from .logs import redact
from .proto._wire import MAX_UNIQUE_ID_LENGTH  # the tickets table's key and customer are sized so
from .runtime import Runtime
from .source.mapping import TicketsSpec
from .source.reader import SourceReader, TicketPage

# A case as the tickets query returns it: (key, subject, customer key).
Case = tuple[str, str, str | None]

log = logging.getLogger(__name__)


def plan_tickets(
    rt: Runtime, reader: SourceReader, spec: TicketsSpec, enqueue: Callable[[list[str]], None]
) -> Counter[str]:
    """Record new cases as pending, and enqueue the pending ones whose customer is synced.

    A case key that the tickets query holds more than once is refused, not sent: which case
    would win is arbitrary, and one key is one ticket (see StateStore.add_tickets). So is a
    case whose customer key no customer can have. A case whose own key cannot be kept (see
    `screen`) is skipped, counted and logged: one bad case never fails the run.
    """
    counts: Counter[str] = Counter()
    for page in reader.tickets(spec):
        cases, refused, skipped = screen(page)
        counts["tickets_new"] += rt.store.add_tickets(cases, refused)
        counts["tickets_refused"] += len(refused)
        if page.duplicated:
            log.warning(
                "%d ticket keys are held by more than one case (e.g. %r): refused until each is one case's",
                len(page.duplicated),
                next(iter(page.duplicated)),
            )
        for problem, (count, example) in skipped.items():
            counts["tickets_skipped"] += count
            log.warning(
                "%s: %d cases skipped, no ticket opened: their case key %s (e.g. %r); fix the key in the CRM",
                reader.mapping.where(("tickets", "key")),
                count,
                problem,
                example[:40],
            )
    ready = rt.store.ready_tickets()
    if ready:
        enqueue(ready)
    counts["tickets_enqueued"] = len(ready)
    return counts


def screen(page: TicketPage) -> tuple[list[Case], dict[str, str], dict[str, tuple[int, str]]]:
    """A page's cases as the state DB can keep them: the cases, the refused keys, the skipped.

    A case key is the ticket's identity in the state DB (at most 255 characters there, like a
    provided_unique_id): one that is empty, longer or holds a NUL (PostgreSQL keeps no NUL in
    text) cannot be kept, even as a refusal, so its cases are skipped, by problem: (how many,
    one key). A case whose customer key is so (no customer can have it) is refused with the
    reason, as is a key held by several cases; a refusal keeps a NUL-free subject and no such
    customer, and is lifted by itself once the case is fixed (StateStore.add_tickets).
    """
    cases: list[Case] = []
    refused: dict[str, str] = {}
    skipped: dict[str, tuple[int, str]] = {}
    for key, subject, customer in page.cases:
        if problem := _unkeepable(key):
            count, example = skipped.get(problem, (0, key))
            skipped[problem] = (count + 1, example)
            continue
        if key in page.duplicated:
            refused[key] = (
                f"duplicate_key: the tickets query holds {page.duplicated[key]} cases with this key; "
                "no ticket is opened for it until only one is left"
            )
        elif customer is not None and (problem := _unkeepable(customer)):
            refused[key] = f"customer_key: the case's customer key {problem}: no customer can have it"
        elif "\x00" in subject:
            refused[key] = "subject: the case's subject holds a NUL character"
        if key in refused:
            subject = subject.replace("\x00", "\ufffd")
            customer = None if customer is None or _unkeepable(customer) else customer
        cases.append((key, subject, customer))
    return cases, refused, skipped


def _unkeepable(key: str) -> str | None:
    """Why a key cannot be kept in the state DB (as "is empty", say), or None."""
    if not key.strip():
        return "is empty"
    if len(key) > MAX_UNIQUE_ID_LENGTH:
        return f"is {len(key)} characters (at most {MAX_UNIQUE_ID_LENGTH})"
    if "\x00" in key:
        return "holds a NUL character"
    return None


def resend_ready_tickets(rt: Runtime, enqueue: Callable[[list[str]], None]) -> int:
    """Enqueue every pending ticket whose customer is in Proto; returns how many.

    A ticket is sent by its customer's task once the customer is synced. A task lost between
    the two (a worker killed, Redis emptied) or a send held back (`pending` again after an
    outage) would otherwise wait for the next planning. Each send is claimed, so a ticket
    enqueued twice is still opened once.
    """
    ready = rt.store.ready_tickets()
    if ready:
        enqueue(ready)
    return len(ready)


def send_ticket(rt: Runtime, key: str) -> str:
    """Open the ticket of one case, unless another task already claimed it; returns its status."""
    ticket = rt.store.claim_ticket(key)
    if ticket is None:
        return "skipped"  # claimed before: created, in flight, or waiting for an operator
    try:
        proto_id = rt.client.create_ticket(ticket["subject"], provided_unique_id=ticket["customer"])
    except ProtoError as exc:
        error = redact(str(exc))
        if isinstance(exc, AuthError) or getattr(exc, "not_sent", False):
            # Surely not created: refused credentials (the sub-company is paused), or never sent
            # (held by the breaker, the limiter's store unreachable, connection refused). Sent again later.
            status = "pending"
        elif isinstance(exc, PermanentError):
            status = "failed"
        else:
            status = "unknown"  # may exist in Proto: an operator confirms or retries
        log.warning("ticket %s: %s (%s)", key, status, error)
        rt.store.finish_ticket(key, status, error=error)
        return status
    rt.store.finish_ticket(key, "created", proto_id=proto_id)
    return "created"
