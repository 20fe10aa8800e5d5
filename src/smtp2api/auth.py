"""Passwords: scrypt hashes for ``[[accounts]]`` and a verifier that keeps the loop free.

Format: ``scrypt:<log2 n>:<r>:<p>:<salt b64>:<key b64>``. Verification runs in a thread
(scrypt costs tens of milliseconds by design); a successful login is remembered as an HMAC
under a per-process key so that clients which log in for every message (WordPress does)
don't pay scrypt each time, while every failure still does.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping
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


def hash_password(password: str, *, log2_n: int = _LOG2_N, salt: bytes | None = None) -> str:
    """The ``password_hash`` value for a password (``smtp2api hash-password``)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    key = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=2**log2_n, r=_R, p=_P, maxmem=_MAXMEM, dklen=_KEY_LEN
    )
    return f"scrypt:{log2_n}:{_R}:{_P}:{_b64(salt)}:{_b64(key)}"


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
        key = hashlib.scrypt(
            password,
            salt=parsed.salt,
            n=2**parsed.log2_n,
            r=parsed.r,
            p=parsed.p,
            maxmem=_MAXMEM,
            dklen=len(parsed.key),
        )
    except (ValueError, OverflowError, MemoryError):
        return False
    return hmac.compare_digest(key, parsed.key)


class Authenticator:
    """Checks AUTH credentials against the configured accounts without blocking the loop."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._hashes = dict(hashes)
        # An unknown user is checked against this, so timing does not reveal who exists.
        self._dummy = hash_password(secrets.token_urlsafe(16))
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
        if encoded is not None:
            mac = self._mac(username, password)
            cached = self._verified.get(username)
            if cached is not None and hmac.compare_digest(cached, mac):
                return True
        ok = await asyncio.to_thread(verify_password, password, encoded or self._dummy)
        if ok and encoded is not None:
            self._verified[username] = self._mac(username, password)
            return True
        return False
