"""One delivery attempt over a route: providers in order, recipient chunks, failover.

``Deliverer.deliver`` returns the ``SendResult`` of the provider that took the message, or
raises the ``DeliveryError`` that decides the reply: a permanent error at once (no failover,
it is the message's fault), else the last transient error once every provider was tried.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import structlog

from smtp2api import replies
from smtp2api.circuit import CircuitBreaker
from smtp2api.errors import (
    DeliveryError,
    MessageTooLarge,
    PermanentDeliveryError,
    ProviderConfigError,
    ProviderUnavailable,
    TransientDeliveryError,
)
from smtp2api.models import Envelope, Message, SendResult
from smtp2api.providers.base import Provider

log = structlog.get_logger("smtp2api.delivery")

# (provider name, outcome "success" | "transient" | "permanent", seconds)
AttemptObserver = Callable[[str, str, float], None]
CircuitObserver = Callable[[str, bool], None]
ChunkDone = Callable[[tuple[str, ...]], Awaitable[None]]


def _noop_observer(provider: str, outcome: str, seconds: float) -> None:
    return None


def _noop_circuit(provider: str, is_open: bool) -> None:
    return None


class Deliverer:
    """Sends messages through named providers, each behind its own circuit breaker."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        *,
        observe: AttemptObserver = _noop_observer,
        on_circuit: CircuitObserver = _noop_circuit,
        circuit_threshold: int = 5,
        circuit_cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.providers = dict(providers)
        self._observe = observe
        self._clock = clock
        self.circuits = {
            name: CircuitBreaker(
                threshold=circuit_threshold,
                cooldown=circuit_cooldown,
                clock=clock,
                on_change=lambda is_open, name=name: on_circuit(name, is_open),  # type: ignore[misc]
            )
            for name in self.providers
        }

    def size_limit(self, route: Sequence[str]) -> int:
        """The largest message some provider of the route can take."""
        return max(self.providers[name].max_message_size for name in route)

    def raw_mime_only(self, route: Sequence[str]) -> bool:
        """True when every provider of the route takes the raw MIME: the message then needs
        only its header-derived fields (sender, recipients, tags), not bodies or attachments."""
        return all(name in self.providers and self.providers[name].raw_mime for name in route)

    async def deliver(
        self,
        message: Message,
        envelope: Envelope,
        route: Sequence[str],
        *,
        done: frozenset[str] = frozenset(),
        on_chunk_done: ChunkDone | None = None,
    ) -> SendResult:
        """Deliver to every envelope recipient not in ``done``, trying ``route`` in order."""
        last: TransientDeliveryError | None = None
        accepted = set(done)  # grows as chunks succeed, so a failover never resends them
        for name in route:
            provider = self.providers[name]
            if len(message.raw) > provider.max_message_size:
                last = ProviderConfigError(f"message exceeds {name}'s size limit")
                continue
            circuit = self.circuits[name]
            if not circuit.allow():
                last = ProviderUnavailable(
                    f"circuit open for {name}",
                    reply=replies.R451_TRY_LATER,
                    retry_after=circuit.retry_in(),
                )
                continue
            try:
                result = await self._send_chunked(
                    provider, message, envelope, accepted, on_chunk_done
                )
            except PermanentDeliveryError:
                circuit.release_probe()  # the message's fault says nothing of the provider
                raise
            except BaseException as exc:
                if not isinstance(exc, TransientDeliveryError):
                    circuit.release_probe()  # cancelled or a bug: no verdict on the provider
                    raise
                circuit.record_failure()
                last = exc
                log.info(
                    "delivery_deferred",
                    provider=name,
                    reply=str(exc.reply),
                    detail=exc.detail,
                    status=exc.status,
                )
            else:
                circuit.record_success()
                return result
        if last is None:  # pragma: no cover - routes always name at least one provider
            raise ProviderConfigError("route has no providers")
        if isinstance(last, ProviderConfigError) and all(
            len(message.raw) > self.providers[n].max_message_size for n in route
        ):
            raise MessageTooLarge("larger than every provider of the route accepts")
        raise last

    async def _send_chunked(
        self,
        provider: Provider,
        message: Message,
        envelope: Envelope,
        accepted: set[str],
        on_chunk_done: ChunkDone | None,
    ) -> SendResult:
        pending = [r for r in envelope.rcpt_tos if r not in accepted]
        size = max(1, provider.max_recipients)
        ids: list[str] = []
        for start in range(0, len(pending), size):
            chunk = tuple(pending[start : start + size])
            whole = len(chunk) == len(envelope.rcpt_tos)
            sub_env = envelope if whole else dataclasses.replace(envelope, rcpt_tos=chunk)
            sub_msg = message if whole else _restrict(message, chunk)
            result = await self._send_once(provider, sub_msg, sub_env)
            if result.provider_id:
                ids.append(result.provider_id)
            accepted.update(chunk)
            if on_chunk_done is not None and not whole:
                await on_chunk_done(chunk)
        return SendResult(provider=provider.name, provider_id=",".join(ids) or None)

    async def _send_once(
        self, provider: Provider, message: Message, envelope: Envelope
    ) -> SendResult:
        started = self._clock()
        try:
            result = await provider.send(message, envelope)
        except PermanentDeliveryError:
            self._observe(provider.name, "permanent", self._clock() - started)
            raise
        except DeliveryError:
            self._observe(provider.name, "transient", self._clock() - started)
            raise
        self._observe(provider.name, "success", self._clock() - started)
        return result


def _restrict(message: Message, recipients: tuple[str, ...]) -> Message:
    """The message as one chunk of its envelope sees it: to/cc/bcc limited to ``recipients``.

    Each chunk gets its own stable id (the message's, plus a digest of its recipients), so an
    API that deduplicates on ``Idempotency-Key`` takes every chunk once, and a retry of the
    same chunk reuses its key.
    """
    keep = {r.lower() for r in recipients}
    digest = hashlib.sha256("\0".join(sorted(keep)).encode()).hexdigest()[:12]
    return dataclasses.replace(
        message,
        id=f"{message.id}.{digest}",
        to=tuple(a for a in message.to if a.email.lower() in keep),
        cc=tuple(a for a in message.cc if a.email.lower() in keep),
        bcc=tuple(a for a in message.bcc if a.email.lower() in keep),
    )
