"""The FastAPI app of the sandbox: the eight vendor routes, their body models, the /_sandbox routes.

Routes and shapes come from :mod:`worker.proto._wire`, so the client and the sandbox cannot
drift apart; the rules the vendor leaves open are the ones listed in docs/proto-api.md.
"""

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    create_model,
    model_validator,
)
from starlette.convertors import Convertor, register_url_convertor
from starlette.routing import Match
from starlette.types import Scope

from ..errors import ConfigError
from ..proto._wire import (
    CONTROL_CHARACTERS,
    EMAIL_PATTERN,
    FIELD_TYPES,
    MAX_FIELD_NAME_LENGTH,
    MAX_TAG_LENGTH,
    MAX_UNIQUE_ID_LENGTH,
    PHONE_PATTERN,
    PROFILE_FIELDS,
    PROFILE_MAX_LENGTH,
    ROUTES,
    TICKET_CUSTOMER_IDS,
)
from .config import API_BASE_PATH, ULID_PATTERN, SandboxConfig
from .limits import ApiGate, FaultInjector, RateLimiter, Resolved, Resolver
from .store import FieldValue, Invalid, RequestStats, SandboxError, SandboxStore


def _no_control(value: str) -> str:
    if CONTROL_CHARACTERS.search(value):
        raise ValueError("control characters are not allowed")
    return value


def _field_type(value: str) -> str:
    if value not in FIELD_TYPES:
        raise ValueError(f"type must be one of {', '.join(FIELD_TYPES)}")
    return value


# -- request and response models ------------------------------------------------------------

_Strict = ConfigDict(extra="forbid")  # unknown body fields are a 422, never silently ignored

# _no_control's rule, stated in the OpenAPI document too, so that what it calls valid is accepted.
_NO_CONTROL: dict[str, Any] = {"not": {"pattern": "[\\u0000-\\u001f\\u007f-\\u009f]"}}
Text255 = Annotated[str, Field(max_length=255, json_schema_extra=_NO_CONTROL), AfterValidator(_no_control)]
Email = Annotated[
    str,
    Field(max_length=PROFILE_MAX_LENGTH["email"], pattern=EMAIL_PATTERN, json_schema_extra=_NO_CONTROL),
    AfterValidator(_no_control),
]
Phone = Annotated[
    str,
    Field(max_length=PROFILE_MAX_LENGTH["phone_number"], pattern=PHONE_PATTERN, json_schema_extra=_NO_CONTROL),
    AfterValidator(_no_control),
]
Url = Annotated[
    str, Field(max_length=PROFILE_MAX_LENGTH["avatar"], json_schema_extra=_NO_CONTROL), AfterValidator(_no_control)
]
Tag = Annotated[
    str, Field(min_length=1, max_length=MAX_TAG_LENGTH, json_schema_extra=_NO_CONTROL), AfterValidator(_no_control)
]
FieldType = Annotated[str, AfterValidator(_field_type), WithJsonSchema({"type": "string", "enum": list(FIELD_TYPES)})]

# The rule of each profile field; a field _wire adds later gets Text255 until it has its own.
_PROFILE_RULES: dict[str, Any] = {"email": Email, "phone_number": Phone, "avatar": Url}

# Models whose fields are the names _wire lists are built from it; mypy sees plain BaseModels.
if TYPE_CHECKING:
    CustomerIn = BaseModel
    CustomerOut = BaseModel
    TicketIn = BaseModel
else:
    CustomerIn = create_model(
        "CustomerIn",
        __config__=_Strict,
        **{name: (_PROFILE_RULES.get(name, Text255) | None, None) for name in PROFILE_FIELDS},
    )
    CustomerOut = create_model(
        "CustomerOut",
        id=(str, ...),
        provided_unique_id=(str, ...),
        **{name: (str | None, None) for name in PROFILE_FIELDS},
        tags=(list[str], ...),
        created_at=(str, ...),
        updated_at=(str, ...),
    )
    TicketIn = create_model(
        "TicketIn",
        __config__=_Strict,
        subject=(Annotated[str, Field(min_length=1)], ...),
        **{name: (Annotated[str, Field(min_length=1)] | None, None) for name in TICKET_CUSTOMER_IDS},
    )


class TagsIn(BaseModel):
    """add-tags body (ASSUMED shape, see _wire.tags_body)."""

    model_config = _Strict
    tags: list[Tag]
    create_if_not_exists: bool = False


