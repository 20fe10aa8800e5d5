"""The ``mailgun`` provider end to end: smtplib -> gateway -> a local Mailgun fake that checks
each request against Mailgun's OpenAPI schema and answers with Mailgun's real bodies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from email.message import EmailMessage
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayFactory, in_thread
from tests.support.fake_mailgun import (
    INVALID_TO,
    OPTIONS_TOO_LARGE,
    MailgunFake,
    mailgun_error,
    mailgun_forbidden,
    mailgun_rate_limited,
)
from tests.support.fakeapi import Answer, FakeAPI
from tests.support.smtpclient import send

KEY = "key-0123456789abcdef0123456789abcdef"
DOMAIN = "mg.example.com"


@pytest.fixture
async def fake() -> AsyncIterator[tuple[MailgunFake, FakeAPI]]:
    mg = MailgunFake(api_key=KEY, domain=DOMAIN)
    async with FakeAPI(handler=mg.handle) as api:
        yield mg, api
    assert mg.violations == []  # every request the gateway made matched the schema


def provider(api: FakeAPI, **extra: Any) -> dict[str, Any]:
    settings = {"type": "mailgun", "api_key": KEY, "domain": DOMAIN, "base_url": api.url}
    return {"mg": {**settings, "timeout": "2s", **extra}}


def message(**headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "App <app@example.com>"
    msg["To"] = "Alice <alice@example.net>"
    msg["Cc"] = "bob@example.net"
    msg["Bcc"] = "hidden@example.org"
    msg["Subject"] = "Order shipped"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Your order is on its way.\n")
    msg.add_attachment(b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="i.pdf")
    return msg.as_bytes()


RCPTS = ("alice@example.net", "bob@example.net", "hidden@example.org")


async def test_delivers_the_raw_mime_to_the_envelope(
    start_gateway: GatewayFactory, fake: tuple[MailgunFake, FakeAPI]
) -> None:
    mg, api = fake
    gw = await start_gateway(providers=provider(api), delivery={"mode": "sync"})
    data = message(
        X_Mailgun_Tag="shipping",
        X_Mailgun_Variables=json.dumps({"order": 42, "customer": "c-7"}),
        X_PM_Tag="transactional",
    )
    code, text = await in_thread(send, gw.port(), data, rcpts=RCPTS)

    assert (code, text) == (250, f"2.0.0 Ok: 20261128.1.fake@{DOMAIN}")
    [request] = mg.requests
    assert request.path == f"/v3/{DOMAIN}/messages.mime"
    [form] = mg.accepted
    assert form.fields["to"] == list(RCPTS)  # the envelope, Bcc included
    assert form.fields["o:tag"] == ["shipping", "transactional"]
    assert form.fields["v:order"] == ["42"]
    assert form.fields["v:customer"] == ["c-7"]
    _filename, content_type, raw = form.files["message"]
    assert content_type == "message/rfc822"
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"received: ")  # the gateway's trace header comes first
    assert b"\r\nbcc:" not in head  # never shown to the other recipients
    assert b"x-mailgun-" not in head  # control headers are translated, then stripped
    assert b"x-pm-tag" not in head
    assert b"subject: order shipped" in head
    assert b"%PDF-1.4 fake" not in raw  # the attachment still base64, the MIME unchanged
    assert b"JVBERi0xLjQgZmFrZQ==" in raw


async def test_metadata_beyond_16_kb_is_trimmed_not_refused(
    start_gateway: GatewayFactory, fake: tuple[MailgunFake, FakeAPI]
) -> None:
    mg, api = fake
    gw = await start_gateway(providers=provider(api), delivery={"mode": "sync"})
    # ~19 KB of X-PM-Metadata-*: words, so the client folds the long header lines.
    metadata = {f"X-PM-Metadata-field{i}": "word " * 160 for i in range(24)}
    code, text = await in_thread(send, gw.port(), message(**metadata), rcpts=RCPTS)
    assert code == 250, text
    [form] = mg.accepted
    kept = [name for name in form.fields if name.startswith("v:")]
    assert 10 < len(kept) < 24


ERRORS = [
    (mailgun_forbidden(), 451, "4.3.5"),
    (mailgun_error(403, "Domain mg.example.com is disabled"), 451, "4.3.5"),
    (mailgun_error(400, "from parameter is missing. "), 554, "5.6.0"),
    (mailgun_error(400, OPTIONS_TOO_LARGE), 451, "4.3.0"),
    (mailgun_rate_limited(120), 451, "4.7.0"),
    (mailgun_error(500, "Internal Server Error"), 451, "4.3.0"),
    (Answer(413, json={"message": "Request Entity Too Large"}), 552, "5.3.4"),
]


@pytest.mark.parametrize(("answer", "code", "enhanced"), ERRORS)
async def test_error_replies(
    start_gateway: GatewayFactory,
    fake: tuple[MailgunFake, FakeAPI],
    answer: Answer,
    code: int,
    enhanced: str,
) -> None:
    mg, api = fake
    mg.push(*[answer] * 50)  # sync mode retries transient answers within sync_timeout
    gw = await start_gateway(
        providers=provider(api), delivery={"mode": "sync", "sync_timeout": "2s"}
    )
    got, text = await in_thread(send, gw.port(), message(), rcpts=RCPTS)
    assert (got, text.split(" ", 1)[0]) == (code, enhanced), text
    assert "{" not in text


async def test_invalid_recipient_is_553(
    start_gateway: GatewayFactory, fake: tuple[MailgunFake, FakeAPI]
) -> None:
    mg, api = fake
    gw = await start_gateway(providers=provider(api), delivery={"mode": "sync"})
    code, text = await in_thread(send, gw.port(), message(), rcpts=("alice@localhost",))
    assert code == 553, text
    assert text.startswith("5.1.3 ")
    assert "not a valid address" in text
    assert mg.accepted == []
    assert INVALID_TO.startswith("'to'")


async def test_wrong_key_and_unknown_domain_are_451_4_3_5(
    start_gateway: GatewayFactory, fake: tuple[MailgunFake, FakeAPI]
) -> None:
    mg, api = fake
    gw = await start_gateway(
        providers=provider(api, api_key="key-wrong-wrong-wrong"), delivery={"mode": "sync"}
    )
    code, text = await in_thread(send, gw.port(), message(), rcpts=RCPTS)
    assert (code, text[:5]) == (451, "4.3.5")
    await gw.shutdown()

    gw = await start_gateway(
        providers=provider(api, domain="unknown.example.com"), delivery={"mode": "sync"}
    )
    code, text = await in_thread(send, gw.port(), message(), rcpts=RCPTS)
    assert (code, text[:5]) == (451, "4.3.5")
    assert [r.path for r in mg.requests][-1] == "/v3/unknown.example.com/messages.mime"
    assert mg.accepted == []


async def test_rate_limit_defers_by_mailguns_hint(
    start_gateway: GatewayFactory, fake: tuple[MailgunFake, FakeAPI]
) -> None:
    mg, api = fake
    mg.push(mailgun_rate_limited(120))
    gw = await start_gateway(
        providers=provider(api),
        delivery={"mode": "hybrid", "sync_timeout": "1s", "backoff_min": "1s"},
    )
    code, text = await in_thread(send, gw.port(), message(), rcpts=RCPTS)
    assert code == 250, text
    assert "queued as" in text
    [entry] = await gw.spool.list()
    # Kept for the worker, not before Mailgun's "try again after 120 seconds".
    assert entry.next_attempt_at - entry.created_at >= 119
    assert len(mg.requests) == 1


async def test_the_fake_catches_requests_off_the_schema(fake: tuple[MailgunFake, FakeAPI]) -> None:
    """The fake is only worth something if it refuses what Mailgun would refuse."""
    mg, api = fake
    url = f"{api.url}/v3/{DOMAIN}/messages.mime"
    async with httpx.AsyncClient(auth=("api", KEY)) as client:
        no_to = await client.post(url, files={"message": ("m.eml", b"Subject: x\r\n\r\nx")})
        as_text = await client.post(
            url,
            data={"to": "a@example.net", "message": "Subject: x"},
            files={"attachment": ("a.txt", b"x")},  # multipart, but message is no file
        )
        twice = await client.post(
            url,
            data={"to": "a@example.net", "o:testmode": ["yes", "no"]},
            files={"message": ("m.eml", b"Subject: x\r\n\r\nx")},
        )
    assert [r.status_code for r in (no_to, as_text, twice)] == [400, 400, 400]
    assert any("'to' is a required property" in v for v in mg.violations)
    assert any(v.startswith("message: sent as a text field") for v in mg.violations)
    assert any(v.startswith("o:testmode") for v in mg.violations)
    assert mg.accepted == []
    mg.violations.clear()  # seen: the fixture's final check is for the gateway's requests
