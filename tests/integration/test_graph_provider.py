"""The ``graph`` provider end to end: smtplib -> gateway -> msal -> a fake Entra ID over TLS,
and a fake Microsoft Graph, both real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import datetime
import os
import re
import ssl
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from smtp2api.errors import ConfigError
from tests.conftest import GatewayFactory, in_thread
from tests.support.fake_graph import FakeGraph, GraphAnswer
from tests.support.fake_identity import FakeIdentity
from tests.support.smtpclient import send, simple_message

SECRET = "fake-client-secret-value~123"


@pytest.fixture
def idp_tls(tls_ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """TLS for the fake Entra ID, and the gateway trusting its CA (msal needs https)."""
    ca_file = tmp_path / "idp-ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    # httpx (the msal transport and the shared client) reads SSL_CERT_FILE when built.
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
async def identity(idp_tls: ssl.SSLContext) -> AsyncIterator[FakeIdentity]:
    async with FakeIdentity(idp_tls, client_secret=SECRET) as fake:
        yield fake


@pytest.fixture
async def graph(identity: FakeIdentity) -> AsyncIterator[FakeGraph]:
    async with FakeGraph(identity) as fake:
        yield fake


def graph_provider(identity: FakeIdentity, graph: FakeGraph, **extra: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "type": "graph",
        "tenant_id": identity.tenant,
        "client_id": identity.client_id,
        "authority_url": identity.authority,
        "base_url": graph.url,  # the scope stays https://graph.microsoft.com/.default
        "timeout": "5s",
    }
    if "certificate_file" not in extra:
        settings["client_secret"] = SECRET
    return {"m365": {**settings, **extra}}


async def start(
    start_gateway: GatewayFactory,
    identity: FakeIdentity,
    graph: FakeGraph,
    sync_timeout: str = "3s",
    **extra: Any,
) -> int:
    gw = await start_gateway(
        providers=graph_provider(identity, graph, **extra),
        delivery={"mode": "sync", "sync_timeout": sync_timeout},
    )
    return gw.port()


async def test_message_is_sent_as_base64_mime(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    port = await start(start_gateway, identity, graph)
    code, text = await in_thread(send, port, simple_message(), rcpts=("alice@example.com",))
    assert code == 250
    assert re.fullmatch(r"2\.0\.0 Ok: \S+", text), text  # the gateway's id: 202 has none
    [sent] = graph.delivered
    assert (sent.via, sent.mailbox, sent.recipients) == (
        "sendMail",
        "app@example.com",
        ["alice@example.com"],
    )
    assert sent.parsed["Subject"] == "Hello"
    assert sent.parsed.get_content().strip() == "Hello there"
    assert sent.parsed["Received"]  # the original MIME plus the gateway's trace field
    assert sent.saved_to_sent


async def test_user_id_is_the_mailbox(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    port = await start(start_gateway, identity, graph, user_id="relay@example.com")
    assert (await in_thread(send, port, simple_message()))[0] == 250
    assert graph.delivered[0].mailbox == "relay@example.com"


async def test_token_is_cached(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    port = await start(start_gateway, identity, graph)
    for _ in range(3):
        assert (await in_thread(send, port, simple_message()))[0] == 250
    assert len(identity.issued) == 1
    assert len({token for _, token, _ in graph.ops("sendMail")}) == 1


async def test_expired_token_is_replaced_before_use(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    # Under msal's 5-minute margin a token counts as expired at once; on the server it
    # expires too before the second message, which must not be sent with it.
    identity.expires_in = 299
    port = await start(start_gateway, identity, graph)
    assert (await in_thread(send, port, simple_message()))[0] == 250
    identity.expire_all()
    assert (await in_thread(send, port, simple_message()))[0] == 250
    assert len(identity.issued) == 2
    calls = graph.ops("sendMail")
    assert [status for _, _, status in calls] == [202, 202]  # no 401 on the way
    assert calls[0][1] != calls[1][1]


async def test_401_mid_run_refreshes_once(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    port = await start(start_gateway, identity, graph)
    assert (await in_thread(send, port, simple_message()))[0] == 250
    identity.revoke_all()  # Graph now refuses the cached token, msal still trusts it
    assert (await in_thread(send, port, simple_message()))[0] == 250
    assert [s for _, _, s in graph.ops("sendMail")] == [202, 401, 202]
    assert len(identity.issued) == 2
    assert len(graph.delivered) == 2


async def test_401_after_refresh_is_451_435(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    refused = GraphAnswer(401, "InvalidAuthenticationToken", "Access token validation failure.")
    graph.script("sendMail", refused, refused)
    port = await start(start_gateway, identity, graph)
    code, text = await in_thread(send, port, simple_message())
    assert (code, text[:5]) == (451, "4.3.5"), text
    assert len(graph.ops("sendMail")) == 2  # one retry, with a fresh token
    assert len(identity.issued) == 2
    assert not graph.delivered


def _certificate(tmp_path: Path, kind: str, password: bytes) -> tuple[Path, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtp2api test app")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / f"app.{kind}"
    if kind == "pfx":
        encryption = serialization.BestAvailableEncryption(password)
        path.write_bytes(pkcs12.serialize_key_and_certificates(b"app", key, cert, None, encryption))
    else:
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
        path.write_bytes(key_pem + cert.public_bytes(serialization.Encoding.PEM))
    return path, cert


@pytest.mark.parametrize("kind", ["pem", "pfx"])
async def test_certificate_credentials(
    start_gateway: GatewayFactory,
    idp_tls: ssl.SSLContext,
    tmp_path: Path,
    kind: str,
) -> None:
    path, cert = _certificate(tmp_path, kind, b"cert-pass")
    async with (
        FakeIdentity(idp_tls, certificate=cert) as identity,
        FakeGraph(identity) as graph,
    ):
        port = await start(
            start_gateway,
            identity,
            graph,
            certificate_file=str(path),
            certificate_password="cert-pass",
        )
        assert (await in_thread(send, port, simple_message()))[0] == 250
        [request] = identity.requests
        assert "client_secret" not in request.form
        assert request.status == 200  # the assertion JWT checked out against the certificate
        assert len(graph.delivered) == 1


async def test_certificate_not_registered_is_451_435(
    start_gateway: GatewayFactory, idp_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    path, _ = _certificate(tmp_path, "pem", b"pw")
    (tmp_path / "other").mkdir()
    _, registered = _certificate(tmp_path / "other", "pem", b"pw")
    async with (
        FakeIdentity(idp_tls, certificate=registered) as identity,
        FakeGraph(identity) as graph,
    ):
        port = await start(
            start_gateway, identity, graph, certificate_file=str(path), certificate_password="pw"
        )
        code, text = await in_thread(send, port, simple_message())
        assert (code, text[:5]) == (451, "4.3.5"), text
        assert "AADSTS700027" in text
        assert not graph.calls


async def test_bad_certificate_password_is_a_config_error(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph, tmp_path: Path
) -> None:
    path, _ = _certificate(tmp_path, "pem", b"right")
    with pytest.raises(ConfigError, match="certificate_file"):
        await start(
            start_gateway, identity, graph, certificate_file=str(path), certificate_password="no"
        )


async def test_http_authority_is_a_config_error(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    with pytest.raises(ConfigError, match="authority_url"):
        await start(start_gateway, identity, graph, authority_url="http://127.0.0.1:1")


async def test_envelope_decides_recipients_and_bcc_stays_hidden(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    port = await start(start_gateway, identity, graph)
    data = simple_message(
        to="Alice <alice@example.com>, header-only@example.com", Cc="Carol <carol@example.com>"
    )
    rcpts = ("alice@example.com", "carol@example.com", "hidden@example.org")
    assert (await in_thread(send, port, data, rcpts=rcpts))[0] == 250
    [sent] = graph.delivered
    assert sent.to == ["alice@example.com"]
    assert sent.cc == ["carol@example.com"]
    assert sent.bcc == ["hidden@example.org"]
    assert b"hidden@example.org" not in sent.visible
    assert b"header-only" not in sent.mime  # never delivered to
    assert sent.parsed["To"] == "Alice <alice@example.com>"


def _large_message() -> tuple[bytes, dict[str, bytes]]:
    msg = EmailMessage()
    msg["From"] = "App <app@example.com>"
    msg["To"] = "alice@example.com"
    msg["Subject"] = "Quarterly report"
    msg.set_content("The reports are attached.\n")
    files = {
        "report.pdf": os.urandom(3_500_000),  # >= 3 MB: an upload session, two slices
        "figures.xlsx": os.urandom(2_000_000),  # < 3 MB: a JSON attachment POST
        "logo.png": os.urandom(1_000_000),  # small enough to stay in the MIME
    }
    for name, content in files.items():
        msg.add_attachment(content, maintype="application", subtype="octet-stream", filename=name)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")), files


async def test_message_over_4mb_goes_through_draft_and_upload_session(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    port = await start(start_gateway, identity, graph)
    data, files = _large_message()
    assert len(data) > 8_000_000
    code, text = await in_thread(send, port, data, rcpts=("alice@example.com", "bob@example.org"))
    assert code == 250, text
    [sent] = graph.delivered
    assert sent.via == "draft"
    assert sent.recipients == ["alice@example.com", "bob@example.org"]
    uploaded = {a.name: (a.via, a.content) for a in sent.attachments}
    assert uploaded == {
        "report.pdf": ("upload", files["report.pdf"]),
        "figures.xlsx": ("json", files["figures.xlsx"]),
    }
    kept = {p.get_filename(): p.get_content() for p in sent.parsed.iter_attachments()}
    assert kept == {"logo.png": files["logo.png"]}
    text_part = sent.parsed.get_body(("plain",))
    assert text_part is not None
    assert text_part.get_content() == "The reports are attached.\r\n"
    assert [s for _, _, s in graph.ops("upload")] == [200, 201]
    assert not graph.drafts  # sent, nothing left behind
    assert sent.saved_to_sent


async def test_draft_path_without_mail_readwrite_is_451_435(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    graph.permissions = frozenset({"Mail.Send"})
    port = await start(start_gateway, identity, graph)
    data, _ = _large_message()
    code, text = await in_thread(send, port, data)
    assert (code, text[:5]) == (451, "4.3.5"), text
    assert "code=ErrorAccessDenied" in text
    assert [s for _, _, s in graph.ops("createMessage")] == [403]
    assert (await in_thread(send, port, simple_message()))[0] == 250  # sendMail still works


async def test_save_to_sent_items_false_sends_through_a_draft(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    port = await start(start_gateway, identity, graph, save_to_sent_items=False)
    assert (await in_thread(send, port, simple_message()))[0] == 250
    [sent] = graph.delivered
    assert (sent.via, sent.saved_to_sent) == ("draft", False)


async def test_413_falls_back_to_the_draft_path(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    graph.script("sendMail", GraphAnswer(413, "RequestEntityTooLarge", "Too large."))
    port = await start(start_gateway, identity, graph)
    assert (await in_thread(send, port, simple_message()))[0] == 250
    assert graph.delivered[0].via == "draft"


async def test_failed_draft_is_deleted(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    graph.script("send", GraphAnswer(400, "ErrorInvalidRecipients", "Recipient not valid."))
    port = await start(start_gateway, identity, graph, save_to_sent_items=False)
    code, text = await in_thread(send, port, simple_message())
    assert (code, text[:5]) == (553, "5.1.3"), text
    assert len(graph.deleted) == 1
    assert not graph.drafts


_ROWS = [
    ("sendMail", GraphAnswer(400, "ErrorInvalidRecipients", "Invalid recipients."), 553, "5.1.3"),
    (
        "sendMail",
        GraphAnswer(
            400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content."
        ),
        554,
        "5.6.0",
    ),
    ("sendMail", GraphAnswer(400, "ErrorMessageSizeExceeded", "Too big."), 552, "5.3.4"),
    ("sendMail", GraphAnswer(403, "ErrorAccessDenied", "Access is denied."), 451, "4.3.5"),
    ("sendMail", GraphAnswer(403, "ErrorSendAsDenied", "Send as denied."), 451, "4.3.5"),
    (
        "sendMail",
        GraphAnswer(404, "ErrorInvalidUser", "The requested user is invalid."),
        451,
        "4.3.5",
    ),
    (
        "sendMail",
        GraphAnswer(429, "TooManyRequests", "Too many requests.", {"Retry-After": "7"}),
        451,
        "4.7.0",
    ),
    (
        "sendMail",
        GraphAnswer(
            429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit."
        ),
        451,
        "4.7.0",
    ),
    ("sendMail", GraphAnswer(400, "ErrorQuotaExceeded", "Quota exceeded."), 451, "4.7.0"),
    (
        "sendMail",
        GraphAnswer(503, "ServiceUnavailable", "Try later.", {"Retry-After": "3"}),
        451,
        "4.3.0",
    ),
    ("sendMail", GraphAnswer(500, "InternalServerError", "Oops."), 451, "4.3.0"),
]


@pytest.mark.parametrize(("op", "answer", "code", "enhanced"), _ROWS)
async def test_graph_error_rows(
    start_gateway: GatewayFactory,
    identity: FakeIdentity,
    graph: FakeGraph,
    op: str,
    answer: GraphAnswer,
    code: int,
    enhanced: str,
) -> None:
    # Repeated: sync mode retries transient answers within sync_timeout (design §3).
    graph.script(op, *[answer] * 20)
    port = await start(start_gateway, identity, graph, sync_timeout="0.5s")
    got, text = await in_thread(send, port, simple_message())
    assert (got, text[:5]) == (code, enhanced), text
    assert f"code={answer.code}" in text
    assert "request_id=" in text
    assert not graph.delivered


async def test_413_twice_is_552(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    too_large = GraphAnswer(413, "RequestEntityTooLarge", "Too large.")
    graph.script("sendMail", too_large)
    graph.script("createMessage", too_large)
    port = await start(start_gateway, identity, graph)
    got, text = await in_thread(send, port, simple_message())
    assert (got, text[:5]) == (552, "5.3.4"), text


async def test_unknown_mailbox_and_app_access_policy(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    graph.mailboxes = {"app@example.com", "other@example.com"}
    graph.app_mailboxes = {"app@example.com"}
    port = await start(start_gateway, identity, graph)
    assert (await in_thread(send, port, simple_message(), sender="nobody@example.com"))[0] == 451
    assert (await in_thread(send, port, simple_message(), sender="other@example.com"))[0] == 451
    assert (await in_thread(send, port, simple_message()))[0] == 250
    assert [s for _, _, s in graph.ops("sendMail")] == [404, 403, 202]


_TOKEN_ROWS = [
    (
        401,
        {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret."},
        {},
        "4.3.5",
    ),
    (429, {"error": "temporarily_unavailable"}, {"Retry-After": "2"}, "4.7.0"),
    (500, {"error": "server_error"}, {}, "4.3.0"),
]


@pytest.mark.parametrize(("status", "body", "headers", "enhanced"), _TOKEN_ROWS)
async def test_token_endpoint_error_rows(
    start_gateway: GatewayFactory,
    identity: FakeIdentity,
    graph: FakeGraph,
    status: int,
    body: dict[str, Any],
    headers: dict[str, str],
    enhanced: str,
) -> None:
    for _ in range(20):  # sync mode retries transient answers within sync_timeout
        identity.fail_next(status, body, headers)
    port = await start(start_gateway, identity, graph, sync_timeout="0.5s")
    got, text = await in_thread(send, port, simple_message())
    assert (got, text[:5]) == (451, enhanced), text
    assert not graph.calls


async def test_wrong_secret_and_wrong_tenant_are_451_435(
    start_gateway: GatewayFactory, identity: FakeIdentity, graph: FakeGraph
) -> None:
    port = await start(start_gateway, identity, graph, client_secret="not-the-secret-at-all")
    got, text = await in_thread(send, port, simple_message())
    assert (got, text[:5]) == (451, "4.3.5"), text
    assert "AADSTS7000215" in text
    assert SECRET not in text
    assert "not-the-secret" not in text
    port = await start(start_gateway, identity, graph, tenant_id="no-such-tenant")
    got, text = await in_thread(send, port, simple_message())
    assert (got, text[:5]) == (451, "4.3.5"), text
    assert "code=AADSTS90002" in text
    assert not graph.calls
