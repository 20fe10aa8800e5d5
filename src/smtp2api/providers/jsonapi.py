"""What the JSON providers (``sendgrid``, ``postmark``, ``resend``, ``http``) share, as
functions: one bounded, size-checked POST and its error path, request sizes, the sender, header
values, the payload-bug log, a JSON body whose base64 attachments are encoded as it is sent.

``base.py`` keeps the ``Provider`` shape and the helpers every provider uses; this module holds
those of the APIs that get the parsed message as JSON rather than the raw MIME.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
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


class Base64Bytes:
    """``data`` as a JSON string of its base64 (RFC 4648 §4), for ``json_body``: the text is
    made slice by slice while the request is sent, never whole. Held whole, a 19 MB
    attachment costs its base64 three times over (the string, ``json.dumps``'s copy of it,
    the UTF-8 encoding of that) before a byte is sent."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def encoded_length(self) -> int:
        return (len(self.data) + 2) // 3 * 4


class JsonStream:
    """A JSON request body of known ``length`` whose ``Base64Bytes`` are encoded as it is sent.

    ``httpx`` takes it as ``content`` (an async iterable; send ``Content-Length: length``
    with it, or httpx frames it chunked); it can be iterated more than once.
    """

    def __init__(self, pieces: list[bytes | Base64Bytes]) -> None:
        self._pieces = pieces
        self.length = sum(
            p.encoded_length if isinstance(p, Base64Bytes) else len(p) for p in pieces
        )

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self._pieces:
            if not isinstance(piece, Base64Bytes):
                yield piece
                continue
            view = memoryview(piece.data)
            for start in range(0, len(view), _BASE64_SLICE):
                yield base64.b64encode(view[start : start + _BASE64_SLICE])


_BASE64_SLICE = 3 * 64 * 1024  # a multiple of 3: slices encode to base64 without padding


_PLAIN = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def json_body(payload: Any) -> bytes | JsonStream:
    """``payload`` as compact UTF-8 JSON (NaN refused, as httpx's ``json=`` does); bytes,
    unless it holds ``Base64Bytes``: then a ``JsonStream`` that encodes them as it is sent.

    The JSON around them is made by ``json.dumps`` with a random placeholder in their place
    (base64 needs no JSON escaping, RFC 8259 §7), then cut at the placeholders.
    """
    try:
        # Most payloads hold no Base64Bytes: one shared encoder, instead of the one
        # ``json.dumps`` builds per call for non-default options (half the CPU for 2 KB).
        return _PLAIN.encode(payload).encode()
    except TypeError:
        pass  # a Base64Bytes (or something unencodable, which the call below reports)
    blobs: list[Base64Bytes] = []
    marker = ""

    def placeholder(value: object) -> str:
        nonlocal marker
        if not isinstance(value, Base64Bytes):
            raise TypeError(f"{type(value).__name__} is not JSON serializable")
        marker = marker or f"smtp2api-base64-{secrets.token_hex(16)}"
        blobs.append(value)
        return marker

    text = json.dumps(
        payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=placeholder
    ).encode()
    if not blobs:
        return text
    parts = text.split(marker.encode())
    if len(parts) != len(blobs) + 1:  # pragma: no cover - 128 random bits in the message
        raise ValueError("JSON placeholder found in the payload itself")
    pieces: list[bytes | Base64Bytes] = [parts[0]]
    for blob, part in zip(blobs, parts[1:], strict=True):
        pieces += [blob, part]
    return JsonStream(pieces)


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
