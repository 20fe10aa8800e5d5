"""SES API v2 error answers -> the delivery error tree (design §4 plus SES's named errors).

The error's name comes from the ``x-amzn-ErrorType`` header, else the body's ``__type`` or
``code`` (rest-json, read the way AWS SDKs read it); its text from ``message``/``Message``.
The table is documented in ``docs/providers/ses.md``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from smtp2api import replies
from smtp2api.errors import (
    AccountPaused,
    DeliveryError,
    PayloadBug,
    ProviderConfigError,
    ProviderRejected,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
)
from smtp2api.providers.base import (
    classify_status,
    find_request_id,
    make_error,
    parse_json,
    redact,
)
from smtp2api.replies import SMTPReply, sanitize_text

# SES sends no Retry-After. The daily quota is a rolling 24 h window: capacity comes back
# gradually, so retrying within minutes only burns attempts. An hour, then the spool backoff.
QUOTA_RETRY_AFTER = 3600.0
_REASON_LIMIT = 120

_R550_NOT_VERIFIED = replies.R550_SENDER_NOT_ALLOWED_UPSTREAM.with_text(
    "Address not verified upstream"
)
_R550_MAIL_FROM = replies.R550_SENDER_NOT_ALLOWED_UPSTREAM.with_text(
    "MAIL FROM domain not verified upstream"
)
_R550_REJECTED = replies.R550_POLICY.with_text("Message rejected upstream")
_R553_ADDRESS = replies.R553_BAD_RECIPIENT.with_text("Address rejected upstream")
_R451_QUOTA = replies.R451_RATE_LIMITED.with_text("Upstream sending quota exhausted, try later")

_Rule = tuple[type[DeliveryError], SMTPReply]
_CONFIG: _Rule = (ProviderConfigError, replies.R451_PROVIDER_CONFIG)
_THROTTLED: _Rule = (RateLimited, replies.R451_RATE_LIMITED)
_PAUSED: _Rule = (AccountPaused, replies.R451_ACCOUNT_PAUSED)
_DOWN: _Rule = (ProviderUnavailable, replies.R451_TRY_LATER)
_BY_TYPE: dict[str, _Rule] = {
    "MailFromDomainNotVerifiedException": (ProviderRejected, _R550_MAIL_FROM),
    "AccountSuspendedException": _PAUSED,  # permanent per AWS; the mail waits for a human
    "SendingPausedException": _PAUSED,
    "TooManyRequestsException": _THROTTLED,  # the sesv2 model's throttle error (429)
    "ThrottlingException": _THROTTLED,  # what the SES guide names for the API
    "Throttling": _THROTTLED,
    "LimitExceededException": _THROTTLED,
    "NotFoundException": _CONFIG,  # configuration set, template or contact list
    # AWS common errors: credentials, signature, permissions, clock (403 or 400).
    **dict.fromkeys(
        (
            "AccessDeniedException",
            "AccessDenied",
            "InvalidClientTokenId",
            "UnrecognizedClientException",
            "SignatureDoesNotMatch",
            "InvalidSignatureException",
            "IncompleteSignature",
            "IncompleteSignatureException",
            "MissingAuthenticationToken",
            "MissingAuthenticationTokenException",
            "ExpiredToken",
            "ExpiredTokenException",
            "RequestExpired",
            "OptInRequired",
            "NotAuthorized",
        ),
        _CONFIG,
    ),
    **dict.fromkeys(
        (
            "InternalServiceErrorException",
            "InternalFailure",
            "InternalError",
            "ServiceUnavailable",
            "ServiceUnavailableException",
            "ConcurrentModificationException",
        ),
        _DOWN,
    ),
}
_QUOTA_TEXT = re.compile(r"daily message quota exceeded", re.IGNORECASE)
_RATE_TEXT = re.compile(r"maximum sending rate exceeded|throttl", re.IGNORECASE)
_NOT_VERIFIED = re.compile(r"not verified", re.IGNORECASE)
# SES's address complaints: "Illegal address", "Missing final '@domain'", "Local address
# contains control or whitespace", "Domain contains illegal character", "Invalid domain name".
_ADDRESS_TEXT = re.compile(
    r"address|@domain|domain (?:contains|name|ends|starts)|invalid domain|recipient",
    re.IGNORECASE,
)
_XML_CODE = re.compile(rb"<Code>([A-Za-z0-9_.:#-]{1,100})</Code>")
_XML_MESSAGE = re.compile(rb"<Message>([^<]{0,2000})</Message>")
# "Recipient count exceeds 50": the per-call limit, which the gateway enforces itself.
_COUNT_TEXT = re.compile(r"count exceeds|too many recipients", re.IGNORECASE)


def error_type(headers: Mapping[str, str], data: object, body: bytes = b"") -> str:
    """``MessageRejected`` from ``MessageRejected:http://...`` or ``com.amazonaws...#Name``.

    Falls back to an XML ``<Code>``: AWS's authentication layer answers in the query
    protocol's XML shape even for rest-json services (as moto does too).
    """
    found = {key.lower(): value for key, value in headers.items()}.get("x-amzn-errortype", "")
    if not found and isinstance(data, dict):
        for key in ("__type", "code", "Code"):
            if isinstance(data.get(key), str):
                found = data[key]
                break
    if not found and (xml := _XML_CODE.search(body[:4096])):
        found = xml.group(1).decode("ascii", "replace")
    name = found.rsplit("#", 1)[-1].split(":", 1)[0].strip()
    return sanitize_text(name, 60)


def error_message(data: object, body: bytes = b"", secrets: tuple[str, ...] = ()) -> str:
    """The body's ``message``/``Message`` (JSON, else XML), redacted and bounded."""
    text = ""
    if isinstance(data, dict):
        for key in ("message", "Message"):
            if isinstance(data.get(key), str):
                text = data[key]
                break
    elif xml := _XML_MESSAGE.search(body[:4096]):
        text = xml.group(1).decode("utf-8", "replace")
    return sanitize_text(redact(text[: _REASON_LIMIT * 8], secrets), _REASON_LIMIT)


