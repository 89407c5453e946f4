"""A contact in canonical form: the payload a task carries, split in the parts Proto sets
with one call each (profile, tags, custom fields), each with a content hash.

Canonical means: the same CRM data always gives the same payload and hashes, whatever the
SQL dialect or driver returned (Decimal or float, naive or aware datetime, str or bytes).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from decimal import Decimal
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import TYPE_CHECKING, Any

from .errors import InvalidRecord
from .proto._wire import (
    CONTROL_CHARACTERS,
    MAX_EXACT_INTEGER,
    MAX_TAG_LENGTH,
    MAX_UNIQUE_ID_LENGTH,
    PROFILE_MAX_LENGTH,
    VALUE_PATTERNS,
    field_name_problem,
    profile_problem,
    tag_problem,
)

if TYPE_CHECKING:  # workers load contacts from payloads and never need the mapping's machinery
    from .source.mapping import Mapping

PARTS = ("profile", "tags", "fields")
# The version of the canonical form that build_contact gives. Raise it with any change to what
# build_contact returns for a row: the planner's row fingerprints carry it, so that no row is
# taken as unchanged on the strength of a contact built the old way.
# 2: bytes that are not UTF-8 are an invalid_utf8 error, not replaced. 3: values are read exactly or
# refused (strict number and date grammars, no integer beyond what JSON carries exactly, decimals as
# their exact text), bad names from a custom-field query refused.
CANONICAL_FORM = 3

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}
# Number text: an optional sign, ASCII digits, an optional fraction and exponent, blanks around.
# Strict on purpose: float() and int() also take "1_000", Arabic-Indic or fullwidth digits, "nan"
# and "infinity", which would send a value the CRM does not show.
# Groups: the number's text, its whole digits, its fraction digits (after whole ones, or alone), its exponent.
_NUMBER = re.compile(r"[ \t\r\n]*([+-]?(?:([0-9]+)(?:\.([0-9]*))?|\.([0-9]+))(?:[eE]([+-]?[0-9]+))?)[ \t\r\n]*")
# Date text: YYYY-MM-DD alone, or beginning an ISO datetime (a date field takes its day, as written).
# Whole-text match: date.fromisoformat(text[:10]) took "2024-03-01garbage" as 2024-03-01, and
# fromisoformat alone takes ISO forms no CRM shows as a date ("20240301", "2024-W09-5").
_DATE = re.compile(
    r"[ \t\r\n]*(([0-9]{4}-[0-9]{2}-[0-9]{2})"
    r"(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?(?:Z|[+-][0-9]{2}:?[0-9]{2})?)?)[ \t\r\n]*"
)
# What json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False) gives,
# built once: the planner hashes three parts of every contact it reads. The C encoder, called
# directly, skips the per-call set-up of JSONEncoder.encode (a third of a hash's cost); the
# payloads hold no cycles, so it needs no cycle check.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_C_ENCODER = (
    c_make_encoder(None, None, encode_basestring, None, ":", ",", True, False, True)
    if c_make_encoder is not None
    else None
)


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

        The same dict as ``dataclasses.asdict``, built directly, sharing the parts rather than
        copying them: a message is serialised once built, and nothing changes a contact's parts
        after building it (``with_tag`` makes a new contact). Copying took 6% of a first plan.
        """
        return {
            "key": self.key,
            "version": self.version,
            "deleted": self.deleted,
            "profile": self.profile,
            "tags": self.tags,
            "fields": self.fields,
            "hashes": self.hashes,
        }

    @classmethod
    def from_payload(cls, data: AbcMapping[str, Any]) -> Contact:
        """The inverse of :meth:`to_payload`, reading what this version knows of it.

        During a rolling deploy a newer planner may add fields that an older worker does not
        know: they are left out, so that the worker syncs what it understands instead of
        failing every task (and the reconciler sending them again and again). A field with a
        default (`hashes`) may be missing, as from an older planner: the part hashes are then
        computed from the parts, as the planner computes them.
        """
        contact = cls(**{name: data[name] for name in _PAYLOAD_FIELDS if name in data})
        if not all(part in contact.hashes for part in PARTS):
            contact = replace(contact, hashes=part_hashes(contact.profile, contact.tags, contact.fields))
        return contact

    def part(self, name: str) -> Any:
        """The body of one part: ``profile``, ``tags`` or ``fields``."""
        return {"profile": self.profile, "tags": self.tags, "fields": self.fields}[name]


