"""The ``sendgrid`` provider on ``httpx.MockTransport``: the exact request, every mapped error."""

from __future__ import annotations

import json
import time
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
from smtp2api.models import Address, Attachment, Envelope, Message, SendResult
from smtp2api.providers import sendgrid
from smtp2api.providers.base import Provider
from smtp2api.providers.registry import build_provider
from smtp2api.providers.sendgrid import SendgridProvider
from tests.support.fake_providers import sendgrid_request_validator
from tests.support.mock_http import body_of, mock_client, raising
from tests.support.models import ENVELOPE, PNG, json_message

KEY = "SG.abcdefghijklmnop.0123456789abcdefghijklmnopqrstuvwxyz"
URL = "https://api.sendgrid.com/v3/mail/send"


@pytest.fixture(scope="module")
def spec() -> Any:
    return sendgrid_request_validator()


def make_message(**changes: Any) -> Message:
    fields: dict[str, Any] = {
        "reply_to": (Address("help@example.com", "Help"),),
        "headers": (
            ("X-Campaign", "spring"),
            ("X-Campaign", "second value is dropped"),
            ("List-Unsubscribe", "<mailto:u@example.com>"),
            ("Received", "from nowhere"),
        ),
        "tags": ("welcome",),
        "metadata": {"order": "42"},
    }
    return json_message(**{**fields, **changes})


def settings(**changes: Any) -> config.SendgridProvider:
    return config.SendgridProvider(**{"type": "sendgrid", "api_key": KEY, "timeout": 5, **changes})


def accepted(message_id: str = "W86EgYT6SQKk0lRflfLRsA") -> httpx.Response:
    return httpx.Response(202, headers={"X-Message-Id": message_id})


async def send(
    response: Any, message: Message | None = None, envelope: Envelope = ENVELOPE, **changes: Any
) -> tuple[SendResult, list[httpx.Request]]:
    async with mock_client(response) as (client, calls):
        provider = SendgridProvider("sg", settings(**changes), client)
        result = await provider.send(message or make_message(), envelope)
    return result, calls


async def fail(response: httpx.Response, message: Message | None = None) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        await send(response, message)
    return caught.value


# --- the request -----------------------------------------------------------------------


async def test_posts_the_exact_request(spec: Any) -> None:
    result, [request] = await send(accepted())
    assert result == SendResult(provider="sg", provider_id="W86EgYT6SQKk0lRflfLRsA")
    assert request.method == "POST"
    assert str(request.url) == URL
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    body = body_of(request)
    assert body == {
        "personalizations": [
            {
                "to": [{"email": "rcpt@example.net", "name": "Doe Jane"}],
                "cc": [{"email": "cc@example.net"}],
                "bcc": [{"email": "hidden@example.net"}],
                "custom_args": {"order": "42"},
            }
        ],
        "from": {"email": "sender@example.com", "name": "Sender"},
        "subject": "Hello \u00e9",
        "content": [
            {"type": "text/plain", "value": "Hi"},
            {"type": "text/html", "value": '<p>Hi <img src="cid:logo@example.com"></p>'},
        ],
        "reply_to": {"email": "help@example.com", "name": "Help"},
        "attachments": [
            {
                "content": "JVBERi0xLjQ=",
                "filename": "a.pdf",
                "type": "application/pdf",
                "disposition": "attachment",
            },
            {
                "content": "iVBORw0KGgotaW1hZ2Ut",
                "filename": "logo.png",
                "type": "image/png",
                "disposition": "inline",
                "content_id": "logo@example.com",
            },
        ],
        "headers": {
            "X-Campaign": "spring",
            "List-Unsubscribe": "<mailto:u@example.com>",
            "X-Smtp2api-Id": "01J0MSGID0000000000000000",
        },
        "categories": ["welcome"],
    }
    spec.validate(body)


async def test_base_url_reaches_the_eu_region() -> None:
    _, [request] = await send(accepted(), base_url="https://api.eu.sendgrid.com/")
    assert str(request.url) == "https://api.eu.sendgrid.com/v3/mail/send"


async def test_without_message_id_header_the_id_is_none() -> None:
    result, _ = await send(httpx.Response(202))
    assert result.provider_id is None


async def test_recipients_follow_the_envelope(spec: Any) -> None:
    # A chunk of the envelope: only its recipients, and a header-only address never.
    chunk = Envelope("b@example.com", ("cc@example.net", "extra@example.org"))
    _, [request] = await send(accepted(), envelope=chunk)
    [one] = body_of(request)["personalizations"]
    assert one["to"] == [{"email": "cc@example.net"}]  # Cc alone: promoted to `to`
    assert "cc" not in one
    assert one["bcc"] == [{"email": "extra@example.org"}]
    spec.validate(body_of(request))


async def test_blind_recipients_alone_get_a_personalization_each(spec: Any) -> None:
    message = make_message(to=(), cc=(), bcc=(Address("x@example.org"), Address("y@example.org")))
    envelope = Envelope("b@example.com", ("x@example.org", "y@example.org"))
    _, [request] = await send(accepted(), message, envelope)
    body = body_of(request)
    assert body["personalizations"] == [
        {"to": [{"email": "x@example.org"}], "custom_args": {"order": "42"}},
        {"to": [{"email": "y@example.org"}], "custom_args": {"order": "42"}},
    ]
    spec.validate(body)


