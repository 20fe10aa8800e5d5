"""The gateway end to end: a real server on 127.0.0.1, smtplib clients, a real local API."""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from smtp2api.app import Gateway
from tests.conftest import REPO, GatewayFactory, account, in_thread
from tests.support.fakeapi import Answer, FakeAPI
from tests.support.smtpclient import dialogue, send, simple_message

SCHEMA = __import__("json").loads((REPO / "docs" / "message.schema.json").read_text())


@pytest.fixture
async def api() -> AsyncIterator[FakeAPI]:
    async with FakeAPI() as fake:
        yield fake


def http_provider(api: FakeAPI, **extra: Any) -> dict[str, Any]:
    return {"main": {"type": "http", "url": f"{api.url}/v1/emails", "api_key": "k-123", **extra}}


async def test_plain_trusted_client_reaches_the_api(
    start_gateway: GatewayFactory, api: FakeAPI
) -> None:
    api.push(Answer(200, json={"id": "api-42"}))
    gw = await start_gateway(providers=http_provider(api), delivery={"mode": "sync"})
    code, text = await in_thread(send, gw.port(), simple_message())
    assert (code, text) == (250, "2.0.0 Ok: api-42")
    [request] = api.requests
    assert request.method == "POST"
    assert request.path == "/v1/emails"
    assert request.headers["authorization"] == "Bearer k-123"
    body = request.json
    jsonschema.validate(body, SCHEMA)
    assert body["from"] == {"email": "app@example.com", "name": "App"}
    assert body["to"] == [{"email": "alice@example.com"}]
    assert body["subject"] == "Hello"
    assert body["text"].strip() == "Hello there"
    assert request.headers["x-smtp2api-id"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_starttls_auth(
    start_gateway: GatewayFactory,
    api: FakeAPI,
    tls_files: tuple[Path, Path],
    client_tls: ssl.SSLContext,
    mechanism: str,
) -> None:
    cert, key = tls_files
    gw = await start_gateway(
        providers=http_provider(api),
        smtp={"tls_cert_file": str(cert), "tls_key_file": str(key), "trusted_networks": []},
        accounts=[account("wordpress")],
        delivery={"mode": "sync"},
    )
    code, text = await in_thread(
        send,
        gw.port(),
        simple_message(),
        mode="starttls",
        user="wordpress",
        context=client_tls,
        mechanism=mechanism,
    )
    assert code == 250, text
    assert text == "2.0.0 Ok: fake-1"


async def test_implicit_tls_with_auth(
    start_gateway: GatewayFactory,
    api: FakeAPI,
    tls_files: tuple[Path, Path],
    client_tls: ssl.SSLContext,
) -> None:
    cert, key = tls_files
    gw = await start_gateway(
        providers=http_provider(api),
        smtp={
            "tls_cert_file": str(cert),
            "tls_key_file": str(key),
            "trusted_networks": [],
            "listen": [],
            "tls_listen": ["127.0.0.1:0"],
        },
        accounts=[account("wordpress")],
        delivery={"mode": "sync"},
    )
    code, text = await in_thread(
        send, gw.port("tls"), simple_message(), mode="tls", user="wordpress", context=client_tls
    )
    assert (code, text) == (250, "2.0.0 Ok: fake-1")


# Design §4, the rows that apply to the generic http provider, in sync mode.
REPLY_ROWS = [
    (Answer(200, json={"id": "x-1"}), 250, "2.0.0"),
    (Answer(202, json={"message_id": "x-2"}), 250, "2.0.0"),
    (Answer(400, json={"error": "invalid to address", "field": "to"}), 553, "5.1.3"),
    (Answer(422, json={"message": "subject is required"}), 554, "5.6.0"),
    (Answer(400, json={"message": "bad html"}), 554, "5.6.0"),
    (Answer(401, json={"message": "bad key"}), 451, "4.3.5"),
    (Answer(403), 451, "4.3.5"),
    (Answer(404), 451, "4.3.5"),
    (Answer(413), 552, "5.3.4"),
    (Answer(429, headers={"Retry-After": "120"}), 451, "4.7.0"),
    (Answer(500), 451, "4.3.0"),
    (Answer(503), 451, "4.3.0"),
    (Answer(200, delay=3.0), 451, "4.4.2"),
]


@pytest.mark.parametrize(("answer", "code", "enhanced"), REPLY_ROWS)
async def test_reply_mapping(
    start_gateway: GatewayFactory, api: FakeAPI, answer: Answer, code: int, enhanced: str
) -> None:
    api.default = answer
    gw = await start_gateway(
        providers=http_provider(api, timeout="1s"),
        delivery={"mode": "sync", "sync_timeout": "2s"},
    )
    got_code, text = await in_thread(send, gw.port(), simple_message())
    assert got_code == code, text
    assert text.startswith(enhanced)
    # Reply texts never carry raw bodies or exception text.
    assert "{" not in text
    assert "Error(" not in text
    assert "Exception" not in text


async def test_connection_refused_is_451_441(start_gateway: GatewayFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    gw = await start_gateway(
        providers={"main": {"type": "http", "url": f"http://127.0.0.1:{closed_port}/send"}},
        delivery={"mode": "sync", "sync_timeout": "1s"},
    )
    code, text = await in_thread(send, gw.port(), simple_message())
    assert code == 451
    assert text.startswith("4.4.1")


async def test_hybrid_transient_failure_is_queued_then_delivered(
    start_gateway: GatewayFactory, api: FakeAPI
) -> None:
    api.push(Answer(503), Answer(503), Answer(503))
    gw = await start_gateway(
        providers=http_provider(api),
        delivery={
            "mode": "hybrid",
            "sync_timeout": "1s",
            "backoff_min": "0.2s",
            "backoff_max": "1s",
        },
    )
    code, text = await in_thread(send, gw.port(), simple_message())
    assert code == 250
    assert text.startswith("2.0.0 Ok: queued as ")
    queued_id = text.rsplit(" ", 1)[1]
    requests = await api.wait_for_requests(4, timeout=10)
    assert requests[-1].headers["x-smtp2api-id"] == queued_id
    assert {r.headers["x-smtp2api-id"] for r in requests} == {queued_id}


async def test_hybrid_permanent_failure_is_5xx_and_not_kept(
    start_gateway: GatewayFactory, api: FakeAPI
) -> None:
    api.default = Answer(422, json={"message": "invalid"})
    gw = await start_gateway(providers=http_provider(api), delivery={"mode": "hybrid"})
    code, text = await in_thread(send, gw.port(), simple_message())
    assert code == 554, text
    assert await gw.spool.counts() == {"queued": 0, "active": 0, "dead": 0}


async def test_queue_mode_answers_after_commit(start_gateway: GatewayFactory, api: FakeAPI) -> None:
    gw = await start_gateway(providers=http_provider(api), delivery={"mode": "queue"})
    code, text = await in_thread(send, gw.port(), simple_message())
    assert code == 250
    assert "queued as" in text
    await api.wait_for_requests(1)


async def test_envelope_is_authoritative_and_bcc_never_forwarded(
    start_gateway: GatewayFactory, api: FakeAPI
) -> None:
    gw = await start_gateway(providers=http_provider(api), delivery={"mode": "sync"})
    data = simple_message(
        to="Alice <alice@example.com>, header-only@example.com",
        Cc="bob@example.com",
        Bcc="secret@example.com",
    )
    rcpts = ("alice@example.com", "bob@example.com", "hidden@example.com")
    code, _ = await in_thread(send, gw.port(), data, rcpts=rcpts)
    assert code == 250
    body = api.requests[0].json
    assert body["to"] == [{"email": "alice@example.com", "name": "Alice"}]
    assert body["cc"] == [{"email": "bob@example.com"}]
    assert body["bcc"] == [{"email": "hidden@example.com"}]
    flat = str(body)
    assert "secret@example.com" not in flat
    assert "header-only@example.com" not in flat
    assert "Bcc" not in body["headers"]


async def test_template_and_tags_headers(start_gateway: GatewayFactory, api: FakeAPI) -> None:
    gw = await start_gateway(providers=http_provider(api), delivery={"mode": "sync"})
    data = simple_message(
        X_Smtp2api_Template="welcome",
        X_Smtp2api_Variables='{"name": "Ann"}',
        X_Smtp2api_Tags="signup, web",
    )
    assert (await in_thread(send, gw.port(), data))[0] == 250
    body = api.requests[0].json
    assert body["template"] == {"id": "welcome", "variables": {"name": "Ann"}}
    assert body["tags"] == ["signup", "web"]
    assert not any(h.lower().startswith("x-smtp2api") for h in body["headers"])


async def test_bad_mime_control_header_is_554(start_gateway: GatewayFactory, api: FakeAPI) -> None:
    gw = await start_gateway(providers=http_provider(api), delivery={"mode": "sync"})
    data = simple_message(X_Smtp2api_Variables="{not json")
    code, text = await in_thread(send, gw.port(), data)
    assert code == 554
    assert text.startswith("5.6.0")
    assert api.requests == []


async def test_banner_names_host_not_software(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway()
    [banner, ehlo] = await in_thread(dialogue, gw.port(), "EHLO client.test")
    assert banner == "220 gw.test ESMTP"
    assert "250-SIZE 25000000" in ehlo
    assert "AUTH" not in ehlo  # no accounts configured


async def test_size_limits(start_gateway: GatewayFactory, api: FakeAPI) -> None:
    gw = await start_gateway(
        providers=http_provider(api), smtp={"max_message_size": 2000}, delivery={"mode": "sync"}
    )
    replies = await in_thread(dialogue, gw.port(), "EHLO c", "MAIL FROM:<a@example.com> SIZE=5000")
    assert "250-SIZE 2000" in replies[1]
    assert replies[2].startswith("552 5.3.4")
    big = simple_message() + (b"x" * 70 + b"\r\n") * 50
    code, text = await in_thread(send, gw.port(), big)
    assert code == 552
    assert text.startswith("5.3.4")
    assert api.requests == []


async def test_max_recipients(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(smtp={"max_recipients": 2})
    replies = await in_thread(
        dialogue,
        gw.port(),
        "EHLO c",
        "MAIL FROM:<a@example.com>",
        "RCPT TO:<1@example.com>",
        "RCPT TO:<2@example.com>",
        "RCPT TO:<3@example.com>",
    )
    assert replies[3].startswith("250")
    assert replies[4].startswith("250")
    assert replies[5].startswith("452 4.5.3")


async def test_untrusted_peer_cannot_relay(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(smtp={"trusted_networks": ["10.99.0.0/16"], "require_tls": False})
    replies = await in_thread(
        dialogue, gw.port(), "EHLO c", "MAIL FROM:<a@example.com>", "RCPT TO:<b@example.com>"
    )
    assert replies[2].startswith("530 5.7.0")
    assert replies[3].startswith("503")  # no transaction was opened


async def test_require_tls_blocks_auth_and_mail_before_starttls(
    start_gateway: GatewayFactory, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    gw = await start_gateway(
        smtp={"tls_cert_file": str(cert), "tls_key_file": str(key), "trusted_networks": []},
        accounts=[account("wordpress")],
    )
    replies = await in_thread(
        dialogue, gw.port(), "EHLO c", "AUTH PLAIN AHdvcmRwcmVzcwB4", "MAIL FROM:<a@example.com>"
    )
    assert "STARTTLS" in replies[1]
    assert "AUTH" not in replies[1]
    assert replies[2].startswith("530 5.7.0")
    assert replies[3].startswith("530 5.7.0")


async def test_sender_not_allowed_for_account(
    start_gateway: GatewayFactory, tls_files: tuple[Path, Path], client_tls: ssl.SSLContext
) -> None:
    cert, key = tls_files
    gw = await start_gateway(
        smtp={"tls_cert_file": str(cert), "tls_key_file": str(key), "trusted_networks": []},
        accounts=[account("wordpress", allowed_senders=["*@example.com"])],
    )
    code, text = await in_thread(
        send,
        gw.port(),
        simple_message(sender="evil@other.test"),
        sender="evil@other.test",
        mode="starttls",
        user="wordpress",
        context=client_tls,
    )
    assert code == 553
    assert text.startswith("5.7.1")


async def test_bad_credentials_then_421(
    start_gateway: GatewayFactory, tls_files: tuple[Path, Path], client_tls: ssl.SSLContext
) -> None:
    cert, key = tls_files
    gw = await start_gateway(
        smtp={"tls_cert_file": str(cert), "tls_key_file": str(key), "trusted_networks": []},
        accounts=[account("wordpress")],
    )

    def attempt() -> list[str]:
        with smtplib.SMTP("127.0.0.1", gw.port(), timeout=10) as client:
            client.starttls(context=client_tls)
            client.ehlo("c")
            out = []
            for _ in range(3):
                out.append(str(client.docmd("AUTH", "PLAIN AHdvcmRwcmVzcwB3cm9uZw==")))
            return out

    results = await in_thread(attempt)
    assert results[0].startswith("(535, b'5.7.8")
    assert results[2].startswith("(421, b'4.7.0")


async def test_connection_limits(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(smtp={"max_connections_per_ip": 1})

    def two() -> tuple[str, str]:
        with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as first:
            banner1 = first.makefile("rb").readline().decode()
            with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as second:
                banner2 = second.makefile("rb").readline().decode()
        return banner1, banner2

    banner1, banner2 = await in_thread(two)
    assert banner1.startswith("220")
    assert banner2.startswith("421 4.7.0")
    body, _ = gw.metrics.render()
    assert b'smtp2api_smtp_connections_total{result="rejected_ip_limit"} 1.0' in body


async def test_idle_timeout_closes_with_421(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(smtp={"idle_timeout": "0.5s"})

    def idle() -> tuple[str, bytes]:
        with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as sock:
            stream = sock.makefile("rb")
            banner = stream.readline().decode()
            return banner, stream.read()

    banner, rest = await in_thread(idle)
    assert banner.startswith("220")
    assert rest.startswith(b"421 4.4.2")


async def test_unexpected_exception_is_451_and_logged(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw: Gateway = await start_gateway()

    async def boom(*args: object) -> None:
        raise ValueError("internal detail that must not leak")

    assert gw.handler is not None
    monkeypatch.setattr(gw.handler, "_accept", boom)
    code, text = await in_thread(send, gw.port(), simple_message())
    assert code == 451
    assert text == "4.3.0 Internal error, try again later"


async def test_null_sender_is_accepted(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await start_gateway()
    code, _ = await in_thread(send, gw.port(), simple_message(), sender="<>")
    assert code == 250
    [json_file] = (tmp_path / "outbox").glob("*.json")
    assert '"mail_from": ""' in json_file.read_text()