def _message_rejected(reason: str) -> _Rule:
    if _NOT_VERIFIED.search(reason):  # the sender, or a recipient while in the sandbox
        return (ProviderRejected, _R550_NOT_VERIFIED)
    if _ADDRESS_TEXT.search(reason):
        return (ProviderRejected, _R553_ADDRESS)
    return (ProviderRejected, _R550_REJECTED)  # content: virus, policy


def _bad_request(reason: str) -> _Rule:
    if _ADDRESS_TEXT.search(reason) and not _COUNT_TEXT.search(reason):
        return (ProviderRejected, _R553_ADDRESS)
    return (PayloadBug, replies.R451_INTERNAL)  # the request the gateway built


def _rule(status: int, name: str, reason: str) -> _Rule | None:
    """The SES-specific rule for this answer, or None for the generic HTTP mapping."""
    if _QUOTA_TEXT.search(reason):
        return (QuotaExhausted, _R451_QUOTA)
    if _RATE_TEXT.search(reason) and status in (400, 429):
        return _THROTTLED
    if name == "MessageRejected":
        return _message_rejected(reason)
    if name == "BadRequestException":
        return _bad_request(reason)
    return _BY_TYPE.get(name)


def classify(
    status: int, headers: Mapping[str, str], body: bytes, secrets: tuple[str, ...] = ()
) -> DeliveryError:
    """The delivery error for a non-200 SES answer."""
    data = parse_json(body)
    name = error_type(headers, data, body)
    reason = error_message(data, body, secrets)
    rule = _rule(status, name, reason)
    request_id = find_request_id(headers)
    if rule is None:  # unknown name: design §4's generic rows decide by status
        return classify_status(
            status,
            headers=headers,
            provider_code=name or None,
            request_id=request_id,
            reason=reason,
        )
    # The sender must act on a permanent answer, so it shows SES's reason; a transient one is
    # the operator's business: the reason goes to the logs only (``make_error``).
    error = make_error(
        *rule,
        status=status,
        headers=headers,
        detail=name and f"type={name}",
        provider_code=name or None,
        request_id=request_id,
        reason=reason,
    )
    if isinstance(error, QuotaExhausted):  # SES sends no Retry-After for its quota
        error.retry_after = QUOTA_RETRY_AFTER
    return error
