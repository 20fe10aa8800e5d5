"""The ops endpoint on a real socket (127.0.0.1, port 0) with a real HTTP client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtp2api.metrics import Metrics
from smtp2api.ops import OpsServer

TIMEOUT = 0.5  # the server's per-phase timeout in these tests


@dataclass
class Readiness:
    ok: bool = True
    reasons: list[str] = field(default_factory=list)
    error: Exception | None = None
    hang: bool = False

    async def __call__(self) -> tuple[bool, list[str]]:
        if self.hang:
            await asyncio.sleep(60)
        if self.error is not None:
            raise self.error
        return self.ok, list(self.reasons)


@dataclass
class Ops:
    server: OpsServer
    metrics: Metrics
    readiness: Readiness
    client: httpx.AsyncClient

    async def raw(self, data: bytes) -> bytes:
        """Send ``data`` on a fresh connection and return everything the server answers."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        try:
            writer.write(data)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
            await writer.wait_closed()


@pytest.fixture(autouse=True)
async def _no_loop_errors() -> AsyncIterator[None]:
    """Fail on errors asyncio reports to the loop's handler (they are only logged)."""
    errors: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    yield
    await asyncio.sleep(0.01)  # let callbacks scheduled by the last close run
    loop.set_exception_handler(None)
    assert errors == []


@pytest.fixture
async def ops() -> AsyncIterator[Ops]:
    metrics = Metrics(providers=["ses"])
    readiness = Readiness()
    server = OpsServer(metrics, readiness, "127.0.0.1", 0, timeout=TIMEOUT, max_connections=8)
    await server.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        yield Ops(server, metrics, readiness, client)
    await server.stop()


async def test_metrics_are_served_in_prometheus_text(ops: Ops) -> None:
    probed = asyncio.Event()

    async def probe() -> tuple[dict[str, int], float | None]:
        probed.set()
        return {"queued": 7, "active": 0, "dead": 1}, 12.0

    ops.metrics.set_spool_probe(probe)
    ops.metrics.observe_reply("250 2.0.0 Ok")
    response = await ops.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert response.headers["connection"] == "close"
    assert probed.is_set()  # refreshed before rendering: the scrape is current
    names = {f.name for f in text_string_to_metric_families(response.text)}
    assert {"smtp2api_build_info", "smtp2api_replies", "smtp2api_spool_messages"} <= names
    assert 'smtp2api_spool_messages{state="queued"} 7.0' in response.text
    assert "smtp2api_spool_oldest_age_seconds 12.0" in response.text


async def test_metrics_still_served_when_the_spool_probe_hangs(ops: Ops) -> None:
    async def stuck() -> tuple[dict[str, int], float | None]:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    ops.metrics.set_spool_probe(stuck)
    started = time.monotonic()
    response = await ops.client.get("/metrics")
    assert response.status_code == 200
    assert "smtp2api_build_info" in response.text
    assert time.monotonic() - started < TIMEOUT + 2


async def test_query_string_is_ignored(ops: Ops) -> None:
    assert (await ops.client.get("/metrics?name[]=x")).status_code == 200


async def test_healthz(ops: Ops) -> None:
    response = await ops.client.get("/healthz")
    assert response.status_code == 200
    assert response.text == "ok\n"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"


async def test_readyz_ready(ops: Ops) -> None:
    response = await ops.client.get("/readyz")
    assert response.status_code == 200
    assert response.text == "ok\n"


async def test_readyz_not_ready_lists_reasons(ops: Ops) -> None:
    ops.readiness.ok = False
    ops.readiness.reasons = ["spool is not writable", "smtp listeners\r\nare not serving"]
    response = await ops.client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text.splitlines() == [
        "spool is not writable",
        "smtp listeners\\r\\nare not serving",
    ]


async def test_readyz_check_raising_or_hanging_is_not_ready(ops: Ops) -> None:
    ops.readiness.error = RuntimeError("secret detail")
    response = await ops.client.get("/readyz")
    assert response.status_code == 503
    assert response.text == "readiness check failed: RuntimeError\n"

    ops.readiness.error, ops.readiness.hang = None, True
    response = await ops.client.get("/readyz")
    assert response.status_code == 503
    assert response.text == "readiness check timed out\n"


