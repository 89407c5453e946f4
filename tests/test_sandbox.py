"""The sandbox behaves as the Proto API is documented (and assumed) to: real HTTP, real uvicorn."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from worker.errors import ConfigError
from worker.proto import _wire
from worker.sandbox import (
    API_BASE_PATH,
    DEFAULT_SUBCOMPANY_ID,
    DEFAULT_TOKEN,
    SandboxConfig,
    running_sandbox,
)

SUB = "01HSWE652DMW6REJ1FB1135PRZ"
TOKEN = "test-token"
OTHER_SUB = "01J0000000000000000000000Z"
OTHER_TOKEN = "other-token"


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """One sandbox for the module, unlimited by default; each test resets it."""
    config = SandboxConfig({SUB: TOKEN, OTHER_SUB: OTHER_TOKEN}, rate_limit=0, seed=1)
    with running_sandbox(config) as url:
        yield url


@pytest.fixture()
def control(base_url: str) -> Iterator[httpx.Client]:
    """A client for the /_sandbox routes; data, stats and faults are reset before each test."""
    with httpx.Client(base_url=base_url.removesuffix(API_BASE_PATH), trust_env=False, timeout=10) as c:
        c.post("/_sandbox/reset").raise_for_status()
        c.post("/_sandbox/faults", json=NO_FAULTS).raise_for_status()
        yield c


NO_FAULTS: dict[str, Any] = {
    "fail_rate": 0.0,
    "drop_rate": 0.0,
    "throttle_rate": 0.0,
    "latency_ms": 0.0,
    "jitter_ms": 0.0,
    "rate_limit": 0.0,
    "burst": None,
    "outage": False,
}


@pytest.fixture()
def api(base_url: str, control: httpx.Client) -> Iterator[httpx.Client]:
    """A client of the API with the sub-company's token."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base_url, headers=headers, trust_env=False, timeout=10) as c:
        yield c


def url(route: str, sub: str = SUB, **params: str) -> str:
    return _wire.path(route, sub, **params)


def upsert(api: httpx.Client, uid: str, **profile: Any) -> httpx.Response:
    return api.put(url("upsert_customer", provided_unique_id=uid), json=_wire.customer_body(profile))


def create_field(api: httpx.Client, name: str, type_: str, options: list[str] | None = None) -> str:
    r = api.post(url("create_custom_field"), json=_wire.create_field_body(name, type_, options))
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def set_values(api: httpx.Client, uid: str, *pairs: tuple[str, Any]) -> httpx.Response:
    return api.put(url("add_custom_fields", provided_unique_id=uid), json=_wire.custom_fields_body(pairs))


def locs(r: httpx.Response) -> list[list[Any]]:
    return [e["loc"] for e in r.json()["detail"]]


# -- customers -------------------------------------------------------------------------------


def test_upsert_creates_then_updates_null_clears_absent_keeps(api: httpx.Client) -> None:
    r = upsert(api, "c1", name="Ada", email="ada@example.org", location="Lyon")
    assert r.status_code == 200
    created = r.json()
    assert created["provided_unique_id"] == "c1" and created["name"] == "Ada"
    assert created["tags"] == [] and created["created_at"] and created["updated_at"]

    r = upsert(api, "c1", name="Ada L.", location=None)
    assert r.status_code == 200
    updated = r.json()
    assert updated["id"] == created["id"]
    assert updated["name"] == "Ada L."
    assert updated["location"] is None
    assert updated["email"] == "ada@example.org"

    got = api.get(url("get_customer", provided_unique_id="c1")).json()
    assert got == updated
    assert "custom_fields" not in got


def test_invalid_email_is_422_with_its_loc(api: httpx.Client) -> None:
    r = upsert(api, "c1", email="not-an-email")
    assert r.status_code == 422
    assert ["body", "email"] in locs(r)
    assert upsert(api, "c1", email="a@b.co").status_code == 200


def test_profile_rules_refuse_long_names_bad_phones_and_control_characters(api: httpx.Client) -> None:
    r = upsert(api, "c1", name="x" * 256, phone_number="call me", location="a\x07b")
    assert r.status_code == 422
    assert sorted(map(tuple, locs(r))) == [("body", "location"), ("body", "name"), ("body", "phone_number")]
    assert upsert(api, "c1", name="x" * 255, phone_number="+1 (555) 010-99.1").status_code == 200


