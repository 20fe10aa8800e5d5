"""Prometheus metrics (design §7): one ``Metrics`` object owns its own registry.

``app.py`` builds one and injects its ``observe_*`` methods into the SMTP handler, intake and
delivery layers; ``ops.py`` awaits ``refresh()`` (the spool probe) and serves ``render()``.
Every label value passes a guard, so an address or an error text can never become a series.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Any

import prometheus_client
import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from smtp2api import __version__
from smtp2api.replies import SMTPReply
from smtp2api.spool.base import STATES

log = structlog.get_logger("smtp2api.metrics")

PREFIX = "smtp2api"
OTHER = "other"  # what an unknown label value is clamped to

# The known label values. Callers may pass anything; guards fold the rest into "other".
CONNECTION_RESULTS = (
    "accepted",
    "rejected_limit",  # max_connections reached
    "rejected_ip_limit",  # max_connections_per_ip reached
    "rejected_proxy",  # bad PROXY header, or PROXY from an untrusted peer
    "rejected_shutdown",  # arrived while draining
)
AUTH_RESULTS = ("success", "failure", "throttled")
MESSAGE_RESULTS = ("accepted", "queued", "rejected", "error")
DELIVERY_OUTCOMES = ("success", "transient", "permanent")
SPOOL_STATES: tuple[str, ...] = STATES  # queued (waiting or due), active (claimed), dead

# 1 KB .. 50 MB: a 25 MB limit plus base64 headroom; most mail sits in the first buckets.
SIZE_BUCKETS = (
    1_000,
    4_000,
    16_000,
    64_000,
    256_000,
    1_000_000,
    4_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
)
# API calls: tens of ms when healthy, up to the provider timeout (15s default) when not.
DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0)

# Provider names come from config keys; without a configured set, this shape is the guard.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CODE = re.compile(r"^[2-5]\d\d")


def clamp(value: str, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``"other"`` (keeps label sets bounded)."""
    return value if value in allowed else OTHER


def reply_code(reply: SMTPReply | str | int) -> str:
    """The 3-digit code of a reply as a label value; anything unrecognisable is ``"other"``."""
    if isinstance(reply, SMTPReply):
        reply = reply.code
    text = str(reply)
    match = _CODE.match(text)
    # Only the code: "250 2.0.0 queued as <id>" must not become one series per message.
    return match.group(0) if match and (len(text) == 3 or not text[3].isdigit()) else OTHER


# What the spool probe reports at scrape time: entries per state, and the age in seconds of
# the oldest undelivered entry (None when there is none).
SpoolStats = tuple[Mapping[str, int], float | None]
SpoolProbe = Callable[[], SpoolStats | Awaitable[SpoolStats]]


class _Children:
    """A labelled metric's children, looked up once per label values.

    ``labels()`` validates its arguments and takes the metric's lock on every call, and the
    SMTP session calls it per reply (several times per message); the children it returns never
    change (nothing here calls ``remove()``), so a dict lookup serves every later call. The
    cache holds at most ``_MAX`` keys: label values are clamped, and keys past it just miss.
    """

    _MAX = 1024

    def __init__(self, metric: Any) -> None:
        self._labels = metric.labels
        self._cache: dict[Hashable, Any] = {}

    def get(self, key: Hashable, make: Callable[[], tuple[str, ...]]) -> Any:
        """The child for ``key``, whose label values ``make()`` returns on a miss."""
        child = self._cache.get(key)
        if child is None:
            child = self._labels(*make())
            if len(self._cache) < self._MAX:
                self._cache[key] = child
        return child


