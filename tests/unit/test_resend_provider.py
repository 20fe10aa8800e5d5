"""The ``resend`` provider on ``httpx.MockTransport``: the exact request, idempotency keys, every
mapped error."""

from __future__ import annotations

import dataclasses
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
    QuotaExhausted,
    RateLimited,
)
from smtp2api.models import Address, Attachment, Envelope, Message, SendResult
from smtp2api.providers import resend
from smtp2api.providers.base import Provider
from smtp2api.providers.registry import build_provider
from smtp2api.providers.resend import ResendProvider
from tests.support.fake_providers import resend_key_validator, resend_request_validator
from tests.support.mock_http import body_of, mock_client, raising
from tests.support.models import ENVELOPE, json_message

KEY = "re_123456789_abcdefghijklmnopqrstuvwxyz"
EMAIL_ID = "49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"


@pytest.fixture(scope="module")
def spec() -> Any:
    return resend_request_validator()


def make_message(**changes: Any) -> Message:
    fields: dict[str, Any] = {
        "reply_to": (Address("help@example.com"),),
        "headers": (("X-Campaign", "spring"), ("x-campaign", "two")),
        "tags": ("welcome", "spring sale!"),
        "metadata": {"order": "A/42", "welcome": "shadowed"},
    }
    return json_message(**{**fields, **changes})


def settings(**changes: Any) -> config.ResendProvider:
    return config.ResendProvider(**{"type": "resend", "api_key": KEY, "timeout": 5, **changes})


def accepted(email_id: str = EMAIL_ID) -> httpx.Response:
    return httpx.Response(200, json={"id": email_id})


async def send(
    response: Any, message: Message | None = None, envelope: Envelope = ENVELOPE, **changes: Any
) -> tuple[SendResult, list[httpx.Request]]:
    async with mock_client(response) as (client, calls):
        provider = ResendProvider("rs", settings(**changes), client)
        result = await provider.send(message or make_message(), envelope)
    return result, calls


async def fail(
    response: Any, message: Message | None = None, envelope: Envelope = ENVELOPE
) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        await send(response, message, envelope)
    return caught.value


# --- the request -----------------------------------------------------------------------


async def test_posts_the_exact_request(spec: Any) -> None:
    result, [request] = await send(accepted())
    assert result == SendResult(provider="rs", provider_id=EMAIL_ID)
    assert request.method == "POST"
    assert str(request.url) == "https://api.resend.com/emails"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.headers["Idempotency-Key"] == "01J0MSGID0000000000000000"
    assert request.headers["Content-Type"] == "application/json"
    body = body_of(request)
    assert body == {
        "from": '"Sender" <sender@example.com>',
        "to": ['"Doe, Jane" <rcpt@example.net>'],
        "cc": ["cc@example.net"],
        "bcc": ["hidden@example.net"],
        "subject": "Hello \u00e9",
        "html": '<p>Hi <img src="cid:logo@example.com"></p>',
        "text": "Hi",
        "reply_to": ["help@example.com"],
        "headers": {"X-Campaign": "spring", "X-Smtp2api-Id": "01J0MSGID0000000000000000"},
        "attachments": [
            {"content": "JVBERi0xLjQ=", "filename": "a.pdf", "content_type": "application/pdf"},
            {
                "content": "iVBORw0KGgotaW1hZ2Ut",
                "filename": "logo.png",
                "content_type": "image/png",
                "content_id": "logo@example.com",
            },
        ],
        "tags": [
            {"name": "welcome", "value": "true"},
            {"name": "spring_sale_", "value": "true"},
            {"name": "order", "value": "A_42"},
        ],
    }
    spec.validate(body)


async def test_every_retry_carries_the_same_key() -> None:
    keys = []
    for _ in range(2):
        _, [request] = await send(accepted())
        keys.append(request.headers["Idempotency-Key"])
    assert keys == ["01J0MSGID0000000000000000"] * 2


async def test_overlong_ids_give_a_stable_key_within_the_limit() -> None:
    message = make_message(id="m" * 300)
    _, [first] = await send(accepted(), message)
    _, [again] = await send(accepted(), message)
    key = first.headers["Idempotency-Key"]
    assert key == again.headers["Idempotency-Key"]
    assert resend_key_validator().is_valid(key)
    assert len(key) == 64


async def test_blind_recipients_alone_get_one_call_each_with_its_own_key(spec: Any) -> None:
    message = make_message(to=(), cc=(), bcc=(Address("x@example.org"), Address("y@example.org")))
    envelope = Envelope("b@example.com", ("x@example.org", "y@example.org"))
    result, calls = await send([accepted("id-x"), accepted("id-y")], message, envelope)
    assert result.provider_id == "id-x,id-y"
    assert [body_of(c)["to"] for c in calls] == [["x@example.org"], ["y@example.org"]]
    assert all("bcc" not in body_of(c) for c in calls)
    keys = [c.headers["Idempotency-Key"] for c in calls]
    assert len(set(keys)) == 2
    assert all(k.startswith("01J0MSGID0000000000000000.") for k in keys)
    for call in calls:
        spec.validate(body_of(call))
    # The same split, tried again, uses the same keys: Resend answers the repeats from its record.
    _, again = await send([accepted("id-x"), accepted("id-y")], message, envelope)
    assert [c.headers["Idempotency-Key"] for c in again] == keys


