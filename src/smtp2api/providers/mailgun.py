"""The ``mailgun`` provider: ``POST /v3/{domain}/messages.mime`` with the original MIME.

Multipart form (Mailgun OpenAPI, ``messages.mime``): ``to`` repeated once per envelope
recipient (so Bcc works and header addresses outside the envelope get nothing), ``message``
as a file part holding the raw bytes, ``o:tag`` and ``v:<name>`` from the normalised tags and
metadata. HTTP Basic ``api:<key>``; EU domains through ``base_url``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import httpx
import structlog

from smtp2api import config, replies
from smtp2api.errors import (
    DeliveryError,
    PayloadBug,
    ProviderConfigError,
    ProviderRejected,
    RateLimited,
    TransientDeliveryError,
)
from smtp2api.models import Envelope, Message, SendResult
from smtp2api.providers.base import (
    MAX_RETRY_AFTER,
    Rule,
    error_text,
    named_error,
    parse_json,
    retry_after_seconds,
)
from smtp2api.providers.request import bounded_request
from smtp2api.replies import sanitize_text

log = structlog.get_logger("smtp2api.providers.mailgun")

DEFAULT_BASE_URL = "https://api.mailgun.net"  # EU domains: https://api.eu.mailgun.net
MAX_RECIPIENTS = 1000  # Mailgun: recipients per call
MAX_MESSAGE_SIZE = 25_000_000  # Mailgun: 25 MB per message; sent as binary, no base64 growth
MAX_TAGS = 10  # o:tag values per message
MAX_TAG_LENGTH = 128  # Mailgun tags: ASCII, at most 128 characters
# Mailgun: send options (o:, h:, v:, t:) are limited to 16 KB in total.
MAX_OPTIONS_BYTES = 16 * 1024
_TAG_UNSAFE = re.compile(r"[^\x20-\x7e]")
_TRY_AGAIN = re.compile(r"try again after (\d+(?:\.\d+)?) seconds?", re.IGNORECASE)
# 400 texts that blame a recipient ("'to' parameter is not a valid address"); the form's
# other fields are ours, so only "to" counts.
_NAMES_TO = re.compile(r"""['"`]to['"`]|\bto parameter\b""", re.IGNORECASE)
# 400 texts about the request the gateway built rather than the message.
_OUR_FIELDS = re.compile(
    r"limited to 16\s*kb|['\"`]?message['\"`]? parameter|parameter ['\"`]?message",
    re.IGNORECASE,
)
_SANDBOX = re.compile(r"authorized recipients", re.IGNORECASE)

_R553_TO = replies.R553_BAD_RECIPIENT.with_text("Recipient address rejected upstream")
_R554_REJECTED = replies.R554_BAD_MESSAGE.with_text("Message rejected upstream")
_R550_NOT_AUTHORIZED = replies.R550_POLICY.with_text("Recipient not authorized upstream")


def _tags(message: Message) -> list[str]:
    """Up to ``MAX_TAGS`` printable-ASCII tags of at most 128 characters, first ones first."""
    tags: list[str] = []
    for tag in message.tags:
        clean = _TAG_UNSAFE.sub("_", tag)[:MAX_TAG_LENGTH].strip()
        if clean and clean.lower() not in (t.lower() for t in tags):  # case-insensitive
            tags.append(clean)
    if len(tags) > MAX_TAGS:
        log.warning("mailgun_tags_dropped", kept=MAX_TAGS, dropped=len(tags) - MAX_TAGS)
    return tags[:MAX_TAGS]


def options(message: Message) -> list[tuple[str, str]]:
    """The ``o:tag`` and ``v:`` form fields, kept within Mailgun's 16 KB for all options.

    Tags come first (they are small and drive Mailgun's analytics); metadata entries that do
    not fit are dropped whole, in order, with a warning: a truncated JSON value is worse than
    none.
    """
    fields = [("o:tag", tag) for tag in _tags(message)]
    used = sum(len(k.encode()) + len(v.encode()) for k, v in fields)
    dropped = 0
    for key, value in message.metadata.items():
        field = (f"v:{key}", value)
        size = len(field[0].encode()) + len(value.encode())
        if used + size > MAX_OPTIONS_BYTES:
            dropped += 1
            continue
        used += size
        fields.append(field)
    if dropped:
        log.warning("mailgun_variables_dropped", dropped=dropped, limit=MAX_OPTIONS_BYTES)
    return fields


