"""Shared provider helpers: transport error mapping, Retry-After, status classification, texts."""

from __future__ import annotations

import errno
import json
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import format_datetime

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtp2api.errors import (
    ConnectFailed,
    DeliveryError,
    OutcomeUnknown,
    PayloadBug,
    ProviderConfigError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    TransientDeliveryError,
)
from smtp2api.models import Address, Envelope, Message
from smtp2api.providers.base import (
    MAX_ERROR_BODY,
    MAX_RETRY_AFTER,
    RequestProgress,
    annotate,
    classify_status,
    error_code,
    error_text,
    find_request_id,
    for_envelope,
    map_http_errors,
    read_limited,
    redact,
    retry_after_seconds,
)
from smtp2api.replies import R451_TRY_LATER, SMTPReply

NOW = 1_750_000_000.0  # a fixed clock: 2025-06-15T15:06:40Z


def _http_date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC), usegmt=True)


# --- map_http_errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected", "code"),
    [
        (httpx.ConnectError("refused"), ConnectFailed, "4.4.1"),
        (httpx.ConnectTimeout("slow"), ConnectFailed, "4.4.1"),
        (httpx.PoolTimeout("pool"), ConnectFailed, "4.4.1"),
        (httpx.ProxyError("proxy"), ConnectFailed, "4.4.1"),
        (httpx.ReadTimeout("read"), OutcomeUnknown, "4.4.2"),
        (httpx.WriteTimeout("write"), OutcomeUnknown, "4.4.2"),
        (httpx.ReadError("reset"), OutcomeUnknown, "4.4.2"),
        (httpx.WriteError("broken pipe"), OutcomeUnknown, "4.4.2"),
        (httpx.RemoteProtocolError("garbage"), OutcomeUnknown, "4.4.2"),
        (httpx.CloseError("close"), OutcomeUnknown, "4.4.2"),
        (httpx.DecodingError("gzip"), OutcomeUnknown, "4.4.2"),
        (httpx.LocalProtocolError("bad header"), PayloadBug, "4.3.0"),
        (httpx.UnsupportedProtocol("ftp"), ProviderConfigError, "4.3.5"),
        (httpx.InvalidURL("bad"), ProviderConfigError, "4.3.5"),
        (TimeoutError(), OutcomeUnknown, "4.4.2"),
    ],
)
def test_map_http_errors(exc: Exception, expected: type[DeliveryError], code: str) -> None:
    with pytest.raises(expected) as caught, map_http_errors():
        raise exc
    error = caught.value
    assert error.reply.code == 451
    assert error.reply.enhanced == code
    # the detail names the exception class (or the overall deadline) for the logs
    assert ("deadline" if type(exc) is TimeoutError else type(exc).__name__) in error.detail
    # the exception's own text is for nobody: neither the reply nor the log detail
    if str(exc):
        assert str(exc) not in str(error.reply)
    assert error.__cause__ is exc


def test_map_http_errors_passes_other_exceptions_and_success() -> None:
    with map_http_errors():
        pass
    with pytest.raises(KeyError), map_http_errors():
        raise KeyError("x")
    original = RateLimited("already mapped")
    with pytest.raises(RateLimited) as caught, map_http_errors():
        raise original
    assert caught.value is original


def test_map_http_errors_names_the_os_error_not_its_text() -> None:
    exc = httpx.ConnectError("All connection attempts failed to secret.internal")
    exc.__cause__ = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    with pytest.raises(ConnectFailed) as caught, map_http_errors():
        raise exc
    assert "ConnectError" in caught.value.detail
    assert "ECONNREFUSED" in caught.value.detail
    assert "secret.internal" not in caught.value.detail


def test_map_http_errors_names_tls_and_dns_failures() -> None:
    tls = httpx.ConnectError("handshake")
    tls.__context__ = ssl.SSLCertVerificationError(1, "certificate verify failed")
    with pytest.raises(ConnectFailed) as caught, map_http_errors():
        raise tls
    assert "TLS" in caught.value.detail


async def test_deadline_before_sending_is_a_connect_failure() -> None:
    progress = RequestProgress()
    await progress.trace("connection.connect_tcp.started", {})
    with pytest.raises(ConnectFailed), map_http_errors(progress):
        raise TimeoutError
    await progress.trace("http11.send_request_headers.started", {})
    with pytest.raises(OutcomeUnknown), map_http_errors(progress):
        raise TimeoutError


