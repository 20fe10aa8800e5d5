"""PostgreSQL spool specifics, on a real throwaway cluster (``tests/support/pg.py``): several
nodes on one database (lease takeover, restart recovery, SKIP LOCKED claims, LISTEN/NOTIFY),
schema migration races, batching, and lost connections. The backend-independent behaviour
is the contract suite (``test_spool_contract.py``), which runs on PostgreSQL too."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from smtp2api.config import OutboxProvider as OutboxSettings
from smtp2api.config import SpoolSettings
from smtp2api.delivery import Deliverer
from smtp2api.errors import ConfigError, SpoolError
from smtp2api.models import Envelope
from smtp2api.providers.outbox import OutboxProvider
from smtp2api.spool import SpoolEntry, open_spool
from smtp2api.spool.postgres import PostgresSpool
from smtp2api.spool.postgres_schema import SCHEMA_VERSION
from smtp2api.worker import Worker, WorkerConfig
from tests.support.pg import PgCluster, free_port

Make = Callable[..., Awaitable[PostgresSpool]]
MESSAGE = b"From: a@example.com\r\nTo: r@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


def entry(n: int = 0, *, due: float | None = None, raw: bytes = MESSAGE) -> SpoolEntry:
    env = Envelope(f"s{n}@example.com", (f"r{n}@example.net",), account=None, peer="192.0.2.9")
    return SpoolEntry.new(raw, env, ("outbox",), next_attempt_at=due)


@pytest.fixture
async def make(pg_url: str) -> AsyncIterator[Make]:
    """``await make(node, **kwargs)``: a started spool, as one gateway node would open it."""
    opened: list[PostgresSpool] = []

    async def factory(node: str = "a", *, url: str = pg_url, **kwargs: Any) -> PostgresSpool:
        kwargs.setdefault("timeout", 5.0)
        spool = PostgresSpool(url, node_id=node, **kwargs)
        opened.append(spool)
        await spool.start()
        return spool

    yield factory
    for spool in opened:
        await spool.aclose()


async def sql(url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    """Run ``query`` on its own connection, as an operator or another program would."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def row(url: str, msg_id: str) -> tuple[Any, ...]:
    (found,) = await sql(
        url, "SELECT state, attempts, claimed_by FROM smtp2api_messages WHERE id = %s", msg_id
    )
    return found


async def age_leases(url: str, seconds: float = 3600.0) -> None:
    """Make every lease run out, as if ``seconds`` had passed on the database's clock."""
    await sql(url, "UPDATE smtp2api_messages SET lease_until = lease_until - %s", seconds)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# --- several nodes ------------------------------------------------------------------------


async def test_a_dead_nodes_claim_is_taken_over_when_its_lease_runs_out(
    make: Make, pg_url: str
) -> None:
    a, b = await make("a"), await make("b")
    e = entry()
    await a.put(e)
    assert [c.id for c in await a.claim(5, time.time())] == [e.id]
    assert await b.claim(5, time.time()) == []  # a's lease is live
    await age_leases(pg_url)  # a stopped renewing: it died
    assert (await b.next_due_at() or 0) <= time.time()  # idle nodes wake for the takeover
    (taken,) = await b.claim(5, time.time())
    assert (taken.id, taken.attempts) == (e.id, 2)  # a's try counts: it may have sent it
    assert await row(pg_url, e.id) == ("active", 2, "b")
    # a comes back from a long pause: its late outcome must not undo b's claim.
    assert await a.renew([e.id], time.time()) == 0
    await a.defer(e.id, time.time() + 60, "451 4.3.0 late", None)
    await a.mark_dead(e.id, "554 5.6.0 late", None)
    await a.release(e.id)
    assert await row(pg_url, e.id) == ("active", 2, "b")
    assert await b.renew([e.id], time.time()) == 1
    await b.ack(e.id)
    assert await b.get(e.id) is None


async def test_a_short_lease_runs_out_on_the_database_clock(make: Make) -> None:
    a, b = await make("a", lease=0.3), await make("b", lease=0.3)
    await a.put(e := entry())
    await a.claim(1, time.time())
    taken: list[SpoolEntry] = []

    async def b_takes_it() -> bool:
        taken.extend(await b.claim(1, time.time()))
        return bool(taken)

    await eventually(b_takes_it)
    assert taken[0].id == e.id


async def test_a_restarted_node_takes_its_own_claims_back_at_once(make: Make, pg_url: str) -> None:
    a, b = await make("a"), await make("b")
    entries = [entry(i) for i in range(3)]
    for e in entries:
        await a.put(e)
    mine = await a.claim(2, time.time())
    (theirs,) = await b.claim(5, time.time())
    await a.aclose()  # crash: no ack, no release
    restarted = await make("a")
    assert await restarted.recover(time.time()) == 2  # no waiting for the lease
    for e in mine:
        assert await row(pg_url, e.id) == ("queued", 1, None)
    assert await row(pg_url, theirs.id) == ("active", 1, "b")  # b's live claim is b's


