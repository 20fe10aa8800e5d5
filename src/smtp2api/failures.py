"""Failure notices for dead messages: an RFC 3464 DSN to the envelope sender, a JSON webhook.

``FailureNotifier`` is the worker's ``on_dead`` hook. The DSN is not sent in place: it is
spooled as a message of its own (null envelope sender, the dead message's route), so the
worker delivers it with the same retries and durability as any mail, and a DSN that dies in
turn is never bounced (RFC 5321 §4.5.5: no notification about a null-sender message).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
import structlog

from smtp2api.errors import SpoolError
from smtp2api.models import Envelope
from smtp2api.replies import SMTPReply
from smtp2api.spool.base import Spool, SpoolEntry, new_message_id

log = structlog.get_logger("smtp2api.failures")

WEBHOOK_TIMEOUT = 10.0  # seconds for the whole POST: a slow hook must not hold a worker slot
MAX_HEADER_BYTES = 64 * 1024  # of the original header section returned in the DSN
_BLIND = ("bcc:", "resent-bcc:")  # RFC 5322 §3.6.3: never shown, not even back to the sender
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True, slots=True)
class NoticeConfig:
    hostname: str  # smtp.hostname: Reporting-MTA and MAILER-DAEMON@<hostname>
    bounce: bool  # [delivery] bounce
    webhook: str | None  # [delivery] failure_webhook
    webhook_timeout: float = WEBHOOK_TIMEOUT


def _header_section(raw: bytes) -> bytes:
    """The original header section (CRLF lines, no blank line), bounded, ``Bcc:`` removed."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw if end < 0 else raw[:end]
    lines: list[bytes] = []
    skipping = False
    for line in head.replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t"):  # a continuation line belongs to the field before it
            if not skipping:
                lines.append(line)
            continue
        skipping = line.lower().startswith(tuple(b.encode() for b in _BLIND))
        if not skipping:
            lines.append(line)
    out = b"\r\n".join(lines)
    if len(out) > MAX_HEADER_BYTES:
        out = out[: out.rfind(b"\r\n", 0, MAX_HEADER_BYTES)]  # whole lines only
    return out


def bounce_refusal(entry: SpoolEntry) -> str | None:
    """Why no DSN may be sent for ``entry`` (loop prevention), or None when one may."""
    if not entry.mail_from:
        return "null sender"  # RFC 5321 §4.5.5 / RFC 3464 §2: never notify <>
    if entry.mail_from.split("@", 1)[0].lower() == "mailer-daemon":
        return "sender is a mailer daemon"
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
        _header_section(entry.raw) + b"\r\n\r\n"
    )
    auto = str(parsed.get("auto-submitted", "no")).split(";", 1)[0].strip().lower()
    if auto != "no":  # RFC 3834 §5: anything but "no" is automatic mail
        return "message is auto-submitted"
    if str(parsed.get("content-type", "")).split(";", 1)[0].strip().lower() == "multipart/report":
        return "message is itself a report"  # RFC 6522: DSNs and MDNs
    return None


def _final_status(reply: SMTPReply) -> str:
    """A 5.x.x status for ``Action: failed`` (RFC 3464 §2.3.4), from the final reply."""
    enhanced = reply.enhanced if _ENHANCED.match(reply.enhanced) else "5.0.0"
    return "5" + enhanced[1:]


def _address_type(address: str) -> str:
    # RFC 6533 §3: "utf-8" addresses for SMTPUTF8 mail, else RFC 3464's "rfc822".
    return "rfc822" if address.isascii() else "utf-8"


