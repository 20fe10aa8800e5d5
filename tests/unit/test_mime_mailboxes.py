"""``parse_mailboxes`` reads everyday address lists with one regex (``_simple_mailboxes``) and
everything else with the token scanner: where the regex takes a list, both must agree."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from smtp2api.mime_headers import (
    _TOKEN,
    _AddressListScanner,
    _simple_mailboxes,
    parse_mailboxes,
    scan_headers,
)
from smtp2api.mime_text import header_text

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(os.environ.get("SMTP2API_SHARED", REPO.parent / "shared")) / "mime-corpus"
ADDRESS_FIELDS = {"from", "sender", "reply-to", "to", "cc", "bcc", "resent-to", "resent-from"}


def scanned(text: str) -> list[tuple[str, str | None]]:
    scanner = _AddressListScanner()
    for piece in _TOKEN.findall(text):
        scanner.feed(piece)
    scanner.finish()
    return scanner.found


def agree(value: bytes) -> bool:
    text = header_text(value, encoded_words=False)
    simple = _simple_mailboxes(text)
    if simple is not None:
        assert simple == scanned(text), text
    assert parse_mailboxes(value) == scanned(text)
    return simple is not None


_SPECIALS = [" ", "  ", "\t", ",", ";", ":", "<", ">", '"', "\\", "(", ")", "@", ".", "[", "]"]
_WORDS = ["a", "Bo", "x@y.example", "a.b@c-d.example", "<u@h.example>", '"Q Name"', "\u00e9"]
_WORDS += [
    "=?utf-8?q?J=C3=B6rg?=",
    "=?utf-8?b?SsO2cmc=?=",
    "\u00a0",
    "\r\n ",
    "=?x?q?a?= =?x?q?b?=",
]
_PIECES = st.sampled_from(_SPECIALS + _WORDS)


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PIECES, max_size=10))
@example(['"Bench Sender"', " ", "<u@h.example>"])
@example(["Foo Bar ", "<u@h.example>", "  ", ",", " ", "x@y.example"])
@example(["=?utf-8?q?J=C3=B6rg?=", " ", "<u@h.example>"])
@example(['"a\\"b"', " ", "<u@h.example>"])
@example(['"a\\\\b"', " ", "<u@h.example>"])
@example(['"Bo\\ Jo"', "<u@h.example>"])
@example(["x@y.example", ",", ",", "x@y.example"])
def test_the_regex_and_the_scanner_agree(pieces: list[str]) -> None:
    agree("".join(pieces).encode("utf-8"))


_SPACE = st.sampled_from(["", "", " ", "  ", "\t", "\r\n "])
_NAME = st.lists(
    st.sampled_from([*_WORDS[:2], "O'Neil", "=?utf-8?q?J=C3=B6rg?=", "a@b", "[x]", "\\"])
)
_ADDR = st.sampled_from(["x@y.example", "a.b@c-d.example", "u+tag@h.example", "a..b@c", "a@b@c"])


@st.composite
def mailbox(draw: st.DrawFn) -> str:
    addr = draw(_ADDR)
    name = " ".join(draw(_NAME))
    shape = draw(st.sampled_from(["bare", "angle", "named", "quoted"]))
    text = {
        "bare": addr,
        "angle": f"<{addr}>",
        "named": f"{name}{draw(_SPACE)}<{addr}>",
        "quoted": f'"{name}"{draw(_SPACE)}<{addr}>',
    }[shape]
    return draw(_SPACE) + text + draw(_SPACE)


@st.composite
def address_list(draw: st.DrawFn) -> str:
    text = ",".join(draw(st.lists(mailbox(), min_size=1, max_size=3)))
    if draw(st.booleans()):  # one foreign piece somewhere
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(_PIECES) + text[at:]
    return text


@settings(max_examples=3000, deadline=None)
@given(address_list())
def test_the_regex_and_the_scanner_agree_on_near_everyday_lists(text: str) -> None:
    agree(text.encode("utf-8"))


def test_everyday_shapes_take_the_regex() -> None:
    for value in (
        b'"Bench Sender" <bench@example.com>',
        b" <rcpt@example.net>",
        b'a@b.example, Foo Bar <c@d.example>,\r\n "X, Y" <e@f.example>',
        b"=?utf-8?q?J=C3=B6rg?= <j@x.example>",
    ):
        assert agree(value)


def test_corpus_address_fields_agree() -> None:
    taken = total = 0
    for path in sorted(CORPUS.glob("*/*")):
        if path.parent.name == "licenses" or not path.is_file():
            continue
        section = scan_headers(path.read_bytes(), max_fields=10**6, max_bytes=10**9)
        for field in section.fields:
            if field.key in ADDRESS_FIELDS:
                total += 1
                taken += agree(field.value)
    assert total == 0 or taken > total // 2