async def test_a_failure_midway_stops_and_raises() -> None:
    message = make_message(to=(), cc=(), bcc=(Address("x@example.org"), Address("y@example.org")))
    envelope = Envelope("b@example.com", ("x@example.org", "y@example.org"))
    limited = httpx.Response(429, json={"name": "rate_limit_exceeded", "message": "slow down"})
    error = await fail([accepted("id-x"), limited], message, envelope)
    assert isinstance(error, RateLimited)


async def test_cc_alone_is_promoted_to_to(spec: Any) -> None:
    chunk = Envelope("b@example.com", ("cc@example.net",))
    _, [request] = await send(accepted(), envelope=chunk)
    body = body_of(request)
    assert body["to"] == ["cc@example.net"]
    assert "cc" not in body
    assert "bcc" not in body
    spec.validate(body)


async def test_template_replaces_the_bodies(spec: Any) -> None:
    variables = {"name": "Jane", "count": 3, "ok": True, "items": [1, 2]}
    message = make_message(template="tmpl_123", template_variables=variables, subject="")
    _, [request] = await send(accepted(), message)
    body = body_of(request)
    assert body["template"] == {
        "id": "tmpl_123",
        "variables": {"name": "Jane", "count": 3, "ok": "true", "items": "[1, 2]"},
    }
    assert not {"html", "text", "subject"} & body.keys()
    spec.validate(body)


async def test_empty_subject_and_body_still_make_a_valid_request(spec: Any) -> None:
    message = make_message(subject="", text="", html=None, tags=(), metadata={}, reply_to=())
    _, [request] = await send(accepted(), message)
    body = body_of(request)
    assert body["subject"] == resend.NO_SUBJECT
    assert body["text"] == resend.BLANK_BODY
    assert not {"html", "tags", "reply_to"} & body.keys()
    spec.validate(body)


async def test_html_only_sends_no_text() -> None:
    _, [request] = await send(accepted(), make_message(text=None))
    assert "text" not in body_of(request)


async def test_empty_files_are_left_out(spec: Any) -> None:
    attachments = (
        Attachment("empty.csv", "text/csv", b""),
        Attachment("x.txt", "text/plain", b"x"),
    )
    _, [request] = await send(accepted(), make_message(attachments=attachments))
    assert [a["filename"] for a in body_of(request)["attachments"]] == ["x.txt"]
    spec.validate(body_of(request))


async def test_chunk_ids_of_the_delivery_layer_become_keys() -> None:
    message = dataclasses.replace(make_message(), id="01J0MSGID0000000000000000.0123456789ab")
    _, [request] = await send(accepted(), message)
    assert request.headers["Idempotency-Key"] == "01J0MSGID0000000000000000.0123456789ab"


async def test_registry_builds_it_and_it_is_a_provider() -> None:
    async with mock_client(accepted()) as (client, _):
        provider = build_provider("rs", settings(), client)
    assert isinstance(provider, ResendProvider)
    assert isinstance(provider, Provider)
    assert provider.max_recipients == 50
    assert provider.max_message_size == 30_000_000
    assert KEY not in repr(provider)


# --- errors -----------------------------------------------------------------------------


def rs_error(status: int, name: str, message: str, **headers: str) -> httpx.Response:
    body = {"statusCode": status, "name": name, "message": message}
    return httpx.Response(status, json=body, headers=headers)


