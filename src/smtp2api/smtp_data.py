"""The DATA reader of the SMTP front (``GuardedSMTP.smtp_DATA``): framing and content rules
of ``smtp_guard.py``'s docstring, applied to whole chunks of the stream.

Where the message ends and what its bytes are is defined line by line (``_DataState.piece``:
a "piece" is what lies up to and including the next LF). Checking every piece in Python cost
more than the rest of the session's front (``docs/performance.md``), so ``read_data`` takes
what the socket delivered and decides for all its complete lines at once, with C-speed
searches: it finds the first ``<CRLF>.<CRLF>``, and when the content before it holds no NUL,
no line too long and stays within the size limit, keeps it with one ``replace`` for the dot
stuffing (and four for bare CR/LF, which is rare). Anything else (a NUL, a long line, the
size limit reached) goes through ``piece`` line by line, so every outcome is the per-line
rule's; ``tests/security/test_data_reader.py`` checks both against each other.
"""

from __future__ import annotations

import asyncio
import functools
import io
import re
from dataclasses import dataclass

from smtp2api import replies
from smtp2api.replies import SMTPReply

R554_NUL = SMTPReply(554, "5.6.0", "Message rejected: NUL characters are not allowed")

# What one read takes from the stream reader: everything buffered, up to this much (asyncio's
# selector transport reads 256 KiB at most per data_received).
_CHUNK = 256 * 1024
_CR, _DOT = 13, 0x2E


@dataclass(slots=True)
class DataResult:
    content: bytes
    error: SMTPReply | None = None
    close: bool = False  # the client went far past the limit: answer and hang up


@functools.lru_cache(maxsize=8)
def _long_segment(length: int) -> re.Pattern[bytes]:
    """An LF followed by ``length`` bytes without one: a line at least that long follows.
    The literal prefix lets ``re`` skip to each LF at C speed; each line is scanned once."""
    return re.compile(rb"\n[^\n]{%d}" % length)


def _unstuff(data: bytes, line_start: bool) -> bytes:
    """RFC 5321 §4.5.2 transparency: one dot off the start of each CRLF line."""
    if line_start and data[:1] == b".":
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


