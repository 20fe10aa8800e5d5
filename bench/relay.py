"""The relay alone: CPU per ``Deliverer.deliver`` through the real ``http`` provider, httpx,
the aiohttp transport and a local API (bench/sink.py), old code path vs new, in one run.

    .venv/bin/python bench/relay.py [--messages 3000] [--concurrency 20] [--rounds 5]
    .venv/bin/python bench/relay.py --latency-ms 50 --concurrency 100 --messages 4000
    .venv/bin/python bench/relay.py --memory [--attachment-mb 19]

The old path is the relay code (``OLD_MODULES``) of git revision ``--old`` (default: the
commit before the direct request path), loaded beside the working tree's under the same
module names; everything else (models, MIME parse, upstream guard) is shared. Rounds
alternate old/new so that the noise of a shared machine falls on both; CPU is this
process's ``time.process_time`` (the sink is another process), per delivery, median of the
rounds. ``--memory``: tracemalloc's peak for one ``provider.send`` of a message with one
large attachment (the JSON route's body: base64, JSON encoding, the bytes sent).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import subprocess
import sys
import time
import tracemalloc
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import messages

from smtp2api import __version__, config
from smtp2api.delivery import Deliverer
from smtp2api.mime import parse_message
from smtp2api.models import Attachment, Envelope, Message
from smtp2api.providers.upstream import guard_client

ROOT = Path(__file__).resolve().parent.parent
# The last commit before the direct request path (bounded_request without AsyncClient.send).
BEFORE = "7d7da30aae96f0d5db390707e00bca0c361d8dbc"
# Loaded in this order from the old revision: each sees the old ones loaded before it.
OLD_MODULES = {
    "smtp2api.aiohttp_transport": "src/smtp2api/aiohttp_transport.py",
    "smtp2api.providers.lean": "src/smtp2api/providers/lean.py",
    "smtp2api.providers.request": "src/smtp2api/providers/request.py",
    "smtp2api.providers.jsonapi": "src/smtp2api/providers/jsonapi.py",
    "smtp2api.providers.http": "src/smtp2api/providers/http.py",
}

OPTIONAL = frozenset({"smtp2api.providers.lean"})


class Side:
    """One side of the comparison: how to make its client and its ``http`` provider."""

    def __init__(self, name: str, modules: dict[str, types.ModuleType]) -> None:
        self.name = name
        self.transport: Callable[..., httpx.AsyncBaseTransport] = modules[
            "smtp2api.aiohttp_transport"
        ].AiohttpTransport
        self.provider: Callable[..., Any] = modules["smtp2api.providers.http"].HttpApiProvider

    def client(self, max_connections: int) -> httpx.AsyncClient:
        """As ``transport.new_http_client`` and ``app.py`` make it, with this side's transport."""
        client = httpx.AsyncClient(
            transport=self.transport(max_connections=max_connections),
            follow_redirects=False,
            timeout=httpx.Timeout(60.0),
            headers={"User-Agent": f"smtp2api/{__version__}"},
        )
        guard_client(client)
        return client


def current() -> Side:
    import smtp2api.aiohttp_transport
    import smtp2api.providers.http

    return Side(
        "new",
        {
            "smtp2api.aiohttp_transport": smtp2api.aiohttp_transport,
            "smtp2api.providers.http": smtp2api.providers.http,
        },
    )


def load_revision(rev: str) -> Side:
    """``OLD_MODULES`` as they were at ``rev``; ``sys.modules`` is restored afterwards."""
    saved = {name: sys.modules.get(name) for name in OLD_MODULES}
    loaded: dict[str, types.ModuleType] = {}
    try:
        for name, path in OLD_MODULES.items():
            shown = subprocess.run(
                ["git", "show", f"{rev}:{path}"], cwd=ROOT, check=False, capture_output=True
            )
            if shown.returncode and name in OPTIONAL:
                continue  # not in that revision yet: nothing of it to load
            shown.check_returncode()
            source = shown.stdout
            module = types.ModuleType(name)
            module.__file__ = f"{rev[:10]}:{path}"
            sys.modules[name] = module  # dataclasses and later imports look it up there
            exec(compile(source, module.__file__, "exec"), module.__dict__)
            loaded[name] = module
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return Side(f"old ({rev[:10]})", loaded)


def settings(url: str) -> config.HttpProvider:
    return config.HttpProvider(type="http", url=url, api_key="sk_bench_0123456789abcdef")


