"""Off-loop SQLite I/O for the spool: one group-committing writer thread and one reader thread.

sqlite3 calls block, and a SQLite database has a single writer at a time anyway
(https://www.sqlite.org/wal.html, "Concurrency"), so every write runs in one thread that owns
one connection. Callers enqueue an op and await a future; the thread takes everything queued,
runs it in ONE transaction, commits once (one fsync of the WAL under ``synchronous=FULL``) and
then settles all the futures. Durability costs one fsync per batch instead of one per message,
and a batch forms by itself while the previous fsync is in flight: no timer, no added latency.
With several processes on one file, the transaction is also taken under the spool's flock
(``sqlite_files.WriteLock``), and the batch is gathered once it is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import structlog

from smtp2api.errors import SpoolError, SpoolFull
from smtp2api.spool.base import Withdrawn
from smtp2api.spool.sqlite_files import WriteLock

T = TypeVar("T")
log = structlog.get_logger(__name__)

_SQLITE_FULL = 13  # https://www.sqlite.org/rescode.html#full
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Errors after which SQLite may already have rolled the whole transaction back
# (https://www.sqlite.org/lang_transaction.html, "Response To Errors Within A Transaction"):
# a batch that meets one fails as a unit. Constraint and binding errors only fail their op.
_OP_LOCAL = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)


def spool_error(exc: BaseException, action: str = "write") -> SpoolError:
    """A new, log-safe ``SpoolError`` for ``exc``; ``SpoolFull`` when storage is exhausted."""
    if isinstance(exc, SpoolError):  # a copy: one exception object per awaiting future
        return (SpoolFull if isinstance(exc, SpoolFull) else SpoolError)(str(exc))
    full = False
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        full = (code is not None and code & 0xFF == _SQLITE_FULL) or "is full" in str(exc)
    elif isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        full = exc.errno in _FULL_ERRNOS
    else:
        name = type(exc).__name__
    if full:
        return SpoolFull(f"spool {action} failed: storage full ({name})")
    return SpoolError(f"spool {action} failed ({name})")


@dataclass
class WriterStats:
    """Counters for tests, the benchmark and metrics (plain ints: reads may be a bit stale)."""

    ops: int = 0  # ops committed
    commits: int = 0  # successful COMMITs (= fsyncs of the WAL)
    failed_batches: int = 0
    largest_batch: int = 0
    withdrawn: int = 0  # puts taken back before they were written (hybrid mode's race)
    quarantined: int = 0  # rows moved to the quarantine table (counted by the spool)


_QUEUED, _TAKEN, _WITHDRAWN = 0, 1, 2  # an op's state; changed under Writer._claim only


class _Pending:
    """One op: ``fn(conn)``, or when ``fn`` is None the single statement ``sql``/``params``.
    ``key``: the op may be withdrawn by that key until the writer takes it."""

    __slots__ = ("due", "fn", "future", "key", "loop", "params", "sql", "state")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any] | None,
        sql: str,
        params: Sequence[object],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
        *,
        key: str | None = None,
        due: float = 0.0,
    ) -> None:
        self.due = due  # monotonic time before which the writer does not start the op
        self.fn = fn
        self.sql = sql
        self.params = params
        self.future = future
        self.loop = loop
        self.key = key
        self.state = _QUEUED


_Outcome = tuple[_Pending, bool, Any]  # (op, succeeded, result or exception)


def _settle(outcomes: list[_Outcome], withdrawable: dict[str, _Pending]) -> None:
    for pending, ok, value in outcomes:
        if pending.key is not None and withdrawable.get(pending.key) is pending:
            del withdrawable[pending.key]  # ran (or failed): too late to withdraw it
        if pending.future.done():  # the caller was cancelled; the op ran anyway
            continue
        if ok:
            pending.future.set_result(value)
        else:
            pending.future.set_exception(value)


def _rollback(conn: sqlite3.Connection) -> None:
    # After some errors SQLite has already rolled back; a second ROLLBACK would then fail.
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.warning("spool_rollback_failed")


class Writer:
    """The writer thread. ``submit(fn)`` runs ``fn(conn)`` inside a batch transaction, and
    ``execute(sql, params)`` one statement, returning its rowcount.

    ``fn`` must only touch the database through ``conn``; its result is returned once the
    batch has committed. If the commit fails, every op of the batch fails: none is durable.
    Cancelling the awaiting caller does not withdraw a submitted op (it may still commit):
    at-least-once, never "said durable but lost".

    ``open_lock`` (called in the thread, after ``connect``) gives the flock taken around each
    transaction, or None to rely on SQLite's busy handler alone.
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        open_lock: Callable[[], WriteLock | None] | None = None,
        group_commit: bool = True,
        max_batch: int = 1024,
        hold: float = 0.0,
        stats: WriterStats | None = None,
        name: str = "smtp2api-spool-writer",
    ) -> None:
        self._connect = connect
        self._open_lock = open_lock
        self.lock: WriteLock | None = None  # set in the thread; None: no flock (or given up)
        self.group_commit = group_commit
        self.hold = hold
        self.max_batch = max(1, max_batch) if group_commit else 1
        self.stats = WriterStats() if stats is None else stats
        self.fault_hook: Callable[[], None] | None = None  # test seam: runs before COMMIT
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._withdrawable: dict[str, _Pending] = {}  # keyed ops not settled yet (loop side)
        self._claim = threading.Lock()  # an op is either taken by the thread or withdrawn
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started: asyncio.Future[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Start the thread; it opens the connection and prepares the file (raises SpoolError)."""
        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        self._thread.start()
        try:
            await self._started
        except BaseException:
            self._closed = True
            raise

    async def submit(self, fn: Callable[[sqlite3.Connection], T], *, key: str | None = None) -> T:
        return cast(T, await self._enqueue(fn, "", (), key))

    async def execute(self, sql: str, params: Sequence[object], *, key: str | None = None) -> int:
        """Run one statement; its rowcount once committed. Cheaper than ``submit``: no savepoint.

        With a ``key``, ``withdraw(key)`` can take the op back until the thread takes it."""
        return cast(int, await self._enqueue(None, sql, params, key))

    def _enqueue(
        self,
        fn: Callable[[sqlite3.Connection], Any] | None,
        sql: str,
        params: Sequence[object],
        key: str | None,
    ) -> asyncio.Future[Any]:
        if self._closed:
            raise SpoolError("spool is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        due = time.monotonic() + self.hold if key is not None and self.hold > 0 else 0.0
        item = _Pending(fn, sql, params, future, loop, key=key, due=due)
        if key is not None:
            self._withdrawable[key] = item
        self._queue.put(item)
        return future

    def withdraw(self, key: str) -> bool:
        """Take back the op submitted with ``key`` if the thread has not taken it yet: it will
        never run, and its awaiter gets ``Withdrawn``. Call from the op's event loop."""
        item = self._withdrawable.pop(key, None)
        if item is None:
            return False
        with self._claim:
            if item.state != _QUEUED:
                return False
            item.state = _WITHDRAWN
        self.stats.withdrawn += 1
        if not item.future.done():
            item.future.set_exception(Withdrawn())
        return True

    def _take(self, item: _Pending) -> bool:
        """In the thread: claim ``item`` for this batch unless it was withdrawn."""
        if item.key is None:
            return True
        with self._claim:
            if item.state == _WITHDRAWN:
                return False
            item.state = _TAKEN
            return True

    async def close(self) -> None:
        """Run what is queued, then stop the thread and close the connection."""
        if self._closed:
            return
        self._closed = True
        if self._thread.ident is None:  # never started
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    # --- writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        started = self._started
        assert started is not None
        try:
            self.lock = None if self._open_lock is None else self._open_lock()
            locked = self._acquire()  # the migration, too, waits in the kernel's queue
            try:
                conn = self._connect()
            finally:
                self._release(locked)
        except BaseException as exc:  # noqa: BLE001 - reported to start(), which raises it
            self._close_lock()
            error = spool_error(exc, "open")
            started.get_loop().call_soon_threadsafe(_set_exception, started, error)
            return
        started.get_loop().call_soon_threadsafe(_set_result, started)
        try:
            self._serve(conn)
        finally:
            self._closed = True  # from now on submit() refuses instead of waiting forever
            try:
                conn.close()
            except sqlite3.Error:
                log.warning("spool_close_failed")
            self._close_lock()
            self._fail_leftovers()

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            if first.due:
                # A withdrawable put waits up to ``hold`` for the answer that makes it moot
                # (the commit_delay idea of PostgreSQL, for a reason of our own). Anything
                # queued meanwhile joins its batch: the wait also groups commits.
                wait = first.due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            if not self._take(first):
                continue  # withdrawn: no lock, no transaction, no fsync for it
            batch = [first]
            stop = False
            # The lock first, then the rest of the batch: what is queued while another
            # process commits joins this transaction.
            locked = self._acquire()
            try:
                stop = self._fill(batch)
                batch = [item for item in batch if item is first or self._take(item)]
                outcomes = self._commit_batch(conn, batch)
            except Exception as exc:  # a bug must not kill the thread with callers waiting
                log.exception("spool_writer_error")
                outcomes = [(item, False, spool_error(exc)) for item in batch]
            finally:
                self._release(locked)  # before waking the callers: the others need not wait
            self._deliver(outcomes)
            if stop:
                return

    def _fill(self, batch: list[_Pending]) -> bool:
        """Add what is queued to ``batch``; True if the stop marker was met."""
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.append(item)
        return False

    def _acquire(self) -> bool:
        lock = self.lock
        if lock is None:
            return False
        try:
            # False: a peer held it past the timeout (stopped? hung?); SQLite's busy timeout
            # decides, as it would without the lock.
            return lock.acquire()
        except OSError as exc:  # e.g. ENOLCK: no flock on this filesystem
            log.warning("spool_write_lock_failed", error=str(spool_error(exc, "lock")))
            self._close_lock()
            return False

    def _release(self, locked: bool) -> None:
        if locked and self.lock is not None:
            try:
                self.lock.release()
            except OSError as exc:  # closing the descriptor releases it all the same
                log.warning("spool_write_lock_failed", error=str(spool_error(exc, "unlock")))
                self._close_lock()

    def _close_lock(self) -> None:
        lock, self.lock = self.lock, None
        if lock is not None:
            with contextlib.suppress(OSError):
                lock.close()

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Pending]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        try:
            # IMMEDIATE takes the write lock up front (waiting up to busy_timeout for another
            # process, e.g. the queue CLI), so reads inside an op see what the op will change.
            conn.execute("BEGIN IMMEDIATE")
            outcomes = [self._run_op(conn, item) for item in batch]
            if self.fault_hook is not None:
                self.fault_hook()
            conn.execute("COMMIT")
        except Exception as exc:  # any failure fails the whole batch
            _rollback(conn)
            self.stats.failed_batches += 1
            # A traceback only for the unexpected: a full or read-only disk is not a bug.
            expected = isinstance(exc, sqlite3.Error | OSError | SpoolError)
            log.error(
                "spool_batch_failed",
                ops=len(batch),
                error=str(spool_error(exc)),
                exc_info=not expected,
            )
            outcomes = [(item, False, spool_error(exc)) for item in batch]
        else:
            self.stats.commits += 1
            self.stats.ops += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        return outcomes

    def _run_op(self, conn: sqlite3.Connection, item: _Pending) -> _Outcome:
        fn = item.fn
        if fn is None:
            # One statement needs no savepoint: a statement that fails a constraint is backed
            # out by SQLite itself and "the transaction remains active" (ABORT, the default
            # conflict resolution, https://www.sqlite.org/lang_conflict.html); a binding error
            # fails before the statement runs.
            try:
                return item, True, conn.execute(item.sql, item.params).rowcount
            except Exception as exc:
                if _fails_the_batch(conn, exc):
                    raise
                return item, False, _op_error(exc)
        # A savepoint per op of several statements: a constraint error (or a bug) in one op
        # undoes that op only.
        conn.execute("SAVEPOINT op")
        try:
            value = fn(conn)
        except Exception as exc:
            if _fails_the_batch(conn, exc):
                raise
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            return item, False, _op_error(exc)
        conn.execute("RELEASE op")
        return item, True, value

    def _deliver(self, outcomes: list[_Outcome]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, items in by_loop.items():
            # One wake-up of the event loop per batch, not one per op. RuntimeError: the loop
            # is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, items, self._withdrawable)

    def _fail_leftovers(self) -> None:
        leftovers: list[_Outcome] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                leftovers.append((item, False, SpoolError("spool is closed")))
        self._deliver(leftovers)


def _fails_the_batch(conn: sqlite3.Connection, exc: Exception) -> bool:
    fatal = isinstance(exc, sqlite3.Error) and not isinstance(exc, _OP_LOCAL)
    return fatal or not conn.in_transaction


def _op_error(exc: Exception) -> SpoolError:
    """The error of an op that fails alone (called in its ``except`` block)."""
    if not isinstance(exc, SpoolError | sqlite3.Error):
        log.exception("spool_op_failed")
    return spool_error(exc)


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _set_exception(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class Reader:
    """One read connection in one thread. WAL readers see the last commit and neither block
    the writer nor wait for it (https://www.sqlite.org/wal.html)."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._conn: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="smtp2api-spool-reader")
        self._closed = False

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise SpoolError("spool is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if self._conn is None:
                self._conn = self._connect()
            return fn(self._conn)
        except (sqlite3.Error, OSError) as exc:
            raise spool_error(exc, "read") from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_conn)
        self._executor.shutdown(wait=False)

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
