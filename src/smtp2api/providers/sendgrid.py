"""The ``sendgrid`` provider: SendGrid v3 Mail Send, ``POST /v3/mail/send``, built from the model.

SendGrid takes no raw MIME, so the request is composed from the parsed ``Message`` (design §2);
its answers map onto design §4 (table in ``docs/providers/sendgrid.md``). The message id comes
back in the ``X-Message-Id`` header of the ``202``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import structlog

from smtp2api import config, replies
from smtp2api.errors import DeliveryError, PayloadBug, ProviderConfigError, ProviderRejected
from smtp2api.models import Address, Attachment, Envelope, Message, SendResult
from smtp2api.providers.base import (
    Rule,
    classify_status,
    error_text,
    for_envelope,
    make_error,
    parse_json,
)
from smtp2api.providers.jsonapi import header_value, json_mime_limit, send_json, sender_address
from smtp2api.providers.request import ApiAnswer
from smtp2api.replies import SMTPReply, sanitize_text

log = structlog.get_logger("smtp2api.providers.sendgrid")

API_URL = (
    "https://api.sendgrid.com"  # EU regional subusers: base_url = "https://api.eu.sendgrid.com"
)
SEND_PATH = "/v3/mail/send"
MAX_RECIPIENTS = 1000  # to + cc + bcc over all personalizations of one request
MAX_REQUEST_BYTES = 30_000_000  # "total message size < 30 MB", attachments included
MAX_MESSAGE_SIZE = json_mime_limit(MAX_REQUEST_BYTES)
MAX_CATEGORIES = 10
MAX_CATEGORY_CHARS = 255
MAX_CUSTOM_ARGS_BYTES = 10_000
# SendGrid refuses a subject or a content value shorter than one character (minLength 1).
NO_SUBJECT = "(no subject)"
BLANK_BODY = " "
# Headers the API may not override (the spec's `headers` description); the gateway sets these
# through the dedicated fields or SendGrid sets them itself.
FORBIDDEN_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    }
)
# A recipient's name may not contain ',' or ';' (SendGrid's errors page): "Doe, Jane" is
# sent as "Doe Jane" rather than have the whole message refused.
_NAME_UNSAFE = re.compile(r"[,;]+")

# Which part of our request an error's `field` blames (design §4: the message's fault is 5xx,
# our own payload 451 4.3.0).
_RECIPIENT_FIELD = re.compile(r"^personalizations(?:\.\d+)?\.(?:to|cc|bcc)(?:\.|\[|$)")
_SENDER_FIELD = re.compile(r"^from(?:\.email)?$")
_ATTACHMENT_BUILT = re.compile(r"^attachments(?:\.\d+)?\.(?:content|disposition|content_id)$")
# Top-level fields the gateway composes itself: an error about them is a gateway bug.
_BUILT_FIELDS = frozenset(
    {
        "personalizations",
        "content",
        "headers",
        "categories",
        "custom_args",
        "sections",
        "asm",
        "batch_id",
        "send_at",
        "ip_pool_name",
        "mail_settings",
        "tracking_settings",
    }
)
_VERIFIED_SENDER = re.compile(r"verified sender identity", re.IGNORECASE)

_R553_RECIPIENT = replies.R553_BAD_RECIPIENT.with_text("Recipient address rejected upstream")
# RFC 3463 X.1.7: bad sender's mailbox address syntax.
_R553_SENDER = SMTPReply(553, "5.1.7", "Sender address rejected upstream")
_R554_REJECTED = replies.R554_BAD_MESSAGE.with_text("Message rejected upstream")


def _name(name: str) -> str:
    return " ".join(_NAME_UNSAFE.sub(" ", name).split())


def _mailbox(address: Address) -> dict[str, str]:
    name = _name(address.name)
    return {"email": address.email, "name": name} if name else {"email": address.email}


def _custom_args(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata as ``custom_args``, cut to SendGrid's 10,000 bytes (dropped keys are logged)."""
    kept: dict[str, str] = {}
    for key, value in metadata.items():
        trial = {**kept, key: value}
        if len(json.dumps(trial, ensure_ascii=False).encode()) > MAX_CUSTOM_ARGS_BYTES:
            log.warning("custom_args_truncated", kept=len(kept), dropped=len(metadata) - len(kept))
            break
        kept = trial
    return kept


