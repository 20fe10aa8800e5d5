"""Raw bytes -> the bounded compat32 part tree that ``mime_parts.walk`` reads.

Two ways to the same tree. ``email.feedparser`` reads the whole message as surrogate-escaped
text, line by line in Python: it costs a function call per body line, and for one large base64
attachment about 7.7 times the message in memory (the text, its lines, the payload, its bytes
again, its lines again). The splitter here builds the identical tree for messages inside a
strict subset (every header block well formed and ended by an empty line, each multipart with
a boundary, an opening and a closing delimiter line, no ``message/*`` part) with
``bytes.find`` and a few regexes, and leaves each leaf's body where it is, in the raw bytes.
Anything outside the subset goes to feedparser, whose behaviour (RFC 2046 §5.1.1 boundaries,
the line break before a delimiter belonging to it, outer boundaries ending inner parts) the
splitter follows line for line: ``tests/unit/test_mime_tree.py`` compares the two.
"""

from __future__ import annotations

import binascii
import itertools
import quopri
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import Message as EmailMessage
from email.parser import BytesParser
from email.policy import Compat32
from typing import Any, TypeVar, overload

from smtp2api.errors import MessageError

# email.message._parseparam is quadratic in the length of a parameter list, and feedparser
# calls it for every multipart boundary. No real Content-Type or Content-Disposition comes near
# this size (RFC 2231 continuations of a 255-octet filename take about 2.5 KiB).
_PARAM_HEADER_CAP = 16 * 1024
_PARAM_HEADERS = frozenset({"content-type", "content-disposition"})
_T = TypeVar("_T")
_MISSING = object()
_CONTENT_TYPE_KEY = ("content-type",)  # in Part's per-header cache, beside the header names


@dataclass
class _Counter:
    """What one parse has produced so far, checked against the limits as it grows."""

    max_depth: int
    max_parts: int
    max_headers: int
    max_header_bytes: int
    parts: int = 1  # the root
    headers: int = 0
    header_bytes: int = 0

    def add_part(self, depth: int) -> None:
        self.parts += 1
        if depth > self.max_depth:
            raise MessageError(f"MIME nesting deeper than {self.max_depth}")
        if self.parts > self.max_parts:
            raise MessageError(f"more than {self.max_parts} MIME parts")

    def add_header(self, size: int) -> None:
        self.headers += 1
        self.header_bytes += size
        if self.headers > self.max_headers:
            raise MessageError(f"more than {self.max_headers} header fields")
        if self.header_bytes > self.max_header_bytes:
            raise MessageError(f"header fields larger than {self.max_header_bytes} bytes")


class _ParsePolicy(Compat32):
    """compat32 that counts header fields as they are read, returns header values as the
    stored text (never ``Header`` objects) and caps parameter-carrying headers (see
    ``_PARAM_HEADER_CAP``; the header byte budget bounds how often that cost is paid)."""

    counter: _Counter

    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        object.__setattr__(self, "counter", counter)  # policies refuse plain assignment

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        self.counter.add_header(sum(len(line) for line in sourcelines))
        return super().header_source_parse(sourcelines)

    def header_fetch_parse(self, name: str, value: str) -> str:
        if name.lower() in _PARAM_HEADERS and len(value) > _PARAM_HEADER_CAP:
            return value[:_PARAM_HEADER_CAP]
        return value


