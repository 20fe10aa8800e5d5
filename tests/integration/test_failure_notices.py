"""Failure notices end to end: a dead message's RFC 3464 DSN travels to its sender through the
route's provider (a real local API), never to <> and never about a notice; the webhook gets
a JSON notice, and its own failure changes nothing."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture

from smtp2api.app import Gateway
from tests.conftest import GatewayFactory, in_thread
from tests.support.fakeapi import Answer, FakeAPI, ReceivedRequest
from tests.support.smtpclient import send, simple_message


@pytest.fixture
async def api() -> AsyncIterator[FakeAPI]:
    async with FakeAPI() as fake:
        yield fake


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event of the test (at any level), as dicts."""
    saved = structlog.get_config()
    capture = LogCapture()
    structlog.configure(
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    try:
        yield capture.entries
    finally:
        structlog.configure(**saved)


def http_provider(api: FakeAPI) -> dict[str, Any]:
    return {"main": {"type": "http", "url": f"{api.url}/v1/emails", "api_key": "k"}}


QUICK = {"mode": "queue", "backoff_min": "0.1s", "backoff_max": "0.2s", "bounce": True}


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def attachment(body: dict[str, Any], content_type: str) -> str:
    [found] = [a for a in body["attachments"] if a["content_type"] == content_type]
    return base64.b64decode(found["content"]).decode()


async def test_a_dead_message_bounces_to_its_sender_through_the_route(
    start_gateway: GatewayFactory, api: FakeAPI
) -> None:
    dsn_may_pass = False

    def answer(request: ReceivedRequest) -> Answer:
        if request.json["subject"] == "Hello":  # the original: refused for good
            return Answer(422, json={"message": "attachment type not allowed"})
        return Answer(200, json={"id": "dsn-ok"}) if dsn_may_pass else Answer(503)

    api.handler = answer
    gw = await start_gateway(providers=http_provider(api), delivery=QUICK)
    code, text = await in_thread(send, gw.port(), simple_message(), rcpts=("alice@example.com",))
    assert code == 250
    original = text.rsplit(" ", 1)[1]

    async def dsn_spooled() -> bool:
        return any(e.mail_from == "" for e in await gw.spool.list())

    await eventually(dsn_spooled)
    [dsn_summary] = [e for e in await gw.spool.list() if e.mail_from == ""]
    dsn = await gw.spool.get(dsn_summary.id)
    assert dsn is not None
    # A null envelope sender, to the original sender, through the original's route.
    assert (dsn.rcpt_tos, dsn.providers) == (("app@example.com",), ("main",))
    assert b"multipart/report; report-type=delivery-status" in dsn.raw
    dead = await gw.spool.get(original)
    assert dead is not None
    assert dead.state == "dead"  # kept for the operator

    dsn_may_pass = True
    await eventually(lambda: _only_dead_left(gw))
    body = api.requests[-1].json
    assert body["from"] == {"email": "MAILER-DAEMON@gw.test", "name": "Mail Delivery System"}
    assert body["to"] == [{"email": "app@example.com"}]
    assert body["subject"] == "Undelivered Mail Returned to Sender"
    assert body["headers"]["Auto-Submitted"] == "auto-replied"
    assert original in body["text"]
    report = attachment(body, "message/delivery-status")
    assert "Reporting-MTA: dns; gw.test" in report
    assert "Final-Recipient: rfc822; alice@example.com" in report
    assert "Action: failed" in report
    assert "Status: 5.6.0" in report
    assert "Diagnostic-Code: smtp; 554 5.6.0 Message rejected upstream" in report
    headers = attachment(body, "text/rfc822-headers")
    assert "Subject: Hello" in headers
    assert "Hello there" not in headers  # headers only, never the body


async def _only_dead_left(gw: Gateway) -> bool:
    return await gw.spool.counts() == {"queued": 0, "active": 0, "dead": 1}


@pytest.mark.parametrize(
    ("sender", "headers", "reason"),
    [
        ("<>", {}, "null sender"),
        ("app@example.com", {"Auto_Submitted": "auto-generated"}, "message is auto-submitted"),
        ("mailer-daemon@example.com", {}, "sender is a mailer daemon"),
    ],
)
async def test_no_bounce_to_the_null_sender_or_about_automatic_mail(
    start_gateway: GatewayFactory,
    api: FakeAPI,
    log_events: list[dict[str, Any]],
    sender: str,
    headers: dict[str, str],
    reason: str,
) -> None:
    api.default = Answer(422, json={"message": "refused"})
    gw = await start_gateway(providers=http_provider(api), delivery=QUICK)
    code, _ = await in_thread(send, gw.port(), simple_message(**headers), sender=sender)
    assert code == 250

    async def skipped() -> bool:
        return any(e["event"] == "bounce_skipped" for e in log_events)

    await eventually(skipped)
    [event] = [e for e in log_events if e["event"] == "bounce_skipped"]
    assert event["reason"] == reason
    assert await gw.spool.counts() == {"queued": 0, "active": 0, "dead": 1}
    assert len(api.requests) == 1


async def test_the_failure_webhook_gets_a_json_notice(
    start_gateway: GatewayFactory, api: FakeAPI, log_events: list[dict[str, Any]]
) -> None:
    api.default = Answer(422, json={"message": "refused"})
    async with FakeAPI() as hook:
        hook.push(Answer(204), Answer(500))
        gw = await start_gateway(
            providers=http_provider(api),
            delivery={**QUICK, "bounce": False, "failure_webhook": f"{hook.url}/hooks/dead"},
        )
        code, text = await in_thread(
            send, gw.port(), simple_message(), rcpts=("alice@example.com", "bob@example.com")
        )
        assert code == 250
        [request] = await hook.wait_for_requests(1)
        assert (request.method, request.path) == ("POST", "/hooks/dead")
        notice = request.json
        assert notice["event"] == "message_dead"
        assert notice["id"] == text.rsplit(" ", 1)[1]
        assert notice["sender"] == "app@example.com"
        assert notice["recipients"] == ["alice@example.com", "bob@example.com"]
        assert notice["reply"].startswith("554 5.6.0 Message rejected upstream")
        assert notice["attempts"] == 1
        assert notice["provider"] == "main"
        assert notice["created_at"].endswith("+00:00")
        assert "Hello there" not in request.body.decode()  # no body, ever

        # The hook failing is logged and changes nothing else.
        assert (await in_thread(send, gw.port(), simple_message()))[0] == 250
        await hook.wait_for_requests(2)

        async def logged() -> bool:
            return any(e["event"] == "failure_webhook_failed" for e in log_events)

        await eventually(logged)
        assert await gw.spool.counts() == {"queued": 0, "active": 0, "dead": 2}
        assert len(api.requests) == 2  # no DSN: bounce is off
