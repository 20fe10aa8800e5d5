"""The ``graph`` provider without a network: error mapping, MIME surgery, exact requests
(``httpx.MockTransport``), token bookkeeping and startup checks."""

from __future__ import annotations

import asyncio
import base64
import datetime
import email
import email.policy
import json
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from smtp2api.config import GraphProvider, build_settings
from smtp2api.errors import (
    ConfigError,
    ProviderConfigError,
    ProviderRejected,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
)
from smtp2api.models import Envelope, Message
from smtp2api.providers import graph_auth
from smtp2api.providers.graph import UPLOAD_CHUNK, GraphApiProvider
from smtp2api.providers.graph_auth import MsalHttp, TokenSource, load_certificate
from smtp2api.providers.graph_errors import map_graph_error
from smtp2api.providers.graph_mime import address_to_envelope, b64_size, detach_large_parts


def graph_settings(**extra: Any) -> GraphProvider:
    data = {
        "providers": {
            "m365": {
                "type": "graph",
                "tenant_id": "t-1",
                "client_id": "c-1",
                "client_secret": "s3cret-value-1234",
                "base_url": "http://127.0.0.1:9",
                **extra,
            }
        }
    }
    settings = build_settings(data).providers["m365"]
    assert isinstance(settings, GraphProvider)
    return settings


def body(code: str, message: str = "m", request_id: str = "req-1") -> bytes:
    inner = {"date": "2024-01-01T00:00:00", "request-id": request_id}
    return json.dumps({"error": {"code": code, "message": message, "innerError": inner}}).encode()


# --- error mapping ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "message", "cls", "reply"),
    [
        (400, "ErrorInvalidRecipients", "bad rcpt", ProviderRejected, "553 5.1.3"),
        (
            400,
            "ErrorMimeContentInvalidBase64String",
            "Invalid base64",
            ProviderRejected,
            "554 5.6.0",
        ),
        (400, "ErrorMessageSizeExceeded", "big", ProviderRejected, "552 5.3.4"),
        (413, "RequestEntityTooLarge", "big", ProviderRejected, "552 5.3.4"),
        (401, "InvalidAuthenticationToken", "expired", ProviderConfigError, "451 4.3.5"),
        (403, "ErrorAccessDenied", "denied", ProviderConfigError, "451 4.3.5"),
        (403, "ErrorSendAsDenied", "denied", ProviderConfigError, "451 4.3.5"),
        (404, "ErrorInvalidUser", "no user", ProviderConfigError, "451 4.3.5"),
        (404, "MailboxNotEnabledForRESTAPI", "no", ProviderConfigError, "451 4.3.5"),
        (429, "TooManyRequests", "slow down", RateLimited, "451 4.7.0"),
        (
            503,
            "ApplicationThrottled",
            "over its MailboxConcurrency limit",
            RateLimited,
            "451 4.7.0",
        ),
        (403, "ErrorQuotaExceeded", "quota", QuotaExhausted, "451 4.7.0"),
        (503, "ServiceUnavailable", "busy", ProviderUnavailable, "451 4.3.0"),
        (500, "InternalServerError", "oops", ProviderUnavailable, "451 4.3.0"),
    ],
)
def test_error_table(status: int, code: str, message: str, cls: type, reply: str) -> None:
    error = map_graph_error(status, httpx.Headers(), body(code, message))
    assert type(error) is cls
    assert str(error.reply).startswith(reply)
    assert (error.provider_code, error.request_id, error.status) == (code, "req-1", status)
    assert f"(code={code}, request_id=req-1)" in error.reply.text
    # The provider's own words reach the client only when the message is at fault.
    assert (message in error.reply.text) == reply.startswith("55")


def test_retry_after_is_kept_and_header_request_id_used() -> None:
    headers = httpx.Headers({"Retry-After": "7", "request-id": "hdr-9"})
    error = map_graph_error(429, headers, b"not json")
    assert isinstance(error, RateLimited)
    assert error.retry_after == 7.0
    assert error.request_id == "hdr-9"
    unavailable = map_graph_error(503, httpx.Headers({"Retry-After": "3"}), body("X"))
    assert unavailable.retry_after == 3.0  # type: ignore[attr-defined]


# --- recipients -------------------------------------------------------------------------------


