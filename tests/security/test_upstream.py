"""Upstream safety (design §8): https except loopback, no redirects, and never a connection to a
link-local or cloud-metadata address, also when a host *name* resolves to one at request time.

Names are mapped to addresses through the guard's resolver seam (no /etc/hosts); the servers
are real, on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trustme
from aiohttp import web

from smtp2api.aiohttp_transport import AiohttpTransport
from smtp2api.config import build_settings
from smtp2api.errors import ConfigError, ProviderConfigError
from smtp2api.providers import upstream
from smtp2api.providers.base import map_http_errors
from smtp2api.providers.upstream import guard_client
from smtp2api.transport import new_http_client
from tests.conftest import GatewayFactory, base_config
from tests.security.conftest import Connect, transaction_until_data
from tests.support.fakeapi import Answer, FakeAPI

NAMES = {
    "api.ok.test": ["127.0.0.1"],
    "metadata.evil.test": ["169.254.169.254"],
    "mixed.evil.test": ["127.0.0.1", "169.254.169.254"],
    "v6-metadata.evil.test": ["fd00:ec2::254"],
    "mapped.evil.test": ["::ffff:169.254.169.254"],
    "zero.evil.test": ["0.0.0.0"],
}


async def fake_resolve(host: str, port: int) -> list[str]:
    return NAMES[host]


@pytest.fixture
async def api() -> AsyncIterator[FakeAPI]:
    async with FakeAPI() as fake:
        yield fake


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://api.example.net/v1/emails",  # plain http off loopback
        "http://10.0.0.5/send",
        "https://169.254.169.254/latest/meta-data/",
        "https://[fe80::1]/x",
        "https://[::ffff:169.254.169.254]/x",
        "https://[64:ff9b::a9fe:a9fe]/x",  # NAT64 of 169.254.169.254
        "https://[fd00:ec2::254]/x",
        "https://100.100.100.200/x",
        "https://0.0.0.0/x",
        "https://metadata.google.internal/computeMetadata/v1/",
        "ftp://api.example.net/",
    ],
)
def test_provider_urls_must_be_https_and_not_metadata(tmp_path: Path, url: str) -> None:
    config = base_config(tmp_path, providers={"main": {"type": "http", "url": url}})
    with pytest.raises(ConfigError) as info:
        build_settings(config)
    assert any(p.startswith("providers.main.url:") for p in info.value.problems)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.example.net/v1/emails",
        "http://127.0.0.1:8080/send",
        "http://127.8.9.10/send",
        "http://localhost:8080/send",
        "http://[::1]:8080/send",
        "https://10.0.0.5/send",  # a private API gateway, over https
    ],
)
def test_https_and_loopback_http_are_accepted(tmp_path: Path, url: str) -> None:
    config = base_config(tmp_path, providers={"main": {"type": "http", "url": url}})
    assert build_settings(config).providers["main"].url == url  # type: ignore[union-attr]


def test_the_failure_webhook_follows_the_same_rules(tmp_path: Path) -> None:
    bad = base_config(tmp_path, delivery={"failure_webhook": "http://hooks.example.com/x"})
    with pytest.raises(ConfigError):
        build_settings(bad)


# --- redirects ---------------------------------------------------------------------------------


async def test_redirects_are_never_followed(
    start_gateway: GatewayFactory, connect: Connect, api: FakeAPI
) -> None:
    async with FakeAPI() as elsewhere:
        api.default = Answer(302, headers={"Location": f"{elsewhere.url}/steal"})
        gw = await start_gateway(
            providers={"main": {"type": "http", "url": f"{api.url}/v1/emails", "api_key": "k"}},
            delivery={"mode": "sync"},
        )
        raw = await connect(gw.port())
        await transaction_until_data(raw)
        reply = await raw.cmd(b"Subject: r\r\n\r\nx\r\n.\r\n")
        assert reply.startswith("451 4.3.5")  # the gateway's config: kept, retried, alerted
        assert len(api.requests) == 1
        assert elsewhere.requests == []  # the API key never went anywhere else


# --- addresses resolved at request time ---------------------------------------------------------

ClientFactory = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture(params=["aiohttp", "httpx"])
async def guarded(request: pytest.FixtureRequest) -> AsyncIterator[ClientFactory]:
    """A guarded client over either transport ``transport.py`` may choose."""
    clients: list[httpx.AsyncClient] = []

    async def make(verify: ssl.SSLContext | None = None) -> httpx.AsyncClient:
        if request.param == "aiohttp":
            if verify is None:
                client = new_http_client(10)
            else:
                client = httpx.AsyncClient(transport=AiohttpTransport(ssl_context=verify))
        else:
            client = httpx.AsyncClient(verify=verify or True)
        guard_client(client, resolve=fake_resolve)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def test_a_name_resolving_to_loopback_is_reached_by_name(
    guarded: ClientFactory, api: FakeAPI
) -> None:
    client = await guarded()
    response = await client.post(f"http://api.ok.test:{api.port}/v1/emails", json={})
    assert response.status_code == 200
    [request] = api.requests
    assert request.headers["host"] == f"api.ok.test:{api.port}"
    assert request.headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("host", [h for h in NAMES if h.endswith("evil.test")])
async def test_a_name_resolving_to_a_refused_address_is_never_connected(
    guarded: ClientFactory, host: str
) -> None:
    client = await guarded()
    with pytest.raises(ProviderConfigError) as info, map_http_errors():
        await client.post(f"https://{host}/v1/emails", json={})
    assert "upstream address refused" in info.value.detail
    assert info.value.reply.code == 451
    assert info.value.reply.enhanced == "4.3.5"


@pytest.mark.parametrize(
    "url", ["http://169.254.169.254/latest/", "http://[fe80::1]/", "http://[::ffff:a9fe:a9fe]/"]
)
async def test_an_ip_literal_url_is_checked_per_request(guarded: ClientFactory, url: str) -> None:
    client = await guarded()
    with pytest.raises(ProviderConfigError), map_http_errors():
        await client.get(url)


async def test_tls_is_verified_against_the_name_not_the_resolved_address(
    guarded: ClientFactory, tls_ca: trustme.CA
) -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("api.ok.test").configure_cert(server_tls)
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"host": request.host})

    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        verify = ssl.create_default_context()
        tls_ca.configure_trust(verify)
        client = await guarded(verify)
        response = await client.get(f"https://api.ok.test:{port}/")
        assert response.json() == {"host": f"api.ok.test:{port}"}
    finally:
        await runner.cleanup()


async def test_the_gateway_refuses_a_provider_that_resolves_to_metadata(
    start_gateway: GatewayFactory, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        looked_up.append(host)
        await asyncio.sleep(0)
        return NAMES[host]

    monkeypatch.setattr(upstream, "system_resolve", resolve)  # the default the gateway uses
    gw = await start_gateway(
        providers={
            "main": {"type": "http", "url": "https://metadata.evil.test/v1", "timeout": "2s"}
        },
        delivery={"mode": "sync"},
    )
    raw = await connect(gw.port())
    await transaction_until_data(raw)
    assert (await raw.cmd(b"Subject: m\r\n\r\nx\r\n.\r\n")).startswith("451 4.3.5")
    assert looked_up == ["metadata.evil.test"]


def test_an_unknown_transport_is_refused_rather_than_left_unguarded() -> None:
    class Other(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            raise AssertionError

    client = httpx.AsyncClient(transport=Other())
    with pytest.raises(TypeError):
        guard_client(client)