class Part(EmailMessage):
    """A parsed part that knows its depth; ``attach`` is the one place a parser links a child
    to its parent, so limits are enforced there, before feedparser's recursion gets deep.

    ``source`` is ``(raw, start, end)`` for a leaf the splitter made: its payload is
    ``raw[start:end]``, turned into feedparser's text only if something asks for it."""

    depth = 0
    counter: _Counter | None = None
    source: tuple[bytes, int, int] | None = None

    def attach(self, payload: Any) -> None:
        counter = self.counter
        if counter is not None and isinstance(payload, Part):
            payload.depth = self.depth + 1
            counter.add_part(payload.depth)
        super().attach(payload)

    def _index(self) -> tuple[list[str], dict[Any, Any]]:
        """The header names lower-cased, in order, and what was parsed from them so far: the
        parameters per header name, ``get_param`` results, the content type.

        compat32 lower-cases every name on every ``get`` and ``in``, and parses a header's
        parameters again for each one asked for; ``walk`` asks a dozen times per part. Rebuilt
        when ``_headers`` is replaced or grows; ``replace_header``, the one in-place change
        compat32 makes, drops it."""
        headers: list[tuple[str, Any]] = self.__dict__["_headers"]
        cached = self.__dict__.get("_index_of")
        if cached is None or cached[0] is not headers or cached[1] != len(headers):
            keys = [k.lower() for k, _ in headers]
            cached = self.__dict__["_index_of"] = (headers, len(headers), keys, {})
        return cached[2], cached[3]

    def _keys(self) -> list[str]:
        return self._index()[0]

    def replace_header(self, _name: str, _value: Any) -> None:
        self.__dict__.pop("_index_of", None)
        super().replace_header(_name, _value)

    def _get_params_preserve(self, failobj: Any, header: str) -> Any:
        params = self._index()[1]
        key = header.lower()
        if key not in params:
            params[key] = EmailMessage._get_params_preserve(self, _MISSING, header)  # type: ignore[attr-defined]
        found = params[key]
        return failobj if found is _MISSING else list(found)  # get_params may hand it out

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._keys()

    def get_param(
        self, param: str, failobj: Any = None, header: str = "content-type", unquote: bool = True
    ) -> Any:
        """compat32's ``get_param``, computed once per (header, parameter): ``walk`` asks for
        charset, filename and name, each parse of the parameter list costing far more than
        the lookup. Values are str or tuples, so the cached one can be handed out again."""
        params = self._index()[1]
        key = (header.lower(), param.lower(), unquote)
        if key not in params:
            params[key] = EmailMessage.get_param(self, param, _MISSING, header, unquote)
        found = params[key]
        return failobj if found is _MISSING else found

    def get_content_type(self) -> str:
        """compat32's ``get_content_type``, computed once while the headers stay the same. The
        default type (no Content-Type field) is not cached: a parser may still change it."""
        keys, params = self._index()
        if "content-type" not in keys:
            return self.get_default_type()
        ctype: str | None = params.get(_CONTENT_TYPE_KEY)
        if ctype is None:
            ctype = params[_CONTENT_TYPE_KEY] = EmailMessage.get_content_type(self)
        return ctype

    @overload
    def get(self, name: str, failobj: None = None) -> Any: ...
    @overload
    def get(self, name: str, failobj: _T) -> Any: ...
    def get(self, name: str, failobj: object = None) -> Any:
        """compat32's ``get``: the first field of that name, through the policy."""
        try:
            index = self._keys().index(name.lower())
        except ValueError:
            return failobj
        key, value = self.__dict__["_headers"][index]
        return self.policy.header_fetch_parse(key, value)

    def is_multipart(self) -> bool:
        # Without reading _payload, which would turn a leaf's source into text.
        return isinstance(self.__dict__.get("_payload_value"), list)

    @property
    def _payload(self) -> Any:
        payload = self.__dict__.get("_payload_value")
        if payload is None and self.source is not None:
            raw, start, end = self.source
            payload = self.__dict__["_payload_value"] = raw[start:end].decode(
                "ascii", "surrogateescape"
            )
        return payload

    @_payload.setter
    def _payload(self, value: Any) -> None:
        self.__dict__["_payload_value"] = value
        self.source = None


