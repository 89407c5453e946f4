"""worker.logs: one pipeline for stdlib and structlog lines, secrets redacted from every field,
JSON lines that parse, and bound context on every line of its own thread only."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import structlog

from worker import logs
from worker.errors import ConfigError, PermanentError

SECRET = "s3cret-token"


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """The stream configure_logging writes to; logging is put back as it was afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    chatty = {name: logging.getLogger(name).level for name in logs._CHATTY}
    stream = io.StringIO()
    yield stream
    logs.clear_context()
    structlog.reset_defaults()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, lvl in chatty.items():
        logging.getLogger(name).setLevel(lvl)
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line written, each parsed as one JSON object."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def raise_with_token() -> None:
    try:
        raise PermanentError(f"upsert_customer: HTTP 422: rejected Authorization {SECRET}", status=422)
    except PermanentError as exc:
        raise RuntimeError(f"sync failed ({exc})") from exc


def test_every_kind_of_line_is_emitted_as_json_without_the_secret(output: io.StringIO) -> None:
    logs.configure_logging(json=True, secrets=[SECRET], stream=output)
    stdlib = logging.getLogger("worker.sync")
    slog = logs.get_logger("worker.test")

    stdlib.warning("customer %s dead-lettered: %s", "c-1", f"token {SECRET} refused")
    slog.info("calling the API", headers={"Authorization": f"Bearer {SECRET}"}, attempt=2, tokens=[SECRET])
    try:
        raise_with_token()
    except RuntimeError:
        stdlib.exception("task failed")
        slog.exception("task failed again", error=RuntimeError(f"wrapped {SECRET}"))
    stdlib.info("sent header Authorization: Bearer abc.def to the API")
    stdlib.info("header %s", "Bearer abc.def")

    text = output.getvalue()
    assert SECRET not in text
    assert "abc.def" not in text
    parsed = lines(output)
    assert [p["event"] for p in parsed] == [
        "customer c-1 dead-lettered: token [REDACTED] refused",
        "calling the API",
        "task failed",
        "task failed again",
        "sent header Authorization: Bearer [REDACTED] to the API",
        "header Bearer [REDACTED]",
    ]
    assert parsed[1]["headers"] == {"Authorization": "Bearer [REDACTED]"}
    assert parsed[1]["tokens"] == ["[REDACTED]"]
    assert parsed[1]["attempt"] == 2  # non-text values keep their type
    for line in parsed[2:4]:
        assert "Traceback (most recent call last)" in line["exception"]
        assert "PermanentError: upsert_customer: HTTP 422: rejected Authorization [REDACTED]" in line["exception"]
    assert parsed[3]["error"] == "wrapped [REDACTED]"
    assert {p["level"] for p in parsed} == {"warning", "info", "error"}
    assert all(p["timestamp"].endswith("Z") and p["logger"] for p in parsed)


