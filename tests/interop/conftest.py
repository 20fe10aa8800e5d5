"""Real SMTP clients against a real gateway: the shared scenario matrix and its checks.

Every client is run in the four ways people deploy it (``SCENARIOS``), with and without an
attachment, against a gateway started in-process on port 0 that delivers in ``sync`` mode to
a real local HTTP API (``FakeAPI``), so a client's success means the API has the message.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smtp2api.app import Gateway
from tests.conftest import PASSWORDS, GatewayFactory, account
from tests.support.fakeapi import FakeAPI, ReceivedRequest

HERE = Path(__file__).resolve().parent
USER = "wordpress"
PASSWORD = PASSWORDS[USER]
SENDER = "wordpress@example.com"  # the only envelope sender the test route accepts
TO = "alice@example.com"
BCC = "dave@example.org"  # an envelope-only recipient: must arrive as bcc, never as a header
ATTACHMENT_NAME = "report.pdf"
# Binary on purpose: every byte value, so a client or hop that mangles 8-bit data shows.
ATTACHMENT = b"%PDF-1.4\n" + bytes(range(256)) * 8 + b"\n%%EOF\n"

Auth = Literal["PLAIN", "LOGIN", "default"] | None


@dataclass(frozen=True)
class Scenario:
    """One way to reach the gateway: which listener, and whether (and how) to AUTH."""

    name: str
    kind: Literal["plain", "starttls", "tls"]
    auth: Auth  # None: a trusted-network client without AUTH; "default": the client's choice

    @property
    def trusted(self) -> bool:
        return self.auth is None


SCENARIOS = (
    # A LAN device or a local MTA on a trusted network: plain_listen, no TLS, no AUTH.
    Scenario("plain", "plain", None),
    # Submission (port 587 style): STARTTLS, then AUTH.
    Scenario("starttls-plain", "starttls", "PLAIN"),
    Scenario("starttls-login", "starttls", "LOGIN"),
    # SMTPS (port 465 style): implicit TLS, then AUTH with the client's default mechanism.
    Scenario("tls", "tls", "default"),
)


@dataclass
class Target:
    """Where and how a client should send; ``check`` verifies what reached the API."""

    scenario: Scenario
    host: str
    port: int
    ca_file: Path
    api: FakeAPI
    gateway: Gateway
    subject: str = field(default_factory=lambda: f"interop {uuid.uuid4().hex[:12]}")

    @property
    def user(self) -> str | None:
        return None if self.scenario.trusted else USER

    @property
    def password(self) -> str | None:
        return None if self.scenario.trusted else PASSWORD

    async def request(self, timeout: float = 30.0) -> ReceivedRequest:
        [request] = await self.api.wait_for_requests(1, timeout)
        return request

    async def check(self, *, attachment: bool, bcc: bool = True) -> dict[str, Any]:
        """The API got exactly this message: envelope recipients, subject, attachment bytes."""
        request = await self.request()
        body = request.json
        assert body["subject"] == self.subject
        assert [a["email"] for a in body["to"]] == [TO]
        assert [a["email"] for a in body["bcc"]] == ([BCC] if bcc else [])
        assert body["cc"] == []
        assert "bcc" not in {name.lower() for name in body["headers"]}
        assert body["from"]["email"] == SENDER
        assert "Hello from the interop test" in (body["text"] or "")
        files = [a for a in body["attachments"] if a.get("disposition") != "inline"]
        if attachment:
            [file] = files
            assert file["filename"] == ATTACHMENT_NAME
            assert base64.b64decode(file["content"]) == ATTACHMENT
        else:
            assert files == []
        return body  # type: ignore[no-any-return]


def gateway_sections(
    scenario: Scenario, api: FakeAPI, cert: Path, key: Path, **smtp: Any
) -> dict[str, Any]:
    """The gateway config for one scenario: every listener kind, AUTH required unless trusted."""
    return {
        "smtp": {
            "hostname": "localhost",
            "listen": ["127.0.0.1:0"],
            "tls_listen": ["127.0.0.1:0"],
            "plain_listen": ["127.0.0.1:0"],
            "tls_cert_file": str(cert),
            "tls_key_file": str(key),
            # Loopback is every test client's address: trust it only where no AUTH is wanted,
            # so the AUTH scenarios prove the client really authenticated.
            "trusted_networks": ["127.0.0.0/8"] if scenario.trusted else [],
            **smtp,
        },
        "accounts": [account(USER, allowed_senders=[SENDER])],
        # Only this envelope sender has a route: any other gets 553, so the envelope is checked.
        "routes": [{"senders": [SENDER], "providers": ["main"]}],
        "providers": {"main": {"type": "http", "url": f"{api.url}/v1/emails", "api_key": "k"}},
        "delivery": {"mode": "sync", "sync_timeout": "20s"},
    }


@pytest.fixture
async def api() -> AsyncIterator[FakeAPI]:
    async with FakeAPI() as fake:
        yield fake


@pytest.fixture
def ca_file(tls_files: tuple[Path, Path]) -> Path:
    return tls_files[0].parent / "ca.crt"  # written by the tls_files fixture


@pytest.fixture(params=SCENARIOS, ids=[s.name for s in SCENARIOS])
def scenario(request: pytest.FixtureRequest) -> Scenario:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=[False, True], ids=["text", "attachment"])
def attachment(request: pytest.FixtureRequest) -> bool:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def target(
    scenario: Scenario,
    start_gateway: GatewayFactory,
    api: FakeAPI,
    tls_files: tuple[Path, Path],
    ca_file: Path,
) -> Target:
    cert, key = tls_files
    gateway = await start_gateway(**gateway_sections(scenario, api, cert, key))
    return Target(scenario, "127.0.0.1", gateway.port(scenario.kind), ca_file, api, gateway)


def build_message(subject: str, attachment: bool, *, bcc_header: bool = False) -> bytes:
    """The MIME a mail program would hand to its transport (for clients that take raw MIME)."""
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["From"] = f"WordPress <{SENDER}>"
    msg["To"] = TO
    if bcc_header:
        msg["Bcc"] = BCC  # sendmail -t style: the transport strips it (RFC 5322 §3.6.3)
    msg["Subject"] = subject
    msg["Date"] = datetime.datetime.now(datetime.UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@client.test>"
    msg.set_content("Hello from the interop test.\n")
    if attachment:
        msg.add_attachment(
            ATTACHMENT, maintype="application", subtype="pdf", filename=ATTACHMENT_NAME
        )
    return msg.as_bytes()


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


async def run(
    argv: Sequence[str],
    *,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60.0,
) -> Completed:
    """Run a client process without blocking the loop the in-process gateway serves on."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Completed(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def self_signed_cert(folder: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate, like a distribution's snakeoil one (no CA anybody trusts)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "selfsigned.crt", folder / "selfsigned.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file
