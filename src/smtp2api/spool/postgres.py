"""The multi-node spool: the ``Spool`` interface on PostgreSQL (psycopg 3), design §3.

Any number of gateway nodes share one database. Claims take due rows with ``FOR UPDATE SKIP
LOCKED``, so concurrent claimers never wait for each other nor take a row twice, and stamp
them with this node's id (``claimed_by``) and a lease. A claim not renewed before its lease
ends is taken over by any node's next claim, so a dead node's messages are delivered by the
others; a node that restarts takes its own claims back at once (``recover``), guarded by an
advisory lock on its node id so that a second live process with the same id cannot steal them.

Clocks: leases use the database's clock (``clock_timestamp()``), the one clock every node
shares, so skew between nodes never expires a live lease early. ``next_attempt_at`` and
``created_at`` stay on the gateway's clock as the interface passes them (``claim(now)``): node
skew only shifts when a retry happens by the skew. Keep nodes NTP-synchronised.

Writes are group-committed (``postgres_io.Batcher``); ``LISTEN``/``NOTIFY`` on channel
``smtp2api_spool`` wakes idle workers on every node when a put is due now, a retry or a
release makes work due (``subscribe``). psycopg is an optional extra (``smtp2api[postgres]``),
imported only when a ``postgresql://`` spool is opened.
"""

from __future__ import annotations

import asyncio
import builtins
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import structlog
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict

from smtp2api.errors import SpoolError
from smtp2api.spool import postgres_schema as schema
from smtp2api.spool.base import STATES, SpoolEntry, SpoolSummary
from smtp2api.spool.postgres_io import Batcher, BatchStats, Listener, Params, pg_error
from smtp2api.spool.postgres_pool import Pool
from smtp2api.spool.postgres_schema import clean_text

log = structlog.get_logger(__name__)

# Connection defaults, each overridable in the URL's query string (libpq keywords). Keepalives
# and tcp_user_timeout make a connection to a vanished server fail within ~a minute instead of
# the kernel's ~15 minutes of retransmissions.
_CONN_DEFAULTS: dict[str, Any] = {
    "application_name": "smtp2api",
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds
}