async def test_a_live_process_with_the_same_node_id_keeps_its_claims(
    make: Make, pg_url: str
) -> None:
    first = await make("same")
    assert await first.recover(time.time()) == 0  # holds the node lock from now on
    await first.put(e := entry())
    await first.claim(1, time.time())
    second = await make("same")  # misconfigured: two gateways named alike
    with capture_logs() as logs:
        assert await second.recover(time.time()) == 0
    assert any(x["event"] == "spool_node_id_in_use" for x in logs)
    assert await row(pg_url, e.id) == ("active", 1, "same")
    await first.aclose()  # the lock goes with its session
    third = await make("same")
    assert await third.recover(time.time()) == 1


async def test_concurrent_claimers_on_many_nodes_never_share_an_entry(make: Make) -> None:
    nodes = [await make(f"n{i}") for i in range(6)]
    entries = [entry(i) for i in range(300)]
    await asyncio.gather(*(nodes[0].put(e) for e in entries))
    claimed: list[str] = []

    async def claimer(spool: PostgresSpool) -> None:
        while True:
            got = await spool.claim(7, time.time())
            claimed.extend(e.id for e in got)
            if not got and (await spool.counts())["queued"] == 0:
                return

    await asyncio.gather(*(claimer(s) for s in nodes for _ in range(3)))
    assert len(claimed) == len(set(claimed)) == 300
    assert set(claimed) == {e.id for e in entries}
    assert await nodes[0].counts() == {"queued": 0, "active": 300, "dead": 0}


# --- LISTEN / NOTIFY ----------------------------------------------------------------------


async def test_due_work_on_one_node_wakes_subscribers_on_every_node(make: Make) -> None:
    a, b, cli = await make("a"), await make("b"), await make("cli")
    woken = asyncio.Event()
    unsubscribe = b.subscribe(woken.set)
    await b.listener.wait_connected()
    woken.clear()  # the wake-up every (re)connect gives
    await a.put(e := entry())
    await asyncio.wait_for(woken.wait(), 10)
    woken.clear()
    await a.claim(1, time.time())
    await a.mark_dead(e.id, "554 5.6.0 x", None)
    assert await cli.retry(e.id)  # `smtp2api queue retry` from another process
    await asyncio.wait_for(woken.wait(), 10)
    unsubscribe()


async def test_the_listener_reconnects_and_wakes_after_losing_its_session(
    make: Make, pg_cluster: PgCluster, pg_url: str
) -> None:
    b = await make("b")
    woken = asyncio.Event()
    b.subscribe(woken.set)
    await b.listener.wait_connected()
    woken.clear()
    assert pg_cluster.terminate_backends(pg_url.rsplit("/", 1)[1]) >= 1
    # Notifications sent while it was gone are lost: it wakes its subscribers once it is back.
    await asyncio.wait_for(woken.wait(), 20)
    await b.listener.wait_connected()
    woken.clear()
    await (await make("a")).put(entry())
    await asyncio.wait_for(woken.wait(), 10)


async def test_an_idle_worker_is_woken_by_another_nodes_put(make: Make, tmp_path: Path) -> None:
    spool = await make("b")
    outbox = OutboxProvider("outbox", OutboxSettings(type="outbox", path=tmp_path / "out"))
    # An hour between polls: only the notification can make this worker look in time.
    config = WorkerConfig(
        concurrency=4, max_age=3600, backoff_min=1, backoff_max=2, lease=30, poll_interval=3600
    )
    worker = Worker(spool=spool, deliverer=Deliverer({"outbox": outbox}), config=config)
    worker.start()
    try:
        await spool.listener.wait_connected()
        await asyncio.sleep(0.1)  # the worker has looked once and is asleep
        await (await make("a")).put(e := entry())

        async def delivered() -> bool:
            return await spool.get(e.id) is None

        await eventually(delivered)
        assert list((tmp_path / "out").glob(f"{e.id}*.json"))
    finally:
        await worker.stop()


# --- schema -------------------------------------------------------------------------------


async def test_three_nodes_migrating_a_new_database_at_once_apply_each_step_once(
    make: Make, pg_cluster: PgCluster
) -> None:
    url = pg_cluster.new_database("fresh")
    spools = [PostgresSpool(url, node_id=f"n{i}", timeout=10) for i in range(3)]
    try:
        await asyncio.gather(*(s.start() for s in spools))
        versions = await sql(url, "SELECT version FROM smtp2api_schema_version ORDER BY 1")
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        await asyncio.gather(*(s.put(entry(i)) for i, s in enumerate(spools)))
        assert (await spools[0].counts())["queued"] == 3
    finally:
        for s in spools:
            await s.aclose()


async def test_a_schema_newer_than_this_version_is_refused(make: Make, pg_url: str) -> None:
    await (await make("a")).check_writable()  # migrated
    await sql(pg_url, "INSERT INTO smtp2api_schema_version (version) VALUES (%s)", 99)
    spool = PostgresSpool(pg_url, node_id="old", timeout=5)
    try:
        with pytest.raises(SpoolError, match="newer"):
            await spool.put(entry())
        assert not await spool.check_writable()
    finally:
        await spool.aclose()


# --- batching -----------------------------------------------------------------------------


