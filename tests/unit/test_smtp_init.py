"""``init_smtp`` leaves a session exactly as aiosmtpd's ``SMTP.__init__`` would."""

from __future__ import annotations

import ssl
import weakref
from collections.abc import Mapping
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from smtp2api.auth import Authenticator
from smtp2api.policy import Policy
from smtp2api.smtp import GatewaySMTP, Handler
from smtp2api.smtp_guard import _ASCII_MAILBOX, _MAILBOX, parse_path
from smtp2api.smtp_init import getaddr, init_smtp


async def _accept(*_: Any) -> Any:
    raise AssertionError("not called")


def _handler() -> Handler:
    return Handler(
        policy=Policy([], []),
        authenticator=Authenticator({}),
        accept=_accept,
        new_id=lambda: "id",
        route_size_limit=lambda account, sender: None,
        max_recipients=10,
    )


def _normal(value: Any, me: object) -> Any:
    """A comparable form: bound methods by function and owner, containers element-wise."""
    if hasattr(value, "__self__") and hasattr(value, "__func__"):
        return ("method", value.__func__, "self" if value.__self__ is me else value.__self__)
    if isinstance(value, Mapping):  # init_smtp's tables bind on lookup: compare what they give
        return {k: _normal(v, me) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_normal(v, me) for v in value)
    if isinstance(value, weakref.ref):
        value = value()
    if type(value).__module__.startswith("asyncio") or type(value).__name__ == "Future":
        return ("object", type(value))  # a fresh reader, future or event per session
    return value


@pytest.mark.parametrize("tls", [False, True])
async def test_same_state_as_aiosmtpd(tls: bool) -> None:
    handler = _handler()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH) if tls else None
    options: dict[str, Any] = {
        "data_size_limit": 1000,
        "enable_SMTPUTF8": True,
        "decode_data": False,
        "hostname": "gw.test",
        "ident": "ESMTP",
        "tls_context": context,
        "require_starttls": False,
        "timeout": 30.0,
        "auth_require_tls": True,
    }
    slow = GatewaySMTP.__new__(GatewaySMTP)
    SMTP.__init__(slow, handler, **options)
    fast = GatewaySMTP.__new__(GatewaySMTP)
    init_smtp(fast, handler, **options)
    # Deliberate difference: aiosmtpd takes *instance* attributes named auth_* for AUTH
    # mechanisms too (Handler.auth_throttle would be advertised as "AUTH THROTTLE");
    # init_smtp only takes methods defined on the classes.
    instance_attrs = {k.removeprefix("auth_").upper() for k in vars(handler)}
    slow._auth_methods = {
        k: v for k, v in slow._auth_methods.items() if k.upper() not in instance_attrs
    }
    slow_state = {k: _normal(v, slow) for k, v in vars(slow).items()}
    fast_state = {k: _normal(v, fast) for k, v in vars(fast).items()}
    assert sorted(fast_state) == sorted(slow_state)
    for key, expected in slow_state.items():
        assert fast_state[key] == expected, key
    # The tables are what the session dispatches on.
    assert list(fast._smtp_methods) == list(slow._smtp_methods)
    assert list(fast._auth_methods) == list(slow._auth_methods)
    assert list(fast._handle_hooks) == list(slow._handle_hooks)


async def test_tables_are_per_class() -> None:
    class WithXoauth(GatewaySMTP):
        async def auth_XOAUTH2(self, _: Any, args: list[str]) -> Any:  # noqa: N802
            raise AssertionError("not called")

    handler = _handler()
    options: dict[str, Any] = {
        "data_size_limit": None,
        "enable_SMTPUTF8": True,
        "decode_data": False,
        "hostname": "gw.test",
        "ident": None,
        "tls_context": None,
        "require_starttls": False,
        "timeout": 30.0,
        "auth_require_tls": True,
    }
    plain = GatewaySMTP.__new__(GatewaySMTP)
    init_smtp(plain, handler, **options)
    extended = WithXoauth.__new__(WithXoauth)
    init_smtp(extended, handler, **options)
    assert "XOAUTH2" in extended._auth_methods
    assert "XOAUTH2" not in plain._auth_methods
    assert extended._auth_methods["XOAUTH2"].method.__self__ is extended


