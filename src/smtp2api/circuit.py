"""Per-provider circuit breakers: a provider that keeps failing costs no time until it heals.

Closed: calls pass. After ``threshold`` consecutive transient failures the circuit opens and
calls are refused at once (the route's next provider is tried, or the message waits in the
spool). After ``cooldown`` one call is let through (half-open): success closes the circuit,
failure opens it for another cooldown.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class CircuitBreaker:
    threshold: int = 5
    cooldown: float = 30.0
    clock: Callable[[], float] = time.monotonic
    on_change: Callable[[bool], None] = lambda is_open: None
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def retry_in(self) -> float:
        """Seconds until a probe may go through (0 when closed)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown - self.clock())

    def allow(self) -> bool:
        """May a call go through now? In the half-open state only one probe at a time may."""
        if self.opened_at is None:
            return True
        if self.probing or self.retry_in() > 0:
            return False
        self.probing = True
        return True

    def record_success(self) -> None:
        was_open = self.is_open
        self.failures = 0
        self.opened_at = None
        self.probing = False
        if was_open:
            self.on_change(False)

    def record_failure(self) -> None:
        self.failures += 1
        if self.probing or (self.opened_at is None and self.failures >= self.threshold):
            was_open = self.is_open
            self.opened_at = self.clock()
            self.probing = False
            if not was_open:
                self.on_change(True)

    def release_probe(self) -> None:
        """A probe ended without a verdict on the provider (e.g. the message's own fault)."""
        self.probing = False
