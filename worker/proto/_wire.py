"""Every JSON shape and route of the Proto developer API, in one place.

The vendor's page settles the routes, the create-customer and create-ticket bodies and
little else. Each assumption below is marked ASSUMED and listed in docs/proto-api.md;
when a real account shows otherwise, this module (and the sandbox, which imports it)
is what changes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

API_PREFIX = "/v1"

# Route templates, relative to the base URL (which ends in /api/platform).
# The sandbox serves exactly these; its /_sandbox/stats names a route "METHOD template".
ROUTES: dict[str, tuple[str, str]] = {
    "create_ticket": ("POST", "/v1/conversations/{subcompany_id}/create-ticket"),
    "get_customer": ("GET", "/v1/customers/{subcompany_id}/customer/{provided_unique_id}/get-customer"),
    "upsert_customer": ("PUT", "/v1/customers/{subcompany_id}/create-customer/{provided_unique_id}"),
    "add_tags": ("PUT", "/v1/customers/{subcompany_id}/customer/{provided_unique_id}/add-tags"),
    "add_custom_fields": (
        "PUT",
        "/v1/customers/{subcompany_id}/customer/{provided_unique_id}/add-custom-fields",
    ),
    "list_custom_fields": ("GET", "/v1/custom-fields/{subcompany_id}/list-custom-fields"),
    "create_custom_field": ("POST", "/v1/custom-fields/{subcompany_id}/create-custom-field"),
    "delete_custom_field": (
        "DELETE",
        "/v1/custom-fields/{subcompany_id}/custom-field/{custom_field_id}/delete-custom-fields",
    ),
}

# The customer profile fields of create-customer, in the vendor's order.
PROFILE_FIELDS: tuple[str, ...] = (
    "external_customer_id",
    "name",
    "location",
    "email",
    "phone_number",
    "avatar",
)

# The custom-field kinds the product offers.
FIELD_TYPES: tuple[str, ...] = ("text", "number", "toggle", "select", "date")

# create-ticket takes exactly one of these.
TICKET_CUSTOMER_IDS: tuple[str, ...] = (
    "customer_id",
    "external_customer_id",
    "gateway_profile_id",
    "provided_unique_id",
)

# A provided_unique_id longer than this cannot be sent (ASSUMED: no public limit; URLs
# past a few KB are refused by common proxies, and 255 fits every CRM key we know).
MAX_UNIQUE_ID_LENGTH = 255


# ASSUMED field rules (the vendor page states none). The sandbox enforces exactly these, and
# crmsync checks every row against them before any call, so a bad row is recorded as an
# invalid record with its reason instead of costing a call that ends in a 422.
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
PHONE_PATTERN = r"^[0-9 +\-().]*$"
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
PROFILE_MAX_LENGTH: dict[str, int] = {
    "external_customer_id": 255,
    "name": 255,
    "location": 255,
    "email": 255,
    "phone_number": 50,
    "avatar": 2048,
}
MAX_TAG_LENGTH = 100
# ASSUMED, as for tags: a custom-field name is 1 to 255 characters, none of them a control character.
MAX_FIELD_NAME_LENGTH = 255
# The integers a JSON number carries exactly to any reader: RFC 8259 (section 6) names
# [-(2**53)+1, 2**53-1] the interoperable range, since most parsers hold a number as an IEEE 754
# double. The vendor states nothing more for `number` fields, so crmsync sends no integer beyond it.
MAX_EXACT_INTEGER = 2**53 - 1
# The profile fields whose values must also match a pattern.
VALUE_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(EMAIL_PATTERN),
    "phone_number": re.compile(PHONE_PATTERN),
}


def profile_problem(field: str, value: str) -> str | None:
    """Why Proto would refuse `value` for profile `field`, or None when it is fine."""
    limit = PROFILE_MAX_LENGTH.get(field, 255)
    if len(value) > limit:
        return f"{field} is {len(value)} characters long (at most {limit})"
    if CONTROL_CHARACTERS.search(value):
        return f"{field} contains control characters"
    if field == "email" and not VALUE_PATTERNS[field].fullmatch(value):
        return f"{field} {value[:60]!r} is not an e-mail address"
    if field == "phone_number" and not VALUE_PATTERNS[field].fullmatch(value):
        return f"{field} {value[:60]!r} may hold only digits, spaces and + - ( ) ."
    return None


def tag_problem(tag: str) -> str | None:
    """Why Proto would refuse a tag name, or None when it is fine."""
    if len(tag) > MAX_TAG_LENGTH:
        return f"tag {tag[:40]!r}... is {len(tag)} characters long (at most {MAX_TAG_LENGTH})"
    if CONTROL_CHARACTERS.search(tag):
        return f"tag {tag[:40]!r} contains control characters"
    return None


def field_name_problem(name: str) -> str | None:
    """Why Proto would refuse `name` as a custom-field name, or None when it is fine.

    A name of blanks only counts as empty: no CRM means it as a field's name.
    """
    if not name.strip():
        return "the custom-field name is empty"
    if len(name) > MAX_FIELD_NAME_LENGTH:
        return f"custom-field name {name[:40]!r}... is {len(name)} characters long (at most {MAX_FIELD_NAME_LENGTH})"
    if CONTROL_CHARACTERS.search(name):
        return f"custom-field name {name[:40]!r} contains control characters"
    return None


def path(route: str, subcompany_id: str, **params: str) -> str:
    """The URL path of `route`, with every parameter percent-encoded as one segment."""
    _, template = ROUTES[route]
    encoded = {k: _segment(v) for k, v in params.items()}
    return template.format(subcompany_id=quote(subcompany_id, safe=""), **encoded)


def _segment(value: str) -> str:
    """`value` as one path segment; "." and ".." are encoded too, or URL normalisation drops them."""
    encoded = quote(value, safe="")
    return encoded.replace(".", "%2E") if set(value) == {"."} else encoded


def customer_body(profile: Mapping[str, Any]) -> dict[str, Any]:
    """create-customer body: every mapped profile field, nulls included.

    ASSUMED: the upsert sets each field it is given, null clearing it, and leaves
    fields it is not given unchanged.
    """
    return {k: profile[k] for k in PROFILE_FIELDS if k in profile}


def tags_body(tags: Sequence[str]) -> dict[str, Any]:
    """add-tags body. ASSUMED shape: ``{"tags": [names], "create_if_not_exists": true}``."""
    return {"tags": list(tags), "create_if_not_exists": True}


def custom_fields_body(values: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """add-custom-fields body from (custom_field_id, value) pairs.

    ASSUMED shape: ``{"custom_fields": [{"id": ..., "value": ...}]}``; an element may
    name its field with ``"name"`` instead of ``"id"``.
    """
    return {"custom_fields": [{"id": fid, "value": value} for fid, value in values]}


def create_field_body(name: str, type_: str, select_options: Sequence[str] | None) -> dict[str, Any]:
    """create-custom-field body; `select_options` is sent if and only if the type is select."""
    body: dict[str, Any] = {"name": name, "type": type_}
    if type_ == "select":
        body["select_options"] = list(select_options or [])
    return body


def ticket_body(subject: str, **customer: str | None) -> dict[str, Any]:
    """create-ticket body: the subject and the one customer identifier given."""
    given = {k: v for k, v in customer.items() if v is not None}
    if len(given) != 1 or not set(given) <= set(TICKET_CUSTOMER_IDS):
        raise ValueError(f"create-ticket takes exactly one of {', '.join(TICKET_CUSTOMER_IDS)}")
    return {"subject": subject, **given}


# ASSUMED: add-custom-fields answers an unknown field id (a field deleted in Proto) with a 422
# whose detail names the element (loc ending in "id") and says the field does not exist.
MISSING_FIELD_WORDS = "does not exist"


def missing_field_message(ref: str) -> str:
    """The 422 message for an add-custom-fields element naming a field Proto does not have."""
    return f"Custom field {ref!r} {MISSING_FIELD_WORDS}"


def missing_custom_field(body: str) -> str | None:
    """The field id an add-custom-fields 422 says does not exist, or None for any other 422."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    detail = data.get("detail") if isinstance(data, dict) else None
    for item in detail if isinstance(detail, list) else []:
        loc = item.get("loc") if isinstance(item, dict) else None
        if isinstance(loc, list) and loc[-1:] == ["id"] and MISSING_FIELD_WORDS in str(item.get("msg")):
            return str(item["input"]) if item.get("input") is not None else ""
    return None


