"""The generic ``http`` provider: POST the message as JSON to one URL (design §2, §4, §5).

The body is ``Message.as_json()`` (``docs/message.schema.json``). A generic API has no error
vocabulary, so its status code decides the reply; 400/422 are the message's fault.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any
from urllib.parse import urlsplit

import httpx

from smtp2api import config, replies
from smtp2api.errors import DeliveryError
from smtp2api.models import Envelope, Message, SendResult
from smtp2api.providers.base import (
    annotate,
    classify_status,
    error_code,
    error_text,
    for_envelope,
    parse_json,
)
from smtp2api.providers.jsonapi import Base64Bytes, JsonStream, json_body
from smtp2api.providers.request import bounded_request
from smtp2api.replies import sanitize_text

MAX_RECIPIENTS = 1000  # per call; a generic API states none, and larger envelopes are split
# A generic API states no size limit either: assume a 40 MB request body (Resend's cap; most
# JSON APIs take 20-40 MB). Attachments are base64 in the MIME already (RFC 2045 §6.8: 4/3,
# plus CRLF every 76 characters) and base64 again in the JSON (4/3, no line breaks), so the
# JSON is usually no larger than the MIME. The worst case is a part sent 8bit/binary in the
# MIME (RFC 6152, RFC 3030) that becomes base64 in the JSON: 4/3 growth. Hence 3/4 of the cap.
MAX_REQUEST_BYTES = 40_000_000
MAX_MESSAGE_SIZE = MAX_REQUEST_BYTES * 3 // 4

_ID_KEYS = ("id", "message_id", "messageId", "MessageId")
_RECIPIENT_FIELDS = frozenset({"to", "cc", "bcc", "recipient", "recipients"})
# Where validation errors name the offending field: `field`/`param` (most APIs), `path`/`loc`
# (JSON Schema, FastAPI), `pointer` (RFC 6901, JSON:API's `source.pointer`).
_FIELD_KEYS = ("field", "param", "parameter", "property", "path", "loc", "pointer", "source")
_SEGMENT = re.compile(r"[A-Za-z_]+")  # "personalizations[0].to", "/to/0", "to.0.email"
# In free text only unambiguous mentions count ("to" alone is an everyday word): a quoted or
# indexed field name, or words that only ever mean recipients.
_FIELD_IN_TEXT = re.compile(
    r"""[`'"](?:to|cc|bcc|recipients?)(?:\[\d*\]|\.\w+)*[`'"]"""
    r"""|\b(?:to|cc|bcc|recipients?)(?:\[\d*\]|\.\d+)"""
    r"""|\b(?:cc|bcc|recipients?)\b"""
    r"""|^\s*to\s*:""",
    re.IGNORECASE,
)
_R553_REJECTED = replies.R553_BAD_RECIPIENT.with_text("Recipient address rejected upstream")
_PER_MESSAGE = ("X-Smtp2api-Id", "Idempotency-Key")
# Attachments of this many bytes in all or more are base64-encoded while the request is sent.
STREAM_ATTACHMENTS = 1024 * 1024


