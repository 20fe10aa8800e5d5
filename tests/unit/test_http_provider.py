"""The generic ``http`` provider against ``httpx.MockTransport``: exact requests, every status."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from smtp2api import config
from smtp2api.errors import (
    ConnectFailed,
    DeliveryError,
    OutcomeUnknown,
    PayloadBug,
    ProviderConfigError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
)
from smtp2api.models import Address, Attachment, Envelope, Message, SendResult
from smtp2api.providers.base import MAX_ERROR_BODY, Provider
from smtp2api.providers.http import (
    MAX_MESSAGE_SIZE,
    STREAM_ATTACHMENTS,
    HttpApiProvider,
    endpoint,
    names_recipient_field,
)

API_KEY = "sk_test_0123456789abcdefghijklmnopqrstuv"
URL = "https://api.example.net/v1/emails"

Handler = Callable[[httpx.Request], Awaitable[httpx.Response] | httpx.Response]


def make_message(**changes: Any) -> Message:
    fields: dict[str, Any] = {
        "id": "01J0MSGID0000000000000000",
        "raw": b"From: Sender <sender@example.com>\r\nTo: rcpt@example.net\r\n\r\nHi\r\n",
        "from_": Address("sender@example.com", "Sender"),
        "to": (Address("rcpt@example.net", "Rcpt"),),
        "cc": (Address("cc@example.net"),),
        "bcc": (Address("hidden@example.net"),),
        "subject": "Hello \u00e9",
        "text": "Hi",
        "html": "<p>Hi</p>",
        "headers": (("X-Campaign", "spring"),),
        "attachments": (Attachment("a.txt", "text/plain", b"data"),),
        "tags": ("welcome",),
        "metadata": {"order": "42"},
    }
    fields.update(changes)
    return Message(**fields)


ENVELOPE = Envelope(
    "bounce@example.com", ("rcpt@example.net", "cc@example.net", "hidden@example.net")
)


def settings(**changes: Any) -> config.HttpProvider:
    data: dict[str, Any] = {
        "type": "http",
        "url": URL,
        "api_key": API_KEY,
        "headers": {"X-Tenant": "acme"},
        "timeout": 5,
    }
    data.update(changes)
    return config.HttpProvider(**data)


class Recorder:
    """A MockTransport handler that answers from a script and keeps the requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = self.handler(request)
        if isinstance(response, httpx.Response):
            return response
        return await response


@pytest.fixture
async def make_provider() -> AsyncIterator[Callable[..., tuple[HttpApiProvider, Recorder]]]:
    clients: list[httpx.AsyncClient] = []

    def make(handler: Handler, **changes: Any) -> tuple[HttpApiProvider, Recorder]:
        recorder = Recorder(handler)
        client = httpx.AsyncClient(transport=httpx.MockTransport(recorder), follow_redirects=False)
        clients.append(client)
        return HttpApiProvider("main", settings(**changes), client), recorder

    yield make
    for client in clients:
        await client.aclose()


Make = Callable[..., tuple[HttpApiProvider, Recorder]]


async def fail(make: Make, response: httpx.Response) -> DeliveryError:
    provider, _ = make(lambda _request: response)
    with pytest.raises(DeliveryError) as caught:
        await provider.send(make_message(), ENVELOPE)
    return caught.value


# --- the request -----------------------------------------------------------------------


async def test_posts_the_exact_request(make_provider: Make) -> None:
    provider, recorder = make_provider(lambda _r: httpx.Response(202, json={"id": "prov-1"}))
    message = make_message()
    result = await provider.send(message, ENVELOPE)

    assert result == SendResult(provider="main", provider_id="prov-1")
    (request,) = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == URL
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Idempotency-Key"] == message.id
    assert request.headers["X-Smtp2api-Id"] == message.id
    assert request.headers["X-Tenant"] == "acme"
    assert json.loads(request.content) == message.as_json()


async def test_without_api_key_sends_no_authorization(make_provider: Make) -> None:
    provider, recorder = make_provider(lambda _r: httpx.Response(200), api_key=None, headers={})
    await provider.send(make_message(), ENVELOPE)
    assert "Authorization" not in recorder.requests[0].headers


async def test_protocol_headers_win_over_configured_ones(make_provider: Make) -> None:
    configured = {"content-type": "text/plain", "Idempotency-Key": "fixed", "X-Api-Key": "k-123"}
    provider, recorder = make_provider(lambda _r: httpx.Response(200), headers=configured)
    await provider.send(make_message(), ENVELOPE)
    headers = recorder.requests[0].headers
    assert headers["Content-Type"] == "application/json"
    assert headers.get_list("Idempotency-Key") == [make_message().id]
    assert headers["X-Api-Key"] == "k-123"


