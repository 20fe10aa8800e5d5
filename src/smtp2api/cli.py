"""The ``smtp2api`` command line (design §6): the only place that turns errors into exit codes.

Exit codes follow sysexits(3): 0 ok, 64 usage, 69 unavailable, 75 temporary failure,
78 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import re
import smtplib
import socket
import ssl
import sys
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any, NoReturn, TextIO

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


_EPILOG = """\
configuration:
  --config PATH, else $SMTP2API_CONFIG, else /etc/smtp2api/config.toml if it exists, else the
  embedded local default (SMTP on 127.0.0.1:2525, loopback trusted, the outbox provider).
  Every key can be overridden by environment: SMTP2API_<SECTION>__<KEY>, for example
  SMTP2API_PROVIDERS__MAIN__API_KEY=... (lists and tables as JSON). config.example.toml
  documents every key.

exit codes (sysexits):
  0 ok, 64 usage, 69 unavailable (refused or unreachable), 75 temporary failure (4xx),
  78 invalid configuration.

docs: README.md, docs/deployment.md, docs/troubleshooting.md
"""
_RAW = argparse.RawDescriptionHelpFormatter  # keep the line breaks of descriptions and epilogs


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; sysexits(3) says 64. Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="smtp2api",
        description="""\
SMTP to HTTPS email API gateway. Point SMTP-only software at it; it delivers through SES,
SendGrid, Mailgun, Postmark, Resend, Microsoft Graph or any JSON email API, and answers with
the API's real verdict.""",
        epilog=_EPILOG,
        formatter_class=_RAW,
    )
    parser.add_argument("--version", action="version", version=f"smtp2api {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "serve",
        help="run the daemon in the foreground (logs to stdout)",
        formatter_class=_RAW,
        description="""\
Run the gateway in the foreground until SIGTERM or SIGINT; logs go to stdout.

signals:
  SIGTERM, SIGINT  stop accepting, let sessions in DATA finish (delivery.shutdown_timeout),
                   stop the worker (unsent mail stays spooled), exit 0
  SIGHUP           reload the config file and TLS certificates for new sessions; listen
                   addresses and the spool need a restart; an invalid file is refused and
                   the running config stays

Under systemd (Type=notify) it reports READY=1, STATUS= with the spool depth, WATCHDOG=1,
RELOADING=1 and STOPPING=1 (systemd/smtp2api.service). /metrics, /healthz and /readyz are
served on http.listen.""",
    )
    _add_config(p)
    p = sub.add_parser(
        "check-config",
        help="validate the config and print the effective config (secrets masked); exit 78 "
        "when invalid",
        formatter_class=_RAW,
        description="""\
Validate the configuration (file plus SMTP2API_* environment) and print the effective
configuration as TOML, every default filled in and every secret shown as **********.
Exit 0 when valid; exit 78 with one line per problem on stderr, each naming its key.""",
    )
    _add_config(p)
    p = sub.add_parser(
        "hash-password",
        help="read a password (prompt, or stdin when not a terminal) and print its "
        "password_hash for [[accounts]]",
        formatter_class=_RAW,
        description="""\
Read a password and print its scrypt hash for an [[accounts]] password_hash.
On a terminal it prompts twice; otherwise it reads one line from stdin:
  printf '%s\\n' "$PASSWORD" | smtp2api hash-password""",
    )
    p = sub.add_parser(
        "send-test",
        help="send one test message through a running gateway",
        formatter_class=_RAW,
        description="""\
Send one short test message through a running gateway and print its reply.
STARTTLS is used whenever the server offers it (certificate verified unless --insecure).
Exit 0 when accepted, 75 on a 4xx reply, 69 on a 5xx reply or when unreachable.""",
    )
    _add_config(p)
    p.add_argument("--to", required=True, metavar="ADDR", help="recipient address")
    p.add_argument(
        "--from",
        dest="sender",
        metavar="ADDR",
        help="envelope and header sender (default: smtp2api-test@<this host's FQDN>)",
    )
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
    p.add_argument(
        "--subject", default="smtp2api test message", help="subject line (default: %(default)s)"
    )
    p = sub.add_parser("version", help="print the version", description="Print the version.")
    from smtp2api.queue_cli import add_queue_parser

    add_queue_parser(sub, _add_config)
    return parser


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(config_path(args.config, os.environ))


MASK = "**********"  # what pydantic prints for a SecretStr
# Secrets that are not SecretStr fields: a password in a URL (spool.url's
# postgresql://user:password@host/db, RFC 3986 §3.2.1) and credential-bearing extra headers.
_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^/@:]*:)[^/@]*(@)", re.IGNORECASE)
_SECRET_HEADER = re.compile(r"authorization|cookie|key|secret|token|password", re.IGNORECASE)


def _mask(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        if key == "headers":
            return {k: MASK if _SECRET_HEADER.search(k) else v for k, v in value.items()}
        return {k: _mask(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, key) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\g<1>{MASK}\g<2>", value)
    return value


def cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    settings = _load(args)
    data = _mask(settings.model_dump(mode="json"))  # SecretStr fields are already MASK
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
    else:  # pragma: no cover - optional speed-up: pip install 'smtp2api[speed]'
        runner = uvloop.run
    from smtp2api.supervisor import raise_nofile_limit, supervise, worker_count

    raise_nofile_limit()  # one file descriptor per SMTP connection

    def reload() -> Settings:
        return load_settings(path)

    if worker_count(settings) > 1:
        return supervise(
            settings, reload, lambda conf, slot: int(runner(serve(conf, reload, slot)))
        )
    return int(runner(serve(settings, reload)))


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