def test_the_bearer_token_of_the_settings_is_redacted_without_being_passed(
    output: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRMSYNC_PROTO_TOKEN", "tok-from-settings-7d1e")
    logs.configure_logging(json=True, stream=output)
    logging.getLogger("crmsync").error("401 with tok-from-settings-7d1e")
    assert lines(output)[0]["event"] == "401 with [REDACTED]"


def test_prose_about_bearer_tokens_is_left_readable(output: io.StringIO) -> None:
    logs.configure_logging(json=True, stream=output)
    logging.getLogger("x").warning("403: The bearer token does not grant access to this sub-company")
    assert lines(output)[0]["event"] == "403: The bearer token does not grant access to this sub-company"


def test_console_lines_are_readable_and_redacted_tracebacks_included(output: io.StringIO) -> None:
    logs.configure_logging(json=False, secrets=[SECRET], stream=output)
    try:
        raise_with_token()
    except RuntimeError:
        logging.getLogger("worker.sync").exception("task failed for %s", "c-9")
    logs.get_logger("worker.plan").info("planned", token=SECRET, auth="Bearer abc.def")

    text = output.getvalue()
    assert SECRET not in text and "abc.def" not in text
    assert "task failed for c-9" in text and "[worker.sync]" in text
    assert "Traceback (most recent call last)" in text
    assert "rejected Authorization [REDACTED]" in text
    assert "token=[REDACTED]" in text
    assert not text.lstrip().startswith("{")
    assert "\x1b[" not in text  # no colours when the stream is not a terminal


def test_bound_context_is_on_every_line_until_cleared(output: io.StringIO) -> None:
    logs.configure_logging(json=True, stream=output)
    logs.bind_context(run_id="run-1", contact_key="c-42", task_id="t-7")
    logging.getLogger("worker.sync").warning("stdlib line")
    logs.get_logger("worker.sync").info("structlog line", part="tags")
    logging.getLogger("celery.app.trace").info("celery line")
    logs.clear_context()
    logging.getLogger("worker.sync").warning("after clear")

    parsed = lines(output)
    for line in parsed[:3]:
        assert (line["run_id"], line["contact_key"], line["task_id"]) == ("run-1", "c-42", "t-7"), line
    assert "run_id" not in parsed[3]


def test_bound_context_does_not_leak_across_threads(output: io.StringIO) -> None:
    logs.configure_logging(json=True, stream=output)
    logs.bind_context(run_id="main-thread")
    barrier = threading.Barrier(3)

    def task(name: str, bind: bool) -> None:
        if bind:
            logs.bind_context(run_id=f"run-{name}", contact_key=f"key-{name}")
        for i in range(20):
            if i == 5:
                barrier.wait()  # the threads log at the same time
            logging.getLogger("worker.sync").info("line", extra={"thread_name": name})

    threads = [threading.Thread(target=task, args=(n, n != "c")) for n in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    by_thread: dict[str, list[dict[str, Any]]] = {}
    for line in lines(output):
        by_thread.setdefault(line["thread_name"], []).append(line)
    assert {k: len(v) for k, v in by_thread.items()} == {"a": 20, "b": 20, "c": 20}
    for name in ("a", "b"):
        assert {(x["run_id"], x["contact_key"]) for x in by_thread[name]} == {(f"run-{name}", f"key-{name}")}
    assert all("run_id" not in x and "contact_key" not in x for x in by_thread["c"])


def test_a_pool_thread_reused_by_the_next_task_starts_clean_after_clear_context(output: io.StringIO) -> None:
    logs.configure_logging(json=True, stream=output)

    def task(key: str | None) -> None:
        logs.clear_context()
        if key:
            logs.bind_context(contact_key=key)
        logging.getLogger("worker.sync").info("task")

    with ThreadPoolExecutor(max_workers=1) as pool:  # one thread: every task reuses it, as Celery's pool does
        for key in ("k-1", None, "k-3"):
            pool.submit(task, key).result()

    assert [line.get("contact_key") for line in lines(output)] == ["k-1", None, "k-3"]


def test_reconfiguring_replaces_the_handler_and_honours_the_level(output: io.StringIO) -> None:
    logs.configure_logging(json=True, stream=io.StringIO())
    logs.configure_logging(json=True, level="warning", stream=output)
    logging.getLogger("worker").info("dropped")
    logs.get_logger("worker").info("dropped too")
    logging.getLogger("worker").warning("kept")
    logging.getLogger("httpx").info("HTTP Request: PUT ... 200 OK")
    assert [line["event"] for line in lines(output)] == ["kept"]


def test_unknown_level_is_a_config_error(output: io.StringIO) -> None:
    with pytest.raises(ConfigError, match="VERBOSE"):
        logs.configure_logging(json=True, level="VERBOSE", stream=output)


def test_celery_is_told_to_leave_logging_alone(output: io.StringIO) -> None:
    from celery import signals

    logs.configure_logging(json=True, stream=output)
    # Celery configures logging only when no receiver answers this signal.
    answered = signals.setup_logging.send(sender=None, loglevel=logging.INFO, logfile=None, format="", colorize=False)
    assert answered


def test_redact_is_usable_on_its_own() -> None:
    logs.add_secrets("another-secret-99")
    assert logs.redact("x another-secret-99 y Bearer eyJhbGciOi.J9.sig==") == "x [REDACTED] y Bearer [REDACTED]"
