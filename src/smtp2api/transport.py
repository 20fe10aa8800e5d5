"""The shared HTTP client every provider uses: ``httpx.AsyncClient`` over the fastest transport.

With aiohttp installed (a regular dependency) requests go through ``AiohttpTransport``;
without it, through httpx's own pool. Providers see ``httpx`` either way. The choice was
made by measurement (``docs/performance.md``): httpcore's pool serialises under concurrency.
"""

from __future__ import annotations

import httpx

from smtp2api import __version__


def transport_name(client: httpx.AsyncClient) -> str:
    """ "aiohttp" or "httpx": which transport a client built here uses (for logs and tests)."""
    transport = getattr(client, "_transport", None)
    return "aiohttp" if type(transport).__name__ == "AiohttpTransport" else "httpx"


def new_http_client(max_connections: int, *, timeout: float = 60.0) -> httpx.AsyncClient:
    """The client ``app.py`` shares between providers: no redirects (design §8), a
    ``User-Agent`` naming the gateway, at most ``max_connections`` connections."""
    try:
        from smtp2api.aiohttp_transport import AiohttpTransport
    except ImportError:  # aiohttp missing: httpx's pool works, only slower under load
        transport: httpx.AsyncBaseTransport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=100)
        )
    else:
        transport = AiohttpTransport(max_connections=max_connections)
    return httpx.AsyncClient(
        transport=transport,
        follow_redirects=False,  # design §8: redirects are never followed
        timeout=httpx.Timeout(timeout),
        headers={"User-Agent": f"smtp2api/{__version__}"},
    )
