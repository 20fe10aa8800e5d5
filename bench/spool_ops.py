"""CPU per op in the SQLite spool's writer thread: one statement vs a savepoint per op.

    .venv/bin/python bench/spool_ops.py [--messages 20000] [--producers 20] [--rounds 4] [--sync]

Each round, in one process and on one file, 20 producers each ``put`` a 2 KB message and
``ack`` it (hybrid mode's INSERT then DELETE), once per path, alternating:

* ``statement``: ``put``/``ack`` as they are (``Writer.execute``: the statement alone);
* ``savepoint``: the same statements through ``Writer.submit`` (``SAVEPOINT op`` / statement /
  ``RELEASE op``), which is what every op took before ``execute`` existed.

Reported: the writer thread's CPU per message (``time.thread_time`` read inside the thread)
and the process's. By default ``PRAGMA synchronous = OFF`` so that fsync's kernel time, which
varies with whatever else the disk is doing, does not drown the difference; ``--sync``
keeps ``FULL``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

from smtp2api.models import Envelope
from smtp2api.spool import SpoolEntry, SqliteSpool
from smtp2api.spool import sqlite_schema as schema

ENVELOPE = Envelope("bench@example.com", ("rcpt@example.net",), peer="127.0.0.1")


class UnsyncedSpool(SqliteSpool):
    def _connect_writer(self) -> sqlite3.Connection:
        conn = super()._connect_writer()
        conn.execute("PRAGMA synchronous = OFF")  # not allowed inside the batch transaction
        return conn


def writer_cpu(conn: sqlite3.Connection) -> float:
    return time.thread_time()  # runs in the writer thread


async def measure(
    spool: SqliteSpool, path: str, messages: int, producers: int
) -> tuple[float, float]:
    raw = b"Subject: bench\r\n\r\n".ljust(2048, b"x")
    left = messages

    async def via_submit(sql: str, params: tuple[object, ...]) -> int:
        return await spool.writer.submit(lambda conn: conn.execute(sql, params).rowcount)

    async def put_ack(entry: SpoolEntry) -> None:
        if path == "statement":
            await spool.put(entry)
            await spool.ack(entry.id)
        else:
            await via_submit(schema.INSERT_ENTRY, schema.encode_entry(entry, time.time(), 30))
            await via_submit("DELETE FROM messages WHERE id = ?", (entry.id,))

    async def producer() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await put_ack(SpoolEntry.new(raw, ENVELOPE, ("outbox",)))

    writer0, cpu0 = await spool.writer.submit(writer_cpu), time.process_time()
    await asyncio.gather(*(producer() for _ in range(producers)))
    cpu = time.process_time() - cpu0
    writer = await spool.writer.submit(writer_cpu) - writer0
    return writer / messages * 1e6, cpu / messages * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="put+ack pairs per run")
    parser.add_argument("--producers", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sync", action="store_true", help="keep synchronous = FULL")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="smtp2api-bench-", dir=args.dir))
    spool = await (SqliteSpool if args.sync else UnsyncedSpool).open(directory / "spool.db")
    runs: dict[str, list[tuple[float, float]]] = {"statement": [], "savepoint": []}

    def step(path: str) -> Awaitable[tuple[float, float]]:
        return measure(spool, path, args.messages, args.producers)

    try:
        await step("statement")  # warm up: file size, caches
        for _ in range(args.rounds):
            for path, results in runs.items():
                results.append(await step(path))
    finally:
        await spool.aclose()
        shutil.rmtree(directory, ignore_errors=True)
    sync = "FULL" if args.sync else "OFF"
    print(f"put+ack, {args.producers} producers, synchronous={sync}, medians of {args.rounds}")
    for path, results in runs.items():
        writer = statistics.median(r[0] for r in results)
        cpu = statistics.median(r[1] for r in results)
        spread = ", ".join(f"{r[0]:.1f}" for r in results)
        print(f"{path:<10} writer {writer:6.1f} us/msg ({spread})  process {cpu:6.1f} us/msg")


if __name__ == "__main__":
    asyncio.run(main())
