"""The mapping file: which CRM query feeds crmsync and how its columns become a Proto customer.

The format is a contract with every CRM that uses crmsync (see README, "Mapping reference").
Errors name the line of the file at fault, found from the YAML node tree.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..proto._wire import FIELD_TYPES, PROFILE_FIELDS, field_name_problem

FieldType = Literal["text", "number", "toggle", "select", "date"]
assert set(FieldType.__args__) == set(FIELD_TYPES)  # type: ignore[attr-defined]


class _FaultAt(ValueError):
    """A validation error whose fault lies below the field validated: `loc` extends its location."""

    def __init__(self, message: str, *loc: str | int) -> None:
        super().__init__(message)
        self.loc = loc


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    """Where contacts come from: a query (or a table), its key and its version column."""

    query: str | None = None
    table: str | None = None
    key: str
    updated_at: str | None = None
    deleted: str | None = None

    @model_validator(mode="after")
    def _one_origin(self) -> SourceSpec:
        if (self.query is None) == (self.table is None):
            raise ValueError("give exactly one of `query` or `table`")
        return self

    def select_sql(self) -> str:
        """The SQL whose rows are the contacts."""
        return self.query.strip().rstrip(";") if self.query else f"SELECT * FROM {self.table}"


class TagsSpec(_Strict):
    """Tags from a delimited column of the contact row, or from a `(key, tag)` query."""

    column: str | None = None
    separator: str = ","
    query: str | None = None

    @model_validator(mode="after")
    def _one_origin(self) -> TagsSpec:
        if (self.column is None) == (self.query is None):
            raise ValueError("give exactly one of `column` or `query`")
        return self


class FieldSpec(_Strict):
    """One custom field from a column, or a `(key, name, value)` query of many fields."""

    name: str | None = None
    column: str | None = None
    type: FieldType = "text"
    options: tuple[str, ...] | None = None
    query: str | None = None
    types: dict[str, FieldType] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _sendable_name(cls, v: str | None) -> str | None:
        # Refused here, at its line: Proto would refuse it at create-custom-field, for the whole run.
        if v is not None and (problem := field_name_problem(v)):
            raise ValueError(problem)
        return v

    @field_validator("types")
    @classmethod
    def _sendable_names(cls, v: dict[str, FieldType]) -> dict[str, FieldType]:
        for name in v:
            if problem := field_name_problem(name):
                raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _shape(self) -> FieldSpec:
        if self.query is not None:
            if self.name or self.column:
                raise ValueError("a custom-field `query` entry takes no `name` or `column`")
            return self
        if not self.name or not self.column:
            raise ValueError("a custom field needs `name` and `column` (or a `query`)")
        if (self.type == "select") != (self.options is not None):
            raise ValueError("`options` is required for type select, and only for it")
        return self


class TicketsSpec(_Strict):
    """CRM cases that become Proto tickets: a query, and which of its columns say what."""

    query: str
    key: str
    subject: str
    customer: str


class Mapping(_Strict):
    """A whole mapping file."""

    source: SourceSpec
    customer: dict[str, str | list[str]]
    tags: TagsSpec | None = None
    custom_fields: list[FieldSpec] = Field(default_factory=list)
    tickets: TicketsSpec | None = None

    @field_validator("customer")
    @classmethod
    def _known_fields(cls, v: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        unknown = sorted(set(v) - set(PROFILE_FIELDS))
        if unknown:
            raise _FaultAt(
                f"unknown Proto customer field {unknown[0]!r}; known: {', '.join(PROFILE_FIELDS)}",
                unknown[0],
            )
        return v

    @property
    def column_fields(self) -> list[FieldSpec]:
        """Custom fields read from a column of the contact row."""
        return [f for f in self.custom_fields if f.query is None]

    @property
    def field_queries(self) -> list[str]:
        """The `(key, name, value)` queries of custom fields."""
        return [f.query for f in self.custom_fields if f.query is not None]

    def query_field_type(self, name: str) -> str:
        """The declared type of a field that a `(key, name, value)` query returns (text if none)."""
        for spec in self.custom_fields:
            if name in spec.types:
                return spec.types[name]
        return "text"

    def columns_used(self) -> list[tuple[str, tuple[str | int, ...]]]:
        """Every contact-row column the mapping names, with the YAML path that names it."""
        used: list[tuple[str, tuple[str | int, ...]]] = [(self.source.key, ("source", "key"))]
        for attr in ("updated_at", "deleted"):
            if getattr(self.source, attr):
                used.append((getattr(self.source, attr), ("source", attr)))
        for field, cols in self.customer.items():
            for i, col in enumerate([cols] if isinstance(cols, str) else cols):
                used.append((col, ("customer", field) if isinstance(cols, str) else ("customer", field, i)))
        if self.tags and self.tags.column:
            used.append((self.tags.column, ("tags", "column")))
        for i, f in enumerate(self.custom_fields):
            if f.column:
                used.append((f.column, ("custom_fields", i, "column")))
        return used

    def part_fingerprints(self) -> dict[str, str]:
        """A short hash per contact part of the mapping that produces it.

        Stored with each synced hash, so a changed mapping re-sends only the parts it affects.
        """
        parts = {
            "profile": [self.source.key, self.customer],
            "tags": self.tags.model_dump() if self.tags else None,
            "fields": [f.model_dump() for f in self.custom_fields],
        }
        return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:12] for k, v in parts.items()}


class LocatedMapping:
    """A mapping with the file line of each YAML node, to point errors at their line."""

    def __init__(self, mapping: Mapping, lines: dict[tuple[str | int, ...], int], path: str) -> None:
        self.mapping = mapping
        self.lines = lines
        self.path = path

    def where(self, loc: tuple[str | int, ...]) -> str:
        """`file:line` of the deepest YAML node on `loc`."""
        return _where(self.lines, self.path, loc)


def _where(lines: dict[tuple[str | int, ...], int], path: str, loc: tuple[str | int, ...]) -> str:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return f"{path}:{lines[loc[:end]]}"
    return path


def _node_lines(node: yaml.Node, prefix: tuple[str | int, ...], out: dict[tuple[str | int, ...], int]) -> None:
    out[prefix] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            out[(*prefix, key.value)] = key.start_mark.line + 1
            _node_lines(value, (*prefix, key.value), out)
            out[(*prefix, key.value)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, (*prefix, i), out)


def parse_mapping(text: str, path: str = "<mapping>") -> LocatedMapping:
    """Parse and validate mapping YAML; a ConfigError names `path:line` and the fault."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or node is None:
        raise ConfigError(f"{path}:1: the mapping must be a YAML mapping with `source` and `customer`")
    lines: dict[tuple[str | int, ...], int] = {}
    _node_lines(node, (), lines)
    try:
        mapping = Mapping.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p[:1].isupper()))
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _FaultAt):
            loc += cause.loc
        dotted = ".".join(str(p) for p in loc) or "mapping"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{_where(lines, path, loc)}: {dotted}: {msg}") from None
    return LocatedMapping(mapping, lines, path)


def load_mapping(path: Path | str) -> LocatedMapping:
    """Read and validate the mapping file at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"mapping file {path}: {exc.strerror}") from None
    return parse_mapping(text, str(path))
