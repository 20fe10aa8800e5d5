"""``bounded_request``'s direct path (the request built and sent without ``AsyncClient.send``):
the same request on the wire as ``AsyncClient.stream`` makes, and the general path whenever
something only ``send`` does is needed."""

from __future__ import annotations

import gzip
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from smtp2api.errors import ConnectFailed
from smtp2api.providers.request import bounded_request

URL = "https://api.example.net/v1/emails"


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    # The shape of transport.new_http_client + upstream.guard_client's header.
    client = httpx.AsyncClient(
        transport=httpx.MockTransport(handler),
        follow_redirects=False,
        headers={"User-Agent": "smtp2api/test"},
    )
    client.headers["Accept-Encoding"] = "identity"
    return client


async def _chunks() -> AsyncIterator[bytes]:
    yield b"abc"
    yield b"def"


CASES: dict[str, Callable[[], tuple[str, dict[str, Any]]]] = {
    "bytes": lambda: ("POST", {"content": b'{"a":1}', "headers": {"Content-Type": "x/y"}}),
    "empty POST": lambda: ("POST", {"content": b"", "headers": [("X-A", "1"), ("x-a", "2")]}),
    "GET": lambda: ("GET", {"content": None, "headers": {"Accept": "application/json"}}),
    "json": lambda: ("POST", {"json": {"a": "\u00e9"}, "headers": httpx.Headers({"accept": "a"})}),
    "overrides": lambda: (
        "POST",
        {"content": b"x", "headers": {"user-agent": "mine", "Host": "other.example"}},
    ),
    "length given": lambda: ("POST", {"content": b"xy", "headers": {"Content-Length": "2"}}),
    "stream": lambda: ("PUT", {"content": _chunks(), "headers": {"Content-Length": "6"}}),
    "chunked": lambda: ("POST", {"content": _chunks()}),
    "form": lambda: (
        "POST",
        {
            "data": {"to": ["a@example.net", "b@example.net"]},
            "files": {"message": ("m.eml", b"raw", "message/rfc822")},
            "auth": httpx.BasicAuth("api", "key-1"),
            "headers": {"Accept": "application/json"},
        },
    ),
}


def _wire(request: httpx.Request) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """What goes out, with a multipart boundary (random per request) made comparable."""
    headers = sorted((k.lower(), v) for k, v in request.headers.multi_items())
    body = request.content
    found = re.search(r"boundary=([0-9a-f]+)", request.headers.get("content-type", ""))
    if found:
        headers = [(k, v.replace(found[1], "B")) for k, v in headers]
        body = body.replace(found[1].encode(), b"B")
    return request.method, str(request.url), headers, body


@pytest.mark.parametrize("case", sorted(CASES))
async def test_the_direct_path_sends_what_stream_sends(case: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json={"id": "x"})

    async with _client(handler) as client:
        method, request = CASES[case]()
        answer = await bounded_request(client, method, URL, budget=5, **request)
        assert (answer.status, answer.body) == (202, b'{"id":"x"}')
        method, request = CASES[case]()
        auth = request.pop("auth", httpx.USE_CLIENT_DEFAULT)
        async with client.stream(method, URL, auth=auth, **request) as response:
            await response.aread()
    direct, general = seen
    assert _wire(direct) == _wire(general)


async def test_a_multi_step_auth_flow_goes_through_send() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if "authorization" not in request.headers:
            challenge = 'Digest realm="api", nonce="n0", qop="auth", algorithm=MD5'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return httpx.Response(200, json={"id": "digest"})

    async with _client(handler) as client:
        answer = await bounded_request(
            client, "POST", URL, budget=5, content=b"{}", auth=httpx.DigestAuth("u", "p")
        )
    assert answer.status == 200
    assert len(seen) == 2
    assert seen[1].headers["authorization"].startswith("Digest ")


async def test_credentials_in_the_url_still_become_basic_auth() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    async with _client(handler) as client:
        url = "https://api:s3cret@api.example.net/v1/emails"
        await bounded_request(client, "POST", url, budget=5, content=b"{}")
    assert seen[0].headers["authorization"] == "Basic YXBpOnMzY3JldA=="  # api:s3cret


async def test_client_cookies_still_go_out() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    async with _client(handler) as client:
        client.cookies.set("lb", "node-2", domain="api.example.net")
        await bounded_request(client, "POST", URL, budget=5, content=b"{}")
    assert seen[0].headers["cookie"] == "lb=node-2"


async def test_event_hooks_run_and_a_refusing_hook_means_never_sent() -> None:
    calls: list[str] = []

    async def on_request(request: httpx.Request) -> None:
        calls.append(f"request {request.method}")
        if request.url.host == "169.254.169.254":
            raise httpx.ConnectError("refused", request=request)

    async def on_response(response: httpx.Response) -> None:
        calls.append(f"response {response.status_code} {response.request.url.path}")

    async with _client(lambda _request: httpx.Response(204)) as client:
        client.event_hooks = {"request": [on_request], "response": [on_response]}
        answer = await bounded_request(client, "POST", URL, budget=5, content=b"{}")
        with pytest.raises(ConnectFailed):
            await bounded_request(client, "GET", "http://169.254.169.254/", budget=5)
    assert answer.status == 204
    assert calls == ["request POST", "response 204 /v1/emails", "request GET"]


async def test_a_closed_client_sends_nothing() -> None:
    client = _client(lambda _request: httpx.Response(200))
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await bounded_request(client, "POST", URL, budget=5, content=b"{}")


async def test_encoded_answers_are_decoded_and_plain_ones_read_as_sent() -> None:
    body = b'{"id": "zipped"}'
    answers = iter(
        [
            httpx.Response(200, content=gzip.compress(body), headers={"Content-Encoding": "gzip"}),
            httpx.Response(200, content=body),
        ]
    )
    async with _client(lambda _request: next(answers)) as client:
        zipped = await bounded_request(client, "POST", URL, budget=5, content=b"{}")
        plain = await bounded_request(client, "POST", URL, budget=5, content=b"{}", limit=5)
    assert zipped.body == body
    assert plain.body == body[:5]
