"""What happens between the end of DATA and the reply: parse, route, spool, maybe send.

Design §2: ``sync`` answers with the provider's verdict and keeps nothing; ``queue`` answers
once the message is durable; ``hybrid`` makes it durable, then gives the provider
``sync_timeout`` to answer, so the client hears the real outcome when it comes in time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_before_delay,
)

from smtp2api import replies
from smtp2api.delivery import Deliverer
from smtp2api.errors import (
    DeliveryError,
    MessageError,
    PermanentDeliveryError,
    ProviderConfigError,
    SpoolError,
    TransientDeliveryError,
)
from smtp2api.mime import MimeLimits, parse_message
from smtp2api.models import Envelope, Message, SendResult
from smtp2api.replies import SMTPReply
from smtp2api.routing import Router
from smtp2api.spool.base import Spool, SpoolEntry, Withdrawn

log = structlog.get_logger("smtp2api.intake")

Mode = Literal["queue", "hybrid", "sync"]
# Parsing a large message takes long enough to stall other sessions: do it in a thread.
_THREAD_PARSE_BYTES = 256 * 1024
# Hybrid races the spool's put against the API call for messages up to this size; a larger
# one is spooled first, so its spool copy and its request body are not in memory together.
_RACE_BYTES = 256 * 1024
# Hybrid: seconds after the sync try's deadline before the worker may claim the entry, so the
# session can record the outcome (ack, defer, delete) first.
_RECORD_MARGIN = 1.0


@dataclass(frozen=True, slots=True)
class IntakeConfig:
    mode: Mode
    sync_timeout: float
    soft_bounce: bool
    backoff_min: float
    mime_limits: MimeLimits = field(default_factory=MimeLimits)


async def parse(
    raw: bytes, envelope: Envelope, msg_id: str, limits: MimeLimits, *, headers_only: bool = False
) -> Message:
    """``parse_message``, in a thread when the message is large."""
    if len(raw) > _THREAD_PARSE_BYTES:
        return await asyncio.to_thread(
            parse_message, raw, envelope, msg_id, limits=limits, headers_only=headers_only
        )
    return parse_message(raw, envelope, msg_id, limits=limits, headers_only=headers_only)


def delivery_reply(exc: DeliveryError | MessageError, soft_bounce: bool) -> SMTPReply:
    """The reply for a failed delivery; ``soft_bounce`` turns 5xx into 4xx (design §4)."""
    return exc.reply.softened() if soft_bounce else exc.reply


class Intake:
    """Turns one received message into one truthful reply."""

    def __init__(
        self,
        *,
        config: IntakeConfig,
        router: Router,
        deliverer: Deliverer,
        spool: Spool | None,
        wake_worker: Callable[[], None] = lambda: None,
        on_result: Callable[[str, int], None] = lambda result, size: None,
        clock: Callable[[], float] = time.time,
        pending: set[asyncio.Future[object]] | None = None,
    ) -> None:
        self.config = config
        self._router = router
        self._deliverer = deliverer
        self._spool = spool
        self._wake = wake_worker
        self._on_result = on_result
        self._clock = clock
        # Spool writes that outlive their reply (shared across reloads; see ``settle``).
        self._pending: set[asyncio.Future[object]] = set() if pending is None else pending

    async def accept(self, msg_id: str, raw: bytes, envelope: Envelope) -> SMTPReply:
        route = self._router.select(envelope.account, envelope.mail_from)
        if route is None:  # checked at MAIL already; a reload may have changed the routes
            return self._done("rejected", raw, replies.R553_SENDER_NOT_ALLOWED)
        try:
            message = await parse(
                raw,
                envelope,
                msg_id,
                self.config.mime_limits,
                headers_only=self._deliverer.raw_mime_only(route.providers),
            )
        except MessageError as exc:
            log.info("message_rejected", reason=str(exc), size=len(raw))
            return self._done("rejected", raw, exc.reply)
        log.info(
            "message_received",
            sender=envelope.mail_from,
            recipients=len(envelope.rcpt_tos),
            size=len(raw),
            attachments=len(message.attachments),
        )
        log.debug("message_subject", subject=message.subject)
        if self.config.mode == "sync":
            return await self._sync(message, envelope, route.providers)
        return await self._spooled(message, envelope, route.providers, raw)

    async def _sync(
        self, message: Message, envelope: Envelope, route: tuple[str, ...]
    ) -> SMTPReply:
        try:
            result = await self._send_within(message, envelope, route, self.config.sync_timeout)
        except DeliveryError as exc:
            reply = delivery_reply(exc, self.config.soft_bounce)
            log.info("delivery_failed", reply=str(reply), detail=exc.detail)
            return self._done("rejected" if reply.is_permanent else "error", message.raw, reply)
        _log_delivered(result, envelope, message)
        return self._done("accepted", message.raw, _accepted_reply(result, message.id))

    async def _spooled(
        self, message: Message, envelope: Envelope, route: tuple[str, ...], raw: bytes
    ) -> SMTPReply:
        assert self._spool is not None, "queue and hybrid modes need a spool"
        now = self._clock()
        hybrid = self.config.mode == "hybrid"
        # In hybrid mode the entry counts this first try and stays out of the worker's reach
        # until the try has had its time (plus a second to record the outcome); a crash
        # meanwhile leaves it due soon after, so nothing waits for a session that is gone.
        deadline = now + self.config.sync_timeout
        entry = SpoolEntry.new(
            raw,  # as received: the worker parses it again, to the same Message
            envelope,
            route,
            now=now,
            next_attempt_at=deadline + _RECORD_MARGIN if hybrid else now,
            attempts=1 if hybrid else 0,
            id=message.id,
        )
        put: asyncio.Future[SpoolError | None]
        if hybrid and len(raw) <= _RACE_BYTES:
            put = asyncio.ensure_future(self._put(entry))  # beside the API call: the race
        else:
            failed = await self._put(entry)
            if failed is not None:
                return self._done("error", message.raw, failed.reply)
            if not hybrid:
                self._wake()
                return self._done("queued", message.raw, replies.ok_queued(message.id))
            put = asyncio.get_running_loop().create_future()
            put.set_result(None)  # durable already: the try below finds nothing to withdraw
        return await self._hybrid_try(message, envelope, route, put, deadline)

    async def _put(self, entry: SpoolEntry) -> SpoolError | None:
        """Spool ``entry``; the error instead of raising it (this also runs as a task)."""
        assert self._spool is not None
        try:
            await self._spool.put(entry)
        except SpoolError as exc:
            log.error("spool_failed", error=str(exc))
            return exc
        except Withdrawn:  # the provider took it first: nothing was stored, nothing failed
            return None
        log.info("message_spooled")
        return None

    async def _hybrid_try(
        self,
        message: Message,
        envelope: Envelope,
        route: tuple[str, ...],
        put: asyncio.Future[SpoolError | None],
        deadline: float,
    ) -> SMTPReply:
        """The provider's try, with ``put`` in flight (a small message: docs/architecture.md)
        or done (a large one, spooled first).

        Design §1 allows 250 once the message is durable *or* the provider has it, so the
        fsync of the spool need not come before the API call: the reply waits for whichever
        the outcome needs. Accepted: 250 at once (the entry is removed once its put has
        committed). Refused or not answered: the reply waits for the put, which decides
        between "queued" and "nothing kept" (451/452).
        """
        spool = self._spool
        assert spool is not None
        # The budget ends at the deadline the entry was spooled with, however long put took.
        budget = max(0.0, deadline - self._clock())
        try:
            result = await self._send_within(message, envelope, route, budget)
        except (PermanentDeliveryError, MessageError) as exc:
            reply = delivery_reply(exc, self.config.soft_bounce)
            if not reply.is_permanent:  # soft_bounce: kept for the worker, like a transient
                return await self._queued_if_kept(message, await put, exc)
            # The client owns this failure now: nothing stays queued.
            if spool.withdraw(message.id):
                self._background(put)
            elif await put is None:
                await self._forget(message.id)
            log.info("delivery_failed", reply=str(reply), detail=_detail(exc))
            return self._done("rejected", message.raw, reply)
        except TransientDeliveryError as exc:
            return await self._queued_if_kept(message, await put, exc)
        except BaseException:
            self._background(put)  # cancelled: the entry may commit and is retried later
            raise
        if spool.withdraw(message.id):
            # Still queued for the spool's writer: it is never written (no insert, no fsync,
            # no removal). Otherwise it is removed once its put has committed.
            self._background(put)
        else:
            self._background(self._ack_after(put, message.id))
        _log_delivered(result, envelope, message)
        return self._done("accepted", message.raw, _accepted_reply(result, message.id))

    async def _queued_if_kept(
        self, message: Message, failed: SpoolError | None, exc: GatewayErrorLike
    ) -> SMTPReply:
        if failed is not None:  # neither the provider nor the spool has it: the client keeps it
            return self._done("error", message.raw, failed.reply)
        await self._defer(message.id, exc)
        return self._done("queued", message.raw, replies.ok_queued(message.id))

    async def _ack_after(self, put: asyncio.Future[SpoolError | None], msg_id: str) -> None:
        if await put is None:
            await self._ack(msg_id)

    def _background(self, work: Awaitable[object]) -> None:
        """Run ``work`` past the reply, in ``pending`` (the gateway's shutdown waits for it
        before it closes the spool)."""
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _ack(self, msg_id: str) -> None:
        assert self._spool is not None
        try:
            await self._spool.ack(msg_id)
        except SpoolError as exc:  # delivered: the worst case is a duplicate later
            log.error("spool_ack_failed", error=str(exc))

    async def _forget(self, msg_id: str) -> None:
        assert self._spool is not None
        try:
            await self._spool.delete(msg_id)
        except SpoolError as exc:
            log.error("spool_delete_failed", error=str(exc))

    async def _defer(self, msg_id: str, exc: GatewayErrorLike) -> None:
        assert self._spool is not None
        # Never sooner than the provider's Retry-After (design §3); the worker's backoff
        # takes over from the next attempt on.
        retry_after = getattr(exc, "retry_after", None) or 0.0
        next_at = self._clock() + max(self.config.backoff_min, retry_after)
        try:
            await self._spool.defer(msg_id, next_at, str(exc.reply), _detail(exc))
        except SpoolError as err:
            log.error("spool_defer_failed", error=str(err))
        else:
            self._wake()

    async def _send_within(
        self, message: Message, envelope: Envelope, route: tuple[str, ...], budget: float
    ) -> SendResult:
        """Deliver with short tenacity retries, never past ``budget`` seconds."""
        started = time.monotonic()
        deadline = started + budget

        def worth_retrying(exc: BaseException) -> bool:
            if not isinstance(exc, TransientDeliveryError) or isinstance(exc, ProviderConfigError):
                return False
            wait = exc.retry_after or 0.0
            return time.monotonic() + wait < deadline

        def wait_hint(state: RetryCallState) -> float:
            # Tenacity's attempt 1 is our second try: the first ran before it (below).
            exc = state.outcome.exception() if state.outcome else None
            return _retry_wait(state.attempt_number + 1, exc)

        try:
            async with asyncio.timeout(budget):
                try:
                    # The first try needs none of tenacity's machinery, and most sends end
                    # with it (a tenacity loop per message costs 2-3 % of the CPU).
                    return await self._deliverer.deliver(message, envelope, route)
                except TransientDeliveryError as exc:
                    wait = _retry_wait(1, exc)
                    # tenacity's stop_before_delay, below, for this first wait: no try may
                    # start after 90 % of the budget, so the reply names the real answer.
                    late = time.monotonic() - started + wait >= budget * 0.9
                    if late or not worth_retrying(exc):
                        raise
                    await asyncio.sleep(wait)
                # Leave the last try time to answer: no try starts after 90 % of the budget.
                left = budget * 0.9 - (time.monotonic() - started)
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception(worth_retrying),
                    stop=stop_before_delay(max(0.0, left)),
                    wait=wait_hint,
                    reraise=True,
                ):
                    with attempt:
                        return await self._deliverer.deliver(message, envelope, route)
        except TimeoutError:
            raise TransientDeliveryError(
                "no provider answer within sync_timeout", reply=replies.R451_TIMEOUT
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover - AsyncRetrying reraises

    def _done(self, result: str, raw: bytes, reply: SMTPReply) -> SMTPReply:
        self._on_result(result, len(raw))
        return reply


GatewayErrorLike = DeliveryError | MessageError


def _retry_wait(attempt: int, exc: BaseException | None) -> float:
    """Seconds before try ``attempt + 1``: 0.2 s doubling to 2 s, plus up to 0.2 s of
    jitter, and never less than the provider's Retry-After."""
    hinted = float(getattr(exc, "retry_after", None) or 0.0)
    backoff = min(0.2 * 2.0 ** min(attempt - 1, 16) + random.uniform(0, 0.2), 2.0)  # noqa: S311
    return max(hinted, backoff)


def _detail(exc: GatewayErrorLike) -> str:
    return exc.detail if isinstance(exc, DeliveryError) else str(exc)


def _log_delivered(result: SendResult, envelope: Envelope, message: Message) -> None:
    """The delivery log line (design §7): one per final outcome, no body, no subject."""
    log.info(
        "delivery_succeeded",
        provider=result.provider,
        provider_id=result.provider_id,
        sender=envelope.mail_from,
        recipients=len(envelope.rcpt_tos),
        size=len(message.raw),
    )


def _accepted_reply(result: SendResult, msg_id: str) -> SMTPReply:
    return replies.ok_accepted(result.provider_id or msg_id)
