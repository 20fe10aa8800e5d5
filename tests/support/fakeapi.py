"""A real HTTP API on 127.0.0.1 for integration tests: scripted answers, recorded requests.

Runs on the test's event loop (``async with FakeAPI() as api``) or on its own loop in a
background thread (``with FakeAPI().running_in_thread() as api``), for tests that run the
gateway as a subprocess and talk to it with blocking clients.

    async with FakeAPI() as api:
        api.push(Answer(429, headers={"Retry-After": "7"}), Answer(202, json={"id": "m-1"}))
        ...  # point a provider at api.url
        assert api.requests[0].json["subject"] == "hi"
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_NO_JSON: Any = object()  # Answer.json default: no JSON body (None would be JSON `null`)


@dataclass(frozen=True)
class Answer:
    """One scripted response. ``json`` wins over ``body``; ``drop`` closes without answering."""

    status: int = 200
    json: Any = _NO_JSON
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (or dropping)
    drop: bool = False  # reset the connection after reading the request: "outcome unknown"


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str  # without the query
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes

    @property
    def json(self) -> Any:
        """The parsed JSON body, or None when the body is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


Handler = Callable[[ReceivedRequest], Answer]


def accept_all(request: ReceivedRequest, number: int) -> Answer:
    """The default: 200 with a fresh ``id`` like a typical email API."""
    return Answer(200, json={"id": f"fake-{number}"}, headers={"X-Request-Id": f"req-{number}"})


class FakeAPI:
    """An aiohttp server answering every path and method from a queue, a handler or a default.

    Precedence per request: the next ``push``-ed answer, else ``handler(request)`` when set,
    else ``default`` (200 ``{"id": "fake-N"}``). Thread-safe: the server may run on another
    thread's loop while the test pushes answers and reads ``requests``.
    """

    def __init__(
        self,
        *,
        handler: Handler | None = None,
        default: Answer | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.handler = handler
        self.default = default
        self.host = host
        self.port = 0
        self._answers: deque[Answer] = deque()
        self._requests: list[ReceivedRequest] = []
        self._lock = threading.Condition()
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("FakeAPI is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    def push(self, *answers: Answer) -> None:
        """Queue answers for the next requests, in order."""
        with self._lock:
            self._answers.extend(answers)

    def clear(self) -> None:
        """Forget received requests and queued answers (between phases of one test)."""
        with self._lock:
            self._answers.clear()
            self._requests.clear()

    def wait_for_requests_sync(self, count: int, timeout: float = 5.0) -> list[ReceivedRequest]:
        """Block until ``count`` requests arrived (not on the loop the server runs on)."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(f"{len(self._requests)} of {count} requests after {timeout}s")
            return list(self._requests)

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[ReceivedRequest]:
        """Wait until ``count`` requests arrived; fine whichever loop the server runs on."""
        return await asyncio.to_thread(self.wait_for_requests_sync, count, timeout)

    # --- serving ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        received = ReceivedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.read(),
        )
        with self._lock:
            self._requests.append(received)
            number = len(self._requests)
            queued = self._answers.popleft() if self._answers else None
            self._lock.notify_all()
        answer = queued or self._pick(received, number)
        if answer.delay and self._closing is not None:
            # Wake early on shutdown: teardown must not wait for a long scripted delay.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), answer.delay)
        if answer.drop:
            assert request.transport is not None
            request.transport.abort()  # RST-like close: the client sees the connection die
            raise asyncio.CancelledError  # aiohttp treats this as "no response to send"
        if answer.json is not _NO_JSON:
            return web.json_response(answer.json, status=answer.status, headers=answer.headers)
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    def _pick(self, received: ReceivedRequest, number: int) -> Answer:
        if self.handler is not None:
            return self.handler(received)
        return self.default or accept_all(received, number)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that gives up (timeout) cancels its handler.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        self._closing = asyncio.Event()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]  # port 0: the OS picked a free one

    async def close(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeAPI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @contextlib.contextmanager
    def running_in_thread(self) -> Iterator[FakeAPI]:
        """Serve from a background thread with its own event loop, for blocking tests."""
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # surfaced to the caller below
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.close())
            loop.run_until_complete(loop.shutdown_asyncgens())

        thread = threading.Thread(target=serve, name="fakeapi", daemon=True)
        thread.start()
        ready.wait(10)
        try:
            if failure:
                raise failure[0]
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