_PAYLOAD_FIELDS = tuple(f.name for f in dataclass_fields(Contact))


def with_tag(contact: Contact, tag: str) -> Contact:
    """`contact` with one more tag (and its tags hash updated)."""
    tags = sorted({*contact.tags, tag})
    return replace(contact, tags=tags, hashes={**contact.hashes, "tags": content_hash(tags)})


def payload_hash(contact: Contact) -> str:
    """One hash of every part of a contact: what a dead-lettered attempt is remembered by."""
    return content_hash(contact.hashes)


def content_hash(value: Any) -> str:
    """A stable hash of JSON-able data."""
    blob = "".join(_C_ENCODER(value, 0)) if _C_ENCODER is not None else _CANONICAL_JSON.encode(value)
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


def key_text(raw: Any) -> str:
    """The text of a (non-NULL) key value, as the contact built from its row is keyed."""
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def unique_id(raw: Any) -> str:
    """The provided_unique_id of a key value, or InvalidRecord when it cannot be sent."""
    if raw is None:
        raise InvalidRecord("missing_key", "the key column is NULL", "source.key")
    key = _decoded(raw, "source.key") if isinstance(raw, bytes) else str(raw)
    if not key.strip():
        raise InvalidRecord("missing_key", "the key column is empty", "source.key")
    if len(key) > MAX_UNIQUE_ID_LENGTH:
        raise InvalidRecord(
            "key_too_long", f"the key is {len(key)} characters (at most {MAX_UNIQUE_ID_LENGTH})", "source.key"
        )
    return key


def _decoded(value: bytes, field: str) -> str:
    """Bytes from the driver (a BLOB, or SQLite text it could not decode) as UTF-8 text."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord(
            "invalid_utf8", f"the value is not UTF-8 text (byte {exc.start}: {value[:40]!r})", field
        ) from None


def _text(value: Any, field: str = "") -> str | None:
    if value is None or type(value) is str:
        return value
    if isinstance(value, bytes):
        return _decoded(value, field)
    if isinstance(value, Decimal) and value.is_finite():
        return _decimal_text(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _decimal_text(value: Decimal) -> str:
    """A finite Decimal as the text of its exact value: "12.5" for 12.50, "12" for 12.00.

    The text a float of the same value gives (so that NUMERIC and REAL columns agree) whenever
    that float holds the value; its exact digits otherwise, where float() would round them.
    """
    if value == value.to_integral_value():
        return str(int(value))
    as_float = float(value)
    return str(as_float) if Decimal(repr(as_float)) == value else format(value.normalize(), "f")


def is_deleted(mapping: Mapping, row: AbcMapping[str, Any]) -> bool:
    """Whether the row is soft-deleted by the mapping's `deleted` column."""
    column = _recipe(mapping).deleted
    return _flag(row.get(column)) if column else False


def _flag(value: Any) -> bool:
    """A CRM deleted flag: truthy, except the text of a false toggle ("0", "false", "no", "")."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = (_text(value, "source.deleted") or "").strip().lower()
    return bool(text) and text not in _FALSE


def field_value(spec_type: str, options: tuple[str, ...] | None, name: str, value: Any) -> Any:
    """A CRM value as the JSON value of a custom field of `spec_type`, or InvalidRecord.

    The value is sent exactly as read, or refused: ``field_type`` when it is not a value of the
    type, ``field_precision`` for a number that JSON cannot carry exactly, ``field_option`` for a
    select value outside its options.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = _decoded(value, name)
    if spec_type != "text" and isinstance(value, str) and not value.strip():
        return None  # an empty cell in a typed column means "no value", as NULL does

    def bad(why: str = "") -> InvalidRecord:  # built only when raised: most values fit
        return InvalidRecord(
            "field_type", f"custom field {name!r} ({spec_type}) cannot hold {str(value)[:60]!r}{why}", name
        )

    if spec_type == "number":
        return _number(value, name, bad)
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
        match = _DATE.fullmatch(value) if isinstance(value, str) else None
        try:
            if match is None:
                raise ValueError
            dt.datetime.fromisoformat(match.group(1))  # a real day (and time, when there is one)
        except ValueError:
            raise bad(" (a date is YYYY-MM-DD)") from None
        return match.group(2)
    as_text = _text(value)
    if spec_type == "select" and options is not None and as_text not in options:
        raise InvalidRecord(
            "field_option", f"custom field {name!r}: {as_text!r} is not one of {', '.join(options)}", name
        )
    return as_text