def _bad_request(reason: str) -> Rule:
    if _NAMES_TO.search(reason):
        return (ProviderRejected, _R553_TO)
    if _OUR_FIELDS.search(reason):
        return (PayloadBug, replies.R451_INTERNAL)
    if _SANDBOX.search(reason):  # sandbox domain: only authorised recipients
        return (ProviderRejected, _R550_NOT_AUTHORIZED)
    return (ProviderRejected, _R554_REJECTED)  # anything else about the message


def _retry_after(headers: httpx.Headers, reason: str) -> float | None:
    """Mailgun's hint is in the text ("try again after 120 seconds"); a header wins if sent."""
    hinted = retry_after_seconds(headers)
    if hinted is not None:
        return hinted
    found = _TRY_AGAIN.search(reason)
    return min(float(found.group(1)), MAX_RETRY_AFTER) if found else None


class MailgunProvider:
    """Sends the raw MIME through Mailgun's ``messages.mime`` (design §5, ``mailgun``)."""

    raw_mime = True
    max_recipients = MAX_RECIPIENTS
    max_message_size = MAX_MESSAGE_SIZE

    def __init__(
        self, name: str, settings: config.MailgunProvider, client: httpx.AsyncClient
    ) -> None:
        self.name = name
        self._client = client
        base = (settings.base_url or DEFAULT_BASE_URL).rstrip("/")
        # The domain is a path segment: quote it, so a stray "/" or "?" cannot reshape the URL.
        self.url = f"{base}/v3/{quote(settings.domain, safe='')}/messages.mime"
        self._timeout = settings.timeout
        key = settings.api_key.get_secret_value()
        self._auth = httpx.BasicAuth("api", key)
        self._secrets = (key,)

    def __repr__(self) -> str:  # never the key
        return f"MailgunProvider(name={self.name!r}, url={self.url!r})"

    def form(self, message: Message, envelope: Envelope) -> tuple[list[tuple[str, str]], Any]:
        """``(data, files)`` for httpx: ``to`` per recipient, options, the MIME file part."""
        data = [("to", rcpt) for rcpt in dict.fromkeys(envelope.rcpt_tos)]
        data += options(message)
        files = {"message": ("message.eml", message.raw, "message/rfc822")}
        return data, files

    async def send(self, message: Message, envelope: Envelope) -> SendResult:
        data, files = self.form(message, envelope)
        fields: dict[str, list[str]] = {}
        for key, value in data:  # httpx repeats a field given as a list
            fields.setdefault(key, []).append(value)
        answer = await bounded_request(
            self._client,
            "POST",
            self.url,
            budget=self._timeout,
            data=fields,
            files=files,
            auth=self._auth,
            headers={"Accept": "application/json"},
        )
        if answer.ok:
            parsed = parse_json(answer.body)
            found = parsed.get("id") if isinstance(parsed, dict) else None
            # Mailgun's id is the Message-ID in angle brackets; its events API drops them.
            text = sanitize_text(found.strip().strip("<>"), 200) if isinstance(found, str) else ""
            return SendResult(provider=self.name, provider_id=text or None)
        error = self._error(answer.status, answer.headers, answer.body)
        if isinstance(error, PayloadBug):  # our request was wrong: a bug to fix, not mail
            log.error(
                "provider_refused_request",
                provider=self.name,
                status=answer.status,
                request_id=error.request_id,
                detail=error.detail,
            )
        raise error

    def _error(self, status: int, headers: httpx.Headers, body: bytes) -> DeliveryError:
        data = parse_json(body)
        # 401's body is the bare JSON string "Forbidden"; the others {"message": "..."}.
        reason = error_text(data, secrets=self._secrets)
        if not reason and isinstance(data, str):
            reason = sanitize_text(data, 120)
        rule = self._rule(status, reason)
        error = named_error(rule, status, headers=headers, reason=reason)
        if rule is not None and isinstance(error, TransientDeliveryError):
            error.retry_after = _retry_after(headers, reason)  # the generic rows: headers only
        return error

    @staticmethod
    def _rule(status: int, reason: str) -> Rule | None:
        """Mailgun's answers by status and text (docs/providers/mailgun.md); None: generic."""
        if status == 400:
            return _bad_request(reason)
        if status in (401, 403, 404):  # key, permissions, unknown domain (may be transient)
            return (ProviderConfigError, replies.R451_PROVIDER_CONFIG)
        if status == 429:
            return (RateLimited, replies.R451_RATE_LIMITED)
        return None  # 413 -> 552 5.3.4, 5xx -> 451 4.3.0, ...: design §4's generic rows

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client is shared and closed by ``app.py``."""