def test_untraced_deadline_is_conservatively_unknown() -> None:
    # MockTransport and other transports never trace: assume the request may have gone out.
    with pytest.raises(OutcomeUnknown), map_http_errors(RequestProgress()):
        raise TimeoutError


# --- retry_after_seconds ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "120"}, 120.0),
        ({"retry-after": " 7 "}, 7.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": _http_date(NOW + 90)}, 90.0),
        ({"Retry-After": "Sunday, 15-Jun-25 15:08:40 GMT"}, 120.0),  # RFC 850 form
        ({"Retry-After": "Sun Jun 15 15:09:40 2025"}, 180.0),  # asctime form
        ({"Retry-After": _http_date(NOW - 3600)}, 0.0),  # in the past: go now
        ({"Retry-After": "999999999"}, MAX_RETRY_AFTER),
        ({"Retry-After": "-5"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "1e3"}, None),
        ({"Retry-After": "9" * 400}, None),  # overflows to inf: ignored, not a crash
        ({"RateLimit-Reset": "15"}, 15.0),
        ({"ratelimit-reset": "15"}, 15.0),
        ({"X-RateLimit-Reset": "30"}, 30.0),  # delta-seconds
        ({"X-RateLimit-Reset": str(int(NOW + 60))}, 60.0),  # epoch seconds
        ({"X-RateLimit-Reset": str(int((NOW + 45) * 1000))}, 45.0),  # epoch milliseconds
        ({"X-RateLimit-Reset": str(int(NOW - 60))}, 0.0),
        ({"Retry-After": "5", "RateLimit-Reset": "50", "X-RateLimit-Reset": "500"}, 5.0),
        ({"Retry-After": "garbage", "RateLimit-Reset": "50"}, 50.0),
        ({"RateLimit-Reset": "x", "X-RateLimit-Reset": "20"}, 20.0),
    ],
)
def test_retry_after_seconds(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_seconds(headers, now=NOW) == expected


def test_retry_after_reads_httpx_headers_case_insensitively() -> None:
    assert retry_after_seconds(httpx.Headers({"RETRY-AFTER": "3"}), now=NOW) == 3.0


def test_retry_after_uses_the_clock_by_default() -> None:
    wait = retry_after_seconds({"X-RateLimit-Reset": str(int(datetime.now(UTC).timestamp()) + 100)})
    assert wait is not None
    assert 95 <= wait <= 100


@given(
    st.dictionaries(
        st.sampled_from(["Retry-After", "RateLimit-Reset", "X-RateLimit-Reset", "Other"]),
        st.text(max_size=40),
    )
)
def test_retry_after_is_always_bounded(headers: dict[str, str]) -> None:
    wait = retry_after_seconds(headers, now=NOW)
    assert wait is None or 0.0 <= wait <= MAX_RETRY_AFTER


# --- classify_status -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected", "code", "enhanced"),
    [
        (301, ProviderConfigError, 451, "4.3.5"),
        (302, ProviderConfigError, 451, "4.3.5"),
        (307, ProviderConfigError, 451, "4.3.5"),
        (308, ProviderConfigError, 451, "4.3.5"),
        (400, ProviderRejected, 554, "5.6.0"),
        (401, ProviderConfigError, 451, "4.3.5"),
        (403, ProviderConfigError, 451, "4.3.5"),
        (404, ProviderConfigError, 451, "4.3.5"),
        (405, ProviderConfigError, 451, "4.3.5"),
        (408, OutcomeUnknown, 451, "4.4.2"),
        (409, OutcomeUnknown, 451, "4.4.2"),
        (413, ProviderRejected, 552, "5.3.4"),
        (415, PayloadBug, 451, "4.3.0"),
        (418, ProviderUnavailable, 451, "4.3.0"),
        (422, ProviderRejected, 554, "5.6.0"),
        (429, RateLimited, 451, "4.7.0"),
        (500, ProviderUnavailable, 451, "4.3.0"),
        (502, ProviderUnavailable, 451, "4.3.0"),
        (503, ProviderUnavailable, 451, "4.3.0"),
        (504, ProviderUnavailable, 451, "4.3.0"),
        (599, ProviderUnavailable, 451, "4.3.0"),
        (100, ProviderUnavailable, 451, "4.3.0"),
    ],
)
def test_classify_status(
    status: int, expected: type[DeliveryError], code: int, enhanced: str
) -> None:
    error = classify_status(status, headers={})
    assert type(error) is expected
    assert (error.reply.code, error.reply.enhanced) == (code, enhanced)
    assert error.status == status
    assert f"HTTP {status}" in error.detail