def mime(to: str, cc: str | None = None, linesep: str = "\r\n") -> bytes:
    head = f"From: a@example.com{linesep}To: {to}{linesep}"
    if cc is not None:
        head += f"Cc: {cc}{linesep}"
    return (head + f"Subject: s{linesep}{linesep}body{linesep}").encode()


def parse(raw: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def fields(raw: bytes) -> dict[str, str]:
    return {k: str(v) for k, v in parse(raw).items()}


def test_matching_headers_are_kept_byte_for_byte() -> None:
    raw = mime('"Smith, J" <j@example.com>', "k@example.com")
    assert address_to_envelope(raw, ["j@example.com", "K@EXAMPLE.COM"]) == raw


def test_bcc_recipients_are_added_and_header_only_dropped() -> None:
    raw = mime("J <j@example.com>, list@example.com", "Jörg <joerg@example.com>")
    out = address_to_envelope(raw, ["j@example.com", "joerg@example.com", "hidden@example.org"])
    got = fields(out)
    assert got["To"] == "J <j@example.com>"
    assert got["Cc"] == "Jörg <joerg@example.com>"
    assert got["Bcc"] == "hidden@example.org"
    assert out.endswith(b"Subject: s\r\n\r\nbody\r\n")
    assert out.count(b"\r\n\r\n") == 1  # the header section still ends where it did


def test_duplicates_groups_and_lf_line_endings() -> None:
    raw = mime("team: a@example.com, a@example.com;, undisclosed-recipients:;", linesep="\n")
    out = address_to_envelope(raw, ["a@example.com"])
    assert fields(out)["To"] == "a@example.com"
    assert b"\r" not in out


def test_bcc_only_message_and_quoted_names() -> None:
    raw = mime('"=?not encoded?=" <x@example.com>')
    out = address_to_envelope(raw, ["x@example.com", "y@example.com"])
    assert fields(out)["Bcc"] == "y@example.com"
    assert b'To: "=?not encoded?=" <x@example.com>' in out
    out = address_to_envelope(mime("other@example.com"), ["y@example.com"])
    assert "To" not in fields(out)
    assert fields(out)["Bcc"] == "y@example.com"


# --- large parts ------------------------------------------------------------------------------


def multipart(*files: tuple[str, bytes], text: str = "hello\n") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.com", "b@example.com", "s"
    if text:
        msg.set_content(text)
    for name, content in files:
        msg.add_attachment(content, maintype="application", subtype="pdf", filename=name)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def test_largest_attachments_are_cut_first() -> None:
    raw = multipart(("big.pdf", b"B" * 60_000), ("mid.pdf", b"M" * 30_000), ("small.pdf", b"s"))
    split = detach_large_parts(raw, b64_size(len(raw)) - 1000)
    assert split is not None
    rest, detached = split
    assert [(d.name, d.content, d.inline) for d in detached] == [("big.pdf", b"B" * 60_000, False)]
    kept = parse(rest)
    assert [p.get_filename() for p in kept.iter_attachments()] == ["mid.pdf", "small.pdf"]
    text = kept.get_body(("plain",))
    assert text is not None
    assert text.get_content() == "hello\r\n"
    assert rest.startswith(raw[:200])  # headers untouched


def test_a_multipart_never_ends_up_empty() -> None:
    msg = EmailMessage()
    msg["From"], msg["To"] = "a@example.com", "b@example.com"
    msg.add_attachment(b"X" * 50_000, maintype="image", subtype="png", filename="x.png")
    msg.add_attachment(b"Y" * 50_000, maintype="image", subtype="png", filename="y.png")
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    split = detach_large_parts(raw, 2000)
    assert split is not None
    rest, detached = split
    assert [d.name for d in detached] == ["x.png", "y.png"]
    parts = list(parse(rest).iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain"]


def test_inline_image_keeps_content_id_and_quoted_printable_is_decoded() -> None:
    msg = EmailMessage()
    msg["From"], msg["To"] = "a@example.com", "b@example.com"
    msg.set_content("see image")
    msg.add_alternative("<img src='cid:logo'>", subtype="html")
    html = list(msg.iter_parts())[1]
    assert isinstance(html, EmailMessage)
    html.add_related(b"P" * 40_000, "image", "png", cid="<logo@x>", filename="logo.png")
    msg.add_attachment("é" * 30_000, subtype="csv", cte="quoted-printable", filename="t.csv")
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    split = detach_large_parts(raw, 5_000)
    assert split is not None
    detached = {d.name: d for d in split[1]}
    assert detached["logo.png"].content_id == "logo@x"
    assert detached["logo.png"].inline
    assert detached["t.csv"].content == ("é" * 30_000).encode() + b"\r\n"


def test_signed_parts_are_never_cut() -> None:
    inner = multipart(("big.pdf", b"B" * 60_000)).split(b"\r\n\r\n", 1)
    content_type = next(
        line for line in inner[0].split(b"\r\n") if line.startswith(b"Content-Type")
    )
    raw = (
        b"From: a@example.com\r\nTo: b@example.com\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
        b'micalg=sha-256; boundary="sig"\r\n\r\n--sig\r\n'
        + content_type
        + b"\r\n\r\n"
        + inner[1]
        + b"\r\n--sig\r\nContent-Type: application/pkcs7-signature; name=smime.p7s\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--sig--\r\n"
    )
    assert detach_large_parts(raw, 10_000) is None


def test_body_too_large_for_any_cut() -> None:
    assert detach_large_parts(multipart(text="x" * 50_000), 10_000) is None


# --- requests (MockTransport) -----------------------------------------------------------------


class StubTokens:
    def __init__(self) -> None:
        self.tokens = ["tok-1", "tok-2", "tok-3"]
        self.invalidated: list[str] = []

    async def get(self) -> str:
        return self.tokens[0]

    async def invalidate(self, token: str) -> None:
        self.invalidated.append(token)
        if self.tokens[0] == token:
            self.tokens.pop(0)

    def close(self) -> None:
        pass


Handler = Any


def provider(handler: Handler, **extra: Any) -> tuple[GraphApiProvider, StubTokens]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    graph = GraphApiProvider("m365", graph_settings(**extra), client)
    stub = StubTokens()
    graph.tokens = stub  # type: ignore[assignment]
    return graph, stub


def message(raw: bytes) -> Message:
    return Message(id="gw-id-1", raw=raw, from_=None, to=())


async def test_send_mail_request_is_exact() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()
        seen.append(request)
        return httpx.Response(202)

    graph, _ = provider(handler)
    raw = mime("j@example.com")
    result = await graph.send(message(raw), Envelope("o'neil+x@example.com", ("j@example.com",)))
    assert (result.provider, result.provider_id) == ("m365", "gw-id-1")
    [request] = seen
    assert str(request.url) == "http://127.0.0.1:9/v1.0/users/o%27neil%2Bx@example.com/sendMail"
    assert request.headers["content-type"] == "text/plain"
    assert request.headers["authorization"] == "Bearer tok-1"
    assert request.headers["content-length"] == str(len(request.content))
    assert base64.b64decode(request.content, validate=True) == raw


async def test_401_invalidates_and_retries_once() -> None:
    statuses = [401, 202]
    auth: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()
        auth.append(request.headers["authorization"])
        return httpx.Response(statuses.pop(0), content=body("InvalidAuthenticationToken"))

    graph, stub = provider(handler)
    await graph.send(message(mime("j@example.com")), Envelope("a@example.com", ("j@example.com",)))
    assert auth == ["Bearer tok-1", "Bearer tok-2"]
    assert stub.invalidated == ["tok-1"]


async def test_no_mailbox_is_a_config_error() -> None:
    graph, _ = provider(lambda request: httpx.Response(202))
    with pytest.raises(ProviderConfigError, match="user_id"):
        await graph.send(message(mime("j@example.com")), Envelope("", ("j@example.com",)))


async def test_upload_session_slices_and_refused_upload_url() -> None:
    raw = multipart(("big.pdf", bytes(range(256)) * 20_000))  # 5,120,000 bytes
    calls: list[tuple[str, str, dict[str, str]]] = []
    upload_url = "http://127.0.0.1:9/upload/abc"

    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()
        calls.append((request.method, request.url.raw_path.decode(), dict(request.headers)))
        if request.url.path.endswith("/messages"):
            return httpx.Response(201, json={"id": "draft/1="})
        if request.url.path.endswith("createUploadSession"):
            return httpx.Response(201, json={"uploadUrl": upload_url})
        return httpx.Response(202 if request.url.path.endswith("/send") else 200)

    graph, _ = provider(handler)
    await graph.send(message(raw), Envelope("a@example.com", ("b@example.com",)))
    puts = [c for c in calls if c[0] == "PUT"]
    total = 5_120_000
    assert [h["content-range"] for _, _, h in puts] == [
        f"bytes 0-{UPLOAD_CHUNK - 1}/{total}",
        f"bytes {UPLOAD_CHUNK}-{total - 1}/{total}",
    ]
    assert all("authorization" not in h for _, _, h in puts)
    assert calls[-1][:2] == ("POST", "/v1.0/users/a@example.com/messages/draft%2F1=/send")

    upload_url = "http://169.254.169.254/latest"  # a cloud metadata address: never contacted
    calls.clear()
    with pytest.raises(ProviderConfigError, match="upload URL"):
        await graph.send(message(raw), Envelope("a@example.com", ("b@example.com",)))
    assert not [c for c in calls if c[0] == "PUT"]
    assert calls[-1][0] == "DELETE"  # the draft is discarded


async def test_cancelled_send_deletes_its_draft() -> None:
    raw = multipart(("big.pdf", b"x" * 5_000_000))
    stalled = asyncio.Event()
    methods: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()
        methods.append(request.method)
        if request.url.path.endswith("/messages"):
            return httpx.Response(201, json={"id": "d1"})
        if request.url.path.endswith("createUploadSession"):
            stalled.set()
            await asyncio.Event().wait()  # until cancelled: the caller's deadline
        return httpx.Response(204)

    graph, _ = provider(handler)
    task = asyncio.create_task(
        graph.send(message(raw), Envelope("a@example.com", ("b@example.com",)))
    )
    await stalled.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await graph.aclose()  # waits for the background deletion
    assert methods == ["POST", "POST", "DELETE"]


# --- tokens and startup -----------------------------------------------------------------------


async def test_token_memo_and_single_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    source = TokenSource("m365", graph_settings())
    fetched: list[str] = []

    def acquire() -> tuple[str, float]:
        fetched.append(f"t{len(fetched) + 1}")
        return fetched[-1], 3000.0

    monkeypatch.setattr(source, "_acquire", acquire)
    tokens = await asyncio.gather(*(source.get() for _ in range(20)))
    assert set(tokens) == {"t1"}
    await asyncio.gather(source.invalidate("t1"), source.invalidate("t1"))
    assert await source.get() == "t2"
    await source.invalidate("t1")  # a late 401 for the old token changes nothing
    assert await source.get() == "t2"
    assert fetched == ["t1", "t2"]
    source.close()


def test_msal_http_sends_bytes_form_values_as_text() -> None:
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.read())
        return httpx.Response(429, headers={"Retry-After": "4"})

    http = MsalHttp(httpx.Client(transport=httpx.MockTransport(handler)))
    http.post("https://login.test/t/token", data={"client_assertion": b"eyJ.a.b", "x": "y"})
    assert seen == [b"client_assertion=eyJ.a.b&x=y"]
    assert (http.last_status, http.last_headers["retry-after"]) == (429, "4")
    http.close()


def test_missing_msal_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "msal", None)
    with pytest.raises(ConfigError, match=r"smtp2api\[graph\]"):
        graph_auth.TokenSource("m365", graph_settings())


def test_http_authority_is_refused() -> None:
    with pytest.raises(ConfigError, match="authority_url"):
        TokenSource("m365", graph_settings(authority_url="http://127.0.0.1:8"))


def _cert(key: Any) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def _pem(key: Any, cert: x509.Certificate) -> bytes:
    key_pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


def test_certificate_checks(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    good, mismatched, elliptic = tmp_path / "g.pem", tmp_path / "m.pem", tmp_path / "e.pem"
    good.write_bytes(_pem(rsa_key, _cert(rsa_key)))
    mismatched.write_bytes(_pem(rsa_key, _cert(other)))
    elliptic.write_bytes(_pem(ec_key, _cert(ec_key)))
    credential = load_certificate("m", good, None)
    assert credential["public_certificate"].startswith("-----BEGIN CERTIFICATE-----")
    with pytest.raises(ConfigError, match="no certificate for its private key"):
        load_certificate("m", mismatched, None)
    with pytest.raises(ConfigError, match="RSA"):
        load_certificate("m", elliptic, None)
    with pytest.raises(ConfigError, match="cannot read"):
        load_certificate("m", tmp_path / "missing.pem", None)
    with pytest.raises(ConfigError, match="cannot load"):
        load_certificate("m", good, "a password for an unencrypted key")
