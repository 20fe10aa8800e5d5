"""The circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

from smtp2api.circuit import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_consecutive_failures() -> None:
    changes: list[bool] = []
    breaker = CircuitBreaker(threshold=3, cooldown=10, clock=Clock(), on_change=changes.append)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.is_open
    assert not breaker.allow()
    assert changes == [True]


def test_success_resets_the_count() -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=10, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert not breaker.is_open


def test_half_open_lets_one_probe_through_after_cooldown() -> None:
    clock = Clock()
    changes: list[bool] = []
    breaker = CircuitBreaker(threshold=1, cooldown=10, clock=clock, on_change=changes.append)
    breaker.record_failure()
    assert breaker.retry_in() == 10
    clock.now += 10
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.record_success()
    assert not breaker.is_open
    assert breaker.allow()
    assert changes == [True, False]


def test_failed_probe_reopens_for_another_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=10, clock=clock)
    breaker.record_failure()
    clock.now += 10
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.is_open
    assert not breaker.allow()
    assert breaker.retry_in() == 10


def test_released_probe_can_be_retried() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown=10, clock=clock)
    breaker.record_failure()
    clock.now += 10
    assert breaker.allow()
    breaker.release_probe()
    assert breaker.allow()
