"""Access keys: a primary and a secondary, read from a file, rotated without a restart.

As the seeds' service: a client sends ``authorization: Bearer <key>`` (gRPC metadata or
HTTP header); two keys are valid at once so one can be replaced while clients still use the
other. The keys file has one key per line (first = primary, second = secondary); blank
lines and ``#`` comments are skipped. :meth:`KeyStore.reload` re-reads it (the server calls
it on SIGHUP); a broken file keeps the keys that were loaded, so a typo during rotation
does not lock every client out.

Keys are compared with :func:`hmac.compare_digest` against every configured key, whatever
matches first, so the time taken does not reveal which key or how much of one matched. No
key or presented token ever appears in an exception message, a log line or a ``repr``.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from enum import Enum
from pathlib import Path

from tessera.errors import TesseraError

log = logging.getLogger("tessera.serve")

#: Keys shorter than this are refused: a guessable key protects nothing.
MIN_KEY_LENGTH = 16


class KeysFileError(TesseraError):
    """The keys file is missing, unreadable, empty or holds an unusable key."""


class AuthResult(Enum):
    """Outcome of checking one request's credentials (a metrics label, never the key)."""

    PRIMARY = "primary"
    SECONDARY = "secondary"
    MISSING = "missing"
    INVALID = "invalid"

    @property
    def ok(self) -> bool:
        return self in (AuthResult.PRIMARY, AuthResult.SECONDARY)


def read_keys_file(path: str | os.PathLike[str]) -> list[str]:
    """The keys in ``path``: one per line, at most two (primary, secondary)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeysFileError(f"keys file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"cannot read keys file {path}: {type(exc).__name__}") from None
    keys = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
    if not keys:
        raise KeysFileError(f"keys file {path} holds no key (one key per line)")
    if len(keys) > 2:
        raise KeysFileError(
            f"keys file {path} holds {len(keys)} keys; at most two (primary, secondary)"
        )
    for i, key in enumerate(keys):
        which = ("primary", "secondary")[i]
        if len(key) < MIN_KEY_LENGTH:
            raise KeysFileError(
                f"the {which} key in {path} is shorter than {MIN_KEY_LENGTH} characters"
            )
        if any(c.isspace() for c in key) or not key.isprintable() or not key.isascii():
            raise KeysFileError(f"the {which} key in {path} must be printable ASCII without spaces")
    return keys


def bearer_token(header: str | None) -> str | None:
    """The token of an ``authorization`` value ``Bearer <token>``; None if absent/malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class KeyStore:
    """The valid keys of a server, thread-safe, reloadable from their file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keys: list[bytes] = [k.encode() for k in read_keys_file(self.path)]

    def __repr__(self) -> str:  # never the keys themselves
        return f"KeyStore({str(self.path)!r}, {len(self._keys)} keys)"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._keys)

    def reload(self) -> bool:
        """Re-read the file; on error keep the old keys, log why, and return False."""
        try:
            keys = [k.encode() for k in read_keys_file(self.path)]
        except KeysFileError as exc:
            log.error("keys reload failed, keeping the previous keys: %s", exc)
            return False
        with self._lock:
            self._keys = keys
        log.info("keys reloaded from %s: %d keys", self.path, len(keys))
        return True

    def check(self, authorization: str | None) -> AuthResult:
        """Check an ``authorization`` header value in time independent of the keys."""
        if not authorization or not authorization.strip():
            return AuthResult.MISSING
        token = bearer_token(authorization)
        if token is None:
            return AuthResult.INVALID  # present but not "Bearer <key>"
        presented = token.encode("utf-8", "surrogateescape")
        with self._lock:
            keys = list(self._keys)
        matched = -1
        for i, key in enumerate(keys):
            # Every key is compared, no early exit, so timing says nothing about which.
            if hmac.compare_digest(presented, key) and matched < 0:
                matched = i
        if matched == 0:
            return AuthResult.PRIMARY
        if matched == 1:
            return AuthResult.SECONDARY
        return AuthResult.INVALID
