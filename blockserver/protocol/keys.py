"""The keys requests are signed with, and how they are read from files: the cluster secret
(role write) and the read-only key derived from it (role read)."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

ROLE_WRITE = "write"
ROLE_READ = "read"
_READ_KEY_LABEL = b"fusefs read-only key v1"
READ_KEY_PREFIX = "fusefs-read-key-v1:"  # first characters of a read-only key file
MIN_SECRET_LEN = 16


class SecretError(ValueError):
    """The shared secret file is missing, unreadable or too short."""


@dataclass(frozen=True)
class Credentials:
    """What a client signs with: its key and the role that key grants."""

    key: bytes
    role: str = ROLE_WRITE


def derive_read_key(secret: bytes) -> bytes:
    """The read-only key of a cluster: servers accept it for reads only."""
    return hmac.new(secret, _READ_KEY_LABEL, hashlib.sha256).hexdigest().encode()


def role_keys(secret: bytes) -> dict[str, bytes]:
    """role -> key, as a server with the cluster secret accepts them."""
    return {ROLE_WRITE: secret, ROLE_READ: derive_read_key(secret)}


def _read_key_text(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read().strip()
    except OSError as e:
        raise SecretError(f"cannot read secret file {path}: {e.strerror}") from None


def load_credentials(path: str) -> Credentials:
    """A key file: the cluster secret (role write) or a read-only key file (role read)."""
    text = _read_key_text(path)
    prefix = READ_KEY_PREFIX.encode()
    if text.startswith(prefix):
        key = text[len(prefix):]
        if len(key) != 64:
            raise SecretError(f"read-only key file {path} is damaged; write it again with "
                              "the cluster secret")
        return Credentials(key, ROLE_READ)
    return Credentials(_checked_secret(text, path), ROLE_WRITE)


def load_secret(path: str) -> bytes:
    """Read the cluster secret from `path` (surrounding whitespace ignored)."""
    text = _read_key_text(path)
    if text.startswith(READ_KEY_PREFIX.encode()):
        raise SecretError(f"{path} holds a read-only key, not the cluster secret; this "
                          "needs the secret itself")
    return _checked_secret(text, path)


def _checked_secret(secret: bytes, path: str) -> bytes:
    if len(secret) < MIN_SECRET_LEN:
        raise SecretError(
            f"secret file {path} holds {len(secret)} bytes; use at least {MIN_SECRET_LEN} "
            f"random characters (e.g. `head -c 32 /dev/urandom | base64 > {path}`)"
        )
    return secret


def write_read_key_file(secret: bytes, path: str) -> None:
    """Write the read-only key of `secret` to a new file `path`, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(READ_KEY_PREFIX.encode() + derive_read_key(secret) + b"\n")
