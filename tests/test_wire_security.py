"""Attacks on the wire against real block-server processes (review findings #4-#7, #16-#18).

Each test plays one attack: a man in the middle changing a signed request or an answer, a
captured request replayed to another server or after a restart, a client without the key
holding every connection slot, a read-only client writing. The attacker's requests are
signed the way a legitimate client signs them (`sign`), so each test checks what the
server or the client does with them, not what a test helper can or cannot build.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from blockserver import protocol
from fusefs import errors
from fusefs.transport import Member, Transport, TransportConfig

from .support import REPO, members_of, self_signed_cert

GUARD = 10.0
SECRET = b"wire-security-secret-0123456789ab"


def sign(method: str, target: str, body: bytes = b"", *, server_id: str = "",
         headers=None, key: bytes = SECRET, role: str = "write", now=None,
         algorithm: str = "sha256") -> dict:
    """What a client with `key` sends to sign a request (the protocol's own function)."""
    if not hasattr(protocol, "content_digest"):  # the protocol before the fix: same attack
        return protocol.sign_request(key, method, target, protocol.checksum(body), now=now)
    digest = protocol.content_digest(body, algorithm=algorithm) if algorithm != "sha256" \
        else protocol.content_digest(body)
    return protocol.sign_request(key, method, target, digest, now,
                                 server_id=server_id, role=role, headers=headers or {})


def server_id(server) -> str:
    return members_of([server])[0].id


def put_block(server, sid: str, data: bytes, block_id: str | None = None):
    block_id = block_id or protocol.new_block_id()
    target = f"/v1/blocks/{block_id}"
    headers = {protocol.H_CHECKSUM: protocol.checksum(data)}
    r = requests.put(server.url + target, data=data, timeout=GUARD,
                     headers={**headers, **sign("PUT", target, data, server_id=sid,
                                                headers=headers)})
    return block_id, r


def get(server, sid: str, target: str, **kw):
    return requests.get(server.url + target, timeout=GUARD,
                        headers=sign("GET", target, server_id=sid, **kw))


# -- #4: the signature covers a cryptographic digest of the body ------------------------------

def test_a_signature_over_only_the_xxh3_of_the_body_is_refused(blockservers):
    """xxh3 second preimages are easy (review #4), so a signature that vouches only for the
    body's xxh3 lets a man in the middle swap the body. The server must want a SHA-256."""
    server = blockservers(1, secret=SECRET)[0]
    sid = server_id(server)
    data = os.urandom(4096)
    block_id = protocol.new_block_id()
    target = f"/v1/blocks/{block_id}"
    headers = {protocol.H_CHECKSUM: protocol.checksum(data)}
    signed = sign("PUT", target, data, server_id=sid, headers=headers)
    signed[protocol.H_CONTENT_HASH] = protocol.checksum(data)  # what the old client signed
    if hasattr(protocol, "content_digest"):  # re-sign that content hash, validly
        sig = protocol.signature(SECRET, "PUT", target, signed[protocol.H_DATE],
                                 signed[protocol.H_NONCE], protocol.checksum(data), sid,
                                 "write", headers)
        signed["Authorization"] = f"{protocol.AUTH_SCHEME} {sig}"
    r = requests.put(server.url + target, data=data, timeout=GUARD,
                     headers={**headers, **signed})
    assert r.status_code == 401, r.text
    assert get(server, sid, target).status_code == 404


@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
def test_a_changed_body_under_a_valid_signature_is_refused(blockservers, algorithm):
    server = blockservers(1, secret=SECRET)[0]
    sid = server_id(server)
    data, forged = os.urandom(4096), os.urandom(4096)
    block_id = protocol.new_block_id()
    target = f"/v1/blocks/{block_id}"
    headers = {protocol.H_CHECKSUM: protocol.checksum(forged)}
    signed = sign("PUT", target, data, server_id=sid, headers=headers, algorithm=algorithm)
    r = requests.put(server.url + target, data=forged, timeout=GUARD,
                     headers={**headers, **signed})
    assert r.status_code == 401 and r.json()["error"] == "bad_signature", r.text
    assert get(server, sid, target).status_code == 404


# -- #5: every header with meaning is signed; generations are bounded -------------------------

def test_a_tampered_generation_header_is_refused(blockservers):
    server = blockservers(1, secret=SECRET)[0]
    sid = server_id(server)
    target = "/v1/registers/root"
    headers = {protocol.H_GENERATION: "1"}
    signed = sign("PUT", target, b"value", server_id=sid, headers=headers)
    r = requests.put(server.url + target, data=b"value", timeout=GUARD,
                     headers={**signed, protocol.H_GENERATION: str(2 ** 64 - 1)})
    assert r.status_code == 401, r.text
    assert get(server, sid, target).status_code == 404


@pytest.mark.parametrize("field,value", [
    (protocol.H_GENERATION, str(2 ** 63)),
    (protocol.H_GENERATION, str(2 ** 64)),
    ("X-Fusefs-Expect-Generation", str(2 ** 64)),
    (protocol.H_GENERATION, "9" * 5000),
])
def test_generations_from_2_63_are_400(blockservers, field, value):
    server = blockservers(1, secret=SECRET)[0]
    sid = server_id(server)
    target = "/v1/registers/root"
    headers = {protocol.H_GENERATION: "1", field: value}
    r = requests.put(server.url + target, data=b"v", timeout=GUARD,
                     headers={**headers, **sign("PUT", target, b"v", server_id=sid,
                                                headers=headers)})
    assert r.status_code == 400 and r.json()["error"] == "bad_generation", r.text
    assert get(server, sid, target).status_code == 404


# -- #6: a request is for one server, once, also across restarts ------------------------------

def test_a_delete_signed_for_one_server_is_refused_by_another(blockservers):
    a, b = blockservers(2, secret=SECRET)
    ids = {s.url: server_id(s) for s in (a, b)}
    data = os.urandom(1000)
    block_id, r = put_block(a, ids[a.url], data)
    assert r.status_code == 201, r.text
    _, r = put_block(b, ids[b.url], data, block_id)
    assert r.status_code == 201, r.text
    target = f"/v1/blocks/{block_id}"
    captured = sign("DELETE", target, server_id=ids[a.url])
    assert requests.delete(a.url + target, headers=captured, timeout=GUARD).status_code == 204
    r = requests.delete(b.url + target, headers=captured, timeout=GUARD)
    assert r.status_code == 401, r.text
    assert get(b, ids[b.url], target).content == data


@pytest.mark.parametrize("ahead", [0, 4])
def test_a_captured_delete_is_refused_after_a_restart(blockservers, ahead):
    """`ahead`: the client's clock runs that many seconds fast, so the request is dated
    after the restart; the server must still know it took it."""
    server = blockservers(1, secret=SECRET)[0]
    sid = server_id(server)
    data = os.urandom(1000)
    block_id, r = put_block(server, sid, data)
    assert r.status_code == 201
    target = f"/v1/blocks/{block_id}"
    captured = sign("DELETE", target, server_id=sid, now=time.time() + ahead)
    assert requests.delete(server.url + target, headers=captured,
                           timeout=GUARD).status_code == 204
    assert requests.delete(server.url + target, headers=captured,
                           timeout=GUARD).status_code == 401
    _, r = put_block(server, sid, data, block_id)  # the block is written again
    assert r.status_code == 201
    server.restart()
    r = requests.delete(server.url + target, headers=captured, timeout=GUARD)
    assert r.status_code == 401, r.text
    assert get(server, sid, target).content == data


# -- #7: strangers cannot take every connection slot ------------------------------------------

def _stranger(server, source: str, send: bool):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=GUARD,
                                    source_address=(source, 0))
    if send:
        sock.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(65536)
    return sock


