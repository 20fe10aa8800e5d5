"""The top-level header section, read straight from the bytes: field spans (so Bcc and control
headers can be cut out of the raw message without re-serialising it) and address lists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smtp2api.errors import MessageError
from smtp2api.mime_text import clean_line, decode_words, header_text

_LINE_END = re.compile(rb"\r\n|\r|\n")  # bare CR and LF count too, as in email.feedparser
# A whole field: the RFC 5322 §3.6.8 name (printable ASCII but ":"), with the obsolete white
# space before the colon (§4.5.1) accepted so that "Bcc :" is recognised, and removed, like
# "Bcc:"; then the value with its folded lines (a line starting with SP or HTAB continues the
# field, §2.2.3), up to and including the final line break.
_FIELD_LINES = re.compile(
    rb"([\x21-\x39\x3b-\x7e]++)[ \t]*+:"
    rb"([^\r\n]*+(?:(?:\r\n|\r|\n)[ \t][^\r\n]*+)*+)(?:\r\n|\r|\n)?"
)
# A junk line and every following line that is neither a field nor the empty line, matched at
# once (possessive: no backtracking): a message without the empty line would otherwise cost a
# Python loop turn per body line. Line breaks split as _LINE_END splits them.
_JUNK_RUN = re.compile(
    rb"[^\r\n]*+(?:(?:\r\n|\r(?!\n)|\n)(?![\r\n]|[\x21-\x39\x3b-\x7e]++[ \t]*+:)[^\r\n]*+)*+"
)


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One field of the header section; ``raw[start:end]`` is the field with its line breaks."""

    name: str  # as written; "" for a line that is not a field (kept in raw, ignored otherwise)
    value: bytes  # after the colon, folding included, final line break excluded
    start: int
    end: int
    key: str  # name.lower(), looked up many times per message

    def text(self, *, encoded_words: bool = True) -> str:
        return header_text(self.value, encoded_words=encoded_words)


@dataclass(frozen=True, slots=True)
class HeaderSection:
    fields: tuple[HeaderField, ...]
    body_start: int  # just after the empty line; len(raw) when there is none

    def all(self, key: str) -> list[HeaderField]:
        return [f for f in self.fields if f.key == key]

    def first(self, key: str) -> HeaderField | None:
        return next((f for f in self.fields if f.key == key), None)


def scan_headers(raw: bytes, *, max_fields: int, max_bytes: int) -> HeaderSection:
    """Split the header section (up to the first empty line, RFC 5322 §2.1) into fields.

    The section ends at the first empty line only, not at the first malformed line as
    email.feedparser does: a ``Bcc:`` after a junk line is still found and removed, whatever a
    downstream parser makes of the junk. Junk lines (no field name) do not count toward the
    limits, so a message that lacks the empty line is not rejected for the size of its body.
    """
    fields: list[HeaderField] = []
    count = used = 0  # fields with a name, and their bytes
    pos, size = 0, len(raw)
    while pos < size:
        if raw[pos] in b"\r\n":  # the empty line
            size = pos + (2 if raw.startswith(b"\r\n", pos) else 1)
            break
        found = _FIELD_LINES.match(raw, pos)
        if found is None:  # junk and what follows it, up to the next field or the empty line
            value_end = _JUNK_RUN.match(raw, pos).end()  # type: ignore[union-attr]
            end = min(size, value_end + (2 if raw.startswith(b"\r\n", value_end) else 1))
            fields.append(HeaderField("", raw[pos:value_end], pos, end, ""))
        else:
            end = found.end()
            count += 1
            used += end - pos
            if count > max_fields:
                raise MessageError(f"more than {max_fields} header fields")
            if used > max_bytes:
                raise MessageError(f"header section larger than {max_bytes} bytes")
            name = found.group(1).decode("ascii")
            fields.append(HeaderField(name, found.group(2), pos, end, name.lower()))
        pos = end
    return HeaderSection(tuple(fields), size)


def without_fields(raw: bytes, fields: list[HeaderField]) -> bytes:
    """``raw`` with the byte spans of ``fields`` cut out; every other byte unchanged."""
    if not fields:
        return raw
    pieces: list[bytes] = []
    pos = 0
    for field in sorted(fields, key=lambda f: f.start):
        pieces.append(raw[pos : field.start])
        pos = field.end
    pieces.append(raw[pos:])
    return b"".join(pieces)


# Address lists (RFC 5322 §3.4), parsed here rather than with email.utils.getaddresses, whose
# results differ between CPython patch releases (CVE-2023-27043) and which recurses on nested
# comments. Tokens: quoted string (maybe unterminated), quoted pair, special, run of the rest.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|\\.?|[()<>,;:]|[^"()<>,;:\\]+', re.DOTALL)
_SPACES = re.compile(r"\s+")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_ATOMS = r'[^\s"@<>()\[\],;:\\]+'
_ADDR_SPEC = re.compile(rf'(?:"(?:[^"\\]|\\.)*"|{_ATOMS})@(?:{_ATOMS}|\[[^\[\]\\\s]*\])', re.DOTALL)


