"""``httpx.MockTransport`` scaffolding for provider unit tests: scripted answers, kept requests.

async with mock_client(lambda request: httpx.Response(202)) as (client, calls):
    await provider_built_on(client).send(message, envelope)
assert calls[0].headers["Authorization"] == "Bearer ..."
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx

Handler = Callable[[httpx.Request], httpx.Response]


@contextlib.asynccontextmanager
async def mock_client(
    handler: Handler | httpx.Response | Iterable[httpx.Response],
) -> AsyncIterator[tuple[httpx.AsyncClient, list[httpx.Request]]]:
    """A client whose transport answers from ``handler``: a function, one response for every
    request, or a sequence of responses in order. Yields the client and the requests seen."""
    calls: list[httpx.Request] = []
    answer: Handler
    if isinstance(handler, httpx.Response):
        fixed = handler
        answer = lambda _request: fixed  # noqa: E731
    elif callable(handler):
        answer = handler
    else:
        queue = list(handler)
        answer = lambda _request: queue.pop(0)  # noqa: E731

    def record(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return answer(request)

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(record), follow_redirects=False
    ) as client:
        yield client, calls


def body_of(request: httpx.Request) -> Any:
    return json.loads(request.content)


def raising(exc: Exception) -> Handler:
    """A handler that fails every request with ``exc`` (a transport error)."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler
