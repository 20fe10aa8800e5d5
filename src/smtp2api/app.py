"""The Gateway: builds every live object from settings, serves, reloads, shuts down in order.

Startup: spool (and recovery) -> providers -> SMTP listeners -> ops endpoint -> worker.
Shutdown (uvicorn's order): stop accepting -> sessions in DATA finish up to
``shutdown_timeout`` -> stop the worker (its entries stay spooled) -> close clients and spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from smtp2api import __version__
from smtp2api.auth import Authenticator, AuthThrottle
from smtp2api.config import Settings
from smtp2api.delivery import Deliverer
from smtp2api.drain import drain
from smtp2api.errors import ConfigError, GatewayError
from smtp2api.failures import FailureNotifier, NoticeConfig
from smtp2api.intake import Intake, IntakeConfig
from smtp2api.logs import configure_logging
from smtp2api.metrics import Metrics
from smtp2api.mime import MimeLimits
from smtp2api.ops import OpsServer
from smtp2api.policy import Policy
from smtp2api.providers.base import Provider
from smtp2api.providers.registry import build_provider
from smtp2api.providers.upstream import guard_client
from smtp2api.proxy import ProxyGate
from smtp2api.replies import SMTPReply
from smtp2api.routing import Router
from smtp2api.smtp import ConnectionTracker, FrontConfig, GatewaySMTP, Handler, ListenerKind
from smtp2api.smtp_guard import GuardLimits
from smtp2api.spool import open_spool
from smtp2api.spool.base import Spool, SpoolEntry, new_message_id
from smtp2api.systemd import Notifier, spool_status
from smtp2api.transport import new_http_client
from smtp2api.units import parse_hostport
from smtp2api.worker import Worker, WorkerConfig

log = structlog.get_logger("smtp2api.app")
# listen(2) queue. asyncio's default (100) also applies to a socket the supervisor bound and
# listened on: create_server(sock=...) calls listen() again. With more clients connecting at
# once than that, the kernel drops SYNs and each dropped client waits a 1 s retransmit:
# 200 clients in queue mode got 108 messages/s instead of 700+ (docs/performance.md).
LISTEN_BACKLOG = 1024
_GC_GEN0 = 10_000  # allocations between young-generation collections (CPython's default: 700)


@dataclass(frozen=True, slots=True)
class Listener:
    kind: ListenerKind
    host: str
    port: int  # the bound port (the configured one may be 0)


@dataclass(frozen=True)
class ProcessSlot:
    """This process's share of a multi-process gateway (``[smtp] processes``, supervisor.py)."""

    index: int  # 0..processes-1; worker i serves the ops endpoint on its port + i
    # (kind, configured address) -> listening sockets the supervisor bound before forking
    sockets: Mapping[tuple[str, str], Sequence[socket.socket]]
    recover: bool  # only the first start of worker 0 takes back stale claims (spool.recover)
    ready: Callable[[], None] = lambda: None  # called once every listener serves


def build_tls_context(settings: Settings) -> ssl.SSLContext | None:
    smtp = settings.smtp
    if smtp.tls_cert_file is None or smtp.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(smtp.tls_cert_file, smtp.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            [f"smtp.tls_cert_file: cannot load certificate and key ({exc})"]
        ) from None
    return context


