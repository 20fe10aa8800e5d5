"""STARTTLS (RFC 3207): pipelined plaintext never runs, the session starts afresh after the
handshake, AUTH is neither offered nor accepted in plaintext where TLS is required, once only."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from typing import Any

from tests.conftest import PASSWORDS, GatewayFactory, account
from tests.security.conftest import Connect, delivered, sync_gateway, tls_smtp

PLAIN_OK = base64.b64encode(f"\0wordpress\0{PASSWORDS['wordpress']}".encode()).decode()


async def test_plaintext_pipelined_behind_starttls_never_runs(
    start_gateway: GatewayFactory, connect: Connect, tls_files: tuple[Path, Path], outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway, smtp=tls_smtp(tls_files))
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    # CVE-2011-0411 class: a man in the middle appends commands to the client's STARTTLS.
    await raw.send(
        b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\n"
        b"DATA\r\nSubject: injected\r\n\r\nx\r\n.\r\n"
    )
    assert (await raw.reply()).startswith("554 5.5.0")  # never "220 Ready to start TLS"
    assert await raw.rest() == b""
    assert delivered(outbox) == []


async def test_plaintext_after_the_220_is_not_a_command(
    start_gateway: GatewayFactory, connect: Connect, tls_files: tuple[Path, Path]
) -> None:
    gw = await start_gateway(smtp=tls_smtp(tls_files))
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    assert (await raw.cmd("STARTTLS")).startswith("220")
    # Plaintext where the TLS handshake must be: the TLS layer fails, nothing is answered.
    await raw.send(b"MAIL FROM:<evil@example.com>\r\n")
    rest = await raw.rest()
    assert b"250" not in rest
    assert not rest.startswith(b"5")  # no SMTP reply at all, only TLS bytes or nothing


async def test_session_starts_afresh_after_the_handshake(
    start_gateway: GatewayFactory,
    connect: Connect,
    tls_files: tuple[Path, Path],
    client_tls: ssl.SSLContext,
) -> None:
    gw = await start_gateway(smtp=tls_smtp(tls_files))  # loopback: trusted, may MAIL in plain
    raw = await connect(gw.port())
    assert "STARTTLS" in await raw.cmd("EHLO client.test")
    assert (await raw.cmd("MAIL FROM:<a@example.com>")).startswith("250")
    assert (await raw.cmd("STARTTLS")).startswith("220")
    await raw.starttls(client_tls)
    # RFC 3207 §4.2: all knowledge from before the handshake is discarded.
    assert (await raw.cmd("RCPT TO:<b@example.com>")).startswith("503")  # EHLO first
    ehlo = await raw.cmd("EHLO client.test")
    assert "STARTTLS" not in ehlo
    assert (await raw.cmd("RCPT TO:<b@example.com>")).startswith("503 5.5.1")  # no MAIL


async def test_auth_before_starttls_does_not_survive_it(
    start_gateway: GatewayFactory,
    connect: Connect,
    tls_files: tuple[Path, Path],
    client_tls: ssl.SSLContext,
) -> None:
    # require_tls = false: an untrusted client may log in before TLS (not recommended).
    gw = await start_gateway(
        smtp=tls_smtp(tls_files, trusted_networks=[], require_tls=False),
        accounts=[account("wordpress")],
    )
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    assert (await raw.cmd(f"AUTH PLAIN {PLAIN_OK}")).startswith("235")
    assert (await raw.cmd("STARTTLS")).startswith("220")
    await raw.starttls(client_tls)
    await raw.cmd("EHLO client.test")
    assert (await raw.cmd("MAIL FROM:<a@example.com>")).startswith("530 5.7.0")
    assert (await raw.cmd(f"AUTH PLAIN {PLAIN_OK}")).startswith("235")  # once more, over TLS
    assert (await raw.cmd("MAIL FROM:<a@example.com>")).startswith("250")


async def test_auth_is_never_offered_or_checked_in_plaintext_where_tls_is_required(
    start_gateway: GatewayFactory,
    connect: Connect,
    tls_files: tuple[Path, Path],
    client_tls: ssl.SSLContext,
    scrypt_calls: list[dict[str, Any]],
) -> None:
    gw = await start_gateway(
        smtp=tls_smtp(tls_files, trusted_networks=[], plain_listen=["127.0.0.1:0"]),
        accounts=[account("wordpress")],
    )
    scrypt_calls.clear()  # the start-up hashed the unknown-user dummy
    # The STARTTLS listener: AUTH is offered only after the handshake.
    raw = await connect(gw.port())
    ehlo = await raw.cmd("EHLO client.test")
    assert "STARTTLS" in ehlo
    assert "AUTH" not in ehlo
    assert (await raw.cmd(f"AUTH PLAIN {PLAIN_OK}")).startswith("530 5.7.0")
    assert (await raw.cmd("AUTH LOGIN")).startswith("530 5.7.0")
    await raw.cmd("STARTTLS")
    await raw.starttls(client_tls)
    assert "AUTH LOGIN PLAIN" in await raw.cmd("EHLO client.test")
    # The plain listener never offers STARTTLS, so it refuses AUTH outright (RFC 4954 §4).
    plain = await connect(gw.port("plain"))
    ehlo = await plain.cmd("EHLO client.test")
    assert "AUTH" not in ehlo
    assert "STARTTLS" not in ehlo
    assert (await plain.cmd(f"AUTH PLAIN {PLAIN_OK}")).startswith("538 5.7.11")
    assert (await plain.cmd("AUTH LOGIN")).startswith("538 5.7.11")
    assert scrypt_calls == []  # no credential was even looked at


async def test_a_second_starttls_is_refused(
    start_gateway: GatewayFactory,
    connect: Connect,
    tls_files: tuple[Path, Path],
    client_tls: ssl.SSLContext,
) -> None:
    gw = await start_gateway(smtp=tls_smtp(tls_files, tls_listen=["127.0.0.1:0"]))
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    await raw.cmd("STARTTLS")
    await raw.starttls(client_tls)
    await raw.cmd("EHLO client.test")
    assert (await raw.cmd("STARTTLS")).startswith("503 5.5.1")
    assert (await raw.cmd("NOOP")).startswith("250")  # still talking, over the one TLS layer
    # Implicit TLS (port 465 style): STARTTLS is refused the same way.
    implicit = await connect(gw.port("tls"), tls=client_tls)
    assert "STARTTLS" not in await implicit.cmd("EHLO client.test")
    assert (await implicit.cmd("STARTTLS")).startswith("503 5.5.1")
