"""Logging: one JSON object per line, control characters escaped, secrets masked, mail.log
kept above DEBUG, safe reconfiguration."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from smtp2api import log_processors as procs
from smtp2api.logs import (
    MASK,
    bind,
    bind_session,
    bound,
    configure_logging,
    escape_control,
    get_logger,
    unbind,
)

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
NASTY = "a\r\nb\x00c\x1b[31md\x7fe\x85f\u2028g\tend"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    watched = {name: logging.getLogger(name).level for name in ("mail.log", "httpx", "httpcore")}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, old in watched.items():
        logging.getLogger(name).setLevel(old)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def setup(level: str = "debug", fmt: Literal["json", "console"] = "json") -> io.StringIO:
    buf = io.StringIO()
    configure_logging(level, fmt, buf)
    return buf


def events(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_one_json_object_per_line_with_timestamp_level_and_context() -> None:
    buf = setup()
    log = get_logger("smtp2api.test")
    bind_session(session_id="s1", peer="192.0.2.1")
    log.info("session_started")
    with bound(msg_id="m1"):
        log.warning("message_spooled", size=123)
    log.debug("session_ended")

    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = events(buf)
    assert first["event"] == "session_started"
    assert first["level"] == "info"
    assert ISO_UTC.match(first["timestamp"])
    assert first["session_id"] == "s1"
    assert first["peer"] == "192.0.2.1"
    assert first["logger"] == "smtp2api.test"
    assert second == second | {"level": "warning", "msg_id": "m1", "size": 123}
    assert "msg_id" not in third
    assert list(first)[:3] == ["timestamp", "level", "event"]


def test_bind_session_starts_from_a_clean_context() -> None:
    buf = setup()
    bind(msg_id="old", account="wp")
    bind_session(session_id="s2")
    bind(account="shop")
    unbind("account")
    get_logger().info("x")
    (event,) = events(buf)
    assert event["session_id"] == "s2"
    assert "msg_id" not in event
    assert "account" not in event


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_control_characters_are_escaped_so_an_event_is_one_line(
    fmt: Literal["json", "console"],
) -> None:
    buf = setup(fmt=fmt)
    get_logger().info(
        "message_received" + "\n",
        sender=NASTY,
        recipients=[NASTY],
        extra={"k\r\n": NASTY},
        reply=ValueError(NASTY),
    )
    text = buf.getvalue()
    assert text.count("\n") == 1
    assert len(text.splitlines()) == 1  # splitlines also breaks at \x85 and \u2028
    for raw in ("\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\t"):
        assert raw not in text


def test_escaped_values_stay_readable_in_json() -> None:
    buf = setup()
    get_logger().info("x", sender=NASTY)
    (event,) = events(buf)
    assert event["sender"] == escape_control(NASTY)
    assert event["sender"] == "a\\r\\nb\\x00c\\x1b[31md\\x7fe\\x85f\\u2028g\\tend"


def test_stdlib_records_pass_the_same_guards() -> None:
    buf = setup()
    logging.getLogger("asyncio").warning("peer said %r then\r\nFAKE event", "x\n")
    (event,) = events(buf)
    assert event["logger"] == "asyncio"
    assert event["level"] == "warning"
    assert "\\r\\nFAKE" in event["event"]
    assert len(buf.getvalue().splitlines()) == 1


def test_secret_looking_keys_and_secret_values_are_masked() -> None:
    buf = setup()
    get_logger().info(
        "auth_checked",
        password="hunter2",
        api_key="sk-live-1",
        client_secret="s3",
        session_token="t0k",
        Authorization="Bearer abc.def",
        auth_data="AHVzZXIAcGFzcw==",
        headers={"X-Api-Key": "k", "Content-Type": "text/plain", "authorization": "Basic x"},
        key=SecretStr("hidden"),
        value="Bearer eyJhbGciOi",
        account="wordpress",
    )
    text = buf.getvalue()
    for secret in ("hunter2", "sk-live-1", "s3", "t0k", "abc.def", "AHVzZXIA", "hidden", "eyJ"):
        assert secret not in text
    (event,) = events(buf)
    assert event["password"] == MASK
    assert event["key"] == MASK
    assert event["headers"] == {
        "X-Api-Key": MASK,
        "Content-Type": "text/plain",
        "authorization": MASK,
    }
    assert event["value"] == f"Bearer {MASK}"
    assert event["account"] == "wordpress"


def test_secrets_in_bound_context_are_masked_too() -> None:
    buf = setup()
    bind_session(password="hunter2")
    get_logger().info("x")
    assert "hunter2" not in buf.getvalue()


def test_json_exceptions_are_structured_escaped_and_without_locals() -> None:
    buf = setup()
    password = "hunter2"  # a local the traceback must not show
    try:
        raise ValueError(f"bad\r\nINFO forged {len(password)}")
    except ValueError:
        get_logger().exception("delivery_failed")
    text = buf.getvalue()
    assert len(text.splitlines()) == 1
    assert "hunter2" not in text
    (event,) = events(buf)
    assert event["exception"][0]["exc_type"] == "ValueError"
    assert event["exception"][0]["exc_value"].startswith("bad\\r\\nINFO forged")


def test_console_traceback_is_indented_and_its_message_escaped() -> None:
    buf = setup(fmt="console")
    try:
        raise ValueError("bad\nINFO forged")
    except ValueError:
        get_logger().exception("boom")
    lines = buf.getvalue().splitlines()
    assert "boom" in lines[0]
    assert len(lines) > 1
    assert all(line.startswith("    ") for line in lines[1:])
    assert "    ValueError: bad\\nINFO forged" in lines


def test_mail_log_stays_above_debug_even_at_debug_level() -> None:
    buf = setup("debug")
    mail_log = logging.getLogger("mail.log")
    assert not mail_log.isEnabledFor(logging.DEBUG)
    mail_log.debug("DATA readline: %s", b"Subject: secret body")
    mail_log.info("%r handling connection", ("192.0.2.1", 1234))
    assert "secret body" not in buf.getvalue()
    assert [e["logger"] for e in events(buf)] == ["mail.log"]


def test_mail_log_and_httpx_are_quiet_at_info() -> None:
    buf = setup("info")
    logging.getLogger("mail.log").info("'peer' >> b'MAIL FROM:<a@example.com>'")
    logging.getLogger("httpx").info("HTTP Request: POST https://api.example.net/?key=x")
    logging.getLogger("mail.log").warning("too many bogus commands")
    assert [e["event"] for e in events(buf)] == ["too many bogus commands"]


def test_level_filters_structlog_and_stdlib() -> None:
    buf = setup("warning")
    log = get_logger()
    log.info("hidden")
    logging.getLogger("x").info("hidden too")
    log.error("shown")
    assert [e["event"] for e in events(buf)] == ["shown"]


def test_reconfigure_replaces_stream_level_and_format() -> None:
    log = get_logger("made.before.reload")  # module-level loggers exist before any reload
    first = setup("info")
    log.debug("not yet")
    second = setup("debug", "console")
    log.debug("now visible")
    logging.getLogger("x").warning("stdlib once")
    assert first.getvalue() == ""
    out = second.getvalue().splitlines()
    assert len(out) == 2
    assert "now visible" in out[0]
    assert "stdlib once" in out[1]
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_StdlibHandler"]
    assert len(ours) == 1


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("verbose", "json", io.StringIO())


def test_a_broken_stream_never_raises_into_the_caller() -> None:
    buf = setup()
    buf.close()
    get_logger().info("lost")
    logging.getLogger("x").warning("lost too")


# The JSON hot path (``_JsonLine``) against the processor chain it stands for -----------------

_TEXT = st.text(
    # "\u017f" (long s) folds onto "s" under IGNORECASE, as in "Ba\u017fic".
    alphabet=st.sampled_from(list('aB \t\r\n\x00\x1b\x7f\x85\u2028\u00e9"\\:bearic-_\u017f')),
    max_size=12,
)
_KEYS = st.one_of(
    st.sampled_from(["sender", "password", "X-Api-Key", "event", "logger", "level", "k\n"]),
    _TEXT,
)
_SCALARS = st.one_of(
    _TEXT,
    st.sampled_from(
        ["Bearer abc", " basic x", "BEARER  y", "Bearer ", "bearerx y", "Ba\u017fic z"]
    ),
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
)
_VALUES = st.recursive(
    st.one_of(_SCALARS, st.builds(SecretStr, _TEXT)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(_KEYS, st.integers()), inner, max_size=3),
        st.tuples(inner),
    ),
    max_leaves=6,
)


class _Named:
    def __init__(self, name: str | None) -> None:
        self.name = name


def _fast_and_chain(event_dict: dict[str, Any], method: str, name: str | None) -> tuple[Any, Any]:
    """What the hot path and the processor chain it stands for make of one event."""
    setup("debug")
    (fast,) = structlog.get_config()["processors"][1:]
    assert isinstance(fast, procs.JsonLine)
    logger = _Named(name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(procs, "utc_timestamp", lambda: "2026-01-02T03:04:05.000006Z")
        expected: Any = dict(event_dict)
        for processor in fast._chain:
            expected = processor(logger, method, expected)
        return fast(logger, method, dict(event_dict)), expected


@settings(max_examples=400, deadline=None)
@given(
    event=st.one_of(st.none(), _TEXT),
    fields=st.dictionaries(_KEYS, _VALUES, max_size=6),
    method=st.sampled_from(["info", "warning", "warn", "exception", "debug"]),
    name=st.sampled_from([None, "", "smtp2api.intake", "x\ny"]),
)
def test_json_hot_path_writes_what_the_processor_chain_writes(
    event: str | None, fields: dict[str, Any], method: str, name: str | None
) -> None:
    event_dict = dict(fields) | ({} if event is None else {"event": event})
    fast, chain = _fast_and_chain(event_dict, method, name)
    assert fast == chain


@pytest.mark.parametrize(
    "value",
    [
        "Bearer abc",
        " basic x",
        "BEARER  y",
        "Bearer ",
        "Bearer",
        "bearerx y",
        "Ba\u017fic z",
        "Bearer\tx",
        "\u2003Bearer x",
        "x Bearer y",
        'Bearer "x"',
    ],
)
def test_hot_path_masks_authorization_values_as_the_chain_does(value: str) -> None:
    # Clean keys and plain values: the case the hot path renders before it checks.
    event_dict = {"event": "request_sent", "header": value, "status": 200, "peer": "192.0.2.1"}
    fast, chain = _fast_and_chain(event_dict, "info", "smtp2api.x")
    assert fast == chain
    assert ("**********" in fast) == bool(re.match(r"\s*(bearer|basic)\s+\S", value, re.I))


@pytest.mark.parametrize("ns", [1_700_000_000_000_000_000, 1_700_000_005_123_456_789, 999_000])
def test_utc_timestamp_is_timestampers_iso_format(monkeypatch: pytest.MonkeyPatch, ns: int) -> None:
    monkeypatch.setattr(procs, "_second", (-1, ""))
    monkeypatch.setattr(procs.time, "time_ns", lambda: ns)
    when = datetime.fromtimestamp(ns // 1000 / 1e6, UTC).replace(microsecond=ns // 1000 % 10**6)
    assert procs.utc_timestamp() == when.isoformat().replace("+00:00", "Z")
    assert procs.utc_timestamp() == when.isoformat().replace("+00:00", "Z")  # from the cache


def test_a_secret_key_stays_masked_on_the_hot_path_whatever_its_value() -> None:
    buf = setup()
    log = get_logger()
    for value in ("plain", 7, None, "a\nb"):
        log.info("x", api_key=value, session_token=value)
    assert all(e["api_key"] == MASK and e["session_token"] == MASK for e in events(buf))


def test_bound_restores_each_key_as_it_was_even_nested() -> None:
    bind(account="outer")
    with bound(account="inner", msg_id="m1"):
        with bound(msg_id="m2"):
            assert structlog.contextvars.get_contextvars() == {"account": "inner", "msg_id": "m2"}
        assert structlog.contextvars.get_contextvars() == {"account": "inner", "msg_id": "m1"}
    assert structlog.contextvars.get_contextvars() == {"account": "outer"}