class PostgresSpool:
    """``Spool`` over PostgreSQL. Construction does no I/O: the pool is opened and the schema
    migrated by ``start()`` or the first operation, retried by the next one if it fails."""

    def __init__(
        self,
        url: str,
        *,
        lease: float = 30.0,
        node_id: str | None = None,
        group_commit: bool = True,
        timeout: float = 10.0,
        writers: int = 2,
        readers: int = 2,
        max_batch: int = 512,
    ) -> None:
        self.lease = lease
        self.node_id = node_id or socket.gethostname()
        self.stats = BatchStats()
        self._url = url
        self._timeout = timeout
        self._writers = writers
        self._readers = readers
        self._max_batch = max_batch if group_commit else 1
        self._kwargs = _connection_kwargs(url, timeout)
        self._pool: Pool | None = None
        self._batcher: Batcher | None = None
        self.listener = Listener(
            self._connect, lock_sql=schema.NODE_LOCK, lock_params=(self.node_id,), keepalive=lease
        )
        self._open_lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:  # the URL can hold a password: never shown
        return f"PostgresSpool(node_id={self.node_id!r})"

    async def _connect(self) -> AsyncConnection[Any]:
        conn = await AsyncConnection.connect(self._url, autocommit=True, **self._kwargs)
        try:
            await _configure(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def start(self) -> None:
        """Open the pool and migrate the schema (raises ``SpoolError``)."""
        if self._batcher is not None:
            return
        async with self._open_lock:
            if self._closed:
                raise SpoolError("spool is closed")
            if self._batcher is None:
                await self._open()

    async def _open(self) -> None:
        pool = Pool(self._connect, size=self._writers + self._readers, timeout=self._timeout)
        try:
            async with pool.connection() as conn:
                await schema.migrate(conn)
        except (psycopg.Error, OSError, SpoolError) as exc:
            await pool.close()
            raise pg_error(exc, "open") from None
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self._batcher = Batcher(
            pool, writers=self._writers, max_batch=self._max_batch, stats=self.stats
        )

    async def _write(
        self, sql: str, params: Params, *, fetch: bool = False, notify: bool = False
    ) -> Any:
        if self._batcher is None:
            await self.start()
        assert self._batcher is not None
        return await self._batcher.submit(sql, params, fetch=fetch, notify=notify)

    async def _read(self, sql: str, params: Params = ()) -> builtins.list[Any]:
        if self._closed:
            raise SpoolError("spool is closed")
        if self._pool is None:
            await self.start()
        assert self._pool is not None
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(sql, params)
                return await cur.fetchall()
        except (psycopg.Error, OSError, SpoolError) as exc:
            raise pg_error(exc, "read") from None

    # --- writes ---------------------------------------------------------------------------

    async def put(self, entry: SpoolEntry) -> None:
        due_now = entry.state == "queued" and entry.next_attempt_at <= time.time()
        params = schema.encode_entry(entry, self.lease)
        if await self._write(schema.INSERT_ENTRY, params, notify=due_now) == 0:
            raise SpoolError(f"spool write failed: id {entry.id} already exists")

    def withdraw(self, id: str) -> bool:
        # A put goes to the server as soon as a pooled connection is free: nothing to take
        # back cheaply, so a delivered hybrid message is acked as usual.
        return False

    async def claim(self, limit: int, now: float) -> builtins.list[SpoolEntry]:
        if limit <= 0:
            return []
        params = {"limit": limit, "now": now, "node": self.node_id, "lease": self.lease}
        rows = await self._write(schema.CLAIM, params, fetch=True)
        entries = [schema.decode_entry(row) for row in rows]
        return sorted(entries, key=lambda e: (e.next_attempt_at, e.id))

    async def renew(self, ids: Sequence[str], now: float) -> int:
        if not ids:
            return 0
        params = (self.lease, now, list(ids), self.node_id)
        return int(await self._write(schema.RENEW, params))

    async def ack(self, id: str) -> None:
        await self._write(schema.ACK, (id,))

    async def defer(
        self, id: str, next_attempt_at: float, last_reply: str | None, last_error: str | None
    ) -> None:
        reply, error = clean_text(last_reply), clean_text(last_error)
        params = (next_attempt_at, reply, error, time.time(), id, self.node_id)
        await self._write(schema.DEFER, params)

    async def mark_dead(self, id: str, last_reply: str | None, last_error: str | None) -> None:
        reply, error = clean_text(last_reply), clean_text(last_error)
        await self._write(schema.MARK_DEAD, (reply, error, time.time(), id, self.node_id))

    async def add_done_recipients(self, id: str, rcpts: Sequence[str]) -> None:
        await self._write(schema.ADD_DONE, (list(dict.fromkeys(rcpts)), time.time(), id))

    async def release(
        self, id: str, *, next_attempt_at: float | None = None, attempted: bool = False
    ) -> None:
        now = time.time()
        params = (0 if attempted else 1, next_attempt_at, now, id, self.node_id)
        # Due again now (shutdown): wake the other nodes, one of them takes it at once.
        due_now = next_attempt_at is None or next_attempt_at <= now
        await self._write(schema.RELEASE, params, notify=due_now)

    async def recover(self, now: float) -> int:
        """Take back this node's claims at once, and any claim whose lease has expired.

        Our own claims only while we hold the advisory lock on our node id: if another live
        process holds it (two gateways configured with the same ``node_id``), those claims
        are not ours to take, and they come back through the lease like any other node's.
        """
        if self._batcher is None:
            await self.start()
        try:
            async with asyncio.timeout(self._timeout):
                await self.listener.wait_connected()
        except TimeoutError:
            error = self.listener.last_error
            raise error or SpoolError("spool recover failed (no database connection)") from None
        mine = self.listener.node_locked
        if not mine:
            log.warning("spool_node_id_in_use", node_id=self.node_id)
        params = (now, self.node_id, mine)
        return int(await self._write(schema.RECOVER, params, notify=True))

    async def retry(self, id: str, now: float | None = None) -> bool:
        when = time.time() if now is None else now
        return int(await self._write(schema.RETRY, {"now": when, "id": id}, notify=True)) > 0

    async def retry_all(self, now: float | None = None) -> int:
        when = time.time() if now is None else now
        return int(await self._write(schema.RETRY_ALL, {"now": when}, notify=True))

    async def delete(self, id: str) -> bool:
        return int(await self._write(schema.DELETE, (id,))) > 0

    async def purge_dead(self) -> int:
        return int(await self._write(schema.PURGE_DEAD, ()))

    async def check_writable(self) -> bool:
        try:
            key = f"writable_check:{self.node_id}"
            await self._write(schema.WRITABLE_CHECK, (key, repr(time.time())))
        except SpoolError:
            return False
        return True

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` whenever any node makes work due (and after a reconnect, when a
        notification may have been missed); returns the function that unsubscribes."""
        if self._closed:
            return lambda: None
        return self.listener.subscribe(callback)

    async def aclose(self) -> None:
        async with self._open_lock:
            self._closed = True
            if self._batcher is not None:
                await self._batcher.close()
            await self.listener.close()
            if self._pool is not None:
                await self._pool.close()

    # --- reads ----------------------------------------------------------------------------

    async def get(self, id: str) -> SpoolEntry | None:
        rows = await self._read(schema.GET, (id,))
        return schema.decode_entry(rows[0]) if rows else None

    async def list(
        self, state: str | None = None, limit: int | None = None
    ) -> builtins.list[SpoolSummary]:
        if state is not None and state not in STATES:
            raise ValueError(f"unknown spool state {state!r} (expected one of {STATES})")
        rows = await self._read(schema.LIST, {"state": state, "limit": limit})
        return [schema.decode_summary(row) for row in rows]

    async def counts(self) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(STATES, 0)
        out.update({str(state): int(n) for state, n in await self._read(schema.COUNTS)})
        return out

    async def oldest_created_at(self) -> float | None:
        rows = await self._read(schema.OLDEST)
        return float(rows[0][0]) if rows else None

    async def next_due_at(self) -> float | None:
        """The earliest due queued entry, or the earliest expiry of a lease (converted from
        the database's clock to ours): an idle node must wake to take a dead node's mail."""
        due, lease_left = (await self._read(schema.NEXT_DUE))[0]
        times = [float(due)] if due is not None else []
        if lease_left is not None:
            times.append(time.time() + max(0.0, float(lease_left)))
        return min(times) if times else None


async def _configure(conn: AsyncConnection[Any]) -> None:
    """Every pooled connection commits durably: 250 is said after COMMIT returns, so
    ``synchronous_commit = off`` (a server or role default) would break promise 1. Stronger
    settings (``remote_apply``...) are kept."""
    cur = await conn.execute("SHOW synchronous_commit")
    row = await cur.fetchone()
    if row and row[0] == "off":
        await conn.execute("SET synchronous_commit = on")


def _connection_kwargs(url: str, timeout: float) -> dict[str, Any]:
    """libpq keywords we default, minus those the URL sets itself."""
    try:
        given = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise SpoolError("spool.url: not a valid PostgreSQL connection URL") from None
    defaults = {**_CONN_DEFAULTS, "connect_timeout": max(1, int(timeout))}
    return {k: v for k, v in defaults.items() if k not in given}
