"""Fuzzing the MIME model with hostile structure (hypothesis), against random ``[mime]`` limits.

``tests/unit/test_mime_properties.py`` mutates real messages byte by byte; this builds trees
of multiparts and attached messages with hostile names and headers, knows their exact shape,
and checks: the parser accepts exactly the trees within every limit and refuses the rest with
MessageError (never another exception); what it accepts keeps every single-line field on one
line, forwards only envelope recipients, sanitises filenames and never decompresses content.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from smtp2api.errors import MessageError
from smtp2api.mime import MimeLimits, parse_message
from smtp2api.models import Envelope, Message

REPO = Path(__file__).resolve().parents[2]
VALIDATOR = Draft202012Validator(
    json.loads((REPO / "docs" / "message.schema.json").read_text(encoding="utf-8"))
)
ENVELOPE = Envelope("a@example.com", ("b@example.com", "c@example.org"))
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
BIDI = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069]")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HOSTILE_TEXT = st.sampled_from(
    [
        "plain",
        "=?utf-8?q?a=0D=0ABcc:_x@evil.test?=",
        "=?utf-8?b?" + base64.b64encode(b"\r\nTo: y@evil.test").decode() + "?=",
        "=?utf-8?q?=E2=80=A8sep=1B[2J?=",
        "=?x-unknown?q?odd?=",
        "=?utf-8?q?unterminated",
        "\u00e9t\u00e9",
        "((((nested comment",
    ]
)
HOSTILE_NAMES = st.sampled_from(
    [
        "report.pdf",
        "../../etc/passwd",
        "..\\win.ini",
        "a\r\nb.txt",
        "nul\x00.bin",
        "\u202egpj.exe",
        ".hidden",
        "dots...",
        "x" * 300 + ".pdf",
        "",
    ]
)
PAYLOADS = st.sampled_from(
    [b"data", gzip.compress(b"\0" * 200_000), b"\xff\xfe\x00binary", b"PK\x03\x04zip-ish"]
)


@dataclass
class Shape:
    """What a generated message is made of, counted as the parser counts."""

    depth: int = 0  # deepest part below the root
    parts: int = 1  # the root included
    headers: int = 0  # header fields of every part, the root included
    header_bytes: int = 0  # their bytes, line ends included
    payloads: list[bytes] = field(default_factory=list)

    def header(self, line: bytes) -> bytes:
        self.headers += 1
        self.header_bytes += len(line) + 2
        return line + b"\r\n"


@st.composite
def part(draw: st.DrawFn, shape: Shape, depth: int, budget: int) -> bytes:
    """One MIME part (headers and body) at ``depth``; ``budget`` bounds further nesting."""
    shape.depth = max(shape.depth, depth)
    kind = draw(st.sampled_from(["text", "html", "attachment", "multipart", "message"]))
    if depth == 0 and draw(st.booleans()):
        kind = "multipart"  # most real messages are: nest more often
    if budget <= 0 and kind in ("multipart", "message"):
        kind = "text"
    extra = b"".join(
        shape.header(b"X-Fuzz: " + v.encode()) for v in draw(st.lists(HOSTILE_TEXT, max_size=2))
    )
    if kind == "text":
        return shape.header(b"Content-Type: text/plain; charset=utf-8") + extra + b"\r\nhello\r\n"
    if kind == "html":
        return shape.header(b"Content-Type: text/html") + extra + b"\r\n<p>hi</p>\r\n"
    if kind == "attachment":
        payload = draw(PAYLOADS)
        shape.payloads.append(payload)
        name = draw(HOSTILE_NAMES).encode("utf-8")
        encoded = "".join(f"%{b:02X}" for b in name).encode()
        return (
            shape.header(b"Content-Type: application/octet-stream")
            + shape.header(b"Content-Disposition: attachment; filename*=utf-8''" + encoded)
            + shape.header(b"Content-Transfer-Encoding: base64")
            + extra
            + b"\r\n"
            + base64.encodebytes(payload).replace(b"\n", b"\r\n")
        )
    if kind == "message":
        shape.parts += 1  # the attached message is a part of its own
        inner = draw(part(shape, depth + 1, budget - 1))
        return shape.header(b"Content-Type: message/rfc822") + extra + b"\r\n" + inner
    boundary = b"b%d-%d" % (depth, draw(st.integers(0, 10**6)))
    children = []
    for _ in range(draw(st.integers(1, 3))):
        shape.parts += 1
        children.append(b"--" + boundary + b"\r\n" + draw(part(shape, depth + 1, budget - 1)))
    return (
        shape.header(b'Content-Type: multipart/mixed; boundary="' + boundary + b'"')
        + extra
        + b"\r\n"
        + b"".join(c if c.endswith(b"\r\n") else c + b"\r\n" for c in children)
        + b"--"
        + boundary
        + b"--\r\n"
    )


@st.composite
def message(draw: st.DrawFn) -> tuple[bytes, Shape]:
    shape = Shape()
    top = b"".join(
        shape.header(line)
        for line in [
            b"From: " + draw(HOSTILE_TEXT).encode() + b" <a@example.com>",
            b"To: " + draw(HOSTILE_TEXT).encode() + b" <b@example.com>, x@evil.test",
            b"Bcc: hidden@evil.test",
            b"Subject: " + draw(HOSTILE_TEXT).encode(),
            b"MIME-Version: 1.0",
        ]
    )
    body = draw(part(shape, 0, draw(st.integers(0, 6))))
    return top + body, shape


LIMITS = st.builds(
    MimeLimits,
    max_depth=st.integers(1, 8),
    max_parts=st.integers(1, 30),
    max_headers=st.integers(5, 80),
    max_header_bytes=st.integers(200, 6000),
)


def within(shape: Shape, limits: MimeLimits) -> bool:
    return (
        shape.depth <= limits.max_depth
        and shape.parts <= limits.max_parts
        and shape.headers <= limits.max_headers
        and shape.header_bytes <= limits.max_header_bytes
    )


def check_accepted(message: Message, shape: Shape) -> None:
    VALIDATOR.validate(message.as_json())
    assert sorted(message.recipients) == sorted(ENVELOPE.rcpt_tos)  # never x@evil.test
    singles = [message.subject, *(v for _, v in message.headers), *(k for k, _ in message.headers)]
    singles += [a.name for a in (*message.to, *message.cc, *message.bcc, *message.reply_to)]
    singles += [message.from_.name, message.from_.email] if message.from_ else []
    for text in singles:
        assert not CONTROL.search(text), text
    for attachment in message.attachments:
        name = attachment.filename
        assert name
        assert not CONTROL.search(name)
        assert not BIDI.search(name)
        assert "/" not in name
        assert "\\" not in name
        assert not name.startswith(".")
        assert len(name) <= 200
        if attachment.content_type == "application/octet-stream":
            assert attachment.content in shape.payloads  # as attached: never decompressed
    head = message.raw.split(b"\r\n\r\n", 1)[0]
    assert not re.search(rb"(?im)^bcc:", head)


@FUZZ
@given(message(), LIMITS)
def test_limits_are_exact_and_accepted_messages_are_clean(
    generated: tuple[bytes, Shape], limits: MimeLimits
) -> None:
    raw, shape = generated
    try:
        parsed = parse_message(raw, ENVELOPE, "m-1", limits=limits)
    except MessageError as exc:
        refusal = str(exc)
    else:
        refusal = ""
        check_accepted(parsed, shape)
    assert not refusal.startswith("unparseable"), refusal  # a known limit, not the safety net
    assert within(shape, limits) == (not refusal), (shape, limits, refusal)


@FUZZ
@given(message())
def test_default_limits_accept_ordinary_trees(generated: tuple[bytes, Shape]) -> None:
    raw, shape = generated
    check_accepted(parse_message(raw, ENVELOPE, "m-1"), shape)
