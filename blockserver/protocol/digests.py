"""The two hashes of the contract: xxh3-128, the checksum that names a block's content and
catches accidents; SHA-256, the digest signatures cover, which also stops forgers."""

from __future__ import annotations

import hashlib
import re

import xxhash

_CHECKSUM_RE = re.compile(r"[0-9a-f]{32}\Z")


def checksum(data) -> str:
    """The xxh3-128 checksum of `data` (bytes-like) as 32 lowercase hex characters."""
    return xxhash.xxh3_128_hexdigest(data)


def is_checksum(value: str) -> bool:
    return bool(_CHECKSUM_RE.match(value))


def content_digest(*parts) -> str:
    """SHA-256 of the concatenated bytes-like `parts`, 64 lowercase hex characters.

    The cryptographic digest signatures cover (xxh3 is not one: second preimages of it
    are easy). SHA-256, not BLAKE2b: on CPUs with SHA extensions it is about twice as
    fast here (0.6 ms against 1.1 ms per MiB)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


EMPTY_CHECKSUM = checksum(b"")
EMPTY_DIGEST = content_digest()
