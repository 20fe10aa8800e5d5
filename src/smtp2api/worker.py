"""The background delivery loop: claim due spool entries, send, then ack, defer or bury.

Bounded concurrency (``[delivery] concurrency``); the attempt counter is persisted by the
spool's ``claim`` before each try; backoff is exponential with jitter, never sooner than the
provider's ``Retry-After``, and stored as the entry's ``next_attempt_at`` (design §3).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from smtp2api import replies
from smtp2api.delivery import Deliverer
from smtp2api.errors import (
    DeliveryError,
    MessageError,
    PermanentDeliveryError,
    SpoolError,
    TransientDeliveryError,
)
from smtp2api.intake import parse
from smtp2api.mime import MimeLimits
from smtp2api.models import Envelope
from smtp2api.replies import SMTPReply
from smtp2api.spool.base import Spool, SpoolEntry

log = structlog.get_logger("smtp2api.worker")

DeadHook = Callable[[SpoolEntry, SMTPReply], Awaitable[None]]
Observer = Callable[[str], None]  # "success" | "deferred" | "dead"
_IDLE_POLL = 60.0  # also woken at once by intake; this only bounds a missed wake-up
_ERROR_PAUSE = 1.0


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    concurrency: int
    max_age: float
    backoff_min: float
    backoff_max: float
    lease: float
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
        observe: Observer = lambda outcome: None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._spool = spool
        self._deliverer = deliverer
        self.config = config
        self._on_dead = on_dead
        self._observe = observe
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._slots_free = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="smtp2api-worker")

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop claiming; give in-flight sends ``grace`` seconds; the rest go back to the queue."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._inflight and grace > 0:
            await asyncio.wait(list(self._inflight.values()), timeout=grace)
        for entry_id, task in list(self._inflight.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(SpoolError):
                await self._spool.release(entry_id)

    async def _run(self) -> None:
        last_renew = self._clock()
        while not self._stopping:
            # Cleared before looking at the spool, so a wake-up during the look is not lost.
            self._wake.clear()
            self._slots_free.clear()
            free = self.config.concurrency - len(self._inflight)
            claimed: list[SpoolEntry] = []
            if free > 0:
                try:
                    claimed = await self._spool.claim(free, self._clock())
                except SpoolError as exc:
                    log.error("spool_claim_failed", error=str(exc))
                    await asyncio.sleep(_ERROR_PAUSE)
                    continue
            for entry in claimed:
                task = asyncio.create_task(self._process(entry), name=f"deliver-{entry.id}")
                self._inflight[entry.id] = task
                task.add_done_callback(functools.partial(self._finished, entry.id))
            if self._clock() - last_renew > self.config.lease / 3 and self._inflight:
                last_renew = self._clock()
                with contextlib.suppress(SpoolError):
                    await self._spool.renew(list(self._inflight), last_renew)
            if claimed and len(claimed) == free:
                await self._wait_slot()
                continue
            await self._wait_work()

    def _finished(self, entry_id: str, _task: asyncio.Task[None]) -> None:
        self._inflight.pop(entry_id, None)
        self._slots_free.set()

    async def _wait_slot(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.lease / 3):
                await self._slots_free.wait()

    async def _wait_work(self) -> None:
        """Sleep until woken, until the next entry is due, or until a slot frees up."""
        try:
            due = await self._spool.next_due_at()
        except SpoolError:
            due = None
        timeout = _IDLE_POLL if due is None else max(0.0, min(_IDLE_POLL, due - self._clock()))
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

    async def _process(self, entry: SpoolEntry) -> None:
        with structlog.contextvars.bound_contextvars(msg_id=entry.id, attempt=entry.attempts):
            try:
                await self._attempt(entry)
            except SpoolError as exc:
                # The outcome could not be recorded; the lease brings the entry back.
                log.error("spool_update_failed", error=str(exc))

    async def _attempt(self, entry: SpoolEntry) -> None:
        envelope = Envelope(
            mail_from=entry.mail_from,
            rcpt_tos=tuple(entry.rcpt_tos),
            account=entry.account,
            peer=entry.peer,
        )
        try:
            message = await parse(entry.raw, envelope, entry.id, self.config.mime_limits)
            result = await self._deliverer.deliver(
                message,
                envelope,
                entry.providers,
                done=frozenset(entry.done_recipients),
                on_chunk_done=lambda chunk: self._spool.add_done_recipients(entry.id, chunk),
            )
        except (PermanentDeliveryError, MessageError) as exc:
            await self._bury(entry, exc.reply, _detail(exc))
            return
        except TransientDeliveryError as exc:
            await self._retry_or_bury(entry, exc)
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

    async def _retry_or_bury(self, entry: SpoolEntry, exc: TransientDeliveryError) -> None:
        now = self._clock()
        if now - entry.created_at >= self.config.max_age:
            reply = replies.SMTPReply(554, "5.4.7", "Delivery time expired: " + exc.reply.text)
            await self._bury(entry, reply, exc.detail)
            return
        delay = backoff_delay(entry.attempts, self.config, exc.retry_after, self._rng)
        await self._spool.defer(entry.id, now + delay, str(exc.reply), exc.detail)
        self._observe("deferred")
        log.info("delivery_deferred", reply=str(exc.reply), retry_in=round(delay, 1))

    async def _bury(self, entry: SpoolEntry, reply: SMTPReply, detail: str) -> None:
        await self._spool.mark_dead(entry.id, str(reply), detail)
        self._observe("dead")
        log.warning(
            "message_dead",
            reply=str(reply),
            sender=entry.mail_from,
            recipients=len(entry.rcpt_tos),
            attempts=entry.attempts,
        )
        if self._on_dead is not None:
            try:
                await self._on_dead(entry, reply)
            except Exception:  # a notification failure must not lose the entry's state
                log.exception("failure_notice_failed")


def _detail(exc: DeliveryError | MessageError) -> str:
    return exc.detail if isinstance(exc, DeliveryError) else str(exc)
