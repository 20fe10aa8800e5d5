"""The embedded spool: one SQLite file in WAL mode, ``synchronous=FULL``, group-committed.

Writes go through ``sqlite_io.Writer`` (one thread, one connection, one fsync per batch);
reads through ``sqlite_io.Reader``. Other processes (the workers of ``[smtp] processes``,
``smtp2api queue``) may open the same file: WAL lets their reads proceed, and their writers
queue on the flock of ``<file>.lock`` (``sqlite_files.WriteLock``), then on SQLite's write
lock up to ``busy_timeout``. With SQLite every claim is this process's own (design §3).
"""

from __future__ import annotations

import asyncio
import builtins
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog

from smtp2api.errors import SpoolError
from smtp2api.spool import sqlite_schema as schema
from smtp2api.spool.base import STATES, SpoolEntry, SpoolSummary
from smtp2api.spool.sqlite_files import (
    connect_reader,
    connect_writer,
    open_write_lock,
    prepare_path,
)
from smtp2api.spool.sqlite_io import Reader, Writer, WriterStats, spool_error

T = TypeVar("T")
log = structlog.get_logger(__name__)

# Claimable rows: parameters (now, limit). A claim whose lease ran out was abandoned by its
# claimer (it stopped renewing), so it is taken over like a due entry.
_LAPSED = " WHERE state = 'active' AND lease_until < ? ORDER BY lease_until, id LIMIT ?"
_DUE = " WHERE state = 'queued' AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?"
# Due now; a revived dead entry starts a new max_age period (the right-hand sides see the
# row as it was). Parameters: (now, now, now, ...the WHERE clause's).
_RETRY = (
    "UPDATE messages SET state = 'queued', next_attempt_at = ?, updated_at = ?, "
    "created_at = CASE WHEN state = 'dead' THEN ? ELSE created_at END "
)
# Bodies larger than this are written through incremental blob I/O (see ``put``).
_STREAM_BYTES = 1024 * 1024
_BLOB_CHUNK = 256 * 1024
# How long a withdrawable put (hybrid mode's race) waits in the writer's queue for the
# provider's answer before it is written (Writer.hold). 5 ms: with a local API 96 % of such
# puts were withdrawn (2 ms: 62 %, none: 48 %) for 5-12 % less CPU per message; a put the
# reply waits for (the API failed) is at most this much later (docs/performance.md).
HOLD = 0.005
_Suspects = builtins.list[tuple[int, str]]  # (rowid, reason) of rows that did not decode
_Quarantined = builtins.list[tuple[str, str]]  # (msg_id, reason) moved to quarantine


