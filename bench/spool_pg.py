"""Spool put throughput: PostgreSQL (one and several nodes) as a ratio to SQLite, same run.

    .venv/bin/python bench/spool_pg.py [--seconds 5] [--producers 64] [--size 2048]
                                       [--nodes 1,2] [--dir D] [--json PATH]

Starts its own durable PostgreSQL cluster (``fsync=on``, tests/support/pg.py) under ``--dir``
(default: the system temp dir) and puts the SQLite spool file on the same disk. Each mode
runs ``--producers`` concurrent ``put`` callers per node for ``--seconds``:

* ``sqlite``: the embedded spool, one process (WAL, ``synchronous=FULL``, group commit);
* ``pg x1 hybrid unbatched``: one transaction per put over 16 connections, PostgreSQL's own
  group commit sharing the WAL flushes (what the batching writer is measured against);
* ``pg x1 hybrid``: one node, entries due later (hybrid mode: no ``NOTIFY``);
* ``pg xN queue``: N node processes on one database, entries due now (queue mode: every
  batch also sends the ``NOTIFY`` that wakes idle workers).

Reported: messages/s, commits/s, messages per commit, p50/p99 put latency, and each
PostgreSQL mode's ratio to SQLite. On 2 cores the client processes and the server share the
CPU: more nodes than cores measures contention, not PostgreSQL's limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.pg import start_cluster  # noqa: E402

from smtp2api.models import Envelope  # noqa: E402
from smtp2api.spool import SpoolEntry, SqliteSpool  # noqa: E402
from smtp2api.spool.postgres import PostgresSpool  # noqa: E402

UNBATCHED_CONNECTIONS = 16
ENVELOPE = Envelope("bench@example.com", ("rcpt@example.net",), account="bench", peer="127.0.0.1")


@dataclass
class Result:
    mode: str
    puts: int = 0
    seconds: float = 0.0
    commits: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.puts / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(len(lat) * q))] * 1000 if lat else 0.0

    def line(self, baseline: Result | None) -> str:
        batch = self.puts / self.commits if self.commits else 0.0
        ratio = f"  {self.rate / baseline.rate:>5.2f}x sqlite" if baseline else ""
        return (
            f"{self.mode:<24} {self.rate:>9.0f} msg/s {self.commits / self.seconds:>7.0f} "
            f"commits/s {batch:>6.1f} msg/commit  p50 {self.percentile(0.5):>6.2f} ms  "
            f"p99 {self.percentile(0.99):>7.2f} ms{ratio}"
        )

    def summary(self, baseline: Result | None) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "msg_per_s": round(self.rate),
            "commits_per_s": round(self.commits / self.seconds) if self.seconds else 0,
            "p50_ms": round(self.percentile(0.5), 2),
            "p99_ms": round(self.percentile(0.99), 2),
            "ratio_to_sqlite": round(self.rate / baseline.rate, 3) if baseline else 1.0,
        }


async def drive(spool: Any, seconds: float, producers: int, size: int, due_now: bool) -> Result:
    """``producers`` callers putting back to back for ``seconds`` (after one warm-up put)."""
    raw = (b"Subject: bench\r\nFrom: bench@example.com\r\n\r\n").ljust(size, b"x")
    result = Result("")
    later = time.time() + 3600

    def new() -> SpoolEntry:
        return SpoolEntry.new(
            raw, ENVELOPE, ("outbox",), next_attempt_at=None if due_now else later
        )

    await spool.put(new())
    deadline = 0.0

    async def producer() -> int:
        n = 0
        while time.perf_counter() < deadline:
            entry = new()
            start = time.perf_counter()
            await spool.put(entry)
            result.latencies.append(time.perf_counter() - start)
            n += 1
        return n

    commits_before = spool.stats.commits
    began = time.perf_counter()
    deadline = began + seconds
    counts = await asyncio.gather(*(producer() for _ in range(producers)))
    result.seconds = time.perf_counter() - began
    result.puts = sum(counts)
    result.commits = spool.stats.commits - commits_before
    return result


async def run_sqlite(directory: Path, seconds: float, producers: int, size: int) -> Result:
    path = directory / "spool.db"
    spool = await SqliteSpool.open(path)
    try:
        result = await drive(spool, seconds, producers, size, due_now=True)
    finally:
        await spool.aclose()
    result.mode = "sqlite"
    return result


async def _pg_node(
    url: str, node: str, seconds: float, producers: int, size: int, due: bool, batched: bool
) -> Result:
    # Unbatched: one transaction per put over 16 connections, leaving the sharing of WAL
    # flushes to PostgreSQL's own group commit (the alternative the batching writer beat).
    writers = 2 if batched else UNBATCHED_CONNECTIONS
    spool = PostgresSpool(url, node_id=node, group_commit=batched, writers=writers)
    try:
        await spool.start()
        return await drive(spool, seconds, producers, size, due_now=due)
    finally:
        await spool.aclose()


def _node_process(args: tuple[Any, ...], barrier: Any, out: Any) -> None:
    barrier.wait()  # every node starts at once
    r = asyncio.run(_pg_node(*args))
    out.put((r.puts, r.seconds, r.commits, r.latencies))


def run_pg(
    url: str, nodes: int, seconds: float, producers: int, size: int, due: bool, batched: bool
) -> Result:
    """``nodes`` separate processes, as separate gateways would be, on one database."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(nodes), ctx.Queue()
    procs = [
        ctx.Process(
            target=_node_process,
            args=((url, f"node{i}", seconds, producers, size, due, batched), barrier, out),
        )
        for i in range(nodes)
    ]
    for p in procs:
        p.start()
    parts = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    mode = f"pg x{nodes} {'queue' if due else 'hybrid'}{'' if batched else ' unbatched'}"
    result = Result(mode)
    for puts, secs, commits, latencies in parts:
        result.puts += puts
        result.seconds = max(result.seconds, secs)
        result.commits += commits
        result.latencies += latencies
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per mode")
    parser.add_argument("--producers", type=int, default=64, help="concurrent put() per node")
    parser.add_argument("--size", type=int, default=2048, help="raw message bytes")
    parser.add_argument("--nodes", default="1,2", help="node counts for the queue-mode runs")
    parser.add_argument("--dir", type=Path, default=None, help="disk for both spools")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    node_counts = [int(n) for n in args.nodes.split(",") if n]

    directory = Path(tempfile.mkdtemp(prefix="smtp2api-bench-pg-", dir=args.dir)).resolve()
    directory.chmod(0o711)  # as root, the cluster runs as user postgres and must get through
    if args.dir is not None:
        tempfile.tempdir = str(directory)  # start_cluster's data directory goes there too
    try:
        cluster = start_cluster(durable=True)
    except LookupError as exc:
        sys.exit(f"bench/spool_pg.py needs PostgreSQL: {exc}")
    print(
        f"spool put: {args.producers} producers per node, {args.size} B messages, "
        f"{args.seconds:.1f} s per mode, {os.cpu_count()} CPUs, PostgreSQL at {cluster.datadir}"
    )
    results: list[Result] = []
    try:
        sqlite = asyncio.run(run_sqlite(directory, args.seconds, args.producers, args.size))
        print(sqlite.line(None))
        results.append(sqlite)
        runs = [(1, False, False), (1, False, True)] + [(n, True, True) for n in node_counts]
        for nodes, due, batched in runs:
            url = cluster.new_database("bench")
            r = run_pg(url, nodes, args.seconds, args.producers, args.size, due, batched)
            print(r.line(sqlite))
            results.append(r)
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps([r.summary(sqlite) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