def test_classify_status_refuses_success() -> None:
    with pytest.raises(ValueError, match="success"):
        classify_status(202, headers={})


def test_classify_status_carries_retry_after_on_transient_errors() -> None:
    limited = classify_status(429, headers={"Retry-After": "42"})
    assert isinstance(limited, RateLimited)
    assert limited.retry_after == 42.0
    busy = classify_status(503, headers={"Retry-After": "9"})
    assert isinstance(busy, TransientDeliveryError)
    assert busy.retry_after == 9.0
    assert isinstance(limited := classify_status(429, headers={}), RateLimited)
    assert limited.retry_after is None


def test_classify_status_reply_names_code_and_request_id() -> None:
    error = classify_status(
        503, headers={"X-Request-Id": "req-77"}, provider_code="overloaded", detail="ctx"
    )
    assert error.request_id == "req-77"
    assert error.provider_code == "overloaded"
    assert str(error.reply) == (
        "451 4.3.0 Upstream error, try again later (code=overloaded, request_id=req-77)"
    )
    assert "ctx" in error.detail


def test_classify_status_shows_the_reason_only_when_the_message_is_at_fault() -> None:
    rejected = classify_status(422, headers={}, reason="Subject is required")
    assert str(rejected.reply) == "554 5.6.0 Message rejected upstream: Subject is required"
    config = classify_status(401, headers={}, reason="Invalid API key for account 1234")
    assert "Invalid API key" not in str(config.reply)
    assert "Invalid API key" in config.detail  # operators still see it in the logs
    assert classify_status(302, headers={}).detail.endswith("redirect not followed")


# --- error texts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"message": "Subject is required"}', "Subject is required"),
        (b'{"error": "invalid from"}', "invalid from"),
        (b'{"error": {"message": "nested", "code": "x"}}', "nested"),
        (b'{"errors": [{"message": "first"}, {"message": "second"}]}', "first"),
        (b'{"errors": ["plain string"]}', "plain string"),
        (
            b'{"type": "about:blank", "title": "Bad", "detail": "RFC 9457 detail"}',
            "RFC 9457 detail",
        ),
        (b'{"title": "Only a title"}', "Only a title"),
        (b'{"message": ""}', ""),
        (b'{"error": true}', ""),
        (b"[1, 2]", ""),
        (b"<html><body>502 Bad Gateway</body></html>", ""),
        (b"", ""),
        (b"\xff\xfe garbage", ""),
        (b"[" * 100_000, ""),  # absurd nesting: no RecursionError
        ('{"message": "str body"}', "str body"),
        ({"message": "already parsed"}, "already parsed"),
        (None, ""),
    ],
)
def test_error_text(body: object, expected: str) -> None:
    assert error_text(body) == expected


def test_error_text_is_one_safe_bounded_line() -> None:
    body = json.dumps({"message": "bad\r\n250 2.0.0 Ok\r\n.\r\n\x00\u00e9" + "x" * 5000})
    text = error_text(body)
    assert "\r" not in text
    assert "\n" not in text
    assert "\x00" not in text
    assert len(text) <= 120
    assert text.endswith("...")


def test_error_text_redacts_secrets() -> None:
    body = json.dumps(
        {
            "message": "key sk_live_51HxYzAbCdEf0123456789abcdefXYZ rejected; "
            "Bearer abc.def; hunter22pass"
        }
    )
    text = error_text(body, secrets=("hunter22pass",))
    assert "sk_live" not in text
    assert "abc.def" not in text
    assert "hunter22pass" not in text
    assert text.count("[redacted]") == 3