INVALID_TO = (
    "Invalid `to` field. The email address needs to follow the `email@example.com` or "
    "`Name <email@example.com>` format."
)
ERRORS = [
    (rs_error(422, "validation_error", INVALID_TO), ProviderRejected, "553 5.1.3"),
    (rs_error(400, "validation_error", "Invalid `bcc` field."), ProviderRejected, "553 5.1.3"),
    (rs_error(422, "validation_error", "Invalid `from` field."), ProviderRejected, "553 5.1.7"),
    (
        rs_error(422, "validation_error", "The `subject` is too long."),
        ProviderRejected,
        "554 5.6.0",
    ),
    (
        rs_error(422, "invalid_parameter", "Invalid `scheduled_at` value."),
        ProviderRejected,
        "554 5.6.0",
    ),
    (
        rs_error(
            403,
            "validation_error",
            "The example.com domain is not verified. Please, add and verify your domain.",
        ),
        ProviderRejected,
        "550 5.7.1",
    ),
    (
        rs_error(
            403, "validation_error", "You can only send testing emails to your own email address."
        ),
        ProviderRejected,
        "550 5.7.1",
    ),
    (
        rs_error(400, "invalid_idempotency_key", "The key must be between 1-256 chars."),
        PayloadBug,
        "451 4.3.0",
    ),
    (
        rs_error(409, "invalid_idempotent_request", "Same idempotency key, different payload."),
        PayloadBug,
        "451 4.3.0",
    ),
    (rs_error(422, "missing_required_field", "Missing `to` field."), PayloadBug, "451 4.3.0"),
    (
        rs_error(409, "concurrent_idempotent_requests", "Original request still in progress."),
        OutcomeUnknown,
        "451 4.3.0",
    ),
    (
        rs_error(401, "missing_api_key", "Missing API key in the authorization header."),
        ProviderConfigError,
        "451 4.3.5",
    ),
    (
        rs_error(401, "restricted_api_key", "This API key is restricted to only send emails."),
        ProviderConfigError,
        "451 4.3.5",
    ),
    (rs_error(403, "invalid_api_key", "API key is invalid"), ProviderConfigError, "451 4.3.5"),
    (
        rs_error(422, "invalid_access", "Access must be full_access or sending_access."),
        ProviderConfigError,
        "451 4.3.5",
    ),
    (
        rs_error(404, "not_found", "The requested endpoint does not exist."),
        ProviderConfigError,
        "451 4.3.5",
    ),
    (rs_error(422, "invalid_from_address", "Invalid `from` field."), ProviderRejected, "550 5.7.1"),
    (
        rs_error(422, "invalid_attachment", "Attachment must have either a `content` or `path`."),
        ProviderRejected,
        "550 5.7.1",
    ),
    (
        rs_error(451, "security_error", "We may have found a security issue with the request."),
        ProviderRejected,
        "550 5.7.1",
    ),
    (rs_error(429, "rate_limit_exceeded", "Too many requests."), RateLimited, "451 4.7.0"),
    (
        rs_error(429, "daily_quota_exceeded", "You have reached your daily email sending quota."),
        QuotaExhausted,
        "451 4.7.0",
    ),
    (
        rs_error(
            429, "monthly_quota_exceeded", "You have reached your monthly email sending quota."
        ),
        QuotaExhausted,
        "451 4.7.0",
    ),
    (
        rs_error(500, "application_error", "An unexpected error occurred."),
        ProviderUnavailable,
        "451 4.3.0",
    ),
    (
        rs_error(500, "internal_server_error", "An unexpected error occurred."),
        ProviderUnavailable,
        "451 4.3.0",
    ),
    (httpx.Response(502, text="Bad Gateway"), ProviderUnavailable, "451 4.3.0"),
    (httpx.Response(413), ProviderRejected, "552 5.3.4"),
]


@pytest.mark.parametrize(("response", "cls", "reply"), ERRORS)
async def test_error_mapping(
    response: httpx.Response, cls: type[DeliveryError], reply: str
) -> None:
    error = await fail(response)
    assert type(error) is cls
    assert str(error.reply).startswith(reply)
    assert "{" not in str(error.reply)


async def test_rate_limit_honours_retry_after() -> None:
    error = await fail(
        rs_error(429, "rate_limit_exceeded", "Too many requests.", **{"retry-after": "3"})
    )
    assert isinstance(error, RateLimited)
    assert error.retry_after == 3.0
    reset = await fail(
        rs_error(429, "rate_limit_exceeded", "Too many.", **{"ratelimit-reset": "2"})
    )
    assert reset.retry_after == 2.0


async def test_reply_text_carries_the_name_and_the_reason_for_the_message() -> None:
    error = await fail(rs_error(422, "validation_error", INVALID_TO))
    assert str(error.reply).startswith(
        "553 5.1.3 Recipient address rejected upstream: Invalid `to`"
    )
    assert str(error.reply).endswith("(code=validation_error)")


async def test_key_echoed_back_is_redacted() -> None:
    error = await fail(rs_error(403, "invalid_api_key", f"API key {KEY} is invalid"))
    assert KEY not in str(error.reply)
    assert KEY not in error.detail


async def test_payload_bugs_are_logged_as_errors() -> None:
    with capture_logs() as logs:
        await fail(rs_error(422, "missing_required_field", "Missing `to` field."))
    [entry] = [e for e in logs if e["event"] == "provider_payload_refused"]
    assert entry["provider_code"] == "missing_required_field"


@pytest.mark.parametrize(
    ("exc", "cls"),
    [(httpx.ConnectTimeout("slow"), ConnectFailed), (httpx.ReadTimeout("slow"), OutcomeUnknown)],
)
async def test_transport_errors(exc: Exception, cls: type[DeliveryError]) -> None:
    with pytest.raises(cls):
        await send(raising(exc))


async def test_non_ascii_custom_headers_go_as_encoded_words() -> None:
    message = make_message(headers=(("X-Campaign", "Fr\u00fchling"),))
    _, [request] = await send(accepted(), message)
    assert body_of(request)["headers"]["X-Campaign"] == "=?utf-8?b?RnLDvGhsaW5n?="
