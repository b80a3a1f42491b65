"""Hostile and misbehaving clients against real block-server processes.

Every test talks to `blockserver serve` processes started by the `blockservers` fixture.
Where `requests` would tidy a request up (normalise a path, refuse a header), the test
writes the bytes itself on a raw socket. Timeouts in here are guards against hangs, never
measurements: a test only fails on a timeout when the server did not do the thing at all.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from blockserver import protocol

from .support import self_signed_cert, wait_until

GUARD = 10.0  # seconds: upper bound on anything that should happen "soon"
SECRET = b"0123456789abcdef0123456789abcdef"  # 32 bytes


# -- raw-socket helpers -------------------------------------------------------------------------

class RawResponse:
    def __init__(self, status: int, reason: str, headers: dict, body: bytes):
        self.status, self.reason, self.headers, self.body = status, reason, headers, body

    def json(self) -> dict:
        return json.loads(self.body)

    def __repr__(self):
        return f"<RawResponse {self.status} {self.reason} {self.body[:200]!r}>"


def host_port(server) -> tuple[str, int]:
    return "127.0.0.1", server.port


def connect(server, timeout: float = GUARD) -> socket.socket:
    sock = socket.create_connection(host_port(server), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """sendall, but a server that already answered and closed is not an error here."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def read_response(sock: socket.socket, head_only: bool = False) -> RawResponse | None:
    """One response from `sock`: None when the connection ended before a status line."""
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    except ConnectionResetError:
        pass
    if b"\r\n\r\n" not in buf:
        return None
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3}) ?(.*)\Z", lines[0])
    assert match, f"not an HTTP status line: {lines[0]!r}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(match.group(1))
    length = 0 if head_only or status in (100, 204) else int(headers.get("content-length", "0"))
    try:
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    except ConnectionResetError:
        pass
    return RawResponse(status, match.group(2), headers, rest[:length])


def exchange(server, data: bytes, head_only: bool = False) -> RawResponse | None:
    """Send `data` on a fresh connection and read one response."""
    with connect(server) as sock:
        send_quietly(sock, data)
        return read_response(sock, head_only)


def closed_by_peer(sock: socket.socket, guard: float = GUARD) -> bool:
    """Wait until the server closes `sock` (end of file or reset); False if it never does."""
    deadline = time.monotonic() + guard
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False
    return False