def _personalizations(message: Message) -> list[dict[str, Any]]:
    """One personalization normally; one per recipient when nobody is visible.

    SendGrid requires a non-empty ``to``. With only Cc recipients, they become ``to`` (they
    were visible already; only the header label changes). With only blind recipients, each
    gets a personalization of its own with itself as ``to``: SendGrid sends one copy per
    personalization, so nobody learns of the others, and nobody outside the envelope gets one.
    """
    shared: dict[str, Any] = {}
    if message.metadata:
        shared["custom_args"] = _custom_args(message.metadata)
    if message.template is not None and message.template_variables:
        shared["dynamic_template_data"] = message.template_variables
    to, cc = (message.to, message.cc) if message.to else (message.cc, ())
    if not to:
        return [{"to": [_mailbox(a)], **shared} for a in message.bcc]
    one: dict[str, Any] = {"to": [_mailbox(a) for a in to]}
    if cc:
        one["cc"] = [_mailbox(a) for a in cc]
    if message.bcc:
        one["bcc"] = [_mailbox(a) for a in message.bcc]
    return [{**one, **shared}]


def _content(message: Message) -> list[dict[str, str]]:
    # RFC 2046 §5.1.4 order, and SendGrid requires text/plain first when both are present.
    content = [
        {"type": ctype, "value": value}
        for ctype, value in (("text/plain", message.text), ("text/html", message.html))
        if value
    ]
    return content or [{"type": "text/plain", "value": BLANK_BODY}]


def _attachment(attachment: Attachment) -> dict[str, str]:
    out = {
        "content": attachment.content_b64,
        "filename": attachment.filename,
        "type": attachment.content_type,
        "disposition": "attachment",
    }
    # SendGrid needs a content_id for an inline part; an inline part without one is attached.
    if attachment.disposition == "inline" and attachment.content_id:
        out["disposition"] = "inline"
        out["content_id"] = attachment.content_id
    return out


def _headers(message: Message) -> dict[str, str]:
    headers: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in message.headers:
        key = name.lower()
        if key in FORBIDDEN_HEADERS or key in seen or key == "x-smtp2api-id":
            continue
        seen.add(key)  # a JSON object holds one value per name: the first one counts
        headers[name] = header_value(name, value)
    headers["X-Smtp2api-Id"] = message.id
    return headers


def _categories(tags: tuple[str, ...]) -> list[str]:
    categories: list[str] = []
    for tag in tags:
        category = tag[:MAX_CATEGORY_CHARS]
        if category and category not in categories:
            categories.append(category)
    return categories[:MAX_CATEGORIES]


def build_request(message: Message, envelope: Envelope) -> dict[str, Any]:
    """The Mail Send body for ``message`` addressed to exactly ``envelope.rcpt_tos``."""
    message = for_envelope(message, envelope)
    body: dict[str, Any] = {
        "personalizations": _personalizations(message),
        "from": _mailbox(sender_address(message, envelope)),
    }
    if message.template is None:
        body["subject"] = message.subject or NO_SUBJECT
        body["content"] = _content(message)
    else:
        # The template supplies the body, and the subject unless the message has one.
        body["template_id"] = message.template
        if message.subject:
            body["subject"] = message.subject
    if len(message.reply_to) == 1:
        body["reply_to"] = _mailbox(message.reply_to[0])
    elif message.reply_to:
        unique: dict[str, Address] = {}
        for address in message.reply_to:  # the list must hold each address once
            unique.setdefault(address.email.lower(), address)
        body["reply_to_list"] = [_mailbox(a) for a in unique.values()]
    # A zero-byte file cannot be sent (content has minLength 1); its name alone carries nothing.
    attachments = [_attachment(a) for a in message.attachments if a.content]
    if attachments:
        body["attachments"] = attachments
    body["headers"] = _headers(message)
    categories = _categories(message.tags)
    if categories:
        body["categories"] = categories
    return body