class Gateway:
    """Owns the live objects of one configuration and the servers that use them."""

    def __init__(
        self, settings: Settings, *, metrics: Metrics | None = None, slot: ProcessSlot | None = None
    ) -> None:
        self.settings = settings
        self.slot = slot
        self.metrics = metrics or Metrics(version=__version__)
        self.listeners: list[Listener] = []
        self._servers: list[asyncio.Server] = []
        self._tracker = ConnectionTracker(
            settings.smtp.max_connections, settings.smtp.max_connections_per_ip
        )
        # aiohttp under httpx's API: httpx's own pool serialises under load (transport.py).
        self._http = new_http_client(settings.delivery.concurrency + 100)
        guard_client(self._http)  # design §8: never link-local or metadata addresses
        # Per-IP AUTH failures outlive reloads (docs/security.md).
        self._auth_throttle = AuthThrottle(
            settings.smtp.auth_failure_limit, settings.smtp.auth_lockout
        )
        self.spool: Spool = open_spool(settings.spool)
        self._providers: dict[str, Provider] = {}
        self._tls: ssl.SSLContext | None = None
        self.ops: OpsServer | None = None
        self.worker: Worker | None = None
        self.handler: Handler | None = None
        self._fronts: dict[ListenerKind, FrontConfig] = {}
        # Set on every SMTP reply and disconnect: shutdown re-checks its sessions then.
        self._activity = asyncio.Event()
        self._retired: list[Provider] = []  # replaced by a reload, closed at shutdown
        self._old_handlers: list[Handler] = []  # of sessions opened before a reload
        self._old_workers: set[Worker] = set()  # replaced by a reload, finishing their sends
        self._intake_pending: set[asyncio.Future[object]] = set()  # spool writes after replies

    # building -----------------------------------------------------------------------------
    def _build(self, settings: Settings) -> tuple[Handler, Worker, dict[str, Provider]]:
        providers = {
            name: build_provider(name, conf, self._http)
            for name, conf in settings.providers.items()
        }
        deliverer = Deliverer(
            providers,
            observe=self.metrics.observe_delivery,
            on_circuit=self.metrics.observe_circuit,
            circuit_threshold=settings.delivery.circuit_threshold,
            circuit_cooldown=settings.delivery.circuit_cooldown,
        )
        self.metrics.set_providers(list(providers))
        router = Router(settings.routes_or_default())
        notifier = FailureNotifier(
            NoticeConfig(
                hostname=settings.smtp.hostname,
                bounce=settings.delivery.bounce,
                webhook=settings.delivery.failure_webhook,
            ),
            spool=self.spool,
            client=self._http,
        )

        def route_for(entry: SpoolEntry) -> tuple[str, ...] | None:
            # For entries whose stored route names no provider of this config (a reload).
            route = router.select(entry.account, entry.mail_from)
            return route.providers if route is not None else None

        worker = Worker(
            spool=self.spool,
            deliverer=deliverer,
            config=WorkerConfig(
                concurrency=settings.delivery.concurrency,
                max_age=settings.delivery.max_age,
                backoff_min=settings.delivery.backoff_min,
                backoff_max=settings.delivery.backoff_max,
                lease=settings.spool.lease,
                soft_bounce=settings.delivery.soft_bounce,
                mime_limits=mime_limits(settings),
            ),
            on_dead=notifier if notifier.enabled else None,
            route_for=route_for,
        )
        intake = Intake(
            config=IntakeConfig(
                mode=settings.delivery.mode,
                sync_timeout=settings.delivery.sync_timeout,
                soft_bounce=settings.delivery.soft_bounce,
                backoff_min=settings.delivery.backoff_min,
                mime_limits=mime_limits(settings),
            ),
            router=router,
            deliverer=deliverer,
            spool=self.spool,
            wake_worker=worker.wake,
            on_result=self.metrics.observe_message,
            pending=self._intake_pending,
        )

        def route_size_limit(account: str | None, mail_from: str) -> int | None:
            route = router.select(account, mail_from)
            if route is None:
                return None
            return min(settings.smtp.max_message_size, deliverer.size_limit(route.providers))

        handler = Handler(
            policy=Policy(settings.smtp.trusted_networks, settings.accounts),
            authenticator=Authenticator(
                {a.username: a.password_hash.get_secret_value() for a in settings.accounts}
            ),
            accept=intake.accept,
            new_id=new_message_id,
            route_size_limit=route_size_limit,
            max_recipients=settings.smtp.max_recipients,
            on_reply=self._on_reply,
            on_auth_result=self.metrics.observe_auth,
            on_connection=self._on_connection,
            on_connection_result=self.metrics.observe_connection,
            auth_throttle=self._auth_throttle,
        )
        return handler, worker, providers

    def _on_reply(self, reply: SMTPReply | str) -> None:
        self.metrics.observe_reply(reply)
        self._activity.set()

    def _on_connection(self, delta: int) -> None:
        self.metrics.observe_active(delta)
        self._activity.set()

    def _front(self, settings: Settings, kind: ListenerKind) -> FrontConfig:
        smtp = settings.smtp
        return FrontConfig(
            hostname=smtp.hostname,
            kind=kind,
            require_tls=smtp.require_tls,
            max_message_size=smtp.max_message_size,
            max_recipients=smtp.max_recipients,
            idle_timeout=smtp.idle_timeout,
            guards=GuardLimits(
                max_line_length=smtp.max_line_length,
                min_data_rate=smtp.min_data_rate,
                data_rate_grace=smtp.data_rate_grace,
                junk_command_limit=smtp.junk_command_limit,
            ),
            proxy=(
                ProxyGate.build(smtp.proxy_trusted_networks, smtp.idle_timeout)
                if smtp.proxy_protocol
                else None
            ),
        )

    # lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        settings = self.settings
        self._tls = build_tls_context(settings)
        # With several processes, only the first start of worker 0 may take claims back: the
        # others' claims are live. A restarted worker's lapse with their lease (claim()).
        recovered = (
            await self.spool.recover(time.time()) if self.slot is None or self.slot.recover else 0
        )
        if recovered:
            log.info("spool_recovered", entries=recovered)
        self.handler, self.worker, self._providers = self._build(settings)
        self._fronts = {k: self._front(settings, k) for k in ("starttls", "tls", "plain")}
        loop = asyncio.get_running_loop()
        groups: list[tuple[ListenerKind, list[str]]] = [
            ("starttls", settings.smtp.listen),
            ("tls", settings.smtp.tls_listen),
            ("plain", settings.smtp.plain_listen),
        ]
        for kind, addresses in groups:
            for address in addresses:
                host, port = parse_hostport(address)
                inherited = self.slot.sockets.get((kind, address), ()) if self.slot else ()
                try:
                    servers = [
                        await loop.create_server(
                            self._factory(kind),
                            sock=sock,
                            ssl=self._tls if kind == "tls" else None,
                            backlog=LISTEN_BACKLOG,
                        )
                        for sock in inherited
                    ] or [
                        await loop.create_server(
                            self._factory(kind),
                            host=host,
                            port=port,
                            ssl=self._tls if kind == "tls" else None,
                            reuse_address=True,
                            backlog=LISTEN_BACKLOG,
                        )
                    ]
                except OSError as exc:
                    await self.aclose()
                    raise GatewayError(f"cannot listen on {address}: {exc.strerror}") from None
                for server in servers:
                    self._servers.append(server)
                    for sock in server.sockets:
                        bound = sock.getsockname()
                        self.listeners.append(Listener(kind, str(bound[0]), int(bound[1])))
        if settings.http.listen:
            host, port = parse_hostport(settings.http.listen)
            if self.slot is not None and port:
                port += self.slot.index  # one ops endpoint per worker: metrics are per process
            self.ops = OpsServer(self.metrics, self.readiness, host, port)
            await self.ops.start()
        self.metrics.set_spool_probe(self._spool_probe)
        self.worker.start()
        log.info(
            "gateway_started",
            listeners=[f"{x.kind}:{x.host}:{x.port}" for x in self.listeners],
            ops_port=self.ops.port if self.ops else None,
            mode=settings.delivery.mode,
            providers=sorted(self._providers),
        )

    def _factory(self, kind: ListenerKind) -> Callable[[], GatewaySMTP]:
        def make() -> GatewaySMTP:
            # Read at connection time, so a reload applies to new sessions only.
            assert self.handler is not None
            return GatewaySMTP(
                self.handler, front=self._fronts[kind], tracker=self._tracker, tls_context=self._tls
            )

        return make

    def port(self, kind: ListenerKind = "starttls") -> int:
        """The first bound port of a listener kind (tests listen on port 0)."""
        return next(x.port for x in self.listeners if x.kind == kind)

    async def _spool_probe(self) -> tuple[dict[str, int], float | None]:
        counts = await self.spool.counts()
        oldest = await self.spool.oldest_created_at()
        return counts, (time.time() - oldest if oldest is not None else None)

    async def readiness(self) -> tuple[bool, list[str]]:
        reasons = []
        if not self._servers or not all(s.is_serving() for s in self._servers):
            reasons.append("smtp listeners are not serving")
        if not await self.spool.check_writable():
            reasons.append("spool is not writable")
        return (not reasons, reasons)

    async def reload(self, settings: Settings) -> None:
        """Apply a new configuration to new sessions; listeners and the spool stay as they are.

        Nothing changes unless all of it builds (TLS files load, every provider builds).
        Sessions already open finish with the configuration they started with.
        """
        if _restart_only(self.settings) != _restart_only(settings):
            log.warning("reload_partial", reason="listen addresses and spool need a restart")
        tls = build_tls_context(settings)
        handler, worker, providers = self._build(settings)
        old_worker, old_handler = self.worker, self.handler
        if self._tls is not None and tls is not None:
            # Implicit-TLS servers hold the context object: load the new chain into it.
            certs = settings.smtp
            assert certs.tls_cert_file is not None
            self._tls.load_cert_chain(certs.tls_cert_file, certs.tls_key_file)
        else:
            self._tls = tls
        # Open sessions still use the old providers through their handler: close them later.
        self._retired += self._providers.values()
        if old_handler is not None:
            self._old_handlers = [h for h in self._old_handlers if h.active]
            self._old_handlers.append(old_handler)
        self.settings = settings
        self.handler, self.worker, self._providers = handler, worker, providers
        self._fronts = {k: self._front(settings, k) for k in ("starttls", "tls", "plain")}
        self._tracker.max_total = settings.smtp.max_connections
        self._tracker.max_per_ip = settings.smtp.max_connections_per_ip
        self._auth_throttle.configure(settings.smtp.auth_failure_limit, settings.smtp.auth_lockout)
        # The new worker starts at once; the old one claims nothing more and gets
        # shutdown_timeout to finish its sends (claims are exclusive: no entry is sent twice).
        worker.start()
        log.info("config_reloaded", providers=sorted(providers))
        if old_worker is not None:
            self._old_workers.add(old_worker)
            try:
                await old_worker.stop(grace=settings.delivery.shutdown_timeout)
            finally:
                self._old_workers.discard(old_worker)

    def _handlers(self) -> list[Handler]:
        return [*self._old_handlers, *([self.handler] if self.handler is not None else [])]

    async def shutdown(self) -> None:
        """Stop accepting, let open transactions finish (up to ``shutdown_timeout``), stop
        the workers (what they were sending stays spooled), close everything."""
        for server in self._servers:
            server.close()
        await drain(self._handlers, self._activity, self.settings.delivery.shutdown_timeout)
        if self._intake_pending:  # spool writes that outlived their replies: let them commit
            await asyncio.wait(set(self._intake_pending), timeout=self.settings.spool.timeout)
        for worker in [*self._old_workers, self.worker]:
            if worker is not None:
                await worker.stop()
        await self.aclose()
        log.info("gateway_stopped")

    async def aclose(self) -> None:
        for server in self._servers:
            server.close()
        for provider in [*self._retired, *self._providers.values()]:
            await provider.aclose()
        self._retired = []
        if self.ops is not None:
            await self.ops.stop()
        await self._http.aclose()
        await self.spool.aclose()


