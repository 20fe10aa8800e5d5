"""SendGrid end to end: smtplib -> gateway -> a local SendGrid fake that validates every request
against SendGrid's published Mail Send schema and answers as SendGrid does."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import GatewayFactory, in_thread
from tests.support.fake_providers import SendgridFake, sendgrid_error, sendgrid_rate_limited
from tests.support.fakeapi import Answer, FakeAPI
from tests.support.messages import LOGO_CID, PDF, PNG, rich_message, smtp_send

KEY = "SG.integration-test-key.0123456789"
RCPTS = ("alice@example.net", "bob@example.net", "carol@example.org")


@pytest.fixture
async def sendgrid() -> AsyncIterator[tuple[SendgridFake, FakeAPI]]:
    fake = SendgridFake(api_key=KEY)
    async with FakeAPI(handler=fake.handle) as api:
        yield fake, api
    assert fake.violations == []  # every request matched SendGrid's schema


def providers(api: FakeAPI, **extra: Any) -> dict[str, Any]:
    return {"sg": {"type": "sendgrid", "api_key": KEY, "base_url": api.url, **extra}}


async def test_delivers_attachment_inline_image_and_bcc(
    start_gateway: GatewayFactory, sendgrid: tuple[SendgridFake, FakeAPI]
) -> None:
    fake, api = sendgrid
    gw = await start_gateway(providers=providers(api), delivery={"mode": "sync"})
    smtpapi = json.dumps({"category": ["orders", "shipping"], "unique_args": {"order": "A-42"}})
    data = rich_message(headers={"Bcc": "carol@example.org", "X-SMTPAPI": smtpapi})
    code, text = await in_thread(smtp_send, gw.port(), data, rcpts=RCPTS)

    assert code == 250, text
    [request] = fake.accepted
    assert request.path == "/v3/mail/send"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert len(text.removeprefix("2.0.0 Ok: ")) == 22  # SendGrid's X-Message-Id
    body = request.json
    [one] = body["personalizations"]
    assert one["to"] == [{"email": "alice@example.net", "name": "Alice"}]
    assert one["cc"] == [{"email": "bob@example.net"}]
    assert one["bcc"] == [{"email": "carol@example.org"}]
    assert one["custom_args"] == {"order": "A-42"}
    assert body["from"] == {"email": "shop@example.com", "name": "Shop"}
    assert body["subject"] == "Your order \u2713"
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    assert f"cid:{LOGO_CID}" in body["content"][1]["value"]
    logo, invoice = body["attachments"]
    assert (logo["disposition"], logo["content_id"], logo["type"]) == (
        "inline",
        LOGO_CID,
        "image/png",
    )
    assert base64.b64decode(logo["content"]) == PNG
    assert (invoice["disposition"], invoice["filename"]) == ("attachment", "invoice.pdf")
    assert base64.b64decode(invoice["content"]) == PDF
    assert body["categories"] == ["orders", "shipping"]
    assert body["headers"]["X-Smtp2api-Id"]
    # Neither the Bcc header nor the control header reaches the API.
    assert not {"bcc", "x-smtpapi"} & {name.lower() for name in body["headers"]}


async def test_blind_recipients_stay_hidden_from_each_other(
    start_gateway: GatewayFactory, sendgrid: tuple[SendgridFake, FakeAPI]
) -> None:
    fake, api = sendgrid
    gw = await start_gateway(providers=providers(api), delivery={"mode": "sync"})
    data = rich_message(to="undisclosed-recipients:;", cc=None)
    code, text = await in_thread(
        smtp_send, gw.port(), data, rcpts=("x@example.org", "y@example.org")
    )
    assert code == 250, text
    [request] = fake.accepted
    assert [p["to"] for p in request.json["personalizations"]] == [
        [{"email": "x@example.org"}],
        [{"email": "y@example.org"}],
    ]


# Design §4 through SendGrid's answers, in sync mode: the reply the client hears.
REPLY_ROWS = [
    (
        sendgrid_error(400, "Does not contain a valid address.", "personalizations.0.to.0.email"),
        553,
        "5.1.3",
    ),
    (
        sendgrid_error(
            403,
            "The from address does not match a verified Sender Identity. Mail cannot be sent "
            "until this error is resolved.",
            "from",
        ),
        550,
        "5.7.1",
    ),
    (sendgrid_error(400, "The subject is required.", "subject"), 554, "5.6.0"),
    (sendgrid_error(400, "Invalid type.", "content.0.type"), 451, "4.3.0"),
    (sendgrid_error(403, "access forbidden"), 451, "4.3.5"),
    (sendgrid_error(413, "content too large"), 552, "5.3.4"),
    (sendgrid_rate_limited(), 451, "4.7.0"),
    (sendgrid_error(500, "internal server error"), 451, "4.3.0"),
    (Answer(503), 451, "4.3.0"),
]


@pytest.mark.parametrize(("answer", "code", "enhanced"), REPLY_ROWS)
async def test_reply_mapping(
    start_gateway: GatewayFactory,
    sendgrid: tuple[SendgridFake, FakeAPI],
    answer: Answer,
    code: int,
    enhanced: str,
) -> None:
    fake, api = sendgrid
    fake.default = answer  # every try, in-process retries included, gets this answer
    gw = await start_gateway(
        providers=providers(api), delivery={"mode": "sync", "sync_timeout": "1s"}
    )
    got, text = await in_thread(smtp_send, gw.port(), rich_message(), rcpts=RCPTS[:1])
    assert (got, text[:5]) == (code, enhanced), text
    assert "{" not in text
    assert fake.requests
    assert fake.accepted == []


async def test_wrong_api_key_is_the_gateways_problem(
    start_gateway: GatewayFactory, sendgrid: tuple[SendgridFake, FakeAPI]
) -> None:
    _, api = sendgrid
    config = {"sg": {"type": "sendgrid", "api_key": "SG.wrong", "base_url": api.url}}
    gw = await start_gateway(providers=config, delivery={"mode": "sync"})
    code, text = await in_thread(smtp_send, gw.port(), rich_message())
    assert (code, text[:5]) == (451, "4.3.5"), text


async def test_rate_limited_message_is_queued_then_delivered(
    start_gateway: GatewayFactory, sendgrid: tuple[SendgridFake, FakeAPI]
) -> None:
    fake, api = sendgrid
    # Reset well after the sync window (X-RateLimit-Reset is whole epoch seconds, so allow
    # for truncation): the session cannot wait for it, the spool does.
    fake.push(sendgrid_rate_limited(reset_in=4))
    gw = await start_gateway(
        providers=providers(api),
        delivery={
            "mode": "hybrid",
            "sync_timeout": "1s",
            "backoff_min": "0.2s",
            "backoff_max": "1s",
        },
    )
    code, text = await in_thread(smtp_send, gw.port(), rich_message())
    assert code == 250, text
    assert "queued as" in text
    queued_id = text.rsplit(" ", 1)[1]
    await api.wait_for_requests(2, timeout=15)
    [delivered] = fake.accepted
    assert delivered.json["headers"]["X-Smtp2api-Id"] == queued_id
