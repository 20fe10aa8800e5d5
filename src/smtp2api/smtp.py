"""The SMTP front: an aiosmtpd ``SMTP`` subclass for limits and TLS/AUTH rules, and the handler.

The handler's hooks answer MAIL/RCPT with policy decisions and hand DATA to ``Intake``.
Everything a client sees is an ``SMTPReply`` from ``replies.py``; aiosmtpd's own stock replies
are translated to carry RFC 3463 enhanced codes (``_STOCK_REPLIES``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import os
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Literal, TypeVar

import structlog
from aiosmtpd.smtp import SMTP, AuthResult, Session
from aiosmtpd.smtp import Envelope as AioEnvelope

from smtp2api import logs, replies
from smtp2api.auth import Authenticator, AuthThrottle
from smtp2api.models import Envelope
from smtp2api.policy import Policy
from smtp2api.proxy import ProxyGate, ProxyRefused
from smtp2api.replies import SMTPReply
from smtp2api.smtp_guard import GuardedSMTP, GuardLimits, reader_limit
from smtp2api.smtp_init import getaddr, init_smtp

log = structlog.get_logger("smtp2api.smtp")

ListenerKind = Literal["starttls", "tls", "plain"]
AcceptFn = Callable[[str, bytes, Envelope], Awaitable[SMTPReply]]
SizeLimitFn = Callable[[str | None, str], int | None]

# Replies aiosmtpd writes itself, rewritten to carry enhanced status codes (RFC 3463).
_STOCK_REPLIES = {
    "552 Error: Too much mail data": str(replies.R552_TOO_LARGE),
    "552 Error: message size exceeds fixed maximum message size": str(replies.R552_TOO_LARGE),
    "530 Must issue a STARTTLS command first": str(replies.R530_TLS_REQUIRED),
    "500 Command line too long": "500 5.5.2 Command line too long",
    "503 Error: need MAIL command": "503 5.5.1 Need MAIL command first",
    "503 Error: need RCPT command": "503 5.5.1 Need RCPT command first",
    "503 Error: nested MAIL command": "503 5.5.1 Nested MAIL command",
    "553 5.1.3 Error: malformed address": "553 5.1.3 Malformed address",
    "500 Error: bad syntax": "500 5.5.2 Syntax error",
    "500 Error: strict ASCII mode": "500 5.5.2 Syntax error",
    "554 Command refused due to lack of security": "554 5.7.0 TLS negotiation failed",
}
# aiosmtpd echoes an unknown verb, which may hold any byte but LF: never send it back.
_UNKNOWN_COMMAND = '500 Error: command "'
# RFC 5321 §4.1.2: no control characters in a path; NUL, CR, LF smuggle commands or headers.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BYTES = re.compile(rb"[\x00\r\n]")
_MAX_AUTH_FAILURES = 3
_THREAD_BYTES = 256 * 1024  # as intake.py: larger messages are scanned off the event loop
_T = TypeVar("_T")


class _SessionIds:
    """Session ids, "s<n>-<tag>": the counter orders a process's sessions, the random tag tells
    processes (forked workers) and restarts apart. One tag per process, not per session:
    ``os.urandom`` on every connection was a system call for nothing."""

    def __init__(self) -> None:
        self._count = itertools.count(1)
        self.forked()

    def forked(self) -> None:
        self._tag = secrets.token_hex(3)

    def next(self) -> str:
        return f"s{next(self._count)}-{self._tag}"


_session_ids = _SessionIds()
os.register_at_fork(after_in_child=_session_ids.forked)


def _command_size_limit() -> int:
    return SMTP.command_size_limit


class ConnectionTracker:
    """Counts open connections in total and per client IP (``max_connections[_per_ip]``)."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: collections.Counter[str] = collections.Counter()

    def try_open(self, ip: str) -> str | None:
        """Count a new connection from ``ip``; else the refusal's metric label."""
        if self.total >= self.max_total:
            return "rejected_limit"
        if self._per_ip[ip] >= self.max_per_ip:
            return "rejected_ip_limit"
        self.total += 1
        self._per_ip[ip] += 1
        return None

    def close(self, ip: str) -> None:
        self.total -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]


