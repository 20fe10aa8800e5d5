"""The PostgreSQL spool's schema, its versioned migrations and its row codec.

The gateway creates and migrates the schema itself (never by hand): ``migrate`` runs under a
transaction-scoped advisory lock, so several nodes starting at once apply each step exactly
once, and ``smtp2api_schema_version`` records every step applied. Times are epoch seconds
(``float8``): ``next_attempt_at`` and ``created_at`` on the gateway's clock, as the interface
passes them; ``lease_until`` on the database's clock, shared by every node (see postgres.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

from smtp2api.errors import SpoolError
from smtp2api.spool.base import STATES, SpoolEntry, SpoolSummary, State

# pg_advisory_xact_lock key for migrations: b"smtp2api" as a signed 64-bit integer. Advisory
# locks are per database, so this serialises the migrations of every node sharing it.
MIGRATION_LOCK = int.from_bytes(b"smtp2api", "big", signed=True)

# One tuple of statements per schema version; index 0 upgrades version 0 (nothing) to 1.
# Never edit a shipped step: append a new one, so every existing database can follow.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE smtp2api_messages (
            id              text     NOT NULL PRIMARY KEY,
            state           text     NOT NULL CHECK (state IN ('queued', 'active', 'dead')),
            next_attempt_at float8   NOT NULL,
            lease_until     float8,
            claimed_by      text,
            attempts        integer  NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            created_at      float8   NOT NULL,
            updated_at      float8   NOT NULL,
            mail_from       text     NOT NULL,
            rcpt_tos        text[]   NOT NULL,
            done_recipients text[]   NOT NULL DEFAULT '{}',
            account         text,
            peer            text     NOT NULL,
            providers       text[]   NOT NULL,
            smtputf8        boolean  NOT NULL DEFAULT false,
            last_reply      text,
            last_error      text,
            size            integer  NOT NULL,
            raw             bytea    NOT NULL
        )""",
        # Partial indexes: a claim reads the due queued rows in order, a takeover the expired
        # leases; neither walks the dead or the other state's rows.
        "CREATE INDEX smtp2api_messages_due ON smtp2api_messages (next_attempt_at, id) "
        "WHERE state = 'queued'",
        "CREATE INDEX smtp2api_messages_lease ON smtp2api_messages (lease_until) "
        "WHERE state = 'active'",
        "CREATE INDEX smtp2api_messages_created ON smtp2api_messages (created_at, id)",
        "CREATE TABLE smtp2api_meta (key text NOT NULL PRIMARY KEY, value text NOT NULL)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# Every statement is a literal (nothing is ever formatted into SQL). ``clock_timestamp()``
# rather than ``now()``: now() is the start of the transaction, and a batch can outlive a lease.
# Leases are ``float8`` epoch seconds of the database's clock.
_SUMMARY = (
    "id, state, next_attempt_at, attempts, created_at, mail_from, rcpt_tos, done_recipients, "
    "account, peer, providers, last_reply, last_error, size"
)

INSERT_ENTRY = (
    "INSERT INTO smtp2api_messages (id, state, next_attempt_at, lease_until, claimed_by, "
    "attempts, created_at, updated_at, mail_from, rcpt_tos, done_recipients, account, peer, "
    "providers, smtputf8, last_reply, last_error, size, raw) VALUES (%s, %s, %s, "
    "CASE WHEN %s THEN extract(epoch FROM clock_timestamp())::float8 + %s END, %s, %s, %s, "
    "%s, %s, %s::text[], %s::text[], %s, %s, %s::text[], %s, %s, %s, %s, %s) "
    "ON CONFLICT (id) DO NOTHING"
)
# Takeover first (a dead node's mail has waited longest), then due entries, oldest first.
# SKIP LOCKED: concurrent claimers (threads or nodes) pass over each other's rows.
CLAIM = """WITH expired AS (
        SELECT id FROM smtp2api_messages
        WHERE state = 'active' AND lease_until < extract(epoch FROM clock_timestamp())::float8
        ORDER BY lease_until LIMIT %(limit)s FOR UPDATE SKIP LOCKED
    ), due AS (
        SELECT id FROM smtp2api_messages WHERE state = 'queued' AND next_attempt_at <= %(now)s
        ORDER BY next_attempt_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
    ), picked AS (
        SELECT id FROM expired UNION ALL SELECT id FROM due LIMIT %(limit)s
    )
    UPDATE smtp2api_messages AS m SET state = 'active', attempts = m.attempts + 1,
        claimed_by = %(node)s, updated_at = %(now)s,
        lease_until = extract(epoch FROM clock_timestamp())::float8 + %(lease)s
    FROM picked WHERE m.id = picked.id
    RETURNING m.id, m.state, m.next_attempt_at, m.attempts, m.created_at, m.mail_from,
        m.rcpt_tos, m.done_recipients, m.account, m.peer, m.providers, m.last_reply,
        m.last_error, m.size, m.smtputf8, m.raw"""
