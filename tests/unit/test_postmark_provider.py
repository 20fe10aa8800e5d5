"""The ``postmark`` provider on ``httpx.MockTransport``: the exact request, every mapped error."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from smtp2api import config
from smtp2api.errors import (
    AccountPaused,
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
from smtp2api.providers import postmark
from smtp2api.providers.base import Provider
from smtp2api.providers.postmark import PostmarkProvider
from smtp2api.providers.registry import build_provider
from tests.support.fake_providers import postmark_request_validators
from tests.support.mock_http import body_of, mock_client, raising
from tests.support.models import ENVELOPE, json_message

TOKEN = "c0ffee00-1234-5678-9abc-def012345678"
MESSAGE_ID = "0a129aee-e1cd-480d-b08d-4f48548ff48d"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return postmark_request_validators()


def make_message(**changes: Any) -> Message:
    fields: dict[str, Any] = {
        "reply_to": (Address("help@example.com"), Address("desk@example.com", "Desk")),
        "headers": (("X-Campaign", "spring"), ("X-Campaign", "two"), ("X-Smtp2api-Id", "forged")),
        "tags": ("welcome", "second"),
        "metadata": {"order": "42", "Order": "shadowed", "client-id": "7"},
    }
    return json_message(**{**fields, **changes})


def settings(**changes: Any) -> config.PostmarkProvider:
    data = {"type": "postmark", "server_token": TOKEN, "timeout": 5, **changes}
    return config.PostmarkProvider(**data)


def accepted(to: str = "rcpt@example.net") -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "To": to,
            "SubmittedAt": "2025-06-15T15:06:40.4178645-04:00",
            "MessageID": MESSAGE_ID,
            "ErrorCode": 0,
            "Message": "OK",
        },
    )


async def send(
    response: Any, message: Message | None = None, envelope: Envelope = ENVELOPE, **changes: Any
) -> tuple[SendResult, list[httpx.Request]]:
    async with mock_client(response) as (client, calls):
        provider = PostmarkProvider("pm", settings(**changes), client)
        result = await provider.send(message or make_message(), envelope)
    return result, calls


async def fail(response: httpx.Response) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        await send(response)
    return caught.value


# --- the request -----------------------------------------------------------------------


async def test_posts_the_exact_request(spec: dict[str, Any]) -> None:
    result, [request] = await send(accepted())
    assert result == SendResult(provider="pm", provider_id=MESSAGE_ID)
    assert request.method == "POST"
    assert str(request.url) == "https://api.postmarkapp.com/email"
    assert request.headers["X-Postmark-Server-Token"] == TOKEN
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Content-Type"] == "application/json"
    assert "Authorization" not in request.headers
    body = body_of(request)
    assert body == {
        "From": '"Sender" <sender@example.com>',
        "To": '"Doe, Jane" <rcpt@example.net>',
        "Cc": "cc@example.net",
        "Bcc": "hidden@example.net",
        "Subject": "Hello \u00e9",
        "TextBody": "Hi",
        "HtmlBody": '<p>Hi <img src="cid:logo@example.com"></p>',
        "ReplyTo": 'help@example.com, "Desk" <desk@example.com>',
        "Headers": [
            {"Name": "X-Campaign", "Value": "spring"},
            {"Name": "X-Campaign", "Value": "two"},
            {"Name": "X-Smtp2api-Id", "Value": "01J0MSGID0000000000000000"},
        ],
        "Attachments": [
            {"Name": "a.pdf", "Content": "JVBERi0xLjQ=", "ContentType": "application/pdf"},
            {
                "Name": "logo.png",
                "Content": "iVBORw0KGgotaW1hZ2Ut",
                "ContentType": "image/png",
                "ContentID": "cid:logo@example.com",
            },
        ],
        "Tag": "welcome",
        "Metadata": {"order": "42", "client-id": "7"},
        "MessageStream": "outbound",
    }
    spec["/email"].validate(body)


async def test_stream_comes_from_the_message_else_from_config() -> None:
    _, [request] = await send(accepted(), message_stream="transactional")
    assert body_of(request)["MessageStream"] == "transactional"
    _, [request] = await send(accepted(), make_message(stream="broadcast"))
    assert body_of(request)["MessageStream"] == "broadcast"


async def test_base_url_is_honoured() -> None:
    _, [request] = await send(accepted(), base_url="http://127.0.0.1:8025")
    assert str(request.url) == "http://127.0.0.1:8025/email"


async def test_blind_recipients_alone_need_no_to(spec: dict[str, Any]) -> None:
    message = make_message(to=(), cc=(), bcc=(Address("x@example.org"), Address("y@example.org")))
    envelope = Envelope("b@example.com", ("x@example.org", "y@example.org"))
    _, [request] = await send(accepted(""), message, envelope)
    body = body_of(request)
    assert "To" not in body
    assert "Cc" not in body
    assert body["Bcc"] == "x@example.org, y@example.org"
    spec["/email"].validate(body)


@pytest.mark.parametrize(
    ("template", "ref"),
    [("4711", {"TemplateId": 4711}), ("welcome-email", {"TemplateAlias": "welcome-email"})],
)
async def test_template_uses_with_template(
    spec: dict[str, Any], template: str, ref: dict[str, Any]
) -> None:
    message = make_message(template=template, template_variables={"name": "Jane"})
    _, [request] = await send(accepted(), message)
    assert str(request.url) == "https://api.postmarkapp.com/email/withTemplate"
    body = body_of(request)
    assert {k: body[k] for k in ref} == ref
    assert body["TemplateModel"] == {"name": "Jane"}
    assert not {"Subject", "TextBody", "HtmlBody"} & body.keys()
    spec["/email/withTemplate"].validate(body)


async def test_template_without_variables_sends_an_empty_model(spec: dict[str, Any]) -> None:
    _, [request] = await send(accepted(), make_message(template="welcome"))
    assert body_of(request)["TemplateModel"] == {}
    spec["/email/withTemplate"].validate(body_of(request))


async def test_bodyless_message_still_has_a_body(spec: dict[str, Any]) -> None:
    message = make_message(text=None, html=None, tags=(), metadata={}, attachments=())
    _, [request] = await send(accepted(), message)
    body = body_of(request)
    assert body["TextBody"] == postmark.BLANK_BODY
    assert not {"HtmlBody", "Tag", "Metadata", "Attachments"} & body.keys()
    spec["/email"].validate(body)


async def test_long_tag_is_cut() -> None:
    _, [request] = await send(accepted(), make_message(tags=("t" * 1500,)))
    assert body_of(request)["Tag"] == "t" * postmark.MAX_TAG_CHARS


async def test_registry_builds_it_and_it_is_a_provider() -> None:
    async with mock_client(accepted()) as (client, _):
        provider = build_provider("pm", settings(), client)
    assert isinstance(provider, PostmarkProvider)
    assert isinstance(provider, Provider)
    assert provider.max_recipients == 50
    assert provider.max_message_size == 7_500_000
    assert TOKEN not in repr(provider)


# --- errors -----------------------------------------------------------------------------


def pm_error(code: int, message: str, status: int = 422) -> httpx.Response:
    return httpx.Response(status, json={"ErrorCode": code, "Message": message})


ERRORS = [
    (
        pm_error(10, "The Server Token you provided was invalid.", 401),
        ProviderConfigError,
        "451 4.3.5",
    ),
    (pm_error(100, "Maintenance", 503), ProviderUnavailable, "451 4.3.0"),
    (pm_error(300, "Invalid 'To' address: 'jane'."), ProviderRejected, "553 5.1.3"),
    (
        pm_error(300, "Error parsing 'Cc': Illegal email address 'x'."),
        ProviderRejected,
        "553 5.1.3",
    ),
    (pm_error(300, "Invalid 'From' address: 'me'."), ProviderRejected, "553 5.1.7"),
    (
        pm_error(300, "Provide either email TextBody or HtmlBody or both."),
        ProviderRejected,
        "554 5.6.0",
    ),
    (
        pm_error(400, "The 'From' address you supplied is not a Sender Signature on your account."),
        ProviderRejected,
        "550 5.7.1",
    ),
    (pm_error(401, "Sender signature not confirmed"), ProviderRejected, "550 5.7.1"),
    (pm_error(402, "Invalid JSON"), PayloadBug, "451 4.3.0"),
    (pm_error(403, "Incompatible JSON"), PayloadBug, "451 4.3.0"),
    (pm_error(405, "Not allowed to send"), AccountPaused, "451 4.3.2"),
    (
        pm_error(406, "You tried to send to a recipient that has been marked as inactive."),
        ProviderRejected,
        "550 5.1.1",
    ),
    (pm_error(409, "JSON required"), PayloadBug, "451 4.3.0"),
    (pm_error(410, "Too many batch messages"), PayloadBug, "451 4.3.0"),
    (pm_error(411, "Forbidden attachment type"), ProviderRejected, "550 5.7.1"),
    (pm_error(412, "Account is pending"), AccountPaused, "451 4.3.2"),
    (pm_error(413, "Account may not send"), AccountPaused, "451 4.3.2"),
    (pm_error(429, "Rate limit exceeded", 429), RateLimited, "451 4.7.0"),
    (pm_error(9999, "Something new"), ProviderRejected, "554 5.6.0"),
    (httpx.Response(401, text="Unauthorized"), ProviderConfigError, "451 4.3.5"),
    (httpx.Response(413, text="Request Entity Too Large"), ProviderRejected, "552 5.3.4"),
    (httpx.Response(429), RateLimited, "451 4.7.0"),
    (httpx.Response(500), ProviderUnavailable, "451 4.3.0"),
    (httpx.Response(503, text="Service Unavailable"), ProviderUnavailable, "451 4.3.0"),
    # A 200 that carries an error code is still that error, never a success.
    (
        httpx.Response(200, json={"ErrorCode": 406, "Message": "Found inactive addresses: x"}),
        ProviderRejected,
        "550 5.1.1",
    ),
]


@pytest.mark.parametrize(("response", "cls", "reply"), ERRORS)
async def test_error_mapping(
    response: httpx.Response, cls: type[DeliveryError], reply: str
) -> None:
    error = await fail(response)
    assert type(error) is cls
    assert str(error.reply).startswith(reply)
    assert "{" not in str(error.reply)


async def test_reply_names_the_error_code_and_the_reason_for_the_message() -> None:
    error = await fail(
        pm_error(406, "You tried to send to a recipient that has been marked as inactive.")
    )
    assert str(error.reply) == (
        "550 5.1.1 Recipient suppressed upstream: You tried to send to a recipient that has been "
        "marked as inactive. (code=406)"
    )
    transient = await fail(pm_error(405, "Not allowed to send: ran out of credits"))
    assert str(transient.reply) == "451 4.3.2 Upstream account paused, try again later (code=405)"


async def test_token_echoed_back_is_redacted() -> None:
    error = await fail(pm_error(300, f"Invalid request from token {TOKEN}"))
    assert TOKEN not in str(error.reply)
    assert TOKEN not in error.detail


async def test_payload_bugs_are_logged_as_errors() -> None:
    with capture_logs() as logs:
        await fail(pm_error(403, "Incompatible JSON"))
    assert [e["provider_code"] for e in logs if e["event"] == "provider_payload_refused"] == ["403"]


@pytest.mark.parametrize(
    ("exc", "cls"),
    [(httpx.ConnectError("refused"), ConnectFailed), (httpx.ReadError("reset"), OutcomeUnknown)],
)
async def test_transport_errors(exc: Exception, cls: type[DeliveryError]) -> None:
    with pytest.raises(cls):
        await send(raising(exc))


async def test_non_ascii_custom_headers_go_as_encoded_words() -> None:
    message = make_message(headers=(("X-Campaign", "Fr\u00fchling"),))
    _, [request] = await send(accepted(), message)
    assert body_of(request)["Headers"][0] == {
        "Name": "X-Campaign",
        "Value": "=?utf-8?b?RnLDvGhsaW5n?=",
    }
