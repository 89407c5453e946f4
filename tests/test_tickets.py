"""Tickets exactly once: claimed before the call, never resent blindly after an unknown outcome."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from tests.conftest import SUBCOMPANY, TOKEN, Sandbox
from tests.crm import MAPPING, TICKETS_MAPPING, make_crm, write_mapping
from tests.test_sync_flow import Harness
from worker.jobs import reconcile
from worker.runtime import Runtime
from worker.settings import Settings
from worker.state.db import migrate
from worker.tickets import resend_ready_tickets, send_ticket


class TicketHarness(Harness):
    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt)
        self.ticket_keys: list[str] = []
        self.planner.enqueue_tickets = self.ticket_keys.extend


def harness(sandbox: Sandbox, tmp_path: Path, cases: list[tuple[str, str, str]]) -> TicketHarness:
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = make_crm(crm, 4)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE cases (case_id TEXT PRIMARY KEY, title TEXT, contact_id TEXT)"))
        for case in cases:
            conn.execute(sa.text("INSERT INTO cases VALUES (:k, :t, :c)"), dict(zip("ktc", case, strict=True)))
    state = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(state)
    settings = Settings(
        source_url=crm,
        state_url=state,
        mapping=write_mapping(tmp_path, MAPPING + TICKETS_MAPPING),
        proto_base_url=sandbox.base_url,
        proto_subcompany_id=SUBCOMPANY,
        proto_token=TOKEN,
        rate_limit=1000,
        max_attempts=3,
    )
    return TicketHarness(Runtime(settings))


def tickets_in_proto(sandbox: Sandbox) -> list[dict[str, Any]]:
    return list(httpx.get(f"{sandbox.root}/_sandbox/tickets/{SUBCOMPANY}").json())


def test_cases_become_tickets_once_their_customer_exists(sandbox: Sandbox, tmp_path: Path) -> None:
    h = harness(sandbox, tmp_path, [("K1", "Refund please", "C00001"), ("K2", "Broken", "C00002")])
    result = h.sync()
    assert result["counts"]["tickets_new"] == 2
    got = tickets_in_proto(sandbox)
    assert sorted((t["subject"], t["provided_unique_id"]) for t in got) == [
        ("Broken", "C00002"),
        ("Refund please", "C00001"),
    ]
    assert {t["status"] for t in h.rt.store.tickets()} == {"created"}
    h.sync()
    h.sync("incremental")
    for key in ("K1", "K2"):
        assert send_ticket(h.rt, key) == "skipped"
    assert len(tickets_in_proto(sandbox)) == 2


def test_a_ticket_whose_outcome_is_unknown_is_never_resent_by_crmsync(sandbox: Sandbox, tmp_path: Path) -> None:
    h = harness(sandbox, tmp_path, [])
    h.sync()
    with h.crm_engine.begin() as conn:  # a new case for a customer Proto already has
        conn.execute(sa.text("INSERT INTO cases VALUES ('K9', 'Lost?', 'C00003')"))
    h.plan()
    assert h.ticket_keys == ["K9"]
    sandbox.faults(drop_rate=1.0)  # the request leaves, no answer comes back
    assert send_ticket(h.rt, "K9") == "unknown"
    sandbox.faults(drop_rate=0.0)
    assert sandbox.calls() - sandbox.stats()["by_status"].get("200", 0) == 1  # tried once, not retried
    h.ticket_keys.clear()
    h.sync()
    assert send_ticket(h.rt, "K9") == "skipped"
    assert h.ticket_keys == [] and tickets_in_proto(sandbox) == []
    # An operator looked in Proto, found nothing, and asks for it again.
    assert h.rt.store.set_ticket_status(["K9"], "pending", ["unknown"]) == 1
    assert send_ticket(h.rt, "K9") == "created"
    assert len(tickets_in_proto(sandbox)) == 1


def test_a_ticket_refused_by_the_api_is_failed_not_retried(sandbox: Sandbox, tmp_path: Path) -> None:
    h = harness(sandbox, tmp_path, [("K5", "", "C00001")])  # an empty subject: 422
    h.sync()
    ticket = h.rt.store.tickets()[0]
    assert ticket["status"] == "failed" and "422" in ticket["error"]
    assert TOKEN not in ticket["error"]


def test_a_send_cut_by_a_dead_worker_is_left_unknown(sandbox: Sandbox, tmp_path: Path) -> None:
    h = harness(sandbox, tmp_path, [("K7", "Help", "C00002")])
    h.plan()
    h.rt.store.add_tickets([("K8", "Mid-call", "C00002")])
    assert h.rt.store.claim_ticket("K8") is not None  # a worker claimed it, then was killed
    with h.rt.store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tickets SET updated_at = :t WHERE key = 'K8'"), {"t": dt.datetime(2020, 1, 1)})
    reconcile(h.rt)
    assert {t["key"]: t["status"] for t in h.rt.store.tickets()}["K8"] == "unknown"


def test_a_ticket_whose_send_was_lost_after_its_customer_synced_is_resent_once(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    h = harness(sandbox, tmp_path, [("K3", "Call me", "C00003")])
    h.plan()
    for _, msg in h.queued:
        msg.pop("tickets")  # the worker was killed between the customer's sync and its ticket's send
    h.drain()
    assert h.rt.store.tickets()[0]["status"] == "pending" and tickets_in_proto(sandbox) == []
    assert resend_ready_tickets(h.rt, h.ticket_keys.extend) == 1
    assert resend_ready_tickets(h.rt, h.ticket_keys.extend) == 1  # reconciled twice before a worker ran
    assert [send_ticket(h.rt, k) for k in h.ticket_keys] == ["created", "skipped"]
    assert len(tickets_in_proto(sandbox)) == 1
    assert resend_ready_tickets(h.rt, h.ticket_keys.extend) == 0
