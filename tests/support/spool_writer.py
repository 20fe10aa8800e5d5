"""Holding the SQLite spool's writer thread still, to shape its batches in tests."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator

from smtp2api.spool import SqliteSpool


@contextlib.asynccontextmanager
async def writer_blocked(spool: SqliteSpool) -> AsyncIterator[None]:
    """Hold the writer thread inside an op of a write transaction, so that what is submitted
    meanwhile forms one batch (and a peer process waits for the write lock)."""
    started, gate = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> None:
        started.set()
        gate.wait(10)

    blocker = asyncio.create_task(spool.writer.submit(block))
    assert await asyncio.to_thread(started.wait, 10)
    try:
        yield
        await asyncio.sleep(0)  # let the caller's tasks run up to their submit()
    finally:
        gate.set()
        await blocker