@dataclass(frozen=True)
class CustomField:
    """A custom-field definition as Proto lists it."""

    id: str
    name: str
    type: str
    select_options: tuple[str, ...] = ()


def parse_custom_field(obj: Mapping[str, Any]) -> CustomField:
    """One element of list-custom-fields, or the answer of create-custom-field."""
    return CustomField(
        id=str(obj["id"]),
        name=str(obj["name"]),
        type=str(obj.get("type") or "text"),
        select_options=tuple(obj.get("select_options") or ()),
    )


def parse_custom_field_page(body: Any) -> tuple[list[CustomField], str | None]:
    """list-custom-fields answer -> (fields, next cursor).

    ASSUMED: ``{"custom_fields": [...], "next": null}``; a bare list is accepted too, and
    a non-null ``next`` is followed as a ``cursor`` query parameter.
    """
    if isinstance(body, list):
        return [parse_custom_field(o) for o in body], None
    items = body.get("custom_fields") or body.get("items") or body.get("data") or []
    nxt = body.get("next")
    return [parse_custom_field(o) for o in items], (str(nxt) if nxt else None)


def parse_retry_after(value: str | None, default: float = 1.0) -> float:
    """Seconds to wait from a Retry-After header (delta-seconds; an HTTP date counts as default)."""
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        return default
    # float() also reads "inf" and "nan": an endless or undefined pause would stall every worker.
    return max(0.0, seconds) if math.isfinite(seconds) else default
