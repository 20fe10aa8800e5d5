"""Text decoding for the MIME parser: charsets with fallbacks, RFC 2047 encoded-words, cleaning
of single-line fields and attachment filenames. Pure functions that never raise on bad input.
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import re

# Labels seen in real mail that Python does not know, or knows as a narrower charset than the
# one senders actually use (the WHATWG Encoding Standard maps them the same way).
_CHARSET_ALIASES = {
    "iso-8859-8-i": "iso-8859-8",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "x-sjis": "shift_jis",
    "unicode-1-1-utf-7": "utf-7",
}
# Codecs Python accepts as text encodings that are no MIME charset; punycode is also quadratic.
_DENIED_CODECS = frozenset(
    {"punycode", "idna", "unicode-escape", "raw-unicode-escape", "undefined", "mbcs", "oem"}
)
_MAX_CHARSET_LEN = 64


def codec_for(charset: str | None) -> str | None:
    """The Python codec for a MIME charset label, or None when unknown or unsuitable."""
    if not charset:
        return None
    label = charset.strip().strip("\"'").lower()
    if not label or len(label) > _MAX_CHARSET_LEN:
        return None
    label = _CHARSET_ALIASES.get(label, label)
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError, TypeError):  # TypeError/ValueError: a label with NUL
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _DENIED_CODECS:
        return None
    return info.name


def without_surrogates(text: str) -> str:
    """``text`` safe to encode as UTF-8 (a UTF-7 or UTF-16 body can decode to lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def decode_bytes(data: bytes, charset: str | None = None) -> str:
    """Decode ``data`` with the declared charset, falling back rather than raising.

    Order: declared charset (strict), UTF-8 (strict; RFC 6532 makes undeclared 8-bit text most
    often UTF-8), the declared charset with replacement, and finally latin-1, which maps every
    byte. An unknown or bogus label, or us-ascii on 8-bit data, counts as undeclared.
    """
    codec = codec_for(charset)
    if codec is not None:
        with contextlib.suppress(ValueError, LookupError):  # UnicodeDecodeError is a ValueError
            return without_surrogates(data.decode(codec))
    if codec == "ascii":  # 8-bit data labelled us-ascii (the RFC 2045 default): label is wrong
        codec = None
    with contextlib.suppress(UnicodeDecodeError):
        return data.decode("utf-8")
    if codec is not None:
        # ValueError: a codec without "replace" support
        with contextlib.suppress(ValueError, LookupError):
            return without_surrogates(data.decode(codec, "replace"))
    return data.decode("latin-1")


def text_from_header(value: str | bytes) -> str:
    """A header value as text: bytes (or surrogate-escaped str) decoded as UTF-8 or latin-1."""
    if value.isascii():  # most header values: ASCII reads the same in every fallback
        return value if isinstance(value, str) else value.decode("ascii")
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    return decode_bytes(value)


# RFC 5322 §2.2.3: unfolding removes a line break that is followed by white space.
_FOLD = re.compile(r"(?:\r\n|\r|\n)(?=[ \t])")


def unfold(value: str) -> str:
    if "\n" not in value and "\r" not in value:
        return value
    return _FOLD.sub("", value)


# RFC 2047 §2: encoded-word = "=?" charset "?" encoding "?" encoded-text "?=". The classes never
# cross "?", so matching stays linear even for long runs of "=?" (email.header's pattern is lazy
# and can go quadratic). Spaces inside encoded-text are tolerated because mailers emit them.
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/]")


