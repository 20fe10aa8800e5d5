"""An httpx transport that sends through aiohttp: providers keep httpx's API, without its pool.

httpcore's connection pool serialises under concurrency (at 50 ms API latency and 100
requests in flight it did 108 requests/s where aiohttp did 1,748; issue 6, and
``docs/performance.md``). ``AiohttpTransport`` keeps ``httpx.AsyncClient`` as the providers'
interface and maps aiohttp's exceptions onto httpx's, so ``providers.base.map_http_errors``
classifies failures exactly as with httpx's own transport. It also feeds httpx's ``trace``
extension, so a deadline can still tell "never sent" (4.4.1) from "maybe delivered" (4.4.2).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import aiohttp
import httpx
import yarl

# Headers httpx always sets itself; aiohttp must not add its own variants of them.
_SKIP_AUTO = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# Hop-by-hop framing is aiohttp's business (RFC 9112 §6.1): it chunks a body of unknown size.
_DROP = frozenset({b"connection", b"transfer-encoding", b"keep-alive"})
_CHUNK = 64 * 1024
_LARGE_BODY = 1024 * 1024  # aiohttp's own threshold (payload.TOO_LARGE_BYTES_BODY)
Trace = Callable[[str, dict[str, Any]], Awaitable[None]]


@contextlib.contextmanager
def map_aiohttp_errors(request: httpx.Request | None) -> Iterator[None]:
    """aiohttp's exceptions as the httpx exceptions its own transport raises for the same
    failure (``httpx/_transports/default.py``'s ``map_httpcore_exceptions``, in reverse)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:  # pool wait or connect: nothing was sent
        raise httpx.ConnectTimeout(str(exc) or "connect timeout", request=request) from exc
    except aiohttp.ServerTimeoutError as exc:  # sock_read: the request went out
        raise httpx.ReadTimeout(str(exc) or "read timeout", request=request) from exc
    except aiohttp.ClientConnectorError as exc:  # DNS, refused, TLS handshake, certificate
        raise httpx.ConnectError(str(exc), request=request) from exc
    except (aiohttp.NonHttpUrlClientError, aiohttp.InvalidUrlClientError) as exc:
        raise httpx.UnsupportedProtocol(str(exc), request=request) from exc
    except (
        aiohttp.ServerDisconnectedError,
        aiohttp.ClientPayloadError,
        aiohttp.ClientResponseError,
    ) as exc:
        # Closed before a complete answer, or an answer that is not HTTP.
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
    except (aiohttp.ClientError, OSError) as exc:  # reset, broken pipe mid-exchange
        raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
    except ValueError as exc:
        # aiohttp refuses to write a header with CR/LF or a bad method: our request's fault.
        raise httpx.LocalProtocolError(str(exc), request=request) from exc


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request | None) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with map_aiohttp_errors(self._request):
            async for chunk in self._response.content.iter_chunked(_CHUNK):
                yield chunk

    async def aclose(self) -> None:
        # release() keeps the connection when the body was read to the end, else closes it.
        self._response.release()


async def read_bounded(
    response: aiohttp.ClientResponse, request: httpx.Request | None, limit: int
) -> bytes:
    """At most ``limit`` bytes of the body as received, without a stream wrapper per request;
    a body that breaks off is cut short (``providers.request.read_limited``'s contract)."""
    chunks: list[bytes] = []
    size = 0
    try:
        with map_aiohttp_errors(request):
            while size < limit:
                chunk = await response.content.readany()
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except httpx.TransportError:
        pass
    return b"".join(chunks)[:limit]


@functools.lru_cache(maxsize=256)
def _yarl_url(url: str) -> yarl.URL:
    # httpx's URL is percent-encoded already; parsed once per provider URL, not per request.
    return yarl.URL(url, encoded=True)


async def _body(stream: httpx.AsyncByteStream) -> AsyncIterator[bytes]:
    async for chunk in stream:
        yield chunk


@functools.lru_cache(maxsize=64)  # a provider's budget gives the same three every time
def _client_timeout(
    pool: float | None, connect: float | None, read: float | None
) -> aiohttp.ClientTimeout:
    # httpx's per-phase timeouts, as far as aiohttp has them (no write timeout: the provider's
    # overall deadline bounds a stalled upload). aiohttp's ``connect`` covers waiting for a
    # pooled connection plus making a new one.
    waiting = None if pool is None and connect is None else (pool or 0.0) + (connect or 0.0)
    return aiohttp.ClientTimeout(total=None, connect=waiting, sock_connect=connect, sock_read=read)