def test_unauthenticated_connections_cannot_lock_out_signed_clients(blockservers):
    server = blockservers(1, secret=SECRET)[0]
    sid = server_id(server)
    held = []
    try:
        for i in range(256):  # the default --max-connections, from 8 loopback addresses
            try:
                held.append(_stranger(server, f"127.0.0.{2 + i % 8}", send=i % 2 == 0))
            except OSError:
                pass  # refused or cut: the server defends itself
        # A deliberate pause, not synchronisation (the accept queue already puts every
        # stranger before the signed client): the strangers hold their slots a while.
        time.sleep(0.3)
        for _ in range(3):
            r = get(server, sid, "/v1/status")
            assert r.status_code == 200, r.text
    finally:
        for sock in held:
            sock.close()


def test_a_401_closes_the_connection(blockservers):
    server = blockservers(1, secret=SECRET)[0]
    with socket.create_connection(("127.0.0.1", server.port), timeout=GUARD) as sock:
        sock.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        deadline = time.monotonic() + GUARD
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        assert got.startswith(b"HTTP/1.1 401"), got[:100]
        assert b"Connection: close" in got


# -- #16: duplicates and bytes read per batch are bounded -------------------------------------

def test_duplicate_ids_in_a_batch_check_are_read_once(blockservers):
    server = blockservers(1, secret=SECRET, args=["--max-batch-size", "3MiB"])[0]
    sid = server_id(server)
    ids = [put_block(server, sid, os.urandom(1 << 20))[0] for _ in range(5)]
    body = b"".join(protocol.encode_batch({"ids": [ids[0]] * 300, "verify": True}))
    r = requests.post(server.url + "/v1/batch/check", data=body, timeout=GUARD,
                      headers=sign("POST", "/v1/batch/check", body, server_id=sid))
    assert r.status_code == 200, r.text
    assert [e["status"] for e in r.json()["blocks"]] == [200]
    body = b"".join(protocol.encode_batch({"ids": ids, "verify": True}))
    r = requests.post(server.url + "/v1/batch/check", data=body, timeout=GUARD,
                      headers=sign("POST", "/v1/batch/check", body, server_id=sid))
    statuses = [e["status"] for e in r.json()["blocks"]]
    assert statuses == [200, 200, 200, 413, 413], statuses  # 3 MiB read, the rest: ask again