async def deliveries(deliverer: Deliverer, message: Message, count: int, concurrency: int) -> None:
    envelope = Envelope(messages.FROM, (messages.TO,))
    todo = iter(range(count))

    async def worker() -> None:
        for _ in todo:
            await deliverer.deliver(message, envelope, ["api"])

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def cpu_rounds(sides: list[Side], url: str, args: argparse.Namespace) -> None:
    envelope = Envelope(messages.FROM, (messages.TO,))
    raw = messages.multipart_message() if args.multipart else messages.text_message()
    message = parse_message(raw, envelope, "01J0BENCH000000000000000000")
    clients = {side.name: side.client(args.concurrency + 100) for side in sides}
    deliverers = {
        side.name: Deliverer({"api": side.provider("api", settings(url), clients[side.name])})
        for side in sides
    }
    cpu: dict[str, list[float]] = {side.name: [] for side in sides}
    rate: dict[str, list[float]] = {side.name: [] for side in sides}
    for deliverer in deliverers.values():  # warm the pools and caches
        await deliveries(deliverer, message, min(500, args.messages), args.concurrency)
    for _ in range(args.rounds):
        for side in sides:
            gc.collect()
            started, wall = time.process_time(), time.perf_counter()
            await deliveries(deliverers[side.name], message, args.messages, args.concurrency)
            cpu[side.name].append((time.process_time() - started) / args.messages)
            rate[side.name].append(args.messages / (time.perf_counter() - wall))
    for client in clients.values():
        await client.aclose()
    ideal = args.concurrency / (args.latency_ms / 1000) if args.latency_ms else float("inf")
    print(
        f"{len(raw)} B message, {args.messages} deliveries x {args.rounds} rounds, "
        f"{args.concurrency} concurrent, API {args.latency_ms:.0f} ms (ideal {ideal:.0f}/s)"
    )
    for side in sides:
        runs = " / ".join(f"{1e6 * c:.0f}" for c in cpu[side.name])
        print(
            f"  {side.name:22} {1e6 * statistics.median(cpu[side.name]):6.0f} us CPU/delivery"
            f" (min {1e6 * min(cpu[side.name]):4.0f})"
            f"  {statistics.median(rate[side.name]):6.0f} deliveries/s   (CPU runs: {runs})"
        )


async def traced_peak(work: Callable[[], Awaitable[object]]) -> int:
    """tracemalloc's peak while ``work`` runs, above what was allocated before it."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    try:
        await work()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


async def memory(sides: list[Side], url: str, args: argparse.Namespace) -> None:
    size = int(args.attachment_mb * 1_000_000)
    envelope = Envelope(messages.FROM, (messages.TO,))
    small = parse_message(messages.text_message(), envelope, "01J0BENCH000000000000000000")
    large = Message(
        id="01J0BENCH000000000000000001",
        raw=b"",  # the provider never reads it; only the attachment counts here
        from_=small.from_,
        to=small.to,
        subject="large",
        text="see the attachment",
        attachments=(Attachment("data.bin", "application/octet-stream", b"\x5a" * size),),
    )
    raw = messages.large_message(25_000_000)
    print(
        f"tracemalloc peak above the start: (a) provider.send of a {size / 1e6:.0f} MB "
        f"attachment; (b) parse_message + provider.send of a {len(raw) / 1e6:.0f} MB message"
    )
    for side in sides:
        async with side.client(10) as client:
            provider = side.provider("api", settings(url), client)
            await provider.send(small, envelope)  # connection and caches made outside the trace
            sent = await traced_peak(lambda: provider.send(large, envelope))  # noqa: B023
            route = await traced_peak(
                lambda: provider.send(parse_message(raw, envelope, large.id), envelope)  # noqa: B023
            )
        print(
            f"  {side.name:22} (a) {sent / 1e6:6.1f} MB = {sent / size:4.2f}x the attachment"
            f"   (b) {route / 1e6:6.1f} MB = {route / len(raw):4.2f}x the message"
        )


async def main(args: argparse.Namespace) -> None:
    sides = [load_revision(args.old), current()] if args.old else [current()]
    with harness.Sink(args.latency_ms) as sink:
        if args.memory:
            await memory(sides, sink.url, args)
        else:
            await cpu_rounds(sides, sink.url, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="deliveries per round")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--multipart", action="store_true", help="the 10 KB multipart message")
    parser.add_argument("--old", default=BEFORE, help="git revision of the old path ('' = none)")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--attachment-mb", type=float, default=19.0)
    asyncio.run(main(parser.parse_args()))
