"""The providers' usual request sent with fewer layers: ``request.bounded_request``'s fast paths.

On ``AiohttpTransport`` an answer is read from aiohttp's response itself (no
``httpx.Response``), and the usual call (a bytes body, plain headers, no auth, no hooks but
the upstream guard's) is sent without an ``httpx.Request`` either. Each helper returns None
where its path does not apply; ``bounded_request`` then takes the general one. Measured with
``bench/relay.py``: ~280 -> ~225 us of CPU per delivery of a 2 KB message.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import httpx

from smtp2api.providers.upstream import _check_literal, _literal_refused

_log = logging.getLogger("httpx")  # ``client.send`` logs each request here, at INFO


@functools.lru_cache(maxsize=256)
def parsed_url(url: str) -> httpx.URL:
    return httpx.URL(url)  # immutable; a provider posts to the same few URLs every time


@functools.lru_cache(maxsize=256)
def _normalised(url: str) -> str:
    # As httpx would send it: percent-encoded, IDNA host (aiohttp then takes it as encoded).
    return str(parsed_url(url))


def bare_transport(client: httpx.AsyncClient, request: httpx.Request) -> Any:
    """The client's transport for ``request`` when it can answer without an
    ``httpx.Response`` (``AiohttpTransport.send_bare``) and nothing needs one: no response
    hook, no httpx request log. Else None."""
    if client.event_hooks["response"] or _log.isEnabledFor(logging.INFO):
        return None
    transport = client._transport_for_url(request.url)  # a proxy mount, if any (httpx 0.28)
    return transport if hasattr(transport, "send_bare") else None


async def send_bare(client: httpx.AsyncClient, transport: Any, request: httpx.Request) -> Any:
    """``_send_direct`` without the ``httpx.Response``: aiohttp's response, which the caller
    must ``release()``. An ``httpx.Response``, its stream wrapper and ``read_limited``'s
    iteration cost more CPU than the few dozen bytes of an API's answer (``bench/relay.py``)."""
    if client.is_closed:
        raise RuntimeError("Cannot send a request, as the client has been closed.")
    for hook in client.event_hooks["request"]:
        await hook(request)
    return await transport.send_bare(request)


def lean_parts(
    client: httpx.AsyncClient, url: str, request: Mapping[str, Any]
) -> tuple[Any, str, list[tuple[str, str]], bytes] | None:
    """The transport, URL, headers and body for a request sent with no ``httpx.Request`` at
    all, or None when it needs one: anything but a bytes body (under 1 MiB) and a list of
    ASCII headers, an auth, client cookies or params, a response hook or a request hook other
    than the upstream guard's (which needs none for a host name or an allowed address), or
    the httpx request log.

    The providers' usual call. Building and encoding an ``httpx.Request`` for it cost more CPU
    than aiohttp's own request (``bench/relay.py``). The headers are those ``_direct_request``
    would send, Host and Content-Length left to aiohttp (the same values, RFC 9112 §3.2).
    """
    content = request.get("content")
    extra = request.get("headers")
    if (
        type(content) is not bytes
        or not 0 < len(content) < _LARGE_BODY
        or not request.keys() <= _LEAN_KEYS
        or not isinstance(extra, list | tuple)
        or client.is_closed
        or client.auth is not None
        or client.params
        or client.cookies
        or client.event_hooks["response"]
        or _log.isEnabledFor(logging.INFO)
    ):
        return None
    target = parsed_url(url)
    if target.is_relative_url or target.userinfo:
        return None
    for hook in client.event_hooks["request"]:
        if hook is not _check_literal or _literal_refused(target.host):
            return None  # the general path runs it on a real request (and refuses there)
    transport = client._transport_for_url(target)  # a proxy mount, if any (httpx 0.28)
    if not hasattr(transport, "send_parts"):
        return None
    headers = _lean_headers(client.headers, extra)
    return None if headers is None else (transport, _normalised(url), headers, content)


def _lean_headers(
    defaults: httpx.Headers, extra: list[Any] | tuple[Any, ...]
) -> list[tuple[str, str]] | None:
    """``_merged_headers`` for the lean path, as str; None for a header it does not take."""
    own: list[tuple[str, str]] = []
    names: set[str] = set()
    for name, value in extra:
        if type(name) is str and type(value) is str and name.isascii() and value.isascii():
            text, data = name, value  # the providers' usual headers: no conversion
        else:
            some_text, some_data = _text(name), _text(value)
            if some_text is None or some_data is None:
                return None
            text, data = some_text, some_data
        lower = text.lower()
        if lower in _FRAMING:
            return None  # the caller frames the body itself: ``_direct_request`` keeps that
        names.add(lower)
        if lower not in _HOP:
            own.append((text, data))
    kept = [(k, v) for k, v, lower in _defaults(tuple(defaults.raw)) if lower not in names]
    return kept + own


def _text(item: object) -> str | None:
    """A header name or value as aiohttp takes it; None where ``httpx.Headers`` would refuse
    it (non-ASCII str) or the lean path does not go (anything else)."""
    if type(item) is str:
        return item if item.isascii() else None
    if type(item) is bytes:
        return item.decode("latin-1")  # as AiohttpTransport decodes httpx's encoded headers
    return None


@functools.lru_cache(maxsize=16)
def _defaults(raw: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[str, str, str], ...]:
    # The client's default headers (User-Agent, Accept, Accept-Encoding), decoded once.
    return tuple(
        (k.decode("latin-1"), v.decode("latin-1"), k.decode("latin-1").lower())
        for k, v in raw
        if k.lower() not in (b"connection", b"transfer-encoding", b"keep-alive")
    )


_LARGE_BODY = 1024 * 1024  # AiohttpTransport sends larger bytes bodies as a BytesIO, in chunks
_LEAN_KEYS = frozenset({"content", "headers"})
_FRAMING = frozenset({"host", "content-length", "transfer-encoding"})
_HOP = frozenset({"connection", "keep-alive"})  # aiohttp's business, as in AiohttpTransport
