"""MIME messages for the provider integration tests: what WordPress or an ERP would send."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from email.policy import SMTP

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR-a-tiny-logo"
PDF = b"%PDF-1.4\n% an invoice\n%%EOF\n"
LOGO_CID = "logo@shop.example"


def rich_message(
    *,
    sender: str = "Shop <shop@example.com>",
    to: str = "Alice <alice@example.net>",
    cc: str | None = "bob@example.net",
    subject: str = "Your order \u2713",
    headers: dict[str, str] | None = None,
) -> bytes:
    """Text and HTML alternatives, an inline logo referenced by ``cid:``, a PDF attachment."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content("Hello Alice,\nyour order has shipped.\n")
    msg.add_alternative(
        f'<p>Hello Alice, your order has shipped.</p><img src="cid:{LOGO_CID}">', subtype="html"
    )
    html = msg.get_body(("html",))
    assert isinstance(html, EmailMessage)
    html.add_related(
        PNG,
        maintype="image",
        subtype="png",
        cid=f"<{LOGO_CID}>",
        disposition="inline",
        filename="logo.png",
    )
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="invoice.pdf")
    return msg.as_bytes(policy=SMTP)  # CRLF: a bare LF never ends a line (design §8)


def smtp_send(
    port: int,
    data: bytes,
    *,
    sender: str = "shop@example.com",
    rcpts: tuple[str, ...] = ("alice@example.net",),
) -> tuple[int, str]:
    """One SMTP transaction with smtplib (blocking: run it with ``in_thread``); returns the
    reply to the end of DATA, or the first refusal before it."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        code, text = client.mail(sender)
        for rcpt in rcpts if code == 250 else ():
            code, text = client.rcpt(rcpt)
            if code != 250:
                break
        if code != 250:
            return code, text.decode()
        try:
            code, text = client.data(data)
        except smtplib.SMTPDataError as exc:
            error = exc.smtp_error
            return exc.smtp_code, error.decode() if isinstance(error, bytes) else error
        return code, text.decode()