def parse_tree(
    raw: bytes,
    *,
    max_depth: int,
    max_parts: int,
    max_headers: int,
    max_header_bytes: int,
    top: Sequence[tuple[str, int, int]] = (),
) -> EmailMessage:
    """Parse ``raw`` into a compat32 tree that stays within the limits (MessageError if not).

    ``top``: the top-level fields as (name, start, end), if the caller has already found them
    (``mime_headers.scan_headers``); the splitter then need not match them again."""

    def start() -> tuple[_ParsePolicy, Callable[..., Part]]:
        counter = _Counter(max_depth, max_parts, max_headers, max_header_bytes)
        policy = _ParsePolicy(counter)

        def factory(policy: Compat32 = policy) -> Part:
            part = Part(policy)
            part.counter = counter
            return part

        return policy, factory

    policy, factory = start()
    try:
        root = factory()
        if _Splitter(raw, policy, factory, top).fill(root, 0, len(raw)):
            return root
    except MessageError:
        pass  # a limit: feedparser, reading the same parts in the same order, says which
    policy, factory = start()
    return BytesParser(factory, policy=policy).parsebytes(raw)


# The strict subset, in feedparser's terms (email/feedparser.py). A header field: name and
# colon as headerRE wants them (but not empty), continuation lines starting with SP or HTAB;
# lines end at CRLF, CR or LF, as BufferedSubFile splits them.
_FIELD = re.compile(
    rb"[\x21-\x39\x3b-\x7e]+:[^\r\n]*+(?:\r\n|\r|\n)(?:[ \t][^\r\n]*+(?:\r\n|\r|\n))*+"
)
_EMPTY_LINE = re.compile(rb"\r\n|\r|\n")
# boundaryendRE, from just after "--boundary" to the line break (or the end of the input).
_DELIMITER_END = re.compile(rb"(--)?[ \t]*(?=[\r\n]|\Z)")


class _Splitter:
    """Fills parts from regions of one raw message, as feedparser would, or gives up."""

    def __init__(
        self,
        raw: bytes,
        policy: _ParsePolicy,
        factory: Callable[[], Part],
        top: Sequence[tuple[str, int, int]] = (),
    ) -> None:
        self.raw = raw
        self.policy = policy
        self.factory = factory
        self.top = top

    def _known_fields(self) -> list[tuple[int, int, int]] | None:
        """(start, colon, end) of the top-level fields from ``top``, where they are exactly
        what _FIELD would match from the start of ``raw`` (contiguous, a name right before the
        colon, each ended by a line break since the empty line follows); None otherwise."""
        raw, pos = self.raw, 0
        spans: list[tuple[int, int, int]] = []
        for name, start, end in self.top:
            colon = start + len(name)
            if not name or start != pos or raw[colon] != 0x3A or raw[end - 1] not in b"\r\n":
                return None
            spans.append((start, colon, end))
            pos = end
        return spans if _EMPTY_LINE.match(raw, pos) else None

    def fill(self, part: Part, start: int, end: int) -> bool:
        """Give ``part`` the headers and body of ``raw[start:end]``; False if that region is
        outside the strict subset (the caller then lets feedparser do it all)."""
        raw, pos = self.raw, start
        counter = self.policy.counter
        headers: list[tuple[str, str]] = part._headers  # type: ignore[attr-defined]
        known = self._known_fields() if start == 0 and self.top else None
        for field_start, colon, field_end in known or ():
            counter.add_header(field_end - field_start)
            name = raw[field_start:colon].decode("ascii")
            value = raw[colon + 1 : field_end].decode("ascii", "surrogateescape")
            headers.append((name, value.lstrip(" \t").rstrip("\r\n")))
            pos = field_end
        while not _EMPTY_LINE.match(raw, pos, end):
            field = _FIELD.match(raw, pos, end)
            if field is None:  # junk, a "From " line, or no empty line before the end
                return False
            field_end = field.end()
            # What _ParsePolicy.header_source_parse makes of the field's lines, inlined: the
            # name before the first colon, the value after it less leading blanks and the
            # final line break (compat32 keeps the inner line breaks of a folded field).
            counter.add_header(field_end - pos)
            name, value = raw[pos:field_end].decode("ascii", "surrogateescape").split(":", 1)
            headers.append((name, value.lstrip(" \t").rstrip("\r\n")))
            pos = field_end
        body = _EMPTY_LINE.match(raw, pos, end).end()  # type: ignore[union-attr]
        maintype = part.get_content_maintype()
        if maintype == "message" or part.get_content_type() == "multipart/digest":
            return False  # attached messages; digest changes its children's default type
        if maintype != "multipart":
            part.source = (raw, body, end)
            return True
        delimiters = _delimiters(raw, part.get_boundary(), body, end)
        if delimiters is None:
            return False
        for (_, child_start, _), (next_line, _, _) in itertools.pairwise(delimiters):
            child = self.factory()
            part.attach(child)
            if not self.fill(child, child_start, next_line):
                return False
            if child.source is not None:  # the line break before a delimiter belongs to it
                _, first, last = child.source
                child.source = (raw, first, _without_line_break(raw, first, last))
        return True


