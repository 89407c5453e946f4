"""Settings, from the environment (and a `.env` file) with the prefix ``CRMSYNC_``."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError

DEFAULT_BASE_URL = "https://v3-api.proto.cx/api/platform"
# ASSUMED: Proto publishes no limit; the sandbox defaults to the same figure.
DEFAULT_RATE_LIMIT = 50.0
DEFAULT_DEGRADED_THRESHOLD = 0.01
DEFAULT_PLAN_LEASE = 60.0


class Settings(BaseSettings):
    """Every knob of crmsync. The README's configuration table is tested against this class."""

    # No inf or nan: CRMSYNC_REQUEST_TIMEOUT=inf would wait for ever, CRMSYNC_RATE_LIMIT=1e400 not limit at all.
    model_config = SettingsConfigDict(
        env_prefix="CRMSYNC_", env_file=".env", env_file_encoding="utf-8", extra="ignore", allow_inf_nan=False
    )

    source_url: str | None = Field(None, description="SQLAlchemy URL of the CRM database (read only).")
    state_url: str = Field("sqlite:///crmsync-state.db", description="SQLAlchemy URL of the local state database.")
    broker_url: str | None = Field(
        None, description="Celery broker (redis://...). Unset: an embedded broker in a SQLite file."
    )
    mapping: Path | None = Field(None, description="Path of the mapping YAML file.")
    proto_base_url: str = Field(DEFAULT_BASE_URL, description="Base URL of the Proto platform API.")
    proto_subcompany_id: str | None = Field(None, description="Proto sub-company (teamspace) id.")
    proto_token: SecretStr | None = Field(None, description="Bearer token (takeover secret).")
    proto_token_file: Path | None = Field(None, description="File holding the bearer token.")
    rate_limit: float = Field(DEFAULT_RATE_LIMIT, gt=0, description="API requests per second per sub-company.")
    rate_burst: int = Field(1, ge=1, description="Requests the limiter may send back to back.")
    request_timeout: float = Field(10.0, gt=0, description="Seconds before an API call times out.")
    max_attempts: int = Field(4, ge=1, description="Tries of one API call on errors (429s are not counted).")
    batch_size: int = Field(1000, ge=1, le=10000, description="Contacts read per source page.")
    plan_processes: int = Field(
        2, ge=1, le=64, description="Processes that plan a full sync of a large CRM, each a range of keys."
    )
    # An hour: updated_at set by app servers whose clocks disagree, or at the start of a batch job
    # that commits much later, still lands in the next incremental; the rows re-read cost a read
    # and a fingerprint each, never a call.
    lookback_seconds: float = Field(
        3600.0, ge=0, description="Incremental syncs re-read this far behind the watermark."
    )
    plan_lease: float = Field(
        DEFAULT_PLAN_LEASE,
        ge=1,
        description="Seconds a planner's leases last unless renewed: a planner that died is noticed this long "
        "after (its run closed failed, the next run of its kind let through).",
    )
    incremental_every: float = Field(60.0, gt=0, description="Seconds between beat's incremental syncs.")
    full_sync_cron: str = Field("0 2 * * *", description="Cron line of beat's nightly full sync.")
    sync_mode: Literal["upsert", "update-only", "create-only"] = Field(
        "upsert",
        description="upsert: create or update; update-only: skip contacts not in Proto; create-only: never update.",
    )
    deleted_policy: Literal["ignore", "tag"] = Field(
        "ignore", description="Contacts deleted in the CRM: leave them in Proto as they are, or tag them."
    )
    deleted_tag: str = Field("crm-deleted", min_length=1, description="The tag of the `tag` deleted policy.")
    reconcile_after: float = Field(
        60.0, gt=0, description="Seconds a run may make no progress, queue empty, before its lost tasks are re-sent."
    )
    worker_concurrency: int = Field(16, ge=1, description="Threads per worker process.")
    task_time_limit: int = Field(
        240, ge=10, description="The longest a sync task may take: its retries and waits are bounded to fit."
    )
    visibility_timeout: int = Field(
        300, ge=30, description="Seconds before Redis hands an unacknowledged task to another worker."
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="Log lines on stderr: json, console (readable), or auto (json unless stderr is a terminal)."
    )
    degraded_threshold: float = Field(
        DEFAULT_DEGRADED_THRESHOLD,
        ge=0,
        le=1,
        description="A run is degraded when more than this share of the contacts it read ended invalid, "
        "dead-lettered or failed.",
    )

    @model_validator(mode="before")
    @classmethod
    def _nothing_empty(cls, data: Any) -> Any:
        # An empty value is a mistake, never a way to unset: `CRMSYNC_BROKER_URL=${REDIS}` with
        # REDIS unset would give each worker a queue of its own, an empty token 401 on every call.
        if isinstance(data, dict):
            for name, value in data.items():
                if isinstance(value, str) and not value.strip():
                    raise ValueError(f"CRMSYNC_{name.upper()}: is empty (unset it for its default, or give a value)")
        return data

    @field_validator("source_url", "state_url")
    @classmethod
    def _database_url(cls, url: str | None) -> str | None:
        if url is not None:
            _check_database_url(url)
        return url

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, url: str | None) -> str | None:
        if url is not None:
            _check_broker_url(url)
        return url

    @field_validator("proto_base_url")
    @classmethod
    def _api_url(cls, url: str) -> str:
        parts = _url_parts(url, "https://host/api/platform")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("is not an http(s) URL with a host (https://host/api/platform)")
        if parts.username is not None or parts.password is not None:
            # httpx would send them as Basic auth in place of the bearer token: every call a 401.
            raise ValueError("carries a user or password (user:password@host): the API takes CRMSYNC_PROTO_TOKEN only")
        return url

    @field_validator("proto_token")
    @classmethod
    def _token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None:
            _check_token(token.get_secret_value())
        return token

    @model_validator(mode="after")
    def _token_file(self) -> Settings:
        if self.proto_token is None and self.proto_token_file is not None:
            try:
                # utf-8-sig: an editor's byte-order mark is never part of the token (a BOM is no
                # whitespace to strip(), and it would be refused as a control character).
                token = self.proto_token_file.read_text(encoding="utf-8-sig").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ValueError(f"CRMSYNC_PROTO_TOKEN_FILE: cannot read it ({reason})") from None
            if not token:
                raise ValueError("CRMSYNC_PROTO_TOKEN_FILE: the file is empty")
            try:
                _check_token(token)
            except ValueError as exc:
                raise ValueError(f"CRMSYNC_PROTO_TOKEN_FILE: the token in the file {exc}") from None
            self.proto_token = SecretStr(token)
        return self

    @cached_property
    def embedded_broker(self) -> bool:
        """True when no broker is configured and crmsync keeps its queue in a SQLite file."""
        return not self.broker_url

    @property
    def celery_broker_url(self) -> str:
        """The broker URL Celery connects to: the configured one or the embedded SQLite file."""
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{self.data_dir / 'broker.db'}"

    @property
    def data_dir(self) -> Path:
        """Where local files go (embedded broker, logs): beside a SQLite state DB, else ./.crmsync."""
        if self.state_url.startswith("sqlite:///") and self.state_url != "sqlite:///:memory:":
            db = Path(self.state_url.removeprefix("sqlite:///"))
            return db.parent.resolve() / (db.stem + ".crmsync")
        return Path(".crmsync").resolve()

    def require(self, *names: str) -> None:
        """Stop with a ConfigError naming the first of `names` that is not set."""
        for name in names:
            if getattr(self, name) is None:
                hint = " (or CRMSYNC_PROTO_TOKEN_FILE)" if name == "proto_token" else ""
                raise ConfigError(f"setting CRMSYNC_{name.upper()} is not set{hint}")