async def test_same_idempotency_key_on_every_attempt(make_provider: Make) -> None:
    answers = iter([httpx.Response(503), httpx.Response(200, json={"id": "x"})])
    provider, recorder = make_provider(lambda _r: next(answers))
    with pytest.raises(ProviderUnavailable):
        await provider.send(make_message(), ENVELOPE)
    await provider.send(make_message(), ENVELOPE)
    keys = [r.headers["Idempotency-Key"] for r in recorder.requests]
    assert keys == [make_message().id] * 2


async def test_base_url_replaces_the_origin(make_provider: Make) -> None:
    provider, recorder = make_provider(
        lambda _r: httpx.Response(200), url=URL + "?region=eu", base_url="http://127.0.0.1:8025/"
    )
    await provider.send(make_message(), ENVELOPE)
    assert str(recorder.requests[0].url) == "http://127.0.0.1:8025/v1/emails?region=eu"
    assert endpoint(settings()) == URL


async def test_body_is_cut_to_the_envelope(make_provider: Make) -> None:
    provider, recorder = make_provider(lambda _r: httpx.Response(200))
    chunk = Envelope("bounce@example.com", ("cc@example.net", "extra@example.org"))
    await provider.send(make_message(), chunk)
    body = json.loads(recorder.requests[0].content)
    assert body["to"] == []
    assert body["cc"] == [{"email": "cc@example.net"}]
    assert body["bcc"] == [{"email": "extra@example.org"}]


async def test_large_attachments_are_streamed_with_their_length(make_provider: Make) -> None:
    provider, recorder = make_provider(lambda _r: httpx.Response(202, json={"id": "big"}))
    data = bytes(range(256)) * (STREAM_ATTACHMENTS // 256 + 1)
    message = make_message(
        attachments=(
            Attachment("big.bin", "application/octet-stream", data),
            Attachment("logo.png", "image/png", b"png", "inline", "logo@example.com"),
        )
    )
    assert (await provider.send(message, ENVELOPE)).provider_id == "big"
    (request,) = recorder.requests
    assert "Transfer-Encoding" not in request.headers  # a length: not every API takes chunks
    assert request.headers["Content-Length"] == str(len(request.content))
    assert request.headers.get_list("Idempotency-Key") == [message.id]
    assert json.loads(request.content) == message.as_json()
    # Below the threshold the body is the same JSON, made at once.
    small = make_message(attachments=(Attachment("a.bin", "application/octet-stream", data[:9]),))
    await provider.send(small, ENVELOPE)
    assert json.loads(recorder.requests[1].content) == small.as_json()


async def test_shape_and_limits() -> None:
    async with httpx.AsyncClient() as client:
        provider = HttpApiProvider("main", settings(), client)
        assert isinstance(provider, Provider)
        assert provider.raw_mime is False
        assert provider.max_recipients == 1000
        assert provider.max_message_size == MAX_MESSAGE_SIZE == 30_000_000
        assert API_KEY not in repr(provider)
        await provider.aclose()
        assert not client.is_closed  # the shared client belongs to app.py


# --- 2xx -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(200, json={"id": "a-1"}), "a-1"),
        (httpx.Response(201, json={"message_id": "b-2"}), "b-2"),
        (httpx.Response(202, json={"messageId": "c-3"}), "c-3"),
        (httpx.Response(200, json={"MessageId": "d-4"}), "d-4"),
        (httpx.Response(200, json={"MessageId": "d", "messageId": "c", "id": "a"}), "a"),
        (httpx.Response(200, json={"id": 12345}), "12345"),
        (httpx.Response(200, json={"id": True, "message_id": "m"}), "m"),
        (httpx.Response(202, headers={"X-Message-Id": "hdr-5"}), "hdr-5"),
        (httpx.Response(200, json={"status": "ok"}, headers={"X-Message-Id": "hdr-6"}), "hdr-6"),
        (httpx.Response(200, json=["not", "an", "object"]), None),
        (httpx.Response(200, content=b"<html>OK</html>"), None),
        (httpx.Response(204), None),
        (httpx.Response(200, json={"id": "evil\r\n250 fake"}), "evil 250 fake"),
    ],
)
async def test_success(make_provider: Make, response: httpx.Response, expected: str | None) -> None:
    provider, _ = make_provider(lambda _r: response)
    assert await provider.send(make_message(), ENVELOPE) == SendResult("main", expected)


