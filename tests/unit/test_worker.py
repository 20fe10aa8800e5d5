"""The worker over a real SQLite spool, with an in-memory provider whose answers a test scripts."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from smtp2api.delivery import Deliverer
from smtp2api.errors import ProviderRejected, RateLimited
from smtp2api.failures import FailureNotifier, NoticeConfig
from smtp2api.models import Envelope, Message, SendResult
from smtp2api.replies import SMTPReply
from smtp2api.spool import SpoolEntry, SqliteSpool
from smtp2api.worker import Worker, WorkerConfig, backoff_delay

RAW = b"From: app@example.com\r\nTo: a@example.net\r\nSubject: s\r\n\r\nbody\r\n"
Script = Callable[[Message, Envelope], Awaitable[SendResult]]


class Scripted:
    """A provider that answers as ``script`` says and remembers every call."""

    raw_mime = False
    max_message_size = 10_000_000

    def __init__(self, script: Script | None = None, *, max_recipients: int = 1000) -> None:
        self.name = "p"
        self.max_recipients = max_recipients
        self.calls: list[tuple[Message, Envelope]] = []
        self._script = script

    async def send(self, message: Message, envelope: Envelope) -> SendResult:
        self.calls.append((message, envelope))
        if self._script is not None:
            return await self._script(message, envelope)
        return SendResult(provider=self.name, provider_id=f"id-{len(self.calls)}")

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    opened = await SqliteSpool.open(tmp_path / "spool.db", lease=30.0)
    yield opened
    await opened.aclose()


def config(**overrides: Any) -> WorkerConfig:
    base: dict[str, Any] = {
        "concurrency": 4,
        "max_age": 3600.0,
        "backoff_min": 0.05,
        "backoff_max": 0.1,
        "lease": 30.0,
        "poll_interval": 0.05,
    }
    return WorkerConfig(**{**base, **overrides})


def queued(*rcpts: str, providers: tuple[str, ...] = ("p",), **kw: Any) -> SpoolEntry:
    envelope = Envelope("app@example.com", rcpts or ("a@example.net",), account="wp")
    return SpoolEntry.new(RAW, envelope, providers, **kw)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def run(worker: Worker, check: Callable[[], Awaitable[bool]]) -> None:
    worker.start()
    try:
        await until(check)
    finally:
        await worker.stop()


def test_backoff_grows_with_jitter_within_bounds_and_honours_retry_after() -> None:
    conf = config(backoff_min=30.0, backoff_max=3600.0)
    rng = random.Random(7)
    for attempts, (low, high) in {
        1: (30, 30),
        2: (30, 60),
        4: (120, 240),
        20: (1800, 3600),
    }.items():
        delays = [backoff_delay(attempts, conf, None, rng) for _ in range(200)]
        assert low <= min(delays) <= max(delays) <= high
    assert backoff_delay(1, conf, 7200.0, rng) == 7200.0  # never sooner than Retry-After
    assert backoff_delay(20, conf, 5.0, rng) >= 1800


async def test_a_partly_delivered_message_bounces_only_its_failed_recipients(
    spool: SqliteSpool,
) -> None:
    async def refuse_b(message: Message, envelope: Envelope) -> SendResult:
        if envelope.rcpt_tos == ("b@example.net",):
            raise ProviderRejected("no such user", reply=SMTPReply(550, "5.1.1", "No such user"))
        return SendResult("p", "ok")

    provider = Scripted(refuse_b, max_recipients=1)  # one call per recipient
    notifier = FailureNotifier(
        NoticeConfig(hostname="gw.test", bounce=True, webhook=None), spool=spool, client=None
    )
    entry = queued("a@example.net", "b@example.net", "c@example.net")
    await spool.put(entry)
    worker = Worker(
        spool=spool, deliverer=Deliverer({"p": provider}), config=config(), on_dead=notifier
    )

    async def bounced() -> bool:  # the original dead, the DSN delivered
        return await spool.counts() == {"queued": 0, "active": 0, "dead": 1} and any(
            env.mail_from == "" for _, env in provider.calls
        )

    await run(worker, bounced)
    stored = await spool.get(entry.id)
    assert stored is not None
    assert (stored.state, stored.done_recipients) == ("dead", ("a@example.net",))
    assert stored.last_reply == "550 5.1.1 No such user"
    [(dsn, envelope)] = [(m, e) for m, e in provider.calls if e.mail_from == ""]
    assert envelope.rcpt_tos == ("app@example.com",)
    [report] = [a for a in dsn.attachments if a.content_type == "message/delivery-status"]
    finals = [line for line in report.content.decode().splitlines() if "Final-Recipient" in line]
    assert finals == [
        "Final-Recipient: rfc822; b@example.net",
        "Final-Recipient: rfc822; c@example.net",  # never reached: it failed with the message
    ]


async def test_soft_bounce_keeps_a_permanent_failure_queued(spool: SqliteSpool) -> None:
    async def refuse(message: Message, envelope: Envelope) -> SendResult:
        raise ProviderRejected("spam", reply=SMTPReply(550, "5.7.1", "Refused"))

    entry = queued()
    await spool.put(entry)
    worker = Worker(
        spool=spool,
        deliverer=Deliverer({"p": Scripted(refuse)}),
        config=config(soft_bounce=True, backoff_min=60.0, backoff_max=60.0),
    )

    async def deferred() -> bool:
        stored = await spool.get(entry.id)
        return stored is not None and stored.last_reply is not None

    await run(worker, deferred)
    stored = await spool.get(entry.id)
    assert stored is not None
    assert (stored.state, stored.last_reply) == ("queued", "450 4.7.1 Refused")


async def test_a_provider_bug_defers_the_entry_instead_of_stranding_it(
    spool: SqliteSpool,
) -> None:
    async def crash(message: Message, envelope: Envelope) -> SendResult:
        raise RuntimeError("a provider bug")

    entry = queued()
    await spool.put(entry)
    worker = Worker(spool=spool, deliverer=Deliverer({"p": Scripted(crash)}), config=config())

    async def deferred() -> bool:
        stored = await spool.get(entry.id)
        return stored is not None and stored.state == "queued" and stored.attempts == 1

    await run(worker, deferred)
    stored = await spool.get(entry.id)
    assert stored is not None
    assert stored.last_reply == "451 4.3.0 Internal error, try again later"


async def test_an_entry_whose_providers_were_removed_takes_the_current_route(
    spool: SqliteSpool,
) -> None:
    provider = Scripted()
    entry = queued(providers=("removed-by-reload",))
    await spool.put(entry)
    worker = Worker(
        spool=spool,
        deliverer=Deliverer({"p": provider}),
        config=config(),
        route_for=lambda e: ("p",) if e.account == "wp" else None,
    )
    await run(worker, lambda: _empty(spool))
    assert len(provider.calls) == 1


async def _empty(spool: SqliteSpool) -> bool:
    return sum((await spool.counts()).values()) == 0


async def test_stop_leaves_an_interrupted_try_spooled_and_counted(spool: SqliteSpool) -> None:
    started = asyncio.Event()

    async def hang(message: Message, envelope: Envelope) -> SendResult:
        started.set()
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    entry = queued()
    await spool.put(entry)
    worker = Worker(spool=spool, deliverer=Deliverer({"p": Scripted(hang)}), config=config())
    worker.start()
    await asyncio.wait_for(started.wait(), 5)
    await worker.stop()
    stored = await spool.get(entry.id)
    assert stored is not None
    assert (stored.state, stored.attempts) == ("queued", 1)
    assert stored.next_attempt_at <= time.time()  # due again at the next start


async def test_a_rate_limit_closes_the_route_for_every_queued_message(
    spool: SqliteSpool,
) -> None:
    async def limited(message: Message, envelope: Envelope) -> SendResult:
        raise RateLimited("429", retry_after=60.0)

    provider = Scripted(limited)
    first = queued()
    await spool.put(first)
    worker = Worker(spool=spool, deliverer=Deliverer({"p": provider}), config=config(concurrency=1))
    worker.start()
    try:
        await until(lambda: _was_tried(spool, first.id))
        second = queued()
        await spool.put(second)  # due now, but the route said wait
        worker.wake()

        async def held_back() -> bool:
            stored = await spool.get(second.id)
            return stored is not None and stored.next_attempt_at > time.time() + 30

        await until(held_back)
    finally:
        await worker.stop()
    tried, held = await spool.get(first.id), await spool.get(second.id)
    assert tried is not None
    assert held is not None
    assert tried.next_attempt_at >= held.created_at + 59  # never sooner than Retry-After
    assert held.next_attempt_at >= tried.next_attempt_at - 1
    assert (held.state, held.attempts) == ("queued", 0)  # handed back untried
    assert len(provider.calls) == 1


async def _was_tried(spool: SqliteSpool, msg_id: str) -> bool:
    stored = await spool.get(msg_id)
    return stored is not None and stored.last_reply is not None


async def test_a_lapsed_claim_is_taken_over(tmp_path: Path) -> None:
    spool = await SqliteSpool.open(tmp_path / "short.db", lease=0.3)
    try:
        entry = queued()
        await spool.put(entry)
        # A claimer that never records an outcome nor renews its lease (it hung, or its
        # writes failed): once the lease runs out, the entry is claimed again.
        [claimed] = await spool.claim(1, time.time())
        assert claimed.attempts == 1
        provider = Scripted()
        worker = Worker(spool=spool, deliverer=Deliverer({"p": provider}), config=config())
        await run(worker, lambda: _empty(spool))
        assert provider.calls[0][0].id == entry.id
    finally:
        await spool.aclose()
