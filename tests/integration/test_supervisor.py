"""``[smtp] processes``: a supervisor and worker processes behind one listening socket."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from smtp2api.app import Gateway, ProcessSlot
from smtp2api.config import build_settings
from smtp2api.spool import SpoolEntry, open_spool
from tests.conftest import base_config
from tests.support.daemon import Daemon, write_config
from tests.support.smtpclient import send, simple_message


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found |= {int(x) for x in task.read_text().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for every purpose here.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _config(tmp_path: Path, **smtp: Any) -> Path:
    data = {
        "smtp": {"hostname": "gw.test", "listen": ["127.0.0.1:0"], "processes": 2, **smtp},
        "spool": {"url": f"sqlite:///{tmp_path / 'spool.db'}"},
        "http": {"listen": "127.0.0.1:0"},
        "providers": {"outbox": {"type": "outbox", "path": str(tmp_path / "outbox")}},
        "delivery": {"mode": "hybrid", "shutdown_timeout": "5s"},
        "log": {"format": "json"},
    }
    return write_config(tmp_path / "config.toml", data)


def _start(tmp_path: Path) -> Daemon:
    daemon = Daemon(_config(tmp_path)).start()
    daemon.wait_for("supervisor_started", timeout=30)
    return daemon


def _ready(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
        return int(response.status)


def test_workers_share_the_listener_and_each_serves_ops(tmp_path: Path) -> None:
    daemon = _start(tmp_path)
    try:
        started = daemon.events("gateway_started")
        assert sorted(e["worker"] for e in started) == [0, 1]
        # One listening socket, bound once by the supervisor: every worker reports its port.
        assert len({tuple(e["listeners"]) for e in started}) == 1
        assert all(_ready(int(e["ops_port"])) == 200 for e in started)
        workers = _children(daemon.proc.pid)  # type: ignore[union-attr]
        assert len(workers) == 2
        with ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(
                    lambda i: send(
                        daemon.smtp_port,
                        simple_message(f"r{i}@example.com"),
                        rcpts=(f"r{i}@example.com",),
                    ),
                    range(24),
                )
            )
        assert all(code == 250 for code, _ in replies), replies
        assert len(list((tmp_path / "outbox").glob("*.json"))) == 24
    finally:
        code = daemon.terminate()
    assert code == 0
    assert not any(_alive(pid) for pid in workers)


def test_sigterm_stops_every_worker(tmp_path: Path) -> None:
    daemon = _start(tmp_path)
    workers = _children(daemon.proc.pid)  # type: ignore[union-attr]
    assert len(workers) == 2
    assert daemon.terminate() == 0
    assert not any(_alive(pid) for pid in workers)
    stopped = daemon.events("gateway_stopped")
    assert sorted(e["worker"] for e in stopped) == [0, 1]


def test_a_crashed_worker_is_restarted(tmp_path: Path) -> None:
    daemon = _start(tmp_path)
    try:
        first = daemon.events("gateway_started")
        victim = min(_children(daemon.proc.pid))  # type: ignore[union-attr]
        mark = daemon.mark()
        os.kill(victim, signal.SIGKILL)
        died = daemon.wait_for("worker_died", after=mark, timeout=10)
        again = daemon.wait_for(
            "gateway_started", after=mark, timeout=30, where=lambda e: e["worker"] == died["worker"]
        )
        assert again["worker"] in {e["worker"] for e in first}
        workers = _children(daemon.proc.pid)  # type: ignore[union-attr]
        assert len(workers) == 2
        assert victim not in workers
        assert send(daemon.smtp_port, simple_message())[0] == 250
    finally:
        assert daemon.terminate() == 0


def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    daemon = _start(tmp_path)
    try:
        mark = daemon.mark()
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while len(daemon.events("config_reloaded")) < 2 and time.monotonic() < deadline:
            daemon.wait_for("config_reloaded", after=mark, timeout=20)
            time.sleep(0.05)
        reloaded = daemon.events("config_reloaded")
        assert sorted(e["worker"] for e in reloaded) == [0, 1]
    finally:
        assert daemon.terminate() == 0


def test_processes_is_validated(tmp_path: Path) -> None:
    from smtp2api.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        build_settings({"smtp": {"processes": -1}})
    assert any(line.startswith("smtp.processes:") for line in info.value.problems)
    assert build_settings({"smtp": {"processes": 0}}).smtp.processes == 0
    assert json.dumps(build_settings({}).smtp.processes) == "1"


@pytest.mark.parametrize("recover", [True, False])
async def test_only_the_first_worker_takes_claims_back(tmp_path: Path, recover: bool) -> None:
    """A restarted worker must not requeue a live sibling's claim (it would be sent twice)."""
    settings = build_settings(base_config(tmp_path))
    spool = open_spool(settings.spool)
    now = time.time()
    entry = SpoolEntry(
        id="m-1",
        raw=b"Subject: x\r\n\r\nx\r\n",
        mail_from="a@example.com",
        rcpt_tos=("b@example.com",),
        account=None,
        peer="127.0.0.1",
        providers=("outbox",),
        created_at=now,
        next_attempt_at=now + 3600,
    )
    await spool.put(entry)
    await spool.retry("m-1", now)
    [claimed] = await spool.claim(1, now)
    await spool.aclose()
    gateway = Gateway(settings, slot=ProcessSlot(index=1, sockets={}, recover=recover))
    await gateway.start()
    try:
        found = await gateway.spool.get("m-1")
    finally:
        await gateway.shutdown()
    assert claimed.state == "active"
    assert found is not None
    # recover=True requeues it at once; otherwise the claim stands until its lease lapses.
    assert found.state == ("queued" if recover else "active")
