"""Issue 11, items 8-10: the Proto side is safe by construction.

- Refused credentials (401/403) pause the sub-company for every worker, fail the run once naming
  the setting, write no dead letter, and sending resumes by itself once a probe is accepted.
- A custom field deleted in Proto is ensured again (once, under the fields lock) and the call
  retried; `crmsync check` names a registry entry that Proto no longer has.
- An unreachable limiter/breaker store holds calls (unsent) instead of failing them: no dead
  letter, and a ticket whose request never left stays `pending`.

Through real HTTP to the sandbox and a real Redis; what is asserted is what the sandbox received
and what the state tables hold.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa

from tests.conftest import SUBCOMPANY, TOKEN, Sandbox
from tests.crm import MAPPING, TICKETS_MAPPING, make_crm, write_mapping
from tests.tcp_proxy import TcpProxy
from tests.test_breaker import FakeClock
from tests.test_end_to_end import crmsync, sync_json
from tests.test_sync_flow import Harness, harness_for
from worker.errors import AuthError, AuthPaused, CircuitOpen
from worker.proto import LocalBreaker, LocalLimiter, ProtoClient, RedisBreaker, RedisLimiter, RetryPolicy
from worker.proto._wire import ROUTES
from worker.runtime import Runtime
from worker.settings import Settings
from worker.state.db import migrate
from worker.sync import Outcome, sync_contact
from worker.tickets import send_ticket

WRONG_TOKEN = "wrong-token-7f3e2a91"  # the sandbox answers 403: not this sub-company's token


def route(name: str) -> str:
    """A route as /_sandbox/stats names it."""
    method, template = ROUTES[name]
    return f"{method} {template}"


def calls(sandbox: Sandbox, name: str, status: int | None = None) -> int:
    """Requests the sandbox received on one route (of one status, if given)."""
    by_status = sandbox.stats()["by_route"].get(route(name), {})
    return int(by_status.get(str(status), 0) if status else sum(by_status.values()))


def refused(sandbox: Sandbox) -> int:
    """401 and 403 answers, over every route."""
    by_status = sandbox.stats()["by_status"]
    return int(by_status.get("401", 0) + by_status.get("403", 0))


def state_rows(url: str, query: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.text(query)).mappings()]
    finally:
        engine.dispose()


# -- a: refused credentials pause the sub-company, not the contacts -------------------------------


def test_a_refused_token_is_sent_once_then_every_call_waits_for_the_probe_that_lifts_the_pause(
    sandbox: Sandbox,
) -> None:
    breaker = LocalBreaker(auth_probe_first=0.3)  # one per process: the threads of a worker share it
    limiter = LocalLimiter(1000)
    bad = ProtoClient(
        sandbox.base_url, SUBCOMPANY, WRONG_TOKEN, limiter=limiter, breaker=breaker, retry=RetryPolicy(max_held=0.1)
    )
    good = ProtoClient(
        sandbox.base_url, SUBCOMPANY, TOKEN, limiter=limiter, breaker=breaker, retry=RetryPolicy(max_held=5)
    )
    with bad, good:
        with pytest.raises(AuthError) as first:
            bad.upsert_customer("a-1", {"name": "Ada"})
        message = str(first.value)
        assert "CRMSYNC_PROTO_SUBCOMPANY_ID" in message and "CRMSYNC_PROTO_TOKEN" in message
        assert WRONG_TOKEN not in message and SUBCOMPANY in message
        for _ in range(5):  # held, not sent: no second refusal
            with pytest.raises(AuthPaused) as held:
                bad.upsert_customer("a-1", {"name": "Ada"})
            assert held.value.reason == message and held.value.not_sent
        assert refused(sandbox) == 1

        good.upsert_customer("a-2", {"name": "Grace"})  # waits for the probe, which is accepted
        good.upsert_customer("a-3", {"name": "Linus"})  # the pause is lifted: no wait

    assert sorted(sandbox.customers()) == ["a-2", "a-3"] and refused(sandbox) == 1


def test_a_refused_probe_doubles_the_wait_for_the_next_one_and_calls_in_flight_do_not() -> None:
    clock = FakeClock()
    breaker = LocalBreaker(clock=clock, auth_probe_first=1.0, auth_probe_max=4.0)
    breaker.on_auth_failure("refused")
    breaker.on_auth_failure("refused")  # a call that was in flight when the pause began
    with pytest.raises(AuthPaused) as held:
        breaker.before_call()
    assert held.value.retry_after == pytest.approx(1.0)
    waits = []
    for _ in range(4):
        clock.now += held.value.retry_after
        breaker.before_call()  # the probe
        breaker.on_auth_failure("refused")  # refused again
        with pytest.raises(AuthPaused) as held:
            breaker.before_call()
        waits.append(held.value.retry_after)
    assert waits == [2.0, 4.0, 4.0, 4.0]
    clock.now += 4.0
    breaker.before_call()
    breaker.on_success()  # the probe is accepted: every call goes
    breaker.before_call()
    breaker.before_call()


def test_the_pause_is_shared_through_redis_and_a_new_process_probes_at_once(sandbox: Sandbox, redis_url: str) -> None:
    def client(token: str) -> ProtoClient:
        shared = redis.Redis.from_url(redis_url)  # a client of its own: another process
        return ProtoClient(
            sandbox.base_url,
            SUBCOMPANY,
            token,
            limiter=RedisLimiter(shared, SUBCOMPANY, 1000),
            breaker=RedisBreaker(shared, SUBCOMPANY, auth_probe_first=30),
            retry=RetryPolicy(max_held=0.5),
        )

    one, other, fixed = client(WRONG_TOKEN), client(WRONG_TOKEN), client(TOKEN)
    with one, other, fixed:
        with pytest.raises(AuthError):
            one.upsert_customer("r-1", {"name": "Ada"})
        with pytest.raises(AuthPaused):
            one.upsert_customer("r-1", {"name": "Ada"})
        with pytest.raises(AuthError):
            other.upsert_customer("r-1", {"name": "Ada"})  # its first call: a probe, refused
        with pytest.raises(AuthPaused):
            other.upsert_customer("r-1", {"name": "Ada"})  # then held like every other
        assert refused(sandbox) == 2

        fixed.upsert_customer("r-2", {"name": "Grace"})  # a process with the fixed token: no 30 s wait
        one_more = calls(sandbox, "upsert_customer")
        fixed.upsert_customer("r-3", {"name": "Linus"})

    assert sorted(sandbox.customers()) == ["r-2", "r-3"] and one_more == 3
    assert not redis.Redis.from_url(redis_url).exists(f"crmsync:breaker:{SUBCOMPANY}:auth")


class Workers:
    """`crmsync worker` processes, each with its own settings; stopped (all of them) at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--concurrency", "4"],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop as systemd does: SIGTERM (tasks on hold finish their hold and defer), then SIGKILL."""
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("worker-*.log")))


