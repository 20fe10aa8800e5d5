"""PROXY protocol v1/v2 behind a real HAProxy (``deploy/haproxy/haproxy.cfg``, run as is).

Linux routes all of 127.0.0.0/8 to the loopback interface, so clients bind their socket to
127.0.0.2 or 127.0.0.3 and HAProxy reaches the gateway from 127.0.0.1: the gateway's peer is
the balancer, the PROXY header names the original client. Policy (``trusted_networks``),
per-IP limits, AUTH throttling, Received headers and logs must all see the original client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import re
import shutil
import smtplib
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from smtp2api.config import build_settings
from smtp2api.errors import ConfigError
from smtp2api.proxy import ProxyGate, ProxyRefused
from tests.conftest import REPO, account, base_config, require_tool
from tests.support.daemon import Daemon, write_config
from tests.support.smtpclient import simple_message

HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
PROXY_IP = "127.0.0.1"  # HAProxy's address as the gateway sees it
TRUSTED_CLIENT = "127.0.0.2"
OTHER_CLIENT = "127.0.0.3"
WRONG_PLAIN = "PLAIN " + base64.b64encode(b"\0wordpress\0wrong").decode()
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class HAProxy:
    """``haproxy -db`` (foreground) on the example config, its addresses from the environment."""

    def __init__(self, tmp_path: Path, gateway_port: int, *, version: int) -> None:
        self.port = _free_port()
        text = HAPROXY_CFG.read_text()
        if version == 1:
            text = text.replace("send-proxy-v2", "send-proxy")  # as the file's comment says
        self.config = tmp_path / f"haproxy-v{version}.cfg"
        self.config.write_text(text)
        self.log = tmp_path / f"haproxy-v{version}.log"
        node = f"127.0.0.1:{gateway_port}"
        self.env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "SMTP2API_LB_LISTEN": f"127.0.0.1:{self.port}",
            "SMTP2API_LB_CHECK_INTER": "200ms",
            "SMTP2API_LB_MAXCONN": "200",
            "SMTP2API_NODE1": node,
            "SMTP2API_NODE2": node,
            "SMTP2API_NODE3": node,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HAProxy:
        binary = require_tool(shutil.which("haproxy", path="/usr/sbin:/usr/bin"), "haproxy")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [binary, "-db", "-f", str(self.config)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return self
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _gateway_config(tmp_path: Path, **smtp: Any) -> dict[str, Any]:
    return base_config(
        tmp_path,
        smtp={
            "proxy_protocol": True,
            "proxy_trusted_networks": [f"{PROXY_IP}/32"],
            "trusted_networks": [f"{TRUSTED_CLIENT}/32"],
            "require_tls": False,  # AUTH over the plain loopback link in the throttle test
            "idle_timeout": "2s",  # also the PROXY header's deadline
            **smtp,
        },
        accounts=[account("wordpress")],
        delivery={"mode": "sync"},
    )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Daemon]:
    config = write_config(tmp_path / "smtp2api.toml", _gateway_config(tmp_path))
    with Daemon(config) as daemon:
        yield daemon


def _client(port: int, source: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0))


def _send(port: int, source: str, seq: str) -> tuple[int, str]:
    with _client(port, source) as client:
        client.ehlo("client.test")
        code, text = client.mail("app@example.com")
        if code != 250:
            return code, text.decode()
        client.rcpt("alice@example.com")
        code, text = client.data(simple_message(X_Test_Seq=seq))
        return code, text.decode()


def _metrics(daemon: Daemon) -> str:
    return httpx.get(f"http://127.0.0.1:{daemon.ops_port}/metrics", timeout=5).text


def _connections(daemon: Daemon, result: str) -> float:
    series = f'smtp2api_smtp_connections_total{{result="{result}"}}'
    match = re.search(rf"^{re.escape(series)} (\S+)$", _metrics(daemon), re.MULTILINE)
    assert match is not None, series
    return float(match.group(1))


def _outbox_eml(tmp_path: Path, seq: str) -> bytes:
    for path in (tmp_path / "outbox").glob("*.eml"):
        raw = path.read_bytes()
        if f"X-Test-Seq: {seq}".encode() in raw:
            return raw
    raise AssertionError(f"no outbox message {seq}")


# --- through HAProxy ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 1])
def test_trust_follows_the_original_client_address(
    tmp_path: Path, gateway: Daemon, version: int
) -> None:
    with HAProxy(tmp_path, gateway.smtp_port, version=version) as lb:
        # 127.0.0.2 is in trusted_networks: it may send without AUTH, through the balancer.
        code, text = _send(lb.port, TRUSTED_CLIENT, f"v{version}")
        assert code == 250, text
        # 127.0.0.3 comes through the same balancer (same direct peer) and is not trusted.
        code, text = _send(lb.port, OTHER_CLIENT, "refused")
        assert (code, text) == (530, "5.7.0 Authentication required")

    received = gateway.wait_for("message_received", where=lambda e: "peer" in e)
    assert (received["peer"], received["proxy"]) == (TRUSTED_CLIENT, PROXY_IP)
    raw = _outbox_eml(tmp_path, f"v{version}")
    assert f"Received: from client.test ([{TRUSTED_CLIENT}])".encode() in raw
    assert _connections(gateway, "rejected_proxy") == 0


def test_the_balancers_health_checks_use_proxy_v2_local(tmp_path: Path, gateway: Daemon) -> None:
    """HAProxy's smtpchk sends PROXY v2 LOCAL: the gateway answers it as the balancer itself."""
    before = _connections(gateway, "accepted")
    with HAProxy(tmp_path, gateway.smtp_port, version=2):
        deadline = time.monotonic() + 10
        # Three servers checked every 200 ms: a few rounds of checks, each a whole session.
        while _connections(gateway, "accepted") < before + 6:
            assert time.monotonic() < deadline, "no health check reached the gateway"
            time.sleep(0.1)
    assert _connections(gateway, "rejected_proxy") == 0
    assert not gateway.events("proxy_refused")
    assert not gateway.events("session_exception")