class CustomFieldValueIn(BaseModel):
    """One custom-field value, its field named by `id` or by `name` (exactly one)."""

    model_config = _Strict
    id: str | None = None
    name: str | None = None
    value: Any = Field(description="A value of the field's type, or null.")

    @model_validator(mode="after")
    def _one_reference(self) -> "CustomFieldValueIn":
        if (self.id is None) == (self.name is None):
            raise ValueError("give exactly one of id and name")
        return self


class CustomFieldsIn(BaseModel):
    """add-custom-fields body (ASSUMED shape, see _wire.custom_fields_body)."""

    model_config = _Strict
    custom_fields: list[CustomFieldValueIn]


class CreateFieldIn(BaseModel):
    """create-custom-field body; `select_options` if and only if the type is select."""

    model_config = _Strict
    name: Annotated[str, Field(min_length=1, max_length=MAX_FIELD_NAME_LENGTH), AfterValidator(_no_control)]
    type: FieldType
    select_options: list[Text255] | None = None


class CustomFieldOut(BaseModel):
    """A custom-field definition."""

    id: str
    name: str
    type: str
    select_options: list[str] | None = None


class CustomFieldPage(BaseModel):
    """list-custom-fields answer; `next` is always null here (ASSUMED: no pagination)."""

    custom_fields: list[CustomFieldOut]
    next: str | None = None


class IdOut(BaseModel):
    """An answer that only names the object concerned."""

    id: str


class ErrorOut(BaseModel):
    """FastAPI's error body for everything but a 422."""

    detail: str


class FaultsIn(BaseModel):
    """POST /_sandbox/faults: the settings to change; absent ones keep their value."""

    model_config = _Strict
    fail_rate: float = Field(0.0, ge=0, le=1)
    drop_rate: float = Field(0.0, ge=0, le=1)
    throttle_rate: float = Field(0.0, ge=0, le=1)
    latency_ms: float = Field(0.0, ge=0, allow_inf_nan=False)
    jitter_ms: float = Field(0.0, ge=0, allow_inf_nan=False)
    rate_limit: float = Field(0.0, ge=0, allow_inf_nan=False)
    burst: int | None = Field(None, ge=1)
    outage: bool = False


SubcompanyId = Annotated[str, Path(pattern=ULID_PATTERN, description="Sub-company (teamspace) ULID.")]
UniqueId = Annotated[
    str,
    Path(min_length=1, max_length=MAX_UNIQUE_ID_LENGTH, description="The caller's key; may contain '/'."),
]
CustomFieldId = Annotated[str, Path(description="Id from list-custom-fields or create-custom-field.")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in (
        (400, "A body that cannot be parsed at all (routes that take one), as FastAPI answers"),
        (401, "No or malformed bearer token"),
        (403, "The token is not this sub-company's"),
        (429, "Rate limit exceeded; see Retry-After (whole seconds)"),
    )
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "Not found"}}


# -- wiring ----------------------------------------------------------------------------------


@dataclass
class SandboxState:
    """Everything one sandbox app holds; `config` is replaced whole by POST /_sandbox/faults."""

    config: SandboxConfig
    store: SandboxStore
    stats: RequestStats
    limiter: RateLimiter
    faults: FaultInjector


