"""Helpers for the hostile-input tests: a byte-exact SMTP client on raw asyncio streams, and a
reader for what the ``outbox`` provider delivered (its JSON carries the envelope)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from smtp2api import auth
from smtp2api.app import Gateway
from smtp2api.logs import configure_logging
from tests.conftest import GatewayFactory, account

READ_TIMEOUT = 10.0


class Raw:
    """One SMTP connection driven byte by byte: nothing is added, normalised or waited for
    unless the test says so. ``reply()`` reads exactly one (possibly multi-line) reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.banner = ""

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        local_host: str | None = None,
    ) -> Raw:
        reader, writer = await asyncio.open_connection(
            host,
            port,
            ssl=tls,
            server_hostname="localhost" if tls else None,
            local_addr=(local_host, 0) if local_host else None,
            limit=2**20,
        )
        raw = cls(reader, writer)
        raw.banner = await raw.reply()
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = READ_TIMEOUT) -> str:
        """One reply; its lines joined by "\\n". "" when the server closed instead."""
        lines: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                if not line:
                    return "\n".join(lines)
                assert line.endswith(b"\r\n"), f"reply line without CRLF: {line!r}"
                text = line[:-2].decode("utf-8")
                lines.append(text)
                if len(text) < 4 or text[3] != "-":
                    return "\n".join(lines)

    async def cmd(self, line: str | bytes, timeout: float = READ_TIMEOUT) -> str:
        """Send one command line (CRLF added to a str) and read its reply."""
        data = line.encode("utf-8", "surrogateescape") + b"\r\n" if isinstance(line, str) else line
        await self.send(data)
        return await self.reply(timeout)

    async def rest(self, timeout: float = READ_TIMEOUT) -> bytes:
        """Everything the server still sends, up to its close (EOF)."""
        async with asyncio.timeout(timeout):
            return await self.reader.read()

    async def starttls(self, context: ssl.SSLContext) -> None:
        await self.writer.start_tls(context, server_hostname="localhost")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(5):
                await self.writer.wait_closed()


@dataclass(frozen=True)
class Delivered:
    """One message as the outbox provider wrote it."""

    doc: dict[str, Any]  # the JSON an API would get, plus "envelope"
    eml: bytes  # the raw MIME forwarded to raw-MIME providers (our Received: header first)

    @property
    def mail_from(self) -> str:
        return str(self.doc["envelope"]["mail_from"])

    @property
    def rcpt_tos(self) -> list[str]:
        return list(self.doc["envelope"]["rcpt_tos"])

    @property
    def body(self) -> bytes:
        """The message as forwarded, without the Received: header this hop added."""
        lines = self.eml.split(b"\r\n")
        assert lines[0].startswith(b"Received: "), self.eml[:80]
        first = 1
        while lines[first].startswith(b"\t"):  # the folded rest of that header
            first += 1
        return b"\r\n".join(lines[first:])


def delivered(folder: Path) -> list[Delivered]:
    """The outbox's messages, oldest first."""
    if not folder.exists():
        return []
    out = []
    for doc_file in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns):
        out.append(
            Delivered(json.loads(doc_file.read_text()), doc_file.with_suffix(".eml").read_bytes())
        )
    return out


Connect = Callable[..., Awaitable[Raw]]


@pytest.fixture
async def connect(start_gateway: GatewayFactory) -> AsyncIterator[Connect]:
    """``await connect(port, tls=..., local_host=...)`` -> a Raw client, closed at teardown
    before the gateway stops (which would wait for a session inside a transaction)."""
    opened: list[Raw] = []

    async def open_one(port: int, **kwargs: Any) -> Raw:
        raw = await Raw.connect(port, **kwargs)
        opened.append(raw)
        return raw

    yield open_one
    for raw in opened:
        await raw.close()


@pytest.fixture
def debug_logs() -> Iterator[io.StringIO]:
    """Everything logged, at debug level, as JSON lines (the production renderer)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    watched = {name: logging.getLogger(name).level for name in ("mail.log", "httpx", "httpcore")}
    buf = io.StringIO()
    configure_logging("debug", "json", buf)
    yield buf
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, old in watched.items():
        logging.getLogger(name).setLevel(old)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The parameters of every scrypt run from here on (clear it once the gateway started:
    start-up hashes the unknown-user dummy). The seam is ``auth._scrypt``."""
    calls: list[dict[str, Any]] = []
    real = auth._scrypt

    def counting(password: bytes, **params: Any) -> bytes:
        calls.append({k: len(v) if isinstance(v, bytes) else v for k, v in params.items()})
        return real(password, **params)

    monkeypatch.setattr(auth, "_scrypt", counting)
    return calls


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "outbox"  # where base_config's outbox provider writes


def tls_smtp(tls_files: tuple[Path, Path], **extra: Any) -> dict[str, Any]:
    cert, key = tls_files
    return {"tls_cert_file": str(cert), "tls_key_file": str(key), **extra}


async def sync_gateway(start_gateway: GatewayFactory, **sections: Any) -> Gateway:
    """A gateway whose 250 after DATA means "written to the outbox" (delivery mode sync)."""
    sections.setdefault("delivery", {"mode": "sync"})
    return await start_gateway(**sections)


async def transaction_until_data(
    raw: Raw, sender: str = "a@example.com", rcpts: tuple[str, ...] = ("b@example.com",)
) -> None:
    """EHLO, MAIL, RCPT, DATA, each answered as a trusted client expects."""
    assert (await raw.cmd("EHLO client.test")).startswith("250")
    assert (await raw.cmd(f"MAIL FROM:<{sender}>")).startswith("250")
    for rcpt in rcpts:
        assert (await raw.cmd(f"RCPT TO:<{rcpt}>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")


__all__ = ["Connect", "Delivered", "Raw", "account", "delivered", "sync_gateway", "tls_smtp"]
