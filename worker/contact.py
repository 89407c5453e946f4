"""A contact in canonical form: the payload a task carries, split in the parts Proto sets
with one call each (profile, tags, custom fields), each with a content hash.

Canonical means: the same CRM data always gives the same payload and hashes, whatever the
SQL dialect or driver returned (Decimal or float, naive or aware datetime, str or bytes).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .errors import InvalidRecord
from .proto._wire import MAX_UNIQUE_ID_LENGTH, profile_problem, tag_problem

if TYPE_CHECKING:  # workers load contacts from payloads and never need the mapping's machinery
    from .source.mapping import Mapping

PARTS = ("profile", "tags", "fields")

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}
# What json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False) uses,
# built once: the planner hashes three parts of every contact it reads.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Contact:
    """One contact, ready to send. `version` is the source's updated_at as UTC ISO text."""

    key: str
    version: str | None
    deleted: bool
    profile: dict[str, Any]
    tags: list[str]
    fields: dict[str, Any]
    hashes: dict[str, str] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        """JSON-ready dict for a task message.

        The same dict as ``dataclasses.asdict``, built directly: every value inside the parts
        is a JSON primitive, so copying each part one level deep copies it whole (and asdict's
        recursive deep copy was the planner's largest cost over a million contacts).
        """
        return {
            "key": self.key,
            "version": self.version,
            "deleted": self.deleted,
            "profile": dict(self.profile),
            "tags": list(self.tags),
            "fields": dict(self.fields),
            "hashes": dict(self.hashes),
        }

    @classmethod
    def from_payload(cls, data: AbcMapping[str, Any]) -> Contact:
        """The inverse of :meth:`to_payload`."""
        return cls(**data)

    def part(self, name: str) -> Any:
        """The body of one part: ``profile``, ``tags`` or ``fields``."""
        return {"profile": self.profile, "tags": self.tags, "fields": self.fields}[name]


def with_tag(contact: Contact, tag: str) -> Contact:
    """`contact` with one more tag (and its tags hash updated)."""
    tags = sorted({*contact.tags, tag})
    return replace(contact, tags=tags, hashes={**contact.hashes, "tags": content_hash(tags)})


def payload_hash(contact: Contact) -> str:
    """One hash of every part of a contact: what a dead-lettered attempt is remembered by."""
    return content_hash(contact.hashes)


def content_hash(value: Any) -> str:
    """A stable hash of JSON-able data."""
    blob = _CANONICAL_JSON.encode(value)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def version_text(value: Any) -> str | None:
    """The source's updated_at as sortable UTC ISO text; naive times are taken as UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        if value.year >= 1000:  # the same text as strftime below, several times faster
            return value.isoformat(timespec="microseconds")
        return value.strftime("%Y-%m-%dT%H:%M:%S.%f")
    if isinstance(value, dt.date):
        return value.strftime("%Y-%m-%dT00:00:00.000000")
    return str(value)


def unique_id(raw: Any) -> str:
    """The provided_unique_id of a key value, or InvalidRecord when it cannot be sent."""
    if raw is None:
        raise InvalidRecord("missing_key", "the key column is NULL", "source.key")
    key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if not key.strip():
        raise InvalidRecord("missing_key", "the key column is empty", "source.key")
    if len(key) > MAX_UNIQUE_ID_LENGTH:
        raise InvalidRecord(
            "key_too_long", f"the key is {len(key)} characters (at most {MAX_UNIQUE_ID_LENGTH})", "source.key"
        )
    return key


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Decimal) and value.is_finite():
        value = int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _flag(value: Any) -> bool:
    """A CRM deleted flag: truthy, except the text of a false toggle ("0", "false", "no", "")."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = (_text(value) or "").strip().lower()
    return bool(text) and text not in _FALSE


def field_value(spec_type: str, options: tuple[str, ...] | None, name: str, value: Any) -> Any:
    """A CRM value as the JSON value of a custom field of `spec_type`, or InvalidRecord."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if spec_type != "text" and isinstance(value, str) and not value.strip():
        return None  # an empty cell in a typed column means "no value", as NULL does

    def bad() -> InvalidRecord:  # built only when raised: most values fit
        return InvalidRecord("field_type", f"custom field {name!r} ({spec_type}) cannot hold {str(value)[:60]!r}", name)

    if spec_type == "number":
        if isinstance(value, bool):
            raise bad()
        try:
            number = float(value) if isinstance(value, int | float | Decimal) else float(str(value).strip())
        except ValueError:  # text, or a signalling NaN
            raise bad() from None
        if number != number or number in (float("inf"), float("-inf")):
            raise bad()
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if spec_type == "toggle":
        if isinstance(value, bool):
            return value
        text = str(_text(value)).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise bad()
    if spec_type == "date":
        if isinstance(value, dt.datetime):
            return value.date().isoformat()
        if isinstance(value, dt.date):
            return value.isoformat()
        try:
            return dt.date.fromisoformat(str(value).strip()[:10]).isoformat()
        except ValueError:
            raise bad() from None
    as_text = _text(value)
    if spec_type == "select" and options is not None and as_text not in options:
        raise InvalidRecord(
            "field_option", f"custom field {name!r}: {as_text!r} is not one of {', '.join(options)}", name
        )
    return as_text


def build_contact(
    mapping: Mapping,
    row: AbcMapping[str, Any],
    tags: list[Any] | None = None,
    extra_fields: list[tuple[str, Any]] | None = None,
) -> Contact:
    """Turn one source row (with its queried tags and fields) into a Contact.

    Raises InvalidRecord for a row that cannot be sent; the caller records it.
    """
    src = mapping.source
    key = unique_id(row.get(src.key))
    profile: dict[str, Any] = {}
    for name, cols in mapping.customer.items():
        if isinstance(cols, str):
            value = _text(row.get(cols))
            profile[name] = value if value and value.strip() else None  # an empty cell is no value
        else:
            words = [t.strip() for t in (_text(row.get(c)) for c in cols) if t and t.strip()]
            profile[name] = " ".join(words) or None
        problem = profile[name] is not None and profile_problem(name, profile[name])
        if problem:
            raise InvalidRecord(f"invalid_{name}", problem, f"customer.{name}")
    if mapping.tags and mapping.tags.column:
        raw = _text(row.get(mapping.tags.column)) or ""
        tags = [t.strip() for t in raw.split(mapping.tags.separator)]
    tag_list = sorted({t for t in ((_text(t) or "").strip() for t in tags or []) if t})
    for tag in tag_list:
        if problem := tag_problem(tag):
            raise InvalidRecord("invalid_tag", problem, "tags")
    values: dict[str, Any] = {}
    for spec in mapping.column_fields:
        assert spec.name and spec.column
        values[spec.name] = field_value(spec.type, spec.options, spec.name, row.get(spec.column))
    for name, value in extra_fields or []:
        values[name] = field_value(mapping.query_field_type(name), None, name, value)
    fields = {k: v for k, v in values.items() if v is not None}
    deleted = _flag(row.get(src.deleted)) if src.deleted else False
    hashes = {
        "profile": content_hash(profile),
        "tags": content_hash(tag_list),
        "fields": content_hash(fields),
    }
    version = version_text(row.get(src.updated_at)) if src.updated_at else None
    return Contact(key, version, deleted, profile, tag_list, fields, hashes)
