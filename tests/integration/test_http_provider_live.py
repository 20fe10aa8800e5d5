"""The generic ``http`` provider over real sockets: real httpx client, real local HTTP server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from smtp2api import config
from smtp2api.errors import (
    ConnectFailed,
    OutcomeUnknown,
    ProviderConfigError,
    ProviderRejected,
    ProviderUnavailable,
)
from smtp2api.models import Address, Attachment, Envelope, Message, SendResult
from smtp2api.providers.http import STREAM_ATTACHMENTS, HttpApiProvider
from smtp2api.providers.upstream import guard_client
from smtp2api.transport import new_http_client
from tests.support.fakeapi import Answer, FakeAPI

API_KEY = "live-test-key-0123456789"
ENVELOPE = Envelope("sender@example.com", ("rcpt@example.net",))
MESSAGE = Message(
    id="01J0LIVE00000000000000000",
    raw=b"Subject: live\r\n\r\nhello\r\n",
    from_=Address("sender@example.com"),
    to=(Address("rcpt@example.net"),),
    subject="live",
    text="hello",
)


@pytest.fixture
async def api() -> AsyncIterator[FakeAPI]:
    async with FakeAPI() as server:
        yield server


@pytest.fixture(params=["httpx", "gateway"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    # Redirects are never followed (design §8). "gateway": the client app.py builds (the
    # aiohttp transport, the upstream guard), on which bounded_request takes its direct path.
    if request.param == "httpx":
        shared = httpx.AsyncClient(follow_redirects=False)
    else:
        shared = new_http_client(10)
        guard_client(shared)
    async with shared:
        yield shared


def provider(client: httpx.AsyncClient, url: str, **changes: Any) -> HttpApiProvider:
    data: dict[str, Any] = {"type": "http", "url": url, "api_key": API_KEY, "timeout": 5}
    data.update(changes)
    return HttpApiProvider("live", config.HttpProvider(**data), client)


async def test_success(api: FakeAPI, client: httpx.AsyncClient) -> None:
    api.push(Answer(202, json={"id": "prov-42"}))
    result = await provider(client, f"{api.url}/v1/emails").send(MESSAGE, ENVELOPE)

    assert result == SendResult(provider="live", provider_id="prov-42")
    (request,) = api.requests
    assert (request.method, request.path) == ("POST", "/v1/emails")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["idempotency-key"] == MESSAGE.id
    assert request.headers["x-smtp2api-id"] == MESSAGE.id
    assert request.headers["content-type"] == "application/json"
    assert request.json == MESSAGE.as_json()


async def test_large_attachment_arrives_whole_with_its_length(
    api: FakeAPI, client: httpx.AsyncClient
) -> None:
    data = bytes(range(256)) * (3 * STREAM_ATTACHMENTS // 256)
    message = Message(
        id="01J0LIVE00000000000000001",
        raw=b"",
        from_=Address("sender@example.com"),
        to=(Address("rcpt@example.net"),),
        text="see attached",
        attachments=(Attachment("data.bin", "application/octet-stream", data),),
    )
    api.push(Answer(202, json={"id": "prov-big"}))
    result = await provider(client, f"{api.url}/v1/emails").send(message, ENVELOPE)

    assert result.provider_id == "prov-big"
    (request,) = api.requests
    assert "transfer-encoding" not in request.headers
    assert request.headers["content-length"] == str(len(request.body))
    assert request.json == message.as_json()


async def test_base_url_points_a_remote_provider_at_the_local_server(
    api: FakeAPI, client: httpx.AsyncClient
) -> None:
    live = provider(client, "https://api.example.net/v1/emails?x=1", base_url=api.url)
    assert (await live.send(MESSAGE, ENVELOPE)).provider_id == "fake-1"
    assert api.requests[0].path == "/v1/emails"
    assert api.requests[0].query == {"x": "1"}


async def test_422_is_the_messages_fault(api: FakeAPI, client: httpx.AsyncClient) -> None:
    api.push(
        Answer(422, json={"message": "html or text required"}, headers={"X-Request-Id": "r-9"}),
        Answer(422, json={"errors": [{"field": "to[0]", "message": "not an address"}]}),
    )
    live = provider(client, api.url)
    with pytest.raises(ProviderRejected) as caught:
        await live.send(MESSAGE, ENVELOPE)
    assert str(caught.value.reply) == (
        "554 5.6.0 Message rejected upstream: html or text required (request_id=r-9)"
    )
    with pytest.raises(ProviderRejected) as caught:
        await live.send(MESSAGE, ENVELOPE)
    assert (caught.value.reply.code, caught.value.reply.enhanced) == (553, "5.1.3")


async def test_503_is_transient_with_retry_after(api: FakeAPI, client: httpx.AsyncClient) -> None:
    api.push(Answer(503, body=b"<html>maintenance</html>", headers={"Retry-After": "12"}))
    with pytest.raises(ProviderUnavailable) as caught:
        await provider(client, api.url).send(MESSAGE, ENVELOPE)
    assert str(caught.value.reply) == "451 4.3.0 Upstream error, try again later"
    assert caught.value.retry_after == 12.0


async def test_answer_slower_than_the_timeout_is_451_442(
    api: FakeAPI, client: httpx.AsyncClient
) -> None:
    api.push(Answer(200, json={"id": "late"}, delay=3))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(OutcomeUnknown) as caught:
        await provider(client, api.url, timeout=0.3).send(MESSAGE, ENVELOPE)
    assert loop.time() - started < 2
    assert (caught.value.reply.code, caught.value.reply.enhanced) == (451, "4.4.2")
    assert len(api.requests) == 1  # it was sent: a retry must reuse the id


async def test_connection_dropped_after_the_request_is_451_442(
    api: FakeAPI, client: httpx.AsyncClient
) -> None:
    api.push(Answer(drop=True))
    with pytest.raises(OutcomeUnknown) as caught:
        await provider(client, api.url).send(MESSAGE, ENVELOPE)
    assert str(caught.value.reply) == "451 4.4.2 Upstream timeout, try again later"


async def test_connection_refused_is_451_441(client: httpx.AsyncClient) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectFailed) as caught:
        await provider(client, f"http://127.0.0.1:{port}/v1/emails").send(MESSAGE, ENVELOPE)
    assert str(caught.value.reply) == "451 4.4.1 Upstream unreachable, try again later"
    assert "ECONNREFUSED" in caught.value.detail or "ConnectError" in caught.value.detail


async def test_tls_handshake_that_never_completes_is_451_441(client: httpx.AsyncClient) -> None:
    # A listener that never accepts: the kernel completes the TCP handshake into the backlog,
    # the TLS handshake gets no answer, and the request is never written.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        live = provider(client, f"https://127.0.0.1:{port}/v1/emails", timeout=0.3)
        with pytest.raises(ConnectFailed) as caught:
            await live.send(MESSAGE, ENVELOPE)
    assert (caught.value.reply.code, caught.value.reply.enhanced) == (451, "4.4.1")


async def test_redirect_is_not_followed(api: FakeAPI, client: httpx.AsyncClient) -> None:
    api.push(Answer(307, headers={"Location": f"{api.url}/elsewhere"}))
    with pytest.raises(ProviderConfigError) as caught:
        await provider(client, api.url).send(MESSAGE, ENVELOPE)
    assert (caught.value.reply.code, caught.value.reply.enhanced) == (451, "4.3.5")
    assert [r.path for r in api.requests] == ["/"]


async def test_huge_error_body_is_read_only_in_part(
    api: FakeAPI, client: httpx.AsyncClient
) -> None:
    api.push(Answer(400, body=b'{"message": "' + b"x" * 5_000_000 + b'"}'))
    with pytest.raises(ProviderRejected) as caught:
        await provider(client, api.url).send(MESSAGE, ENVELOPE)
    assert str(caught.value.reply) == "554 5.6.0 Message rejected upstream"


async def test_threaded_server_serves_a_provider_on_another_loop(client: httpx.AsyncClient) -> None:
    with FakeAPI(default=Answer(201, json={"message_id": "t-1"})).running_in_thread() as api:
        result = await provider(client, api.url).send(MESSAGE, ENVELOPE)
        assert result.provider_id == "t-1"
        (request,) = await api.wait_for_requests(1)
        assert request.json == MESSAGE.as_json()


def test_threaded_server_from_blocking_code() -> None:
    with FakeAPI().running_in_thread() as api:
        api.push(Answer(429, json={"message": "slow down"}, headers={"Retry-After": "3"}))
        first = httpx.post(api.url + "/send", json={"n": 1})
        second = httpx.post(api.url + "/send", json={"n": 2})
        assert (first.status_code, first.headers["retry-after"]) == (429, "3")
        assert second.json() == {"id": "fake-2"}
        assert [r.json for r in api.wait_for_requests_sync(2)] == [{"n": 1}, {"n": 2}]