def request_bytes(method: str, target: str, headers: dict | None = None,
                  body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def session_of(server, verify=True) -> requests.Session:
    """A session that signs every request for `server` when it has a secret."""
    return server.session(verify=verify)


def assert_serving(server) -> None:
    """A well-behaved client still gets a full PUT / GET round trip."""
    s = session_of(server)
    block_id = protocol.new_block_id()
    data = os.urandom(4096)
    r = s.put(f"{server.url}/v1/blocks/{block_id}", data=data, timeout=GUARD,
              headers={protocol.H_CHECKSUM: protocol.checksum(data)})
    assert r.status_code == 201, r.text
    r = s.get(f"{server.url}/v1/blocks/{block_id}", timeout=GUARD)
    assert r.status_code == 200 and r.content == data


def tree(root) -> dict:
    """Every file and directory under `root` (server logs left out: they grow), with sizes."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            if name.endswith(".log"):
                continue
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = os.stat(path).st_size
    return found


def metric(server, name_and_labels: str) -> float:
    text = session_of(server).get(f"{server.url}/metrics", timeout=GUARD).text
    for line in text.splitlines():
        if line.startswith(name_and_labels + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def put_head(block_id: str, length: int, checksum: str | None = None, extra: dict | None = None):
    headers = {"Content-Length": str(length),
               protocol.H_CHECKSUM: checksum or protocol.checksum(b"x" * length)}
    return request_bytes("PUT", f"/v1/blocks/{block_id}", {**headers, **(extra or {})})


# -- 1. identifiers: traversal and malformed ids touch nothing --------------------------------

GOOD = "0123456789abcdef0123456789abcdef"
BAD_BLOCK_IDS = [
    "../../etc/passwd",
    "..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2fescaped",
    "%2e%2e",
    "..%2f" + GOOD[:29],  # 32 characters once decoded, but with a separator
    "%2e%2e%2f" + GOOD[:29],
    GOOD.upper(),
    GOOD[:31],
    GOOD + "0",
    GOOD[:31] + "%00",
    GOOD + "%00",
    GOOD + "%00.." + "%2f" * 3,
    GOOD + "%0a",  # a trailing newline must not pass a `$`-anchored check
    GOOD[:31] + "\x00",  # a raw NUL in the request line
    GOOD + "/..",
    GOOD + "%2f..%2f..%2fescaped",
    "%EF%BC%90" * 32,  # full-width digits (UTF-8), not ASCII hex
    "%20" + GOOD[1:],
]
BAD_REGISTER_NAMES = [
    "../../etc/passwd",
    "..%2f..%2fescaped",
    "%2e%2e",
    "%2e%2e%2fescaped",
    ".hidden",
    "-dash",
    "Upper",
    "a/b",
    "a%2fb",
    "a" * 65,
    "a%00",
    "a%00b",
    "a%0a",
    "a\x00b",
    "%2e",
]


def test_bad_block_ids_are_400_and_touch_nothing(blockservers, tmp_path):
    server = blockservers(1)[0]
    existing = protocol.new_block_id()
    data = b"already here"
    r = requests.put(f"{server.url}/v1/blocks/{existing}", data=data, timeout=GUARD,
                     headers={protocol.H_CHECKSUM: protocol.checksum(data)})
    assert r.status_code == 201
    before = tree(tmp_path)
    body = b"evil bytes"
    for bad in BAD_BLOCK_IDS:
        target = f"/v1/blocks/{bad}"
        for method in ("GET", "HEAD", "DELETE", "PUT"):
            headers = {}
            if method == "PUT":
                headers = {"Content-Length": str(len(body)),
                           protocol.H_CHECKSUM: protocol.checksum(body)}
            raw = request_bytes(method, target, headers, body if method == "PUT" else b"")
            r = exchange(server, raw, head_only=method == "HEAD")
            assert r is not None, f"{method} {bad!r}: no answer"
            assert r.status == 400, f"{method} {bad!r}: {r}"
            if method != "HEAD":
                assert r.json()["error"] == "bad_id", (method, bad, r)
    # the same ids inside batch manifests and listing cursors
    for bad in ("../../etc/passwd", GOOD.upper(), GOOD[:31], GOOD + "\x00", GOOD + "\n"):
        for route in ("batch/get", "batch/check", "batch/delete"):
            batch = b"".join(protocol.encode_batch({"ids": [existing, bad]}))
            r = requests.post(f"{server.url}/v1/{route}", data=batch, timeout=GUARD)
            assert r.status_code == 400 and r.json()["error"] == "bad_id", (route, bad, r.text)
        payload = b"xyz"
        batch = b"".join(protocol.encode_batch(
            {"blocks": [{"id": bad, "checksum": protocol.checksum(payload), "size": 3}]},
            [payload]))
        r = requests.post(f"{server.url}/v1/batch/put", data=batch, timeout=GUARD)
        assert r.status_code == 400 and r.json()["error"] == "bad_batch", (bad, r.text)
        r = requests.get(f"{server.url}/v1/blocks", params={"after": bad}, timeout=GUARD)
        assert r.status_code == 400 and r.json()["error"] == "bad_id", (bad, r.text)

    assert tree(tmp_path) == before
    assert not os.path.exists(tmp_path / "escaped")
    # the block that was there is untouched (no DELETE got through)
    r = requests.get(f"{server.url}/v1/blocks/{existing}", timeout=GUARD)
    assert r.status_code == 200 and r.content == data
    assert_serving(server)


def test_bad_register_names_are_400_and_touch_nothing(blockservers, tmp_path):
    server = blockservers(1)[0]
    before = tree(tmp_path)
    value = b"superblock?"
    for bad in BAD_REGISTER_NAMES:
        target = f"/v1/registers/{bad}"
        r = exchange(server, request_bytes("GET", target))
        assert r is not None and r.status == 400, (bad, r)
        assert r.json()["error"] == "bad_name"
        r = exchange(server, request_bytes(
            "PUT", target, {"Content-Length": str(len(value)), protocol.H_GENERATION: "1"},
            value))
        assert r is not None and r.status == 400, (bad, r)
        assert r.json()["error"] == "bad_name"
    assert tree(tmp_path) == before
    assert not os.path.exists(tmp_path / "escaped")
    # a good name still works, and lands inside the data directory
    r = requests.put(f"{server.url}/v1/registers/a..b", data=value, timeout=GUARD,
                     headers={protocol.H_GENERATION: "1"})
    assert r.status_code == 204
    assert os.path.isfile(os.path.join(server.data_dir, "registers", "a..b"))


# -- 2. huge request heads --------------------------------------------------------------------

def test_huge_header_line_is_431_and_server_keeps_serving(blockservers):
    server = blockservers(1)[0]
    raw = request_bytes("GET", "/v1/status", {"X-Big": "a" * 100_000})
    r = exchange(server, raw)
    assert r is not None, "no answer to a 100 KB header line"
    assert r.status == 431 and r.json()["error"] == "headers_too_large", r
    assert r.headers.get("connection") == "close"
    assert_serving(server)


def test_too_many_headers_is_431_and_server_keeps_serving(blockservers):
    server = blockservers(1)[0]
    raw = request_bytes("GET", "/v1/status", {f"X-H{i}": "v" for i in range(200)})
    r = exchange(server, raw)
    assert r is not None, "no answer to 200 headers"
    assert r.status == 431 and r.json()["error"] == "too_many_headers", r
    # many small headers that together exceed the byte limit
    raw = request_bytes("GET", "/v1/status", {f"X-H{i}": "v" * 400 for i in range(50)})
    r = exchange(server, raw)
    assert r is not None and r.status == 431, r
    # just under both limits is fine
    raw = request_bytes("GET", "/v1/status", {f"X-H{i}": "v" * 100 for i in range(60)})
    r = exchange(server, raw)
    assert r is not None and r.status == 200, r
    assert_serving(server)


# -- 3. slow drip -----------------------------------------------------------------------------

SHORT_TIMEOUTS = ["--header-timeout", "1", "--body-timeout", "1", "--min-rate", "1MiB"]


class Dripper(threading.Thread):
    """Sends `data` one byte every 0.2 s until the server closes the connection."""

    def __init__(self, sock: socket.socket, data: bytes):
        super().__init__(daemon=True)
        self.sock, self.data = sock, data
        self.sent = 0
        self.closed = threading.Event()
        self.stop = threading.Event()

    def run(self):
        self.sock.settimeout(0.2)
        for i in range(len(self.data)):
            if self.stop.is_set():
                return
            try:
                self.sock.sendall(self.data[i:i + 1])
                self.sent += 1
                if self.sock.recv(1) == b"":
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        self.closed.set()


def _drip_and_check(server, prefix: bytes, drip: bytes, cut_reason: str):
    sock = connect(server)
    dripper = Dripper(sock, drip)
    try:
        send_quietly(sock, prefix)
        dripper.start()
        # others are served while the dripping client holds its connection
        assert_serving(server)
        assert dripper.closed.wait(GUARD), "server never closed a dripping connection"
        assert dripper.sent < len(drip), "the whole drip got through: nothing was enforced"
    finally:
        dripper.stop.set()
        sock.close()
    counter = f'blockserver_connections_closed_total{{reason="{cut_reason}"}}'
    assert wait_until(lambda: metric(server, counter) >= 1, what=f"metric {counter}")
    assert_serving(server)


def test_slow_drip_request_head_is_cut(blockservers):
    server = blockservers(1, args=SHORT_TIMEOUTS)[0]
    head = put_head(GOOD, 10)
    _drip_and_check(server, b"", head * 10, "no progress: head deadline passed")


def test_slow_drip_body_is_cut_and_nothing_stored(blockservers):
    server = blockservers(1, args=SHORT_TIMEOUTS)[0]
    block_id = protocol.new_block_id()
    body = os.urandom(2000)
    head = put_head(block_id, len(body), protocol.checksum(body))
    _drip_and_check(server, head, body, "no progress: body deadline passed")
    r = requests.get(f"{server.url}/v1/blocks/{block_id}", timeout=GUARD)
    assert r.status_code == 404
    tmp = os.path.join(server.data_dir, "tmp")
    wait_until(lambda: os.listdir(tmp) == [], what="tmp/ empty")


def test_slow_drip_after_keepalive_request_is_cut(blockservers):
    """The head deadline also applies to the second request on a keep-alive connection."""
    server = blockservers(1, args=SHORT_TIMEOUTS)[0]
    sock = connect(server)
    dripper = Dripper(sock, request_bytes("GET", "/v1/status", {"X-Pad": "p" * 200}))
    try:
        sock.sendall(request_bytes("GET", "/v1/status"))
        r = read_response(sock)
        assert r is not None and r.status == 200
        dripper.start()
        assert dripper.closed.wait(GUARD), "server never closed a dripping keep-alive connection"
        assert dripper.sent < len(dripper.data)
    finally:
        dripper.stop.set()
        sock.close()
    assert_serving(server)


# -- 4. truncated bodies ----------------------------------------------------------------------

def test_truncated_body_stores_nothing(blockservers):
    server = blockservers(1)[0]
    block_id = protocol.new_block_id()
    body = os.urandom(100_000)
    with connect(server) as sock:
        sock.sendall(put_head(block_id, len(body), protocol.checksum(body)) + body[:1000])
    # and a truncated batch put
    batch_id = protocol.new_block_id()
    batch = b"".join(protocol.encode_batch(
        {"blocks": [{"id": batch_id, "checksum": protocol.checksum(body), "size": len(body)}]},
        [body]))
    with connect(server) as sock:
        sock.sendall(request_bytes("POST", "/v1/batch/put", {"Content-Length": str(len(batch))})
                     + batch[:len(batch) // 2])
    tmp = os.path.join(server.data_dir, "tmp")
    wait_until(lambda: os.listdir(tmp) == [], what="tmp/ empty")
    for bid in (block_id, batch_id):
        r = requests.get(f"{server.url}/v1/blocks/{bid}", timeout=GUARD)
        assert r.status_code == 404, r.text
    assert requests.get(f"{server.url}/v1/status", timeout=GUARD).json()["block_count"] == 0
    assert_serving(server)
    # the whole body, sent afterwards, is stored normally
    r = requests.put(f"{server.url}/v1/blocks/{block_id}", data=body, timeout=GUARD,
                     headers={protocol.H_CHECKSUM: protocol.checksum(body)})
    assert r.status_code == 201
    assert requests.get(f"{server.url}/v1/blocks/{block_id}", timeout=GUARD).content == body


# -- 5. malformed HTTP ------------------------------------------------------------------------

_PUT = f"PUT /v1/blocks/{GOOD} HTTP/1.1\r\nHost: x\r\n{protocol.H_CHECKSUM}: {GOOD}\r\n"
MALFORMED = [
    ("garbage request line", b"GARBAGE\r\n\r\n", 400),
    ("binary junk", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    ("missing HTTP version", b"GET /v1/status\r\n\r\n", 400),
    ("extra request-line field", b"GET /v1/status HTTP/1.1 extra\r\n\r\n", 400),
    ("HTTP/2.0", b"GET /v1/status HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    ("HTTP/0.9 style version", b"GET /v1/status HTTP/0.9\r\n\r\n", 505),
    ("target not a path", b"GET http//x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("bad method token", b"G(T /v1/status HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("non-ASCII request line", b"GET /v1/st\xe4tus HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("unparsable authority-form target", b"GET //[/v1/status HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("non-numeric Content-Length", (_PUT + "Content-Length: abc\r\n\r\n").encode(), 400),
    ("negative Content-Length", (_PUT + "Content-Length: -1\r\n\r\n").encode(), 400),
    ("list Content-Length", (_PUT + "Content-Length: 1, 1\r\n\r\n").encode(), 400),
    ("superscript-digit Content-Length",
     (_PUT + "Content-Length: \xb2\r\n\r\n").encode("latin-1"), 400),
    ("conflicting Content-Length",
     (_PUT + "Content-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef").encode(), 400),
    ("chunked body",
     (_PUT + "Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n").encode(), 501),
    ("chunked with length",
     (_PUT + "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nabcde").encode(), 501),
    ("PUT without Content-Length", (_PUT + "\r\n").encode(), 411),
    ("POST without Content-Length", b"POST /v1/batch/get HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    ("too-long request line",
     b"GET /v1/blocks/" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("obs-fold header", b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-A: b\r\n  c\r\n\r\n", 400),
    ("obs-fold header with colon",
     b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-A: b\r\n\tX-B: c\r\n\r\n", 400),
    ("header without colon", b"GET /v1/status HTTP/1.1\r\nHost x\r\n\r\n", 400),
    ("space before colon", b"GET /v1/status HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    ("empty header name", b"GET /v1/status HTTP/1.1\r\n: x\r\n\r\n", 400),
]


def test_malformed_http_gets_exact_status(blockservers):
    """One server for all cases (a server start each would dominate the run time); every
    failing case is reported, and the server must keep serving after each."""
    server = blockservers(1)[0]
    failures = []
    for name, raw, status in MALFORMED:
        with connect(server) as sock:
            send_quietly(sock, raw)
            r = read_response(sock)
            if r is None:
                failures.append(f"{name}: connection closed without an answer")
            elif r.status != status:
                failures.append(f"{name}: expected {status}, got {r}")
            elif "error" not in r.json() or r.headers.get("connection") != "close":
                failures.append(f"{name}: no JSON error or no Connection: close: {r}")
            elif not closed_by_peer(sock):
                failures.append(f"{name}: connection left open after a bad request")
        assert_serving(server)
    assert failures == []


def test_non_ascii_digits_in_numeric_fields_are_refused(blockservers):
    """str.isdigit() accepts superscript digits that int() refuses: each must still be a 4xx."""
    server = blockservers(1)[0]
    for name, value in ((protocol.H_GENERATION, "\xb2"), (protocol.H_GENERATION, "\xb9"),
                        ("X-Fusefs-Expect-Generation", "\xb3")):
        headers = {protocol.H_GENERATION: "1", name: value, "Content-Length": "2"}
        r = exchange(server, request_bytes("PUT", "/v1/registers/root", headers, b"v1"))
        assert r is not None, f"{name}: {value!r}: no answer"
        assert r.status == 400 and r.json()["error"] == "bad_generation", r
    r = exchange(server, request_bytes("GET", "/v1/blocks?limit=%C2%B2"))
    assert r is not None, "limit=\u00b2: no answer"
    assert r.status == 400 and r.json()["error"] == "bad_limit", r
    assert requests.get(f"{server.url}/v1/registers/root", timeout=GUARD).status_code == 404
    assert_serving(server)


def test_server_really_closes_after_connection_close(blockservers):
    """After an answer with `Connection: close` the client must see end-of-file, also when
    the server has nothing else to do (a stale reference to the connection must not keep
    its socket open). The pause lets the server's supervisor see the connection first."""
    server = blockservers(1)[0]
    for raw in (b"GET /v1/status HTTP/2.0\r\n\r\n",
                request_bytes("GET", "/v1/status", {"Connection": "close"}),
                b"GET /v1/status HTTP/1.0\r\n\r\n"):
        with connect(server) as sock:
            # A deliberate window, not synchronisation: nothing outside shows the supervisor's
            # passes (every 0.1 s), so the connection stays open across several of them.
            time.sleep(0.5)
            sock.sendall(raw)
            r = read_response(sock)
            assert r is not None and r.headers.get("connection") == "close", r
            assert closed_by_peer(sock), f"no end-of-file after {r} to {raw[:30]!r}"


# -- 6. oversized blocks ----------------------------------------------------------------------

def test_oversized_block_is_413_without_reading_the_body(blockservers):
    server = blockservers(1, args=["--max-block-size", "64KiB"])[0]
    for extra in ({}, {"Expect": "100-continue"}):
        with connect(server) as sock:
            sock.sendall(put_head(protocol.new_block_id(), 10_000_000, GOOD, extra))
            r = read_response(sock)  # not one byte of the body was sent
            assert r is not None and r.status == 413, r
            assert r.json()["error"] == "too_large"
            assert closed_by_peer(sock)
    # the limit is inclusive, and applies to batch items too
    s = session_of(server)
    data = os.urandom(64 * 1024)
    block_id = protocol.new_block_id()
    r = s.put(f"{server.url}/v1/blocks/{block_id}", data=data, timeout=GUARD,
              headers={protocol.H_CHECKSUM: protocol.checksum(data)})
    assert r.status_code == 201
    big = data + b"!"
    batch = b"".join(protocol.encode_batch(
        {"blocks": [{"id": protocol.new_block_id(), "checksum": protocol.checksum(big),
                     "size": len(big)}]}, [big]))
    r = s.post(f"{server.url}/v1/batch/put", data=batch, timeout=GUARD)
    assert r.status_code == 400, r.text
    assert s.get(f"{server.url}/v1/status", timeout=GUARD).json()["block_count"] == 1
    assert_serving(server)


def test_oversized_batch_and_register_are_413(blockservers):
    server = blockservers(1, args=["--max-batch-size", "1MiB"])[0]
    with connect(server) as sock:
        sock.sendall(request_bytes("POST", "/v1/batch/put", {"Content-Length": "2000000"}))
        r = read_response(sock)
        assert r is not None and r.status == 413, r
    with connect(server) as sock:
        sock.sendall(request_bytes("PUT", "/v1/registers/root",
                                   {"Content-Length": str((1 << 20) + 1),
                                    protocol.H_GENERATION: "1"}))
        r = read_response(sock)
        assert r is not None and r.status == 413, r
    assert_serving(server)


def test_deeply_nested_batch_manifest_is_400(blockservers):
    server = blockservers(1)[0]
    for route in ("batch/get", "batch/put", "batch/check", "batch/delete"):
        body = b"[" * 200_000 + b"\n"
        r = exchange(server, request_bytes("POST", f"/v1/{route}",
                                           {"Content-Length": str(len(body))}, body))
        assert r is not None, f"{route}: no answer to a deeply nested manifest"
        assert r.status == 400 and r.json()["error"] == "bad_batch", r
    assert_serving(server)


# -- 7. connection limit ----------------------------------------------------------------------

def test_connection_limit_answers_503_then_recovers(blockservers):
    server = blockservers(1, args=["--max-connections", "4"])[0]
    held = []
    try:
        deadline = time.monotonic() + GUARD
        while len(held) < 4:
            # each held connection has answered a request, so the server counts it as open
            sock = connect(server)
            sock.sendall(request_bytes("GET", "/v1/status"))
            r = read_response(sock)
            if r is not None and r.status == 200:
                held.append(sock)
                continue
            sock.close()  # an earlier probe connection not yet reaped: try again
            assert time.monotonic() < deadline, "could not open 4 connections"
            time.sleep(0.05)
        for _ in range(3):
            with connect(server) as extra:
                r = read_response(extra)  # sends nothing: the 503 comes unasked
                assert r is not None and r.status == 503, r
                assert r.headers.get("connection") == "close"
                assert closed_by_peer(extra)
        # the held connections still work
        held[0].sendall(request_bytes("GET", "/v1/status"))
        r = read_response(held[0])
        assert r is not None and r.status == 200
    finally:
        for sock in held:
            sock.close()

    def served():
        try:
            return requests.get(f"{server.url}/v1/status", timeout=GUARD).status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(served, what="service after closing the held connections")
    assert_serving(server)
    assert metric(server, 'blockserver_connections_closed_total{reason="too_many_connections"}') >= 3


# -- 8. authentication ------------------------------------------------------------------------

def signed(method: str, target: str, body: bytes = b"", secret: bytes = SECRET,
           now: float | None = None, sid: str = "", headers=None) -> dict:
    return protocol.sign_request(secret, method, target, protocol.content_digest(body), now,
                                 server_id=sid, headers=headers)


def test_authentication_refusals(blockservers):
    server = blockservers(1, secret=SECRET)[0]
    url = server.url
    sid = session_of(server).auth.server_id
    block_id = protocol.new_block_id()
    data = os.urandom(1000)
    target = f"/v1/blocks/{block_id}"
    cks = {protocol.H_CHECKSUM: protocol.checksum(data)}

    def refused(r, code):
        assert r.status_code == 401, (code, r.status_code, r.text)
        assert r.json()["error"] == code, r.text
        assert r.headers.get("WWW-Authenticate") == protocol.AUTH_SCHEME

    def put(body, checksum_of, signed_body, **kw):
        meaning = {protocol.H_CHECKSUM: protocol.checksum(checksum_of)}
        return requests.put(url + target, data=body, timeout=GUARD, headers={
            **meaning, **signed("PUT", target, signed_body, sid=sid, headers=meaning, **kw)})

    refused(requests.get(f"{url}/v1/status", timeout=GUARD), "unauthenticated")
    refused(requests.put(url + target, data=data, headers=cks, timeout=GUARD), "unauthenticated")
    wrong = b"fedcba9876543210fedcba9876543210"
    refused(put(data, data, data, secret=wrong), "bad_signature")
    for skew in (-3600, 3600, -protocol.SIGNATURE_MAX_SKEW - 5):
        refused(requests.get(f"{url}/v1/status", timeout=GUARD,
                             headers=signed("GET", "/v1/status", now=time.time() + skew)),
                "stale_signature")
    # a signature for one target does not open another, nor another method, nor a server
    refused(requests.get(f"{url}/v1/status", timeout=GUARD,
                         headers=signed("GET", "/metrics")), "bad_signature")
    refused(requests.delete(url + target, timeout=GUARD,
                            headers=signed("GET", target, sid=sid)), "bad_signature")
    refused(requests.get(url + target, timeout=GUARD, headers=signed("GET", target)),
            "wrong_server")
    refused(requests.get(url + target, timeout=GUARD,
                         headers=signed("GET", target, sid="f" * 32)), "wrong_server")
    # replaying the exact same signed headers
    headers = signed("GET", "/v1/status")
    assert requests.get(f"{url}/v1/status", headers=headers, timeout=GUARD).status_code == 200
    refused(requests.get(f"{url}/v1/status", headers=headers, timeout=GUARD), "replayed")
    # signed headers, but a body other than the one signed (same length), with or without
    # its checksum header changed to match: the signature is over the body's SHA-256
    other = os.urandom(len(data))
    refused(put(other, other, data), "bad_signature")
    refused(put(other, data, data), "bad_signature")
    # the checksum header changed after signing
    meaning = {protocol.H_CHECKSUM: protocol.checksum(data)}
    refused(requests.put(url + target, data=data, timeout=GUARD, headers={
        **signed("PUT", target, data, sid=sid, headers=meaning),
        protocol.H_CHECKSUM: protocol.checksum(other)}), "bad_signature")
    assert requests.get(url + target, timeout=GUARD,
                        headers=signed("GET", target, sid=sid)).status_code == 404
    # a body that matches its signature but not the block checksum it claims: the block is
    # refused as damaged (as without a secret), and nothing is stored
    r = put(data, other, data)
    assert (r.status_code, r.json()["error"]) == (422, "checksum_mismatch"), r.text
    assert requests.get(url + target, timeout=GUARD,
                        headers=signed("GET", target, sid=sid)).status_code == 404
    # malformed signature fields
    good = signed("GET", "/v1/status")
    for field, value in ((protocol.H_DATE, "\xb2"), (protocol.H_DATE, "-5"),
                         (protocol.H_DATE, "soon"), ("Authorization", "Basic abc"),
                         ("Authorization", f"{protocol.AUTH_SCHEME} \xe9\xe9"),
                         ("Authorization", protocol.AUTH_SCHEME)):
        raw = request_bytes("GET", "/v1/status", {**good, field: value,
                                                  protocol.H_NONCE: os.urandom(12).hex()})
        r = exchange(server, raw)
        assert r is not None, f"{field}: {value!r}: no answer"
        assert r.status == 401, (field, value, r)
    # none of that stored anything
    s = session_of(server)
    assert s.get(url + target, timeout=GUARD).status_code == 404
    assert s.get(f"{url}/v1/status", timeout=GUARD).json()["block_count"] == 0


def test_unsigned_put_is_refused_before_its_body_is_read(blockservers):
    server = blockservers(1, secret=SECRET)[0]
    with connect(server) as sock:
        sock.sendall(put_head(protocol.new_block_id(), 10_000_000, GOOD))
        r = read_response(sock)  # the 10 MB body was never sent
        assert r is not None and r.status == 401, r
        assert closed_by_peer(sock)


def test_signed_requests_work(blockservers):
    server = blockservers(1, secret=SECRET)[0]
    s = session_of(server)
    url = server.url
    status = s.get(f"{url}/v1/status", timeout=GUARD)
    assert status.status_code == 200 and status.json()["authentication"] is True
    blocks = {protocol.new_block_id(): os.urandom(n) for n in (0, 1, 5000, 70000)}
    first, *rest = blocks
    r = s.put(f"{url}/v1/blocks/{first}", data=blocks[first], timeout=GUARD,
              headers={protocol.H_CHECKSUM: protocol.checksum(blocks[first])})
    assert r.status_code == 201, r.text
    r = s.get(f"{url}/v1/blocks/{first}", timeout=GUARD)
    assert r.status_code == 200 and r.content == blocks[first]
    manifest = {"blocks": [{"id": i, "checksum": protocol.checksum(blocks[i]),
                            "size": len(blocks[i])} for i in rest]}
    body = b"".join(protocol.encode_batch(manifest, [blocks[i] for i in rest]))
    r = s.post(f"{url}/v1/batch/put", data=body, timeout=GUARD)
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == [201] * len(rest)
    body = b"".join(protocol.encode_batch({"ids": list(blocks)}))
    r = s.post(f"{url}/v1/batch/get", data=body, timeout=GUARD)
    assert r.status_code == 200
    got, payload = protocol.decode_batch(r.content)
    offset = 0
    for entry in got["blocks"]:
        assert entry["status"] == 200
        assert bytes(payload[offset:offset + entry["size"]]) == blocks[entry["id"]]
        offset += entry["size"]
    assert offset == len(payload)
    r = s.put(f"{url}/v1/registers/root", data=b"v1", timeout=GUARD,
              headers={protocol.H_GENERATION: "1"})
    assert r.status_code == 204
    assert s.get(f"{url}/v1/registers/root", timeout=GUARD).content == b"v1"
    # a query string is part of what is signed
    r = s.get(f"{url}/v1/blocks", params={"limit": "2"}, timeout=GUARD)
    assert r.status_code == 200 and len(r.json()["blocks"]) == 2


def test_metrics_need_a_signature_unless_public(blockservers):
    private = blockservers(1, secret=SECRET)[0]
    r = requests.get(f"{private.url}/metrics", timeout=GUARD)
    assert r.status_code == 401
    r = session_of(private).get(f"{private.url}/metrics", timeout=GUARD)
    assert r.status_code == 200 and "blockserver_requests_total" in r.text
    public = blockservers(1, secret=SECRET, args=["--public-metrics"])[0]
    r = requests.get(f"{public.url}/metrics", timeout=GUARD)
    assert r.status_code == 200 and "blockserver_requests_total" in r.text
    # public metrics open nothing else
    assert requests.get(f"{public.url}/v1/status", timeout=GUARD).status_code == 401


# -- 9. TLS -----------------------------------------------------------------------------------

def test_tls_round_trip_and_plain_http_on_tls_port(blockservers, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    server = blockservers(1, secret=SECRET, args=[
        "--tls-cert", str(cert), "--tls-key", str(key), "--header-timeout", "1"])[0]
    assert server.url.startswith("https://")
    ca = str(cert)  # per request: a session's `verify` loses to REQUESTS_CA_BUNDLE
    s = session_of(server, verify=ca)
    data = os.urandom(300_000)
    block_id = protocol.new_block_id()
    r = s.put(f"{server.url}/v1/blocks/{block_id}", data=data, timeout=GUARD, verify=ca,
              headers={protocol.H_CHECKSUM: protocol.checksum(data)})
    assert r.status_code == 201, r.text
    r = s.get(f"{server.url}/v1/blocks/{block_id}", timeout=GUARD, verify=ca)
    assert r.status_code == 200 and r.content == data

    # the certificate really is checked: an unrelated CA bundle refuses it
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{server.url}/v1/status", timeout=GUARD)

    # plain HTTP on the TLS port fails cleanly: an error, no hang, no HTTP answer
    plain = f"http://127.0.0.1:{server.port}/v1/status"
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(plain, timeout=GUARD)
    with connect(server) as sock:
        send_quietly(sock, request_bytes("GET", "/v1/status"))
        got = b""
        try:
            while len(got) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        except ConnectionResetError:
            pass
        assert not got.startswith(b"HTTP/"), got[:100]

    # a client that connects and never starts the handshake is cut by the head deadline
    with connect(server) as sock:
        assert closed_by_peer(sock), "server kept a silent TLS connection open"

    r = s.get(f"{server.url}/v1/blocks/{block_id}", timeout=GUARD, verify=ca)
    assert r.status_code == 200 and r.content == data


# -- 10. concurrency --------------------------------------------------------------------------

def test_concurrent_puts_and_gets_of_distinct_blocks(blockservers):
    server = blockservers(1)[0]
    rng = random.Random(1234)
    blocks = {protocol.new_block_id(): rng.randbytes(rng.randint(1, 256 * 1024))
              for _ in range(200)}
    local = threading.local()

    def session():
        if not hasattr(local, "s"):
            local.s = session_of(server)
        return local.s

    def put_then_get(block_id):
        data = blocks[block_id]
        r = session().put(f"{server.url}/v1/blocks/{block_id}", data=data, timeout=30,
                          headers={protocol.H_CHECKSUM: protocol.checksum(data)})
        assert r.status_code == 201, r.text
        return get(block_id)

    def get(block_id):
        r = session().get(f"{server.url}/v1/blocks/{block_id}", timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers[protocol.H_CHECKSUM] == protocol.checksum(blocks[block_id])
        return r.content == blocks[block_id]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(put_then_get, blocks))
        order = list(blocks)
        rng.shuffle(order)
        assert all(pool.map(get, order))
    status = requests.get(f"{server.url}/v1/status", timeout=GUARD).json()
    assert status["block_count"] == len(blocks)
    assert status["used_bytes"] == sum(len(b) for b in blocks.values())
    assert os.listdir(os.path.join(server.data_dir, "tmp")) == []


def test_request_bodies_held_in_memory_are_bounded(blockservers):
    """Bodies being read count against --max-body-memory; beyond it the answer is 503."""
    server = blockservers(1, args=["--max-body-memory", "1MiB"])[0]
    big = os.urandom(900_000)
    with connect(server) as slow:
        send_quietly(slow, put_head(GOOD, len(big), protocol.checksum(big)) + big[:1000])
        other = os.urandom(500_000)

        def refused():
            block_id = os.urandom(16).hex()
            r = exchange(server, put_head(block_id, len(other), protocol.checksum(other))
                         + other)
            return r is not None and r.status == 503 and r

        answer = wait_until(refused, what="a 503 while the slow body holds the budget")
        assert answer.headers.get("retry-after") == "1"
        assert json.loads(answer.body)["error"] == "busy"
        send_quietly(slow, big[1000:])
        assert read_response(slow).status == 201
    block_id = os.urandom(16).hex()
    r = exchange(server, put_head(block_id, len(other), protocol.checksum(other)) + other)
    assert r.status == 201
    assert_serving(server)


# -- the command line ----------------------------------------------------------------------

@pytest.mark.parametrize("extra, said", [
    (["--listen", "127.0.0.1:99999"], "a port is 0 to 65535"),
    (["--listen", "127.0.0.1"], "is not HOST:PORT"),
    (["--data", "{file}", "--listen", "127.0.0.1:0"], "cannot use data directory"),
    (["--listen", "127.0.0.1:0", "--tls-cert", "{file}", "--tls-key", "{file}"],
     "cannot load TLS certificate"),
])
def test_serve_arguments_it_cannot_use_are_refused_in_one_line(tmp_path, extra, said):
    """A wrong value is named, without a traceback (a port above 65535 was one), and
    the server does not start."""
    import subprocess
    import sys

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    extra = [a.replace("{file}", str(a_file)) for a in extra]
    data = [] if "--data" in extra else ["--data", str(tmp_path / "d")]
    done = subprocess.run([sys.executable, "-m", "blockserver", "serve", *data, *extra],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "serving" not in done.stdout
    assert said in done.stderr and "Traceback" not in done.stderr, done.stderr