def test_unknown_body_field_and_wrong_type_are_422(api: httpx.Client) -> None:
    r = api.put(url("upsert_customer", provided_unique_id="c1"), json={"name": 5, "nickname": "x"})
    assert r.status_code == 422
    assert sorted(map(tuple, locs(r))) == [("body", "name"), ("body", "nickname")]


def test_malformed_json_body_is_422_not_500(api: httpx.Client) -> None:
    headers = {"Content-Type": "application/json"}
    r = api.put(url("upsert_customer", provided_unique_id="c1"), content=b'{"name": ', headers=headers)
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "json_invalid"
    # NaN is accepted by Python's JSON parser: the sandbox must still answer a clean 422.
    fid = create_field(api, "ltv", "number")
    upsert(api, "c1")
    body = b'{"custom_fields": [{"id": "%s", "value": NaN}]}' % fid.encode()
    r = api.put(url("add_custom_fields", provided_unique_id="c1"), content=body, headers=headers)
    assert r.status_code == 422
    assert locs(r) == [["body", "custom_fields", 0, "value"]]


def test_unique_id_with_slashes_and_odd_characters_round_trips(api: httpx.Client, control: httpx.Client) -> None:
    for uid in ("a/b", "/lead/", "x%2Fy", "é 北京?#&", "a//b", "two\nlines"):
        assert upsert(api, uid, name=uid.replace("\n", " ")).status_code == 200, uid
        r = api.get(url("get_customer", provided_unique_id=uid))
        assert r.status_code == 200, uid
        assert r.json()["provided_unique_id"] == uid
        assert api.put(url("add_tags", provided_unique_id=uid), json=_wire.tags_body(["t"])).status_code == 200
    stored = {c["provided_unique_id"] for c in control.get(f"/_sandbox/customers/{SUB}").json()}
    assert stored == {"a/b", "/lead/", "x%2Fy", "é 北京?#&", "a//b", "two\nlines"}


def test_unique_id_longer_than_the_limit_is_422(api: httpx.Client) -> None:
    r = upsert(api, "k" * (_wire.MAX_UNIQUE_ID_LENGTH + 1), name="x")
    assert r.status_code == 422
    assert locs(r) == [["path", "provided_unique_id"]]
    assert upsert(api, "k" * _wire.MAX_UNIQUE_ID_LENGTH, name="x").status_code == 200


def test_unknown_customer_is_404_on_get_add_tags_and_add_custom_fields(api: httpx.Client) -> None:
    fid = create_field(api, "plan", "text")
    answers = [
        api.get(url("get_customer", provided_unique_id="ghost")),
        api.put(url("add_tags", provided_unique_id="ghost"), json=_wire.tags_body(["t"])),
        set_values(api, "ghost", (fid, "x")),
    ]
    for r in answers:
        assert r.status_code == 404
        assert r.json() == {"detail": "Customer not found"}


# -- auth --------------------------------------------------------------------------------------


def test_missing_or_malformed_token_is_401(base_url: str, control: httpx.Client) -> None:
    with httpx.Client(base_url=base_url, trust_env=False) as anon:
        for headers in (
            {},
            {"Authorization": TOKEN},
            {"Authorization": "Basic abc"},
            {"Authorization": "Bearer"},
        ):
            r = anon.get(url("list_custom_fields"), headers=headers)
            assert r.status_code == 401, headers
            assert r.json() == {"detail": "Not authenticated"}
        # Auth comes before body parsing: a malformed body without a token is still a 401.
        r = anon.put(url("upsert_customer", provided_unique_id="c1"), content=b"{")
        assert r.status_code == 401


