"""Passwords: scrypt hashes for ``[[accounts]]``, a verifier that keeps the loop free, and the
per-IP AUTH failure throttle (``smtp.auth_failure_limit`` / ``smtp.auth_lockout``).

Format: ``scrypt:<log2 n>:<r>:<p>:<salt b64>:<key b64>``. Verification runs in a thread
(scrypt costs tens of milliseconds by design); a successful login is remembered as an HMAC
under a per-process key so that clients which log in for every message (WordPress does)
don't pay scrypt each time, while every failure still does. An unknown user costs exactly one
scrypt call with the accounts' own parameters, so timing does not tell who exists.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

# RFC 7914 §2: N=2**15, r=8, p=1 is a common interactive-login choice (~64 MiB·ms class).
_LOG2_N = 15
_R = 8
_P = 1
_KEY_LEN = 32
_MAXMEM = 128 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: bytes, *, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    """The one place scrypt runs (tests count the calls here: no enumeration by timing)."""
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=dklen)


def hash_password(
    password: str, *, log2_n: int = _LOG2_N, r: int = _R, p: int = _P, salt: bytes | None = None
) -> str:
    """The ``password_hash`` value for a password (``smtp2api hash-password``)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    key = _scrypt(password.encode("utf-8"), salt=salt, n=2**log2_n, r=r, p=p, dklen=_KEY_LEN)
    return f"scrypt:{log2_n}:{r}:{p}:{_b64(salt)}:{_b64(key)}"


@dataclass(frozen=True, slots=True)
class _Hash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _parse(encoded: str) -> _Hash:
    scheme, log2_n, r, p, salt, key = encoded.split(":")
    if scheme != "scrypt":
        raise ValueError("not a scrypt hash")
    return _Hash(int(log2_n), int(r), int(p), _unb64(salt), _unb64(key))


def verify_password(password: bytes, encoded: str) -> bool:
    """Constant-time check of ``password`` against a ``scrypt:`` hash; False on a bad hash."""
    try:
        parsed = _parse(encoded)
        key = _scrypt(
            password, salt=parsed.salt, n=2**parsed.log2_n, r=parsed.r, p=parsed.p,
            dklen=len(parsed.key),
        )  # fmt: skip
    except (ValueError, OverflowError, MemoryError):
        return False
    return hmac.compare_digest(key, parsed.key)


class Authenticator:
    """Checks AUTH credentials against the configured accounts without blocking the loop."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._hashes = dict(hashes)
        # An unknown user is checked against this, so timing does not reveal who exists: it
        # costs what the accounts' hashes cost (their most common scrypt parameters).
        self._dummy = _dummy_hash(self._hashes.values())
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}

    @property
    def has_accounts(self) -> bool:
        return bool(self._hashes)

    def _mac(self, username: str, password: bytes) -> bytes:
        return hmac.digest(self._cache_key, username.encode() + b"\0" + password, "sha256")

    async def check(self, username: str, password: bytes) -> bool:
        """True when ``username`` exists and ``password`` matches its hash."""
        encoded = self._hashes.get(username)
        mac = self._mac(username, password)  # for unknown users too: the same work either way
        cached = self._verified.get(username)
        if encoded is not None and cached is not None and hmac.compare_digest(cached, mac):
            return True
        ok = await asyncio.to_thread(verify_password, password, encoded or self._dummy)
        if ok and encoded is not None:
            self._verified[username] = mac
            return True
        return False


def _dummy_hash(hashes: Iterable[str]) -> str:
    """A hash of a random password with the most common parameters among ``hashes``."""
    params: collections.Counter[tuple[int, int, int]] = collections.Counter()
    for encoded in hashes:
        try:
            parsed = _parse(encoded)
        except ValueError:
            continue
        params[(parsed.log2_n, parsed.r, parsed.p)] += 1
    log2_n, r, p = params.most_common(1)[0][0] if params else (_LOG2_N, _R, _P)
    return hash_password(secrets.token_urlsafe(16), log2_n=log2_n, r=r, p=p)


def throttle_key(peer_ip: str) -> str:
    """Whom failures are counted against: the IPv4 address, or the IPv6 /64 (one subscriber
    usually holds a whole /64, so per-address counting would be trivial to sidestep)."""
    try:
        ip = ipaddress.ip_address(peer_ip)
    except ValueError:
        return peer_ip
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AuthThrottle:
    """Per-IP AUTH failure throttling across connections (design §8, fail2ban style).

    A peer with ``limit`` failures within ``lockout`` seconds is refused AUTH, without a password
    check, until the oldest of them is ``lockout`` old. Throttled attempts do not extend the
    lock-out; successes do not clear it (one valid account must not reset the count for
    guessing others). At most ``max_peers`` peers are remembered (least recently failed first
    out), so a spray from many addresses cannot grow memory without bound.
    """

    def __init__(
        self,
        limit: int = 10,
        lockout: float = 900.0,
        *,
        max_peers: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.lockout = lockout
        self._max_peers = max_peers
        self._clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def configure(self, limit: int, lockout: float) -> None:
        """New settings (a reload) keep the failures already counted."""
        self.limit, self.lockout = limit, lockout
        for key, times in list(self._failures.items()):
            self._failures[key] = collections.deque(times, maxlen=limit)

    def is_locked(self, peer_ip: str) -> bool:
        times = self._failures.get(throttle_key(peer_ip))
        if not times:
            return False
        now = self._clock()
        while times and now - times[0] >= self.lockout:
            times.popleft()
        return len(times) >= self.limit

    def failed(self, peer_ip: str) -> None:
        key = throttle_key(peer_ip)
        times = self._failures.pop(key, None) or collections.deque(maxlen=self.limit)
        times.append(self._clock())
        self._failures[key] = times  # most recent last
        while len(self._failures) > self._max_peers:
            self._failures.popitem(last=False)
