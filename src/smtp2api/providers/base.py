"""The ``Provider`` shape and the helpers providers share as functions, not as a base class.

A provider is built once (in ``app.py``) from its settings and a shared ``httpx.AsyncClient``;
``send`` either returns a ``SendResult`` or raises a ``DeliveryError`` whose reply follows
design §4. Providers never log bodies or secrets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, runtime_checkable

from smtp2api import replies
from smtp2api.errors import (
    DeliveryError,
    OutcomeUnknown,
    PayloadBug,
    PermanentDeliveryError,
    ProviderConfigError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    TransientDeliveryError,
)
from smtp2api.models import Address, Envelope, Message, SendResult
from smtp2api.providers.request import (  # moved to request.py; still importable from here
    MAX_ERROR_BODY,
    RequestProgress,
    map_http_errors,
    read_limited,
)
from smtp2api.replies import SMTPReply, sanitize_text

__all__ = [
    "MAX_ERROR_BODY",
    "MAX_RETRY_AFTER",
    "Provider",
    "RequestProgress",
    "Rule",
    "annotate",
    "answer_id",
    "classify_status",
    "error_code",
    "error_text",
    "find_request_id",
    "for_envelope",
    "make_error",
    "map_http_errors",
    "named_error",
    "parse_json",
    "read_limited",
    "redact",
    "retry_after_seconds",
]


@runtime_checkable
class Provider(Protocol):
    """What the delivery layer needs of an email API."""

    name: str  # the configured name ([providers.NAME]), used in logs and metric labels
    raw_mime: bool  # True when the API takes the original MIME (the model is then unused)
    max_recipients: int  # per API call; the delivery layer splits larger envelopes
    max_message_size: int  # bytes of MIME the API can take (JSON base64 overhead included)

    async def send(self, message: Message, envelope: Envelope) -> SendResult:
        """Deliver to ``envelope.rcpt_tos`` (all of them, exactly once)."""
        ...

    async def aclose(self) -> None:
        """Release what the provider owns (not the shared HTTP client)."""
        ...


# --- shared helpers ------------------------------------------------------------------------

MAX_RETRY_AFTER = 86_400.0  # a provider asking for more than a day is misconfigured or lying
_REASON_LIMIT = 120  # characters of a provider's error message kept for a reply line
_EPOCH_MS = 10**11  # X-RateLimit-Reset above this is epoch milliseconds, not seconds
_EPOCH_S = 10**9  # ... above this epoch seconds (2001-09-09), below it delta-seconds
_DELTA = re.compile(r"^\d+(?:\.\d+)?$")
_REQUEST_ID_HEADERS = (
    "x-request-id",
    "request-id",
    "x-amzn-requestid",
    "x-amz-request-id",
    "x-ms-request-id",
    "x-correlation-id",
)
_BEARER = re.compile(r"(?i)\b(bearer|basic|token)\s+\S+")
# Long opaque runs (API keys, JWT segments, signed URLs' tokens) that a provider might echo.
_OPAQUE = re.compile(r"(?<![\w+/=-])(?=[\w+/=-]*\d)(?=[\w+/=-]*[A-Za-z])[\w+/=-]{32,}")


def _header_map(headers: Mapping[str, str]) -> dict[str, str]:
    return {key.lower(): value for key, value in headers.items()}


def _delta(value: str) -> float | None:
    value = value.strip()
    return float(value) if _DELTA.match(value) else None


def _http_date(value: str, now: float) -> float | None:
    """RFC 9110 §5.6.7: IMF-fixdate, RFC 850 and asctime forms, all in GMT."""
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # asctime carries no zone; HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - now


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """How long the provider asked us to wait, in seconds, within 0..1 day; None if it did not.

    ``Retry-After`` (RFC 9110 §10.2.3: delta-seconds or HTTP-date) wins; then ``RateLimit-Reset``
    (draft-ietf-httpapi-ratelimit-headers: delta-seconds); then ``X-RateLimit-Reset``, which
    APIs send as epoch seconds, epoch milliseconds or delta-seconds.
    """
    now = time.time() if now is None else now
    found = _header_map(headers)
    wait: float | None = None
    if "retry-after" in found:
        value = found["retry-after"]
        wait = _delta(value)
        if wait is None:
            wait = _http_date(value, now)
    if wait is None and "ratelimit-reset" in found:
        wait = _delta(found["ratelimit-reset"])
    if wait is None and "x-ratelimit-reset" in found:
        wait = _delta(found["x-ratelimit-reset"])
        if wait is not None and wait > _EPOCH_MS:
            wait = wait / 1000 - now
        elif wait is not None and wait > _EPOCH_S:
            wait -= now
    if wait is None or not math.isfinite(wait):
        return None
    return min(max(wait, 0.0), MAX_RETRY_AFTER)


def find_request_id(headers: Mapping[str, str]) -> str | None:
    """The provider's request id from the usual response headers, made reply-safe."""
    found = _header_map(headers)
    for name in _REQUEST_ID_HEADERS:
        if found.get(name):
            return sanitize_text(found[name], 80) or None
    return None


