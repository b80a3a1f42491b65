"""A small, strict HTTP/1.1 server: keep-alive, bounded connections, total deadlines.

Why not `http.server`: it gives every connection a thread with no bound, and only a
per-recv timeout, so a client dripping one byte a second holds a worker forever. Here:

- at most `max_connections` connections; one more is answered 503 and closed at once;
- every phase of a connection has a *total* deadline enforced by one supervisor thread,
  which shuts the socket down when it passes (new connection: `header_timeout` for the
  request head; body and response: `body_timeout` plus size / `min_rate`; between
  keep-alive requests: `idle_timeout`);
- request heads are bounded (line length, header count and bytes: 414 / 431), bodies need
  a Content-Length (411; chunked request bodies are refused with 501), and anything
  malformed is a 400 and the connection is closed;
- responses leave in one write (TCP_NODELAY; no Nagle stalls on keep-alive);
- stop() stops accepting, closes idle connections, lets requests in flight finish (up to
  `shutdown_grace`), then cuts what is left.

States of a connection: idle (waiting for a request) → head → body → handling → sending →
idle ... → closed. Only the supervisor cuts sockets; a cut shows up in the connection's
thread as end-of-file or an OSError and ends that thread.

Locks: `Server._lock` guards the connection set and is never held across I/O.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("blockserver.http")

MAX_REQUEST_LINE = 8192
REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
    410: "Gone", 411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
    422: "Unprocessable Content", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported", 507: "Insufficient Storage",
}
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                         "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class HttpError(Exception):
    """An error answer: status, a short machine code, and a sentence for a person."""

    def __init__(self, status: int, code: str, message: str, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


@dataclass(frozen=True)
class Limits:
    """What one server allows a connection: time per phase, head sizes, connection counts
    (for strangers and signed clients) and body bytes held in memory."""

    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 30.0
    min_rate: int = 1 << 20  # bytes/s a body or response must at least move at
    max_header_bytes: int = 16384
    max_headers: int = 64
    max_connections: int = 256
    # Connections that have not yet sent an authenticated request ("strangers"): at most
    # this many per source address (more: 503 and close), and at most max_connections
    # minus reserved_slots of them in all (more: the oldest waiting stranger is cut), so
    # signed clients always find a slot. A stranger gets unauth_timeout to send a request.
    max_strangers_per_peer: int = 64
    reserved_slots: int = 64
    unauth_timeout: float = 5.0
    max_body_memory: int = 1 << 30  # bytes of request bodies held at once, all connections
    shutdown_grace: float = 30.0


@dataclass
class Request:
    """One parsed request head; the body is read only when the app asks (`read_body`).
    The app notes on it what the signature check found, to sign the answer with."""

    method: str
    target: str  # path and query exactly as sent (what a signature covers)
    path: str
    query: dict
    headers: dict  # lower-case names
    content_length: int
    conn: "Connection" = field(repr=False)
    close: bool = False  # the client asked to close after this request
    body_read: bool = False
    signed_hash: str | None = None  # the body digest a valid signature vouches for
    auth_key: bytes | None = None  # the key that signed it (signs the answer too)
    digest_algorithm: str = "sha256"  # of signed_hash; the answer's body digest uses it too
    nonce: str = ""  # the signed request's nonce (named in the answer's signature)

    def read_body(self) -> bytearray:
        body = self.conn.read_body(self.content_length, self.headers)
        self.body_read = True
        return body


@dataclass
class Response:
    """What the app answers: a status, headers and the body as parts sent in order (HEAD:
    no parts, `length` gives the Content-Length)."""

    status: int
    body: list = field(default_factory=list)  # bytes-like parts, sent in order
    headers: dict = field(default_factory=dict)
    length: int | None = None  # for HEAD: the Content-Length without a body
    digest: str | None = None  # content_digest of the body, when the app already knows it

    @property
    def body_size(self) -> int:
        return sum(len(p) for p in self.body)


class Connection:
    """One client connection, served by one thread: reads requests, writes answers, and
    holds the deadline of the phase it is in (`state`), which the server's reaper enforces."""

    def __init__(self, sock: socket.socket, peer: str, server: "Server"):
        self.sock = sock
        self.peer = peer
        self.host = peer.rsplit(":", 1)[0]
        self.server = server
        self.limits = server.limits
        self.rfile = None
        self.state = "new"
        self.authenticated = False  # set by the app once a request passed its checks
        self.opened = time.monotonic()
        self.deadline = self.opened + min(self.limits.header_timeout,
                                          self.limits.unauth_timeout)
        self.cut_reason: str | None = None
        self.reserved = 0  # body bytes this connection holds against max_body_memory

    def _phase(self, state: str, seconds: float) -> None:
        self.state, self.deadline = state, time.monotonic() + seconds

    def cut(self, reason: str) -> None:
        """Shut the socket down from another thread; the reader sees end-of-file."""
        if self.cut_reason is None:
            self.cut_reason = reason
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    # -- reading ----------------------------------------------------------------------------

    def wait_for_request(self, first: bool) -> bool:
        if not first:
            self._phase("idle", self.limits.idle_timeout if self.authenticated
                        else min(self.limits.idle_timeout, self.limits.unauth_timeout))
        if self.server.stopping:
            return False
        if not self.rfile.peek(1):
            return False
        if not first:
            self._phase("head", self.limits.header_timeout)
        else:
            self.state = "head"
        return True

    def read_head(self) -> Request:
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if len(line) > MAX_REQUEST_LINE:
            raise HttpError(414, "uri_too_long", "request line too long")
        if not line.endswith(b"\n"):
            raise ConnectionAbortedError("connection closed inside the request line")
        try:
            method, target, version = line.decode("ascii").rstrip("\r\n").split(" ")
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, "bad_request", "malformed request line") from None
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HttpError(505, "bad_version", f"unsupported HTTP version {version[:16]!r}")
        if not method or not set(method) <= _TOKEN_CHARS or not target.startswith("/"):
            raise HttpError(400, "bad_request", "malformed request line")
        headers = self._read_headers()
        keep = headers.get("connection", "").lower()
        close = keep == "close" or (version == "HTTP/1.0" and keep != "keep-alive")
        if "transfer-encoding" in headers:
            raise HttpError(501, "chunked_unsupported",
                            "chunked request bodies are not supported; send Content-Length")
        raw_length = headers.get("content-length", "")
        if raw_length and not (raw_length.isascii() and raw_length.isdigit()
                               and len(raw_length) <= 20):
            raise HttpError(400, "bad_length", "Content-Length must be one decimal number")
        try:
            parts = urlsplit(target)
        except ValueError:  # e.g. "//[" : an authority that is not one
            raise HttpError(400, "bad_request", "malformed request target") from None
        if method in ("PUT", "POST") and not raw_length:
            raise HttpError(411, "length_required", f"{method} needs a Content-Length header")
        return Request(method=method, target=target, path=unquote(parts.path),
                       query=parse_qs(parts.query, keep_blank_values=True), headers=headers,
                       content_length=int(raw_length or 0), conn=self, close=close)

    def _read_headers(self) -> dict:
        headers: dict[str, str] = {}
        total = 0
        while True:
            line = self.rfile.readline(self.limits.max_header_bytes + 1)
            total += len(line)
            if total > self.limits.max_header_bytes:
                raise HttpError(431, "headers_too_large",
                                f"request head exceeds {self.limits.max_header_bytes} bytes")
            if not line.endswith(b"\n"):
                raise ConnectionAbortedError("connection closed inside the request head")
            if line in (b"\r\n", b"\n"):
                return headers
            if len(headers) >= self.limits.max_headers:
                raise HttpError(431, "too_many_headers",
                                f"more than {self.limits.max_headers} header fields")
            try:
                text = line.decode("latin-1")
                name, value = text.split(":", 1)
            except ValueError:
                raise HttpError(400, "bad_header", "malformed header line") from None
            if not name or not set(name) <= _TOKEN_CHARS:  # also refuses obs-fold lines
                raise HttpError(400, "bad_header", "malformed header name")
            name, value = name.lower(), value.strip()
            if name in headers:
                if name == "content-length" and headers[name] != value:
                    raise HttpError(400, "bad_length", "conflicting Content-Length headers")
                value = f"{headers[name]}, {value}" if name != "content-length" else value
            headers[name] = value

    def read_body(self, length: int, headers: dict) -> bytearray:
        if not self.server.reserve_body(length):
            raise HttpError(503, "busy", "too many large requests in progress; retry shortly",
                            retry_after=1)
        self.reserved = length
        if headers.get("expect", "").lower() == "100-continue":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._phase("body", self.limits.body_timeout + length / self.limits.min_rate)
        body = bytearray(length)
        view = memoryview(body)
        got = 0
        while got < length:
            n = self.rfile.readinto(view[got:])
            if not n:
                raise ConnectionAbortedError(
                    f"body truncated: {got} of {length} bytes, then end of stream")
            got += n
        self.state = "handling"
        return body

    # -- writing ----------------------------------------------------------------------------

    def send(self, response: Response, close: bool, method: str) -> int:
        size = response.body_size if response.length is None else response.length
        lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}"]
        headers = {**self.server.response_headers, **response.headers}
        if response.status != 204:
            headers["Content-Length"] = str(size)
        if close:
            headers["Connection"] = "close"
        lines += [f"{k}: {v}" for k, v in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        body = [] if method == "HEAD" else response.body
        sent = sum(len(p) for p in body)
        self._phase("sending", self.limits.body_timeout + sent / self.limits.min_rate)
        if sent <= 262144:
            self.sock.sendall(b"".join([head, *body]))
        else:
            self.sock.sendall(head)
            for part in body:
                self.sock.sendall(part)
        return sent


# Answers after which a connection is closed: they show a peer that is not a working client
# (no or a bad signature, malformed or oversized requests). Other 4xx (404, 409, 410, 422,
# 507) are everyday answers to signed clients; from a stranger any 4xx closes.
_CLOSING_STATUSES = frozenset({400, 401, 403, 405, 411, 413, 414, 431, 501, 505})


def _hostile(status: int, authenticated: bool) -> bool:
    return status in _CLOSING_STATUSES or (status >= 400 and not authenticated)


class Server:
    """Accepts connections and has `app` answer each request.

    `app.handle(request) -> Response` answers a well-formed request (it reads the body
    itself, after its own checks); `app.error_response(HttpError) -> Response` renders an
    error; `app.record(method, target, response, bytes_in, bytes_out, started)` sees every
    answer sent, for metrics and logs.
    """

    def __init__(self, listen: tuple[str, int], app, limits: Limits, *,
                 ssl_context: ssl.SSLContext | None = None, on_cut=None,
                 response_headers: dict | None = None):
        self.app = app
        self.limits = limits
        self.ssl_context = ssl_context
        self.on_cut = on_cut or (lambda reason: None)
        self.response_headers = response_headers or {}
        self.stopping = False
        self.stop_reason: str | None = None  # for the log: who asked serve_forever to end
        self._lock = threading.Lock()
        self._connections: set[Connection] = set()  # guarded by _lock
        self._body_bytes = 0  # guarded by _lock: bodies being read or handled
        self._threads: set[threading.Thread] = set()  # guarded by _lock
        self._stopped = threading.Event()
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(listen)
        self._listener.listen(128)
        self.address = self._listener.getsockname()[:2]
        # stop() writes a byte here: serve_forever's select and the supervisor's wait end at
        # once instead of at their next timeout (a stop takes milliseconds, not 0.2 s).
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._stop_asked = threading.Event()

    def reserve_body(self, length: int) -> bool:
        """Admit a body of `length` bytes into memory if the budget allows (one at least)."""
        with self._lock:
            if self._body_bytes and self._body_bytes + length > self.limits.max_body_memory:
                return False
            self._body_bytes += length
            return True

    def _release_body(self, conn: Connection) -> None:
        with self._lock:
            self._body_bytes -= conn.reserved
        conn.reserved = 0

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def serve_forever(self) -> None:
        supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        supervisor.start()
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self.stopping:
                if not any(key.fileobj is self._listener
                           for key, _ in sel.select(timeout=0.2)):
                    continue
                try:
                    sock, addr = self._listener.accept()
                except OSError:
                    continue
                self._admit(sock, f"{addr[0]}:{addr[1]}")
        log.info("%s: finishing requests in flight, then stopping",
                 self.stop_reason or "asked to stop")
        self._stop_asked.set()  # here, not in stop(): see there
        self._listener.close()
        self._drain()
        self._stopped.set()
        self._wake_r.close()
        self._wake_w.close()

    def stop(self, reason: str | None = None) -> None:
        """Ask serve_forever to finish in-flight requests and return. Safe from any thread
        and from a signal handler: it takes no lock. A handler runs in the main thread
        between two bytecodes, maybe inside another handler's call of this: a second
        SIGTERM that arrived while the first one's handler set a threading.Event (which
        holds the Event's lock) waited for that lock forever, and the server never
        stopped."""
        self.stop_reason = self.stop_reason or reason
        self.stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:  # already woken (buffer full) or already closed: nothing to do
            pass

    def _admit(self, sock: socket.socket, peer: str) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(sock, peer, self)
        with self._lock:
            refusal, evicted = self._admission(conn)
            if refusal is None:
                self._connections.add(conn)
                thread = threading.Thread(target=self._run, args=(conn,), daemon=True,
                                          name=f"conn-{peer}")
                self._threads.add(thread)
        if evicted is not None:
            evicted.cut("making room: a slot is kept for signed clients")
        if refusal is not None:
            self.on_cut(refusal)
            log.warning("refused a connection from %s: %s (raise --max-connections if this "
                        "is real load)", peer, refusal.replace("_", " "))
            try:
                sock.setblocking(False)
                sock.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                          b"Connection: close\r\nRetry-After: 1\r\n\r\n")
            except OSError:
                pass
            sock.close()
            return
        thread.start()

    def _admission(self, conn: Connection) -> tuple[str | None, Connection | None]:
        """(why `conn` is refused or None, a stranger to cut for it or None). Under _lock."""
        limits = self.limits
        if len(self._connections) >= limits.max_connections:
            return "too_many_connections", None
        strangers = [c for c in self._connections if not c.authenticated]
        if sum(1 for c in strangers if c.host == conn.host) >= limits.max_strangers_per_peer:
            return "too_many_connections_from_peer", None
        if len(strangers) < max(1, limits.max_connections - limits.reserved_slots):
            return None, None
        waiting = [c for c in strangers if c.state in ("new", "idle", "head")
                   and c.cut_reason is None]
        if not waiting:
            return "too_many_connections", None
        return None, min(waiting, key=lambda c: c.opened)

    def _run(self, conn: Connection) -> None:
        try:
            if self.ssl_context is not None:
                conn.sock = self.ssl_context.wrap_socket(
                    conn.sock, server_side=True, do_handshake_on_connect=False)
                conn.sock.do_handshake()
            conn.rfile = conn.sock.makefile("rb", buffering=65536)
            first = True
            while conn.wait_for_request(first):
                first = False
                if not self._one_request(conn):
                    break
        except (OSError, ConnectionError, ssl.SSLError, ValueError) as e:
            if conn.cut_reason is None and not isinstance(e, (ConnectionResetError,
                                                              BrokenPipeError)):
                log.warning("connection from %s ended: %s", conn.peer, e)
        except Exception:  # noqa: BLE001 - a bug ends this connection, logged, not the thread
            log.exception("connection from %s failed unexpectedly", conn.peer)
        finally:
            if conn.cut_reason is not None:
                self.on_cut(conn.cut_reason)
                if conn.cut_reason != "shutdown":
                    log.warning("closed connection from %s: %s", conn.peer, conn.cut_reason)
            try:
                if conn.rfile is not None:
                    conn.rfile.close()  # else the fd stays open while anything holds conn
                conn.sock.close()
            except OSError:
                pass
            with self._lock:
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())

    def _one_request(self, conn: Connection) -> bool:
        """Read, handle and answer one request. False when the connection must close."""
        started = time.monotonic()
        try:
            request = conn.read_head()
        except HttpError as e:
            response = self.app.error_response(e)
            sent = conn.send(response, True, "")
            self.app.record("-", "-", response, 0, sent, started)
            return False
        conn.state = "handling"
        try:
            response = self.app.handle(request)
        finally:
            self._release_body(conn)
        close = request.close or self.stopping or (
            not request.body_read and request.content_length > 0) or response.status >= 500 \
            or _hostile(response.status, conn.authenticated)
        sent = conn.send(response, close, request.method)
        conn.state = "handling"
        self.app.record(request.method, request.path, response,
                        request.content_length if request.body_read else 0, sent, started)
        return not close

    def _supervise(self) -> None:
        while not self._stopped.is_set():
            now = time.monotonic()
            with self._lock:
                conns = list(self._connections)
            for conn in conns:
                if self.stopping and conn.state in ("new", "idle"):
                    conn.cut("shutdown")
                elif now > conn.deadline and conn.state != "handling":
                    conn.cut(f"no progress: {conn.state} deadline passed")
            if self.stopping:
                self._stopped.wait(0.02)  # cut the connections that turn idle quickly
            else:
                self._stop_asked.wait(0.1)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.limits.shutdown_grace
        while time.monotonic() < deadline:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                return
            threads[0].join(timeout=0.02)
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            conn.cut("shutdown")
