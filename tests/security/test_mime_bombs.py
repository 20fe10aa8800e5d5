"""MIME bombs: every dimension of a message is bounded by a ``[mime]`` limit and answered with a
prompt ``554 5.6.0``; nothing recurses without bound, nothing is decompressed, and parsing a
large message never holds up other sessions."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smtp2api import intake
from smtp2api.errors import MessageError
from smtp2api.mime import MimeLimits, parse_message
from smtp2api.models import Envelope
from tests.conftest import GatewayFactory
from tests.security.conftest import Connect, delivered, sync_gateway, transaction_until_data

ENVELOPE = Envelope("a@example.com", ("b@example.com",))


def nested(depth: int, kind: str = "multipart") -> bytes:
    """``depth`` levels of multipart/mixed (or message/rfc822) around a text part."""
    if kind == "message":
        return b"Content-Type: message/rfc822\r\n\r\n" * depth + b"Subject: core\r\n\r\nx\r\n"
    opening = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(depth)
    )
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return opening + b"Content-Type: text/plain\r\n\r\nx" + closing


def many_parts(count: int, size: int = 10) -> bytes:
    part = b"--p\r\nContent-Type: text/plain\r\n\r\n" + b"y" * size + b"\r\n"
    return b"Content-Type: multipart/mixed; boundary=p\r\n\r\n" + part * count + b"--p--\r\n"


def many_headers(count: int) -> bytes:
    return b"".join(b"X-H%d: v\r\n" % i for i in range(count)) + b"\r\nbody\r\n"


def folded_header(total: int) -> bytes:
    """One Subject folded over as many 78-octet lines as it takes to reach ``total``."""
    line = b" " + b"w" * 75 + b"\r\n"
    return b"Subject: start\r\n" + line * (total // len(line)) + b"\r\nbody\r\n"


BOMBS: dict[str, tuple[Callable[[], bytes], dict[str, Any]]] = {
    "deep-multipart": (lambda: nested(30), {"max_depth": 10}),
    "deep-message-rfc822": (lambda: nested(30, "message"), {"max_depth": 10}),
    "many-parts": (lambda: many_parts(120), {"max_parts": 100}),
    "many-headers": (lambda: many_headers(80), {"max_headers": 50}),
    "huge-folded-header": (lambda: folded_header(60_000), {"max_header_bytes": 50_000}),
}


@pytest.mark.parametrize(("build", "limits"), list(BOMBS.values()), ids=list(BOMBS))
async def test_each_limit_is_configurable_and_answered_with_554(
    start_gateway: GatewayFactory,
    connect: Connect,
    outbox: Path,
    build: Callable[[], bytes],
    limits: dict[str, Any],
) -> None:
    gw = await sync_gateway(start_gateway, mime=limits)
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    assert (await raw.cmd(build() + b".\r\n")).startswith("554 5.6.0")
    # Just under each limit the same shape is fine: the limit is the setting, not a constant.
    assert (await raw.cmd("NOOP")).startswith("250")
    assert delivered(outbox) == []


@pytest.mark.parametrize(
    "bomb",
    [nested(5000), nested(20_000, "message"), many_parts(600), many_headers(1100)],
    ids=["5000-multiparts", "20000-rfc822", "600-parts", "1100-headers"],
)
async def test_default_limits_refuse_bombs_without_recursion_error(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path, bomb: bytes
) -> None:
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    # 554 5.6.0, not the 451 that an exception (RecursionError) inside the parser would give.
    assert (await raw.cmd(bomb + b".\r\n")).startswith("554 5.6.0")
    assert delivered(outbox) == []


def test_under_the_limits_the_same_shapes_parse() -> None:
    def parse(raw: bytes, **limits: int) -> Any:
        return parse_message(raw, ENVELOPE, "m", limits=MimeLimits(**limits))

    assert parse(nested(9), max_depth=10).text == "x"
    assert len(parse(many_parts(90), max_parts=100).attachments) == 89
    parse(many_headers(40), max_headers=50)
    assert parse(folded_header(40_000), max_header_bytes=50_000).subject


def test_a_single_2_mb_base64_line_parses_in_the_model() -> None:
    # Refused at the SMTP line limit by default (test_exhaustion.py); an operator who raises
    # max_line_length gets it parsed, decoded once, in linear time.
    content = bytes(range(256)) * 6000  # 1.5 MB -> a 2 MB base64 line
    raw = (
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=blob.bin\r\n\r\n"
        + base64.b64encode(content)
        + b"\r\n--x--\r\n"
    )
    [attachment] = parse_message(raw, ENVELOPE, "m").attachments
    assert attachment.content == content


async def test_a_2_mb_line_over_smtp_is_refused_at_the_line_limit(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    line = base64.b64encode(b"\0" * 1_500_000)
    reply = await raw.cmd(b"Content-Transfer-Encoding: base64\r\n\r\n" + line + b"\r\n.\r\n")
    assert reply == "554 5.6.0 Message rejected: line too long"
    assert delivered(outbox) == []


def gzip_bomb() -> bytes:
    return gzip.compress(b"\0" * 50_000_000, compresslevel=9)


def zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", b"\0" * 50_000_000)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("ctype", "make"),
    [("application/gzip", gzip_bomb), ("application/zip", zip_bomb)],
    ids=["gzip", "zip"],
)
async def test_compressed_attachments_are_never_decompressed(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path, ctype: str, make: Any
) -> None:
    bomb = make()
    assert len(bomb) < 100_000  # 50 MB of zeros inside
    encoded = base64.encodebytes(bomb).replace(b"\n", b"\r\n")
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    data = (
        b"Subject: archive\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=z\r\n\r\n"
        b"--z\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--z\r\nContent-Type: " + ctype.encode() + b"\r\n"
        b"Content-Encoding: gzip\r\n"  # not a MIME header: ignored, never acted on
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=data\r\n\r\n" + encoded + b"--z--\r\n"
    )
    assert (await raw.cmd(data + b".\r\n")).startswith("250")
    [attachment] = delivered(outbox)[0].doc["attachments"]
    assert base64.b64decode(attachment["content"]) == bomb  # exactly as attached


async def test_parsing_a_large_bomb_does_not_stall_other_sessions(
    start_gateway: GatewayFactory,
    connect: Connect,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While one session's large message is being parsed, another session is answered.

    The parse is held at a gate until the other session's NOOP has been answered. Parsing on
    the event loop would block that NOOP behind the gate: the gate would time out, and the
    test fails on ordering alone, whatever the machine's speed.
    """
    started, release = threading.Event(), threading.Event()
    order: list[str] = []
    real = intake.parse_message

    def gated(*args: Any, **kwargs: Any) -> Any:
        started.set()
        order.append("parse started")
        if not release.wait(timeout=20):
            order.append("gate timed out")
        order.append("parse resumed")
        return real(*args, **kwargs)

    monkeypatch.setattr(intake, "parse_message", gated)
    gw = await sync_gateway(start_gateway)
    bomb_session = await connect(gw.port())
    other = await connect(gw.port())
    await other.cmd("EHLO other.test")
    await transaction_until_data(bomb_session)
    bomb = many_parts(450, size=900)  # 450 parts, about 430 KB: parsed in a worker thread
    assert len(bomb) > 256 * 1024
    await bomb_session.send(bomb + b".\r\n")
    await asyncio.to_thread(started.wait, 20)
    assert (await other.cmd("NOOP")).startswith("250")
    order.append("noop answered")
    release.set()
    assert (await bomb_session.reply()).startswith("250")
    assert order == ["parse started", "noop answered", "parse resumed"]


def test_depth_bombs_raise_message_error_not_recursion_error() -> None:
    for bomb in (nested(3000), nested(50_000, "message")):
        with pytest.raises(MessageError):
            parse_message(bomb, ENVELOPE, "m")
