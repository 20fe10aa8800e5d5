"""Relay and AUTH: no relay for strangers whatever the address looks like; what trusted peers
and accounts may forward; AUTH failure limits per connection and per IP; no user enumeration by
timing; CR/LF/NUL in credentials; credentials never in the logs."""

from __future__ import annotations

import base64
import io
import json
import re
import ssl
from pathlib import Path
from typing import Any

import pytest

from smtp2api.app import Gateway
from smtp2api.auth import Authenticator, AuthThrottle, hash_password, throttle_key
from tests.conftest import PASSWORDS, GatewayFactory, account
from tests.security.conftest import Connect, Raw, delivered, sync_gateway, tls_smtp

PASSWORD = PASSWORDS["wordpress"]


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain(user: str | bytes, password: str | bytes) -> str:
    u = user.encode() if isinstance(user, str) else user
    p = password.encode() if isinstance(password, str) else password
    return b64(b"\0" + u + b"\0" + p)


def metric(gw: Gateway, series: str) -> float:
    text = gw.metrics.render()[0].decode()
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} not in /metrics"
    return float(match.group(1))


# --- relay --------------------------------------------------------------------------------

# The classic open-relay address forms (design §8), aimed at evil.test through us (gw.test).
RELAY_FORMS = [
    "victim@evil.test",
    "victim%evil.test@gw.test",
    "evil.test!victim",
    "evil.test!victim@gw.test",
    "@gw.test:victim@evil.test",
    "@gw.test,@other.test:victim@evil.test",
    '"victim@evil.test"@gw.test',
    "victim@[192.0.2.1]",
    "victim@[IPv6:2001:db8::1]",
    "victim@evil.test@gw.test",
    "victim(comment)@gw.test",
    "victim@gw.test.",
]


@pytest.mark.parametrize("rcpt", RELAY_FORMS)
async def test_untrusted_peer_cannot_relay_with_any_address_form(
    start_gateway: GatewayFactory, connect: Connect, outbox: Path, rcpt: str
) -> None:
    gw = await sync_gateway(
        start_gateway, smtp={"trusted_networks": ["10.99.0.0/16"], "require_tls": False}
    )
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    assert (await raw.cmd("MAIL FROM:<a@example.com>")).startswith("530 5.7.0")
    assert (await raw.cmd(f"RCPT TO:<{rcpt}>")).startswith("503")  # no transaction to join
    # The form as the sender gets no further.
    assert (await raw.cmd(f"MAIL FROM:<{rcpt}>"))[:1] == "5"
    assert (await raw.cmd("DATA")).startswith("503")
    assert delivered(outbox) == []


# What a trusted peer or an account may hand over, and what is forwarded for it: a plain
# local@domain goes out exactly as given; anything a downstream parser could read as another
# address (source route, quoted "@", address literal, comment, a second "@") is refused.
FORWARDED = {
    "victim@evil.test": "victim@evil.test",
    "victim%evil.test@gw.test": "victim%evil.test@gw.test",  # literal: gw.test's business
    "evil.test!victim@gw.test": "evil.test!victim@gw.test",
}
REFUSED = [f for f in RELAY_FORMS if f not in FORWARDED]


async def _session(gw: Gateway, connect: Connect, peer: str, client_tls: ssl.SSLContext) -> Raw:
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    if peer == "account":
        await raw.cmd("STARTTLS")
        await raw.starttls(client_tls)
        await raw.cmd("EHLO client.test")
        assert (await raw.cmd(f"AUTH PLAIN {plain('wordpress', PASSWORD)}")).startswith("235")
    return raw


@pytest.fixture(params=["trusted", "account"])
async def relay_peer(
    request: pytest.FixtureRequest,
    start_gateway: GatewayFactory,
    tls_files: tuple[Path, Path],
) -> tuple[Gateway, str]:
    peer = str(request.param)
    trusted = ["127.0.0.0/8"] if peer == "trusted" else []
    gw = await sync_gateway(
        start_gateway,
        smtp=tls_smtp(tls_files, trusted_networks=trusted),
        accounts=[account("wordpress")],
    )
    return gw, peer