async def test_success_with_a_huge_body_reads_at_most_64k(make_provider: Make) -> None:
    huge = b'{"id": "never-parsed", "pad": "' + b"x" * (4 * MAX_ERROR_BODY) + b'"}'
    response = httpx.Response(200, content=huge, headers={"X-Message-Id": "hdr"})
    provider, _ = make_provider(lambda _r: response)
    assert (await provider.send(make_message(), ENVELOPE)).provider_id == "hdr"


class _BrokenBody(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"id": "tru'
        raise httpx.ReadError("connection reset")


async def test_success_whose_body_breaks_is_still_a_success(make_provider: Make) -> None:
    # The 2xx status line means the API took the message: a retry would send it twice.
    response = httpx.Response(202, headers={"X-Message-Id": "hdr-7"}, stream=_BrokenBody())
    provider, _ = make_provider(lambda _r: response)
    assert (await provider.send(make_message(), ENVELOPE)).provider_id == "hdr-7"


# --- 400 / 422 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"message": "invalid email", "field": "to"},
        {"errors": [{"field": "cc[0].email", "message": "bad address"}]},
        {"errors": [{"path": ["bcc", 0], "message": "bad"}]},
        {"detail": [{"loc": ["body", "to", 0, "email"], "msg": "not an email"}]},  # FastAPI
        {"errors": [{"source": {"pointer": "/data/attributes/recipients"}, "detail": "x"}]},
        {"errors": {"to": ["is invalid"]}},  # Rails
        {"error": {"param": "personalizations.0.to", "message": "bad"}},
        {"error": "'to' must contain valid email addresses"},
        {"message": "to[1]: invalid address"},
        {"message": "to: invalid address"},
        {"message": "Invalid recipient address"},
        {"message": "bcc list too long"},
    ],
)
@pytest.mark.parametrize("status", [400, 422])
async def test_4xx_naming_a_recipient_field_is_553(
    make_provider: Make, status: int, body: dict[str, Any]
) -> None:
    error = await fail(make_provider, httpx.Response(status, json=body))
    assert isinstance(error, ProviderRejected)
    assert (error.reply.code, error.reply.enhanced) == (553, "5.1.3")
    assert error.reply.is_permanent
    assert error.status == status


@pytest.mark.parametrize(
    "body",
    [
        {"message": "Subject is required"},
        {"message": "Failed to parse html"},  # "to" as a plain word names no field
        {"error": "Attachment type not allowed", "field": "attachments[0]"},
        {"errors": [{"field": "from", "message": "sender not verified"}]},
    ],
)
@pytest.mark.parametrize("status", [400, 422])
async def test_other_4xx_about_the_message_is_554(
    make_provider: Make, status: int, body: dict[str, Any]
) -> None:
    error = await fail(make_provider, httpx.Response(status, json=body))
    assert isinstance(error, ProviderRejected)
    assert (error.reply.code, error.reply.enhanced) == (554, "5.6.0")
    assert error.reply.text.startswith("Message rejected upstream")


async def test_4xx_reply_carries_reason_code_and_request_id(make_provider: Make) -> None:
    response = httpx.Response(
        422,
        json={"message": "Subject is required", "code": "missing_subject"},
        headers={"X-Request-Id": "req-123"},
    )
    error = await fail(make_provider, response)
    assert str(error.reply) == (
        "554 5.6.0 Message rejected upstream: Subject is required "
        "(code=missing_subject, request_id=req-123)"
    )
    recipient = await fail(
        make_provider, httpx.Response(400, json={"message": "bad", "field": "to"})
    )
    assert str(recipient.reply) == "553 5.1.3 Recipient address rejected upstream: bad"


async def test_4xx_hostile_body_never_reaches_the_reply_raw(make_provider: Make) -> None:
    body = {
        "message": "Bad\r\n250 2.0.0 Ok\r\n.\r\nQUIT\r\n"
        f"your key {API_KEY} and sk_live_0000aaaa1111bbbb2222cccc3333dddd " + "A" * 10_000,
        "debug": {"authorization": f"Bearer {API_KEY}", "password": "hunter2hunter2"},
    }
    error = await fail(make_provider, httpx.Response(400, json=body))
    line = str(error.reply)
    assert "\r" not in line
    assert "\n" not in line
    assert API_KEY not in line
    assert "sk_live" not in line
    assert "hunter2" not in line
    assert (
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" not in line
    )
    assert len(line) + 2 <= 512
    assert API_KEY not in error.detail
    assert "hunter2" not in error.detail


@pytest.mark.parametrize(
    "content",
    [
        b"<html><body><h1>400 Bad Request</h1>to: invalid</body></html>",
        b"plain text error with Bearer abc",
        b"\xff\xfe\x00binary",
        b"",
        b'{"message": "truncated',
    ],
)
async def test_4xx_with_non_json_body_is_554_without_text(
    make_provider: Make, content: bytes
) -> None:
    error = await fail(make_provider, httpx.Response(400, content=content))
    assert str(error.reply) == "554 5.6.0 Message rejected upstream"


