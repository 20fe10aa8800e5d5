"""``Message`` models for provider unit tests: the fully populated message the JSON providers
(postmark, resend, sendgrid) are tested with, so each test file states only what differs."""

from __future__ import annotations

from typing import Any

from smtp2api.models import Address, Attachment, Envelope, Message

MESSAGE_ID = "01J0MSGID0000000000000000"
PNG = b"\x89PNG\r\n\x1a\n-image-"
# To, Cc and a blind recipient: the envelope every JSON provider must map one to one.
ENVELOPE = Envelope(
    "bounce@example.com", ("rcpt@example.net", "cc@example.net", "hidden@example.net")
)


def json_message(**changes: Any) -> Message:
    """Every field set: a name that needs quoting, text and HTML, a PDF and an inline logo."""
    fields: dict[str, Any] = {
        "id": MESSAGE_ID,
        "raw": b"From: s@example.com\r\n\r\nHi\r\n",
        "from_": Address("sender@example.com", "Sender"),
        "to": (Address("rcpt@example.net", "Doe, Jane"),),
        "cc": (Address("cc@example.net"),),
        "bcc": (Address("hidden@example.net"),),
        "subject": "Hello \u00e9",
        "text": "Hi",
        "html": '<p>Hi <img src="cid:logo@example.com"></p>',
        "attachments": (
            Attachment("a.pdf", "application/pdf", b"%PDF-1.4"),
            Attachment("logo.png", "image/png", PNG, "inline", "logo@example.com"),
        ),
        **changes,
    }
    return Message(**fields)