class _AnyText(Convertor[str]):
    """Starlette's `path` convertor with newlines too: a unique id may hold any character."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anytext", _AnyText())


def api_path(route: str) -> str:
    """The FastAPI path of a _wire route: under the base path, the unique id allowed any character, '/' too."""
    _, template = ROUTES[route]
    return API_BASE_PATH + template.replace("{provided_unique_id}", "{provided_unique_id:anytext}")


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _error_item(loc: Any, msg: str, type_: str, input_: Any = None, ctx: Any = None) -> dict[str, Any]:
    """One element of a 422 `detail`, keeping `input` and `ctx` only when they are plain JSON."""
    item: dict[str, Any] = {"type": type_, "loc": list(loc), "msg": msg}
    if input_ is not None and _json_safe(input_):
        item["input"] = input_
    if ctx:
        safe_ctx = {k: (v if _json_safe(v) else str(v)) for k, v in ctx.items()}
        item["ctx"] = safe_ctx
    return item


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's own handler echoes the input as is: a NaN in the body would then make the 422
    # itself fail to serialise and turn into a 500.
    assert isinstance(exc, RequestValidationError)
    detail = [
        _error_item(e.get("loc", ()), str(e.get("msg")), str(e.get("type")), e.get("input"), e.get("ctx"))
        for e in exc.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


async def _sandbox_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SandboxError)
    if isinstance(exc, Invalid):
        item = _error_item(exc.loc, exc.msg, exc.type, exc.input)
        return JSONResponse({"detail": [item]}, status_code=422)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


def _resolver(router: APIRouter) -> Resolver:
    """Find which _wire route a request is for, with FastAPI's own matching.

    It asks the API router itself (it has no prefix), not the app: the app holds included
    routers as opaque wrappers.
    """

    def resolve(scope: Scope) -> Resolved | None:
        for route in router.routes:
            if isinstance(route, APIRoute) and route.name in ROUTES:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    return route.name, child.get("path_params", {})
        return None

    return resolve


def create_app(config: SandboxConfig) -> FastAPI:
    """A FastAPI app modelling the Proto developer API, with inspection routes under /_sandbox."""
    config = replace(config, tenants=dict(config.tenants))  # faults changes never touch the caller's
    state = SandboxState(
        config=config,
        store=SandboxStore(config.seed),
        stats=RequestStats(),
        limiter=RateLimiter(config.rate_limit, config.effective_burst),
        faults=FaultInjector(config.seed),
    )
    app = FastAPI(
        title="Proto AICX developer API (crmsync sandbox)",
        version="1",
        description="A local model of https://v3-api.proto.cx/api/platform; see docs/proto-api.md.",
    )
    app.state.sandbox = state
    api = _api_router(state)
    app.include_router(api)
    app.include_router(_sandbox_router(state))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(SandboxError, _sandbox_error)
    app.add_middleware(
        ApiGate,
        resolve=_resolver(api),
        config=lambda: state.config,
        limiter=state.limiter,
        faults=state.faults,
        stats=state.stats,
    )
    return app


def _api_router(state: SandboxState) -> APIRouter:
    """The eight routes of the vendor page; auth, limits and faults happen before, in ApiGate."""
    # auto_error=False: ApiGate already answered 401/403; this only documents the scheme.
    router = APIRouter(dependencies=[Security(HTTPBearer(auto_error=False))], responses=_ERRORS)
    store = state.store

    @router.put(api_path("upsert_customer"), name="upsert_customer", response_model=CustomerOut)
    async def upsert_customer(
        subcompany_id: SubcompanyId, provided_unique_id: UniqueId, body: CustomerIn
    ) -> dict[str, Any]:
        """Create the customer, or update it: given fields are set (null clears), others kept."""
        return store.upsert_customer(subcompany_id, provided_unique_id, body.model_dump(exclude_unset=True))

    @router.get(api_path("get_customer"), name="get_customer", response_model=CustomerOut, responses=_NOT_FOUND)
    async def get_customer(subcompany_id: SubcompanyId, provided_unique_id: UniqueId) -> dict[str, Any]:
        """Everything about the customer except custom-field values."""
        return store.get_customer(subcompany_id, provided_unique_id)

    @router.put(api_path("add_tags"), name="add_tags", response_model=CustomerOut, responses=_NOT_FOUND)
    async def add_tags(subcompany_id: SubcompanyId, provided_unique_id: UniqueId, body: TagsIn) -> dict[str, Any]:
        """Add tags; a tag the sub-company lacks needs create_if_not_exists."""
        return store.add_tags(subcompany_id, provided_unique_id, body.tags, body.create_if_not_exists)

    @router.put(
        api_path("add_custom_fields"),
        name="add_custom_fields",
        response_model=CustomerOut,
        responses=_NOT_FOUND,
    )
    async def add_custom_fields(
        subcompany_id: SubcompanyId, provided_unique_id: UniqueId, body: CustomFieldsIn
    ) -> dict[str, Any]:
        """Set custom-field values, each checked against its field's type; all or nothing."""
        items = [
            FieldValue("id", e.id, e.value) if e.id is not None else FieldValue("name", e.name or "", e.value)
            for e in body.custom_fields
        ]
        return store.add_custom_fields(subcompany_id, provided_unique_id, items)

    @router.get(api_path("list_custom_fields"), name="list_custom_fields", response_model=CustomFieldPage)
    async def list_custom_fields(subcompany_id: SubcompanyId) -> dict[str, Any]:
        """Every custom field of the sub-company, in one page."""
        return {"custom_fields": store.list_fields(subcompany_id), "next": None}

    @router.post(
        api_path("create_custom_field"),
        name="create_custom_field",
        response_model=CustomFieldOut,
        responses={409: {"model": ErrorOut, "description": "Name taken"}},
    )
    async def create_custom_field(subcompany_id: SubcompanyId, body: CreateFieldIn) -> dict[str, Any]:
        """Define a custom field; select_options if and only if the type is select."""
        if body.type == "select" and not body.select_options:
            msg = "a select field needs select_options, at least one"
            raise Invalid(("body", "select_options"), msg, "missing", body.select_options)
        if body.type != "select" and body.select_options is not None:
            raise Invalid(
                ("body", "select_options"),
                "select_options is only allowed for a select field",
                "extra_forbidden",
                body.select_options,
            )
        return store.create_field(subcompany_id, body.name, body.type, body.select_options)

    @router.delete(
        api_path("delete_custom_field"),
        name="delete_custom_field",
        response_model=IdOut,
        responses=_NOT_FOUND,
    )
    async def delete_custom_field(subcompany_id: SubcompanyId, custom_field_id: CustomFieldId) -> dict[str, Any]:
        """Delete a custom field and every value of it."""
        return store.delete_field(subcompany_id, custom_field_id)

    @router.post(api_path("create_ticket"), name="create_ticket", response_model=IdOut)
    async def create_ticket(subcompany_id: SubcompanyId, body: TicketIn) -> dict[str, Any]:
        """Open a ticket for the one customer identified; no idempotency key."""
        given = body.model_dump(exclude_none=True)
        if sum(1 for k in TICKET_CUSTOMER_IDS if k in given) != 1:
            raise Invalid(("body",), f"give exactly one of {', '.join(TICKET_CUSTOMER_IDS)}", "value_error")
        return store.create_ticket(subcompany_id, given)

    return router