async def test_unknown_path_is_404(ops: Ops) -> None:
    assert (await ops.client.get("/nope")).status_code == 404
    assert (await ops.client.post("/nope")).status_code == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_are_405_with_allow(ops: Ops, method: str) -> None:
    response = await ops.client.request(method, "/metrics", content=b"x" * 1000)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
async def test_head_has_the_headers_and_no_body(ops: Ops, path: str) -> None:
    get = await ops.client.get(path)
    head = await ops.client.head(path)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert int(head.headers["content-length"]) > 0


async def test_head_raw_response_has_no_body(ops: Ops) -> None:
    answer = await ops.raw(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\n")
    assert b"Content-Length: 3\r\n" in answer


async def test_oversized_request_line_is_refused(ops: Ops) -> None:
    answer = await ops.raw(b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 414 ")


async def test_oversized_headers_are_refused(ops: Ops) -> None:
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 200) for i in range(50))
    answer = await ops.raw(b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    answer = await ops.raw(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /healthz\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", b"400"),
        (b"GET healthz HTTP/1.1\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/2.0\r\n\r\n", b"505"),
        (b"\r\nGET /healthz HTTP/1.0\r\n\r\n", b"200"),
        (b"GET http://localhost/healthz HTTP/1.1\r\n\r\n", b"200"),
        (b"GET /healthz HTTP/1.1\n\n", b"200"),
    ],
)
async def test_request_parsing(ops: Ops, request_bytes: bytes, status: bytes) -> None:
    answer = await ops.raw(request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    assert b"Connection: close\r\n" in answer


async def test_silent_client_is_dropped_without_blocking_others(ops: Ops) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", ops.server.port)
    try:
        started = time.monotonic()
        # Others are served at once while the silent connection is open...
        assert (await ops.client.get("/healthz")).status_code == 200
        assert time.monotonic() - started < TIMEOUT
        # ...and the silent one is closed once the timeout has passed.
        assert await asyncio.wait_for(reader.read(), TIMEOUT + 2) == b""
        assert time.monotonic() - started >= TIMEOUT * 0.9
    finally:
        writer.close()
        await writer.wait_closed()


async def test_slow_client_cannot_extend_its_time(ops: Ops) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", ops.server.port)
    try:
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(20):  # a header byte every 0.1s: each read is fast, the whole is not
            await asyncio.sleep(0.1)
            if reader.at_eof():
                break
            writer.write(b"X")
        assert await asyncio.wait_for(reader.read(), TIMEOUT + 2) == b""
        assert time.monotonic() - started < TIMEOUT + 1
    except ConnectionResetError:
        pass  # the server aborted while we were still writing: dropped, as wanted
    finally:
        writer.close()
        await writer.wait_closed()


async def test_connections_beyond_the_limit_are_shed(ops: Ops) -> None:
    idle = [await asyncio.open_connection("127.0.0.1", ops.server.port) for _ in range(8)]
    try:
        await asyncio.sleep(0.05)  # let the server accept them
        reader, writer = await asyncio.open_connection("127.0.0.1", ops.server.port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            started = time.monotonic()
            try:
                answer = await asyncio.wait_for(reader.read(), 2)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # aborted at once, not queued behind the idle ones
            assert time.monotonic() - started < TIMEOUT
        finally:
            writer.close()
            await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    finally:
        for _, w in idle:
            w.close()
            await asyncio.gather(w.wait_closed(), return_exceptions=True)


async def test_stop_closes_open_connections_promptly() -> None:
    server = OpsServer(Metrics(process_metrics=False), Readiness(), "127.0.0.1", 0, timeout=30)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await asyncio.wait_for(server.stop(), 2)
        assert time.monotonic() - started < 1
        assert await asyncio.wait_for(reader.read(), 2) == b""
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    await server.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = server.port


async def test_unread_request_body_does_not_reset_the_response(ops: Ops) -> None:
    # Closing with unread input makes the kernel send RST: the lingering close avoids it.
    for _ in range(3):
        response = await ops.client.post("/metrics", content=b"x" * 300_000)
        assert response.status_code == 405
