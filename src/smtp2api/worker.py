"""The background delivery loop: claim due spool entries, send, then ack, defer or bury.

Bounded concurrency (``[delivery] concurrency``); the attempt counter is persisted by the
spool's ``claim`` before each try; backoff is exponential with jitter, never sooner than the
provider's ``Retry-After``, and stored as the entry's ``next_attempt_at`` (design §3). A
``Retry-After`` also closes a gate on the entry's route, so a 429 storm costs one call per
window instead of one per queued message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import structlog

from smtp2api import logs, replies
from smtp2api.delivery import Deliverer
from smtp2api.errors import (
    DeliveryError,
    MessageError,
    PermanentDeliveryError,
    ProviderConfigError,
    RateLimited,
    SpoolError,
    TransientDeliveryError,
)
from smtp2api.intake import parse
from smtp2api.mime import MimeLimits
from smtp2api.replies import SMTPReply
from smtp2api.spool.base import Spool, SpoolEntry, WorkNotifier

log = structlog.get_logger("smtp2api.worker")

DeadHook = Callable[[SpoolEntry, SMTPReply], Awaitable[None]]
RouteFn = Callable[[SpoolEntry], "tuple[str, ...] | None"]  # the current route for an entry
Observer = Callable[[str], None]  # "success" | "deferred" | "dead"
_ERROR_PAUSE = 1.0


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    concurrency: int
    max_age: float
    backoff_min: float
    backoff_max: float
    lease: float
    soft_bounce: bool = False
    # Intake wakes the worker at once; this bounds how late a change made by another process
    # (``smtp2api queue retry``) is noticed. One indexed read per interval when idle.
    poll_interval: float = 1.0
    mime_limits: MimeLimits = field(default_factory=MimeLimits)


def backoff_delay(
    attempts: int, config: WorkerConfig, retry_after: float | None, rng: random.Random
) -> float:
    """Exponential backoff with jitter in [backoff_min, backoff_max], at least ``retry_after``."""
    ceiling = min(config.backoff_max, config.backoff_min * 2 ** max(0, attempts - 1))
    delay = rng.uniform(max(config.backoff_min, ceiling / 2), max(config.backoff_min, ceiling))
    return max(delay, retry_after or 0.0)


class Worker:
    def __init__(
        self,
        *,
        spool: Spool,
        deliverer: Deliverer,
        config: WorkerConfig,
        on_dead: DeadHook | None = None,
        route_for: RouteFn | None = None,
        observe: Observer = lambda outcome: None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._spool = spool
        self._deliverer = deliverer
        self.config = config
        self._on_dead = on_dead
        self._route_for = route_for
        self._observe = observe
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._slots_free = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] = lambda: None
        # route -> epoch before which no call is made (the last Retry-After it got)
        self._gates: dict[tuple[str, ...], float] = {}

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="smtp2api-worker")
        if isinstance(self._spool, WorkNotifier):  # other nodes' work wakes us at once
            self._unsubscribe = self._spool.subscribe(self.wake)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop claiming; give in-flight sends ``grace`` seconds; the rest stay spooled.

        An interrupted try counts as an attempt (it may have reached the provider, and the
        retry reuses the message's id); the entry is due again at once.
        """
        self._stopping = True
        self._unsubscribe()
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._inflight and grace > 0:
            await asyncio.wait(list(self._inflight.values()), timeout=grace)
        for entry_id, task in list(self._inflight.items()):
            if not task.cancel():
                continue  # it finished and recorded its outcome meanwhile
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(SpoolError):
                await self._spool.release(entry_id, attempted=True)

    # the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        last_renew = self._clock()
        while not self._stopping:
            # Cleared before looking at the spool, so a wake-up during the look is not lost.
            self._wake.clear()
            self._slots_free.clear()
            last_renew = await self._renew(last_renew)
            free = self.config.concurrency - len(self._inflight)
            if free <= 0:
                await self._wait_slot()
                continue
            due = await self._next_due()
            now = self._clock()
            claimed: list[SpoolEntry] = []
            if due is not None and due <= now:
                try:
                    claimed = await self._spool.claim(free, now)
                except SpoolError as exc:
                    log.error("spool_claim_failed", error=str(exc))
                    await asyncio.sleep(_ERROR_PAUSE)
                    continue
            for entry in claimed:
                if entry.id in self._inflight:
                    continue  # our own try, whose lease lapsed while it ran: let it finish
                task = asyncio.create_task(self._process(entry), name=f"deliver-{entry.id}")
                self._inflight[entry.id] = task
                task.add_done_callback(functools.partial(self._finished, entry.id))
            if claimed:
                continue  # more may be due: look again (waiting for a slot when none is free)
            await self._wait_work(due)

    async def _renew(self, last: float) -> float:
        """Renew the leases of the entries in flight every lease/3; returns when it last did."""
        now = self._clock()
        if not self._inflight or now - last <= self.config.lease / 3:
            return last
        with contextlib.suppress(SpoolError):  # a lapsed lease costs a duplicate, never a loss
            await self._spool.renew(list(self._inflight), now)
        return now

    async def _next_due(self) -> float | None:
        try:
            return await self._spool.next_due_at()
        except SpoolError as exc:
            log.error("spool_read_failed", error=str(exc))
            return None

    def _finished(self, entry_id: str, _task: asyncio.Task[None]) -> None:
        self._inflight.pop(entry_id, None)
        self._slots_free.set()

    async def _wait_slot(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.lease / 3):  # leases still get renewed
                await self._slots_free.wait()

    async def _wait_work(self, due: float | None) -> None:
        """Sleep until woken, until the next entry is due, or until a slot frees up."""
        poll = self.config.poll_interval
        timeout = poll if due is None else max(0.0, min(poll, due - self._clock()))
        if self._inflight:
            timeout = min(timeout, self.config.lease / 3)
        if self._stopping:
            return
        waiters = [asyncio.ensure_future(self._wake.wait())]
        if self._inflight:
            waiters.append(asyncio.ensure_future(self._slots_free.wait()))
        _, pending = await asyncio.wait(waiters, timeout=timeout, return_when="FIRST_COMPLETED")
        for waiter in pending:
            waiter.cancel()

    # one entry --------------------------------------------------------------------------------

    async def _process(self, entry: SpoolEntry) -> None:
        with logs.bound(msg_id=entry.id, attempt=entry.attempts):
            try:
                await self._attempt(entry)
            except SpoolError as exc:
                # The outcome could not be recorded; the claim's lease lapses (nobody renews
                # it any more) and the entry is claimed again.
                log.error("spool_update_failed", error=str(exc))
            except Exception:
                # A bug (say, a provider raising something unmapped) must not strand the entry.
                log.exception("delivery_crashed")
                with contextlib.suppress(SpoolError):
                    await self._defer(entry, replies.R451_INTERNAL, None, "internal error")

    def _route(self, entry: SpoolEntry) -> tuple[str, ...]:
        """The entry's stored route, minus providers a reload removed; else the current one."""
        known = tuple(p for p in entry.providers if p in self._deliverer.providers)
        if known or self._route_for is None:
            return known
        return tuple(p for p in self._route_for(entry) or () if p in self._deliverer.providers)

    async def _attempt(self, entry: SpoolEntry) -> None:
        route = self._route(entry)
        gate = self._gates.get(route, 0.0)
        if gate > self._clock():
            # The route asked us to wait (Retry-After): hand the claim back untried.
            spread = self._rng.uniform(0.0, self.config.backoff_min)
            await self._spool.release(entry.id, next_attempt_at=gate + spread)
            return
        done = list(entry.done_recipients)

        async def chunk_done(chunk: tuple[str, ...]) -> None:
            await self._spool.add_done_recipients(entry.id, chunk)
            done.extend(r for r in chunk if r not in done)

        try:
            if not route:
                raise ProviderConfigError(
                    "no configured provider for this message's route",
                    reply=replies.R451_PROVIDER_CONFIG,
                )
            message = await parse(
                entry.raw,
                entry.envelope,
                entry.id,
                self.config.mime_limits,
                headers_only=self._deliverer.raw_mime_only(route),
            )
            result = await self._deliverer.deliver(
                message,
                entry.envelope,
                route,
                done=frozenset(entry.done_recipients),
                on_chunk_done=chunk_done,
            )
        except (PermanentDeliveryError, MessageError) as exc:
            entry = replace(entry, done_recipients=tuple(done))
            if self.config.soft_bounce:  # Postfix's soft_bounce: keep it, retry until max_age
                await self._retry_or_bury(entry, exc.reply.softened(), None, _detail(exc))
            else:
                await self._bury(entry, exc.reply, _detail(exc))
            return
        except TransientDeliveryError as exc:
            if isinstance(exc, RateLimited) and exc.retry_after:
                until = self._clock() + exc.retry_after
                self._gates[route] = max(self._gates.get(route, 0.0), until)
            entry = replace(entry, done_recipients=tuple(done))
            await self._retry_or_bury(entry, exc.reply, exc.retry_after, exc.detail)
            return
        await self._spool.ack(entry.id)
        self._observe("success")
        log.info(
            "delivery_succeeded",
            provider=result.provider,
            provider_id=result.provider_id,
            sender=entry.mail_from,
            recipients=len(entry.rcpt_tos),
            size=len(entry.raw),
        )

    async def _retry_or_bury(
        self, entry: SpoolEntry, reply: SMTPReply, retry_after: float | None, detail: str
    ) -> None:
        if self._clock() - entry.created_at >= self.config.max_age:
            # RFC 3463 5.4.7: delivery time expired.
            expired = SMTPReply(554, "5.4.7", "Delivery time expired: " + reply.text)
            await self._bury(entry, expired, detail)
            return
        await self._defer(entry, reply, retry_after, detail)

    async def _defer(
        self, entry: SpoolEntry, reply: SMTPReply, retry_after: float | None, detail: str
    ) -> None:
        delay = backoff_delay(entry.attempts, self.config, retry_after, self._rng)
        await self._spool.defer(entry.id, self._clock() + delay, str(reply), detail)
        self._observe("deferred")
        log.info("delivery_deferred", reply=str(reply), retry_in=round(delay, 1))

    async def _bury(self, entry: SpoolEntry, reply: SMTPReply, detail: str) -> None:
        await self._spool.mark_dead(entry.id, str(reply), detail)
        self._observe("dead")
        log.warning(
            "message_dead",
            reply=str(reply),
            sender=entry.mail_from,
            recipients=len(entry.rcpt_tos),
            delivered=len(entry.done_recipients),
            attempts=entry.attempts,
        )
        if self._on_dead is not None:
            dead = replace(entry, state="dead", last_reply=str(reply), last_error=detail)
            try:
                await self._on_dead(dead, reply)
            except Exception:  # a notification failure must not lose the entry's state
                log.exception("failure_notice_failed")


def _detail(exc: DeliveryError | MessageError) -> str:
    return exc.detail if isinstance(exc, DeliveryError) else str(exc)