def test_connection_limits_count_the_original_client(tmp_path: Path) -> None:
    data = _gateway_config(tmp_path, max_connections_per_ip=1)
    with (
        Daemon(write_config(tmp_path / "smtp2api.toml", data)) as gateway,
        HAProxy(tmp_path, gateway.smtp_port, version=2) as lb,
    ):
        with _client(lb.port, TRUSTED_CLIENT) as first:
            assert first.noop()[0] == 250
            # Same balancer, another client: its own quota. The same client again: refused.
            with _client(lb.port, OTHER_CLIENT) as other:
                assert other.noop()[0] == 250
            with pytest.raises(smtplib.SMTPConnectError) as refused:
                _client(lb.port, TRUSTED_CLIENT)
            assert refused.value.smtp_code == 421


def test_auth_throttling_counts_the_original_client(tmp_path: Path) -> None:
    data = _gateway_config(tmp_path, auth_failure_limit=2)
    with (
        Daemon(write_config(tmp_path / "smtp2api.toml", data)) as gateway,
        HAProxy(tmp_path, gateway.smtp_port, version=2) as lb,
    ):
        with _client(lb.port, OTHER_CLIENT) as guesser:
            guesser.ehlo("guess.test")
            for _ in range(2):
                assert guesser.docmd("AUTH", WRONG_PLAIN)[0] == 535
        with _client(lb.port, OTHER_CLIENT) as guesser:
            guesser.ehlo("guess.test")
            assert guesser.docmd("AUTH", WRONG_PLAIN)[0] == 421
        # Another client behind the same balancer is not locked out by the guesser.
        with _client(lb.port, TRUSTED_CLIENT) as owner:
            owner.ehlo("owner.test")
            assert owner.login("wordpress", "correct horse battery staple")[0] == 235
    throttled = gateway.events("auth_throttled")
    assert throttled
    assert {e["peer"] for e in throttled} == {OTHER_CLIENT}


# --- raw headers, straight to the gateway --------------------------------------------------------


def _raw(port: int, source: str, data: bytes) -> bytes:
    """Send ``data`` from ``source`` and return what the gateway answers until it closes or
    has sent one line. A reset counts as a close: a server that hangs up on unread input
    makes the kernel answer with RST (RFC 9293 §3.6.1), which is the refusal we test."""
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        answer = b""
        try:
            sock.sendall(data)
            while not answer.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except ConnectionResetError:
            pass
        return answer


def _v2(command: int, src: str = "0.0.0.0", dst: str = "0.0.0.0") -> bytes:
    """A PROXY v2 header (TCP over IPv4); ``command`` 0 = LOCAL, 1 = PROXY."""
    family = 0x11 if command else 0x00  # LOCAL carries no addresses (AF_UNSPEC)
    body = (
        socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", 40000, 25)
        if command
        else b""
    )
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def test_a_header_from_an_untrusted_peer_is_refused_without_a_banner(gateway: Daemon) -> None:
    mark = gateway.mark()
    # 127.0.0.4 is not in proxy_trusted_networks, and claims to relay for a trusted client.
    header = f"PROXY TCP4 {TRUSTED_CLIENT} 127.0.0.1 40000 25\r\n".encode()
    assert _raw(gateway.smtp_port, "127.0.0.4", header + b"EHLO x\r\n") == b""
    assert _raw(gateway.smtp_port, "127.0.0.4", _v2(1, TRUSTED_CLIENT, "127.0.0.1")) == b""
    refused = gateway.wait_for("proxy_refused", after=mark)
    assert (refused["proxy"], refused["reason"]) == ("127.0.0.4", "untrusted_peer")
    assert _connections(gateway, "rejected_proxy") == 2
    assert not gateway.events("message_received")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"EHLO no-header.test\r\n", "header_invalid"),  # a client that skipped the balancer
        (b"PROXY TCP4 300.1.2.3 127.0.0.1 1 25\r\n", "header_invalid"),
        (b"PROXY TCP4 127.0.0.2\r\n", "header_invalid"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0c\x7f", "header_timeout"),  # stalls mid-header
    ],
)
def test_a_bad_header_from_the_balancer_is_refused(
    gateway: Daemon, data: bytes, reason: str
) -> None:
    mark = gateway.mark()
    with socket.create_connection(("127.0.0.1", gateway.smtp_port), timeout=10) as sock:
        sock.sendall(data)
        assert sock.recv(4096) == b""  # closed, and no banner (not even a 421)
    refused = gateway.wait_for("proxy_refused", after=mark)
    assert (refused["proxy"], refused["reason"]) == (PROXY_IP, reason)


