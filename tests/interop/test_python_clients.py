"""Python's own SMTP clients: the standard library's ``smtplib`` and ``aiosmtplib``."""

from __future__ import annotations

import smtplib
import ssl
from email import message_from_bytes

import aiosmtplib

from tests.conftest import in_thread
from tests.interop.conftest import BCC, SENDER, TO, Target, build_message


def _smtplib_send(target: Target, data: bytes) -> None:
    context = ssl.create_default_context(cafile=str(target.ca_file))
    kind, auth = target.scenario.kind, target.scenario.auth
    client: smtplib.SMTP
    if kind == "tls":
        client = smtplib.SMTP_SSL(target.host, target.port, context=context, timeout=20)
    else:
        client = smtplib.SMTP(target.host, target.port, timeout=20)
    with client:
        client.ehlo("client.test")
        if kind == "starttls":
            client.starttls(context=context)
            client.ehlo("client.test")
        if auth in ("PLAIN", "LOGIN"):
            client.user, client.password = target.user or "", target.password or ""
            client.auth(auth, getattr(client, f"auth_{auth.lower()}"))
        elif auth == "default":
            client.login(target.user or "", target.password or "")
        # send_message takes the envelope from the headers and strips Bcc, as mail tools do.
        refused = client.send_message(message_from_bytes(data), SENDER, [TO, BCC])
        assert refused == {}


async def test_smtplib(target: Target, attachment: bool) -> None:
    await in_thread(_smtplib_send, target, build_message(target.subject, attachment))
    await target.check(attachment=attachment)


async def test_aiosmtplib(target: Target, attachment: bool) -> None:
    kind, auth = target.scenario.kind, target.scenario.auth
    context = ssl.create_default_context(cafile=str(target.ca_file))
    client = aiosmtplib.SMTP(
        hostname=target.host,
        port=target.port,
        use_tls=kind == "tls",
        # aiosmtplib upgrades by itself when STARTTLS is offered; say so explicitly anyway.
        start_tls=kind == "starttls",
        tls_context=context,
        timeout=20,
    )
    async with client:
        if auth in ("PLAIN", "LOGIN"):
            await client.ehlo()  # the auth_* methods, unlike login(), do not EHLO after TLS
            method = client.auth_plain if auth == "PLAIN" else client.auth_login
            await method(target.user or "", target.password or "")
        elif auth == "default":
            await client.login(target.user or "", target.password or "")
        message = message_from_bytes(build_message(target.subject, attachment))
        errors, reply = await client.send_message(message, sender=SENDER, recipients=[TO, BCC])
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: fake-"), reply
    await target.check(attachment=attachment)
