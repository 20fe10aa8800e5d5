"""systemd's service notification protocol (sd_notify(3)) for ``Type=notify``, no dependency.

Each notification is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` is Linux's abstract namespace). With ``$WATCHDOG_USEC``
set, ``heartbeat()`` sends ``WATCHDOG=1`` every half period (sd_watchdog_enabled(3)) from the
event loop, so a wedged loop is what systemd sees and restarts. Outside systemd every call is
a no-op. Notifications are best effort: a failure is logged once, never raised.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

import structlog

log = structlog.get_logger("smtp2api.systemd")

STATUS_INTERVAL = 10.0  # seconds between STATUS= updates when no watchdog asks for more
_STATUS_TIMEOUT = 5.0  # a spool count that takes longer is not waited for

SpoolCounts = Callable[[], Awaitable[Mapping[str, int]]]


def describe_spool(counts: Mapping[str, int]) -> str:
    """The STATUS= text: the queue depth by state, as ``systemctl status`` shows it."""
    queued, active, dead = (counts.get(state, 0) for state in ("queued", "active", "dead"))
    return f"spool: {queued} queued, {active} active, {dead} dead"


async def spool_status(counts: SpoolCounts) -> str:
    """``describe_spool`` of a fresh count, or a placeholder when the spool does not answer."""
    try:
        async with asyncio.timeout(_STATUS_TIMEOUT):
            return describe_spool(await counts())
    except Exception as exc:  # noqa: BLE001 - a status line must never fail its caller
        log.warning("notify_status_unavailable", reason=type(exc).__name__)
        return "spool: unavailable"


class Notifier:
    """Sends sd_notify(3) messages; disabled (every method a no-op) without $NOTIFY_SOCKET."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        # sd_watchdog_enabled(3): ping at half the period, so one late ping is not fatal.
        self.watchdog_interval = watchdog_usec / 2_000_000 if watchdog_usec else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning("notify_socket_unsupported", address=address)  # e.g. vsock: addresses
            address = None
        watchdog: int | None = None
        pid = env.get("WATCHDOG_PID")
        # WATCHDOG_PID names the process the watchdog is meant for; a child must not ping.
        if env.get("WATCHDOG_USEC", "").isdigit() and (pid is None or pid == str(os.getpid())):
            watchdog = int(env["WATCHDOG_USEC"]) or None
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """One datagram ``KEY=VALUE\\n...``; True when it was handed to the socket."""
        if self.address is None:
            return False
        payload = "".join(f"{key}={value}\n" for key, value in fields.items()).encode()
        # "@name" is the abstract namespace: a leading NUL byte, no file (unix(7)).
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # never stall the event loop on a full queue
            self._sock.sendto(payload, target)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("notify_failed", error=exc.strerror or type(exc).__name__)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send(READY=1, **({"STATUS": status} if status else {}))

    def reloading(self) -> bool:
        # MONOTONIC_USEC: what Type=notify-reload (systemd >= 253) matches the reload by.
        return self.send(
            RELOADING=1,
            MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
            STATUS="reloading configuration",
        )

    def stopping(self) -> bool:
        return self.send(STOPPING=1, STATUS="stopping: draining sessions")

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    async def heartbeat(self, counts: SpoolCounts, interval: float = STATUS_INTERVAL) -> None:
        """Until cancelled: WATCHDOG=1 (when asked for) and STATUS= with the spool depth."""
        if not self.enabled:
            return
        if self.watchdog_interval is not None:
            interval = min(interval, self.watchdog_interval)
        while True:
            await asyncio.sleep(interval)
            if self.watchdog_interval is not None:
                self.watchdog()
            self.status(await spool_status(counts))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
