"""Microsoft Graph's error answers as delivery errors (design §4, ``docs/providers/graph.md``).

Graph errors are ``{"error": {"code", "message", "innerError": {"request-id"}}}``; the code
decides where it has a meaning of its own, else the status does, as for any API.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import structlog

from smtp2api import replies
from smtp2api.errors import (
    DeliveryError,
    ProviderConfigError,
    ProviderRejected,
    QuotaExhausted,
    RateLimited,
)
from smtp2api.providers.base import (
    annotate,
    classify_status,
    error_text,
    find_request_id,
    parse_json,
    retry_after_seconds,
)
from smtp2api.replies import SMTPReply, sanitize_text

log = structlog.get_logger("smtp2api.providers.graph")

_RECIPIENT_CODES = frozenset({"ErrorInvalidRecipients"})
_SIZE_CODES = frozenset({"ErrorMessageSizeExceeded", "ErrorAttachmentSizeExceeded"})
_QUOTA_CODES = frozenset({"ErrorQuotaExceeded", "ErrorSubmissionQuotaExceeded"})
_ACCESS_CODES = frozenset({"ErrorAccessDenied", "ErrorSendAsDenied", "AccessDenied"})
_MAILBOX_CODES = frozenset(
    {"ErrorInvalidUser", "MailboxNotEnabledForRESTAPI", "ResourceNotFound", "ErrorItemNotFound"}
)
_THROTTLE_CODES = frozenset({"ApplicationThrottled", "ErrorTooManyObjectsOpened"})
_R553_RECIPIENT = replies.R553_BAD_RECIPIENT.with_text("Recipient address rejected upstream")
R552_TOO_LARGE = replies.R552_TOO_LARGE.with_text("Message too big for Microsoft Graph")
_R554_REJECTED = replies.R554_BAD_MESSAGE.with_text("Message rejected upstream")


def _graph_error(body: bytes) -> tuple[str | None, str, str | None]:
    """(code, message, request-id) of ``{"error": {"code", "message", "innerError"}}``."""
    data = parse_json(body)
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None, error_text(data), None
    code = error.get("code")
    inner = error.get("innerError") or error.get("innererror")
    request_id = inner.get("request-id") if isinstance(inner, dict) else None
    return (
        sanitize_text(code, 60) or None if isinstance(code, str) else None,
        error_text(error),
        sanitize_text(request_id, 80) or None if isinstance(request_id, str) else None,
    )


_ACCESS_HINT = (
    "app not allowed to use this mailbox: grant Mail.Send (and Mail.ReadWrite for messages "
    "over 4 MB) as application permissions, and check RBAC for Applications / the "
    "application access policy"
)
_MAILBOX_HINT = "mailbox not found or not enabled for Graph: check user_id / the sender"

_Test = Callable[[int, str | None, str], bool]  # (status, code, message)
# First match wins: (test, error class, reply, log detail, reason shown in the reply).
_RULES: tuple[tuple[_Test, type[DeliveryError], SMTPReply, str, bool], ...] = (
    (lambda s, c, m: c in _RECIPIENT_CODES, ProviderRejected, _R553_RECIPIENT, "recipient", True),
    (lambda s, c, m: s == 413 or c in _SIZE_CODES, ProviderRejected, R552_TOO_LARGE, "size", True),
    (lambda s, c, m: c in _QUOTA_CODES, QuotaExhausted, replies.R451_RATE_LIMITED, "quota", False),
    (
        lambda s, c, m: s == 429 or c in _THROTTLE_CODES or "MailboxConcurrency" in m,
        RateLimited,
        replies.R451_RATE_LIMITED,
        "throttled",
        False,
    ),
    (
        lambda s, c, m: s == 401,
        ProviderConfigError,
        replies.R451_PROVIDER_CONFIG,
        "token refused after a refresh",
        False,
    ),
    (
        lambda s, c, m: s == 403 or c in _ACCESS_CODES,
        ProviderConfigError,
        replies.R451_PROVIDER_CONFIG,
        _ACCESS_HINT,
        False,
    ),
    (
        lambda s, c, m: s == 404 or c in _MAILBOX_CODES,
        ProviderConfigError,
        replies.R451_PROVIDER_CONFIG,
        _MAILBOX_HINT,
        False,
    ),
    # Anything else about the message, e.g. "Invalid base64 string for MIME content."
    (lambda s, c, m: s == 400, ProviderRejected, _R554_REJECTED, "message refused", True),
)


def map_graph_error(
    status: int, headers: httpx.Headers, body: bytes, *, provider: str = "", mailbox: str = ""
) -> DeliveryError:
    """Graph's answer as a delivery error, per design §4 and Graph's named errors."""
    code, message, request_id = _graph_error(body)
    request_id = request_id or find_request_id(headers)
    for test, cls, reply, detail, show in _RULES:
        if not test(status, code, message):
            continue
        if detail in (_ACCESS_HINT, _MAILBOX_HINT):  # the operator must act: say so loudly
            log.error(
                "graph_mailbox_refused", provider=provider, mailbox=mailbox, code=code, hint=detail
            )
        reason = message if show else ""
        error = cls(
            f"HTTP {status}; {detail}; code={code}; reason={message!r}",
            reply=annotate(reply, reason, code, request_id),
            provider_code=code,
            request_id=request_id,
            status=status,
        )
        if isinstance(error, RateLimited):
            error.retry_after = retry_after_seconds(headers)
        return error
    # 5xx (503 with its Retry-After) and the rest: the generic rows of design §4.
    return classify_status(
        status, headers=headers, provider_code=code, request_id=request_id, detail=message
    )
