"""The resources a process shares among its threads: settings, state DB, Proto client, limiter.

Built once per process, lazily, so that a command that needs no API never builds a client.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .errors import ConfigError
from .logs import add_secrets, redact
from .proto import Breaker, Limiter, LocalBreaker, LocalLimiter, ProtoClient, RedisBreaker, RedisLimiter, RetryPolicy
from .settings import Settings, load_settings
from .state.db import MIGRATIONS, schema_is_current, state_engine
from .state.store import StateStore


class Runtime:
    """Per-process resources built from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Known to the one redactor before anything can fail: what this process prints, logs or
        # records in the state DB never carries the token.
        add_secrets(settings.proto_token.get_secret_value() if settings.proto_token else None)
        self._fields: dict[str, str] = {}
        self._fields_lock = threading.Lock()

    @cached_property
    def store(self) -> StateStore:
        """The state database, checked once to be at the latest migration."""
        engine = state_engine(self.settings.state_url)
        try:
            # The usual answer (at the one head) without importing Alembic; any other answer from Alembic.
            current = at_latest_migration(engine) or schema_is_current(engine)
        except sa.exc.SQLAlchemyError as exc:
            raise ConfigError(
                f"setting CRMSYNC_STATE_URL: cannot use the state database ({_first_line(exc)})"
            ) from None
        if not current:
            where = redact(engine.url.render_as_string(hide_password=False))
            raise ConfigError(f"the state database {where} is not initialised or not up to date: run `crmsync init`")
        return StateStore(engine, degraded_threshold=self.settings.degraded_threshold)

    @cached_property
    def redis(self) -> Any:
        """A Redis client on the broker when the broker is Redis, else None."""
        url = self.settings.broker_url
        if url and url.startswith(("redis://", "rediss://")):
            import redis

            return redis.Redis.from_url(url)
        return None

    @cached_property
    def limiter(self) -> Limiter:
        """Shared through Redis when the broker is Redis, else local to this process."""
        s = self.settings
        if self.redis is not None:
            s.require("proto_subcompany_id")
            return RedisLimiter(self.redis, str(s.proto_subcompany_id), s.rate_limit, s.rate_burst)
        return LocalLimiter(s.rate_limit, s.rate_burst)

    @cached_property
    def breaker(self) -> Breaker:
        """The circuit breaker: shared through Redis like the limiter."""
        if self.redis is not None:
            return RedisBreaker(self.redis, str(self.settings.proto_subcompany_id))
        return LocalBreaker()

    @cached_property
    def client(self) -> ProtoClient:
        """The Proto client of this process (one connection pool, keep-alive)."""
        s = self.settings
        s.require("proto_subcompany_id", "proto_token")
        assert s.proto_token is not None and s.proto_subcompany_id is not None
        return ProtoClient(
            s.proto_base_url,
            s.proto_subcompany_id,
            s.proto_token.get_secret_value(),
            limiter=self.limiter,
            breaker=self.breaker,
            retry=self.retry_policy(),
            timeout=s.request_timeout,
            token_setting=token_setting(s),
        )

    def retry_policy(self) -> RetryPolicy:
        """How API calls are retried in this process."""
        return RetryPolicy(max_attempts=self.settings.max_attempts)

    def check_timing(self) -> None:
        """Refuse to start a worker whose tasks could outlive the broker's visibility timeout.

        Redis hands a task that is not acknowledged within the visibility timeout to another
        worker: a task that may run (retries and waits included) longer would run twice.
        """
        s = self.settings
        policy = self.retry_policy()
        # Three calls per task, each at worst its error backoff plus its time on hold.
        worst = 3 * (policy.longest_delay() + policy.max_held + s.max_attempts * s.request_timeout)
        if worst > s.task_time_limit:
            raise ConfigError(
                f"setting CRMSYNC_TASK_TIME_LIMIT ({s.task_time_limit} s) is below the longest a task may "
                f"take with CRMSYNC_MAX_ATTEMPTS={s.max_attempts} and CRMSYNC_REQUEST_TIMEOUT={s.request_timeout:g} "
                f"({worst:.0f} s): raise it, or lower those"
            )
        if not s.embedded_broker and s.visibility_timeout < s.task_time_limit + 60:
            raise ConfigError(
                f"setting CRMSYNC_VISIBILITY_TIMEOUT ({s.visibility_timeout} s) must exceed "
                f"CRMSYNC_TASK_TIME_LIMIT ({s.task_time_limit} s) by a minute at least, or Redis would "
                "deliver a running task a second time"
            )

    def field_id(self, name: str) -> str | None:
        """The Proto id of a custom field, from a process cache refilled from the registry on a miss."""
        with self._fields_lock:
            if name not in self._fields:
                self._fields = self.store.field_ids()
            return self._fields.get(name)

    def forget_field_ids(self) -> None:
        """Drop the cache of custom-field ids: the next lookup reads the registry again."""
        with self._fields_lock:
            self._fields = {}

    def close(self) -> None:
        """Release what was built: the API client's connections, the state DB's pool, Redis."""
        built = self.__dict__
        if "client" in built:
            built["client"].close()
        if "store" in built:
            built["store"].engine.dispose()
        if built.get("redis") is not None:
            built["redis"].close()