def test_one_process_holds_a_bounded_number_of_connections_per_server(blockservers):
    server = blockservers(1, secret=SECRET)[0]
    transport = Transport(TransportConfig(secret=SECRET))
    member = members_of([server])[0]
    block_id = protocol.new_block_id()
    data = os.urandom(100_000)
    transport.put_block(member, block_id, data, protocol.checksum(data))

    readers = 48
    all_read, measured = threading.Barrier(readers + 1), threading.Event()

    def read(_):
        for _ in range(5):
            assert transport.get_block(member, block_id) == data
        all_read.wait(GUARD)
        measured.wait(GUARD)  # the readers (and whatever they hold) stay alive meanwhile

    with ThreadPoolExecutor(readers) as pool:
        done = list(map(lambda i: pool.submit(read, i), range(readers)))
        all_read.wait(GUARD)
        text = transport.call(member, "GET", "/metrics").content.decode()
        measured.set()
        for future in done:
            future.result()
    open_now = float(text.split("\nblockserver_open_connections ")[1].split()[0])
    assert open_now <= transport.config.pool_size, open_now


# -- #17: numbers too long are 4xx, never a dropped connection --------------------------------

@pytest.mark.parametrize("field", ["Content-Length", protocol.H_DATE])
def test_numbers_of_thousands_of_digits_get_an_answer(blockservers, field):
    server = blockservers(1, secret=SECRET)[0]
    signed = sign("PUT", "/v1/registers/x", b"", server_id="")
    head = {"Content-Length": "0", **signed, field: "1" * 5000}
    raw = "PUT /v1/registers/x HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=GUARD) as sock:
        sock.sendall(raw.encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]


# -- #18: answers are authenticated; roles -----------------------------------------------------

class ForgingProxy:
    """A man in the middle on loopback: relays to `target_port` and, in the server's
    answers, replaces `old` by `new` (same length) and drops the server-id header."""

    def __init__(self, target_port: int, old: bytes, new: bytes, drop_id: bool = False):
        self.target_port, self.old, self.new, self.drop_id = target_port, old, new, drop_id
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True),
                             daemon=True).start()

    def _pipe(self, src, dst, answers: bool):
        try:
            while True:
                chunk = src.recv(1 << 20)
                if not chunk:
                    break
                if answers:
                    chunk = chunk.replace(self.old, self.new)
                    if self.drop_id:
                        chunk = chunk.replace(b"X-Fusefs-Server-Id:", b"X-Fusefs-Server-Xx:")
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def test_a_forged_answer_is_refused_by_the_client(blockservers):
    server = blockservers(1, secret=SECRET)[0]
    member = members_of([server])[0]
    transport = Transport(TransportConfig(secret=SECRET))
    transport.register_put(member, "root", 1, b"the real superblock")
    proxy = ForgingProxy(server.port, b"the real superblock", b"the FAKE superblock")
    try:
        forged = Member(member.id, f"http://127.0.0.1:{proxy.port}")
        with pytest.raises(errors.AuthenticationFailed):
            Transport(TransportConfig(secret=SECRET)).register_get(forged, "root")
        # A client that signs with BLAKE3 (its status answer offered it) refuses it too,
        # and so does its second try with SHA-256.
        learnt = Transport(TransportConfig(secret=SECRET))
        learnt.status(forged)
        assert learnt._algorithm(forged) == protocol.BLAKE3
        with pytest.raises(errors.AuthenticationFailed):
            learnt.register_get(forged, "root")
    finally:
        proxy.close()


