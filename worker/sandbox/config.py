"""What a sandbox run is: its sub-companies, its rate limit and the faults it injects."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# The vendor's base URL ends in /api/platform; the sandbox serves the API under the same
# path so that a base URL differs from the real one only by scheme, host and port.
API_BASE_PATH = "/api/platform"

# A demo sub-company (the one of the vendor's examples) and token, for runs with no settings.
DEFAULT_SUBCOMPANY_ID = "01HSWE652DMW6REJ1FB1135PRZ"
DEFAULT_TOKEN = "sandbox-token"

ENV_SUBCOMPANY_ID = "CRMSYNC_PROTO_SUBCOMPANY_ID"
ENV_TOKEN = "CRMSYNC_PROTO_TOKEN"
ENV_TOKEN_FILE = "CRMSYNC_PROTO_TOKEN_FILE"

# Sub-company ids are ULIDs: 26 characters of Crockford's base32 (no I, L, O, U).
ULID_PATTERN = "^[0-9A-HJKMNP-TV-Z]{26}$"
_ULID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


def is_ulid(value: str) -> bool:
    """True if `value` is a ULID in its canonical (upper-case) spelling."""
    return _ULID_RE.fullmatch(value) is not None


@dataclass
class SandboxConfig:
    """Settings of one sandbox: who may call it, how fast, and what goes wrong on purpose."""

    tenants: dict[str, str]  # subcompany_id -> bearer token
    rate_limit: float = 50.0  # requests/s per sub-company; 0 = unlimited
    burst: int | None = None  # bucket capacity; None = 100 ms worth of requests
    fail_rate: float = 0.0  # share of API requests answered 500/502/503
    drop_rate: float = 0.0  # share of API requests whose connection is closed mid-answer
    throttle_rate: float = 0.0  # share of API requests answered 429 (Retry-After: 1) whatever the rate
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    outage: bool = False  # every API request answers 503
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first setting out of range."""
        if not self.tenants:
            raise ConfigError("sandbox: at least one sub-company is needed")
        for sid, token in self.tenants.items():
            if not is_ulid(sid):
                raise ConfigError(f"sandbox: sub-company id {sid!r} is not a ULID")
            if not token:
                raise ConfigError(f"sandbox: the token of sub-company {sid} is empty")
        for name in ("fail_rate", "drop_rate", "throttle_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"sandbox: {name} must be between 0 and 1")
        for name in ("rate_limit", "latency_ms", "jitter_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"sandbox: {name} must be a finite number >= 0")
        if self.burst is not None and self.burst < 1:
            raise ConfigError("sandbox: burst must be at least 1")

    @property
    def effective_burst(self) -> int:
        """Bucket capacity: `burst`, or by default the requests of 100 ms (at least one)."""
        if self.burst is not None:
            return self.burst
        return max(1, math.ceil(self.rate_limit / 10))

    @classmethod
    def from_env(cls, subcompany_id: str | None = None, token: str | None = None, **overrides: Any) -> SandboxConfig:
        """One tenant from the arguments, else the ``CRMSYNC_PROTO_*`` environment, else the demo.

        Reading the same variables as the client lets one environment configure both sides.
        `overrides` are other SandboxConfig fields (rate_limit, fail_rate...).
        """
        known = {f.name for f in fields(cls)} - {"tenants"}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"sandbox: unknown settings {', '.join(sorted(unknown))}")
        sid = subcompany_id or os.environ.get(ENV_SUBCOMPANY_ID) or DEFAULT_SUBCOMPANY_ID
        secret = token or os.environ.get(ENV_TOKEN) or _token_from_file() or DEFAULT_TOKEN
        return cls(tenants={sid: secret}, **overrides)


def _token_from_file() -> str | None:
    """The stripped content of the file named by CRMSYNC_PROTO_TOKEN_FILE, if that is set."""
    name = os.environ.get(ENV_TOKEN_FILE)
    if not name:
        return None
    try:
        token = Path(name).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{ENV_TOKEN_FILE}: cannot read it ({exc.strerror})") from None
    if not token:
        # Falling back to the demo token here would hide the mistake until every call got 403.
        raise ConfigError(f"{ENV_TOKEN_FILE}: the file is empty")
    return token
