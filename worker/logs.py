"""Logging of crmsync: structlog and stdlib logging through one pipeline, with secrets redacted.

:func:`configure_logging` sends every log line of the process, whether it comes from a
structlog logger or from the standard library (Celery, uvicorn, httpx, our own
``logging.getLogger(__name__)``), through the same processors to one handler on stderr:

- JSON, one object per line, in production (``json=True``): ``timestamp`` (UTC ISO),
  ``level``, ``logger``, ``event`` (the message), the bound context, any extra fields, and
  ``exception`` (the formatted traceback) when there is one;
- readable ``key=value`` lines on a terminal (``json=False``).

Before a line is rendered, every field (nested ones, exception text and tracebacks included)
has the configured secrets, anything that looks like ``Bearer <token>``, the password of any
URL (``scheme://user:password@host``) and credential parameters of a query string
(``?password=...``) replaced by ``[REDACTED]``; the rendered line is checked once more. The
secrets are the Proto bearer token of the settings (when they load), the token of every
``ProtoClient`` built, and anything passed in `secrets` or to :func:`add_secrets`.
:func:`redact` is the same redactor for text that is not logged (what a command prints, what
the state DB records): the project has this one.

Context: :func:`bind_context` binds key/values (run_id, contact key, task_id...) that every
line logged afterwards *in the same thread* carries, until :func:`clear_context`. It rests on
contextvars, which are per thread: Celery's threads pool reuses its threads, so a task clears
the context before binding its own.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from .errors import ConfigError

REDACTED = "[REDACTED]"
# `Bearer <token>` (RFC 6750 token characters), but not prose such as "the bearer token".
_BEARER = r"(?P<scheme>\b(?i:bearer))\s+(?!(?i:tokens?|auth\w*|scheme)\b)[A-Za-z0-9\-._~+/]+=*"
# The password of a URL's userinfo; the user stays (it names the account, it opens nothing). The
# password runs to the last `@` before the path, or, when it holds a `/` itself (SQLAlchemy reads
# it so), to the first `@`: either way nothing of it is left in the text.
_URL_PASSWORD = r"(?P<userinfo>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*):(?:[^\s/?#]*|[^\s@]*)@"
# Credentials given as query parameters (redis://host?password=..., https://host/?access_token=...).
_URL_PARAM = r"(?P<param>[?&;](?i:password|passwd|pwd|secret|token|access_token|api_key|apikey)=)[^&;#\s]*"
_PATTERNS = (_BEARER, _URL_PASSWORD, _URL_PARAM)
_MAX_DEPTH = 8
# Libraries that log at INFO once per HTTP request (one line per API call is the metrics' job),
# and alembic's plugin registry, which lists its plugins at every start.
_CHATTY = ("httpx", "httpcore", "alembic.runtime.plugins")


class Redactor:
    """Replaces secrets, bearer credentials and URL passwords in text, and in every field of an event."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: frozenset[str] = frozenset()
        self._pattern = re.compile("|".join(_PATTERNS))
        self.add(*secrets)

    def add(self, *secrets: str | None) -> None:
        """Redact these too (empty ones are ignored)."""
        with self._lock:
            merged = self._secrets | {s for s in secrets if s}
            if merged == self._secrets:
                return
            # Longest first: a secret that contains another is replaced whole.
            alternatives = [re.escape(s) for s in sorted(merged, key=len, reverse=True)]
            self._pattern = re.compile("|".join([*alternatives, *_PATTERNS]))
            self._secrets = merged

    def text(self, text: str) -> str:
        """`text` with every secret, bearer credential and URL password replaced."""
        return self._pattern.sub(_replacement, text)

    def value(self, value: Any, depth: int = 0) -> Any:
        """`value` with secrets replaced in every string it holds; other values kept as they are."""
        if isinstance(value, str):
            return self.text(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if depth < _MAX_DEPTH:
            if isinstance(value, dict):
                return {self.value(k, depth + 1): self.value(v, depth + 1) for k, v in value.items()}
            if isinstance(value, list | tuple | set | frozenset):
                items = [self.value(v, depth + 1) for v in value]
                return tuple(items) if isinstance(value, tuple) else items
        # Anything else is rendered by its text later: judge it by that text now.
        try:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        except Exception:
            return value
        redacted = self.text(text)
        return redacted if redacted != text or depth >= _MAX_DEPTH else value

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        """The structlog processor: every field of the event."""
        return {self.text(k) if isinstance(k, str) else k: self.value(v) for k, v in event_dict.items()}


def _replacement(match: re.Match[str]) -> str:
    # What the credential was (the scheme, the user, the parameter's name) stays readable.
    if scheme := match.group("scheme"):
        return f"{scheme} {REDACTED}"
    if userinfo := match.group("userinfo"):
        return f"{userinfo}:{REDACTED}@"
    if param := match.group("param"):
        return f"{param}{REDACTED}"
    return REDACTED


class _RedactedOutput:
    """Wraps a renderer: the rendered line is checked once more, whatever produced its text."""

    def __init__(self, renderer: Processor, redactor: Redactor) -> None:
        self.renderer = renderer
        self.redactor = redactor

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        rendered = self.renderer(logger, name, event_dict)
        text = rendered if isinstance(rendered, str) else str(rendered)
        return self.redactor.text(text)


_REDACTOR = Redactor()
_HANDLER_MARK = "_crmsync_handler"


def redact(text: str) -> str:
    """`text` without the secrets, bearer credentials and URL passwords: crmsync's one redactor.

    Whatever may be printed, logged or stored (an error message, a response body, a URL) goes
    through it; the bearer token is registered by the settings' loader and by every ProtoClient.
    """
    return _REDACTOR.text(text)


def add_secrets(*secrets: str | None) -> None:
    """Redact these secrets from every line logged from now on."""
    _REDACTOR.add(*secrets)


def wants_json(log_format: str) -> bool:
    """CRMSYNC_LOG_FORMAT's choice: `auto` writes JSON unless stderr is a terminal."""
    return log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())


