"""The Gateway: builds every live object from settings, serves, reloads, shuts down in order.

Startup: spool (and recovery) -> providers -> SMTP listeners -> ops endpoint -> worker.
Shutdown (uvicorn's order): stop accepting -> sessions in DATA finish up to
``shutdown_timeout`` -> stop the worker (its entries stay spooled) -> close clients and spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import structlog

from smtp2api import __version__
from smtp2api.auth import Authenticator
from smtp2api.config import Settings
from smtp2api.delivery import Deliverer
from smtp2api.errors import ConfigError, GatewayError
from smtp2api.intake import Intake, IntakeConfig
from smtp2api.metrics import Metrics
from smtp2api.ops import OpsServer
from smtp2api.policy import Policy
from smtp2api.providers.base import Provider
from smtp2api.providers.registry import build_provider
from smtp2api.routing import Router
from smtp2api.smtp import ConnectionTracker, FrontConfig, GatewaySMTP, Handler, ListenerKind
from smtp2api.spool import open_spool
from smtp2api.spool.base import Spool, new_message_id
from smtp2api.units import parse_hostport
from smtp2api.worker import Worker, WorkerConfig

log = structlog.get_logger("smtp2api.app")


@dataclass(frozen=True, slots=True)
class Listener:
    kind: ListenerKind
    host: str
    port: int  # the bound port (the configured one may be 0)


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

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(version=__version__)
        self.listeners: list[Listener] = []
        self._servers: list[asyncio.Server] = []
        self._tracker = ConnectionTracker(
            settings.smtp.max_connections, settings.smtp.max_connections_per_ip
        )
        self._http = httpx.AsyncClient(
            follow_redirects=False,  # design §8: redirects are never followed
            limits=httpx.Limits(
                max_connections=settings.delivery.concurrency + 100, max_keepalive_connections=100
            ),
            timeout=httpx.Timeout(60.0),
            headers={"User-Agent": f"smtp2api/{__version__}"},
        )
        self.spool: Spool = open_spool(settings.spool)
        self._providers: dict[str, Provider] = {}
        self._tls: ssl.SSLContext | None = None
        self.ops: OpsServer | None = None
        self.worker: Worker | None = None
        self.handler: Handler | None = None
        self._fronts: dict[ListenerKind, FrontConfig] = {}

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
        worker = Worker(
            spool=self.spool,
            deliverer=deliverer,
            config=WorkerConfig(
                concurrency=settings.delivery.concurrency,
                max_age=settings.delivery.max_age,
                backoff_min=settings.delivery.backoff_min,
                backoff_max=settings.delivery.backoff_max,
                lease=settings.spool.lease,
            ),
        )
        intake = Intake(
            config=IntakeConfig(
                mode=settings.delivery.mode,
                sync_timeout=settings.delivery.sync_timeout,
                soft_bounce=settings.delivery.soft_bounce,
                backoff_min=settings.delivery.backoff_min,
            ),
            router=router,
            deliverer=deliverer,
            spool=self.spool,
            wake_worker=worker.wake,
            on_result=self.metrics.observe_message,
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
            on_reply=self.metrics.observe_reply,
            on_auth_result=self.metrics.observe_auth,
            on_connection=self.metrics.observe_active,
            on_connection_result=self.metrics.observe_connection,
        )
        return handler, worker, providers

    def _front(self, settings: Settings, kind: ListenerKind) -> FrontConfig:
        smtp = settings.smtp
        return FrontConfig(
            hostname=smtp.hostname,
            kind=kind,
            require_tls=smtp.require_tls,
            max_message_size=smtp.max_message_size,
            max_recipients=smtp.max_recipients,
            idle_timeout=smtp.idle_timeout,
        )

    # lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        settings = self.settings
        self._tls = build_tls_context(settings)
        recovered = await self.spool.recover(time.time())
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
                try:
                    server = await loop.create_server(
                        self._factory(kind),
                        host=host,
                        port=port,
                        ssl=self._tls if kind == "tls" else None,
                        reuse_address=True,
                    )
                except OSError as exc:
                    await self.aclose()
                    raise GatewayError(f"cannot listen on {address}: {exc.strerror}") from None
                self._servers.append(server)
                for sock in server.sockets:
                    bound = sock.getsockname()
                    self.listeners.append(Listener(kind, str(bound[0]), int(bound[1])))
        if settings.http.listen:
            host, port = parse_hostport(settings.http.listen)
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
        """Apply a new configuration to new sessions; listeners and the spool stay as they are."""
        if _restart_only(self.settings) != _restart_only(settings):
            log.warning("reload_partial", reason="listen addresses and spool need a restart")
        tls = build_tls_context(settings)
        handler, worker, providers = self._build(settings)
        old_worker, old_providers = self.worker, self._providers
        if self._tls is not None and tls is not None:
            # Implicit-TLS servers hold the context object: load the new chain into it.
            certs = settings.smtp
            assert certs.tls_cert_file is not None
            self._tls.load_cert_chain(certs.tls_cert_file, certs.tls_key_file)
        else:
            self._tls = tls
        self.settings = settings
        self.handler, self.worker, self._providers = handler, worker, providers
        self._fronts = {k: self._front(settings, k) for k in ("starttls", "tls", "plain")}
        if old_worker is not None:
            await old_worker.stop(grace=settings.delivery.shutdown_timeout)
        worker.start()
        for provider in old_providers.values():
            await provider.aclose()
        log.info("config_reloaded")

    async def shutdown(self) -> None:
        timeout = self.settings.delivery.shutdown_timeout
        for server in self._servers:
            server.close()
        handler = self.handler
        if handler is not None:
            for session in list(handler.active - handler.in_data):
                if session.transport is not None:
                    session.transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await handler.wait_data_done()
            for session in list(handler.active):
                if session.transport is not None:
                    session.transport.close()
        if self.worker is not None:
            await self.worker.stop()
        await self.aclose()
        log.info("gateway_stopped")

    async def aclose(self) -> None:
        for server in self._servers:
            server.close()
        for provider in self._providers.values():
            await provider.aclose()
        if self.ops is not None:
            await self.ops.stop()
        await self._http.aclose()
        await self.spool.aclose()


def _restart_only(settings: Settings) -> tuple[object, ...]:
    smtp = settings.smtp
    return (smtp.listen, smtp.tls_listen, smtp.plain_listen, settings.spool, settings.http)


async def serve(settings: Settings, reload_settings: Callable[[], Settings]) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads via ``reload_settings``. Returns an exit code."""
    gateway = Gateway(settings)
    await gateway.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    async def do_reload() -> None:
        try:
            new = reload_settings()
            await gateway.reload(new)
        except ConfigError as exc:
            log.error("reload_refused", problems=exc.problems)
        except GatewayError as exc:
            log.error("reload_refused", problems=[str(exc)])

    def on_hup() -> None:
        task = asyncio.create_task(do_reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await gateway.shutdown()
    return 0
