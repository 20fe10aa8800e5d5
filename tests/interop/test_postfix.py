"""Postfix as a client: the "local MTA relays to the gateway" setup of docs/postfix-smarthost.md.

A private Postfix instance (own config_directory and queue_directory under /tmp, no listener
of its own) relays everything to ``relayhost = [127.0.0.1]:PORT``. Mail goes in through
Postfix's ``sendmail`` as cron or a PHP app would submit it. Postfix's master runs as root and
its daemons as the ``postfix`` user, so these tests need root (CI runs as root).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.conftest import IN_CI, REPO, require_tool
from tests.interop.conftest import (
    BCC,
    SCENARIOS,
    SENDER,
    TO,
    Target,
    build_message,
    run,
    which,
)

SMARTHOST_DOC = REPO / "docs" / "postfix-smarthost.md"

# Only the services a null client that relays everything needs; no smtpd, so nothing listens.
# chroot is off: the private queue directory has none of the files a chroot jail needs.
MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def smarthost_settings(target: Target) -> dict[str, str]:
    """The relay settings of docs/postfix-smarthost.md, for one scenario."""
    scenario = target.scenario
    settings = {"relayhost": f"[{target.host}]:{target.port}"}
    if scenario.kind == "plain":
        settings["smtp_tls_security_level"] = "none"
        return settings
    settings |= {
        "smtp_tls_security_level": "encrypt",  # never send in clear to the gateway
        "smtp_tls_CAfile": str(target.ca_file),
    }
    if scenario.kind == "tls":
        settings["smtp_tls_wrappermode"] = "yes"  # port 465: TLS from the first byte
    settings |= {
        "smtp_sasl_auth_enable": "yes",
        "smtp_sasl_security_options": "noanonymous",
        "smtp_sasl_tls_security_options": "noanonymous",
    }
    if scenario.auth in ("PLAIN", "LOGIN"):
        settings["smtp_sasl_mechanism_filter"] = scenario.auth.lower()
    return settings


class PostfixInstance:
    """A throw-away Postfix: ``postfix -c DIR start``, ``sendmail -C DIR``, then ``stop``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "etc"
        self.queue = root / "spool"
        self.data = root / "data"
        self.log = root / "maillog"

    def write(self, settings: dict[str, str], password_map: str | None, map_type: str) -> None:
        for folder in (self.config, self.queue, self.data):
            folder.mkdir(mode=0o755)
        shutil.chown(self.data, "postfix")
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "maillog_file": str(self.log),  # postlogd: no syslog in a container
            "maillog_file_prefixes": str(self.root),
            "myhostname": "client.test",
            "myorigin": "example.com",
            "mydestination": "",  # nothing is local: everything goes to the relayhost
            "local_transport": "error:no local delivery",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "biff": "no",
            "smtp_helo_name": "client.test",
            # Deliver now and don't wait long: a failure should end the test quickly.
            "smtp_connect_timeout": "10s",
            "queue_run_delay": "5s",
            **settings,
        }
        if password_map is not None:
            (self.config / "sasl_passwd").write_text(password_map)
            (self.config / "sasl_passwd").chmod(0o600)
            main["smtp_sasl_password_maps"] = f"{map_type}:{self.config / 'sasl_passwd'}"
        (self.config / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        (self.config / "master.cf").write_text(MASTER_CF)

    async def postmap(self) -> None:
        """Build sasl_passwd.db as the docs say (``hash:`` maps need it; texthash does not)."""
        postmap = require_tool(which("postmap"), "postmap (postfix)")
        done = await run([postmap, "-c", str(self.config), f"hash:{self.config / 'sasl_passwd'}"])
        assert done.returncode == 0, done.output

    async def postfix(self, *args: str) -> None:
        done = await run([require_tool(which("postfix"), "postfix"), "-c", str(self.config), *args])
        assert done.returncode == 0, done.output + self.maillog()

    async def sendmail(self, data: bytes, *recipients: str) -> None:
        sendmail = require_tool(which("sendmail"), "sendmail (postfix)")
        done = await run([sendmail, "-C", str(self.config), "-f", SENDER, "--", *recipients],
                         stdin=data)  # fmt: skip
        assert done.returncode == 0, done.output + self.maillog()

    def maillog(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def wait_logged(self, text: str, timeout: float = 30.0) -> str:
        async with asyncio.timeout(timeout):
            while text not in self.maillog():
                await asyncio.sleep(0.1)
        return self.maillog()


@pytest.fixture
async def postfix_instance() -> AsyncIterator[Callable[[dict[str, str], str | None], object]]:
    require_tool(which("postfix"), "postfix")
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the Postfix interop tests need root")
        pytest.skip("the Postfix interop tests need root")
    # Not under pytest's tmp_path: its parent is 0700 and the postfix user must get in.
    root = Path(tempfile.mkdtemp(prefix="smtp2api-postfix-"))
    root.chmod(0o755)
    instance = PostfixInstance(root)
    started = False

    async def start(
        settings: dict[str, str], password_map: str | None, map_type: str = "texthash"
    ) -> PostfixInstance:
        nonlocal started
        instance.write(settings, password_map, map_type)
        if password_map is not None and map_type == "hash":
            await instance.postmap()
        await instance.postfix("start")
        started = True
        return instance

    yield start
    if started:
        with contextlib.suppress(AssertionError):
            await instance.postfix("stop")
    shutil.rmtree(root, ignore_errors=True)


async def test_postfix_relays_to_the_gateway(
    target: Target, attachment: bool, postfix_instance: Callable[..., object]
) -> None:
    settings = smarthost_settings(target)
    password_map = (
        None
        if target.scenario.auth is None
        else f"[{target.host}]:{target.port} {target.user}:{target.password}\n"
    )
    instance = await postfix_instance(settings, password_map)  # type: ignore[misc]
    assert isinstance(instance, PostfixInstance)
    await instance.sendmail(build_message(target.subject, attachment), TO, BCC)
    log = await instance.wait_logged("status=sent")
    assert "250 2.0.0 Ok: fake-1" in log, log
    await target.check(attachment=attachment)


def doc_block(marker: str) -> str:
    text = SMARTHOST_DOC.read_text()
    match = re.search(rf"<!-- {marker} -->\s*```\n(.*?)```", text, re.DOTALL)
    assert match, f"docs/postfix-smarthost.md has no block after <!-- {marker} -->"
    return match.group(1)


@pytest.mark.parametrize("scenario", [SCENARIOS[1]], ids=["starttls"])
async def test_the_documented_main_cf(
    target: Target, postfix_instance: Callable[..., object]
) -> None:
    """docs/postfix-smarthost.md's main.cf and sasl_passwd, with this test's host and CA."""
    documented = dict(
        line.split(" = ", 1) for line in doc_block("main.cf").splitlines() if " = " in line
    )
    assert documented["relayhost"] == "[relay.example.com]:587"
    relayhost = f"[{target.host}]:{target.port}"
    settings = {**documented, "relayhost": relayhost, "smtp_tls_CAfile": str(target.ca_file)}
    map_type, _, _ = documented["smtp_sasl_password_maps"].partition(":")
    [entry] = doc_block("sasl_passwd").splitlines()
    key, credentials = entry.split()
    assert key == documented["relayhost"]
    password_map = f"{relayhost} {target.user}:{target.password}\n"
    assert credentials.count(":") == 1
    instance = await postfix_instance(settings, password_map, map_type)  # type: ignore[misc]
    assert isinstance(instance, PostfixInstance)
    await instance.sendmail(build_message(target.subject, attachment=True), TO, BCC)
    log = await instance.wait_logged("status=sent")
    assert "250 2.0.0 Ok: fake-1" in log, log
    await target.check(attachment=True)
