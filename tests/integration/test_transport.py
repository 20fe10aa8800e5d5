"""The aiohttp-backed transport against real local servers: the same answers and the same
httpx exceptions (hence the same delivery errors) as httpx's own transport."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from smtp2api.aiohttp_transport import AiohttpTransport
from smtp2api.errors import ConnectFailed, OutcomeUnknown
from smtp2api.providers.base import RequestProgress, map_http_errors
from smtp2api.providers.request import bounded_request
from smtp2api.transport import new_http_client, transport_name

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
        return head, body
    return head, await reader.readexactly(length)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            head, body = await _read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        path = head.split(b" ")[1]
        answer = b'{"path": "%s", "length": %d}' % (path, len(body))
        writer.write(
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nX-Request-Id: r-1\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
        )
        await writer.drain()


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.close()  # the request was read: the outcome is unknown to the client


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b"this is not HTTP at all\r\n\r\n")
    await writer.drain()
    writer.close()


async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    await asyncio.sleep(5)
    writer.close()


async def short_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"id": ')
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def server(behaviour: Behaviour) -> AsyncIterator[str]:
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await srv.wait_closed()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


TRANSPORTS: dict[str, Callable[[], httpx.AsyncBaseTransport]] = {
    "httpx": httpx.AsyncHTTPTransport,
    "aiohttp": lambda: AiohttpTransport(max_connections=10),
}


@pytest.fixture(params=sorted(TRANSPORTS))
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=TRANSPORTS[request.param]()) as shared:
        yield shared


async def test_default_client_uses_aiohttp() -> None:
    async with new_http_client(10) as shared:
        assert transport_name(shared) == "aiohttp"


async def test_round_trip_json_and_streamed_bodies(client: httpx.AsyncClient) -> None:
    async with server(echo) as url:
        response = await client.post(f"{url}/v1/emails", json={"to": ["a@example.com"]})
        assert response.status_code == 201
        assert response.headers["x-request-id"] == "r-1"
        assert response.json() == {"path": "/v1/emails", "length": len(b'{"to":["a@example.com"]}')}

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"x" * 1000

        streamed = await client.post(f"{url}/stream", content=chunks())
        assert streamed.json() == {"path": "/stream", "length": 3000}
        # Keep-alive: the next request reuses a connection and still works.
        again = await client.get(f"{url}/again")
        assert again.json()["path"] == "/again"


async def _classify(call: Callable[[RequestProgress], Awaitable[Any]]) -> tuple[type, type]:
    """(httpx exception raised, delivery error map_http_errors makes of it)."""
    progress = RequestProgress()
    raised: type = type(None)
    try:
        with map_http_errors(progress):
            try:
                await call(progress)
            except httpx.HTTPError as exc:
                raised = type(exc)
                raise
    except (ConnectFailed, OutcomeUnknown) as exc:
        return raised, type(exc)
    raise AssertionError("no error")


@pytest.mark.parametrize(
    ("behaviour", "expected_httpx", "expected_error"),
    [
        (hang_up, httpx.RemoteProtocolError, OutcomeUnknown),
        (garbage, httpx.RemoteProtocolError, OutcomeUnknown),
        (short_body, httpx.RemoteProtocolError, OutcomeUnknown),
        (slow, httpx.ReadTimeout, OutcomeUnknown),
    ],
)
async def test_failures_map_like_httpx(
    client: httpx.AsyncClient,
    behaviour: Behaviour,
    expected_httpx: type[Exception],
    expected_error: type[Exception],
) -> None:
    async with server(behaviour) as url:

        async def call(progress: RequestProgress) -> None:
            response = await client.post(
                f"{url}/v1/emails",
                json={"a": 1},
                timeout=httpx.Timeout(2.0, read=0.3),
                extensions={"trace": progress.trace},
            )
            response.raise_for_status()

        raised, error = await _classify(call)
    assert issubclass(raised, expected_httpx)
    assert error is expected_error


async def test_refused_connection_is_connect_failed(client: httpx.AsyncClient) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1/emails"

    async def call(progress: RequestProgress) -> None:
        await client.post(url, json={}, extensions={"trace": progress.trace})

    raised, error = await _classify(call)
    assert issubclass(raised, httpx.ConnectError)
    assert error is ConnectFailed


async def test_trace_tells_sent_from_not_sent(client: httpx.AsyncClient) -> None:
    async with server(slow) as url:
        progress = RequestProgress()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.post(url, json={}, extensions={"trace": progress.trace})
        assert progress.traced
        assert progress.maybe_sent  # the request went out: a retry must reuse the id


async def test_a_deadline_while_waiting_for_a_pooled_connection_is_never_sent() -> None:
    # The only connection is busy: the second request waits in aiohttp's pool, unsent, and
    # a deadline there is "never sent" (451 4.4.1), safe to fail over at once.
    arrived = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        arrived.set()
        await asyncio.sleep(5)

    async with (
        server(hold) as url,
        httpx.AsyncClient(transport=AiohttpTransport(max_connections=1)) as client,
    ):
        first = asyncio.create_task(bounded_request(client, "POST", url, budget=5, content=b"1"))
        await arrived.wait()
        with pytest.raises(ConnectFailed):
            await bounded_request(client, "POST", url, budget=0.3, content=b"2")
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
