"""Server CPU per SMTP session of the gateway's front alone, against stock aiosmtpd.

    python bench/front.py [--messages 3000] [--repeat 3] [--before HEAD] [--uvloop]

Each variant is a subprocess serving one listener; ``smtp-source`` (a new connection per
message: connect, HELO, MAIL, RCPT, DATA with a 2 KB message, QUIT) drives it, and the
server's user+system CPU over the run, divided by the sessions, is its cost per session.

* ``aiosmtpd``: stock ``aiosmtpd.smtp.SMTP`` answering ``250 OK`` (as ``bench/baseline.py``).
* ``gateway``: ``GatewaySMTP`` and ``Handler`` of the working tree, policy and guards as
  configured in production, with an ``accept`` that answers 250 at once (no MIME, no spool).
* ``gateway@REV`` (``--before REV``): the same from ``git archive REV src``, so that a change
  is measured before and after in the same run.

Variants alternate within each repeat; the median per variant is reported, with its ratio to
aiosmtpd's. Needs Postfix's ``smtp-source``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import messages
from procstat import Tree

ROOT = Path(__file__).resolve().parent.parent


# --- the servers (run in a subprocess: ``front.py serve ...``) ------------------------------


class _Accept:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        return "250 OK"


def _stock_factory() -> Any:
    from aiosmtpd.smtp import SMTP

    handler = _Accept()
    return lambda: SMTP(handler, hostname="front.local")


def _gateway_factory() -> Any:
    from smtp2api import replies
    from smtp2api.auth import Authenticator
    from smtp2api.logs import configure_logging
    from smtp2api.policy import Policy
    from smtp2api.smtp import ConnectionTracker, FrontConfig, GatewaySMTP, Handler

    # As `smtp2api serve` at the default level; the lines go nowhere, their cost stays.
    configure_logging("info", "json", open(os.devnull, "w"))  # noqa: SIM115

    async def accept(*_: Any, **__: Any) -> Any:
        return replies.R250_OK

    handler = Handler(
        policy=Policy([ipaddress.ip_network("127.0.0.0/8")], []),
        authenticator=Authenticator({}),
        accept=accept,
        new_id=lambda: "front-bench-id",
        route_size_limit=lambda account, sender: 25 * 2**20,
        max_recipients=100,
    )
    front = FrontConfig(
        hostname="front.local",
        kind="plain",
        require_tls=False,
        max_message_size=25 * 2**20,
        max_recipients=100,
        idle_timeout=300.0,
    )
    tracker = ConnectionTracker(20000, 20000)
    return lambda: GatewaySMTP(handler, front=front, tracker=tracker, tls_context=None)


async def _serve(variant: str) -> None:
    factory = _stock_factory() if variant == "aiosmtpd" else _gateway_factory()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host="127.0.0.1", port=0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()  # until SIGTERM


def serve_main(variant: str, src: str | None, use_uvloop: bool) -> None:
    if src:
        sys.path.insert(0, src)
    if use_uvloop:
        import uvloop

        uvloop.run(_serve(variant))
    else:
        asyncio.run(_serve(variant))


# --- the driver -----------------------------------------------------------------------------


def _start(variant: str, src: str | None, use_uvloop: bool) -> tuple[subprocess.Popen[bytes], int]:
    args = [sys.executable, __file__, "serve", "--variant", variant]
    args += (["--src", src] if src else []) + (["--uvloop"] if use_uvloop else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    harness.wait_port(port, proc)
    return proc, port


def _measure(variant: str, src: str | None, args: argparse.Namespace, message: bytes) -> float:
    """Server CPU seconds per session over one smtp-source run."""
    kind = "aiosmtpd" if variant == "aiosmtpd" else "gateway"
    proc, port = _start(kind, src, args.uvloop)
    try:
        harness.run_smtp_source(port, message, 300, args.concurrency)  # warm up
        tree = Tree(proc.pid)
        before = tree.cpu()
        harness.run_smtp_source(port, message, args.messages, args.concurrency)
        time.sleep(0.2)  # let the last sessions' teardown land in the count
        return (tree.cpu() - before) / args.messages
    finally:
        harness.stop(proc)


def _export(rev: str, into: Path) -> str:
    """``src/`` of a git revision, read-only (``git archive``: no change to the checkout)."""
    archive = into / "src.tar"
    with archive.open("wb") as fh:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], stdout=fh, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return str(into / "src")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve")
    serve.add_argument("--variant", choices=["aiosmtpd", "gateway"], required=True)
    serve.add_argument("--src")
    serve.add_argument("--uvloop", action="store_true")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", help="also measure the gateway of this git revision")
    parser.add_argument("--uvloop", action="store_true", help="serve on uvloop (all variants)")
    args = parser.parse_args()
    if args.command == "serve":
        serve_main(args.variant, args.src, args.uvloop)
        return 0
    if harness.smtp_source_path() is None:
        print("smtp-source not found (Debian package postfix)", file=sys.stderr)
        return 1
    message = messages.text_message()
    with tempfile.TemporaryDirectory() as tmp:
        variants: dict[str, str | None] = {"aiosmtpd": None, "gateway": str(ROOT / "src")}
        if args.before:
            variants[f"gateway@{args.before}"] = _export(args.before, Path(tmp))
        runs: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeat):
            for name, src in variants.items():
                runs[name].append(_measure(name, src, args, message))
    base = statistics.median(runs["aiosmtpd"])
    print(f"{len(message)} B message, {args.messages} sessions x {args.repeat}, server CPU:")
    for name, values in runs.items():
        median = statistics.median(values)
        each = " / ".join(f"{v * 1e6:.0f}" for v in values)
        print(f"  {name:<16} {median * 1e6:6.0f} us/session  {median / base:5.2f}x   ({each})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
