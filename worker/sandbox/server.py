"""Serving the sandbox: in the foreground for the CLI, in a process of its own, or in a thread."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import uvicorn

from ..errors import CrmsyncError
from .app import create_app
from .config import API_BASE_PATH, SandboxConfig
from .limits import DroppedConnection

STARTUP_TIMEOUT = 15.0
SHUTDOWN_TIMEOUT = 10.0


class _QuietDrops(logging.Filter):
    """Hide uvicorn's traceback for connections the sandbox drops on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DroppedConnection)


class _SandboxServer(uvicorn.Server):
    """A uvicorn server that returns from run() after SIGTERM/SIGINT.

    Plain uvicorn re-raises the signal once shut down (a KeyboardInterrupt for SIGINT, death
    by SIGTERM); a sandbox that has closed cleanly should just return to its caller.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()


def _server(config: SandboxConfig, host: str, port: int) -> _SandboxServer:
    uv_config = uvicorn.Config(
        create_app(config),
        host=host,
        port=port,
        log_level="warning",
        # uvicorn's lines go to the root logger: through worker.logs, like every crmsync line.
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    # After uvicorn.Config: it sets its loggers' levels when built, and must not wipe the filter.
    error_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietDrops) for f in error_log.filters):
        error_log.addFilter(_QuietDrops())
    return _SandboxServer(uv_config)


def serve(config: SandboxConfig, host: str = "127.0.0.1", port: int = 8700) -> None:
    """Serve the sandbox until SIGTERM or SIGINT, then return."""
    _server(config, host, port).run()


@contextlib.contextmanager
def running_sandbox(config: SandboxConfig) -> Iterator[str]:
    """Run the sandbox on a free local port in a thread; yield its API base URL.

    The URL ends in /api/platform, like the vendor's; the /_sandbox routes are beside it.
    The socket is bound here, before the thread starts, so no other process can take the port.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _server(config, "127.0.0.1", port)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"crmsync-sandbox-{port}", daemon=True
    )
    thread.start()
    try:
        _wait_until_up(f"http://127.0.0.1:{port}", thread.is_alive)
        yield f"http://127.0.0.1:{port}{API_BASE_PATH}"
    finally:
        server.should_exit = True
        thread.join(SHUTDOWN_TIMEOUT)
        sock.close()


@contextlib.contextmanager
def sandbox_process(*args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `crmsync sandbox` as a process of its own on a free port; yield its API base URL.

    A process of its own serves far faster than a thread beside a busy client (no shared GIL),
    so the demo, the end-to-end tests and the benchmarks use this.
    """
    with sandbox_subprocess(*args, env=env) as (base_url, _):
        yield base_url


@contextlib.contextmanager
def sandbox_subprocess(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """:func:`sandbox_process`, yielding the process too (the benchmarks read its CPU time)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "sandbox", "--port", str(port), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_until_up(f"http://127.0.0.1:{port}", lambda: proc.poll() is None)
        yield f"http://127.0.0.1:{port}{API_BASE_PATH}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_up(root: str, alive: Callable[[], bool]) -> None:
    """Block until GET /_sandbox/stats answers; fail if the server dies or takes too long."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    # trust_env=False: a proxy from the environment must not stand between us and 127.0.0.1.
    with httpx.Client(trust_env=False, timeout=1.0) as client:
        while time.monotonic() < deadline:
            if not alive():
                raise CrmsyncError("the sandbox server stopped while starting")
            try:
                if client.get(f"{root}/_sandbox/stats").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.02)
    raise CrmsyncError(f"the sandbox did not answer within {STARTUP_TIMEOUT:.0f} s")
