"""The real daemon as a subprocess: ``python -m smtp2api serve --config FILE``.

For tests that need what only a process has: signals (SIGTERM, SIGHUP, SIGKILL), exit codes,
a restart on the same spool. The daemon's JSON log lines are collected from its stdout, so a
test waits for events (``gateway_started``, ``config_reloaded``) instead of sleeping.

    with Daemon(write_config(tmp_path, {...})) as d:
        send(d.smtp_port, ...)
        assert d.terminate() == 0
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from smtp2api.tomlout import dumps
from tests.conftest import REPO

Event = dict[str, Any]


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as TOML to ``path`` (replacing it whole, as an operator's editor would)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dumps(data))
    tmp.replace(path)
    return path


class Daemon:
    """One ``smtp2api serve`` process; ``start()`` returns once it logged ``gateway_started``."""

    def __init__(self, config: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("SMTP2API_")}
        self.env = {**clean, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []  # everything the process printed, JSON or not
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self.smtp_port = 0
        self.ops_port = 0

    def start(self, timeout: float = 20.0) -> Daemon:
        self._events.clear()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smtp2api", "serve", "--config", str(self.config)],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        started = self.wait_for("gateway_started", timeout=timeout)
        listeners = started["listeners"]
        self.smtp_port = int(listeners[0].rsplit(":", 1)[1])
        self.ops_port = int(started.get("ops_port") or 0)
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict):
                        self._events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def events(self, name: str | None = None) -> list[Event]:
        with self._cond:
            return [e for e in self._events if name is None or e.get("event") == name]

    def wait_for(
        self,
        name: str,
        *,
        timeout: float = 10.0,
        where: Callable[[Event], bool] = lambda e: True,
        after: int = 0,
    ) -> Event:
        """The first event ``name`` (from the ``after``-th event on) matching ``where``."""
        deadline = time.monotonic() + timeout

        def found() -> Event | None:
            for event in self._events[after:]:
                if event.get("event") == name and where(event):
                    return event
            return None

        with self._cond:
            while (event := found()) is None:
                left = deadline - time.monotonic()
                if left <= 0 or (self._reader is not None and not self._reader.is_alive()):
                    tail = "\n".join(self.lines[-30:])
                    raise AssertionError(f"no {name!r} event; daemon output ends with:\n{tail}")
                self._cond.wait(min(left, 0.5))
            return event

    def mark(self) -> int:
        """The number of events so far: pass as ``after`` to wait for a later one."""
        with self._cond:
            return len(self._events)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, like a power cut for the process."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._join()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._join()
        return code

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._join()


@contextlib.contextmanager
def running(config: Path, **kwargs: Any) -> Iterator[Daemon]:
    daemon = Daemon(config, **kwargs)
    with daemon:
        yield daemon