def endpoint(settings: config.HttpProvider) -> str:
    """``url``, or its path and query on ``base_url``'s origin when that is set (design §5)."""
    if not settings.base_url:
        return settings.url
    parts = urlsplit(settings.url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return settings.base_url.rstrip("/") + path


def _field_values(item: Any) -> list[str]:
    """The field names an error object points at, as strings."""
    values: list[str] = []
    if not isinstance(item, dict):
        return values
    for key in _FIELD_KEYS:
        value = item.get(key)
        if isinstance(value, dict):  # JSON:API: {"source": {"pointer": "/data/attributes/to"}}
            values += _field_values(value)
        elif isinstance(value, list):
            values += [str(part) for part in value if isinstance(part, str)]
        elif isinstance(value, str):
            values.append(value)
    return values


def _error_items(data: dict[str, Any]) -> list[Any]:
    items: list[Any] = [data]
    for key in ("errors", "error", "detail", "details"):
        value = data.get(key)
        if isinstance(value, list):
            items += value[:50]
        elif isinstance(value, dict):
            items.append(value)
            items.append({"field": list(value)})  # Rails style: {"errors": {"to": [...]}}
    return items


def names_recipient_field(data: Any) -> bool:
    """Whether a JSON error body blames ``to``/``cc``/``bcc``/``recipient(s)``."""
    if not isinstance(data, dict):
        return False
    for item in _error_items(data):
        for value in _field_values(item):
            if any(seg.lower() in _RECIPIENT_FIELDS for seg in _SEGMENT.findall(value)):
                return True
        for key in ("message", "error", "msg", "detail"):
            text = item.get(key) if isinstance(item, dict) else None
            if isinstance(text, str) and _FIELD_IN_TEXT.search(text[:2000]):
                return True
    return False


def _provider_id(body: bytes, headers: httpx.Headers) -> str | None:
    data = parse_json(body)
    if isinstance(data, dict):
        for key in _ID_KEYS:
            value = data.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
                return sanitize_text(str(value), 200) or None
    header = headers.get("x-message-id")
    return sanitize_text(header, 200) or None if header else None


def request_body(message: Message) -> bytes | JsonStream:
    """``message.as_json()`` as UTF-8 JSON; with ``STREAM_ATTACHMENTS`` bytes of attachments
    or more, a ``JsonStream`` that base64-encodes them as it is sent (``jsonapi.json_body``)."""
    if sum(len(a.content) for a in message.attachments) < STREAM_ATTACHMENTS:
        return json_body(message.as_json())
    payload = dataclasses.replace(message, attachments=()).as_json()
    payload["attachments"] = [
        # Attachment.as_json's keys, in its order, with the content left to the stream.
        {**dataclasses.replace(a, content=b"").as_json(), "content": Base64Bytes(a.content)}
        for a in message.attachments
    ]
    return json_body(payload)


class HttpApiProvider:
    """POSTs ``Message.as_json()`` to ``settings.url`` with a Bearer key (design §5, ``http``)."""

    raw_mime = False
    max_recipients = MAX_RECIPIENTS
    max_message_size = MAX_MESSAGE_SIZE

    def __init__(self, name: str, settings: config.HttpProvider, client: httpx.AsyncClient) -> None:
        self.name = name
        self._client = client
        self._url = endpoint(settings)
        self._timeout = settings.timeout
        headers = httpx.Headers(settings.headers)
        # Ours win over configured headers: they carry the protocol, not preferences.
        headers["Content-Type"] = "application/json"
        headers["Accept"] = "application/json"
        secrets = [value for value in settings.headers.values() if len(value) >= 8]
        if settings.api_key is not None:
            key = settings.api_key.get_secret_value()
            headers["Authorization"] = f"Bearer {key}"
            secrets.append(key)
        for header in _PER_MESSAGE:  # set on each request
            headers.pop(header, None)
        # Checked once (``Headers`` takes ASCII only): each request appends its own few to a
        # copy of these, which ``bounded_request`` passes to aiohttp as they are.
        self._headers = tuple((k.decode("ascii"), v.decode("ascii")) for k, v in headers.raw)
        self._secrets = tuple(secrets)  # redacted should the API echo one in an error

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"HttpApiProvider(name={self.name!r}, url={self._url!r})"

    async def send(self, message: Message, envelope: Envelope) -> SendResult:
        message = for_envelope(message, envelope)
        # The same id on every attempt: the API can drop duplicates of a retried call (design §3).
        headers = [*self._headers, *((name, message.id) for name in _PER_MESSAGE)]
        body = request_body(message)
        if isinstance(body, JsonStream):  # a length, not chunked framing: not every API takes it
            headers.append(("Content-Length", str(body.length)))
        answer = await bounded_request(
            self._client,
            "POST",
            self._url,
            budget=self._timeout,
            content=body,
            headers=headers,
        )
        if answer.ok:
            return SendResult(
                provider=self.name, provider_id=_provider_id(answer.body, answer.headers)
            )
        raise self._error(answer.status, answer.headers, answer.body)

    def _error(self, status: int, headers: httpx.Headers, body: bytes) -> DeliveryError:
        data = parse_json(body)
        reason = error_text(data, secrets=self._secrets)
        error = classify_status(
            status, headers=headers, provider_code=error_code(data), reason=reason
        )
        # Design §4, generic provider: a 400/422 that names a recipient field is 553 5.1.3.
        if status in (400, 422) and names_recipient_field(data):
            error.reply = annotate(_R553_REJECTED, reason, error.provider_code, error.request_id)
        return error

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client is shared and closed by ``app.py``."""
