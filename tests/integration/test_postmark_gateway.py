"""Postmark end to end: smtplib -> gateway -> a local Postmark fake that validates every request
against Postmark's published Swagger (plus its documented overlays) and answers as Postmark does."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import GatewayFactory, in_thread
from tests.support.fake_providers import PostmarkFake, postmark_error
from tests.support.fakeapi import Answer, FakeAPI
from tests.support.messages import LOGO_CID, PDF, PNG, rich_message, smtp_send

TOKEN = "c0ffee00-0000-4000-8000-integration00"
RCPTS = ("alice@example.net", "bob@example.net", "carol@example.org")


@pytest.fixture
async def postmark() -> AsyncIterator[tuple[PostmarkFake, FakeAPI]]:
    fake = PostmarkFake(server_token=TOKEN)
    async with FakeAPI(handler=fake.handle) as api:
        yield fake, api
    assert fake.violations == []  # every request matched Postmark's schema


def providers(api: FakeAPI, **extra: Any) -> dict[str, Any]:
    return {"pm": {"type": "postmark", "server_token": TOKEN, "base_url": api.url, **extra}}


async def test_delivers_attachment_inline_image_and_bcc(
    start_gateway: GatewayFactory, postmark: tuple[PostmarkFake, FakeAPI]
) -> None:
    fake, api = postmark
    gw = await start_gateway(providers=providers(api), delivery={"mode": "sync"})
    headers = {
        "Bcc": "carol@example.org",
        "X-PM-Tag": "orders",
        "X-PM-Metadata-order": "A-42",
        "X-PM-Message-Stream": "transactional",
    }
    code, text = await in_thread(smtp_send, gw.port(), rich_message(headers=headers), rcpts=RCPTS)
    assert code == 250, text
    [request] = fake.accepted
    assert text == f"2.0.0 Ok: {fake.answers[0].json['MessageID']}"
    assert request.path == "/email"
    body = request.json
    assert body["From"] == '"Shop" <shop@example.com>'
    assert body["To"] == '"Alice" <alice@example.net>'
    assert body["Cc"] == "bob@example.net"
    assert body["Bcc"] == "carol@example.org"
    assert body["Subject"] == "Your order \u2713"
    assert f"cid:{LOGO_CID}" in body["HtmlBody"]
    assert body["TextBody"].startswith("Hello Alice")
    logo, invoice = body["Attachments"]
    assert (logo["Name"], logo["ContentID"]) == ("logo.png", f"cid:{LOGO_CID}")
    assert base64.b64decode(logo["Content"]) == PNG
    assert "ContentID" not in invoice
    assert base64.b64decode(invoice["Content"]) == PDF
    assert (body["Tag"], body["Metadata"], body["MessageStream"]) == (
        "orders",
        {"order": "A-42"},
        "transactional",
    )
    names = {h["Name"].lower() for h in body["Headers"]}
    assert "x-smtp2api-id" in names
    assert not {"bcc", "x-pm-tag", "x-pm-metadata-order", "x-pm-message-stream"} & names


async def test_template_goes_to_with_template(
    start_gateway: GatewayFactory, postmark: tuple[PostmarkFake, FakeAPI]
) -> None:
    fake, api = postmark
    gw = await start_gateway(providers=providers(api), delivery={"mode": "sync"})
    headers = {"X-Smtp2api-Template": "4711", "X-Smtp2api-Variables": '{"name": "Alice"}'}
    code, text = await in_thread(smtp_send, gw.port(), rich_message(headers=headers))
    assert code == 250, text
    [request] = fake.accepted
    assert request.path == "/email/withTemplate"
    assert (request.json["TemplateId"], request.json["TemplateModel"]) == (4711, {"name": "Alice"})
    assert request.json["MessageStream"] == "outbound"


async def test_more_recipients_than_one_call_takes_are_split(
    start_gateway: GatewayFactory, postmark: tuple[PostmarkFake, FakeAPI]
) -> None:
    fake, api = postmark
    gw = await start_gateway(providers=providers(api), delivery={"mode": "sync"})
    rcpts = tuple(f"user{i}@example.org" for i in range(60))
    data = rich_message(to="undisclosed-recipients:;", cc=None)
    code, text = await in_thread(smtp_send, gw.port(), data, rcpts=rcpts)
    assert code == 250, text
    calls = [r.json["Bcc"].split(", ") for r in fake.accepted]
    assert [len(c) for c in calls] == [50, 10]
    assert sorted(rcpt for call in calls for rcpt in call) == sorted(rcpts)
    assert all("To" not in r.json for r in fake.accepted)


INACTIVE = (
    "You tried to send to recipient(s) that have been marked as inactive. Found inactive "
    "addresses: alice@example.net. Inactive recipients are ones that have generated a hard "
    "bounce, a spam complaint, or a manual suppression."
)
NO_SIGNATURE = (
    "The 'From' address you supplied (shop@example.com) is not a Sender Signature on your "
    "account. Please add and confirm this address in order to be able to use it in the 'From' "
    "field of your messages."
)
# Design §4 through Postmark's answers, in sync mode: the reply the client hears.
REPLY_ROWS = [
    (postmark_error(300, "Invalid 'To' address: 'alice@example'."), 553, "5.1.3"),
    (postmark_error(300, "Provide either email TextBody or HtmlBody or both."), 554, "5.6.0"),
    (postmark_error(400, NO_SIGNATURE), 550, "5.7.1"),
    (postmark_error(401, "Sender signature not confirmed."), 550, "5.7.1"),
    (postmark_error(406, INACTIVE), 550, "5.1.1"),
    (postmark_error(411, "Forbidden attachment type: invoice.exe"), 550, "5.7.1"),
    (postmark_error(402, "Invalid JSON"), 451, "4.3.0"),
    (
        postmark_error(405, "Not allowed to send: your account has run out of credits."),
        451,
        "4.3.2",
    ),
    (postmark_error(412, "Account pending approval."), 451, "4.3.2"),
    (postmark_error(100, "Maintenance.", status=503), 451, "4.3.0"),
    (postmark_error(429, "Rate limit exceeded.", status=429), 451, "4.7.0"),
    (Answer(413, body=b"Request Entity Too Large"), 552, "5.3.4"),
    (Answer(500), 451, "4.3.0"),
]


@pytest.mark.parametrize(("answer", "code", "enhanced"), REPLY_ROWS)
async def test_reply_mapping(
    start_gateway: GatewayFactory,
    postmark: tuple[PostmarkFake, FakeAPI],
    answer: Answer,
    code: int,
    enhanced: str,
) -> None:
    fake, api = postmark
    fake.default = answer  # every try, in-process retries included, gets this answer
    gw = await start_gateway(
        providers=providers(api), delivery={"mode": "sync", "sync_timeout": "1s"}
    )
    got, text = await in_thread(smtp_send, gw.port(), rich_message())
    assert (got, text[:5]) == (code, enhanced), text
    assert "{" not in text
    assert fake.requests
    assert fake.accepted == []


async def test_wrong_server_token_is_the_gateways_problem(
    start_gateway: GatewayFactory, postmark: tuple[PostmarkFake, FakeAPI]
) -> None:
    _, api = postmark
    config = {"pm": {"type": "postmark", "server_token": "wrong-token", "base_url": api.url}}
    gw = await start_gateway(providers=config, delivery={"mode": "sync"})
    code, text = await in_thread(smtp_send, gw.port(), rich_message())
    assert (code, text[:5]) == (451, "4.3.5"), text
    assert "code=10" in text
