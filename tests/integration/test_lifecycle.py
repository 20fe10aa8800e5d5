"""The real daemon's lifecycle: SIGTERM drains and exits 0 without losing what it was sending;
SIGHUP reloads the configuration and the TLS certificate without dropping sessions."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from smtp2api.config import SpoolSettings
from smtp2api.spool import SpoolEntry, open_spool
from tests.conftest import PASSWORDS, account, base_config
from tests.support.daemon import Daemon, write_config
from tests.support.fakeapi import Answer, FakeAPI
from tests.support.smtpclient import send, simple_message


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    with FakeAPI().running_in_thread() as fake:
        yield fake


def config(tmp_path: Path, api: FakeAPI, key: str = "key-one", **sections: Any) -> dict[str, Any]:
    providers = {"main": {"type": "http", "url": f"{api.url}/v1/emails", "api_key": key}}
    return base_config(tmp_path, providers=providers, **sections)


def spooled(tmp_path: Path) -> list[SpoolEntry]:
    """What the spool file holds, read by this process (the daemon may be stopped)."""

    async def read() -> list[SpoolEntry]:
        spool = open_spool(SpoolSettings(url=f"sqlite:///{tmp_path / 'spool.db'}"))
        try:
            found = [await spool.get(s.id) for s in await spool.list()]
            return [e for e in found if e is not None]
        finally:
            await spool.aclose()

    return asyncio.run(read())


def test_sigterm_during_delivery_keeps_the_entry_and_exits_0(tmp_path: Path, api: FakeAPI) -> None:
    api.default = Answer(200, json={"id": "too-late"}, delay=30)  # never answers in time
    data = config(
        tmp_path,
        api,
        delivery={"mode": "queue", "shutdown_timeout": "2s"},
    )
    data["providers"]["main"]["timeout"] = "60s"
    path = write_config(tmp_path / "smtp2api.toml", data)
    with Daemon(path) as daemon:
        code, text = send(daemon.smtp_port, simple_message())
        assert code == 250, text
        msg_id = text.rsplit(" ", 1)[1]
        [first] = api.wait_for_requests_sync(1)  # the worker is inside the API call now
        assert daemon.terminate() == 0
        daemon.wait_for("gateway_stopped")
    [entry] = spooled(tmp_path)
    assert (entry.id, entry.state, entry.attempts) == (msg_id, "queued", 1)  # the try counts

    api.default = None  # answers at once from now on
    with Daemon(path) as daemon:
        [_, again] = api.wait_for_requests_sync(2)
        daemon.wait_for("delivery_succeeded", where=lambda e: e.get("msg_id") == msg_id)
        assert daemon.terminate() == 0
    # The retry after an unknown outcome carries the same id, so the API can drop a duplicate.
    for header in ("x-smtp2api-id", "idempotency-key"):
        assert first.headers[header] == again.headers[header] == msg_id
    assert spooled(tmp_path) == []


def _read_reply(stream: Any) -> str:
    lines = []
    while line := stream.readline().decode():
        lines.append(line.rstrip("\r\n"))
        if len(line) < 4 or line[3] != "-":
            break
    return "\n".join(lines)


def test_sigterm_lets_a_session_in_data_finish_and_closes_idle_ones(
    tmp_path: Path, api: FakeAPI
) -> None:
    api.push(Answer(200, json={"id": "api-slow-1"}, delay=1.5))
    data = config(
        tmp_path, api, delivery={"mode": "hybrid", "sync_timeout": "10s", "shutdown_timeout": "10s"}
    )
    path = write_config(tmp_path / "smtp2api.toml", data)
    with Daemon(path) as daemon:
        idle = socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=10)
        stream = idle.makefile("rb")
        assert _read_reply(stream).startswith("220")
        idle.sendall(b"EHLO idle.test\r\n")
        assert "250" in _read_reply(stream)
        replies: list[tuple[int, bytes]] = []

        def transaction() -> None:
            client = smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10)
            client.ehlo("busy.test")
            client.mail("app@example.com")
            client.rcpt("alice@example.com")
            replies.append(client.data(simple_message()))
            # ... and then the gateway, done with this session, says it is closing.
            assert client.getreply()[0] == 421
            client.close()

        busy = threading.Thread(target=transaction)
        busy.start()
        api.wait_for_requests_sync(1)  # the busy session is inside DATA, waiting for the API
        daemon.signal(signal.SIGTERM)
        # The idle session is told why it is closed; the busy one gets its real answer.
        assert _read_reply(stream).startswith("421 4.3.2")
        assert stream.read() == b""
        idle.close()
        busy.join(10)
        assert replies == [(250, b"2.0.0 Ok: api-slow-1")]
        with pytest.raises(ConnectionRefusedError):  # no longer listening
            socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=5).close()
        assert daemon.proc is not None
        assert daemon.proc.wait(20) == 0
    assert spooled(tmp_path) == []


def _certificate(ca: trustme.CA, folder: Path) -> tuple[Path, Path, bytes]:
    """Cert and key files in ``folder``, and the leaf certificate (DER)."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    folder.mkdir(exist_ok=True)
    cert_file, key_file = folder / "tls.crt", folder / "tls.key"
    cert.private_key_pem.write_to_path(key_file)
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return cert_file, key_file, ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def _open_session(port: int, context: ssl.SSLContext) -> tuple[smtplib.SMTP, bytes]:
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.ehlo("client.test")
    client.starttls(context=context)
    client.ehlo("client.test")
    assert isinstance(client.sock, ssl.SSLSocket)
    der = client.sock.getpeercert(binary_form=True)
    assert der is not None
    return client, der


