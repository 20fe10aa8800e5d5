"""``bounded_request``'s reading of an answer, through both transports and real sockets.

On the aiohttp transport it reads aiohttp's response itself (``AiohttpTransport.send_bare``):
these check that status, headers and body come out as through an ``httpx.Response``.
"""

from __future__ import annotations

import asyncio
import gzip
import types
from typing import Any

import httpx
import pytest

from smtp2api.aiohttp_transport import AiohttpTransport
from smtp2api.errors import OutcomeUnknown, ProviderConfigError
from smtp2api.providers.request import bounded_request
from smtp2api.providers.upstream import guard_client
from tests.integration.test_transport import _read_request, client, hang_up, server, short_body

__all__ = ["client"]  # the fixture, both transports


def _answer(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nX-Message-Id: m-1\r\nContent-Length: %d\r\n" % len(body)
    return head + b"".join(line + b"\r\n" for line in extra) + b"\r\n" + body


async def test_status_headers_and_body(client: httpx.AsyncClient) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):  # the second request reuses the connection the first released
            await _read_request(reader)
            writer.write(_answer(b'{"id": "a-1"}'))

    async with server(answer) as url:
        for _ in range(2):
            got = await bounded_request(client, "POST", url, budget=5, content=b"{}")
            assert (got.status, got.body) == (200, b'{"id": "a-1"}')
            assert got.headers["x-message-id"] == "m-1"


async def test_at_most_limit_bytes_of_body(client: httpx.AsyncClient) -> None:
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_answer(b"x" * 300_000))

    async with server(big) as url:
        got = await bounded_request(client, "POST", url, budget=5, content=b"{}", limit=1000)
    assert (got.status, got.body) == (200, b"x" * 1000)


async def test_a_gzip_answer_is_decoded(client: httpx.AsyncClient) -> None:
    async def zipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_answer(gzip.compress(b'{"id": "z"}'), b"Content-Encoding: gzip"))

    async with server(zipped) as url:
        got = await bounded_request(client, "POST", url, budget=5, content=b"{}")
    assert (got.status, got.body) == (200, b'{"id": "z"}')


async def test_a_body_that_breaks_off_is_cut_short(client: httpx.AsyncClient) -> None:
    async with server(short_body) as url:
        got = await bounded_request(client, "POST", url, budget=5, content=b"{}")
    assert (got.status, got.body) == (200, b'{"id": ')


async def test_once_the_status_arrived_a_deadline_keeps_it(client: httpx.AsyncClient) -> None:
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 50\r\n\r\n{")
        await writer.drain()
        await asyncio.sleep(5)

    async with server(drip) as url:
        got = await bounded_request(client, "POST", url, budget=0.5, content=b"{}")
    assert got.status == 202  # the status decides; the body never completed


async def test_no_answer_is_outcome_unknown(client: httpx.AsyncClient) -> None:
    async with server(hang_up) as url:
        with pytest.raises(OutcomeUnknown):
            await bounded_request(client, "POST", url, budget=5, content=b"{}")


async def test_response_hooks_still_see_the_response(client: httpx.AsyncClient) -> None:
    seen: list[int] = []

    async def hook(response: httpx.Response) -> None:
        seen.append(response.status_code)

    client.event_hooks["response"].append(hook)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_answer(b"{}"))

    async with server(answer) as url:
        got = await bounded_request(client, "POST", url, budget=5, content=b"{}")
    assert (got.status, seen) == (200, [200])


async def test_the_lean_path_sends_the_headers_httpx_sends() -> None:
    # The aiohttp transport's lean path builds no httpx.Request: its request head must carry
    # what httpx's own transport sends for the same call (order and case aside).
    built: list[httpx.Request] = []
    real_send_bare = AiohttpTransport.send_bare

    async def counted(self: AiohttpTransport, request: httpx.Request) -> Any:
        built.append(request)
        return await real_send_bare(self, request)

    heads: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await _read_request(reader)
        heads.append(head + body)
        writer.write(_answer(b"{}"))

    headers = [
        (b"Content-Type", b"application/json"),
        (b"Accept", b"application/json"),
        (b"Authorization", b"Bearer k"),
        ("Idempotency-Key", "01J0"),
    ]
    async with server(record) as url:
        aiohttp_transport = AiohttpTransport()
        aiohttp_transport.send_bare = types.MethodType(counted, aiohttp_transport)  # type: ignore[method-assign]
        for transport in (httpx.AsyncHTTPTransport(), aiohttp_transport):
            async with httpx.AsyncClient(transport=transport, headers={"User-Agent": "t/1"}) as c:
                guard_client(c)
                got = await bounded_request(
                    c, "POST", url, budget=5, content=b"{}", headers=headers
                )
                assert got.status == 200

    def lines(head: bytes) -> set[bytes]:
        request_line, *fields = head.split(b"\r\n")
        # Connection is hop-by-hop framing, aiohttp's business (keep-alive is HTTP/1.1's default)
        kept = {f.lower().replace(b": ", b":") for f in fields if f}
        return {request_line} | {f for f in kept if not f.startswith(b"connection:")}

    assert lines(heads[1]) == lines(heads[0])
    assert b"accept:application/json" in lines(heads[1])
    assert built == []  # no httpx.Request was made for it


async def test_the_guard_still_refuses_a_literal_metadata_address() -> None:
    # The lean path skips the guard's request hook only where it has nothing to refuse.
    async with httpx.AsyncClient(transport=AiohttpTransport()) as guarded:
        guard_client(guarded)
        with pytest.raises(ProviderConfigError, match="upstream address refused"):
            await bounded_request(
                guarded, "POST", "http://169.254.169.254/v1", budget=5, content=b"{}"
            )


async def test_the_url_is_sent_encoded_as_httpx_encodes_it() -> None:
    paths: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await _read_request(reader)
        paths.append(head.split(b" ")[1])
        writer.write(_answer(b"{}"))

    async with server(record) as url:
        for transport in (httpx.AsyncHTTPTransport(), AiohttpTransport()):
            async with httpx.AsyncClient(transport=transport) as plain:
                await bounded_request(plain, "POST", f"{url}/a b/é?q=x y", budget=5, content=b"1")
    assert paths[0] == paths[1] == b"/a%20b/%C3%A9?q=x%20y"
