"""The mapping file: which CRM query feeds crmsync and how its columns become a Proto customer.

The format is a contract with every CRM that uses crmsync (see README, "Mapping reference").
Errors name the line of the file at fault, found from the YAML node tree.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import ConfigError
from ..proto._wire import FIELD_TYPES, PROFILE_FIELDS, field_name_problem

FieldType = Literal["text", "number", "toggle", "select", "date"]
assert set(FieldType.__args__) == set(FIELD_TYPES)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Lexis:
    """How one SQL dialect family hides a `;`: in which quotes and comments."""

    backslash: bool  # a backslash escapes the next character in '...' and "..." (MySQL)
    hash_comments: bool  # `#` starts a comment to the end of the line (MySQL)
    dash_needs_space: bool  # `--` starts a comment only before whitespace (MySQL)
    nested_comments: bool  # /* /* */ */ nests (PostgreSQL)
    dollar_quotes: bool  # $tag$...$tag$ is a string (PostgreSQL)
    escape_strings: bool  # E'...' takes backslash escapes (PostgreSQL)
    executed_comments: bool  # /*! ... */ and /*M! ... */ are executed, not comments (MySQL, MariaDB)


# A `;` counts when any of these sees it outside quotes and comments: the mapping does not say
# which database it will meet, and a text one dialect reads as one statement may be two to another.
_LEXES = (
    _Lexis(False, False, False, False, False, False, False),  # standard SQL, SQLite
    _Lexis(False, False, False, True, True, True, False),  # PostgreSQL
    _Lexis(True, True, True, False, False, False, True),  # MySQL, MariaDB
)
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z_0-9\x80-\U0010ffff]*)?\$")


def _semicolons(sql: str, lexis: _Lexis) -> list[int]:
    """Positions of the `;` in `sql` that lie outside its quotes and comments, as `lexis` reads it."""
    found: list[int] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        word_before = i > 0 and _identifier_char(sql[i - 1])
        if c == ";":
            found.append(i)
            i += 1
        elif c in "'\"`":
            escapes = lexis.backslash and c != "`"
            if c == "'" and lexis.escape_strings and _escape_string_at(sql, i):
                escapes = True
            i = _quote_end(sql, i, escapes)
        elif _line_comment_at(sql, i, lexis):
            i = _line_end(sql, i)
        elif sql.startswith("/*", i):
            if lexis.executed_comments and (sql.startswith("/*!", i) or sql.startswith("/*M!", i)):
                i += 2  # its body is SQL the server runs: read on as code
            else:
                i = _comment_end(sql, i, lexis.nested_comments)
        elif c == "$" and lexis.dollar_quotes and not word_before and (tag := _DOLLAR_TAG.match(sql, i)):
            close = sql.find(tag.group(), tag.end())
            i = n if close < 0 else close + len(tag.group())
        else:
            i += 1
    return found


def _identifier_char(c: str) -> bool:
    """Whether `c` may continue an unquoted name: PostgreSQL and MySQL take any non-ASCII
    character in one (`€$$` is a name, not a dollar quote), as well as `_` and `$`."""
    return c.isalnum() or c in "_$" or c >= "\x80"


def _escape_string_at(sql: str, quote: int) -> bool:
    r"""Whether the `'` at `quote` opens a PostgreSQL E'...' string: an E that is a token of its own.

    An E ending a name is not one (`name'\'` is the name literal `\`, closed); after a number
    it is (before PostgreSQL 15, `1E'...'` is 1 and an escape string; since, an error).
    """
    if quote == 0 or sql[quote - 1] not in "Ee":
        return False
    start = quote - 1
    while start > 0 and _identifier_char(sql[start - 1]):
        start -= 1
    before = sql[start : quote - 1]
    return not before or all(c in "0123456789" for c in before)


def _quote_end(sql: str, start: int, escapes: bool) -> int:
    """The index after the quote opened at `start` (a doubled quote stays inside); the end if none."""
    quote, i = sql[start], start + 1
    while i < len(sql):
        if escapes and sql[i] == "\\":
            i += 2
        elif sql[i] == quote:
            if sql[i + 1 : i + 2] != quote:
                return i + 1
            i += 2
        else:
            i += 1
    return len(sql)


def _line_comment_at(sql: str, i: int, lexis: _Lexis) -> bool:
    if sql.startswith("--", i):
        return not lexis.dash_needs_space or sql[i + 2 : i + 3].isspace()
    return lexis.hash_comments and sql[i] == "#"


def _line_end(sql: str, start: int) -> int:
    end = sql.find("\n", start)
    return len(sql) if end < 0 else end + 1


def _comment_end(sql: str, start: int, nested: bool) -> int:
    depth, i = 0, start
    while i < len(sql):
        if sql.startswith("/*", i):
            depth = depth + 1 if nested or depth == 0 else depth
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(sql)


def one_statement(sql: str) -> str:
    """`sql` as one statement, without surrounding whitespace or a trailing `;`.

    A `;` outside quotes and comments followed by anything but whitespace starts a second
    statement: refused (ValueError), whichever dialect's quoting would reveal it. crmsync wraps
    each query in its own SELECT, and a query that closes that wrapper and adds statements of
    its own would run them (PostgreSQL runs a text of several statements at once).
    """
    text = sql.strip()
    for lexis in _LEXES:
        if any(text[p + 1 :].strip() for p in _semicolons(text, lexis)):
            raise ValueError(
                "holds more than one SQL statement (a `;` followed by more): give one SELECT, crmsync runs nothing else"
            )
    return text.removesuffix(";").rstrip()


def _single_statement(sql: str) -> str:
    one_statement(sql)
    return sql  # kept as written: the mapping's fingerprints hash what the file says


# A query of the mapping: one statement, checked when the file is read.
Query = Annotated[str, AfterValidator(_single_statement)]


# A table name, maybe schema-qualified: bare names, or quoted ones holding no quote, `;` or `\`.
_NAME_PART = r'(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*|"[^"`;\\]+"|`[^"`;\\]+`)'
_TABLE_NAME = re.compile(rf"{_NAME_PART}(?:\.{_NAME_PART})*")