def parse_json(body: bytes | str) -> Any:
    """The JSON value of a (bounded) body, or None when it is not JSON."""
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested input
        return None


def _first_error(data: Any) -> Any:
    """The error object of the common shapes: ``error: {...}`` or ``errors: [{...}]``."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("error"), dict):
        return data["error"]
    errors = data.get("errors")
    if isinstance(errors, list) and errors:
        return errors[0]
    return None


def _pick_text(data: Any, keys: tuple[str, ...]) -> str:
    if isinstance(data, str):
        return data
    if isinstance(data, dict):
        for key in keys:
            value = data.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
                return str(value)
    return ""


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Blank credentials and credential-looking tokens a provider might echo back."""
    for secret in secrets:
        if len(secret) >= 8:  # shorter values are not secrets, and would blank common words
            text = text.replace(secret, "[redacted]")
    text = _BEARER.sub(lambda m: f"{m.group(1)} [redacted]", text)
    return _OPAQUE.sub("[redacted]", text)


def error_text(body: Any, limit: int = _REASON_LIMIT, secrets: tuple[str, ...] = ()) -> str:
    """A short, reply-safe error message from a JSON error body; "" when there is none.

    Looks at ``message``, ``error``, ``errors[0].message`` and RFC 9457's ``detail``/``title``.
    ``body`` is raw bytes/str (parsed here; non-JSON gives "") or an already parsed value.
    """
    data = parse_json(body) if isinstance(body, bytes | str) else body
    if not isinstance(data, dict):
        return ""
    text = _pick_text(data, ("message", "error"))
    if not text:
        text = _pick_text(_first_error(data), ("message", "msg", "detail", "title"))
    if not text:
        text = _pick_text(data, ("detail", "title", "error_description"))
    # Cut before redacting: the regexes then see a bounded text, and the cut is far past `limit`.
    return sanitize_text(redact(text[: limit * 8], secrets), limit)


def error_code(body: Any) -> str | None:
    """The provider's machine-readable error code (``code``, ``error.code``, ``errors[0].code``)."""
    data = parse_json(body) if isinstance(body, bytes | str) else body
    if not isinstance(data, dict):
        return None
    code = _pick_text(data, ("code", "error_code", "name")) or _pick_text(
        _first_error(data), ("code", "type")
    )
    return sanitize_text(code, 40) or None


def annotate(
    reply: SMTPReply,
    reason: str = "",
    provider_code: str | None = None,
    request_id: str | None = None,
) -> SMTPReply:
    """``reply`` with text ``<reply text>[: reason] [(code=..., request_id=...)]``, sanitised.

    Each part is bounded before joining so the ids survive the line limit.
    """
    text = reply.text
    if reason:
        text = f"{text}: {sanitize_text(reason, _REASON_LIMIT)}"
    refs = []
    if provider_code:
        refs.append(f"code={sanitize_text(provider_code, 40)}")
    if request_id:
        refs.append(f"request_id={sanitize_text(request_id, 80)}")
    if refs:
        text = f"{text} ({', '.join(refs)})"
    # RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with code and CRLF.
    return SMTPReply(reply.code, reply.enhanced, sanitize_text(text, 400))


_R554_REJECTED = replies.R554_BAD_MESSAGE.with_text("Message rejected upstream")
_R552_TOO_LARGE = replies.R552_TOO_LARGE.with_text("Message too big for the upstream API")

_Rule = tuple[type[DeliveryError], SMTPReply, str]  # error class, reply, note for the logs
_CONFIG: _Rule = (ProviderConfigError, replies.R451_PROVIDER_CONFIG, "check url and credentials")
# 408: the server gave up reading us (RFC 9110 §15.5.9); 409: the same Idempotency-Key is
# still being processed. Either may or may not have been taken: retry with the same id.
_UNKNOWN: _Rule = (OutcomeUnknown, replies.R451_TIMEOUT, "")
# Statuses about the shape of our HTTP request, never about the message: a gateway bug.
_PAYLOAD: _Rule = (PayloadBug, replies.R451_INTERNAL, "the gateway's request was refused")
_RULES: dict[int, _Rule] = {
    400: (ProviderRejected, _R554_REJECTED, ""),
    422: (ProviderRejected, _R554_REJECTED, ""),
    413: (ProviderRejected, _R552_TOO_LARGE, ""),
    429: (RateLimited, replies.R451_RATE_LIMITED, ""),
    408: _UNKNOWN,
    409: _UNKNOWN,
    **dict.fromkeys((401, 403, 404, 405, 407, 410, 421), _CONFIG),
    **dict.fromkeys((406, 411, 415, 417, 426, 428, 431), _PAYLOAD),
}
# Design §8: redirects are never followed (one could carry the API key elsewhere).
_REDIRECT: _Rule = (ProviderConfigError, replies.R451_PROVIDER_CONFIG, "redirect not followed")
# Every other answer (5xx, unknown 4xx, nonsense) is transient: nothing accepted is lost.
_UNAVAILABLE: _Rule = (ProviderUnavailable, replies.R451_TRY_LATER, "")


