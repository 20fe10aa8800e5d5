"""The SQLite spool's schema (versioned with ``PRAGMA user_version``) and its row codec.

Rows are validated as they are read: SQLite is dynamically typed and a file can be edited or
damaged by hand, so a row that does not decode raises ``CorruptRow`` and is moved to the
``quarantine`` table by the caller instead of crashing the daemon.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii
from typing import Any, cast

from smtp2api.errors import SpoolError
from smtp2api.spool.base import STATES, SpoolEntry, SpoolSummary, State

# One tuple of statements per schema version; index 0 upgrades version 0 (empty file) to 1.
# Never edit a shipped step: append a new one, so every existing spool file can follow.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # Small columns first, ``raw`` last: a record's columns are stored in order and its
        # tail spills into overflow pages, so reading the columns before ``raw`` (listings,
        # counts) does not read the body's pages (https://www.sqlite.org/fileformat2.html,
        # "Cell Payload Overflow Pages"). Not STRICT: STRICT needs SQLite 3.37, older than
        # some distributions' Python builds; the codec below checks types instead.
        """CREATE TABLE messages (
            id              TEXT    NOT NULL PRIMARY KEY,
            state           TEXT    NOT NULL CHECK (state IN ('queued', 'active', 'dead')),
            next_attempt_at REAL    NOT NULL,
            lease_until     REAL,
            attempts        INTEGER NOT NULL DEFAULT 0,
            created_at      REAL    NOT NULL,
            updated_at      REAL    NOT NULL,
            mail_from       TEXT    NOT NULL,
            rcpt_tos        TEXT    NOT NULL,
            done_recipients TEXT    NOT NULL DEFAULT '[]',
            account         TEXT,
            peer            TEXT    NOT NULL,
            providers       TEXT    NOT NULL,
            smtputf8        INTEGER NOT NULL DEFAULT 0,
            last_reply      TEXT,
            last_error      TEXT,
            size            INTEGER NOT NULL,
            raw             BLOB    NOT NULL
        )""",
        "CREATE INDEX messages_due ON messages (state, next_attempt_at)",
        "CREATE INDEX messages_created ON messages (created_at)",
        """CREATE TABLE quarantine (
            msg_id         TEXT,
            quarantined_at REAL NOT NULL,
            reason         TEXT NOT NULL,
            record         TEXT NOT NULL,
            raw            BLOB
        )""",
        "CREATE TABLE meta (key TEXT NOT NULL PRIMARY KEY, value TEXT NOT NULL)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_SUMMARY = (
    "id, state, next_attempt_at, attempts, created_at, mail_from, rcpt_tos, done_recipients, "
    "account, peer, providers, last_reply, last_error, size"
)
SUMMARY_COLUMNS = "rowid, " + _SUMMARY  # every SELECT leads with rowid, used to quarantine
ENTRY_COLUMNS = SUMMARY_COLUMNS + ", smtputf8, raw"

# The column lists are constants, never input: the f-strings below cannot inject.
SELECT_ENTRIES = f"SELECT {ENTRY_COLUMNS} FROM messages"  # noqa: S608
SELECT_SUMMARIES = f"SELECT {SUMMARY_COLUMNS} FROM messages"  # noqa: S608

INSERT_ENTRY = (
    "INSERT INTO messages (id, state, next_attempt_at, lease_until, attempts, created_at, "
    "updated_at, mail_from, rcpt_tos, done_recipients, account, peer, providers, smtputf8, "
    "last_reply, last_error, size, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
    "?, ?)"
)

# The same row with a zero-filled ``raw`` of the given length, written afterwards through
# incremental blob I/O (``SqliteSpool.put`` for large bodies).
INSERT_ENTRY_ZEROBLOB = INSERT_ENTRY.removesuffix("?)") + "zeroblob(?))"


class CorruptRow(SpoolError):
    """A stored row does not decode; ``reason`` is log-safe (names a column, never data)."""

    def __init__(self, msg_id: str, reason: str) -> None:
        super().__init__(f"spool entry {msg_id} is corrupt: {reason}")
        self.msg_id = msg_id
        self.reason = reason


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the file to ``SCHEMA_VERSION``; returns the version found.

    Runs under ``BEGIN IMMEDIATE`` so two processes opening a new file at once (daemon and
    ``smtp2api queue``) cannot both migrate; ``user_version`` is part of the transaction.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = _schema_version(conn)
        for step in MIGRATIONS[found:]:
            for statement in step:
                conn.execute(statement)
        if found != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return found


def _schema_version(conn: sqlite3.Connection) -> int:
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise SpoolError(
            f"spool schema version {found} is newer than this smtp2api supports "
            f"({SCHEMA_VERSION}); upgrade smtp2api"
        )
    return found


def encode_entry(entry: SpoolEntry, now: float, lease: float) -> tuple[object, ...]:
    """Parameters for ``INSERT_ENTRY``."""
    return (
        entry.id,
        entry.state,
        entry.next_attempt_at,
        now + lease if entry.state == "active" else None,
        entry.attempts,
        entry.created_at,
        now,
        entry.mail_from,
        encode_list(entry.rcpt_tos),
        encode_list(entry.done_recipients),
        entry.account,
        entry.peer,
        encode_list(entry.providers),
        int(entry.smtputf8),
        entry.last_reply,
        entry.last_error,
        len(entry.raw),
        bytes(entry.raw),
    )


def encode_list(values: Sequence[str]) -> str:
    """A JSON array of strings, the same text as ``json.dumps(list(values), separators=(",",
    ":"))``: three per put, and ``json.dumps`` builds an encoder per call (~2.5 us each, this
    ~0.4 us)."""
    return "[" + ",".join(map(encode_basestring_ascii, values)) + "]"


def decode_summary(row: Sequence[Any]) -> SpoolSummary:
    """A ``SUMMARY_COLUMNS`` (or ``ENTRY_COLUMNS``) row; raises ``CorruptRow``."""
    msg_id = row[1] if isinstance(row[1], str) else f"rowid:{row[0]}"
    if not isinstance(row[1], str) or not row[1]:
        raise CorruptRow(msg_id, "id: not text")
    if row[2] not in STATES:
        raise CorruptRow(msg_id, "state: unknown")
    return SpoolSummary(
        id=msg_id,
        state=cast(State, row[2]),
        next_attempt_at=_number(msg_id, "next_attempt_at", row[3]),
        attempts=_integer(msg_id, "attempts", row[4]),
        created_at=_number(msg_id, "created_at", row[5]),
        mail_from=_text(msg_id, "mail_from", row[6]),
        rcpt_tos=decode_list(msg_id, "rcpt_tos", row[7]),
        done_recipients=decode_list(msg_id, "done_recipients", row[8]),
        account=None if row[9] is None else _text(msg_id, "account", row[9]),
        peer=_text(msg_id, "peer", row[10]),
        providers=decode_list(msg_id, "providers", row[11]),
        last_reply=None if row[12] is None else _text(msg_id, "last_reply", row[12]),
        last_error=None if row[13] is None else _text(msg_id, "last_error", row[13]),
        size=_integer(msg_id, "size", row[14]),
    )


def decode_entry(row: Sequence[Any]) -> SpoolEntry:
    """An ``ENTRY_COLUMNS`` row; raises ``CorruptRow``."""
    s = decode_summary(row)
    raw = row[16]
    if not isinstance(raw, bytes):
        raise CorruptRow(s.id, "raw: not a blob")
    if len(raw) != s.size:
        raise CorruptRow(s.id, "raw: length does not match size")
    return s.with_body(raw, smtputf8=bool(_integer(s.id, "smtputf8", row[15])))


def decode_list(msg_id: str, column: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, str):
        raise CorruptRow(msg_id, f"{column}: not text")
    try:
        items = json.loads(value)
    except ValueError:
        raise CorruptRow(msg_id, f"{column}: invalid JSON") from None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise CorruptRow(msg_id, f"{column}: not a list of strings")
    return tuple(items)


def _text(msg_id: str, column: str, value: object) -> str:
    if not isinstance(value, str):
        raise CorruptRow(msg_id, f"{column}: not text")
    return value


def _number(msg_id: str, column: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CorruptRow(msg_id, f"{column}: not a number")
    return float(value)


def _integer(msg_id: str, column: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CorruptRow(msg_id, f"{column}: not an integer")
    return value


def quarantine_row(conn: sqlite3.Connection, rowid: int, now: float) -> tuple[str, str] | None:
    """Move the row at ``rowid`` to ``quarantine`` if it (still) does not decode.

    Re-reads and re-checks inside the writer's transaction: the row may have been fixed,
    deleted or replaced since a reader saw it. Returns ``(msg_id, reason)`` when moved.
    """
    cursor = conn.execute(SELECT_ENTRIES + " WHERE rowid = ?", (rowid,))
    row = cursor.fetchone()
    if row is None:
        return None
    try:
        decode_entry(row)
    except CorruptRow as exc:
        names = [d[0] for d in cursor.description]
        record = {
            name: value if value is None or isinstance(value, str | int | float) else repr(value)
            for name, value in zip(names[:-1], row[:-1], strict=True)
        }
        conn.execute(
            "INSERT INTO quarantine (msg_id, quarantined_at, reason, record, raw) "
            "VALUES (?, ?, ?, ?, ?)",
            (exc.msg_id, now, exc.reason, json.dumps(record), row[-1]),
        )
        conn.execute("DELETE FROM messages WHERE rowid = ?", (rowid,))
        return exc.msg_id, exc.reason
    return None