def load_settings() -> Settings:
    """Read the settings, turning a validation error into one line naming the setting.

    The line says what is wrong, never the value: a URL or a token may carry a secret.
    """
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors(include_input=False)[0]
        cause = err.get("ctx", {}).get("error")
        problem = str(cause) if isinstance(cause, ValueError) else err["msg"]
        if not err["loc"]:
            # A check of the whole settings (an empty value, the token file): its message names the setting.
            raise ConfigError(f"setting {problem}") from None
        raise ConfigError(f"setting CRMSYNC_{str(err['loc'][0]).upper()}: {problem}") from None


# What a URL's problems are told against: the shape the setting expects.
_DATABASE_SHAPE = "dialect[+driver]://user:password@host:port/database"
_BROKER_SHAPE = "redis://host:port/db; unset for the embedded broker"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def _check_database_url(url: str) -> None:
    """Refuse a SQLAlchemy URL that cannot be parsed, names no known dialect, or has a bad port."""
    # Imported here: the sandbox loads the settings without needing SQLAlchemy.
    from sqlalchemy.engine.url import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"is not a database URL ({_DATABASE_SHAPE})") from None
    except ValueError:  # SQLAlchemy's int() of the port; the value is not repeated: it may be a password
        raise ValueError(f"the port is not a number ({_DATABASE_SHAPE})") from None
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ValueError("the port is not between 1 and 65535")
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        raise ValueError(f"names no database SQLAlchemy knows ({parsed.drivername!r})") from None


def _check_broker_url(url: str) -> None:
    """Refuse a broker URL of no transport Celery knows, or with a bad port or Redis db number."""
    from kombu.transport import TRANSPORT_ALIASES

    parts = _url_parts(url, _BROKER_SHAPE)
    transport = parts.scheme.split("+", 1)[0]  # how kombu reads `sqla+sqlite://`
    if transport not in TRANSPORT_ALIASES:
        raise ValueError(f"names no broker Celery knows ({transport!r}; {_BROKER_SHAPE})")
    db = parts.path.strip("/")
    if transport in ("redis", "rediss") and db and not (db.isascii() and db.isdigit()):
        raise ValueError("the Redis database (after the host) is not a number")


def _url_parts(url: str, shape: str) -> SplitResult:
    """`url` split, refused when it has no `scheme://` or its port is not a number from 1 to 65535."""
    scheme, sep, _ = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        raise ValueError(f"is not a URL ({shape})")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("the port is not a number from 1 to 65535")
    return parts


def _check_token(token: str) -> None:
    """Refuse a token that no header can carry: one holding whitespace or control characters."""
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError("holds whitespace or control characters")
