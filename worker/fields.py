"""The custom-field registry: Proto's field ids by name, ensured under one lock.

The planner ensures the fields a run needs before any task is enqueued. A worker heals the
registry when Proto answers that a registered id does not exist (the field was deleted in
Proto): it finds or re-creates the field once, under the same lock, so that a thousand tasks
meeting the same stale id make one list call and at most one create call between them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from .proto import CustomField
from .runtime import Runtime

log = logging.getLogger(__name__)

# The lease held while fields are created: Proto would take a second field of the same name.
FIELDS_LOCK = "custom-fields"

FieldSpec = tuple[str, Sequence[str] | None]  # type, select options


def create_missing(
    rt: Runtime, wanted: Mapping[str, FieldSpec], existing: Mapping[str, CustomField] | None = None
) -> dict[str, str]:
    """Find each wanted field in Proto (`existing`, else listed now) or create it; register them all.

    Returns name -> Proto id. Call it holding FIELDS_LOCK.
    """
    if existing is None:
        existing = {f.name: f for f in rt.client.list_custom_fields()}
    found = []
    for name in sorted(wanted):
        f = existing.get(name)
        if f is None:
            type_, options = wanted[name]
            f = rt.client.create_custom_field(name, type_, options)
            log.info("created custom field %s (%s) in Proto", name, type_)
        found.append(f)
    rt.store.register_fields((f.name, f.id, f.type, f.select_options) for f in found)
    return {f.name: f.id for f in found}


def heal_fields(rt: Runtime, sent: Mapping[str, str], refused: str | None) -> None:
    """Proto refused the field id `refused` (None: an id it did not name) among `sent` (name -> id).

    Under FIELDS_LOCK: a refused id the registry no longer holds was healed by another task
    meanwhile, and costs no call. Otherwise the fields sent are compared with list-custom-fields
    (one call), and each one Proto lacks under its registered id (the refused one, and any other
    deleted with it) is found by name or created again from its registered type and options.
    This process's cache of ids is refreshed afterwards either way.
    """
    with rt.store.holding(FIELDS_LOCK):
        registered = rt.store.registered_fields()
        current = {n: registered[n] for n, i in sent.items() if n in registered and registered[n].id == i}
        if any(refused in (None, f.id) for f in current.values()):
            existing = {f.name: f for f in rt.client.list_custom_fields()}
            stale = {n: f for n, f in current.items() if n not in existing or existing[n].id != f.id}
            for name, f in sorted(stale.items()):
                log.warning("custom field %s (id %s) is gone from Proto: ensuring it again", name, f.id)
            if stale:
                create_missing(rt, {n: (f.type, f.select_options or None) for n, f in stale.items()}, existing)
    rt.forget_field_ids()