# The request's ``trace`` callback, seen by ``_TracingConnector`` in the same task.
_TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar(
    "smtp2api_trace", default=None
)


class _TracingConnector(aiohttp.TCPConnector):
    """Feeds httpcore's ``trace`` events from the one place aiohttp picks a connection.

    "Sending" is reported as soon as a connection is assigned, a moment before the headers
    are written: a deadline in that moment then counts as "maybe delivered", the safe side
    (duplicates over losses). Until then nothing can have been sent (waiting for the pool,
    DNS, TCP, TLS), so a deadline there is "never sent". This replaces aiohttp's
    ``TraceConfig``, which sends a dozen signals per request, each with its own parameter
    object: 153 µs of CPU per request with it, 122 without (a 2 KB POST to bench/sink.py).
    """

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Any],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's interface
    ) -> aiohttp.connector.Connection:
        trace = _TRACE.get()
        if trace is not None:
            await trace("connection.connect_tcp.started", {})
        connection = await super().connect(req, traces, timeout)
        if trace is not None:
            await trace("http11.send_request_headers.started", {})
        return connection


class AiohttpTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=AiohttpTransport(...))``: one aiohttp session and pool.

    The session is made on first use, inside the running loop (aiohttp binds it there).
    Redirects are never followed (design §8); cookies are never kept; bodies are passed
    through undecoded, since httpx decodes ``Content-Encoding`` itself.
    """

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_expiry: float = 15.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._keepalive = keepalive_expiry
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        # Read when the session is made: providers/upstream.py installs its address guard.
        self.resolver: aiohttp.abc.AbstractResolver | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("transport is closed")
        if self._session is None:
            connector = _TracingConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive,
                ttl_dns_cache=60,
                resolver=self.resolver,
                # httpx's trust store (certifi, or SSL_CERT_FILE), so the choice of
                # transport does not change which certificates are trusted.
                ssl=self._ssl or httpx.create_ssl_context(),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=_SKIP_AUTO,
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return self.as_httpx(await self.send_bare(request), request)

    @staticmethod
    def as_httpx(response: aiohttp.ClientResponse, request: httpx.Request | None) -> httpx.Response:
        """aiohttp's response as httpx's, its body streamed on demand."""
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_ResponseStream(response, request),
            extensions={
                "http_version": f"HTTP/{response.version.major}.{response.version.minor}".encode()
                if response.version
                else b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    read_bounded = staticmethod(read_bounded)

    async def send_bare(self, request: httpx.Request) -> aiohttp.ClientResponse:
        """The request sent, aiohttp's response without an ``httpx.Response`` around it: for
        ``providers.request.bounded_request``, which needs only status, headers and a bounded
        body (``read_bounded``). The caller must ``release()`` it."""
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in request.headers.raw
            if k.lower() not in _DROP
        ]
        body: bytes | io.BytesIO | AsyncIterator[bytes]
        if hasattr(request, "_content"):  # built from bytes, str, json or form data
            body = request.content
            if len(body) >= _LARGE_BODY:
                # aiohttp writes a large bytes body in one go and warns that it may block the
                # loop; a BytesIO payload is written in chunks.
                body = io.BytesIO(body)
        else:
            assert isinstance(request.stream, httpx.AsyncByteStream)
            body = _body(request.stream)
        return await self.send_parts(
            request.method,
            str(request.url),
            headers,
            body,
            phases=request.extensions.get("timeout", {}),
            trace=request.extensions.get("trace"),
            request=request,
        )

    async def send_parts(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes | io.BytesIO | AsyncIterator[bytes],
        *,
        phases: Mapping[str, float | None],
        trace: Trace | None,
        request: httpx.Request | None = None,
    ) -> aiohttp.ClientResponse:
        """``send_bare`` from a request's parts, for a caller that has no ``httpx.Request``
        (``providers.request``'s lean path); the exceptions raised then carry none."""
        session = self._open()
        token = _TRACE.set(trace)
        try:
            with map_aiohttp_errors(request):
                return await session.request(
                    method,
                    _yarl_url(url),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=_client_timeout(
                        phases.get("pool"), phases.get("connect"), phases.get("read")
                    ),
                    compress=None,
                )
        finally:
            _TRACE.reset(token)

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
