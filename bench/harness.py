"""Processes of one benchmark run: the API sink, the baseline server, the gateway (a real
``smtp2api serve`` subprocess with a generated config) and the load generators.

Everything listens on 127.0.0.1 only. Each server is a subprocess, so the load generator,
the sink and the server under test compete for the same cores as they would in production.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procstat import Tree

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
FROM = "bench@example.com"
TO = "rcpt@example.net"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_port_range(count: int) -> int:
    """A port P such that P .. P+count-1 are free now (one ops endpoint per worker)."""
    for _ in range(100):
        start = free_port()
        if start + count > 65535:
            continue
        try:
            for offset in range(count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", start + offset))
        except OSError:
            continue
        return start
    raise RuntimeError("no free port range")


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """Wait until something accepts on ``port`` and sends a greeting (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.settimeout(5)
            if s.recv(64):
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def stop(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Sink:
    """The local email API (bench/sink.py) with a fixed answer delay."""

    latency_ms: float = 0.0
    proc: subprocess.Popen[str] | None = None
    port: int = 0

    def __enter__(self) -> Sink:
        self.proc = subprocess.Popen(
            [PYTHON, str(BENCH / "sink.py"), "--latency-ms", str(self.latency_ms)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        stop(self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/emails"


@dataclass
class Server:
    """A server under test: its process tree and its SMTP port."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path | None = None
    ops_port: int | None = None
    processes: int = 1  # worker i serves its metrics on ops_port + i

    @property
    def tree(self) -> Tree:
        return Tree(self.proc.pid)

    def metrics(self) -> list[str]:
        """Every worker's /metrics page (counters are per process)."""
        if self.ops_port is None:
            return []
        pages = []
        for index in range(self.processes):
            url = f"http://127.0.0.1:{self.ops_port + index}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:  # loopback only
                pages.append(str(response.read().decode()))
        return pages


@contextlib.contextmanager
def baseline(uvloop: bool = False) -> Iterator[Server]:
    args = [PYTHON, str(BENCH / "baseline.py")] + (["--uvloop"] if uvloop else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    try:
        wait_port(port, proc)
        yield Server("aiosmtpd", proc, port)
    finally:
        stop(proc)


@dataclass
class GatewayConfig:
    mode: str = "hybrid"
    processes: int = 1
    concurrency: int = 64
    log_level: str = "info"
    uvloop: bool = True
    aiohttp: bool = True  # False: hide aiohttp, so providers use httpx's own pool
    provider: str = "http"  # http (JSON API) | mailgun (raw MIME, multipart upload)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)

    def toml(self, sink_url: str, port: int, ops_port: int, spool: Path) -> str:
        smtp: dict[str, Any] = {
            "hostname": "bench.local",
            "listen": [f"127.0.0.1:{port}"],
            "max_connections": 20_000,
            "max_connections_per_ip": 20_000,
            "max_message_size": "30MB",
        }
        if self.processes != 1:
            smtp["processes"] = self.processes
        sections: dict[str, dict[str, Any]] = {
            "smtp": smtp,
            "providers.api": self._provider(sink_url),
            "delivery": {"mode": self.mode, "concurrency": self.concurrency},
            "spool": {"url": f"sqlite:///{spool}"},
            "http": {"listen": f"127.0.0.1:{ops_port}"},
            "log": {"level": self.log_level, "format": "json"},
        }
        for name, values in self.extra.items():
            sections.setdefault(name, {}).update(values)
        return "\n".join(
            f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
            for name, values in sections.items()
        )

    def _provider(self, sink_url: str) -> dict[str, Any]:
        key = "bench-key-0123456789"
        if self.provider == "mailgun":
            origin = sink_url.rsplit("/v1/", 1)[0]
            return {
                "type": "mailgun",
                "api_key": key,
                "domain": "bench.example",
                "base_url": origin,
            }
        return {"type": "http", "url": sink_url, "api_key": key}


@contextlib.contextmanager
def gateway(config: GatewayConfig, sink: Sink) -> Iterator[Server]:
    workdir = Path(tempfile.mkdtemp(prefix="smtp2api-bench-"))
    port = free_port()
    ops_port = _free_port_range(max(1, config.processes))
    path = workdir / "config.toml"
    path.write_text(config.toml(sink.url, port, ops_port, workdir / "spool.db"))
    # The gateway's own CLI; --no-uvloop hides uvloop from it to measure that lever alone.
    hide = "" if config.uvloop else "sys.modules['uvloop'] = None; "
    hide += "" if config.aiohttp else "sys.modules['aiohttp'] = None; "
    code = f"import sys; {hide}from smtp2api.cli import main; sys.exit(main(sys.argv[1:]))"
    log = (workdir / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [PYTHON, "-c", code, "serve", "--config", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    try:
        wait_port(port, proc)
        _wait_ready(ops_port, proc)
        yield Server("smtp2api", proc, port, workdir, ops_port, max(1, config.processes))
    except BaseException:
        sys.stderr.write((workdir / "gateway.log").read_text()[-3000:])
        raise
    finally:
        stop(proc)
        log.close()
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(ops_port: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{ops_port}/readyz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=5) as response,  # loopback only
        ):
            if response.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError("gateway never became ready")


# --- load generators ---------------------------------------------------------------------


def smtp_source_path() -> str | None:
    return shutil.which("smtp-source") or (
        "/usr/sbin/smtp-source" if Path("/usr/sbin/smtp-source").exists() else None
    )


def run_smtp_source(port: int, message: bytes, messages: int, concurrency: int) -> dict[str, Any]:
    """Postfix's C load generator: new connection per message (no ``-d``). Throughput only."""
    tool = smtp_source_path()
    assert tool is not None
    with tempfile.NamedTemporaryFile("wb", suffix=".eml") as fh:
        # -F appends CRLF to each line and dot-stuffs: give it LF-terminated lines.
        fh.write(message.replace(b"\r\n", b"\n"))
        fh.flush()
        args = [tool, "-s", str(concurrency), "-m", str(messages), "-F", fh.name]
        args += ["-f", FROM, "-t", TO, "-M", "bench.local", f"127.0.0.1:{port}"]
        started = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=900)
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {done.stderr.strip()[:300]}")
    return {"messages": messages, "ok": messages, "seconds": seconds, "rate": messages / seconds}


def run_builtin(
    port: int,
    message: bytes,
    messages: int,
    concurrency: int,
    rate: float = 0.0,
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("wb", suffix=".eml") as fh:
        fh.write(message)
        fh.flush()
        args = [PYTHON, str(BENCH / "load.py"), "send", "--port", str(port)]
        args += ["--message", fh.name, "--messages", str(messages)]
        args += ["--concurrency", str(concurrency), "--rate", str(rate)]
        done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"load.py failed: {done.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[dict[str, Any]]:
    """Hold ``count`` idle sessions (banner and EHLO done) open while the body runs."""
    args = [PYTHON, str(BENCH / "load.py"), "idle", "--port", str(port)]
    proc = subprocess.Popen(
        [*args, "--connections", str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    line = proc.stdout.readline().split()
    info: dict[str, Any] = {"held": int(line[1]) if len(line) == 2 else 0}
    try:
        yield info
    finally:
        proc.stdin.close()
        out = proc.stdout.read().strip().splitlines()
        proc.wait(60)
        if out:
            info.update(json.loads(out[-1]))