class SqliteSpool:
    """``Spool`` over one SQLite file.

    Constructing it does no I/O: the file is created, switched to WAL and migrated by
    ``start()`` or, failing that, by the first operation (so ``open_spool`` stays a plain
    factory). A failed open is retried by the next operation: a full disk at startup is not
    permanent. ``write_lock=False``: no flock on ``<file>.lock`` (benchmarks compare with it).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        lease: float = 30.0,
        group_commit: bool = True,
        busy_timeout: float = 5.0,
        max_batch: int = 1024,
        write_lock: bool = True,
        hold: float = HOLD,
    ) -> None:
        self.path = Path(path)
        self.hold = hold
        self.lease = lease
        self.stats = WriterStats()
        self._busy_timeout = busy_timeout
        self._write_lock = write_lock
        self._group_commit = group_commit
        self._max_batch = max_batch
        self.writer = self._new_writer()
        self._reader = Reader(self._connect_reader)
        self._open_lock = asyncio.Lock()
        self._ready = False
        self._closed = False

    @classmethod
    async def open(cls, path: Path | str, **kwargs: Any) -> SqliteSpool:
        """A started spool (see ``start``)."""
        spool = cls(path, **kwargs)
        await spool.start()
        return spool

    async def start(self) -> None:
        """Create the directory (0700) and file (0600) if missing, enable WAL, migrate."""
        if self._ready:
            return
        async with self._open_lock:
            if not self._ready:
                await self._open()

    async def _open(self) -> None:
        if self._closed:
            raise SpoolError("spool is closed")
        try:
            await asyncio.to_thread(prepare_path, self.path)
        except OSError as exc:
            raise spool_error(exc, "open") from None
        try:
            await self.writer.start()
        except SpoolError:
            self.writer = self._new_writer()  # a thread starts once; the next try needs one
            raise
        self._ready = True

    def _new_writer(self) -> Writer:
        # The flock's wait is bounded by the busy timeout too: past it, SQLite decides.
        lock = partial(open_write_lock, self.path, self._busy_timeout)
        return Writer(
            self._connect_writer,
            open_lock=lock if self._write_lock else None,
            group_commit=self._group_commit,
            max_batch=self._max_batch,
            hold=self.hold,
            stats=self.stats,
        )

    async def _write(self, fn: Callable[[sqlite3.Connection], T], key: str | None = None) -> T:
        if not self._ready:
            await self.start()
        return await self.writer.submit(fn, key=key)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if not self._ready:
            await self.start()
        return await self._reader.run(fn)

    def _connect_writer(self) -> sqlite3.Connection:
        return connect_writer(self.path, self._busy_timeout)

    def _connect_reader(self) -> sqlite3.Connection:
        return connect_reader(self.path, self._busy_timeout)

    # --- writes ---------------------------------------------------------------------------

    async def _change(self, sql: str, params: Sequence[object], key: str | None = None) -> int:
        """One statement, its rowcount (no savepoint: see ``Writer.execute``); ``key`` makes
        it withdrawable (``withdraw``)."""
        if not self._ready:
            await self.start()
        return await self.writer.execute(sql, params, key=key)

    async def put(self, entry: SpoolEntry) -> None:
        params = schema.encode_entry(entry, time.time(), self.lease)
        if len(entry.raw) <= _STREAM_BYTES:
            await self._change(schema.INSERT_ENTRY, params, key=entry.id)
            return
        raw = memoryview(entry.raw)

        def op(conn: sqlite3.Connection) -> None:
            # Bound as a parameter, a blob is copied by SQLite and copied again into the
            # record it builds: three copies of a 25 MB message at once. A zeroblob takes
            # no memory, and incremental blob I/O writes the body into the row's pages one
            # chunk at a time (https://www.sqlite.org/c3ref/blob_open.html).
            row = conn.execute(schema.INSERT_ENTRY_ZEROBLOB, (*params[:-1], len(raw))).lastrowid
            assert row is not None
            with conn.blobopen("messages", "raw", row) as blob:
                for start in range(0, len(raw), _BLOB_CHUNK):
                    blob.write(raw[start : start + _BLOB_CHUNK])

        await self._write(op, key=entry.id)

    def withdraw(self, id: str) -> bool:
        return self.writer.withdraw(id)

    async def claim(self, limit: int, now: float) -> builtins.list[SpoolEntry]:
        lease_until = now + self.lease

        def op(conn: sqlite3.Connection) -> tuple[builtins.list[SpoolEntry], _Quarantined]:
            claimed: builtins.list[SpoolEntry] = []
            moved: _Quarantined = []
            # Lapsed claims first (rare; see Spool.claim), then due entries: two queries, so
            # each one walks the (state, ...) index instead of an OR scanning the table.
            for where in (_LAPSED, _DUE):
                room = limit - len(claimed)
                moved += _claim_rows(
                    conn, where, room, now=now, lease_until=lease_until, claimed=claimed
                )
            return claimed, moved

        if limit <= 0:
            return []
        claimed, moved = await self._write(op)
        self._report_quarantined(moved)
        return claimed

    async def renew(self, ids: Sequence[str], now: float) -> int:
        params = [(now + self.lease, now, i) for i in ids]

        def op(conn: sqlite3.Connection) -> int:
            sql = "UPDATE messages SET lease_until = ?, updated_at = ? WHERE id = ? AND "
            return conn.executemany(sql + "state = 'active'", params).rowcount

        return await self._write(op) if params else 0

    async def ack(self, id: str) -> None:
        await self._change("DELETE FROM messages WHERE id = ?", (id,))

    async def defer(
        self, id: str, next_attempt_at: float, last_reply: str | None, last_error: str | None
    ) -> None:
        await self._change(
            "UPDATE messages SET state = 'queued', next_attempt_at = ?, lease_until = NULL, "
            "last_reply = ?, last_error = ?, updated_at = ? WHERE id = ?",
            (next_attempt_at, last_reply, last_error, time.time(), id),
        )

    async def mark_dead(self, id: str, last_reply: str | None, last_error: str | None) -> None:
        await self._change(
            "UPDATE messages SET state = 'dead', lease_until = NULL, last_reply = ?, "
            "last_error = ?, updated_at = ? WHERE id = ?",
            (last_reply, last_error, time.time(), id),
        )

    async def add_done_recipients(self, id: str, rcpts: Sequence[str]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # Read-modify-write is safe: the writer thread runs ops one at a time, under the
            # write lock that BEGIN IMMEDIATE took.
            row = conn.execute("SELECT done_recipients FROM messages WHERE id = ?", (id,))
            found = row.fetchone()
            if found is None:
                return
            done = list(schema.decode_list(id, "done_recipients", found[0]))
            known = set(done)
            done += [r for r in dict.fromkeys(rcpts) if r not in known]
            conn.execute(
                "UPDATE messages SET done_recipients = ?, updated_at = ? WHERE id = ?",
                (schema.encode_list(done), time.time(), id),
            )

        await self._write(op)

    async def release(
        self, id: str, *, next_attempt_at: float | None = None, attempted: bool = False
    ) -> None:
        await self._change(
            "UPDATE messages SET state = 'queued', attempts = MAX(attempts - ?, 0), "
            "next_attempt_at = COALESCE(?, next_attempt_at), lease_until = NULL, "
            "updated_at = ? WHERE id = ? AND state = 'active'",
            (0 if attempted else 1, next_attempt_at, time.time(), id),
        )

    async def recover(self, now: float) -> int:
        # One node per SQLite file: every active row is a claim of a previous run of ours.
        return await self._change(
            "UPDATE messages SET state = 'queued', lease_until = NULL, updated_at = ? "
            "WHERE state = 'active'",
            (now,),
        )

    async def retry(self, id: str, now: float | None = None) -> bool:
        when = time.time() if now is None else now
        changed = await self._change(
            _RETRY + "WHERE id = ? AND state IN ('queued', 'dead')", (when, when, when, id)
        )
        return changed > 0

    async def retry_all(self, now: float | None = None) -> int:
        when = time.time() if now is None else now
        return await self._change(
            _RETRY + "WHERE state = 'dead' OR (state = 'queued' AND next_attempt_at > ?)",
            (when, when, when, when),
        )

    async def delete(self, id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            gone = conn.execute("DELETE FROM messages WHERE id = ?", (id,)).rowcount
            gone += conn.execute("DELETE FROM quarantine WHERE msg_id = ?", (id,)).rowcount
            return gone > 0

        return await self._write(op)

    async def purge_dead(self) -> int:
        return await self._change("DELETE FROM messages WHERE state = 'dead'", ())

    async def check_writable(self) -> bool:
        try:
            await self._change(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('writable_check', ?)",
                (repr(time.time()),),
            )
        except SpoolError:
            return False
        return True

    async def aclose(self) -> None:
        async with self._open_lock:  # not while start() is half way
            self._closed = True
            await self.writer.close()
            await self._reader.close()

    # --- reads ----------------------------------------------------------------------------

    async def get(self, id: str) -> SpoolEntry | None:
        def op(conn: sqlite3.Connection) -> Any:
            sql = schema.SELECT_ENTRIES + " WHERE id = ?"
            return conn.execute(sql, (id,)).fetchone()

        row = await self._read(op)
        if row is None:
            return None
        try:
            return schema.decode_entry(row)
        except schema.CorruptRow as exc:
            await self._quarantine_later([(row[0], exc.reason)])
            return None

    async def list(
        self, state: str | None = None, limit: int | None = None
    ) -> builtins.list[SpoolSummary]:
        if state is not None and state not in STATES:
            raise ValueError(f"unknown spool state {state!r} (expected one of {STATES})")
        sql = schema.SELECT_SUMMARIES
        params: builtins.list[object] = []
        if state is not None:
            sql += " WHERE state = ?"
            params.append(state)
        sql += " ORDER BY created_at, id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        rows = await self._read(lambda conn: conn.execute(sql, params).fetchall())
        out: builtins.list[SpoolSummary] = []
        suspects: _Suspects = []
        for row in rows:
            try:
                out.append(schema.decode_summary(row))
            except schema.CorruptRow as exc:
                suspects.append((row[0], exc.reason))
        if suspects:
            await self._quarantine_later(suspects)
        return out

    async def counts(self) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            out: dict[str, int] = dict.fromkeys(STATES, 0)
            rows = conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state")
            out.update({str(state): int(n) for state, n in rows})
            return out

        return await self._read(op)

    async def quarantined(self) -> int:
        """Rows moved aside because they did not decode (SQLite-specific; see the schema)."""
        return int(
            await self._read(lambda c: c.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0])
        )

    async def oldest_created_at(self) -> float | None:
        return await self._scalar("SELECT MIN(created_at) FROM messages WHERE state != 'dead'")

    async def next_due_at(self) -> float | None:
        return await self._scalar(
            "SELECT MIN(t) FROM ("
            "SELECT MIN(next_attempt_at) AS t FROM messages WHERE state = 'queued' UNION ALL "
            "SELECT MIN(lease_until) FROM messages WHERE state = 'active')"
        )

    async def _scalar(self, sql: str) -> float | None:
        value = await self._read(lambda conn: conn.execute(sql).fetchone()[0])
        return float(value) if isinstance(value, int | float) else None

    # --- quarantine -----------------------------------------------------------------------

    async def _quarantine_later(self, suspects: _Suspects) -> None:
        """Move rows a read could not decode (the writer re-checks them first)."""
        try:
            moved = await self._write(lambda conn: _quarantine(conn, suspects, time.time()))
        except SpoolError as exc:  # a read must not fail because the move did
            log.warning("spool_quarantine_failed", error=str(exc))
            return
        self._report_quarantined(moved)

    def _report_quarantined(self, moved: _Quarantined) -> None:
        for msg_id, reason in moved:
            self.stats.quarantined += 1
            log.error("spool_entry_quarantined", msg_id=msg_id, reason=reason)


def _quarantine(conn: sqlite3.Connection, suspects: _Suspects, now: float) -> _Quarantined:
    moved = (schema.quarantine_row(conn, rowid, now) for rowid, _ in suspects)
    return [m for m in moved if m is not None]


def _claim_rows(
    conn: sqlite3.Connection,
    where: str,
    room: int,
    *,
    now: float,
    lease_until: float,
    claimed: builtins.list[SpoolEntry],
) -> _Quarantined:
    """Claim up to ``room`` rows matching ``where`` into ``claimed``; returns what was moved
    to quarantine on the way."""
    moved: _Quarantined = []
    while room > 0:
        rows = conn.execute(schema.SELECT_ENTRIES + where, (now, room)).fetchall()
        progress = False
        for row in rows:
            try:
                entry = schema.decode_entry(row)
            except schema.CorruptRow:
                # Moved out of ``messages`` in this same transaction, so the next SELECT does
                # not see it again and the good entries are still claimed.
                gone = _quarantine(conn, [(row[0], "")], now)
                moved += gone
                progress = progress or bool(gone)
                continue
            progress = True
            room -= 1
            conn.execute(
                "UPDATE messages SET state = 'active', attempts = attempts + 1, "
                "lease_until = ?, updated_at = ? WHERE rowid = ?",
                (lease_until, now, row[0]),
            )
            claimed.append(replace(entry, state="active", attempts=entry.attempts + 1))
        if not progress:
            break
    return moved
