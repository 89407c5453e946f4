"""The sandbox's memory: customers, custom fields, tags and tickets per sub-company, and request stats.

Everything sits behind one lock per object, since uvicorn's event loop, FastAPI's thread pool
and a test's own thread may all touch it. Nothing here knows HTTP: business rules fail with
:class:`SandboxError`, which the app turns into FastAPI-shaped answers.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import CrmsyncError
from ..proto._wire import PROFILE_FIELDS, missing_field_message

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

Loc = tuple[str | int, ...]


class SandboxError(CrmsyncError):
    """A request the sandbox refuses; `status` is the HTTP status it answers with."""

    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(SandboxError):
    """The customer or custom field named in the path does not exist."""

    status = 404


class Conflict(SandboxError):
    """The object to create exists already."""

    status = 409


class Invalid(SandboxError):
    """A body value breaks a rule that needs the stored data to check (answered as a 422)."""

    status = 422

    def __init__(self, loc: Loc, msg: str, type_: str = "value_error", input_: Any = None) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg
        self.type = type_
        self.input = input_


@dataclass
class _Customer:
    id: str
    provided_unique_id: str
    profile: dict[str, str | None]
    created_at: str
    updated_at: str
    tags: dict[str, None] = field(default_factory=dict)  # an ordered set
    values: dict[str, Any] = field(default_factory=dict)  # custom_field_id -> value


@dataclass
class _Field:
    id: str
    name: str
    type: str
    select_options: list[str] | None


@dataclass
class _Tenant:
    customers: dict[str, _Customer] = field(default_factory=dict)
    fields: dict[str, _Field] = field(default_factory=dict)
    tags: dict[str, None] = field(default_factory=dict)  # tags defined in the sub-company
    tickets: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class FieldValue:
    """One element of add-custom-fields: the field named by id or name, and its new value."""

    by: str  # "id" or "name"
    ref: str
    value: Any


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_value(type_: str, options: Sequence[str] | None, value: Any) -> tuple[str, str] | None:
    """Why `value` cannot be stored in a field of `type_`, as (error type, message); None if it can."""
    if value is None:  # ASSUMED: null is accepted for every type and stored as null
        return None
    if type_ == "text":
        return None if isinstance(value, str) else ("string_type", "Input should be a valid string")
    if type_ == "number":
        # bool is an int subclass in Python, but true is not a number in JSON.
        if isinstance(value, bool) or not isinstance(value, int | float):
            return ("float_type", "Input should be a valid number")
        if isinstance(value, float) and not math.isfinite(value):
            return ("finite_number", "Input should be a finite number")
        return None
    if type_ == "toggle":
        return None if isinstance(value, bool) else ("bool_type", "Input should be a valid boolean")
    if type_ == "select":
        if isinstance(value, str) and value in (options or ()):
            return None
        allowed = ", ".join(repr(o) for o in options or ())
        return ("enum", f"Input should be one of {allowed}")
    if type_ == "date":
        if isinstance(value, str) and _DATE_RE.fullmatch(value):
            try:
                dt.date.fromisoformat(value)
                return None
            except ValueError:
                pass
        return ("date_parsing", "Input should be a valid date in the format YYYY-MM-DD")
    return ("value_error", f"Unknown custom field type {type_!r}")


class SandboxStore:
    """In-memory Proto data of every sub-company, safe to use from several threads."""

    def __init__(self, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._tenants: dict[str, _Tenant] = {}

    # -- helpers (call with the lock held) --------------------------------------------------

    def _new_id(self) -> str:
        """A ULID: 48 bits of milliseconds, then 80 random bits, in Crockford base32."""
        n = (int(time.time() * 1000) << 80) | self._rng.getrandbits(80)
        return "".join(_CROCKFORD[(n >> shift) & 31] for shift in range(125, -1, -5))

    def _tenant(self, sid: str) -> _Tenant:
        return self._tenants.setdefault(sid, _Tenant())

    def _customer(self, sid: str, uid: str) -> _Customer:
        found = self._tenant(sid).customers.get(uid)
        if found is None:
            raise NotFound("Customer not found")
        return found

    @staticmethod
    def _public(c: _Customer) -> dict[str, Any]:
        """The customer as the API returns it: everything but custom-field values."""
        return {
            "id": c.id,
            "provided_unique_id": c.provided_unique_id,
            **{k: c.profile.get(k) for k in PROFILE_FIELDS},
            "tags": list(c.tags),
            "created_at": c.created_at,
            "updated_at": c.updated_at,
        }

    @staticmethod
    def _field_dict(f: _Field) -> dict[str, Any]:
        return {"id": f.id, "name": f.name, "type": f.type, "select_options": f.select_options}

    # -- customers ------------------------------------------------------------------------

    def upsert_customer(self, sid: str, uid: str, changes: Mapping[str, str | None]) -> dict[str, Any]:
        """Create the customer or update it: given fields are set (null clears), others kept."""
        with self._lock:
            customers = self._tenant(sid).customers
            now = _now()
            customer = customers.get(uid)
            if customer is None:
                customer = _Customer(self._new_id(), uid, dict.fromkeys(PROFILE_FIELDS), now, now)
                customers[uid] = customer
            customer.profile.update({k: v for k, v in changes.items() if k in PROFILE_FIELDS})
            customer.updated_at = now
            return self._public(customer)

    def get_customer(self, sid: str, uid: str) -> dict[str, Any]:
        """The customer without its custom-field values; NotFound if unknown."""
        with self._lock:
            return self._public(self._customer(sid, uid))

    def add_tags(self, sid: str, uid: str, tags: Sequence[str], create: bool) -> dict[str, Any]:
        """Add tags to the customer (a set union); unknown tags need `create`."""
        with self._lock:
            tenant = self._tenant(sid)
            customer = self._customer(sid, uid)
            if not create:
                for i, tag in enumerate(tags):
                    if tag not in tenant.tags:
                        raise Invalid(("body", "tags", i), f"Tag {tag!r} does not exist", input_=tag)
            for tag in tags:
                tenant.tags.setdefault(tag, None)
                customer.tags.setdefault(tag, None)
            customer.updated_at = _now()
            return self._public(customer)

    def add_custom_fields(self, sid: str, uid: str, items: Sequence[FieldValue]) -> dict[str, Any]:
        """Set custom-field values; all or nothing, so one bad element changes nothing."""
        with self._lock:
            tenant = self._tenant(sid)
            customer = self._customer(sid, uid)
            by_name = {f.name: f for f in tenant.fields.values()}
            resolved: list[tuple[str, Any]] = []
            for i, item in enumerate(items):
                f = tenant.fields.get(item.ref) if item.by == "id" else by_name.get(item.ref)
                if f is None:
                    raise Invalid(
                        ("body", "custom_fields", i, item.by),
                        missing_field_message(item.ref),
                        input_=item.ref,
                    )
                problem = check_value(f.type, f.select_options, item.value)
                if problem is not None:
                    raise Invalid(("body", "custom_fields", i, "value"), problem[1], problem[0], item.value)
                resolved.append((f.id, item.value))
            customer.values.update(resolved)
            customer.updated_at = _now()
            return self._public(customer)

    # -- custom fields --------------------------------------------------------------------

    def list_fields(self, sid: str) -> list[dict[str, Any]]:
        """Every custom-field definition of the sub-company, oldest first."""
        with self._lock:
            return [self._field_dict(f) for f in self._tenant(sid).fields.values()]

    def create_field(self, sid: str, name: str, type_: str, select_options: Sequence[str] | None) -> dict[str, Any]:
        """Define a custom field; Conflict if the name is taken."""
        with self._lock:
            tenant = self._tenant(sid)
            if any(f.name == name for f in tenant.fields.values()):
                raise Conflict(f"A custom field named {name!r} already exists")
            options = list(select_options) if select_options is not None else None
            f = _Field(self._new_id(), name, type_, options)
            tenant.fields[f.id] = f
            return self._field_dict(f)

    def delete_field(self, sid: str, field_id: str) -> dict[str, Any]:
        """Remove a custom field and every customer's value of it; NotFound if unknown."""
        with self._lock:
            tenant = self._tenant(sid)
            if tenant.fields.pop(field_id, None) is None:
                raise NotFound("Custom field not found")
            for customer in tenant.customers.values():
                customer.values.pop(field_id, None)
            return {"id": field_id}

    # -- tickets --------------------------------------------------------------------------

    def create_ticket(self, sid: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Store a ticket (no idempotency: the same body twice makes two tickets)."""
        with self._lock:
            ticket = {"id": self._new_id(), **body, "created_at": _now()}
            self._tenant(sid).tickets.append(ticket)
            return {"id": ticket["id"]}

    # -- inspection -----------------------------------------------------------------------

    def customers_view(self, sid: str) -> list[dict[str, Any]]:
        """Every customer with its tags and custom-field values by field name."""
        with self._lock:
            tenant = self._tenant(sid)
            names = {f.id: f.name for f in tenant.fields.values()}
            return [
                {**self._public(c), "custom_fields": {names[k]: v for k, v in c.values.items()}}
                for c in tenant.customers.values()
            ]

    def tickets(self, sid: str) -> list[dict[str, Any]]:
        """Every ticket created in the sub-company, oldest first."""
        with self._lock:
            return [dict(t) for t in self._tenant(sid).tickets]

    def reset(self) -> None:
        """Forget every customer, field, tag and ticket."""
        with self._lock:
            self._tenants.clear()


class RequestStats:
    """Counts of API requests by status and by route, for /_sandbox/stats."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Start counting afresh."""
        with self._lock:
            self._total = 0
            self._dropped = 0
            self._by_status: dict[str, int] = {}
            self._by_route: dict[str, dict[str, int]] = {}
            self._first: float | None = None
            self._last: float | None = None

    def record(self, route: str, status: int | None, at: float) -> None:
        """Count one request; `status` None means its connection was dropped; `at` is monotonic."""
        with self._lock:
            self._total += 1
            self._first = at if self._first is None else min(self._first, at)
            self._last = at if self._last is None else max(self._last, at)
            if status is None:
                self._dropped += 1
                return
            key = str(status)
            self._by_status[key] = self._by_status.get(key, 0) + 1
            per_route = self._by_route.setdefault(route, {})
            per_route[key] = per_route.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """The counts as /_sandbox/stats answers them."""
        with self._lock:
            span = (self._last or 0.0) - (self._first or 0.0)
            rps = self._total / span if self._total >= 2 and span > 0 else 0.0
            return {
                "total": self._total,
                "by_status": dict(self._by_status),
                "by_route": {route: dict(counts) for route, counts in self._by_route.items()},
                "rate_limited": self._by_status.get("429", 0),
                "dropped": self._dropped,
                "requests_per_second": rps,
            }
