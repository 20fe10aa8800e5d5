"""Monitoring: /metrics passes ``promtool check metrics``; the alerting rules pass
``promtool check rules`` and their unit tests; alerts and the Grafana dashboard name only
metrics the gateway exports."""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import urllib.request

import pytest
import yaml

from smtp2api.app import Gateway
from tests.conftest import REPO, GatewayFactory, in_thread, require_tool
from tests.interop.conftest import which

PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "smtp2api.json"
_METRIC = re.compile(r"\bsmtp2api_[a-z_]+[a-z]")


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    tool = require_tool(which("promtool"), "promtool (Debian package prometheus)")
    return subprocess.run(
        [tool, *args], input=stdin, capture_output=True, cwd=PROMETHEUS, timeout=120, check=False
    )


def _traffic_then_scrape(gateway: Gateway) -> bytes:
    with smtplib.SMTP("127.0.0.1", gateway.port(), timeout=10) as client:
        client.sendmail("app@example.com", ["a@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
    assert gateway.ops is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.ops.port}/metrics", timeout=10) as r:
        return r.read()  # type: ignore[no-any-return]


@pytest.fixture
async def exposition(start_gateway: GatewayFactory) -> bytes:
    """A live gateway's /metrics after one message, so histograms and counters have series."""
    gateway = await start_gateway()
    return await in_thread(_traffic_then_scrape, gateway)  # type: ignore[no-any-return]


def test_live_metrics_pass_promtool_check_metrics(exposition: bytes) -> None:
    done = promtool("check", "metrics", stdin=exposition)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == b""  # no lint complaints either


def test_alert_rules_pass_promtool_check_rules() -> None:
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert b"SUCCESS" in done.stdout


def test_alert_rules_unit_tests_pass() -> None:
    done = promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert b"SUCCESS" in done.stdout


def test_compose_prometheus_config_is_valid() -> None:
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_topic_is_covered_and_tested() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {rule["alert"]: rule["expr"] for g in rules["groups"] for rule in g["rules"]}
    topics = {
        "Smtp2apiSpoolBacklog": "smtp2api_spool_messages",
        "Smtp2apiSpoolOldestMessage": "smtp2api_spool_oldest_age_seconds",
        "Smtp2apiDeadLetters": 'state="dead"',
        "Smtp2apiProviderErrorRatio": "smtp2api_delivery_attempts_total",
        "Smtp2apiProviderCircuitOpen": "smtp2api_provider_circuit_open",
        "Smtp2apiAuthFailureSpike": "smtp2api_smtp_auth_total",
    }
    for alert, needle in topics.items():
        assert needle in alerts[alert], alert
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == set(alerts), "every alert has a unit test in which it fires"


def exported_names(exposition: bytes) -> set[str]:
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition.decode(), re.MULTILINE):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_alerts_and_dashboard_name_only_exported_metrics(exposition: bytes) -> None:
    exported = exported_names(exposition)
    used = set(_METRIC.findall((PROMETHEUS / "alerts.yml").read_text()))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used |= {name for expr in exprs for name in _METRIC.findall(expr)}
    assert used - exported == set()
    # Every design §7 metric is on the dashboard.
    on_dashboard = {name for expr in exprs for name in _METRIC.findall(expr)}
    design = {
        "smtp2api_smtp_connections_total", "smtp2api_smtp_active_connections",
        "smtp2api_smtp_auth_total", "smtp2api_messages_received_total",
        "smtp2api_message_size_bytes_bucket", "smtp2api_delivery_attempts_total",
        "smtp2api_delivery_duration_seconds_bucket", "smtp2api_provider_circuit_open",
        "smtp2api_spool_messages", "smtp2api_spool_oldest_age_seconds", "smtp2api_replies_total",
    }  # fmt: skip
    assert design <= on_dashboard


def test_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "smtp2api"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
