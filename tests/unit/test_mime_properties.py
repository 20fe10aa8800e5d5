"""Properties of mime.parse_message: it only ever raises MessageError, and the recipients are
exactly the envelope's, whatever the headers say."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from smtp2api.errors import MessageError
from smtp2api.mime import parse_message
from smtp2api.models import Envelope, Message

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SMTP2API_SHARED", REPO.parent / "shared"))
# Small files only, so that a few hundred mutated parses stay fast.
CORPUS = sorted(
    p.read_bytes()
    for p in (SHARED / "mime-corpus").glob("*/*")
    if p.is_file() and p.parent.name != "licenses" and p.stat().st_size < 100_000
)
VALIDATOR = Draft202012Validator(
    json.loads((REPO / "docs" / "message.schema.json").read_text(encoding="utf-8"))
)
ENVELOPE = Envelope("sender@example.org", ("a@example.com", "B@Example.NET", "c@example.org"))
BLIND_FIELD = re.compile(rb"(?im)^(?:resent-)?bcc[ \t]*:")
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def header_section(raw: bytes) -> bytes:
    """Up to the first empty line (RFC 5322 §2.1); CRLF, LF and CR all end a line."""
    pos = 0
    for match in re.finditer(rb"\r\n|\r|\n", raw):
        if match.start() == pos:
            return raw[:pos]
        pos = match.end()
    return raw


def parse_or_reject(raw: bytes, envelope: Envelope = ENVELOPE) -> Message | None:
    message: Message | None = None
    try:
        message = parse_message(raw, envelope, "msg-1")
    except MessageError as exc:
        reason = str(exc)
    else:
        reason = ""
    assert not reason.startswith("unparseable message"), reason  # the catch-all fired
    if message is None:
        return None
    VALIDATOR.validate(message.as_json())
    assert sorted(message.recipients) == sorted(envelope.rcpt_tos)
    return message


@FAST
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(raw: bytes) -> None:
    parse_or_reject(raw)


MIME_BITS = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"\r",
        b"\r\n\r\n",
        b"--",
        b"Content-Type: multipart/mixed; boundary=x\r\n",
        b"Content-Type: message/rfc822\r\n\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Disposition: attachment; filename*0*=utf-8''%E2; filename*1=x\r\n",
        b"=?utf-8?q?=0D=0A?=",
        b"=?utf-7?b?K2RnQS0=?=",
        b"Bcc: leak@example.com\r\n",
        b"\r\nBcc: leak@example.com",
        b"To: a@example.com\r\n",
        b"X-SMTPAPI: {}\r\n",
        b'"(<',
        b"\x00\xff\xfe",
    ]
)


@st.composite
def mutated_corpus_file(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "flip", "duplicate"]))
        if action == "insert":
            data[at:at] = draw(MIME_BITS | st.binary(max_size=16))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif action == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 256))]
    return bytes(data)


@FAST
@given(mutated_corpus_file())
def test_mutated_corpus_files(raw: bytes) -> None:
    message = parse_or_reject(raw)
    if message is not None:
        assert not BLIND_FIELD.search(header_section(message.raw))


LOCALS = st.sampled_from(["ann", "bob", "Cid", "d.e", "f+g", "h_i"])
DOMAINS = st.sampled_from(["example.com", "Example.NET", "mail.test"])
ADDRESSES = st.builds(lambda local, domain: f"{local}@{domain}", LOCALS, DOMAINS)


def respell(address: str, upper: bool) -> str:
    return address.upper() if upper else address.lower()


@st.composite
def addressed_message(draw: st.DrawFn) -> tuple[Envelope, bytes, set[str]]:
    """An envelope, and headers naming some of its recipients (respelled), plus strangers."""
    rcpts = draw(st.lists(ADDRESSES, min_size=1, max_size=8, unique_by=str.lower))
    strangers = [
        a for a in draw(st.lists(ADDRESSES, max_size=4)) if a.lower() not in map(str.lower, rcpts)
    ]
    fields = []
    for name in ("To", "Cc", "Bcc"):
        chosen = draw(st.lists(st.sampled_from(rcpts + strangers), max_size=6))
        names = [
            f'"{draw(st.sampled_from(["", "Ann", "=?utf-8?q?J=C3=B6?=", "x, y"]))}" '
            f"<{respell(a, draw(st.booleans()))}>"
            for a in chosen
        ]
        fold = draw(st.sampled_from([", ", ",\r\n ", ",\r\n\t"]))
        fields.append(f"{name}: {fold.join(names)}\r\n")
    draw(st.randoms()).shuffle(fields)
    raw = ("".join(fields) + "Subject: s\r\n\r\nbody\r\n").encode()
    return Envelope("s@example.org", tuple(rcpts)), raw, {a.lower() for a in strangers}


@FAST
@given(addressed_message())
def test_recipients_are_exactly_the_envelope(case: tuple[Envelope, bytes, set[str]]) -> None:
    envelope, raw, strangers = case
    message = parse_or_reject(raw, envelope)
    assert message is not None
    emails = [a.email for a in (*message.to, *message.cc, *message.bcc)]
    assert sorted(emails) == sorted(envelope.rcpt_tos)  # envelope spelling, each once
    assert len(set(map(str.lower, emails))) == len(emails)
    assert not strangers & set(map(str.lower, emails))
    assert not BLIND_FIELD.search(message.raw)  # no body line starts with Bcc here
    for address in message.to:  # order within each list follows the envelope
        assert address.email in envelope.rcpt_tos
    positions = [envelope.rcpt_tos.index(a.email) for a in message.bcc]
    assert positions == sorted(positions)
