"""Resource exhaustion: every input is bounded, by a limit with a safe default, and a client
that hits one gets a reply that says so; nothing is truncated silently or buffered unbounded.

Timing is never asserted: slow clients are orders of magnitude below the rate floor and fast
ones orders of magnitude above it, so the outcome does not depend on the machine's speed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from smtp2api.app import Gateway
from smtp2api.smtp import GatewaySMTP
from tests.conftest import GatewayFactory
from tests.security.conftest import Connect, Raw, delivered, sync_gateway, transaction_until_data


def only_session(gw: Gateway) -> GatewaySMTP:
    assert gw.handler is not None
    [session] = gw.handler.active
    return session


async def flood(raw: Raw, gw: Gateway, total: int, chunk: bytes) -> int:
    """Send ``total`` bytes of ``chunk`` without a line end; the largest stream-reader buffer
    the server held meanwhile."""
    peak = 0
    for _ in range(total // len(chunk)):
        await raw.send(chunk)
        await asyncio.sleep(0)  # let the server read
        peak = max(peak, len(only_session(gw)._reader._buffer))  # type: ignore[attr-defined]
    return peak


# --- lines --------------------------------------------------------------------------------


async def test_command_line_length(start_gateway: GatewayFactory, connect: Connect) -> None:
    gw = await start_gateway()
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    # RFC 5321 §4.5.3.1.4: 512 octets with CRLF.
    assert (await raw.cmd("NOOP " + "x" * 505)).startswith("250")
    assert (await raw.cmd("NOOP " + "x" * 600)) == "500 5.5.2 Command line too long"
    # 100 kB without a line end, then one: one reply, and the session goes on.
    assert (await raw.cmd(b"NOOP " + b"x" * 100_000 + b"\r\n")).startswith("500 5.5.2")
    assert (await raw.cmd("NOOP")).startswith("250")


async def test_a_command_line_that_never_ends_is_not_buffered(
    start_gateway: GatewayFactory, connect: Connect
) -> None:
    gw = await start_gateway(smtp={"idle_timeout": "3s"})
    raw = await connect(gw.port())
    peak = await flood(raw, gw, 4_000_000, b"x" * 32_768)
    # Twice the reader limit, plus one socket read (asyncio reads up to 256 KiB): not 4 MB.
    assert peak < 300_000
    # No command was completed, so the idle timer was never reset: the session ends.
    assert (await raw.rest()).startswith(b"421 4.4.2")


async def test_data_line_length_is_refused_after_the_dot_never_truncated(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    # RFC 5322 §2.1.1: 998 octets of text; a stuffed dot does not count.
    ok = b"Subject: long\r\n\r\n" + b"y" * 998 + b"\r\n." + b"z" * 998 + b"\r\n"
    assert (await raw.cmd(ok + b".\r\n")).startswith("250")
    await transaction_until_data(raw)
    too_long = b"Subject: long\r\n\r\n" + b"y" * 2000 + b"\r\nmore\r\n"
    assert (await raw.cmd(too_long + b".\r\n")) == "554 5.6.0 Message rejected: line too long"
    assert (await raw.cmd("NOOP")).startswith("250")  # the session goes on
    [message] = delivered(outbox)
    assert message.body.endswith(b"y" * 998 + b"\r\n" + b"z" * 998 + b"\r\n")


async def test_a_longer_line_limit_delivers_the_line_whole(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway, smtp={"max_line_length": 4000})
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    line = b"<p>" + b"w" * 1990 + b"</p>"
    assert (await raw.cmd(b"Subject: html\r\n\r\n" + line + b"\r\n.\r\n")).startswith("250")
    assert delivered(outbox)[0].body.endswith(b"\r\n\r\n" + line + b"\r\n")


async def test_a_data_line_that_never_ends_is_not_buffered(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    peak = await flood(raw, gw, 4_000_000, b"x" * 32_768)
    assert peak < 300_000
    assert (await raw.cmd(b"\r\n.\r\n")) == "554 5.6.0 Message rejected: line too long"
    assert delivered(outbox) == []


async def test_data_far_beyond_the_size_limit_is_cut_off(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway, smtp={"max_message_size": 100_000})
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    # Up to twice the limit (plus 64 KiB) is read and discarded so that the client hears 552;
    # one byte more and the gateway stops listening. Sent in full, so no reset loses the reply.
    await raw.send(b"x" * (2 * 100_000 + 65_536 + 1))
    assert (await raw.reply()).startswith("552 5.3.4")
    assert await raw.rest() == b""
    assert delivered(outbox) == []


# --- sizes and counts -----------------------------------------------------------------------


async def test_message_size_at_mail_and_after_the_dot(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway, smtp={"max_message_size": 5000})
    raw = await connect(gw.port())
    assert "250-SIZE 5000" in await raw.cmd("EHLO client.test")
    assert (await raw.cmd("MAIL FROM:<a@example.com> SIZE=5001")).startswith("552 5.3.4")
    await raw.cmd("MAIL FROM:<a@example.com> SIZE=100")  # a lie: SIZE is only a hint
    await raw.cmd("RCPT TO:<b@example.com>")
    await raw.cmd("DATA")
    body = b"Subject: big\r\n\r\n" + (b"z" * 70 + b"\r\n") * 100
    assert (await raw.cmd(body + b".\r\n")).startswith("552 5.3.4")
    assert delivered(outbox) == []


async def test_recipients_are_capped(start_gateway: GatewayFactory, connect: Connect) -> None:
    gw = await start_gateway(smtp={"max_recipients": 3})
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    await raw.cmd("MAIL FROM:<a@example.com>")
    for i in range(3):
        assert (await raw.cmd(f"RCPT TO:<r{i}@example.com>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<r4@example.com>")).startswith("452 4.5.3")


async def test_unknown_commands_end_the_session(
    start_gateway: GatewayFactory, connect: Connect
) -> None:
    gw = await start_gateway()
    raw = await connect(gw.port())
    for verb in ("XYZZY", "GET", "POST", "USER"):
        assert (await raw.cmd(f"{verb} /")) == "500 5.5.2 Command not recognized"
    # aiosmtpd's BOGUS_LIMIT (5): HTTP or POP3 spoken at an SMTP port does not linger.
    assert (await raw.cmd("PASS x")).startswith("502 5.5.1")
    assert await raw.rest() == b""


async def test_junk_command_floods_end_the_session(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway, smtp={"junk_command_limit": 6})
    raw = await connect(gw.port())
    await transaction_until_data(raw)  # EHLO counts (1)
    assert (await raw.cmd(b"Subject: x\r\n\r\nx\r\n.\r\n")).startswith("250")  # count resets
    for command in ("NOOP", "RSET", "HELP", "VRFY <a@example.com>", "NOOP", "EHLO again"):
        assert (await raw.cmd(command))[:1] == "2"
    assert (await raw.cmd("NOOP")).startswith("421 4.7.0")
    assert await raw.rest() == b""
    assert len(delivered(outbox)) == 1


async def test_connection_limits_in_total_and_per_ip(
    start_gateway: GatewayFactory, connect: Connect
) -> None:
    gw = await start_gateway(smtp={"max_connections": 3, "max_connections_per_ip": 2})
    first = await connect(gw.port())
    second = await connect(gw.port())
    third = await connect(gw.port())
    assert first.banner.startswith("220")
    assert second.banner.startswith("220")
    assert third.banner.startswith("421 4.7.0")  # a third from 127.0.0.1
    other = await connect(gw.port(), local_host="127.0.0.2")
    assert other.banner.startswith("220")  # another address still gets in
    fourth = await connect(gw.port(), local_host="127.0.0.3")
    assert fourth.banner.startswith("421 4.7.0")  # three in total


# --- time -----------------------------------------------------------------------------------


async def test_idle_timeout_between_commands_and_inside_data(
    start_gateway: GatewayFactory, connect: Connect
) -> None:
    gw = await start_gateway(smtp={"idle_timeout": "0.5s", "data_rate_grace": "1h"})
    raw = await connect(gw.port())
    assert (await raw.rest()).startswith(b"421 4.4.2 Idle timeout")
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    await raw.send(b"Subject: stalled\r\n")  # then nothing
    assert (await raw.rest()).startswith(b"421 4.4.2 Idle timeout")


async def test_slowloris_upload_is_cut_off(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path
) -> None:
    gw = await sync_gateway(
        start_gateway,
        smtp={"idle_timeout": "30s", "min_data_rate": "50KB", "data_rate_grace": "0.3s"},
    )
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    # 100 bytes/s, 500 times below the floor, always well within the idle timeout.
    for _ in range(300):
        if raw.reader.at_eof() or raw.reader._buffer:  # type: ignore[attr-defined]
            break  # the server spoke
        try:
            await raw.send(b"x" * 10)
        except ConnectionError:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("a 100 bytes/s upload was never cut off")
    assert (await raw.rest()).startswith(b"421 4.4.2 Data transfer too slow")
    assert delivered(outbox) == []


async def test_a_slow_old_printer_still_sends_20_mb(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path
) -> None:
    # An upload that takes several idle timeouts but keeps well above the rate floor: it
    # used to be cut by the idle timer, which only commands reset.
    gw = await sync_gateway(
        start_gateway,
        smtp={
            "idle_timeout": "0.5s",
            "min_data_rate": "50KB",
            "data_rate_grace": "0.2s",
            "max_message_size": "25MB",
        },
    )
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    line = b"P" * 76 + b"\r\n"
    chunk = line * 4096  # 312 KiB
    await raw.send(b"Subject: scan\r\nContent-Type: text/plain\r\n\r\n")
    for _ in range(64):  # 20 MB in 64 bursts
        await raw.send(chunk)
        await asyncio.sleep(0.05)
    assert (await raw.cmd(b".\r\n", timeout=60)).startswith("250 2.0.0")
    [message] = delivered(outbox)
    assert len(message.body) > 20_000_000
