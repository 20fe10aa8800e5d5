"""Resend end to end: smtplib -> gateway -> a local Resend fake that validates every request
against Resend's published OpenAPI, keeps Idempotency-Keys as Resend does, and answers with
Resend's named errors."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import GatewayFactory, in_thread
from tests.support.fake_providers import ResendFake, resend_error, resend_rate_limited
from tests.support.fakeapi import Answer, FakeAPI
from tests.support.messages import LOGO_CID, PDF, PNG, rich_message, smtp_send

KEY = "re_integration_0123456789abcdef"
RCPTS = ("alice@example.net", "bob@example.net", "carol@example.org")


@pytest.fixture
async def resend() -> AsyncIterator[tuple[ResendFake, FakeAPI]]:
    fake = ResendFake(api_key=KEY)
    async with FakeAPI(handler=fake.handle) as api:
        yield fake, api
    assert fake.violations == []  # every request matched Resend's schema


def providers(api: FakeAPI, **extra: Any) -> dict[str, Any]:
    return {"rs": {"type": "resend", "api_key": KEY, "base_url": api.url, **extra}}


async def test_delivers_attachment_inline_image_and_bcc(
    start_gateway: GatewayFactory, resend: tuple[ResendFake, FakeAPI]
) -> None:
    fake, api = resend
    gw = await start_gateway(providers=providers(api), delivery={"mode": "sync"})
    headers = {
        "Bcc": "carol@example.org",
        "X-Smtp2api-Tags": "orders",
        "X-PM-Metadata-order": "A-42",
    }
    code, text = await in_thread(smtp_send, gw.port(), rich_message(headers=headers), rcpts=RCPTS)
    assert code == 250, text
    [request] = fake.accepted
    assert text == f"2.0.0 Ok: {fake.answers[0].json['id']}"
    body = request.json
    assert request.headers["idempotency-key"] == body["headers"]["X-Smtp2api-Id"]
    assert body["from"] == '"Shop" <shop@example.com>'
    assert body["to"] == ['"Alice" <alice@example.net>']
    assert body["cc"] == ["bob@example.net"]
    assert body["bcc"] == ["carol@example.org"]
    assert f"cid:{LOGO_CID}" in body["html"]
    logo, invoice = body["attachments"]
    assert (logo["filename"], logo["content_id"], logo["content_type"]) == (
        "logo.png",
        LOGO_CID,
        "image/png",
    )
    assert base64.b64decode(logo["content"]) == PNG
    assert "content_id" not in invoice
    assert base64.b64decode(invoice["content"]) == PDF
    assert body["tags"] == [{"name": "orders", "value": "true"}, {"name": "order", "value": "A-42"}]
    assert not {"bcc", "x-smtp2api-tags", "x-pm-metadata-order"} & {
        name.lower() for name in body["headers"]
    }


async def test_blind_recipients_get_a_call_each(
    start_gateway: GatewayFactory, resend: tuple[ResendFake, FakeAPI]
) -> None:
    fake, api = resend
    gw = await start_gateway(providers=providers(api), delivery={"mode": "sync"})
    data = rich_message(to="undisclosed-recipients:;", cc=None)
    code, text = await in_thread(
        smtp_send, gw.port(), data, rcpts=("x@example.org", "y@example.org")
    )
    assert code == 250, text
    assert [r.json["to"] for r in fake.accepted] == [["x@example.org"], ["y@example.org"]]
    assert len({r.headers["idempotency-key"] for r in fake.accepted}) == 2
    assert text == "2.0.0 Ok: " + ",".join(a.json["id"] for a in fake.answers)


async def test_lost_answer_is_retried_with_the_same_key_and_sent_once(
    start_gateway: GatewayFactory, resend: tuple[ResendFake, FakeAPI]
) -> None:
    fake, api = resend
    fake.lose_next_answer()  # Resend sends the email, the answer never arrives
    gw = await start_gateway(
        providers=providers(api),
        delivery={"mode": "hybrid", "backoff_min": "0.2s", "backoff_max": "1s"},
    )
    code, text = await in_thread(smtp_send, gw.port(), rich_message())
    assert code == 250, text
    first, again = await api.wait_for_requests(2, timeout=10)
    assert first.headers["idempotency-key"] == again.headers["idempotency-key"]
    assert first.body == again.body
    assert len(fake.accepted) == 1  # the retry was answered from Resend's record


# Design §4 through Resend's answers, in sync mode: the reply the client hears.
REPLY_ROWS = [
    (
        resend_error(
            422,
            "validation_error",
            "Invalid `to` field. The email address needs to follow the `email@example.com` or "
            "`Name <email@example.com>` format.",
        ),
        553,
        "5.1.3",
    ),
    (
        resend_error(
            403,
            "validation_error",
            "The example.com domain is not verified. Please, add and verify your domain on "
            "https://resend.com/domains",
        ),
        550,
        "5.7.1",
    ),
    (resend_error(422, "invalid_from_address", "Invalid `from` field."), 550, "5.7.1"),
    (
        resend_error(
            422, "invalid_attachment", "Attachment must have either a `content` or `path`."
        ),
        550,
        "5.7.1",
    ),
    (
        resend_error(451, "security_error", "We may have found a security issue with the request."),
        550,
        "5.7.1",
    ),
    (resend_error(403, "invalid_api_key", "API key is invalid"), 451, "4.3.5"),
    (resend_rate_limited(seconds=30), 451, "4.7.0"),
    (
        resend_error(
            429, "daily_quota_exceeded", "You have reached your daily email sending quota."
        ),
        451,
        "4.7.0",
    ),
    (
        resend_error(
            409,
            "concurrent_idempotent_requests",
            "Same idempotency key used while original request is still in progress.",
        ),
        451,
        "4.3.0",
    ),
    (resend_error(500, "application_error", "An unexpected error occurred."), 451, "4.3.0"),
    (Answer(502, body=b"Bad Gateway"), 451, "4.3.0"),
]


@pytest.mark.parametrize(("answer", "code", "enhanced"), REPLY_ROWS)
async def test_reply_mapping(
    start_gateway: GatewayFactory,
    resend: tuple[ResendFake, FakeAPI],
    answer: Answer,
    code: int,
    enhanced: str,
) -> None:
    fake, api = resend
    fake.default = answer  # every try, in-process retries included, gets this answer
    gw = await start_gateway(
        providers=providers(api), delivery={"mode": "sync", "sync_timeout": "1s"}
    )
    got, text = await in_thread(smtp_send, gw.port(), rich_message())
    assert (got, text[:5]) == (code, enhanced), text
    assert "{" not in text
    assert fake.requests
    assert fake.accepted == []


async def test_missing_api_key_is_the_gateways_problem(
    start_gateway: GatewayFactory, resend: tuple[ResendFake, FakeAPI]
) -> None:
    _, api = resend
    config = {"rs": {"type": "resend", "api_key": "re_wrong", "base_url": api.url}}
    gw = await start_gateway(providers=config, delivery={"mode": "sync"})
    code, text = await in_thread(smtp_send, gw.port(), rich_message())
    assert (code, text[:5]) == (451, "4.3.5"), text
    assert "code=missing_api_key" in text
