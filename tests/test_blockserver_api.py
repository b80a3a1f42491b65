"""Round trips of every block-server endpoint against a real server process.

Each test talks HTTP to a `blockserver serve` started by the `blockservers` fixture and
checks statuses, headers and bodies against the contract in blockserver/protocol.py and
blockserver/api.py.
"""

from __future__ import annotations

import json
import random
import re
import socket

import pytest

from blockserver import __version__, protocol

from .support import wait_until

CK = protocol.H_CHECKSUM
GEN = protocol.H_GENERATION
EXPECT_GEN = "X-Fusefs-Expect-Generation"


# -- helpers ----------------------------------------------------------------------------------

def block_url(server, block_id: str) -> str:
    return f"{server.url}/v1/blocks/{block_id}"


def put_block(session, server, block_id: str, data: bytes, checksum: str | None = None):
    return session.put(block_url(server, block_id), data=data, timeout=30,
                       headers={CK: protocol.checksum(data) if checksum is None else checksum})


def batch_body(manifest: dict, payloads=()) -> bytes:
    return b"".join(bytes(p) for p in protocol.encode_batch(manifest, payloads))


def batch_post(session, server, op: str, manifest: dict, payloads=()):
    return session.post(f"{server.url}/v1/batch/{op}", data=batch_body(manifest, payloads),
                        timeout=60)


def batch_put(session, server, blocks: list[tuple[str, bytes]], checksums=None):
    """POST /v1/batch/put for (id, data) pairs; checksums override the real ones per index."""
    checksums = checksums or {}
    manifest = {"blocks": [{"id": bid, "size": len(data),
                            "checksum": checksums.get(i, protocol.checksum(data))}
                           for i, (bid, data) in enumerate(blocks)]}
    return batch_post(session, server, "put", manifest, [d for _, d in blocks])