@pytest.mark.parametrize("rcpt", REFUSED)
async def test_ambiguous_recipients_are_refused_for_everyone(
    relay_peer: tuple[Gateway, str],
    connect: Connect,
    client_tls: ssl.SSLContext,
    outbox: Path,
    rcpt: str,
) -> None:
    gw, peer = relay_peer
    raw = await _session(gw, connect, peer, client_tls)
    assert (await raw.cmd("MAIL FROM:<a@example.com>")).startswith("250")
    assert (await raw.cmd(f"RCPT TO:<{rcpt}>")).startswith("553 5.1.3")
    assert (await raw.cmd("DATA")).startswith("503")  # nothing was added
    assert (await raw.cmd("RSET")).startswith("250")
    assert (await raw.cmd(f"MAIL FROM:<{rcpt}>")).startswith("553 5.1.")
    assert delivered(outbox) == []


@pytest.mark.parametrize("rcpt", list(FORWARDED))
async def test_plain_addresses_are_forwarded_literally(
    relay_peer: tuple[Gateway, str],
    connect: Connect,
    client_tls: ssl.SSLContext,
    outbox: Path,
    rcpt: str,
) -> None:
    gw, peer = relay_peer
    raw = await _session(gw, connect, peer, client_tls)
    await raw.cmd("MAIL FROM:<a@example.com>")
    assert (await raw.cmd(f"RCPT TO:<{rcpt}>")).startswith("250")
    await raw.cmd("DATA")
    assert (await raw.cmd(b"Subject: relay\r\n\r\nhi\r\n.\r\n")).startswith("250")
    [message] = delivered(outbox)
    assert message.rcpt_tos == [FORWARDED[rcpt]]
    assert [a["email"] for a in message.doc["bcc"]] == [FORWARDED[rcpt]]


async def test_a_source_routed_sender_is_refused_not_rewritten(
    start_gateway: GatewayFactory, connect: Connect
) -> None:
    gw = await start_gateway()
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    # aiosmtpd alone would keep "a@example.com" and drop the route silently.
    assert (await raw.cmd("MAIL FROM:<@evil.test:a@example.com>")).startswith("553 5.1.7")
    assert (await raw.cmd("MAIL FROM:<a@example.com> <b@example.com>")).startswith("5")


# --- AUTH failure limits ------------------------------------------------------------------


async def plaintext_auth_gateway(start_gateway: GatewayFactory, **smtp: Any) -> Gateway:
    """Accounts usable without TLS (require_tls = false), so the tests stay short."""
    return await start_gateway(
        smtp={"trusted_networks": [], "require_tls": False, **smtp},
        accounts=[account("wordpress")],
    )


async def test_three_failures_on_one_connection_then_421(
    start_gateway: GatewayFactory, connect: Connect
) -> None:
    gw = await plaintext_auth_gateway(start_gateway)
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    assert (await raw.cmd(f"AUTH PLAIN {plain('wordpress', 'nope1')}")).startswith("535 5.7.8")
    assert (await raw.cmd(f"AUTH PLAIN {plain('wordpress', 'nope2')}")).startswith("535 5.7.8")
    assert (await raw.cmd(f"AUTH PLAIN {plain('wordpress', 'nope3')}")).startswith("421 4.7.0")
    assert await raw.rest() == b""