def configure_logging(
    json: bool,
    level: str = "INFO",
    secrets: Iterable[str] = (),
    *,
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging of this process through one redacting pipeline.

    `json`: JSON lines (production) or readable console lines. `level`: the root level
    (a name such as ``INFO``). `secrets` are redacted besides the settings' bearer token.
    `stream` defaults to stderr (stdout is the commands' output). Calling it again
    reconfigures: the handler is replaced, not added. Celery is told to leave logging alone.
    """
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ConfigError(f"unknown log level {level!r} (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    add_secrets(*secrets, _settings_token())
    out = stream if stream is not None else sys.stderr

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        colors = bool(getattr(out, "isatty", lambda: False)())
        renderer = structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=structlog.dev.plain_traceback)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            # Tracebacks become text here, before redaction (a renderer would format them after it).
            structlog.processors.format_exc_info,
            _REDACTOR,
            _RedactedOutput(renderer, _REDACTOR),
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if getattr(old, _HANDLER_MARK, False):
            old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=True,
    )
    _leave_celery_logging_alone()


def get_logger(name: str | None = None) -> Any:
    """A structlog logger (``log.info("event", key=value)``) going through the same pipeline."""
    return structlog.stdlib.get_logger(name)


def bind_context(**kv: Any) -> None:
    """Bind key/values to every line this thread logs from now on (until :func:`clear_context`)."""
    structlog.contextvars.bind_contextvars(**kv)


def clear_context() -> None:
    """Forget everything bound in this thread."""
    structlog.contextvars.clear_contextvars()


def _settings_token() -> str | None:
    """The Proto bearer token of the settings, if they load (a bad setting is reported elsewhere)."""
    try:
        from .settings import load_settings

        token = load_settings().proto_token
    except Exception:
        return None
    return token.get_secret_value() if token else None


def _keep_our_logging(**kwargs: Any) -> None:
    """Receiver of Celery's setup_logging: its presence tells Celery not to configure logging."""


def _leave_celery_logging_alone() -> None:
    try:
        from celery import signals
    except ImportError:  # pragma: no cover - celery is a dependency
        return
    signals.setup_logging.connect(_keep_our_logging, weak=False, dispatch_uid="crmsync.logs")
