"""Planner and sync task together, in-process (no Celery), against the sandbox over HTTP.

The state DB runs on SQLite and PostgreSQL; what is asserted is what the sandbox received
and what the state table holds.
"""

from __future__ import annotations

import datetime as dt
import functools
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import SUBCOMPANY, TOKEN, Sandbox
from tests.crm import MAPPING, add_tag, contact_row, contacts, make_crm, touch, write_mapping
from worker.errors import RateLimited
from worker.jobs import planner
from worker.proto import RetryPolicy
from worker.queues import Queue
from worker.runtime import Runtime
from worker.settings import Settings
from worker.sync import Outcome, sync_contact

LATER = dt.datetime(2026, 6, 1)


class Harness:
    """A Runtime on the sandbox, a planner whose queue is a list, and a way to drain it."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.queued: list[tuple[Queue, dict[str, Any]]] = []
        self.planner = planner(rt)
        self.planner.enqueue = lambda q, msgs: self.queued.extend((q, m) for m in msgs)

    @functools.cached_property
    def crm_engine(self) -> sa.Engine:
        """The CRM as its own application writes to it (crmsync's source engine is read only)."""
        return sa.create_engine(str(self.rt.settings.source_url))

    def plan(self, kind: str = "full", **kw: Any) -> dict[str, Any]:
        return self.planner.plan(kind, **kw).as_dict()

    def drain(self) -> list[Outcome]:
        outcomes = [sync_contact(self.rt, m) for _, m in self.queued]
        self.queued.clear()
        return outcomes

    def sync(self, kind: str = "full", **kw: Any) -> dict[str, Any]:
        result = self.plan(kind, **kw)
        self.drain()
        return result


def harness_for(sandbox: Sandbox, state_url: str, tmp_path: Path, **overrides: Any) -> Harness:
    """A Harness over a 30-contact SQLite CRM in `tmp_path`, the state DB at `state_url` (migrated)."""
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 30).dispose()
    settings = Settings(
        source_url=crm,
        state_url=state_url,
        mapping=write_mapping(tmp_path),
        proto_base_url=sandbox.base_url,
        proto_subcompany_id=SUBCOMPANY,
        proto_token=TOKEN,
        rate_limit=1000,
        **overrides,
    )
    return Harness(Runtime(settings))


@pytest.fixture
def harness(sandbox: Sandbox, state_url: str, tmp_path: Path) -> Harness:
    return harness_for(sandbox, state_url, tmp_path, batch_size=7, lookback_seconds=5)


def crm_engine(h: Harness) -> sa.Engine:
    return h.crm_engine


def test_full_sync_creates_every_customer_with_tags_and_fields(harness: Harness, sandbox: Sandbox) -> None:
    result = harness.sync()
    customers = sandbox.customers()
    assert result["counts"]["new"] == 30 and len(customers) == 30
    c8 = customers["C00008"]
    row = contact_row(8)
    assert c8["name"] == "Ada Test8" and c8["email"] == row["email1"] and c8["location"] is None
    assert sorted(c8["tags"]) == ["newsletter", "vip"]
    assert c8["custom_fields"] == {"lifetime_value": 80.5, "plan": "enterprise", "vip": False}
    assert harness.rt.store.status_counts() == {"synced": 30}


def test_new_contact_costs_one_call_per_non_empty_part(harness: Harness, sandbox: Sandbox) -> None:
    harness.sync()
    by_route = sandbox.stats()["by_route"]
    upserts = sum(by_route["PUT /v1/customers/{subcompany_id}/create-customer/{provided_unique_id}"].values())
    tags = sum(by_route["PUT /v1/customers/{subcompany_id}/customer/{provided_unique_id}/add-tags"].values())
    assert upserts == 30
    assert tags == 20  # one contact in three has no tag: no call for an empty part


