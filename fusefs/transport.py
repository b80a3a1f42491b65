"""HTTP to block servers. The only module of fusefs that imports `requests`.

What goes on the wire (paths, queries, headers, what a status means, signatures, batch
framing, block ids) is the wire contract's, `blockserver.protocol`, the one module of
`blockserver` that fusefs imports: this module takes all of it from there. Only the field
names of the JSON bodies are written here, as docs/blockserver-api.md lists them.

One `requests` HTTPAdapter per Transport, shared by all threads, with one pool per server
of at most `pool_size` connections; a semaphore per server keeps the requests in flight to
it at that bound too, so a process never holds more than `pool_size` connections to one
server (any number of mounts per server stays affordable). Requests go straight to the
adapter: a Session's cookies, redirects, hooks, environment and URL normalization cost
about half of the client's CPU per small request here and none of them applies.

Connect and read timeouts on every call; TLS verified against the system store or a CA
file (`tls_verify`). With a key (`secret`, and `role`: the cluster secret signs as
"write", a read-only key as "read"), every request is signed for the server it goes to
(its id; a member known only by URL has its id asked first, from a signed status answer)
over the SHA-256 of its body and every header with meaning, and every answer must carry
the server's signature over the status, our nonce, its id, the SHA-256 of its body and the
headers we act on: a man in the middle or a server without the key cannot forge blocks,
registers or errors (`AuthenticationFailed`), and an answer from another server is
`WrongServer`. Every failure leaves this module as one of the project's own
`fusefs.errors` exceptions, translated by the two tables below.

`observe`, when given, hears of every request once it ended (the mount's metrics,
fusefs/metrics.py): method, endpoint (`endpoint_of`, one of a few names), outcome ("ok"
or the class of the error raised: "BlockMissing", "Timeout", ...), bytes sent and
received, seconds. It runs on the caller's thread after the answer was read, so it must
be quick; what it raises is ignored (counting never fails a request).
"""

from __future__ import annotations

import hmac
import http.client
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import requests
import requests.adapters
import urllib3.exceptions

from blockserver import protocol

from . import errors


@dataclass(frozen=True)
class TransportConfig:
    """How a Transport talks to servers: timeouts, the key it signs with, TLS, pool size."""

    connect_timeout: float = 2.0
    read_timeout: float = 10.0
    secret: bytes | None = None  # the cluster secret, or the read-only key (role "read")
    tls_verify: bool | str = True  # True: system CAs; a path: that CA bundle
    pool_size: int = 16  # connections to one server, at most, for the whole process
    role: str = protocol.ROLE_WRITE  # what `secret` is: protocol.ROLE_WRITE or ROLE_READ

    @classmethod
    def from_key_file(cls, path: str, **fields) -> "TransportConfig":
        """A config signing with the key in `path`: a cluster secret file (role write) or a
        read-only key file (role read). Raises protocol.SecretError."""
        credentials = protocol.load_credentials(path)
        return cls(secret=credentials.key, role=credentials.role, **fields)


@dataclass(frozen=True)
class Member:
    """One block server of a cluster: its stable id (from /v1/status), its URL, and the
    name it is ranked under for placement (`key`): its id, unless it took another
    server's place (`fusefs servers replace`), whose slot it then keeps, so the blocks
    homed on the old server are the ones homed on it."""

    id: str
    url: str
    slot: str = ""

    @property
    def key(self) -> str:
        return self.slot or self.id

    def as_dict(self) -> dict:
        """As the superblock records it (no slot when it is the id: the older form)."""
        return {"id": self.id, "url": self.url, **({"slot": self.slot} if self.slot else {})}

    @classmethod
    def from_dict(cls, raw: dict) -> "Member":
        return cls(raw["id"], raw["url"], raw.get("slot", ""))


def at_given_urls(members, given: dict[str, str]) -> tuple[Member, ...]:
    """`members` at the URLs a user gave for them (server id -> URL: servers may have
    moved since the superblock recorded theirs); the others keep their recorded URL."""
    return tuple(replace(m, url=given.get(m.id, m.url)) for m in members)


