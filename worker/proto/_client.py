"""The Proto developer API client: the eight endpoints of the vendor page over one httpx client.

Every call goes through the rate limiter and the retry policy; every failure comes out as
an error of `worker.errors` (retryable or permanent), with the bearer token redacted. Every
try is counted in `worker.metrics` by route and status, with its time on the wire.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import tenacity

from ..errors import (
    AuthError,
    CircuitOpen,
    MissingCustomField,
    PermanentError,
    ProtoError,
    RateLimited,
    RetryableError,
)
from ..logs import add_secrets, redact
from ..metrics import timed_call
from . import _wire
from ._breaker import Breaker, LocalBreaker
from ._limiter import Limiter, LocalLimiter
from ._retry import RetryPolicy

MAX_BODY_CHARS = 2000


class ProtoClient:
    """A client for one Proto sub-company. Thread-safe: share one per process."""

    def __init__(
        self,
        base_url: str,
        subcompany_id: str,
        token: str,
        *,
        limiter: Limiter | None = None,
        breaker: Breaker | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = tenacity.nap.sleep,
        token_setting: str = "CRMSYNC_PROTO_TOKEN",
    ) -> None:
        """`token_setting` names where the token came from, for the message of a refusal."""
        self.subcompany_id = subcompany_id
        self._token_setting = token_setting
        add_secrets(token)  # an answer echoing it, and every line about this client, show [REDACTED]
        self._limiter = limiter or LocalLimiter(rate=50.0)
        self._breaker = breaker or LocalBreaker()
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "User-Agent": "crmsync/0.1"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            transport=transport,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> ProtoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the eight endpoints ---------------------------------------------------------------------

    def upsert_customer(self, provided_unique_id: str, profile: dict[str, Any]) -> dict[str, Any]:
        """Create the customer, or update the one with this unique id (create-customer)."""
        return self._call("upsert_customer", _wire.customer_body(profile), provided_unique_id=provided_unique_id)

    def get_customer(self, provided_unique_id: str) -> dict[str, Any]:
        """Everything Proto holds of a customer except custom-field values; NotFound-class 404."""
        return self._call("get_customer", None, provided_unique_id=provided_unique_id)

    def add_tags(self, provided_unique_id: str, tags: Sequence[str]) -> dict[str, Any]:
        """Add tags to a customer, creating tags that do not exist yet."""
        return self._call("add_tags", _wire.tags_body(tags), provided_unique_id=provided_unique_id)

    def add_custom_fields(self, provided_unique_id: str, values: Sequence[tuple[str, Any]]) -> dict[str, Any]:
        """Set custom-field values, given as (custom_field_id, value) pairs."""
        return self._call("add_custom_fields", _wire.custom_fields_body(values), provided_unique_id=provided_unique_id)

    def list_custom_fields(self) -> list[_wire.CustomField]:
        """Every custom-field definition of the sub-company, following `next` cursors if any."""
        fields: list[_wire.CustomField] = []
        cursor: str | None = None
        while True:
            body = self._call("list_custom_fields", None, params={"cursor": cursor} if cursor else None)
            page, cursor = _wire.parse_custom_field_page(body)
            fields.extend(page)
            if not cursor:
                return fields

    def create_custom_field(
        self, name: str, type_: str, select_options: Sequence[str] | None = None
    ) -> _wire.CustomField:
        """Define a custom field; type and options are fixed from then on."""
        body = self._call("create_custom_field", _wire.create_field_body(name, type_, select_options))
        return _wire.parse_custom_field(body)

    def delete_custom_field(self, custom_field_id: str) -> None:
        """Delete a custom-field definition (and its values)."""
        self._call("delete_custom_field", None, custom_field_id=custom_field_id)

    def create_ticket(self, subject: str, **customer: str | None) -> str:
        """Open a ticket for one customer; returns its id.

        POST without an idempotency key: only failures that surely never reached the API
        are retried, so a retry never opens a second ticket.
        """
        body = self._call("create_ticket", _wire.ticket_body(subject, **customer), retry_ticket=False)
        return str(body["id"])

    # -- plumbing ------------------------------------------------------------------------------

    def _call(
        self,
        route: str,
        body: Any,
        *,
        params: dict[str, str] | None = None,
        retry_ticket: bool = True,
        **path_params: str,
    ) -> Any:
        method, _ = _wire.ROUTES[route]
        url = _wire.path(route, self.subcompany_id, **path_params)
        for attempt in self._retry.retrying(sleep=self._sleep, retry_ticket=retry_ticket):
            with attempt:
                return self._send(route, method, url, body, params)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _send(self, route: str, method: str, url: str, body: Any, params: dict[str, str] | None) -> Any:
        # Held calls take no rate-limit slot: the limiter asks the breaker first.
        self._limiter.acquire(self._breaker)
        try:
            # Timed on the wire alone (the limiter's wait is not the API's latency), every try counted.
            with timed_call(route):
                result = self._exchange(route, method, url, body, params)
        except AuthError as exc:
            # Every other call would be refused too: pause them all (shared, like the breaker).
            self._breaker.on_auth_failure(str(exc))
            raise
        except RetryableError as exc:
            if isinstance(exc, RateLimited):
                raise
            self._breaker.on_failure()
            if self._breaker.is_open():
                # An outage, not this call's fault: hold it (free) rather than spend its error budget.
                # A failure that may have reached the API stays "maybe sent": a ticket is not resent.
                raise CircuitOpen(f"{exc} (circuit open: calls held)", retry_after=1.0, not_sent=exc.not_sent) from None
            raise
        except ProtoError:
            self._breaker.on_success()  # a 4xx is an answer: the API is up
            raise
        self._breaker.on_success()
        return result

    def _exchange(self, route: str, method: str, url: str, body: Any, params: dict[str, str] | None) -> Any:
        try:
            response = self._http.request(method, url, json=body, params=params)
        except httpx.TimeoutException as exc:
            raise RetryableError(
                f"{route}: timed out ({type(exc).__name__})",
                route=route,
                not_sent=isinstance(exc, httpx.ConnectTimeout),
            ) from None
        except httpx.TransportError as exc:
            raise RetryableError(
                f"{route}: connection failed ({type(exc).__name__})",
                route=route,
                not_sent=isinstance(exc, httpx.ConnectError),
            ) from None
        if response.is_success:
            try:
                return response.json() if response.content else {}
            except ValueError:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not text
                raise RetryableError(
                    f"{route}: the answer was not JSON", status=response.status_code, route=route
                ) from None
        raise self._error(route, response)

    def _error(self, route: str, response: httpx.Response) -> ProtoError:
        status = response.status_code
        body = redact(response.text)[:MAX_BODY_CHARS]  # redact first: a cut may split the token
        detail = _detail(body)
        message = f"{route}: HTTP {status}" + (f": {detail}" if detail else "")
        if status == 429:
            retry_after = _wire.parse_retry_after(response.headers.get("Retry-After"))
            self._limiter.pause(retry_after)
            return RateLimited(message, retry_after=retry_after, status=status, body=body, route=route)
        if status >= 500 or status == 408:
            return RetryableError(message, status=status, body=body, route=route)
        if status in (401, 403):
            return AuthError(self._refusal(status, message), status=status, body=body, route=route)
        if status == 422 and route == "add_custom_fields":
            missing = _wire.missing_custom_field(body)
            if missing is not None:
                return MissingCustomField(message, field_id=missing or None, status=status, body=body, route=route)
        return PermanentError(message, status=status, body=body, route=route)

    def _refusal(self, status: int, message: str) -> str:
        """What a 401 or 403 means, naming the settings to fix (never the token itself)."""
        if status == 401:
            return f"Proto refused the bearer token ({message}): check {self._token_setting}"
        return (
            f"Proto refused access to sub-company {self.subcompany_id} ({message}): check "
            f"CRMSYNC_PROTO_SUBCOMPANY_ID, and that {self._token_setting} is this sub-company's token"
        )


def _detail(body: str) -> str:
    """A one-line reading of a FastAPI-style error body."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body[:200]
    detail = data.get("detail") if isinstance(data, dict) else data
    if isinstance(detail, list):
        parts = []
        for item in detail[:3]:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", []) if x != "body")
                parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
        return "; ".join(parts)
    return str(detail)[:200]
