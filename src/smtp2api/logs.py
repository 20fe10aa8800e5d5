"""Logging setup: structlog and stdlib ``logging`` into one stream, one event per line.

``configure_logging`` may be called again on reload. Every event passes two guards: secret-
looking keys and ``SecretStr`` values are masked, and control characters are escaped so client-
supplied text (addresses, EHLO names, reply texts) cannot forge log lines. What callers still
own: message bodies are never logged, and subjects only at debug (``log.debug(...)``).
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Literal, TextIO, cast

import structlog
from structlog.contextvars import bound_contextvars, unbind_contextvars
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import ExcInfo, FilteringBoundLogger, Processor

from smtp2api.log_processors import (
    MASK,
    JsonLine,
    add_logger_name,
    escape_control,
    escape_controls,
    mask_secrets,
    merge_contextvars,
    stamp,
)

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS |= {"error": logging.ERROR, "critical": logging.CRITICAL}


def _traceback_lines(te: traceback.TracebackException) -> Iterator[str]:
    """Lines of a traceback; the untrusted parts (exception messages, notes) escaped."""
    if te.__cause__ is not None:
        yield from _traceback_lines(te.__cause__)
        yield "The above exception was the direct cause of the following exception:"
    elif te.__context__ is not None and not te.__suppress_context__:
        yield from _traceback_lines(te.__context__)
        yield "During handling of the above exception, another exception occurred:"
    if te.stack:
        yield "Traceback (most recent call last):"
        for chunk in te.stack.format():  # file names and our own source lines: trusted
            yield from chunk.rstrip("\n").split("\n")
    for chunk in te.format_exception_only():
        yield escape_control(chunk.rstrip("\n"))


def _safe_traceback(sio: TextIO, exc_info: ExcInfo) -> None:
    """Console exception formatter: the traceback below the event, indented by four spaces.

    A traceback is the one thing that spans lines in console format; its lines are indented
    and its messages escaped, so no text from a client can look like the start of an event.
    """
    te = traceback.TracebackException(*exc_info)
    sio.write("".join("\n    " + line for line in _traceback_lines(te)))


class _Sink:
    """One stream and one lock shared by structlog and stdlib, so lines never interleave."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        try:
            with self._lock:
                self.stream.write(line + "\n")
                self.stream.flush()
        except (OSError, ValueError):
            # A closed or broken stdout must not turn a log call into a failed SMTP session.
            pass


class _LineLogger:
    """The structlog "wrapped logger": receives the rendered line, whatever the level."""

    def __init__(self, sink: _Sink, name: str | None) -> None:
        self.name = name
        self._sink = sink

    def msg(self, line: str) -> None:
        self._sink.write(line)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


_LOGGERS_MAX = 4096


class _LoggerFactory:
    """structlog builds a logger per call when loggers are not cached (they are not: see
    ``configure_logging``); one ``_LineLogger`` per name per configuration serves them all."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink
        self._loggers: dict[str | None, _LineLogger] = {}

    def __call__(self, *args: Any) -> _LineLogger:
        name = str(args[0]) if args else None
        logger = self._loggers.get(name)
        if logger is None:
            logger = _LineLogger(self._sink, name)
            if len(self._loggers) < _LOGGERS_MAX:  # names are module names: a few dozen
                self._loggers[name] = logger
        return logger


class _StdlibHandler(logging.Handler):
    """Routes stdlib records (aiosmtpd, asyncio, httpx) through the same processors."""

    def __init__(self, sink: _Sink, formatter: logging.Formatter) -> None:
        super().__init__()
        self._sink = sink
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sink.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


# Third-party loggers and the lowest level each may log at, whatever the configured level:
# aiosmtpd's "mail.log" logs every DATA line (bodies) and AUTH exchanges at DEBUG; at INFO it
# echoes each command, which our own session events already cover. httpx logs request URLs.
_FLOORS = {"mail.log": logging.WARNING, "httpx": logging.WARNING, "httpcore": logging.WARNING}
_DEBUG_FLOORS = {"mail.log": logging.INFO, "httpx": logging.INFO, "httpcore": logging.INFO}


def configure_logging(
    level: str = "info",
    fmt: Literal["json", "console"] = "json",
    stream: TextIO | None = None,
) -> None:
    """Send structlog and stdlib logging to ``stream`` (``sys.stdout`` by default, looked up
    at call time) as JSON lines or console text. Safe to call again (reload): it replaces
    the previous setup."""
    threshold = LEVELS.get(level.lower())
    if threshold is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    sink = _Sink(stream if stream is not None else sys.stdout)

    shared: list[Processor] = [structlog.processors.add_log_level, stamp, add_logger_name]
    renderer: list[Processor]
    last: list[Processor]  # after merge_contextvars, for structlog's own events
    if fmt == "json":
        # Structured, without locals: frame locals could hold a password or a message body.
        exceptions = ExceptionDictTransformer(show_locals=False, use_rich=False)
        renderer = [
            mask_secrets,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.ExceptionRenderer(exceptions),
            escape_controls,
            structlog.processors.JSONRenderer(),
        ]
        last = [JsonLine([*shared, *renderer])]
    else:
        colors = bool(getattr(sink.stream, "isatty", lambda: False)())
        console = structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=_safe_traceback)
        renderer = [
            mask_secrets,
            structlog.processors.StackInfoRenderer(),
            escape_controls,
            console,
        ]
        last = [*shared, *renderer]

    structlog.configure(
        processors=[merge_contextvars, *last],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=_LoggerFactory(sink),
        # Not cached: loggers made at import time must follow a reload's level and format.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[merge_contextvars, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(_StdlibHandler(sink, formatter))
    root.setLevel(threshold)
    floors = _DEBUG_FLOORS if threshold <= logging.DEBUG else _FLOORS
    for name, floor in floors.items():
        logging.getLogger(name).setLevel(max(threshold, floor))


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    """A typed structlog logger (``structlog.get_logger`` returns ``Any``)."""
    return cast(FilteringBoundLogger, structlog.get_logger(name))


def bind_session(**values: Any) -> None:
    """Start a fresh log context (a new SMTP session's task) with ``values`` bound.

    aiosmtpd runs each connection in its own task, whose context is a copy: clearing it
    cannot touch another session's keys.
    """
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**values)


def bind(**values: Any) -> None:
    """Add keys (``msg_id``, ``account``, ...) to the current context."""
    structlog.contextvars.bind_contextvars(**values)


def unbind(*keys: str) -> None:
    unbind_contextvars(*keys)


def bound(**values: Any) -> AbstractContextManager[None]:
    """Keys bound only inside a ``with`` block (one delivery: ``provider``, ``attempt``)."""
    return cast(AbstractContextManager[None], bound_contextvars(**values))


__all__ = [
    "MASK",
    "bind",
    "bind_session",
    "bound",
    "configure_logging",
    "escape_control",
    "escape_controls",
    "get_logger",
    "mask_secrets",
    "unbind",
]