def _number(value: Any, name: str, bad: Callable[[str], InvalidRecord]) -> int | float:
    """The JSON number of a number field: an int when the value is whole, else a float.

    A float from the driver is sent as it is (JSON carries a double exactly). Any other value
    (int, Decimal, text) must come through exactly: an integer beyond MAX_EXACT_INTEGER, or a
    fraction with more digits than a double holds, is ``field_precision``.
    """
    if isinstance(value, bool):  # an int subclass in Python, but true is not a number in JSON
        raise bad("")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise bad("")
        return int(value) if value.is_integer() and abs(value) <= MAX_EXACT_INTEGER else value
    if isinstance(value, int):
        if abs(value) > MAX_EXACT_INTEGER:
            raise _imprecise(name, value, f"whole numbers are sent only up to {MAX_EXACT_INTEGER} either side of 0")
        return value
    if isinstance(value, Decimal):
        number, text = value, None
        short = value.is_finite() and len(value.as_tuple().digits) <= 15 and -99 <= value.adjusted() <= 99
    else:
        match = _NUMBER.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            raise bad(" (a number is written with ASCII digits, an optional sign, fraction and exponent)")
        text, whole, fraction, bare_fraction, exponent = match.groups()
        digits = len(whole or "") + len(fraction or bare_fraction or "")
        short = digits <= 15 and (exponent is None or len(exponent.lstrip("+-")) <= 2)
    if short:
        # The common case, decided without a round trip: a double holds any decimal of at most 15
        # significant digits (DBL_DIG) well inside its range, and its shortest text is that decimal.
        as_float = float(number if text is None else text)
        if not as_float.is_integer():
            return as_float
        if abs(as_float) <= MAX_EXACT_INTEGER:
            return int(as_float)
    if text is not None:
        number = Decimal(text)
    if not number.is_finite() or number.adjusted() > 308:  # NaN, infinite, or beyond any double
        raise bad(" (not a finite number)")
    if number == number.to_integral_value():
        return _number(int(number), name, bad)
    as_float = float(number)
    if Decimal(repr(as_float)) != number:  # the JSON text of the float would be another number
        raise _imprecise(name, value, f"the nearest number JSON carries is {as_float!r}")
    return as_float


def _imprecise(name: str, value: Any, why: str) -> InvalidRecord:
    return InvalidRecord(
        "field_precision", f"custom field {name!r} (number) cannot hold {str(value)[:60]} exactly: {why}", name
    )


@dataclass(frozen=True)
class _Recipe:
    """What build_contact needs of a mapping, worked out once: it runs for every row read."""

    key: str
    updated_at: str | None
    deleted: str | None
    profile: tuple[tuple[str, str | tuple[str, ...], str], ...]  # name, column(s), label in errors
    tag_column: str | None
    tag_separator: str
    column_fields: tuple[tuple[str, str, str, tuple[str, ...] | None], ...]  # name, column, type, options

    @classmethod
    def of(cls, mapping: Mapping) -> _Recipe:
        src = mapping.source
        return cls(
            key=src.key,
            updated_at=src.updated_at,
            deleted=src.deleted,
            profile=tuple(
                (n, c if isinstance(c, str) else tuple(c), f"customer.{n}") for n, c in mapping.customer.items()
            ),
            tag_column=mapping.tags.column if mapping.tags else None,
            tag_separator=mapping.tags.separator if mapping.tags else ",",
            column_fields=tuple(
                (f.name, f.column, f.type, tuple(f.options) if f.options is not None else None)
                for f in mapping.column_fields
                if f.name and f.column
            ),
        )


_RECIPES: dict[int, tuple[Mapping, _Recipe]] = {}


