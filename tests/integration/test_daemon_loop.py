"""The daemon on its production event loop (uvloop, from the `speed` extra): session timers
write their reply through uvloop's transports too."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.conftest import base_config
from tests.support.daemon import running, write_config


def test_idle_timeout_reply_is_written_on_the_daemons_loop(tmp_path: Path) -> None:
    import uvloop  # noqa: F401 - in the test extra: a missing one fails, never skips

    config = write_config(
        tmp_path / "config.toml", base_config(tmp_path, smtp={"idle_timeout": "0.5s"})
    )
    with running(config) as daemon:
        with socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=10) as sock:
            stream = sock.makefile("rb")
            assert stream.readline().startswith(b"220 ")
            assert stream.read().startswith(b"421 4.4.2")
