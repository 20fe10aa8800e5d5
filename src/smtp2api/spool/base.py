"""The spool interface: where accepted mail waits until a provider has taken it (design §1, §3).

``Spool`` is a ``Protocol`` so that the embedded SQLite spool (``sqlite.py``) and the
PostgreSQL one (``postgres.py``: ``FOR UPDATE SKIP LOCKED`` claims, leases taken over across
nodes) are interchangeable without touching callers. Entries are frozen values; the spool
owns all state.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from smtp2api.models import Envelope

State = Literal["queued", "active", "dead"]
STATES: tuple[State, ...] = ("queued", "active", "dead")

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # no I, L, O, U: unambiguous when read aloud


def new_message_id(now: float | None = None) -> str:
    """A 26-character ULID-style id: 48-bit millisecond timestamp, then 80 random bits.

    Crockford base32, so it is URL-, filename- and header-safe, and ids sort by creation time
    (to the millisecond) as plain strings, which keeps ``queue list`` and claims in order.
    """
    millis = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One spooled message with its envelope, route and delivery state.

    ``raw`` is the message exactly as received (with the gateway's ``Received:`` header); it is
    left out of ``repr`` so an entry can never put a body into a log line.
    """

    id: str
    raw: bytes = field(repr=False)
    mail_from: str
    rcpt_tos: tuple[str, ...]
    account: str | None
    peer: str
    providers: tuple[str, ...]  # the route's providers, in failover order
    created_at: float
    next_attempt_at: float
    attempts: int = 0  # tries started so far; incremented (and persisted) by claim
    state: State = "queued"
    last_reply: str | None = None  # the last SMTP-style reply, e.g. "451 4.7.0 ..."
    last_error: str | None = None  # log-safe detail of the last failure
    done_recipients: tuple[str, ...] = ()  # accepted by a provider in an earlier chunk
    smtputf8: bool = False  # the envelope's SMTPUTF8 flag, so the envelope survives intact

    @classmethod
    def new(
        cls,
        raw: bytes,
        envelope: Envelope,
        providers: Sequence[str],
        *,
        now: float | None = None,
        next_attempt_at: float | None = None,
        attempts: int = 0,
        id: str | None = None,
    ) -> SpoolEntry:
        """A fresh queued entry for ``envelope``, due at ``next_attempt_at`` (default: now)."""
        created = time.time() if now is None else now
        return cls(
            id=id or new_message_id(created),
            raw=bytes(raw),
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            account=envelope.account,
            peer=envelope.peer,
            providers=tuple(providers),
            created_at=created,
            next_attempt_at=created if next_attempt_at is None else next_attempt_at,
            attempts=attempts,
            smtputf8=envelope.smtputf8,
        )

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def pending_recipients(self) -> tuple[str, ...]:
        """The recipients still to deliver to: a retry never resends to ``done_recipients``."""
        done = set(self.done_recipients)
        return tuple(r for r in self.rcpt_tos if r not in done)

    @property
    def envelope(self) -> Envelope:
        return Envelope(self.mail_from, self.rcpt_tos, self.account, self.peer, self.smtputf8)


@dataclass(frozen=True, slots=True)
class SpoolSummary:
    """An entry without its body: what ``list`` returns (``queue list``, metrics)."""

    id: str
    size: int
    mail_from: str
    rcpt_tos: tuple[str, ...]
    account: str | None
    peer: str
    providers: tuple[str, ...]
    created_at: float
    next_attempt_at: float
    attempts: int
    state: State
    last_reply: str | None
    last_error: str | None
    done_recipients: tuple[str, ...]

    def with_body(self, raw: bytes, *, smtputf8: bool) -> SpoolEntry:
        """The whole entry: this summary plus the body (and flag) a listing leaves out."""
        return SpoolEntry(
            id=self.id,
            raw=raw,
            mail_from=self.mail_from,
            rcpt_tos=self.rcpt_tos,
            account=self.account,
            peer=self.peer,
            providers=self.providers,
            created_at=self.created_at,
            next_attempt_at=self.next_attempt_at,
            attempts=self.attempts,
            state=self.state,
            last_reply=self.last_reply,
            last_error=self.last_error,
            done_recipients=self.done_recipients,
            smtputf8=smtputf8,
        )


class Withdrawn(Exception):
    """A ``put`` that ``Spool.withdraw`` took back before it was written: nothing was stored."""


