"""Several worker processes behind the same listening sockets (``[smtp] processes``).

One Python process runs one event loop on one core; the supervisor binds every SMTP
listener, then forks the workers, which all accept on the inherited sockets (the kernel
hands each connection to one of them). The supervisor itself runs no event loop and serves
nothing: it forwards SIGTERM/SIGINT and SIGHUP, restarts a worker that dies (with backoff),
and speaks to systemd (READY, RELOADING, STOPPING, WATCHDOG) for all of them.

Signals are blocked and taken with ``sigtimedwait``, so there is no handler racing the
main loop and no polling. The workers share the spool: SQLite in WAL mode lets several
processes write (one at a time, each with its own group commit; ``docs/performance.md``),
claims are exclusive, and a dead worker's claims are taken over when their lease lapses.
Only the first start of worker 0 runs ``spool.recover`` (the others' claims are live).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from smtp2api.app import LISTEN_BACKLOG, ProcessSlot
from smtp2api.config import Settings
from smtp2api.errors import ConfigError, GatewayError
from smtp2api.logs import flush_logs
from smtp2api.systemd import Notifier
from smtp2api.units import parse_hostport

log = structlog.get_logger("smtp2api.supervisor")

RunWorker = Callable[[Settings, ProcessSlot], int]
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_START_TIMEOUT = 120.0  # the first worker opens (and maybe migrates) the spool
_STABLE = 60.0  # a worker that lived this long had no crash loop: its backoff resets
_PR_SET_PDEATHSIG = 1  # prctl(2)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit: every SMTP connection is a file
    descriptor, and the usual soft default (1024) caps a gateway far below its memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def worker_count(settings: Settings) -> int:
    return settings.smtp.processes or os.cpu_count() or 1


def bind_listeners(settings: Settings) -> dict[tuple[str, str], list[socket.socket]]:
    """Bind every SMTP listen address, as ``loop.create_server(host, port)`` would."""
    smtp = settings.smtp
    groups = (("starttls", smtp.listen), ("tls", smtp.tls_listen), ("plain", smtp.plain_listen))
    bound: dict[tuple[str, str], list[socket.socket]] = {}
    try:
        for kind, addresses in groups:
            for address in addresses:
                bound[(kind, address)] = _bind(address)
    except OSError as exc:
        for sockets in bound.values():
            for sock in sockets:
                sock.close()
        raise GatewayError(f"cannot listen: {exc.strerror or exc}") from None
    return bound


def _bind(address: str) -> list[socket.socket]:
    host, port = parse_hostport(address)
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # As asyncio does: "[::]" and "0.0.0.0" are two listeners, not one.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            for other in sockets:
                other.close()
            raise
        sockets.append(sock)
    return sockets


@dataclass
class _Worker:
    index: int
    pid: int = 0
    started: float = 0.0
    crashes: int = 0
    restart_at: float | None = None


@dataclass
class Supervisor:
    """Forks ``processes`` workers running ``run_worker(settings, slot)`` and keeps them up."""

    settings: Settings
    reload_settings: Callable[[], Settings]
    processes: int
    run_worker: RunWorker
    sockets: dict[tuple[str, str], list[socket.socket]] = field(default_factory=dict)
    notify: Notifier = field(default_factory=Notifier.from_environ)
    workers: list[_Worker] = field(default_factory=list)
    stopping: bool = False

    def run(self) -> int:
        """Until SIGTERM/SIGINT: the exit code (0, or 1 when the first workers fail)."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            self.workers = [_Worker(i) for i in range(self.processes)]
            for worker in self.workers:
                # One at a time, waiting for each to serve: worker 0 recovers the spool
                # before any other worker may claim from it.
                if not self._spawn(worker, old_mask, wait_ready=True):
                    log.error("worker_start_failed", worker=worker.index)
                    self._stop_all()
                    return 1
            log.info("supervisor_started", workers=[w.pid for w in self.workers])
            self.notify.ready(f"{self.processes} worker processes")
            self._loop(old_mask)
            return 0
        finally:
            for sockets in self.sockets.values():
                for sock in sockets:
                    sock.close()
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            self.notify.close()

    # --- the loop -------------------------------------------------------------------------

    def _loop(self, old_mask: set[int | signal.Signals]) -> None:
        watchdog = self.notify.watchdog_interval
        next_ping = time.monotonic() + watchdog if watchdog else None
        while True:
            now = time.monotonic()
            deadlines = [w.restart_at for w in self.workers if w.restart_at is not None]
            if next_ping is not None:
                deadlines.append(next_ping)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            info = (
                signal.sigtimedwait(_SIGNALS, timeout)
                if timeout is not None
                else (signal.sigwaitinfo(_SIGNALS))
            )
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self._stop_all()
                return
            if info is not None and info.si_signo == signal.SIGHUP:
                self._reload()
            self._reap()
            now = time.monotonic()
            for worker in self.workers:
                if worker.restart_at is not None and worker.restart_at <= now:
                    self._spawn(worker, old_mask, wait_ready=False)
            if next_ping is not None and watchdog is not None and now >= next_ping:
                # Only while every worker runs: a worker in a crash loop lets systemd act.
                if all(w.pid for w in self.workers):
                    self.notify.watchdog()
                next_ping = now + watchdog

    def _reload(self) -> None:
        self.notify.reloading()
        try:
            self.settings = self.reload_settings()  # for workers started from now on
        except (ConfigError, GatewayError) as exc:
            log.error("reload_refused", problems=getattr(exc, "problems", [str(exc)]))
        for worker in self.workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGHUP)  # each worker reloads the file itself
        self.notify.ready(f"{self.processes} worker processes")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for worker in self.workers:
                if worker.pid == pid:
                    self._died(worker, status)

    def _died(self, worker: _Worker, status: int) -> None:
        worker.pid = 0
        code = os.waitstatus_to_exitcode(status)
        if self.stopping:
            return
        lived = time.monotonic() - worker.started
        worker.crashes = 1 if lived > _STABLE else worker.crashes + 1
        delay = min(30.0, 0.5 * 2 ** (worker.crashes - 1))
        worker.restart_at = time.monotonic() + delay
        log.error("worker_died", worker=worker.index, exit_code=code, restart_in=delay)

    def _stop_all(self) -> None:
        self.stopping = True
        self.notify.stopping()
        for worker in self.workers:
            worker.restart_at = None
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        # Workers drain their sessions for up to shutdown_timeout, then close the spool.
        deadline = time.monotonic() + self.settings.delivery.shutdown_timeout + 30.0
        while any(w.pid for w in self.workers):
            left = deadline - time.monotonic()
            if left <= 0:
                for worker in self.workers:
                    if worker.pid:
                        log.error("worker_killed", worker=worker.index)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(worker.pid, signal.SIGKILL)
                deadline = time.monotonic() + 30.0
            signal.sigtimedwait({signal.SIGCHLD}, min(max(left, 0.05), 1.0))
            self._reap()
        log.info("supervisor_stopped")

    # --- starting a worker ----------------------------------------------------------------

    def _spawn(
        self, worker: _Worker, old_mask: set[int | signal.Signals], *, wait_ready: bool
    ) -> bool:
        worker.restart_at = None
        read_fd, write_fd = os.pipe()
        first = worker.index == 0 and worker.crashes == 0 and worker.started == 0.0
        supervisor_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker; it never returns from here
            os.close(read_fd)
            self._become_worker(worker.index, first, write_fd, old_mask, supervisor_pid)
        os.close(write_fd)
        worker.pid, worker.started = pid, time.monotonic()
        try:
            if not wait_ready:
                return True
            ready, _, _ = select.select([read_fd], [], [], _START_TIMEOUT)
            return bool(ready) and os.read(read_fd, 1) == b"R"
        finally:
            os.close(read_fd)

    def _become_worker(
        self,
        index: int,
        recover: bool,
        ready_fd: int,
        old_mask: set[int | signal.Signals],
        supervisor_pid: int,
    ) -> None:
        code = 1
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            _die_with_parent(supervisor_pid)
            # The supervisor is systemd's main process: workers stay quiet towards it.
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
            structlog.contextvars.bind_contextvars(worker=index)

            def ready() -> None:
                with contextlib.suppress(OSError):
                    os.write(ready_fd, b"R")
                    os.close(ready_fd)

            slot = ProcessSlot(index=index, sockets=self.sockets, recover=recover, ready=ready)
            code = self.run_worker(self.settings, slot)
        except BaseException:  # a worker must never return into the supervisor
            log.exception("worker_failed", worker=index)
        finally:
            flush_logs()  # os._exit skips atexit: the lines gathered for the loop go now
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the supervisor dies, even by SIGKILL (prctl(2), Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def supervise(
    settings: Settings, reload_settings: Callable[[], Settings], run_worker: RunWorker
) -> int:
    """``smtp2api serve`` with ``[smtp] processes`` other than 1."""
    sockets = bind_listeners(settings)
    supervisor = Supervisor(
        settings=settings,
        reload_settings=reload_settings,
        processes=worker_count(settings),
        run_worker=run_worker,
        sockets=sockets,
    )
    return supervisor.run()