def _blame(field: str) -> str:
    """``recipient``, ``sender``, ``payload`` (our bug) or ``message`` for an error's field."""
    field = field.strip().lower()
    if _RECIPIENT_FIELD.match(field):
        return "recipient"
    if _SENDER_FIELD.match(field):
        return "sender"
    top = re.split(r"[.\[]", field, maxsplit=1)[0]
    if top in _BUILT_FIELDS or _ATTACHMENT_BUILT.match(field):
        return "payload"
    return "message"


_BLAME_ORDER = ("recipient", "sender", "payload", "message")
_BLAME_RULES: dict[str, Rule] = {
    "recipient": (ProviderRejected, _R553_RECIPIENT),
    "sender": (ProviderRejected, _R553_SENDER),
    "payload": (PayloadBug, replies.R451_INTERNAL),
    "message": (ProviderRejected, _R554_REJECTED),
}


def _errors(data: Any) -> list[dict[str, Any]]:
    errors = data.get("errors") if isinstance(data, dict) else None
    return [e for e in errors[:50] if isinstance(e, dict)] if isinstance(errors, list) else []


def _field(item: dict[str, Any]) -> str:
    field = item.get("field")
    # The spec's own examples send the string "null" for "no field".
    return field if isinstance(field, str) and field.lower() != "null" else ""


def classify(answer: ApiAnswer, secrets: tuple[str, ...] = ()) -> DeliveryError:
    """The delivery error for a non-2xx Mail Send answer (``docs/providers/sendgrid.md``)."""
    data = parse_json(answer.body)
    items = _errors(data)
    request_id = data.get("id") if isinstance(data, dict) else None
    request_id = sanitize_text(request_id, 80) if isinstance(request_id, str) else None
    common: dict[str, Any] = {"status": answer.status, "headers": answer.headers}
    if answer.status == 400 and items:
        blamed = [(_blame(_field(item)), item) for item in items]
        blame, item = min(blamed, key=lambda pair: _BLAME_ORDER.index(pair[0]))
        cls, reply = _BLAME_RULES[blame]
        return make_error(
            cls,
            reply,
            **common,
            provider_code=_field(item) or None,
            request_id=request_id,
            reason=error_text(item, secrets=secrets),
            detail=f"blame={blame}",
        )
    reason = error_text(data, secrets=secrets)
    if answer.status == 403 and any(
        _VERIFIED_SENDER.search(str(item.get("message", ""))) for item in items
    ):
        return make_error(
            ProviderRejected,
            replies.R550_SENDER_NOT_ALLOWED_UPSTREAM,
            **common,
            request_id=request_id,
            reason=reason,
        )
    if answer.status == 451:  # data residency: the account or key is in the wrong region
        return make_error(
            ProviderConfigError,
            replies.R451_PROVIDER_CONFIG,
            **common,
            request_id=request_id,
            detail="data residency: check base_url",
        )
    return classify_status(
        answer.status, headers=answer.headers, request_id=request_id, reason=reason
    )


class SendgridProvider:
    """Sends through SendGrid's v3 Mail Send API (design §5, ``sendgrid``)."""

    raw_mime = False
    max_recipients = MAX_RECIPIENTS
    max_message_size = MAX_MESSAGE_SIZE

    def __init__(
        self, name: str, settings: config.SendgridProvider, client: httpx.AsyncClient
    ) -> None:
        self.name = name
        self._client = client
        self._url = (settings.base_url or API_URL).rstrip("/") + SEND_PATH
        self._timeout = settings.timeout
        key = settings.api_key.get_secret_value()
        self._headers = {"Authorization": f"Bearer {key}"}
        self._secrets = (key,)  # redacted should the API echo it in an error

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"SendgridProvider(name={self.name!r}, url={self._url!r})"

    async def send(self, message: Message, envelope: Envelope) -> SendResult:
        answer = await send_json(
            self._client,
            self._url,
            build_request(message, envelope),
            headers=self._headers,
            budget=self._timeout,
            max_bytes=MAX_REQUEST_BYTES,
            provider=self.name,
            classify=classify,
            secrets=self._secrets,
        )
        message_id = answer.headers.get("x-message-id")
        provider_id = sanitize_text(message_id, 200) if message_id else ""
        return SendResult(provider=self.name, provider_id=provider_id or None)

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client is shared and closed by ``app.py``."""