class Metrics:
    """Every metric of design §7, registered in a registry of its own (never the global one).

    A private registry keeps tests independent and lets a config reload keep counting.
    """

    def __init__(
        self,
        *,
        version: str = __version__,
        providers: Iterable[str] = (),
        process_metrics: bool = True,
    ) -> None:
        # The text format would add a ``*_created`` gauge per counter and histogram series,
        # doubling the series for a timestamp Prometheus ignores. (A process-wide switch.)
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        if process_metrics:
            # Memory, fds and CPU: what "memory bounded by configuration" is checked against.
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)

        def name(short: str) -> str:
            return f"{PREFIX}_{short}"

        self.build_info = Gauge(
            name("build_info"),
            "Always 1; the version label says which build runs.",
            ["version"],
            registry=reg,
        )
        self.smtp_connections_total = Counter(
            name("smtp_connections_total"),
            "SMTP connections by admission result.",
            ["result"],
            registry=reg,
        )
        self.smtp_active_connections = Gauge(
            name("smtp_active_connections"), "SMTP sessions open now.", registry=reg
        )
        self.smtp_auth_total = Counter(
            name("smtp_auth_total"), "SMTP AUTH attempts by result.", ["result"], registry=reg
        )
        self.messages_received_total = Counter(
            name("messages_received_total"),
            "Messages at end of DATA by result.",
            ["result"],
            registry=reg,
        )
        self.message_size_bytes = Histogram(
            name("message_size_bytes"),
            "Size of received messages in bytes.",
            buckets=SIZE_BUCKETS,
            registry=reg,
        )
        self.delivery_attempts_total = Counter(
            name("delivery_attempts_total"),
            "Provider API calls by provider and outcome.",
            ["provider", "outcome"],
            registry=reg,
        )
        self.delivery_duration_seconds = Histogram(
            name("delivery_duration_seconds"),
            "Duration of provider API calls.",
            ["provider"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.provider_circuit_open = Gauge(
            name("provider_circuit_open"),
            "1 while the provider's circuit breaker is open.",
            ["provider"],
            registry=reg,
        )
        self.spool_messages = Gauge(
            name("spool_messages"),
            "Spooled messages by state (at scrape time).",
            ["state"],
            registry=reg,
        )
        self.spool_oldest_age_seconds = Gauge(
            name("spool_oldest_age_seconds"),
            "Age of the oldest spooled message not dead.",
            registry=reg,
        )
        self.replies_total = Counter(
            name("replies_total"), "SMTP replies sent, by 3-digit code.", ["code"], registry=reg
        )

        self.build_info.labels(version=version).set(1)
        # Known series start at 0, so rate() and absent-alerts work before the first event.
        for result in CONNECTION_RESULTS:
            self.smtp_connections_total.labels(result=result)
        for result in AUTH_RESULTS:
            self.smtp_auth_total.labels(result=result)
        for result in MESSAGE_RESULTS:
            self.messages_received_total.labels(result=result)
        for state in SPOOL_STATES:
            self.spool_messages.labels(state=state)
        self._connections = _Children(self.smtp_connections_total)
        self._auths = _Children(self.smtp_auth_total)
        self._messages = _Children(self.messages_received_total)
        self._replies = _Children(self.replies_total)
        self._providers: frozenset[str] = frozenset()
        self.set_providers(providers)
        self._spool_probe: SpoolProbe | None = None

    # label guards ---------------------------------------------------------------------------

    def set_providers(self, names: Iterable[str]) -> None:
        """Declare the configured provider names (again on reload); others become "other"."""
        self._providers = frozenset(names)
        # The provider label of a name may change ("other" <-> itself): look it up afresh.
        self._attempts = _Children(self.delivery_attempts_total)
        self._durations = _Children(self.delivery_duration_seconds)
        for provider in self._providers:
            self.provider_circuit_open.labels(provider=provider)
            for outcome in DELIVERY_OUTCOMES:
                self.delivery_attempts_total.labels(provider=provider, outcome=outcome)

    def provider_label(self, provider: str) -> str:
        if self._providers:
            return clamp(provider, self._providers)
        return provider if _NAME.match(provider) else OTHER

    # observers: shaped to be passed as the callbacks of smtp.py, intake.py, delivery.py ------

    def observe_connection(self, result: str) -> None:
        self._connections.get(result, lambda: (clamp(result, CONNECTION_RESULTS),)).inc()

    def observe_active(self, delta: int) -> None:
        """``+1`` when a session starts, ``-1`` when it ends."""
        self.smtp_active_connections.inc(delta)

    def observe_auth(self, result: bool | str) -> None:
        """``True``/``False`` for success/failure, or one of ``AUTH_RESULTS``."""
        label = ("success" if result else "failure") if isinstance(result, bool) else result
        self._auths.get(label, lambda: (clamp(label, AUTH_RESULTS),)).inc()

    def observe_message(self, result: str, size: int) -> None:
        self._messages.get(result, lambda: (clamp(result, MESSAGE_RESULTS),)).inc()
        self.message_size_bytes.observe(size)

    def observe_delivery(self, provider: str, outcome: str, seconds: float) -> None:
        def labels() -> tuple[str, str]:
            return self.provider_label(provider), clamp(outcome, DELIVERY_OUTCOMES)

        self._attempts.get((provider, outcome), labels).inc()
        self._durations.get(provider, lambda: (self.provider_label(provider),)).observe(seconds)

    def observe_circuit(self, provider: str, is_open: bool) -> None:
        self.provider_circuit_open.labels(provider=self.provider_label(provider)).set(
            1 if is_open else 0
        )

    def observe_reply(self, reply: SMTPReply | str | int) -> None:
        # Keyed by the code, never by a text: "250 2.0.0 queued as <id>" differs per message.
        key: int | str = reply.code if isinstance(reply, SMTPReply) else reply
        if isinstance(key, str):
            key = reply_code(key)
        self._replies.get(key, lambda: (reply_code(reply),)).inc()

    # scrape-time gauges ----------------------------------------------------------------------

    def set_spool_probe(self, probe: SpoolProbe | None) -> None:
        """Register the function (sync or async) that counts the spool at scrape time."""
        self._spool_probe = probe

    async def refresh(self) -> None:
        """Run the spool probe and set the spool gauges; the ops endpoint awaits this.

        On failure the previous values stay and the error is logged: a scrape must still
        answer (the spool's health is ``/readyz``'s business), and the caller bounds the time.
        """
        probe = self._spool_probe
        if probe is None:
            return
        try:
            result = probe()
            stats = await result if inspect.isawaitable(result) else result
        except Exception as exc:  # noqa: BLE001 - any probe failure must not break the scrape
            log.warning("spool_probe_failed", error=type(exc).__name__)
            return
        self.set_spool_stats(*stats)

    def set_spool_stats(self, per_state: Mapping[str, int], oldest_age: float | None) -> None:
        counts: dict[str, int] = dict.fromkeys(SPOOL_STATES, 0)
        for state, count in per_state.items():
            key = clamp(state, SPOOL_STATES)
            counts[key] = counts.get(key, 0) + count
        # Every known state is set, so an emptied state reads 0 rather than its last value.
        for state, count in counts.items():
            self.spool_messages.labels(state=state).set(count)
        self.spool_oldest_age_seconds.set(max(0.0, oldest_age or 0.0))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
