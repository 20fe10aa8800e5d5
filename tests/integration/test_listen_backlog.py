"""The SMTP listeners' accept queue holds LISTEN_BACKLOG connections, whoever bound them.

asyncio's ``create_server`` calls ``listen()`` with its default of 100, also on a socket the
supervisor had bound and listened on with more. A burst of more clients than that then
loses SYNs, and each of those clients waits a 1 s retransmit: 200 clients in queue mode got
108 messages/s instead of 1,100. ``ss`` reports a listening socket's queue size as Send-Q.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from smtp2api.app import LISTEN_BACKLOG
from tests.conftest import GatewayFactory, require_tool
from tests.support.daemon import Daemon, write_config


def backlog_of(port: int) -> int:
    ss = require_tool(shutil.which("ss"), "ss (iproute2)")
    out = subprocess.run(
        [ss, "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    # State Recv-Q Send-Q Local Peer: for a listening socket, Send-Q is the backlog.
    return int(out[2])


async def test_one_process_listens_with_the_full_backlog(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway()
    assert backlog_of(gw.port()) == LISTEN_BACKLOG


def test_the_workers_keep_the_supervisors_backlog(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.toml",
        {
            "smtp": {"hostname": "gw.test", "listen": ["127.0.0.1:0"], "processes": 2},
            "spool": {"url": f"sqlite:///{tmp_path / 'spool.db'}"},
            "http": {"listen": "127.0.0.1:0"},
            "providers": {"outbox": {"type": "outbox", "path": str(tmp_path / "outbox")}},
        },
    )
    daemon = Daemon(config).start()
    try:
        daemon.wait_for("supervisor_started", timeout=30)
        assert len(daemon.events("gateway_started")) == 2  # both workers listen by now
        assert backlog_of(daemon.smtp_port) == LISTEN_BACKLOG
    finally:
        assert daemon.terminate() == 0