def _addr(tokens: list[str]) -> str | None:
    """An addr-spec from its tokens (CFWS dropped), or None unless exactly one valid one."""
    text = "".join(t if t.startswith('"') else _SPACES.sub("", t) for t in tokens)
    if text.startswith("@") and ":" in text:  # obs-route "<@a,@b:user@c>" (RFC 5322 §4.4)
        text = text.split(":", 1)[1]
    return text if _ADDR_SPEC.fullmatch(text) else None


def _phrase(tokens: list[str]) -> str:
    words = [
        _QUOTED_PAIR.sub(r"\1", t[1:-1] if t.endswith('"') and len(t) > 1 else t[1:])
        if t.startswith('"')
        else t
        for t in tokens
    ]
    return clean_line(decode_words(_SPACES.sub(" ", "".join(words))))


class _MailboxBuilder:
    """Accumulates the tokens of one mailbox while scanning an address list."""

    def __init__(self) -> None:
        self.phrase: list[str] = []
        self.angle: list[str] | None = None
        self.comments: list[str] = []
        self.ambiguous = False  # a second angle-addr: which one was meant?

    def result(self) -> tuple[str, str | None] | None:
        if not (self.phrase or self.angle is not None or self.comments):
            return None
        if self.angle is not None:
            addr = None if self.ambiguous else _addr(self.angle)
            return (_phrase(self.phrase) or _phrase(self.comments), addr)
        if not "".join(self.phrase).strip():
            return None
        return (_phrase(self.comments), _addr(self.phrase))  # "user@host (Name)"


class _AddressListScanner:
    """Feeds tokens of an address list into mailboxes, tracking comments and angle-addrs."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str | None]] = []
        self.box = _MailboxBuilder()
        self.depth = 0  # comment nesting (RFC 5322 §3.2.2), counted instead of recursed
        self.in_angle = False

    def feed(self, piece: str) -> None:
        if self.depth:
            self.depth += {"(": 1, ")": -1}.get(piece, 0)
            if self.depth:
                self.box.comments.append(piece)
        elif piece == "(":
            self.depth = 1
            self.box.comments.append(" ")
        elif self.in_angle:
            self.in_angle = piece != ">"
            if self.in_angle and self.box.angle is not None:
                self.box.angle.append(piece)
        else:
            self._top_level(piece)

    def _top_level(self, piece: str) -> None:
        if piece == "<":
            self.in_angle = True
            self.box.ambiguous |= self.box.angle is not None
            self.box.angle = []
        elif piece in (",", ";"):
            self.finish()
        elif piece == ":":  # the display name of a group: drop it, keep its members
            self.box.phrase.clear()
        elif piece != ">":
            self.box.phrase.append(piece)

    def finish(self) -> None:
        result = self.box.result()
        if result is not None:
            self.found.append(result)
        self.box = _MailboxBuilder()


# The everyday mailbox shapes, which the scanner above reads one token at a time: "addr",
# "<addr>", "Name <addr>" and '"Name" <addr>', with a dot-atom address (RFC 5322 §3.4.1, a
# subset of what _ADDR_SPEC takes) and nothing but spaces around (header_text has turned every
# other white space into spaces or removed it). Anything else goes to the scanner.
_DOT_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]++(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]++)*+"
_PLAIN_ADDR = rf"{_DOT_ATOM}@{_DOT_ATOM}"
_SIMPLE_MAILBOX = re.compile(
    rf"( *+)(?:\"([ !#-\[\]-~]*+)\"( *+)<({_PLAIN_ADDR})>"  # '"Name" <addr>'
    rf"|([!#-'*+\--9=?-Z\[\]^-~][ !#-'*+\--9=?-Z\[\]^-~]*+)?<({_PLAIN_ADDR})>"  # Name <addr>
    rf"|({_PLAIN_ADDR}))( *+)"  # addr
)


def _display_name(text: str) -> str:
    # What _phrase makes of the same text as tokens (no quoted pair to undo in it).
    return clean_line(decode_words(_SPACES.sub(" ", text)))


def _simple_mailboxes(text: str) -> list[tuple[str, str | None]] | None:
    """``parse_mailboxes`` for a list of everyday mailboxes, or None for anything else."""
    found: list[tuple[str, str | None]] = []
    pos, size = 0, len(text)
    while True:
        match = _SIMPLE_MAILBOX.match(text, pos)
        if match is None:
            return None
        lead, quoted, mid, addr, name, named_addr, bare, tail = match.groups()
        if bare is not None:
            found.append(("", bare))
        elif named_addr is not None:
            found.append((_display_name(lead + (name or "") + tail), named_addr))
        else:
            found.append((_display_name(lead + quoted + mid + tail), addr))
        pos = match.end()
        if pos == size:
            return found
        if text[pos] != ",":
            return None
        pos += 1


def parse_mailboxes(value: bytes) -> list[tuple[str, str | None]]:
    """The mailboxes of an address-list field as ``(display name, addr-spec or None)``.

    Group names are dropped and group members kept (RFC 5322 §3.4); a mailbox whose address is
    not exactly one valid addr-spec (``a@x@y``, two angle-addrs) keeps its place with None.
    """
    text = header_text(value, encoded_words=False)
    simple = _simple_mailboxes(text)
    if simple is not None:
        return simple
    scanner = _AddressListScanner()
    for piece in _TOKEN.findall(text):
        scanner.feed(piece)
    scanner.finish()
    return scanner.found
