"""Envelope and headers: encoded line breaks cannot add headers or recipients, the header From
of a restricted account cannot differ from what was checked, attachment names are safe, and
whatever a client sends, every log event stays one line."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from urllib.parse import quote

import pytest

from smtp2api.app import Gateway
from tests.conftest import PASSWORDS, GatewayFactory, account
from tests.security.conftest import Connect, Raw, delivered, sync_gateway, transaction_until_data

# Raw header lines (CRLF added) of a message the tests vary.
BASE_HEADERS = [b"To: b@example.com", b"Subject: test"]
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def message(*headers: bytes, body: bytes = b"hello\r\n") -> bytes:
    return b"\r\n".join([*headers, b""]) + b"\r\n" + body


async def send_data(raw: Raw, data: bytes) -> str:
    assert data.endswith(b"\r\n")
    return await raw.cmd(data + b".\r\n")


def walk_strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*walk_strings(k), *walk_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in walk_strings(v)]
    return []


async def test_encoded_line_breaks_create_no_header_and_no_recipient(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await transaction_until_data(raw, rcpts=("b@example.com",))
    data = message(
        b"From: =?utf-8?q?Ann=0D=0ABcc:_victim@evil.test?= <a@example.com>",
        b"To: =?utf-8?q?x=0ACc:_victim2@evil.test?= <b@example.com>",
        b"Subject: =?utf-8?q?hello=0D=0ABcc:_victim3@evil.test=0D=0A=0D=0Abody?=",
        b"Reply-To: =?utf-8?b?%s?= <r@a.test>" % base64.b64encode(b"R\r\nTo: victim4@evil.test"),
        b"X-Custom: =?utf-8?q?v=0D=0AX-Injected:_1?=",
    )
    assert (await send_data(raw, data)).startswith("250")
    [out] = delivered(outbox)
    assert out.rcpt_tos == ["b@example.com"]
    doc = out.doc
    emails = [a["email"] for key in ("to", "cc", "bcc") for a in doc[key]]
    assert emails == ["b@example.com"]
    for text in walk_strings({k: v for k, v in doc.items() if k != "text"}):
        assert not CONTROL.search(text), text  # decoded, but never a line break
    assert doc["from"]["email"] == "a@example.com"
    assert "X-Injected" not in doc["headers"]
    assert doc["subject"].startswith("hello Bcc: victim3@evil.test")  # text, on one line
    # The raw MIME is forwarded as received (minus Bcc): encoded-words stay encoded.
    assert not re.search(rb"(?im)^(bcc|cc|x-injected):", out.body.split(b"\r\n\r\n")[0])


@pytest.fixture
async def restricted(start_gateway: GatewayFactory) -> Gateway:
    """An account that may only send as *@example.com (login without TLS, to keep it short)."""
    return await sync_gateway(
        start_gateway,
        smtp={"trusted_networks": [], "require_tls": False},
        accounts=[account("wordpress", allowed_senders=["*@example.com"])],
    )


async def logged_in(gw: Gateway, connect: Connect) -> Raw:
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    blob = base64.b64encode(f"\0wordpress\0{PASSWORDS['wordpress']}".encode()).decode()
    assert (await raw.cmd(f"AUTH PLAIN {blob}")).startswith("235")
    return raw


REFUSED_AUTHORS = {
    "other-domain": [b"From: evil@other.test"],
    "two-from-fields": [b"From: a@example.com", b"From: evil@other.test"],
    "two-from-reversed": [b"From: evil@other.test", b"From: a@example.com"],
    "a@x@y": [b"From: a@example.com@other.test"],
    "two-angle-addrs": [b"From: <a@example.com><evil@other.test>"],
    "two-mailboxes": [b"From: a@example.com, evil@other.test"],
    "folded-second-mailbox": [b"From: a@example.com,\r\n evil@other.test"],
    "group": [b"From: team: a@example.com, evil@other.test;"],
    "sender-field": [b"From: a@example.com", b"Sender: evil@other.test"],
    "quoted-at": [b'From: "evil@other.test"@example.com'],
    "obsolete-space-before-colon": [b"FROM : evil@other.test"],
    "encoded-address": [b"From: =?utf-8?q?a@example.com?= <evil@other.test>"],
    "empty": [b"From: "],
}


@pytest.mark.parametrize("headers", list(REFUSED_AUTHORS.values()), ids=list(REFUSED_AUTHORS))
async def test_restricted_account_cannot_send_as_another_author(
    restricted: Gateway, connect: Connect, outbox: Path, headers: list[bytes]
) -> None:
    raw = await logged_in(restricted, connect)
    assert (await raw.cmd("MAIL FROM:<a@example.com>")).startswith("250")  # envelope passes
    await raw.cmd("RCPT TO:<b@example.com>")
    await raw.cmd("DATA")
    reply = await send_data(raw, message(*headers, *BASE_HEADERS))
    assert reply == "553 5.7.1 From header not allowed for this account"
    assert delivered(outbox) == []


ALLOWED_AUTHORS = {
    "plain": ([b"From: a@example.com"], "a@example.com"),
    "display-name-looks-like-address": ([b'From: "evil@other.test" <a@example.com>'], None),
    "encoded-display-name": ([b"From: =?utf-8?q?evil@other.test?= <a@example.com>"], None),
    "case-insensitive": ([b"From: A@EXAMPLE.COM"], "A@EXAMPLE.COM"),
    "from-and-sender": ([b"From: a@example.com", b"Sender: b@example.com"], "a@example.com"),
    "no-from": ([], None),
}


@pytest.mark.parametrize(
    ("headers", "author"), list(ALLOWED_AUTHORS.values()), ids=list(ALLOWED_AUTHORS)
)
async def test_restricted_account_sends_as_an_allowed_author(
    restricted: Gateway, connect: Connect, outbox: Path, headers: list[bytes], author: str | None
) -> None:
    raw = await logged_in(restricted, connect)
    await raw.cmd("MAIL FROM:<a@example.com>")
    await raw.cmd("RCPT TO:<b@example.com>")
    await raw.cmd("DATA")
    assert (await send_data(raw, message(*headers, *BASE_HEADERS))).startswith("250")
    [out] = delivered(outbox)
    sent_as = out.doc["from"]["email"] if out.doc["from"] else None
    # What an API is told is the checked mailbox (or, without From, the envelope sender).
    assert sent_as == (author or ("a@example.com" if headers else None))


async def test_trusted_peers_and_unrestricted_accounts_are_not_held_to_a_from(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway)  # loopback is trusted, no account involved
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    assert (await send_data(raw, message(b"From: anyone@other.test", *BASE_HEADERS)))[:3] == "250"
    assert delivered(outbox)[0].doc["from"]["email"] == "anyone@other.test"


def with_attachments(names: list[str]) -> bytes:
    """A multipart message with one attachment per name, each name RFC 2231 encoded (so CR,
    LF and NUL can be in it, as a hostile client would put them)."""
    parts = [b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"]
    for name in names:
        encoded = quote(name.encode("utf-8"), safe="").encode()
        parts.append(
            b"--b\r\nContent-Type: application/pdf\r\n"
            b"Content-Disposition: attachment; filename*=utf-8''" + encoded + b"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\nZGF0YQ==\r\n"
        )
    return message(
        b"From: a@example.com",
        b"To: b@example.com",
        b"Subject: files",
        b"MIME-Version: 1.0",
        b'Content-Type: multipart/mixed; boundary="b"',
        body=b"".join(parts) + b"--b--\r\n",
    )


HOSTILE_NAMES = [
    "../../etc/passwd",
    "..\\..\\windows\\win.ini",
    "/absolute/path.pdf",
    "invoice\u202efdp.exe",  # right-to-left override: displays as "invoiceexe.pdf"
    "line\r\nbreak.pdf",
    "nul\x00byte.pdf",
    ".htaccess",
    "trailing dots...",
    "x" * 500 + ".pdf",
    "",
]


async def test_attachment_filenames_are_sanitised(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path
) -> None:
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    assert (await send_data(raw, with_attachments(HOSTILE_NAMES))).startswith("250")
    names = [a["filename"] for a in delivered(outbox)[0].doc["attachments"]]
    assert len(names) == len(HOSTILE_NAMES)
    for name in names:
        assert name, names
        assert "/" not in name
        assert "\\" not in name
        assert not CONTROL.search(name)
        assert not re.search("[\u200e\u200f\u202a-\u202e\u2066-\u2069]", name)
        assert not name.startswith(".")
        assert not name.endswith((".", " "))
        assert len(name) <= 200
    assert names[0] == "passwd"
    assert names[8].endswith(".pdf")  # shortened, extension kept


async def test_every_log_event_is_one_line_whatever_the_client_sends(
    start_gateway: GatewayFactory, connect: Connect, debug_logs: io.StringIO
) -> None:
    gw = await sync_gateway(start_gateway)
    raw = await connect(gw.port())
    hostile = [
        b"EHLO client\x1b[31m.test\r\n",
        "EHLO client\u2028.test\r\n".encode(),
        b"EHLO client\x85.test\r\n",
        b"EHLO client.test\r\n",
        b"HELP \x00\r\n",
        b"X\x1b]0;owned\x07 \r\n",
        b"MAIL FROM:<a\x0d@example.com>\r\n",
        "MAIL FROM:<\u0430\u2028@example.com> SMTPUTF8\r\n".encode(),
        b"MAIL FROM:<a@example.com>\r\n",
        b"RCPT TO:<b@example.com>\r\n",
        b"DATA\r\n",
    ]
    for line in hostile:
        await raw.cmd(line)
    await send_data(
        raw,
        message(
            b"From: =?utf-8?q?A=0D=0Ainjected=3A_1?= <a@example.com>",
            b"To: b@example.com",
            b'Subject: =?utf-8?q?line=0D=0A{"level":"critical"}=E2=80=A8=1B[2J?=',
        ),
    )
    text = debug_logs.getvalue()
    assert "message_subject" in text  # debug events were captured
    lines = text.split("\n")
    assert lines[-1] == ""
    for line in lines[:-1]:
        event = json.loads(line)  # exactly one JSON object per line
        assert isinstance(event, dict)
        assert not CONTROL.search(line), line  # escaped, not raw
    subjects = [json.loads(x)["subject"] for x in lines[:-1] if "message_subject" in x]
    assert subjects == ['line {"level":"critical"} [2J']