def _rule(status: int) -> _Rule:
    if 300 <= status < 400:
        return _REDIRECT
    return _RULES.get(status, _UNAVAILABLE)


def classify_status(
    status: int,
    *,
    headers: Mapping[str, str],
    detail: str = "",
    provider_code: str | None = None,
    request_id: str | None = None,
    reason: str = "",
) -> DeliveryError:
    """The delivery error for a non-2xx answer, per design §4's generic rows.

    ``reason`` (a short, sanitised provider message) goes into the reply text only when the
    message is at fault, since then the sender must act on it; otherwise only into ``detail``
    for the logs. Every reply carries the provider code and request id, for support tickets.
    Transient errors carry the provider's ``Retry-After`` / reset hint.
    """
    if 200 <= status < 300:
        raise ValueError(f"HTTP {status} is a success, not an error")
    cls, base, note = _rule(status)
    return make_error(
        cls,
        base,
        status=status,
        headers=headers,
        detail="; ".join(p for p in (note, detail) if p),
        provider_code=provider_code,
        request_id=request_id,
        reason=reason,
    )


def make_error(
    cls: type[DeliveryError],
    reply: SMTPReply,
    *,
    status: int,
    headers: Mapping[str, str],
    detail: str = "",
    provider_code: str | None = None,
    request_id: str | None = None,
    reason: str = "",
) -> DeliveryError:
    """A ``cls`` error with ``reply``, built as ``classify_status`` builds its own.

    For providers whose named errors pick the class and reply themselves: the reply text
    carries ``reason`` only when the message is at fault, plus the provider code and request
    id; ``detail`` (logs) gets the status and reason; transient errors get the retry hint.
    """
    request_id = request_id or find_request_id(headers)
    log = "; ".join(p for p in (f"HTTP {status}", detail, reason and f"reason={reason!r}") if p)
    shown = reason if issubclass(cls, PermanentDeliveryError) else ""
    error = cls(
        log,
        reply=annotate(reply, shown, provider_code, request_id),
        provider_code=provider_code,
        request_id=request_id,
        status=status,
    )
    if isinstance(error, TransientDeliveryError):
        error.retry_after = retry_after_seconds(headers)
    return error


Rule = tuple[type[DeliveryError], SMTPReply]  # a provider's own class and reply for an answer


def named_error(
    rule: Rule | None,
    status: int,
    *,
    headers: Mapping[str, str],
    provider_code: str | None = None,
    reason: str = "",
) -> DeliveryError:
    """The error for a provider's named ``rule`` (``make_error``); without one, design §4's
    generic rows decide by ``status`` (``classify_status``)."""
    common: dict[str, Any] = {"headers": headers, "provider_code": provider_code, "reason": reason}
    if rule is None:
        return classify_status(status, **common)
    return make_error(rule[0], rule[1], status=status, **common)


def answer_id(data: Any, key: str) -> str | None:
    """``data[key]`` when it is a string, made reply-safe: the provider's id for the message."""
    found = data.get(key) if isinstance(data, dict) else None
    return sanitize_text(found, 200) or None if isinstance(found, str) else None


def for_envelope(message: Message, envelope: Envelope) -> Message:
    """``message`` addressed to exactly ``envelope.rcpt_tos``, each once (design §2).

    JSON providers deliver to to/cc/bcc, so those are cut to the envelope (the delivery layer
    may pass one chunk of a larger envelope), and envelope recipients the headers do not show
    become bcc. Returns ``message`` itself when it already matches.
    """
    wanted: dict[str, str] = {}
    for rcpt in envelope.rcpt_tos:
        wanted.setdefault(rcpt.lower(), rcpt)
    seen: set[str] = set()

    def keep(addresses: tuple[Address, ...]) -> tuple[Address, ...]:
        kept = []
        for address in addresses:
            key = address.email.lower()
            if key in wanted and key not in seen:
                seen.add(key)
                kept.append(address)
        return tuple(kept)

    to, cc, bcc = keep(message.to), keep(message.cc), keep(message.bcc)
    bcc += tuple(Address(email) for key, email in wanted.items() if key not in seen)
    if (to, cc, bcc) == (message.to, message.cc, message.bcc):
        return message
    return dataclasses.replace(message, to=to, cc=cc, bcc=bcc)
