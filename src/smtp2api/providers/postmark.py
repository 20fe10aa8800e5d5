"""The ``postmark`` provider: Postmark's ``POST /email`` (``/email/withTemplate``) from the model.

Postmark's HTTP API takes no raw MIME, so the request is composed from the parsed ``Message``
(design §2). Errors come as HTTP 422 with a numeric ``ErrorCode``; the code, not the status,
decides the reply (design §4, table in ``docs/providers/postmark.md``).
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from smtp2api import config, replies
from smtp2api.errors import (
    AccountPaused,
    DeliveryError,
    PayloadBug,
    ProviderConfigError,
    ProviderRejected,
    ProviderUnavailable,
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
from smtp2api.providers.jsonapi import (
    header_value,
    json_mime_limit,
    report_payload_bug,
    send_json,
    sender_address,
)
from smtp2api.providers.request import ApiAnswer
from smtp2api.replies import SMTPReply

API_URL = "https://api.postmarkapp.com"
EMAIL_PATH = "/email"
TEMPLATE_PATH = "/email/withTemplate"
MAX_RECIPIENTS = 50  # To + Cc + Bcc
MAX_REQUEST_BYTES = 10_000_000  # "10 MB including attachments, measured after base64"
MAX_MESSAGE_SIZE = json_mime_limit(MAX_REQUEST_BYTES)
MAX_TAG_CHARS = 1000
# Postmark wants TextBody or HtmlBody ("Provide either email TextBody or HtmlBody or both").
BLANK_BODY = " "

_R553_RECIPIENT = replies.R553_BAD_RECIPIENT.with_text("Recipient address rejected upstream")
_R553_SENDER = SMTPReply(553, "5.1.7", "Sender address rejected upstream")  # RFC 3463 X.1.7
_R554_REJECTED = replies.R554_BAD_MESSAGE.with_text("Message rejected upstream")
_R550_INACTIVE = replies.R550_RECIPIENT_REJECTED.with_text("Recipient suppressed upstream")
_R550_ATTACHMENT = replies.R550_POLICY.with_text("Attachment type refused upstream")
_SENDER_IN_TEXT = re.compile(r"""['"`]from['"`]""", re.IGNORECASE)

_Rule = Rule
# Postmark's ErrorCode table (postmarkapp.com/developer/api/overview#error-codes).
_CODES: dict[int, _Rule] = {
    10: (ProviderConfigError, replies.R451_PROVIDER_CONFIG),  # bad or missing server token
    100: (ProviderUnavailable, replies.R451_TRY_LATER),  # maintenance
    400: (ProviderRejected, replies.R550_SENDER_NOT_ALLOWED_UPSTREAM),  # signature not found
    401: (ProviderRejected, replies.R550_SENDER_NOT_ALLOWED_UPSTREAM),  # not confirmed
    402: (PayloadBug, replies.R451_INTERNAL),  # invalid JSON
    403: (PayloadBug, replies.R451_INTERNAL),  # incompatible JSON
    405: (AccountPaused, replies.R451_ACCOUNT_PAUSED),  # not allowed to send (credits)
    406: (ProviderRejected, _R550_INACTIVE),  # inactive (bounced, complained) recipient
    409: (PayloadBug, replies.R451_INTERNAL),  # JSON required
    410: (PayloadBug, replies.R451_INTERNAL),  # too many batch messages
    411: (ProviderRejected, _R550_ATTACHMENT),  # forbidden attachment type
    412: (AccountPaused, replies.R451_ACCOUNT_PAUSED),  # account pending approval
    413: (AccountPaused, replies.R451_ACCOUNT_PAUSED),  # account may not send
    429: (RateLimited, replies.R451_RATE_LIMITED),
}


def _join(addresses: tuple[Address, ...]) -> str:
    return ", ".join(a.formatted() for a in addresses)


def _attachment(attachment: Attachment) -> dict[str, str]:
    out = {
        "Name": attachment.filename,
        "Content": attachment.content_b64,
        "ContentType": attachment.content_type,
    }
    # Postmark embeds a part whose ContentID is "cid:<id>"; without one it is attached.
    if attachment.disposition == "inline" and attachment.content_id:
        out["ContentID"] = f"cid:{attachment.content_id}"
    return out


def _headers(message: Message) -> list[dict[str, str]]:
    headers = [
        {"Name": name, "Value": header_value(name, value)}
        for name, value in message.headers
        if name.lower() != "x-smtp2api-id"
    ]
    headers.append({"Name": "X-Smtp2api-Id", "Value": message.id})
    return headers


def _metadata(metadata: dict[str, str]) -> dict[str, str]:
    # Postmark refuses keys that differ only in case ("a_key" and "A_Key"): the first one wins.
    kept: dict[str, str] = {}
    seen: set[str] = set()
    for key, value in metadata.items():
        if key.lower() not in seen:
            seen.add(key.lower())
            kept[key] = value
    return kept


def _content(message: Message) -> dict[str, str]:
    content = {"Subject": message.subject}
    if message.text:
        content["TextBody"] = message.text
    if message.html:
        content["HtmlBody"] = message.html
    if not (message.text or message.html):
        content["TextBody"] = BLANK_BODY
    return content


