"""The ops endpoint (design §7): ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP/1.1.

A deliberately tiny server on asyncio streams, so the gateway needs no web framework: GET and
HEAD only, one request per connection (``Connection: close``), a bounded request head and a
time limit per connection, so a slow or hostile client cannot pin it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from email.utils import formatdate
from urllib.parse import urlsplit

import structlog

from smtp2api.logs import escape_control
from smtp2api.metrics import Metrics

log = structlog.get_logger("smtp2api.ops")

ReadyFn = Callable[[], Awaitable[tuple[bool, list[str]]]]

MAX_HEAD = 8192  # request line + headers; Prometheus and curl send a few hundred bytes
MAX_HEADERS = 64
TEXT = "text/plain; charset=utf-8"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 §5.6.2
_VERSION = re.compile(r"^HTTP/(\d)\.(\d)$")
_LINGER = 1.0  # seconds to read what a client still sends after our response (see _close)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    allow: str | None = None


class _Reject(Exception):
    """Ends request parsing with an error response."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.response = Response(status, text.encode() + b"\n")


class OpsServer:
    """Serves the ops endpoints on ``host:port``; ``port`` is the bound port (0 = any)."""

    def __init__(
        self,
        metrics: Metrics,
        ready: ReadyFn,
        host: str,
        port: int,
        *,
        timeout: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._host = host
        self._port = port
        self._timeout = timeout  # per phase: reading the head, a probe, writing the answer
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the ops server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        # limit: StreamReader.readuntil raises LimitOverrunError past MAX_HEAD for one line.
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=MAX_HEAD, reuse_address=True
        )
        log.info("ops_listening", host=self._host, port=self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    # one connection ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self._max_connections:
            writer.transport.abort()  # a flood of scrapers: shed, never queue
            return
        self._tasks.add(task)
        clean = False
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    method, path = await _read_head(reader)
            except _Reject as rejected:
                method, response = "GET", rejected.response
            else:
                response = await self._route(method, path)
            await self._send(writer, response, head_only=method == "HEAD")
            clean = await self._close(reader, writer)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # silent client, slow client, or one that hung up: just drop it
        except Exception:  # one bad request must not stop the server
            log.exception("ops_request_failed")
        except asyncio.CancelledError:
            # stop() cancels open connections. The task ends normally: Python 3.11's
            # start_server callback calls task.exception() on a cancelled task and reports
            # the CancelledError as an "Exception in callback" (fixed in 3.12).
            pass
        finally:
            if not clean:
                writer.transport.abort()
            self._tasks.discard(task)

    async def _route(self, method: str, path: str) -> Response:
        handlers = {"/metrics": self._get_metrics, "/healthz": _healthz, "/readyz": self._readyz}
        handler = handlers.get(path)
        if handler is None:
            return Response(404, b"not found\n")
        if method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", allow="GET, HEAD")
        response = await handler()
        log.debug("ops_request", method=method, path=path, status=response.status)
        return response

    async def _get_metrics(self) -> Response:
        try:
            async with asyncio.timeout(self._timeout):
                await self._metrics.refresh()
        except TimeoutError:
            # A stuck spool query: serve the other metrics with the spool gauges as they were.
            log.warning("spool_probe_timeout", timeout=self._timeout)
        body, content_type = self._metrics.render()
        return Response(200, body, content_type)

    async def _readyz(self) -> Response:
        try:
            async with asyncio.timeout(self._timeout):
                ok, reasons = await self._ready()
        except TimeoutError:
            ok, reasons = False, ["readiness check timed out"]
        except Exception as exc:  # noqa: BLE001 - a failing check means "not ready", not a 500
            log.warning("readiness_check_failed", error=type(exc).__name__)
            ok, reasons = False, [f"readiness check failed: {type(exc).__name__}"]
        if ok:
            return Response(200, b"ok\n")
        lines = [escape_control(reason) for reason in reasons] or ["not ready"]
        return Response(503, "".join(line + "\n" for line in lines).encode())

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, *, head_only: bool
    ) -> None:
        headers = [
            f"HTTP/1.1 {response.status} {_REASONS[response.status]}",
            f"Date: {formatdate(usegmt=True)}",  # RFC 9110 §6.6.1: servers with a clock send it
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",  # HEAD too: the length GET would have
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            "Connection: close",
        ]
        if response.allow:
            headers.append(f"Allow: {response.allow}")  # RFC 9110 §15.5.6: 405 must list them
        head = ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1")
        writer.write(head if head_only else head + response.body)
        async with asyncio.timeout(self._timeout):
            await writer.drain()

    async def _close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Half-close, then read what the client still sends before closing.

        Closing a socket with unread input makes the kernel send RST, which can destroy the
        response before the client read it (e.g. a POST body we never read). "Lingering
        close", as Apache and nginx do it, bounded in time and bytes.
        """
        if writer.can_write_eof():
            writer.write_eof()
        with suppress(TimeoutError):
            async with asyncio.timeout(_LINGER):
                budget = 1 << 20
                while budget > 0 and (data := await reader.read(budget)):
                    budget -= len(data)
        writer.close()
        try:
            async with asyncio.timeout(_LINGER):
                await writer.wait_closed()
        except TimeoutError:
            return False
        return True


async def _healthz() -> Response:
    return Response(200, b"ok\n")


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Read the request line and headers (RFC 9112 §2-§5); return the method and path.

    The headers are read and checked for shape and size, but none is needed to answer.
    """
    line = await _read_line(reader, 414, "request line too long")
    if not line.strip():  # RFC 9112 §2.2: ignore at least one empty line before the request
        line = await _read_line(reader, 414, "request line too long")
    method, path = _parse_request_line(line.decode("latin-1").rstrip("\r\n"))
    total, count = len(line), 0
    while True:
        header = await _read_line(reader, 431, "header line too long")
        total += len(header)
        if total > MAX_HEAD:
            raise _Reject(431, "request head too large")
        if header in (b"\r\n", b"\n"):
            return method, path
        count += 1
        if count > MAX_HEADERS:
            raise _Reject(431, "too many header fields")
        # No colon, or obsolete line folding (RFC 9112 §5.2): both answered with 400.
        if b":" not in header or header[:1] in (b" ", b"\t"):
            raise _Reject(400, "malformed header field")


async def _read_line(reader: asyncio.StreamReader, status: int, text: str) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _Reject(status, text) from None


def _parse_request_line(line: str) -> tuple[str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        raise _Reject(400, "malformed request line")
    method, target, version = parts
    match = _VERSION.match(version)
    if match is None:
        raise _Reject(400, "malformed request line")
    if match.group(1) != "1":
        raise _Reject(505, "only HTTP/1.x is supported")
    if target.startswith("/"):
        return method, target.split("?", 1)[0]
    if target.startswith(("http://", "https://")):  # absolute-form, RFC 9112 §3.2.2
        return method, urlsplit(target).path or "/"
    raise _Reject(400, "unsupported request target")