def test_a_balancer_that_hangs_up_mid_header_is_closed(gateway: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", gateway.smtp_port), timeout=10) as sock:
        sock.sendall(b"PROX")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(4096) == b""  # at once: the header deadline is not waited for
    assert _connections(gateway, "accepted") == 0


def test_v2_local_keeps_the_balancers_address(gateway: Daemon) -> None:
    # LOCAL: the balancer speaks for itself (a health check); its address is not trusted.
    banner = _raw(gateway.smtp_port, PROXY_IP, _v2(0))
    assert banner.startswith(b"220 gw.test ESMTP")
    with socket.create_connection(("127.0.0.1", gateway.smtp_port), timeout=10) as sock:
        stream = sock.makefile("rb")
        sock.sendall(_v2(0))
        assert stream.readline().startswith(b"220 ")
        sock.sendall(b"EHLO lb.test\r\n")
        while not stream.readline().startswith(b"250 "):
            pass
        sock.sendall(b"MAIL FROM:<app@example.com>\r\n")
        assert stream.readline().startswith(b"530 5.7.0")  # 127.0.0.1 is not trusted here


def test_proxy_v2_with_an_ipv6_client(gateway: Daemon) -> None:
    src = socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    body = src + socket.inet_pton(socket.AF_INET6, "::1") + struct.pack("!HH", 40000, 25)
    header = V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", len(body)) + body
    mark = gateway.mark()
    with socket.create_connection(("127.0.0.1", gateway.smtp_port), timeout=10) as sock:
        stream = sock.makefile("rb")
        sock.sendall(header)
        assert stream.readline().startswith(b"220 ")
        sock.sendall(b"EHLO v6.test\r\nQUIT\r\n")  # pipelined: refused, with the peer logged
    event = gateway.wait_for("pipelining_refused", after=mark)
    assert (event["peer"], event["proxy"]) == ("2001:db8::7", PROXY_IP)


# --- which address a header yields (no sockets) ------------------------------------------------


def _v2_unix() -> bytes:
    body = b"/run/client.sock".ljust(108, b"\0") + b"/run/smtp.sock".ljust(108, b"\0")
    return V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", len(body)) + body


def _v2_mapped() -> bytes:
    src = socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.9")
    body = src + socket.inet_pton(socket.AF_INET6, "::1") + struct.pack("!HH", 40000, 25)
    return V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\n", "192.0.2.7"),
        (b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 25\r\n", "2001:db8::1"),
        (b"PROXY UNKNOWN\r\n", PROXY_IP),  # the spec: use the connection's own endpoints
        (_v2(0), PROXY_IP),  # LOCAL: the balancer speaks for itself
        (_v2(1, "192.0.2.8", "10.0.0.1"), "192.0.2.8"),
        (_v2_mapped(), "192.0.2.9"),  # IPv4-mapped: matched against IPv4 networks
        (_v2_unix(), PROXY_IP),  # no IP to use
    ],
)
async def test_the_address_a_header_yields(header: bytes, expected: str) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(header)
    gate = ProxyGate.build([ipaddress.ip_network("127.0.0.0/8")], idle_timeout=1.0)
    address, data = await gate.read(reader, PROXY_IP)
    assert address == expected
    assert data.valid


async def test_the_gate_reads_nothing_from_an_untrusted_peer() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"PROXY TCP4 127.0.0.2 127.0.0.1 1 25\r\n")
    gate = ProxyGate.build([ipaddress.ip_network("10.0.0.0/8")], idle_timeout=1.0)
    with pytest.raises(ProxyRefused) as refused:
        await gate.read(reader, "127.0.0.1")
    assert refused.value.reason == "untrusted_peer"
    assert len(reader._buffer) > 0  # type: ignore[attr-defined]  # untouched
    assert gate.admits("::ffff:10.1.2.3")  # a dual-stack socket's view of an IPv4 balancer


# --- configuration -------------------------------------------------------------------------------


def test_implicit_tls_and_proxy_protocol_are_refused_together(
    tmp_path: Path, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    data = _gateway_config(
        tmp_path, tls_listen=["127.0.0.1:0"], tls_cert_file=str(cert), tls_key_file=str(key)
    )
    with pytest.raises(ConfigError) as error:
        build_settings(data)
    assert "tls_listen cannot be used with proxy_protocol" in str(error.value)


def test_proxy_protocol_needs_trusted_balancers(tmp_path: Path) -> None:
    data = _gateway_config(tmp_path, proxy_trusted_networks=[])
    with pytest.raises(ConfigError) as error:
        build_settings(data)
    assert "proxy_protocol needs proxy_trusted_networks" in str(error.value)
