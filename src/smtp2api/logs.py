"""Logging setup: structlog and stdlib ``logging`` into one stream, one event per line.

``configure_logging`` may be called again on reload. Every event passes two guards: secret-
looking keys and ``SecretStr`` values are masked, and control characters are escaped so client-
supplied text (addresses, EHLO names, reply texts) cannot forge log lines. What callers still
own: message bodies are never logged, and subjects only at debug (``log.debug(...)``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import select
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Literal, TextIO, cast

import structlog
from structlog.contextvars import bind_contextvars, reset_contextvars, unbind_contextvars
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
    """One stream and one lock shared by structlog and stdlib, so lines never interleave.

    Lines logged on a thread running an event loop are gathered and written together once
    the loop's current iteration is over (``call_soon``): one ``write(2)`` for the lines of
    several callbacks instead of one each. Lines from other threads or without a loop, errors
    and worse, and every line when the stream has no file descriptor (``StringIO``) are
    written at once, after whatever is pending so the order stays. Each write holds whole
    lines and at most ``PIPE_BUF`` bytes, which POSIX makes atomic on a pipe: worker processes
    sharing one stdout never interleave their lines (a longer line is written alone).
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # whose call_soon will flush
        try:
            self._batch = stream.fileno() >= 0
        except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
            self._batch = False

    def write(self, line: str) -> None:
        if self._batch:
            loop = asyncio._get_running_loop()
            if loop is not None and (self._loop is loop or self._loop is None):
                with self._lock:
                    self._pending.append(line)
                    if self._loop is None:
                        self._loop = loop
                        loop.call_soon(self.flush)
                return
        self.write_now(line)

    def write_now(self, line: str) -> None:
        with self._lock:
            self._pending.append(line)
            self._write_pending()

    def flush(self) -> None:
        with self._lock:
            self._write_pending()

    def _write_pending(self) -> None:
        lines, self._pending, self._loop = self._pending, [], None
        for chunk in _chunks(lines):
            try:
                self.stream.write(chunk)
                self.stream.flush()
            except (OSError, ValueError):
                # A closed or broken stdout must not turn a log call into a failed SMTP session.
                pass


def _chunks(lines: list[str]) -> Iterator[str]:
    """``lines`` joined into texts of whole lines, each at most ``PIPE_BUF`` bytes if it can."""
    if len(lines) == 1:
        yield lines[0] + "\n"
        return
    chunk: list[str] = []
    size = 0
    for line in lines:
        n = (len(line) if line.isascii() else len(line.encode(errors="replace"))) + 1
        if chunk and size + n > select.PIPE_BUF:
            yield "\n".join(chunk) + "\n"
            chunk, size = [], 0
        chunk.append(line)
        size += n
    if chunk:
        yield "\n".join(chunk) + "\n"


class _LineLogger:
    """The structlog "wrapped logger": receives the rendered line, whatever the level."""

    def __init__(self, sink: _Sink, name: str | None) -> None:
        self.name = name
        self._sink = sink

    def msg(self, line: str) -> None:
        self._sink.write(line)

    def urgent(self, line: str) -> None:
        # An error may precede a crash: it is written before the call returns.
        self._sink.write_now(line)

    debug = info = warning = warn = log = msg
    error = critical = exception = fatal = urgent


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
            line = self.format(record)
            if record.levelno >= logging.ERROR:
                self._sink.write_now(line)
            else:
                self._sink.write(line)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


# Third-party loggers and the lowest level each may log at, whatever the configured level:
# aiosmtpd's "mail.log" logs every DATA line (bodies) and AUTH exchanges at DEBUG; at INFO it
# echoes each command, which our own session events already cover. httpx logs request URLs.
_FLOORS = {"mail.log": logging.WARNING, "httpx": logging.WARNING, "httpcore": logging.WARNING}
_DEBUG_FLOORS = {"mail.log": logging.INFO, "httpx": logging.INFO, "httpcore": logging.INFO}


_sink: _Sink | None = None  # the configured one, flushed at exit and before a fork


def flush_logs() -> None:
    """Write the lines still gathered for the event loop (before ``os._exit``, a fork, ...)."""
    if _sink is not None:
        _sink.flush()


def _forget_pending() -> None:
    # A forked child must not write again what its parent wrote, and starts with one thread:
    # a lock another thread held at the fork would never be released.
    if _sink is not None:
        _sink._pending.clear()
        _sink._loop = None
        _sink._lock = threading.Lock()


atexit.register(flush_logs)
os.register_at_fork(before=flush_logs, after_in_child=_forget_pending)


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
    global _sink  # noqa: PLW0603 - one logging setup per process, replaced on reload
    flush_logs()
    sink = _sink = _Sink(stream if stream is not None else sys.stdout)

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


class _Bound(AbstractContextManager[None]):
    """``bound_contextvars`` by tokens: entering sets the variables, leaving resets each to
    what it was (unset stays unset), without copying the whole context twice as structlog's
    generator does: a fifth of its cost, once per message."""

    __slots__ = ("_tokens", "_values")

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values
        self._tokens: Mapping[str, contextvars.Token[Any]] = {}

    def __enter__(self) -> None:
        self._tokens = bind_contextvars(**self._values)

    def __exit__(self, *exc: object) -> None:
        reset_contextvars(**self._tokens)


def bound(**values: Any) -> AbstractContextManager[None]:
    """Keys bound only inside a ``with`` block (one delivery: ``provider``, ``attempt``), in
    the one context (task) that enters and leaves it."""
    return _Bound(values)


__all__ = [
    "MASK",
    "bind",
    "bind_session",
    "bound",
    "configure_logging",
    "escape_control",
    "escape_controls",
    "flush_logs",
    "get_logger",
    "mask_secrets",
    "unbind",
]
