"""nodemailer (npm, installed into tests/interop/node by ``make system-deps``).

Like PHPMailer, nodemailer upgrades to STARTTLS by itself whenever the server offers it
(unless ``ignoreTLS``) and then verifies the certificate: the last tests show that failure
with a self-signed certificate and the setups that work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import GatewayFactory, require_tool
from tests.interop.conftest import (
    ATTACHMENT,
    ATTACHMENT_NAME,
    BCC,
    PASSWORD,
    SCENARIOS,
    SENDER,
    TO,
    USER,
    Completed,
    Target,
    gateway_sections,
    run,
    self_signed_cert,
    which,
)
from tests.support.fakeapi import FakeAPI

NODE_DIR = Path(__file__).with_name("node")
# What nodemailer reports for a self-signed certificate at STARTTLS (Node's TLS error).
SELF_SIGNED_ERROR = "ERROR ESOCKET: self-signed certificate"


async def nodemailer(
    tmp_path: Path,
    transport: dict[str, Any],
    subject: str,
    *,
    attachment: bool = False,
    ca_file: Path | None = None,
) -> Completed:
    node = require_tool(which("node"), "node")
    require_tool(
        "yes" if (NODE_DIR / "node_modules" / "nodemailer").is_dir() else None,
        "nodemailer (npm ci in tests/interop/node)",
    )
    message: dict[str, Any] = {
        "from": f'"WordPress" <{SENDER}>',
        "to": TO,
        "bcc": BCC,
        "subject": subject,
        "text": "Hello from the interop test.",
        "envelope": {"from": SENDER, "to": [TO, BCC]},
    }
    if attachment:
        path = tmp_path / ATTACHMENT_NAME
        path.write_bytes(ATTACHMENT)
        message["attachments"] = [{"filename": ATTACHMENT_NAME, "path": str(path)}]
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"transport": {"connectionTimeout": 20000, **transport},
                               "message": message}))  # fmt: skip
    # NODE_EXTRA_CA_CERTS: how a Node app trusts a private CA without code changes.
    env = {"NODE_EXTRA_CA_CERTS": str(ca_file)} if ca_file else {}
    return await run([node, str(NODE_DIR / "send.mjs"), str(job)], env=env, cwd=NODE_DIR)


def transport_for(target: Target) -> dict[str, Any]:
    scenario = target.scenario
    transport: dict[str, Any] = {
        "host": target.host,
        "port": target.port,
        "secure": scenario.kind == "tls",  # implicit TLS
        "requireTLS": scenario.kind == "starttls",  # fail rather than send in clear
    }
    if scenario.auth is not None:
        transport["auth"] = {"user": target.user, "pass": target.password}
        if scenario.auth != "default":
            transport["authMethod"] = scenario.auth
    return transport


async def test_nodemailer(target: Target, attachment: bool, tmp_path: Path) -> None:
    done = await nodemailer(
        tmp_path, transport_for(target), target.subject, attachment=attachment,
        ca_file=target.ca_file,
    )  # fmt: skip
    assert done.returncode == 0, done.output
    assert done.stdout.strip() == "SENT 250 2.0.0 Ok: fake-1"
    await target.check(attachment=attachment)


async def test_self_signed_starttls_fails_with_a_clear_diagnosis(
    start_gateway: GatewayFactory, api: FakeAPI, tmp_path: Path
) -> None:
    """Default options ({host, port}, no TLS asked for) still upgrade and then refuse."""
    cert, key = self_signed_cert(tmp_path)
    gateway = await start_gateway(**gateway_sections(SCENARIOS[0], api, cert, key))
    transport = {"host": "127.0.0.1", "port": gateway.port("starttls")}
    done = await nodemailer(tmp_path, transport, "self-signed")
    assert done.returncode == 1, done.output
    assert done.stdout.strip() == SELF_SIGNED_ERROR, done.output
    assert api.requests == []


async def test_self_signed_working_setups(
    start_gateway: GatewayFactory, api: FakeAPI, tmp_path: Path
) -> None:
    """plain_listen with default options; or ignoreTLS on the STARTTLS listener."""
    cert, key = self_signed_cert(tmp_path)
    plain = SCENARIOS[0]
    gateway = await start_gateway(**gateway_sections(plain, api, cert, key))
    target = Target(plain, "127.0.0.1", gateway.port("plain"), tmp_path, api, gateway)
    done = await nodemailer(tmp_path, {"host": "127.0.0.1", "port": target.port}, target.subject)
    assert done.returncode == 0, done.output
    await target.check(attachment=False)
    api.clear()
    transport = {"host": "127.0.0.1", "port": gateway.port("starttls"), "ignoreTLS": True}
    done = await nodemailer(tmp_path, transport, target.subject)
    assert done.returncode == 0, done.output
    await target.check(attachment=False)


async def test_plain_listen_with_auth_when_require_tls_is_off(
    start_gateway: GatewayFactory, api: FakeAPI, tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    auth = SCENARIOS[1]
    gateway = await start_gateway(**gateway_sections(auth, api, *tls_files, require_tls=False))
    target = Target(auth, "127.0.0.1", gateway.port("plain"), tmp_path, api, gateway)
    transport = {"host": "127.0.0.1", "port": target.port,
                 "auth": {"user": USER, "pass": PASSWORD}}  # fmt: skip
    done = await nodemailer(tmp_path, transport, target.subject)
    assert done.returncode == 0, done.output
    await target.check(attachment=False)