@pytest.fixture
def worker_procs(tmp_path: Path) -> Iterator[Workers]:
    workers = Workers(tmp_path)
    yield workers
    for proc in workers.procs:
        workers.stop(proc)


def wait_until(predicate: Any, timeout: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


def test_a_wrong_token_fails_the_run_once_costs_no_dead_letter_and_the_contacts_sync_once_it_is_fixed(
    crm_env: dict[str, str], sandbox: Sandbox, redis_url: str, tmp_path: Path, worker_procs: Workers
) -> None:
    crm_env.update(
        CRMSYNC_SOURCE_URL=f"sqlite:///{tmp_path / 'crm.db'}",
        CRMSYNC_BROKER_URL=redis_url,
        CRMSYNC_MAPPING=str(write_mapping(tmp_path)),
    )
    make_crm(crm_env["CRMSYNC_SOURCE_URL"], 40).dispose()
    assert crmsync(crm_env, "init").returncode == 0
    good = worker_procs.start(crm_env)
    assert sync_json(crm_env, "full")["counts"]["synced"] == 40  # the registry is filled
    worker_procs.stop(good)

    # A wrong token is deployed: every worker, and the command, run with it.
    wrong = {**crm_env, "CRMSYNC_PROTO_TOKEN": WRONG_TOKEN}
    bad = worker_procs.start(wrong)
    before = sandbox.stats()["total"]
    done = crmsync(wrong, "sync", "full", "--force", "--wait")

    assert done.returncode == 1, done.stdout + done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert "failed" in error and "CRMSYNC_PROTO_TOKEN" in error and "CRMSYNC_PROTO_SUBCOMPANY_ID" in error
    assert WRONG_TOKEN not in done.stdout + done.stderr
    assert 1 <= refused(sandbox) <= 20  # not one refusal a contact
    assert sandbox.stats()["total"] - before == refused(sandbox)  # nothing else was sent
    state = crm_env["CRMSYNC_STATE_URL"]
    run = state_rows(state, "SELECT status, error FROM sync_runs ORDER BY started_at DESC")[0]
    assert run["status"] == "failed" and "CRMSYNC_PROTO_TOKEN" in run["error"] and WRONG_TOKEN not in run["error"]
    assert state_rows(state, "SELECT * FROM dead_letters") == []
    statuses = state_rows(state, "SELECT status, count(*) AS n FROM customer_sync_state GROUP BY status")
    assert statuses == [{"status": "queued", "n": 40}]

    # The token is fixed and the workers restarted: the queued contacts go by themselves.
    worker_procs.stop(bad)
    worker_procs.start(crm_env)
    synced = "SELECT count(*) AS n FROM customer_sync_state WHERE status = 'synced'"
    assert wait_until(lambda: state_rows(state, synced)[0]["n"] == 40, timeout=120)
    assert calls(sandbox, "upsert_customer", 200) == 80  # the first sync's 40, the forced one's 40
    assert state_rows(state, "SELECT * FROM dead_letters") == []
    assert WRONG_TOKEN not in worker_procs.logs() and TOKEN not in worker_procs.logs()


def test_sync_wait_on_the_embedded_broker_exits_1_naming_the_token_file(
    crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    crm_env.update(CRMSYNC_SOURCE_URL=f"sqlite:///{tmp_path / 'crm.db'}", CRMSYNC_MAPPING=str(write_mapping(tmp_path)))
    make_crm(crm_env["CRMSYNC_SOURCE_URL"], 30).dispose()
    assert crmsync(crm_env, "init").returncode == 0
    assert sync_json(crm_env, "full")["counts"]["synced"] == 30
    token_file = tmp_path / "token"
    token_file.write_text(WRONG_TOKEN + "\n")
    wrong = {k: v for k, v in crm_env.items() if k != "CRMSYNC_PROTO_TOKEN"} | {
        "CRMSYNC_PROTO_TOKEN_FILE": str(token_file)
    }

    done = crmsync(wrong, "sync", "full", "--force", "--wait")

    assert done.returncode == 1
    assert f"CRMSYNC_PROTO_TOKEN_FILE ({token_file})" in done.stderr and WRONG_TOKEN not in done.stderr
    assert 1 <= refused(sandbox) <= 20
    state = crm_env["CRMSYNC_STATE_URL"]
    assert state_rows(state, "SELECT * FROM dead_letters") == []
    assert [r["status"] for r in state_rows(state, "SELECT status FROM sync_runs ORDER BY started_at")] == [
        "finished",
        "failed",
    ]


# -- b: the registry heals -------------------------------------------------------------------------


@pytest.fixture
def harness(sandbox: Sandbox, tmp_path: Path) -> Harness:
    state = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(state)
    return harness_for(sandbox, state, tmp_path)


def drain_in_threads(h: Harness, threads: int = 8) -> list[Outcome]:
    """Run the queued tasks as a worker's threads do: at once, sharing one Runtime."""
    msgs = [m for _, m in h.queued]
    h.queued.clear()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda m: sync_contact(h.rt, m), msgs))