def _delimiters(
    raw: bytes, boundary: str | None, start: int, end: int
) -> list[tuple[int, int, bool]] | None:
    """The delimiter lines of a multipart body up to its close delimiter, as (line start,
    next line start, is close); None unless there is an opening delimiter, a close one, and no
    two delimiter lines in a row (feedparser reads those differently: it skips repeats)."""
    if boundary is None:
        return None
    try:
        separator = ("--" + boundary).encode("ascii", "surrogateescape")
    except UnicodeEncodeError:  # an RFC 2231 boundary with non-ASCII: no line can match it
        return None
    found: list[tuple[int, int, bool]] = []
    pos = start
    while True:
        hit = raw.find(separator, pos, end)
        if hit < 0:
            return None  # no close delimiter
        pos = hit + 1
        if hit > start and raw[hit - 1] not in b"\r\n":
            continue  # not at the start of a line
        tail = _DELIMITER_END.match(raw, hit + len(separator), end)
        if tail is None:
            continue
        after = tail.end() + (2 if raw.startswith(b"\r\n", tail.end()) else 1)
        close = tail.group(1) is not None
        if (found and found[-1][1] == hit) or (close and not found):
            return None
        found.append((hit, min(after, end), close))
        if close:
            return found
        pos = after


def _without_line_break(raw: bytes, start: int, end: int) -> int:
    """``end`` less one trailing CRLF, CR or LF (feedparser's NLCRE_eol) within ``start``."""
    if end > start and raw[end - 1] == 0x0A:
        end -= 1
        if end > start and raw[end - 1] == 0x0D:
            end -= 1
    elif end > start and raw[end - 1] == 0x0D:
        end -= 1
    return end


# base64 that strict decoding accepts once the line breaks are gone: alphabet characters, at
# most two "=" at the very end, and a multiple of four characters in all.
_CLEAN_BASE64 = re.compile(rb"[A-Za-z0-9+/\r\n]*+(?:=[\r\n]*+){0,2}")


def source_content(part: Part) -> bytes | None:
    """compat32's ``get_payload(decode=True)`` for a leaf the splitter made, read from the raw
    bytes without feedparser's copies; None when only the stdlib path gives the same bytes."""
    if part.source is None:
        return None
    raw, start, end = part.source
    cte = str(part.get("content-transfer-encoding", "")).lower()
    if cte == "quoted-printable":
        return quopri.decodestring(raw[start:end])
    if cte == "base64":
        # compat32 joins the lines and tries strict decoding first (email._encoded_words.
        # decode_b). Where that succeeds, the lenient decoder on the raw bytes, which skips
        # line breaks, returns the same: no copy of a large attachment is made.
        if _CLEAN_BASE64.fullmatch(raw, start, end):
            breaks = raw.count(b"\r", start, end) + raw.count(b"\n", start, end)
            if (end - start - breaks) % 4 == 0:
                return binascii.a2b_base64(memoryview(raw)[start:end])
        return None
    if cte in ("x-uuencode", "uuencode", "uue", "x-uue"):
        return None
    return raw[start:end]