def test_blake3_with_servers_that_offer_it_sha256_with_the_others_and_after_a_downgrade(
        blockservers, monkeypatch):
    """Digests are agreed per server: a client signs with BLAKE3 only once a server's
    signed answer said it takes it. A server without it (FUSEFS_DIGESTS=sha256 plays one
    from before) gets SHA-256. One restarted without it at the same URL refuses the next
    BLAKE3 request; the client sends it again with SHA-256 and keeps to SHA-256."""
    new = blockservers(1, secret=SECRET)[0]
    monkeypatch.setenv("FUSEFS_DIGESTS", "sha256")
    old = blockservers(1, secret=SECRET)[0]
    monkeypatch.delenv("FUSEFS_DIGESTS")
    transport = Transport(TransportConfig(secret=SECRET))
    used = []
    real = protocol.content_digest

    def noting(*parts, algorithm=protocol.SHA256):
        used.append(algorithm)
        return real(*parts, algorithm=algorithm)

    monkeypatch.setattr(protocol, "content_digest", noting)
    data = os.urandom(100_000)
    checksum = protocol.checksum(data)
    for server, expected in ((new, protocol.BLAKE3), (old, protocol.SHA256)):
        member = members_of([server])[0]
        transport.status(member)
        block_id = protocol.new_block_id()
        used.clear()
        assert transport.put_block(member, block_id, data, checksum)
        assert transport.get_block(member, block_id) == data
        assert set(used) == {expected}, server.url

    member = members_of([new])[0]
    new.stop()
    monkeypatch.setenv("FUSEFS_DIGESTS", "sha256")
    new.start()  # same port and data, now without BLAKE3
    monkeypatch.delenv("FUSEFS_DIGESTS")
    assert transport._algorithm(member) == protocol.BLAKE3  # not told yet
    block_id = protocol.new_block_id()
    assert transport.put_block(member, block_id, data, checksum)
    assert transport.get_block(member, block_id) == data
    assert transport._algorithm(member) == protocol.SHA256


def test_a_content_hash_of_a_digest_the_server_lacks_is_refused(blockservers, monkeypatch):
    monkeypatch.setenv("FUSEFS_DIGESTS", "sha256")
    server = blockservers(1, secret=SECRET)[0]
    monkeypatch.delenv("FUSEFS_DIGESTS")
    sid = server_id(server)
    data = os.urandom(4096)
    target = f"/v1/blocks/{protocol.new_block_id()}"
    headers = {protocol.H_CHECKSUM: protocol.checksum(data)}
    signed = sign("PUT", target, data, server_id=sid, headers=headers, algorithm="blake3")
    r = requests.put(server.url + target, data=data, timeout=GUARD,
                     headers={**headers, **signed})
    assert r.status_code == 401 and "sha256" in r.json()["message"], r.text
    assert r.headers[protocol.H_DIGESTS] == "sha256"
    assert get(server, sid, target).status_code == 404


def test_a_block_stored_again_after_a_delete_is_answered_with_its_new_bytes_signed(
        blockservers):
    """The server remembers the SHA-256 of the blocks it stores so as not to hash them
    again for each signed GET. An id deleted and stored again with other bytes (allowed:
    immutability holds while a block exists) must be answered with the new bytes under a
    signature of the new bytes, which the client checks; and the digest of a block stored
    by an unsigned-digest path (a batch) is taken when it is first read."""
    server = blockservers(1, secret=SECRET)[0]
    member = members_of([server])[0]
    transport = Transport(TransportConfig(secret=SECRET))
    block_id, old, new = protocol.new_block_id(), os.urandom(5000), os.urandom(7000)
    transport.put_block(member, block_id, old, protocol.checksum(old))
    assert transport.get_block(member, block_id) == old
    assert transport.get_block(member, block_id) == old  # the remembered digest
    transport.delete_block(member, block_id)
    transport.put_block(member, block_id, new, protocol.checksum(new))
    assert transport.get_block(member, block_id) == new
    assert transport.batch_delete(member, [block_id]) == 1  # the batch delete forgets too
    transport.put_block(member, block_id, old, protocol.checksum(old))
    assert transport.get_block(member, block_id) == old
    batched = protocol.new_block_id()
    transport.batch_put(member, [(batched, new, protocol.checksum(new))])
    for _ in range(2):
        assert transport.get_block(member, batched) == new