def token_setting(s: Settings) -> str:
    """The setting the bearer token came from, for a message that must name it (never the token)."""
    path = s.proto_token_file
    if path is not None and s.proto_token is not None:
        # CRMSYNC_PROTO_TOKEN, when set, wins over the file: the file is the source if it holds this token.
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if path.read_text().strip() == s.proto_token.get_secret_value():
                return f"CRMSYNC_PROTO_TOKEN_FILE ({path})"
    return "CRMSYNC_PROTO_TOKEN"


def at_latest_migration(engine: sa.Engine, versions: Path = MIGRATIONS / "versions") -> bool:
    """True when the state DB records exactly the one head revision of the migration scripts.

    The same verdict as `worker.state.db.schema_is_current` when it is True, for a fraction of its
    cost: Alembic's import alone is about 0.1 s of CPU, paid by every worker and command at start.
    False means "not sure": no version table, another revision, several heads, a script whose
    revision is not a plain literal. The caller then asks Alembic, which has the last word.
    """
    head = _script_head(versions)
    if head is None:
        return False
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return False
        recorded = list(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())
    return recorded == [head]


@functools.cache
def _script_head(versions: Path) -> str | None:
    """The one head revision of the scripts in `versions` (as Alembic finds them), or None if unsure."""
    revisions: set[str] = set()
    parents: set[str] = set()
    try:
        scripts = sorted(p for p in versions.iterdir() if p.name.endswith(".py") and p.is_file())
    except OSError:
        return None
    for path in scripts:
        if path.name.startswith(("__init__", ".#")):  # what Alembic skips too
            continue
        found = _literals(path, ("revision", "down_revision"))
        revision, down = found.get("revision"), found.get("down_revision", ...)
        if not isinstance(revision, str) or down is ...:
            return None
        revisions.add(revision)
        if isinstance(down, str):
            parents.add(down)
        elif isinstance(down, tuple | list) and all(isinstance(d, str) for d in down):
            parents.update(down)
        elif down is not None:
            return None
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _literals(path: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """The `name = <literal>` assignments of a script, for those of `names` assigned exactly once in it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (OSError, SyntaxError, ValueError):
        return {}
    values: dict[str, list[Any]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            pairs = [(target, node.value) for target in node.targets]
        elif isinstance(node, ast.AnnAssign | ast.AugAssign) and node.value is not None:
            pairs = [(node.target, node.value)]
        else:
            continue
        for target, value in pairs:
            if isinstance(target, ast.Name) and target.id in names:
                try:
                    values.setdefault(target.id, []).append(ast.literal_eval(value))
                except (ValueError, TypeError, SyntaxError, RecursionError):
                    values.setdefault(target.id, []).extend([None, None])  # not a literal: unsure
    return {name: found[0] for name, found in values.items() if len(found) == 1}


def _first_line(exc: Exception) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).strip().splitlines()[0][:200]


_RUNTIME: Runtime | None = None


def runtime() -> Runtime:
    """This process's Runtime, built on first use."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = Runtime(load_settings())
    return _RUNTIME


def close_runtime() -> None:
    """Release this process's Runtime, if one was built (the next `runtime()` builds another)."""
    global _RUNTIME
    rt, _RUNTIME = _RUNTIME, None
    if rt is not None:
        rt.close()