def _decode_word(encoding: str, text: str) -> bytes | None:
    try:
        if encoding in "qQ":
            # RFC 2047 §4.2: "_" is a space; a2b_qp(header=True) does exactly that.
            return binascii.a2b_qp(text.encode("utf-8", "surrogateescape"), header=True)
        data = _NOT_BASE64.sub("", text)
        if len(data) % 4 == 1:  # one dangling sextet carries no whole byte
            data = data[:-1]
        if not data and text.strip("= "):
            return None  # nothing of base64 in it: keep the word as written
        return binascii.a2b_base64(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        return None


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded-words in an unstructured value; never raises.

    Adjacent words in the same charset are joined before decoding, so a multi-byte character
    split across two words (common, though RFC 2047 §5 forbids it) survives. White space between
    two encoded-words is dropped (RFC 2047 §6.2). Undecodable words stay as they were.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending: list[bytes] = []  # consecutive encoded-words in pending_charset
    pending_charset = ""
    pos = 0
    for match in _ENCODED_WORD.finditer(value):
        between = value[pos : match.start()]
        pos = match.end()
        charset = match.group(1).split("*", 1)[0].lower()  # RFC 2231 §5: charset*language
        data = _decode_word(match.group(2), match.group(3))
        adjacent = bool(pending) and (not between or between.isspace())
        if data is not None and adjacent and charset == pending_charset:
            pending.append(data)
            continue
        if pending:
            out.append(decode_bytes(b"".join(pending), pending_charset))
            pending.clear()
        if not adjacent:
            out.append(between)
        if data is None:
            out.append(match.group(0))
        else:
            pending.append(data)
            pending_charset = charset
    if pending:
        out.append(decode_bytes(b"".join(pending), pending_charset))
    out.append(value[pos:])
    return "".join(out)


# Line breaks of every kind become spaces, other C0/C1 controls disappear: a decoded subject
# ("=?utf-8?q?a=0D=0ABcc:_x?=") must never be able to start a header line downstream.
_LINE_BREAKS = re.compile("\r\n|[\t\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")


def clean_line(value: str) -> str:
    """A single-line field: no CR/LF or other control characters, no edge white space."""
    # Both patterns and lone surrogates match only non-printable characters (Cc, Zl, Zp, Cs).
    if value.isprintable():
        return value.strip()
    value = _LINE_BREAKS.sub(" ", value)
    return without_surrogates(_CONTROLS.sub("", value)).strip()


def header_text(value: str | bytes, *, encoded_words: bool = True) -> str:
    """A raw header value as one clean line: 8-bit decoded, unfolded, RFC 2047 decoded."""
    text = unfold(text_from_header(value))
    if encoded_words:
        text = decode_words(text)
    return clean_line(text)


# Bidirectional overrides let "gpj.exe" display as "exe.jpg" (CVE-2021-42574 style spoofing).
_BIDI = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069]")
MAX_FILENAME = 200
_MAX_EXTENSION = 16
_EXTENSIONS = {
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/csv": ".csv",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "application/pdf": ".pdf",
    "application/zip": ".zip",
    "message/rfc822": ".eml",
    "message/global": ".eml",
}


def default_filename(index: int, content_type: str) -> str:
    if content_type in ("message/rfc822", "message/global"):
        return f"message-{index}.eml"
    return f"attachment-{index}{_EXTENSIONS.get(content_type, '.bin')}"


def sanitize_filename(name: str | None, index: int, content_type: str) -> str:
    """A filename safe to hand to any API or file system, or ``attachment-N.ext``.

    No path (the last POSIX or Windows component is kept), no control or bidi characters, no
    leading dots (hidden files, ".."), no trailing dots or spaces (Windows drops them), at most
    ``MAX_FILENAME`` characters with the extension kept.
    """
    cleaned = _BIDI.sub("", clean_line(name or ""))
    cleaned = cleaned.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = cleaned.strip().lstrip(".").rstrip(". ").strip()
    if len(cleaned) > MAX_FILENAME:
        stem, dot, ext = cleaned.rpartition(".")
        if dot and stem and len(ext) < _MAX_EXTENSION:
            cleaned = stem[: MAX_FILENAME - len(ext) - 1].rstrip(". ") + "." + ext
        else:
            cleaned = cleaned[:MAX_FILENAME].rstrip(". ")
    return cleaned or default_filename(index, content_type)
