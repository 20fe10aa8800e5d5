"""The short retries inside ``sync_timeout``: the first try runs without tenacity, and no
try starts after 90 % of the budget, so the reply names the provider's last real answer."""

from __future__ import annotations

import asyncio

from smtp2api import replies
from smtp2api.config import Route
from smtp2api.delivery import Deliverer
from smtp2api.errors import TransientDeliveryError
from smtp2api.intake import Intake, IntakeConfig
from smtp2api.models import Envelope, Message, SendResult
from smtp2api.routing import Router

RAW = b"From: app@example.com\r\nTo: alice@example.com\r\nSubject: Hi\r\n\r\nHello\r\n"


class Failing:
    """A provider whose every answer is a transient error, after ``delay`` seconds."""

    max_recipients = 50
    max_message_size = 10_000_000
    raw_mime = True

    def __init__(self, delay: float, outcomes: list[SendResult | None] | None = None) -> None:
        self.name = "p"
        self.delay = delay
        self.calls = 0
        self.outcomes = outcomes or []

    async def send(self, message: Message, envelope: Envelope) -> SendResult:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.outcomes and (result := self.outcomes.pop(0)) is not None:
            return result
        raise TransientDeliveryError("HTTP 500", reply=replies.R451_TRY_LATER)

    async def aclose(self) -> None:
        return None


def sync_intake(provider: Failing, budget: float) -> Intake:
    return Intake(
        config=IntakeConfig(mode="sync", sync_timeout=budget, soft_bounce=False, backoff_min=1),
        router=Router([Route(providers=["p"])]),
        deliverer=Deliverer({"p": provider}, circuit_threshold=1000),
        spool=None,
    )


async def test_a_slow_first_failure_is_the_reply_not_a_timeout() -> None:
    provider = Failing(delay=0.35)  # the earliest second try would start after 90 % of 0.5 s
    reply = await sync_intake(provider, 0.5).accept(
        "m-1", RAW, Envelope("app@example.com", ("a@example.net",))
    )
    assert reply == replies.R451_TRY_LATER
    assert provider.calls == 1


async def test_a_quick_failure_is_retried_within_the_budget() -> None:
    ok = SendResult(provider="p", provider_id="second-try")
    provider = Failing(delay=0.0, outcomes=[None, ok])
    reply = await sync_intake(provider, 5.0).accept(
        "m-1", RAW, Envelope("app@example.com", ("a@example.net",))
    )
    assert str(reply) == "250 2.0.0 Ok: second-try"
    assert provider.calls == 2
