"""Fixtures shared by every test: paths, TLS material, a running gateway on port 0."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from smtp2api.app import Gateway
from smtp2api.auth import hash_password
from smtp2api.config import Settings, build_settings

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMTP2API_SHARED", REPO.parent / "shared"))
MIME_CORPUS = SHARED / "mime-corpus"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Hashing is slow by design: hash the test passwords once per run, cheaply (log2 n = 10).
PASSWORDS = {"wordpress": "correct horse battery staple", "printer": "s3cret-print"}
_HASHES = {user: hash_password(pw, log2_n=10) for user, pw in PASSWORDS.items()}


def account(username: str, **extra: Any) -> dict[str, Any]:
    return {"username": username, "password_hash": _HASHES[username], **extra}


def require_tool(path: str | None, name: str) -> str:
    """A test needing a missing external tool fails in CI and skips elsewhere."""
    if path:
        return path
    if IN_CI:
        pytest.fail(f"{name} is not installed; .ci/run must install it")
    pytest.skip(f"{name} is not installed")


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cert = tls_ca.issue_cert("localhost", "127.0.0.1", "::1")
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "tls.crt", folder / "tls.key"
    cert.private_key_pem.write_to_path(key_file)
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    ca_file = folder / "ca.crt"
    tls_ca.cert_pem.write_to_path(ca_file)
    return cert_file, key_file


@pytest.fixture
def client_tls(tls_ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    tls_ca.configure_trust(context)
    return context


def base_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A config mapping listening on port 0 with a spool under ``tmp_path``."""
    data: dict[str, Any] = {
        "smtp": {"hostname": "gw.test", "listen": ["127.0.0.1:0"]},
        "spool": {"url": f"sqlite:///{tmp_path / 'spool.db'}"},
        "http": {"listen": "127.0.0.1:0"},
        "providers": {"outbox": {"type": "outbox", "path": str(tmp_path / "outbox")}},
    }
    for key, value in sections.items():
        if key != "providers" and isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """``await start_gateway(smtp={...}, providers={...}, ...)`` -> a started Gateway."""
    started: list[Gateway] = []

    async def start(settings: Settings | None = None, **sections: Any) -> Gateway:
        if settings is None:
            settings = build_settings(base_config(tmp_path, **sections))
        gateway = Gateway(settings)
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.shutdown()


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking client (smtplib) while the gateway's loop keeps serving."""
    return await asyncio.to_thread(fn, *args, **kwargs)