def test_redact_keeps_ordinary_words_and_short_values() -> None:
    assert redact("Invalid address bob@example.com", ("en",)) == "Invalid address bob@example.com"
    assert redact("ids like 12345 stay") == "ids like 12345 stay"


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=20,
    )
)
def test_error_text_never_breaks_the_reply_line(data: object) -> None:
    text = error_text({"message": data, "errors": [data], "error": data})
    assert len(text) <= 120
    assert all(" " <= ch <= "~" for ch in text)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"code": "invalid_from"}', "invalid_from"),
        (b'{"code": 4001}', "4001"),
        (b'{"name": "validation_error", "message": "x"}', "validation_error"),  # Resend
        (b'{"error": {"code": "E1"}}', "E1"),
        (b'{"errors": [{"code": "E2"}]}', "E2"),
        (b'{"message": "no code"}', None),
        (b"not json", None),
        (b'{"code": "\\r\\n"}', None),
    ],
)
def test_error_code(body: bytes, expected: str | None) -> None:
    assert error_code(body) == expected


def test_find_request_id() -> None:
    assert find_request_id({"X-Request-ID": "abc"}) == "abc"
    assert find_request_id(httpx.Headers({"x-amzn-RequestId": "aws-1"})) == "aws-1"
    assert find_request_id({"X-Request-Id": "a\r\nb"}) == "a b"
    assert find_request_id({"Server": "x"}) is None


def test_annotate_stays_within_the_smtp_line_limit() -> None:
    reply = annotate(R451_TRY_LATER, "r" * 1000, "c" * 1000, "i" * 1000)
    assert isinstance(reply, SMTPReply)
    assert len(str(reply)) + 2 <= 512  # RFC 5321 §4.5.3.1.5, CRLF included
    assert "request_id=" in reply.text
    assert annotate(R451_TRY_LATER) == R451_TRY_LATER


# --- read_limited, for_envelope --------------------------------------------------------


async def test_read_limited_bounds_the_body() -> None:
    response = httpx.Response(200, content=b"x" * (5 * MAX_ERROR_BODY))
    assert len(await read_limited(response)) == MAX_ERROR_BODY
    assert await read_limited(httpx.Response(200, content=b"small")) == b"small"


class _Broken(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"id": "m'
        raise httpx.ReadError("reset")


async def test_read_limited_keeps_what_arrived_before_a_break() -> None:
    assert await read_limited(httpx.Response(200, stream=_Broken())) == b'{"id": "m'


class _OneShot(httpx.AsyncByteStream):
    """A network body: it can be read once."""

    def __init__(self) -> None:
        self.chunks = [b'{"id": ', b'"once"}']

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.chunks:
            yield self.chunks.pop(0)


async def test_read_limited_reads_the_stream_once_or_the_body_already_read() -> None:
    assert await read_limited(httpx.Response(200, stream=_OneShot())) == b'{"id": "once"}'
    read = httpx.Response(200, stream=_OneShot())
    await read.aread()
    assert await read_limited(read) == b'{"id": "once"}'


def _message(to: tuple[str, ...], cc: tuple[str, ...] = (), bcc: tuple[str, ...] = ()) -> Message:
    return Message(
        id="m1",
        raw=b"",
        from_=Address("s@example.com"),
        to=tuple(Address(a, "N") for a in to),
        cc=tuple(Address(a) for a in cc),
        bcc=tuple(Address(a) for a in bcc),
    )


def test_for_envelope_returns_the_same_message_when_it_matches() -> None:
    message = _message(("a@x.test",), ("b@x.test",), ("c@x.test",))
    envelope = Envelope("s@example.com", ("a@x.test", "B@x.test", "c@x.test"))
    assert for_envelope(message, envelope) is message


def test_for_envelope_cuts_to_the_chunk_and_adds_hidden_recipients() -> None:
    message = _message(("a@x.test", "b@x.test"), ("c@x.test",))
    chunk = Envelope("s@example.com", ("b@x.test", "d@x.test", "d@x.test"))
    cut = for_envelope(message, chunk)
    assert cut.to == (Address("b@x.test", "N"),)
    assert cut.cc == ()
    assert cut.bcc == (Address("d@x.test"),)
    assert cut.recipients == ("b@x.test", "d@x.test")
