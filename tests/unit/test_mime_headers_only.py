"""The headers-only parse (routes whose providers all take raw MIME): the same header-derived
message as the full parse, without bodies or attachments, for every corpus file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from smtp2api.errors import MessageError
from smtp2api.mime import parse_with_controls
from tests.unit.test_mime import CORPUS_FILES, ENVELOPE, RECEIVED

BODY_FIELDS = {"text": None, "html": None, "attachments": ()}


def test_corpus_is_there() -> None:
    assert len(CORPUS_FILES) > 100


@pytest.mark.timeout(20)
@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_same_message_without_the_body(path: Path) -> None:
    raw = path.read_bytes()
    try:
        full, full_controls = parse_with_controls(raw, ENVELOPE, "msg-1", received=RECEIVED)
    except MessageError:
        return  # a body the full parse refuses; the header scan may still take it
    lazy, lazy_controls = parse_with_controls(
        raw, ENVELOPE, "msg-1", received=RECEIVED, headers_only=True
    )
    assert lazy_controls == full_controls
    assert lazy == dataclasses.replace(full, **BODY_FIELDS)
    assert lazy.raw == full.raw  # what a raw-MIME provider sends is byte for byte the same


def test_headers_only_skips_the_body_parse() -> None:
    # A body the full parse refuses (too deep): a raw-MIME provider gets it as written.
    nested = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(30)
    )
    raw = b"From: a@example.com\r\nTo: test@example.com\r\nSubject: deep\r\n" + nested
    with pytest.raises(MessageError):
        parse_with_controls(raw, ENVELOPE, "msg-1")
    message, _ = parse_with_controls(raw, ENVELOPE, "msg-1", headers_only=True)
    assert (message.subject, message.attachments, message.text) == ("deep", (), None)
