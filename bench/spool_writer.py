"""The SQLite spool's write path: CPU per message and put latency, 1 or N processes per file.

    .venv/bin/python bench/spool_writer.py [--messages 5000] [--producers 20] [--processes 1,2]
        [--variants new,noflock] [--head-src DIR] [--rounds 2] [--rate 0] [--work-us 0] [--dir D]

Every process opens the same spool file and runs ``--producers`` tasks that each ``put`` a
2 KB message and then ``ack`` it, as hybrid mode does for a delivered message, until the
process has done ``--messages`` pairs; or, with ``--rate R``, starts a put+ack every 1/R s
(open loop). ``--work-us`` burns that much CPU in the event loop per message, holding the
GIL as the rest of a gateway would, which the writer thread has to win back after each
SQLite call. Reported per run: the put's latency (p50/p99), the
pairs/s of all processes together, and CPU per message: the whole process (event loop and
writer thread) and the writer thread alone (``time.thread_time`` read inside the thread).

Variants run in separate subprocesses, alternated round by round (A/B/A/B) so that the noise
of a shared machine falls on each alike:

* ``new``: the working tree's spool (``src/``), flock on;
* ``noflock``: the same with ``write_lock=False`` (SQLite's busy handler alone);
* ``blocking``: the flock taken by a plain blocking ``flock(2)`` in the writer thread, without
  ``WriteLock``'s bounded wait (its helper thread), to see what the bound costs;
* ``head``: another source tree (``--head-src``, e.g. ``git archive HEAD src | tar -x -C /tmp/h``
  then ``--head-src /tmp/h/src``), the spool as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


# --- one process ----------------------------------------------------------------------------


async def child(
    path: Path, messages: int, producers: int, size: int, flock: bool, work: float, rate: float
) -> None:
    from smtp2api.models import Envelope
    from smtp2api.spool import SpoolEntry, SqliteSpool

    if os.environ.get("BENCH_BLOCKING_FLOCK"):
        import fcntl

        from smtp2api.spool.sqlite_files import WriteLock

        def blocking(self: Any) -> bool:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            return True

        WriteLock.acquire = blocking  # type: ignore[method-assign]

    kwargs: dict[str, Any] = {}
    if "write_lock" in inspect.signature(SqliteSpool.__init__).parameters:
        kwargs["write_lock"] = flock
    spool = await SqliteSpool.open(path, **kwargs)
    envelope = Envelope("bench@example.com", ("rcpt@example.net",), peer="127.0.0.1")
    raw = b"Subject: bench\r\nFrom: bench@example.com\r\n\r\n".ljust(size, b"x")
    latencies: list[float] = []
    left = messages

    async def one() -> None:
        entry = SpoolEntry.new(raw, envelope, ("outbox",))
        start = time.perf_counter()
        await spool.put(entry)
        latencies.append(time.perf_counter() - start)
        await spool.ack(entry.id)
        spin = time.thread_time() + work  # the rest of a gateway's work, holding the GIL
        while time.thread_time() < spin:
            pass

    async def producer() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    async def open_loop() -> None:  # a new message every 1/rate s, whatever the spool does
        tasks, t0 = [], time.perf_counter()
        for i in range(messages):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)

    def writer_cpu(conn: object) -> float:
        return time.thread_time()  # runs in the writer thread

    await spool.put(SpoolEntry.new(raw, envelope, ("outbox",)))  # warm up: file, WAL, caches
    print("ready", flush=True)
    sys.stdin.readline()  # "go": every process starts together
    commits, writer0 = spool.stats.commits, await spool.writer.submit(writer_cpu)
    cpu0, began = time.process_time(), time.perf_counter()
    if rate > 0:
        await open_loop()
    else:
        await asyncio.gather(*(producer() for _ in range(producers)))
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu0
    writer = await spool.writer.submit(writer_cpu) - writer0
    commits = spool.stats.commits - commits
    await spool.aclose()
    result = {"lat": latencies, "elapsed": elapsed, "cpu": cpu, "writer": writer}
    result["commits"] = commits
    print(json.dumps(result), flush=True)


# --- the driver -----------------------------------------------------------------------------


def run_once(
    variant: str, processes: int, args: argparse.Namespace, directory: Path
) -> dict[str, float]:
    src = str(args.head_src if variant == "head" else SRC)
    env = {**os.environ, "PYTHONPATH": src}
    path = directory / f"{variant}-{processes}.db"
    cmd = [sys.executable, __file__, "--child", str(path), "--messages", str(args.messages)]
    cmd += ["--producers", str(args.producers), "--size", str(args.size)]
    cmd += ["--work-us", str(args.work_us), "--rate", str(args.rate)]
    cmd += ["--no-flock"] if variant == "noflock" else []
    if variant == "blocking":
        env["BENCH_BLOCKING_FLOCK"] = "1"
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(processes)
    ]
    try:
        for p in procs:  # one at a time: the first creates and migrates the file
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    lat = sorted(x for r in results for x in r["lat"])
    total = len(lat)
    return {
        "rate": total / max(r["elapsed"] for r in results),
        "p50": lat[total // 2] * 1000,
        "p99": lat[min(total - 1, int(total * 0.99))] * 1000,
        "cpu_us": sum(r["cpu"] for r in results) / total * 1e6,
        "writer_us": sum(r["writer"] for r in results) / total * 1e6,
        "per_commit": total * 2 / max(1, sum(r["commits"] for r in results)),
        "spread": min(len(r["lat"]) / max(r["elapsed"], 1e-9) for r in results)
        / max(len(r["lat"]) / max(r["elapsed"], 1e-9) for r in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000, help="put+ack pairs per process")
    parser.add_argument("--producers", type=int, default=20, help="concurrent tasks per process")
    parser.add_argument("--processes", default="1,2", help="comma list of process counts")
    parser.add_argument("--variants", default="new,noflock", help="new, noflock, head")
    parser.add_argument("--head-src", type=Path, help="source tree for the 'head' variant")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds; medians reported")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="open loop: messages/s per process (0: closed)"
    )
    parser.add_argument(
        "--work-us", type=float, default=0.0, help="CPU burnt in the event loop per message"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the spool files go")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-flock", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        flock = not args.no_flock
        work = args.work_us / 1e6
        argv = (args.child, args.messages, args.producers, args.size, flock, work, args.rate)
        asyncio.run(child(*argv))
        return 0
    variants = args.variants.split(",")
    if "head" in variants and args.head_src is None:
        parser.error("the 'head' variant needs --head-src")
    counts = [int(n) for n in args.processes.split(",")]
    directory = Path(tempfile.mkdtemp(prefix="smtp2api-bench-", dir=args.dir)).resolve()
    print(
        f"put+ack: {args.messages} pairs x {args.producers} producers per process, "
        f"{args.size} B, {directory}, {os.cpu_count()} CPUs, medians of {args.rounds} rounds"
    )
    keys = ("rate", "p50", "p99", "cpu_us", "writer_us", "per_commit", "spread")
    try:
        for processes in counts:
            runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for variant in variants:
                    runs[variant].append(run_once(variant, processes, args, directory))
            for variant in variants:
                med = {k: statistics.median(r[k] for r in runs[variant]) for k in keys}
                print(
                    f"{processes} proc {variant:<8} {med['rate']:>6.0f} msg/s  "
                    f"put p50 {med['p50']:>6.2f} ms p99 {med['p99']:>7.2f} ms  "
                    f"CPU {med['cpu_us']:>5.0f} us/msg (writer {med['writer_us']:>4.0f})  "
                    f"{med['per_commit']:>5.1f} ops/commit  slowest/fastest {med['spread']:.2f}"
                )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