def test_a_custom_field_deleted_in_proto_is_created_again_once_and_every_value_is_sent(
    harness: Harness, sandbox: Sandbox
) -> None:
    harness.sync()
    old = harness.rt.store.field_ids()["plan"]
    harness.rt.client.delete_custom_field(old)  # someone deletes it in Proto: its values go too
    assert all("plan" not in c["custom_fields"] for c in sandbox.customers().values())
    created, listed = calls(sandbox, "create_custom_field"), calls(sandbox, "list_custom_fields")

    harness.plan(force=True)
    outcomes = drain_in_threads(harness)

    assert outcomes == [Outcome.SYNCED] * 30
    assert calls(sandbox, "create_custom_field") - created == 1  # once, whatever the threads
    assert calls(sandbox, "list_custom_fields") - listed == 1
    assert 1 <= calls(sandbox, "add_custom_fields", 422) <= 8  # at most the calls already in flight
    new = httpx.get(f"{sandbox.root}/_sandbox/custom-fields/{SUBCOMPANY}").json()
    plan = [f for f in new if f["name"] == "plan"]
    assert len(plan) == 1 and plan[0]["id"] != old and plan[0]["select_options"] == ["free", "pro", "enterprise"]
    assert harness.rt.store.field_ids()["plan"] == plan[0]["id"]
    customers = sandbox.customers()
    assert {k: c["custom_fields"]["plan"] for k, c in customers.items()} == {
        f"C{i:05d}": ["free", "pro", "enterprise"][i % 3] for i in range(30)
    }
    assert harness.rt.store.dead_letters() == []


