"""The strict splitter of ``mime_tree`` builds the tree feedparser builds, or declines.

Every message of the MIME corpus (as stored and with CRLF line endings) and thousands of
generated ones (boundaries that prefix each other, delimiters with padding, missing close
delimiters, repeated delimiter lines, bare CR and LF, junk header lines, nested parts, base64
with and without junk) are parsed both ways: where the splitter takes a message, headers,
structure, payloads, decoded contents and the limit counters must all be equal, and
``parse_message`` must return the same Message (or raise the same error) either way.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from email._encoded_words import decode_b  # type: ignore[import-not-found]
from email.message import Message as EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smtp2api import mime_tree
from smtp2api.errors import MessageError
from smtp2api.mime import MimeLimits, parse_message
from smtp2api.mime_headers import scan_headers
from smtp2api.mime_tree import Part, _Counter, _ParsePolicy, _Splitter, source_content
from smtp2api.models import Envelope

CORPUS = Path("/work/shared/mime-corpus")
ENVELOPE = Envelope(mail_from="a@example.com", rcpt_tos=("b@example.net", "c@example.org"))


DEFAULT = MimeLimits()


def _parts() -> tuple[_Counter, _ParsePolicy, Callable[..., Part]]:
    counter = _Counter(DEFAULT.max_depth, DEFAULT.max_parts, DEFAULT.max_headers, 10**6)
    policy = _ParsePolicy(counter)

    def factory(policy: _ParsePolicy = policy) -> Part:
        part = Part(policy)
        part.counter = counter
        return part

    return counter, policy, factory


def feedparser_tree(raw: bytes) -> tuple[EmailMessage, _Counter]:
    counter, policy, factory = _parts()
    return BytesParser(factory, policy=policy).parsebytes(raw), counter


def splitter_tree(raw: bytes) -> tuple[Part | None, _Counter]:
    counter, policy, factory = _parts()
    root = factory()
    ok = _Splitter(raw, policy, factory).fill(root, 0, len(raw))
    return (root if ok else None), counter


def assert_same_tree(expected: EmailMessage, got: Part, path: str = "root") -> None:
    assert got._headers == expected._headers, path  # type: ignore[attr-defined]
    assert got.is_multipart() == expected.is_multipart(), path
    assert got.get_default_type() == expected.get_default_type(), path
    if expected.is_multipart():
        mine, theirs = got.get_payload(), expected.get_payload()
        assert isinstance(mine, list)
        assert isinstance(theirs, list)
        assert len(mine) == len(theirs), path
        for i, (a, b) in enumerate(zip(theirs, mine, strict=True)):
            assert_same_tree(a, b, f"{path}.{i}")
        return
    decoded = source_content(got)
    if decoded is not None:
        assert decoded == expected.get_payload(decode=True), path
    assert got.get_payload() == expected.get_payload(), path  # feedparser's text, on demand
    assert got.get_payload(decode=True) == expected.get_payload(decode=True), path


def check(raw: bytes) -> bool:
    """Compare both ways of parsing ``raw``; True if the splitter took it."""
    tree, counter = splitter_tree(raw)
    if tree is not None:
        expected, expected_counter = feedparser_tree(raw)
        assert_same_tree(expected, tree)
        assert (counter.parts, counter.headers, counter.header_bytes) == (
            expected_counter.parts,
            expected_counter.headers,
            expected_counter.header_bytes,
        )
    return tree is not None


def outcome(raw: bytes, limits: MimeLimits) -> object:
    try:
        return parse_message(raw, ENVELOPE, "m1", limits=limits)
    except MessageError as exc:
        return ("error", str(exc))


def assert_same_message(raw: bytes, limits: MimeLimits = DEFAULT) -> None:
    fast = outcome(raw, limits)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mime_tree._Splitter, "fill", lambda *_: False)
        slow = outcome(raw, limits)
    assert fast == slow


def corpus() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(
        p
        for p in CORPUS.rglob("*")
        if p.is_file() and p.suffix not in (".md", ".tsv") and "licenses" not in p.parts
    )


@pytest.mark.skipif(not CORPUS.is_dir(), reason="the shared MIME corpus is not mounted")
def test_the_whole_corpus_parses_the_same_both_ways() -> None:
    taken = 0
    for path in corpus():
        data = path.read_bytes()
        for raw in (data, data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")):
            taken += check(raw)
            assert_same_message(raw)
            assert_same_message(raw, MimeLimits(max_depth=2, max_parts=4, max_headers=12))
    assert taken > 50  # most real mail is inside the strict subset


# Generated messages -----------------------------------------------------------------------

_EOL = st.sampled_from([b"\r\n", b"\n", b"\r"])
_BOUNDARIES = ["b", "b1", "b-1", "=_x", "alt b"]
# Body lines: mostly harmless, some that look like (or are) delimiter or header lines.
_PLAIN_LINES = [b"hello", b"", b"QUJD", b"QQ==", b"=3D=", b"\xe9t\xe9", b"a: b", b" x"]
_TRICKY_LINES = [b"--b", b"--b--", b"--b1", b"--b1--", b"--b ", b"--b-- \t", b"--bx", b"x--b"]
_TRICKY_LINES += [b"From me", b"Junk", b": no name", b"\tfolded"]
_LINE = st.sampled_from(_PLAIN_LINES * 6 + _TRICKY_LINES)


_RARE = st.sampled_from([False] * 9 + [True])  # unlike integers(), not drawn towards 0


@st.composite
def leaf(draw: st.DrawFn, eol: bytes) -> bytes:
    ctype = draw(st.sampled_from(["text/plain"] * 3 + ["text/html", "image/png", "message/rfc822"]))
    cte = draw(
        st.sampled_from(["", "base64", "base64", "quoted-printable", "7bit", "BASE64 ", "x-uue"])
    )
    head = [f"Content-Type: {ctype}; charset=utf-8".encode()]
    if cte:
        head.append(f"Content-Transfer-Encoding: {cte}".encode())
    if draw(st.booleans()):
        head.append(b'Content-Disposition: attachment;\r\n filename="a.bin"'.replace(b"\r\n", eol))
    if cte.strip().lower() == "base64" and draw(st.booleans()):
        data = base64.encodebytes(draw(st.binary(max_size=80)))
        body = data.replace(b"\n", eol) + draw(st.sampled_from([b"", b"=", b"*", b"==", b"A"]))
    else:
        body = eol.join(draw(st.lists(_LINE, max_size=4)))
    if draw(_RARE):
        head.append(draw(_LINE))  # maybe junk in the header block
    return eol.join(head) + eol + (b"" if draw(_RARE) else eol) + body


@st.composite
def entity(draw: st.DrawFn, eol: bytes, depth: int = 0) -> bytes:
    if depth >= 2 or draw(st.sampled_from([False, False, True])):
        return draw(leaf(eol))
    boundary = draw(st.sampled_from(_BOUNDARIES))
    quoted = f'"{boundary}"' if " " in boundary or draw(st.booleans()) else boundary
    subtype = draw(st.sampled_from(["mixed", "mixed", "alternative", "related", "digest"]))
    head = f"Content-Type: multipart/{subtype}; boundary={quoted}".encode()
    delimiter = b"--" + boundary.encode()
    lines = [head, b""]
    if draw(st.booleans()):
        lines += draw(st.lists(_LINE, max_size=2))  # preamble
    for child in draw(st.lists(entity(eol, depth + 1), min_size=int(not draw(_RARE)), max_size=3)):
        lines.append(delimiter + draw(st.sampled_from([b"", b" ", b"\t "])))
        if draw(_RARE):
            lines.append(delimiter)  # a repeated delimiter line
        lines.append(child)
    if not draw(_RARE):
        lines.append(delimiter + b"--" + draw(st.sampled_from([b"", b"  "])))
    lines += draw(st.lists(_LINE, max_size=2))  # epilogue
    return eol.join(lines)


@st.composite
def message(draw: st.DrawFn) -> bytes:
    eol = draw(_EOL)
    if draw(_RARE):
        eol = b"\r\n"
        mixed = True
    else:
        mixed = False
    head = [b"From: A <a@example.com>", b"To: b@example.net", b"Subject: hi"]
    raw = eol.join(head) + eol + draw(entity(eol))
    if mixed:  # some bare LF among the CRLF
        raw = raw.replace(b"hello\r\n", b"hello\n")
    return raw + draw(st.sampled_from([b"", eol]))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message())
@example(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n")
@example(b"Content-Type: multipart/mixed; boundary=b\n\n--b\n--b--\n")
@example(b"Content-Type: multipart/mixed; boundary=b\r\rpre\r--b\rX: 1\r\r\r--b-- \r")
def test_generated_messages_parse_the_same_both_ways(raw: bytes) -> None:
    check(raw)
    assert_same_message(raw)
    assert_same_message(raw, MimeLimits(max_depth=1, max_parts=3, max_headers=6))


def test_the_bench_messages_take_the_fast_path() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
    import messages  # type: ignore[import-not-found]

    for raw in (
        messages.text_message(),
        messages.multipart_message(),
        messages.large_message(10**5),
    ):
        assert check(raw)
        assert_same_message(raw)


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"QUJD", b"QQ", b"=", b"\r\n", b"\n", b"\r", b"A", b"*", b" ", b"/+9z"]),
        max_size=12,
    )
)
def test_base64_read_in_place_is_what_compat32_decodes(pieces: list[bytes]) -> None:
    body = b"".join(pieces)
    raw = b"Content-Transfer-Encoding: base64\r\n\r\n" + body
    _, policy, factory = _parts()
    part = factory()
    assert _Splitter(raw, policy, factory).fill(part, 0, len(raw))
    fast = source_content(part)
    if fast is not None:
        assert fast == decode_b(b"".join(body.splitlines()))[0]
        assert fast == binascii.a2b_base64(body)


def _walk(part: EmailMessage) -> list[EmailMessage]:
    out = [part]
    payload = part.get_payload()
    if part.is_multipart() and isinstance(payload, list):
        for child in payload:
            out += _walk(child)
    return out


_ASKED = ["content-type", "Content-Type", "content-disposition", "content-id", "x-missing"]
_ASKED += ["content-transfer-encoding", "subject", "from"]


@pytest.mark.skipif(not CORPUS.is_dir(), reason="the shared MIME corpus is not mounted")
def test_part_lookups_answer_as_compat32_does() -> None:
    # Part indexes header names and caches parameters; a stock compat32 Message does neither.
    for path in corpus():
        raw = path.read_bytes()
        counter = _Counter(100, 10**4, 10**5, 10**8)
        stock = BytesParser(EmailMessage, policy=_ParsePolicy(counter)).parsebytes(raw)
        ours, _ = feedparser_tree(raw) if len(raw) else (stock, None)
        for a, b in zip(_walk(stock), _walk(ours), strict=True):
            for name in _ASKED:
                assert (name in a, a.get(name), a.get(name, 0)) == (
                    name in b,
                    b.get(name),
                    b.get(name, 0),
                )
                assert a.get_params(header=name) == b.get_params(header=name)
                assert a.get_params(header=name, unquote=False) == b.get_params(
                    header=name, unquote=False
                )
                for param in ("charset", "boundary", "name", "filename", "nope"):
                    assert a.get_param(param, header=name) == b.get_param(param, header=name)
            assert (a.get_content_type(), a.get_boundary()) == (
                b.get_content_type(),
                b.get_boundary(),
            )
            assert a.get_filename() == b.get_filename()


def test_a_changed_parameter_is_read_back() -> None:
    raw = b"Content-Type: text/plain; charset=us-ascii\r\nX-A: 1\r\n\r\nbody"
    part, _ = splitter_tree(raw)
    assert part is not None
    assert part.get_param("charset") == "us-ascii"
    part.set_param("charset", "utf-8", replace=True)  # replace_header, in place
    assert part.get_param("charset") == "utf-8"
    del part["x-a"]
    part["X-B"] = "2"
    assert ("x-a" in part, part.get("x-b")) == (False, "2")
    params = part.get_params(unquote=False)
    assert params is not None
    params.clear()  # a caller's copy: the part keeps its own
    assert part.get_param("charset") == "utf-8"


def test_a_large_base64_attachment_is_decoded_in_place() -> None:
    # feedparser held the message as text, its lines, the payload and its bytes: about 7.7
    # times the message at the peak. In place, the decoded attachment is all that is added.
    import sys
    import tracemalloc

    sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
    import messages  # type: ignore[import-not-found]

    raw = messages.large_message(4_000_000)
    tracemalloc.start()
    try:
        message = parse_message(raw, ENVELOPE, "m1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    (attachment,) = message.attachments
    assert len(attachment.content) > 0.7 * len(raw)
    assert peak < 0.9 * len(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"From: a@x\r\nSubject: hi\r\n folded\r\n\r\nbody\r\n",
        b"Bcc : b@x\r\nSubject: hi\r\n\r\nbody\r\n",  # blank before the colon: not reused
        b"junk line\r\nSubject: hi\r\n\r\nbody\r\n",  # a junk line: not reused
        b"Subject: hi\r\nFrom: a@x",  # no empty line
        b"Subject:\r\n\r\n",  # empty value, empty body
        b"Subject: a\rTo: b@x\n\r\n--b\r\n",  # bare CR and LF
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nX: 1\r\n\r\nt\r\n--b--\r\n",
    ],
)
def test_top_fields_found_by_scan_headers_give_the_same_tree(raw: bytes) -> None:
    section = scan_headers(raw, max_fields=1000, max_bytes=10**6)
    top = [(f.name, f.start, f.end) for f in section.fields]
    counter, policy, factory = _parts()
    root = factory()
    if _Splitter(raw, policy, factory, top).fill(root, 0, len(raw)):
        expected, expected_counter = feedparser_tree(raw)
        assert_same_tree(expected, root)
        assert (counter.headers, counter.header_bytes) == (
            expected_counter.headers,
            expected_counter.header_bytes,
        )
    else:
        assert splitter_tree(raw)[0] is None  # declined with or without the known fields
    assert_same_message(raw)
