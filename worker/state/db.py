"""Connecting to the state database and bringing its schema to the latest migration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from ..errors import ConfigError
from ..sqlkeys import binary_arrays

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
CONNECT_TIMEOUT = 10  # seconds to open a connection to a PostgreSQL state DB


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the planner read while worker threads write; the timeout rides out short locks.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def state_engine(url: str, **options: Any) -> Engine:
    """An engine for the state DB; SQLite gets WAL mode and a busy timeout."""
    try:
        if url.startswith("sqlite"):
            path = url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                try:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ConfigError(
                        f"setting CRMSYNC_STATE_URL: cannot create the folder of the SQLite file ({exc.strerror})"
                    ) from None
            engine = sa.create_engine(url, connect_args={"timeout": 30}, **options)
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        options.setdefault("pool_pre_ping", True)
        parsed = sa.make_url(url)
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            # libpq waits for ever on a server that drops packets: a bounded connect keeps
            # `sync --wait`'s outage handling (and every worker) in control of its own waiting.
            options.setdefault("connect_args", {}).setdefault("connect_timeout", CONNECT_TIMEOUT)
        if "poolclass" not in options:
            options.update(pool_size=10, max_overflow=20)
        return binary_arrays(sa.create_engine(url, **options))
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise ConfigError(f"setting CRMSYNC_STATE_URL: not a usable database URL ({exc})") from None


def sessions(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Any:
    """The Alembic configuration for `url`, pointing at the project's migrations."""
    from alembic.config import Config

    if not (MIGRATIONS / "env.py").exists():
        raise ConfigError(f"the migrations folder is missing ({MIGRATIONS}); install crmsync from its repository")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str) -> str:
    """Upgrade the state DB at `url` to the latest migration; returns the revision reached."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    command.upgrade(alembic_config(url), "head")
    engine = state_engine(url)
    with engine.connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
    engine.dispose()
    return rev or "base"


def schema_is_current(engine: Engine) -> bool:
    """True when the state DB is at the latest migration."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() == head
