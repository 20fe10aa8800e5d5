"""Blocking SMTP client helpers for tests: smtplib transactions and raw byte dialogues."""

from __future__ import annotations

import smtplib
import socket
import ssl
from email.message import EmailMessage
from typing import Any

from tests.conftest import PASSWORDS


def simple_message(
    to: str = "alice@example.com", sender: str = "app@example.com", **headers: str
) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"App <{sender}>"
    msg["To"] = to
    msg["Subject"] = "Hello"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Hello there\n")
    return msg.as_bytes()


def send(
    port: int,
    data: bytes,
    *,
    sender: str = "app@example.com",
    rcpts: tuple[str, ...] = ("alice@example.com",),
    mode: str = "plain",
    user: str | None = None,
    context: ssl.SSLContext | None = None,
    mechanism: str | None = None,
) -> tuple[int, str]:
    """One SMTP transaction with smtplib; returns the reply to the end of DATA."""
    client: smtplib.SMTP
    if mode == "tls":
        client = smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=10)
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    with client:
        client.ehlo("client.test")
        if mode == "starttls":
            client.starttls(context=context)
            client.ehlo("client.test")
        if user is not None:
            if mechanism:
                client.user, client.password = user, PASSWORDS[user]
                client.auth(
                    mechanism, getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
                )
            else:
                client.login(user, PASSWORDS[user])
        code, text = client.mail(sender)
        if code != 250:
            return code, text.decode()
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            if code != 250:
                return code, text.decode()
        try:
            code, text = client.data(data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
        return code, text.decode()


def dialogue(port: int, *commands: str) -> list[str]:
    """A raw SMTP dialogue: the banner, then one reply (last line) per command."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        stream = sock.makefile("rb")
        replies = [_read_reply(stream)]
        for command in commands:
            sock.sendall(command.encode() + b"\r\n")
            replies.append(_read_reply(stream))
        return replies


def _read_reply(stream: Any) -> str:
    lines = []
    while True:
        line = stream.readline().decode().rstrip("\r\n")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return "\n".join(lines)
