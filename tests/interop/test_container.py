"""The Dockerfile and compose.yaml, checked without a Docker engine (none runs in CI).

A small parser reads the Dockerfile's instructions and checks the structure the image
promises (multi-stage, pinned base, non-root, spool volume, exec-form entrypoint); the image's
default config is validated by the real loader, and the HEALTHCHECK command is run for real
against a live gateway. compose.yaml is read with PyYAML and cross-checked against the files
it mounts and the Prometheus config.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from smtp2api.cli import main as cli_main
from tests.conftest import REPO, GatewayFactory, in_thread

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "compose.yaml"
IMAGE_CONFIG = REPO / "deploy" / "docker" / "config.toml"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    result: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continuation
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, args = current.partition(" ")
        result.append((word.upper(), args.strip()))
        current = ""
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def _all(parsed: list[tuple[str, str]], word: str) -> list[str]:
    return [args for name, args in parsed if name == word]


def _one(parsed: list[tuple[str, str]], word: str) -> str:
    [args] = _all(parsed, word)
    return args


def _runtime_env(parsed: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _all(parsed, "ENV"):
        env |= dict(re.findall(r"(\w+)=(\S+)", args))
    return env


def test_multi_stage_on_a_pinned_slim_python(dockerfile: list[tuple[str, str]]) -> None:
    args = dict(a.split("=", 1) for a in _all(dockerfile, "ARG") if "=" in a)
    image = args["PYTHON_IMAGE"]
    # A full version tag (not "3" or "latest") and the image digest.
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", image), image
    froms = _all(dockerfile, "FROM")
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    assert any(a.startswith("--from=build ") for a in _all(dockerfile, "COPY"))


def test_runs_as_a_non_root_user_with_a_spool_volume(dockerfile: list[tuple[str, str]]) -> None:
    user = _one(dockerfile, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "numeric, so runAsNonRoot can verify it"
    assert gid.isdigit()
    assert int(uid) > 0
    assert int(gid) > 0
    assert json.loads(_one(dockerfile, "VOLUME")) == ["/var/lib/smtp2api"]
    assert "/var/lib/smtp2api" in _all(dockerfile, "WORKDIR")


def test_exec_form_entrypoint_and_healthcheck(dockerfile: list[tuple[str, str]]) -> None:
    assert json.loads(_one(dockerfile, "ENTRYPOINT")) == ["smtp2api"]
    assert json.loads(_one(dockerfile, "CMD")) == ["serve"]
    healthcheck = _one(dockerfile, "HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert "--interval=" in options
    argv = json.loads(command)  # exec form: no shell, no curl in the image
    assert argv[:2] == ["python", "-c"]
    assert "/healthz" in argv[2]


def test_copied_files_exist_and_pass_dockerignore(dockerfile: list[tuple[str, str]]) -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for args in _all(dockerfile, "COPY"):
        if args.startswith("--from="):
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert (REPO / source).exists(), source
            assert any(source == a or source.startswith(a + "/") for a in allowed), source


def test_exposed_ports_are_the_default_config_listeners(
    dockerfile: list[tuple[str, str]],
) -> None:
    exposed = {int(p) for p in _one(dockerfile, "EXPOSE").split()}
    config = tomllib.loads(IMAGE_CONFIG.read_text())
    smtp = config["smtp"]
    ports = {int(a.rsplit(":", 1)[1]) for a in smtp["listen"] + smtp["plain_listen"]}
    ports.add(int(config["http"]["listen"].rsplit(":", 1)[1]))
    assert ports <= exposed
    assert _runtime_env(dockerfile)["SMTP2API_HTTP__LISTEN"] == config["http"]["listen"]


def test_image_default_config_is_valid(
    dockerfile: list[tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = _runtime_env(dockerfile)
    assert env["SMTP2API_CONFIG"] == "/etc/smtp2api/config.toml"
    assert "COPY deploy/docker/config.toml /etc/smtp2api/config.toml" in DOCKERFILE.read_text()
    monkeypatch.setenv("SMTP2API_CONFIG", str(IMAGE_CONFIG))  # where the image puts it
    monkeypatch.setenv("SMTP2API_HTTP__LISTEN", env["SMTP2API_HTTP__LISTEN"])
    assert cli_main(["check-config"]) == 0
    effective = tomllib.loads(capsys.readouterr().out)
    assert effective["spool"]["url"] == "sqlite:////var/lib/smtp2api/spool.db"  # the VOLUME
    assert effective["smtp"]["trusted_networks"] == ["127.0.0.0/8", "::1/128"]


def _healthcheck(command: list[str], listen: str) -> int:
    argv = [sys.executable, *command[1:]]
    env = {"SMTP2API_HTTP__LISTEN": listen, "PATH": "/usr/bin:/bin"}
    return subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False).returncode


async def test_healthcheck_command_probes_a_live_gateway(
    dockerfile: list[tuple[str, str]], start_gateway: GatewayFactory
) -> None:
    command = json.loads(_one(dockerfile, "HEALTHCHECK").partition(" CMD ")[2])
    gateway = await start_gateway()
    assert gateway.ops is not None
    listen = f"0.0.0.0:{gateway.ops.port}"
    assert await in_thread(_healthcheck, command, listen) == 0
    await gateway.ops.stop()  # nothing listens there now: unhealthy
    assert await in_thread(_healthcheck, command, listen) != 0


def test_compose_runs_the_gateway_and_a_prometheus_scraping_it() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"smtp2api", "prometheus"}
    gateway, prometheus = services["smtp2api"], services["prometheus"]
    assert gateway["build"] == "."
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gateway["volumes"]}
    assert (REPO / mounts["/etc/smtp2api/config.toml"]).is_file()
    assert mounts["/var/lib/smtp2api"] in compose["volumes"]
    published = {p.split(":")[-1] for p in gateway["ports"]}
    config = tomllib.loads((REPO / mounts["/etc/smtp2api/config.toml"]).read_text())
    listen_ports = {a.rsplit(":", 1)[1] for a in config["smtp"]["listen"]}
    assert listen_ports <= published
    # Prometheus: a pinned image, the repo's config and rules, scraping the gateway service.
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    prom_dir = REPO / prom_mounts["/etc/prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    scrape = yaml.safe_load((prom_dir / "prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    [target] = job["static_configs"][0]["targets"]
    host, port = target.rsplit(":", 1)
    assert host == "smtp2api"
    assert port == config["http"]["listen"].rsplit(":", 1)[1]
    for rule_file in scrape["rule_files"]:
        assert (prom_dir / rule_file).is_file()


def test_dockerfile_parser() -> None:
    parsed = instructions("# c\nFROM a AS b\nRUN x \\\n  # inner\n  && y\n\nUSER 1:1\n")
    assert parsed == [("FROM", "a AS b"), ("RUN", "x  && y"), ("USER", "1:1")]


def test_image_usage_comment_publishes_the_listen_port() -> None:
    config = tomllib.loads(IMAGE_CONFIG.read_text())
    port = config["smtp"]["listen"][0].rsplit(":", 1)[1]
    assert f"-p 587:{port}" in DOCKERFILE.read_text()
