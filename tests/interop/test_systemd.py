"""systemd: the unit file passes systemd-analyze, and the daemon speaks sd_notify(3).

The notify tests run the real ``smtp2api serve`` as a subprocess with ``NOTIFY_SOCKET``
pointing at a real AF_UNIX datagram socket the test reads, as systemd would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smtp2api.systemd import Notifier, describe_spool
from tests.conftest import REPO, require_tool
from tests.interop.conftest import which
from tests.support.fakeapi import Answer, FakeAPI

UNIT = REPO / "systemd" / "smtp2api.service"


def unit_options(text: str) -> dict[str, list[str]]:
    """``Key`` -> every value it is given in the unit (keys may repeat)."""
    options: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            options.setdefault(key.strip(), []).append(value.strip())
    return options


def test_unit_declares_the_contract() -> None:
    options = unit_options(UNIT.read_text())
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "DynamicUser": ["yes"],
        "StateDirectory": ["smtp2api"],
        "ConfigurationDirectory": ["smtp2api"],
        "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"],
        "CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
    }
    for key, value in expected.items():
        assert options.get(key) == value, key
    assert options["EnvironmentFile"] == ["-/etc/smtp2api/secrets.env"]
    assert options["WatchdogSec"], "the daemon pings the watchdog; the unit must ask for it"
    assert options["ExecStart"][0].split()[1:] == ["serve", "--config", "/etc/smtp2api/config.toml"]


@pytest.fixture
def installed_unit(tmp_path: Path) -> Path:
    """The unit as installed next to a real binary (verify checks ExecStart exists)."""
    binary = Path(sys.executable).with_name("smtp2api")
    assert binary.exists(), "the package is installed in the venv"
    path = tmp_path / "smtp2api.service"
    path.write_text(UNIT.read_text().replace("/usr/local/bin/smtp2api", str(binary)))
    return path


def test_systemd_analyze_verify(installed_unit: Path) -> None:
    tool = require_tool(which("systemd-analyze"), "systemd-analyze (systemd)")
    done = subprocess.run(
        [tool, "verify", str(installed_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""  # not even a warning


def test_systemd_analyze_security_rates_it_2_or_lower(installed_unit: Path) -> None:
    tool = require_tool(which("systemd-analyze"), "systemd-analyze (systemd)")
    done = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(installed_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for smtp2api\.service: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0, done.stdout


# --- the notify protocol ---------------------------------------------------------------------


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket; collects the messages."""

    def __init__(self, address: str) -> None:
        self.address = address  # what goes into $NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def wait_for(
        self, match: Callable[[dict[str, str]], bool], *, after: int = -1, timeout: float = 20.0
    ) -> int:
        """The index of the first message after index ``after`` for which ``match`` holds."""
        deadline = time.monotonic() + timeout
        start = after + 1
        while True:
            for index in range(start, len(self.messages)):
                if match(self.messages[index]):
                    return index
            start = len(self.messages)
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching notification in {self.messages}")
            with contextlib.suppress(TimeoutError):
                data = self.sock.recv(4096)
                fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
                self.messages.append(fields)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"@smtp2api-test-{uuid.uuid4().hex}"
    listener = NotifySocket(address)
    yield listener
    listener.close()


def test_notifier_sends_datagrams(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_environ(
        {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "3000000"}
    )
    assert notifier.enabled
    assert notifier.watchdog_interval == 1.5
    assert notifier.ready("spool: 0 queued, 0 active, 0 dead")
    assert notifier.watchdog()
    assert notifier.reloading()
    assert notifier.stopping()
    notify_socket.wait_for(lambda m: "STOPPING" in m)
    ready, ping, reloading, stopping = notify_socket.messages
    assert ready == {"READY": "1", "STATUS": "spool: 0 queued, 0 active, 0 dead"}
    assert ping == {"WATCHDOG": "1"}
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert stopping["STOPPING"] == "1"
    notifier.close()


def test_notifier_is_a_no_op_outside_systemd() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.watchdog()


def test_watchdog_meant_for_another_process_is_ignored() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_environ(env).watchdog_interval is None


def test_unreachable_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "missing.sock"))
    assert not notifier.ready()
    assert not notifier.ready()  # logged once, still quiet
    notifier.close()


def test_describe_spool() -> None:
    assert describe_spool({"queued": 3, "dead": 1}) == "spool: 3 queued, 0 active, 1 dead"


def _config(tmp_path: Path, api: FakeAPI) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[smtp]
hostname = "gw.test"
listen = ["127.0.0.1:0"]

[providers.main]
type = "http"
url = "{api.url}/v1/emails"

[delivery]
mode = "queue"
backoff_min = "1h"
backoff_max = "2h"
shutdown_timeout = "1s"

[spool]
url = "sqlite:///{tmp_path / "spool.db"}"

[http]
listen = "127.0.0.1:0"

[log]
format = "json"
"""
    )
    return path


def _smtp_port(
    process: subprocess.Popen[str], timeout: float = 20.0
) -> tuple[int, threading.Thread]:
    """The bound SMTP port, read from the ``gateway_started`` log line; the reader drains on."""
    found: list[int] = []
    done = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "gateway_started":
                    found.append(int(event["listeners"][0].rsplit(":", 1)[1]))
                    done.set()
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert done.wait(timeout), "the daemon did not start"
    assert found, "the daemon exited before gateway_started"
    return found[0], reader


def test_daemon_notifies_ready_status_watchdog_reload_stopping(
    notify_socket: NotifySocket, tmp_path: Path
) -> None:
    with FakeAPI(default=Answer(503)).running_in_thread() as api:
        env = {
            **os.environ,
            "NOTIFY_SOCKET": notify_socket.address,
            "WATCHDOG_USEC": "400000",  # pings every 0.2s
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "smtp2api", "serve", "--config", str(_config(tmp_path, api))],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            port, reader = _smtp_port(process)
            ready = notify_socket.wait_for(lambda m: m.get("READY") == "1")
            assert notify_socket.messages[ready]["STATUS"] == "spool: 0 queued, 0 active, 0 dead"
            # READY=1 came after the listeners were up: the port answers.
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("app@example.com", ["a@example.com"], b"Subject: x\r\n\r\nhi\r\n")
            api.wait_for_requests_sync(1)  # the worker tried, got 503: the message waits
            notify_socket.wait_for(lambda m: m.get("STATUS", "").startswith("spool: 1 queued"))
            first = notify_socket.wait_for(lambda m: m.get("WATCHDOG") == "1")
            notify_socket.wait_for(lambda m: m.get("WATCHDOG") == "1", after=first)
            process.send_signal(signal.SIGHUP)
            reloading = notify_socket.wait_for(lambda m: m.get("RELOADING") == "1")
            ready_again = notify_socket.wait_for(lambda m: m.get("READY") == "1", after=reloading)
            assert notify_socket.messages[ready_again]["STATUS"].startswith("spool: 1 queued")
            process.send_signal(signal.SIGTERM)
            notify_socket.wait_for(lambda m: m.get("STOPPING") == "1", after=ready_again)
            assert process.wait(20) == 0
            reader.join(10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            assert process.stdout is not None
            process.stdout.close()