def test_a_missing_server_id_is_refused_when_a_secret_is_in_use(blockservers):
    server = blockservers(1, secret=SECRET)[0]
    member = members_of([server])[0]
    proxy = ForgingProxy(server.port, b"unused", b"unused", drop_id=True)
    try:
        moved = Member(member.id, f"http://127.0.0.1:{proxy.port}")
        with pytest.raises((errors.WrongServer, errors.AuthenticationFailed)):
            Transport(TransportConfig(secret=SECRET)).status(moved)
    finally:
        proxy.close()


def test_a_server_without_the_key_cannot_feed_blocks(blockservers):
    rogue = blockservers(1)[0]  # no secret: it answers anyone, signs nothing
    member = members_of([rogue])[0]
    data = os.urandom(1000)
    block_id = protocol.new_block_id()
    Transport(TransportConfig()).put_block(member, block_id, data, protocol.checksum(data))
    with pytest.raises(errors.AuthenticationFailed):
        Transport(TransportConfig(secret=SECRET)).get_block(member, block_id)


def test_the_read_only_key_reads_but_cannot_write_or_delete(blockservers, tmp_path):
    server = blockservers(1, secret=SECRET)[0]
    member = members_of([server])[0]
    writer = Transport(TransportConfig(secret=SECRET))
    data = os.urandom(1000)
    block_id = protocol.new_block_id()
    writer.put_block(member, block_id, data, protocol.checksum(data))
    writer.register_put(member, "root", 1, b"v1")
    key_file = str(tmp_path / "read.key")
    protocol.write_read_key_file(SECRET, key_file)
    assert os.stat(key_file).st_mode & 0o077 == 0
    config = TransportConfig.from_key_file(key_file)
    assert config.role == protocol.ROLE_READ and SECRET not in open(key_file, "rb").read()
    reader = Transport(config)
    assert reader.get_block(member, block_id) == data
    assert reader.register_get(member, "root") == (1, b"v1")
    assert reader.batch_check(member, [block_id])[0]["status"] == 200
    assert reader.status(member)["server_id"] == member.id
    other = protocol.new_block_id()
    for attempt in (lambda: reader.delete_block(member, block_id),
                    lambda: reader.put_block(member, other, data, protocol.checksum(data)),
                    lambda: reader.register_put(member, "root", 2, b"evil"),
                    lambda: reader.batch_delete(member, [block_id])):
        with pytest.raises(errors.Rejected, match="read-only key"):
            attempt()
    assert writer.get_block(member, block_id) == data
    assert writer.register_get(member, "root") == (1, b"v1")
    # a read key claiming the write role is just a wrong signature
    forged = Transport(TransportConfig(secret=config.secret))
    with pytest.raises(errors.AuthenticationFailed):
        forged.delete_block(member, block_id)
    with pytest.raises(protocol.SecretError):
        protocol.load_secret(key_file)  # a server cannot be started with a read key


def test_a_member_known_by_url_only_gets_its_id_from_a_signed_answer(blockservers):
    server = blockservers(1, secret=SECRET)[0]
    transport = Transport(TransportConfig(secret=SECRET))
    anonymous = Member("", server.url)
    transport.register_put(anonymous, "root", 1, b"v1")
    assert transport.register_get(anonymous, "root") == (1, b"v1")


# -- P8: no secret beyond loopback without --insecure ------------------------------------------

