"""What happens between the end of DATA and the reply: parse, route, spool, maybe send.

Design §2: ``sync`` answers with the provider's verdict and keeps nothing; ``queue`` answers
once the message is durable; ``hybrid`` makes it durable, then gives the provider
``sync_timeout`` to answer, so the client hears the real outcome when it comes in time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_before_delay,
    wait_exponential_jitter,
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
from smtp2api.spool.base import Spool, SpoolEntry

log = structlog.get_logger("smtp2api.intake")

Mode = Literal["queue", "hybrid", "sync"]
# Parsing a large message takes long enough to stall other sessions: do it in a thread.
_THREAD_PARSE_BYTES = 256 * 1024
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
    ) -> None:
        self.config = config
        self._router = router
        self._deliverer = deliverer
        self._spool = spool
        self._wake = wake_worker
        self._on_result = on_result
        self._clock = clock
        self._acks: set[asyncio.Task[None]] = set()  # removals of delivered entries in flight

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
        try:
            await self._spool.put(entry)
        except SpoolError as exc:
            log.error("spool_failed", error=str(exc))
            return self._done("error", message.raw, exc.reply)
        log.info("message_spooled")
        if not hybrid:
            self._wake()
            return self._done("queued", message.raw, replies.ok_queued(message.id))
        return await self._hybrid_try(message, envelope, route, deadline)

    async def _hybrid_try(
        self, message: Message, envelope: Envelope, route: tuple[str, ...], deadline: float
    ) -> SMTPReply:
        assert self._spool is not None
        # The budget ends at the deadline the entry was spooled with, however long put took.
        budget = max(0.0, deadline - self._clock())
        try:
            result = await self._send_within(message, envelope, route, budget)
        except (PermanentDeliveryError, MessageError) as exc:
            reply = delivery_reply(exc, self.config.soft_bounce)
            if reply.is_permanent:
                # The client owns this failure now: it hears 5xx, so nothing stays queued.
                await self._forget(message.id)
                log.info("delivery_failed", reply=str(reply), detail=_detail(exc))
                return self._done("rejected", message.raw, reply)
            # soft_bounce: keep it queued and let the worker retry, like a transient error.
            await self._defer(message.id, exc)
            return self._done("queued", message.raw, replies.ok_queued(message.id))
        except TransientDeliveryError as exc:
            await self._defer(message.id, exc)
            return self._done("queued", message.raw, replies.ok_queued(message.id))
        # Delivered: the reply need not wait for the entry's removal (one commit less on the
        # reply path; docs/performance.md). Until it commits the entry is out of the worker's
        # reach (next_attempt_at), and if it never does, the worst case is a duplicate later.
        self._acks.add(task := asyncio.create_task(self._ack(message.id)))
        task.add_done_callback(self._acks.discard)
        _log_delivered(result, envelope, message)
        return self._done("accepted", message.raw, _accepted_reply(result, message.id))

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
        deadline = time.monotonic() + budget

        def worth_retrying(exc: BaseException) -> bool:
            if not isinstance(exc, TransientDeliveryError) or isinstance(exc, ProviderConfigError):
                return False
            wait = exc.retry_after or 0.0
            return time.monotonic() + wait < deadline

        def wait_hint(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            hinted = getattr(exc, "retry_after", None) or 0.0
            return max(hinted, backoff(state))

        backoff = wait_exponential_jitter(multiplier=0.2, max=2.0, jitter=0.2)
        try:
            async with asyncio.timeout(budget):
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception(worth_retrying),
                    stop=stop_before_delay(budget * 0.9),  # leave the last try time to answer
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
