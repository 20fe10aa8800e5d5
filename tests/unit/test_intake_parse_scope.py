"""Intake parses only what the route's providers need: headers only when all take raw MIME."""

from __future__ import annotations

import pytest

from smtp2api.config import Route
from smtp2api.delivery import Deliverer
from smtp2api.intake import Intake, IntakeConfig
from smtp2api.models import Envelope, Message, SendResult
from smtp2api.routing import Router

RAW = (
    b"From: App <app@example.com>\r\nTo: alice@example.com\r\nSubject: Invoice\r\n"
    b"X-Mailgun-Tag: billing\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/plain\r\n\r\nHello\r\n"
    b"--b1\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; "
    b'filename="a.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--b1--\r\n'
)


class Recorder:
    max_recipients = 50
    max_message_size = 10_000_000

    def __init__(self, name: str, raw_mime: bool) -> None:
        self.name = name
        self.raw_mime = raw_mime
        self.seen: list[Message] = []

    async def send(self, message: Message, envelope: Envelope) -> SendResult:
        self.seen.append(message)
        return SendResult(provider=self.name, provider_id="id-1")

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize(
    ("kinds", "body_parsed"),
    [((True,), False), ((False,), True), ((True, False), True), ((False, True), True)],
)
async def test_body_is_parsed_only_when_a_provider_needs_it(
    kinds: tuple[bool, ...], body_parsed: bool
) -> None:
    providers = {f"p{i}": Recorder(f"p{i}", raw) for i, raw in enumerate(kinds)}
    intake = Intake(
        config=IntakeConfig(mode="sync", sync_timeout=5.0, soft_bounce=False, backoff_min=1.0),
        router=Router([Route(providers=list(providers))]),
        deliverer=Deliverer(providers),
        spool=None,
    )
    envelope = Envelope("app@example.com", ("alice@example.com",))
    reply = await intake.accept("m-1", RAW, envelope)
    assert reply.code == 250
    [message] = providers["p0"].seen
    # Header-derived fields are there either way: raw-MIME providers read nothing else.
    assert (message.subject, message.tags) == ("Invoice", ("billing",))
    assert message.from_ is not None
    assert message.from_.email == "app@example.com"
    assert message.raw == RAW.replace(b"X-Mailgun-Tag: billing\r\n", b"")  # control header cut
    assert bool(message.attachments) is body_parsed
    assert (message.text is not None) is body_parsed