def test_a_registered_id_proto_does_not_know_gives_way_to_the_id_of_its_field_of_that_name(
    harness: Harness, sandbox: Sandbox
) -> None:
    harness.sync()
    store = harness.rt.store
    # A registry pointing at an id Proto never had, for a field Proto has under its name: the heal
    # finds the field by name, registers its id, and the retry is accepted.
    real = store.registered_fields()["vip"]
    store.register_fields([("vip", "no-such-id", real.type, real.select_options)])
    harness.rt.forget_field_ids()
    created = calls(sandbox, "create_custom_field")
    harness.plan(force=True, keys=["C00001"])
    assert harness.drain() == [Outcome.SYNCED]
    assert store.field_ids()["vip"] == real.id and calls(sandbox, "create_custom_field") == created


def test_check_names_a_registered_field_that_proto_no_longer_has_and_the_remedy(
    crm_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    crm_env.update(CRMSYNC_SOURCE_URL=f"sqlite:///{tmp_path / 'crm.db'}", CRMSYNC_MAPPING=str(write_mapping(tmp_path)))
    make_crm(crm_env["CRMSYNC_SOURCE_URL"], 6).dispose()
    assert crmsync(crm_env, "init").returncode == 0
    assert sync_json(crm_env, "full")["counts"]["synced"] == 6
    assert crmsync(crm_env, "check").returncode == 0
    fields = {f["name"]: f["id"] for f in httpx.get(f"{sandbox.root}/_sandbox/custom-fields/{SUBCOMPANY}").json()}
    with ProtoClient(sandbox.base_url, SUBCOMPANY, TOKEN) as client:
        client.delete_custom_field(fields["lifetime_value"])

    stale = crmsync(crm_env, "check")

    assert stale.returncode != 0
    line = next(x for x in stale.stdout.splitlines() if "lifetime_value" in x)
    assert fields["lifetime_value"] in line and "crmsync sync full --force --wait" in line
    assert sync_json(crm_env, "full", "--force")["counts"]["dead"] == 0
    assert crmsync(crm_env, "check").returncode == 0
    assert all("lifetime_value" in c["custom_fields"] for c in sandbox.customers().values())


# -- c: the limiter's store unreachable ------------------------------------------------------------


@pytest.fixture
def limiter_proxy(redis_url: str) -> Iterator[TcpProxy]:
    """A relay to the test Redis: the limiter's and breaker's store, which a test can cut."""
    url = redis.connection.parse_url(redis_url)
    proxy = TcpProxy((str(url.get("host", "127.0.0.1")), int(url.get("port", 6379))))
    proxy.start()
    yield proxy
    proxy.stop()


def ticket_harness(sandbox: Sandbox, tmp_path: Path, proxy: TcpProxy, redis_url: str, **settings: Any) -> Harness:
    """A harness whose limiter and breaker live in Redis behind `proxy`, with a case per contact."""
    crm = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = make_crm(crm, 6)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE cases (case_id TEXT PRIMARY KEY, title TEXT, contact_id TEXT)"))
        for i in range(6):
            conn.execute(sa.text("INSERT INTO cases VALUES (:k, 'Help', :c)"), {"k": f"K{i}", "c": f"C{i:05d}"})
    engine.dispose()
    state = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(state)
    db = redis_url.rsplit("/", 1)[1]
    values: dict[str, Any] = dict(
        source_url=crm,
        state_url=state,
        broker_url=f"redis://127.0.0.1:{proxy.port}/{db}",
        mapping=write_mapping(tmp_path, MAPPING + TICKETS_MAPPING),
        proto_base_url=sandbox.base_url,
        proto_subcompany_id=SUBCOMPANY,
        proto_token=TOKEN,
        rate_limit=1000,
    )
    h = Harness(Runtime(Settings(**(values | settings))))
    h.planner.enqueue_tickets = lambda keys: None  # sent by their customer's task
    return h


def test_a_five_second_outage_of_the_limiters_redis_delays_calls_and_loses_none(
    sandbox: Sandbox, tmp_path: Path, redis_url: str, limiter_proxy: TcpProxy
) -> None:
    h = ticket_harness(sandbox, tmp_path, limiter_proxy, redis_url)
    h.plan()  # fields ensured through the limiter while it is up
    limiter_proxy.stop()
    threading.Timer(5.0, limiter_proxy.start).start()
    started = time.monotonic()

    outcomes = drain_in_threads(h, threads=4)

    assert time.monotonic() - started >= 4.5  # they waited for the store
    assert outcomes == [Outcome.SYNCED] * 6
    assert h.rt.store.dead_letters() == [] and h.rt.store.status_counts() == {"synced": 6}
    assert calls(sandbox, "upsert_customer") == 6  # each sent once: nothing failed on the wire
    assert h.rt.store.ticket_counts() == {"created": 6}
    tickets = httpx.get(f"{sandbox.root}/_sandbox/tickets/{SUBCOMPANY}").json()
    assert sorted(t["provided_unique_id"] for t in tickets) == [f"C{i:05d}" for i in range(6)]


def test_a_ticket_held_past_its_time_on_hold_by_an_unreachable_store_is_pending_not_unknown(
    sandbox: Sandbox, tmp_path: Path, redis_url: str, limiter_proxy: TcpProxy
) -> None:
    h = ticket_harness(sandbox, tmp_path, limiter_proxy, redis_url)
    rt = h.rt
    # The Runtime's own limiter and breaker, with a hold of 2 s instead of 20 (the test's patience).
    rt.__dict__["client"] = ProtoClient(
        sandbox.base_url, SUBCOMPANY, TOKEN, limiter=rt.limiter, breaker=rt.breaker, retry=RetryPolicy(max_held=2)
    )
    h.plan()
    limiter_proxy.stop()

    with pytest.raises(CircuitOpen, match="unreachable"):
        sync_contact(rt, h.queued[0][1])  # held past its hold: the task defers itself
    assert send_ticket(rt, "K0") == "pending"

    ticket = next(t for t in rt.store.tickets() if t["key"] == "K0")
    assert ticket["status"] == "pending" and "unreachable" in str(ticket["error"])
    assert rt.store.tickets("unknown") == []
    assert rt.store.dead_letters() == [] and rt.store.customer("C00000")["status"] == "queued"  # type: ignore[index]
    assert sandbox.stats()["total"] == calls(sandbox, "list_custom_fields") + calls(sandbox, "create_custom_field")
    limiter_proxy.start()
    assert send_ticket(rt, "K0") == "created"
    assert calls(sandbox, "create_ticket") == 1
