"""A throwaway PostgreSQL cluster for the tests and the benchmark: ``initdb`` into a temporary
directory, ``pg_ctl start`` on a free port of 127.0.0.1, torn down at the end.

PostgreSQL refuses to run as root, so as root (CI) the cluster belongs to the ``postgres``
user that Debian's package creates and every server command runs through ``runuser``.
Fixtures: ``pg_cluster`` (one per session) and ``pg_url`` (a fresh, empty database per test).
A missing PostgreSQL fails the test in CI and skips it elsewhere (``require_tool``).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import require_tool

SERVER_USER = "postgres"  # Debian's postgresql package creates it
# Fast, not durable: the tests check what the spool does, not what the disk does. The benchmark
# starts its cluster with ``durable=True``.
_TEST_SETTINGS = {"fsync": "off", "full_page_writes": "off"}
_COMMON_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "200",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",  # expected errors (duplicate ids) need no log line
}


def find_pg_bin(name: str) -> str | None:
    """``name`` on PATH, else in the newest ``/usr/lib/postgresql/N/bin`` (Debian puts the
    server programs there, off PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    candidates.sort(key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PgCluster:
    """A running cluster reached as superuser ``postgres`` over TCP, trust auth."""

    base: Path
    port: int
    bindir: Path
    run_as: str | None  # a user to run the server commands as (we are root), or None
    host: str = "127.0.0.1"
    user: str = "postgres"
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` as superuser (outside any spool connection); returns the output."""
        psql = find_pg_bin("psql") or str(self.bindir / "psql")
        done = subprocess.run(
            [psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.url(dbname)],
            input=sql,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; returns its URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def terminate_backends(self, dbname: str) -> int:
        """Kill every session on ``dbname``, as a crashed network or a failover would."""
        out = self.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = '{dbname}' AND pid <> pg_backend_pid()"
        )
        return int(out or 0)

    def stop(self) -> None:
        self._ctl("stop", "-m", "immediate", check=False)
        shutil.rmtree(self.base, ignore_errors=True)

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args]
        return _run(cmd, self.run_as, check=check)


def _run(
    cmd: Sequence[str], run_as: str | None, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    full = ["runuser", "-u", run_as, "--", *cmd] if run_as else list(cmd)
    # cwd "/": the server user may not be allowed into the caller's working directory.
    done = subprocess.run(full, capture_output=True, text=True, check=False, timeout=120, cwd="/")
    if check and done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def start_cluster(*, durable: bool = False, settings: dict[str, str] | None = None) -> PgCluster:
    """initdb + pg_ctl start; raises ``LookupError`` when PostgreSQL is not installed."""
    initdb = find_pg_bin("initdb")
    if initdb is None or find_pg_bin("pg_ctl") is None:
        raise LookupError("initdb/pg_ctl (Debian package postgresql) not found")
    bindir = Path(initdb).resolve().parent
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise LookupError(f"running as root and there is no {SERVER_USER!r} user") from None
        run_as = SERVER_USER
    base = Path(tempfile.mkdtemp(prefix="smtp2api-pg-"))
    try:
        return _init_and_start(base, bindir, run_as, durable, settings or {})
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise


def _init_and_start(
    base: Path, bindir: Path, run_as: str | None, durable: bool, extra: dict[str, str]
) -> PgCluster:
    base.chmod(0o755)  # the server user must reach its directories inside
    for sub in ("data", "run"):
        (base / sub).mkdir(mode=0o700)
        if run_as:
            entry = pwd.getpwnam(run_as)
            os.chown(base / sub, entry.pw_uid, entry.pw_gid)
    init = [str(bindir / "initdb"), "-D", str(base / "data"), "-U", "postgres"]
    init += ["--auth=trust", "-E", "UTF8", "--locale=C"]
    if not durable:
        init.append("--no-sync")
    _run(init, run_as)
    settings = {**_COMMON_SETTINGS, **({} if durable else _TEST_SETTINGS), **extra}
    settings["unix_socket_directories"] = str(base / "run")
    for attempt in range(3):  # the free port can be taken between probe and bind
        cluster = PgCluster(base=base, port=free_port(), bindir=bindir, run_as=run_as)
        options = " ".join(f"-c {k}={v}" for k, v in {**settings, "port": cluster.port}.items())
        started = cluster._ctl(
            "start", "-w", "-t", "60", "-l", str(base / "run" / "log"), "-o", options, check=False
        )
        if started.returncode == 0:
            return cluster
        if attempt == 2:
            log = (base / "run" / "log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()}\n{log}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    try:
        cluster = start_cluster()
    except LookupError as exc:
        require_tool(None, f"PostgreSQL ({exc})")
        raise  # not reached: require_tool fails or skips
    try:
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """The URL of a new, empty database on the session's cluster."""
    return pg_cluster.new_database()