async def test_concurrent_puts_share_commits_and_a_bad_one_fails_alone(make: Make) -> None:
    spool = await make("a")
    good = [entry(i) for i in range(50)]
    bad = SpoolEntry.new(MESSAGE, Envelope("nul\x00@example.com", ("r@example.net",)), ("x",))
    results = await asyncio.gather(
        *(spool.put(e) for e in [*good[:25], bad, *good[25:]]), return_exceptions=True
    )
    assert isinstance(results[25], SpoolError)
    assert [r for i, r in enumerate(results) if i != 25] == [None] * 50
    assert (await spool.counts())["queued"] == 50
    assert spool.stats.commits < 50  # the puts shared transactions
    assert spool.stats.failed_batches >= 1


async def test_a_duplicate_id_in_the_same_batch_fails_only_the_second(make: Make) -> None:
    spool = await make("a")
    first = entry(1)
    other = SpoolEntry.new(b"other", Envelope("x@example.com", ("y@example.net",)), ("p",))
    twin = replace(other, id=first.id)
    results = await asyncio.gather(spool.put(first), spool.put(twin), return_exceptions=True)
    assert results[0] is None
    assert isinstance(results[1], SpoolError)
    assert await spool.get(first.id) == first


async def test_synchronous_commit_off_is_not_inherited(
    make: Make, pg_url: str, pg_cluster: PgCluster
) -> None:
    await sql(pg_url, f"ALTER DATABASE {pg_url.rsplit('/', 1)[1]} SET synchronous_commit = off")
    spool = await make("a")
    assert spool._pool is not None
    async with spool._pool.connection() as conn:
        cur = await conn.execute("SHOW synchronous_commit")
        assert await cur.fetchone() == ("on",)  # 250 is said after COMMIT: it must be durable


# --- lost connections ---------------------------------------------------------------------


async def test_terminated_sessions_are_replaced_without_failing_an_operation(
    make: Make, pg_cluster: PgCluster, pg_url: str
) -> None:
    spool = await make("a")
    await spool.put(entry(1))
    assert pg_cluster.terminate_backends(pg_url.rsplit("/", 1)[1]) >= 1
    await spool.put(entry(2))  # the pool checks a connection before lending it
    assert (await spool.counts())["queued"] == 2
    assert await spool.check_writable()


async def test_a_connection_lost_mid_write_is_a_spool_error_then_it_recovers(
    make: Make, pg_url: str
) -> None:
    spool = await make("a")
    await spool.put(e := entry())
    async with await psycopg.AsyncConnection.connect(pg_url) as holder:
        # Hold the row lock, so that the spool's write waits on the server, mid-transaction.
        await holder.execute("SELECT 1 FROM smtp2api_messages WHERE id = %s FOR UPDATE", (e.id,))
        write = asyncio.create_task(spool.defer(e.id, time.time() + 60, "451 4.3.0 x", None))

        async def waiting() -> bool:
            rows = await sql(
                pg_url,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                "application_name = 'smtp2api' AND wait_event_type = 'Lock'",
            )
            return bool(rows[0][0])

        await eventually(waiting)  # ... and then its connection died
        with pytest.raises(SpoolError) as caught:
            await write
        assert caught.value.reply.code == 451
    await spool.put(again := entry(2))  # a new connection; nothing was lost
    assert await spool.get(again.id) == again
    assert (await row(pg_url, e.id))[0] == "queued"


async def test_an_unreachable_database_is_a_spool_error_never_a_crash() -> None:
    url = f"postgresql://smtp2api:s3cret-pw@127.0.0.1:{free_port()}/nowhere"  # nobody listens
    spool = PostgresSpool(url, node_id="a", timeout=1)
    try:
        for op in (
            lambda: spool.put(entry()),
            lambda: spool.claim(5, time.time()),
            spool.counts,
            lambda: spool.recover(time.time()),
        ):
            with pytest.raises(SpoolError) as caught:
                await op()
            assert caught.value.reply.code == 451
            assert "s3cret" not in str(caught.value)
        assert not await spool.check_writable()
        assert "s3cret" not in repr(spool)
    finally:
        await spool.aclose()
    with pytest.raises(SpoolError, match="closed"):
        await spool.put(entry())


def test_without_the_driver_a_postgresql_url_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "smtp2api.spool.postgres", None)  # import fails
    settings = SpoolSettings(url="postgresql://gw:s3cret-pw@db.internal/mail")
    with pytest.raises(ConfigError, match=r"pip install 'smtp2api\[postgres\]'") as caught:
        open_spool(settings)
    assert "s3cret" not in str(caught.value)


def test_open_spool_builds_a_postgres_spool_without_io() -> None:
    settings = SpoolSettings(url="postgres://gw@127.0.0.1:9/mail", lease=12, node_id="gw-7")
    spool = open_spool(settings)
    assert isinstance(spool, PostgresSpool)
    assert (spool.node_id, spool.lease) == ("gw-7", 12)
    default = open_spool(SpoolSettings(url="postgresql://gw@127.0.0.1:9/mail"))
    assert isinstance(default, PostgresSpool)
    assert default.node_id == socket.gethostname()
