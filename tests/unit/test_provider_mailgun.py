"""The ``mailgun`` provider against ``httpx.MockTransport``: the multipart request, every error."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

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
from smtp2api.models import Address, Envelope, Message, SendResult
from smtp2api.providers import mailgun
from smtp2api.providers.base import Provider
from smtp2api.providers.mailgun import MailgunProvider
from smtp2api.providers.registry import build_provider
from tests.support.fake_mailgun import Form, parse_form

API_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
URL = "https://api.mailgun.net/v3/mg.example.com/messages.mime"
RAW = (
    b"Received: from client.test by gw.test\r\n"
    b"From: App <app@example.com>\r\nTo: alice@example.net\r\nSubject: hi\r\n\r\nHello\r\n"
)
ENVELOPE = Envelope("bounce@example.com", ("alice@example.net", "hidden@example.org"))


def make_message(**changes: Any) -> Message:
    fields: dict[str, Any] = {
        "id": "01J0MSGID0000000000000000",
        "raw": RAW,
        "from_": Address("app@example.com", "App"),
        "to": (Address("alice@example.net"),),
        "bcc": (Address("hidden@example.org"),),
        "subject": "hi",
        "text": "Hello",
        "tags": ("welcome",),
        "metadata": {"order": "42"},
    }
    fields.update(changes)
    return Message(**fields)


def settings(**changes: Any) -> config.MailgunProvider:
    data: dict[str, Any] = {
        "type": "mailgun",
        "api_key": API_KEY,
        "domain": "mg.example.com",
        "timeout": 5,
    }
    data.update(changes)
    return config.MailgunProvider(**data)


Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.handler(request)


def ok(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200, json={"id": "<20261128.1.abc@mg.example.com>", "message": "Queued. Thank you."}
    )


Make = Callable[..., tuple[MailgunProvider, Recorder]]


@pytest.fixture
async def make_provider() -> AsyncIterator[Make]:
    clients: list[httpx.AsyncClient] = []

    def make(handler: Handler = ok, **changes: Any) -> tuple[MailgunProvider, Recorder]:
        recorder = Recorder(handler)
        client = httpx.AsyncClient(transport=httpx.MockTransport(recorder))
        clients.append(client)
        return MailgunProvider("mg", settings(**changes), client), recorder

    yield make
    for client in clients:
        await client.aclose()


def form_of(request: httpx.Request) -> Form:
    return parse_form(request.headers["Content-Type"], request.content)


# --- the request -----------------------------------------------------------------------


async def test_posts_the_exact_multipart_request(make_provider: Make) -> None:
    provider, recorder = make_provider()
    assert isinstance(provider, Provider)
    result = await provider.send(make_message(), ENVELOPE)

    # Mailgun's id is "<...>"; the reply carries it without the brackets.
    assert result == SendResult(provider="mg", provider_id="20261128.1.abc@mg.example.com")
    (request,) = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == URL
    expected = base64.b64encode(f"api:{API_KEY}".encode()).decode()
    assert request.headers["Authorization"] == f"Basic {expected}"
    assert request.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    form = form_of(request)
    assert form.fields == {
        "to": ["alice@example.net", "hidden@example.org"],
        "o:tag": ["welcome"],
        "v:order": ["42"],
    }
    assert form.files == {"message": ("message.eml", "message/rfc822", RAW)}


async def test_to_is_the_envelope_of_the_call_each_once(make_provider: Make) -> None:
    provider, recorder = make_provider()
    envelope = Envelope("", ("hidden@example.org", "hidden@example.org"))
    await provider.send(make_message(tags=(), metadata={}), envelope)
    assert form_of(recorder.requests[0]).fields == {"to": ["hidden@example.org"]}


async def test_binary_mime_is_sent_unchanged(make_provider: Make) -> None:
    provider, recorder = make_provider()
    raw = RAW + bytes(range(256)) + b"\r\n--\r\n" * 3
    await provider.send(make_message(raw=raw), ENVELOPE)
    assert form_of(recorder.requests[0]).files["message"][2] == raw


async def test_tags_are_capped_and_cleaned(make_provider: Make) -> None:
    provider, recorder = make_provider()
    tags = ("caf\u00e9", "Welcome", "welcome", "x" * 200, *(f"t{i}" for i in range(12)))
    with capture_logs() as logs:
        await provider.send(make_message(tags=tags), ENVELOPE)
    sent = form_of(recorder.requests[0]).fields["o:tag"]
    assert len(sent) == mailgun.MAX_TAGS
    assert sent[:3] == ["caf_", "Welcome", "x" * 128]  # tags are case-insensitive upstream
    assert any(entry["event"] == "mailgun_tags_dropped" for entry in logs)


async def test_options_are_kept_within_16_kb(make_provider: Make) -> None:
    provider, recorder = make_provider()
    metadata = {f"k{i}": "v" * 3000 for i in range(8)} | {"small": "1"}
    with capture_logs() as logs:
        await provider.send(make_message(metadata=metadata), ENVELOPE)
    fields = form_of(recorder.requests[0]).fields
    options = {k: v for k, v in fields.items() if k.startswith(("o:", "v:", "h:", "t:"))}
    size = sum(len(k.encode()) + len(v.encode()) for k, vs in options.items() for v in vs)
    assert size <= 16 * 1024
    assert fields["v:k0"] == ["v" * 3000]  # whole values, in order, until the budget ends
    assert "v:k7" not in fields
    assert fields["v:small"] == ["1"]  # a later small one that fits still goes
    [entry] = [e for e in logs if e["event"] == "mailgun_variables_dropped"]
    assert entry["log_level"] == "warning"
    assert entry["dropped"] == 3


async def test_unicode_metadata(make_provider: Make) -> None:
    provider, recorder = make_provider()
    await provider.send(make_message(metadata={"kunde": "J\u00f6rg \u2603"}), ENVELOPE)
    assert form_of(recorder.requests[0]).fields["v:kunde"] == ["J\u00f6rg \u2603"]


@pytest.mark.parametrize(
    ("changes", "url"),
    [
        (
            {"base_url": "https://api.eu.mailgun.net"},
            "https://api.eu.mailgun.net/v3/mg.example.com/messages.mime",
        ),
        ({"domain": "a/b?c"}, "https://api.mailgun.net/v3/a%2Fb%3Fc/messages.mime"),
    ],
)
async def test_endpoint(make_provider: Make, changes: dict[str, Any], url: str) -> None:
    provider, recorder = make_provider(**changes)
    await provider.send(make_message(), ENVELOPE)
    assert str(recorder.requests[0].url) == url


def test_limits_registry_and_repr() -> None:
    provider = build_provider("mg", settings(), httpx.AsyncClient())
    assert isinstance(provider, MailgunProvider)
    assert provider.max_recipients == 1000
    assert provider.max_message_size == 25_000_000
    assert provider.raw_mime is True
    assert API_KEY not in repr(provider)


# --- errors ----------------------------------------------------------------------------------


async def fail(make: Make, response: httpx.Response) -> DeliveryError:
    provider, _ = make(lambda _request: response)
    with pytest.raises(DeliveryError) as caught:
        await provider.send(make_message(), ENVELOPE)
    return caught.value


def answer(status: int, body: Any, **headers: str) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body).encode(), headers=headers)


OPTIONS_16KB = "Send options (parameters starting with o:, h:, or v:) are limited to 16KB total"
SANDBOX = (
    "Sandbox subdomains are for test purposes only. Please add your own domain or add the "
    "address to authorized recipients in Account Settings."
)
RATE = (
    "Domain mg.example.com is not allowed to send: account-requests-per-sec limit exceeded, "
    "try again after 120 seconds"
)
ERRORS = [
    (
        400,
        {"message": "'to' parameter is not a valid address. please check documentation."},
        ProviderRejected,
        "553 5.1.3",
    ),
    (400, {"message": "to parameter is missing"}, ProviderRejected, "553 5.1.3"),
    (400, {"message": "from parameter is missing. "}, ProviderRejected, "554 5.6.0"),
    (
        400,
        {"message": OPTIONS_16KB},
        PayloadBug,
        "451 4.3.0",
    ),
    (400, {"message": "'message' parameter is missing"}, PayloadBug, "451 4.3.0"),
    (
        400,
        {"message": SANDBOX},
        ProviderRejected,
        "550 5.7.1",
    ),
    (401, "Forbidden", ProviderConfigError, "451 4.3.5"),
    (403, {"message": "Domain mg.example.com is disabled"}, ProviderConfigError, "451 4.3.5"),
    (404, {"message": "Domain not found: mg.example.com"}, ProviderConfigError, "451 4.3.5"),
    (
        429,
        {"message": RATE},
        RateLimited,
        "451 4.7.0",
    ),
    (413, {"message": "Request Entity Too Large"}, ProviderRejected, "552 5.3.4"),
    (500, {"message": "Internal Server Error"}, ProviderUnavailable, "451 4.3.0"),
    (503, {"message": "Service Unavailable"}, ProviderUnavailable, "451 4.3.0"),
]


@pytest.mark.parametrize(("status", "body", "cls", "reply"), ERRORS)
async def test_error_mapping(
    make_provider: Make, status: int, body: Any, cls: type[DeliveryError], reply: str
) -> None:
    error = await fail(make_provider, answer(status, body, **{"X-Request-Id": "mg-req-1"}))
    assert type(error) is cls
    assert str(error.reply).startswith(reply + " ")
    assert error.status == status
    assert error.request_id == "mg-req-1"
    assert "request_id=mg-req-1" in str(error.reply)
    text = body if isinstance(body, str) else body["message"]
    # The sender sees Mailgun's reason only when the message is at fault.
    assert (text[:20] in str(error.reply)) is error.reply.is_permanent


async def test_rate_limit_wait_from_the_text_or_a_header(make_provider: Make) -> None:
    text = {"message": "limit exceeded, try again after 120 seconds"}
    error = await fail(make_provider, answer(429, text))
    assert isinstance(error, RateLimited)
    assert error.retry_after == 120.0
    error = await fail(make_provider, answer(429, text, **{"Retry-After": "5"}))
    assert error.retry_after == 5.0
    assert isinstance(error, RateLimited)
    error = await fail(make_provider, answer(429, {"message": "slow down"}))
    assert isinstance(error, RateLimited)
    assert error.retry_after is None


async def test_payload_bug_is_logged_as_an_error(make_provider: Make) -> None:
    with capture_logs() as logs:
        error = await fail(
            make_provider, answer(400, {"message": "'message' parameter is missing"})
        )
    assert isinstance(error, PayloadBug)
    [entry] = [e for e in logs if e["event"] == "provider_refused_request"]
    assert entry["log_level"] == "error"
    assert entry["status"] == 400


async def test_echoed_key_is_redacted(make_provider: Make) -> None:
    error = await fail(make_provider, answer(400, {"message": f"bad key {API_KEY} here"}))
    assert API_KEY not in str(error.reply)
    assert API_KEY not in error.detail


async def test_success_without_an_id(make_provider: Make) -> None:
    provider, _ = make_provider(lambda _r: httpx.Response(200, content=b"<html>ok</html>"))
    assert (await provider.send(make_message(), ENVELOPE)).provider_id is None


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (httpx.ConnectError("refused"), ConnectFailed),
        (httpx.ReadTimeout("slow"), OutcomeUnknown),
        (httpx.RemoteProtocolError("reset"), OutcomeUnknown),
    ],
)
async def test_transport_errors(
    make_provider: Make, exc: Exception, cls: type[DeliveryError]
) -> None:
    def boom(_request: httpx.Request) -> httpx.Response:
        raise exc

    provider, _ = make_provider(boom)
    with pytest.raises(cls):
        await provider.send(make_message(), ENVELOPE)
