"""A fast local email API for the benchmark: HTTP/1.1 with keep-alive, a fixed answer delay.

    python bench/sink.py [--port 0] [--latency-ms 0]

Answers every request with ``200 {"id": "sink-N"}`` after ``--latency-ms``; reads
Content-Length and chunked bodies (RFC 9112 §6, §7.1) and discards them. Prints the bound
port on the first line of stdout, then serves until SIGTERM, when it prints
``requests=N bytes=B`` and exits. A raw asyncio protocol, no framework: the sink must cost
far less CPU than what it measures. Runs on uvloop when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys


class Stats:
    requests = 0
    body_bytes = 0


class SinkProtocol(asyncio.Protocol):
    """One keep-alive connection; pipelined requests are answered in order."""

    def __init__(self, latency: float, stats: Stats) -> None:
        self.latency = latency
        self.stats = stats
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.queue: list[asyncio.Future[None]] = []
        self.need = 0  # body bytes still to skip (Content-Length)
        self.chunked = False
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self._step():
            pass

    def _step(self) -> bool:
        """Consume one piece of the stream; True when progress was made."""
        if self.need:
            take = min(self.need, len(self.buffer))
            del self.buffer[:take]
            self.need -= take
            self.stats.body_bytes += take
            if self.need == 0 and not self.chunked:
                self._answer()
            return take > 0 and bool(self.buffer)
        if self.chunked:
            return self._chunk()
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buffer[:end]).lower()
        del self.buffer[: end + 4]
        self.closing = b"connection: close" in head
        self.chunked = b"transfer-encoding: chunked" in head
        if self.chunked:
            return True
        length = 0
        marker = head.find(b"content-length:")
        if marker >= 0:
            line_end = head.find(b"\r\n", marker)
            length = int(head[marker + 15 : line_end if line_end >= 0 else None].strip())
        self.need = length
        if length == 0:
            self._answer()
        return bool(self.buffer)

    def _chunk(self) -> bool:
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        size = int(bytes(self.buffer[:end]).split(b";")[0], 16)
        if size == 0:  # last chunk; no trailers expected from HTTP clients here
            if len(self.buffer) < end + 4:
                return False
            del self.buffer[: end + 4]
            self.chunked = False
            self._answer()
            return bool(self.buffer)
        del self.buffer[: end + 2]
        self.need = size + 2  # the chunk and its CRLF
        self.stats.body_bytes -= 2
        return True

    def _answer(self) -> None:
        self.stats.requests += 1
        number = self.stats.requests
        body = b'{"id": "sink-%d"}' % number
        response = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        if self.latency <= 0:
            self._write(response)
        else:
            loop = asyncio.get_running_loop()
            loop.call_later(self.latency, self._write, response)

    def _write(self, response: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response)
            if self.closing:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int, latency: float) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    sock = socket.create_server(("127.0.0.1", port), backlog=4096)
    server = await loop.create_server(lambda: SinkProtocol(latency, stats), sock=sock)
    print(sock.getsockname()[1], flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    with contextlib.suppress(BrokenPipeError):  # nobody may be reading any more
        print(f"requests={stats.requests} bytes={stats.body_bytes}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    runner(serve(args.port, args.latency_ms / 1000))
    sys.exit(0)


if __name__ == "__main__":
    main()