def status(session, server) -> dict:
    r = session.get(f"{server.url}/v1/status", timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    return r.json()


def make_blocks(rng: random.Random, n: int, max_size: int = 4096) -> list[tuple[str, bytes]]:
    return [("%032x" % rng.getrandbits(128), rng.randbytes(rng.randint(0, max_size)))
            for _ in range(n)]


def metric_value(text: str, name: str, labels: str | None = None) -> float:
    """The value of one sample in Prometheus text; labels is the exact `{...}` contents."""
    key = name if labels is None else f"{name}{{{labels}}}"
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {key} in metrics:\n{text}")


@pytest.fixture
def session(server):
    s = server.session()
    yield s
    s.close()


@pytest.fixture
def rng(request):
    return random.Random(request.node.name)


# -- single blocks ----------------------------------------------------------------------------

def test_put_get_head_delete_round_trip(server, session, rng):
    block_id = protocol.new_block_id()
    data = rng.randbytes(100_000)
    digest = protocol.checksum(data)

    r = put_block(session, server, block_id, data)
    assert r.status_code == 201, r.text
    assert r.headers[CK] == digest

    r = session.get(block_url(server, block_id), timeout=10)
    assert r.status_code == 200
    assert r.content == data
    assert r.headers[CK] == digest
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.headers[protocol.H_SERVER_ID] == status(session, server)["server_id"]

    r = session.head(block_url(server, block_id), timeout=10)
    assert r.status_code == 200
    assert r.headers[CK] == digest
    assert int(r.headers["Content-Length"]) == len(data)
    assert r.content == b""

    r = session.delete(block_url(server, block_id), timeout=10)
    assert r.status_code == 204
    assert r.content == b""
    assert session.get(block_url(server, block_id), timeout=10).status_code == 404
    assert session.head(block_url(server, block_id), timeout=10).status_code == 404

    # Deleting what is not there is not an error: the caller's goal is reached.
    r = session.delete(block_url(server, block_id), timeout=10)
    assert r.status_code == 204


def test_status_and_metrics_count_the_spare_files_of_deleted_blocks(server, session, rng):
    (a, da), (b, db) = make_blocks(rng, 2)
    for block_id, data in ((a, da), (b, db)):
        assert put_block(session, server, block_id, data).status_code == 201
    assert status(session, server)["spare_files"] == 0
    assert session.delete(block_url(server, a), timeout=10).status_code == 204
    assert status(session, server)["spare_files"] == 1
    text = session.get(f"{server.url}/metrics", timeout=10).text
    assert metric_value(text, "blockserver_spare_files") == 1
    # the next block written takes the spare
    assert put_block(session, server, *make_blocks(rng, 1)[0]).status_code == 201
    assert status(session, server)["spare_files"] == 0
    assert session.get(block_url(server, b), timeout=10).content == db


def test_head_sends_no_body_on_a_kept_alive_connection(server, session, rng):
    block_id, data = protocol.new_block_id(), rng.randbytes(3000)
    assert put_block(session, server, block_id, data).status_code == 201
    path = f"/v1/blocks/{block_id}"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            assert chunk, "server closed the connection"
            head += chunk
        head, _, extra = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"content-length: {len(data)}".encode() in head.lower()
        assert extra == b""
        # The next answer on the same connection starts right where the HEAD answer ended.
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    assert rest.startswith(b"HTTP/1.1 200 ")
    assert rest.endswith(data)


def test_put_is_idempotent_for_the_same_bytes_and_immutable_otherwise(server, session, rng):
    block_id = protocol.new_block_id()
    data = rng.randbytes(5000)
    assert put_block(session, server, block_id, data).status_code == 201
    before = status(session, server)

    r = put_block(session, server, block_id, data)
    assert r.status_code == 200, r.text

    other = data[:-1] + bytes([data[-1] ^ 1])
    r = put_block(session, server, block_id, other)
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "conflict"

    # Neither the repeat nor the refused overwrite changed what is stored or counted.
    r = session.get(block_url(server, block_id), timeout=10)
    assert r.content == data
    after = status(session, server)
    assert after["block_count"] == before["block_count"]
    assert after["used_bytes"] == before["used_bytes"]


def test_put_with_body_not_matching_checksum_is_refused(server, session, rng):
    block_id = protocol.new_block_id()
    data = rng.randbytes(3000)
    r = put_block(session, server, block_id, data, checksum=protocol.checksum(data + b"!"))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "checksum_mismatch"
    assert session.get(block_url(server, block_id), timeout=10).status_code == 404
    assert status(session, server)["block_count"] == 0


@pytest.mark.parametrize("checksum", [
    None,                                   # header missing
    "",                                     # empty
    "abc",                                  # too short
    "0" * 31 + "g",                         # not hex
    "A" * 32,                               # upper case
    "0" * 33,                               # too long
])
def test_put_with_missing_or_malformed_checksum_header_is_400(server, session, checksum):
    block_id = protocol.new_block_id()
    headers = {} if checksum is None else {CK: checksum}
    r = session.put(block_url(server, block_id), data=b"some bytes", headers=headers,
                    timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_checksum"
    assert session.get(block_url(server, block_id), timeout=10).status_code == 404


def test_zero_length_block(server, session):
    block_id = protocol.new_block_id()
    r = put_block(session, server, block_id, b"")
    assert r.status_code == 201, r.text
    assert r.headers[CK] == protocol.EMPTY_CHECKSUM

    r = session.get(block_url(server, block_id), timeout=10)
    assert r.status_code == 200
    assert r.content == b""
    assert r.headers[CK] == protocol.EMPTY_CHECKSUM
    assert r.headers["Content-Length"] == "0"

    r = session.head(block_url(server, block_id), timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Length"] == "0"
    assert r.headers[CK] == protocol.EMPTY_CHECKSUM

    assert put_block(session, server, block_id, b"").status_code == 200
    st = status(session, server)
    assert st["block_count"] == 1 and st["used_bytes"] == 0


def test_get_of_unknown_block_is_404(server, session):
    r = session.get(block_url(server, protocol.new_block_id()), timeout=10)
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"


def test_bad_block_id_is_400(server, session):
    for bad in ("ABCDEF" + "0" * 26, "0" * 31, "0" * 33, "z" * 32):
        r = session.get(block_url(server, bad), timeout=10)
        assert r.status_code == 400, bad
        assert r.json()["error"] == "bad_id"


def test_unknown_route_is_404_and_wrong_method_on_block_is_405(server, session):
    for path in ("/nope", "/v1/nothing", "/v2/blocks", "/v1/batch/frobnicate"):
        r = session.get(server.url + path, timeout=10)
        assert r.status_code == 404, path
        assert r.json()["error"] == "no_route"
    r = session.post(server.url + "/v1/status", data=b"x", timeout=10)
    assert r.status_code == 404

    block_id = protocol.new_block_id()
    for method in ("POST", "PATCH", "OPTIONS"):
        r = session.request(method, block_url(server, block_id), data=b"x", timeout=10)
        assert r.status_code == 405, method
        assert r.json()["error"] == "bad_method"
    # The refused method did not create anything.
    assert session.get(block_url(server, block_id), timeout=10).status_code == 404


# -- listing ----------------------------------------------------------------------------------

def test_list_pages_through_every_block_exactly_once_in_order(server, session, rng):
    blocks = make_blocks(rng, 2500, max_size=256)
    for start in range(0, len(blocks), 500):
        r = batch_put(session, server, blocks[start:start + 500])
        assert r.status_code == 200, r.text
        assert [x["status"] for x in r.json()["results"]] == [201] * 500
    expected = {bid: (len(data), protocol.checksum(data)) for bid, data in blocks}

    for limit in (1000, 333, 10000):
        seen = []
        after = ""
        pages = 0
        while True:
            params = {"limit": str(limit)}
            if after:
                params["after"] = after
            r = session.get(f"{server.url}/v1/blocks", params=params, timeout=30)
            assert r.status_code == 200, r.text
            page = r.json()
            pages += 1
            assert len(page["blocks"]) <= limit
            for entry in page["blocks"]:
                assert entry["id"] > after
                assert (entry["size"], entry["checksum"]) == expected[entry["id"]], entry
            seen += [entry["id"] for entry in page["blocks"]]
            if page["next"] is None:
                break
            assert page["next"] == page["blocks"][-1]["id"]
            after = page["next"]
            assert pages < 100, "listing does not end"
        assert seen == sorted(expected), f"limit={limit}"
        assert pages >= -(-len(blocks) // limit)

    # Without parameters: the first 1000 in order.
    r = session.get(f"{server.url}/v1/blocks", timeout=30)
    assert r.status_code == 200
    assert [e["id"] for e in r.json()["blocks"]] == sorted(expected)[:1000]

    # `after` is exclusive and need not name an existing block.
    ids = sorted(expected)
    r = session.get(f"{server.url}/v1/blocks", params={"after": ids[1233], "limit": "3"},
                    timeout=30)
    assert [e["id"] for e in r.json()["blocks"]] == ids[1234:1237]
    r = session.get(f"{server.url}/v1/blocks", params={"after": "f" * 32}, timeout=30)
    assert r.json() == {"blocks": [], "next": None}


def test_list_of_empty_store(server, session):
    r = session.get(f"{server.url}/v1/blocks", timeout=10)
    assert r.status_code == 200
    assert r.json() == {"blocks": [], "next": None}


@pytest.mark.parametrize("params, code", [
    ({"after": "xyz"}, "bad_id"),
    ({"after": "A" * 32}, "bad_id"),
    ({"after": "0" * 31}, "bad_id"),
    ({"after": "../../etc/passwd"}, "bad_id"),
    ({"limit": "0"}, "bad_limit"),
    ({"limit": "-1"}, "bad_limit"),
    ({"limit": "abc"}, "bad_limit"),
    ({"limit": "10001"}, "bad_limit"),
    ({"limit": ""}, "bad_limit"),
    ({"limit": "1.5"}, "bad_limit"),
])
def test_list_with_bad_parameters_is_400(server, session, params, code):
    r = session.get(f"{server.url}/v1/blocks", params=params, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == code


# -- batches ----------------------------------------------------------------------------------

def test_batch_put_reports_each_item(server, session, rng):
    existing_id, existing = protocol.new_block_id(), rng.randbytes(2000)
    taken_id, taken = protocol.new_block_id(), rng.randbytes(100)
    assert put_block(session, server, existing_id, existing).status_code == 201
    assert put_block(session, server, taken_id, taken).status_code == 201

    new_id, new = protocol.new_block_id(), rng.randbytes(70_000)
    bad_id, bad = protocol.new_block_id(), rng.randbytes(1000)
    empty_id = protocol.new_block_id()
    other = rng.randbytes(100)
    items = [(new_id, new), (existing_id, existing), (bad_id, bad), (empty_id, b""),
             (taken_id, other)]
    r = batch_put(session, server, items, checksums={2: protocol.checksum(b"other bytes")})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["id"] for x in results] == [i for i, _ in items]
    assert [x["status"] for x in results] == [201, 200, 422, 201, 409]
    assert results[2]["error"] == "checksum_mismatch"
    assert results[4]["error"] == "conflict"

    for block_id, data in ((new_id, new), (existing_id, existing), (empty_id, b""),
                           (taken_id, taken)):
        r = session.get(block_url(server, block_id), timeout=10)
        assert r.status_code == 200 and r.content == data
    assert session.get(block_url(server, bad_id), timeout=10).status_code == 404
    st = status(session, server)
    assert st["block_count"] == 4
    assert st["used_bytes"] == len(new) + len(existing) + len(taken)


@pytest.mark.parametrize("delta", [-1, 1])
def test_batch_put_with_sizes_not_matching_payload_is_400(server, session, rng, delta):
    blocks = make_blocks(rng, 3, max_size=1000)
    manifest = {"blocks": [{"id": bid, "size": len(d), "checksum": protocol.checksum(d)}
                           for bid, d in blocks]}
    payload = b"".join(d for _, d in blocks)
    payload = payload[:delta] if delta < 0 else payload + b"\0" * delta
    r = batch_post(session, server, "put", manifest, [payload])
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_batch"
    # Nothing of a refused batch is stored.
    for bid, _ in blocks:
        assert session.get(block_url(server, bid), timeout=10).status_code == 404


@pytest.mark.parametrize("body", [
    b"no newline at all",
    b"not json\n",
    b"[1, 2]\n",
    b'{"blocks": {"id": 1}}\n',
    b'{"blocks": [{"id": "' + b"0" * 32 + b'", "size": -1, "checksum": "' + b"0" * 32 + b'"}]}\n',
    b'{"blocks": [{"id": "nope", "size": 0, "checksum": "' + b"0" * 32 + b'"}]}\n',
])
def test_batch_put_with_malformed_manifest_is_400(server, session, body):
    r = session.post(f"{server.url}/v1/batch/put", data=body, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_batch"


def test_batch_get_returns_present_payloads_in_order(server, session, rng):
    blocks = make_blocks(rng, 6, max_size=50_000) + [(protocol.new_block_id(), b"")]
    r = batch_put(session, server, blocks)
    assert r.status_code == 200
    missing = [protocol.new_block_id() for _ in range(2)]
    ask = [blocks[3][0], missing[0], blocks[0][0], blocks[6][0], blocks[5][0], missing[1],
           blocks[3][0]]
    r = batch_post(session, server, "get", {"ids": ask})
    assert r.status_code == 200, r.text
    manifest, payload = protocol.decode_batch(r.content)
    entries = manifest["blocks"]
    assert [e["id"] for e in entries] == list(dict.fromkeys(ask))  # a repeated id: once
    data_of = dict(blocks)
    offset = 0
    for entry in entries:
        if entry["id"] in missing:
            assert entry["status"] == 404 and entry["error"] == "not_found"
            continue
        data = data_of[entry["id"]]
        assert entry["status"] == 200
        assert entry["size"] == len(data)
        assert entry["checksum"] == protocol.checksum(data)
        assert bytes(payload[offset:offset + entry["size"]]) == data
        offset += entry["size"]
    assert offset == len(payload)


def test_size_limits(blockservers, rng):
    server = blockservers(1, args=["--max-block-size", "64KiB",
                                   "--max-batch-size", "200KiB"])[0]
    with server.session() as s:
        assert status(s, server)["max_block_size"] == 64 * 1024
        assert status(s, server)["max_batch_bytes"] == 200 * 1024
        at_limit = (protocol.new_block_id(), rng.randbytes(64 * 1024))
        assert put_block(s, server, *at_limit).status_code == 201
        too_big = (protocol.new_block_id(), rng.randbytes(64 * 1024 + 1))
        r = put_block(s, server, *too_big)
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "too_large"
        assert s.get(block_url(server, too_big[0]), timeout=10).status_code == 404

        # A batch put naming a block over the limit is refused as a whole.
        r = batch_put(s, server, [(protocol.new_block_id(), b"x"), too_big])
        assert r.status_code in (400, 413), r.text

        # Batch get stops adding payloads at the batch limit and says which it left out.
        blocks = [(protocol.new_block_id(), rng.randbytes(60 * 1024)) for _ in range(4)]
        for bid, data in blocks:
            assert put_block(s, server, bid, data).status_code == 201
        r = batch_post(s, server, "get", {"ids": [bid for bid, _ in blocks]})
        assert r.status_code == 200, r.text
        manifest, payload = protocol.decode_batch(r.content)
        statuses = [e["status"] for e in manifest["blocks"]]
        assert statuses == [200, 200, 200, 413]
        assert manifest["blocks"][3]["error"] == "batch_full"
        assert bytes(payload) == b"".join(d for _, d in blocks[:3])


def test_batch_get_with_bad_id_is_400(server, session):
    r = batch_post(session, server, "get", {"ids": [protocol.new_block_id(), "bad"]})
    assert r.status_code == 400
    assert r.json()["error"] == "bad_id"
    r = batch_post(session, server, "get", {"nothing": []})
    assert r.status_code == 400
    assert r.json()["error"] == "bad_batch"


@pytest.mark.parametrize("verify", [None, False, True])
def test_batch_check(server, session, rng, verify):
    blocks = make_blocks(rng, 4, max_size=20_000)
    assert batch_put(session, server, blocks).status_code == 200
    missing = protocol.new_block_id()
    ids = [blocks[2][0], missing, blocks[0][0], blocks[1][0], blocks[3][0]]
    manifest = {"ids": ids}
    if verify is not None:
        manifest["verify"] = verify
    r = batch_post(session, server, "check", manifest)
    assert r.status_code == 200, r.text
    entries = r.json()["blocks"]
    assert [e["id"] for e in entries] == ids
    data_of = dict(blocks)
    for entry in entries:
        if entry["id"] == missing:
            assert entry["status"] == 404 and entry["error"] == "not_found"
        else:
            data = data_of[entry["id"]]
            assert entry == {"id": entry["id"], "status": 200, "size": len(data),
                             "checksum": protocol.checksum(data)}


def test_batch_delete(server, session, rng):
    blocks = make_blocks(rng, 5, max_size=3000)
    assert batch_put(session, server, blocks).status_code == 200
    used_before = status(session, server)["used_bytes"]
    gone = [blocks[1], blocks[3]]
    ids = [gone[0][0], protocol.new_block_id(), gone[1][0]]
    r = batch_post(session, server, "delete", {"ids": ids})
    assert r.status_code == 200, r.text
    assert r.json() == {"deleted": 2}
    for bid, data in blocks:
        r = session.get(block_url(server, bid), timeout=10)
        if (bid, data) in gone:
            assert r.status_code == 404
        else:
            assert r.status_code == 200 and r.content == data
    st = status(session, server)
    assert st["block_count"] == 3
    assert st["used_bytes"] == used_before - sum(len(d) for _, d in gone)
    # Again: nothing left to delete, still fine.
    r = batch_post(session, server, "delete", {"ids": ids})
    assert r.json() == {"deleted": 0}


# -- registers --------------------------------------------------------------------------------

def test_register_compare_and_swap(server, session):
    url = f"{server.url}/v1/registers/root.meta"
    assert session.get(url, timeout=10).status_code == 404

    r = session.put(url, data=b"first", headers={GEN: "1"}, timeout=10)
    assert r.status_code == 204, r.text
    r = session.get(url, timeout=10)
    assert r.status_code == 200
    assert r.content == b"first" and r.headers[GEN] == "1"

    # The same generation again is stale, whatever the value.
    r = session.put(url, data=b"second", headers={GEN: "1"}, timeout=10)
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "stale_generation"
    assert r.json()["current"] == 1
    assert r.headers[GEN] == "1"
    assert session.get(url, timeout=10).content == b"first"

    # Generations may skip.
    r = session.put(url, data=b"fifth", headers={GEN: "5"}, timeout=10)
    assert r.status_code == 204
    r = session.get(url, timeout=10)
    assert (r.content, r.headers[GEN]) == (b"fifth", "5")

    # Older than current: stale.
    r = session.put(url, data=b"old", headers={GEN: "3"}, timeout=10)
    assert r.status_code == 409 and r.json()["current"] == 5 and r.headers[GEN] == "5"

    # Expect-Generation must equal the stored one.
    r = session.put(url, data=b"x", headers={GEN: "6", EXPECT_GEN: "4"}, timeout=10)
    assert r.status_code == 409, r.text
    assert r.json()["current"] == 5 and r.headers[GEN] == "5"
    r = session.get(url, timeout=10)
    assert (r.content, r.headers[GEN]) == (b"fifth", "5")
    r = session.put(url, data=b"sixth", headers={GEN: "6", EXPECT_GEN: "5"}, timeout=10)
    assert r.status_code == 204
    r = session.get(url, timeout=10)
    assert (r.content, r.headers[GEN]) == (b"sixth", "6")

    # Expect 0 means "must not exist yet".
    other = f"{server.url}/v1/registers/other"
    r = session.put(other, data=b"", headers={GEN: "2", EXPECT_GEN: "0"}, timeout=10)
    assert r.status_code == 204
    r = session.put(other, data=b"again", headers={GEN: "3", EXPECT_GEN: "0"}, timeout=10)
    assert r.status_code == 409 and r.json()["current"] == 2
    r = session.get(other, timeout=10)
    assert (r.content, r.headers[GEN]) == (b"", "2")


def test_register_survives_restart(server, session):
    url = f"{server.url}/v1/registers/keep"
    value = bytes(range(256)) * 10
    assert session.put(url, data=value, headers={GEN: "7"}, timeout=10).status_code == 204
    session.close()
    server.restart()
    with server.session() as s:
        r = s.get(url, timeout=10)
        assert (r.status_code, r.content, r.headers[GEN]) == (200, value, "7")
        r = s.put(url, data=b"x", headers={GEN: "7"}, timeout=10)
        assert r.status_code == 409 and r.json()["current"] == 7


@pytest.mark.parametrize("headers", [{}, {GEN: "0"}, {GEN: "-1"}, {GEN: "abc"},
                                     {GEN: "1", EXPECT_GEN: "x"}])
def test_register_put_with_bad_generation_is_400(server, session, headers):
    url = f"{server.url}/v1/registers/r1"
    r = session.put(url, data=b"v", headers=headers, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_generation"
    assert session.get(url, timeout=10).status_code == 404


def test_register_bad_name_and_method(server, session):
    r = session.get(f"{server.url}/v1/registers/Upper", timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "bad_name"
    r = session.get(f"{server.url}/v1/registers/.hidden", timeout=10)
    assert r.status_code == 400
    r = session.delete(f"{server.url}/v1/registers/fine", timeout=10)
    assert r.status_code == 405


# -- status and metrics -----------------------------------------------------------------------

def test_status_fields_track_puts_and_deletes_and_survive_restart(server, session, rng):
    st = status(session, server)
    assert re.fullmatch(r"[0-9a-f]{32}", st["server_id"])
    assert st["version"] == __version__
    assert st["block_count"] == 0 and st["used_bytes"] == 0
    assert st["corrupt_blocks_found"] == 0
    assert st["capacity_bytes"] > 0
    assert 0 <= st["free_bytes"] <= st["capacity_bytes"]
    assert isinstance(st["uptime_seconds"], (int, float)) and st["uptime_seconds"] >= 0
    server_id = st["server_id"]

    blocks = make_blocks(rng, 10, max_size=100_000)
    for bid, data in blocks[:4]:
        assert put_block(session, server, bid, data).status_code == 201
    assert batch_put(session, server, blocks[4:]).status_code == 200
    put_block(session, server, blocks[0][0], blocks[0][1])  # a repeat counts nothing
    st = status(session, server)
    assert st["block_count"] == 10
    assert st["used_bytes"] == sum(len(d) for _, d in blocks)

    for bid, _ in blocks[:3]:
        assert session.delete(block_url(server, bid), timeout=10).status_code == 204
    session.delete(block_url(server, blocks[0][0]), timeout=10)  # a repeat counts nothing
    st = status(session, server)
    assert st["block_count"] == 7
    used = sum(len(d) for _, d in blocks[3:])
    assert st["used_bytes"] == used

    session.close()
    server.restart()
    with server.session() as s:
        st2 = status(s, server)
        assert st2["server_id"] == server_id
        assert s.get(f"{server.url}/v1/blocks", timeout=10).headers[
            protocol.H_SERVER_ID] == server_id
        assert st2["block_count"] == 7
        assert st2["used_bytes"] == used


def test_metrics(server, session, rng):
    data = rng.randbytes(12_345)
    block_id = protocol.new_block_id()
    assert put_block(session, server, block_id, data).status_code == 201
    assert session.get(block_url(server, block_id), timeout=10).status_code == 200
    assert session.get(block_url(server, block_id), timeout=10).status_code == 200
    assert session.get(block_url(server, protocol.new_block_id()), timeout=10).status_code == 404
    assert session.get(server.url + "/v1/status", timeout=10).status_code == 200

    # The server records a request after answering it; poll until all five are counted
    # (wait_until's timeout only stops a hang: a slow machine just takes longer).
    def counted():
        r = session.get(server.url + "/metrics", timeout=10)
        assert r.status_code == 200
        return (r, r.text) if metric_value(r.text, "blockserver_request_seconds_count") >= 5 \
            else None

    r, text = wait_until(counted, "the five requests counted in the metrics", interval=0.05)
    assert r.headers["Content-Type"].startswith("text/plain")

    route = 'route="/v1/blocks/{id}"'
    assert metric_value(text, "blockserver_requests_total",
                        f'method="PUT",{route},status="201"') == 1
    assert metric_value(text, "blockserver_requests_total",
                        f'method="GET",{route},status="200"') == 2
    assert metric_value(text, "blockserver_requests_total",
                        f'method="GET",{route},status="404"') == 1
    assert metric_value(text, "blockserver_requests_total",
                        'method="GET",route="/v1/status",status="200"') >= 1
    # No raw block id ever becomes a label.
    assert block_id not in text
    assert metric_value(text, "blockserver_received_bytes_total") >= len(data)
    assert metric_value(text, "blockserver_sent_bytes_total") >= 2 * len(data)
    buckets = [float(m.group(1)) for m in
               re.finditer(r'^blockserver_request_seconds_bucket\{le="[^"]+"\} (\S+)$', text,
                           re.M)]
    assert len(buckets) >= 2 and buckets == sorted(buckets)
    assert metric_value(text, "blockserver_request_seconds_bucket", 'le="+Inf"') == \
        metric_value(text, "blockserver_request_seconds_count") >= 5
    assert metric_value(text, "blockserver_blocks") == 1
    assert metric_value(text, "blockserver_block_bytes") == len(data)
    assert metric_value(text, "blockserver_corrupt_blocks_found_total") == 0
    assert "# TYPE blockserver_requests_total counter" in text
    assert "# TYPE blockserver_request_seconds histogram" in text

    session.delete(block_url(server, block_id), timeout=10)
    text = session.get(server.url + "/metrics", timeout=10).text
    assert metric_value(text, "blockserver_blocks") == 0
    assert metric_value(text, "blockserver_block_bytes") == 0


def test_error_bodies_are_json_with_code_and_message(server, session):
    r = session.get(block_url(server, protocol.new_block_id()), timeout=10)
    body = json.loads(r.content)
    assert set(body) >= {"error", "message"}
    assert r.headers["Content-Type"] == "application/json"
