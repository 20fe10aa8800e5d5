"""MIME surgery for the ``graph`` provider: recipients from the envelope, large parts set aside.

Graph reads the recipients of a MIME message from its To/Cc/Bcc header fields; it has no
envelope. ``address_to_envelope`` rewrites those fields so Exchange delivers to exactly the
envelope recipients (design §2). ``detach_large_parts`` cuts attachments out of a message too
large for one Graph request, to be added to a draft one by one. Both work on the raw bytes and
leave every other byte as it was.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import quopri
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message as HeaderBlock

from smtp2api.mime_headers import HeaderField, parse_mailboxes, scan_headers
from smtp2api.mime_text import decode_words, sanitize_filename

_ANY = 1 << 30  # limits already enforced by the intake; scan_headers just needs numbers
_MAX_DEPTH = 20
# RFC 5322 §3.2.3 atext plus the space between words: a phrase that needs no quoting. "=?"
# is excluded too: a literal "=?" would be taken for an RFC 2047 encoded-word.
_PLAIN_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ ]+")
_WORD_BYTES = 45  # UTF-8 bytes per encoded-word: 60 base64 characters, 75 with the wrapper
_RECIPIENT_FIELDS = ("to", "cc")
# multipart/signed (RFC 1847 §2.1, S/MIME, PGP/MIME) and multipart/encrypted: opaque wholes.
_SEALED = frozenset({"signed", "encrypted"})
# Header parsing of MIME parts only (Content-Type parameters, RFC 2231 filenames); compat32
# keeps values as written.
_PART_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def b64_size(size: int) -> int:
    """Length of the base64 of ``size`` bytes, without line breaks (RFC 4648 §4)."""
    return 4 * ((size + 2) // 3)


# --- recipients ------------------------------------------------------------------------------


def _encoded_words(text: str) -> list[str]:
    """RFC 2047 §4.1 B-encoded words of at most 75 characters, split between characters."""
    words: list[str] = []
    chunk = ""
    for char in text:
        if len((chunk + char).encode("utf-8")) > _WORD_BYTES:
            words.append(chunk)
            chunk = ""
        chunk += char
    words.append(chunk)
    return [f"=?utf-8?b?{base64.b64encode(w.encode('utf-8')).decode('ascii')}?=" for w in words]


def format_mailbox(name: str, addr: str, linesep: str) -> str:
    """``addr`` or ``phrase <addr>`` (RFC 5322 §3.4), the phrase quoted or encoded as needed."""
    if not name:
        return addr
    if not name.isascii():
        return f"{(linesep + ' ').join(_encoded_words(name))} <{addr}>"
    if _PLAIN_PHRASE.fullmatch(name) and "=?" not in name:
        return f"{name} <{addr}>"
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" <{addr}>'


def _field(name: str, mailboxes: list[tuple[str, str]], linesep: str) -> bytes:
    # Folded after each comma (RFC 5322 §3.2.2 folding white space): lines stay short.
    joined = f",{linesep} ".join(format_mailbox(n, a, linesep) for n, a in mailboxes)
    return f"{name}: {joined}{linesep}".encode()


def address_to_envelope(raw: bytes, rcpt_tos: Sequence[str]) -> bytes:
    """``raw`` with To/Cc/Bcc naming exactly ``rcpt_tos``, each once.

    To and Cc keep the envelope recipients they name, with their display names, in their
    order; header-only addresses are dropped from them (they would otherwise receive the
    message). The envelope recipients they do not name go into a ``Bcc:`` field, which
    Exchange turns into blind-copy recipients and does not show to anyone. When To and Cc name
    only envelope recipients they are kept byte for byte.
    """
    section = scan_headers(raw, max_fields=_ANY, max_bytes=_ANY)
    head = raw[: section.body_start]
    linesep = "\r\n" if b"\r\n" in head else "\n"
    wanted: dict[str, str] = {}
    for rcpt in rcpt_tos:
        wanted.setdefault(rcpt.lower(), rcpt)
    seen: set[str] = set()
    kept: dict[str, list[tuple[str, str]]] = {key: [] for key in _RECIPIENT_FIELDS}
    rewrite = False
    for field in section.fields:
        if field.key not in _RECIPIENT_FIELDS:
            continue
        for name, addr in parse_mailboxes(field.value):
            key = addr.lower() if addr else ""
            if key in wanted and key not in seen:
                seen.add(key)
                kept[field.key].append((name, addr or ""))
            else:  # header-only, unparsable or repeated: not to be delivered again
                rewrite = True
    blind = [("", addr) for key, addr in wanted.items() if key not in seen]
    cut = [f for f in section.fields if f.key == "bcc" or (rewrite and f.key in kept)]
    added = b""
    if rewrite:
        added += b"".join(
            _field(name.capitalize(), kept[name], linesep)
            for name in _RECIPIENT_FIELDS
            if kept[name]
        )
    if blind:
        added += _field("Bcc", blind, linesep)
    return _splice(raw, section.fields, cut, added)


def _splice(
    raw: bytes, fields: Sequence[HeaderField], cut: list[HeaderField], added: bytes
) -> bytes:
    """``raw`` without the ``cut`` fields, ``added`` in the place of the first one cut (else
    after the last field, before the empty line that ends the header section)."""
    if not cut and not added:
        return raw
    at = cut[0].start if cut else (fields[-1].end if fields else 0)
    pieces: list[bytes] = []
    pos = 0
    for field in cut:
        pieces.append(raw[pos : field.start])
        if field.start == at:
            pieces.append(added)
        pos = field.end
    if not cut:
        pieces += [raw[:at], added]
        pos = at
    pieces.append(raw[pos:])
    return b"".join(pieces)


# --- large parts -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Detached:
    """An attachment cut out of the MIME, as Graph's fileAttachment / AttachmentItem takes it."""

    name: str
    content_type: str
    content: bytes  # transfer encoding undone
    inline: bool
    content_id: str | None


