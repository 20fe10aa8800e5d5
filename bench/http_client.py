"""The HTTP client alone: requests/s through httpx's own pool vs the aiohttp transport.

    .venv/bin/python bench/http_client.py [--latency-ms 50] [--inflight 100] [--seconds 5]

Both go through ``smtp2api.transport``'s client shape (``httpx.AsyncClient``, the same limits
the gateway uses) against bench/sink.py with a fixed answer delay. With ``inflight``
requests at a time and latency L, the ideal is inflight / L requests/s; a pool that
serialises connection handling falls far below it (issue 6).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

from smtp2api.aiohttp_transport import AiohttpTransport


async def drive(client: httpx.AsyncClient, url: str, inflight: int, seconds: float) -> float:
    done = 0
    end = time.perf_counter() + seconds
    body = {"from": {"email": "a@example.com"}, "to": [{"email": "b@example.net"}], "text": "x"}

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            response = await client.post(url, json=body)
            response.raise_for_status()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return done / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    limit = args.inflight + 100  # as app.py: delivery concurrency + 100
    with harness.Sink(args.latency_ms) as sink:
        kinds: dict[str, httpx.AsyncBaseTransport] = {
            "httpx pool": httpx.AsyncHTTPTransport(
                limits=httpx.Limits(max_connections=limit, max_keepalive_connections=100)
            ),
            "aiohttp transport": AiohttpTransport(max_connections=limit),
        }
        ideal = args.inflight / (args.latency_ms / 1000) if args.latency_ms else float("inf")
        for name, transport in kinds.items():
            async with httpx.AsyncClient(transport=transport) as client:
                await drive(client, sink.url, args.inflight, 1.0)  # warm the pool
                rate = await drive(client, sink.url, args.inflight, args.seconds)
            print(
                f"{name:18} {rate:7.0f} requests/s  ({args.inflight} in flight, API "
                f"{args.latency_ms:.0f} ms; ideal {ideal:.0f})"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--inflight", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    asyncio.run(main(parser.parse_args()))
