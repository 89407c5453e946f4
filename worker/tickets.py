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
from .runtime import Runtime
from .source.mapping import TicketsSpec
from .source.reader import SourceReader

log = logging.getLogger(__name__)


def plan_tickets(
    rt: Runtime, reader: SourceReader, spec: TicketsSpec, enqueue: Callable[[list[str]], None]
) -> Counter[str]:
    """Record new cases as pending, and enqueue the pending ones whose customer is synced.

    A case key that the tickets query holds more than once is refused, not sent: which case
    would win is arbitrary, and one key is one ticket (see StateStore.add_tickets).
    """
    counts: Counter[str] = Counter()
    for page in reader.tickets(spec):
        counts["tickets_new"] += rt.store.add_tickets(page.cases, page.duplicated)
        if page.duplicated:
            counts["tickets_refused"] += len(page.duplicated)
            log.warning(
                "%d ticket keys are held by more than one case (e.g. %r): refused until each is one case's",
                len(page.duplicated),
                next(iter(page.duplicated)),
            )
    ready = rt.store.ready_tickets()
    if ready:
        enqueue(ready)
    counts["tickets_enqueued"] = len(ready)
    return counts


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