def _sandbox_router(state: SandboxState) -> APIRouter:
    """Inspection and control: no auth, never counted, rate limited or faulted."""
    router = APIRouter(prefix="/_sandbox", include_in_schema=False)
    store = state.store

    @router.get("/customers/{subcompany_id}")
    async def customers(subcompany_id: str) -> list[dict[str, Any]]:
        """Every stored customer, with tags and custom-field values by name."""
        return store.customers_view(subcompany_id)

    @router.get("/custom-fields/{subcompany_id}")
    async def custom_fields(subcompany_id: str) -> list[dict[str, Any]]:
        """Every custom-field definition."""
        return store.list_fields(subcompany_id)

    @router.get("/tickets/{subcompany_id}")
    async def tickets(subcompany_id: str) -> list[dict[str, Any]]:
        """Every ticket, with the body it was created with."""
        return store.tickets(subcompany_id)

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        """Counts of API requests by status and route."""
        return state.stats.snapshot()

    @router.get("/faults")
    async def get_faults() -> dict[str, Any]:
        """The rate limit and fault settings in force."""
        return _faults_view(state.config)

    @router.post("/faults")
    async def set_faults(body: FaultsIn) -> dict[str, Any]:
        """Change some rate-limit and fault settings; a new rate limit or burst refills the buckets."""
        changes = body.model_dump(exclude_unset=True)
        try:
            new = replace(state.config, **changes)
        except ConfigError as exc:
            raise Invalid(("body",), str(exc)) from None
        state.config = new
        if {"rate_limit", "burst"} & changes.keys():
            state.limiter.configure(new.rate_limit, new.effective_burst)
        return _faults_view(new)

    @router.post("/reset")
    async def reset() -> dict[str, Any]:
        """Forget customers, fields, tags, tickets and stats, and refill the rate-limit buckets."""
        store.reset()
        state.stats.reset()
        state.limiter.reset()
        return {"reset": True}

    return router


def _faults_view(config: SandboxConfig) -> dict[str, Any]:
    return {
        "fail_rate": config.fail_rate,
        "drop_rate": config.drop_rate,
        "throttle_rate": config.throttle_rate,
        "latency_ms": config.latency_ms,
        "jitter_ms": config.jitter_ms,
        "rate_limit": config.rate_limit,
        "burst": config.burst,
        "effective_burst": config.effective_burst,
        "outage": config.outage,
    }
