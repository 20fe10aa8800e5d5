"""The benchmark's yardstick: a bare aiosmtpd server that answers ``250 OK`` to DATA.

    python bench/baseline.py [--port 0] [--uvloop]

Single process, the stock asyncio loop (``--uvloop`` for the comparison only), stock
``aiosmtpd.smtp.SMTP`` with ``decode_data=False``: what any Python SMTP server built on
aiosmtpd costs before it does anything with the mail. Prints the bound port, serves until
SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from typing import Any

from aiosmtpd.smtp import SMTP


class Accept:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        return "250 OK"


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = Accept()
    sock = socket.create_server(("127.0.0.1", port), backlog=4096)
    server = await loop.create_server(lambda: SMTP(handler, hostname="baseline.local"), sock=sock)
    print(sock.getsockname()[1], flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.port))
    else:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