RENEW = (
    "UPDATE smtp2api_messages "
    "SET lease_until = extract(epoch FROM clock_timestamp())::float8 + %s, updated_at = %s "
    "WHERE id = ANY(%s::text[]) AND state = 'active' AND claimed_by = %s"
)
ACK = "DELETE FROM smtp2api_messages WHERE id = %s"
# A worker's outcome is not recorded over another node's live claim (that node took the entry
# over after our lease ran out and is trying it now): ``claimed_by`` is the fence.
DEFER = (
    "UPDATE smtp2api_messages SET state = 'queued', next_attempt_at = %s, lease_until = NULL, "
    "claimed_by = NULL, last_reply = %s, last_error = %s, updated_at = %s "
    "WHERE id = %s AND (claimed_by IS NULL OR claimed_by = %s)"
)
MARK_DEAD = (
    "UPDATE smtp2api_messages SET state = 'dead', lease_until = NULL, claimed_by = NULL, "
    "last_reply = %s, last_error = %s, updated_at = %s "
    "WHERE id = %s AND (claimed_by IS NULL OR claimed_by = %s)"
)
# One statement: the row lock serialises concurrent adds; order kept, no duplicates.
ADD_DONE = (
    "UPDATE smtp2api_messages SET done_recipients = done_recipients || ARRAY("
    "SELECT r FROM unnest(%s::text[]) WITH ORDINALITY AS n(r, i) "
    "WHERE r <> ALL(done_recipients) ORDER BY i), updated_at = %s WHERE id = %s"
)
RELEASE = (
    "UPDATE smtp2api_messages SET state = 'queued', attempts = GREATEST(attempts - %s, 0), "
    "next_attempt_at = COALESCE(%s::float8, next_attempt_at), lease_until = NULL, "
    "claimed_by = NULL, updated_at = %s WHERE id = %s AND state = 'active' AND claimed_by = %s"
)
# Our own claims (when %s, i.e. we hold our node lock) and any expired lease.
RECOVER = (
    "UPDATE smtp2api_messages SET state = 'queued', lease_until = NULL, claimed_by = NULL, "
    "updated_at = %s WHERE state = 'active' AND ((claimed_by = %s AND %s) "
    "OR lease_until < extract(epoch FROM clock_timestamp())::float8)"
)
# A revived dead entry starts a new max_age period (created_at = now); see Spool.retry.
RETRY = (
    "UPDATE smtp2api_messages SET state = 'queued', next_attempt_at = %(now)s, "
    "updated_at = %(now)s, created_at = CASE WHEN state = 'dead' THEN %(now)s "
    "ELSE created_at END WHERE id = %(id)s AND state IN ('queued', 'dead')"
)
RETRY_ALL = (
    "UPDATE smtp2api_messages SET state = 'queued', next_attempt_at = %(now)s, "
    "updated_at = %(now)s, created_at = CASE WHEN state = 'dead' THEN %(now)s "
    "ELSE created_at END WHERE state = 'dead' OR (state = 'queued' AND next_attempt_at > %(now)s)"
)
DELETE = ACK
PURGE_DEAD = "DELETE FROM smtp2api_messages WHERE state = 'dead'"
WRITABLE_CHECK = (
    "INSERT INTO smtp2api_meta (key, value) VALUES (%s, %s) "
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
)
# The lock is per database; the schema is in the key so that two gateway clusters in two
# schemas of one database do not collide.
NODE_LOCK = (
    "SELECT pg_try_advisory_lock(hashtextextended("
    "'smtp2api.node:' || current_schema() || ':' || %s, 0))"
)

