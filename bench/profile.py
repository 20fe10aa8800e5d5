"""Where a gateway's CPU goes under load: py-spy samples one gateway process while
``smtp-source`` sends, and the samples are summed per function (self time) and per module
(inclusive time).

    python bench/profile.py --scenario text2k --messages 4000 [--top 40] [--mode hybrid]

Needs ``py-spy`` (in the test extra) and permission to ptrace the child (root, or
``kernel.yama.ptrace_scope = 0``). The gateway runs with one process so one PID holds all
of its work; the stacks of every thread are counted (the SQLite writer thread too).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import harness
import messages

SCENARIOS = {"text2k": messages.text_message, "multipart10k": messages.multipart_message}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="text2k")
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--mode", default="hybrid")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", help="keep the raw (collapsed) stacks in this file")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    message = SCENARIOS[args.scenario]()
    config = harness.GatewayConfig(mode=args.mode, processes=1)
    with (
        harness.Sink() as sink,
        harness.gateway(config, sink) as server,
        tempfile.TemporaryDirectory() as tmp,
    ):
        raw = Path(args.out) if args.out else Path(tmp) / "stacks.txt"
        harness.run_smtp_source(server.port, message, 300, args.concurrency)  # warm up
        record = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(server.proc.pid),
                "--format",
                "raw",
                "--threads",
                "--rate",
                str(args.rate),
                "--output",
                str(raw),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        result: dict[str, object] = {}
        load = threading.Thread(
            target=lambda: result.update(
                harness.run_smtp_source(server.port, message, args.messages, args.concurrency)
            )
        )
        load.start()
        load.join()
        record.send_signal(2)
        record.wait(60)
        print(f"{args.scenario}: {result.get('rate', 0):.0f} msg/s (one process, profiled)")
        report(raw.read_text(), args.top)
    return 0


def report(collapsed: str, top: int) -> None:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[_name(frames[-1])] += count
        for module in {_module(frame) for frame in frames}:
            inclusive[module] += count
    print(f"\n{total} samples; self time by function:")
    for name, count in own.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {name}")
    print("\ninclusive time by module (a sample counts once per module on its stack):")
    for name, count in inclusive.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {name}")


def _name(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:line)"
    function, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    return f"{function} ({_short(path)})"


def _module(frame: str) -> str:
    _, _, where = frame.partition(" (")
    return _short(where.rsplit(":", 1)[0])


def _short(path: str) -> str:
    for marker in ("site-packages/", "smtp2api/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path or "?"


if __name__ == "__main__":
    sys.exit(main())
