"""Metrics: names and types of design §7, label guards, scrape-time spool gauges, rendering."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtp2api import __version__
from smtp2api.metrics import OTHER, SPOOL_STATES, Metrics, clamp, reply_code
from smtp2api.replies import SMTPReply

EXPECTED = {
    "smtp2api_smtp_connections": "counter",
    "smtp2api_smtp_active_connections": "gauge",
    "smtp2api_smtp_auth": "counter",
    "smtp2api_messages_received": "counter",
    "smtp2api_message_size_bytes": "histogram",
    "smtp2api_delivery_attempts": "counter",
    "smtp2api_delivery_duration_seconds": "histogram",
    "smtp2api_provider_circuit_open": "gauge",
    "smtp2api_spool_messages": "gauge",
    "smtp2api_spool_oldest_age_seconds": "gauge",
    "smtp2api_replies": "counter",
    "smtp2api_build_info": "gauge",
}


def families(metrics: Metrics) -> dict[str, prometheus_client.Metric]:
    body, _ = metrics.render()
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def _normal(labels: dict[str, str]) -> dict[str, str | float]:
    # Bucket bounds are written "4e+06" or "4000000.0": compare them as numbers.
    return {k: float(v) if k == "le" else v for k, v in labels.items()}


def value(metrics: Metrics, sample: str, **labels: str) -> float | None:
    for family in families(metrics).values():
        for s in family.samples:
            if s.name == sample and _normal(s.labels) == _normal(labels):
                return float(s.value)
    return None


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(providers=["ses", "backup"], process_metrics=False)


def test_every_design_metric_is_exposed_with_its_type(metrics: Metrics) -> None:
    found = families(metrics)
    for name, kind in EXPECTED.items():
        assert name in found, name
        assert found[name].type == kind, name


def test_attributes_carry_the_design_names(metrics: Metrics) -> None:
    for attribute in (
        "smtp_connections_total",
        "smtp_active_connections",
        "smtp_auth_total",
        "messages_received_total",
        "message_size_bytes",
        "delivery_attempts_total",
        "delivery_duration_seconds",
        "provider_circuit_open",
        "spool_messages",
        "spool_oldest_age_seconds",
        "replies_total",
        "build_info",
    ):
        assert hasattr(metrics, attribute)


def test_render_content_type_and_no_created_series(metrics: Metrics) -> None:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    assert b"_created" not in body
    assert value(metrics, "smtp2api_build_info", version=__version__) == 1.0


def test_own_registry_never_the_global_one() -> None:
    first = Metrics(process_metrics=False)
    second = Metrics(process_metrics=False)
    first.observe_auth(True)
    assert value(first, "smtp2api_smtp_auth_total", result="success") == 1.0
    assert value(second, "smtp2api_smtp_auth_total", result="success") == 0.0
    assert b"smtp2api_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


def test_version_label_is_injectable() -> None:
    metrics = Metrics(version="9.9.9", process_metrics=False)
    assert value(metrics, "smtp2api_build_info", version="9.9.9") == 1.0


def test_process_metrics_are_included_by_default() -> None:
    body, _ = Metrics().render()
    assert b"python_info" in body


def test_known_series_start_at_zero(metrics: Metrics) -> None:
    for result in ("accepted", "rejected_limit", "rejected_proxy"):
        assert value(metrics, "smtp2api_smtp_connections_total", result=result) == 0.0
    for result in ("success", "failure", "throttled"):
        assert value(metrics, "smtp2api_smtp_auth_total", result=result) == 0.0
    for result in ("accepted", "queued", "rejected", "error"):
        assert value(metrics, "smtp2api_messages_received_total", result=result) == 0.0
    for outcome in ("success", "transient", "permanent"):
        assert (
            value(metrics, "smtp2api_delivery_attempts_total", provider="ses", outcome=outcome)
            == 0.0
        )


def test_clamp() -> None:
    assert clamp("accepted", ("accepted",)) == "accepted"
    assert clamp("user@example.com", ("accepted",)) == OTHER


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (SMTPReply(250, "2.0.0", "queued as 01ABC"), "250"),
        ("451 4.3.0 try later", "451"),
        ("250-PIPELINING", "250"),
        ("554", "554"),
        (421, "421"),
        ("2500 nope", OTHER),
        ("hello", OTHER),
        ("199 info", OTHER),
        ("", OTHER),
    ],
)
def test_reply_code_keeps_only_the_three_digits(reply: SMTPReply | str | int, code: str) -> None:
    assert reply_code(reply) == code


def test_observers_clamp_unknown_values(metrics: Metrics) -> None:
    metrics.observe_connection("accepted")
    metrics.observe_connection("evil@example.com")
    metrics.observe_auth(False)
    metrics.observe_auth("throttled")
    metrics.observe_auth("whatever")
    metrics.observe_message("queued", 2_000_000)
    metrics.observe_message("<script>", 10)
    metrics.observe_delivery("ses", "success", 0.2)
    metrics.observe_delivery("someone@example.com", "success", 0.1)
    metrics.observe_delivery("ses", "exploded", 0.1)
    metrics.observe_reply("250 2.0.0 Ok: <provider-id-1234>")
    metrics.observe_circuit("backup", True)
    metrics.observe_circuit("not-configured", True)

    assert value(metrics, "smtp2api_smtp_connections_total", result="accepted") == 1.0
    assert value(metrics, "smtp2api_smtp_connections_total", result=OTHER) == 1.0
    assert value(metrics, "smtp2api_smtp_auth_total", result="failure") == 1.0
    assert value(metrics, "smtp2api_smtp_auth_total", result="throttled") == 1.0
    assert value(metrics, "smtp2api_smtp_auth_total", result=OTHER) == 1.0
    assert value(metrics, "smtp2api_messages_received_total", result=OTHER) == 1.0
    # Buckets are cumulative: the 10 B message is in both, the 2 MB one only in le=4e6.
    assert value(metrics, "smtp2api_message_size_bytes_bucket", le="4e6") == 2.0
    assert value(metrics, "smtp2api_message_size_bytes_bucket", le="1e6") == 1.0
    assert (
        value(metrics, "smtp2api_delivery_attempts_total", provider="ses", outcome="success") == 1
    )
    assert (
        value(metrics, "smtp2api_delivery_attempts_total", provider=OTHER, outcome="success") == 1
    )
    assert value(metrics, "smtp2api_delivery_attempts_total", provider="ses", outcome=OTHER) == 1
    assert value(metrics, "smtp2api_delivery_duration_seconds_count", provider="ses") == 2
    assert value(metrics, "smtp2api_replies_total", code="250") == 1.0
    assert value(metrics, "smtp2api_provider_circuit_open", provider="backup") == 1.0
    assert value(metrics, "smtp2api_provider_circuit_open", provider=OTHER) == 1.0
    assert b"example.com" not in metrics.render()[0]


def test_active_connections_gauge(metrics: Metrics) -> None:
    metrics.observe_active(+1)
    metrics.observe_active(+1)
    metrics.observe_active(-1)
    assert value(metrics, "smtp2api_smtp_active_connections") == 1.0


def test_provider_names_without_a_configured_set_are_shape_checked() -> None:
    metrics = Metrics(process_metrics=False)
    metrics.observe_delivery("mail-gun.eu_1", "success", 0.1)
    metrics.observe_delivery("a@b.example", "success", 0.1)
    metrics.observe_delivery("x" * 100, "success", 0.1)
    assert metrics.provider_label("mail-gun.eu_1") == "mail-gun.eu_1"
    assert (
        value(metrics, "smtp2api_delivery_attempts_total", provider=OTHER, outcome="success") == 2
    )


def test_set_providers_again_on_reload(metrics: Metrics) -> None:
    metrics.set_providers(["resend"])
    assert metrics.provider_label("resend") == "resend"
    assert metrics.provider_label("ses") == OTHER
    assert value(metrics, "smtp2api_provider_circuit_open", provider="resend") == 0.0


async def test_async_spool_probe_is_awaited_at_refresh(metrics: Metrics) -> None:
    async def probe() -> tuple[dict[str, int], float | None]:
        return {"queued": 3, "active": 1, "dead": 2}, 42.5

    metrics.set_spool_probe(probe)
    await metrics.refresh()
    assert value(metrics, "smtp2api_spool_messages", state="queued") == 3.0
    assert value(metrics, "smtp2api_spool_messages", state="active") == 1.0
    assert value(metrics, "smtp2api_spool_messages", state="dead") == 2.0
    assert value(metrics, "smtp2api_spool_oldest_age_seconds") == 42.5


async def test_sync_probe_emptied_states_and_unknown_states(metrics: Metrics) -> None:
    metrics.set_spool_probe(lambda: ({"queued": 5}, 10.0))
    await metrics.refresh()
    metrics.set_spool_probe(lambda: ({"weird": 7}, None))
    await metrics.refresh()
    assert value(metrics, "smtp2api_spool_messages", state="queued") == 0.0  # not stale
    assert value(metrics, "smtp2api_spool_messages", state=OTHER) == 7.0
    assert value(metrics, "smtp2api_spool_oldest_age_seconds") == 0.0
    assert set(SPOOL_STATES) == {"queued", "active", "dead"}


async def test_failing_probe_keeps_previous_values(metrics: Metrics) -> None:
    metrics.set_spool_probe(lambda: ({"queued": 4}, 1.0))
    await metrics.refresh()

    async def broken() -> tuple[dict[str, int], float | None]:
        raise RuntimeError("database is locked")

    metrics.set_spool_probe(broken)
    await metrics.refresh()
    assert value(metrics, "smtp2api_spool_messages", state="queued") == 4.0


async def test_refresh_without_probe_is_a_no_op(metrics: Metrics) -> None:
    await metrics.refresh()
    assert value(metrics, "smtp2api_spool_messages", state="queued") == 0.0


def test_repeated_observations_count_in_the_same_series(metrics: Metrics) -> None:
    # The observers keep each labelled child after the first call: counts must still add up.
    ok = SMTPReply(250, "2.0.0", "Ok")
    for _ in range(3):
        metrics.observe_reply(ok)
        metrics.observe_reply(SMTPReply(250, "2.0.0", "queued as <a-different-id>"))
        metrics.observe_reply("250 2.0.0 Ok: <provider-id-1234>")
        metrics.observe_reply(451)
        metrics.observe_connection("accepted")
        metrics.observe_message("accepted", 10)
        metrics.observe_auth(True)
        metrics.observe_delivery("ses", "success", 0.2)
        metrics.observe_delivery("nobody", "success", 0.2)
    assert value(metrics, "smtp2api_replies_total", code="250") == 9.0
    assert value(metrics, "smtp2api_replies_total", code="451") == 3.0
    assert value(metrics, "smtp2api_smtp_connections_total", result="accepted") == 3.0
    assert value(metrics, "smtp2api_messages_received_total", result="accepted") == 3.0
    assert value(metrics, "smtp2api_smtp_auth_total", result="success") == 3.0
    assert (
        value(metrics, "smtp2api_delivery_attempts_total", provider="ses", outcome="success") == 3
    )
    assert (
        value(metrics, "smtp2api_delivery_attempts_total", provider=OTHER, outcome="success") == 3
    )
    assert value(metrics, "smtp2api_delivery_duration_seconds_count", provider=OTHER) == 3


def test_a_provider_added_on_reload_gets_its_own_series_from_then_on(metrics: Metrics) -> None:
    metrics.observe_delivery("resend", "success", 0.1)  # not configured yet: "other"
    metrics.set_providers(["ses", "backup", "resend"])
    metrics.observe_delivery("resend", "success", 0.1)
    metrics.set_providers(["ses"])
    metrics.observe_delivery("backup", "transient", 0.1)  # removed again: "other"
    assert (
        value(metrics, "smtp2api_delivery_attempts_total", provider="resend", outcome="success")
        == 1
    )
    assert (
        value(metrics, "smtp2api_delivery_attempts_total", provider=OTHER, outcome="success") == 1
    )
    assert (
        value(metrics, "smtp2api_delivery_attempts_total", provider=OTHER, outcome="transient") == 1
    )
    assert value(metrics, "smtp2api_delivery_duration_seconds_count", provider="resend") == 1
