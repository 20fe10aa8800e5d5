"""What the JSON providers (``sendgrid``, ``postmark``, ``resend``) share, as functions: one
bounded, size-checked POST and its error path, request sizes, the sender, header values, the
payload-bug log.

``base.py`` keeps the ``Provider`` shape and the helpers every provider uses; this module holds
those of the APIs that get the parsed message as JSON rather than the raw MIME.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from email.header import Header
from typing import Any

import httpx
import structlog

from smtp2api import replies
from smtp2api.errors import DeliveryError, PayloadBug, ProviderRejected
from smtp2api.models import Address, Envelope, Message
from smtp2api.providers.request import ApiAnswer, bounded_request

log = structlog.get_logger("smtp2api.providers")

_R552_TOO_LARGE = replies.R552_TOO_LARGE.with_text("Message too big for the upstream API")


def json_mime_limit(request_bytes: int) -> int:
    """The largest MIME message whose JSON request stays within ``request_bytes``.

    Attachments are base64 in the MIME already (RFC 2045 §6.8: 4/3, plus CRLF every 76
    characters) and base64 again in the JSON (4/3, no line breaks), so the JSON is usually no
    larger than the MIME; the worst case is a part sent 8bit/binary (RFC 6152, RFC 3030) that
    becomes base64 in the JSON: 4/3 growth. Hence 3/4 of the cap, enforced in the SMTP dialogue.
    """
    return request_bytes * 3 // 4


def encode_json(payload: Any) -> bytes:
    """The request body as sent: compact UTF-8 JSON (its length is what APIs limit)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def ensure_fits(body: bytes, limit: int, provider: str) -> None:
    """Refuse a request body over the API's cap before uploading it (the API would say 413)."""
    if len(body) > limit:
        raise ProviderRejected(
            f"{provider}: request of {len(body)} bytes exceeds the API's {limit}",
            reply=_R552_TOO_LARGE,
        )


def header_value(name: str, value: str) -> str:
    """A custom header's value as an API should get it: ASCII.

    ``mime.py`` decodes RFC 2047 encoded-words in ``X-*`` headers, which are unstructured;
    they go back to encoded-words here, as they came in, so no API has to encode UTF-8 itself.
    Structured headers keep their text as written (RFC 2047 §5 allows no encoded-word there).
    """
    if value.isascii() or not name.lower().startswith("x-"):
        return value
    return Header(value, "utf-8", header_name=name).encode()


def sender_address(message: Message, envelope: Envelope) -> Address:
    """The author for an API's ``from``: the From header, else the envelope sender.

    ``mime.py`` gives no From when the header is absent or ambiguous; the envelope sender has
    passed the account's policy. A message with neither (a bounce, ``MAIL FROM:<>``, without
    From) cannot be expressed to a JSON API: the message's fault.
    """
    if message.from_ is not None:
        return message.from_
    if envelope.mail_from:
        return Address(envelope.mail_from)
    raise ProviderRejected(
        "no From header and a null envelope sender",
        reply=replies.R554_BAD_MESSAGE.with_text("Message rejected: no sender address"),
    )


def report_payload_bug(provider: str, error: DeliveryError) -> None:
    """Design §4: an API that refuses the gateway's own payload is a bug worth an error log."""
    if isinstance(error, PayloadBug):
        log.error(
            "provider_payload_refused",
            provider=provider,
            status=error.status,
            provider_code=error.provider_code,
            request_id=error.request_id,
            detail=error.detail,
        )


async def post_json(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    *,
    headers: Mapping[str, str],
    budget: float,
) -> ApiAnswer:
    """One bounded POST of a JSON ``body`` (from ``encode_json``); transport errors mapped.

    ``budget`` (seconds) bounds the whole call (``request.bounded_request``); once the status
    line has arrived it decides, even if the body then times out.
    """
    sent = httpx.Headers(headers)
    sent["Content-Type"] = "application/json"
    sent.setdefault("Accept", "application/json")
    return await bounded_request(client, "POST", url, budget=budget, content=body, headers=sent)


async def send_json(
    client: httpx.AsyncClient,
    url: str,
    payload: Any,
    *,
    headers: Mapping[str, str],
    budget: float,
    max_bytes: int,
    provider: str,
    classify: Callable[[ApiAnswer, tuple[str, ...]], DeliveryError],
    secrets: tuple[str, ...] = (),
) -> ApiAnswer:
    """Encode, size-check and POST ``payload``; a non-2xx answer is raised as ``classify``
    maps it (``secrets`` redacted from its text), payload bugs logged first."""
    body = encode_json(payload)
    ensure_fits(body, max_bytes, provider)
    answer = await post_json(client, url, body, headers=headers, budget=budget)
    if not answer.ok:
        error = classify(answer, secrets)
        report_payload_bug(provider, error)
        raise error
    return answer