async def test_template_sends_id_and_data_instead_of_content(spec: Any) -> None:
    message = make_message(
        template="d-13b8f94fbcae4ec6b75270d6cb59f932",
        template_variables={"name": "Jane", "items": [1, 2]},
        subject="",
    )
    _, [request] = await send(accepted(), message)
    body = body_of(request)
    assert body["template_id"] == "d-13b8f94fbcae4ec6b75270d6cb59f932"
    assert body["personalizations"][0]["dynamic_template_data"] == {"name": "Jane", "items": [1, 2]}
    assert "content" not in body
    assert "subject" not in body  # the template's subject applies
    spec.validate(body)


async def test_empty_subject_and_body_still_make_a_valid_request(spec: Any) -> None:
    message = make_message(subject="", text=None, html="", attachments=(), reply_to=())
    _, [request] = await send(accepted(), message)
    body = body_of(request)
    assert body["subject"] == sendgrid.NO_SUBJECT
    assert body["content"] == [{"type": "text/plain", "value": sendgrid.BLANK_BODY}]
    assert "reply_to" not in body
    assert "attachments" not in body
    spec.validate(body)


async def test_several_reply_to_use_the_list(spec: Any) -> None:
    reply_to = (Address("a@example.com", "A"), Address("B@example.com"), Address("b@example.com"))
    _, [request] = await send(accepted(), make_message(reply_to=reply_to))
    body = body_of(request)
    assert body["reply_to_list"] == [
        {"email": "a@example.com", "name": "A"},
        {"email": "B@example.com"},
    ]
    assert "reply_to" not in body
    spec.validate(body)


async def test_categories_are_unique_short_and_at_most_ten(spec: Any) -> None:
    tags = ("a", "a", "x" * 300, *(f"t{i}" for i in range(12)))
    _, [request] = await send(accepted(), make_message(tags=tags))
    categories = body_of(request)["categories"]
    assert categories[:2] == ["a", "x" * 255]
    assert len(categories) == 10
    spec.validate(body_of(request))


async def test_custom_args_stay_within_ten_thousand_bytes() -> None:
    metadata = {f"k{i}": "v" * 1000 for i in range(20)}
    with capture_logs() as logs:
        _, [request] = await send(accepted(), make_message(metadata=metadata))
    args = body_of(request)["personalizations"][0]["custom_args"]
    assert len(json.dumps(args).encode()) <= sendgrid.MAX_CUSTOM_ARGS_BYTES
    assert list(args) == [f"k{i}" for i in range(len(args))]  # kept in order, then cut
    assert any(entry["event"] == "custom_args_truncated" for entry in logs)


async def test_empty_files_are_left_out_and_inline_without_cid_is_attached(spec: Any) -> None:
    attachments = (
        Attachment("empty.csv", "text/csv", b""),
        Attachment("pic.png", "image/png", PNG, "inline", None),
    )
    _, [request] = await send(accepted(), make_message(attachments=attachments))
    [only] = body_of(request)["attachments"]
    assert only["filename"] == "pic.png"
    assert only["disposition"] == "attachment"
    assert "content_id" not in only
    spec.validate(body_of(request))


async def test_missing_from_uses_the_envelope_sender() -> None:
    _, [request] = await send(accepted(), make_message(from_=None))
    assert body_of(request)["from"] == {"email": "bounce@example.com"}


async def test_no_sender_at_all_is_the_messages_fault() -> None:
    null_sender = Envelope("", ENVELOPE.rcpt_tos)
    with pytest.raises(ProviderRejected) as caught:
        await send(accepted(), make_message(from_=None), null_sender)
    assert str(caught.value.reply).startswith("554 5.6.0")


async def test_registry_builds_it_and_it_is_a_provider() -> None:
    async with mock_client(accepted()) as (client, _):
        provider = build_provider("sg", settings(), client)
    assert isinstance(provider, SendgridProvider)
    assert isinstance(provider, Provider)
    assert provider.max_recipients == 1000
    assert provider.max_message_size == 22_500_000
    assert KEY not in repr(provider)


# --- errors -----------------------------------------------------------------------------


def sg_error(status: int, message: str, field: str | None = None, **headers: str) -> httpx.Response:
    return httpx.Response(
        status,
        json={"errors": [{"message": message, "field": field, "help": None}]},
        headers=headers,
    )