@pytest.mark.parametrize(
    "arg",
    [
        "",
        "<a@example.com>",
        "<a@example.com> SIZE=100 BODY=8BITMIME",
        "a@example.com",
        "<>",
        '<"quoted local"@example.com>',
        "<@route.example:a@example.com>",
        "<a@[192.0.2.1]>",
        "<no-at-sign>",
        "<unterminated@example.com",
        "<a@example.com",
        "   <spaced@example.com>  ",
        "<" + "x" * 70 + "@example.com>",
        "<a\x00b@example.com>",
        "<über@例え.jp>",
        "<a@b@c>",
    ],
)
@pytest.mark.parametrize("limit", [0, 64])
def test_getaddr_matches_aiosmtpd(arg: str, limit: int) -> None:
    class Probe(SMTP):
        def __init__(self) -> None:  # only what _getaddr reads
            self.local_part_limit = limit

    assert getaddr(arg, limit) == Probe()._getaddr(arg)


class _Aiosmtpd(SMTP):
    def __init__(self, limit: int) -> None:  # only what _getaddr reads
        self.local_part_limit = limit


_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
_ODD = ' \t."()<>@,:;[]\\\x00\x0b\x85\u3000é'
_atoms = st.text(alphabet=_ATEXT, min_size=0, max_size=6)
_dotted = st.lists(_atoms, min_size=1, max_size=3).map(".".join)
_tails = st.sampled_from(
    [
        "",
        " ",
        "  SIZE=100",
        "\tBODY=8BITMIME",
        " \x0bX",
        "\x0bX",
        "x",
        " (c) SIZE=1",
        "(c)",
        " \u3000SMTPUTF8",
        " \x85",
        ">",
        " <b@c>",
    ]
)
_addresses = st.one_of(
    st.builds(lambda lp, dom: f"<{lp}@{dom}>", _dotted, _dotted),
    st.builds(lambda lp, dom: f"{lp}@{dom}", _dotted, _dotted),
    st.builds(lambda a, b: f"<{a}{b}>", st.text(alphabet=_ATEXT + _ODD, max_size=12), _dotted),
    st.just("<>"),
)


@settings(max_examples=2000, deadline=None)
@given(
    lead=st.sampled_from(["", " ", "\t"]),
    address=_addresses,
    tail=st.one_of(_tails, st.text(alphabet=_ATEXT + _ODD, max_size=8)),
    limit=st.sampled_from([0, 3, 64]),
)
@example(lead="", address="<a@b.example>", tail=" \x0bX", limit=0)
@example(lead="", address="<a@b.example>", tail=" (comment) SIZE=1", limit=0)
@example(lead="", address="<a@b.example>", tail="\x0bX", limit=0)
@example(lead="", address="<>", tail=" SIZE=1", limit=0)
@example(lead="", address="<abcd@b.example>", tail="", limit=3)
def test_getaddr_matches_aiosmtpd_on_generated_forms(
    lead: str, address: str, tail: str, limit: int
) -> None:
    # The plain "<local@domain>" form skips the parser: every answer must still be the
    # parser's, for that form and for everything near it.
    arg = lead + address + tail
    assert _outcome(getaddr, arg, limit) == _outcome(_Aiosmtpd(limit)._getaddr, arg)


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:  # the parser's own bugs ("0@": IndexError) must be the same
        return type(exc)


@settings(max_examples=1000, deadline=None)
@given(
    path=st.lists(
        st.sampled_from(["a", "Z", "0", "-", "_", ".", "@", "+", "!", "~", '"', " ", "é", "\x00"]),
        max_size=20,
    ).map("".join)
)
def test_the_ascii_mailbox_pattern_is_the_full_one_on_ascii(path: str) -> None:
    # parse_path matches ASCII paths (nearly all) with the pattern minus its UTF-8
    # alternatives; both must accept exactly the same ASCII strings.
    if path.isascii():
        assert bool(_ASCII_MAILBOX.fullmatch(path)) == bool(_MAILBOX.fullmatch(path))
    if path:  # "<>" is the null path, valid on its own terms
        assert parse_path(f"TO:<{path}>", "TO:", utf8=True)[1] == (
            bool(_MAILBOX.fullmatch(path)) and len(path.encode()) <= 254
        )
