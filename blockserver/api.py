"""The block server's HTTP API (contract: docs/blockserver-api.md, in code
`blockserver.protocol`, whose paths, headers and statuses the router and handlers use).

`Api` turns requests into store calls and store errors into statuses. Checks happen in
the cheapest order: route and identifiers, then the size limit, then the signature over
the headers; only then is a body read, so unauthenticated or oversized requests never
cost the server their body.
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import ssl
import threading
import time
from dataclasses import dataclass

from . import __version__, protocol
from .http11 import HttpError, Request, Response
from .metrics import Metrics
from .protocol import (BATCH_CHECK, BATCH_DELETE, BATCH_GET, BATCH_PUT, BLOCKS, METRICS,
                       REGISTERS, STATUS)
from .replay import DEFAULT_CAPACITY, NonceBook
from .store import (MAX_REGISTER_SIZE, BlockStore, ChecksumMismatch, Conflict, Corrupt,
                    NotFound, StaleGeneration, StoreError, StoreFull)

log = logging.getLogger("blockserver.api")

# store error -> (status, code). One table, used for single and batched operations.
_STORE_ERRORS = {
    NotFound: (protocol.MISSING, "not_found"),
    Corrupt: (protocol.CORRUPT, "corrupt"),
    Conflict: (protocol.CONFLICT, "conflict"),
    ChecksumMismatch: (protocol.CHECKSUM_MISMATCH, "checksum_mismatch"),
    StoreFull: (protocol.FULL, "full"),
    StaleGeneration: (protocol.CONFLICT, "stale_generation"),
}
_LOGGED_CLIENT_ERRORS = {400, 401, 403, 405, 411, 413, 414, 422, 431, 501, 505}
_FIXED_ROUTES = {STATUS, METRICS, BLOCKS, BATCH_PUT, BATCH_GET, BATCH_CHECK, BATCH_DELETE}
_READ_ROUTES = {("GET", STATUS), ("GET", BLOCKS), ("POST", BATCH_GET),
                ("POST", BATCH_CHECK)}  # what the read-only key may sign


def _store_status(error: StoreError) -> tuple[int, str]:
    return _STORE_ERRORS[type(error)]


@dataclass(frozen=True)
class ApiConfig:
    """The limits and options of the HTTP API: block and batch sizes, the cluster secret
    (None: no signatures), metrics without a signature, an access log, nonces kept."""

    max_block_size: int = 16 << 20
    max_batch_bytes: int = 64 << 20
    secret: bytes | None = None
    public_metrics: bool = False
    access_log: bool = False
    max_nonces: int = DEFAULT_CAPACITY


class DigestMemo:
    """The digest (content_digest, per algorithm) of recently stored or served blocks, by
    (id, checksum), so that the signature of a block's GET does not hash its bytes again
    (0.6 ms per MiB with SHA-256).

    Sound because a stored block never changes bytes (docs/blockserver-store.md): the GET
    checks the bytes it read against their xxh3 checksum, and the digest was taken of the
    bytes that checksum was taken of. The checksum is part of the key, and a deleted id is
    forgotten (an id may be stored again after a delete, with other bytes). Bounded (the
    least recently used go first); lost at restart, which only costs a hash again."""

    def __init__(self, limit: int = 65536):
        self.limit = limit
        self._lock = threading.Lock()
        self._digests: collections.OrderedDict[tuple[str, str], tuple[str, str]] = \
            collections.OrderedDict()  # (block id, algorithm) -> (checksum, digest)

    def get(self, block_id: str, checksum: str, algorithm: str) -> str | None:
        key = (block_id, algorithm)
        with self._lock:
            entry = self._digests.get(key)
            if entry is None or entry[0] != checksum:
                return None
            self._digests.move_to_end(key)
            return entry[1]

    def put(self, block_id: str, checksum: str, algorithm: str, digest: str) -> None:
        key = (block_id, algorithm)
        with self._lock:
            self._digests[key] = (checksum, digest)
            self._digests.move_to_end(key)
            while len(self._digests) > self.limit:
                self._digests.popitem(last=False)

    def forget(self, block_ids) -> None:
        with self._lock:
            for block_id in block_ids:
                for algorithm in protocol.SUPPORTED_DIGESTS:
                    self._digests.pop((block_id, algorithm), None)


class Api:
    """The server's answers: routes a request by the contract's paths, checks identifiers,
    size and signature in that order, calls the store, and signs what it answers."""

    def __init__(self, store: BlockStore, config: ApiConfig, metrics: Metrics):
        self.store = store
        self.config = config
        self.metrics = metrics
        self.started = time.time()
        self.open_connections = lambda: 0  # set by the composition root once serving
        self._keys = None if config.secret is None else protocol.role_keys(config.secret)
        self.nonces = NonceBook(store.root if config.secret is not None else None,
                                config.max_nonces)
        self._routes = {  # endpoints without an item name, by (method, path)
            ("GET", STATUS): self._status,
            # Undocumented (only METRICS is), and with the write key's signature: kept so
            # that this refactor changes no answer.
            ("GET", protocol.API_PREFIX + METRICS): self._metrics,
            ("GET", BLOCKS): self._list,
            ("POST", BATCH_PUT): self._batch_put,
            ("POST", BATCH_GET): self._batch_get,
            ("POST", BATCH_CHECK): self._batch_check,
            ("POST", BATCH_DELETE): self._batch_delete,
        }
        self._block_methods = {"GET": self._get, "HEAD": self._head, "PUT": self._put,
                               "DELETE": self._delete}
        self.digests = DigestMemo()  # of block bodies, for GET's signature

    # -- entry points used by http11.Server ---------------------------------------------

    def handle(self, req: Request) -> Response:
        response = self._answer(req)
        self.sign_response(req, response)
        return response

    def _answer(self, req: Request) -> Response:
        try:
            return self._dispatch(req)
        except HttpError as e:
            return self.error_response(e)
        except StoreError as e:
            status, code = _store_status(e)
            return self.error_response(HttpError(status, code, str(e)))
        except (ConnectionError, ssl.SSLError):
            raise  # the client's connection failed (e.g. mid-body): not a storage error
        except OSError as e:
            log.error("%s %s failed on the data directory: %s", req.method, req.path, e)
            return self.error_response(HttpError(500, "io_error", f"storage error: {e}"))
        except Exception as e:  # noqa: BLE001 - a bug must cost one answer, not the connection
            log.exception("%s %s failed unexpectedly: %s", req.method, req.path[:100], e)
            return self.error_response(HttpError(500, "internal_error",
                                                 f"internal error ({type(e).__name__}); "
                                                 "see the server log"))

    def error_response(self, e: HttpError) -> Response:
        body = json.dumps({"error": e.code, "message": e.message, **e.extra}).encode()
        headers = {"Content-Type": "application/json"}
        if e.status == 401:
            headers["WWW-Authenticate"] = protocol.AUTH_SCHEME
        if e.status == 503:
            headers["Retry-After"] = "1"
        if "current" in e.extra:
            headers[protocol.H_GENERATION] = str(e.extra["current"])
        return Response(e.status, [body], headers)

    def record(self, method: str, path: str, response: Response, bytes_in: int,
               bytes_out: int, started: float) -> None:
        elapsed = time.monotonic() - started
        route = _route_label(path)
        self.metrics.observe(method, route, response.status, bytes_in, bytes_out, elapsed)
        if response.status in _LOGGED_CLIENT_ERRORS:
            log.warning("refused %s %s: %d %s", method, path[:100], response.status,
                        _message_of(response))
        elif self.config.access_log:
            log.info("%s %s %d in=%d out=%d %.1fms", method, path[:100], response.status,
                     bytes_in, bytes_out, elapsed * 1000)

    # -- routing ----------------------------------------------------------------------------

    def _dispatch(self, req: Request) -> Response:
        if req.path == METRICS and req.method == "GET":
            if not self.config.public_metrics:
                self._authenticate(req, read_only=True)
            return self._metrics(req)
        if not req.path.startswith(protocol.API_PREFIX + "/"):
            raise HttpError(404, "no_route", f"no such endpoint {req.path[:100]!r}")
        collection, name = protocol.split_item(req.path)
        if collection == BLOCKS and name:
            handler = self._block_methods.get(req.method)
            if handler is None:
                raise HttpError(405, "bad_method", f"{req.method} is not allowed on a block")
            if not protocol.is_block_id(name):
                raise HttpError(400, "bad_id", "a block id is 32 lowercase hexadecimal digits")
            self._authenticate(req, read_only=req.method in ("GET", "HEAD"))
            return handler(req, name)
        if collection == REGISTERS and name:
            if not protocol.is_register_name(name):
                raise HttpError(400, "bad_name",
                                f"a register name is {protocol.REGISTER_NAME_RULE}")
            if req.method not in ("GET", "PUT"):
                raise HttpError(405, "bad_method", f"{req.method} is not allowed on a register")
            self._authenticate(req, read_only=req.method == "GET")
            return self._register_get(req, name) if req.method == "GET" else \
                self._register_put(req, name)
        handler = self._routes.get((req.method, req.path))
        if handler is None:
            raise HttpError(404, "no_route", f"no such endpoint {req.method} {req.path[:100]!r}")
        self._authenticate(req, read_only=(req.method, req.path) in _READ_ROUTES)
        return handler(req)

    # -- authentication ---------------------------------------------------------------------

    def _authenticate(self, req: Request, read_only: bool) -> None:
        """Check the signature over the head; the body digest is checked when it is read.

        `read_only`: the request changes nothing, so the read-only key may sign it."""
        if self._keys is None:
            req.conn.authenticated = True
            return
        h = req.headers
        scheme, _, sig = h.get(protocol.H_AUTHORIZATION.lower(), "").partition(" ")
        date, nonce, content_hash = (h.get(protocol.H_DATE.lower(), ""),
                                     h.get(protocol.H_NONCE.lower(), ""),
                                     h.get(protocol.H_CONTENT_HASH.lower(), ""))
        if scheme != protocol.AUTH_SCHEME or not (date and nonce and content_hash):
            raise _unauthenticated("unauthenticated", "request is not signed; this server "
                                   "needs the cluster secret (--secret-file)")
        self._check_date(date)
        role = h.get(protocol.H_ROLE.lower(), protocol.ROLE_WRITE)
        key = self._keys.get(role)
        if key is None:
            raise _unauthenticated("bad_role", f"unknown signing role {role[:20]!r}")
        for_server = self._check_target_server(req, h.get(protocol.H_FOR_SERVER.lower(), ""))
        expected = protocol.signature(key, req.method, req.target, date, nonce, content_hash,
                                      for_server, role, h)
        if not hmac.compare_digest(sig.encode("latin-1"), expected.encode()):
            raise _unauthenticated("bad_signature",
                                   "signature does not match: the client uses a different secret")
        algorithm = protocol.digest_algorithm(content_hash)
        if algorithm is None:
            raise _unauthenticated("bad_signature", "the content hash is taken with a digest "
                                   "this server does not have; it takes "
                                   f"{', '.join(protocol.SUPPORTED_DIGESTS)}")
        self.nonces.remember(nonce, int(date))
        req.signed_hash, req.auth_key, req.nonce = content_hash, key, nonce
        req.digest_algorithm = algorithm  # the answer's body is signed with the same
        req.conn.authenticated = True
        if role != protocol.ROLE_WRITE and not read_only:
            raise HttpError(protocol.READ_ONLY, "read_only", "this client holds the read-only "
                            "key: it may read but not write or delete; use the cluster "
                            "secret to write")

    def _check_date(self, date: str) -> None:
        if not protocol.is_number(date) or \
                abs(time.time() - int(date)) > protocol.SIGNATURE_MAX_SKEW:
            raise _unauthenticated("stale_signature", "signature date is more than "
                                   f"{protocol.SIGNATURE_MAX_SKEW}s from the server's clock; "
                                   "check both clocks")
        if int(date) < self.nonces.floor:
            raise _unauthenticated("stale_signature", "signature is dated before this server "
                                   "started: a request from before a restart is not taken again")

    def _check_target_server(self, req: Request, for_server: str) -> str:
        """The server id the request was signed for: ours; or none for a status query (how a
        client learns an id: the signed answer names it)."""
        if for_server == self.store.server_id or (for_server == "" and
                                                  req.path == STATUS):
            return for_server
        raise _unauthenticated("wrong_server", f"request was signed for server "
                               f"{for_server[:40]!r}, this is server {self.store.server_id}")

    def sign_response(self, req: Request, response: Response) -> None:
        """Add the response signature when the request was authenticated (see
        docs/blockserver-api.md): the client then knows this server answered this request."""
        if req.auth_key is None:
            return
        headers = dict(response.headers)
        if response.status != 204:
            headers["Content-Length"] = str(response.body_size if response.length is None
                                            else response.length)
        response.headers[protocol.H_RESPONSE_SIGNATURE] = protocol.response_signature(
            req.auth_key, response.status, req.nonce, self.store.server_id,
            response.digest or protocol.content_digest(*response.body,
                                                       algorithm=req.digest_algorithm),
            headers)

    def _body(self, req: Request, limit: int) -> bytearray:
        """The body, checked against the signed digest, with the algorithm the request named
        (the block checksum, xxh3, is the store's to check: it guards against accidents, not
        against forgers)."""
        if req.content_length > limit:
            raise HttpError(protocol.TOO_LARGE, "too_large",
                            f"body of {req.content_length} bytes exceeds the limit of {limit}")
        body = req.read_body()
        if req.signed_hash is not None and protocol.content_digest(
                body, algorithm=req.digest_algorithm) != req.signed_hash:
            raise _unauthenticated("bad_signature",
                                   "body does not match the signed content hash")
        return body

    # -- blocks -----------------------------------------------------------------------------

    def _put(self, req: Request, block_id: str) -> Response:
        expected = req.headers.get(protocol.H_CHECKSUM.lower(), "")
        if not protocol.is_checksum(expected):
            raise HttpError(400, "bad_checksum",
                            f"{protocol.H_CHECKSUM} must be the block's xxh3-128 as 32 hex digits")
        body = self._body(req, self.config.max_block_size)
        # ?use=metadata: a journal segment or checkpoint may take the reserved space, so a
        # client whose data filled the disk can still record the removals that free it.
        # The query is part of the signed target.
        use = _one(req, protocol.Q_USE, protocol.USE_DATA)
        created = self.store.put(block_id, body, expected,
                                 use_reserve=use == protocol.USE_METADATA)
        if req.signed_hash is not None and created:  # _body checked it is the body's
            self.digests.put(block_id, expected, req.digest_algorithm, req.signed_hash)
        status = protocol.STORED if created else protocol.ALREADY_STORED
        return Response(status, headers={protocol.H_CHECKSUM: expected})

    def _get(self, req: Request, block_id: str) -> Response:
        data, checksum = self.store.get(block_id)  # verified against its checksum
        digest = None
        if req.auth_key is not None:  # a signed answer: its body's digest, once per block
            digest = self.digests.get(block_id, checksum, req.digest_algorithm)
            if digest is None:
                digest = protocol.content_digest(data, algorithm=req.digest_algorithm)
                self.digests.put(block_id, checksum, req.digest_algorithm, digest)
        return Response(200, [data], {protocol.H_CHECKSUM: checksum,
                                      "Content-Type": "application/octet-stream"},
                        digest=digest)

    def _head(self, req: Request, block_id: str) -> Response:
        size, digest = self.store.head(block_id)
        return Response(200, headers={protocol.H_CHECKSUM: digest}, length=size)

    def _delete(self, req: Request, block_id: str) -> Response:
        self.digests.forget([block_id])
        self.store.delete(block_id)
        return Response(protocol.DONE)

    def _list(self, req: Request) -> Response:
        after = _one(req, protocol.Q_AFTER, "")
        if after and not protocol.is_block_id(after):
            raise HttpError(400, "bad_id", "`after` must be a block id")
        limit = _one(req, protocol.Q_LIMIT, str(protocol.DEFAULT_LIST_LIMIT))
        if not protocol.is_number(limit) or not 1 <= int(limit) <= protocol.MAX_LIST_LIMIT:
            raise HttpError(400, "bad_limit", f"`limit` must be 1..{protocol.MAX_LIST_LIMIT}")
        blocks, next_after = self.store.list(after, int(limit))
        return _json(200, {"blocks": blocks, "next": next_after})

    # -- batches ----------------------------------------------------------------------------

    def _manifest(self, req: Request, key: str) -> tuple[list, memoryview, dict]:
        body = self._body(req, self.config.max_batch_bytes)
        try:
            manifest, payload = protocol.decode_batch(body)
        except protocol.BatchFormatError as e:
            raise HttpError(400, "bad_batch", str(e)) from None
        except RecursionError:
            raise HttpError(400, "bad_batch", "batch manifest is nested too deeply") from None
        items = manifest.get(key)
        if not isinstance(items, list) or len(items) > protocol.MAX_BATCH_ITEMS:
            raise HttpError(400, "bad_batch", f"manifest needs a list `{key}` of at most "
                            f"{protocol.MAX_BATCH_ITEMS} entries")
        return items, payload, manifest

    def _batch_ids(self, req: Request) -> tuple[list[str], dict]:
        ids, _, manifest = self._manifest(req, "ids")
        if not all(isinstance(i, str) and protocol.is_block_id(i) for i in ids):
            raise HttpError(400, "bad_id", "every id must be 32 lowercase hexadecimal digits")
        return list(dict.fromkeys(ids)), manifest  # each id once: duplicates cost nothing

    def _batch_put(self, req: Request) -> Response:
        blocks, payload, _ = self._manifest(req, "blocks")
        items, offset = [], 0
        for b in blocks:
            ok = (isinstance(b, dict) and isinstance(b.get("id"), str)
                  and protocol.is_block_id(b["id"]) and isinstance(b.get("checksum"), str)
                  and protocol.is_checksum(b["checksum"]) and isinstance(b.get("size"), int)
                  and 0 <= b["size"] <= self.config.max_block_size)
            if not ok:
                raise HttpError(400, "bad_batch", "each block needs `id`, `checksum` and "
                                f"`size` (0..{self.config.max_block_size})")
            items.append((b["id"], payload[offset:offset + b["size"]], b["checksum"]))
            offset += b["size"]
        if offset != len(payload):
            raise HttpError(400, "bad_batch", f"manifest sizes add up to {offset} bytes but "
                            f"{len(payload)} bytes of blocks follow")
        results = []
        for (block_id, _, _), outcome in zip(items, self.store.put_many(items)):
            if outcome.error is None:
                status = protocol.STORED if outcome.value else protocol.ALREADY_STORED
                results.append({"id": block_id, "status": status})
            else:
                status, code = _store_status(outcome.error)
                results.append({"id": block_id, "status": status, "error": code})
        return _json(200, {"results": results})

    def _batch_get(self, req: Request) -> Response:
        ids, _ = self._batch_ids(req)
        entries, payloads, total = [], [], 0
        for block_id in ids:
            if total >= self.config.max_batch_bytes:  # read no more than one answer holds
                entries.append({"id": block_id, "status": protocol.TOO_LARGE,
                                "error": "batch_full"})
                continue
            try:
                data, digest = self.store.get(block_id)
            except (NotFound, Corrupt) as e:
                status, code = _store_status(e)
                entries.append({"id": block_id, "status": status, "error": code})
                continue
            if total + len(data) > self.config.max_batch_bytes:
                entries.append({"id": block_id, "status": protocol.TOO_LARGE,
                                "error": "batch_full"})
                total = self.config.max_batch_bytes
                continue
            total += len(data)
            entries.append({"id": block_id, "status": 200, "size": len(data),
                            "checksum": digest})
            payloads.append(data)
        return Response(200, protocol.encode_batch({"blocks": entries}, payloads),
                        {"Content-Type": "application/x-fusefs-batch"})

    def _batch_check(self, req: Request) -> Response:
        ids, manifest = self._batch_ids(req)
        verify = manifest.get("verify") is True
        entries, budget = [], self.config.max_batch_bytes
        for block_id in ids:
            if verify and budget <= 0:  # bytes read per request are bounded: ask again
                entries.append({"id": block_id, "status": protocol.TOO_LARGE,
                                "error": "batch_full"})
                continue
            try:
                size, digest = self.store.check(block_id, verify)
                budget -= size if verify else 0
            except (NotFound, Corrupt) as e:
                status, code = _store_status(e)
                entries.append({"id": block_id, "status": status, "error": code})
                continue
            entries.append({"id": block_id, "status": 200, "size": size, "checksum": digest})
        return _json(200, {"blocks": entries})

    def _batch_delete(self, req: Request) -> Response:
        ids, _ = self._batch_ids(req)
        self.digests.forget(ids)
        deleted = self.store.delete_many(ids)
        return _json(200, {"deleted": deleted})

    # -- registers --------------------------------------------------------------------------

    def _register_get(self, req: Request, name: str) -> Response:
        generation, value = self.store.register_get(name)
        return Response(200, [value], {protocol.H_GENERATION: str(generation),
                                       "Content-Type": "application/octet-stream"})

    def _register_put(self, req: Request, name: str) -> Response:
        generation = req.headers.get(protocol.H_GENERATION.lower(), "")
        expect = req.headers.get(protocol.H_EXPECT_GENERATION.lower())
        if not protocol.is_generation(generation) or int(generation) < 1 or (
                expect is not None and not protocol.is_generation(expect)):
            raise HttpError(400, "bad_generation", f"{protocol.H_GENERATION} (and "
                            f"{protocol.H_EXPECT_GENERATION}) must be whole numbers from 1 "
                            f"to {protocol.MAX_GENERATION}")
        value = bytes(self._body(req, MAX_REGISTER_SIZE))
        try:
            self.store.register_put(name, int(generation), value,
                                    None if expect is None else int(expect))
        except StaleGeneration as e:
            raise HttpError(protocol.CONFLICT, "stale_generation", f"register {name} is at "
                            f"generation {e.current}; read it and write a newer one",
                            current=e.current)
        return Response(protocol.DONE)

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict:
        s = self.store
        return {
            "server_id": s.server_id,
            "version": __version__,
            "capacity_bytes": s.capacity_bytes(),
            "disk": s.disk_id(),
            "used_bytes": s.used_bytes,
            "free_bytes": max(0, s.free_bytes() - s.reserve_bytes),
            "block_count": s.block_count,
            "corrupt_blocks_found": s.corrupt_found,
            "spare_files": s.spare_count,
            "uptime_seconds": round(time.time() - self.started, 3),
            "max_block_size": self.config.max_block_size,
            "max_batch_bytes": self.config.max_batch_bytes,
            "authentication": self.config.secret is not None,
            # where a client on this host finds our block files (protocol.files)
            "local": {"root": s.root, "token": s.local_token} if s.local_token else None,
        }

    def _status(self, req: Request) -> Response:
        return _json(200, self.status())

    def _metrics(self, req: Request) -> Response:
        s = self.store
        text = self.metrics.render({
            "blockserver_blocks": ("Blocks stored.", s.block_count),
            "blockserver_block_bytes": ("Bytes of block data stored.", s.used_bytes),
            "blockserver_free_bytes": ("Free bytes on the data disk.", s.free_bytes()),
            "blockserver_corrupt_blocks_found_total":
                ("Stored copies that failed verification and were quarantined.",
                 s.corrupt_found),
            "blockserver_open_connections": ("Connections open now.", self.open_connections()),
            "blockserver_spare_files": ("Empty files of deleted blocks kept for new ones.",
                                        s.spare_count),
        })
        return Response(200, [text.encode()], {"Content-Type": "text/plain; version=0.0.4"})


def _json(status: int, obj) -> Response:
    return Response(status, [json.dumps(obj, separators=(",", ":")).encode()],
                    {"Content-Type": "application/json"})


def _unauthenticated(code: str, message: str) -> HttpError:
    return HttpError(protocol.UNAUTHENTICATED, code, message)


def _one(req: Request, key: str, default: str) -> str:
    values = req.query.get(key)
    return values[-1] if values else default


def _route_label(path: str) -> str:
    """A bounded label for metrics: ids and names replaced by placeholders."""
    if path.startswith(BLOCKS + "/"):
        return BLOCKS + "/{id}"
    if path.startswith(REGISTERS + "/"):
        return REGISTERS + "/{name}"
    return path if path in _FIXED_ROUTES else "other"


def _message_of(response: Response) -> str:
    try:
        return json.loads(b"".join(response.body)).get("message", "")
    except ValueError:
        return ""
