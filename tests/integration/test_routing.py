"""Routes, failover between providers and the circuit breaker, through the real gateway."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import GatewayFactory, account, in_thread
from tests.support.fakeapi import Answer, FakeAPI
from tests.support.smtpclient import dialogue, send, simple_message


@pytest.fixture
async def apis() -> AsyncIterator[tuple[FakeAPI, FakeAPI]]:
    async with FakeAPI() as first, FakeAPI() as second:
        yield first, second


def two_providers(first: FakeAPI, second: FakeAPI) -> dict[str, dict[str, str]]:
    return {
        "primary": {"type": "http", "url": f"{first.url}/send", "timeout": "2s"},
        "backup": {"type": "http", "url": f"{second.url}/send", "timeout": "2s"},
    }


async def test_failover_to_the_next_provider(
    start_gateway: GatewayFactory, apis: tuple[FakeAPI, FakeAPI]
) -> None:
    first, second = apis
    first.default = Answer(503)
    second.push(Answer(200, json={"id": "from-backup"}))
    gw = await start_gateway(
        providers=two_providers(first, second),
        routes=[{"providers": ["primary", "backup"]}],
        delivery={"mode": "sync", "sync_timeout": "3s"},
    )
    code, text = await in_thread(send, gw.port(), simple_message())
    assert (code, text) == (250, "2.0.0 Ok: from-backup")
    assert len(first.requests) >= 1
    assert len(second.requests) == 1


async def test_permanent_error_is_not_failed_over(
    start_gateway: GatewayFactory, apis: tuple[FakeAPI, FakeAPI]
) -> None:
    first, second = apis
    first.default = Answer(422, json={"message": "bad message"})
    gw = await start_gateway(
        providers=two_providers(first, second),
        routes=[{"providers": ["primary", "backup"]}],
        delivery={"mode": "sync"},
    )
    code, _ = await in_thread(send, gw.port(), simple_message())
    assert code == 554
    assert second.requests == []


async def test_circuit_opens_and_skips_a_dead_provider(
    start_gateway: GatewayFactory, apis: tuple[FakeAPI, FakeAPI]
) -> None:
    first, second = apis
    first.default = Answer(503)
    gw = await start_gateway(
        providers=two_providers(first, second),
        routes=[{"providers": ["primary", "backup"]}],
        delivery={
            "mode": "sync",
            "sync_timeout": "3s",
            "circuit_threshold": 2,
            "circuit_cooldown": "1h",
        },
    )
    for _ in range(2):
        assert (await in_thread(send, gw.port(), simple_message()))[0] == 250
    calls_when_open = len(first.requests)
    for _ in range(3):
        assert (await in_thread(send, gw.port(), simple_message()))[0] == 250
    assert len(first.requests) == calls_when_open  # skipped while open
    assert len(second.requests) == 5
    body, _ = gw.metrics.render()
    assert b'smtp2api_provider_circuit_open{provider="primary"} 1.0' in body


async def test_half_open_probe_closes_the_circuit(
    start_gateway: GatewayFactory, apis: tuple[FakeAPI, FakeAPI]
) -> None:
    first, second = apis
    first.push(Answer(503))
    gw = await start_gateway(
        providers=two_providers(first, second),
        routes=[{"providers": ["primary", "backup"]}],
        delivery={"mode": "sync", "circuit_threshold": 1, "circuit_cooldown": "0.2s"},
    )
    assert (await in_thread(send, gw.port(), simple_message()))[0] == 250
    assert len(second.requests) == 1

    await asyncio.sleep(0.3)
    code, text = await in_thread(send, gw.port(), simple_message())
    assert code == 250
    assert text.endswith("fake-2")  # the probe went to primary (its 2nd request) and succeeded
    body, _ = gw.metrics.render()
    assert b'smtp2api_provider_circuit_open{provider="primary"} 0.0' in body


async def test_routes_select_by_account_and_sender(
    start_gateway: GatewayFactory,
    apis: tuple[FakeAPI, FakeAPI],
    tls_files: tuple[Path, Path],
    client_tls: ssl.SSLContext,
) -> None:
    first, second = apis
    cert, key = tls_files
    gw = await start_gateway(
        providers=two_providers(first, second),
        smtp={"tls_cert_file": str(cert), "tls_key_file": str(key)},
        accounts=[account("wordpress")],
        routes=[
            {"accounts": ["wordpress"], "providers": ["backup"]},
            {"senders": ["*@shop.example.com"], "providers": ["backup"]},
            {"senders": ["*@example.com"], "providers": ["primary"]},
        ],
        delivery={"mode": "sync"},
    )
    # trusted (loopback), sender in example.com -> primary
    assert (await in_thread(send, gw.port(), simple_message()))[0] == 250
    # trusted, shop sender -> backup
    shop = "orders@shop.example.com"
    assert (await in_thread(send, gw.port(), simple_message(sender=shop), sender=shop))[0] == 250
    # authenticated account -> backup, whatever the sender
    code, _ = await in_thread(
        send, gw.port(), simple_message(), mode="starttls", user="wordpress", context=client_tls
    )
    assert code == 250
    assert len(first.requests) == 1
    assert len(second.requests) == 2
    # no route for this sender: refused at MAIL, before any data
    replies = await in_thread(dialogue, gw.port(), "EHLO c", "MAIL FROM:<x@elsewhere.test>")
    assert replies[2].startswith("553 5.7.1")
