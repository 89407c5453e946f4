"""The one exception tree of crmsync.

Every error the project raises derives from :class:`CrmsyncError`, and errors from the
layers below (httpx, SQLAlchemy, YAML) are translated at the boundary, so callers sort
them by remedy::

    CrmsyncError
    ├── ConfigError            a setting or the mapping is wrong: fix it, then rerun
    ├── SourceError            the CRM database failed or refused a query
    ├── InvalidRecord          one contact cannot be sent as it is: recorded, the run goes on
    └── ProtoError             the Proto API (or the way to it) failed
        ├── RetryableError     try again later: 5xx, timeouts, dropped connections
        │   ├── RateLimited    429: wait `retry_after` seconds; costs no error budget
        │   └── CircuitOpen    the API is down: held (not sent) until the breaker's next probe
        │       └── AuthPaused the credentials were refused: every call held until a probe passes
        └── PermanentError     the same request will fail again: 400, 404, 409, 422
            ├── AuthError      401, 403: the token or sub-company is wrong
            └── MissingCustomField  422: a custom-field id Proto no longer has (deleted there)
"""

from __future__ import annotations

from typing import Any


class CrmsyncError(Exception):
    """Base of every error crmsync raises on purpose."""


class ConfigError(CrmsyncError):
    """A setting or the mapping file is missing or malformed."""


class SourceError(CrmsyncError):
    """The source CRM database failed or refused a query."""


class InvalidRecord(CrmsyncError):
    """One contact cannot be synced as it stands in the CRM.

    `code` is a short stable identifier (``missing_key``, ``field_type``...) that operators
    can filter dead letters on; `field` names the mapping field at fault, if any.
    """

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class ProtoError(CrmsyncError):
    """The Proto API answered with an error, or could not be reached.

    `status` is the HTTP status (None when no response came back); `body` is the
    response body, cut short, with secrets already removed.
    """

    def __init__(self, message: str, *, status: int | None = None, body: Any = None, route: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.route = route


class RetryableError(ProtoError):
    """A failure that may pass on a later try (5xx, timeout, connection error).

    `not_sent` is True when the request surely never reached the API (connection refused),
    which makes even a non-idempotent POST safe to retry.
    """

    def __init__(self, message: str, *, not_sent: bool = False, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.not_sent = not_sent


class RateLimited(RetryableError):
    """The API answered 429; `retry_after` is how long it asked us to wait, in seconds.

    A 429 is an answer that the request was not processed: it is never in Proto (`not_sent`).
    """

    def __init__(self, message: str, *, retry_after: float, **kwargs: Any) -> None:
        kwargs.setdefault("not_sent", True)
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class CircuitOpen(RetryableError):
    """The circuit breaker holds calls during an outage; `retry_after` is the next probe."""

    def __init__(self, message: str, *, retry_after: float, not_sent: bool = True) -> None:
        super().__init__(message, not_sent=not_sent)
        self.retry_after = retry_after


class AuthPaused(CircuitOpen):
    """Sending to the sub-company is paused: Proto refused its credentials (401/403).

    `reason` is the refusal's message, naming the setting to fix; the pause lifts by itself once
    a probe call gets an answer that is not a refusal.
    """

    def __init__(self, reason: str, *, retry_after: float) -> None:
        super().__init__(
            f"{reason} (sending is paused for every worker; next probe in {retry_after:.1f} s)", retry_after=retry_after
        )
        self.reason = reason


class PermanentError(ProtoError):
    """A failure that the same request will meet again (400, 404, 409, 422)."""


class AuthError(PermanentError):
    """401 or 403: the bearer token or the sub-company id is wrong."""


class MissingCustomField(PermanentError):
    """add-custom-fields named a field id that Proto does not have (the field was deleted there).

    `field_id` is the id the answer names, when it names one.
    """

    def __init__(self, message: str, *, field_id: str | None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.field_id = field_id
