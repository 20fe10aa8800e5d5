"""Framing: where a message ends, what its bytes are, and what counts as a command.

Policy (docs/security.md §Framing): only <CRLF>.<CRLF> ends DATA; dots are unstuffed once, on
CRLF lines; bare CR and bare LF in DATA become CRLF; NUL refuses the message (554 5.6.0); in
commands LF ends the line (CR before it optional) and any other control character is a 5xx;
PIPELINING is not offered and input sent ahead of a reply ends the session (554 5.5.0).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import GatewayFactory
from tests.security.conftest import Connect, delivered, sync_gateway, transaction_until_data

HEAD = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: smuggle\r\n\r\nfirst part"
SMUGGLED = (
    b"MAIL FROM:<evil@example.com>\r\n"
    b"RCPT TO:<victim@example.com>\r\n"
    b"DATA\r\n"
    b"From: evil@example.com\r\nSubject: smuggled\r\n\r\nsecond message\r\n"
)
# SMTP smuggling (SEC Consult 2023; CVE-2023-51764/51765/51766; aiosmtpd CVE-2024-27305):
# end-of-data sequences that some receivers honour and RFC 5321 §4.1.1.4 does not.
VARIANTS = [
    b"\n.\r\n",
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
]
NUL_VARIANTS = [
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\x00\n.\r\n",
    b"\n\x00.\r\n",
    b"\r\n.\x00\n",
]
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


async def test_pipelining_is_not_advertised(
    connect: Connect, start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway()
    raw = await connect(gw.port())
    ehlo = await raw.cmd("EHLO client.test")
    assert "PIPELINING" not in ehlo
    assert "CHUNKING" not in ehlo  # no BDAT: DATA is the only way in


@pytest.mark.parametrize("variant", VARIANTS, ids=repr)
async def test_non_crlf_end_of_data_is_content(
    connect: Connect, start_gateway: GatewayFactory, outbox: Path, variant: bytes
) -> None:
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    await raw.send(HEAD + variant + SMUGGLED + b".\r\n")
    assert (await raw.reply()).startswith("250 2.0.0")
    # Exactly one reply was owed: the next one answers QUIT, nothing is left over.
    assert await raw.cmd("QUIT") == "221 Bye"
    assert await raw.rest() == b""
    [message] = delivered(outbox)
    assert (message.mail_from, message.rcpt_tos) == ("a@example.com", ["b@example.com"])
    assert b"MAIL FROM:<evil@example.com>" in message.body  # it stayed content
    assert b"second message" in message.body
    assert not BARE.search(message.eml)  # forwarded with one reading: CRLF only


@pytest.mark.parametrize("variant", NUL_VARIANTS, ids=repr)
async def test_nul_variants_refuse_the_message_and_never_split_it(
    connect: Connect, start_gateway: GatewayFactory, outbox: Path, variant: bytes
) -> None:
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    await raw.send(HEAD + variant + SMUGGLED + b".\r\n")
    assert (await raw.reply()).startswith("554 5.6.0")
    # The session goes on with a clean state: a new transaction works.
    await transaction_until_data(raw)
    await raw.send(b"Subject: clean\r\n\r\nok\r\n.\r\n")
    assert (await raw.reply()).startswith("250 2.0.0")
    [message] = delivered(outbox)
    assert b"Subject: clean" in message.body
    assert message.rcpt_tos == ["b@example.com"]


async def test_dot_unstuffing_happens_exactly_once(
    connect: Connect, start_gateway: GatewayFactory, outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    await raw.send(
        b"Subject: dots\r\n\r\n"
        b"..one leading dot\r\n"
        b"...two leading dots\r\n"
        b"..\r\n"  # a line that is a single dot, stuffed
        b"no.dot.at.start.\r\n"
        b"a bare LF then\n..stays as sent\r\n"  # not an SMTP line start: no unstuffing
        b".\r\n"
    )
    assert (await raw.reply()).startswith("250")
    [message] = delivered(outbox)
    assert message.body == (
        b"Subject: dots\r\n\r\n"
        b".one leading dot\r\n"
        b"..two leading dots\r\n"
        b".\r\n"
        b"no.dot.at.start.\r\n"
        b"a bare LF then\r\n..stays as sent\r\n"
    )


async def test_bare_lf_and_bare_cr_in_data_are_normalised(
    connect: Connect, start_gateway: GatewayFactory, outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    # An LF-only client (PHP mail(), scripts) sending more than one 1000-octet "line" in all.
    lf_only = b"".join(b"line %02d " % i + b"x" * 60 + b"\n" for i in range(40)) + b"end\r\n"
    await raw.send(b"Subject: lf\nX-Mixed: 1\r\n\nbody\rwith cr\r\n" + lf_only + b".\r\n")
    assert (await raw.reply()).startswith("250")
    [message] = delivered(outbox)
    lines = b"".join(b"line %02d " % i + b"x" * 60 + b"\r\n" for i in range(40))
    assert (
        message.body == b"Subject: lf\r\nX-Mixed: 1\r\n\r\nbody\r\nwith cr\r\n" + lines + b"end\r\n"
    )
    assert message.doc["subject"] == "lf"
    assert "X-Mixed" in message.doc["headers"]


async def test_bare_lf_ends_a_command_line(connect: Connect, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway()
    raw = await connect(gw.port())
    assert (await raw.cmd(b"EHLO client.test\n")).startswith("250")
    assert (await raw.cmd(b"MAIL FROM:<a@example.com>\n")).startswith("250 2.1.0")
    assert (await raw.cmd(b"RSET\n")).startswith("250")


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<a@example.com>\rRCPT TO:<b@example.com>\r\n",
        b"MAIL FROM:<a@example.com> \x00\r\n",
        b"MAIL FROM:<a@exa\x00mple.com>\r\n",
        b"MAIL FROM:<a\x0b@example.com>\r\n",
        b"MAIL FROM:<a@example.com>\x1b[2J\r\n",
    ],
    ids=repr,
)
async def test_control_characters_in_mail_are_501(
    connect: Connect, start_gateway: GatewayFactory, line: bytes
) -> None:
    gw = await start_gateway()
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    assert (await raw.cmd(line)).startswith("501 5.5.4")
    # Nothing after the CR ran as a command, and no transaction was opened.
    assert (await raw.cmd("RCPT TO:<b@example.com>")).startswith("503")


@pytest.mark.parametrize(
    "line",
    [
        b"RCPT TO:<b@example.com>\rDATA\r\n",
        b"RCPT TO:<b@exam\nple.com>\r\n",
        b"RCPT TO:<\x00b@example.com>\r\n",
        b"RCPT TO:<b@example.com\x7f>\r\n",
        "RCPT TO:<b@example.com>\u2028DATA\r\n".encode(),
    ],
    ids=repr,
)
async def test_control_characters_in_rcpt_are_refused(
    connect: Connect, start_gateway: GatewayFactory, outbox: Path, line: bytes
) -> None:
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    await raw.cmd("MAIL FROM:<a@example.com>")
    first = await raw.cmd(line)
    if b"\n" in line[:-1]:
        # LF ends a command line: "ple.com>" arrived ahead of the reply to "RCPT TO:<b@exam".
        assert first.startswith("554 5.5.0")
        assert await raw.rest() == b""
    else:
        assert first.startswith("501 5.5.4")
        assert (await raw.cmd("DATA")).startswith("503")  # no recipient was added
    assert delivered(outbox) == []


async def test_bare_cr_inside_a_command_verb_is_a_5xx(
    connect: Connect, start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway()
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    reply = await raw.cmd(b"NOOP\rMAIL FROM:<a@example.com>\r\n")
    assert reply == "500 5.5.2 Command not recognized"  # never echoes the client's bytes
    assert (await raw.cmd("RCPT TO:<b@example.com>")).startswith("503")


async def test_pipelined_commands_are_refused_and_the_session_closed(
    connect: Connect,
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway()
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    await raw.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
    assert (await raw.reply()).startswith("554 5.5.0")
    assert await raw.rest() == b""  # closed: the RCPT was never run


async def test_body_sent_before_354_is_refused(
    connect: Connect, start_gateway: GatewayFactory, outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    await raw.cmd("MAIL FROM:<a@example.com>")
    await raw.cmd("RCPT TO:<b@example.com>")
    await raw.send(b"DATA\r\nSubject: early\r\n\r\nRSET\r\nMAIL FROM:<evil@example.com>\r\n.\r\n")
    assert (await raw.reply()).startswith("554 5.5.0")
    assert await raw.rest() == b""
    assert delivered(outbox) == []


async def test_quit_right_after_the_dot_is_fine(
    connect: Connect, start_gateway: GatewayFactory, outbox: Path
) -> None:
    # Many clients send QUIT without waiting for the reply to the end of data.
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    await raw.send(b"Subject: bye\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert (await raw.reply()).startswith("250 2.0.0")
    assert await raw.reply() == "221 Bye"
    assert len(delivered(outbox)) == 1
