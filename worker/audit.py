"""`crmsync audit`: read customers back from Proto and compare them with the CRM, field by field.

get-customer returns everything but custom-field values, so those cannot be audited; tags in
Proto that the CRM lacks are listed apart, since Proto cannot remove tags.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .contact import Contact
from .errors import PermanentError
from .runtime import Runtime
from .source.reader import SourceReader

NOTE = "custom-field values are not returned by get-customer: they are not audited"


@dataclass
class AuditReport:
    """What an audit found."""

    checked: int = 0
    missing: list[str] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    extra_tags: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "checked": self.checked,
            "missing": self.missing,
            "drift": self.drift,
            "extra_tags": self.extra_tags,
            "note": NOTE,
        }


def sample_contacts(reader: SourceReader, size: int, seed: int | None = None) -> list[Contact]:
    """A uniform sample of `size` valid contacts, streamed (reservoir sampling), never all in memory."""
    rng = random.Random(seed)
    sample: list[Contact] = []
    seen = 0
    for page in reader.pages():
        for contact in page.contacts:
            seen += 1
            if len(sample) < size:
                sample.append(contact)
            elif (j := rng.randrange(seen)) < size:
                sample[j] = contact
    return sample


def audit(rt: Runtime, contacts: list[Contact]) -> AuditReport:
    """Compare each contact with what Proto returns for it."""
    report = AuditReport()
    client = rt.client
    for contact in contacts:
        report.checked += 1
        try:
            got = client.get_customer(contact.key)
        except PermanentError as exc:
            if exc.status == 404:
                report.missing.append(contact.key)
                continue
            raise
        for name, want in contact.profile.items():
            have = got.get(name)
            if (have or None) != (want or None):
                report.drift.append({"key": contact.key, "field": name, "crm": want, "proto": have})
        have_tags = {t if isinstance(t, str) else str(t.get("name")) for t in got.get("tags") or []}
        if missing := sorted(set(contact.tags) - have_tags):
            report.drift.append(
                {
                    "key": contact.key,
                    "field": "tags",
                    "crm": contact.tags,
                    "proto": sorted(have_tags),
                    "missing_in_proto": missing,
                }
            )
        if extra := sorted(have_tags - set(contact.tags)):
            report.extra_tags[contact.key] = extra
    return report