@dataclass(frozen=True, slots=True)
class FrontConfig:
    """What every session of one listener needs; built once in ``app.py``."""

    hostname: str
    kind: ListenerKind
    require_tls: bool
    max_message_size: int
    max_recipients: int
    idle_timeout: float
    # smtp_guard.py: line length, DATA rate floor and junk-command limits
    guards: GuardLimits = field(default_factory=GuardLimits)
    # proxy.py: set when [smtp] proxy_protocol is on; the real client comes from the header
    proxy: ProxyGate | None = None


class GatewaySMTP(GuardedSMTP):
    """One SMTP session: aiosmtpd's protocol with the gateway's limits and TLS/AUTH rules."""

    def __init__(
        self,
        handler: Handler,
        *,
        front: FrontConfig,
        tracker: ConnectionTracker,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        starttls = tls_context if front.kind == "starttls" else None
        self.line_length_limit = reader_limit(front.guards)  # sizes the stream reader
        # SMTP.__init__'s effect without its per-connection reflection (smtp_init.py).
        init_smtp(
            self,
            handler,
            data_size_limit=front.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=front.hostname,
            ident="ESMTP",  # the banner names the host, never the software or its version
            tls_context=starttls,
            require_starttls=False,  # decided per peer in connection_made
            timeout=front.idle_timeout,
            auth_require_tls=front.kind != "tls",
        )
        self.init_guards(front.guards)
        # aiosmtpd keeps command_size_limits on the class and mutates it in EHLO; own a copy.
        self.command_size_limits = collections.defaultdict(_command_size_limit)
        self.front = front
        self.tracker = tracker
        self.session_id = _session_ids.next()
        self.peer_ip = ""
        self.proxy_ip: str | None = None  # the load balancer's address, behind PROXY
        self.trusted = False
        self.auth_failures = 0
        self._admitted = False
        self._refused = False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        return getaddr(arg, self.local_part_limit)  # aiosmtpd's parser, minus a class per call

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            return  # the STARTTLS re-entry: aiosmtpd has reset the session (RFC 3207 §4.2)
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else ""
        if self.front.proxy is None:
            self._admit()
        # else the client is known only once _handle_client has read the PROXY header

    def _admit(self) -> None:
        """Trust, connection limits and TLS rules for ``peer_ip``, the real client."""
        handler: Handler = self.event_handler
        self.trusted = handler.policy.is_trusted(self.peer_ip)
        refusal = self.tracker.try_open(self.peer_ip)
        if refusal is None:
            self._admitted = True
            handler.on_connection_result("accepted")
        else:
            self._refused = True
            handler.on_connection_result(refusal)
        tls_required = self.front.require_tls and not self.trusted
        if self.front.kind == "starttls":
            self.require_starttls = bool(self.tls_context) and tls_required
            self._auth_require_tls = tls_required
        elif self.front.kind == "plain":
            self._auth_require_tls = tls_required
        handler.on_connect(self)

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self.tracker.close(self.peer_ip)
            self.event_handler.on_disconnect(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self.front.proxy is not None and not await self._read_proxy(self.front.proxy):
            return
        if self._refused:
            # RFC 5321 §3.1: a server may answer the greeting with 421 and close.
            await self.push(str(replies.R421_TOO_MANY_CONNECTIONS))
            if self.transport is not None:
                self.transport.close()
            return
        # This coroutine is its own task (connection_made), whose context is a copy: what is
        # bound here stays with the session and goes with it, no unbinding needed.
        structlog.contextvars.bind_contextvars(
            session_id=self.session_id, peer=self.peer_ip, **self._proxy_context()
        )
        await super()._handle_client()

    async def _read_proxy(self, gate: ProxyGate) -> bool:
        """Read the PROXY header and admit its client; close without a banner otherwise."""
        direct = self.peer_ip
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()  # the header has its own deadline: no 421 before it
        try:
            self.peer_ip, data = await gate.read(self._reader, direct)
        except ProxyRefused as refused:
            log.warning("proxy_refused", proxy=direct, reason=refused.reason)
            self.event_handler.on_connection_result("rejected_proxy")
            if self.transport is not None:
                self.transport.close()
            return False
        except asyncio.CancelledError:
            # aiosmtpd cancels this task on EOF but leaves the transport half-open for us.
            if self.transport is not None:
                self.transport.close()
            raise
        self.proxy_ip = direct
        assert self.session is not None
        self.session.proxy_data = data
        self._reset_timeout()  # the idle timeout runs from the header, as from the connect
        self._admit()
        return True

    def _proxy_context(self) -> dict[str, str]:
        return {} if self.proxy_ip is None else {"proxy": self.proxy_ip}

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.IncompleteReadError):
            # The client hung up without QUIT. asyncio's loop reports that EOF by cancelling
            # the session (eof_received); uvloop's lets the read fail first. End it the same way.
            log.debug("session_closed_by_client")
            if self.transport is not None:
                self.transport.close()
            raise asyncio.CancelledError
        result: str = await super().handle_exception(error)
        return result

    async def push(self, status: str | bytes | None) -> None:
        if status is None:
            # aiosmtpd's exception path pushes in a ``finally`` even when handle_exception
            # ended the session (above): there is nobody left to answer.
            return
        if isinstance(status, str):
            if status.startswith(_UNKNOWN_COMMAND):
                status = "500 5.5.2 Command not recognized"
            status = _STOCK_REPLIES.get(status, status).encode(
                "utf-8" if self.enable_SMTPUTF8 else "ascii"
            )
        # aiosmtpd's push, minus its DEBUG line per reply (mail.log never logs below INFO).
        self._writer.write(status + b"\r\n")
        await self._writer.drain()

    @property
    def is_tls(self) -> bool:
        return self.front.kind == "tls" or self._tls_protocol is not None

    @property
    def account(self) -> str | None:
        return self.session.auth_data if self.session and self.session.authenticated else None

    # AUTH: aiosmtpd's parsing, our asynchronous check (scrypt runs in a thread).
    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:  # noqa: N802
        if await self._auth_throttled():
            return AuthResult(success=False, handled=True)
        result: AuthResult = await super().auth_PLAIN(_, args)
        return await self._finish_auth(result)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:  # noqa: N802
        if await self._auth_throttled():
            return AuthResult(success=False, handled=True)
        result: AuthResult = await super().auth_LOGIN(_, args)
        return await self._finish_auth(result)

    async def _auth_throttled(self) -> bool:
        """Per-IP lock-out (``smtp.auth_failure_limit``): refused before any credential is
        read or checked, so a locked-out guesser costs no scrypt work."""
        handler: Handler = self.event_handler
        if not handler.auth_throttle.is_locked(self.peer_ip):
            return False
        handler.on_auth(self, "throttled")
        await self.refuse_and_close(replies.R421_TOO_MANY_AUTH_FAILURES, "auth_throttled")
        return True

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        # Called synchronously by the base class: defer the real check to _finish_auth.
        return AuthResult(success=False, handled=False, auth_data=auth_data)

    async def _finish_auth(self, result: AuthResult) -> AuthResult:
        if result.handled or result.auth_data is None:
            return result  # aiosmtpd already answered (bad base64, aborted with '*')
        handler: Handler = self.event_handler
        login, password = result.auth_data.login, result.auth_data.password
        username = login.decode("utf-8", "replace")
        if _CONTROL.search(username) or _CONTROL_BYTES.search(password):
            ok = False  # CR/LF/NUL in a credential: refused unchecked (and still counted)
        else:
            ok = await handler.authenticator.check(username, password)
        handler.on_auth(self, ok)
        if ok:
            log.info("auth_succeeded", account=username)
            return AuthResult(success=True, auth_data=username)
        self.auth_failures += 1
        handler.auth_throttle.failed(self.peer_ip)
        log.info("auth_failed", failures=self.auth_failures)
        if self.auth_failures >= _MAX_AUTH_FAILURES:
            await self.push(str(replies.R421_TOO_MANY_AUTH_FAILURES))
            if self.transport is not None:
                self.transport.close()
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=str(replies.R535_BAD_CREDENTIALS))