def mime_limits(settings: Settings) -> MimeLimits:
    """``[mime]``: the same bounds at intake and in the worker, which parses again."""
    mime = settings.mime
    return MimeLimits(
        max_depth=mime.max_depth,
        max_parts=mime.max_parts,
        max_headers=mime.max_headers,
        max_header_bytes=mime.max_header_bytes,
    )


def _restart_only(settings: Settings) -> tuple[object, ...]:
    smtp = settings.smtp
    return (smtp.listen, smtp.tls_listen, smtp.plain_listen, settings.spool, settings.http)


def tune_gc() -> None:
    """Cheaper garbage collection for a long-running daemon (measured: docs/performance.md).

    ``gc.freeze()`` moves everything alive after startup (modules, settings, the gateway's
    objects) to a permanent generation that collections no longer scan
    (https://docs.python.org/3/library/gc.html#gc.freeze). A larger first threshold lets
    most per-message objects die before a collection sees them: fewer are promoted, so the
    older generations are collected less often. Reference counting still frees every
    acyclic object at once; this only changes how often cycles are looked for.
    """
    gc.freeze()
    gc.set_threshold(_GC_GEN0, 20, 20)


async def serve(
    settings: Settings,
    reload_settings: Callable[[], Settings],
    slot: ProcessSlot | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads via ``reload_settings``. Returns an exit code.

    ``slot``: this process is one worker of several; its supervisor talks to systemd."""
    gateway = Gateway(settings, slot=slot)
    await gateway.start()
    tune_gc()
    # systemd Type=notify (sd_notify(3)): READY only now that every listener is bound.
    notify = Notifier.from_environ() if slot is None else Notifier(None)
    notify.ready(await spool_status(gateway.spool.counts))
    heartbeat = asyncio.create_task(notify.heartbeat(gateway.spool.counts))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()
    one_at_a_time = asyncio.Lock()  # two quick SIGHUPs apply in order, never interleaved

    async def do_reload() -> None:
        async with one_at_a_time:
            notify.reloading()
            try:
                new, old = reload_settings(), gateway.settings
                await gateway.reload(new)
                if new.log != old.log:
                    configure_logging(new.log.level, new.log.format)
            except ConfigError as exc:
                log.error("reload_refused", problems=exc.problems)
            except GatewayError as exc:
                log.error("reload_refused", problems=[str(exc)])
            except Exception:  # whatever it was, the running configuration stays
                log.exception("reload_refused")
            # Refused or not, the gateway serves again (on the old config when refused).
            notify.ready(await spool_status(gateway.spool.counts))

    def on_hup() -> None:
        task = asyncio.create_task(do_reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if slot is not None:
        slot.ready()  # only now: a SIGTERM from the supervisor must find its handler
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        log.info("gateway_stopping")
        notify.stopping()
        heartbeat.cancel()
        for task in list(reloads):
            task.cancel()  # a reload waiting for an old worker: shutdown stops that worker
        await asyncio.gather(*reloads, return_exceptions=True)
        await gateway.shutdown()
        await asyncio.gather(heartbeat, return_exceptions=True)
        notify.close()
    return 0
