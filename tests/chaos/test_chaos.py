"""Chaos at a reduced size: each test is a whole deployment on real processes, damaged mid-run.

Each asserts, once the run is over: Proto holds exactly the source's valid contacts (profile,
tags, custom fields), nothing twice (customers, custom fields, tickets), only the planted bad
rows are dead-lettered, every contact is synced or dead-lettered in the state DB, and the
bearer token is in no file and no stored error. `bench/chaos.py` runs the same scenarios at
full size and reports their figures (RELIABILITY.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos import harness
from tests.chaos.harness import Cluster, Figures

pytestmark = [pytest.mark.chaos, pytest.mark.services]

CONTACTS = 120
BAD_ROWS = 3


def held(fig: Figures) -> None:
    """Print the figures (shown by `pytest -s`, and in the failure report) and assert they hold."""
    print(fig.line(), flush=True)
    assert fig.ok, fig.line()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A fresh deployment: PostgreSQL CRM and state DB, Redis, a sandbox, two workers."""
    with harness.cluster(tmp_path, contacts=CONTACTS, bad_rows=BAD_ROWS) as c:
        yield c


def test_sigkilled_workers_lose_and_duplicate_nothing(cluster: Cluster) -> None:
    held(harness.scenario_kill(cluster, kills=5))


def test_the_reconciler_resends_tasks_lost_when_redis_is_flushed(cluster: Cluster) -> None:
    fig = harness.scenario_flushdb(cluster, at=0.3)
    held(fig)
    assert fig.reconciled > 0, "the flush lost no task: nothing tested the reconciler"


def test_an_api_outage_holds_work_and_the_run_resumes(cluster: Cluster) -> None:
    fig = harness.scenario_outage(cluster, at=0.3, outage=4.0)
    held(fig)
    assert fig.faults["503"] > 0


def test_5xx_429_and_dropped_connections_over_the_whole_run(cluster: Cluster) -> None:
    # A third worker logging at DEBUG: the most a log says, for the token check.
    cluster.wait_ready([cluster.start_worker("DEBUG")])
    fig = harness.scenario_noisy(cluster)
    held(fig)


def test_two_beats_at_once_schedule_as_one(cluster: Cluster) -> None:
    held(harness.scenario_two_beats(cluster))


def test_the_token_is_in_no_log_or_output_of_the_suite() -> None:
    """Runs last in this module: every file every cluster of this session wrote."""
    if not harness.ALL_WORKDIRS:
        pytest.skip("no chaos scenario ran in this session")
    assert harness.token_leaks(harness.ALL_WORKDIRS) == []
