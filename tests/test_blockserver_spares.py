"""The block store recycles the inodes of deleted blocks (spare/), and stays correct doing it.

These drive blockserver.store.BlockStore directly on a real directory: the behaviour under
test is what the store does with files, not HTTP.
"""

from __future__ import annotations

import builtins
import os
import random
import subprocess

import pytest

from blockserver import protocol
from blockserver import store as store_module
from blockserver.store import BlockStore, NotFound


def new_block(rng: random.Random, size: int = 4096) -> tuple[str, bytes, str]:
    data = rng.randbytes(size)
    return rng.randbytes(16).hex(), data, protocol.checksum(data)


def put(store: BlockStore, block: tuple[str, bytes, str]) -> None:
    assert store.put(*block) is True


def inode_of(store: BlockStore, block_id: str) -> int:
    return os.stat(os.path.join(store.root, "blocks", block_id[:2], block_id)).st_ino


def spare_dir(store: BlockStore) -> list[str]:
    return sorted(os.listdir(os.path.join(store.root, "spare")))


def test_a_deleted_blocks_inode_holds_the_next_block(tmp_path):
    rng = random.Random(1)
    store = BlockStore(str(tmp_path / "data"))
    a, b = new_block(rng, 300_000), new_block(rng, 5000)
    put(store, a)
    inode = inode_of(store, a[0])
    assert store.delete(a[0]) is True
    assert store.spare_count == 1
    [name] = spare_dir(store)
    assert os.stat(os.path.join(store.root, "spare", name)).st_size == 0  # space freed at once
    assert (store.block_count, store.used_bytes) == (0, 0)
    with pytest.raises(NotFound):
        store.get(a[0])

    put(store, b)
    assert inode_of(store, b[0]) == inode
    assert bytes(store.get(b[0])[0]) == b[1]
    assert store.spare_count == 0 and spare_dir(store) == []
    assert (store.block_count, store.used_bytes) == (1, 5000)
    assert os.listdir(os.path.join(store.root, "tmp")) == []


def test_batches_use_spares_and_new_files_alike(tmp_path):
    rng = random.Random(2)
    store = BlockStore(str(tmp_path / "data"))
    old = [new_block(rng) for _ in range(3)]
    store.put_many(old)
    for block_id, _, _ in old:
        store.delete(block_id)
    fresh = [new_block(rng) for _ in range(5)]  # three spares, then two new files
    assert [o.result() for o in store.put_many(fresh)] == [True] * 5
    for block_id, data, checksum in fresh:
        assert store.get(block_id) == (data, checksum)
    assert store.spare_count == 0 and spare_dir(store) == []
    assert os.listdir(os.path.join(store.root, "tmp")) == []


def test_start_keeps_only_empty_unlinked_spares(tmp_path):
    rng = random.Random(3)
    root = str(tmp_path / "data")
    store = BlockStore(root)
    kept, linked = new_block(rng), new_block(rng)
    put(store, kept)
    put(store, linked)
    store.delete(kept[0])  # an empty spare: kept
    spare = os.path.join(root, "spare")
    # What a crash can leave: a block file between its link and the removal of its spare
    # name, and a file that was being written (or a deleted block not yet emptied).
    os.link(os.path.join(root, "blocks", linked[0][:2], linked[0]), os.path.join(spare, "x1"))
    with open(os.path.join(spare, "x2"), "wb") as f:
        f.write(b"half a block")

    again = BlockStore(root)
    assert again.spare_count == 1
    assert len(spare_dir(again)) == 1 and "x1" not in spare_dir(again)
    assert again.get(linked[0]) == (linked[1], linked[2])  # only the extra name went
    assert (again.block_count, again.used_bytes) == (1, len(linked[1]))


def _racing_open(monkeypatch, store: BlockStore, victim: str, replacement) -> list[bool]:
    """Make the next open of `victim`'s file be followed, before anything is read, by its
    deletion and the storing of `replacement` (which takes the recycled inode)."""
    real_open = builtins.open
    raced = []

    def open_then_race(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        if not raced and os.path.basename(str(path)) == victim:
            raced.append(True)
            assert store.delete(victim) is True
            put(store, replacement)
        return f

    monkeypatch.setattr(store_module, "open", open_then_race, raising=False)
    return raced


@pytest.mark.parametrize("how", ["get", "head", "check"])
def test_a_read_racing_a_delete_never_returns_the_recycled_inodes_new_block(
        tmp_path, monkeypatch, how):
    rng = random.Random(4)
    store = BlockStore(str(tmp_path / "data"))
    a, b = new_block(rng), new_block(rng)
    put(store, a)
    raced = _racing_open(monkeypatch, store, a[0], b)
    read = {"get": lambda: store.get(a[0]), "head": lambda: store.head(a[0]),
            "check": lambda: store.check(a[0], verify=True)}[how]
    with pytest.raises(NotFound):
        read()
    assert raced == [True]
    assert store.get(b[0]) == (b[1], b[2])
    assert store.corrupt_found == 0
    assert os.listdir(os.path.join(store.root, "quarantine")) == []


def test_a_block_with_a_second_link_is_not_recycled(tmp_path):
    """A PUT of the same id still staging holds a second link to the file: emptying that
    inode would empty the staged copy, so the delete only unlinks."""
    rng = random.Random(5)
    store = BlockStore(str(tmp_path / "data"))
    a = new_block(rng)
    put(store, a)
    path = os.path.join(store.root, "blocks", a[0][:2], a[0])
    other = os.path.join(store.root, "tmp", "staged")
    os.link(path, other)
    assert store.delete(a[0]) is True
    assert store.spare_count == 0
    with open(other, "rb") as f:
        assert f.read()[store_module.HEADER_SIZE:] == a[1]



def resident_pages(path: str) -> int:
    """How many of the file's pages are in the page cache: mincore(2) on a mapping of it."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            if libc.mincore(address, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec)


def test_large_blocks_leave_the_page_cache_once_durable(tmp_path):
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                          text=True).stdout.strip()
    if kind == "tmpfs":
        pytest.skip("tmpfs pages are the file itself: there is no cache to leave")
    rng = random.Random(6)
    store = BlockStore(str(tmp_path / "data"))
    large, small = new_block(rng, 1 << 20), new_block(rng, 4096)
    put(store, large)
    store.put_many([small])
    path = os.path.join(store.root, "blocks", large[0][:2], large[0])
    assert resident_pages(path) == 0
    # Small blocks keep theirs (the measurement itself sees cached pages):
    assert resident_pages(os.path.join(store.root, "blocks", small[0][:2], small[0])) > 0
    assert store.get(large[0]) == (large[1], large[2])  # and read back from the disk
    batch = [new_block(rng, 256 << 10) for _ in range(3)]  # made durable by one syncfs
    assert [o.result() for o in store.put_many(batch)] == [True] * 3
    for block_id, _, _ in batch:
        assert resident_pages(os.path.join(store.root, "blocks", block_id[:2], block_id)) == 0