def received_header(
    server: GatewaySMTP, session: Session, msg_id: str, rcpt_tos: list[str]
) -> bytes:
    """The trace header this hop adds (RFC 5321 §4.4), protocol per RFC 3848."""
    proto = "ESMTP" if session.extended_smtp else "SMTP"
    if server.is_tls:
        proto += "S"
    if server.account is not None:
        proto += "A"
    helo = _CONTROL.sub("", session.host_name or "unknown")[:200]
    stamp = _date_time(int(time.time()))
    # Name the recipient only when there is one: more would reveal Bcc recipients to all.
    for_clause = f"\r\n\tfor <{rcpt_tos[0]}>" if len(rcpt_tos) == 1 else ""
    text = (
        f"Received: from {helo} ([{server.peer_ip}])\r\n"
        f"\tby {server.front.hostname} (smtp2api) with {proto} id {msg_id}{for_clause};\r\n"
        f"\t{stamp}\r\n"
    )
    return text.encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=1)
def _date_time(second: int) -> str:
    """RFC 5322 §3.3 date-time of a second: formatted once, for every message of that second."""
    return format_datetime(datetime.fromtimestamp(second, UTC))


class Handler:
    """aiosmtpd handler hooks: policy at MAIL/RCPT, the message to ``accept`` at DATA."""

    def __init__(
        self,
        *,
        policy: Policy,
        authenticator: Authenticator,
        accept: AcceptFn,
        new_id: Callable[[], str],
        route_size_limit: SizeLimitFn,
        max_recipients: int,
        on_reply: Callable[[SMTPReply | str], None] = lambda _: None,
        on_auth_result: Callable[[bool | str], None] = lambda _: None,
        on_connection: Callable[[int], None] = lambda _: None,
        on_connection_result: Callable[[str], None] = lambda _: None,
        auth_throttle: AuthThrottle | None = None,
    ) -> None:
        self.policy = policy
        self.authenticator = authenticator
        # Per-IP AUTH failures; app.py passes one that outlives reloads.
        self.auth_throttle = auth_throttle if auth_throttle is not None else AuthThrottle()
        self._accept = accept
        self._new_id = new_id
        self._route_size_limit = route_size_limit
        self._max_recipients = max_recipients
        self._on_reply = on_reply
        self._on_auth_result = on_auth_result
        self._on_connection = on_connection
        self.on_connection_result = on_connection_result
        self.active: set[GatewaySMTP] = set()
        self.in_data: set[GatewaySMTP] = set()
        self._data_done = asyncio.Event()
        self._data_done.set()

    # connection bookkeeping (called by GatewaySMTP)
    def on_connect(self, server: GatewaySMTP) -> None:
        if server._admitted:
            self.active.add(server)
            self._on_connection(+1)
            log.debug("session_started", session_id=server.session_id, peer=server.peer_ip)

    def on_disconnect(self, server: GatewaySMTP) -> None:
        self.active.discard(server)
        self._leave_data(server)
        self._on_connection(-1)

    def _leave_data(self, server: GatewaySMTP) -> None:
        self.in_data.discard(server)
        if not self.in_data:
            self._data_done.set()

    async def wait_data_done(self) -> None:
        """Return once no session is inside DATA (shutdown bounds the wait)."""
        await self._data_done.wait()

    def on_auth(self, server: GatewaySMTP, result: bool | str) -> None:
        """``True``/``False`` for success/failure, or ``"throttled"`` (metric labels)."""
        self._on_auth_result(result)

    def _reply(self, reply: SMTPReply) -> str:
        self._on_reply(reply)
        return str(reply)

    async def handle_EHLO(  # noqa: N802
        self,
        server: GatewaySMTP,
        session: Session,
        envelope: AioEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if not self.authenticator.has_accounts:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        return responses

    async def handle_MAIL(  # noqa: N802
        self,
        server: GatewaySMTP,
        session: Session,
        envelope: AioEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        account = server.account
        if not self.policy.may_relay(account, server.trusted):
            return self._reply(replies.R530_AUTH_REQUIRED)
        if _CONTROL.search(address) or address != (server.checked_path or "<>"):
            return self._reply(replies.R501_SYNTAX)  # aiosmtpd read another path than we did
        mail_from = "" if address == "<>" else address
        refusal = self.policy.check_sender(account, mail_from)
        if refusal is not None:
            return self._reply(refusal)
        limit = self._route_size_limit(account, mail_from)
        if limit is None:
            return self._reply(
                replies.R553_SENDER_NOT_ALLOWED.with_text("No route for this sender")
            )
        declared = _declared_size(mail_options)
        if declared is not None and declared > limit:
            return self._reply(replies.R552_TOO_LARGE)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return self._reply(replies.R250_SENDER_OK)

    async def handle_RCPT(  # noqa: N802
        self,
        server: GatewaySMTP,
        session: Session,
        envelope: AioEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not self.policy.may_relay(server.account, server.trusted):
            return self._reply(replies.R554_RELAY_DENIED)
        if _CONTROL.search(address) or "@" not in address or address != server.checked_path:
            return self._reply(replies.R501_SYNTAX)
        if len(envelope.rcpt_tos) >= self._max_recipients:
            return self._reply(replies.R452_TOO_MANY_RECIPIENTS)
        if address.lower() not in (r.lower() for r in envelope.rcpt_tos):
            envelope.rcpt_tos.append(address)  # RFC 5321 §3.3: duplicates get one copy
        return self._reply(replies.R250_RECIPIENT_OK)

    async def handle_DATA(  # noqa: N802
        self, server: GatewaySMTP, session: Session, envelope: AioEnvelope
    ) -> str:
        raw: bytes = envelope.original_content or b""
        # From here this frame holds the message, not the envelope: once the Received: line
        # is prepended below, the bytes as read can be freed (one copy of a 25 MB message
        # alive instead of two; aiosmtpd resets the envelope after this hook anyway).
        envelope.content = envelope.original_content = None
        mail_from = "" if envelope.mail_from == "<>" else str(envelope.mail_from)
        account = server.account
        limit = self._route_size_limit(account, mail_from)
        if limit is not None and len(raw) > limit:
            return self._reply(replies.R552_TOO_LARGE)
        refusal = await _in_thread_if_large(raw, self.policy.check_header_sender, account, raw)
        if refusal is not None:
            return self._reply(refusal)
        msg_id = self._new_id()
        model = Envelope(
            mail_from=mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            account=account,
            peer=server.peer_ip,
            smtputf8=bool(envelope.smtp_utf8),
        )
        content = received_header(server, session, msg_id, list(envelope.rcpt_tos)) + raw
        del raw
        self.in_data.add(server)
        self._data_done.clear()
        try:
            with logs.bound(msg_id=msg_id):
                reply = await self._accept(msg_id, content, model)
        finally:
            self._leave_data(server)
        if reply.is_success:
            server.message_accepted()
        return self._reply(reply)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default answers "500 Error: (ValueError) <text>": it leaks internals and
        # makes the client drop the mail. A 451 keeps it with the client.
        log.error("session_exception", exc_info=error)
        return self._reply(replies.R451_INTERNAL)


async def _in_thread_if_large(raw: bytes, fn: Callable[..., _T], *args: Any) -> _T:
    # Scanning a large message's header section can take long enough to stall other sessions.
    if len(raw) > _THREAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _declared_size(mail_options: list[str]) -> int | None:
    """The RFC 1870 ``SIZE=`` parameter of MAIL, if any (aiosmtpd has validated digits)."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None
