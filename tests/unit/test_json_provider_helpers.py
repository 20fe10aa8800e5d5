"""The helpers the JSON providers share (``providers/base.py``): one bounded POST, sizes, the
sender, header values, error building."""

from __future__ import annotations

import asyncio
import base64
import email.header
from collections.abc import AsyncIterator

import httpx
import pytest
from structlog.testing import capture_logs

from smtp2api import config
from smtp2api.errors import (
    OutcomeUnknown,
    PayloadBug,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
)
from smtp2api.models import Address, Attachment, Envelope, Message
from smtp2api.providers import postmark, resend, sendgrid
from smtp2api.providers.base import (
    MAX_ERROR_BODY,
    make_error,
)
from smtp2api.providers.jsonapi import (
    Base64Bytes,
    JsonStream,
    encode_json,
    ensure_fits,
    header_value,
    json_body,
    json_mime_limit,
    post_json,
    report_payload_bug,
    sender_address,
)
from smtp2api.providers.registry import build_provider
from smtp2api.replies import R451_RATE_LIMITED, R554_BAD_MESSAGE
from tests.support.mock_http import mock_client
from tests.support.models import ENVELOPE, json_message

URL = "https://api.example.net/send"


class Dripping(httpx.AsyncByteStream):
    """A body that sends its first bytes, then stalls."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"id": "x"'
        await asyncio.sleep(5)
        yield b"}"


async def test_post_json_sends_the_body_as_json() -> None:
    async with mock_client(httpx.Response(201, json={"id": "1"})) as (client, calls):
        answer = await post_json(
            client, URL, encode_json({"a": "\u00e9"}), headers={"X-Key": "k"}, budget=5
        )
    assert (answer.status, answer.ok, answer.body) == (201, True, b'{"id":"1"}')
    [request] = calls
    assert request.content == '{"a":"\u00e9"}'.encode()
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["X-Key"] == "k"


async def test_post_json_keeps_a_given_accept_and_bounds_the_body() -> None:
    big = httpx.Response(500, content=b"x" * (MAX_ERROR_BODY * 2))
    async with mock_client(big) as (client, calls):
        answer = await post_json(client, URL, b"{}", headers={"Accept": "*/*"}, budget=5)
    assert calls[0].headers["Accept"] == "*/*"
    assert not answer.ok
    assert len(answer.body) == MAX_ERROR_BODY


async def test_a_status_line_within_the_budget_decides_even_if_the_body_stalls() -> None:
    stalled = httpx.Response(202, headers={"X-Message-Id": "m-1"}, stream=Dripping())
    async with mock_client(stalled) as (client, _):
        answer = await post_json(client, URL, b"{}", headers={}, budget=0.2)
    assert answer.status == 202
    assert answer.headers["X-Message-Id"] == "m-1"


async def test_no_status_line_within_the_budget_is_an_unknown_outcome() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200)

    transport = httpx.MockTransport(slow)
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(OutcomeUnknown):
            await post_json(client, URL, b"{}", headers={}, budget=0.1)


def test_json_limit_leaves_room_for_base64_growth() -> None:
    assert json_mime_limit(40_000_000) == 30_000_000


def test_ensure_fits() -> None:
    ensure_fits(b"x" * 10, 10, "p")
    with pytest.raises(ProviderRejected) as caught:
        ensure_fits(b"x" * 11, 10, "p")
    assert str(caught.value.reply).startswith("552 5.3.4")


def _message(from_: Address | None) -> Message:
    return Message(id="m", raw=b"", from_=from_, to=(Address("a@example.net"),))


def test_sender_is_the_from_header_else_the_envelope() -> None:
    envelope = Envelope("bounce@example.com", ("a@example.net",))
    author = Address("shop@example.com", "Shop")
    assert sender_address(_message(author), envelope) == author
    assert sender_address(_message(None), envelope) == Address("bounce@example.com")
    with pytest.raises(ProviderRejected) as caught:
        sender_address(_message(None), Envelope("", ("a@example.net",)))
    assert caught.value.reply.code == 554


def test_header_values_are_ascii_for_unstructured_headers_only() -> None:
    encoded = header_value("X-Campaign", "Fr\u00fchling")
    assert encoded.isascii()
    [(raw, charset)] = email.header.decode_header(encoded)
    assert (raw.decode(charset), charset) == ("Fr\u00fchling", "utf-8")
    assert header_value("X-Plain", "spring") == "spring"
    assert header_value("Message-ID", "<\u00fc@example.com>") == "<\u00fc@example.com>"


def test_make_error_shows_the_reason_only_when_the_message_is_at_fault() -> None:
    headers = {"Retry-After": "7", "X-Request-Id": "req-1"}
    permanent = make_error(
        ProviderRejected, R554_BAD_MESSAGE, status=422, headers=headers, reason="bad subject"
    )
    assert str(permanent.reply) == (
        "554 5.6.0 Message rejected: malformed content: bad subject (request_id=req-1)"
    )
    transient = make_error(
        RateLimited,
        R451_RATE_LIMITED,
        status=429,
        headers=headers,
        provider_code="429",
        reason="slow down",
    )
    assert isinstance(transient, RateLimited)
    assert transient.retry_after == 7.0
    assert "slow down" not in str(transient.reply)
    assert "slow down" in transient.detail
    assert transient.status == 429


def test_only_payload_bugs_are_reported() -> None:
    with capture_logs() as logs:
        report_payload_bug("p", PayloadBug("ours", status=400, provider_code="x"))
        report_payload_bug("p", ProviderUnavailable("theirs", status=503))
    assert [(e["event"], e["log_level"], e["status"]) for e in logs] == [
        ("provider_payload_refused", "error", 400)
    ]


@pytest.mark.parametrize(
    ("module", "settings"),
    [
        (postmark, config.PostmarkProvider(type="postmark", server_token="pm-token-0123456789")),
        (resend, config.ResendProvider(type="resend", api_key="re_0123456789abcdef")),
        (sendgrid, config.SendgridProvider(type="sendgrid", api_key="SG.0123456789abcdef")),
    ],
    ids=["postmark", "resend", "sendgrid"],
)
async def test_too_large_a_request_is_refused_before_sending(
    module: object, settings: config.ProviderSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(module, "MAX_REQUEST_BYTES", 1000)
    big = json_message(attachments=(Attachment("big.bin", "application/octet-stream", b"x" * 900),))
    async with mock_client(httpx.Response(200, json={"id": "x"})) as (client, calls):
        with pytest.raises(ProviderRejected) as caught:
            await build_provider("json", settings, client).send(big, ENVELOPE)
    assert calls == []
    assert str(caught.value.reply).startswith("552 5.3.4")


# --- json_body ---------------------------------------------------------------------------


async def _joined(stream: JsonStream) -> bytes:
    return b"".join([piece async for piece in stream])


def test_json_body_without_base64_is_the_encoded_json() -> None:
    payload = {"subject": "Gr\u00fc\u00dfe", "to": [{"email": "a@example.net"}], "n": None}
    assert json_body(payload) == encode_json(payload)
    with pytest.raises(ValueError, match="JSON compliant"):
        json_body({"score": float("nan")})  # as httpx's json=: no NaN in a request body
    with pytest.raises(TypeError, match="not JSON serializable"):
        json_body({"when": object()})


@pytest.mark.parametrize("sizes", [(0,), (1,), (2,), (3,), (196_607, 196_608, 196_609), (700_001,)])
async def test_json_body_streams_base64_exactly_as_the_eager_encoding(
    sizes: tuple[int, ...],
) -> None:
    blobs = [bytes(range(256)) * (size // 256) + b"\xff" * (size % 256) for size in sizes]
    streamed = json_body(
        {
            "text": "\u00e9",
            "attachments": [{"content": Base64Bytes(b), "n": i} for i, b in enumerate(blobs)],
        }
    )
    eager = {
        "text": "\u00e9",
        "attachments": [
            {"content": base64.b64encode(b).decode(), "n": i} for i, b in enumerate(blobs)
        ],
    }
    assert isinstance(streamed, JsonStream)
    sent = await _joined(streamed)
    assert sent == encode_json(eager)
    assert streamed.length == len(sent)
    assert await _joined(streamed) == sent  # a second pass (a retried send) is the same body


async def test_json_body_sends_base64_in_slices() -> None:
    # Never the whole base64 text at once: at most 256 KiB of it per piece.
    data = b"\x00" * 3_000_000
    body = json_body({"attachments": [{"content": Base64Bytes(data)}]})
    assert isinstance(body, JsonStream)
    assert body.length == len('{"attachments":[{"content":""}]}') + 4_000_000
    sizes = [len(piece) async for piece in body]
    assert max(sizes) <= 256 * 1024
    assert sum(sizes) == body.length
