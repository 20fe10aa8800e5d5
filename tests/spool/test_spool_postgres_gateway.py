"""Gateways on a PostgreSQL spool, end to end: two nodes sharing one queue over SMTP, a
database outage answered with ``451 4.3.0``, and the queue CLI against the same database."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from smtp2api.models import Envelope
from smtp2api.spool import SpoolEntry
from smtp2api.spool.postgres import PostgresSpool
from tests.conftest import GatewayFactory, in_thread
from tests.spool.test_spool_postgres import eventually
from tests.support.pg import PgCluster
from tests.support.smtpclient import send, simple_message


def node(tmp_path: Path, name: str, url: str) -> dict[str, Any]:
    """The config sections of one gateway node: its own outbox, the shared spool."""
    return {
        "spool": {"url": url, "node_id": name, "timeout": "1s"},
        "delivery": {"mode": "queue"},
        "providers": {"outbox": {"type": "outbox", "path": str(tmp_path / name)}},
    }


def delivered(tmp_path: Path) -> list[str]:
    return sorted(p.stem for p in tmp_path.glob("gw*/*.json"))


async def test_two_nodes_share_one_queue_and_deliver_everything_once(
    start_gateway: GatewayFactory, pg_url: str, tmp_path: Path
) -> None:
    gateways = [await start_gateway(**node(tmp_path, f"gw{i}", pg_url)) for i in (1, 2)]
    ids = []
    for n in range(10):
        code, text = await in_thread(send, gateways[n % 2].port(), simple_message())
        assert code == 250, text
        ids.append(text.rsplit(" ", 1)[1])

    async def all_delivered() -> bool:
        return len(delivered(tmp_path)) >= 10

    await eventually(all_delivered)
    assert delivered(tmp_path) == sorted(ids)  # each exactly once
    assert await gateways[0].spool.counts() == {"queued": 0, "active": 0, "dead": 0}


async def test_a_database_outage_is_answered_451_and_then_mail_flows_again(
    start_gateway: GatewayFactory, pg_url: str, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    gw = await start_gateway(**node(tmp_path, "gw1", pg_url))
    dbname = pg_url.rsplit("/", 1)[1]
    code, _ = await in_thread(send, gw.port(), simple_message())
    assert code == 250
    pg_cluster.psql(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
    pg_cluster.terminate_backends(dbname)
    try:
        code, text = await in_thread(send, gw.port(), simple_message())
        assert (code, text.split(" ", 1)[0]) == (451, "4.3.0")  # kept by the client, retried
    finally:
        pg_cluster.psql(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    code, text = await in_thread(send, gw.port(), simple_message())
    assert code == 250, text


async def test_the_queue_cli_works_against_the_shared_database(
    start_gateway: GatewayFactory, pg_url: str, tmp_path: Path
) -> None:
    gw = await start_gateway(**node(tmp_path, "gw1", pg_url))
    other = PostgresSpool(pg_url, node_id="tool")
    env = Envelope("app@example.com", ("bob@example.net",), peer="192.0.2.1")
    raw = simple_message(to="bob@example.net")
    dead = SpoolEntry.new(raw, env, ("outbox",), next_attempt_at=time.time() + 3600)
    try:
        await other.put(dead)
        await other.claim(1, time.time() + 3600)
        await other.mark_dead(dead.id, "554 5.6.0 test", None)
    finally:
        await other.aclose()
    config = tmp_path / "cli.toml"
    config.write_text(
        f'[spool]\nurl = "{pg_url}"\nnode_id = "cli"\n'
        f'[providers.outbox]\ntype = "outbox"\npath = "{tmp_path / "cli-out"}"\n'
    )

    def queue(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "smtp2api", "queue", *args, "--config", str(config)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)

    listed = await in_thread(queue, "list")
    assert listed.returncode == 0, listed.stderr
    assert dead.id in listed.stdout
    assert "dead" in listed.stdout
    retried = await in_thread(queue, "retry", dead.id)
    assert retried.returncode == 0, retried.stderr

    async def gone() -> bool:
        return await gw.spool.get(dead.id) is None

    await eventually(gone)  # the running gateway delivered it
    assert delivered(tmp_path) == [dead.id]
