"""Several writers on one SQLite spool file: the flock on ``<spool>.lock`` that queues them
(``sqlite_files.WriteLock``), its fallbacks, and real processes writing one file at once."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import stat
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from smtp2api.models import Envelope
from smtp2api.spool import SpoolEntry, SqliteSpool
from smtp2api.spool.sqlite_files import lock_path, open_write_lock
from tests.support.spool_writer import writer_blocked


def entry(n: int) -> SpoolEntry:
    env = Envelope(f"s{n}@example.com", (f"r{n}@example.net",), peer="192.0.2.1")
    return SpoolEntry.new(b"Subject: %d\r\n\r\nbody" % n, env, ("outbox",))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "spool.db"


@contextlib.contextmanager
def peer_lock(db: Path) -> Iterator[int]:
    """Hold the spool's flock as another process would: through another open file."""
    fd = os.open(lock_path(db), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases it


def lock_is_free(db: Path) -> bool:
    fd = os.open(lock_path(db), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


async def test_the_writer_holds_a_private_flock_only_during_its_transactions(db: Path) -> None:
    spool = await SqliteSpool.open(db)
    try:
        assert stat.S_IMODE(lock_path(db).stat().st_mode) == 0o600
        await spool.put(entry(1))
        assert lock_is_free(db)  # between transactions
        async with writer_blocked(spool):
            assert not lock_is_free(db)
        assert lock_is_free(db)
    finally:
        await spool.aclose()


async def test_a_writer_waits_for_the_flock_and_goes_on_once_it_is_released(db: Path) -> None:
    spool = await SqliteSpool.open(db, busy_timeout=60.0)
    try:
        with peer_lock(db):
            put = asyncio.create_task(spool.put(entry(1)))
            lock = spool.writer.lock
            assert lock is not None
            async with asyncio.timeout(30):  # until its helper thread blocks in flock(2)
                while not lock.waiting:
                    await asyncio.sleep(0.01)
            assert not put.done()
            commits = spool.stats.commits
        await put  # woken by the release, long before the 60 s backstop
        assert spool.stats.commits == commits + 1
        assert (await spool.counts())["queued"] == 1
    finally:
        await spool.aclose()


async def test_a_peer_that_keeps_the_flock_is_outwaited_then_sqlite_decides(db: Path) -> None:
    spool = await SqliteSpool.open(db, busy_timeout=0.2)
    try:
        with capture_logs() as logs, peer_lock(db):
            await spool.put(entry(1))  # the peer holds the flock, not SQLite's lock
            await spool.put(entry(2))  # no second wait while the first one's helper waits
        assert [e["event"] for e in logs].count("spool_write_lock_timeout") == 1
        lock = spool.writer.lock
        assert lock is not None
        async with asyncio.timeout(30):  # until the helper has had it and let it go
            while lock.waiting:
                await asyncio.sleep(0.01)
        async with writer_blocked(spool):  # back to taking it once it is free
            assert not lock_is_free(db)
        assert (await spool.counts())["queued"] == 2
    finally:
        await spool.aclose()


@pytest.mark.parametrize(
    ("make", "error"),
    [
        # The kernel refuses the open (ELOOP: O_NOFOLLOW), as it would with EACCES or EROFS
        # for a read-only directory (which root, running the tests, cannot be kept out of).
        (lambda p: p.symlink_to(p.with_name("elsewhere")), "ELOOP"),
        (lambda p: p.mkdir(), "EINVAL"),  # opens, but is no regular file
    ],
)
async def test_without_a_usable_lock_file_writes_go_on_with_one_warning(
    db: Path, make: Callable[[Path], None], error: str
) -> None:
    db.parent.mkdir()
    make(lock_path(db))
    with capture_logs() as logs:
        first = await SqliteSpool.open(db)
        second = await SqliteSpool.open(db)  # another writer on the same file
    try:
        warnings = [e for e in logs if e["event"] == "spool_write_lock_unavailable"]
        assert [w["error"] for w in warnings] == [error, error]  # one per writer
        assert first.writer.lock is None
        await asyncio.gather(*(s.put(entry(i)) for i, s in enumerate([first, second] * 10)))
        assert (await first.counts())["queued"] == 20
        assert len(await second.claim(100, 2e9)) == 20
    finally:
        await first.aclose()
        await second.aclose()


async def test_write_lock_false_takes_no_flock(db: Path) -> None:
    spool = await SqliteSpool.open(db, write_lock=False)
    try:
        assert spool.writer.lock is None
        assert not lock_path(db).exists()
        await spool.put(entry(1))
    finally:
        await spool.aclose()


def test_lock_holders_never_overlap_even_when_waits_time_out(tmp_path: Path) -> None:
    """Four writers (four open files, as four processes would have) take turns; some give up
    quickly, so the helper threads hand over, time out and let go concurrently."""
    db = tmp_path / "spool.db"
    db.touch()
    turns = 1000
    inside, overlaps, held = 0, 0, [0] * 4
    guard = threading.Lock()

    def writer(index: int, timeout: float) -> None:
        nonlocal inside, overlaps
        lock = open_write_lock(db, timeout)
        assert lock is not None
        try:
            for _ in range(turns):
                if not lock.acquire():
                    time.sleep(random.random() / 3000)  # went on without it; the helper waits
                    continue
                with guard:
                    inside += 1
                    overlaps += inside > 1
                time.sleep(random.random() / 2000)  # a commit
                with guard:
                    inside -= 1
                held[index] += 1
                lock.release()
        finally:
            lock.close()

    with capture_logs():  # the timeouts' warnings
        threads = [
            threading.Thread(target=writer, args=(i, t))
            for i, t in enumerate((0.0005, 0.002, 30.0, 30.0))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert overlaps == 0
    assert held[2] == held[3] == turns  # who waits long enough always gets it


# --- real processes -------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import asyncio, json, sys
    from smtp2api.models import Envelope
    from smtp2api.spool import SpoolEntry, SqliteSpool

    async def main(path, tag, count):
        spool = await SqliteSpool.open(path)
        env = Envelope("a@example.com", ("b@example.net",), peer="192.0.2.1")
        print("ready", flush=True)
        sys.stdin.readline()  # every writer starts together
        raw = b"Subject: x\\r\\n\\r\\nbody"
        entries = [SpoolEntry.new(raw, env, ["p"]) for i in range(count)]

        async def put_then_ack(i, e):
            await spool.put(e)
            if i % 2:  # hybrid mode: delivered at once, so removed again
                await spool.ack(e.id)

        await asyncio.gather(*(put_then_ack(i, e) for i, e in enumerate(entries)))
        await spool.aclose()
        print(json.dumps({"tag": tag, "kept": [e.id for e in entries[::2]],
                          "commits": spool.stats.commits}), flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


async def test_processes_writing_one_file_all_progress_and_lose_nothing(db: Path) -> None:
    await (await SqliteSpool.open(db)).aclose()  # created and migrated once
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WRITER,
            str(db),
            tag,
            "400",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for tag in ("a", "b", "c")
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate(b"go\n") for p in procs)), 120)
    reports = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
        reports.append(json.loads(out))
    assert all(r["commits"] > 0 for r in reports)
    spool = await SqliteSpool.open(db)
    try:
        stored = {s.id for s in await spool.list()}
        kept = {i for r in reports for i in r["kept"]}
        assert len(kept) == 3 * 200
        assert stored == kept  # every put that was kept is there, every ack took effect
    finally:
        await spool.aclose()
