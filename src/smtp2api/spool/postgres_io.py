"""The PostgreSQL spool's I/O: a batching writer over a connection pool, and the listener.

``Batcher``: every write of the spool is one SQL statement. Callers enqueue a statement and
await its result; a writer takes everything queued, sends it in one pipelined round trip
inside ONE transaction and commits once, so concurrent puts share a commit (and its WAL
flush) as they do in the SQLite spool. ``bench/spool_pg.py`` measures the alternative, one
transaction per put over 16 connections (PostgreSQL's own group commit sharing the flushes):
on 2 cores, 64 concurrent puts of 2 KiB, batching was 3.7-5.1x faster. A batch that fails while
its connection stays up was rolled back, so its statements are re-run one per transaction
and only the bad one fails; a connection lost mid-batch fails the whole batch (the commit may
or may not have happened: callers answer 4xx, the client retries: at least once).

``Listener``: one dedicated connection that ``LISTEN``s, so idle workers on every node wake
as soon as any node commits due work, and that holds this node's advisory lock (postgres.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import AsyncConnection

from smtp2api.errors import SpoolError, SpoolFull
from smtp2api.spool.postgres_pool import Pool

log = structlog.get_logger(__name__)

Params = Sequence[object] | Mapping[str, object]
CHANNEL = "smtp2api_spool"
NOTIFY = f"SELECT pg_notify('{CHANNEL}', '')"
_DISK_FULL = "53100"
# A statement the server refused, or parameters the driver could not send (a NUL in text).
_CLIENT_OR_SERVER = (
    psycopg.Error,
    ValueError,
    TypeError,
)  # https://www.postgresql.org/docs/current/errcodes-appendix.html


def pg_error(exc: BaseException, action: str = "write") -> SpoolError:
    """A log-safe ``SpoolError`` for ``exc``: the SQLSTATE and class, never the server's text
    (which can quote row data) nor the connection string (which can hold a password)."""
    if isinstance(exc, SpoolError):
        return (SpoolFull if isinstance(exc, SpoolFull) else SpoolError)(str(exc))
    if isinstance(exc, TimeoutError):
        return SpoolError(f"spool {action} failed (timed out)")
    state = getattr(getattr(exc, "diag", None), "sqlstate", None)
    if state == _DISK_FULL:
        return SpoolFull(f"spool {action} failed: storage full ({state})")
    name = type(exc).__name__
    return SpoolError(
        f"spool {action} failed ({state} {name})" if state else f"spool {action} failed ({name})"
    )


@dataclass
class BatchStats:
    """Counters for tests and the benchmark."""

    ops: int = 0  # statements committed
    commits: int = 0
    failed_batches: int = 0  # batches that did not commit as a whole
    largest_batch: int = 0


@dataclass(slots=True)
class Op:
    sql: str
    params: Params
    fetch: bool  # the statement RETURNs rows: the result is the rows, else the rowcount
    notify: bool  # wake the listeners of every node once this commits
    future: asyncio.Future[Any]


def _alive(conn: AsyncConnection[Any]) -> bool:
    return not conn.closed and not conn.broken


class Batcher:
    """Group-committing writer tasks over ``pool``. ``submit`` returns after the commit."""

    def __init__(
        self,
        pool: Pool,
        *,
        writers: int = 2,
        max_batch: int = 512,
        stats: BatchStats | None = None,
    ) -> None:
        self._pool = pool
        self._writers = max(1, writers)
        self.max_batch = max(1, max_batch)
        self.stats = BatchStats() if stats is None else stats
        self._queue: asyncio.Queue[Op | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def submit(
        self, sql: str, params: Params = (), *, fetch: bool = False, notify: bool = False
    ) -> Any:
        if self._closed:
            raise SpoolError("spool is closed")
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(), name=f"smtp2api-spool-writer-{i}")
                for i in range(self._writers)
            ]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Op(sql, params, fetch, notify, future))
        # Shielded: a cancelled caller does not withdraw its statement (it may still commit).
        return await asyncio.shield(future)

    async def close(self) -> None:
        """Commit what is queued, then stop the writers."""
        if self._closed:
            return
        self._closed = True
        for _ in self._tasks:
            self._queue.put_nowait(None)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                await self._write(batch)
            except Exception as exc:  # a bug must not kill the writer with callers waiting
                log.exception("spool_writer_error")
                _settle([(op, False, pg_error(exc)) for op in batch])
            if stop:
                return

    async def _write(self, batch: list[Op]) -> None:
        try:
            async with self._pool.connection() as conn:
                try:
                    results = await _execute(conn, batch)
                except _CLIENT_OR_SERVER as exc:
                    if not _alive(conn) or len(batch) == 1:
                        raise
                    # The server rolled the batch back (or it never left the client): isolate
                    # the bad statement by running each one alone.
                    self.stats.failed_batches += 1
                    _settle([await _alone(conn, op) for op in batch])
                    log.warning("spool_batch_split", ops=len(batch), error=str(pg_error(exc)))
                    return
        except (*_CLIENT_OR_SERVER, SpoolError, OSError) as exc:
            self.stats.failed_batches += 1
            error = pg_error(exc)
            log.error("spool_batch_failed", ops=len(batch), error=str(error))
            _settle([(op, False, error) for op in batch])
            return
        self.stats.commits += 1
        self.stats.ops += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        _settle([(op, True, result) for op, result in zip(batch, results, strict=True)])


async def _execute(conn: AsyncConnection[Any], batch: list[Op]) -> list[Any]:
    """Run ``batch`` in one transaction, pipelined: one round trip, one commit."""
    cursors = []
    async with conn.pipeline(), conn.transaction():
        for op in batch:
            cur = conn.cursor()
            await cur.execute(op.sql, op.params)
            cursors.append(cur)
        if any(op.notify for op in batch):
            # Delivered at commit, to every node's listener; one per batch is enough.
            await conn.execute(NOTIFY)
    results: list[Any] = []
    for op, cur in zip(batch, cursors, strict=True):
        results.append(await cur.fetchall() if op.fetch else cur.rowcount)
    return results


async def _alone(conn: AsyncConnection[Any], op: Op) -> tuple[Op, bool, Any]:
    try:
        (result,) = await _execute(conn, [op])
    except _CLIENT_OR_SERVER as exc:
        return op, False, pg_error(exc)
    return op, True, result


def _settle(outcomes: list[tuple[Op, bool, Any]]) -> None:
    for op, ok, value in outcomes:
        if op.future.done():
            continue
        if ok:
            op.future.set_result(value)
        else:
            op.future.set_exception(value)


class Listener:
    """A dedicated connection: ``LISTEN`` for work, and this node's advisory lock.

    Reconnects on its own; after every (re)connect the subscribers are woken once, since
    notifications sent while nobody listened are lost. ``lock_key`` (SQL returning a bigint)
    is locked with ``pg_try_advisory_lock`` at each connect; ``node_locked`` says if we hold it.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        lock_sql: str,
        lock_params: Sequence[object],
        keepalive: float = 30.0,
        retry_max: float = 10.0,
    ) -> None:
        self._connect = connect
        self._lock_sql = lock_sql
        self._lock_params = lock_params
        self._keepalive = keepalive
        self._retry_max = retry_max
        self._subscribers: set[Callable[[], None]] = set()
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.node_locked = False
        self.last_error: SpoolError | None = None

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._subscribers.add(callback)
        self.start()
        return lambda: self._subscribers.discard(callback)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="smtp2api-spool-listener")

    async def wait_connected(self) -> None:
        """Until the listener is connected and has tried the node lock (bound it by a timeout)."""
        self.start()
        await self._connected.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._connected.clear()
        self.node_locked = False

    def _wake(self) -> None:
        for callback in list(self._subscribers):
            callback()

    async def _run(self) -> None:
        delay = 0.2
        while True:
            try:
                await self._session()
            except Exception as exc:  # a bug too: wake-ups must not stop for good
                if self._connected.is_set():
                    delay = 0.2  # it was up: retry soon
                self.last_error = pg_error(exc, "listen")
                expected = isinstance(exc, psycopg.Error | OSError)
                log.warning(
                    "spool_listener_lost",
                    error=str(self.last_error),
                    retry_in=delay,
                    exc_info=not expected,
                )
            self._connected.clear()
            self.node_locked = False
            await asyncio.sleep(delay)
            delay = min(self._retry_max, delay * 2)

    async def _session(self) -> None:
        conn: AsyncConnection[Any] = await self._connect()
        async with conn:
            cur = await conn.execute(self._lock_sql, self._lock_params)
            row = await cur.fetchone()
            self.node_locked = bool(row and row[0])
            await conn.execute(f"LISTEN {CHANNEL}")
            self.last_error = None
            self._connected.set()
            self._wake()
            while True:
                async for _ in conn.notifies(timeout=self._keepalive):
                    self._wake()
                # Quiet for a while: a silently dropped connection only shows when used.
                await conn.execute("SELECT 1")