async def test_failures_from_one_ip_lock_it_out_across_connections(
    start_gateway: GatewayFactory, connect: Connect, scrypt_calls: list[dict[str, Any]]
) -> None:
    gw = await plaintext_auth_gateway(start_gateway, auth_failure_limit=3, auth_lockout="1h")
    scrypt_calls.clear()
    first = await connect(gw.port())
    await first.cmd("EHLO client.test")
    assert (await first.cmd(f"AUTH PLAIN {plain('wordpress', 'x1')}")).startswith("535")
    assert (await first.cmd(f"AUTH PLAIN {plain('nobody', 'x2')}")).startswith("535")
    second = await connect(gw.port())
    await second.cmd("EHLO client.test")
    assert (await second.cmd(f"AUTH PLAIN {plain('wordpress', 'x3')}")).startswith("535")
    assert len(scrypt_calls) == 3
    # A fourth connection from the same address: refused before any check, right password or not.
    third = await connect(gw.port())
    await third.cmd("EHLO client.test")
    assert (await third.cmd(f"AUTH PLAIN {plain('wordpress', PASSWORD)}")).startswith("421 4.7.0")
    assert await third.rest() == b""
    fourth = await connect(gw.port())
    await fourth.cmd("EHLO client.test")
    assert (await fourth.cmd("AUTH LOGIN")).startswith("421 4.7.0")  # before any challenge
    assert len(scrypt_calls) == 3  # a locked-out guesser costs no scrypt work
    assert metric(gw, 'smtp2api_smtp_auth_total{result="throttled"}') == 2
    assert metric(gw, 'smtp2api_smtp_auth_total{result="failure"}') == 3
    # Another client address is not affected (127.0.0.2 is loopback too on Linux).
    other = await connect(gw.port(), local_host="127.0.0.2")
    await other.cmd("EHLO client.test")
    assert (await other.cmd(f"AUTH PLAIN {plain('wordpress', PASSWORD)}")).startswith("235")


def test_throttle_window_and_lockout_expiry() -> None:
    now = [1000.0]
    throttle = AuthThrottle(limit=3, lockout=60.0, clock=lambda: now[0])
    for _ in range(2):
        throttle.failed("192.0.2.7")
    assert not throttle.is_locked("192.0.2.7")
    now[0] += 30
    throttle.failed("192.0.2.7")
    assert throttle.is_locked("192.0.2.7")
    assert not throttle.is_locked("192.0.2.8")
    # Throttled attempts add nothing: the lock lifts when the oldest failure is 60 s old.
    for _ in range(100):
        assert throttle.is_locked("192.0.2.7")
    now[0] += 29.9
    assert throttle.is_locked("192.0.2.7")
    now[0] += 0.2
    assert not throttle.is_locked("192.0.2.7")
    # The failure at +30 s is still in the window: two more lock it again.
    throttle.failed("192.0.2.7")
    assert not throttle.is_locked("192.0.2.7")
    throttle.failed("192.0.2.7")
    assert throttle.is_locked("192.0.2.7")


def test_throttle_counts_ipv6_per_slash_64_and_stays_bounded() -> None:
    throttle = AuthThrottle(limit=2, lockout=60.0, max_peers=100)
    throttle.failed("2001:db8:1:2::1")
    throttle.failed("2001:db8:1:2:ffff::9")  # same /64: one subscriber
    assert throttle.is_locked("2001:db8:1:2::abcd")
    assert not throttle.is_locked("2001:db8:1:3::1")
    assert throttle_key("::ffff:192.0.2.1") == "192.0.2.1"
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle._failures) == 100  # a spray from many addresses cannot grow memory


# --- no enumeration by timing -------------------------------------------------------------


async def test_unknown_user_costs_the_same_scrypt_work_as_a_wrong_password(
    scrypt_calls: list[dict[str, Any]],
) -> None:
    authenticator = Authenticator({"wordpress": hash_password("secret", log2_n=10)})
    scrypt_calls.clear()
    assert not await authenticator.check("wordpress", b"wrong")
    assert not await authenticator.check("nobody", b"wrong")
    known, unknown = scrypt_calls
    assert known == unknown  # same n, r, p, key and salt length: one scrypt run each
    assert known["n"] == 2**10


async def test_enumeration_seam_end_to_end(
    start_gateway: GatewayFactory, connect: Connect, scrypt_calls: list[dict[str, Any]]
) -> None:
    gw = await plaintext_auth_gateway(start_gateway)
    scrypt_calls.clear()
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    wrong = await raw.cmd(f"AUTH PLAIN {plain('wordpress', 'wrong')}")
    unknown = await raw.cmd(f"AUTH PLAIN {plain('nobody', 'wrong')}")
    assert wrong == unknown == "535 5.7.8 Authentication credentials invalid"
    assert len(scrypt_calls) == 2
    assert scrypt_calls[0] == scrypt_calls[1]


# --- credentials with CR, LF, NUL ---------------------------------------------------------