def _template(template: str, variables: dict[str, Any] | None) -> dict[str, Any]:
    # A numeric template is Postmark's TemplateId (an integer); anything else is an alias.
    ref: dict[str, Any]
    if template.isascii() and template.isdigit():
        ref = {"TemplateId": int(template)}
    else:
        ref = {"TemplateAlias": template}
    return {**ref, "TemplateModel": variables or {}}


def build_request(
    message: Message, envelope: Envelope, message_stream: str
) -> tuple[str, dict[str, Any]]:
    """(path, body) of the call that sends ``message`` to exactly ``envelope.rcpt_tos``.

    Postmark sends To/Cc/Bcc as given, and accepts a message whose recipients are all Bcc
    (no To at all), so the envelope maps one to one. ``message_stream`` is the configured
    stream, used unless the message named one (``X-PM-Message-Stream``).
    """
    message = for_envelope(message, envelope)
    body: dict[str, Any] = {"From": sender_address(message, envelope).formatted()}
    for key, addresses in (("To", message.to), ("Cc", message.cc), ("Bcc", message.bcc)):
        if addresses:
            body[key] = _join(addresses)
    if message.template is None:
        path = EMAIL_PATH
        body.update(_content(message))
    else:
        path = TEMPLATE_PATH  # the template supplies subject and bodies
        body.update(_template(message.template, message.template_variables))
    if message.reply_to:
        body["ReplyTo"] = _join(message.reply_to)
    body["Headers"] = _headers(message)
    if message.attachments:
        body["Attachments"] = [_attachment(a) for a in message.attachments]
    if message.tags:
        body["Tag"] = message.tags[0][:MAX_TAG_CHARS]  # Postmark takes one tag per message
    if message.metadata:
        body["Metadata"] = _metadata(message.metadata)
    body["MessageStream"] = message.stream or message_stream
    return path, body


def _error_code(data: Any) -> int | None:
    code = data.get("ErrorCode") if isinstance(data, dict) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def _invalid_request(text: str) -> _Rule:
    """ErrorCode 300, "invalid email request": which address it names, if any."""
    if names_recipient_field({"message": text}):
        return ProviderRejected, _R553_RECIPIENT
    if _SENDER_IN_TEXT.search(text):
        return ProviderRejected, _R553_SENDER
    return ProviderRejected, _R554_REJECTED


def classify(answer: ApiAnswer, secrets: tuple[str, ...] = ()) -> DeliveryError:
    """The delivery error for a Postmark answer (``docs/providers/postmark.md``).

    Also used for a 200 whose ``ErrorCode`` is not 0, which the single-send API should never
    give but a batch element does.
    """
    data = parse_json(answer.body)
    code = _error_code(data)
    text = data.get("Message") if isinstance(data, dict) else None
    reason = error_text({"message": text}, secrets=secrets) if isinstance(text, str) else ""
    provider_code = str(code) if code is not None else None
    rule: _Rule | None = None
    if answer.status == 401:
        rule = ProviderConfigError, replies.R451_PROVIDER_CONFIG
    elif code == 300:
        rule = _invalid_request(reason)
    elif code is not None:
        rule = _CODES.get(code)
    # A 200 with an unknown ErrorCode counts as the 422 it stands for.
    status = 422 if answer.ok and rule is None else answer.status
    return named_error(
        rule, status, headers=answer.headers, provider_code=provider_code, reason=reason
    )


class PostmarkProvider:
    """Sends through Postmark's Email API (design §5, ``postmark``)."""

    raw_mime = False
    max_recipients = MAX_RECIPIENTS
    max_message_size = MAX_MESSAGE_SIZE

    def __init__(
        self, name: str, settings: config.PostmarkProvider, client: httpx.AsyncClient
    ) -> None:
        self.name = name
        self._client = client
        self._base = (settings.base_url or API_URL).rstrip("/")
        self._timeout = settings.timeout
        self._stream = settings.message_stream
        token = settings.server_token.get_secret_value()
        self._headers = {"X-Postmark-Server-Token": token}
        self._secrets = (token,)

    def __repr__(self) -> str:  # never the headers: they hold the token
        return f"PostmarkProvider(name={self.name!r}, url={self._base!r})"

    async def send(self, message: Message, envelope: Envelope) -> SendResult:
        path, payload = build_request(message, envelope, self._stream)
        answer = await send_json(
            self._client,
            self._base + path,
            payload,
            headers=self._headers,
            budget=self._timeout,
            max_bytes=MAX_REQUEST_BYTES,
            provider=self.name,
            classify=classify,
            secrets=self._secrets,
        )
        data = parse_json(answer.body)
        if _error_code(data):  # a 2xx can still carry an ErrorCode (see ``classify``)
            error = classify(answer, self._secrets)
            report_payload_bug(self.name, error)
            raise error
        return SendResult(provider=self.name, provider_id=answer_id(data, "MessageID"))

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client is shared and closed by ``app.py``."""
