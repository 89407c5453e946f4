"""`crmsync check`: everything a run needs, verified before a run needs it.

Each check yields (ok, text); a mapping fault names the file line at fault, so a wrong
column or a value that does not fit its custom-field type is found now, not at row 40,000.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .errors import CrmsyncError, InvalidRecord
from .settings import load_settings
from .source.mapping import LocatedMapping, load_mapping
from .source.reader import SourceReader, source_engine

if TYPE_CHECKING:
    from .proto import CustomField
    from .runtime import Runtime

SAMPLE_PAGES = 1


def run_checks() -> Iterator[tuple[bool, str]]:
    """Run every check in order; later checks are skipped when what they need failed."""
    try:
        settings = load_settings()
    except CrmsyncError as exc:
        yield False, str(exc)
        return
    yield True, "settings"
    located = None
    if settings.mapping is None:
        yield False, "setting CRMSYNC_MAPPING is not set"
    else:
        try:
            located = load_mapping(settings.mapping)
            yield True, f"mapping {settings.mapping}"
        except CrmsyncError as exc:
            yield False, str(exc)
    if settings.source_url is None:
        yield False, "setting CRMSYNC_SOURCE_URL is not set"
    elif located is not None:
        yield from _check_source(located, settings.source_url, settings.batch_size)
    yield from _check_state(settings.state_url)
    if located is not None and settings.source_url is not None:
        yield from _check_mapping_change()
    yield from _check_proto(settings, located)


def _check_source(located: LocatedMapping, url: str, batch_size: int) -> Iterator[tuple[bool, str]]:
    try:
        reader = SourceReader(source_engine(url), located.mapping, batch_size)
        faults = reader.faults()
    except CrmsyncError as exc:
        yield False, str(exc)
        return
    for fault in faults:
        yield False, fault
    if faults:
        return
    columns = reader.columns()
    yield True, f"source: {len(columns)} columns, every mapped column present"
    try:
        sample = read = 0
        bad: dict[str, InvalidRecord] = {}
        for i, page in enumerate(reader.pages()):
            read += len(page)
            for row in page.invalid:
                bad.setdefault(row.error.field or row.error.code, row.error)
            sample = i + 1
            if sample >= SAMPLE_PAGES:
                break
    except CrmsyncError as exc:
        yield False, f"source: {exc}"
        return
    for field, err in bad.items():
        yield (
            False,
            f"{located.where(_field_loc(located, field))}: {err} (first seen among {read} sampled rows)",
        )
    if not bad:
        yield True, f"source: the first {read} rows all map to valid customers"


def _field_loc(located: LocatedMapping, field: str) -> tuple[str | int, ...]:
    """The mapping path of what produced `field`: its entry, or the query that returned it."""
    specs = located.mapping.custom_fields
    for i, spec in enumerate(specs):
        if spec.name == field:
            return ("custom_fields", i)
        if field in spec.types:
            return ("custom_fields", i, "types", field)
    if "." in field or field in ("tags",):
        return tuple(field.split("."))
    # A field named by a `(key, name, value)` query: that query's line (the first, if several).
    queries = [i for i, spec in enumerate(specs) if spec.query is not None]
    return ("custom_fields", queries[0], "query") if queries else ("custom_fields",)


def _check_state(url: str) -> Iterator[tuple[bool, str]]:
    from .state.db import schema_is_current, state_engine

    try:
        current = schema_is_current(state_engine(url))
    except Exception as exc:  # any driver error is a failed check, reported as such
        yield False, f"state database: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return
    yield (
        (True, "state database at the latest migration")
        if current
        else (False, "state database is not migrated: run `crmsync init`")
    )


def _check_proto(settings: object, located: LocatedMapping | None) -> Iterator[tuple[bool, str]]:
    from .runtime import Runtime
    from .settings import Settings

    assert isinstance(settings, Settings)
    rt = Runtime(settings)
    try:
        fields = {f.name: f for f in rt.client.list_custom_fields()}
    except CrmsyncError as exc:
        yield False, f"Proto API at {settings.proto_base_url}: {exc}"
        return
    yield True, f"Proto API at {settings.proto_base_url}: authenticated, {len(fields)} custom fields defined"
    yield from _check_registry(rt, fields)
    if located is None:
        return
    # Each field's declared type: a column field's `type:`, and each name of a query's `types:`.
    declared: list[tuple[str, str, tuple[str | int, ...]]] = []
    for i, spec in enumerate(located.mapping.custom_fields):
        if spec.name:
            declared.append((spec.name, spec.type, ("custom_fields", i, "type")))
        declared.extend((name, type_, ("custom_fields", i, "types", name)) for name, type_ in spec.types.items())
    for name, type_, loc in declared:
        have = fields.get(name)
        if have is not None and have.type != type_:
            yield (
                False,
                (
                    f"{located.where(loc)}: custom field {name!r} is "
                    f"{have.type} in Proto, not {type_}; types cannot change once created"
                ),
            )


def _check_registry(rt: Runtime, fields: dict[str, CustomField]) -> Iterator[tuple[bool, str]]:
    """Every registered custom field must be in Proto under its registered id (not deleted there)."""
    try:
        registered = rt.store.registered_fields()
    except CrmsyncError:
        return  # the state DB check above already said what is wrong
    stale = 0
    for name, f in sorted(registered.items()):
        now = fields.get(name)
        if now is not None and now.id == f.id:
            continue
        stale += 1
        found = f"Proto's field of that name is {now.id}" if now else "Proto has no field of that name"
        yield (
            False,
            f"custom field {name!r} is registered as id {f.id}, which Proto no longer has ({found}; deleted "
            "in Proto?): run `crmsync sync full --force --wait` to ensure it again and re-send every customer's "
            "values (a sync sending it ensures it again by itself, for the customers it sends)",
        )
    if registered and not stale:
        yield True, f"custom-field registry: {len(registered)} fields, each in Proto under its registered id"


def _check_mapping_change() -> Iterator[tuple[bool, str]]:
    from .jobs import planner
    from .runtime import runtime

    try:
        changed = planner(runtime()).mapping_changes()
    except CrmsyncError:
        return  # the state DB check above already said what is wrong
    if changed:
        # Information, not a failure: the next run handles it.
        yield (
            True,
            (
                f"the mapping changed since the last full sync ({', '.join(changed)}): the next sync reads "
                "every contact and re-sends the parts whose content differs"
            ),
        )
