"""HTTP to block servers. The only module of fusefs that imports `requests`.

One `requests` HTTPAdapter per thread, each with a connection pool per server sized for
the flusher's threads. Requests go straight to the adapter: a Session's cookies, redirects,
hooks, environment and URL normalization cost about half of the client's CPU per small
request here and none of them applies (our own URLs, no proxies, no redirects).
Connect and read timeouts on every call;
every request signed with the cluster secret when there is one; TLS verified against the
system store or a CA file. Every failure leaves this module as one of the project's own
`fusefs.errors` exceptions, translated by the two tables below; a response from a server
whose stable id is not the one expected is refused (`WrongServer`).
"""

from __future__ import annotations

import http.client
import json
import threading
from dataclasses import dataclass

import requests
import requests.adapters
import urllib3.exceptions

from blockserver import protocol

from . import errors


@dataclass(frozen=True)
class TransportConfig:
    connect_timeout: float = 2.0
    read_timeout: float = 10.0
    secret: bytes | None = None
    tls_verify: bool | str = True  # True: system CAs; a path: that CA bundle
    pool_size: int = 32  # connections kept per server per thread


@dataclass(frozen=True)
class Member:
    """One block server of a cluster: its stable id (from /v1/status) and its URL."""

    id: str
    url: str


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

