"""The ``Spool`` contract, run against every backend (``BACKENDS``): what callers may rely on.

A backend joins by adding an opener to ``_OPENERS``; each opener returns a new ``Spool`` over
the same storage every time it is called (a restart), starting empty for each test. PostgreSQL
runs on a throwaway local cluster (``tests/support/pg.py``): it fails in CI and skips elsewhere
when PostgreSQL is not installed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtp2api.config import SpoolSettings
from smtp2api.errors import SpoolError
from smtp2api.models import Envelope
from smtp2api.spool import STATES, Spool, SpoolEntry, SpoolSummary, open_spool

LEASE = 30.0
T0 = 1_700_000_000.0  # a fixed "now": the interface takes the clock as an argument

Opener = Callable[[], Awaitable[Spool]]


def _sqlite_settings(request: pytest.FixtureRequest, tmp_path: Path) -> SpoolSettings:
    return SpoolSettings(url=f"sqlite:///{tmp_path}/data/spool.db", lease=LEASE)


def _postgres_settings(request: pytest.FixtureRequest, tmp_path: Path) -> SpoolSettings:
    # A fresh database per test on the session's throwaway cluster (tests/support/pg.py);
    # requested lazily, so SQLite-only runs never start PostgreSQL.
    url = request.getfixturevalue("pg_url")
    return SpoolSettings(url=url, lease=LEASE, node_id="contract-node")


_OPENERS: dict[str, Callable[[pytest.FixtureRequest, Path], SpoolSettings]] = {
    "sqlite": _sqlite_settings,
    "postgresql": _postgres_settings,
}
BACKENDS = sorted(_OPENERS)


@pytest.fixture(params=BACKENDS)
async def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    settings = _OPENERS[request.param](request, tmp_path)
    opened: list[Spool] = []

    async def opener() -> Spool:
        spool = open_spool(settings)
        opened.append(spool)
        return spool

    yield opener
    for spool in opened:
        await spool.aclose()


@pytest.fixture
async def spool(reopen: Opener) -> Spool:
    return await reopen()


def entry(
    n: int = 0,
    *,
    due: float = T0,
    rcpts: tuple[str, ...] = ("rcpt@example.net",),
    raw: bytes | None = None,
    **kw: object,
) -> SpoolEntry:
    body = raw if raw is not None else b"Subject: m%d\r\n\r\nbody \xe9\r\n.\r\n" % n
    env = Envelope(f"sender{n}@example.com", rcpts, account="wp", peer="192.0.2.7")
    made = SpoolEntry.new(body, env, ("ses", "backup"), now=T0 + n / 1000, next_attempt_at=due)
    return replace(made, **kw)  # type: ignore[arg-type]


# --- put / get --------------------------------------------------------------------------


async def test_put_get_round_trips_every_field(spool: Spool) -> None:
    original = entry(
        1,
        raw=b"Received: from x\r\nSubject: \xff\xfe 8bit\r\n\r\nline\rbare\nlf\r\n",
        rcpts=("a@example.net", "b@example.net", "\u00e9@example.net"),
        attempts=2,
        last_reply="451 4.7.0 rate limited",
        last_error="429 from ses",
        done_recipients=("a@example.net",),
        smtputf8=True,
        account=None,
    )
    await spool.put(original)
    assert await spool.get(original.id) == original


async def test_put_is_durable_across_a_restart(reopen: Opener, spool: Spool) -> None:
    e = entry()
    await spool.put(e)
    await spool.aclose()
    assert await (await reopen()).get(e.id) == e


async def test_put_same_id_twice_fails_and_keeps_the_first(spool: Spool) -> None:
    first = entry(1)
    await spool.put(first)
    with pytest.raises(SpoolError):
        await spool.put(entry(2, id=first.id))
    assert await spool.get(first.id) == first


async def test_get_unknown_is_none(spool: Spool) -> None:
    assert await spool.get("01NOSUCHID0000000000000000") is None


async def test_concurrent_puts_are_all_stored(reopen: Opener, spool: Spool) -> None:
    entries = [entry(i) for i in range(100)]
    await asyncio.gather(*(spool.put(e) for e in entries))
    await spool.aclose()
    again = await reopen()
    assert (await again.counts())["queued"] == 100
    assert [await again.get(e.id) for e in entries[::25]] == entries[::25]


# --- claim --------------------------------------------------------------------------------


async def test_claim_takes_due_entries_oldest_due_first_within_limit(spool: Spool) -> None:
    later, first, second, future = (
        entry(1, due=T0 + 3),
        entry(2, due=T0 + 1),
        entry(3, due=T0 + 2),
        entry(4, due=T0 + 20),
    )
    for e in (later, first, second, future):
        await spool.put(e)
    assert [c.id for c in await spool.claim(2, T0 + 5)] == [first.id, second.id]
    assert [c.id for c in await spool.claim(10, T0 + 5)] == [later.id]
    assert await spool.claim(10, T0 + 5) == []  # active entries are not claimed twice
    # ... not even later on, while their leases (LEASE seconds) run
    assert [c.id for c in await spool.claim(10, T0 + 20)] == [future.id]


async def test_claim_with_no_room_claims_nothing(spool: Spool) -> None:
    await spool.put(entry())
    assert await spool.claim(0, T0) == []
    assert (await spool.counts())["queued"] == 1


async def test_claim_persists_the_attempt_and_marks_active(spool: Spool) -> None:
    e = entry()
    await spool.put(e)
    (claimed,) = await spool.claim(5, T0)
    assert (claimed.state, claimed.attempts, claimed.raw) == ("active", 1, e.raw)
    stored = await spool.get(e.id)
    assert stored is not None
    assert (stored.state, stored.attempts) == ("active", 1)
    assert await spool.counts() == {"queued": 0, "active": 1, "dead": 0}


async def test_a_crash_mid_try_counts_the_attempt(reopen: Opener, spool: Spool) -> None:
    e = entry()
    await spool.put(e)
    await spool.claim(1, T0)
    await spool.aclose()  # no ack, no defer: the process went away mid-try
    restarted = await reopen()
    assert await restarted.recover(T0 + 1) == 1
    stored = await restarted.get(e.id)
    assert stored is not None
    assert (stored.state, stored.attempts) == ("queued", 1)
    (again,) = await restarted.claim(1, T0 + 1)
    assert again.attempts == 2


# --- outcomes -----------------------------------------------------------------------------


async def test_ack_removes_and_unknown_ids_are_no_ops(spool: Spool) -> None:
    e = entry()
    await spool.put(e)
    await spool.claim(1, T0)
    await spool.ack(e.id)
    assert await spool.get(e.id) is None
    await spool.ack(e.id)
    await spool.defer(e.id, T0, "451 4.3.0 x", None)
    await spool.mark_dead(e.id, "554 5.6.0 x", None)
    await spool.add_done_recipients(e.id, ["a@example.net"])
    await spool.release(e.id)
    assert await spool.counts() == {"queued": 0, "active": 0, "dead": 0}


async def test_defer_requeues_with_the_reply_until_due(spool: Spool) -> None:
    e = entry()
    await spool.put(e)
    await spool.claim(1, T0)
    await spool.defer(e.id, T0 + 60, "451 4.7.0 Upstream rate limit", "ses: 429 Throttling")
    stored = await spool.get(e.id)
    assert stored is not None
    assert (stored.state, stored.next_attempt_at, stored.attempts) == ("queued", T0 + 60, 1)
    assert (stored.last_reply, stored.last_error) == (
        "451 4.7.0 Upstream rate limit",
        "ses: 429 Throttling",
    )
    assert await spool.claim(1, T0 + 59) == []
    assert await spool.next_due_at() == T0 + 60
    (again,) = await spool.claim(1, T0 + 60)
    assert again.attempts == 2


async def test_dead_entries_stay_but_are_never_claimed(spool: Spool) -> None:
    e = entry()
    await spool.put(e)
    await spool.claim(1, T0)
    await spool.mark_dead(e.id, "554 5.6.0 rejected", "bad attachment")
    assert await spool.claim(1, T0 + 10**6) == []
    stored = await spool.get(e.id)
    assert stored is not None
    assert (stored.state, stored.last_reply, stored.attempts) == ("dead", "554 5.6.0 rejected", 1)
    assert await spool.next_due_at() is None


async def test_done_recipients_accumulate_in_order_without_duplicates(spool: Spool) -> None:
    e = entry(rcpts=("a@x.test", "b@x.test", "c@x.test", "d@x.test"))
    await spool.put(e)
    await spool.claim(1, T0)
    await spool.add_done_recipients(e.id, ["b@x.test", "a@x.test", "b@x.test"])
    await spool.defer(e.id, T0, "451 4.3.0 x", None)
    await spool.add_done_recipients(e.id, ("a@x.test", "d@x.test"))
    (again,) = await spool.claim(1, T0)
    assert again.done_recipients == ("b@x.test", "a@x.test", "d@x.test")
    assert again.pending_recipients == ("c@x.test",)


async def test_release_gives_back_an_untried_claim(spool: Spool) -> None:
    e = entry(attempts=3)
    await spool.put(e)
    await spool.claim(1, T0)
    await spool.release(e.id)
    stored = await spool.get(e.id)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.next_attempt_at) == ("queued", 3, T0)


async def test_release_can_keep_the_attempt_and_set_the_due_time(spool: Spool) -> None:
    tried, gated, done = entry(1, attempts=3), entry(2, attempts=3), entry(3)
    for e in (tried, gated, done):
        await spool.put(e)
    await spool.claim(3, T0 + 1)
    await spool.release(tried.id, attempted=True)  # a try cut short: it counts
    await spool.release(gated.id, next_attempt_at=T0 + 60)  # never tried: due later
    await spool.ack(done.id)
    await spool.release(done.id)  # gone: a no-op
    stored = {e.id: await spool.get(e.id) for e in (tried, gated, done)}
    assert stored[done.id] is None
    got = [(s.state, s.attempts, s.next_attempt_at) for s in stored.values() if s is not None]
    assert got == [("queued", 4, tried.next_attempt_at), ("queued", 3, T0 + 60)]
    await spool.defer(tried.id, T0 + 90, "451 4.3.0 x", None)
    await spool.release(tried.id, next_attempt_at=T0)  # only active entries are released
    again = await spool.get(tried.id)
    assert again is not None
    assert again.next_attempt_at == T0 + 90


async def test_renew_extends_only_active_leases(spool: Spool) -> None:
    a, b, c = entry(1), entry(2), entry(3)
    for e in (a, b, c):
        await spool.put(e)
    await spool.claim(2, T0)  # a and b
    assert await spool.renew([a.id, b.id, c.id, "unknown"], T0 + 10) == 2
    assert await spool.renew([], T0 + 10) == 0


async def test_recover_requeues_every_claim_keeping_attempts(spool: Spool) -> None:
    entries = [entry(i) for i in range(3)]
    for e in entries:
        await spool.put(e)
    await spool.claim(2, T0)
    assert await spool.recover(T0 + 1) == 2
    assert await spool.counts() == {"queued": 3, "active": 0, "dead": 0}
    assert sorted(c.attempts for c in await spool.claim(10, T0 + 1)) == [1, 2, 2]
    assert await spool.recover(T0 + 2) == 3


# --- operator actions ---------------------------------------------------------------------


async def test_retry_makes_due_now_and_revives_the_dead(spool: Spool) -> None:
    waiting, active = entry(1, due=T0 + 3600), entry(2, due=T0 - 1)
    dead = entry(3, state="dead", attempts=7, last_reply="550 5.1.1 no such user")
    for e in (waiting, active, dead):
        await spool.put(e)
    (claimed,) = await spool.claim(1, T0)
    assert claimed.id == active.id
    assert await spool.retry(dead.id, now=T0 + 5)
    revived = await spool.get(dead.id)
    assert revived is not None
    assert (revived.state, revived.attempts, revived.next_attempt_at) == ("queued", 7, T0 + 5)
    assert revived.created_at == T0 + 5  # a new max_age period
    assert await spool.retry(waiting.id, now=T0 + 5)
    kept = await spool.get(waiting.id)
    assert kept is not None
    assert kept.created_at == waiting.created_at  # only the dead start over
    assert {c.id for c in await spool.claim(10, T0 + 5)} == {dead.id, waiting.id}
    assert not await spool.retry(active.id)  # being tried right now
    assert not await spool.retry("unknown")


async def test_retry_all_counts_what_changed(spool: Spool) -> None:
    due, waiting, dead = entry(1), entry(2, due=T0 + 3600), entry(3)
    for e in (due, waiting, dead):
        await spool.put(e)
    await spool.mark_dead(dead.id, "550 5.1.1 no such user", None)
    assert await spool.retry_all(now=T0) == 2
    assert await spool.counts() == {"queued": 3, "active": 0, "dead": 0}
    assert len(await spool.claim(10, T0)) == 3
    assert await spool.retry_all(now=T0) == 0  # active entries are left alone


async def test_delete_and_purge_dead(spool: Spool) -> None:
    keep, gone, dead1, dead2 = entry(1), entry(2), entry(3), entry(4)
    for e in (keep, gone, dead1, dead2):
        await spool.put(e)
    for d in (dead1, dead2):
        await spool.mark_dead(d.id, "554 5.6.0 x", None)
    assert await spool.delete(gone.id)
    assert not await spool.delete(gone.id)
    assert await spool.purge_dead() == 2
    assert await spool.purge_dead() == 0
    assert [s.id for s in await spool.list()] == [keep.id]


# --- inspection -----------------------------------------------------------------------------


async def test_list_has_no_bodies_filters_limits_and_orders_by_age(spool: Spool) -> None:
    entries = [entry(i) for i in (3, 1, 2)]
    for e in entries:
        await spool.put(e)
    await spool.mark_dead(entries[0].id, "554 5.6.0 x", None)
    listed = await spool.list()
    assert [s.id for s in listed] == [entries[1].id, entries[2].id, entries[0].id]
    assert all(type(s) is SpoolSummary for s in listed)  # no body loaded
    first = listed[0]
    assert (first.size, first.mail_from, first.rcpt_tos, first.providers) == (
        len(entries[1].raw),
        entries[1].mail_from,
        entries[1].rcpt_tos,
        ("ses", "backup"),
    )
    assert [s.id for s in await spool.list(state="dead")] == [entries[0].id]
    assert [s.id for s in await spool.list(state="queued", limit=1)] == [entries[1].id]
    assert await spool.list(state="active") == []
    with pytest.raises(ValueError, match="state"):
        await spool.list(state="deferred")


async def test_counts_and_ages_of_an_empty_spool(spool: Spool) -> None:
    assert await spool.counts() == {"queued": 0, "active": 0, "dead": 0}
    assert await spool.oldest_created_at() is None
    assert await spool.next_due_at() is None


async def test_oldest_created_at_ignores_the_dead(spool: Spool) -> None:
    old, new = entry(1), entry(5, due=T0 + 30)
    for e in (old, new):
        await spool.put(e)
    assert await spool.oldest_created_at() == old.created_at
    await spool.mark_dead(old.id, "554 5.6.0 x", None)
    assert await spool.oldest_created_at() == new.created_at
    assert await spool.next_due_at() == T0 + 30


# --- lifecycle ------------------------------------------------------------------------------


async def test_check_writable_and_close(spool: Spool) -> None:
    assert await spool.check_writable()
    await spool.aclose()
    await spool.aclose()  # idempotent
    assert not await spool.check_writable()
    with pytest.raises(SpoolError):
        await spool.put(entry())
    with pytest.raises(SpoolError):
        await spool.counts()


async def test_close_finishes_queued_writes(reopen: Opener, spool: Spool) -> None:
    await spool.check_writable()  # opened
    entries = [entry(i) for i in range(20)]
    puts = [asyncio.create_task(spool.put(e)) for e in entries]
    await asyncio.sleep(0)  # every put is queued
    await spool.aclose()
    await asyncio.gather(*puts)
    assert (await (await reopen()).counts())["queued"] == 20


def test_entry_repr_never_shows_the_body() -> None:
    e = entry(raw=b"Subject: secret\r\n\r\npassword=hunter2\r\n")
    assert "hunter2" not in repr(e)
    assert e.size == len(e.raw)
    assert e.envelope.rcpt_tos == e.rcpt_tos


async def test_claim_respects_the_clock_argument_not_the_wall_clock(spool: Spool) -> None:
    await spool.put(entry(due=time.time() + 3600))
    assert await spool.claim(1, time.time()) == []
    assert len(await spool.claim(1, time.time() + 3600)) == 1


# --- model-based: random operation sequences against a dict ---------------------------------

_OPS = ("put", "claim", "defer", "ack", "dead", "retry", "release", "tick")


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(st.tuples(st.sampled_from(_OPS), st.integers(0, 3)), max_size=30))
async def test_random_operations_match_a_simple_model(
    reopen: Opener, steps: list[tuple[str, int]]
) -> None:
    spool = await reopen()
    try:
        await _check_against_model(spool, steps)
    finally:
        await spool.aclose()  # one example at a time: do not pile up writer threads


@dataclass
class _Row:
    state: str
    attempts: int
    due: float


async def _check_against_model(spool: Spool, steps: list[tuple[str, int]]) -> None:
    for msg_id in [s.id for s in await spool.list()]:  # storage is shared between examples
        await spool.delete(msg_id)
    model: dict[str, _Row] = {}
    now = T0
    for op, k in steps:
        key = f"K{k}"
        row = model.get(key)
        if op == "put":
            if row is None:
                await spool.put(entry(k, id=key, due=now))
                model[key] = _Row("queued", 0, now)
            else:
                with pytest.raises(SpoolError):
                    await spool.put(entry(k, id=key, due=now))
        elif op == "claim":
            due = sorted(
                (r.due, i) for i, r in model.items() if r.state == "queued" and r.due <= now
            )
            assert [c.id for c in await spool.claim(2, now)] == [i for _, i in due[:2]]
            for _, i in due[:2]:
                model[i].state, model[i].attempts = "active", model[i].attempts + 1
        elif op == "defer":
            await spool.defer(key, now + 1, "451 4.3.0 x", None)
            if row is not None:
                row.state, row.due = "queued", now + 1
        elif op == "ack":
            await spool.ack(key)
            model.pop(key, None)
        elif op == "dead":
            await spool.mark_dead(key, "554 5.6.0 x", None)
            if row is not None:
                row.state = "dead"
        elif op == "retry":
            expected = row is not None and row.state != "active"
            assert await spool.retry(key, now=now) == expected
            if row is not None and expected:
                row.state, row.due = "queued", now
        elif op == "release":
            await spool.release(key)
            if row is not None and row.state == "active":
                row.state, row.attempts = "queued", max(0, row.attempts - 1)
        else:
            now += 1
        assert await spool.counts() == {
            state: sum(r.state == state for r in model.values()) for state in STATES
        }
    for key, row in model.items():
        stored = await spool.get(key)
        assert stored is not None
        assert _Row(stored.state, stored.attempts, stored.next_attempt_at) == row
