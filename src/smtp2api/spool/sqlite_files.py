"""The SQLite spool's files: the database and its connections, and the writers' lock file.

Several processes may write one spool file: the workers of ``[smtp] processes = N`` and the
``smtp2api queue`` CLI. SQLite lets one write transaction in at a time and makes the others
wait in its busy handler, which *sleeps* 1, 2, 5, 10, ... 100 ms between tries instead of
waking when the lock is free (``sqliteDefaultBusyCallback``, https://www.sqlite.org/c3ref/
busy_timeout.html): two busy writers measured a put p99 of 67-90 ms against 12 ms for one.
So each writer also takes an exclusive ``flock(2)`` on ``<spool>.lock`` around its write
transaction (``WriteLock``): waiters queue in the kernel and wake as soon as it is released.
SQLite's own lock still decides who writes; the flock only orders the writers that take it,
and SQLite's busy timeout remains the backstop for writers that do not (an older smtp2api,
the ``sqlite3`` shell).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import sqlite3
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from smtp2api.errors import SpoolError
from smtp2api.spool.sqlite_schema import migrate

log = structlog.get_logger(__name__)


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


# --- the writers' lock ----------------------------------------------------------------------


def lock_path(db: Path) -> Path:
    return db.with_name(db.name + ".lock")


def open_write_lock(db: Path, timeout: float) -> WriteLock | None:
    """The ``WriteLock`` of the spool at ``db``, or None (one warning) if the file cannot be
    opened or created: a read-only directory, another user's file. Writes then go on without
    it, under SQLite's busy handler alone, as before the lock existed.

    Opened read-only: flock(2) needs no write access. Created 0600 like the database; when
    root creates it, it gets the database's owner, as SQLite does for its -wal and -shm files
    (``robustFchown`` in os_unix.c), so the daemon's user can still open it.
    """
    try:
        fd = _open_lock_file(lock_path(db), db)
    except OSError as exc:
        log.warning("spool_write_lock_unavailable", error=_errno_name(exc))
        return None
    return WriteLock(fd, timeout)


def _open_lock_file(path: Path, db: Path) -> int:
    # CLOEXEC: an exec'd child never holds it. NONBLOCK: a FIFO planted there cannot hang open.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = os.open(path, flags)
    else:
        if os.geteuid() == 0:
            owner = os.stat(db)
            with contextlib.suppress(OSError):
                os.fchown(fd, owner.st_uid, owner.st_gid)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _flock_keeping_the_gil() -> Callable[[int, int], None]:
    """flock(2) without releasing the GIL, for the calls that never block (LOCK_NB, LOCK_UN).

    ``fcntl.flock`` releases the GIL around the call, as for any system call that may block;
    the writer thread must then win it back from the event loop, which takes up to the 5 ms
    switch interval when the loop is busy. Measured with a busy main thread: 0.8-2 ms of
    waiting and 6-25 us of CPU per LOCK_NB + LOCK_UN pair, against 2-3 us through
    ``ctypes.PyDLL``, which keeps the GIL (https://docs.python.org/3/library/ctypes.html).
    """
    try:
        c_flock = ctypes.PyDLL(None, use_errno=True).flock
    except (OSError, AttributeError):  # no such symbol here: the portable call
        return fcntl.flock
    c_flock.argtypes = (ctypes.c_int, ctypes.c_int)
    c_flock.restype = ctypes.c_int

    def flock(fd: int, operation: int) -> None:
        while c_flock(fd, operation) != 0:
            code = ctypes.get_errno()
            if code != errno.EINTR:
                raise OSError(code, os.strerror(code))  # EWOULDBLOCK: a BlockingIOError

    return flock


_quick_flock = _flock_keeping_the_gil()

# WriteLock states: nobody waits / the helper blocks in flock / it got it / flock failed
_IDLE, _WAITING, _GOT, _FAILED = 0, 1, 2, 3


class WriteLock:
    """An exclusive flock(2) on the spool's lock file, taken by the writer thread around each
    write transaction, with a bounded wait.

    Uncontended, ``acquire`` is one non-blocking flock call. Contended, a helper thread blocks
    in flock(2), so the writer is woken as soon as the other process releases, while the
    writer itself waits at most ``timeout``: a peer stopped (SIGSTOP) or hung while holding
    the lock must not hang this process; past the timeout it goes on without the lock and
    SQLite's busy timeout decides, exactly as without this lock. A flock is released by the
    kernel when its holder dies, so a crashed peer never leaves it held.

    Not fork-safe, and need not be: it is opened in the writer thread, which the supervisor's
    workers start after the fork (each worker opens its own spool), and its descriptor is
    close-on-exec.
    """

    def __init__(self, fd: int, timeout: float) -> None:
        self.timeout = timeout
        self._fd = fd
        self._cond = threading.Condition(threading.Lock())
        self._state = _IDLE
        self._wanted = False  # the writer is waiting in acquire() for the helper's result
        self._closed = False
        self._helper: threading.Thread | None = None
        self._error: OSError | None = None

    def acquire(self) -> bool:
        """True once held; False if not had within ``timeout``, or at once while the helper
        still waits after such a timeout. OSError: flock(2) failed."""
        with self._cond:
            if self._error is not None:
                raise self._error
            if self._state == _WAITING:  # a peer kept it past our last wait: no new wait
                return False
            try:
                _quick_flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                return True
            # Never try again ourselves while the helper blocks on the same open file: flock()
            # on a description that holds the lock returns at once, and the helper would then
            # release what the writer believes it holds.
            self._state = _WAITING
            self._start_helper()
            self._wanted = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._state != _WAITING, self.timeout)
            self._wanted = False
            if self._state == _GOT:
                self._state = _IDLE  # the writer holds it now
                return True
            if self._error is not None:
                raise self._error
            # Until the helper has it, the writer goes on without it; once it has it, it lets
            # it go (nobody wants it) and the next acquire() starts afresh.
            log.warning("spool_write_lock_timeout", seconds=self.timeout)
            return False

    @property
    def waiting(self) -> bool:
        """Another process holds the lock and this one is queued for it (the helper thread
        waits in flock(2), for the writer or, after a timeout, to let it go at once)."""
        return self._state == _WAITING

    def release(self) -> None:
        _quick_flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the descriptor (which releases the lock); the helper closes its own."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        os.close(self._fd)

    def _start_helper(self) -> None:
        if self._helper is None:
            # Its own descriptor of the same open file: closing ours never lets it flock a
            # reused descriptor number, and it closes its own when it is done.
            fd = os.dup(self._fd)
            self._helper = threading.Thread(
                target=self._help, args=(fd,), name="smtp2api-spool-lock", daemon=True
            )
            self._helper.start()

    def _help(self, fd: int) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._state == _WAITING or self._closed)
                    if self._closed:
                        return
                fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the other process releases
                with self._cond:
                    if self._wanted and not self._closed:
                        self._state = _GOT
                        self._cond.notify_all()
                    else:  # the writer gave up waiting (or closed): let the others have it
                        _quick_flock(fd, fcntl.LOCK_UN)
                        self._state = _IDLE
        except OSError as exc:  # raised to the writer, which then goes on without the lock
            with self._cond:
                self._error = exc
                self._state = _FAILED
                self._cond.notify_all()
        finally:
            os.close(fd)