def _recipe(mapping: Mapping) -> _Recipe:
    cached = _RECIPES.get(id(mapping))
    if cached is None or cached[0] is not mapping:
        cached = _RECIPES[id(mapping)] = (mapping, _Recipe.of(mapping))
    return cached[1]


def build_contact(
    mapping: Mapping,
    row: AbcMapping[str, Any],
    tags: list[Any] | None = None,
    extra_fields: Sequence[tuple[Any, ...]] | None = None,
) -> Contact:
    """Turn one source row (with its queried tags and fields) into a Contact.

    `extra_fields` holds the (name, value) rows of the custom-field queries, as the driver
    returned them.

    Raises InvalidRecord for a row that cannot be sent; the caller records it.
    """
    recipe = _recipe(mapping)
    key = unique_id(row.get(recipe.key))
    profile: dict[str, Any] = {}
    for name, cols, label in recipe.profile:
        if type(cols) is str:
            value = _text(row.get(cols), label)
            profile[name] = value if value and value.strip() else None  # an empty cell is no value
        else:
            words = [t.strip() for t in (_text(row.get(c), label) for c in cols) if t and t.strip()]
            profile[name] = " ".join(words) or None
    _check_profile(profile)
    if recipe.tag_column:
        raw = _text(row.get(recipe.tag_column), "tags") or ""
        tags = [t.strip() for t in raw.split(recipe.tag_separator)]
    tag_list = sorted({t for t in ((_text(t, "tags") or "").strip() for t in tags or ()) if t})
    if tag_list and (max(map(len, tag_list)) > MAX_TAG_LENGTH or CONTROL_CHARACTERS.search("".join(tag_list))):
        for tag in tag_list:
            if problem := tag_problem(tag):
                raise InvalidRecord("invalid_tag", problem, "tags")
    fields: dict[str, Any] = {}
    for name, column, type_, options in recipe.column_fields:
        value = field_value(type_, options, name, row.get(column))
        if value is not None:
            fields[name] = value
    for raw_name, raw_value in extra_fields or ():
        name = query_field_name(raw_name)
        value = field_value(mapping.query_field_type(name), None, name, raw_value)
        if value is not None:
            fields[name] = value
        else:
            fields.pop(name, None)  # a later NULL clears an earlier value of the same name
    deleted = is_deleted(mapping, row)
    version = version_text(row.get(recipe.updated_at)) if recipe.updated_at else None
    return Contact(key, version, deleted, profile, tag_list, fields, part_hashes(profile, tag_list, fields))


def part_hashes(profile: dict[str, Any], tags: list[str], fields: dict[str, Any]) -> dict[str, str]:
    """The hash of each part of a contact: what change detection compares with what was sent."""
    return {"profile": content_hash(profile), "tags": content_hash(tags), "fields": content_hash(fields)}


def query_field_name(raw: Any) -> str:
    """The name of a custom field as a `(key, name, value)` query returned it, or InvalidRecord.

    A NULL, empty or over-long name, or one holding a control character, is ``invalid_field_name``
    for this contact: never a field named "None", never a create-custom-field call that Proto
    refuses for the whole run.
    """
    if raw is None:
        raise InvalidRecord("invalid_field_name", "a custom-field query returned a NULL field name", "custom_fields")
    name = _text(raw, "custom_fields") or ""
    if problem := field_name_problem(name):
        raise InvalidRecord(
            "invalid_field_name", f"a custom-field query returned a bad name: {problem}", "custom_fields"
        )
    return name


def _check_profile(profile: dict[str, Any]) -> None:
    """InvalidRecord for the first profile value Proto would refuse (see profile_problem).

    Checks every value in one pass first, since almost all are fine; only a row that fails
    it is checked field by field, for the error that names the field.
    """
    texts = [v for v in profile.values() if v is not None]
    fine = not CONTROL_CHARACTERS.search("".join(texts)) and all(
        len(value) <= PROFILE_MAX_LENGTH.get(name, 255)
        and (name not in VALUE_PATTERNS or VALUE_PATTERNS[name].fullmatch(value))
        for name, value in profile.items()
        if value is not None
    )
    if fine:
        return
    for name, value in profile.items():
        if value is not None and (problem := profile_problem(name, value)):
            raise InvalidRecord(f"invalid_{name}", problem, f"customer.{name}")
