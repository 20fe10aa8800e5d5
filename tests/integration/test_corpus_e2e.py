"""Every file of the shared MIME corpus through the real gateway over SMTP: each is forwarded
(250, with exactly the envelope's recipients at the API) or refused with 554 5.6.0; never an
exception, never a hang, never another envelope."""

from __future__ import annotations

import smtplib
from pathlib import Path

from tests.conftest import MIME_CORPUS, GatewayFactory, in_thread
from tests.support.fakeapi import FakeAPI

RCPTS = ("first@example.com", "second@example.org", "hidden@example.net")


def corpus_files() -> list[Path]:
    return sorted(p for p in MIME_CORPUS.glob("*/*") if p.is_file() and p.parent.name != "licenses")


def send_all(port: int, files: list[Path]) -> list[tuple[Path, int, str]]:
    results = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("corpus.test")
        for path in files:
            client.rset()
            client.mail("sender@example.com")
            for rcpt in RCPTS:
                client.rcpt(rcpt)
            # smtplib converts line endings to CRLF and dot-stuffs, as any SMTP client does.
            code, text = client.data(path.read_bytes())
            results.append((path, code, text.decode()))
    return results


async def test_every_corpus_file_is_forwarded_or_refused_cleanly(
    start_gateway: GatewayFactory,
) -> None:
    files = corpus_files()
    assert len(files) > 100
    async with FakeAPI() as api:
        gw = await start_gateway(
            providers={"main": {"type": "http", "url": f"{api.url}/send"}},
            delivery={"mode": "sync"},
        )
        results = await in_thread(send_all, gw.port(), files)
        accepted = [r for r in results if r[1] == 250]
        refused = [r for r in results if r[1] != 250]
        assert all(code == 554 and text.startswith("5.6.0") for _, code, text in refused), refused
        assert len(api.requests) == len(accepted)
        for request in api.requests:
            body = request.json
            got = sorted(a["email"] for key in ("to", "cc", "bcc") for a in body[key])
            assert got == sorted(RCPTS)
