"""Hostile-input rules of the SMTP front: an aiosmtpd ``SMTP`` subclass that ``GatewaySMTP``
builds on. ``docs/security.md`` lists each rule with the test that shows it.

* Framing (RFC 5321 §4.1.1.4, §4.5.2; read by ``smtp_data.py``): only <CRLF>.<CRLF> ends
  DATA; a dot is unstuffed once, at the start of a CRLF line; a bare CR or bare LF in DATA
  becomes CRLF (as Postfix's ``smtpd_forbid_bare_newline = normalize``), so what is forwarded
  has one reading; NUL is refused; a line over ``max_line_length`` refuses the message after
  the dot, nothing is cut.
* Lock-step: PIPELINING is not offered (RFC 2920), so input sent before our reply to the
  previous command is refused with 554 5.5.0 and the connection closed (Postfix ≥ 3.9 does the
  same). That includes plaintext pipelined behind STARTTLS (CVE-2011-0411 class).
* Commands: control characters in arguments get 501; MAIL/RCPT paths must be a plain
  ``local@domain`` (``parse_path``); junk commands are limited per message; one STARTTLS.
* Time: the idle timeout runs between commands and while DATA makes no progress; after
  ``data_rate_grace`` DATA must average ``min_data_rate`` bytes/s (slowloris), else 421 4.4.2.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from aiosmtpd.smtp import MISSING, SMTP

from smtp2api import replies
from smtp2api.replies import SMTPReply
from smtp2api.smtp_data import DataResult, read_data

log = structlog.get_logger("smtp2api.smtp")

R554_PIPELINING = SMTPReply(554, "5.5.0", "Protocol synchronization error: wait for each reply")
R553_BAD_SENDER = SMTPReply(553, "5.1.7", "Bad sender address syntax")
R421_JUNK = SMTPReply(421, "4.7.0", "Too many commands without a message, closing connection")
R421_SLOW_DATA = SMTPReply(421, "4.4.2", "Data transfer too slow, closing connection")
R503_TLS_ACTIVE = SMTPReply(503, "5.5.1", "TLS already active")

# Commands that move no mail (Postfix's smtpd_junk_command_limit counts the same kind).
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "HELP", "VRFY", "EXPN", "HELO", "EHLO"})
# Command arguments: no C0/C1 control, no Unicode line separator, no undecodable byte
# (aiosmtpd hands those over as lone surrogates). RFC 5321 §4.1.2 and RFC 6531 §3.3.
_BAD_ARG = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# RFC 5321 §4.1.2 Mailbox = Local-part "@" Domain, with Local-part a Dot-string (RFC 5322
# §3.2.3 atext) and Domain sub-domains. Deliberately narrower than the RFC: no quoted local
# part (it can hide an "@" that APIs split differently), no address literal, no source route.
_U = "[^\x00-\x7f\x80-\x9f\u2028\u2029\ud800-\udfff\\s]"  # UTF-8 (RFC 6531), SMTPUTF8 only
_ATOM = rf"(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]|{_U})+"
_LABEL = rf"(?:[A-Za-z0-9_]|{_U})(?:(?:[A-Za-z0-9_-]|{_U})*(?:[A-Za-z0-9_]|{_U}))?"
_MAILBOX = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*")
# The same without the UTF-8 alternatives, which never match ASCII: for ASCII paths (nearly
# all) it gives the same answer without trying an alternation at every character.
_A_ATOM, _A_LABEL = (
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+",
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?",
)
_ASCII_MAILBOX = re.compile(rf"{_A_ATOM}(?:\.{_A_ATOM})*@{_A_LABEL}(?:\.{_A_LABEL})*")
_MAX_PATH = 254  # RFC 5321 §4.5.3.1.3: 256 octets with the angle brackets


def parse_path(arg: str | None, keyword: str, *, utf8: bool) -> tuple[str | None, bool]:
    """The mailbox of a MAIL/RCPT argument (``FROM:<a@b> SIZE=1``), and whether it is valid.

    ``(None, True)`` when the keyword is missing (aiosmtpd then answers its own 501);
    ``("", True)`` for the null path ``<>``, which only MAIL may use.
    """
    if arg is None or arg[: len(keyword)].upper() != keyword:
        return None, True
    rest = arg[len(keyword) :].lstrip(" ")  # "FROM: <a@b>" is common, though not RFC
    if rest.startswith("<"):
        end = rest.find(">")
        path, after = (rest[1:end], rest[end + 1 :]) if end > 0 else ("", "x")
        if after and not after.startswith(" "):
            return "", False
    else:
        path = rest.split(" ", 1)[0]  # old printers omit the brackets
    if path == "" and rest.startswith("<>"):
        return "", True
    if path.isascii():
        return path, len(path) <= _MAX_PATH and bool(_ASCII_MAILBOX.fullmatch(path))
    if not utf8:
        return path, False  # RFC 6531 §3.4: non-ASCII addresses need MAIL ... SMTPUTF8
    ok = len(path.encode("utf-8", "surrogateescape")) <= _MAX_PATH and bool(
        _MAILBOX.fullmatch(path)
    )
    return path, ok


@dataclass(frozen=True, slots=True)
class GuardLimits:
    """The settings of the rules above (``[smtp]`` keys of the same names)."""

    max_line_length: int = 998  # RFC 5322 §2.1.1, without CRLF
    min_data_rate: int = 4000  # bytes/s averaged over DATA; 0: no floor
    data_rate_grace: float = 30.0  # seconds of DATA before the floor applies
    junk_command_limit: int = 100


def reader_limit(limits: GuardLimits) -> int:
    """The stream reader's limit: a DATA line, a stuffed dot and CRLF (commands are capped
    at 512 octets by aiosmtpd after reading; the DATA reader holds no more of an unended
    line than this either)."""
    return limits.max_line_length + 3


class _Command:
    """One command as ``_handle_client`` runs it: the guards, then the ``smtp_*`` method.
    Attribute reads go to the method (HELP reads its ``__smtp_syntax__``)."""

    __slots__ = ("_method", "_name", "_owner")

    def __init__(self, owner: GuardedSMTP, name: str, method: Callable[..., Any]) -> None:
        self._owner, self._name, self._method = owner, name, method

    def __call__(self, arg: str | None) -> Awaitable[None]:
        return self._owner.run_command(self._name, self._method, arg)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._method, attr)


class _CommandTable(Mapping[str, Any]):
    """aiosmtpd's ``_smtp_methods`` whose lookups (the dispatch in ``_handle_client``, HELP)
    return the guarded command; a view of the table ``init_smtp`` built, no copy."""

    __slots__ = ("_methods", "_owner")

    def __init__(self, owner: GuardedSMTP, methods: Mapping[str, Any]) -> None:
        self._owner, self._methods = owner, methods

    def __getitem__(self, key: str) -> Any:
        return _Command(self._owner, key, self._methods[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)


class GuardedSMTP(SMTP):
    """aiosmtpd's protocol with the rules of this module; ``GatewaySMTP`` adds the policy.

    A subclass that does not run this ``__init__`` sets ``line_length_limit`` (via
    ``reader_limit``) before aiosmtpd's initialisation and calls ``init_guards`` after it.
    """

    def __init__(self, handler: Any, *, limits: GuardLimits, **kwargs: Any) -> None:
        self.line_length_limit = reader_limit(limits)
        super().__init__(handler, **kwargs)
        self.init_guards(limits)

    def init_guards(self, limits: GuardLimits) -> None:
        self.limits = limits
        self.junk_commands = 0
        self.checked_path: str | None = None  # the last MAIL/RCPT path that parse_path read
        self._data_started: float | None = None
        self._data_bytes = 0
        self._timeout_reply = replies.R421_IDLE_TIMEOUT
        self._deadline = 0.0  # when the session times out (_reset_timeout)
        self._smtp_methods = _CommandTable(self, self._smtp_methods)  # type: ignore[assignment]

    @property
    def is_tls(self) -> bool:
        transport = self.transport
        return self._tls_protocol is not None or (
            transport is not None and transport.get_extra_info("ssl_object") is not None
        )

    def message_accepted(self) -> None:
        """A message was accepted: junk commands count afresh (Postfix does the same)."""
        self.junk_commands = 0

    async def refuse_and_close(self, reply: SMTPReply, event: str) -> None:
        log.info(event, reply=str(reply))
        await self.push(str(reply))
        if self.transport is not None:
            self.transport.close()

    async def run_command(
        self, name: str, method: Callable[[str | None], Awaitable[None]], arg: str | None
    ) -> None:
        if name != "QUIT" and self._reader._buffer:  # type: ignore[attr-defined]
            # More input arrived than the one line read: sent before our reply (RFC 2920).
            await self.refuse_and_close(R554_PIPELINING, "pipelining_refused")
            return
        if arg and _BAD_ARG.search(arg):
            await self.push(str(replies.R501_SYNTAX))
            return
        if name in JUNK_COMMANDS:
            self.junk_commands += 1
            if self.junk_commands > self.limits.junk_command_limit:
                await self.refuse_and_close(R421_JUNK, "junk_commands_refused")
                return
        await method(arg)

    # --- envelope paths ---------------------------------------------------------------------

    def _out_of_sequence(self, command: str) -> bool:
        """aiosmtpd answers these itself (503) before looking at the argument."""
        session, envelope = self.session, self.envelope
        if session is None or envelope is None or not session.host_name:
            return True
        return bool(envelope.mail_from) == (command == "MAIL")

    async def smtp_MAIL(self, arg: str | None) -> None:  # noqa: N802
        if self._out_of_sequence("MAIL"):
            await super().smtp_MAIL(arg)
            return
        utf8 = arg is not None and "SMTPUTF8" in arg.upper().split()
        path, ok = parse_path(arg, "FROM:", utf8=utf8)
        self.checked_path = path
        if not ok:
            await self.push(str(R553_BAD_SENDER))
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:  # noqa: N802
        if self._out_of_sequence("RCPT"):
            await super().smtp_RCPT(arg)
            return
        utf8 = bool(self.envelope is not None and self.envelope.smtp_utf8)
        path, ok = parse_path(arg, "TO:", utf8=utf8)
        self.checked_path = path
        if not ok or path == "":
            await self.push(str(replies.R553_BAD_RECIPIENT))
            return
        await super().smtp_RCPT(arg)

    # --- STARTTLS ---------------------------------------------------------------------------

    async def smtp_STARTTLS(self, arg: str) -> None:  # noqa: N802
        if self.is_tls:  # RFC 3207 §4: not again; a second handshake would nest TLS in TLS
            await self.push(str(R503_TLS_ACTIVE))
            return
        await super().smtp_STARTTLS(arg)

    # --- DATA -------------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str) -> None:  # noqa: N802
        """aiosmtpd's DATA with ``read_data`` for the content (see the module docstring)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._data_started, self._data_bytes = self.loop.time(), 0
        self._arm_data_timer()
        try:
            result = await read_data(
                self._reader,
                max_bytes=self.data_size_limit or 2**31,
                max_line=self.limits.max_line_length,
            )
        finally:
            self._data_started = None
            self._timeout_reply = replies.R421_IDLE_TIMEOUT
        # The client waits for us now: no idle timer while the message is handled.
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        try:
            await self._finish_data(result)
        finally:
            if self.transport is not None:  # not after a close (connection_lost cancels it)
                self._reset_timeout()

    async def _finish_data(self, result: DataResult) -> None:
        assert self.envelope is not None
        if result.error is not None:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            log.info("message_refused", reply=str(result.error))
            if result.close:
                await self.refuse_and_close(result.error, "data_overflow")
            else:
                await self.push(str(result.error))
            return
        # Handed over: from here the envelope holds the only reference (smtp_DATA's result
        # would otherwise keep the message alive until the handler's reply).
        self.envelope.content = self.envelope.original_content = result.content
        result.content = b""
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    def data_received(self, data: bytes) -> None:
        if self._data_started is not None:
            self._data_bytes += len(data)
            self._arm_data_timer()
        super().data_received(data)

    def _arm_data_timer(self) -> None:
        """During DATA: idle timeout since the last bytes, or the rate floor, whichever first."""
        assert self._data_started is not None
        now = self.loop.time()
        deadline, reply = now + self._timeout_duration, replies.R421_IDLE_TIMEOUT
        rate = self.limits.min_data_rate
        if rate > 0:
            floor = self._data_started + max(self.limits.data_rate_grace, self._data_bytes / rate)
            if floor < deadline:
                deadline, reply = floor, R421_SLOW_DATA
        self._timeout_reply = reply
        self._reset_timeout(max(deadline - now, 0.001))

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's (the session times out ``duration`` from now), without a new timer on
        every command and every DATA read: the armed timer stays when it fires no later than
        the new deadline, and ``_timeout_cb`` re-arms it for whatever the deadline is then."""
        now = self.loop.time()
        self._deadline = deadline = now + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is not None:
            if not handle.cancelled() and now < handle.when() <= deadline:
                return
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.loop.time() < self._deadline:  # moved since the timer was armed
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)
            return
        transport = self.transport
        if transport is None:
            return  # the session is over already
        # Duck-typed: uvloop's transports write but are not asyncio.WriteTransport subclasses.
        write = getattr(transport, "write", None)
        if write is not None and not transport.is_closing():
            log.info("session_timeout", reply=str(self._timeout_reply))
            write(f"{self._timeout_reply}\r\n".encode())
        super()._timeout_cb()  # type: ignore[no-untyped-call]


class _NoClientInput(logging.Filter):
    """aiosmtpd echoes client input into ``mail.log`` (each command line, unknown verbs, AUTH
    lines it could not decode): a client that sends its base64 password where a command is
    expected would have it logged. Our own events log what is needed, escaped."""

    ECHOES = frozenset(
        {
            "%r >> %r",
            "_handle_client readline: %r",
            "%r unrecognised: %s",
            "%r can't decode base64: %s",
            "DATA readline: %s",
        }
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.ECHOES


_FILTER = _NoClientInput()
logging.getLogger("mail.log").addFilter(_FILTER)
