"""PHPMailer, as WordPress's ``wp_mail`` drives it (Debian's ``libphp-phpmailer``, ``php-cli``).

The harness ``phpmailer_send.php`` applies WP Mail SMTP's "Other SMTP" settings or the
``phpmailer_init`` snippet of docs/wordpress.md. PHPMailer's "Auto TLS" upgrades to STARTTLS
whenever the server offers it and then verifies the certificate, which is the trap the last
tests pin down: the failure with a self-signed certificate, and the setups that work.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.conftest import REPO, GatewayFactory, require_tool
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

HARNESS = Path(__file__).with_name("phpmailer_send.php")
WORDPRESS_DOC = REPO / "docs" / "wordpress.md"
# What PHPMailer says when the STARTTLS handshake fails certificate verification; quoted by
# docs/wordpress.md and docs/troubleshooting.md as the diagnosis.
SELF_SIGNED_ERROR = "SMTP Error: Could not connect to SMTP host. Connection failed."
SELF_SIGNED_DEBUG = "SSL routines::certificate verify failed"


async def phpmailer(
    tmp_path: Path, subject: str, *, attachment: bool = False, cafile: Path | None = None,
    **job: Any,
) -> Completed:  # fmt: skip
    php = require_tool(which("php"), "php (php-cli)")
    require_tool(
        "yes" if Path("/usr/share/php/libphp-phpmailer/autoload.php").exists() else None,
        "PHPMailer (libphp-phpmailer)",
    )
    job = {
        "from": SENDER,
        "from_name": "WordPress",
        "to": TO,
        "bcc": [BCC],
        "subject": subject,
        "body": "Hello from the interop test.",
        **job,
    }
    if attachment:
        path = tmp_path / ATTACHMENT_NAME
        path.write_bytes(ATTACHMENT)
        job["attachments"] = [str(path)]
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    # openssl.cafile stands in for a certificate from a CA the system trusts.
    options = ["-d", f"openssl.cafile={cafile}"] if cafile else []
    return await run([php, *options, str(HARNESS), str(job_file)])


def settings_for(target: Target) -> dict[str, Any]:
    """WP Mail SMTP "Other SMTP" settings for a scenario, as docs/wordpress.md tabulates them."""
    scenario = target.scenario
    encryption = {"plain": "none", "starttls": "tls", "tls": "ssl"}[scenario.kind]
    settings: dict[str, Any] = {
        "host": target.host,
        "port": target.port,
        "encryption": encryption,
        "autotls": True,  # the plugin's default
        "auth": scenario.auth is not None,
    }
    if scenario.auth is not None:
        settings |= {"user": target.user, "pass": target.password}
        if scenario.auth != "default":
            settings["authtype"] = scenario.auth
    return settings


async def test_wp_mail_smtp_settings(target: Target, attachment: bool, tmp_path: Path) -> None:
    done = await phpmailer(
        tmp_path,
        target.subject,
        attachment=attachment,
        cafile=target.ca_file,
        wp_mail_smtp=settings_for(target),
    )
    assert done.returncode == 0, done.output
    assert "SERVER -> CLIENT: 250 2.0.0 Ok: fake-1" in done.stderr
    if target.scenario.auth in ("PLAIN", "LOGIN"):
        assert f"CLIENT -> SERVER: AUTH {target.scenario.auth}" in done.stderr
    await target.check(attachment=attachment)


def doc_snippet(marker: str) -> str:
    """The PHP block of docs/wordpress.md that follows ``<!-- marker -->``."""
    text = WORDPRESS_DOC.read_text()
    match = re.search(rf"<!-- {marker} -->\s*```php\n(.*?)```", text, re.DOTALL)
    assert match, f"docs/wordpress.md has no php block after <!-- {marker} -->"
    return match.group(1)


async def test_phpmailer_init_snippet_from_the_docs(
    start_gateway: GatewayFactory,
    api: FakeAPI,
    tls_files: tuple[Path, Path],
    ca_file: Path,
    tmp_path: Path,
) -> None:
    """The mu-plugin and wp-config.php lines of docs/wordpress.md, run verbatim."""
    starttls = SCENARIOS[1]
    gateway = await start_gateway(**gateway_sections(starttls, api, *tls_files))
    target = Target(starttls, "127.0.0.1", gateway.port("starttls"), ca_file, api, gateway)
    plugin = tmp_path / "smtp2api-mail.php"
    plugin.write_text(doc_snippet("phpmailer-init"))
    constants = {}
    for name, value in re.findall(r"define\(\s*'(\w+)',\s*'([^']*)'", doc_snippet("wp-config")):
        constants[name] = value
    assert set(constants) == {"SMTP2API_HOST", "SMTP2API_PORT", "SMTP2API_USER", "SMTP2API_PASS"}
    constants |= {
        "SMTP2API_HOST": "127.0.0.1",
        "SMTP2API_PORT": str(target.port),
        "SMTP2API_USER": USER,
        "SMTP2API_PASS": PASSWORD,
    }
    done = await phpmailer(
        tmp_path,
        target.subject,
        attachment=True,
        cafile=ca_file,
        snippet=str(plugin),
        constants=constants,
    )
    assert done.returncode == 0, done.output
    assert "CLIENT -> SERVER: STARTTLS" in done.stderr
    await target.check(attachment=True)


async def test_self_signed_starttls_fails_with_a_clear_diagnosis(
    start_gateway: GatewayFactory, api: FakeAPI, tmp_path: Path
) -> None:
    """Encryption "None" is not enough: Auto TLS still upgrades, then the certificate fails."""
    cert, key = self_signed_cert(tmp_path)
    plain = SCENARIOS[0]  # a trusted LAN client without AUTH, the usual victim
    gateway = await start_gateway(**gateway_sections(plain, api, cert, key))
    settings = {"host": "127.0.0.1", "port": gateway.port("starttls"), "encryption": "none",
                "autotls": True, "auth": False}  # fmt: skip
    done = await phpmailer(tmp_path, "self-signed", wp_mail_smtp=settings)
    assert done.returncode == 1, done.output
    assert done.stdout.startswith(f"ERROR: {SELF_SIGNED_ERROR}"), done.stdout
    assert SELF_SIGNED_DEBUG in done.stdout, done.stdout
    assert "CLIENT -> SERVER: STARTTLS" in done.stderr
    assert api.requests == []


async def test_self_signed_working_setups(
    start_gateway: GatewayFactory, api: FakeAPI, tmp_path: Path
) -> None:
    """The documented ways out: plain_listen (trusted network), or Auto TLS off."""
    cert, key = self_signed_cert(tmp_path)
    plain = SCENARIOS[0]
    gateway = await start_gateway(**gateway_sections(plain, api, cert, key))
    target = Target(plain, "127.0.0.1", gateway.port("plain"), tmp_path, api, gateway)
    # 1. Default settings against plain_listen, which never offers STARTTLS.
    settings = {"host": "127.0.0.1", "port": target.port, "encryption": "none",
                "autotls": True, "auth": False}  # fmt: skip
    done = await phpmailer(tmp_path, target.subject, wp_mail_smtp=settings)
    assert done.returncode == 0, done.output
    assert "STARTTLS" not in done.stderr
    await target.check(attachment=False)
    # 2. The STARTTLS listener with "Auto TLS" switched off (trusted network only).
    api.clear()
    settings |= {"port": gateway.port("starttls"), "autotls": False}
    done = await phpmailer(tmp_path, target.subject, wp_mail_smtp=settings)
    assert done.returncode == 0, done.output
    assert "CLIENT -> SERVER: STARTTLS" not in done.stderr
    await target.check(attachment=False)


async def test_plain_listen_with_auth_when_require_tls_is_off(
    start_gateway: GatewayFactory, api: FakeAPI, tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """An untrusted client may AUTH on plain_listen only with require_tls = false."""
    auth = SCENARIOS[1]
    gateway = await start_gateway(**gateway_sections(auth, api, *tls_files, require_tls=False))
    target = Target(auth, "127.0.0.1", gateway.port("plain"), tmp_path, api, gateway)
    settings = {"host": "127.0.0.1", "port": target.port, "encryption": "none", "autotls": True,
                "auth": True, "user": USER, "pass": PASSWORD}  # fmt: skip
    done = await phpmailer(tmp_path, target.subject, wp_mail_smtp=settings)
    assert done.returncode == 0, done.output
    await target.check(attachment=False)
