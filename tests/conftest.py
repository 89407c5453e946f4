"""Fixtures on real parts: databases on three dialects, real Redis, the sandbox over HTTP.

PostgreSQL, MariaDB and Redis are expected on 127.0.0.1 (`.ci/run` and `scripts/services.sh`
start them); each test gets databases of its own and drops them afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import sqlalchemy as sa

from worker.sandbox import DEFAULT_SUBCOMPANY_ID, sandbox_process

if TYPE_CHECKING:
    from tests.test_sync_flow import Harness

PG_ADMIN = os.environ.get("CRMSYNC_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MARIADB_ADMIN = os.environ.get("CRMSYNC_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/")
REDIS_URL = os.environ.get("CRMSYNC_TEST_REDIS", "redis://127.0.0.1:6379/13")
SUBCOMPANY = DEFAULT_SUBCOMPANY_ID
TOKEN = "test-secret-5c1e0d7a9b"  # a constant: `conftest` and `tests.conftest` are two imports

DIALECTS = ["sqlite", "postgresql", "mariadb"]


def _admin_url(dialect: str) -> str:
    return PG_ADMIN if dialect == "postgresql" else MARIADB_ADMIN


def make_database(dialect: str, tmp_path: Path) -> Iterator[str]:
    """Create an empty database of `dialect`; yield its URL; drop it afterwards."""
    if dialect == "sqlite":
        yield f"sqlite:///{tmp_path / ('db-' + uuid.uuid4().hex[:8] + '.sqlite')}"
        return
    name = "crmsync_t_" + uuid.uuid4().hex[:10]
    admin = sa.create_engine(_admin_url(dialect), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    if dialect == "postgresql":
        url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    else:
        url = MARIADB_ADMIN.rstrip("/") + "/" + name + "?charset=utf8mb4"
    try:
        yield url
    finally:
        sa.create_engine(url).dispose()
        with admin.connect() as conn:
            if dialect == "postgresql":
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture(params=DIALECTS)
def source_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty source database, once per dialect (SQLite, PostgreSQL, MariaDB)."""
    yield from make_database(request.param, tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, migrated state database on SQLite and on PostgreSQL."""
    from worker.state.db import migrate

    for url in make_database(request.param, tmp_path):
        migrate(url)
        yield url


@pytest.fixture
def sqlite_state(tmp_path: Path) -> str:
    """A migrated SQLite state database."""
    from worker.state.db import migrate

    url = f"sqlite:///{tmp_path / 'state.db'}"
    migrate(url)
    return url


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real Redis database, emptied before and after the test."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


class Sandbox:
    """The sandbox as tests see it: its base URL and its inspection routes."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.root = base_url.removesuffix("/api/platform")
        self.http = httpx.Client(base_url=self.root, timeout=10)

    def customers(self) -> dict[str, dict[str, Any]]:
        """Stored customers by provided_unique_id."""
        rows = self.http.get(f"/_sandbox/customers/{SUBCOMPANY}").json()
        return {c["provided_unique_id"]: c for c in rows}

    def stats(self) -> dict[str, Any]:
        """Request counts."""
        return dict(self.http.get("/_sandbox/stats").json())

    def calls(self) -> int:
        """API requests so far."""
        return int(self.stats()["total"])

    def faults(self, **values: Any) -> None:
        """Change fault injection while it runs."""
        self.http.post("/_sandbox/faults", json=values).raise_for_status()

    def reset(self) -> None:
        """Forget customers, fields, tickets and stats; no faults, no rate limit."""
        self.http.post("/_sandbox/reset").raise_for_status()
        self.faults(
            fail_rate=0, drop_rate=0, throttle_rate=0, latency_ms=0, jitter_ms=0, outage=False, rate_limit=0, burst=None
        )


@pytest.fixture(scope="session")
def _sandbox_server() -> Iterator[Sandbox]:
    args = ("--subcompany-id", SUBCOMPANY, "--token", TOKEN, "--rate-limit", "0")
    with sandbox_process(*args) as base_url:
        box = Sandbox(base_url)
        yield box
        box.http.close()


@pytest.fixture
def sandbox(_sandbox_server: Sandbox) -> Sandbox:
    """The session's sandbox process, reset for this test."""
    _sandbox_server.reset()
    return _sandbox_server


@pytest.fixture
def crm_env(sandbox: Sandbox, tmp_path: Path) -> dict[str, str]:
    """CRMSYNC_ settings pointing at the sandbox, for a subprocess or for monkeypatching."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_")}
    env.update(
        CRMSYNC_PROTO_BASE_URL=sandbox.base_url,
        CRMSYNC_PROTO_SUBCOMPANY_ID=SUBCOMPANY,
        CRMSYNC_PROTO_TOKEN=TOKEN,
        CRMSYNC_RATE_LIMIT="500",
        CRMSYNC_STATE_URL=f"sqlite:///{tmp_path / 'state.db'}",
    )
    return env


@pytest.fixture
def harness_on(sandbox: Sandbox, sqlite_state: str, tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """Builds the planner harness of `test_sync_flow` on any source URL (one of `source_url`'s
    dialects, say), a mapping text and settings, over the sandbox and one SQLite state DB.

    Harnesses built in one test share that state DB: a second one on the same source with other
    connection settings (a session time zone) plans on from where the first left off. Their
    source connections and API clients are closed afterwards.
    """
    from tests.crm import MAPPING, write_mapping
    from tests.test_sync_flow import Harness
    from worker.runtime import Runtime
    from worker.settings import Settings

    built: list[Harness] = []

    def build(source_url: str, mapping: str = MAPPING, **settings: Any) -> Harness:
        folder = tmp_path / f"harness-{len(built)}"
        folder.mkdir()
        values: dict[str, Any] = dict(
            source_url=source_url,
            state_url=sqlite_state,
            mapping=write_mapping(folder, mapping),
            proto_base_url=sandbox.base_url,
            proto_subcompany_id=SUBCOMPANY,
            proto_token=TOKEN,
            rate_limit=1000,
        )
        harness = Harness(Runtime(Settings(**(values | settings))))
        built.append(harness)
        return harness

    yield build
    for harness in built:
        harness.planner.reader.engine.dispose()
        if "crm_engine" in harness.__dict__:
            harness.crm_engine.dispose()
        if "client" in harness.rt.__dict__:  # built lazily: close it only if a call built it
            harness.rt.client.close()
        if "store" in harness.rt.__dict__:
            harness.rt.store.engine.dispose()
