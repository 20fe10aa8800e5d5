"""Logging: one JSON object per line, control characters escaped, secrets masked, mail.log
kept above DEBUG, safe reconfiguration."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any, Literal

import pytest
import structlog
from pydantic import SecretStr

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
