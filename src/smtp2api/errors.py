"""The gateway's exception tree. Every error carries the SMTP reply it becomes.

```
GatewayError
├── ConfigError                 startup only -> exit 78
├── MessageError                554 5.6.0
│   └── MessageTooLarge         552 5.3.4
├── PolicyError                 550/553/554 5.7.1 (reply chosen by the raiser)
├── SpoolError                  451 4.3.0 (SpoolFull 452 4.3.1)
└── DeliveryError(reply)
    ├── TransientDeliveryError(retry_after)
    │   ├── ProviderUnavailable     5xx, 451 4.3.0
    │   ├── ProviderConfigError     401/403/404, 451 4.3.5
    │   ├── AccountPaused           451 4.3.2
    │   ├── RateLimited             429, 451 4.7.0
    │   ├── ConnectFailed           connect/DNS/TLS, 451 4.4.1
    │   ├── OutcomeUnknown          timeout/reset after the request was sent, 451 4.4.2
    │   └── PayloadBug              our own payload was refused, 451 4.3.0
    └── PermanentDeliveryError
        └── ProviderRejected        the message's fault, 5xx as mapped
```

Library code raises these; ``smtp.py`` turns them into replies and ``cli.py`` into exit codes.
"""

from __future__ import annotations

from smtp2api import replies
from smtp2api.replies import SMTPReply


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    reply: SMTPReply = replies.R451_INTERNAL

    def __init__(self, message: str = "", *, reply: SMTPReply | None = None) -> None:
        super().__init__(message or self.__class__.__name__)
        if reply is not None:
            self.reply = reply


class ConfigError(GatewayError):
    """The configuration is invalid; ``problems`` holds one line per problem, naming the key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class MessageError(GatewayError):
    """The message itself cannot be handled (malformed MIME, limits of the model)."""

    reply = replies.R554_BAD_MESSAGE


class MessageTooLarge(MessageError):
    reply = replies.R552_TOO_LARGE


class PolicyError(GatewayError):
    """The client may not do this (relay, sender, recipients); the raiser picks the reply."""

    reply = replies.R554_RELAY_DENIED


class SpoolError(GatewayError):
    """The spool could not store or update a message; nothing was promised."""

    reply = replies.R451_SPOOL


class SpoolFull(SpoolError):
    reply = replies.R452_SPOOL_FULL


class DeliveryError(GatewayError):
    """A provider did not accept the message. ``detail`` is for logs, never for replies."""

    def __init__(
        self,
        detail: str = "",
        *,
        reply: SMTPReply | None = None,
        provider_code: str | None = None,
        request_id: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(detail, reply=reply)
        self.detail = detail
        self.provider_code = provider_code
        self.request_id = request_id
        self.status = status


class TransientDeliveryError(DeliveryError):
    """Try again later (with another provider of the route, or from the spool)."""

    reply = replies.R451_TRY_LATER

    def __init__(
        self,
        detail: str = "",
        *,
        reply: SMTPReply | None = None,
        retry_after: float | None = None,
        provider_code: str | None = None,
        request_id: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(
            detail, reply=reply, provider_code=provider_code, request_id=request_id, status=status
        )
        self.retry_after = retry_after


class ProviderUnavailable(TransientDeliveryError):
    reply = replies.R451_TRY_LATER


class ProviderConfigError(TransientDeliveryError):
    reply = replies.R451_PROVIDER_CONFIG


class AccountPaused(TransientDeliveryError):
    reply = replies.R451_ACCOUNT_PAUSED


class RateLimited(TransientDeliveryError):
    reply = replies.R451_RATE_LIMITED


class QuotaExhausted(RateLimited):
    """Daily or monthly quota: retrying soon will not help."""


class ConnectFailed(TransientDeliveryError):
    reply = replies.R451_CONNECT_FAILED


class OutcomeUnknown(TransientDeliveryError):
    """The request may have reached the provider; a retry must reuse the message's id."""

    reply = replies.R451_TIMEOUT


class PayloadBug(TransientDeliveryError):
    """The provider refused a payload that the gateway built: our bug, not the message's."""

    reply = replies.R451_INTERNAL


class PermanentDeliveryError(DeliveryError):
    """The provider refused the message for its own fault: do not retry, do not fail over."""

    reply = replies.R554_BAD_MESSAGE


class ProviderRejected(PermanentDeliveryError):
    pass
