"""A client on a block server's host reads that server's block files directly
(blockserver/protocol/files.py), and whatever those files hold, returns only verified bytes
and leaves damage to the server's own checks and the client's repair."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from blockserver import protocol
from fusefs.placement import rank

from .support import members_of, wait_until

GET_OK = 'method="GET",route="/v1/blocks/{id}",status="200"'


def random_block(size: int):
    data = random.randbytes(size)
    return protocol.new_block_id(), data, protocol.checksum(data)


def block_gets(server) -> float:
    """Block GETs the server answered 200, from its metrics (0 before the first)."""
    text = server.session().get(f"{server.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f"blockserver_requests_total{{{GET_OK}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def first_home(servers, block_id: str):
    members = members_of(servers)
    first = rank(block_id, members)[0]
    return servers[[m.id for m in members].index(first.id)]


def stored_on(server, block_id: str) -> bytes | None:
    r = server.session().get(f"{server.url}/v1/blocks/{block_id}", timeout=5)
    return r.content if r.status_code == 200 else None


def file_of(server, block_id: str) -> str:
    return protocol.block_file(server.data_dir, block_id)


def from_files(store) -> int:
    return sum(s["blocks_read_from_files"] for s in store.stats()["servers"])


@pytest.fixture
def local_cluster(blockservers, make_cluster):
    """Three servers on this host and a store that reads their files (with a secret, so
    the status naming the files is a signed answer)."""
    secret = os.urandom(32).hex().encode()  # (raw bytes may end in a stripped newline)
    servers = blockservers(3, secret=secret)
    return servers, make_cluster(servers, secret=secret, local_reads=True)


def test_the_status_names_the_data_directory_and_the_token_written_there(server):
    local = server.session().get(f"{server.url}/v1/status", timeout=5).json()["local"]
    assert local["root"] == os.path.abspath(server.data_dir)
    assert protocol.read_token(server.data_dir) == local["token"]
    old = local["token"]
    server.restart()
    local = server.session().get(f"{server.url}/v1/status", timeout=5).json()["local"]
    assert local["token"] != old and protocol.read_token(server.data_dir) == local["token"]


def test_blocks_on_this_host_are_read_from_their_files_not_over_http(local_cluster):
    servers, store = local_cluster
    assert all(s["files_read_directly"] for s in store.stats()["servers"])
    blocks = [random_block(random.choice([0, 1, 4096, 200_000, 1 << 20])) for _ in range(30)]
    for block in blocks:
        store.put(*block)
    gets_before = sum(block_gets(s) for s in servers)
    for block_id, data, checksum in blocks[:15]:
        assert store.get(block_id, checksum) == data
    got = store.get_many([(b, c) for b, _, c in blocks[15:]])
    assert got == {b: d for b, d, _ in blocks[15:]}
    assert from_files(store) == 30
    assert sum(block_gets(s) for s in servers) == gets_before


def test_turned_off_every_block_is_read_over_http(blockservers, make_cluster):
    servers = blockservers(3)
    store = make_cluster(servers, local_reads=False)
    block_id, data, checksum = random_block(70_000)
    store.put(block_id, data, checksum)
    assert store.get(block_id, checksum) == data
    assert not any(s["files_read_directly"] for s in store.stats()["servers"])
    assert from_files(store) == 0 and sum(block_gets(s) for s in servers) == 1


def _flip_a_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def _delete(path: str) -> None:
    os.unlink(path)


@pytest.mark.parametrize("damage", [_flip_a_byte, _truncate, _delete])
def test_a_damaged_or_missing_file_is_read_elsewhere_and_repaired(local_cluster, damage):
    """The bad file is never returned; the server it belongs to is asked first, finds its
    copy bad or missing, and the client puts a verified copy back."""
    servers, store = local_cluster
    block_id, data, checksum = random_block(300_000)
    store.put(block_id, data, checksum)
    first = first_home(servers, block_id)
    wait_until(lambda: os.path.exists(file_of(first, block_id)), "the first home's copy")
    damage(file_of(first, block_id))
    assert store.get(block_id, checksum) == data
    wait_until(lambda: stored_on(first, block_id) == data, "the copy repaired")
    assert protocol.read_block_file(first.data_dir, block_id, checksum) == data


def test_a_file_holding_another_blocks_bytes_is_not_taken_for_this_block(local_cluster):
    """A valid block file under the wrong name (a recycled inode read at the wrong moment
    looks the same): its header names another checksum, so it is not read as this one."""
    servers, store = local_cluster
    one, other = random_block(50_000), random_block(50_000)
    store.put(*one)
    store.put(*other)
    first = first_home(servers, one[0])
    path = file_of(first, one[0])
    wait_until(lambda: os.path.exists(path), "the first home's copy")
    other_home = next(s for s in servers if os.path.exists(file_of(s, other[0])))
    shutil.copyfile(file_of(other_home, other[0]), path)
    assert store.get(one[0], one[2]) == one[1]
    assert store.get_many([(one[0], one[2])]) == {one[0]: one[1]}


def test_a_directory_whose_token_is_not_the_servers_is_not_read(local_cluster):
    """The status names a directory, but the token there is not the one of the status (on
    another host the same path is another server's, or nobody's): blocks go over HTTP."""
    servers, store = local_cluster
    block_id, data, checksum = random_block(10_000)
    store.put(block_id, data, checksum)
    for s in servers:
        with open(os.path.join(s.data_dir, protocol.TOKEN_FILE), "w") as f:
            f.write("0" * 32 + "\n")
    store._refresh_space()  # a heartbeat: every status asked again
    assert not any(s["files_read_directly"] for s in store.stats()["servers"])
    gets_before = sum(block_gets(s) for s in servers)
    assert store.get(block_id, checksum) == data
    assert from_files(store) == 0
    wait_until(lambda: sum(block_gets(s) for s in servers) == gets_before + 1, "one GET")


@pytest.mark.expect_log("cannot read the block files of")
def test_files_that_cannot_be_read_send_reads_over_http_until_the_next_status(
        local_cluster, monkeypatch, caplog):
    """A permission or I/O error (simulated: tests run as root, who may read anything)
    turns direct reads of that server off, with a warning, until its next status."""
    servers, store = local_cluster
    block_id, data, checksum = random_block(10_000)
    store.put(block_id, data, checksum)
    first = first_home(servers, block_id)
    wait_until(lambda: os.path.exists(file_of(first, block_id)), "the first home's copy")

    def refused(root, block_id, checksum):
        raise PermissionError(13, "Permission denied", protocol.block_file(root, block_id))

    monkeypatch.setattr(protocol, "read_block_file", refused)
    gets_before = block_gets(first)
    assert store.get(block_id, checksum) == data
    wait_until(lambda: block_gets(first) == gets_before + 1, "the GET counted")
    assert "cannot read the block files of " + first.url in caplog.text
    direct = {s["url"]: s["files_read_directly"] for s in store.stats()["servers"]}
    assert direct[first.url] is False and sum(direct.values()) == 2
    monkeypatch.undo()
    store._refresh_space()
    assert all(s["files_read_directly"] for s in store.stats()["servers"])
    assert store.get(block_id, checksum) == data and from_files(store) == 1


def test_a_restarted_server_is_read_directly_again_after_its_next_status(local_cluster):
    servers, store = local_cluster
    servers[0].restart()  # a new token: until its next status, the old one is refused
    store._refresh_space()
    assert all(s["files_read_directly"] for s in store.stats()["servers"])
    block_id, data, checksum = random_block(10_000)
    store.put(block_id, data, checksum)
    assert store.get(block_id, checksum) == data and from_files(store) == 1


def test_a_server_marked_down_is_not_read_from_its_files(local_cluster):
    """Local reads follow the server's health as HTTP reads do: a stopped server's files
    stay on disk but are not read; another copy is."""
    servers, store = local_cluster
    block_id, data, checksum = random_block(10_000)
    store.put(block_id, data, checksum)
    first = first_home(servers, block_id)
    wait_until(lambda: os.path.exists(file_of(first, block_id)), "the first home's copy")
    first.stop()
    member = next(m for m in store.members if m.url == first.url)
    wait_until(lambda: _marked_down(store, member), "the stopped server marked down")
    assert store.get(block_id, checksum) == data
    counts = {s["url"]: s["blocks_read_from_files"] for s in store.stats()["servers"]}
    assert counts[first.url] == 0 and sum(counts.values()) == 1


def _marked_down(store, member) -> bool:
    """Ask every server something; True once `member` is marked down."""
    store.has_many([protocol.new_block_id()])
    return not store.health.usable(member.id)


# -- through a mount -----------------------------------------------------------------------

def _status(m) -> dict:
    return json.loads(m.cli("status", "--json", m.path).stdout)[0]


def _cached_blocks(cache_dir: str) -> int:
    return sum(len(files) for _, _, files in os.walk(cache_dir)
               if any(protocol.is_block_id(f) for f in files))


@pytest.mark.parametrize("flag", [(), ("--no-local-reads",)], ids=["default", "turned-off"])
def test_a_mount_reads_a_file_from_the_servers_files_unless_told_not_to(fusefs_mount,
                                                                          tmp_path, flag):
    """A mount beside its servers reads the file's blocks from their files, and keeps no
    copy in its disk cache; with --no-local-reads it fetches them over HTTP and keeps
    them, as a mount on another host does."""
    m = fusefs_mount()
    data = random.randbytes(5 << 20)
    with open(os.path.join(m.path, "f"), "wb") as f:
        f.write(data)
    m.umount()
    m.mount(*flag, cache_dir=str(tmp_path / "cold"))  # nothing of the file cached
    gets_before = sum(block_gets(s) for s in m.servers)
    with open(os.path.join(m.path, "f"), "rb") as f:
        assert f.read() == data

    def counted():  # the status file is written every few seconds
        status = _status(m)
        servers = status["cluster"]["servers"]
        read = sum(s["blocks_read_from_files"] for s in servers) + status["cache"]["fetches"]
        return (servers, status["cache"]) if read >= 5 else None

    servers, cache = wait_until(counted, "the five blocks counted in the status")
    m.umount()  # the disk writer finishes before the daemon exits
    direct = sum(s["blocks_read_from_files"] for s in servers)
    if flag:
        assert not any(s["files_read_directly"] for s in servers) and direct == 0
        assert sum(block_gets(s) for s in m.servers) > gets_before
        assert _cached_blocks(str(tmp_path / "cold")) == 5
    else:
        assert all(s["files_read_directly"] for s in servers)
        assert direct >= 5  # (and the checkpoint's blocks, read at the mount)
        assert sum(block_gets(s) for s in m.servers) == gets_before
        assert cache["local_skips"] == 5 and _cached_blocks(str(tmp_path / "cold")) == 0


def test_random_reads_of_a_file_read_before_take_parts_of_the_servers_files(fusefs_mount,
                                                                            tmp_path):
    """After one whole read, a random reader's misses (memory cache smaller than the file,
    page cache dropped) read a segment of a server's file each, checked, not the whole
    block; and the bytes are right."""
    m = fusefs_mount()
    data = random.randbytes(8 << 20)
    with open(os.path.join(m.path, "f"), "wb") as f:
        f.write(data)
    m.umount()
    m.mount("--memory-cache", "2MiB", cache_dir=str(tmp_path / "cold"))
    path = os.path.join(m.path, "f")
    with open(path, "rb") as f:
        assert f.read() == data
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    rng = random.Random(3)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(200):
            at = rng.randrange(len(data) - 4096)
            assert os.pread(fd, 4096, at) == data[at:at + 4096]
    finally:
        os.close(fd)

    def counted():
        cache = _status(m)["cache"]
        return cache if cache["hits_local"] >= 50 else None

    cache = wait_until(counted, "parts read from the servers' files in the status")
    assert cache["local_skips"] >= 8
    m.umount()
    assert _cached_blocks(str(tmp_path / "cold")) == 0
