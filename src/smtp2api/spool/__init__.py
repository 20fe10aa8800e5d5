"""The durable spool (design §1 promise 1, §3): the interface and ``open_spool``.

Callers depend on ``Spool`` only; ``open_spool`` picks the implementation from
``[spool] url``.
"""

from __future__ import annotations

from pathlib import Path

from smtp2api.config import SpoolSettings
from smtp2api.errors import ConfigError, SpoolError
from smtp2api.spool.base import STATES, Spool, SpoolEntry, SpoolSummary, State, new_message_id
from smtp2api.spool.sqlite import SqliteSpool

__all__ = [
    "STATES",
    "Spool",
    "SpoolEntry",
    "SpoolSummary",
    "SqliteSpool",
    "State",
    "new_message_id",
    "open_spool",
    "sqlite_path",
]

_SQLITE = "sqlite:///"


def sqlite_path(url: str) -> Path:
    """The file of a SQLAlchemy-style URL: ``sqlite:///rel/path`` or ``sqlite:////abs/path``."""
    if not url.startswith(_SQLITE):
        raise SpoolError("spool.url: expected sqlite:///PATH")
    path, _, query = url[len(_SQLITE) :].partition("?")
    if query:
        raise SpoolError("spool.url: sqlite URLs take no query parameters")
    if not path or path == ":memory:":
        # Two connections (writer, reader) and other processes need one shared, durable file.
        raise SpoolError("spool.url: a file path is required (an in-memory spool is not durable)")
    return Path(path)


def open_spool(settings: SpoolSettings, *, group_commit: bool = True) -> Spool:
    """The spool ``settings.url`` names. No I/O yet: the storage is opened (created and
    migrated as needed) by the first operation, so open errors surface as ``SpoolError``
    from it (the daemon's first is ``recover`` at startup)."""
    url = settings.url
    if url.startswith(_SQLITE):
        return SqliteSpool(sqlite_path(url), lease=settings.lease, group_commit=group_commit)
    if url.startswith(("postgresql://", "postgres://")):
        return _postgres_spool(settings, group_commit)
    raise SpoolError("spool.url: unsupported scheme (expected sqlite:/// or postgresql://)")


def _postgres_spool(settings: SpoolSettings, group_commit: bool) -> Spool:
    # Imported here: psycopg is the optional extra ``smtp2api[postgres]``.
    try:
        from smtp2api.spool.postgres import PostgresSpool
    except ImportError:
        raise ConfigError(
            [
                "spool.url: a postgresql:// spool needs the PostgreSQL driver: "
                "pip install 'smtp2api[postgres]'"
            ]
        ) from None
    # The URL is never echoed in errors: it may hold a password.
    return PostgresSpool(
        settings.url,
        lease=settings.lease,
        node_id=settings.node_id or None,
        timeout=settings.timeout,
        group_commit=group_commit,
    )