def _finish(client: smtplib.SMTP, user: str | None = None) -> tuple[int, bytes]:
    with client:
        if user is not None:
            client.login(user, PASSWORDS[user])
        assert client.mail("app@example.com")[0] == 250
        assert client.rcpt("alice@example.com")[0] == 250
        return client.data(simple_message())


def test_sighup_reloads_config_and_certificate_without_dropping_sessions(
    tmp_path: Path, api: FakeAPI, tls_ca: trustme.CA, client_tls: ssl.SSLContext
) -> None:
    cert, key, first_der = _certificate(tls_ca, tmp_path / "tls")
    smtp = {"tls_cert_file": str(cert), "tls_key_file": str(key), "trusted_networks": []}
    data = config(
        tmp_path, api, smtp=smtp, accounts=[account("wordpress")], delivery={"mode": "sync"}
    )
    path = write_config(tmp_path / "smtp2api.toml", data)
    with Daemon(path) as daemon:
        before, der = _open_session(daemon.smtp_port, client_tls)
        assert der == first_der
        before.login("wordpress", PASSWORDS["wordpress"])
        assert before.mail("app@example.com")[0] == 250  # inside a transaction across the reload

        # The operator rotates the API key, adds an account, renews the certificate in place.
        _, _, second_der = _certificate(tls_ca, tmp_path / "tls")
        data["providers"]["main"]["api_key"] = "key-two"
        data["accounts"] = [account("wordpress"), account("printer")]
        write_config(path, data)
        mark = daemon.mark()
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("config_reloaded", after=mark)

        assert before.rcpt("alice@example.com")[0] == 250
        code, text = before.data(simple_message())
        assert code == 250, text  # the open session finished on the configuration it began with
        before.quit()
        after, der = _open_session(daemon.smtp_port, client_tls)
        assert der == second_der  # new sessions get the renewed certificate
        assert _finish(after, user="printer")[0] == 250  # and the new account
        keys = [r.headers["authorization"] for r in api.wait_for_requests_sync(2)]
        assert keys == ["Bearer key-one", "Bearer key-two"]

        # An invalid file is refused, logged, and changes nothing.
        path.write_text(path.read_text() + "\n[delivery]\nmode = 'sideways'\n")
        mark = daemon.mark()
        daemon.signal(signal.SIGHUP)
        refused = daemon.wait_for("reload_refused", after=mark)
        assert refused["level"] == "error"
        assert refused["problems"]
        after, der = _open_session(daemon.smtp_port, client_tls)
        assert der == second_der
        assert _finish(after, user="printer")[0] == 250
        assert api.wait_for_requests_sync(3)[-1].headers["authorization"] == "Bearer key-two"
        assert daemon.terminate() == 0