@dataclass(frozen=True, slots=True)
class _Leaf:
    start: int  # the span cut out: the part's delimiter line (and its leading line break) ...
    end: int  # ... up to the line break before the next delimiter
    parent: int  # start of the multipart that holds it
    delimiter: bytes  # b"--boundary"
    newline: bytes  # the line break before the delimiter, b"" at the start of the body
    headers: HeaderBlock
    body: tuple[int, int]  # content after the part's header section
    related: bool  # a part of multipart/related (RFC 2387): what a Content-ID points into


# Where a part sits: (cut start, delimiter, line break before it, parent, parent is related)
_Slot = tuple[int, bytes, bytes, int, bool]


class _Tree:
    """The attachable leaves of a message and how many children each multipart has."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.leaves: list[_Leaf] = []
        self.children: dict[int, int] = {}
        self._walk(0, len(raw), None, 0)

    def _walk(self, start: int, end: int, slot: _Slot | None, depth: int) -> None:
        section = scan_headers(self.raw[start:end], max_fields=_ANY, max_bytes=_ANY)
        headers = _PART_HEADERS.parsebytes(self.raw[start : start + section.body_start])
        body = start + section.body_start
        boundary = (
            headers.get_param("boundary") if headers.get_content_maintype() == "multipart" else None
        )
        if headers.get_content_subtype() in _SEALED:
            return  # cutting anything out would break the signature: left whole
        if isinstance(boundary, str) and boundary and depth < _MAX_DEPTH:
            related = headers.get_content_subtype() == "related"
            self._multipart(body, end, boundary.encode("utf-8", "surrogateescape"), depth, related)
        elif slot is not None and _attachable(headers):
            cut_start, delimiter, newline, parent, related = slot
            self.leaves.append(
                _Leaf(cut_start, end, parent, delimiter, newline, headers, (body, end), related)
            )

    def _multipart(self, lo: int, hi: int, boundary: bytes, depth: int, related: bool) -> None:
        """RFC 2046 §5.1.1: a delimiter is CRLF "--" boundary at the start of a line; the CRLF
        before it belongs to the delimiter, not to the part before."""
        tail = rb"(--)?[ \t]*(?=\r?\n|\Z)"
        first = re.compile(b"--" + re.escape(boundary) + tail)
        later = re.compile(rb"\r?\n--" + re.escape(boundary) + tail)
        found = [m for m in (first.match(self.raw, lo, hi),) if m] + list(
            later.finditer(self.raw, lo, hi)
        )
        self.children[lo] = 0
        for index, match in enumerate(found):
            if match.group(1):  # the close delimiter: the epilogue follows
                break
            content = match.end()
            content += (
                2
                if self.raw.startswith(b"\r\n", content)
                else int(self.raw.startswith(b"\n", content))
            )
            stop = found[index + 1].start() if index + 1 < len(found) else hi
            newline = self.raw[match.start() : match.start() + 2].rstrip(b"-")
            self.children[lo] += 1
            slot = (match.start(), b"--" + boundary, newline, lo, related)
            self._walk(content, max(content, stop), slot, depth + 1)


def _attachable(headers: HeaderBlock) -> bool:
    """A leaf that is an attachment rather than a body: named, or marked so, or not text."""
    return bool(
        headers.get_content_maintype() != "text"
        or headers.get_content_disposition() == "attachment"
        or headers.get_filename()
    )


def _decoded(raw: bytes, leaf: _Leaf) -> bytes | None:
    data = raw[leaf.body[0] : leaf.body[1]]
    encoding = str(leaf.headers.get("content-transfer-encoding", "")).strip().lower()
    try:
        if encoding == "base64":
            return binascii.a2b_base64(data)  # lenient: skips line breaks and stray characters
        if encoding == "quoted-printable":
            return quopri.decodestring(data)
    except (binascii.Error, ValueError):
        return None  # undecodable: left in the MIME for Exchange to judge
    return data


def _describe(leaf: _Leaf, content: bytes, index: int) -> Detached:
    headers = leaf.headers
    content_type = headers.get_content_type()
    raw_name = headers.get_filename() or headers.get_param("name")
    name = sanitize_filename(
        decode_words(raw_name) if isinstance(raw_name, str) else None, index, content_type
    )
    content_id = str(headers.get("content-id", "")).strip().strip("<>").strip() or None
    disposition = headers.get_content_disposition()
    # Outlook marks embedded images inline; senders differ in how they say so.
    inline = disposition == "inline" or (
        content_id is not None and (disposition is None or leaf.related)
    )
    return Detached(name, content_type, content, inline, content_id)


def detach_large_parts(raw: bytes, budget: int) -> tuple[bytes, list[Detached]] | None:
    """``raw`` without its largest attachments, so its base64 fits ``budget``; None if it
    cannot (the bulk is not in attachments). Attachments come back in document order.

    A multipart left with no part at all gets an empty text/plain part instead of the last
    one cut, so the structure stays valid (RFC 2046 §5.1.1 wants at least one body part).
    """
    tree = _Tree(raw)
    size = len(raw)
    chosen: list[tuple[_Leaf, bytes]] = []
    for leaf in sorted(tree.leaves, key=lambda x: x.end - x.start, reverse=True):
        if b64_size(size) <= budget:
            break
        content = _decoded(raw, leaf)
        if content is not None:
            chosen.append((leaf, content))
            size -= leaf.end - leaf.start
    if b64_size(size) > budget:
        return None
    chosen.sort(key=lambda pair: pair[0].start)
    emptied: dict[int, _Leaf] = {}  # multipart -> its last part, when every part is cut
    for parent, count in tree.children.items():
        parts = [leaf for leaf, _ in chosen if leaf.parent == parent]
        if parts and len(parts) == count:
            emptied[parent] = parts[-1]
    linesep = b"\r\n" if b"\r\n" in raw[:4096] else b"\n"
    pieces: list[bytes] = []
    pos = 0
    for leaf, _ in chosen:
        pieces.append(raw[pos : leaf.start])
        if emptied.get(leaf.parent) is leaf:
            placeholder = b"Content-Type: text/plain; charset=us-ascii" + linesep
            pieces.append(leaf.newline + leaf.delimiter + linesep + placeholder + linesep)
        pos = leaf.end
    pieces.append(raw[pos:])
    detached = [_describe(leaf, content, i) for i, (leaf, content) in enumerate(chosen, 1)]
    return b"".join(pieces), detached