def test_serving_beyond_loopback_without_a_secret_is_refused(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "blockserver", "serve", "--data",
                             str(tmp_path / "d"), "--listen", "0.0.0.0:0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("blockserver started on 0.0.0.0 without a secret")
    assert proc.returncode != 0 and b"serving" not in out
    assert b"--secret-file" in err and b"--insecure" in err, err[-500:]


def test_signed_clients_keep_working_through_the_whole_api(blockservers, make_cluster):
    servers = blockservers(3, secret=SECRET)
    store = make_cluster(servers, secret=SECRET)
    items = {protocol.new_block_id(): os.urandom(n) for n in (10, 70_000, 1 << 20)}
    for block_id, data in items.items():
        store.put(block_id, data, protocol.checksum(data))
    for block_id, data in items.items():
        assert store.get(block_id, protocol.checksum(data)) == data



# -- unit tests of one layer: an unexpected error, and the nonce memory's bound --------------

def test_an_unexpected_error_in_a_handler_is_a_500_not_a_dropped_connection(tmp_path,
                                                                             caplog):
    from types import SimpleNamespace

    from blockserver.api import Api, ApiConfig
    from blockserver.http11 import Request
    from blockserver.metrics import Metrics
    from blockserver.store import BlockStore

    store = BlockStore(str(tmp_path / "data"))
    api = Api(store, ApiConfig(), Metrics())

    def broken(block_id):
        raise RuntimeError("a bug")

    store.get = broken
    block_id = protocol.new_block_id()
    request = Request(method="GET", target=f"/v1/blocks/{block_id}",
                      path=f"/v1/blocks/{block_id}", query={}, headers={}, content_length=0,
                      conn=SimpleNamespace(authenticated=False))
    response = api.handle(request)
    assert response.status == 500
    assert "a bug" in caplog.text


def test_the_nonce_memory_is_bounded_and_refuses_replays(tmp_path):
    from blockserver.http11 import HttpError
    from blockserver.replay import NonceBook

    (tmp_path / "ahead").mkdir()
    book = NonceBook(str(tmp_path), capacity=3)
    now = int(time.time())
    for i in range(3):
        book.remember(f"{i:024x}", now)
    with pytest.raises(HttpError) as full:
        book.remember(f"{9:024x}", now)
    assert full.value.status == 503
    with pytest.raises(HttpError) as replay:
        book.remember(f"{1:024x}", now)
    assert replay.value.status == 401
    # nonces of requests dated ahead of the clock survive a restart; the others are below
    # the new floor anyway
    ahead = NonceBook(str(tmp_path / "ahead"), capacity=3)
    ahead.remember(f"{7:024x}", now + 20)
    ahead.remember(f"{8:024x}", now)
    again = NonceBook(str(tmp_path / "ahead"), capacity=3)
    with pytest.raises(HttpError):
        again.remember(f"{7:024x}", now + 20)
    assert len(again) == 1


# -- TLS: the transport checks the server's certificate against the CA it is given ----------

def test_the_transport_speaks_tls_with_a_ca_file(blockservers, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    server = blockservers(1, secret=SECRET, args=["--tls-cert", str(cert),
                                                  "--tls-key", str(key)])[0]
    member = Member("", server.url)
    transport = Transport(TransportConfig(secret=SECRET, tls_verify=str(cert)))
    data = os.urandom(70_000)
    block_id = protocol.new_block_id()
    assert transport.put_block(member, block_id, data, protocol.checksum(data))
    assert transport.get_block(member, block_id) == data
    with pytest.raises(errors.Unavailable, match="TLS"):
        Transport(TransportConfig(secret=SECRET)).get_block(member, block_id)


def test_a_read_only_cluster_client_reads_and_keeps_servers_usable(blockservers,
                                                                   make_cluster, tmp_path):
    """With the read-only key, a read that finds copies missing still returns the block,
    though the read repairs it starts are refused (403)."""
    from fusefs.cluster import ClusterConfig, ReplicatedStore

    servers = blockservers(3, secret=SECRET)
    writer = make_cluster(servers, secret=SECRET)
    members = list(writer.members)
    data = os.urandom(50_000)
    block_id = protocol.new_block_id()
    writer.put(block_id, data, protocol.checksum(data))
    admin = Transport(TransportConfig(secret=SECRET))
    holders = [m for m in members if admin.batch_check(m, [block_id])[0]["status"] == 200]
    for member in holders[1:]:  # one copy left: a read finds the others missing
        admin.delete_block(member, block_id)
    protocol.write_read_key_file(SECRET, str(tmp_path / "read.key"))
    reader = ReplicatedStore(members, Transport(TransportConfig.from_key_file(
        str(tmp_path / "read.key"))), ClusterConfig(probe_min=0.1, probe_max=0.5))
    reader.start()
    try:
        for _ in range(3):
            assert reader.get(block_id, protocol.checksum(data)) == data
        assert writer.get(block_id, protocol.checksum(data)) == data
    finally:
        reader.close()