# Library exception -> (our exception, what to tell a person). First match wins, so the
# more specific classes come first.
_EXCEPTIONS = (
    (requests.exceptions.SSLError, errors.Unavailable, "TLS failed"),
    (requests.exceptions.ConnectTimeout, errors.Timeout, "connect timed out"),
    (requests.exceptions.ReadTimeout, errors.Timeout, "no answer in time"),
    (requests.exceptions.ConnectionError, errors.Unavailable, "cannot reach server"),
    (requests.exceptions.RequestException, errors.Unavailable, "request failed"),
    (urllib3.exceptions.HTTPError, errors.Unavailable, "HTTP failure"),
    (http.client.HTTPException, errors.Unavailable, "HTTP failure"),
    (OSError, errors.Unavailable, "network error"),
)

# Status (its meaning: blockserver.protocol.statuses) -> our exception. Statuses not
# listed: 5xx are Unavailable, 4xx Rejected.
_STATUSES = {
    protocol.UNAUTHENTICATED: errors.AuthenticationFailed,
    # The read-only key was used to write or delete. Rejected, not AuthenticationFailed:
    # the server is healthy and must not be taken for down (a read repair of a read-only
    # client meets this).
    protocol.READ_ONLY: errors.Rejected,
    protocol.MISSING: errors.BlockMissing,
    protocol.CONFLICT: errors.Conflict,
    protocol.CORRUPT: errors.BlockCorrupt,
    protocol.CHECKSUM_MISMATCH: errors.BlockCorrupt,
    protocol.FULL: errors.StorageFull,
}


def wrong_server(url: str, found, expected: str) -> errors.WrongServer:
    return errors.WrongServer(f"{url} is server {found}, but this filesystem expects server "
                              f"{expected} there; check the server list", server=url)


def _translate(exc: BaseException, url: str) -> errors.StorageError:
    for library_class, ours, summary in _EXCEPTIONS:
        if isinstance(exc, library_class):
            return ours(f"{url}: {summary} ({type(exc).__name__})", server=url)
    return errors.Unavailable(f"{url}: {type(exc).__name__}: {exc}", server=url)


class Reply:
    """A server's answer once checked: status, headers and the whole body."""

    __slots__ = ("status", "headers", "content")

    def __init__(self, status: int, headers, content: bytes):
        self.status, self.headers, self.content = status, headers, content

    def json(self):
        return json.loads(self.content)


_DIGEST_MEMO = 256  # bodies whose digest is kept for the next replica's request

# Endpoint names for `observe`, by path prefix (one block's path before the listing's): a
# bounded set, never a block id or register name.
_ENDPOINTS = (
    (protocol.BLOCKS + "/", "block"), (protocol.BLOCKS, "listing"),
    (protocol.REGISTERS, "register"), (protocol.BATCH_PUT, "batch_put"),
    (protocol.BATCH_GET, "batch_get"), (protocol.BATCH_CHECK, "batch_check"),
    (protocol.BATCH_DELETE, "batch_delete"), (protocol.STATUS, "status"),
)


def endpoint_of(path: str) -> str:
    """The name of the endpoint a request path is for ("block", "batch_put", ...)."""
    for prefix, name in _ENDPOINTS:
        if path.startswith(prefix):
            return name
    return "other"


