"""`crmsync demo`: the three uses of crmsync on embedded defaults, with no service to install.

A sample CRM in SQLite, the sandbox on a free local port, a real Celery worker process on
the embedded broker: a full sync, an incremental sync after edits, dead letters for bad
rows, and the replay of one after it is fixed in the CRM.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

DEMO_MAPPING = """\
source:
  table: contacts
  key: id
  updated_at: date_modified
  deleted: deleted
customer:
  name: [first_name, last_name]
  email: email1
  phone_number: phone_work
  location: city
  external_customer_id: id
tags:
  query: SELECT contact_id AS key, tag_name AS tag FROM contact_tags
custom_fields:
  - {name: lifetime_value, column: ltv, type: number}
  - {name: plan, column: plan, type: select, options: [free, pro, enterprise]}
  - {name: vip, column: is_vip, type: toggle}
"""

FIRST = ["Ada", "Grace", "Alan", "Zoë", "Łukasz", "Mía", "Omar", "Chen", "Amara", "Noor"]
LAST = ["Lovelace", "Hopper", "Turing", "Okafor", "Nowak", "García", "Haddad", "Wei", "Diallo", "Khan"]
CITIES = ["Kigali", "Lyon", "Austin", "Kraków", "Osaka", None]
TAGS = ["vip", "newsletter", "churn-risk", "beta", "partner"]
BAD_EMAILS = ["not-an-email", "ada@", "@example.org"]


def make_crm(url: str, size: int, seed: int = 1) -> list[int]:
    """Create the sample CRM at `url`; returns the ids of the rows with a bad e-mail."""
    md = sa.MetaData()
    contacts = sa.Table(
        "contacts",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("first_name", sa.String(60)),
        sa.Column("last_name", sa.String(60)),
        sa.Column("email1", sa.String(120)),
        sa.Column("phone_work", sa.String(40)),
        sa.Column("city", sa.String(60)),
        sa.Column("ltv", sa.Numeric(12, 2)),
        sa.Column("plan", sa.String(20)),
        sa.Column("is_vip", sa.Integer),
        sa.Column("date_modified", sa.DateTime),
        sa.Column("deleted", sa.Integer, default=0),
    )
    tags = sa.Table(
        "contact_tags",
        md,
        sa.Column("contact_id", sa.Integer, index=True),
        sa.Column("tag_name", sa.String(60)),
    )
    engine = sa.create_engine(url)
    md.create_all(engine)
    rng = random.Random(seed)
    base = dt.datetime(2026, 1, 1)
    rows: list[dict[str, Any]] = []
    tag_rows: list[dict[str, Any]] = []
    bad: list[int] = []
    for i in range(1, size + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        email = f"{first.lower()}.{last.lower()}{i}@example.org"
        if i % (size // len(BAD_EMAILS) + 1) == 7:
            email = BAD_EMAILS[len(bad) % len(BAD_EMAILS)]
            bad.append(i)
        rows.append(
            dict(
                id=i,
                first_name=first,
                last_name=last,
                email1=email,
                phone_work=f"+1 555 {i:07d}",
                city=rng.choice(CITIES),
                ltv=round(rng.uniform(0, 9000), 2),
                plan=rng.choice(["free", "pro", "enterprise"]),
                is_vip=rng.randint(0, 1),
                date_modified=base + dt.timedelta(minutes=i),
                deleted=0,
            )
        )
        tag_rows += [dict(contact_id=i, tag_name=t) for t in rng.sample(TAGS, rng.randint(0, 3))]
    with engine.begin() as conn:
        conn.execute(contacts.insert(), rows)
        conn.execute(tags.insert(), tag_rows)
    engine.dispose()
    return bad


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(size: int = 300, keep: bool = False) -> int:
    """Run the demo end to end and print what happened; 0 when every step did what it should."""
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="crmsync-demo-"))
    crm_url = f"sqlite:///{folder / 'crm.db'}"
    bad = make_crm(crm_url, size)
    (folder / "mapping.yaml").write_text(DEMO_MAPPING)

    from .sandbox import DEFAULT_SUBCOMPANY_ID, DEFAULT_TOKEN, sandbox_process

    sandbox_args = ("--subcompany-id", DEFAULT_SUBCOMPANY_ID, "--token", DEFAULT_TOKEN, "--rate-limit", "200")
    with sandbox_process(*sandbox_args) as base_url:
        os.environ.update(
            CRMSYNC_SOURCE_URL=crm_url,
            CRMSYNC_STATE_URL=f"sqlite:///{folder / 'state.db'}",
            CRMSYNC_MAPPING=str(folder / "mapping.yaml"),
            CRMSYNC_PROTO_BASE_URL=base_url,
            CRMSYNC_PROTO_SUBCOMPANY_ID=DEFAULT_SUBCOMPANY_ID,
            CRMSYNC_PROTO_TOKEN=DEFAULT_TOKEN,
            CRMSYNC_RATE_LIMIT="200",
        )
        os.environ.pop("CRMSYNC_BROKER_URL", None)
        ok = _steps(folder, crm_url, size, bad, base_url)
    _say(f"\nDemo {'finished' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s.")
    if keep:
        _say(f"Its files stay in {folder} (state DB: state.db, worker log: state.crmsync/worker.log).")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if ok else 1


def _steps(folder: Path, crm_url: str, size: int, bad: list[int], base_url: str) -> bool:
    import httpx

    from .jobs import embedded_worker, plan_run, replay, wait_for_run
    from .runtime import runtime
    from .state.db import migrate

    def stats() -> dict[str, Any]:
        return dict(httpx.get(base_url.removesuffix("/api/platform") + "/_sandbox/stats").json())

    def run(kind: str) -> dict[str, Any]:
        t = time.monotonic()
        before = stats()["total"]
        planned = plan_run(kind) if kind != "replay" else replay()
        result = wait_for_run(rt, planned["run_id"], alive=alive) if planned["run_id"] else {}
        c = planned["counts"]
        _say(
            f"  read {c.get('read', 0)}, sent {c.get('enqueued', 0)} "
            f"(profile {c.get('part_profile', 0)}, tags {c.get('part_tags', 0)}, fields {c.get('part_fields', 0)}), "
            f"unchanged {c.get('unchanged', 0)}; synced {result.get('synced', 0)}, "
            f"dead-lettered {result.get('dead', 0)}; "
            f"{stats()['total'] - before} API calls in {time.monotonic() - t:.1f} s"
        )
        return result

    rt = runtime()
    migrate(rt.settings.state_url)
    _say(f"Sample CRM: {size} contacts with tags and custom fields, {len(bad)} with a bad e-mail ({folder / 'crm.db'})")
    _say(f"Proto sandbox: {base_url}")
    with embedded_worker(rt) as alive:
        _say("\n1. Full sync (nightly use)")
        first = run("full")
        _say("\n2. Full sync again, nothing changed: no call should be made")
        calls = stats()["total"]
        run("full")
        unchanged_ok = stats()["total"] == calls
        _say("\n3. Incremental sync after editing 10 contacts in the CRM (near-real-time use)")
        engine = sa.create_engine(crm_url)
        now = dt.datetime(2026, 6, 1)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE contacts SET city = 'Nairobi', date_modified = :now "
                    "WHERE id IN (2, 4, 6, 8, 10, 12, 14, 16, 18, 20)"
                ),
                {"now": now},
            )
        inc = run("incremental")
        _say("\n4. Dead letters (operators' use)")
        for d in rt.store.dead_letters():
            _say(f"  #{d['id']} contact {d['provided_unique_id']}: {d['error_class']}: {d['message'][:100]}")
        fixed = bad[0]
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE contacts SET email1 = 'fixed@example.org', date_modified = :now WHERE id = :id"),
                {"id": fixed, "now": now},
            )
        engine.dispose()
        _say(f"\n5. Contact {fixed} fixed in the CRM, then every dead letter replayed")
        run("replay")
        left = rt.store.dead_letters()
        _say(
            f"  dead letters left: {len(left)} (the rows still bad in the CRM: "
            f"{', '.join(str(d['provided_unique_id']) for d in left)})"
        )
    st = rt.store.status_counts()
    _say(f"\nState: {folder / 'state.db'} — customers {', '.join(f'{k} {v}' for k, v in sorted(st.items()))}")
    customers = httpx.get(
        base_url.removesuffix("/api/platform") + "/_sandbox/customers/" + str(rt.settings.proto_subcompany_id)
    ).json()
    _say(
        f"Proto sandbox holds {len(customers)} customers; {stats()['total']} API calls in all, "
        f"429s: {stats().get('by_status', {}).get('429', 0)}"
    )
    expected = size - len(bad) + 1
    ok = (
        first.get("synced") == size - len(bad)
        and unchanged_ok
        and inc.get("synced") == 10
        and len(customers) == expected
        and len(left) == len(bad) - 1
    )
    if not ok:
        print("the demo did not end as expected: see the figures above", file=sys.stderr)
    return ok
