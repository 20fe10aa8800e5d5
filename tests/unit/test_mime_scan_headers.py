"""``scan_headers`` reads a field and its folded lines with one regex; the line-by-line loop it
replaced is kept here as the reference, and both must split every header section the same way
(fields, spans, values, where the section ends) and refuse the same ones."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from smtp2api.errors import MessageError
from smtp2api.mime_headers import HeaderSection, scan_headers

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(os.environ.get("SMTP2API_SHARED", REPO.parent / "shared")) / "mime-corpus"

_LINE_END = re.compile(rb"\r\n|\r|\n")
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_JUNK_RUN = re.compile(
    rb"[^\r\n]*+(?:(?:\r\n|\r(?!\n)|\n)(?![\r\n]|[\x21-\x39\x3b-\x7e]++[ \t]*+:)[^\r\n]*+)*+"
)


def reference(raw: bytes, max_fields: int, max_bytes: int) -> list[object]:
    """The line-by-line scan of the previous release, as (name, value, start, end) tuples."""
    fields: list[object] = []
    name, value_start, value_end, start = "", 0, 0, -1
    count = used = 0
    pos, size = 0, len(raw)
    while pos < size:
        match = _LINE_END.search(raw, pos)
        line_end, next_pos = (match.start(), match.end()) if match else (size, size)
        if line_end == pos:
            size = next_pos
            break
        if raw[pos] not in b" \t" or start < 0:
            if start >= 0:
                fields.append((name, raw[value_start:value_end], start, pos))
            found = _FIELD_NAME.match(raw, pos, line_end)
            name = found.group(1).decode("ascii") if found else ""
            value_start, start = (found.end() if found else pos), pos
            count += 1 if found else 0
        value_end = line_end
        used += next_pos - pos if name else 0
        if count > max_fields:
            return ["fields"]
        if used > max_bytes:
            return ["bytes"]
        if not name:
            value_end = _JUNK_RUN.match(raw, pos).end()  # type: ignore[union-attr]
            next_pos = min(size, value_end + (2 if raw.startswith(b"\r\n", value_end) else 1))
        pos = next_pos
    if start >= 0:
        fields.append((name, raw[value_start:value_end], start, pos))
    return [*fields, size]


def scanned(raw: bytes, max_fields: int, max_bytes: int) -> list[object]:
    try:
        section: HeaderSection = scan_headers(raw, max_fields=max_fields, max_bytes=max_bytes)
    except MessageError as exc:
        return ["fields" if "fields" in str(exc) else "bytes"]
    for field in section.fields:
        assert field.key == field.name.lower()
    return [(f.name, f.value, f.start, f.end) for f in section.fields] + [section.body_start]


_TEXTS = [b"Subject: hi", b"Bcc :x", b"To:", b"X-A: 1", b" folded", b"\tfolded", b"junk"]
_TEXTS += [b"a b: c", b":", b" ", b"From x", b"\xe9: v", b"body"]
_PIECES = st.sampled_from([*_TEXTS, b"\r\n", b"\n", b"\r", b"\r\n", b"\n"])


@settings(max_examples=4000, deadline=None)
@given(st.lists(_PIECES, max_size=16), st.integers(1, 6), st.integers(5, 80))
@example([b" lead", b"\r\n", b"To: a", b"\r", b"\n", b" x", b"\r\n", b"\r\n", b"body"], 9, 999)
@example([b"Subject: a", b"\r", b" b", b"\r", b"\r\n"], 9, 999)
def test_same_split_as_the_line_by_line_scan(
    pieces: list[bytes], max_fields: int, max_bytes: int
) -> None:
    raw = b"".join(pieces)
    assert scanned(raw, max_fields, max_bytes) == reference(raw, max_fields, max_bytes)
    assert scanned(raw, 10**6, 10**9) == reference(raw, 10**6, 10**9)


def test_same_split_on_the_corpus() -> None:
    for path in sorted(CORPUS.glob("*/*")):
        if path.is_file() and path.parent.name != "licenses":
            raw = path.read_bytes()
            for limits in ((10**6, 10**9), (5, 300)):
                assert scanned(raw, *limits) == reference(raw, *limits), path