def test_unchanged_rerun_makes_no_calls(harness: Harness, sandbox: Sandbox) -> None:
    harness.sync()
    before = sandbox.calls()
    result = harness.sync()
    assert result["counts"]["unchanged"] == 30 and result["counts"]["enqueued"] == 0
    assert sandbox.calls() == before


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys of the contacts the planner canonicalises, as it builds them."""
    import worker.source.reader as reader

    built: list[str] = []

    def counted(mapping: Any, row: Any, **kw: Any) -> Any:
        built.append(row["id"])
        return real(mapping, row, **kw)

    real = reader.build_contact
    monkeypatch.setattr(reader, "build_contact", counted)
    return built


def test_an_unchanged_rerun_builds_no_contact(harness: Harness, sandbox: Sandbox, builds: list[str]) -> None:
    harness.sync()
    assert len(builds) == 30
    fingerprints = {harness.rt.store.customer(f"C{i:05d}")["source_fingerprint"] for i in range(30)}  # type: ignore[index]
    assert len(fingerprints) == 30 and None not in fingerprints
    builds.clear()
    result = harness.sync()
    assert result["counts"]["unchanged"] == 30 and builds == []


def test_a_first_full_sync_looks_no_customer_up_and_the_next_one_does(harness: Harness, sandbox: Sandbox) -> None:
    lookups: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("SELECT customer_sync_state.provided_unique_id, customer_sync_state.profile_hash"):
            lookups.append(statement)

    sa.event.listen(harness.rt.store.engine, "before_cursor_execute", seen)
    first = harness.plan()
    assert lookups == [] and first["counts"]["new"] == 30  # an empty state DB: nothing to look up
    harness.drain()  # each task looks its customer up before it calls
    assert len(lookups) == 30 and len(sandbox.customers()) == 30
    lookups.clear()
    second = harness.plan()
    assert len(lookups) == 5 and second["counts"]["unchanged"] == 30  # one lookup a page of 7


def test_the_state_db_keeps_awkward_keys_as_they_are(harness: Harness) -> None:
    # Keys go to PostgreSQL as arrays (upserts, lookups): quotes, commas, braces and accents included.
    awkward = ["a,b", 'x"y', "{z}", "o'neil", "é-ñ", "back\\slash", "NULL", "sp ace"]
    store = harness.rt.store
    store.mark_queued("run-1", [(k, f"v{i}") for i, k in enumerate(awkward)])

    found = store.lookup(awkward)

    assert {k: (s.status, s.planned_version) for k, s in found.items()} == {
        k: ("queued", f"v{i}") for i, k in enumerate(awkward)
    }


def test_a_tag_added_without_touching_updated_at_is_found_by_the_full_sync(
    harness: Harness, sandbox: Sandbox, builds: list[str]
) -> None:
    harness.sync()
    with crm_engine(harness).begin() as conn:  # a side table edited alone: the row's fingerprint moves
        conn.execute(sa.text("INSERT INTO contact_tags (contact_id, tag_name) VALUES ('C00007', 'late')"))
    builds.clear()
    before = sandbox.calls()
    result = harness.sync()
    assert builds == ["C00007"] and result["counts"]["part_tags"] == 1 and result["counts"]["unchanged"] == 29
    assert sandbox.calls() - before == 1 and "late" in sandbox.customers()["C00007"]["tags"]


def test_a_row_changed_back_and_forth_is_compared_on_its_parts(
    harness: Harness, sandbox: Sandbox, builds: list[str]
) -> None:
    # A changed row is built and diffed part by part: an edit that leaves the contact as it
    # was (a column outside the mapping, here the updated_at) costs a build, not a call.
    harness.sync()
    touch(crm_engine(harness), ["C00002"], LATER)
    builds.clear()
    before = sandbox.calls()
    result = harness.sync()
    assert builds == ["C00002"] and result["counts"]["unchanged"] == 30 and sandbox.calls() == before
    builds.clear()
    assert harness.sync()["counts"]["unchanged"] == 30 and builds == []  # the new fingerprint was recorded


def test_profile_only_change_costs_one_call(harness: Harness, sandbox: Sandbox) -> None:
    harness.sync()
    touch(crm_engine(harness), ["C00003", "C00004"], LATER, last_name="Renamed")
    before = sandbox.calls()
    result = harness.sync("incremental")
    assert result["counts"]["part_profile"] == 2 and result["counts"].get("part_tags", 0) == 0
    assert sandbox.calls() - before == 2
    assert sandbox.customers()["C00003"]["name"] == "Ada Renamed"


def test_tags_only_change_costs_one_call(harness: Harness, sandbox: Sandbox) -> None:
    harness.sync()
    add_tag(crm_engine(harness), "C00005", "touched", LATER)
    before = sandbox.calls()
    harness.sync("incremental")
    assert sandbox.calls() - before == 1
    assert "touched" in sandbox.customers()["C00005"]["tags"]


def test_running_the_same_task_twice_sends_nothing_the_second_time(harness: Harness, sandbox: Sandbox) -> None:
    harness.plan()
    messages = list(harness.queued)
    harness.drain()
    before = sandbox.calls()
    assert all(sync_contact(harness.rt, m) is Outcome.SYNCED for _, m in messages)
    assert sandbox.calls() == before


def test_a_contact_throttled_past_its_time_on_hold_is_deferred_not_dead_lettered(
    harness: Harness, sandbox: Sandbox
) -> None:
    rt = harness.rt
    rt.retry_policy = lambda: RetryPolicy(max_attempts=1, max_held=2.0)  # type: ignore[method-assign]
    harness.plan()
    msg = next(m for _, m in harness.queued if m["contact"]["key"] == "C00004")
    sandbox.faults(throttle_rate=1.0)  # every request 429, Retry-After 1
    with pytest.raises(RateLimited):
        sync_contact(rt, msg)
    assert rt.store.dead_letters() == []
    assert rt.store.customer("C00004")["status"] == "queued"  # the task comes back later
    sandbox.faults(throttle_rate=0.0)
    assert sync_contact(rt, msg) is Outcome.SYNCED
    assert "C00004" in sandbox.customers()


def test_a_task_of_a_run_this_state_db_does_not_know_is_skipped_without_a_call(
    harness: Harness, sandbox: Sandbox
) -> None:
    harness.plan()
    foreign = {**harness.queued[0][1], "run_id": "f" * 16}  # another deployment's, on a shared broker
    harness.queued.clear()

    assert sync_contact(harness.rt, foreign) is Outcome.SKIPPED
    assert sandbox.calls() == 4  # the custom fields' set-up only
    assert harness.rt.store.customer(foreign["contact"]["key"])["status"] == "queued"  # type: ignore[index]


def test_older_version_never_overwrites_newer(harness: Harness, sandbox: Sandbox) -> None:
    harness.plan()
    stale = next(m for _, m in harness.queued if m["contact"]["key"] == "C00001")
    harness.drain()
    touch(crm_engine(harness), ["C00001"], LATER, last_name="Newer")
    harness.sync("incremental")
    assert sync_contact(harness.rt, stale) is Outcome.SKIPPED
    assert sandbox.customers()["C00001"]["name"] == "Ada Newer"


def test_a_change_whose_updated_at_went_backwards_is_still_synced(harness: Harness, sandbox: Sandbox) -> None:
    harness.sync()
    touch(crm_engine(harness), ["C00003"], LATER, city="Osaka")
    harness.sync("incremental")
    # The CRM sets an earlier updated_at with new content (a restored backup, a clock put back).
    touch(crm_engine(harness), ["C00003"], LATER - dt.timedelta(hours=1), city="Nairobi")
    harness.sync()
    assert sandbox.customers()["C00003"]["location"] == "Nairobi"
    assert harness.rt.store.customer("C00003")["status"] == "synced"


def test_incremental_reads_only_from_the_watermark_minus_lookback(harness: Harness) -> None:
    harness.sync()
    touch(crm_engine(harness), ["C00002"], LATER, city="Osaka")
    result = harness.sync("incremental")
    # The 5 s lookback re-reads the last rows of the full sync: read, but not resent.
    assert result["counts"]["enqueued"] == 1
    assert result["counts"]["read"] < 30


def test_dry_run_calls_nothing_and_changes_no_state(harness: Harness, sandbox: Sandbox) -> None:
    result = harness.plan(dry_run=True)
    assert result["counts"]["new"] == 30 and result["run_id"] is None
    assert harness.queued == [] and sandbox.calls() == 0
    assert harness.rt.store.status_counts() == {} and harness.rt.store.runs() == []


def test_force_resends_every_part(harness: Harness, sandbox: Sandbox, builds: list[str]) -> None:
    harness.sync()
    before = sandbox.calls()
    builds.clear()
    result = harness.sync(force=True)
    assert result["counts"]["enqueued"] == 30 and len(builds) == 30  # no row taken as unchanged
    assert sandbox.calls() - before == 30 + 20 + 30


def test_a_row_proto_would_refuse_is_dead_lettered_before_any_call_and_the_rest_syncs(
    harness: Harness, sandbox: Sandbox
) -> None:
    with crm_engine(harness).begin() as conn:
        conn.execute(contacts.update().where(contacts.c.id == "C00009").values(email1="not-an-email"))
    result = harness.sync()
    assert result["counts"]["invalid"] == 1 and result["counts"]["enqueued"] == 29
    letters = harness.rt.store.dead_letters()
    assert [d["provided_unique_id"] for d in letters] == ["C00009"]
    assert letters[0]["error_class"] == "InvalidRecord.invalid_email" and letters[0]["http_status"] is None
    assert "not-an-email" in letters[0]["message"]
    assert len(sandbox.customers()) == 29
    assert harness.rt.store.customer("C00009")["status"] == "dead"


def test_a_payload_the_api_rejects_is_dead_lettered_with_status_and_body(harness: Harness, sandbox: Sandbox) -> None:
    harness.plan()
    msg = next(m for _, m in harness.queued if m["contact"]["key"] == "C00004")
    msg["contact"]["profile"]["email"] = "rejected-by-the-api"  # as if the rules had changed on Proto's side
    assert sync_contact(harness.rt, msg) is Outcome.DEAD
    letter = harness.rt.store.dead_letters()[0]
    assert letter["provided_unique_id"] == "C00004" and letter["http_status"] == 422
    assert letter["error_class"] == "PermanentError.422" and "email" in letter["message"]
    assert letter["payload"]["profile"]["email"] == "rejected-by-the-api"
    assert TOKEN not in str(letter)
    assert "C00004" not in sandbox.customers()


def test_dead_contact_is_not_resent_until_it_changes(harness: Harness, sandbox: Sandbox) -> None:
    touch(crm_engine(harness), ["C00009"], dt.datetime(2026, 1, 1), email1="bad")
    harness.sync()
    before = sandbox.calls()
    harness.sync()
    assert sandbox.calls() == before
    touch(crm_engine(harness), ["C00009"], LATER, email1="fixed@example.org")
    harness.sync()
    assert "C00009" in sandbox.customers()
    assert harness.rt.store.dead_letters() == []  # resolved once synced


def test_replay_after_the_crm_row_is_fixed_syncs_it(harness: Harness, sandbox: Sandbox) -> None:
    from worker.jobs import replay

    touch(crm_engine(harness), ["C00011"], dt.datetime(2026, 1, 1), email1="nope")
    harness.sync()
    touch(crm_engine(harness), ["C00011"], dt.datetime(2026, 1, 1), email1="c11@example.org")
    summary = replay(rt=harness.rt, using=harness.planner)
    assert summary["counts"]["replayed"] == 1
    assert [q for q, _ in harness.queued] == [Queue.PRIORITY]
    harness.drain()
    assert sandbox.customers()["C00011"]["email"] == "c11@example.org"
    assert harness.rt.store.dead_letters(state="resolved")[0]["provided_unique_id"] == "C00011"


def _harness_with_two_bad_rows(sandbox: Sandbox, state_url: str, tmp_path: Path) -> Harness:
    """Five contacts, one with a NULL key and one with text in a number field."""
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 5)
    engine = sa.create_engine(crm)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE loose AS SELECT * FROM contacts"))
        conn.execute(sa.text("UPDATE loose SET id = NULL WHERE id = 'C00001'"))
        conn.execute(sa.text("UPDATE loose SET ltv = 'lots' WHERE id = 'C00002'"))
    mapping = write_mapping(tmp_path, MAPPING.replace("table: contacts", "table: loose"))
    settings = Settings(
        source_url=crm,
        state_url=state_url,
        mapping=mapping,
        proto_base_url=sandbox.base_url,
        proto_subcompany_id=SUBCOMPANY,
        proto_token=TOKEN,
        rate_limit=1000,
    )
    return Harness(Runtime(settings))


def test_invalid_rows_are_dead_lettered_before_any_call(sandbox: Sandbox, sqlite_state: str, tmp_path: Path) -> None:
    h = _harness_with_two_bad_rows(sandbox, sqlite_state, tmp_path)
    result = h.sync()
    assert result["counts"]["invalid"] == 2 and len(sandbox.customers()) == 3
    classes = sorted(d["error_class"] for d in h.rt.store.dead_letters())
    assert classes == ["InvalidRecord.field_type", "InvalidRecord.missing_key"]


def test_a_bad_row_keeps_one_dead_letter_over_nightly_runs_even_without_a_key(
    sandbox: Sandbox, state_url: str, tmp_path: Path
) -> None:
    h = _harness_with_two_bad_rows(sandbox, state_url, tmp_path)
    for _ in range(3):
        assert h.sync()["counts"]["invalid"] == 2
    letters = h.rt.store.dead_letters()
    assert sorted((d["error_class"], d["attempts"]) for d in letters) == [
        ("InvalidRecord.field_type", 3),
        ("InvalidRecord.missing_key", 3),
    ]


def _harness_with(sandbox: Sandbox, tmp_path: Path, **settings: Any) -> Harness:
    from worker.state.db import migrate

    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    make_crm(crm, 6)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(state)
    return Harness(
        Runtime(
            Settings(
                source_url=crm,
                state_url=state,
                mapping=write_mapping(tmp_path),
                proto_base_url=sandbox.base_url,
                proto_subcompany_id=SUBCOMPANY,
                proto_token=TOKEN,
                rate_limit=1000,
                **settings,
            )
        )
    )


def test_a_contact_deleted_in_the_crm_is_tagged_under_the_tag_policy(sandbox: Sandbox, tmp_path: Path) -> None:
    h = _harness_with(sandbox, tmp_path, deleted_policy="tag", deleted_tag="gone-from-crm")
    h.sync()
    touch(crm_engine(h), ["C00002"], LATER, deleted=1)
    before = sandbox.calls()
    result = h.sync("incremental")
    assert result["counts"]["deleted"] == 1 and sandbox.calls() - before == 1
    assert "gone-from-crm" in sandbox.customers()["C00002"]["tags"]
    # Synced as tagged, its row unchanged: still counted as deleted by the next full sync, no call.
    rerun = h.sync()
    assert rerun["counts"]["deleted"] == 1 and rerun["counts"]["enqueued"] == 0 and sandbox.calls() - before == 1


def test_a_contact_deleted_in_the_crm_is_left_alone_under_the_ignore_policy(sandbox: Sandbox, tmp_path: Path) -> None:
    h = _harness_with(sandbox, tmp_path)
    with crm_engine(h).begin() as conn:
        conn.execute(contacts.update().where(contacts.c.id == "C00003").values(deleted=1))
    h.sync()
    assert "C00003" not in sandbox.customers() and len(sandbox.customers()) == 5


def test_update_only_skips_contacts_proto_does_not_have(sandbox: Sandbox, tmp_path: Path) -> None:
    from worker.proto import ProtoClient

    with ProtoClient(sandbox.base_url, SUBCOMPANY, TOKEN) as client:
        client.upsert_customer("C00001", {"name": "Already here"})
    h = _harness_with(sandbox, tmp_path, sync_mode="update-only")
    h.sync()
    assert sorted(sandbox.customers()) == ["C00001"]
    assert sandbox.customers()["C00001"]["name"] == "Ada Test1"
    assert h.rt.store.status_counts() == {"skipped": 5, "synced": 1}
    before = sandbox.calls()
    h.sync()
    assert sandbox.calls() == before  # not asked again while unchanged


def test_create_only_never_updates_a_synced_customer(sandbox: Sandbox, tmp_path: Path) -> None:
    h = _harness_with(sandbox, tmp_path, sync_mode="create-only")
    h.sync()
    touch(crm_engine(h), ["C00004"], LATER, last_name="Changed")
    before = sandbox.calls()
    result = h.sync("incremental")
    assert result["counts"]["skipped_existing"] >= 1 and sandbox.calls() == before
    assert sandbox.customers()["C00004"]["name"] == "Ada Test4"


def test_a_changed_mapping_is_noticed_and_only_affected_parts_are_resent(sandbox: Sandbox, tmp_path: Path) -> None:
    h = _harness_with(sandbox, tmp_path)
    h.sync()
    assert h.planner.mapping_changes() == []
    write_mapping(tmp_path, MAPPING.replace("location: city", "location: first_name"))
    h2 = Harness(Runtime(h.rt.settings))
    assert h2.planner.mapping_changes() == ["profile"]
    before = sandbox.calls()
    result = h2.sync("incremental")  # nothing was touched in the CRM: still, every contact is read
    assert result["counts"]["mapping_changed"] == 1 and result["counts"]["read"] == 6
    assert result["counts"]["part_profile"] == 6 and result["counts"]["part_tags"] == 0
    assert sandbox.calls() - before == 6
    assert sandbox.customers()["C00001"]["location"] == "Ada"
    assert h2.planner.mapping_changes() == []


def test_a_task_from_a_newer_planner_with_unknown_fields_is_synced_not_failed(
    harness: Harness, sandbox: Sandbox
) -> None:
    harness.plan("full")
    for _, msg in harness.queued:  # what a newer planner of a rolling deploy may add
        msg["contact"]["locale"] = "fr-CH"
        msg["priority_hint"] = 3

    outcomes = harness.drain()

    assert set(outcomes) == {Outcome.SYNCED}
    customers = sandbox.customers()
    assert len(customers) == 30 and "locale" not in customers["C00001"]


def test_a_task_from_an_older_planner_without_part_hashes_is_synced(harness: Harness, sandbox: Sandbox) -> None:
    harness.plan("full")
    for _, msg in harness.queued:  # an older planner's message: no per-part hashes, no newer options
        del msg["contact"]["hashes"]
        for name in ("kind", "fingerprint", "update_only", "tickets"):
            msg.pop(name, None)

    outcomes = harness.drain()

    assert set(outcomes) == {Outcome.SYNCED}
    assert len(sandbox.customers()) == 30


def test_a_customer_is_never_left_dead_without_its_letter_when_the_letter_cannot_be_written(
    harness: Harness,
) -> None:
    store = harness.rt.store
    store.record_outcome("C00001", None, "synced", {"profile": "p", "tags": "t", "fields": "f"}, "v1")
    unstorable = {"key": "C00001", "profile": {"when": object()}}  # no JSON: the letter's write fails

    with pytest.raises((sa.exc.StatementError, TypeError)):  # as each driver reports it
        store.record_dead("C00001", None, {"profile": "p2"}, "h", unstorable, "PermanentError.422", "refused")

    # One transaction: the failed letter took the customer's `dead` with it.
    assert (store.customer("C00001") or {})["status"] == "synced"
    assert store.dead_letters() == []
    letter = store.record_dead("C00001", None, {"profile": "p2"}, "h", {"key": "C00001"}, "PermanentError.422", "no")
    assert (store.customer("C00001") or {})["status"] == "dead"
    assert [d["id"] for d in store.dead_letters()] == [letter]
