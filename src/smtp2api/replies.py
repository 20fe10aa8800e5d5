"""SMTP replies as values: every reply the gateway sends is built here.

Constants are named by code and meaning (aiosmtpd's ``testing/statuscodes.py`` style).
Enhanced status codes are RFC 3463; reply texts never carry exception text or secrets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNSAFE = re.compile(r"[^\x20-\x7e]+")


def sanitize_text(text: str, limit: int = 200) -> str:
    """Make ``text`` safe for one SMTP reply line: printable ASCII, bounded length."""
    cleaned = _UNSAFE.sub(" ", text).strip()
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3].rstrip() + "..."
    return cleaned


@dataclass(frozen=True, slots=True)
class SMTPReply:
    """One SMTP reply: basic code (RFC 5321 §4.2), enhanced code (RFC 3463) and text."""

    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        if self.enhanced:
            return f"{self.code} {self.enhanced} {self.text}"
        return f"{self.code} {self.text}"

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, text: str) -> SMTPReply:
        """The same codes with another (sanitised) text."""
        return SMTPReply(self.code, self.enhanced, sanitize_text(text) or self.text)

    def softened(self) -> SMTPReply:
        """The 4xx twin of a 5xx reply (Postfix's ``soft_bounce``)."""
        if not self.is_permanent:
            return self
        enhanced = "4" + self.enhanced[1:] if self.enhanced.startswith("5") else self.enhanced
        return SMTPReply(self.code - 100, enhanced, self.text)


def ok_accepted(provider_id: str) -> SMTPReply:
    return SMTPReply(250, "2.0.0", f"Ok: {sanitize_text(provider_id, 180)}")


def ok_queued(spool_id: str) -> SMTPReply:
    return SMTPReply(250, "2.0.0", f"Ok: queued as {sanitize_text(spool_id, 180)}")


# Success (RFC 5321 §4.2.2)
R250_OK = SMTPReply(250, "2.0.0", "Ok")
R250_SENDER_OK = SMTPReply(250, "2.1.0", "Sender ok")
R250_RECIPIENT_OK = SMTPReply(250, "2.1.5", "Recipient ok")
R235_AUTH_OK = SMTPReply(235, "2.7.0", "Authentication successful")

# Transient (4xx): the client keeps the message and retries.
R421_TOO_MANY_CONNECTIONS = SMTPReply(421, "4.7.0", "Too many connections, try again later")
R421_TOO_MANY_AUTH_FAILURES = SMTPReply(421, "4.7.0", "Too many authentication failures")
R421_IDLE_TIMEOUT = SMTPReply(421, "4.4.2", "Idle timeout, closing connection")
R421_SHUTTING_DOWN = SMTPReply(421, "4.3.2", "Service shutting down, try again later")
R421_QUOTA = SMTPReply(421, "4.7.0", "Sending quota exhausted, try again later")
R451_INTERNAL = SMTPReply(451, "4.3.0", "Internal error, try again later")
R451_TRY_LATER = SMTPReply(451, "4.3.0", "Upstream error, try again later")
R451_PROVIDER_CONFIG = SMTPReply(451, "4.3.5", "Upstream configuration error, try again later")
R451_ACCOUNT_PAUSED = SMTPReply(451, "4.3.2", "Upstream account paused, try again later")
R451_RATE_LIMITED = SMTPReply(451, "4.7.0", "Upstream rate limit, try again later")
R451_CONNECT_FAILED = SMTPReply(451, "4.4.1", "Upstream unreachable, try again later")
R451_TIMEOUT = SMTPReply(451, "4.4.2", "Upstream timeout, try again later")
R451_SPOOL = SMTPReply(451, "4.3.0", "Cannot store message, try again later")
R452_SPOOL_FULL = SMTPReply(452, "4.3.1", "Insufficient system storage, try again later")
R452_TOO_MANY_RECIPIENTS = SMTPReply(452, "4.5.3", "Too many recipients")

# Permanent (5xx): the message's or the client's fault.
# A message line over the limit is the message's fault (RFC 5322 §2.1.1), answered after the dot.
R554_LINE_TOO_LONG = SMTPReply(554, "5.6.0", "Message rejected: line too long")
R501_SYNTAX = SMTPReply(501, "5.5.4", "Syntax error in parameters")
R530_AUTH_REQUIRED = SMTPReply(530, "5.7.0", "Authentication required")
R530_TLS_REQUIRED = SMTPReply(530, "5.7.0", "Must issue a STARTTLS command first")
R535_BAD_CREDENTIALS = SMTPReply(535, "5.7.8", "Authentication credentials invalid")
R538_ENCRYPTION_REQUIRED = SMTPReply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
R550_RECIPIENT_REJECTED = SMTPReply(550, "5.1.1", "Recipient rejected upstream")
R550_POLICY = SMTPReply(550, "5.7.1", "Message refused upstream by policy")
R550_SENDER_NOT_ALLOWED_UPSTREAM = SMTPReply(550, "5.7.1", "Sender not allowed upstream")
R552_TOO_LARGE = SMTPReply(552, "5.3.4", "Message too big")
R553_SENDER_NOT_ALLOWED = SMTPReply(553, "5.7.1", "Sender address not allowed for this account")
R553_BAD_RECIPIENT = SMTPReply(553, "5.1.3", "Bad recipient address syntax")
R554_RELAY_DENIED = SMTPReply(554, "5.7.1", "Relay access denied")
R554_BAD_MESSAGE = SMTPReply(554, "5.6.0", "Message rejected: malformed content")
R554_NO_VALID_RECIPIENTS = SMTPReply(554, "5.5.1", "No valid recipients")