GET = (
    "SELECT " + _SUMMARY + ", smtputf8, raw FROM smtp2api_messages WHERE id = %s"  # noqa: S608
)
LIST = (
    "SELECT " + _SUMMARY + " FROM smtp2api_messages "  # noqa: S608 - constants only
    "WHERE (%(state)s::text IS NULL OR state = %(state)s) "
    "ORDER BY created_at, id LIMIT %(limit)s"
)
COUNTS = "SELECT state, count(*) FROM smtp2api_messages GROUP BY state"
OLDEST = (
    "SELECT created_at FROM smtp2api_messages WHERE state <> 'dead' ORDER BY created_at LIMIT 1"
)
# Two index probes (the partial indexes), never a scan; the lease as seconds left, since it
# is on the database's clock.
NEXT_DUE = (
    "SELECT (SELECT next_attempt_at FROM smtp2api_messages WHERE state = 'queued' "
    "ORDER BY next_attempt_at LIMIT 1), (SELECT lease_until FROM smtp2api_messages "
    "WHERE state = 'active' ORDER BY lease_until LIMIT 1) "
    "- extract(epoch FROM clock_timestamp())::float8"
)


async def migrate(conn: AsyncConnection[Any]) -> int:
    """Bring the database to ``SCHEMA_VERSION``; returns the version found.

    One transaction under ``pg_advisory_xact_lock``: PostgreSQL's DDL is transactional, so a
    step is applied whole or not at all, and a node that waited for the lock sees the steps
    the first one committed and applies none of them again.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        found = await _schema_version(conn)
        if found > SCHEMA_VERSION:
            raise SpoolError(
                f"spool schema version {found} is newer than this smtp2api supports "
                f"({SCHEMA_VERSION}); upgrade smtp2api"
            )
        if found == 0:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS smtp2api_schema_version (version integer PRIMARY "
                "KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        for number, step in enumerate(MIGRATIONS[found:], start=found + 1):
            for statement in step:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO smtp2api_schema_version (version) VALUES (%s)", (number,)
            )
    return found


async def _schema_version(conn: AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT to_regclass('smtp2api_schema_version') IS NOT NULL")
    exists = await cur.fetchone()
    if not exists or not exists[0]:
        return 0
    cur = await conn.execute("SELECT coalesce(max(version), 0) FROM smtp2api_schema_version")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


def clean_text(value: str | None) -> str | None:
    """PostgreSQL ``text`` cannot hold NUL; replies and error details are free text from
    providers, so a NUL there is replaced rather than failing the update that records it."""
    return None if value is None else value.replace("\x00", "\ufffd")


def encode_entry(entry: SpoolEntry, lease: float) -> tuple[object, ...]:
    """Parameters for ``INSERT_ENTRY``; ``updated_at`` is the entry's creation time."""
    return (
        entry.id,
        entry.state,
        entry.next_attempt_at,
        entry.state == "active",
        lease,
        None,  # an entry put as active (only by tests and tools) is nobody's claim: it expires
        entry.attempts,
        entry.created_at,
        entry.created_at,
        entry.mail_from,
        list(entry.rcpt_tos),
        list(entry.done_recipients),
        entry.account,
        entry.peer,
        list(entry.providers),
        entry.smtputf8,
        clean_text(entry.last_reply),
        clean_text(entry.last_error),
        len(entry.raw),
        bytes(entry.raw),
    )


def decode_summary(row: Sequence[Any]) -> SpoolSummary:
    """A ``SUMMARY_COLUMNS`` row. The table's types and CHECKs vouch for the shapes."""
    state = _state(row[1])
    return SpoolSummary(
        id=str(row[0]),
        state=state,
        next_attempt_at=float(row[2]),
        attempts=int(row[3]),
        created_at=float(row[4]),
        mail_from=str(row[5]),
        rcpt_tos=tuple(row[6]),
        done_recipients=tuple(row[7]),
        account=row[8],
        peer=str(row[9]),
        providers=tuple(row[10]),
        last_reply=row[11],
        last_error=row[12],
        size=int(row[13]),
    )


def decode_entry(row: Sequence[Any]) -> SpoolEntry:
    """An ``ENTRY_COLUMNS`` row."""
    s = decode_summary(row)
    return s.with_body(bytes(row[15]), smtputf8=bool(row[14]))


def _state(value: object) -> State:
    for state in STATES:
        if value == state:
            return state
    raise SpoolError("spool row has an unknown state")
