"""The ``outbox`` provider: writes each message to a directory instead of sending it.

For the zero-config local default and for trying routes out (design §5): ``<id>.json`` is the
body the generic ``http`` provider would post, plus the envelope; ``<id>.eml`` the raw MIME.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from smtp2api import config
from smtp2api.errors import PayloadBug, ProviderUnavailable
from smtp2api.models import Envelope, Message, SendResult

# No API in the way: the SMTP limits (smtp.max_message_size, max_recipients) are the only ones.
# Recipients are never split, since a second call would overwrite the first one's files.
MAX_RECIPIENTS = 1_000_000
MAX_MESSAGE_SIZE = 1 << 40
DIR_MODE = 0o750
FILE_MODE = 0o640  # group-readable like the directory: a mail viewer may run as another user
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # a file name, never a path


def _document(message: Message, envelope: Envelope) -> bytes:
    body: dict[str, Any] = message.as_json()
    body["envelope"] = {"mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos)}
    return (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _write_atomic(directory: Path, name: str, data: bytes) -> None:
    """Write ``directory/name`` so a reader sees the old file or the whole new one, never half.

    Temp file in the same directory (a rename is atomic only within one file system, POSIX
    rename(2)), fsync before the rename so the data is on disk when the name appears.
    """
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), FILE_MODE)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: Path) -> None:
    # The renames are durable only once the directory itself is synced (fsync(2), NOTES).
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_message(directory: Path, message: Message, envelope: Envelope) -> None:
    """Blocking: create ``directory`` if needed, write ``<id>.eml`` then ``<id>.json``.

    The ``.json`` comes last, so a watcher that picks up ``*.json`` finds the ``.eml`` there.
    """
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _write_atomic(directory, f"{message.id}.eml", message.raw)
    _write_atomic(directory, f"{message.id}.json", _document(message, envelope))
    _fsync_dir(directory)


class OutboxProvider:
    """Accepts every message by writing it under ``settings.path``."""

    raw_mime = False
    max_recipients = MAX_RECIPIENTS
    max_message_size = MAX_MESSAGE_SIZE

    def __init__(self, name: str, settings: config.OutboxProvider) -> None:
        self.name = name
        self.path = settings.path

    def __repr__(self) -> str:
        return f"OutboxProvider(name={self.name!r}, path={str(self.path)!r})"

    async def send(self, message: Message, envelope: Envelope) -> SendResult:
        if not _SAFE_ID.match(message.id):
            # The id names the files: never let one climb out of the directory.
            raise PayloadBug(f"outbox: message id {message.id[:40]!r} is not a safe file name")
        try:
            # Disk I/O and fsync off the event loop: other sessions keep being served.
            await asyncio.to_thread(write_message, self.path, message, envelope)
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, "unknown error")
            raise ProviderUnavailable(
                f"outbox: cannot write to {str(self.path)!r}: {code} ({exc.strerror or 'error'})"
            ) from exc
        return SendResult(provider=self.name, provider_id=message.id)

    async def aclose(self) -> None:
        """Nothing to release: every write is finished when ``send`` returns."""
