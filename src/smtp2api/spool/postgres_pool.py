"""A small connection pool for the PostgreSQL spool: fail fast while the database is away,
recover at the first operation after it is back.

General-purpose pools reconnect in the background with exponential backoff and make callers
wait for that; a mail gateway would rather answer ``451`` at once (the client retries) and
use the database again the moment it answers. So a caller that finds no idle connection
makes one itself, bounded by ``timeout``; an idle connection is checked (one empty query)
before it is lent, so a session the server dropped fails the check, not the caller's work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus

from smtp2api.errors import SpoolError

Connect = Callable[[], Awaitable[AsyncConnection[Any]]]


class Pool:
    """At most ``size`` connections; ``connection()`` lends one for the ``async with`` block."""

    def __init__(self, connect: Connect, *, size: int, timeout: float) -> None:
        self._connect = connect
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max(1, size))
        self._idle: deque[AsyncConnection[Any]] = deque()
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """Raises ``SpoolError`` when no connection can be had within ``timeout``, and
        whatever the block raises (a psycopg error for a failed statement)."""
        if self._closed:
            raise SpoolError("spool is closed")
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise SpoolError("spool database connections are all busy") from None
        try:
            conn = await self._checkout()
            try:
                yield conn
            finally:
                await self._checkin(conn)
        finally:
            self._slots.release()

    async def _checkout(self) -> AsyncConnection[Any]:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the likeliest to be alive
            try:
                await conn.execute("")
            except psycopg.Error:
                await conn.close()
                continue
            except BaseException:  # cancelled mid-check: the connection's state is unknown
                await conn.close()
                raise
            return conn
        try:
            async with asyncio.timeout(self._timeout):
                return await self._connect()
        except TimeoutError:
            raise SpoolError("spool database connection timed out") from None
        except (psycopg.Error, OSError) as exc:
            # libpq's text names the host and the database, never the password; still, only
            # the class is passed on, like every other spool error.
            raise SpoolError(f"spool database connection failed ({type(exc).__name__})") from None

    async def _checkin(self, conn: AsyncConnection[Any]) -> None:
        # A connection left mid-statement (a cancelled caller) or mid-transaction is in an
        # unknown state: closed, never lent again.
        reusable = (
            not self._closed
            and not conn.closed
            and not conn.broken
            and conn.info.transaction_status == TransactionStatus.IDLE
        )
        if reusable:
            self._idle.append(conn)
        else:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._idle.pop().close()
