"""ProtoClient against the sandbox over real HTTP, plus narrow respx tests of its edges.

The sandbox tests check what the API ends up storing and how many requests reached it;
the respx tests pin what the sandbox cannot produce on demand (timeouts, odd headers, bodies).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx

from tests.conftest import SUBCOMPANY, TOKEN, Sandbox
from worker.errors import AuthError, PermanentError, ProtoError, RateLimited, RetryableError
from worker.proto import Breaker, CustomField, LocalLimiter, ProtoClient, RetryPolicy
from worker.proto._client import MAX_BODY_CHARS

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)
WRONG_TOKEN = "wrong-secret-0f9e8d7c6b"

UPSERT = "PUT /v1/customers/{subcompany_id}/create-customer/{provided_unique_id}"
TICKET = "POST /v1/conversations/{subcompany_id}/create-ticket"
CREATE_FIELD = "POST /v1/custom-fields/{subcompany_id}/create-custom-field"


def make_client(sandbox: Sandbox, *, token: str = TOKEN, retry: RetryPolicy = FAST) -> ProtoClient:
    return ProtoClient(sandbox.base_url, SUBCOMPANY, token, retry=retry, limiter=LocalLimiter(1000))


@pytest.fixture
def client(sandbox: Sandbox) -> Iterator[ProtoClient]:
    with make_client(sandbox) as c:
        yield c


def tickets(sandbox: Sandbox) -> list[dict[str, Any]]:
    response = sandbox.http.get(f"/_sandbox/tickets/{SUBCOMPANY}")
    response.raise_for_status()
    return list(response.json())


def assert_no_secret(exc: ProtoError, *secrets: str) -> None:
    """Neither the real token nor any token the client sent shows in the error."""
    for secret in (TOKEN, WRONG_TOKEN, *secrets):
        assert secret not in str(exc)
        assert secret not in repr(exc)
        assert secret not in str(exc.body or "")


# -- the eight endpoints -------------------------------------------------------------------------


def test_upsert_customer_creates_then_updates_the_same_customer(client: ProtoClient, sandbox: Sandbox) -> None:
    created = client.upsert_customer("crm-1", {"name": "Ada", "email": "ada@example.com"})
    assert created["provided_unique_id"] == "crm-1"
    assert created["name"] == "Ada"

    updated = client.upsert_customer("crm-1", {"name": "Ada L.", "location": "London"})
    assert updated["id"] == created["id"]

    stored = sandbox.customers()
    assert list(stored) == ["crm-1"]
    assert stored["crm-1"]["name"] == "Ada L."
    assert stored["crm-1"]["location"] == "London"
    assert stored["crm-1"]["email"] == "ada@example.com"  # not given the second time: kept


def test_get_customer_returns_what_was_stored(client: ProtoClient) -> None:
    client.upsert_customer("crm-2", {"name": "Grace", "phone_number": "+1 555 0100"})
    got = client.get_customer("crm-2")
    assert got["provided_unique_id"] == "crm-2"
    assert got["name"] == "Grace"
    assert got["phone_number"] == "+1 555 0100"
    assert got["tags"] == []


def test_add_tags_creates_missing_tags_and_adds_them_once(client: ProtoClient, sandbox: Sandbox) -> None:
    client.upsert_customer("crm-3", {"name": "Linus"})
    client.add_tags("crm-3", ["vip", "newsletter"])
    answer = client.add_tags("crm-3", ["vip", "churn-risk"])
    assert answer["tags"] == ["vip", "newsletter", "churn-risk"]
    assert sandbox.customers()["crm-3"]["tags"] == ["vip", "newsletter", "churn-risk"]


def test_add_custom_fields_by_id_stores_the_values(client: ProtoClient, sandbox: Sandbox) -> None:
    plan = client.create_custom_field("plan", "select", ["free", "pro"])
    seats = client.create_custom_field("seats", "number")
    client.upsert_customer("crm-4", {"name": "Barbara"})

    client.add_custom_fields("crm-4", [(plan.id, "pro"), (seats.id, 12)])

    assert sandbox.customers()["crm-4"]["custom_fields"] == {"plan": "pro", "seats": 12}
    # get-customer returns everything but custom-field values
    assert "custom_fields" not in client.get_customer("crm-4")


def test_custom_field_definitions_are_listed_created_and_deleted(client: ProtoClient, sandbox: Sandbox) -> None:
    assert client.list_custom_fields() == []

    note = client.create_custom_field("note", "text")
    tier = client.create_custom_field("tier", "select", ["gold", "silver"])
    assert note == CustomField(id=note.id, name="note", type="text", select_options=())
    assert tier.select_options == ("gold", "silver")
    assert client.list_custom_fields() == [note, tier]

    client.delete_custom_field(note.id)

    assert client.list_custom_fields() == [tier]
    stored = sandbox.http.get(f"/_sandbox/custom-fields/{SUBCOMPANY}").json()
    assert [f["name"] for f in stored] == ["tier"]


def test_create_ticket_returns_the_id_of_exactly_one_stored_ticket(client: ProtoClient, sandbox: Sandbox) -> None:
    client.upsert_customer("crm-5", {"name": "Ken"})

    ticket_id = client.create_ticket("Renewal question", provided_unique_id="crm-5")

    assert isinstance(ticket_id, str) and ticket_id
    stored = tickets(sandbox)
    assert len(stored) == 1
    assert stored[0]["id"] == ticket_id
    assert stored[0]["subject"] == "Renewal question"
    assert stored[0]["provided_unique_id"] == "crm-5"


@pytest.mark.parametrize(
    "uid",
    [
        "a/b/c",
        "with space",
        "100%",
        "50%2Fencoded",
        "ünïcødé-客户",
        ".",
        "..",
        "a/../b",
        "./x",
        "?query#frag",
    ],
)
def test_unusual_unique_ids_round_trip_exactly(client: ProtoClient, sandbox: Sandbox, uid: str) -> None:
    assert client.upsert_customer(uid, {"name": "Odd"})["provided_unique_id"] == uid
    assert client.get_customer(uid)["provided_unique_id"] == uid
    client.add_tags(uid, ["odd"])

    stored = sandbox.customers()
    assert list(stored) == [uid]
    assert stored[uid]["tags"] == ["odd"]


# -- errors that the same request would meet again -----------------------------------------------


def test_wrong_token_is_an_auth_error_sent_once(sandbox: Sandbox) -> None:
    with make_client(sandbox, token=WRONG_TOKEN) as bad, pytest.raises(AuthError) as caught:
        bad.upsert_customer("crm-1", {"name": "Eve"})
    assert caught.value.status == 403
    assert sandbox.calls() == 1
    assert sandbox.customers() == {}
    assert_no_secret(caught.value)


def test_missing_customer_is_a_permanent_404_sent_once(client: ProtoClient, sandbox: Sandbox) -> None:
    with pytest.raises(PermanentError) as caught:
        client.get_customer("nobody")
    assert not isinstance(caught.value, AuthError)
    assert caught.value.status == 404
    assert caught.value.route == "get_customer"
    assert sandbox.calls() == 1
    assert_no_secret(caught.value)


def test_invalid_email_is_a_permanent_422_naming_the_field(client: ProtoClient, sandbox: Sandbox) -> None:
    with pytest.raises(PermanentError) as caught:
        client.upsert_customer("crm-1", {"name": "Bob", "email": "not-an-email"})
    assert caught.value.status == 422
    assert "email" in str(caught.value)
    assert sandbox.calls() == 1
    assert sandbox.customers() == {}
    assert_no_secret(caught.value)


def test_duplicate_custom_field_is_a_permanent_409_sent_once(client: ProtoClient, sandbox: Sandbox) -> None:
    client.create_custom_field("plan", "text")
    with pytest.raises(PermanentError) as caught:
        client.create_custom_field("plan", "text")
    assert caught.value.status == 409
    assert sandbox.stats()["by_route"][CREATE_FIELD] == {"200": 1, "409": 1}
    assert sandbox.calls() == 2
    assert_no_secret(caught.value)


# -- errors worth another try --------------------------------------------------------------------


def test_5xx_is_tried_max_attempts_times_then_raised(sandbox: Sandbox) -> None:
    sandbox.faults(fail_rate=1.0)
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)
    with make_client(sandbox, retry=policy) as c, pytest.raises(RetryableError) as caught:
        c.upsert_customer("crm-1", {"name": "Flaky"})
    assert not isinstance(caught.value, RateLimited)
    assert caught.value.status in (500, 502, 503)
    assert sandbox.calls() == 4
    assert sandbox.customers() == {}
    assert_no_secret(caught.value)


def test_intermittent_5xx_is_retried_until_the_call_succeeds(sandbox: Sandbox) -> None:
    sandbox.faults(fail_rate=0.5)
    policy = RetryPolicy(max_attempts=30, initial_backoff=0.01, max_backoff=0.05)
    with make_client(sandbox, retry=policy) as c:
        for i in range(8):
            c.upsert_customer(f"crm-{i}", {"name": f"N{i}"})
    assert sorted(sandbox.customers()) == [f"crm-{i}" for i in range(8)]
    stats = sandbox.stats()
    assert stats["by_status"]["200"] == 8
    assert stats["total"] == sum(stats["by_status"].values()) >= 8


def test_dropped_connections_are_tried_max_attempts_times_then_raised(sandbox: Sandbox) -> None:
    sandbox.faults(drop_rate=1.0)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    with make_client(sandbox, retry=policy) as c, pytest.raises(RetryableError) as caught:
        c.get_customer("crm-1")
    assert caught.value.status is None
    assert caught.value.not_sent is False
    assert sandbox.calls() == 3
    assert sandbox.stats()["dropped"] == 3
    assert_no_secret(caught.value)


def test_429s_are_waited_out_per_retry_after_without_spending_the_error_budget(sandbox: Sandbox) -> None:
    sandbox.faults(rate_limit=2, burst=1)
    one_try = RetryPolicy(max_attempts=1, initial_backoff=0.01, max_backoff=0.05)
    started = time.monotonic()
    with make_client(sandbox, retry=one_try) as c:
        for i in range(3):
            c.upsert_customer(f"crm-{i}", {"name": f"N{i}"})
    elapsed = time.monotonic() - started

    assert sorted(sandbox.customers()) == ["crm-0", "crm-1", "crm-2"]
    stats = sandbox.stats()
    assert stats["rate_limited"] >= 2  # calls 2 and 3 each met the limit at least once
    assert stats["by_route"][UPSERT]["200"] == 3
    # The sandbox answers Retry-After: 1 (whole seconds), and the client honours it.
    assert elapsed >= 1.9


def test_create_ticket_is_never_resent_after_a_5xx(sandbox: Sandbox) -> None:
    sandbox.faults(fail_rate=1.0)
    with make_client(sandbox) as c, pytest.raises(RetryableError) as caught:
        c.create_ticket("Help", provided_unique_id="crm-1")
    assert caught.value.status in (500, 502, 503)
    assert sandbox.calls() == 1
    assert_no_secret(caught.value)


def test_create_ticket_is_never_resent_after_a_dropped_connection(sandbox: Sandbox) -> None:
    sandbox.faults(drop_rate=1.0)
    with make_client(sandbox) as c, pytest.raises(RetryableError) as caught:
        c.create_ticket("Help", provided_unique_id="crm-1")
    assert caught.value.not_sent is False
    assert sandbox.calls() == 1


def test_create_ticket_is_resent_after_a_429(sandbox: Sandbox) -> None:
    sandbox.faults(rate_limit=2, burst=1)
    one_try = RetryPolicy(max_attempts=1, initial_backoff=0.01, max_backoff=0.05)
    with make_client(sandbox, retry=one_try) as c:
        first = c.create_ticket("First", provided_unique_id="crm-1")
        second = c.create_ticket("Second", provided_unique_id="crm-1")

    assert [t["id"] for t in tickets(sandbox)] == [first, second]
    by_ticket = sandbox.stats()["by_route"][TICKET]
    assert by_ticket["200"] == 2
    assert by_ticket["429"] >= 1


# -- respx: the edges the sandbox cannot produce on demand ---------------------------------------

BASE = "https://proto.test/api/platform"


class RecordingLimiter:
    """A limiter that never waits, and remembers every pause asked of it."""

    def __init__(self) -> None:
        self.acquired = 0
        self.pauses: list[float] = []

    def acquire(self, breaker: Breaker | None = None) -> None:
        if breaker is not None:
            breaker.before_call()
        self.acquired += 1

    def pause(self, seconds: float) -> None:
        self.pauses.append(seconds)


def unit_client(sleeps: list[float], limiter: RecordingLimiter | None = None, retry: RetryPolicy = FAST) -> ProtoClient:
    return ProtoClient(BASE, SUBCOMPANY, TOKEN, retry=retry, limiter=limiter or RecordingLimiter(), sleep=sleeps.append)


CUSTOMER = {"id": "C1", "provided_unique_id": "crm-1", "name": "Ada", "tags": []}


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", 3.0),
        ("0.25", 0.25),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0),  # an HTTP date: the default wait
        (None, 1.0),  # no header: the default wait
        ("inf", 1.0),  # not a finite number: the default, never an endless pause
        ("nan", 1.0),
    ],
)
def test_retry_after_sets_both_the_wait_and_the_limiter_pause(header: str | None, expected: float) -> None:
    sleeps: list[float] = []
    limiter = RecordingLimiter()
    headers = {"Retry-After": header} if header is not None else {}
    with respx.mock(assert_all_called=True) as mock:
        route = mock.get(url__startswith=BASE).mock(
            side_effect=[
                httpx.Response(429, headers=headers, json={"detail": "Rate limit exceeded"}),
                httpx.Response(200, json=CUSTOMER),
            ]
        )
        with unit_client(sleeps, limiter) as c:
            assert c.get_customer("crm-1") == CUSTOMER
    assert route.call_count == 2
    assert sleeps == [expected]
    assert limiter.pauses == [expected]


def test_read_timeout_on_create_ticket_is_not_retried() -> None:
    sleeps: list[float] = []
    with respx.mock() as mock:
        route = mock.post(url__startswith=BASE).mock(side_effect=httpx.ReadTimeout("read timed out"))
        with unit_client(sleeps) as c, pytest.raises(RetryableError) as caught:
            c.create_ticket("Help", provided_unique_id="crm-1")
    assert route.call_count == 1
    assert caught.value.not_sent is False
    assert sleeps == []


def test_read_timeout_on_upsert_customer_is_retried() -> None:
    sleeps: list[float] = []
    with respx.mock() as mock:
        route = mock.put(url__startswith=BASE).mock(
            side_effect=[httpx.ReadTimeout("read timed out"), httpx.Response(200, json=CUSTOMER)]
        )
        with unit_client(sleeps) as c:
            assert c.upsert_customer("crm-1", {"name": "Ada"}) == CUSTOMER
    assert route.call_count == 2
    assert len(sleeps) == 1


def test_connect_error_on_create_ticket_is_retried_as_never_sent() -> None:
    sleeps: list[float] = []
    with respx.mock() as mock:
        route = mock.post(url__startswith=BASE).mock(
            side_effect=[httpx.ConnectError("connection refused"), httpx.Response(200, json={"id": "T1"})]
        )
        with unit_client(sleeps) as c:
            assert c.create_ticket("Help", provided_unique_id="crm-1") == "T1"
    assert route.call_count == 2


@pytest.mark.parametrize(
    "content", [b"<html>Bad gateway, but 200</html>", b"\x80\x81\xfe not utf-8"], ids=["html", "binary"]
)
def test_a_200_that_is_not_json_is_retryable(content: bytes) -> None:
    sleeps: list[float] = []
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    with respx.mock() as mock:
        route = mock.get(url__startswith=BASE).mock(return_value=httpx.Response(200, content=content))
        with unit_client(sleeps, retry=policy) as c, pytest.raises(RetryableError) as caught:
            c.get_customer("crm-1")
    assert caught.value.status == 200
    assert route.call_count == 3


def test_a_200_that_is_not_json_on_create_ticket_is_not_resent() -> None:
    sleeps: list[float] = []
    with respx.mock() as mock:
        route = mock.post(url__startswith=BASE).mock(return_value=httpx.Response(200, text="<html>"))
        with unit_client(sleeps) as c, pytest.raises(RetryableError):
            c.create_ticket("Help", provided_unique_id="crm-1")
    assert route.call_count == 1


def test_a_token_echoed_by_the_server_is_redacted() -> None:
    echo = {"detail": f"bad request; you sent Authorization: Bearer {TOKEN}"}
    with respx.mock() as mock:
        mock.get(url__startswith=BASE).mock(return_value=httpx.Response(400, json=echo))
        with unit_client([]) as c, pytest.raises(PermanentError) as caught:
            c.get_customer("crm-1")
    assert "[REDACTED]" in str(caught.value)
    assert "[REDACTED]" in caught.value.body
    assert_no_secret(caught.value)


def test_a_token_cut_by_the_body_limit_is_still_redacted() -> None:
    # The token straddles the point where the stored body is cut: no part of it may remain.
    text = "x" * (MAX_BODY_CHARS - len(TOKEN) + 3) + TOKEN + " and more"
    with respx.mock() as mock:
        mock.get(url__startswith=BASE).mock(return_value=httpx.Response(502, text=text))
        with unit_client([], retry=RetryPolicy(max_attempts=1)) as c, pytest.raises(RetryableError) as caught:
            c.get_customer("crm-1")
    assert len(caught.value.body) <= MAX_BODY_CHARS
    assert TOKEN[: len(TOKEN) - 3] not in caught.value.body
    assert TOKEN[: len(TOKEN) - 3] not in str(caught.value)