class Transport:
    """Signed HTTP calls to block servers, with the project's exceptions and timeouts."""

    def __init__(self, config: TransportConfig, observe=None):
        self.config = config
        self._observe = observe  # (method, endpoint, outcome, sent, received, seconds)
        self._adapter = requests.adapters.HTTPAdapter(
            pool_connections=64, pool_maxsize=max(1, config.pool_size), max_retries=0)
        self._lock = threading.Lock()  # guards the dicts and set below; never held over I/O
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._ids: dict[str, str] = {}  # url -> server id learnt from a signed status
        self._digests: OrderedDict[tuple, str] = OrderedDict()
        self._hashing: dict[tuple, threading.Event] = {}  # keys being hashed now
        # URLs whose signed answers said the server takes BLAKE3 digests (X-Fusefs-Digests)
        self._blake3: set[str] = set()

    def _slot(self, url: str) -> threading.BoundedSemaphore:
        with self._lock:
            slot = self._slots.get(url)
            if slot is None:
                slot = self._slots[url] = threading.BoundedSemaphore(
                    max(1, self.config.pool_size))
            return slot

    def _algorithm(self, member: Member) -> str:
        """The digest to sign a request to `member` with: BLAKE3 once its server said it
        takes it (docs/blockserver-api.md, "Digests"), else SHA-256."""
        if protocol.BLAKE3 not in protocol.SUPPORTED_DIGESTS:
            return protocol.SHA256
        with self._lock:
            return protocol.BLAKE3 if member.url in self._blake3 else protocol.SHA256

    def _learn_digests(self, member: Member, headers, algorithm: str, authentic: bool) -> None:
        """After an answer: use BLAKE3 with this server from now on if a signed answer
        offers it; stop when a signed answer no longer offers it, or when an answer to a
        BLAKE3 request fails its check (the server at this URL may have been replaced by
        an older one). The header is not signed: a forger who adds it only makes requests
        fail, which a forger can do anyway."""
        offered = protocol.BLAKE3 in headers.get(protocol.H_DIGESTS, "").split(",")
        with self._lock:
            if authentic and offered:
                self._blake3.add(member.url)
            elif authentic or algorithm == protocol.BLAKE3:
                self._blake3.discard(member.url)

    def _digest(self, key: tuple, parts, algorithm: str = protocol.SHA256) -> str:
        """The digest of a body, computed once for all replicas it is sent to. `key`
        names the content (block ids are never reused for other bytes); a wrong memo can
        only make a server refuse the request (401), never accept other bytes.

        The replicas' requests start together on their servers' I/O threads: the first
        hashes and the others wait for its digest (each hashing the same MiB was 2 of the
        daemon's 9 CPU-seconds per GiB written)."""
        key = (*key, algorithm)
        while True:
            with self._lock:
                digest = self._digests.get(key)
                if digest is not None:
                    return digest
                busy = self._hashing.get(key)
                if busy is None:
                    busy = self._hashing[key] = threading.Event()
                    break
            busy.wait(1.0)  # its hasher returns or fails; then look again
        try:
            digest = protocol.content_digest(*parts, algorithm=algorithm)
            with self._lock:
                self._digests[key] = digest
                while len(self._digests) > _DIGEST_MEMO:
                    self._digests.popitem(last=False)
            return digest
        finally:
            with self._lock:
                del self._hashing[key]
            busy.set()

    def _server_id(self, member: Member, path: str) -> str:
        """The id a request to `member` is signed for; asked once when only its URL is known."""
        if member.id or path == protocol.STATUS or self.config.secret is None:
            return member.id
        with self._lock:
            known = self._ids.get(member.url)
        return known or self.status(member)["server_id"]

    def call(self, member: Member, method: str, path: str, body=b"", *, headers=None,
             ok=(protocol.OK,), timeout: float | None = None, body_digest: str | None = None,
             body_checksum: str | None = None) -> Reply:
        """One request to one server. Raises a StorageError for any status not in `ok`.

        `body_digest`, when the caller already has it (content_digest of the body, with
        `_algorithm(member)`), saves hashing the body again. (`body_checksum` is ignored:
        the signature needs a cryptographic digest, not the block's xxh3.)"""
        if self._observe is None:
            return self._signed_call(member, method, path, body, headers, ok, timeout,
                                     body_digest)
        started = time.perf_counter()
        outcome, received = "ok", 0
        try:
            reply = self._signed_call(member, method, path, body, headers, ok, timeout,
                                      body_digest)
            received = len(reply.content)
            return reply
        except Exception as e:
            outcome = type(e).__name__  # BlockMissing, Timeout, Unavailable, ...
            raise
        finally:
            self._report(method, path, outcome, len(body), received,
                         time.perf_counter() - started)

    def _report(self, method: str, path: str, outcome: str, sent: int, received: int,
                seconds: float) -> None:
        try:
            self._observe(method, endpoint_of(path), outcome, sent, received, seconds)
        except Exception:  # noqa: BLE001 - counting must never fail a request
            pass

    def _signed_call(self, member: Member, method: str, path: str, body, headers, ok, timeout,
                     body_digest) -> Reply:
        """`_call`; a BLAKE3 request that fails authentication is sent once more with
        SHA-256 (the server at this URL may have been replaced by one without BLAKE3:
        `_learn_digests` has forgotten it by then)."""
        algorithm = protocol.SHA256
        if self.config.secret is not None:
            algorithm = protocol.digest_algorithm(body_digest) if body_digest else \
                self._algorithm(member)
        try:
            return self._call(member, method, path, body, headers, ok, timeout, body_digest,
                              algorithm)
        except errors.AuthenticationFailed:
            if algorithm != protocol.BLAKE3:
                raise
        return self._call(member, method, path, body, headers, ok, timeout, None,
                          protocol.SHA256)

    def _call(self, member: Member, method: str, path: str, body, headers, ok, timeout,
              body_digest, algorithm: str) -> Reply:
        sent = dict(headers or {})
        nonce = None
        if self.config.secret is not None:
            server_id = self._server_id(member, path)
            body_digest = body_digest or protocol.content_digest(body, algorithm=algorithm)
            signed = protocol.sign_request(
                self.config.secret, method, path, body_digest,
                server_id=server_id, role=self.config.role, headers=sent)
            nonce = signed[protocol.H_NONCE]
            sent.update(signed)
        slot = self._slot(member.url)
        # As long as an answer may take: a server whose every connection waits that long
        # for one is as good as one that does not answer.
        if not slot.acquire(timeout=timeout or self.config.read_timeout):
            raise errors.Timeout(f"{member.url}: no answer in time ({self.config.pool_size} "
                                 "requests to it still wait for theirs)", server=member.url)
        try:
            status, reply_headers, content = self._send(member, method, path, body, sent,
                                                        timeout)
        finally:
            slot.release()
        served_by = reply_headers.get(protocol.H_SERVER_ID)
        if member.id and served_by != member.id and (served_by or nonce is not None):
            raise wrong_server(member.url, served_by, member.id)
        if nonce is not None:
            self._check_answer(member, status, reply_headers, content, nonce, served_by,
                               algorithm)
            if status == protocol.UNAUTHENTICATED and not member.id:
                with self._lock:  # the URL may now lead to another server: ask again
                    self._ids.pop(member.url, None)
        if status not in ok:
            raise self._status_error(member, method, path, status, content)
        return Reply(status, reply_headers, content)

    def _check_answer(self, member: Member, status: int, headers, content: bytes,
                      nonce: str, served_by, algorithm: str) -> None:
        """The answer must be signed by a server holding our key, for our request (its body
        digest taken with the request's `algorithm`)."""
        given = headers.get(protocol.H_RESPONSE_SIGNATURE, "")
        expected = protocol.response_signature(
            self.config.secret, status, nonce, served_by or "",
            protocol.content_digest(content, algorithm=algorithm),
            {n: headers.get(n, "") for n in protocol.SIGNED_RESPONSE_HEADERS})
        authentic = bool(served_by and hmac.compare_digest(
            given.encode("latin-1", "replace"), expected.encode()))
        self._learn_digests(member, headers, algorithm,
                            authentic and status != protocol.UNAUTHENTICATED)
        if not authentic:
            if status in protocol.UNSIGNED_REFUSALS:
                return  # refused before the signature was checked; _status_error explains
            raise errors.AuthenticationFailed(
                f"{member.url}: the answer ({status}) is not signed with this cluster's key: "
                "a server with another secret, or something between us changing answers; "
                "check the server list, the secret and use TLS", server=member.url)
        if not member.id:
            with self._lock:
                self._ids[member.url] = served_by

    def _send(self, member: Member, method: str, path: str, body, sent: dict,
              timeout: float | None):
        request = requests.PreparedRequest()
        request.method = method
        request.url = member.url + path  # a checked member URL and our own ASCII path
        request.prepare_headers(sent)
        request.prepare_body(body if body else None, None)
        try:
            r = self._adapter.send(
                request, stream=True, verify=self.config.tls_verify,
                timeout=(self.config.connect_timeout, timeout or self.config.read_timeout))
            # One read of the whole body: r.content would read it in 10 KiB pieces, which
            # doubled the client's CPU per MiB received. A short body raises (urllib3
            # enforces Content-Length), and the connection returns to the pool at its end.
            content = r.raw.read(decode_content=False) if method != "HEAD" else b""
        except Exception as e:  # noqa: BLE001 - translated by the table, never leaked
            raise _translate(e, member.url) from e
        return r.status_code, r.headers, content

    @staticmethod
    def _status_error(member: Member, method: str, path: str, status: int,
                      content: bytes) -> errors.StorageError:
        try:
            message = json.loads(content).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        what = f"{member.url}: {method} {path[:60]} answered {status}"
        if status == protocol.UNAUTHENTICATED:
            message = (message or "refused") + "; check that client and servers use the same " \
                                               "--secret-file"
        cls = _STATUSES.get(status) or (errors.Unavailable if status >= 500 else errors.Rejected)
        return cls(f"{what}: {message}" if message else what, server=member.url)

    # -- the block server API, one method per endpoint --------------------------------------

    def status(self, member: Member, timeout: float | None = None) -> dict:
        return self.call(member, "GET", protocol.STATUS, timeout=timeout).json()

    def put_block(self, member: Member, block_id: str, data: bytes, checksum: str,
                  metadata: bool = False) -> bool:
        """True if the server created it, False if it already had it. `metadata`: a
        journal segment, which may use the space servers keep back from file data."""
        digest = None
        if self.config.secret is not None:
            digest = self._digest(("block", block_id, checksum, len(data)), (data,),
                                  self._algorithm(member))
        reply = self.call(member, "PUT", protocol.block_path(block_id, metadata), data,
                          headers={protocol.H_CHECKSUM: checksum},
                          ok=protocol.PUT_OK, body_digest=digest)
        return reply.status == protocol.STORED

    def get_block(self, member: Member, block_id: str, timeout: float | None = None) -> bytes:
        return self.call(member, "GET", protocol.block_path(block_id), timeout=timeout).content

    def delete_block(self, member: Member, block_id: str) -> None:
        self.call(member, "DELETE", protocol.block_path(block_id), ok=(protocol.DONE,))

    def batch_put(self, member: Member, items) -> list[int]:
        """Store (id, data, checksum) items in one request; the status of each item."""
        manifest = {"blocks": [{"id": i, "checksum": c, "size": len(d)} for i, d, c in items]}
        parts = protocol.encode_batch(manifest, [d for _, d, _ in items])
        body = b"".join(parts)
        digest = None
        if self.config.secret is not None:
            digest = self._digest(("batch", parts[0]), (body,),  # the manifest names it all
                                  self._algorithm(member))
        results = self.call(member, "POST", protocol.BATCH_PUT, body,
                            body_digest=digest).json()["results"]
        return [r["status"] for r in results]

    def batch_get(self, member: Member, ids: list[str],
                  timeout: float | None = None) -> dict[str, bytes | int]:
        """id -> bytes for blocks returned, or id -> status (404, 410, 413) for the rest."""
        body = b"".join(protocol.encode_batch({"ids": ids}))
        reply = self.call(member, "POST", protocol.BATCH_GET, body, timeout=timeout)
        manifest, payload = protocol.decode_batch(reply.content)
        found: dict[str, bytes | int] = {}
        offset = 0
        for entry in manifest["blocks"]:
            if entry["status"] == protocol.OK:
                found[entry["id"]] = bytes(payload[offset:offset + entry["size"]])
                offset += entry["size"]
            else:
                found[entry["id"]] = entry["status"]
        return found

    def batch_check(self, member: Member, ids: list[str], verify: bool = False) -> list[dict]:
        body = b"".join(protocol.encode_batch({"ids": ids, "verify": verify}))
        return self.call(member, "POST", protocol.BATCH_CHECK, body).json()["blocks"]

    def batch_delete(self, member: Member, ids: list[str]) -> int:
        body = b"".join(protocol.encode_batch({"ids": ids}))
        return self.call(member, "POST", protocol.BATCH_DELETE, body).json()["deleted"]

    def list_blocks(self, member: Member, after: str = "",
                    limit: int = protocol.DEFAULT_LIST_LIMIT):
        """([{id, size, checksum}], next id or None)."""
        page = self.call(member, "GET", protocol.listing_path(after, limit)).json()
        return page["blocks"], page["next"]

    def register_get(self, member: Member, name: str) -> tuple[int, bytes] | None:
        """(generation, value), or None when the register does not exist there."""
        try:
            reply = self.call(member, "GET", protocol.register_path(name))
        except errors.BlockMissing:
            return None
        return int(reply.headers[protocol.H_GENERATION]), reply.content

    def register_put(self, member: Member, name: str, generation: int, value: bytes,
                     expect: int | None = None) -> None:
        """Raises Conflict (with `.current`, the generation the server holds) when the
        server holds this generation or a newer one, or not the expected one."""
        headers = {protocol.H_GENERATION: str(generation)}
        if expect is not None:
            headers[protocol.H_EXPECT_GENERATION] = str(expect)
        reply = self.call(member, "PUT", protocol.register_path(name), value, headers=headers,
                          ok=(protocol.DONE, protocol.CONFLICT))
        if reply.status == protocol.CONFLICT:
            conflict = errors.Conflict(f"{member.url}: register {name} is not at generation "
                                       f"{expect if expect is not None else '< ' + str(generation)}",
                                       server=member.url)
            conflict.current = int(reply.headers.get(protocol.H_GENERATION, "0"))
            raise conflict
