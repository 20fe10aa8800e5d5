"""The DSN (RFC 3464) and the loop rules, as pure functions."""

from __future__ import annotations

import dataclasses
import email
import email.policy
from email.message import EmailMessage

import pytest

from smtp2api.failures import bounce_refusal, build_dsn, webhook_payload
from smtp2api.models import Envelope
from smtp2api.replies import SMTPReply
from smtp2api.spool.base import SpoolEntry

ORIGINAL = (
    b"Received: from client.test ([192.0.2.7])\r\n\tby gw.test (smtp2api) with ESMTP id X;\r\n"
    b"From: App <app@example.com>\r\nTo: a@example.net, b@example.net\r\n"
    b"Bcc: hidden@example.net,\r\n  also-hidden@example.net\r\nSubject: Order 42\r\n"
    b"Message-ID: <m42@example.com>\r\n\r\nsecret body\r\n"
)
REPLY = SMTPReply(550, "5.1.1", "Recipient rejected upstream")


def dead(raw: bytes = ORIGINAL, sender: str = "app@example.com", **kw: object) -> SpoolEntry:
    envelope = Envelope(sender, ("a@example.net", "b@example.net", "c@example.net"))
    entry = SpoolEntry.new(raw, envelope, ("main",), now=1_700_000_000.0, id="01DEAD")
    return dataclasses.replace(entry, state="dead", **kw)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_the_dsn_is_a_delivery_status_report_for_the_failed_recipients_only() -> None:
    entry = dead(done_recipients=("b@example.net",))
    raw = build_dsn(entry, REPLY, hostname="gw.test", dsn_id="01DSN", now=1_700_000_100.0)
    assert b"\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF everywhere (RFC 5322 §2.1)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"].addresses[0].addr_spec == "app@example.com"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@gw.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    human, status, headers = msg.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    # RFC 3464 §2.1: per-message fields, then one block per recipient.
    report = raw.split(b"Content-Type: message/delivery-status", 1)[1].split(b"\r\n\r\n", 1)[1]
    blocks = report.split(b"\r\n--", 1)[0].strip().split(b"\r\n\r\n")
    assert blocks[0].startswith(b"Reporting-MTA: dns; gw.test\r\n")
    assert b"Arrival-Date: " in blocks[0]
    recipients = [b.split(b"\r\n")[0] for b in blocks[1:]]
    assert recipients == [
        b"Final-Recipient: rfc822; a@example.net",
        b"Final-Recipient: rfc822; c@example.net",
    ]
    for block in blocks[1:]:
        assert b"Action: failed\r\nStatus: 5.1.1\r\n" in block
        assert b"Diagnostic-Code: smtp; 550 5.1.1 Recipient rejected upstream\r\n" in block
    text = raw.split(b"Content-Type: text/rfc822-headers", 1)[1]
    assert b"Subject: Order 42" in text
    assert b"hidden@example.net" not in raw  # Bcc stays hidden, continuation line included
    assert b"secret body" not in raw


def test_a_transient_final_reply_is_reported_with_a_permanent_status() -> None:
    raw = build_dsn(
        dead(), SMTPReply(451, "4.4.1", "Upstream unreachable"), hostname="h", dsn_id="d", now=0
    )
    assert b"Status: 5.4.1\r\n" in raw
    raw = build_dsn(dead(), SMTPReply(554, "", "odd"), hostname="h", dsn_id="d", now=0)
    assert b"Status: 5.0.0\r\n" in raw


def test_utf8_addresses_use_the_global_report_types() -> None:
    entry = dataclasses.replace(dead(), mail_from="jörg@example.com", rcpt_tos=("zoë@example.net",))
    raw = build_dsn(entry, REPLY, hostname="gw.test", dsn_id="d", now=0)
    assert b"Content-Type: message/global-delivery-status" in raw  # RFC 6533
    assert "Final-Recipient: utf-8; zoë@example.net".encode() in raw


@pytest.mark.parametrize(
    ("raw", "sender", "reason"),
    [
        (ORIGINAL, "", "null sender"),
        (ORIGINAL, "MAILER-DAEMON@example.org", "sender is a mailer daemon"),
        (
            b"Auto-Submitted: auto-replied\r\n" + ORIGINAL,
            "x@example.com",
            "message is auto-submitted",
        ),
        (
            b"Auto-Submitted: auto-generated; owner=x\r\n" + ORIGINAL,
            "x@example.com",
            "message is auto-submitted",
        ),
        (
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n"
            + ORIGINAL,
            "x@example.com",
            "message is itself a report",
        ),
        (b"Auto-Submitted: no\r\n" + ORIGINAL, "x@example.com", None),
        (ORIGINAL, "x@example.com", None),
    ],
)
def test_bounce_refusal(raw: bytes, sender: str, reason: str | None) -> None:
    assert bounce_refusal(dead(raw, sender)) == reason


def test_a_dsn_is_never_bounced_in_turn() -> None:
    raw = build_dsn(dead(), REPLY, hostname="gw.test", dsn_id="d", now=0)
    assert bounce_refusal(dead(raw, "")) == "null sender"
    assert bounce_refusal(dead(raw, "someone@example.com")) == "message is auto-submitted"


def test_webhook_payload_has_no_body_and_names_the_failed_recipients() -> None:
    entry = dead(done_recipients=("a@example.net",), attempts=3, last_error="HTTP 422")
    payload = webhook_payload(entry, REPLY, "gw.test")
    assert payload == {
        "event": "message_dead",
        "id": "01DEAD",
        "hostname": "gw.test",
        "sender": "app@example.com",
        "recipients": ["b@example.net", "c@example.net"],
        "delivered_recipients": ["a@example.net"],
        "reply": "550 5.1.1 Recipient rejected upstream",
        "detail": "HTTP 422",
        "attempts": 3,
        "created_at": "2023-11-14T22:13:20+00:00",
        "provider": "main",
        "providers": ["main"],
        "account": None,
    }