def test_token_of_another_sub_company_is_403(api: httpx.Client) -> None:
    assert api.get(url("list_custom_fields", sub=OTHER_SUB)).status_code == 403
    r = api.get(url("list_custom_fields"), headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert r.status_code == 403
    assert isinstance(r.json()["detail"], str)
    assert api.get(url("list_custom_fields", sub="01HZZZZZZZZZZZZZZZZZZZZZZZ")).status_code == 403


def test_sub_company_id_that_is_not_a_ulid_is_422(api: httpx.Client) -> None:
    for sub in ("not-a-ulid", SUB.lower(), SUB[:-1] + "U", SUB + "0"):
        r = api.get(url("list_custom_fields", sub=sub))
        assert r.status_code == 422, sub
        assert locs(r) == [["path", "subcompany_id"]]


# -- tags ------------------------------------------------------------------------------------


def test_add_tags_is_a_set_union_in_order_of_first_addition(api: httpx.Client, control: httpx.Client) -> None:
    upsert(api, "c1")
    api.put(url("add_tags", provided_unique_id="c1"), json=_wire.tags_body(["vip", "école"]))
    r = api.put(url("add_tags", provided_unique_id="c1"), json=_wire.tags_body(["beta", "vip"]))
    assert r.status_code == 200
    assert r.json()["tags"] == ["vip", "école", "beta"]
    assert control.get(f"/_sandbox/customers/{SUB}").json()[0]["tags"] == ["vip", "école", "beta"]


def test_unknown_tag_without_create_if_not_exists_is_422(api: httpx.Client) -> None:
    upsert(api, "c1")
    upsert(api, "c2")
    r = api.put(url("add_tags", provided_unique_id="c1"), json={"tags": ["new"], "create_if_not_exists": False})
    assert r.status_code == 422
    assert locs(r) == [["body", "tags", 0]]
    api.put(url("add_tags", provided_unique_id="c2"), json=_wire.tags_body(["new"]))
    r = api.put(url("add_tags", provided_unique_id="c1"), json={"tags": ["new"], "create_if_not_exists": False})
    assert r.status_code == 200


def test_empty_or_long_tags_are_422(api: httpx.Client) -> None:
    upsert(api, "c1")
    r = api.put(url("add_tags", provided_unique_id="c1"), json=_wire.tags_body(["", "t" * 101, "ok"]))
    assert r.status_code == 422
    assert sorted(map(tuple, locs(r))) == [("body", "tags", 0), ("body", "tags", 1)]


# -- custom fields -----------------------------------------------------------------------------


def test_custom_field_values_are_checked_against_the_field_type(api: httpx.Client, control: httpx.Client) -> None:
    upsert(api, "c1")
    ltv = create_field(api, "ltv", "number")
    plan = create_field(api, "plan", "select", ["free", "pro"])
    vip = create_field(api, "vip", "toggle")
    since = create_field(api, "since", "date")
    note = create_field(api, "note", "text")
    bad = [
        (ltv, "12.5"),
        (ltv, True),
        (plan, "gold"),
        (vip, "yes"),
        (since, "2024-02-30"),
        (since, "20240101"),
        (note, 3),
    ]
    for pair in bad:
        r = set_values(api, "c1", pair)
        assert r.status_code == 422, pair
        assert locs(r) == [["body", "custom_fields", 0, "value"]]
    r = set_values(api, "c1", (ltv, 12.5), (plan, "pro"), (vip, False), (since, "2024-02-29"), (note, "hi"))
    assert r.status_code == 200
    assert "custom_fields" not in r.json()
    assert set_values(api, "c1", (ltv, 3)).status_code == 200
    assert set_values(api, "c1", (note, None)).status_code == 200
    stored = control.get(f"/_sandbox/customers/{SUB}").json()[0]["custom_fields"]
    assert stored == {"ltv": 3, "plan": "pro", "vip": False, "since": "2024-02-29", "note": None}


def test_one_bad_custom_field_value_changes_nothing(api: httpx.Client, control: httpx.Client) -> None:
    upsert(api, "c1")
    ltv = create_field(api, "ltv", "number")
    r = set_values(api, "c1", (ltv, 1), (ltv, "x"))
    assert r.status_code == 422
    assert locs(r) == [["body", "custom_fields", 1, "value"]]
    assert control.get(f"/_sandbox/customers/{SUB}").json()[0]["custom_fields"] == {}


def test_custom_field_by_name_and_unknown_field(api: httpx.Client, control: httpx.Client) -> None:
    upsert(api, "c1")
    create_field(api, "plan", "text")
    body = {"custom_fields": [{"name": "plan", "value": "pro"}]}
    assert api.put(url("add_custom_fields", provided_unique_id="c1"), json=body).status_code == 200
    r = set_values(api, "c1", ("no-such-id", "x"))
    assert r.status_code == 422
    assert locs(r) == [["body", "custom_fields", 0, "id"]]
    both = {"custom_fields": [{"id": "x", "name": "plan", "value": "pro"}]}
    assert api.put(url("add_custom_fields", provided_unique_id="c1"), json=both).status_code == 422
    neither = {"custom_fields": [{"value": "pro"}]}
    assert api.put(url("add_custom_fields", provided_unique_id="c1"), json=neither).status_code == 422


def test_select_options_are_required_if_and_only_if_the_type_is_select(api: httpx.Client) -> None:
    post = api.post
    r = post(url("create_custom_field"), json={"name": "plan", "type": "select"})
    assert r.status_code == 422
    assert locs(r) == [["body", "select_options"]]
    r = post(url("create_custom_field"), json={"name": "n", "type": "number", "select_options": ["a"]})
    assert r.status_code == 422
    assert locs(r) == [["body", "select_options"]]
    assert post(url("create_custom_field"), json={"name": "n", "type": "colour"}).status_code == 422
    r = post(url("create_custom_field"), json={"name": "plan", "type": "select", "select_options": ["a", "b"]})
    assert r.status_code == 200
    field = _wire.parse_custom_field(r.json())
    assert field.type == "select" and field.select_options == ("a", "b")
    fields, nxt = _wire.parse_custom_field_page(api.get(url("list_custom_fields")).json())
    assert fields == [field] and nxt is None


def test_duplicate_custom_field_name_is_409(api: httpx.Client) -> None:
    create_field(api, "ltv", "number")
    r = api.post(url("create_custom_field"), json=_wire.create_field_body("ltv", "text", None))
    assert r.status_code == 409
    assert isinstance(r.json()["detail"], str)


def test_delete_custom_field_removes_it_and_its_values(api: httpx.Client, control: httpx.Client) -> None:
    upsert(api, "c1")
    ltv = create_field(api, "ltv", "number")
    set_values(api, "c1", (ltv, 5))
    r = api.delete(url("delete_custom_field", custom_field_id=ltv))
    assert r.status_code == 200
    assert r.json() == {"id": ltv}
    assert api.get(url("list_custom_fields")).json() == {"custom_fields": [], "next": None}
    assert control.get(f"/_sandbox/customers/{SUB}").json()[0]["custom_fields"] == {}
    assert api.delete(url("delete_custom_field", custom_field_id=ltv)).status_code == 404


def test_custom_fields_are_scoped_to_their_sub_company(base_url: str, api: httpx.Client) -> None:
    create_field(api, "ltv", "number")
    headers = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    with httpx.Client(base_url=base_url, headers=headers, trust_env=False) as other:
        assert other.get(url("list_custom_fields", sub=OTHER_SUB)).json()["custom_fields"] == []


# -- tickets ---------------------------------------------------------------------------------


def test_ticket_needs_a_subject_and_exactly_one_customer_identifier(api: httpx.Client, control: httpx.Client) -> None:
    post = api.post
    assert post(url("create_ticket"), json={"subject": "Help"}).status_code == 422
    two = {"subject": "Help", "customer_id": "a", "provided_unique_id": "b"}
    assert post(url("create_ticket"), json=two).status_code == 422
    assert post(url("create_ticket"), json={"subject": "", "provided_unique_id": "b"}).status_code == 422
    r = post(url("create_ticket"), json=_wire.ticket_body("Help", provided_unique_id="c1"))
    assert r.status_code == 200
    tickets = control.get(f"/_sandbox/tickets/{SUB}").json()
    assert [(t["id"], t["subject"], t["provided_unique_id"]) for t in tickets] == [(r.json()["id"], "Help", "c1")]


# -- rate limit and faults -------------------------------------------------------------------


def test_rate_limit_answers_429_with_integer_retry_after_and_counts_it(
    api: httpx.Client, control: httpx.Client
) -> None:
    control.post("/_sandbox/faults", json={"rate_limit": 0.4, "burst": 1}).raise_for_status()
    assert api.get(url("list_custom_fields")).status_code == 200
    r = api.get(url("list_custom_fields"))
    assert r.status_code == 429
    assert r.json() == {"detail": "Rate limit exceeded"}
    assert r.headers["Retry-After"] == "3"  # 2.5 s until the next token, rounded up
    # Another sub-company has its own bucket.
    other = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    assert api.get(url("list_custom_fields", sub=OTHER_SUB), headers=other).status_code == 200
    stats = control.get("/_sandbox/stats").json()
    assert stats["rate_limited"] == 1
    assert stats["by_status"] == {"200": 2, "429": 1}


def test_burst_lets_that_many_requests_through_back_to_back(api: httpx.Client, control: httpx.Client) -> None:
    control.post("/_sandbox/faults", json={"rate_limit": 1, "burst": 3}).raise_for_status()
    codes = [api.get(url("list_custom_fields")).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    assert control.get("/_sandbox/faults").json()["burst"] == 3


def test_default_burst_is_100_ms_of_requests() -> None:
    assert SandboxConfig({SUB: TOKEN}, rate_limit=50).effective_burst == 5
    assert SandboxConfig({SUB: TOKEN}, rate_limit=0.5).effective_burst == 1
    assert SandboxConfig({SUB: TOKEN}, rate_limit=50, burst=2).effective_burst == 2


def test_outage_turns_on_and_off_while_running(api: httpx.Client, control: httpx.Client) -> None:
    control.post("/_sandbox/faults", json={"outage": True}).raise_for_status()
    r = api.get(url("list_custom_fields"))
    assert r.status_code == 503
    assert isinstance(r.json()["detail"], str)
    assert control.get(f"/_sandbox/customers/{SUB}").status_code == 200  # inspection is never faulted
    control.post("/_sandbox/faults", json={"outage": False}).raise_for_status()
    assert api.get(url("list_custom_fields")).status_code == 200


def test_fail_rate_one_answers_5xx_and_changes_nothing(api: httpx.Client, control: httpx.Client) -> None:
    control.post("/_sandbox/faults", json={"fail_rate": 1.0}).raise_for_status()
    codes = {upsert(api, f"c{i}", name="x").status_code for i in range(10)}
    assert codes <= {500, 502, 503}
    assert control.get(f"/_sandbox/customers/{SUB}").json() == []


def test_drop_rate_one_gives_a_transport_error_not_a_status(api: httpx.Client, control: httpx.Client) -> None:
    control.post("/_sandbox/faults", json={"drop_rate": 1.0}).raise_for_status()
    with pytest.raises(httpx.TransportError):
        upsert(api, "c1", name="x")
    assert control.get(f"/_sandbox/customers/{SUB}").json() == []
    stats = control.get("/_sandbox/stats").json()
    assert stats["total"] == 1 and stats["dropped"] == 1
    control.post("/_sandbox/faults", json={"drop_rate": 0.0}).raise_for_status()
    assert upsert(api, "c1", name="x").status_code == 200


def test_throttle_rate_one_answers_429_with_retry_after_and_changes_nothing(
    api: httpx.Client, control: httpx.Client
) -> None:
    control.post("/_sandbox/faults", json={"throttle_rate": 1.0}).raise_for_status()
    answer = upsert(api, "c1", name="x")
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "1"
    assert control.get(f"/_sandbox/customers/{SUB}").json() == []
    assert control.get("/_sandbox/stats").json()["rate_limited"] == 1
    control.post("/_sandbox/faults", json={"throttle_rate": 0.0}).raise_for_status()
    assert upsert(api, "c1", name="x").status_code == 200


def test_latency_delays_answers(api: httpx.Client, control: httpx.Client) -> None:
    control.post("/_sandbox/faults", json={"latency_ms": 150, "jitter_ms": 20}).raise_for_status()
    start = time.monotonic()
    assert api.get(url("list_custom_fields")).status_code == 200
    assert time.monotonic() - start >= 0.125


def test_bad_fault_settings_are_422(control: httpx.Client) -> None:
    assert control.post("/_sandbox/faults", json={"fail_rate": 1.5}).status_code == 422
    assert control.post("/_sandbox/faults", json={"volume": 11}).status_code == 422
    assert control.get("/_sandbox/faults").json()["fail_rate"] == 0.0


# -- stats and schema ------------------------------------------------------------------------


def test_stats_count_every_api_request_by_status_and_route(
    base_url: str, api: httpx.Client, control: httpx.Client
) -> None:
    upsert(api, "c1", name="x")
    upsert(api, "c1", email="bad")
    api.get(url("get_customer", provided_unique_id="ghost"))
    httpx.get(base_url + url("list_custom_fields"), trust_env=False)  # no token
    control.get(f"/_sandbox/customers/{SUB}")  # inspection: not counted
    stats = control.get("/_sandbox/stats").json()
    method, template = _wire.ROUTES["upsert_customer"]
    get_method, get_template = _wire.ROUTES["get_customer"]
    list_method, list_template = _wire.ROUTES["list_custom_fields"]
    assert stats["total"] == 4
    assert stats["by_status"] == {"200": 1, "422": 1, "404": 1, "401": 1}
    assert stats["by_route"] == {
        f"{method} {template}": {"200": 1, "422": 1},
        f"{get_method} {get_template}": {"404": 1},
        f"{list_method} {list_template}": {"401": 1},
    }
    assert stats["rate_limited"] == 0
    assert stats["requests_per_second"] > 0
    control.post("/_sandbox/reset")
    assert control.get("/_sandbox/stats").json()["total"] == 0


def test_openapi_lists_the_eight_routes_with_body_models(control: httpx.Client) -> None:
    schema = control.get("/openapi.json").json()
    paths = schema["paths"]
    for method, template in _wire.ROUTES.values():
        assert method.lower() in paths[API_BASE_PATH + template], template
    assert len(paths) == len({t for _, t in _wire.ROUTES.values()})
    upsert_op = paths[API_BASE_PATH + _wire.ROUTES["upsert_customer"][1]]["put"]
    body_ref = upsert_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body_schema = schema["components"]["schemas"][body_ref.rsplit("/", 1)[1]]
    assert set(body_schema["properties"]) == set(_wire.PROFILE_FIELDS)
    for name in ("add_tags", "add_custom_fields", "create_custom_field", "create_ticket"):
        method, template = _wire.ROUTES[name]
        assert "requestBody" in paths[API_BASE_PATH + template][method.lower()], name


# -- configuration and serving ---------------------------------------------------------------


def test_from_env_prefers_arguments_then_environment_then_demo_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("CRMSYNC_PROTO_SUBCOMPANY_ID", "CRMSYNC_PROTO_TOKEN", "CRMSYNC_PROTO_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert SandboxConfig.from_env(None, None).tenants == {DEFAULT_SUBCOMPANY_ID: DEFAULT_TOKEN}
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("CRMSYNC_PROTO_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("CRMSYNC_PROTO_SUBCOMPANY_ID", OTHER_SUB)
    assert SandboxConfig.from_env(None, None).tenants == {OTHER_SUB: "from-file"}
    monkeypatch.setenv("CRMSYNC_PROTO_TOKEN", "from-env")
    config = SandboxConfig.from_env(None, None, rate_limit=7, fail_rate=0.1)
    assert config.tenants == {OTHER_SUB: "from-env"}
    assert (config.rate_limit, config.fail_rate) == (7, 0.1)
    assert SandboxConfig.from_env(SUB, "arg").tenants == {SUB: "arg"}
    with pytest.raises(ConfigError):
        SandboxConfig.from_env("not-a-ulid", "t")
    with pytest.raises(ConfigError):
        SandboxConfig.from_env(None, None, volume=11)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_a_signal(sig: signal.Signals) -> None:
    port = _free_port()
    code = (
        "from worker.sandbox import SandboxConfig, serve; "
        f"serve(SandboxConfig.from_env('{SUB}', '{TOKEN}'), port={port})"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/_sandbox/stats", trust_env=False).raise_for_status()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the sandbox did not start"
                time.sleep(0.05)
        proc.send_signal(sig)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
