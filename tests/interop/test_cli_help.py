"""The command line as documentation: every command's --help is complete, usage errors exit
64, and ``check-config`` never prints a secret: every SecretStr field of the settings, a
password in a URL, and credential-bearing extra headers."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from smtp2api import config
from smtp2api.cli import build_parser
from tests.conftest import account

SMTP2API = [sys.executable, "-m", "smtp2api"]


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*path, name))
    return found


COMMANDS = _commands(build_parser())


@pytest.mark.parametrize(
    ("path", "parser"), COMMANDS, ids=[" ".join(p) or "-" for p, _ in COMMANDS]
)
def test_every_command_and_option_is_described(
    path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    assert parser.description, f"smtp2api {' '.join(path)} has no description"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"{' '.join(path)} {choice.dest}: no help"
            continue
        assert action.help, f"smtp2api {' '.join(path)} {action.dest}: no help"


@pytest.mark.parametrize(
    "path", [p for p, _ in COMMANDS], ids=[" ".join(p) or "-" for p, _ in COMMANDS]
)
def test_help_runs(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*path, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: smtp2api {' '.join(path)}".rstrip())


def test_usage_error_exits_64() -> None:
    done = subprocess.run(
        [*SMTP2API, "queue", "retry"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 64
    assert "error: one of the arguments id --all is required" in done.stderr


def _secret_fields(model: type[BaseModel], prefix: str) -> set[str]:
    """Dotted names of every SecretStr field under ``model`` (lists and unions included)."""
    found: set[str] = set()
    for name, info in model.model_fields.items():
        for leaf in _leaf_types(info.annotation):
            if leaf is SecretStr:
                found.add(f"{prefix}{name}")
            elif isinstance(leaf, type) and issubclass(leaf, BaseModel):
                kind = leaf.model_fields.get("type")
                label = typing.get_args(kind.annotation)[0] if kind is not None else name
                found |= _secret_fields(leaf, f"{prefix}{label}.")
    return found


def _leaf_types(annotation: Any) -> list[Any]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _leaf_types(args[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict):
        return [leaf for arg in args for leaf in _leaf_types(arg)]
    return [annotation]


def test_check_config_masks_every_secret(tmp_path: Path) -> None:
    secrets: dict[str, str] = {}

    def secret(name: str) -> str:
        secrets[name] = f"SENTINEL-{name}-7f3a"
        return secrets[name]

    cert = tmp_path / "graph.pfx"
    cert.write_bytes(b"not read by check-config")
    providers: dict[str, dict[str, Any]] = {
        "http": {"type": "http", "url": "https://api.example.net/v1/emails",
                 "api_key": secret("http.api_key"),
                 "headers": {"X-Api-Key": secret("http.headers"), "X-Tenant": "shop"}},
        "ses": {"type": "ses", "region": "eu-west-1",
                "access_key_id": secret("ses.access_key_id"),
                "secret_access_key": secret("ses.secret_access_key"),
                "session_token": secret("ses.session_token")},
        "sendgrid": {"type": "sendgrid", "api_key": secret("sendgrid.api_key")},
        "mailgun": {"type": "mailgun", "domain": "mg.example.com",
                    "api_key": secret("mailgun.api_key")},
        "postmark": {"type": "postmark", "server_token": secret("postmark.server_token")},
        "resend": {"type": "resend", "api_key": secret("resend.api_key")},
        "graph": {"type": "graph", "tenant_id": "t", "client_id": "c",
                  "client_secret": secret("graph.client_secret")},
        "graph_cert": {"type": "graph", "tenant_id": "t", "client_id": "c",
                       "certificate_file": str(cert),
                       "certificate_password": secret("graph.certificate_password")},
    }  # fmt: skip
    data = {
        "smtp": {"tls_cert_file": "/etc/ssl/x.crt", "tls_key_file": "/etc/ssl/x.key"},
        "accounts": [account("wordpress")],
        "routes": [{"providers": list(providers)}],
        "providers": providers,
        "spool": {"url": f"postgresql://gw:{secret('spool.url')}@db.internal:5432/smtp2api"},
    }
    secrets["accounts.password_hash"] = data["accounts"][0]["password_hash"]
    # Every SecretStr in the settings is set above: a new one fails here until it is added.
    assert _secret_fields(config.Settings, "") <= set(secrets)
    path = tmp_path / "config.toml"
    path.write_text(_toml(data))
    done = subprocess.run(
        [*SMTP2API, "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name, value in secrets.items():
        assert value not in done.stdout, name
        assert value.removeprefix("scrypt:")[:20] not in done.stdout, name
    effective = tomllib.loads(done.stdout)
    assert effective["providers"]["ses"]["secret_access_key"] == "**********"
    assert effective["providers"]["http"]["headers"] == {"X-Api-Key": "**********",
                                                         "X-Tenant": "shop"}  # fmt: skip
    assert effective["spool"]["url"] == "postgresql://gw:**********@db.internal:5432/smtp2api"
    assert effective["accounts"][0]["password_hash"] == "**********"


def _toml(data: dict[str, Any]) -> str:
    from smtp2api import tomlout

    return tomlout.dumps(data)
