"""Signatures: what a client's HMAC over a request covers, and what a server's HMAC over
its answer covers (docs/blockserver-api.md, "Authentication")."""

from __future__ import annotations

import hashlib
import hmac
import os
import time

from .headers import (AUTH_SCHEME, H_AUTHORIZATION, H_CHECKSUM, H_CONTENT_HASH, H_DATE,
                      H_EXPECT_GENERATION, H_FOR_SERVER, H_GENERATION, H_NONCE, H_ROLE)
from .keys import ROLE_WRITE

SIGNATURE_MAX_SKEW = 30  # seconds a signed request stays valid either side of now
# Headers the server acts on: every one is in the signed string (absent = empty value).
SIGNED_HEADERS = (H_CHECKSUM, H_GENERATION, H_EXPECT_GENERATION)
# Headers of an answer the client acts on: in the response signature.
SIGNED_RESPONSE_HEADERS = (H_CHECKSUM, H_GENERATION, "Content-Length")


def _header_lines(headers, names) -> list[str]:
    return [f"{n.lower()}:{headers.get(n, '')}" for n in names]


def signature(key: bytes, method: str, target: str, date: str, nonce: str,
              content_hash: str, server_id: str = "", role: str = ROLE_WRITE,
              headers=None) -> str:
    """HMAC-SHA256 over everything in a request an attacker must not change or replay:
    method, target, date, nonce, the body's SHA-256, the server it is for, the role, and
    every header the server acts on (`headers` maps those names, any case, to values)."""
    found = {k.lower(): v for k, v in (headers or {}).items()}
    lines = [AUTH_SCHEME, method.upper(), target, date, nonce, content_hash, server_id, role,
             *_header_lines(found, [n.lower() for n in SIGNED_HEADERS])]
    return hmac.new(key, "\n".join(lines).encode("latin-1"), hashlib.sha256).hexdigest()


def sign_request(key: bytes, method: str, target: str, body_digest: str,
                 now: float | None = None, *, server_id: str = "", role: str = ROLE_WRITE,
                 headers=None) -> dict[str, str]:
    """Headers that authenticate one request. `target` is the path with its query string,
    `body_digest` the content_digest() of the body, `headers` the semantic headers sent."""
    date = str(int(time.time() if now is None else now))
    nonce = os.urandom(12).hex()
    sig = signature(key, method, target, date, nonce, body_digest, server_id, role, headers)
    signed = {H_DATE: date, H_NONCE: nonce, H_CONTENT_HASH: body_digest,
              H_FOR_SERVER: server_id, H_AUTHORIZATION: f"{AUTH_SCHEME} {sig}"}
    if role != ROLE_WRITE:
        signed[H_ROLE] = role
    return signed


def response_signature(key: bytes, status: int, nonce: str, server_id: str, body_digest: str,
                       headers) -> str:
    """The server's HMAC over its answer to the signed request with `nonce`: the status,
    its id, the body's SHA-256 and every response header a client acts on."""
    found = {k.lower(): str(v) for k, v in headers.items()}
    lines = ["response", str(status), nonce, server_id, body_digest,
             *_header_lines(found, [n.lower() for n in SIGNED_RESPONSE_HEADERS])]
    return hmac.new(key, "\n".join(lines).encode("latin-1"), hashlib.sha256).hexdigest()
