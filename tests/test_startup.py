"""What a process spends around its work: a worker's and a command's start-up, and `sync --wait`'s end.

Workers are started with the `sync` command that feeds them, so every tenth of a second of CPU a
process spends starting delays the run's first API call. These tests hold what keeps it short: a
worker built through Celery's API (not its command line), the state DB's schema check without
Alembic when the DB is current (and still refusing one that is not), the wait that notices a run's
last contact at once, and a command that closes its connections on the way out.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import SUBCOMPANY, TOKEN
from worker.errors import ConfigError
from worker.jobs import next_poll, wait_for_run
from worker.runtime import Runtime, _script_head, at_latest_migration
from worker.settings import Settings
from worker.state.db import MIGRATIONS, alembic_config, state_engine

READY_TIMEOUT = 60.0


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRMSYNC_")}
    env.update(CRMSYNC_PROTO_SUBCOMPANY_ID=SUBCOMPANY, CRMSYNC_PROTO_TOKEN=TOKEN, **settings)
    return env


def _migrated_to(url: str, revision: str) -> str:
    from alembic import command

    command.upgrade(alembic_config(url), revision)
    return url


# -- the state DB's schema check ---------------------------------------------------------------------


def test_a_current_state_db_is_recognised_without_importing_alembic(sqlite_state: str) -> None:
    code = (
        "import sys; from worker.runtime import Runtime; from worker.settings import Settings; "
        f"Runtime(Settings(state_url={sqlite_state!r})).store; print('alembic' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_state_db_behind_the_scripts_or_empty_is_refused(tmp_path: Path) -> None:
    behind = _migrated_to(f"sqlite:///{tmp_path / 'behind.db'}", "0001")
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    for url in (behind, empty):
        assert not at_latest_migration(state_engine(url))
        with pytest.raises(ConfigError, match="not initialised or not up to date: run `crmsync init`"):
            Runtime(Settings(state_url=url)).store  # noqa: B018


def test_the_head_is_found_in_the_scripts_as_alembic_finds_it(tmp_path: Path) -> None:
    from alembic.script import ScriptDirectory

    real = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert _script_head(MIGRATIONS / "versions") == real

    def scripts(name: str, **files: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for filename, text in files.items():
            (folder / filename).write_text(text)
        return folder

    chain = 'revision = "a"\ndown_revision = None\n', 'revision = "b"\ndown_revision = "a"\n'
    assert _script_head(scripts("chain", **{"1.py": chain[0], "2.py": chain[1], "notes.txt": "x"})) == "b"
    merge = 'revision = "m"\ndown_revision = ("b", "c")\n'
    branch = 'revision = "c"\ndown_revision = "a"\n'
    assert _script_head(scripts("merged", **{"1.py": chain[0], "2.py": chain[1], "3.py": branch, "4.py": merge})) == "m"
    assert _script_head(scripts("two_heads", **{"1.py": chain[0], "2.py": chain[1], "3.py": branch})) is None
    # Not sure, so Alembic decides: a revision computed at import, or assigned twice.
    computed = 'revision = "b".upper()\ndown_revision = "a"\n'
    assert _script_head(scripts("computed", **{"1.py": chain[0], "2.py": computed})) is None
    twice = chain[1] + 'if True:\n    revision = "z"\n'
    assert _script_head(scripts("twice", **{"1.py": chain[0], "2.py": twice})) is None
    # Files Alembic does not load either.
    ignored = {"1.py": chain[0], "2.py": chain[1], "__init__.py": 'revision = "i"\ndown_revision = "b"\n'}
    ignored[".#3.py"] = 'revision = "e"\ndown_revision = "b"\n'
    assert _script_head(scripts("ignored", **ignored)) == "b"


def test_a_db_at_the_head_of_other_scripts_is_not_taken_for_current(tmp_path: Path) -> None:
    url = _migrated_to(f"sqlite:///{tmp_path / 'state.db'}", "head")
    engine = state_engine(url)
    assert at_latest_migration(engine)
    newer = tmp_path / "newer"
    newer.mkdir()
    for script in (MIGRATIONS / "versions").glob("*.py"):
        (newer / script.name).write_text(script.read_text())
    head = _script_head(MIGRATIONS / "versions")
    (newer / "9999_next.py").write_text(f'revision = "9999"\ndown_revision = "{head}"\n')
    assert not at_latest_migration(engine, newer)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM alembic_version"))
    assert not at_latest_migration(engine)


# -- the worker ----------------------------------------------------------------------------------------


@pytest.fixture
def worker_proc(tmp_path: Path) -> Iterator[Any]:
    """Start `crmsync worker` processes (with `python -X importtime`); stop them all at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"worker-{len(procs)}.log"
        with open(log, "wb") as out:
            argv = [sys.executable, "-X", "importtime", "-m", "worker.cli", "worker", *args]
            procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=out, start_new_session=True))
        return procs[-1], log

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _wait_ready(proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if " ready." in text:
            return text
        assert proc.poll() is None, text[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"the worker was not ready within {READY_TIMEOUT:.0f} s")


@pytest.mark.services
def test_a_worker_serves_both_queues_in_order_on_threads_and_imports_neither_celerys_cli_nor_alembic(
    redis_url: str, sqlite_state: str, worker_proc: Any
) -> None:
    from worker.celery_app import create_app

    proc, log = worker_proc(_env(CRMSYNC_BROKER_URL=redis_url, CRMSYNC_STATE_URL=sqlite_state), "--concurrency", "3")
    imports = _wait_ready(proc, log)
    app = create_app(Settings(broker_url=redis_url, state_url=sqlite_state))
    hostname = f"crmsync-{proc.pid}@{socket.gethostname()}"  # other tests' workers may share the broker
    inspect = app.control.inspect([hostname], timeout=5.0)
    queues = inspect.active_queues() or {}
    stats = inspect.stats() or {}
    assert list(queues) == [hostname]
    assert [q["name"] for q in queues[hostname]] == ["crmsync.priority", "crmsync.bulk"]  # priority first
    assert stats[hostname]["pool"]["max-concurrency"] == 3
    assert "thread" in stats[hostname]["pool"]["implementation"]
    # What `celery worker` would have cost: its command line (every subcommand, the amqp shell's
    # prompt_toolkit and pygments), and Alembic for a state DB that is current.
    assert "| celery.bin" not in imports and "| click_repl" not in imports
    assert "| alembic" not in imports
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0


@pytest.mark.services
def test_a_worker_refuses_to_start_on_a_state_db_behind_the_scripts(
    redis_url: str, tmp_path: Path, worker_proc: Any
) -> None:
    url = _migrated_to(f"sqlite:///{tmp_path / 'behind.db'}", "0001")
    proc, log = worker_proc(_env(CRMSYNC_BROKER_URL=redis_url, CRMSYNC_STATE_URL=url))
    assert proc.wait(60) == 2
    assert "not initialised or not up to date: run `crmsync init`" in log.read_text(errors="replace")


# -- the end of `sync --wait` --------------------------------------------------------------------------


def test_the_wait_notices_the_last_contact_of_a_run_at_once(sqlite_state: str) -> None:
    rt = Runtime(Settings(state_url=sqlite_state))  # no broker: the embedded one, nothing to reconcile
    run_id = rt.store.start_run("full")
    keys = [f"k{i}" for i in range(60)]
    rt.store.mark_queued(run_id, [(k, None) for k in keys])
    rt.store.update_run(run_id, status="running")  # planned: a run still being planned is not waited out
    last_done: list[float] = []

    def work() -> None:  # 20 contacts/s for 3 s, as workers would sync them
        for key in keys:
            time.sleep(0.05)
            rt.store.record_outcome(key, run_id, "synced", {"profile": "h"}, None)
        last_done.append(time.monotonic())

    threading.Thread(target=work, daemon=True).start()
    seen: list[dict[str, int]] = []
    run = wait_for_run(rt, run_id, seen.append, poll=1.0)
    returned = time.monotonic()
    assert run["status"] == "finished" and run["synced"] == 60
    # Read every second, the end would be seen up to a second late; near the end it is read more often.
    assert returned - last_done[0] < 0.3, returned - last_done[0]
    assert len(seen) < 30  # and not all along


def test_the_poll_quickens_only_near_the_end_and_never_keeps_the_db_busy() -> None:
    assert next_poll(1000, 16.0, query_seconds=0.001, poll=0.2, min_poll=0.02) == 0.2  # a minute left
    assert next_poll(5, 0.0, query_seconds=0.001, poll=0.2, min_poll=0.02) == 0.2  # no rate seen yet
    assert next_poll(4, 16.0, query_seconds=0.001, poll=0.2, min_poll=0.02) == pytest.approx(0.125)
    assert next_poll(1, 16.0, query_seconds=0.001, poll=0.2, min_poll=0.02) == pytest.approx(0.03125)
    assert next_poll(1, 1000.0, query_seconds=0.001, poll=0.2, min_poll=0.02) == 0.02
    # A progress query that takes 0.3 s (a run of millions) is never asked more than a third of the time.
    assert next_poll(1, 16.0, query_seconds=0.3, poll=0.2, min_poll=0.02) == pytest.approx(0.6)


# -- a command's exit ------------------------------------------------------------------------------------


def test_a_command_closes_its_state_db_on_exit_and_leaves_the_collector_on(
    sqlite_state: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Path(sqlite_state.removeprefix("sqlite:///"))
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status", "--json"],
        env=_env(CRMSYNC_STATE_URL=sqlite_state),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # The last connection closed, SQLite folded its write-ahead log into the file and removed it.
    assert not db.with_name(db.name + "-wal").exists()

    # In this process: the collector, off while the command started, is on again after it.
    from worker.cli import main

    monkeypatch.setenv("CRMSYNC_STATE_URL", sqlite_state)
    try:
        assert main(["status", "--json"]) == 0
        assert gc.isenabled()
    finally:
        gc.unfreeze()
    assert '"runs": []' in capsys.readouterr().out