@runtime_checkable
class Spool(Protocol):
    """Durable storage of accepted messages. Every method is a coroutine; none blocks the loop.

    Errors are ``SpoolError`` (``SpoolFull`` when storage is exhausted), never a driver's own
    exception. Operations on an id that no longer exists (acked, deleted by an operator) are
    no-ops, so a worker racing ``smtp2api queue delete`` never crashes.
    """

    async def put(self, entry: SpoolEntry) -> None:
        """Store ``entry``; returns only once it is durable (committed and fsynced).

        Hybrid mode puts the entry with ``next_attempt_at`` after its sync try (and
        ``attempts=1``), so the worker does not claim it while the session is still trying.
        Raises ``Withdrawn`` if ``withdraw`` took it back before it was written.
        """
        ...

    def withdraw(self, id: str) -> bool:
        """Take back a ``put`` of ``id`` that has not started to be written; True if it never
        will be (its ``put`` then raises ``Withdrawn``), False if it is being or has been
        written, or if this spool cannot tell (then ``ack`` removes it as usual).

        Hybrid mode races the put against the API call (design §1: 250 once durable *or*
        accepted): when the provider answers first, the spool need not write at all.
        """
        ...

    async def claim(self, limit: int, now: float) -> builtins.list[SpoolEntry]:
        """Up to ``limit`` due entries, now ``active`` under a lease until ``now + lease``;
        ``attempts + 1`` is persisted before returning, so a crash mid-try still counts the try.

        Due: queued with ``next_attempt_at <= now`` (oldest first), and active entries whose
        lease ran out (their claimer stopped renewing: it died, or could not record an
        outcome); those come first."""
        ...

    async def renew(self, ids: Sequence[str], now: float) -> int:
        """Extend the leases of these active entries; returns how many are still held."""
        ...

    async def ack(self, id: str) -> None:
        """Delivered: remove the entry."""
        ...

    async def defer(
        self, id: str, next_attempt_at: float, last_reply: str | None, last_error: str | None
    ) -> None:
        """Back to ``queued``, due at ``next_attempt_at``; the attempt stays counted."""
        ...

    async def mark_dead(self, id: str, last_reply: str | None, last_error: str | None) -> None:
        """Final failure: kept, inspectable and retryable, never claimed."""
        ...

    async def add_done_recipients(self, id: str, rcpts: Sequence[str]) -> None:
        """Record recipients a provider accepted (one chunk of a split send)."""
        ...

    async def release(
        self, id: str, *, next_attempt_at: float | None = None, attempted: bool = False
    ) -> None:
        """Give back a claim: an ``active`` entry goes back to ``queued`` (no-op otherwise).

        ``attempted=False`` (a claim never tried: a closed rate gate) uncounts the claim's
        attempt; ``attempted=True`` (a try cut short by shutdown) keeps it. ``next_attempt_at``
        makes it due then (default: as it was, i.e. due now)."""
        ...

    async def recover(self, now: float) -> int:
        """At startup: return our own (or expired) claims to ``queued``; returns how many."""
        ...

    async def get(self, id: str) -> SpoolEntry | None: ...

    async def list(
        self, state: str | None = None, limit: int | None = None
    ) -> builtins.list[SpoolSummary]:
        """Entries without bodies, oldest first; ``state`` filters (ValueError if unknown)."""
        ...

    async def retry(self, id: str, now: float | None = None) -> bool:
        """Make a queued or dead entry due now (dead ones revived, attempts kept). A revived
        entry's ``created_at`` becomes ``now``: it gets a whole ``max_age`` again, instead of
        dying at its first failure. False when the id is unknown or the entry is being tried
        right now."""
        ...

    async def retry_all(self, now: float | None = None) -> int:
        """``retry`` every dead or not-yet-due entry; returns how many changed."""
        ...

    async def delete(self, id: str) -> bool: ...

    async def purge_dead(self) -> int: ...

    async def counts(self) -> dict[str, int]:
        """Entries per state, every state present (zero included)."""
        ...

    async def oldest_created_at(self) -> float | None:
        """Creation time of the oldest undelivered (queued or active) entry."""
        ...

    async def next_due_at(self) -> float | None:
        """When a worker should look again: the earliest ``next_attempt_at`` of a queued
        entry, or the earliest lease end of an active one, whichever comes first."""
        ...

    async def check_writable(self) -> bool:
        """A real durable write succeeds (``/readyz``); never raises."""
        ...

    async def aclose(self) -> None:
        """Finish queued writes and close; idempotent."""
        ...


@runtime_checkable
class WorkNotifier(Protocol):
    """Optional, for spools shared by several processes (PostgreSQL ``LISTEN``/``NOTIFY``):
    a worker subscribes to be woken as soon as another node makes work due, instead of at
    its next poll. Spools without it (SQLite) are woken by their own process's intake."""

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (on the event loop, without blocking) when work may be due;
        returns the function that unsubscribes."""
        ...
