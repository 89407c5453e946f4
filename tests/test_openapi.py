"""One OpenAPI document, held to both sides: the sandbox answers as it says, the client sends what it says.

Schemathesis generates requests for every operation of the sandbox's /openapi.json and checks
the answers against it; then every request the client sends, for all eight endpoints, is
checked against the same document (route, path parameters, query, auth, JSON body), with the
sandbox's answer to it.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import SUBCOMPANY, TOKEN, Sandbox
from worker.proto import ProtoClient
from worker.sandbox import API_BASE_PATH, SandboxConfig
from worker.sandbox.app import create_app

APP = create_app(SandboxConfig({SUBCOMPANY: TOKEN}, rate_limit=0, seed=3))
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
# Requests of the sandbox's one tenant, or nearly every case would stop at 401/403.
SCHEMA.config.update(headers={"Authorization": f"Bearer {TOKEN}"}, parameters={"path.subcompany_id": SUBCOMPANY})
METHODS = {"get", "put", "post", "delete", "patch"}


@SCHEMA.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_sandbox_answers_every_operation_as_its_openapi_document_says(case: schemathesis.Case) -> None:
    # Not checked: that schema-valid data is accepted (a tag that does not exist yet, a value of
    # the wrong type for its field are refused by rules no schema states), nor that invalid data
    # is refused (like FastAPI, pydantic's lax mode takes 0 for false). Everything else is: no
    # 5xx, only documented statuses, and answers, headers and content types as documented.
    case.call_and_validate(
        excluded_checks=[schemathesis.checks.negative_data_rejection, schemathesis.checks.positive_data_acceptance]
    )


class Recording(httpx.BaseTransport):
    """A real HTTP transport that keeps every request it sends, and the answer."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.exchanges: list[tuple[httpx.Request, httpx.Response]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        response = self.inner.handle_request(request)
        response.read()
        self.exchanges.append((request, response))
        return response

    def close(self) -> None:
        self.inner.close()


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(METHOD, path template) -> operation, for the API routes of the document."""
    return {
        (method.upper(), path): op
        for path, ops in doc["paths"].items()
        if path.startswith(API_BASE_PATH + "/v1/")
        for method, op in ops.items()
        if method in METHODS
    }


def _match(template: str, raw_path: str) -> dict[str, str] | None:
    """The path parameters of `raw_path` (percent-decoded) if it fits `template`, else None."""
    pattern = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(template))
    found = re.fullmatch(pattern, raw_path)
    return {k: unquote(v) for k, v in found.groupdict().items()} if found else None


def _errors(schema: dict[str, Any], instance: Any, doc: dict[str, Any]) -> list[str]:
    validator = jsonschema_rs.validator_for({**schema, "components": doc["components"]})
    return [str(e) for e in validator.iter_errors(instance)]


def _check_request(request: httpx.Request, doc: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Check one request against the document; returns its (method, template) and operation."""
    raw_path = request.url.raw_path.decode().split("?", 1)[0]
    matches = [
        (key, op, params)
        for key, op in _operations(doc).items()
        if key[0] == request.method and (params := _match(key[1], raw_path)) is not None
    ]
    assert len(matches) == 1, f"{request.method} {raw_path} is not one operation of the document"
    (method, template), op, params = matches[0]
    declared = {p["name"]: p for p in op.get("parameters", [])}
    for name, value in params.items():
        assert declared[name]["in"] == "path"
        assert not _errors(declared[name]["schema"], value, doc), f"{template}: path parameter {name}={value!r}"
    for name in request.url.params:
        assert name in declared and declared[name]["in"] == "query", f"{template}: undeclared query {name}"
    assert {"HTTPBearer": []} in op["security"]
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    body_spec = op.get("requestBody")
    if body_spec is None:
        assert request.content == b"", f"{template} takes no body"
    else:
        assert request.headers["content-type"] == "application/json"
        body = json.loads(request.content)
        schema = body_spec["content"]["application/json"]["schema"]
        assert not _errors(schema, body, doc), f"{template}: {body} -> {_errors(schema, body, doc)}"
    return method, template, op


def test_every_request_the_client_sends_fits_the_sandboxs_openapi_document(sandbox: Sandbox) -> None:
    doc = sandbox.http.get("/openapi.json").json()
    recording = Recording()
    uid = "odd/id ü+1"  # a slash and non-ASCII: one percent-encoded path segment
    with ProtoClient(sandbox.base_url, SUBCOMPANY, TOKEN, transport=recording) as client:
        assert client.list_custom_fields() == []
        plan = client.create_custom_field("plan", "select", ["free", "pro"])
        ltv = client.create_custom_field("lifetime_value", "number")
        client.create_custom_field("signup", "date")
        client.upsert_customer(
            uid,
            {
                "name": "Ada Lovelace",
                "email": "ada@example.org",
                "phone_number": "+44 20 7946 0000",
                "location": "London",
                "avatar": "https://example.org/ada.png",
                "external_customer_id": "C-1",
            },
        )
        client.upsert_customer("cleared", {"name": "Grace", "email": None})  # null clears a field
        client.get_customer(uid)
        client.add_tags(uid, ["vip", "école"])
        client.add_custom_fields(uid, [(plan.id, "pro"), (ltv.id, 12.5)])
        client.create_ticket("Call back", provided_unique_id=uid)
        client.create_ticket("Invoice", external_customer_id="C-1")
        client.delete_custom_field(ltv.id)

    assert recording.exchanges
    covered = set()
    for request, response in recording.exchanges:
        method, template, op = _check_request(request, doc)
        covered.add((method, template))
        assert response.status_code == 200, response.text
        answer = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert not _errors(answer, response.json(), doc), f"{template}: answer {response.text}"
    assert covered == set(_operations(doc)), "every one of the eight endpoints was exercised"
    assert len(covered) == 8


@pytest.mark.parametrize(
    ("template", "raw_path", "expected"),
    [
        ("/a/{x}/b", "/a/1%2F2/b", {"x": "1/2"}),
        ("/a/{x}/b", "/a/1/2/b", None),
        ("/a/{x}", "/a/", None),
    ],
)
def test_path_templates_match_one_percent_encoded_segment_per_parameter(
    template: str, raw_path: str, expected: dict[str, str] | None
) -> None:
    assert _match(template, raw_path) == expected
