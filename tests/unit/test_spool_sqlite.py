"""SQLite spool specifics: file layout, pragmas, group commit, failures, quarantine, and other
processes. The backend-independent contract is in ``tests/spool/test_spool_contract.py``."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import sqlite3
import stat
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from smtp2api.config import SpoolSettings
from smtp2api.errors import SpoolError, SpoolFull
from smtp2api.models import Envelope
from smtp2api.spool import SpoolEntry, SqliteSpool, new_message_id, open_spool, sqlite_path
from smtp2api.spool.base import Withdrawn
from smtp2api.spool.sqlite_io import spool_error
from smtp2api.spool.sqlite_schema import SCHEMA_VERSION, decode_list, encode_list
from tests.support.spool_writer import writer_blocked

T0 = 1_700_000_000.0


def entry(n: int = 0, size: int = 100, **kw: object) -> SpoolEntry:
    raw = (b"Subject: %d\r\n\r\n" % n).ljust(size, b"x")
    env = Envelope(f"s{n}@example.com", (f"r{n}@example.net",), peer="192.0.2.1")
    return SpoolEntry.new(raw, env, ("outbox",), now=T0 + n, **kw)  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "spool.db"


@pytest.fixture
async def spool(db: Path) -> AsyncIterator[SqliteSpool]:
    s = await SqliteSpool.open(db)
    yield s
    await s.aclose()


def fail_on_call(number: int, exc: BaseException) -> Callable[[], None]:
    calls = 0

    def hook() -> None:
        nonlocal calls
        calls += 1
        if calls == number:
            raise exc

    return hook


# --- file, pragmas, URLs --------------------------------------------------------------------


async def test_file_is_wal_full_sync_versioned_and_private(db: Path) -> None:
    spool = await SqliteSpool.open(db)
    try:
        sync = await spool.writer.submit(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        assert sync == 2  # FULL
        assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(db.stat().st_mode) == 0o600
        with contextlib.closing(sqlite3.connect(db)) as other:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        await spool.aclose()


async def test_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    spool = await SqliteSpool.open(tmp_path / "spool.db")
    await spool.aclose()
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_sqlite_urls_follow_sqlalchemy() -> None:
    assert sqlite_path("sqlite:///data/spool.db") == Path("data/spool.db")
    assert sqlite_path("sqlite:////var/lib/smtp2api/spool.db") == Path("/var/lib/smtp2api/spool.db")
    for bad in ("sqlite:///", "sqlite:///:memory:", "sqlite:///x.db?mode=ro"):
        with pytest.raises(SpoolError):
            sqlite_path(bad)


async def test_open_spool_relative_path_is_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spool = open_spool(SpoolSettings(url="sqlite:///smtp2api-data/spool.db"))
    assert not (tmp_path / "smtp2api-data").exists()  # no I/O until first use
    assert await spool.check_writable()
    await spool.aclose()
    assert (tmp_path / "smtp2api-data" / "spool.db").is_file()


async def test_open_failures_are_spool_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SpoolError, match="open failed"):
        await SqliteSpool.open(tmp_path / "file" / "spool.db")
    (tmp_path / "garbage.db").write_bytes(b"this is not a database file at all" * 200)
    with pytest.raises(SpoolError, match="NOTADB"):
        await SqliteSpool.open(tmp_path / "garbage.db")


async def test_a_newer_schema_is_refused(db: Path) -> None:
    await (await SqliteSpool.open(db)).aclose()  # create it
    with contextlib.closing(sqlite3.connect(db)) as other:
        other.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        other.commit()
    with pytest.raises(SpoolError, match="newer than this smtp2api supports"):
        await SqliteSpool.open(db)


async def test_a_failed_open_is_retried_by_the_next_operation(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the directory should be")
    spool = SqliteSpool(blocker / "spool.db")
    assert not await spool.check_writable()
    blocker.unlink()
    assert await spool.check_writable()
    await spool.aclose()


# --- group commit ---------------------------------------------------------------------------


async def test_puts_submitted_together_share_one_commit(spool: SqliteSpool) -> None:
    before = spool.stats.commits
    async with writer_blocked(spool):
        puts = [asyncio.create_task(spool.put(entry(i))) for i in range(50)]
    await asyncio.gather(*puts)
    assert spool.stats.commits == before + 2  # the blocker's batch, then all 50 puts
    assert spool.stats.largest_batch >= 50
    assert (await spool.counts())["queued"] == 50


async def test_concurrent_puts_commit_fewer_times_than_they_put(spool: SqliteSpool) -> None:
    before = spool.stats.commits
    await asyncio.gather(*(spool.put(entry(i)) for i in range(200)))
    assert spool.stats.commits - before < 200


async def test_group_commit_off_commits_every_put(db: Path) -> None:
    spool = await SqliteSpool.open(db, group_commit=False)
    try:
        before = spool.stats.commits
        await asyncio.gather(*(spool.put(entry(i)) for i in range(30)))
        assert spool.stats.commits - before == 30
        assert spool.stats.largest_batch == 1
    finally:
        await spool.aclose()


async def test_a_bad_op_fails_alone_inside_a_batch(spool: SqliteSpool) -> None:
    a, b = entry(1), entry(2)
    async with writer_blocked(spool):
        tasks = [asyncio.create_task(spool.put(e)) for e in (a, a, b)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] is None
    assert isinstance(results[1], SpoolError)
    assert results[2] is None
    assert (await spool.counts())["queued"] == 2


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        ("DELETE FROM messages WHERE id = ? AND size = ?", ("x",)),  # too few parameters
        ("DELETE FROM messages WHERE size = ?", (2**63,)),  # no SQLite INTEGER holds it
        ("INSERT INTO messages (id) VALUES (?)", ("x",)),  # NOT NULL constraints
    ],
)
async def test_a_failing_statement_fails_alone_without_a_savepoint(
    spool: SqliteSpool, sql: str, params: tuple[object, ...]
) -> None:
    a, b = entry(1), entry(2)
    async with writer_blocked(spool):
        tasks = [
            asyncio.create_task(spool.put(a)),
            asyncio.create_task(spool.writer.execute(sql, params)),
            asyncio.create_task(spool.ack(a.id)),
            asyncio.create_task(spool.put(b)),
        ]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] is None
    assert isinstance(results[1], SpoolError)
    assert results[2:] == [None, None]
    assert [s.id for s in await spool.list()] == [b.id]  # the ops around it all took effect


def test_encoded_lists_are_what_json_dumps_gives() -> None:
    for values in [(), ("a@example.com",), ('"q"@x', "b\\s@x", "ü@bücher.example", "\x01\n")]:
        assert encode_list(values) == json.dumps(list(values), separators=(",", ":"))
        assert decode_list("id", "column", encode_list(values)) == values


# --- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected", "not_expected"),
    [
        (sqlite3.OperationalError("disk I/O error"), SpoolError, SpoolFull),
        (sqlite3.OperationalError("database or disk is full"), SpoolFull, None),
        (OSError(errno.ENOSPC, "No space left on device"), SpoolFull, None),
        (OSError(errno.EROFS, "Read-only file system"), SpoolError, SpoolFull),
    ],
)
async def test_a_failed_commit_fails_every_op_of_the_batch(
    spool: SqliteSpool,
    error: BaseException,
    expected: type[SpoolError],
    not_expected: type[SpoolError] | None,
) -> None:
    existing = entry(0)
    await spool.put(existing)
    spool.writer.fault_hook = fail_on_call(2, error)  # call 1 is the blocker's own batch
    async with writer_blocked(spool):
        tasks = [asyncio.create_task(spool.put(entry(i))) for i in range(1, 11)]
        tasks.append(asyncio.create_task(spool.ack(existing.id)))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, expected) for r in results)
    if not_expected is not None:
        assert not any(isinstance(r, not_expected) for r in results)
    assert await spool.counts() == {"queued": 1, "active": 0, "dead": 0}  # nothing half-done
    assert await spool.get(existing.id) == existing
    assert spool.stats.failed_batches == 1
    await spool.put(entry(20))  # the spool goes on once the fault is gone


async def test_a_full_database_is_spool_full_for_the_whole_batch(spool: SqliteSpool) -> None:
    small = entry(1)

    def cap(conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")

    await spool.writer.submit(cap)
    async with writer_blocked(spool):
        tasks = [
            asyncio.create_task(spool.put(small)),
            asyncio.create_task(spool.put(entry(2, size=256_000))),  # needs new pages
        ]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, SpoolFull) for r in results), results
    assert await spool.get(small.id) is None
    await spool.writer.submit(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
    await spool.put(entry(2, size=256_000))


async def test_a_read_only_database_is_a_spool_error(spool: SqliteSpool) -> None:
    # Tests run as root, which ignores file modes: make SQLite itself refuse writes instead.
    conn = await spool.writer.submit(lambda c: c)  # the writer's own connection
    await spool.writer.submit(lambda c: c.execute("PRAGMA query_only = ON"))
    with pytest.raises(SpoolError, match="READONLY") as info:
        await spool.put(entry())
    assert not isinstance(info.value, SpoolFull)
    assert info.value.reply.code == 451
    assert not await spool.check_writable()
    conn.execute("PRAGMA query_only = OFF")  # BEGIN itself is refused now; the writer is idle
    assert await spool.check_writable()


def test_spool_errors_are_log_safe() -> None:
    err = spool_error(PermissionError(errno.EACCES, "Permission denied", "/secret/path/spool.db"))
    assert "/secret" not in str(err)
    assert "EACCES" in str(err)
    assert spool_error(SpoolFull("x")).reply.code == 452


# --- corrupted rows -------------------------------------------------------------------------


def corrupt(db: Path, msg_id: str, sql: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as other:
        other.execute(sql, (msg_id,))
        other.commit()


async def test_a_corrupt_row_is_quarantined_and_claim_goes_on(db: Path, spool: SqliteSpool) -> None:
    good1, bad, good2 = entry(1), entry(2), entry(3)
    for e in (good1, bad, good2):
        await spool.put(e)
    corrupt(db, bad.id, "UPDATE messages SET rcpt_tos = '[\"unterminated' WHERE id = ?")
    claimed = await spool.claim(10, T0 + 10)
    assert [c.id for c in claimed] == [good1.id, good2.id]
    assert spool.stats.quarantined == 1
    assert await spool.quarantined() == 1
    assert await spool.counts() == {"queued": 0, "active": 2, "dead": 0}
    with contextlib.closing(sqlite3.connect(db)) as other:
        msg_id, reason, record, raw = other.execute(
            "SELECT msg_id, reason, record, raw FROM quarantine"
        ).fetchone()
    assert (msg_id, reason, raw) == (bad.id, "rcpt_tos: invalid JSON", bad.raw)
    assert json.loads(record)["mail_from"] == bad.mail_from
    assert await spool.delete(bad.id)  # an operator can drop it
    assert await spool.quarantined() == 0


@pytest.mark.parametrize(
    "sql",
    [
        'UPDATE messages SET providers = \'{"not": "a list"}\' WHERE id = ?',
        "UPDATE messages SET created_at = 'yesterday' WHERE id = ?",
        "UPDATE messages SET raw = 'text, not a blob' WHERE id = ?",
    ],
)
async def test_reads_skip_and_quarantine_corrupt_rows(
    db: Path, spool: SqliteSpool, sql: str
) -> None:
    good, bad = entry(1), entry(2)
    await spool.put(good)
    await spool.put(bad)
    corrupt(db, bad.id, sql)
    assert await spool.get(bad.id) is None
    assert [s.id for s in await spool.list()] == [good.id]
    assert await spool.quarantined() == 1
    assert [c.id for c in await spool.claim(10, T0 + 10)] == [good.id]


# --- other processes ------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from smtp2api.spool import SqliteSpool, SpoolEntry
    from smtp2api.models import Envelope

    async def main(path, action, *ids):
        spool = await SqliteSpool.open(path)
        if action == "crash":
            entry = SpoolEntry.new(b"Subject: x\\r\\n\\r\\nbody", Envelope("a@x", ("b@y",)), ["p"])
            await spool.put(entry)
            await spool.claim(1, time.time())
            print(entry.id, flush=True)
            os._exit(9)  # like kill -9: no close, no ack
        listed = [(s.id, s.state) for s in await spool.list()]
        retried = await spool.retry(ids[0])
        deleted = await spool.delete(ids[1])
        counts = await spool.counts()
        await spool.aclose()
        print(json.dumps({"listed": listed, "retried": retried, "deleted": deleted,
                          "counts": counts}))

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def run_child(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode in (0, 9), err.decode()
    return proc.returncode or 0, out.decode()


async def test_another_process_can_inspect_and_act_while_the_daemon_writes(
    db: Path, spool: SqliteSpool
) -> None:
    dead, doomed, other = entry(1), entry(2), entry(3)
    for e in (dead, doomed, other):
        await spool.put(e)
    await spool.mark_dead(dead.id, "554 5.6.0 x", None)
    stop = asyncio.Event()

    async def keep_writing() -> int:
        n = 0
        while not stop.is_set():
            await spool.put(entry(1000 + n))
            n += 1
        return n

    writer = asyncio.create_task(keep_writing())
    try:
        _, out = await run_child(str(db), "act", dead.id, doomed.id)
    finally:
        stop.set()
        written = await writer
    report = json.loads(out)
    assert (dead.id, "dead") in [tuple(x) for x in report["listed"]]
    assert report["retried"] is True
    assert report["deleted"] is True
    assert report["counts"]["dead"] == 0
    revived = await spool.get(dead.id)
    assert revived is not None
    assert revived.state == "queued"
    assert await spool.get(doomed.id) is None
    assert (await spool.counts())["queued"] == 2 + written


async def test_kill_9_mid_try_keeps_the_message_and_its_attempt(db: Path) -> None:
    code, out = await run_child(str(db), "crash")
    assert code == 9
    msg_id = out.strip()
    spool = await SqliteSpool.open(db)
    try:
        stored = await spool.get(msg_id)
        assert stored is not None
        assert (stored.state, stored.attempts) == ("active", 1)
        assert await spool.recover(T0) == 1
        (again,) = await spool.claim(1, 2 * T0)
        assert (again.id, again.attempts) == (msg_id, 2)
    finally:
        await spool.aclose()


# --- ids ------------------------------------------------------------------------------------


def test_message_ids_are_url_safe_unique_and_time_sorted() -> None:
    ids = [new_message_id(T0 + i / 1000) for i in range(2000)]
    assert all(len(i) == 26 and i.isalnum() and i.isupper() for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert len({new_message_id() for _ in range(10_000)}) == 10_000


# --- withdrawing a put (hybrid mode's race, intake.py) -------------------------------------


async def test_a_withdrawn_put_is_never_written_and_the_rest_of_its_batch_is(
    spool: SqliteSpool,
) -> None:
    first, second, third = entry(1), entry(2), entry(3)
    async with writer_blocked(spool):
        puts = [asyncio.create_task(spool.put(e)) for e in (first, second, third)]
        await asyncio.sleep(0)  # each put is queued behind the blocking op
        commits = spool.stats.commits
        assert spool.withdraw(second.id)
        assert not spool.withdraw(second.id)  # once
    outcomes = await asyncio.gather(*puts, return_exceptions=True)
    assert outcomes[0] is None
    assert isinstance(outcomes[1], Withdrawn)
    assert outcomes[2] is None
    assert {s.id for s in await spool.list()} == {first.id, third.id}
    assert spool.stats.commits == commits + 2  # the blocking op's batch, then one for the two


async def test_a_put_the_writer_has_taken_cannot_be_withdrawn(spool: SqliteSpool) -> None:
    e = entry(1)
    await spool.put(e)
    assert not spool.withdraw(e.id)
    taken, gate = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:  # runs in the same batch, after the put
        taken.set()
        gate.wait(10)

    second = entry(2)
    async with writer_blocked(spool):
        put = asyncio.create_task(spool.put(second))
        holder = asyncio.create_task(spool.writer.submit(hold))
        await asyncio.sleep(0)
    assert await asyncio.to_thread(taken.wait, 10)  # the put ran before ``hold``
    assert not spool.withdraw(second.id)
    gate.set()
    await asyncio.gather(put, holder)
    assert await spool.get(second.id) is not None


async def test_a_batch_of_withdrawn_puts_costs_no_commit(spool: SqliteSpool) -> None:
    entries = [entry(n) for n in range(5)]
    async with writer_blocked(spool):
        puts = [asyncio.create_task(spool.put(e)) for e in entries]
        await asyncio.sleep(0)
        commits = spool.stats.commits
        assert all(spool.withdraw(e.id) for e in entries)
    outcomes = await asyncio.gather(*puts, return_exceptions=True)
    assert all(isinstance(o, Withdrawn) for o in outcomes)
    await spool.check_writable()  # the writer went on: this op is the next batch
    assert spool.stats.commits == commits + 2  # the blocking op's, then check_writable's
    assert await spool.counts() == {"queued": 0, "active": 0, "dead": 0}


async def test_a_large_body_is_written_through_blob_io_and_reads_back_whole(
    spool: SqliteSpool,
) -> None:
    body = bytes(range(256)) * (5 * 4096 + 17)  # 5.2 MB, not a multiple of the chunk size
    big = SpoolEntry.new(body, Envelope("a@example.com", ("b@example.net",)), ("outbox",), now=T0)
    await spool.put(big)
    got = await spool.get(big.id)
    assert got is not None
    assert got.raw == body
    assert (await spool.list())[0].size == len(body)
    with pytest.raises(SpoolError, match="write failed"):
        await spool.put(big)  # the same id again: a constraint error, as for a small body


async def test_a_withdrawable_put_waits_for_its_hold_before_it_is_written(db: Path) -> None:
    spool = await SqliteSpool.open(db, hold=30.0)  # longer than this test: no race
    try:
        first, second = entry(1), entry(2)
        puts = [asyncio.create_task(spool.put(e)) for e in (first, second)]
        await asyncio.sleep(0.05)  # an idle writer would have written both by now
        assert spool.withdraw(first.id)
        assert spool.withdraw(second.id)
        outcomes = await asyncio.gather(*puts, return_exceptions=True)
        assert all(isinstance(o, Withdrawn) for o in outcomes)
        assert spool.stats.withdrawn == 2
        assert spool.stats.ops == 0
        await spool.check_writable()  # not withdrawable (no key): written at once
        assert spool.stats.ops == 1
    finally:
        await spool.aclose()


async def test_a_put_that_is_not_withdrawn_is_written_once_its_hold_is_over(db: Path) -> None:
    spool = await SqliteSpool.open(db, hold=0.2)
    try:
        e = entry(1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await spool.put(e)
        assert loop.time() - started >= 0.2
        assert not spool.withdraw(e.id)
        assert await spool.get(e.id) is not None
    finally:
        await spool.aclose()