# --- the other status families ---------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_config_statuses_are_451_435(make_provider: Make, status: int) -> None:
    error = await fail(make_provider, httpx.Response(status, json={"message": "Invalid API key"}))
    assert isinstance(error, ProviderConfigError)
    assert (error.reply.code, error.reply.enhanced) == (451, "4.3.5")
    assert "Invalid API key" not in str(error.reply)


async def test_413_is_552(make_provider: Make) -> None:
    error = await fail(make_provider, httpx.Response(413, text="<html>too big</html>"))
    assert isinstance(error, ProviderRejected)
    assert (error.reply.code, error.reply.enhanced) == (552, "5.3.4")


async def test_429_with_retry_after_seconds(make_provider: Make) -> None:
    error = await fail(make_provider, httpx.Response(429, headers={"Retry-After": "30"}))
    assert isinstance(error, RateLimited)
    assert (error.reply.code, error.reply.enhanced) == (451, "4.7.0")
    assert error.retry_after == 30.0


async def test_429_with_retry_after_http_date(make_provider: Make) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    error = await fail(make_provider, httpx.Response(429, headers={"Retry-After": when}))
    assert isinstance(error, RateLimited)
    assert str(error.reply).startswith("451 4.7.0 ")
    assert error.retry_after is not None
    assert 110 <= error.retry_after <= 120


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_451_430(make_provider: Make, status: int) -> None:
    response = httpx.Response(status, text="<html>Bad Gateway</html>", headers={"Retry-After": "5"})
    error = await fail(make_provider, response)
    assert isinstance(error, ProviderUnavailable)
    assert str(error.reply) == "451 4.3.0 Upstream error, try again later"
    assert error.retry_after == 5.0


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_not_followed(make_provider: Make, status: int) -> None:
    location = {"Location": "https://evil.example.org/steal"}
    provider, recorder = make_provider(lambda _r: httpx.Response(status, headers=location))
    with pytest.raises(ProviderConfigError) as caught:
        await provider.send(make_message(), ENVELOPE)
    assert (caught.value.reply.code, caught.value.reply.enhanced) == (451, "4.3.5")
    assert len(recorder.requests) == 1
    assert "evil" not in str(caught.value.reply)


@pytest.mark.parametrize(
    ("status", "expected"),
    [(408, OutcomeUnknown), (409, OutcomeUnknown), (415, PayloadBug), (418, ProviderUnavailable)],
)
async def test_other_statuses_stay_transient(
    make_provider: Make, status: int, expected: type[DeliveryError]
) -> None:
    error = await fail(make_provider, httpx.Response(status))
    assert type(error) is expected
    assert error.reply.is_transient


# --- transport failures ----------------------------------------------------------------


def _raising(exc: Exception) -> Handler:
    def handler(_request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("[Errno 111] Connection refused to 10.0.0.1"),
        httpx.ConnectTimeout("timed out"),
        httpx.PoolTimeout("pool"),
    ],
)
async def test_connect_failures_are_451_441(make_provider: Make, exc: Exception) -> None:
    provider, _ = make_provider(_raising(exc))
    with pytest.raises(ConnectFailed) as caught:
        await provider.send(make_message(), ENVELOPE)
    assert str(caught.value.reply) == "451 4.4.1 Upstream unreachable, try again later"
    assert type(exc).__name__ in caught.value.detail


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ReadTimeout("read timed out"),
        httpx.WriteTimeout("write timed out"),
        httpx.ReadError("reset by peer"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
)
async def test_failures_after_sending_are_451_442(make_provider: Make, exc: Exception) -> None:
    provider, _ = make_provider(_raising(exc))
    with pytest.raises(OutcomeUnknown) as caught:
        await provider.send(make_message(), ENVELOPE)
    assert str(caught.value.reply) == "451 4.4.2 Upstream timeout, try again later"


async def test_overall_deadline_bounds_the_call(make_provider: Make) -> None:
    async def hang(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200)

    provider, _ = make_provider(hang, timeout=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(OutcomeUnknown) as caught:
        await provider.send(make_message(), ENVELOPE)
    assert loop.time() - started < 2
    assert "deadline" in caught.value.detail


def test_names_recipient_field_ignores_non_objects() -> None:
    assert names_recipient_field(None) is False
    assert names_recipient_field(["to"]) is False
    assert names_recipient_field({"message": "Unable to process"}) is False
