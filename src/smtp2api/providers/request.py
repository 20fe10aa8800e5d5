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
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from smtp2api.errors import ConnectFailed, OutcomeUnknown, PayloadBug, ProviderConfigError
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
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
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


@dataclasses.dataclass(frozen=True, slots=True)
class ApiAnswer:
    """One API answer: status, headers and at most ``MAX_ERROR_BODY`` bytes of body."""

    status: int
    headers: httpx.Headers
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


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
    status: int | None = None
    headers = httpx.Headers()
    body = b""
    try:
        with map_http_errors(progress):
            async with asyncio.timeout(budget):
                async with client.stream(
                    method,
                    url,
                    timeout=phase_timeouts(budget),
                    extensions={"trace": progress.trace},
                    **request,
                ) as response:
                    status, headers = response.status_code, response.headers
                    body = await read_limited(response, limit)
    except OutcomeUnknown:
        if status is None:
            raise
    return ApiAnswer(status, headers, body)
