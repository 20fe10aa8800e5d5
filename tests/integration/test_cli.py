"""The command line as a user runs it: real subprocesses, real exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from smtp2api.auth import verify_password

SMTP2API = [sys.executable, "-m", "smtp2api"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SMTP2API_")}
    env.update(extra)
    return env


def run(
    *args: str, stdin: str = "", cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SMTP2API, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=clean_env(**env),
        check=False,
    )


def test_version() -> None:
    result = run("version")
    assert result.returncode == 0
    assert result.stdout.startswith("smtp2api ")


def test_help_lists_every_command() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "check-config", "hash-password", "send-test", "queue", "version"):
        assert command in result.stdout


def test_hash_password_reads_stdin() -> None:
    result = run("hash-password", stdin="hunter2\n")
    assert result.returncode == 0, result.stderr
    encoded = result.stdout.strip()
    assert encoded.startswith("scrypt:")
    assert verify_password(b"hunter2", encoded)
    assert not verify_password(b"hunter3", encoded)


def test_check_config_valid_prints_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[providers.main]\ntype = "http"\nurl = "https://api.example.net/v1/emails"\n'
        'api_key = "super-secret-key"\n'
    )
    result = run("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "super-secret-key" not in result.stdout
    effective = tomllib.loads(result.stdout)
    assert effective["providers"]["main"]["api_key"] == "**********"
    assert effective["smtp"]["listen"] == ["127.0.0.1:2525"]


def test_check_config_env_override_and_secret(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[providers.main]\ntype = "http"\nurl = "https://api.example.net/x"\n')
    result = run(
        "check-config",
        "--config",
        str(config),
        SMTP2API_PROVIDERS__MAIN__API_KEY="from-env",
        SMTP2API_SMTP__MAX_RECIPIENTS="7",
    )
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["smtp"]["max_recipients"] == 7
    assert effective["providers"]["main"]["api_key"] == "**********"


def test_check_config_invalid_exits_78_one_line_per_problem(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[smtp]\nlisten = ["nonsense"]\nmax_recipients = 0\ncolour = "blue"\n'
        '[providers.main]\ntype = "http"\nurl = "http://api.example.net/x"\n'
    )
    result = run("check-config", "--config", str(config), SMTP2API_BOGUS="1")
    assert result.returncode == 78
    assert result.stderr.startswith("SMTP2API_BOGUS: unknown setting")
    result = run("check-config", "--config", str(config))
    assert result.returncode == 78
    problems = result.stderr.strip().splitlines()
    assert any(p.startswith("smtp.listen[0]: ") for p in problems), problems
    assert any(p.startswith("smtp.max_recipients: ") for p in problems), problems
    assert "smtp.colour: unknown key" in problems
    assert any(p.startswith("providers.main.url: must use https") for p in problems), problems
    assert "Traceback" not in result.stderr


def test_check_config_missing_file_and_bad_toml(tmp_path: Path) -> None:
    result = run("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 78
    assert "no such file" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp\n")
    result = run("check-config", "--config", str(bad))
    assert result.returncode == 78
    assert "invalid TOML" in result.stderr


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def test_no_config_default_runs_and_send_test_lands_in_outbox(tmp_path: Path) -> None:
    """The README's first command: no config file, SMTP on 127.0.0.1:2525, outbox provider."""
    if Path("/etc/smtp2api/config.toml").exists():
        pytest.fail("/etc/smtp2api/config.toml exists: the embedded default cannot be tested")
    daemon = subprocess.Popen(
        [*SMTP2API, "serve"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_port(2525)
        result = run("send-test", "--to", "someone@example.com", "--server", "127.0.0.1:2525")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "250 2.0.0 Ok: " in result.stdout
        [json_file] = (tmp_path / "smtp2api-outbox").glob("*.json")
        [eml_file] = (tmp_path / "smtp2api-outbox").glob("*.eml")
        body = json.loads(json_file.read_text())
        assert body["to"] == [{"email": "someone@example.com"}]
        assert body["subject"] == "smtp2api test message"
        assert eml_file.read_bytes().startswith(b"Received: from ")
        assert (tmp_path / "smtp2api-data" / "spool.db").exists()
    finally:
        daemon.send_signal(signal.SIGTERM)
        output, _ = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, output
    events = [json.loads(line)["event"] for line in output.splitlines() if line.startswith("{")]
    assert "gateway_started" in events
    assert "delivery_succeeded" in events
    assert "gateway_stopped" in events


def test_send_test_reports_refusal(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run("send-test", "--to", "a@example.com", "--server", f"127.0.0.1:{port}")
    assert result.returncode == 69
    assert "cannot send through" in result.stdout
