"""Random SMTP dialogues against a live gateway (a hypothesis state machine).

Invariants, whatever the client sends:
* exactly one reply per command: each command gets one well-formed reply, and at the end QUIT
  gets "221" followed by the close, so no reply was missing or extra on the way;
* no crash: never a 451 internal error, and the gateway keeps accepting sessions;
* no message that the envelope did not declare: what reaches the provider is exactly the
  transactions answered 250 after DATA, with their envelopes, in order. Smuggled end-of-data
  sequences in the bodies would show up as extra messages or extra replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from smtp2api.app import Gateway
from smtp2api.config import Settings, build_settings
from tests.conftest import base_config
from tests.security.conftest import delivered

REPLY = re.compile(r"^[2-5]\d\d[ -]")
CLOSING = ("221", "421", "502 5.5.1 Too many", "554 5.5.0")

ADDRESSES = st.sampled_from(
    [
        "a@example.com",
        "B.C+tag@Example.ORG",
        "x%y@gw.test",
        "@route.test:v@evil.test",
        '"q@evil.test"@gw.test',
        "v@[192.0.2.1]",
        "v@evil.test@gw.test",
        "no-at-sign",
        "",
        "\u00fcser@example.com",
        "a@exa\x00mple.com",
        "a\r@example.com",
    ]
)
GOOD_ADDRESSES = st.sampled_from(
    ["a@example.com", "B.C+tag@Example.ORG", "x%y@gw.test", "d@example.net", "D@EXAMPLE.NET"]
)
PARAMS = st.sampled_from(["", " SIZE=100", " SIZE=999999999", " BODY=8BITMIME", " FOO=bar"])
PIECES = st.sampled_from(
    [
        b"Subject: fuzz\r\n",
        b"\r\n",
        b"text line\r\n",
        b"..stuffed\r\n",
        b"\n.\r\n",
        b"\n.\n",
        b"\r.\r",
        b"\r.\n",
        b"\n.\r",
        b"\r\n.\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\x00",
        b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n",
        b"QUIT\r\n",
        b"y" * 1200,
    ]
)
BODIES = (
    st.lists(PIECES | st.binary(max_size=40), max_size=12)
    .map(b"".join)
    .filter(
        # The true end of data is ours to send: a generated body must not contain one.
        lambda body: not body.startswith(b".\r\n") and b"\r\n.\r\n" not in body + b"\r\n"
    )
)
GARBAGE = st.binary(max_size=60).filter(lambda b: b"\n" not in b).map(lambda b: b"XFUZZ" + b)
JUNK = st.sampled_from(["NOOP", "RSET", "HELP", "HELP MAIL", "VRFY <a@example.com>", "EXPN x"])


@contextlib.contextmanager
def gateway_in_thread(config: Settings) -> Iterator[Gateway]:
    """A gateway on its own event loop in a background thread, for blocking clients."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def start() -> Gateway:
        gateway = Gateway(config)
        await gateway.start()
        return gateway

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["gateway"] = loop.run_until_complete(start())
        except BaseException as exc:  # surfaced in the test thread
            box["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(box["gateway"].shutdown())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    thread = threading.Thread(target=run, name="gateway", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in box:
        raise box["error"]
    try:
        yield box["gateway"]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


class Client:
    """A blocking, lock-step SMTP client: one line out, one reply in."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.stream = self.sock.makefile("rb")

    def reply(self) -> str:
        lines = []
        while True:
            line = self.stream.readline()
            assert line, "the server closed without a reply"
            assert line.endswith(b"\r\n"), line
            text = line[:-2].decode("utf-8")
            assert REPLY.match(text), text
            lines.append(text)
            if text[3] == " ":
                return "\n".join(lines)

    def command(self, line: bytes) -> str:
        assert b"\n" not in line  # lock-step: one command line at a time
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def rest(self) -> bytes:
        return self.stream.read()

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


class Dialogue(RuleBasedStateMachine):
    port: ClassVar[int]
    outbox: ClassVar[Path]

    def __init__(self) -> None:
        super().__init__()
        self.client: Client | None = None
        self.already = len(delivered(self.outbox))
        self.accepted: list[tuple[str, list[str]]] = []
        self.mail: str | None = None
        self.rcpts: list[str] = []

    @initialize()
    def connect(self) -> None:
        self._open()

    def _open(self) -> None:
        self.client = Client(self.port)
        assert self.client.reply().startswith("220 ")
        self.mail, self.rcpts = None, []
        assert self._send(b"EHLO client.test").startswith("250")

    def _send(self, line: bytes) -> str:
        assert self.client is not None
        reply = self.client.command(line)
        assert not reply.startswith("451 4.3.0 Internal"), reply  # an exception inside
        if reply.startswith(CLOSING):
            assert self.client.rest() == b""  # said goodbye, then closed: nothing more
            self.client.close()
            self.client = None
        return reply

    def _reset(self) -> None:
        self.mail, self.rcpts = None, []

    @precondition(lambda self: self.client is None)
    @rule()
    def reconnect(self) -> None:
        self._open()

    @precondition(lambda self: self.client is not None)
    @rule(verb=st.sampled_from(["EHLO", "HELO"]), name=st.sampled_from(["c.test", "", "x y"]))
    def greet(self, verb: str, name: str) -> None:
        reply = self._send(f"{verb} {name}".strip().encode())
        if reply.startswith("250"):
            self._reset()

    @precondition(lambda self: self.client is not None)
    @rule(address=ADDRESSES, params=PARAMS)
    def mail_from(self, address: str, params: str) -> None:
        reply = self._send(f"MAIL FROM:<{address}>{params}".encode("utf-8", "surrogateescape"))
        if reply.startswith("250"):
            assert self.mail is None, "a second MAIL was accepted in one transaction"
            self.mail = address

    @precondition(lambda self: self.client is not None)
    @rule(address=ADDRESSES)
    def rcpt_to(self, address: str) -> None:
        reply = self._send(f"RCPT TO:<{address}>".encode("utf-8", "surrogateescape"))
        if reply.startswith("250"):
            assert self.mail is not None, "a recipient was accepted outside a transaction"
            if address.lower() not in (r.lower() for r in self.rcpts):
                self.rcpts.append(address)

    @precondition(lambda self: self.client is not None and self.mail is None)
    @rule(
        sender=GOOD_ADDRESSES,
        rcpts=st.lists(GOOD_ADDRESSES, min_size=1, max_size=4),
        body=BODIES,
    )
    def transaction(self, sender: str, rcpts: list[str], body: bytes) -> None:
        """What a well-behaved client does, with a hostile body."""
        self.mail_from(sender, "")
        for rcpt in rcpts:
            if self.client is None:
                return
            self.rcpt_to(rcpt)
        if self.client is not None:
            self.data(body)

    @precondition(lambda self: self.client is not None)
    @rule(body=BODIES)
    def data(self, body: bytes) -> None:
        reply = self._send(b"DATA")
        if not reply.startswith("354"):
            return
        assert self.mail is not None
        assert self.rcpts
        assert self.client is not None
        self.client.sock.sendall(body + b"\r\n.\r\n")
        final = self.client.reply()
        assert not final.startswith("451 4.3.0 Internal"), final
        if final.startswith("250"):
            self.accepted.append((self.mail, list(self.rcpts)))
        self._reset()  # after DATA the transaction is over, whatever the outcome

    @precondition(lambda self: self.client is not None)
    @rule(command=JUNK)
    def junk(self, command: str) -> None:
        reply = self._send(command.encode())
        if command == "RSET" and reply.startswith("250"):
            self._reset()

    @precondition(lambda self: self.client is not None)
    @rule(line=GARBAGE)
    def garbage(self, line: bytes) -> None:
        self._send(line)

    @invariant()
    def only_declared_messages(self) -> None:
        got = [(m.mail_from, m.rcpt_tos) for m in delivered(self.outbox)[self.already :]]
        assert got == self.accepted

    def teardown(self) -> None:
        if self.client is not None:
            assert self._send(b"QUIT") == "221 Bye"
        # The gateway still takes new sessions.
        probe = Client(self.port)
        assert probe.reply().startswith("220 ")
        assert probe.command(b"QUIT") == "221 Bye"
        probe.close()


@pytest.mark.timeout(300)
def test_random_dialogues_keep_the_invariants(tmp_path: Path) -> None:
    config = base_config(
        tmp_path,
        smtp={
            "max_recipients": 3,
            "max_message_size": 4000,
            "junk_command_limit": 8,
            "idle_timeout": "10s",
        },
        delivery={"mode": "sync"},
    )
    with gateway_in_thread(build_settings(config)) as gateway:
        Dialogue.port = gateway.port()
        Dialogue.outbox = tmp_path / "outbox"
        run_state_machine_as_test(
            Dialogue,
            settings=settings(
                max_examples=60,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
