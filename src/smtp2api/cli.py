"""The ``smtp2api`` command line (design §6): the only place that turns errors into exit codes.

Exit codes follow sysexits(3): 0 ok, 64 usage, 69 unavailable, 75 temporary failure,
78 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import smtplib
import socket
import ssl
import sys
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import make_msgid
from typing import TextIO

from smtp2api import __version__, tomlout
from smtp2api.auth import hash_password
from smtp2api.config import Settings, config_path, load_settings
from smtp2api.errors import ConfigError, GatewayError
from smtp2api.units import parse_hostport

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML config file (default: $SMTP2API_CONFIG, else /etc/smtp2api/config.toml if "
        "it exists, else the embedded local default)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtp2api",
        description="SMTP to HTTPS email API gateway. Point SMTP-only software at it; it "
        "delivers through SES, SendGrid, Mailgun, Postmark, Resend, Microsoft Graph or any "
        "JSON email API, and answers with the API's real verdict.",
        epilog="Every setting can be overridden by environment: SMTP2API_<SECTION>__<KEY>, "
        "e.g. SMTP2API_PROVIDERS__MAIN__API_KEY.",
    )
    parser.add_argument("--version", action="version", version=f"smtp2api {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the daemon in the foreground (logs to stdout)")
    _add_config(p)
    p = sub.add_parser(
        "check-config",
        help="validate the config and print the effective config (secrets masked); exit 78 "
        "when invalid",
    )
    _add_config(p)
    p = sub.add_parser(
        "hash-password",
        help="read a password (prompt, or stdin when not a terminal) and print its "
        "password_hash for [[accounts]]",
    )
    p = sub.add_parser("send-test", help="send one test message through a running gateway")
    _add_config(p)
    p.add_argument("--to", required=True, metavar="ADDR", help="recipient address")
    p.add_argument("--from", dest="sender", metavar="ADDR", help="sender address")
    p.add_argument(
        "--server", metavar="HOST:PORT", help="gateway address (default: the first listen address)"
    )
    p.add_argument(
        "--user",
        metavar="U",
        help="AUTH as this account; the password is prompted or read from stdin",
    )
    p.add_argument("--tls", action="store_true", help="implicit TLS (port 465 style)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the gateway's TLS certificate (self-signed test setups only)",
    )
    p.add_argument("--subject", default="smtp2api test message", help="subject line")
    p = sub.add_parser("version", help="print the version")
    from smtp2api.queue_cli import add_queue_parser

    add_queue_parser(sub, _add_config)
    return parser


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(config_path(args.config, os.environ))


def cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    settings = _load(args)
    data = settings.model_dump(mode="json")
    out.write(tomlout.dumps(data))
    return EX_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from smtp2api.app import serve
    from smtp2api.logs import configure_logging

    path = config_path(args.config, os.environ)
    settings = load_settings(path)
    configure_logging(settings.log.level, settings.log.format)
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        runner = asyncio.run
    else:  # pragma: no cover - optional speed-up
        runner = uvloop.run
    return int(runner(serve(settings, lambda: load_settings(path))))


def _read_secret(prompt: str, confirm: bool) -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != first:
        raise GatewayError("passwords do not match")
    return first


def cmd_hash_password(args: argparse.Namespace, out: TextIO) -> int:
    password = _read_secret("Password: ", confirm=True)
    if not password:
        raise GatewayError("empty password")
    out.write(hash_password(password) + "\n")
    return EX_OK


def _default_server(args: argparse.Namespace) -> str:
    try:
        settings = _load(args)
    except ConfigError:
        return "127.0.0.1:2525"
    smtp = settings.smtp
    address = (smtp.tls_listen if args.tls else []) or smtp.listen or smtp.plain_listen
    host, port = parse_hostport(address[0]) if address else ("127.0.0.1", 2525)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)  # noqa: S104
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _text(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply


def _transaction(client: smtplib.SMTP, sender: str, rcpt: str, data: bytes) -> tuple[int, bytes]:
    code, text = client.mail(sender)
    if code != 250:
        raise smtplib.SMTPSenderRefused(code, text, sender)
    code, text = client.rcpt(rcpt)
    if code not in (250, 251):
        raise smtplib.SMTPRecipientsRefused({rcpt: (code, text)})
    return client.data(data)


def cmd_send_test(args: argparse.Namespace, out: TextIO) -> int:
    host, port = parse_hostport(args.server or _default_server(args))
    sender = args.sender or f"smtp2api-test@{socket.getfqdn()}"
    message = EmailMessage()
    message["From"] = sender
    message["To"] = args.to
    message["Subject"] = args.subject
    message["Message-ID"] = make_msgid(domain="smtp2api.test")
    message.set_content(f"This is a test message from smtp2api {__version__}.\n")
    context = ssl.create_default_context()
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    password = _read_secret("Password: ", confirm=False) if args.user else None
    try:
        client: smtplib.SMTP = (
            smtplib.SMTP_SSL(host, port, context=context, timeout=60)
            if args.tls
            else smtplib.SMTP(host, port, timeout=60)
        )
        with client:
            client.ehlo()
            if not args.tls and client.has_extn("starttls"):
                client.starttls(context=context)
                client.ehlo()
            if args.user:
                client.login(args.user, password or "")
            code, text = _transaction(client, sender, args.to, message.as_bytes())
    except smtplib.SMTPResponseException as exc:
        out.write(f"refused: {exc.smtp_code} {_text(exc.smtp_error)}\n")
        return EX_TEMPFAIL if 400 <= exc.smtp_code < 500 else EX_UNAVAILABLE
    except smtplib.SMTPRecipientsRefused as exc:
        for rcpt, (rcode, rtext) in exc.recipients.items():
            out.write(f"refused {rcpt}: {rcode} {_text(rtext)}\n")
        return EX_UNAVAILABLE
    except (OSError, smtplib.SMTPException) as exc:
        out.write(f"cannot send through {host}:{port}: {exc}\n")
        return EX_UNAVAILABLE
    reply = f"{code} {_text(text)}"
    out.write(f"sent to {args.to} via {host}:{port}: {reply}\n")
    return EX_OK


def _dispatch(args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "version":
        out.write(f"smtp2api {__version__}\n")
        return EX_OK
    if args.command == "serve":
        return cmd_serve(args)
    commands = {
        "check-config": cmd_check_config,
        "hash-password": cmd_hash_password,
        "send-test": cmd_send_test,
    }
    if args.command in commands:
        return commands[args.command](args, out)
    from smtp2api.queue_cli import run_queue_command

    return run_queue_command(args, _load(args), out)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args, sys.stdout)
    except ConfigError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"{problem}\n")
        return EX_CONFIG
    except GatewayError as exc:
        sys.stderr.write(f"smtp2api: {exc}\n")
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
