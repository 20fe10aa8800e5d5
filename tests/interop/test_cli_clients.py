"""Command-line mail tools: ``swaks`` (the SMTP test swiss-army knife) and ``msmtp``.

msmtp is what cron, mutt, git send-email and monitoring scripts use as ``sendmail``; it takes
the MIME on stdin and the recipients as arguments, as we give them here.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import require_tool
from tests.interop.conftest import (
    ATTACHMENT,
    ATTACHMENT_NAME,
    BCC,
    SENDER,
    TO,
    Target,
    build_message,
    run,
    which,
)


async def test_swaks(target: Target, attachment: bool, tmp_path: Path) -> None:
    swaks = require_tool(which("swaks"), "swaks")
    argv = [
        swaks,
        "--server", target.host, "--port", str(target.port),
        "--helo", "client.test",
        "--from", SENDER,
        "--to", f"{TO},{BCC}",  # the envelope; the headers below name only TO
        "--header", f"From: WordPress <{SENDER}>",
        "--header", f"To: {TO}",
        "--header", f"Subject: {target.subject}",
        "--body", "Hello from the interop test.",
        "--timeout", "20",
    ]  # fmt: skip
    scenario = target.scenario
    if scenario.kind == "starttls":
        argv += ["--tls"]
    elif scenario.kind == "tls":
        argv += ["--tls-on-connect"]
    if scenario.kind != "plain":
        argv += ["--tls-verify", "--tls-ca-path", str(target.ca_file)]
    if scenario.auth is not None:
        argv += ["--auth-user", target.user or "", "--auth-password", target.password or ""]
        if scenario.auth != "default":
            argv += ["--auth", scenario.auth]
    if attachment:
        path = tmp_path / ATTACHMENT_NAME
        path.write_bytes(ATTACHMENT)
        argv += ["--attach-type", "application/pdf", "--attach", f"@{path}"]
    done = await run(argv)
    assert done.returncode == 0, done.output
    # swaks marks TLS lines "<~" and plain ones "<-"
    assert re.search(r"<[-~]  250 2.0.0 Ok: fake-1", done.output), done.output
    await target.check(attachment=attachment)


def msmtp_config(target: Target, folder: Path) -> Path:
    """An msmtprc as the msmtp manual writes them; 0600, or msmtp refuses a password in it."""
    scenario = target.scenario
    lines = [
        "defaults",
        "timeout 20",
        f"logfile {folder / 'msmtp.log'}",
        "account gateway",
        f"host {target.host}",
        f"port {target.port}",
        f"from {SENDER}",
        "domain client.test",
    ]
    if scenario.kind == "plain":
        lines += ["tls off", "auth off"]
    else:
        lines += [
            "tls on",
            f"tls_starttls {'on' if scenario.kind == 'starttls' else 'off'}",
            f"tls_trust_file {target.ca_file}",
        ]
    if scenario.auth is not None:
        mechanism = "on" if scenario.auth == "default" else scenario.auth.lower()
        lines += [f"auth {mechanism}", f"user {target.user}", f"password {target.password}"]
    lines.append("account default : gateway")
    path = folder / "msmtprc"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


async def test_msmtp(target: Target, attachment: bool, tmp_path: Path) -> None:
    msmtp = require_tool(which("msmtp"), "msmtp")
    config = msmtp_config(target, tmp_path)
    data = build_message(target.subject, attachment)
    done = await run([msmtp, "-C", str(config), "-f", SENDER, "--", TO, BCC], stdin=data)
    assert done.returncode == 0, done.output + (tmp_path / "msmtp.log").read_text()
    assert "smtpstatus=250 smtpmsg='250 2.0.0 Ok: fake-1'" in (tmp_path / "msmtp.log").read_text()
    await target.check(attachment=attachment)
