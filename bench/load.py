"""The built-in load generator: an asyncio SMTP client, one new connection per message.

    python bench/load.py send --port P --message FILE [--messages N] [--concurrency C]
                              [--rate R] [--warmup W]
    python bench/load.py idle --port P --connections N

``send``: C clients each run EHLO, MAIL, RCPT, DATA, QUIT on a fresh connection per message
(like Postfix's ``smtp-source`` without ``-d``); with ``--rate`` messages start on a fixed
schedule (open loop) instead of back to back. Prints one JSON object: counts, wall time,
and latencies (session: connect to the DATA reply; data: end of DATA to its reply).
``idle``: opens N connections, reads each banner and EHLO reply, prints ``ready N``, holds
them until stdin closes. Runs on uvloop when installed; raises RLIMIT_NOFILE to its hard cap.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

FROM = "bench@example.com"
TO = "rcpt@example.net"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency, and the terminating ``.`` line."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b".") or b"\r\n." in message:
        message = (b"." if message.startswith(b".") else b"") + message.replace(b"\r\n.", b"\r\n..")
    return message + b".\r\n"


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {
        "count": len(ordered),
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One (possibly multi-line) reply: its code and last line."""
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise ConnectionError(f"short reply {line!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line


class Client:
    def __init__(self, host: str, port: int, data: bytes) -> None:
        self.host = host
        self.port = port
        self.data = data
        self.session: list[float] = []
        self.data_latency: list[float] = []
        self.replies: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()

    async def one(self) -> None:
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 16)
        except OSError as exc:
            self.errors[type(exc).__name__] += 1
            return
        try:
            code, line = await _reply(reader)
            if code != 220:
                self.replies[line[:3].decode()] += 1
                return
            writer.write(b"EHLO bench.local\r\n")
            await _reply(reader)
            writer.write(b"MAIL FROM:<%s>\r\n" % FROM.encode())
            code, line = await _reply(reader)
            if code != 250:
                self.replies[line[:3].decode()] += 1
                return
            writer.write(b"RCPT TO:<%s>\r\n" % TO.encode())
            code, line = await _reply(reader)
            if code != 250:
                self.replies[line[:3].decode()] += 1
                return
            writer.write(b"DATA\r\n")
            code, line = await _reply(reader)
            if code != 354:
                self.replies[line[:3].decode()] += 1
                return
            writer.write(self.data)
            await writer.drain()
            sent = time.perf_counter()
            code, line = await _reply(reader)
            done = time.perf_counter()
            self.replies[line[:3].decode()] += 1
            if code == 250:
                self.session.append(done - started)
                self.data_latency.append(done - sent)
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await _reply(reader)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            self.errors[type(exc).__name__] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


async def run_send(args: argparse.Namespace) -> dict[str, Any]:
    data = dot_stuff(Path(args.message).read_bytes())
    client = Client(args.host, args.port, data)
    if args.warmup:
        await _closed_loop(client, args.warmup, args.concurrency)
        client = Client(args.host, args.port, data)
    started = time.perf_counter()
    if args.rate:
        await _open_loop(client, args.messages, args.concurrency, args.rate)
    else:
        await _closed_loop(client, args.messages, args.concurrency)
    seconds = time.perf_counter() - started
    ok = len(client.session)
    return {
        "messages": args.messages,
        "ok": ok,
        "seconds": seconds,
        "rate": ok / seconds if seconds else 0.0,
        "replies": dict(client.replies),
        "errors": dict(client.errors),
        "session": summary(client.session),
        "data": summary(client.data_latency),
    }


async def _closed_loop(client: Client, messages: int, concurrency: int) -> None:
    remaining = messages

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await client.one()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, messages))))


async def _open_loop(client: Client, messages: int, concurrency: int, rate: float) -> None:
    slots = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        try:
            await client.one()
        finally:
            slots.release()

    for i in range(messages):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def run_idle(args: argparse.Namespace) -> dict[str, Any]:
    held: list[asyncio.StreamWriter] = []
    errors: collections.Counter[str] = collections.Counter()
    slots = asyncio.Semaphore(200)  # connect in waves: the listen backlog is finite

    async def hold() -> None:
        async with slots:
            try:
                reader, writer = await asyncio.open_connection(args.host, args.port)
                code, line = await _reply(reader)
                if code != 220:
                    errors[line[:3].decode()] += 1
                    writer.close()
                    return
                writer.write(b"EHLO idle.local\r\n")
                await _reply(reader)
                held.append(writer)
            except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
                errors[type(exc).__name__] += 1

    started = time.perf_counter()
    await asyncio.gather(*(hold() for _ in range(args.connections)))
    print(f"ready {len(held)}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # the bench closes stdin when done
    for writer in held:
        writer.close()
    return {
        "held": len(held),
        "errors": dict(errors),
        "connect_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    send = sub.add_parser("send")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, required=True)
    send.add_argument("--message", required=True)
    send.add_argument("--messages", type=int, default=1000)
    send.add_argument("--concurrency", type=int, default=20)
    send.add_argument("--rate", type=float, default=0.0)
    send.add_argument("--warmup", type=int, default=0)
    idle = sub.add_parser("idle")
    idle.add_argument("--host", default="127.0.0.1")
    idle.add_argument("--port", type=int, required=True)
    idle.add_argument("--connections", type=int, default=10_000)
    args = parser.parse_args()
    raise_nofile()
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    coro = run_send(args) if args.command == "send" else run_idle(args)
    print(json.dumps(runner(coro)), flush=True)


if __name__ == "__main__":
    main()