def _table_name(name: str) -> str:
    # `table:` is put into SQL as it is written: anything but a name would be SQL of its own.
    if not _TABLE_NAME.fullmatch(name):
        raise ValueError(
            'is not a table name (a name or schema.name; "quoted" for one with spaces): give anything else as a `query`'
        )
    return name


class _FaultAt(ValueError):
    """A validation error whose fault lies below the field validated: `loc` extends its location."""

    def __init__(self, message: str, *loc: str | int) -> None:
        super().__init__(message)
        self.loc = loc


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    """Where contacts come from: a query (or a table), its key and its version column."""

    query: Query | None = None
    table: Annotated[str, AfterValidator(_table_name)] | None = None
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
        return one_statement(self.query) if self.query else f"SELECT * FROM {self.table}"


class TagsSpec(_Strict):
    """Tags from a delimited column of the contact row, or from a `(key, tag)` query."""

    column: str | None = None
    separator: str = ","
    query: Query | None = None

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
    query: Query | None = None
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

    query: Query
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
    # Where the file said what: the line of each YAML node, by path (set by `parse_mapping`).
    _lines: dict[tuple[str | int, ...], int] = PrivateAttr(default_factory=dict)
    _path: str = PrivateAttr(default="<mapping>")

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

    def where(self, loc: tuple[str | int, ...]) -> str:
        """`file:line` of the deepest YAML node on `loc`, so that an error names its line."""
        return _where(self._lines, self._path, loc)

    def side_queries(self) -> list[tuple[str, tuple[str | int, ...], tuple[str, ...]]]:
        """The tag and custom-field queries: each one's SQL, YAML path and the columns it must return."""
        out: list[tuple[str, tuple[str | int, ...], tuple[str, ...]]] = []
        if self.tags and self.tags.query:
            out.append((self.tags.query, ("tags", "query"), ("key", "tag")))
        for i, f in enumerate(self.custom_fields):
            if f.query is not None:
                out.append((f.query, ("custom_fields", i, "query"), ("key", "name", "value")))
        return out

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
        mapping._lines, mapping._path = lines, path  # the mapping names its own lines to who reads it

    def where(self, loc: tuple[str | int, ...]) -> str:
        """`file:line` of the deepest YAML node on `loc`."""
        return self.mapping.where(loc)


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
