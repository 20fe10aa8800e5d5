"""Frozen value types that flow through the gateway: envelope, parsed message, send result.

Pure data: no I/O, no parsing (that is ``mime.py``). ``Message.as_json`` is the body the
generic ``http`` provider posts and the ``outbox`` provider writes (schema in
``docs/message.schema.json``).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope: authoritative for who gets the message (RFC 5321 §2.3.1)."""

    mail_from: str  # "" is the null reverse-path (MAIL FROM:<>)
    rcpt_tos: tuple[str, ...]
    account: str | None = None  # authenticated username, None when trusted by network
    peer: str = ""  # client IP address
    smtputf8: bool = False


@dataclass(frozen=True, slots=True)
class Address:
    email: str
    name: str = ""

    def formatted(self) -> str:
        """``Name <email>`` with the name quoted when it needs to be (RFC 5322 §3.4)."""
        if not self.name:
            return self.email
        name = self.name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{name}" <{self.email}>'

    def as_json(self) -> dict[str, str]:
        return {"email": self.email, "name": self.name} if self.name else {"email": self.email}


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes
    disposition: Literal["attachment", "inline"] = "attachment"
    content_id: str | None = None  # without angle brackets

    @property
    def content_b64(self) -> str:
        return base64.b64encode(self.content).decode("ascii")

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "filename": self.filename,
            "content_type": self.content_type,
            "content": self.content_b64,
            "disposition": self.disposition,
        }
        if self.content_id:
            out["content_id"] = self.content_id
        return out


@dataclass(frozen=True, slots=True)
class Message:
    """A message as a JSON email API sees it, plus the raw MIME for APIs that take it.

    ``to``/``cc``/``bcc`` are envelope recipients only: ``to`` and ``cc`` are those found
    in the To/Cc headers, ``bcc`` the rest. ``raw`` is the original MIME with the gateway's
    ``Received:`` header, without ``Bcc:`` and without the provider control headers.
    """

    id: str  # the gateway's stable id: X-Smtp2api-Id, Idempotency-Key, spool key
    raw: bytes
    from_: Address | None
    to: tuple[Address, ...]
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = ()
    subject: str = ""
    text: str | None = None
    html: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = ()
    tags: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    template_variables: dict[str, Any] | None = None
    stream: str | None = None  # X-PM-Message-Stream: a provider's message stream
    configuration_set: str | None = None  # X-SES-CONFIGURATION-SET

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(a.email for a in (*self.to, *self.cc, *self.bcc))

    def header(self, name: str) -> str | None:
        """The first kept header called ``name`` (case-insensitive)."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def as_json(self) -> dict[str, Any]:
        """The generic JSON body (design §2); ``docs/message.schema.json`` describes it."""
        body: dict[str, Any] = {
            "from": self.from_.as_json() if self.from_ else None,
            "to": [a.as_json() for a in self.to],
            "cc": [a.as_json() for a in self.cc],
            "bcc": [a.as_json() for a in self.bcc],
            "reply_to": [a.as_json() for a in self.reply_to],
            "subject": self.subject,
            "text": self.text,
            "html": self.html,
            "headers": dict(self.headers),
            "attachments": [a.as_json() for a in self.attachments],
            "tags": list(self.tags),
            "metadata": dict(self.metadata),
        }
        if self.template is not None:
            body["template"] = {"id": self.template, "variables": self.template_variables or {}}
        return body


@dataclass(frozen=True, slots=True)
class SendResult:
    """A provider accepted the message."""

    provider: str  # the configured provider name
    provider_id: str | None  # the API's message id; None when the API gives none (Graph)
    recipients: tuple[str, ...] = ()  # accepted recipients when the call covered a subset
