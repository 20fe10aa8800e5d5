"""Spool put throughput with group commit ON vs OFF, same run, same disk.

    .venv/bin/python bench/spool_commit.py [--seconds 10] [--producers 64] [--size 2048] [--dir D]

N producers each ``put`` 2 KB messages back to back for half the time with group commit OFF
(one transaction and one WAL fsync per message), then half with it ON (one per batch). The
headline is the ON/OFF ratio: what sharing fsyncs buys under ``synchronous=FULL``. Run it on
the disk the spool will live on (``--dir``); on tmpfs fsync is free and the ratio means little.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from smtp2api.models import Envelope
from smtp2api.spool import SpoolEntry, SqliteSpool

ENVELOPE = Envelope("bench@example.com", ("rcpt@example.net",), account="bench", peer="127.0.0.1")


@dataclass
class Result:
    mode: str
    puts: int
    seconds: float
    commits: int
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.puts / self.seconds

    def line(self) -> str:
        lat = sorted(self.latencies)
        p50 = lat[len(lat) // 2] * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        batch = self.puts / self.commits if self.commits else 0.0
        return (
            f"{self.mode:<16} {self.rate:>10.0f} msg/s  {self.commits / self.seconds:>8.0f} "
            f"commits/s  {batch:>6.1f} msg/commit  p50 {p50:>7.2f} ms  p99 {p99:>7.2f} ms"
        )


async def run(
    directory: Path, group_commit: bool, seconds: float, producers: int, size: int
) -> Result:
    raw = (b"Subject: bench\r\nFrom: bench@example.com\r\n\r\n").ljust(size, b"x")
    path = directory / f"spool-{'on' if group_commit else 'off'}.db"
    spool = await SqliteSpool.open(path, group_commit=group_commit)
    latencies: list[float] = []
    deadline = 0.0

    async def producer() -> int:
        n = 0
        while time.perf_counter() < deadline:
            entry = SpoolEntry.new(raw, ENVELOPE, ("outbox",))
            start = time.perf_counter()
            await spool.put(entry)
            latencies.append(time.perf_counter() - start)
            n += 1
        return n

    try:
        await spool.put(SpoolEntry.new(raw, ENVELOPE, ("outbox",)))  # warm up: file, WAL
        commits_before = spool.stats.commits
        began = time.perf_counter()
        deadline = began + seconds
        counts = await asyncio.gather(*(producer() for _ in range(producers)))
        elapsed = time.perf_counter() - began
        commits = spool.stats.commits - commits_before
    finally:
        await spool.aclose()
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    mode = "group commit ON" if group_commit else "group commit OFF"
    return Result(mode, sum(counts), elapsed, commits, latencies)


def filesystem_of(path: Path) -> str:
    """The filesystem type holding ``path`` (Linux), to flag tmpfs where fsync costs nothing."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                target = fields[1]
                if str(path).startswith(target) and len(target) > len(best):
                    best, fstype = target, fields[2]
    except OSError:
        pass
    return fstype


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="total, split over modes")
    parser.add_argument("--producers", type=int, default=64, help="concurrent put() callers")
    parser.add_argument("--size", type=int, default=2048, help="raw message bytes")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the spool files")
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="smtp2api-bench-", dir=args.dir)).resolve()
    fstype = filesystem_of(directory)
    print(
        f"spool put: {args.producers} producers, {args.size} B messages, "
        f"{args.seconds / 2:.1f} s per mode, {directory} ({fstype}), {os.cpu_count()} CPUs"
    )
    if fstype in ("tmpfs", "ramfs"):
        print("warning: fsync is free on tmpfs; use --dir on a real disk for a meaningful ratio")
    try:
        off = await run(directory, False, args.seconds / 2, args.producers, args.size)
        print(off.line())
        on = await run(directory, True, args.seconds / 2, args.producers, args.size)
        print(on.line())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"ratio ON/OFF: {on.rate / off.rate:.1f}x")
    per_commit = off.seconds / off.commits * 1000 if off.commits else 0.0
    print(f"(OFF: {per_commit:.2f} ms per commit, i.e. per WAL fsync, on this disk)")


if __name__ == "__main__":
    asyncio.run(main())