ERRORS = [
    (
        sg_error(400, "Does not contain a valid address.", "personalizations.0.to.0.email"),
        ProviderRejected,
        "553 5.1.3",
    ),
    (sg_error(400, "Invalid address.", "personalizations.0.bcc"), ProviderRejected, "553 5.1.3"),
    (
        sg_error(400, "The from email does not contain a valid address.", "from.email"),
        ProviderRejected,
        "553 5.1.7",
    ),
    (sg_error(400, "The subject is required.", "subject"), ProviderRejected, "554 5.6.0"),
    (sg_error(400, "Invalid template id", "template_id"), ProviderRejected, "554 5.6.0"),
    (sg_error(400, "Bad request", "null"), ProviderRejected, "554 5.6.0"),
    (sg_error(400, "Bad request", None), ProviderRejected, "554 5.6.0"),
    (
        sg_error(400, "If present, text/plain and text/html may only be provided once.", "content"),
        PayloadBug,
        "451 4.3.0",
    ),
    (sg_error(400, "Invalid type.", "content.0.type"), PayloadBug, "451 4.3.0"),
    (
        sg_error(400, "The attachment content must be base64 encoded.", "attachments.0.content"),
        PayloadBug,
        "451 4.3.0",
    ),
    (sg_error(400, "Invalid header", "headers"), PayloadBug, "451 4.3.0"),
    (sg_error(400, "Too many categories", "categories"), PayloadBug, "451 4.3.0"),
    (sg_error(400, "Too big", "personalizations.0.custom_args"), PayloadBug, "451 4.3.0"),
    (httpx.Response(400, text="not json"), ProviderRejected, "554 5.6.0"),
    (
        sg_error(401, "The provided authorization grant is invalid, expired, or revoked"),
        ProviderConfigError,
        "451 4.3.5",
    ),
    (sg_error(403, "access forbidden"), ProviderConfigError, "451 4.3.5"),
    (
        sg_error(
            403,
            "The from address does not match a verified Sender Identity. Mail cannot be sent "
            "until this error is resolved.",
            "from",
        ),
        ProviderRejected,
        "550 5.7.1",
    ),
    (sg_error(404, "not found"), ProviderConfigError, "451 4.3.5"),
    (sg_error(413, "content too large"), ProviderRejected, "552 5.3.4"),
    (sg_error(429, "too many requests"), RateLimited, "451 4.7.0"),
    (sg_error(451, "data residency"), ProviderConfigError, "451 4.3.5"),
    (sg_error(500, "internal server error"), ProviderUnavailable, "451 4.3.0"),
    (httpx.Response(502), ProviderUnavailable, "451 4.3.0"),
    (httpx.Response(503), ProviderUnavailable, "451 4.3.0"),
]


@pytest.mark.parametrize(("response", "cls", "reply"), ERRORS)
async def test_error_mapping(
    response: httpx.Response, cls: type[DeliveryError], reply: str
) -> None:
    error = await fail(response)
    assert type(error) is cls
    assert str(error.reply).startswith(reply)
    assert error.status == response.status_code
    assert "{" not in str(error.reply)


async def test_recipient_wins_over_a_payload_error_in_the_same_answer() -> None:
    body = {
        "errors": [
            {"message": "Invalid type.", "field": "content.0.type"},
            {
                "message": "Does not contain a valid address.",
                "field": "personalizations.0.cc.1.email",
            },
        ]
    }
    error = await fail(httpx.Response(400, json=body))
    assert str(error.reply) == (
        "553 5.1.3 Recipient address rejected upstream: Does not contain a valid address. "
        "(code=personalizations.0.cc.1.email)"
    )


async def test_reply_carries_reason_for_the_message_and_the_error_id() -> None:
    body = {"errors": [{"message": "The subject is required.", "field": "subject"}], "id": "e-123"}
    error = await fail(httpx.Response(400, json=body))
    assert str(error.reply) == (
        "554 5.6.0 Message rejected upstream: The subject is required. "
        "(code=subject, request_id=e-123)"
    )


async def test_transient_replies_keep_the_provider_text_out() -> None:
    error = await fail(sg_error(401, f"bad key {KEY}"))
    assert KEY not in str(error.reply)
    assert KEY not in error.detail
    assert str(error.reply) == "451 4.3.5 Upstream configuration error, try again later"


async def test_rate_limit_honours_the_reset_header() -> None:
    reset = str(int(time.time()) + 40)
    error = await fail(sg_error(429, "too many requests", **{"X-RateLimit-Reset": reset}))
    assert isinstance(error, RateLimited)
    assert error.retry_after is not None
    assert 30 <= error.retry_after <= 41


async def test_payload_bugs_are_logged_as_errors() -> None:
    with capture_logs() as logs:
        await fail(sg_error(400, "Invalid type.", "content.0.type"))
    [entry] = [e for e in logs if e["event"] == "provider_payload_refused"]
    assert entry["log_level"] == "error"
    assert entry["provider"] == "sg"
    assert entry["provider_code"] == "content.0.type"


@pytest.mark.parametrize(
    ("exc", "cls"),
    [(httpx.ConnectError("refused"), ConnectFailed), (httpx.ReadTimeout("slow"), OutcomeUnknown)],
)
async def test_transport_errors(exc: Exception, cls: type[DeliveryError]) -> None:
    with pytest.raises(cls):
        await send(raising(exc))


async def test_non_ascii_custom_headers_go_as_encoded_words() -> None:
    message = make_message(headers=(("X-Campaign", "Fr\u00fchling"),))
    _, [request] = await send(accepted(), message)
    assert body_of(request)["headers"]["X-Campaign"] == "=?utf-8?b?RnLDvGhsaW5n?="
