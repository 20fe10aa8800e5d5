"""aiosmtpd's per-connection ``SMTP.__init__``, with its reflection done once per class.

aiosmtpd 1.4.6 builds three method tables on every connection with ``inspect.getmembers``,
``dir()`` and ``inspect.signature`` over the protocol and the handler: about 0.5 ms of CPU
per connection, as much as the whole rest of an SMTP session (``docs/performance.md``).
``init_smtp`` sets exactly the attributes ``SMTP.__init__`` sets, for the options the
gateway uses, with those tables computed once per (protocol class, handler class).
``tests/unit/test_smtp_init.py`` compares the result with the real ``SMTP.__init__``, so an
aiosmtpd upgrade that changes the constructor fails a test instead of drifting silently.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
import ssl
from collections.abc import Iterator, Mapping
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

from aiosmtpd import smtp as aiosmtpd_smtp
from aiosmtpd.smtp import SMTP

# aiosmtpd's own defaults for the options the gateway does not set.
_BUILTIN_IDENT: str = aiosmtpd_smtp.__ident__


# Per-class tables; classes are few and live as long as the process.
_AUTH: dict[tuple[type, type], dict[str, tuple[str, bool]]] = {}
_NAMES: dict[tuple[type, str], dict[str, str]] = {}
_EHLO: dict[type, str | None] = {}


def _auth_table(protocol: type, handler: type) -> dict[str, tuple[str, bool]]:
    """mechanism -> (attribute, on_protocol) as ``SMTP.__init__`` finds them: ``auth_*``
    members of the protocol, then of the handler (the handler's win on a clash). Only class
    members: aiosmtpd also takes instance attributes, so a handler attribute such as
    ``auth_throttle`` would be advertised (and dispatched) as "AUTH THROTTLE"."""
    key = (protocol, handler)
    if key not in _AUTH:
        _AUTH[key] = _find_auth(protocol, handler)
    return _AUTH[key]


def _find_auth(protocol: type, handler: type) -> dict[str, tuple[str, bool]]:
    found: dict[str, tuple[str, bool]] = {}
    for owner, is_protocol in ((protocol, True), (handler, False)):
        for name, member in inspect.getmembers(owner):
            if name.startswith("auth_"):
                mechanism = getattr(
                    member, "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-")
                )
                found[mechanism] = (name, is_protocol)
    return found


def _names(owner: type, prefix: str) -> dict[str, str]:
    """key -> attribute for the members named ``prefix + key`` (``smtp_DATA``: DATA)."""
    key = (owner, prefix)
    if key not in _NAMES:
        _NAMES[key] = {name[len(prefix) :]: name for name in dir(owner) if name.startswith(prefix)}
    return _NAMES[key]


class _Bound(Mapping[str, Any]):
    """aiosmtpd's per-connection tables of bound methods (commands, handler hooks), with the
    same keys and values, binding a method when it is looked up: a session uses a handful
    of some 20 entries, and building them all was most of this module's remaining cost."""

    __slots__ = ("_names", "_owner")

    def __init__(self, owner: object, names: dict[str, str]) -> None:
        self._owner, self._names = owner, names

    def __getitem__(self, key: str) -> Any:
        return getattr(self._owner, self._names[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _AuthMethods(Mapping[str, Any]):
    """aiosmtpd's ``_auth_methods`` (mechanism -> ``_AuthMechAttr``), built on lookup."""

    __slots__ = ("_handler", "_smtp", "_table")

    def __init__(self, smtp: SMTP, handler: object, table: dict[str, tuple[str, bool]]) -> None:
        self._smtp, self._handler, self._table = smtp, handler, table

    def __getitem__(self, mechanism: str) -> Any:
        name, own = self._table[mechanism]
        return aiosmtpd_smtp._AuthMechAttr(getattr(self._smtp if own else self._handler, name), own)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


def _ehlo_hook_version(handler: type) -> str | None:
    if handler not in _EHLO:
        _EHLO[handler] = _find_ehlo_version(handler)
    return _EHLO[handler]


def _find_ehlo_version(handler: type) -> str | None:
    hook = getattr(handler, "handle_EHLO", None)
    if hook is None:
        return None
    # Unbound here: one more parameter (self) than aiosmtpd sees on the bound method.
    count = len(inspect.signature(hook).parameters) - 1
    if count == 5:
        return "new"
    raise RuntimeError("the gateway's handlers use the 5-argument handle_EHLO hook")


def _loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # built outside a loop (a test): aiosmtpd's own choice
        return aiosmtpd_smtp.make_loop()


def init_smtp(
    smtp: SMTP,
    handler: Any,
    *,
    data_size_limit: int | None,
    enable_SMTPUTF8: bool,  # noqa: N803 - aiosmtpd's name
    decode_data: bool,
    hostname: str | None,
    ident: str | None,
    tls_context: ssl.SSLContext | None,
    require_starttls: bool,
    timeout: float,
    auth_require_tls: bool,
) -> None:
    """``SMTP.__init__(smtp, handler, ...)`` with these options and the rest at aiosmtpd's
    defaults (no ``auth_required``, ``authenticator``, call limits or PROXY protocol)."""
    loop = _loop()
    smtp.__ident__ = ident or _BUILTIN_IDENT
    smtp.loop = loop
    asyncio.StreamReaderProtocol.__init__(
        smtp,
        asyncio.StreamReader(loop=loop, limit=smtp.line_length_limit),
        client_connected_cb=smtp._cb_client_connected,
        loop=loop,
    )
    smtp.event_handler = handler
    smtp.data_size_limit = data_size_limit
    smtp.enable_SMTPUTF8 = enable_SMTPUTF8
    smtp._decode_data = decode_data
    smtp.hostname = hostname or socket.getfqdn()
    smtp.tls_context = tls_context
    smtp.require_starttls = tls_context and require_starttls
    smtp._timeout_duration = timeout
    smtp._timeout_handle = None
    smtp._tls_handshake_okay = True
    smtp._tls_protocol = None
    smtp._original_transport = None
    smtp.session = None
    smtp.envelope = None
    smtp.transport = None
    smtp._handler_coroutine = None
    smtp._auth_require_tls = auth_require_tls
    smtp._proxy_timeout = None
    smtp._auth_callback = aiosmtpd_smtp.login_always_fail
    smtp._authenticator = None
    smtp._auth_required = False
    protocol, handler_class = type(smtp), type(handler)
    # aiosmtpd annotates these tables as dicts but only reads them (get, keys, items).
    smtp._auth_methods = _AuthMethods(smtp, handler, _auth_table(protocol, handler_class))  # type: ignore[assignment]
    smtp._handle_hooks = _Bound(handler, _names(handler_class, "handle_"))  # type: ignore[assignment]
    smtp._ehlo_hook_ver = _ehlo_hook_version(handler_class)
    smtp._smtp_methods = _Bound(smtp, _names(protocol, "smtp_"))  # type: ignore[assignment]
    smtp._enforce_call_limit = False


# The form nearly every client sends, "<local@domain>" with dot-atoms of RFC 5322 §3.2.3
# atext: email._header_value_parser reads it as exactly these characters, with nothing to
# unquote or drop, so ``getaddr`` answers it without the parser (about 40 us a command).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ANGLE = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*)>")


def getaddr(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None]:
    """aiosmtpd's ``SMTP._getaddr`` (the address of MAIL FROM / RCPT TO and the rest of the
    line) without the ``typing.Protocol`` class it defines on every call: a class creation
    per command is ~10 % of a whole session's CPU. Same parser, same answers; the plain
    ``<local@domain>`` form and ``<>`` are answered directly (``_plain``)."""
    if not arg:
        return "", ""
    plain = _plain(arg)
    if plain is not None:
        addr, rest = plain
    else:
        try:
            parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
            address, rest = parse(arg)
        except HeaderParseError:
            return None, None
        addr = address.addr_spec  # type: ignore[union-attr,unused-ignore]
    localpart, _, _ = addr.rpartition("@")
    if local_part_limit and len(localpart) > local_part_limit:
        return None, None
    return addr, rest


def _plain(arg: str) -> tuple[str, str] | None:
    """``get_angle_addr``'s answer for "<>" and "<dot-atom@dot-atom>" followed by nothing,
    parameters or white space; None for anything else (the parser decides)."""
    if arg.startswith("<>"):
        return "<>", arg[2:]  # the parser's early return: nothing after ">" is consumed
    match = _PLAIN_ANGLE.match(arg)
    if match is None:
        return None
    rest = arg[match.end() :]
    if rest[:1] in (" ", "\t"):
        rest = rest.lstrip()  # get_angle_addr's trailing CFWS: get_fws() strips this way
    if rest.startswith("("):
        return None  # a comment: the parser's business
    return match.group(1), rest
