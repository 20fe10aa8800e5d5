"""The ``resend`` provider: Resend's ``POST /emails`` from the model, with an ``Idempotency-Key``.

Resend takes no raw MIME, so the request is composed from the parsed ``Message`` (design §2).
Every call carries the message's stable id as ``Idempotency-Key``, retries included, so a call
whose answer was lost is not sent twice (design §3). Errors are named (``name`` in the body)
and map onto design §4 (table in ``docs/providers/resend.md``).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import httpx

from smtp2api import config, replies
from smtp2api.errors import (
    DeliveryError,
    OutcomeUnknown,
    PayloadBug,
    ProviderConfigError,
    ProviderRejected,
    QuotaExhausted,
    RateLimited,
)
from smtp2api.models import Address, Attachment, Envelope, Message, SendResult
from smtp2api.providers.base import (
    Rule,
    answer_id,
    error_text,
    for_envelope,
    named_error,
    parse_json,
)
from smtp2api.providers.http import names_recipient_field
from smtp2api.providers.jsonapi import header_value, json_mime_limit, send_json, sender_address
from smtp2api.providers.request import ApiAnswer
from smtp2api.replies import SMTPReply, sanitize_text

API_URL = "https://api.resend.com"
EMAILS_PATH = "/emails"
MAX_RECIPIENTS = 50  # `to` holds at most 50
MAX_REQUEST_BYTES = 40_000_000  # 40 MB per email, attachments included
MAX_MESSAGE_SIZE = json_mime_limit(MAX_REQUEST_BYTES)
MAX_KEY_CHARS = 256  # Idempotency-Key: 1 to 256 characters
MAX_TAG_CHARS = 256
NO_SUBJECT = "(no subject)"  # `subject` is required
BLANK_BODY = " "  # one of html/text is required without a template
# Tag names and values: ASCII letters, digits, "_" and "-" only.
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_SENDER_IN_TEXT = re.compile(r"""[`'"]from[`'"]""", re.IGNORECASE)

_R553_RECIPIENT = replies.R553_BAD_RECIPIENT.with_text("Recipient address rejected upstream")
_R553_SENDER = SMTPReply(553, "5.1.7", "Sender address rejected upstream")  # RFC 3463 X.1.7
_R554_REJECTED = replies.R554_BAD_MESSAGE.with_text("Message rejected upstream")
_R550_ATTACHMENT = replies.R550_POLICY.with_text("Attachment refused upstream")
_R451_IN_FLIGHT = replies.R451_TRY_LATER.with_text("Upstream still processing, try again later")

_Rule = Rule
_CONFIG: _Rule = (ProviderConfigError, replies.R451_PROVIDER_CONFIG)
_PAYLOAD: _Rule = (PayloadBug, replies.R451_INTERNAL)
_NAMES: dict[str, _Rule] = {
    "missing_api_key": _CONFIG,
    "restricted_api_key": _CONFIG,
    "invalid_api_key": _CONFIG,
    "invalid_access": _CONFIG,
    "invalid_region": _CONFIG,
    "not_found": _CONFIG,
    "invalid_idempotency_key": _PAYLOAD,
    # Same key, different payload: our ids are unique per message and chunk, so it is our bug.
    "invalid_idempotent_request": _PAYLOAD,
    "missing_required_field": _PAYLOAD,  # the gateway always sends from, to and subject
    # Same key still in flight: the first call may yet succeed; retry later with the same key.
    "concurrent_idempotent_requests": (OutcomeUnknown, _R451_IN_FLIGHT),
    "invalid_from_address": (ProviderRejected, replies.R550_SENDER_NOT_ALLOWED_UPSTREAM),
    "invalid_attachment": (ProviderRejected, _R550_ATTACHMENT),
    "security_error": (ProviderRejected, replies.R550_POLICY),
    "rate_limit_exceeded": (RateLimited, replies.R451_RATE_LIMITED),
    "daily_quota_exceeded": (QuotaExhausted, replies.R451_RATE_LIMITED),
    "monthly_quota_exceeded": (QuotaExhausted, replies.R451_RATE_LIMITED),
}


def _tag_text(text: str) -> str:
    return _TAG_UNSAFE.sub("_", text)[:MAX_TAG_CHARS]


def _tags(message: Message) -> list[dict[str, str]]:
    """Tags and metadata as Resend tags (it has no separate metadata field).

    A tag ``welcome`` becomes ``{name: welcome, value: true}``; metadata ``order=A/42``
    becomes ``{name: order, value: A_42}``. Names are sanitised to Resend's alphabet; the first
    of two that sanitise to the same name wins.
    """
    tags: dict[str, str] = {}
    pairs = [(tag, "true") for tag in message.tags] + list(message.metadata.items())
    for key, value in pairs:
        name, text = _tag_text(key), _tag_text(value)
        if name and text:
            tags.setdefault(name, text)
    return [{"name": name, "value": value} for name, value in tags.items()]


def _variables(variables: dict[str, Any] | None) -> dict[str, str | int | float]:
    # Template variables are strings or numbers; anything else travels as its JSON text.
    out: dict[str, str | int | float] = {}
    for key, value in (variables or {}).items():
        plain = isinstance(value, str | int | float) and not isinstance(value, bool)
        out[key] = value if plain else json.dumps(value, ensure_ascii=False)
    return out


def _attachment(attachment: Attachment) -> dict[str, str]:
    out = {
        "content": attachment.content_b64,
        "filename": attachment.filename,
        "content_type": attachment.content_type,
    }
    # Resend embeds a part that has a content_id (referenced as cid: from the HTML).
    if attachment.disposition == "inline" and attachment.content_id:
        out["content_id"] = attachment.content_id
    return out


def _headers(message: Message) -> dict[str, str]:
    headers: dict[str, str] = {}
    seen: set[str] = {"x-smtp2api-id"}  # the gateway's own, set below
    for name, value in message.headers:
        if name.lower() not in seen:
            seen.add(name.lower())  # a JSON object holds one value per name: the first one
            headers[name] = header_value(name, value)
    headers["X-Smtp2api-Id"] = message.id
    return headers


def _common(message: Message, envelope: Envelope) -> dict[str, Any]:
    body: dict[str, Any] = {"from": sender_address(message, envelope).formatted()}
    if message.template is None:
        body["subject"] = message.subject or NO_SUBJECT
        if message.html:
            body["html"] = message.html
        if message.text or not message.html:
            body["text"] = message.text or BLANK_BODY
    else:
        # The template supplies the bodies, and the subject unless the message has one.
        if message.subject:
            body["subject"] = message.subject
        body["template"] = {
            "id": message.template,
            "variables": _variables(message.template_variables),
        }
    if message.reply_to:
        body["reply_to"] = [a.formatted() for a in message.reply_to]
    body["headers"] = _headers(message)
    # A zero-byte file cannot be sent (Resend: "must have either a content or path").
    attachments = [_attachment(a) for a in message.attachments if a.content]
    if attachments:
        body["attachments"] = attachments
    tags = _tags(message)
    if tags:
        body["tags"] = tags
    return body


def _key(base: str, address: Address | None = None) -> str:
    """The Idempotency-Key of one call: the message's id, per recipient when split."""
    key = base
    if address is not None:
        key = f"{base}.{hashlib.sha256(address.email.lower().encode()).hexdigest()[:12]}"
    if len(key) > MAX_KEY_CHARS:  # stable and short enough, whatever the id looks like
        key = hashlib.sha256(key.encode()).hexdigest()
    return key


def build_requests(message: Message, envelope: Envelope) -> list[tuple[str, dict[str, Any]]]:
    """(Idempotency-Key, body) of each call that sends ``message`` to ``envelope.rcpt_tos``.

    One call normally. Resend requires a ``to``: with only Cc recipients, they become ``to``
    (they were visible already; only the header label changes); with only blind recipients,
    each gets a call of its own with itself as ``to`` (so nobody learns of the others, and
    nobody outside the envelope gets a copy), each with its own stable key.
    """
    message = for_envelope(message, envelope)
    common = _common(message, envelope)
    to, cc = (message.to, message.cc) if message.to else (message.cc, ())
    if not to:
        return [(_key(message.id, a), {**common, "to": [a.formatted()]}) for a in message.bcc]
    body = {**common, "to": [a.formatted() for a in to]}
    if cc:
        body["cc"] = [a.formatted() for a in cc]
    if message.bcc:
        body["bcc"] = [a.formatted() for a in message.bcc]
    return [(_key(message.id), body)]


def _validation(status: int, reason: str) -> _Rule:
    # 403 validation_error: "domain is not verified", "you can only send testing emails".
    if status == 403:
        return ProviderRejected, replies.R550_SENDER_NOT_ALLOWED_UPSTREAM
    if names_recipient_field({"message": reason}):
        return ProviderRejected, _R553_RECIPIENT
    if _SENDER_IN_TEXT.search(reason):
        return ProviderRejected, _R553_SENDER
    return ProviderRejected, _R554_REJECTED


def classify(answer: ApiAnswer, secrets: tuple[str, ...] = ()) -> DeliveryError:
    """The delivery error for a non-2xx Resend answer (``docs/providers/resend.md``)."""
    data = parse_json(answer.body)
    name = data.get("name") if isinstance(data, dict) else None
    name = name if isinstance(name, str) else None
    reason = error_text(data, secrets=secrets)
    rule: _Rule | None = None
    if name in ("validation_error", "invalid_parameter"):
        rule = _validation(answer.status, reason)
    elif name is not None:
        rule = _NAMES.get(name)
    code = sanitize_text(name, 40) if name else None
    return named_error(
        rule, answer.status, headers=answer.headers, provider_code=code, reason=reason
    )


class ResendProvider:
    """Sends through Resend's Emails API (design §5, ``resend``)."""

    raw_mime = False
    max_recipients = MAX_RECIPIENTS
    max_message_size = MAX_MESSAGE_SIZE

    def __init__(
        self, name: str, settings: config.ResendProvider, client: httpx.AsyncClient
    ) -> None:
        self.name = name
        self._client = client
        self._url = (settings.base_url or API_URL).rstrip("/") + EMAILS_PATH
        self._timeout = settings.timeout
        key = settings.api_key.get_secret_value()
        self._auth = f"Bearer {key}"
        self._secrets = (key,)

    def __repr__(self) -> str:  # never the key
        return f"ResendProvider(name={self.name!r}, url={self._url!r})"

    async def send(self, message: Message, envelope: Envelope) -> SendResult:
        ids: list[str] = []
        # Encoded one at a time, so split calls hold one body in memory, not one per recipient.
        # They differ only in `to`, so the first size check speaks for them all.
        for key, payload in build_requests(message, envelope):
            answer = await send_json(
                self._client,
                self._url,
                payload,
                # The same key on every attempt: Resend answers a repeat from its 24 h record.
                headers={"Authorization": self._auth, "Idempotency-Key": key},
                budget=self._timeout,
                max_bytes=MAX_REQUEST_BYTES,
                provider=self.name,
                classify=classify,
                secrets=self._secrets,
            )
            email_id = answer_id(parse_json(answer.body), "id")
            if email_id:
                ids.append(email_id)
        return SendResult(provider=self.name, provider_id=",".join(ids) or None)

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client is shared and closed by ``app.py``."""
