"""Off-loop SQLite I/O for the spool: one group-committing writer thread and one reader thread.

sqlite3 calls block, and a SQLite database has a single writer at a time anyway
(https://www.sqlite.org/wal.html, "Concurrency"), so every write runs in one thread that owns
one connection. Callers enqueue an op and await a future; the thread takes everything queued,
runs it in ONE transaction, commits once (one fsync of the WAL under ``synchronous=FULL``) and
then settles all the futures. Durability costs one fsync per batch instead of one per message,
and a batch forms by itself while the previous fsync is in flight: no timer, no added latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from smtp2api.errors import SpoolError, SpoolFull
from smtp2api.spool.sqlite_schema import migrate

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
    quarantined: int = 0  # rows moved to the quarantine table (counted by the spool)


class _Pending:
    __slots__ = ("fn", "future", "loop")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fn = fn
        self.future = future
        self.loop = loop


_Outcome = tuple[_Pending, bool, Any]  # (op, succeeded, result or exception)


def _settle(outcomes: list[_Outcome]) -> None:
    for pending, ok, value in outcomes:
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
    """The writer thread. ``submit(fn)`` runs ``fn(conn)`` inside a batch transaction.

    ``fn`` must only touch the database through ``conn``; its result is returned once the
    batch has committed. If the commit fails, every op of the batch fails: none is durable.
    Cancelling the awaiting caller does not withdraw a submitted op (it may still commit):
    at-least-once, never "said durable but lost".
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        group_commit: bool = True,
        max_batch: int = 1024,
        stats: WriterStats | None = None,
        name: str = "smtp2api-spool-writer",
    ) -> None:
        self._connect = connect
        self.group_commit = group_commit
        self.max_batch = max(1, max_batch) if group_commit else 1
        self.stats = WriterStats() if stats is None else stats
        self.fault_hook: Callable[[], None] | None = None  # test seam: runs before COMMIT
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
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

    async def submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise SpoolError("spool is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Pending(fn, future, loop))
        return await future

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
            conn = self._connect()
        except BaseException as exc:  # noqa: BLE001 - reported to start(), which raises it
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
            self._fail_leftovers()

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                self._commit_batch(conn, batch)
            except Exception as exc:  # a bug must not kill the thread with callers waiting
                log.exception("spool_writer_error")
                self._deliver([(item, False, spool_error(exc)) for item in batch])
            if stop:
                return

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Pending]) -> None:
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
        self._deliver(outcomes)

    def _run_op(self, conn: sqlite3.Connection, item: _Pending) -> _Outcome:
        # A savepoint per op: a constraint error (or a bug) in one op undoes that op only.
        conn.execute("SAVEPOINT op")
        try:
            value = item.fn(conn)
        except Exception as exc:
            fatal = isinstance(exc, sqlite3.Error) and not isinstance(exc, _OP_LOCAL)
            if fatal or not conn.in_transaction:
                raise
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            if not isinstance(exc, SpoolError | sqlite3.Error):
                log.exception("spool_op_failed")
            return item, False, spool_error(exc)
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
                loop.call_soon_threadsafe(_settle, items)

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


# --- files and connections ------------------------------------------------------------------


def connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; the writer issues BEGIN/COMMIT itself.
    # ``timeout`` is SQLite's busy timeout: how long to wait for another process's lock.
    return sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )


def connect_writer(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """The writer's connection: WAL, ``synchronous=FULL``, schema migrated."""
    conn = connect(path, busy_timeout)
    try:
        # WAL: readers (the CLI, our reader thread) never block the writer nor wait for it,
        # and a commit appends to one file (https://www.sqlite.org/wal.html).
        _enable_wal(conn)
        # FULL: in WAL mode the WAL is fsynced at every commit, so a commit survives a power
        # loss; with NORMAL it "might roll back following a power loss or system crash"
        # (https://www.sqlite.org/pragma.html#pragma_synchronous). Promise 1 needs FULL.
        conn.execute("PRAGMA synchronous = FULL")
        # macOS fsync() does not flush the drive cache; F_FULLFSYNC does. No-op elsewhere.
        conn.execute("PRAGMA fullfsync = ON")
        # Truncate the WAL back to 64 MiB after a checkpoint: a burst of large messages must
        # not leave a huge file behind (https://www.sqlite.org/pragma.html#pragma_journal_size_limit).
        conn.execute("PRAGMA journal_size_limit = 67108864")
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def connect_reader(path: Path, busy_timeout: float) -> sqlite3.Connection:
    conn = connect(path, busy_timeout)
    conn.execute("PRAGMA query_only = ON")  # reads only, whatever a caller passes
    return conn


def _enable_wal(conn: sqlite3.Connection) -> None:
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":  # e.g. a filesystem without shared-memory support
        raise SpoolError(f"spool open failed: journal_mode is {mode}, WAL is unavailable")


def prepare_path(path: Path) -> None:
    """Create the parent directory (0700) and an empty file (0600) when missing.

    SQLite gives its -wal and -shm files the main file's permissions, so those stay 0600 too.
    The directory is fsynced after the file is created so the new name survives a crash.
    """
    parent = path.parent
    if not parent.is_dir():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
