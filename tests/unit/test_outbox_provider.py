"""The ``outbox`` provider: files written atomically, exact contents, failures are 4xx."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from smtp2api import config
from smtp2api.errors import PayloadBug, ProviderUnavailable
from smtp2api.models import Address, Attachment, Envelope, Message, SendResult
from smtp2api.providers.base import Provider
from smtp2api.providers.outbox import OutboxProvider

RAW = (
    b"Received: from client (127.0.0.1) by gw.test\r\n"
    b"From: =?utf-8?q?J=C3=B6rg?= <joerg@example.com>\r\n"
    b"To: rcpt@example.net\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n\r\n"
    b"8bit body \xe2\x82\xac and a bare\rCR\r\n"
)
ENVELOPE = Envelope("joerg@example.com", ("rcpt@example.net", "hidden@example.org"))


def make_message(**changes: Any) -> Message:
    fields: dict[str, Any] = {
        "id": "01J0OUTBOX000000000000000",
        "raw": RAW,
        "from_": Address("joerg@example.com", "J\u00f6rg"),
        "to": (Address("rcpt@example.net"),),
        "bcc": (Address("hidden@example.org"),),
        "subject": "Gr\u00fc\u00dfe",
        "text": "8bit body \u20ac",
        "attachments": (Attachment("x.bin", "application/octet-stream", bytes(range(256))),),
        "metadata": {"k": "v"},
    }
    fields.update(changes)
    return Message(**fields)


def outbox(path: Path) -> OutboxProvider:
    return OutboxProvider("outbox", config.OutboxProvider(type="outbox", path=path))


async def test_writes_json_and_eml(tmp_path: Path) -> None:
    target = tmp_path / "new" / "outbox"
    message = make_message()
    result = await outbox(target).send(message, ENVELOPE)

    assert result == SendResult(provider="outbox", provider_id=message.id)
    assert (target / f"{message.id}.eml").read_bytes() == RAW
    document = json.loads((target / f"{message.id}.json").read_text(encoding="utf-8"))
    assert document == {
        **message.as_json(),
        "envelope": {
            "mail_from": "joerg@example.com",
            "rcpt_tos": ["rcpt@example.net", "hidden@example.org"],
        },
    }
    assert sorted(p.name for p in target.iterdir()) == [
        f"{message.id}.eml",
        f"{message.id}.json",
    ]  # no temp files left behind


async def test_json_is_pretty_utf8(tmp_path: Path) -> None:
    message = make_message()
    await outbox(tmp_path).send(message, ENVELOPE)
    text = (tmp_path / f"{message.id}.json").read_bytes()
    assert "Gr\u00fc\u00dfe".encode() in text  # UTF-8, not \\u escapes
    assert text.startswith(b"{\n  ")
    assert text.endswith(b"}\n")


async def test_permissions(tmp_path: Path) -> None:
    target = tmp_path / "outbox"
    message = make_message()
    await outbox(target).send(message, ENVELOPE)
    assert stat.S_IMODE(target.stat().st_mode) & ~0o750 == 0  # the umask may narrow it further
    assert stat.S_IMODE((target / f"{message.id}.eml").stat().st_mode) == 0o640
    assert stat.S_IMODE((target / f"{message.id}.json").stat().st_mode) == 0o640


async def test_resend_overwrites_in_place(tmp_path: Path) -> None:
    provider = outbox(tmp_path)
    await provider.send(make_message(raw=b"first\r\n"), ENVELOPE)
    await provider.send(make_message(), ENVELOPE)
    assert (tmp_path / f"{make_message().id}.eml").read_bytes() == RAW
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("where", ["is-a-file", "is-a-file/below"])
async def test_unwritable_path_is_transient(tmp_path: Path, where: str) -> None:
    (tmp_path / "is-a-file").write_text("not a directory")
    with pytest.raises(ProviderUnavailable) as caught:
        await outbox(tmp_path / where).send(make_message(), ENVELOPE)
    error = caught.value
    assert error.reply.is_transient
    assert str(error.reply) == "451 4.3.0 Upstream error, try again later"
    assert "outbox: cannot write to" in error.detail
    assert str(tmp_path) in error.detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
async def test_read_only_directory_is_transient(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await outbox(tmp_path).send(make_message(), ENVELOPE)
        assert "EACCES" in caught.value.detail
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.parametrize("bad_id", ["../escape", "/abs", ".hidden", "a/b", "", "x" * 300])
async def test_unsafe_ids_never_become_paths(tmp_path: Path, bad_id: str) -> None:
    target = tmp_path / "outbox"
    with pytest.raises(PayloadBug) as caught:
        await outbox(target).send(make_message(id=bad_id), ENVELOPE)
    assert caught.value.reply.is_transient
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


async def test_shape(tmp_path: Path) -> None:
    provider = outbox(tmp_path)
    assert isinstance(provider, Provider)
    assert provider.raw_mime is False
    assert provider.max_recipients >= 100_000
    await provider.aclose()
