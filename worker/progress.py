"""Progress of long commands on stderr: a bar with rate and ETA on a terminal (rich), a plain line
every few seconds otherwise (logs, CI), nothing at all with --json (stdout stays one object)."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any

PLAIN_EVERY = 5.0


class Ticker:
    """Free-form progress lines (planning), at most one every `every` seconds."""

    def __init__(self, quiet: bool, every: float = 1.0, stream: IO[str] | None = None) -> None:
        self.quiet = quiet
        self.every = every
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self._last = 0.0

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        if self.quiet or now - self._last < self.every:
            return
        self._last = now
        print(f"[{now - self.start:6.1f}s] {text}", file=self.stream, flush=True)


class RunProgress:
    """Contacts done out of `total`, with rate and ETA."""

    def __init__(self, total: int, label: str, quiet: bool, stream: IO[str] | None = None) -> None:
        self.total = total
        self.label = label
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self._last = 0.0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> RunProgress:
        if not self.quiet and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f}/s"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[extra]}"),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, rate=0.0, extra="")
        return self

    def update(self, done: int, synced: int, dead: int) -> None:
        """Record that `done` contacts are finished (`synced` + `dead` of them so far)."""
        if self.quiet:
            return
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = done / elapsed
        extra = f"synced {synced}, dead-lettered {dead}"
        if self._bar is not None:
            self._bar.update(self._task, completed=done, rate=rate, extra=extra)
            return
        now = time.monotonic()
        if now - self._last < PLAIN_EVERY and done < self.total:
            return
        self._last = now
        eta = f"{(self.total - done) / rate:.0f} s" if rate > 0 else "?"
        print(
            f"[{elapsed:6.1f}s] {self.label}: {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%), "
            f"{rate:.1f}/s, ETA {eta}; {extra}",
            file=self.stream,
            flush=True,
        )

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
