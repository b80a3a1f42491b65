"""The wire contract between fusefs clients and block servers (see docs/blockserver-api.md).

Everything both sides must agree on lives here and only here: identifier formats, header
names, the checksum function, request signing, and the framing of batch bodies. The server
imports it to check requests; the client (`fusefs.transport`) imports it to build them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time

import xxhash

API_PREFIX = "/v1"

BLOCK_ID_LEN = 32  # lowercase hex characters: 128 random bits
_BLOCK_ID_RE = re.compile(r"[0-9a-f]{32}\Z")
_CHECKSUM_RE = re.compile(r"[0-9a-f]{32}\Z")
_REGISTER_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")

H_CHECKSUM = "X-Fusefs-Checksum"  # xxh3-128 of a block's bytes, 32 lowercase hex
H_GENERATION = "X-Fusefs-Generation"  # register generation (decimal)
H_SERVER_ID = "X-Fusefs-Server-Id"  # on every response: the server's stable id
H_DATE = "X-Fusefs-Date"  # signing: unix seconds
H_NONCE = "X-Fusefs-Nonce"  # signing: random, never reused within the skew window
H_CONTENT_HASH = "X-Fusefs-Content-Hash"  # signing: xxh3-128 of the whole request body
AUTH_SCHEME = "FUSEFS-HMAC-SHA256"
SIGNATURE_MAX_SKEW = 300  # seconds a signed request stays valid either side of now

EMPTY_CHECKSUM = xxhash.xxh3_128_hexdigest(b"")
MIN_SECRET_LEN = 16


def checksum(data) -> str:
    """The xxh3-128 checksum of `data` (bytes-like) as 32 lowercase hex characters."""
    return xxhash.xxh3_128_hexdigest(data)


def is_block_id(value: str) -> bool:
    return bool(_BLOCK_ID_RE.match(value))


def is_checksum(value: str) -> bool:
    return bool(_CHECKSUM_RE.match(value))


def is_register_name(value: str) -> bool:
    return bool(_REGISTER_RE.match(value))


def new_block_id() -> str:
    """A fresh random block id. Blocks are immutable, so every write gets a new one."""
    return os.urandom(BLOCK_ID_LEN // 2).hex()


class SecretError(ValueError):
    """The shared secret file is missing, unreadable or too short."""


def load_secret(path: str) -> bytes:
    """Read a shared secret from `path` (surrounding whitespace ignored)."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise SecretError(f"cannot read secret file {path}: {e.strerror}") from None
    if len(secret) < MIN_SECRET_LEN:
        raise SecretError(
            f"secret file {path} holds {len(secret)} bytes; use at least {MIN_SECRET_LEN} "
            f"random characters (e.g. `head -c 32 /dev/urandom | base64 > {path}`)"
        )
    return secret


def signature(secret: bytes, method: str, target: str, date: str, nonce: str,
              content_hash: str) -> str:
    """HMAC-SHA256 over the parts of a request an attacker must not change or replay."""
    message = "\n".join((method.upper(), target, date, nonce, content_hash)).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign_request(secret: bytes, method: str, target: str, body_checksum: str,
                 now: float | None = None) -> dict[str, str]:
    """Headers that authenticate one request. `target` is the path with its query string."""
    date = str(int(time.time() if now is None else now))
    nonce = os.urandom(12).hex()
    sig = signature(secret, method, target, date, nonce, body_checksum)
    return {
        H_DATE: date,
        H_NONCE: nonce,
        H_CONTENT_HASH: body_checksum,
        "Authorization": f"{AUTH_SCHEME} {sig}",
    }


# Batch bodies: one line of JSON (the manifest), a newline, then the payloads of the blocks
# the manifest lists, concatenated in manifest order. JSON keeps the manifest readable in a
# packet capture; raw payloads avoid base64's cost on the hot path.

def encode_batch(manifest: dict, payloads=()) -> list:
    """The parts of a batch body, ready for a gathered write (no copy of the payloads)."""
    head = json.dumps(manifest, separators=(",", ":")).encode() + b"\n"
    return [head, *payloads]


class BatchFormatError(ValueError):
    """A batch body whose manifest is missing, not JSON, or disagrees with its payloads."""


def decode_batch(body) -> tuple[dict, memoryview]:
    """Split a batch body into its manifest and the concatenated payloads that follow it."""
    view = memoryview(body)
    end = bytes(view[: 1 << 20]).find(b"\n")
    if end < 0:
        raise BatchFormatError("batch body has no manifest line")
    try:
        manifest = json.loads(bytes(view[:end]))
    except ValueError as e:
        raise BatchFormatError(f"batch manifest is not JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise BatchFormatError("batch manifest must be a JSON object")
    return manifest, view[end + 1:]