@pytest.mark.parametrize(
    "blob",
    [
        plain("wordpress", PASSWORD + "\r\n"),
        plain("wordpress", PASSWORD + "\nMAIL FROM:<x@example.com>"),
        plain(b"word\rpress", PASSWORD),
        plain(b"wordpress\n", PASSWORD),
        b64(b"\0wordpress\0" + PASSWORD.encode() + b"\0extra"),  # a fourth NUL-separated part
    ],
    ids=["pw-crlf", "pw-lf-command", "user-cr", "user-lf", "extra-nul"],
)
async def test_auth_plain_payloads_with_cr_lf_nul_are_refused_unchecked(
    start_gateway: GatewayFactory,
    connect: Connect,
    scrypt_calls: list[dict[str, Any]],
    blob: str,
) -> None:
    gw = await plaintext_auth_gateway(start_gateway)
    scrypt_calls.clear()
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    assert (await raw.cmd(f"AUTH PLAIN {blob}"))[:3] in ("535", "501")
    assert scrypt_calls == []
    assert (await raw.cmd("MAIL FROM:<a@example.com>")).startswith("530")  # not logged in


@pytest.mark.parametrize(
    ("user", "password"),
    [(b"wordpress", PASSWORD.encode() + b"\0"), (b"word\0press", PASSWORD.encode())],
    ids=["password-nul", "user-nul"],
)
async def test_auth_login_with_nul_is_refused_unchecked(
    start_gateway: GatewayFactory,
    connect: Connect,
    scrypt_calls: list[dict[str, Any]],
    user: bytes,
    password: bytes,
) -> None:
    gw = await plaintext_auth_gateway(start_gateway)
    scrypt_calls.clear()
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    assert (await raw.cmd("AUTH LOGIN")).startswith("334")
    assert (await raw.cmd(b64(user))).startswith("334")
    assert (await raw.cmd(b64(password))).startswith("535")
    assert scrypt_calls == []


async def test_auth_command_with_control_characters_is_501(
    start_gateway: GatewayFactory, connect: Connect
) -> None:
    gw = await plaintext_auth_gateway(start_gateway)
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    assert (await raw.cmd(b"AUTH PLAIN AGEA\x00Yg==\r\n")).startswith("501")


# --- never logged ---------------------------------------------------------------------------


async def test_passwords_and_auth_blobs_never_reach_the_logs(
    start_gateway: GatewayFactory,
    connect: Connect,
    tls_files: tuple[Path, Path],
    debug_logs: io.StringIO,
) -> None:
    gw = await start_gateway(
        smtp=tls_smtp(tls_files, trusted_networks=[], require_tls=False, plain_listen=[]),
        accounts=[account("wordpress")],
    )
    secret_forms = {
        PASSWORD,
        b64(PASSWORD),
        plain("wordpress", PASSWORD),
        "wrong-password-7",
        b64("wrong-password-7"),
        plain("wordpress", "wrong-password-7"),
    }
    raw = await connect(gw.port())
    await raw.cmd("EHLO client.test")
    await raw.cmd(f"AUTH PLAIN {plain('wordpress', 'wrong-password-7')}")
    await raw.cmd("AUTH LOGIN")
    await raw.cmd(b64("wordpress"))
    await raw.cmd(b64("wrong-password-7"))
    await raw.cmd("AUTH PLAIN")
    await raw.cmd(f"{plain('wordpress', PASSWORD)}")
    # A confused client keeps sending its credentials as commands after a refusal.
    stray = await connect(gw.port())
    await stray.cmd("AUTH LOGIN")  # 503: no EHLO yet
    await stray.cmd(b64(PASSWORD))  # now an "unknown command"
    await stray.cmd(f"AUTH PLAIN {plain('wordpress', PASSWORD)}")
    await stray.cmd(f"{plain('wordpress', PASSWORD)}")
    text = debug_logs.getvalue()
    assert "auth_succeeded" in text  # the logs were captured, at debug level
    assert "auth_failed" in text
    for secret in secret_forms:
        assert secret not in text
    for line in text.splitlines():
        json.loads(line)  # one event, one line
