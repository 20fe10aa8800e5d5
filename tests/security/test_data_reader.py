"""The chunked DATA reader (``smtp_data.read_data``) against the per-line reader it replaced.

``_reference`` below is the previous reader, verbatim but for names: it read DATA one LF-ended
piece at a time through the stream reader's line limit, which is the rule of the framing
policy (``docs/security.md`` §Framing). The chunked reader must give the same content, the
same refusal and leave the same bytes for the command loop, however the stream is cut into
reads: hostile streams made of the pieces that matter (CR, LF, dots, NUL, end-of-data
look-alikes, long lines), cut at random points, with random limits.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smtp2api import replies
from smtp2api.replies import SMTPReply
from smtp2api.smtp_data import R554_NUL, DataResult, _DataState, read_data

# --- the per-line reader, as it was ---------------------------------------------------------


class _Reference:
    def __init__(self, max_bytes: int, max_line: int) -> None:
        self.max_bytes, self.max_line = max_bytes, max_line
        self.out = bytearray()
        self.error: SMTPReply | None = None
        self.wire = 0
        self.cap = 2 * max_bytes + 65536
        self.line_start = True
        self.overlong = self.last_cr = False

    def overrun(self, fragment: bytes) -> None:
        self.wire += len(fragment)
        self.overlong, self.last_cr = True, fragment.endswith(b"\r")
        self._refuse(replies.R554_LINE_TOO_LONG)

    def piece(self, piece: bytes) -> bool:
        self.wire += len(piece)
        crlf = piece.endswith(b"\r\n") or (self.overlong and piece == b"\n" and self.last_cr)
        if self.overlong:
            self.overlong, self.line_start = False, crlf
            return False
        if self.line_start and piece == b".\r\n":
            return True
        body = piece[:-2] if crlf else piece[:-1]
        if self.line_start and body.startswith(b"."):
            body = body[1:]
        self.line_start = crlf
        if self.error is None:
            self._keep(body)
        return False

    def _keep(self, body: bytes) -> None:
        if len(body) > self.max_line:
            self._refuse(replies.R554_LINE_TOO_LONG)
        elif b"\x00" in body:
            self._refuse(R554_NUL)
        elif len(self.out) + len(body) + 2 > self.max_bytes:
            self._refuse(replies.R552_TOO_LARGE)
        else:
            self.out += body.replace(b"\r", b"\r\n") if b"\r" in body else body
            self.out += b"\r\n"

    def _refuse(self, reply: SMTPReply) -> None:
        self.error = self.error or reply
        self.out.clear()


async def _reference(reader: asyncio.StreamReader, max_bytes: int, max_line: int) -> DataResult:
    state = _Reference(max_bytes, max_line)
    while True:
        try:
            piece = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            state.overrun(await reader.read(exc.consumed))
        else:
            if state.piece(piece):
                return DataResult(bytes(state.out), state.error)
        if state.wire > state.cap:
            return DataResult(b"", replies.R552_TOO_LARGE, close=True)


# --- running both ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    result: DataResult | None  # None: the client hung up before the end
    rest: bytes  # what the command loop reads next


async def _run_reference(stream: bytes, eof: bool, max_bytes: int, max_line: int) -> Outcome:
    reader = asyncio.StreamReader(limit=max_line + 3)  # as smtp_guard.reader_limit
    reader.feed_data(stream)
    if eof:
        reader.feed_eof()
    try:
        result: DataResult | None = await _reference(reader, max_bytes, max_line)
    except asyncio.IncompleteReadError:
        result = None
    return Outcome(result, bytes(reader._buffer))  # type: ignore[attr-defined]


async def _run_chunked(
    stream: bytes, cuts: Sequence[int], eof: bool, max_bytes: int, max_line: int
) -> Outcome:
    reader = asyncio.StreamReader(limit=max_line + 3)
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(stream)), len(stream)]

    async def feed() -> None:  # one read per cut, as from a socket
        for start, stop in itertools.pairwise(bounds):
            reader.feed_data(stream[start:stop])
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        if eof:
            reader.feed_eof()

    feeder = asyncio.create_task(feed())
    try:
        result: DataResult | None = await read_data(reader, max_bytes=max_bytes, max_line=max_line)
    except asyncio.IncompleteReadError:
        result = None
    await feeder
    return Outcome(result, bytes(reader._buffer))  # type: ignore[attr-defined]


def _both(
    stream: bytes, cuts: Sequence[int], *, eof: bool = True, max_bytes: int, max_line: int
) -> tuple[Outcome, Outcome]:
    old = asyncio.run(_run_reference(stream, eof, max_bytes, max_line))
    new = asyncio.run(_run_chunked(stream, cuts, eof, max_bytes, max_line))
    return old, new


def _assert_same(old: Outcome, new: Outcome) -> None:
    assert new.result == old.result
    if old.result is not None and not old.result.close:  # a cut-off session is closed
        assert new.rest == old.rest


# --- the properties -------------------------------------------------------------------------

PIECES = [
    b"a",
    b"text ",
    b"x" * 13,
    b"y" * 40,
    b"\r\n",
    b"\r\n",
    b"\r",
    b"\n",
    b".",
    b"..",
    b"\x00",
    b".\r\n",
    b"\r\n.",
    b"\r\n.\r\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\xff\xfe",
]
CLEAN = [b"a", b"text ", b"x" * 13, b"\r\n", b"\r\n", b"\r\n..", b"\r\n.x", b"."]
ENDINGS = [b"\r\n.\r\n", b".\r\n", b"\r\n.\r\nQUIT\r\n", b"\r\n.\r\nMAIL FROM:<a@b>\r\nRSET\r\n"]

streams = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=60),
    st.lists(st.sampled_from(CLEAN), max_size=60),
).map(b"".join)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(
    body=streams,
    ending=st.sampled_from([*ENDINGS, b""]),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=12),
    max_line=st.integers(min_value=1, max_value=40),
    max_bytes=st.integers(min_value=1, max_value=400),
)
@example(body=b"abc\r", ending=b"\n.\r\n", cuts=[4], max_line=10, max_bytes=100)
@example(body=b"abc\r\n", ending=b".\r\n", cuts=[5], max_line=10, max_bytes=100)
@example(body=b"abc\r\n", ending=b".\r\nQUIT\r\n", cuts=[6], max_line=10, max_bytes=100)
@example(body=b"x" * 30 + b"\r", ending=b"\n.\r\n", cuts=[10, 31], max_line=5, max_bytes=100)
@example(body=b"." + b"x" * 10 + b"\r\n", ending=b".\r\n", cuts=[], max_line=10, max_bytes=100)
@example(body=b"x" * 11 + b"\n", ending=b".\r\n", cuts=[], max_line=10, max_bytes=100)
def test_chunked_reader_matches_the_per_line_reader(
    body: bytes, ending: bytes, cuts: list[int], max_line: int, max_bytes: int
) -> None:
    stream = body + ending
    old, new = _both(stream, cuts, eof=True, max_bytes=max_bytes, max_line=max_line)
    _assert_same(old, new)


@pytest.mark.parametrize("chunk", [1, 7, 1000, 70_000])
def test_the_size_cap_cuts_off_the_same_sessions(chunk: int) -> None:
    # cap = 2 * max_bytes + 64 KiB: under it the message is refused and the session goes on,
    # over it the session is closed.
    line = b"z" * 70 + b"\r\n"
    for lines, close in ((600, False), (1000, True)):
        stream = line * lines + b".\r\nQUIT\r\n"
        cuts = list(range(chunk, len(stream), chunk))
        old, new = _both(stream, cuts, max_bytes=1000, max_line=998)
        assert old.result is not None
        assert old.result.close is close
        _assert_same(old, new)


def test_a_line_that_never_ends_is_refused_without_being_held() -> None:
    stream = b"Subject: x\r\n\r\n" + b"y" * 500_000 + b"\r\nafter\r\n.\r\n"
    old, new = _both(stream, range(4096, len(stream), 4096), max_bytes=10**6, max_line=998)
    assert new.result == DataResult(b"", replies.R554_LINE_TOO_LONG)
    _assert_same(old, new)


@pytest.mark.parametrize("crlf", [True, False])
def test_a_large_message_is_kept_whole(crlf: bool) -> None:
    eol = b"\r\n" if crlf else b"\n"
    lines = [b"%06d " % i + b"q" * 70 for i in range(40_000)]
    lines[100] = b"." + lines[100]
    stream = eol.join(lines) + b"\r\n.\r\n"
    old, new = _both(stream, range(65536, len(stream), 65536), max_bytes=10**7, max_line=998)
    assert new.result is not None
    assert new.result.error is None
    assert new.result.content.count(b"\r\n") == 40_000
    _assert_same(old, new)


def test_eof_before_the_end_is_a_hang_up() -> None:
    old, new = _both(b"Subject: x\r\n\r\nno end\r\n", [5], eof=True, max_bytes=100, max_line=50)
    assert old.result is None
    assert new.result is None


def test_an_unended_line_is_not_buffered() -> None:
    # The old reader's bound was the stream reader's limit; the chunked one holds at most
    # one valid line's worth of an incomplete line, and discards the rest of a longer one.
    state = _DataState(max_bytes=10**6, max_line=998)
    for _ in range(100):
        assert state.feed(b"y" * 4096) == -1
        assert len(state.partial) <= 998 + 3
    assert state.error == replies.R554_LINE_TOO_LONG
    assert state.feed(b"\r\n.\r\n") == 5