# HTTP status -> our exception. Statuses not listed: 5xx are Unavailable, 4xx Rejected.
_STATUSES = {
    401: errors.AuthenticationFailed,
    404: errors.BlockMissing,
    409: errors.Conflict,
    410: errors.BlockCorrupt,
    422: errors.BlockCorrupt,  # the bytes the server received do not match their checksum
    507: errors.StorageFull,
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
    __slots__ = ("status", "headers", "content")

    def __init__(self, status: int, headers, content: bytes):
        self.status, self.headers, self.content = status, headers, content

    def json(self):
        return json.loads(self.content)


class Transport:
    """Signed HTTP calls to block servers, with the project's exceptions and timeouts."""

    def __init__(self, config: TransportConfig):
        self.config = config
        self._local = threading.local()

    def _adapter(self) -> requests.adapters.HTTPAdapter:
        adapter = getattr(self._local, "adapter", None)
        if adapter is None:
            adapter = requests.adapters.HTTPAdapter(pool_connections=16,
                                                    pool_maxsize=self.config.pool_size,
                                                    max_retries=0)
            self._local.adapter = adapter
        return adapter

    def call(self, member: Member, method: str, path: str, body=b"", *, headers=None,
             ok=(200,), timeout: float | None = None, body_checksum: str | None = None) -> Reply:
        """One request to one server. Raises a StorageError for any status not in `ok`.

        `body_checksum`, when the caller already has it (a block's own checksum), saves
        hashing the body once more for the signature."""
        sent = dict(headers or {})
        if self.config.secret is not None:
            sent.update(protocol.sign_request(self.config.secret, method, path,
                                              body_checksum or protocol.checksum(body)))
        request = requests.PreparedRequest()
        request.method = method
        request.url = member.url + path  # a checked member URL and our own ASCII path
        request.prepare_headers(sent)
        request.prepare_body(body if body else None, None)
        try:
            r = self._adapter().send(
                request, stream=True, verify=self.config.tls_verify,
                timeout=(self.config.connect_timeout, timeout or self.config.read_timeout))
            # One read of the whole body: r.content would read it in 10 KiB pieces, which
            # doubled the client's CPU per MiB received. A short body raises (urllib3
            # enforces Content-Length), and the connection returns to the pool at its end.
            content = r.raw.read(decode_content=False) if method != "HEAD" else b""
        except Exception as e:  # noqa: BLE001 - translated by the table, never leaked
            raise _translate(e, member.url) from e
        served_by = r.headers.get(protocol.H_SERVER_ID)
        if member.id and served_by and served_by != member.id:
            raise wrong_server(member.url, served_by, member.id)
        if r.status_code not in ok:
            raise self._status_error(member, method, path, r.status_code, content)
        return Reply(r.status_code, r.headers, content)

    @staticmethod
    def _status_error(member: Member, method: str, path: str, status: int,
                      content: bytes) -> errors.StorageError:
        try:
            message = json.loads(content).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        what = f"{member.url}: {method} {path[:60]} answered {status}"
        if status == 401:
            message = (message or "refused") + "; check that client and servers use the same " \
                                               "--secret-file"
        cls = _STATUSES.get(status) or (errors.Unavailable if status >= 500 else errors.Rejected)
        return cls(f"{what}: {message}" if message else what, server=member.url)

    # -- the block server API, one method per endpoint --------------------------------------

    def status(self, member: Member, timeout: float | None = None) -> dict:
        return self.call(member, "GET", "/v1/status", timeout=timeout).json()

    def put_block(self, member: Member, block_id: str, data: bytes, checksum: str) -> bool:
        """True if the server created it, False if it already had it."""
        reply = self.call(member, "PUT", f"/v1/blocks/{block_id}", data,
                          headers={protocol.H_CHECKSUM: checksum}, ok=(200, 201),
                          body_checksum=checksum)
        return reply.status == 201

    def get_block(self, member: Member, block_id: str, timeout: float | None = None) -> bytes:
        return self.call(member, "GET", f"/v1/blocks/{block_id}", timeout=timeout).content

    def delete_block(self, member: Member, block_id: str) -> None:
        self.call(member, "DELETE", f"/v1/blocks/{block_id}", ok=(204,))

    def batch_put(self, member: Member, items) -> list[int]:
        """Store (id, data, checksum) items in one request; the status of each item."""
        manifest = {"blocks": [{"id": i, "checksum": c, "size": len(d)} for i, d, c in items]}
        body = b"".join(protocol.encode_batch(manifest, [d for _, d, _ in items]))
        results = self.call(member, "POST", "/v1/batch/put", body).json()["results"]
        return [r["status"] for r in results]

    def batch_get(self, member: Member, ids: list[str],
                  timeout: float | None = None) -> dict[str, bytes | int]:
        """id -> bytes for blocks returned, or id -> status (404, 410, 413) for the rest."""
        body = b"".join(protocol.encode_batch({"ids": ids}))
        reply = self.call(member, "POST", "/v1/batch/get", body, timeout=timeout)
        manifest, payload = protocol.decode_batch(reply.content)
        found: dict[str, bytes | int] = {}
        offset = 0
        for entry in manifest["blocks"]:
            if entry["status"] == 200:
                found[entry["id"]] = bytes(payload[offset:offset + entry["size"]])
                offset += entry["size"]
            else:
                found[entry["id"]] = entry["status"]
        return found

    def batch_check(self, member: Member, ids: list[str], verify: bool = False) -> list[dict]:
        body = b"".join(protocol.encode_batch({"ids": ids, "verify": verify}))
        return self.call(member, "POST", "/v1/batch/check", body).json()["blocks"]

    def batch_delete(self, member: Member, ids: list[str]) -> int:
        body = b"".join(protocol.encode_batch({"ids": ids}))
        return self.call(member, "POST", "/v1/batch/delete", body).json()["deleted"]

    def list_blocks(self, member: Member, after: str = "", limit: int = 1000):
        """([{id, size, checksum}], next id or None)."""
        path = f"/v1/blocks?limit={limit}" + (f"&after={after}" if after else "")
        page = self.call(member, "GET", path).json()
        return page["blocks"], page["next"]

    def register_get(self, member: Member, name: str) -> tuple[int, bytes] | None:
        """(generation, value), or None when the register does not exist there."""
        try:
            reply = self.call(member, "GET", f"/v1/registers/{name}")
        except errors.BlockMissing:
            return None
        return int(reply.headers[protocol.H_GENERATION]), reply.content

    def register_put(self, member: Member, name: str, generation: int, value: bytes,
                     expect: int | None = None) -> None:
        """Raises Conflict (with `.current`, the generation the server holds) when the
        server holds this generation or a newer one, or not the expected one."""
        headers = {protocol.H_GENERATION: str(generation)}
        if expect is not None:
            headers["X-Fusefs-Expect-Generation"] = str(expect)
        reply = self.call(member, "PUT", f"/v1/registers/{name}", value, headers=headers,
                          ok=(204, 409))
        if reply.status == 409:
            conflict = errors.Conflict(f"{member.url}: register {name} is not at generation "
                                       f"{expect if expect is not None else '< ' + str(generation)}",
                                       server=member.url)
            conflict.current = int(reply.headers.get(protocol.H_GENERATION, "0"))
            raise conflict
