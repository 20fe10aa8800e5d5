"""One bounded HTTP request to a provider's API, and its transport errors mapped (design §4).

Every provider sends through ``bounded_request``: an overall deadline, httpx's per-phase
timeouts, a body read of at most ``MAX_ERROR_BODY`` bytes, and httpx's exceptions turned into
the delivery error tree, with "never sent" (451 4.4.1) told apart from "maybe delivered"
(451 4.4.2). What a provider sends, and how it reads the answer, stays in the provider.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import socket
import ssl
import types
from collections.abc import AsyncIterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from smtp2api.errors import ConnectFailed, OutcomeUnknown, PayloadBug, ProviderConfigError
from smtp2api.providers.lean import bare_transport, lean_parts, parsed_url, send_bare
from smtp2api.providers.upstream import refusal_in

MAX_ERROR_BODY = 64 * 1024  # bytes of a response body ever read: ids and error messages are small


class RequestProgress:
    """How far one request got, from httpcore's ``trace`` extension.

    Lets a deadline that fires mid-call tell "never sent" (451 4.4.1) from "maybe delivered"
    (451 4.4.2). Transports that do not trace (``MockTransport``) report nothing, and then
    the conservative answer, "maybe delivered", is used.
    """

    __slots__ = ("sending", "traced")

    def __init__(self) -> None:
        self.traced = False
        self.sending = False

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        self.traced = True
        if "send_request_headers" in event:
            self.sending = True

    @property
    def maybe_sent(self) -> bool:
        return self.sending or not self.traced


def _cause(exc: BaseException) -> str:
    """A log-safe hint from the OS error under an httpx error: errno or TLS reason, no text."""
    seen: BaseException | None = exc
    for _ in range(6):
        seen = seen.__cause__ or seen.__context__ if seen is not None else None
        if isinstance(seen, ssl.SSLError):
            return f" (TLS {getattr(seen, 'reason', None) or 'error'})"
        if isinstance(seen, socket.gaierror):
            return " (DNS lookup failed)"
        if isinstance(seen, OSError) and seen.errno is not None:
            return f" ({errno.errorcode.get(seen.errno, seen.errno)})"
    return ""


@contextmanager
def map_http_errors(progress: RequestProgress | None = None) -> Iterator[None]:
    """Turn httpx's transport exceptions into the delivery error tree.

    In the style of httpx's ``map_httpcore_exceptions``. The exception's class name goes to
    ``detail`` (logs); replies keep their fixed text. A builtin ``TimeoutError`` is the
    caller's overall deadline (``asyncio.timeout``): ``progress`` says whether it fired
    before the request was written.
    """
    try:
        yield
    except httpx.ConnectError as exc:
        refused = refusal_in(exc)
        if refused is not None:
            # Design §8: the host resolves to a link-local or metadata address. Nothing was
            # sent; an operator must fix the URL or DNS (451 4.3.5, as for a bad URL).
            raise ProviderConfigError(f"upstream address refused: {refused}") from exc
        raise ConnectFailed(f"connect failed: {type(exc).__name__}{_cause(exc)}") from exc
    except (httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError) as exc:
        # Nothing reached the provider: safe to fail over at once (design §4: 451 4.4.1).
        raise ConnectFailed(f"connect failed: {type(exc).__name__}{_cause(exc)}") from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.TooManyRedirects) as exc:
        raise ProviderConfigError(f"bad provider URL: {type(exc).__name__}") from exc
    except httpx.LocalProtocolError as exc:
        # h11 refused to write our request (e.g. a configured header with CR/LF): our bug.
        raise PayloadBug(f"invalid request: {type(exc).__name__}") from exc
    except (httpx.TransportError, httpx.DecodingError) as exc:
        # ReadTimeout, WriteTimeout, ReadError, WriteError, RemoteProtocolError, CloseError:
        # the request may have been processed; a retry reuses the message id (design §3).
        raise OutcomeUnknown(f"no answer: {type(exc).__name__}{_cause(exc)}") from exc
    except TimeoutError as exc:
        if progress is not None and not progress.maybe_sent:
            raise ConnectFailed("connect failed: deadline exceeded before sending") from exc
        raise OutcomeUnknown("no answer: deadline exceeded") from exc


async def read_limited(response: httpx.Response, limit: int = MAX_ERROR_BODY) -> bytes:
    """At most ``limit`` bytes of the (decoded) body; a body that breaks off is cut short.

    The status line is what decides the outcome; the body only adds an id or a reason, so a
    huge, endless or broken body must neither exhaust memory nor turn an answer into an error.
    """
    stream = response.stream
    source: AsyncIterable[bytes]
    if (
        isinstance(stream, httpx.AsyncByteStream)
        and not response.is_stream_consumed
        and "content-encoding" not in response.headers
    ):
        source = stream  # the body as sent: no need for aiter_bytes' decoder and chunker layers
    else:  # encoded (guard_client asks for identity, yet a server may not), or read already
        source = response.aiter_bytes()
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in source:
            chunks.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
    except (httpx.TransportError, httpx.DecodingError):
        pass
    return b"".join(chunks)[:limit]


def phase_timeouts(timeout: float) -> httpx.Timeout:
    """httpx's per-phase timeouts for a call bounded by ``timeout`` seconds overall.

    Waiting for a pooled connection and connecting (TCP + TLS) get 40 % of the budget each, so
    httpx's own timeout ends them, never the overall deadline: a cancellation during the TLS
    handshake leaks the socket (httpcore 1.0 ``start_tls`` only cleans up on ``Exception``),
    and PoolTimeout/ConnectTimeout say for sure "never sent" (451 4.4.1).
    """
    return httpx.Timeout(timeout, connect=timeout * 0.4, pool=timeout * 0.4)


@functools.lru_cache(maxsize=64)
def _timeout_extension(budget: float) -> Mapping[str, float | None]:
    # httpx's ``timeout`` extension, computed once per budget (a provider has one) and
    # read-only, since every request of that provider shares it.
    return types.MappingProxyType(phase_timeouts(budget).as_dict())


@dataclasses.dataclass(frozen=True, slots=True)
class ApiAnswer:
    """One API answer: status, headers and at most ``MAX_ERROR_BODY`` bytes of body."""

    status: int
    headers: httpx.Headers
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _direct_request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    extensions: dict[str, Any],
    request: dict[str, Any],
) -> httpx.Request | None:
    """The request ``client.build_request`` would make, built without its generic merging;
    None when the call needs what only ``client.send`` does (an auth flow with more than
    one step, credentials in the URL, a client ``base_url``, client-level cookies/params).

    Providers never follow redirects (design §8), keep no cookies and compute their own
    credentials, so for them ``send``'s auth, redirect and cookie layers are pure overhead
    (``bench/relay.py`` measures the difference).
    """
    auth = request.pop("auth", None)
    if not (auth is None or isinstance(auth, httpx.BasicAuth)) or client.auth is not None:
        return None
    if not request.keys() <= _BUILDABLE or client.params or client.cookies:
        return None
    target = parsed_url(url)
    if target.is_relative_url or target.userinfo:
        return None
    headers, names = _merged_headers(client.headers, request.pop("headers", None))
    content = request.get("content")
    if (content is None or type(content) is bytes) and request.keys() <= _CONTENT_ONLY:
        # The providers' usual body, bytes already: only the framing ``Request`` would add.
        body = content or b""
        _add_framing(headers, names, target, method, body)
        built = httpx.Request(
            method, target, headers=headers, stream=httpx.ByteStream(body), extensions=extensions
        )
        built.read()  # as ``Request`` does for bytes: ``.content`` is then set (no copy)
    else:  # form data, files, JSON, a streamed body: httpx encodes them
        built = httpx.Request(method, target, headers=headers, extensions=extensions, **request)
    if auth is not None:
        # BasicAuth's flow is one step: it sets the header and yields the request once.
        next(auth.sync_auth_flow(built))
    return built


def _merged_headers(
    defaults: httpx.Headers, extra: Any
) -> tuple[list[tuple[Any, Any]], set[bytes]]:
    """``Headers.update``'s merge: ``extra`` replaces every default of the same name. Also
    the lower-cased names of the result.

    Names and values stay str or bytes as given: ``Request`` encodes them (once) as
    ``Headers`` does, ASCII for str."""
    if isinstance(extra, httpx.Headers):
        own: list[tuple[Any, Any]] = extra.raw
    else:
        own = list(extra.items() if isinstance(extra, Mapping) else extra or ())
    names = {(name if type(name) is bytes else name.encode("ascii")).lower() for name, _ in own}
    kept = [(name, value) for name, value in defaults.raw if name.lower() not in names]
    names.update(name.lower() for name, _ in kept)
    return kept + own, names


def _add_framing(
    headers: list[tuple[Any, Any]], names: set[bytes], url: httpx.URL, method: str, body: bytes
) -> None:
    """Host (RFC 9112 §3.2) and Content-Length (RFC 9110 §8.6), unless given, as httpx's
    ``Request`` adds them: a length for any body, and 0 for an empty POST, PUT or PATCH."""
    if b"host" not in names:
        headers.insert(0, (b"Host", url.netloc))
    framed = b"content-length" in names or b"transfer-encoding" in names
    if not framed and (body or method.upper() in ("POST", "PUT", "PATCH")):
        headers.append((b"Content-Length", b"%d" % len(body)))


_BUILDABLE = frozenset({"content", "data", "files", "json", "headers"})
_CONTENT_ONLY = frozenset({"content"})
_log = logging.getLogger("httpx")  # ``client.send`` logs each request here, at INFO


async def _send_direct(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """``client.send(request, stream=True)`` for a request that follows no redirect and
    needs no auth flow: the event hooks (``upstream.guard_client``'s literal-address check),
    the transport the client picks for the URL (a proxy mount), nothing else."""
    if client.is_closed:
        raise RuntimeError("Cannot send a request, as the client has been closed.")
    for hook in client.event_hooks["request"]:
        await hook(request)
    transport = client._transport_for_url(request.url)  # a proxy mount, if any (httpx 0.28)
    response = await transport.handle_async_request(request)
    response.request = request
    try:
        for hook in client.event_hooks["response"]:
            await hook(response)
    except BaseException:
        await response.aclose()
        raise
    if _log.isEnabledFor(logging.INFO):
        _log.info(
            'HTTP Request: %s %s "%s %d %s"',
            request.method,
            request.url,
            response.http_version,
            response.status_code,
            response.reason_phrase,
        )
    return response


async def _send_general(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    extensions: dict[str, Any],
    request: dict[str, Any],
) -> httpx.Response:
    """What ``AsyncClient.stream`` does, for a request ``_direct_request`` does not build.
    ``extensions`` holds the timeouts already; ``build_request`` then keeps them."""
    auth = request.pop("auth", httpx.USE_CLIENT_DEFAULT)
    built = client.build_request(method, url, extensions=extensions, **request)
    return await client.send(built, auth=auth, stream=True)


async def bounded_request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    budget: float,
    limit: int = MAX_ERROR_BODY,
    **request: Any,
) -> ApiAnswer:
    """One request, bounded in time and memory; transport errors mapped (``map_http_errors``).

    ``request`` is what ``httpx.AsyncClient.stream`` takes to build it (``content``, ``json``,
    ``data``, ``files``, ``headers``, ``auth``). ``budget`` (seconds) bounds the whole call,
    including a server that drips its answer a byte at a time; httpx's per-phase timeouts tell
    connect failures (4.4.1) from lost answers (4.4.2). Once the status line has arrived it
    decides, even if the body then times out; at most ``limit`` bytes of body are read.
    """
    progress = RequestProgress()
    extensions = {"timeout": _timeout_extension(budget), "trace": progress.trace}
    status: int | None = None
    headers: httpx.Headers | None = None
    body = b""
    try:
        with map_http_errors(progress):
            async with asyncio.timeout(budget):
                lean = lean_parts(client, url, request)
                if lean is not None:
                    transport, lean_url, lean_headers, content = lean
                    raw = await transport.send_parts(
                        method,
                        lean_url,
                        lean_headers,
                        content,
                        phases=extensions["timeout"],
                        trace=progress.trace,
                    )
                    try:
                        status, headers = raw.status, httpx.Headers(list(raw.raw_headers))
                        body = await _read_bare(transport, raw, None, headers, limit)
                    finally:
                        raw.release()
                    return ApiAnswer(status, headers, body)
                built = _direct_request(client, method, url, extensions, dict(request))
                bare = None if built is None else bare_transport(client, built)
                if bare is not None:
                    assert built is not None
                    raw = await send_bare(client, bare, built)
                    try:
                        status, headers = raw.status, httpx.Headers(list(raw.raw_headers))
                        body = await _read_bare(bare, raw, built, headers, limit)
                    finally:
                        raw.release()
                else:
                    if built is not None:
                        response = await _send_direct(client, built)
                    else:  # the general path: everything ``AsyncClient.stream`` does
                        response = await _send_general(
                            client, method, url, extensions, dict(request)
                        )
                    try:
                        status, headers = response.status_code, response.headers
                        body = await read_limited(response, limit)
                    finally:
                        await response.aclose()
    except OutcomeUnknown:
        if status is None:
            raise
    assert headers is not None  # set with the status, before any body was read
    return ApiAnswer(status, headers, body)


async def _read_bare(
    transport: Any,
    response: Any,
    request: httpx.Request | None,
    headers: httpx.Headers,
    limit: int,
) -> bytes:
    """``read_limited`` for ``_send_bare``'s response."""
    if "content-encoding" in headers:  # not asked for (guard_client), yet possible: decode
        return await read_limited(transport.as_httpx(response, request), limit)
    body: bytes = await transport.read_bounded(response, request, limit)
    return body