def build_dsn(
    entry: SpoolEntry, reply: SMTPReply, *, hostname: str, dsn_id: str, now: float
) -> bytes:
    """The RFC 3464 report for the recipients of ``entry`` not yet delivered.

    ``multipart/report; report-type=delivery-status`` (RFC 6522) with a human part, the
    ``message/delivery-status`` part (one block per failed recipient) and the original
    header section as ``text/rfc822-headers``; RFC 6533's global types when an address is
    not ASCII. Returned as CRLF bytes, ready to be spooled like received mail.
    """
    failed = entry.pending_recipients or entry.rcpt_tos
    utf8 = not all(a.isascii() for a in (entry.mail_from, *failed))
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    headers_type = "message/global-headers" if utf8 else "text/rfc822-headers"
    when = format_datetime(datetime.fromtimestamp(now, UTC), usegmt=True)
    arrived = format_datetime(datetime.fromtimestamp(entry.created_at, UTC), usegmt=True)
    status, diagnostic = _final_status(reply), f"smtp; {reply}"
    original = _header_section(entry.raw)
    boundary = f"=_smtp2api_{secrets.token_hex(12)}"
    while boundary.encode() in original:  # pragma: no cover - 96 random bits
        boundary = f"=_smtp2api_{secrets.token_hex(12)}"

    human = [
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to the recipients below. It stays in the",
        f"gateway's queue as {entry.id} for the operator to inspect or retry.",
        "",
        *(f"<{rcpt}>: {reply}" for rcpt in failed),
    ]
    if entry.done_recipients:
        human += ["", "It was delivered to the other recipients:"]
        human += [f"<{rcpt}>" for rcpt in entry.done_recipients]
    report = [
        f"Reporting-MTA: dns; {hostname}",  # RFC 3464 §2.2: per-message fields first
        f"X-Smtp2api-Queue-ID: {entry.id}",
        f"Arrival-Date: {arrived}",
    ]
    for rcpt in failed:  # one blank-line separated block per recipient (§2.3)
        report += [
            "",
            f"Final-Recipient: {_address_type(rcpt)}; {rcpt}",
            "Action: failed",
            f"Status: {status}",
            f"Diagnostic-Code: {diagnostic}",
            f"Last-Attempt-Date: {when}",
        ]
    cte = "8bit" if utf8 else "7bit"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{entry.mail_from}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {when}",
        f"Message-ID: <{dsn_id}@{hostname}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5: and never answered in turn
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        f"Content-Transfer-Encoding: {cte}",
        "",
        *human,
        "",
        f"--{boundary}",
        f"Content-Type: {status_type}",
        "Content-Description: Delivery report",
        f"Content-Transfer-Encoding: {cte}",
        "",
        *report,
        "",
        f"--{boundary}",
        f"Content-Type: {headers_type}",
        "Content-Description: Undelivered Message Headers",
        "Content-Transfer-Encoding: 8bit",
        "",
    ]
    text = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    return text + b"\r\n" + original + f"\r\n\r\n--{boundary}--\r\n".encode()


def webhook_payload(entry: SpoolEntry, reply: SMTPReply, hostname: str) -> dict[str, Any]:
    """The JSON body of the failure webhook: no message body, no subject."""
    return {
        "event": "message_dead",
        "id": entry.id,
        "hostname": hostname,
        "sender": entry.mail_from,
        "recipients": list(entry.pending_recipients or entry.rcpt_tos),
        "delivered_recipients": list(entry.done_recipients),
        "reply": str(reply),
        "detail": entry.last_error,
        "attempts": entry.attempts,
        "created_at": datetime.fromtimestamp(entry.created_at, UTC).isoformat(),
        "provider": entry.providers[0] if entry.providers else None,  # the route's first
        "providers": list(entry.providers),
        "account": entry.account,
    }


class FailureNotifier:
    """The worker's ``on_dead`` hook: spools a DSN and/or posts the webhook, as configured."""

    def __init__(
        self,
        config: NoticeConfig,
        *,
        spool: Spool,
        client: httpx.AsyncClient | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._spool = spool
        self._client = client
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return self.config.bounce or bool(self.config.webhook)

    async def __call__(self, entry: SpoolEntry, reply: SMTPReply) -> None:
        if self.config.bounce:
            await self.bounce(entry, reply)
        if self.config.webhook:
            await self.post_webhook(entry, reply)

    async def bounce(self, entry: SpoolEntry, reply: SMTPReply) -> str | None:
        """Spool a DSN for ``entry``; returns its id, or None when none may or could be sent."""
        refusal = bounce_refusal(entry)
        if refusal is not None:
            log.info("bounce_skipped", reason=refusal)
            return None
        now = self._clock()
        dsn_id = new_message_id(now)
        raw = build_dsn(entry, reply, hostname=self.config.hostname, dsn_id=dsn_id, now=now)
        # Null reverse-path (RFC 3464 §2, RFC 5321 §4.5.5) so the DSN itself is never bounced.
        envelope = Envelope("", (entry.mail_from,), account=entry.account, peer="")
        dsn = SpoolEntry.new(raw, envelope, entry.providers, now=now, id=dsn_id)
        try:
            await self._spool.put(dsn)
        except SpoolError as exc:
            log.error("bounce_failed", error=str(exc))
            return None
        log.info("bounce_queued", dsn_id=dsn_id, recipients=len(entry.pending_recipients))
        return dsn_id

    async def post_webhook(self, entry: SpoolEntry, reply: SMTPReply) -> bool:
        """POST the notice; failures are logged, never raised. The URL is never logged (it may
        carry a token)."""
        url = self.config.webhook
        if not url or self._client is None:
            return False
        payload = webhook_payload(entry, reply, self.config.hostname)
        timeout = self.config.webhook_timeout
        try:
            async with asyncio.timeout(timeout):
                response = await self._client.post(url, json=payload, timeout=timeout)
        except (httpx.HTTPError, TimeoutError) as exc:
            log.warning("failure_webhook_failed", error=type(exc).__name__)
            return False
        if not response.is_success:
            log.warning("failure_webhook_failed", status=response.status_code)
            return False
        log.info("failure_webhook_sent", status=response.status_code)
        return True