class _DataState:
    """One DATA read in progress: the per-line rules (``piece``) and the chunked scan."""

    def __init__(self, max_bytes: int, max_line: int) -> None:
        self.max_bytes, self.max_line = max_bytes, max_line
        self.out = io.BytesIO()  # getvalue() hands over its buffer without a copy
        self.size = 0  # bytes in out
        self.error: SMTPReply | None = None
        self.cap = 2 * max_bytes + 65536
        self.offset = 0  # stream offset of the chunk being fed
        self.end_at = -1  # stream offset of the final "." line, once found
        self.line_start = True  # the next piece starts an SMTP line: the last one ended in CRLF
        self.partial = b""  # the start of a line whose LF has not arrived yet
        self.overlong = self.last_cr = False  # inside a line too long to hold: discarding

    # --- the per-line rules -----------------------------------------------------------------

    def overrun(self, fragment: bytes) -> None:
        """A line grew past what a valid one can be before its LF: refuse, discard the rest."""
        self.overlong, self.last_cr = True, fragment.endswith(b"\r")
        self._refuse(replies.R554_LINE_TOO_LONG)

    def piece(self, piece: bytes) -> bool:
        """Take one piece ending in LF; True when it is the end of the data."""
        crlf = piece.endswith(b"\r\n")
        if self.line_start and piece == b".\r\n":
            return True
        body = piece[:-2] if crlf else piece[:-1]
        if self.line_start and body.startswith(b"."):
            body = body[1:]  # RFC 5321 §4.5.2 transparency, once
        self.line_start = crlf
        if self.error is None:
            self._keep(body)
        return False

    def _keep(self, body: bytes) -> None:
        if len(body) > self.max_line:
            self._refuse(replies.R554_LINE_TOO_LONG)
        elif b"\x00" in body:
            self._refuse(R554_NUL)  # RFC 5321 §4.5.2, RFC 2045 §2.7: no NUL in 7bit/8bit data
        elif self.size + len(body) + 2 > self.max_bytes:
            self._refuse(replies.R552_TOO_LARGE)
        else:
            kept = body.replace(b"\r", b"\r\n") if b"\r" in body else body
            self.out.write(kept)
            self.out.write(b"\r\n")
            self.size += len(kept) + 2

    def _refuse(self, reply: SMTPReply) -> None:
        self.error = self.error or reply
        if self.size:  # a refused message is not kept in memory while the rest drains
            self.out, self.size = io.BytesIO(), 0

    # --- the chunked scan -------------------------------------------------------------------

    def feed(self, chunk: bytes) -> int:
        """Take the next bytes of the stream; the index in ``chunk`` just past the final
        ``.<CRLF>`` once it is found, else -1 (all of ``chunk`` is taken)."""
        pos = self._finish_line(chunk)
        if self.end_at >= 0 or pos < 0:
            self.offset += len(chunk)
            return pos
        last_lf = chunk.rfind(b"\n", pos)
        region_end = last_lf + 1 if last_lf >= 0 else pos  # complete lines end there
        if self.line_start and chunk.startswith(b".\r\n", pos):
            end = pos
        else:
            found = chunk.find(b"\r\n.\r\n", pos, region_end)
            end = found + 2 if found >= 0 else -1
        self._take(chunk, pos, end if end >= 0 else region_end)
        if end >= 0:
            self.end_at = self.offset + end
            return end + 3
        self._hold(chunk[region_end:])
        self.offset += len(chunk)
        return -1

    def complete(self) -> int:
        """The stream offset up to which lines are complete (the partial one is pending)."""
        return self.offset - len(self.partial)

    def _finish_line(self, chunk: bytes) -> int:
        """Complete the line left open by the last chunk; where the rest of ``chunk`` starts,
        or -1 when all of it belongs to that line still."""
        if not (self.overlong or self.partial):
            return 0
        lf = chunk.find(b"\n")
        if lf < 0:
            if self.overlong:
                self.last_cr = chunk.endswith(b"\r")
            else:
                self._hold(self.partial + chunk)
            return -1
        if self.overlong:  # the tail of an over-long line: discarded
            self.overlong = False
            self.line_start = chunk[lf - 1] == _CR if lf else self.last_cr
            return lf + 1
        started = self.offset - len(self.partial)
        piece, self.partial = self.partial + chunk[: lf + 1], b""
        if self.piece(piece):
            self.end_at = started
        return lf + 1

    def _hold(self, tail: bytes) -> None:
        # No valid line is longer than max_line + "." + CRLF: refuse it without buffering it.
        if len(tail) >= self.max_line + 3:
            self.partial = b""
            self.overrun(tail)
        else:
            self.partial = tail

    def _take(self, chunk: bytes, start: int, stop: int) -> None:
        """Complete lines ``chunk[start:stop]``, none of them the end of the data."""
        if start == stop:
            return
        line_start = self.line_start
        self.line_start = stop - start >= 2 and chunk[stop - 2] == _CR
        if self.error is not None:
            return  # draining a refused message: only the framing matters
        data = self._bulk(chunk, start, stop, line_start)
        if data is not None and self.size + len(data) <= self.max_bytes:
            self.out.write(data)
            self.size += len(data)
            return
        self.line_start = line_start  # the exact rules, line by line
        while start < stop:
            lf = chunk.find(b"\n", start, stop)
            self.piece(chunk[start : lf + 1])
            start = lf + 1

    def _bulk(self, chunk: bytes, start: int, stop: int, line_start: bool) -> bytes | None:
        """``chunk[start:stop]`` as ``piece`` would keep it, when no line of it can be refused
        (no NUL, none too long); None otherwise. The size limit is the caller's."""
        if chunk.find(b"\x00", start, stop) >= 0:
            return None
        lfs = chunk.count(b"\n", start, stop)
        if chunk.count(b"\r", start, stop) == lfs == chunk.count(b"\r\n", start, stop):
            # CRLF only (the usual case): a line may hold max_line bytes, its CR and a dot.
            if not _lines_fit(chunk, start, stop, self.max_line + 1):
                return None
            data = chunk[start:stop]
            if (line_start and chunk[start] == _DOT) or chunk.find(b"\r\n.", start, stop) >= 0:
                data = _unstuff(data, line_start)
            return data
        # Bare CR or LF: each becomes CRLF, as piece() does line by line; the CR of a CRLF
        # becomes the LF first so that it is not taken for a bare one.
        if not _lines_fit(chunk, start, stop, self.max_line):
            return None
        data = _unstuff(chunk[start:stop], line_start).replace(b"\r\n", b"\n")
        return data.replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _lines_fit(chunk: bytes, start: int, stop: int, longest: int) -> bool:
    """No piece in ``chunk[start:stop]`` (complete lines) has more than ``longest`` bytes
    before its LF."""
    first = chunk.find(b"\n", start, stop)
    if first - start > longest:
        return False
    return stop - start <= longest + 1 or not _long_segment(longest + 1).search(chunk, first, stop)


async def read_data(reader: asyncio.StreamReader, *, max_bytes: int, max_line: int) -> DataResult:
    """Read DATA up to <CRLF>.<CRLF>: unstuffed once, line breaks normalised, bounded.

    Only a piece that follows a CRLF starts an SMTP line: ``\\n.\\r\\n``, ``\\r.\\r\\n`` and the
    other smuggling variants are content, never the end. What follows the end stays in the
    reader for the command loop (whose pipelining check sees it). After a failure the rest is
    drained and discarded, up to twice ``max_bytes``; a client still sending then is cut off.
    """
    state = _DataState(max_bytes, max_line)
    while True:
        chunk = await reader.read(_CHUNK)
        if not chunk:
            raise asyncio.IncompleteReadError(state.partial, None)
        end = state.feed(chunk)
        if end >= 0:
            if end < len(chunk):
                _unread(reader, memoryview(chunk)[end:])
            if state.end_at > state.cap:
                return DataResult(b"", replies.R552_TOO_LARGE, close=True)
            # getvalue() hands over the buffer itself: no second copy of the message.
            return DataResult(state.out.getvalue() if state.error is None else b"", state.error)
        if state.complete() > state.cap:
            return DataResult(b"", replies.R552_TOO_LARGE, close=True)


def _unread(reader: asyncio.StreamReader, data: memoryview) -> None:
    """Put back what followed the end of data (a pipelined QUIT, or commands sent too early
    for the pipelining check to refuse), ahead of anything that arrived since."""
    reader._buffer[:0] = data  # type: ignore[attr-defined]
