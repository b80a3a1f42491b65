"""The POSIX core (fusefs/filesystem.py) with the flusher, the SQLite metadata, a block cache
and an in-memory block store: namespace errors with exact errnos, link counts, rename,
hard and symbolic links, unlinked-but-open files and orphans, file data across blocks,
truncation, attributes, xattrs, durability of fsync (P1), outages (P7), back-pressure and
garbage collection.

No FUSE and no HTTP here: these are unit tests of the layers below `fuse_ops`.
Nothing asserts wall-clock times; `wait_until` only guards against hangs.
"""

from __future__ import annotations

import errno
import os
import random
import sqlite3
import stat
import threading
import time

import pytest

from fusefs import errors
from fusefs.cache import BlockCache
from fusefs.errors import FsError
from fusefs.filedata import MAX_PATCHES
from fusefs.filesystem import XATTR_CREATE, XATTR_REPLACE, Filesystem
from fusefs.flusher import Flusher
from fusefs.memstore import MemoryBlockStore
from fusefs.metadata import ROOT_INO, Metadata

from .support import wait_until

BS = 65536  # small blocks so that multi-block cases are cheap
RW_CREATE = os.O_RDWR | os.O_CREAT
GUARD = 30.0  # seconds; only against hangs, never a performance assertion


def make_cache(store):
    return BlockCache(store, memory_bytes=64 << 20, disk_dir=None, disk_bytes=0)


class Core:
    """Metadata + store + cache + flusher + Filesystem on one database file."""

    def __init__(self, db_path, store=None, *, fresh=True, dirty_limit=32 << 20,
                 max_age=0.2):
        self.db_path = str(db_path)
        self.md = Metadata(self.db_path)
        if fresh:
            self.md.format(uid=0, gid=0)
        self.store = store if store is not None else MemoryBlockStore()
        self.cache = make_cache(self.store)
        self.flusher = Flusher(self.store, self.cache, self.md, dirty_limit=dirty_limit,
                               max_age=max_age, block_size=BS)
        self.fs = Filesystem(self.md, self.cache, self.flusher, block_size=BS)
        self.fs.start()
        self.closed = False

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.store.fail_with = None  # let nothing hang on an injected outage
        try:
            self.flusher.close()
            self.cache.close()
        finally:
            self.md.close()


@pytest.fixture
def make_core(tmp_path):
    cores = []

    def make(name="metadata.db", **kwargs):
        core = Core(tmp_path / name, **kwargs)
        cores.append(core)
        return core

    yield make
    for core in reversed(cores):
        core.close()


@pytest.fixture
def core(make_core):
    return make_core()


@pytest.fixture
def fs(core):
    return core.fs


# -- helpers ---------------------------------------------------------------------------------


def expect_errno(code, fn, *args, **kwargs):
    with pytest.raises(FsError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, (
        f"expected {errno.errorcode[code]}, got {errno.errorcode.get(info.value.errno)}")


def new_file(fs, name, data=b"", parent=ROOT_INO, flags=RW_CREATE, mode=0o644):
    """Create (or open) parent/name and write data at 0. Returns (ino, fh), still open."""
    inode, fh = fs.create(parent, name, mode, flags, 0, 0)
    if data:
        assert fs.write(fh, 0, data) == len(data)
    return inode.ino, fh


def close(fs, fh):
    fs.flush(fh)
    fs.release(fh)


def read_all(fs, fh, ino):
    return fs.read(fh, 0, fs.getattr(ino).size + 10)


def referenced(db_path):
    """{(ino, idx): block_id} of every block map entry, through a separate connection."""
    db = sqlite3.connect(db_path)
    try:
        return {(i, x): b for i, x, b in db.execute("SELECT ino, idx, block_id FROM blocks")}
    finally:
        db.close()


def referenced_ids(db_path):
    """Every block id the block maps read, patches' small blocks included (a separate
    connection)."""
    db = sqlite3.connect(db_path)
    try:
        return {b for (b,) in db.execute("SELECT block_id FROM blocks UNION "
                                         "SELECT block_id FROM patches")}
    finally:
        db.close()


def refs_of(core, ino):
    return core.md.block_refs(ino, 0, 2**62)


def forget_cached(core):
    """Drop every cached copy so that the next read of a clean block goes to the store."""
    for block_id in referenced_ids(core.db_path):
        core.cache.discard(block_id)


def store_matches_metadata(core):
    """After garbage collection: exactly the referenced blocks are stored."""
    core.flusher.collect_garbage()
    return core.store.block_ids() == referenced_ids(core.db_path)


def pattern(n, seed=0):
    return random.Random(seed).randbytes(n)


# -- lookup, create, names -------------------------------------------------------------------


def test_lookup_and_getattr_of_missing_names_is_enoent(fs):
    expect_errno(errno.ENOENT, fs.lookup, ROOT_INO, b"missing")
    expect_errno(errno.ENOENT, fs.getattr, 987654)
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    expect_errno(errno.ENOENT, fs.lookup, d.ino, b"missing")
    expect_errno(errno.ENOENT, fs.unlink, ROOT_INO, b"missing")
    expect_errno(errno.ENOENT, fs.rmdir, ROOT_INO, b"missing")
    assert fs.lookup(ROOT_INO, b"d").ino == d.ino


def test_lookup_under_a_file_is_enotdir(fs):
    ino, fh = new_file(fs, b"f")
    close(fs, fh)
    expect_errno(errno.ENOTDIR, fs.lookup, ino, b"x")
    expect_errno(errno.ENOTDIR, fs.mkdir, ino, b"x", 0o755, 0, 0)
    expect_errno(errno.ENOTDIR, fs.create, ino, b"x", 0o644, RW_CREATE, 0, 0)
    expect_errno(errno.ENOTDIR, fs.readdir, ino)


def test_mkdir_of_an_existing_name_is_eexist(fs):
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    expect_errno(errno.EEXIST, fs.mkdir, ROOT_INO, b"d", 0o755, 0, 0)
    _, fh = new_file(fs, b"f")
    close(fs, fh)
    expect_errno(errno.EEXIST, fs.mkdir, ROOT_INO, b"f", 0o755, 0, 0)
    expect_errno(errno.EEXIST, fs.symlink, ROOT_INO, b"d", b"target", 0, 0)
    assert fs.lookup(ROOT_INO, b"d").ino == d.ino
    assert stat.S_ISREG(fs.lookup(ROOT_INO, b"f").mode)


def test_create_with_o_excl_on_existing_is_eexist_without_it_opens(fs):
    ino, fh = new_file(fs, b"f", b"hello")
    close(fs, fh)
    expect_errno(errno.EEXIST, fs.create, ROOT_INO, b"f", 0o644, RW_CREATE | os.O_EXCL, 0, 0)
    inode, fh = fs.create(ROOT_INO, b"f", 0o600, RW_CREATE, 0, 0)
    assert inode.ino == ino
    assert stat.S_IMODE(inode.mode) == 0o644  # an existing file keeps its mode
    assert fs.read(fh, 0, 100) == b"hello"  # and its data (no O_TRUNC)
    close(fs, fh)
    assert fs.readdir(ROOT_INO) == [b"f"]
    fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    expect_errno(errno.EEXIST, fs.create, ROOT_INO, b"d", 0o644, RW_CREATE | os.O_EXCL, 0, 0)
    expect_errno(errno.EISDIR, fs.create, ROOT_INO, b"d", 0o644, RW_CREATE, 0, 0)


def test_create_answers_the_attributes_getattr_gives(fs):
    """create returns the attributes it made (a new file) or read (an existing one, opened,
    with O_TRUNC cut): each is what getattr then says, and the new file is open as such."""
    sub = fs.mkdir(ROOT_INO, b"sub", 0o2775, 0, 7)  # setgid: the new file takes gid 7
    inode, fh = fs.create(sub.ino, b"f", 0o640, RW_CREATE | os.O_EXCL, 3, 5)
    assert (stat.S_IMODE(inode.mode), inode.uid, inode.gid, inode.size) == (0o640, 3, 7, 0)
    assert inode == fs.getattr(inode.ino)
    assert fs.write(fh, 0, b"data") == 4
    assert fs.getattr(inode.ino).size == 4
    close(fs, fh)
    again, fh = fs.create(sub.ino, b"f", 0o600, RW_CREATE, 0, 0)
    assert again == fs.getattr(inode.ino) and again.size == 4
    close(fs, fh)
    cut, fh = fs.create(sub.ino, b"f", 0o600, RW_CREATE | os.O_TRUNC, 0, 0)
    assert cut == fs.getattr(inode.ino) and cut.size == 0
    close(fs, fh)
    expect_errno(errno.ENOTDIR, fs.create, inode.ino, b"x", 0o644, RW_CREATE, 0, 0)


def test_names_longer_than_255_bytes_are_enametoolong(fs):
    long = b"n" * 256
    ok = b"n" * 255
    ino, fh = new_file(fs, b"f")
    close(fs, fh)
    expect_errno(errno.ENAMETOOLONG, fs.mkdir, ROOT_INO, long, 0o755, 0, 0)
    expect_errno(errno.ENAMETOOLONG, fs.create, ROOT_INO, long, 0o644, RW_CREATE, 0, 0)
    expect_errno(errno.ENAMETOOLONG, fs.mknod, ROOT_INO, long, stat.S_IFREG | 0o644, 0, 0, 0)
    expect_errno(errno.ENAMETOOLONG, fs.symlink, ROOT_INO, long, b"t", 0, 0)
    expect_errno(errno.ENAMETOOLONG, fs.link, ino, ROOT_INO, long)
    expect_errno(errno.ENAMETOOLONG, fs.rename, ROOT_INO, b"f", ROOT_INO, long)
    expect_errno(errno.ENAMETOOLONG, fs.lookup, ROOT_INO, long)
    assert fs.lookup(ROOT_INO, b"f").ino == ino  # the failed rename changed nothing
    assert fs.readdir(ROOT_INO) == [b"f"]
    # 255 bytes is fine
    assert fs.mkdir(ROOT_INO, ok, 0o755, 0, 0).ino == fs.lookup(ROOT_INO, ok).ino


def test_non_utf8_byte_names_work(fs):
    names = [b"caf\xe9", b"\xff\xfe\x80", b"latin1-\xe4\xf6\xfc", b"\xc3\x28"]
    inos = {}
    for i, name in enumerate(names):
        if i % 2:
            inos[name] = fs.mkdir(ROOT_INO, name, 0o755, 0, 0).ino
        else:
            ino, fh = new_file(fs, name, name * 3)
            close(fs, fh)
            inos[name] = ino
    assert fs.readdir(ROOT_INO) == sorted(inos)
    for name, ino in inos.items():
        assert fs.lookup(ROOT_INO, name).ino == ino
    fh = fs.open(inos[b"caf\xe9"], os.O_RDONLY)
    assert fs.read(fh, 0, 100) == b"caf\xe9" * 3
    close(fs, fh)
    fs.rename(ROOT_INO, b"caf\xe9", ROOT_INO, b"\x01\xfe")
    assert fs.lookup(ROOT_INO, b"\x01\xfe").ino == inos[b"caf\xe9"]
    expect_errno(errno.ENOENT, fs.lookup, ROOT_INO, b"caf\xe9")
    expect_errno(errno.ENOENT, fs.lookup, ROOT_INO, "café".encode())  # bytes, not text


# -- unlink, rmdir, link counts --------------------------------------------------------------


def test_unlink_of_a_directory_is_eisdir(fs):
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    expect_errno(errno.EISDIR, fs.unlink, ROOT_INO, b"d")
    assert fs.lookup(ROOT_INO, b"d").ino == d.ino


def test_rmdir_of_a_file_is_enotdir(fs):
    ino, fh = new_file(fs, b"f", b"x")
    close(fs, fh)
    expect_errno(errno.ENOTDIR, fs.rmdir, ROOT_INO, b"f")
    assert fs.lookup(ROOT_INO, b"f").ino == ino


def test_rmdir_of_a_non_empty_directory_is_enotempty(fs):
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    _, fh = new_file(fs, b"f", parent=d.ino)
    close(fs, fh)
    expect_errno(errno.ENOTEMPTY, fs.rmdir, ROOT_INO, b"d")
    e = fs.mkdir(ROOT_INO, b"e", 0o755, 0, 0)
    fs.mkdir(e.ino, b"sub", 0o755, 0, 0)
    expect_errno(errno.ENOTEMPTY, fs.rmdir, ROOT_INO, b"e")
    fs.unlink(d.ino, b"f")
    fs.rmdir(ROOT_INO, b"d")
    expect_errno(errno.ENOENT, fs.lookup, ROOT_INO, b"d")
    expect_errno(errno.ENOENT, fs.getattr, d.ino)


def test_directory_link_counts_follow_mkdir_rmdir_and_rename(fs):
    def nlink(ino):
        return fs.getattr(ino).nlink

    assert nlink(ROOT_INO) == 2
    a = fs.mkdir(ROOT_INO, b"a", 0o755, 0, 0).ino
    b = fs.mkdir(ROOT_INO, b"b", 0o755, 0, 0).ino
    assert (nlink(ROOT_INO), nlink(a), nlink(b)) == (4, 2, 2)
    x = fs.mkdir(a, b"x", 0o755, 0, 0).ino
    fs.mkdir(a, b"y", 0o755, 0, 0)
    _, fh = new_file(fs, b"file", parent=a)  # files do not count
    close(fs, fh)
    assert (nlink(a), nlink(x)) == (4, 2)
    fs.rename(a, b"x", b, b"x2")  # a directory moves across
    assert (nlink(a), nlink(b), nlink(x)) == (3, 3, 2)
    fs.rename(b, b"x2", b, b"x3")  # within one directory: no change
    assert (nlink(a), nlink(b)) == (3, 3)
    fs.rename(a, b"file", b, b"file")  # a file moves across: no change
    assert (nlink(a), nlink(b)) == (3, 3)
    fs.rmdir(b, b"x3")
    assert (nlink(a), nlink(b), nlink(ROOT_INO)) == (3, 2, 4)
    fs.rmdir(a, b"y")
    assert nlink(a) == 2
    fs.unlink(b, b"file")
    fs.rmdir(ROOT_INO, b"a")
    fs.rmdir(ROOT_INO, b"b")
    assert nlink(ROOT_INO) == 2


# -- rename ----------------------------------------------------------------------------------


def test_rename_file_over_file_replaces_atomically_and_frees_the_victim(core):
    fs = core.fs
    src, fh = new_file(fs, b"src", pattern(BS + 100, 1))
    fs.fsync(fh)
    close(fs, fh)
    victim, fh = new_file(fs, b"dst", pattern(2 * BS, 2))
    fs.fsync(fh)
    close(fs, fh)
    victim_blocks = {r.block_id for r in refs_of(core, victim).values()}
    assert len(victim_blocks) == 2 and victim_blocks <= core.store.block_ids()

    fs.rename(ROOT_INO, b"src", ROOT_INO, b"dst")

    assert fs.lookup(ROOT_INO, b"dst").ino == src
    expect_errno(errno.ENOENT, fs.lookup, ROOT_INO, b"src")
    expect_errno(errno.ENOENT, fs.getattr, victim)
    assert core.md.inode(victim) is None
    assert refs_of(core, victim) == {}
    gone_or_garbage = set(core.md.garbage(10000)) | (victim_blocks - core.store.block_ids())
    assert victim_blocks <= gone_or_garbage
    fh = fs.open(src, os.O_RDONLY)
    assert read_all(fs, fh, src) == pattern(BS + 100, 1)
    close(fs, fh)
    core.flusher.collect_garbage()
    assert not victim_blocks & core.store.block_ids()
    assert fs.readdir(ROOT_INO) == [b"dst"]


def test_rename_over_an_open_file_keeps_it_readable_until_release(core):
    fs = core.fs
    victim, vfh = new_file(fs, b"dst", pattern(BS + 9, 12))
    fs.fsync(vfh)
    blocks = {r.block_id for r in refs_of(core, victim).values()}
    src, fh = new_file(fs, b"src", b"replacement")
    close(fs, fh)
    fs.rename(ROOT_INO, b"src", ROOT_INO, b"dst")
    assert fs.lookup(ROOT_INO, b"dst").ino == src
    assert fs.getattr(victim).nlink == 0
    assert fs.read(vfh, 0, 2 * BS) == pattern(BS + 9, 12)
    close(fs, vfh)
    expect_errno(errno.ENOENT, fs.getattr, victim)
    assert core.md.inode(victim) is None
    assert blocks <= set(core.md.garbage(10000)) | (blocks - core.store.block_ids())


def test_rename_directory_over_empty_directory(fs):
    a = fs.mkdir(ROOT_INO, b"a", 0o755, 0, 0).ino
    b = fs.mkdir(ROOT_INO, b"b", 0o755, 0, 0).ino
    x = fs.mkdir(a, b"x", 0o755, 0, 0).ino
    _, fh = new_file(fs, b"inside", parent=x)
    close(fs, fh)
    y = fs.mkdir(b, b"y", 0o755, 0, 0).ino
    fs.rename(a, b"x", b, b"y")
    assert fs.lookup(b, b"y").ino == x
    expect_errno(errno.ENOENT, fs.lookup, a, b"x")
    expect_errno(errno.ENOENT, fs.getattr, y)
    assert fs.getattr(a).nlink == 2
    assert fs.getattr(b).nlink == 3
    assert fs.getattr(ROOT_INO).nlink == 4
    assert fs.readdir(x) == [b"inside"]


def test_rename_directory_over_non_empty_directory_is_enotempty(fs):
    x = fs.mkdir(ROOT_INO, b"x", 0o755, 0, 0).ino
    y = fs.mkdir(ROOT_INO, b"y", 0o755, 0, 0).ino
    fs.mkdir(y, b"child", 0o755, 0, 0)
    expect_errno(errno.ENOTEMPTY, fs.rename, ROOT_INO, b"x", ROOT_INO, b"y")
    assert fs.lookup(ROOT_INO, b"x").ino == x
    assert fs.lookup(ROOT_INO, b"y").ino == y
    assert fs.getattr(ROOT_INO).nlink == 4


def test_rename_file_over_directory_is_eisdir_and_directory_over_file_is_enotdir(fs):
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).ino
    f, fh = new_file(fs, b"f", b"data")
    close(fs, fh)
    expect_errno(errno.EISDIR, fs.rename, ROOT_INO, b"f", ROOT_INO, b"d")
    expect_errno(errno.ENOTDIR, fs.rename, ROOT_INO, b"d", ROOT_INO, b"f")
    assert fs.lookup(ROOT_INO, b"d").ino == d
    assert fs.lookup(ROOT_INO, b"f").ino == f
    assert fs.getattr(f).nlink == 1 and fs.getattr(d).nlink == 2


def test_rename_directory_into_its_own_subdirectory_is_einval(fs):
    a = fs.mkdir(ROOT_INO, b"a", 0o755, 0, 0).ino
    b = fs.mkdir(a, b"b", 0o755, 0, 0).ino
    c = fs.mkdir(b, b"c", 0o755, 0, 0).ino
    expect_errno(errno.EINVAL, fs.rename, ROOT_INO, b"a", c, b"a")
    expect_errno(errno.EINVAL, fs.rename, ROOT_INO, b"a", b, b"moved")
    expect_errno(errno.EINVAL, fs.rename, ROOT_INO, b"a", a, b"self")
    assert fs.lookup(ROOT_INO, b"a").ino == a
    assert fs.lookup(a, b"b").ino == b
    assert fs.readdir(c) == []


def test_rename_onto_another_hard_link_of_the_same_inode_does_nothing(fs):
    ino, fh = new_file(fs, b"one", b"shared")
    close(fs, fh)
    fs.link(ino, ROOT_INO, b"two")
    fs.rename(ROOT_INO, b"one", ROOT_INO, b"two")
    assert fs.lookup(ROOT_INO, b"one").ino == ino
    assert fs.lookup(ROOT_INO, b"two").ino == ino
    assert fs.getattr(ino).nlink == 2
    fh = fs.open(ino, os.O_RDONLY)
    assert fs.read(fh, 0, 100) == b"shared"
    close(fs, fh)


def test_rename_of_a_missing_source_is_enoent(fs):
    fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    expect_errno(errno.ENOENT, fs.rename, ROOT_INO, b"missing", ROOT_INO, b"new")
    expect_errno(errno.ENOENT, fs.lookup, ROOT_INO, b"new")


def test_rename_file_across_directories_keeps_inode_and_data(fs):
    a = fs.mkdir(ROOT_INO, b"a", 0o755, 0, 0).ino
    b = fs.mkdir(ROOT_INO, b"b", 0o755, 0, 0).ino
    ino, fh = new_file(fs, b"f", pattern(3 * BS, 7), parent=a)  # still dirty
    fs.rename(a, b"f", b, b"g")
    assert fs.lookup(b, b"g").ino == ino
    expect_errno(errno.ENOENT, fs.lookup, a, b"f")
    fs.fsync(fh)
    close(fs, fh)
    fh = fs.open(fs.lookup(b, b"g").ino, os.O_RDONLY)
    assert read_all(fs, fh, ino) == pattern(3 * BS, 7)
    close(fs, fh)


# -- hard and symbolic links -----------------------------------------------------------------


def test_hard_links_share_inode_and_data(core):
    fs = core.fs
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).ino
    ino, fh = new_file(fs, b"a", b"first")
    close(fs, fh)
    linked = fs.link(ino, d, b"b")
    assert linked.ino == ino and linked.nlink == 2
    assert fs.lookup(d, b"b").ino == ino
    expect_errno(errno.EEXIST, fs.link, ino, ROOT_INO, b"a")
    fs.link(ino, ROOT_INO, b"c")
    assert fs.getattr(ino).nlink == 3

    fh_a = fs.open(fs.lookup(ROOT_INO, b"a").ino, os.O_RDWR)
    fh_b = fs.open(fs.lookup(d, b"b").ino, os.O_RDONLY)
    fs.write(fh_a, 5, b" and more")
    assert fs.read(fh_b, 0, 100) == b"first and more"
    fs.fsync(fh_a)
    close(fs, fh_a)
    close(fs, fh_b)

    fs.unlink(ROOT_INO, b"a")
    assert fs.getattr(ino).nlink == 2
    fs.unlink(ROOT_INO, b"c")
    assert fs.getattr(ino).nlink == 1
    forget_cached(core)
    fh = fs.open(fs.lookup(d, b"b").ino, os.O_RDONLY)
    assert fs.read(fh, 0, 100) == b"first and more"
    close(fs, fh)
    fs.unlink(d, b"b")
    expect_errno(errno.ENOENT, fs.getattr, ino)


def test_the_names_of_hard_linked_files_are_known(make_core, tmp_path):
    """The adapter refreshes the kernel's view of a file's other names: the core must
    know which files have several names, and every path of each."""
    core = make_core()
    fs = core.fs
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).ino
    e = fs.mkdir(d, b"e", 0o755, 0, 0).ino
    ino, fh = new_file(fs, b"a", b"x")
    close(fs, fh)
    assert not fs.has_hard_links() and not fs.has_other_names(ino)
    assert fs.paths(ino) == [b"/a"]
    fs.link(ino, e, b"b")
    assert fs.has_other_names(ino)
    assert sorted(fs.paths(ino)) == [b"/a", b"/d/e/b"]
    fs.rename(ROOT_INO, b"d", ROOT_INO, b"moved")  # a directory on one path moves
    assert sorted(fs.paths(ino)) == [b"/a", b"/moved/e/b"]
    fs.rename(e, b"b", ROOT_INO, b"c")
    assert sorted(fs.paths(ino)) == [b"/a", b"/c"]

    # The set survives a remount (it is loaded from the metadata).
    core.close()
    again = make_core(fresh=False)
    assert again.fs.has_other_names(ino)

    # Losing a name while open keeps it in the set until the last close: a descriptor of
    # the lost name still changes what the other name shows.
    fs = again.fs
    fh = fs.open(ino, os.O_RDWR)
    fs.unlink(ROOT_INO, b"a")
    assert fs.has_other_names(ino) and fs.paths(ino) == [b"/c"]
    close(fs, fh)
    assert not fs.has_other_names(ino)

    # Renaming another file over a name takes the name away too.
    fs.link(ino, ROOT_INO, b"a")
    other, fh = new_file(fs, b"o", b"y")
    close(fs, fh)
    fs.rename(ROOT_INO, b"o", ROOT_INO, b"a")
    assert not fs.has_other_names(ino) and fs.paths(ino) == [b"/c"]
    assert not fs.has_hard_links()


def test_hard_link_to_a_directory_is_eperm(fs):
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).ino
    expect_errno(errno.EPERM, fs.link, d, ROOT_INO, b"d2")
    expect_errno(errno.ENOENT, fs.lookup, ROOT_INO, b"d2")
    assert fs.getattr(d).nlink == 2


def test_symlink_and_readlink(fs):
    target = b"../some/where/\xff-not-utf8"
    s = fs.symlink(ROOT_INO, b"link", target, 0, 0)
    assert stat.S_ISLNK(s.mode)
    looked = fs.lookup(ROOT_INO, b"link")
    assert looked.ino == s.ino and stat.S_ISLNK(looked.mode)
    assert looked.size == len(target)
    assert fs.readlink(s.ino) == target
    fs.rename(ROOT_INO, b"link", ROOT_INO, b"moved")
    assert fs.readlink(fs.lookup(ROOT_INO, b"moved").ino) == target
    fs.unlink(ROOT_INO, b"moved")
    expect_errno(errno.ENOENT, fs.getattr, s.ino)


def test_readlink_of_a_non_symlink_is_einval(fs):
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).ino
    f, fh = new_file(fs, b"f", b"x")
    close(fs, fh)
    expect_errno(errno.EINVAL, fs.readlink, f)
    expect_errno(errno.EINVAL, fs.readlink, d)
    expect_errno(errno.EINVAL, fs.readlink, ROOT_INO)


# -- unlinked while open, orphans ------------------------------------------------------------


def test_unlinked_open_file_lives_until_release_then_its_blocks_are_garbage(core):
    fs = core.fs
    data = pattern(2 * BS + 10, 3)
    ino, fh = new_file(fs, b"f", data)
    fs.fsync(fh)
    old_blocks = {r.block_id for r in refs_of(core, ino).values()}
    assert len(old_blocks) == 3

    fs.unlink(ROOT_INO, b"f")
    expect_errno(errno.ENOENT, fs.lookup, ROOT_INO, b"f")
    assert fs.readdir(ROOT_INO) == []
    assert fs.getattr(ino).nlink == 0
    assert core.md.inode(ino) is not None  # still there while open
    assert fs.read(fh, 0, len(data) + 10) == data
    fs.write(fh, 5, b"WRITTEN")  # still writable
    expected = data[:5] + b"WRITTEN" + data[12:]
    assert fs.read(fh, 0, len(data) + 10) == expected
    fs.fsync(fh)  # an unlinked file can still be fsynced
    all_blocks = old_blocks | {r.block_id for r in refs_of(core, ino).values()}
    assert fs.read(fh, 0, len(data) + 10) == expected

    close(fs, fh)
    expect_errno(errno.ENOENT, fs.getattr, ino)
    assert core.md.inode(ino) is None
    assert refs_of(core, ino) == {}
    garbage = set(core.md.garbage(10000))
    assert all_blocks <= garbage | (all_blocks - core.store.block_ids())
    wait_until(lambda: store_matches_metadata(core), what="garbage collected")
    assert not all_blocks & core.store.block_ids()


def test_unlinked_open_file_with_only_dirty_data_leaves_nothing_behind(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f", pattern(3 * BS, 4))
    fs.unlink(ROOT_INO, b"f")
    assert fs.read(fh, BS, 10) == pattern(3 * BS, 4)[BS:BS + 10]
    close(fs, fh)
    expect_errno(errno.ENOENT, fs.getattr, ino)
    assert core.md.inode(ino) is None
    wait_until(lambda: core.flusher.dirty_bytes == 0, what="dirty bytes released")
    wait_until(lambda: store_matches_metadata(core), what="no block leaked")


def test_orphan_of_a_crash_is_removed_by_start(make_core):
    first = make_core()
    fs = first.fs
    ino, fh = new_file(fs, b"f", pattern(BS + 1, 5))
    fs.fsync(fh)
    keep, kfh = new_file(fs, b"keep", b"kept")
    fs.fsync(kfh)
    close(fs, kfh)
    blocks = {r.block_id for r in refs_of(first, ino).values()}
    assert len(blocks) == 2 and blocks <= first.store.block_ids()
    fs.unlink(ROOT_INO, b"f")  # the application still has it open ...
    assert first.md.inode(ino).nlink == 0
    first.close()  # ... when the process dies: no release ever comes

    second = make_core(store=first.store, fresh=False)  # start() ran in the constructor
    assert second.md.inode(ino) is None
    expect_errno(errno.ENOENT, second.fs.getattr, ino)
    assert refs_of(second, ino) == {}
    assert blocks <= set(second.md.garbage(10000))
    second.flusher.collect_garbage()
    assert not blocks & second.store.block_ids()
    fh = second.fs.open(second.fs.lookup(ROOT_INO, b"keep").ino, os.O_RDONLY)
    assert second.fs.read(fh, 0, 100) == b"kept"
    close(second.fs, fh)
    assert store_matches_metadata(second)


# -- file data -------------------------------------------------------------------------------


def test_writes_and_reads_across_block_boundaries(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f")
    model = bytearray()

    def write(offset, data):
        fs.write(fh, offset, data)
        if len(model) < offset + len(data):
            model.extend(bytes(offset + len(data) - len(model)))
        model[offset:offset + len(data)] = data

    write(0, pattern(BS - 10, 1))
    write(BS - 10, pattern(30, 2))  # straddles 0|1
    write(2 * BS - 1, pattern(BS + 2, 3))  # touches 1, 2 and 3
    write(BS, pattern(3 * BS, 4))  # whole blocks 1, 2, 3
    assert fs.getattr(ino).size == len(model)
    for off, n in [(0, len(model)), (BS - 5, 10), (2 * BS - 3, BS + 6), (4 * BS - 1, 100)]:
        assert fs.read(fh, off, n) == bytes(model[off:off + n])
    fs.fsync(fh)
    forget_cached(core)
    for off, n in [(0, len(model)), (BS - 5, 10), (2 * BS - 3, BS + 6), (4 * BS - 1, 100)]:
        assert fs.read(fh, off, n) == bytes(model[off:off + n])
    assert fs.read(fh, len(model), 10) == b""
    assert fs.read(fh, len(model) + 1000, 10) == b""
    refs = refs_of(core, ino)
    assert sorted(refs) == [0, 1, 2, 3]
    for idx, ref in refs.items():
        assert core.store.get(ref.block_id, ref.checksum) == bytes(model[idx * BS:(idx + 1) * BS])
    close(fs, fh)


def test_partial_overwrite_of_a_clean_block_is_a_patch_until_it_holds_too_many(core):
    """A small write into a stored block uploads only its bytes, as a patch recorded over
    the block; once the block would read from more than MAX_PATCHES, the next write fetches
    it and stores it whole again, and the old block and its patches become garbage."""
    fs = core.fs
    data = bytearray(pattern(3 * BS, 11))
    ino, fh = new_file(fs, b"f", bytes(data))
    fs.fsync(fh)
    close(fs, fh)
    before = refs_of(core, ino)
    forget_cached(core)

    fh = fs.open(ino, os.O_RDWR)
    fs.write(fh, BS + 100, b"PATCH")
    data[BS + 100:BS + 105] = b"PATCH"
    assert fs.read(fh, 0, 3 * BS) == bytes(data)  # while dirty
    fs.fsync(fh)
    after = refs_of(core, ino)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].block_id == before[1].block_id and after[1].length == BS
    (patch,) = after[1].patches
    assert (patch.start, patch.length) == (100, 5)
    assert core.store.get(patch.block_id, patch.checksum)[patch.at:patch.at + 5] == b"PATCH"
    forget_cached(core)
    assert fs.read(fh, 0, 3 * BS) == bytes(data)

    for i in range(100):  # apart from each other, one commit: 100 ranges, 1 small block
        offset = BS + 200 + 37 * i
        fs.write(fh, offset, b"%03d" % i)
        data[offset:offset + 3] = b"%03d" % i
    fs.fsync(fh)
    after = refs_of(core, ino)
    assert after[1].block_id == before[1].block_id and len(after[1].patches) == 101
    assert after[1].small_blocks == 2
    assert fs.read(fh, BS, BS) == bytes(data[BS:2 * BS])
    for i in range(MAX_PATCHES + 1):  # a commit each: one small block each
        offset = BS + 5000 + 37 * i
        fs.write(fh, offset, b"%03d" % i)
        data[offset:offset + 3] = b"%03d" % i
        fs.fsync(fh)
        if i % 10 == 0:
            forget_cached(core)
            assert fs.read(fh, BS, BS) == bytes(data[BS:2 * BS])
    merged = refs_of(core, ino)[1]  # the 31st commit filled it: the next one merged
    assert merged.block_id != before[1].block_id and len(merged.patches) == 2
    gone = set(before[1].ids()) | {p.block_id for p in after[1].patches}
    assert gone <= set(core.md.garbage(10000)) | (gone - core.store.block_ids())
    forget_cached(core)
    assert fs.read(fh, 0, 3 * BS) == bytes(data)
    assert fs.getattr(ino).size == 3 * BS
    close(fs, fh)
    wait_until(lambda: store_matches_metadata(core), what="replaced blocks deleted")


def test_sequential_reads_ask_for_read_ahead_once_per_block(core):
    fs = core.fs
    data = os.urandom(6 * BS)
    ino, fh = new_file(fs, b"big", data)
    fs.fsync(fh)
    close(fs, fh)
    asked, runs = [], []

    def prefetch(items, run=0):
        asked.append([b for b, _ in items])
        runs.append(run)

    core.cache.prefetch = prefetch
    fh = fs.open(ino, os.O_RDONLY)
    got = b"".join(fs.read(fh, off, BS // 4) for off in range(0, 6 * BS, BS // 4))
    assert got == data
    # Entering blocks 1..4: the first read followed nothing, block 5 has nothing after it.
    assert len(asked) == 4
    assert runs == [BS * i + BS // 4 for i in range(1, 5)]  # how far the reader has come
    refs = core.md.block_refs(ino, 0, 5)
    assert asked[0] == [refs[i].block_id for i in range(2, 6)]
    asked.clear()
    step = BS // 3 + 1  # unaligned: the read that crosses into a block asks
    got = b"".join(fs.read(fh, off, step) for off in range(0, 6 * BS, step))
    assert got == data and len(asked) == 4  # blocks 1..4: the read at 0 followed nothing
    asked.clear()
    fs.read(fh, 3 * BS, 100)  # not where the last read ended: no read-ahead
    assert asked == []
    runs.clear()
    fs.read(fh, 3 * BS + 100, BS)  # a new run, from 3 * BS
    assert asked and runs == [BS + 100]
    close(fs, fh)


def test_sparse_files_and_holes_read_as_zeros(core):
    fs = core.fs
    ino, fh = new_file(fs, b"sparse")
    fs.write(fh, 10 * BS + 5, b"tail")
    fs.write(fh, 3, b"head")
    size = 10 * BS + 9
    assert fs.getattr(ino).size == size
    expected = bytes(3) + b"head" + bytes(10 * BS + 5 - 7) + b"tail"
    assert fs.read(fh, 0, size + 100) == expected
    fs.fsync(fh)
    assert sorted(refs_of(core, ino)) == [0, 10]  # the holes take no blocks
    forget_cached(core)
    assert fs.read(fh, 0, size + 100) == expected
    assert fs.read(fh, 4 * BS + 7, 1000) == bytes(1000)
    close(fs, fh)


@pytest.mark.parametrize("fsync_first", [False, True], ids=["dirty", "clean"])
def test_truncate_into_a_block_then_extend_reads_zeros_not_old_bytes(core, fsync_first):
    fs = core.fs
    ino, fh = new_file(fs, b"f", b"\xaa" * (3 * BS))
    if fsync_first:
        fs.fsync(fh)
        forget_cached(core)
    cut = BS + 100
    fs.setattr(ino, size=cut)
    assert fs.getattr(ino).size == cut
    assert fs.read(fh, 0, 3 * BS) == b"\xaa" * cut
    fs.setattr(ino, size=2 * BS + 50)  # extend by truncate
    fs.write(fh, 3 * BS, b"end")  # and by writing past the end
    expected = b"\xaa" * cut + bytes(3 * BS - cut) + b"end"
    assert fs.getattr(ino).size == len(expected)
    assert fs.read(fh, 0, 4 * BS) == expected
    fs.fsync(fh)
    assert fs.read(fh, 0, 4 * BS) == expected
    forget_cached(core)
    assert fs.read(fh, 0, 4 * BS) == expected
    assert core.md.inode(ino).size == len(expected)
    close(fs, fh)
    fh = fs.open(ino, os.O_RDONLY)
    forget_cached(core)
    assert fs.read(fh, 0, 4 * BS) == expected
    close(fs, fh)


def test_truncate_to_a_block_boundary_and_to_zero(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f", pattern(3 * BS, 5))
    fs.fsync(fh)
    fs.setattr(ino, size=BS)
    fs.fsync(fh)
    assert sorted(refs_of(core, ino)) == [0]
    fs.setattr(ino, size=2 * BS)
    assert fs.read(fh, 0, 3 * BS) == pattern(3 * BS, 5)[:BS] + bytes(BS)
    fs.setattr(ino, size=0)
    assert fs.read(fh, 0, 100) == b""
    fs.fsync(fh)
    assert refs_of(core, ino) == {}
    assert core.md.inode(ino).size == 0
    close(fs, fh)


def test_truncate_up_extends_with_zeros(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f", b"0123456789")
    fs.fsync(fh)
    close(fs, fh)
    fs.setattr(ino, size=3 * BS + 7)  # a closed file
    assert fs.getattr(ino).size == 3 * BS + 7
    fh = fs.open(ino, os.O_RDONLY)
    expected = b"0123456789" + bytes(3 * BS - 3)
    assert fs.read(fh, 0, 4 * BS) == expected
    forget_cached(core)
    assert fs.read(fh, 0, 4 * BS) == expected
    close(fs, fh)
    assert core.md.inode(ino).size == 3 * BS + 7


def test_setattr_size_of_a_directory_is_eisdir(fs):
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).ino
    expect_errno(errno.EISDIR, fs.setattr, d, size=0)


def test_open_with_o_trunc_empties_the_file(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f", pattern(2 * BS, 6))
    fs.fsync(fh)
    close(fs, fh)
    old = {r.block_id for r in refs_of(core, ino).values()}
    fh = fs.open(ino, os.O_WRONLY | os.O_TRUNC)
    assert fs.getattr(ino).size == 0
    assert refs_of(core, ino) == {}
    assert old <= set(core.md.garbage(10000)) | (old - core.store.block_ids())
    fs.write(fh, 0, b"new")
    fs.fsync(fh)
    close(fs, fh)
    fh = fs.open(ino, os.O_RDONLY)
    forget_cached(core)
    assert fs.read(fh, 0, 3 * BS) == b"new"
    close(fs, fh)
    # O_TRUNC through create on an existing name, too
    inode, fh = fs.create(ROOT_INO, b"f", 0o644, RW_CREATE | os.O_TRUNC, 0, 0)
    assert inode.ino == ino and inode.size == 0
    assert fs.read(fh, 0, 10) == b""
    close(fs, fh)
    # O_RDONLY | O_TRUNC does not truncate
    ino2, fh = new_file(fs, b"g", b"keep me")
    close(fs, fh)
    fh = fs.open(ino2, os.O_RDONLY | os.O_TRUNC)
    assert fs.read(fh, 0, 100) == b"keep me"
    close(fs, fh)


def test_offsets_beyond_4_gib_work_sparsely(core):
    fs = core.fs
    ino, fh = new_file(fs, b"big")
    off = 5 * (1 << 30) + 12345
    fs.write(fh, off, b"far away")
    fs.write(fh, (1 << 32) - 3, b"straddle")  # across the 4 GiB line
    assert fs.getattr(ino).size == off + 8
    assert fs.read(fh, off - 4, 100) == bytes(4) + b"far away"
    assert fs.read(fh, (1 << 32) - 3, 8) == b"straddle"
    assert fs.read(fh, 3 << 30, 16) == bytes(16)
    fs.fsync(fh)
    refs = refs_of(core, ino)
    assert sorted(refs) == sorted({((1 << 32) - 3) // BS, ((1 << 32) + 4) // BS, off // BS})
    assert core.md.inode(ino).size == off + 8
    forget_cached(core)
    assert fs.read(fh, off, 100) == b"far away"
    assert fs.read(fh, (1 << 32) - 3, 8) == b"straddle"
    fs.setattr(ino, size=(1 << 32) + 2)
    assert fs.read(fh, (1 << 32) - 3, 100) == b"strad"
    close(fs, fh)


def test_size_and_mtime_are_visible_while_dirty(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f", b"start")
    fs.fsync(fh)
    fs.setattr(ino, mtime_ns=1_000_000_007)
    assert fs.getattr(ino).mtime_ns == 1_000_000_007
    core.store.fail_with = errors.Unavailable("down")  # keep what follows dirty
    fs.write(fh, 2 * BS, b"more")
    live = core.flusher.live(ino)
    assert live is not None and live.dirty
    attrs = fs.getattr(ino)
    assert attrs.size == 2 * BS + 4
    assert attrs.mtime_ns > 1_000_000_007
    assert fs.lookup(ROOT_INO, b"f").size == 2 * BS + 4
    assert core.md.inode(ino).size == 5  # not yet persisted: still dirty
    core.store.fail_with = None
    fs.fsync(fh)
    assert core.md.inode(ino).size == 2 * BS + 4
    assert core.md.inode(ino).mtime_ns == attrs.mtime_ns
    close(fs, fh)


def test_random_writes_truncates_and_fsyncs_match_a_bytearray_model(core):
    fs = core.fs
    rng = random.Random(20240611)
    ino, fh = new_file(fs, b"model")
    model = bytearray()
    limit = 5 * BS
    for step in range(400):
        op = rng.random()
        if op < 0.55:
            offset = rng.randrange(0, limit)
            n = rng.choice([1, 7, 100, BS // 2, BS - 1, BS, BS + 3, rng.randrange(1, 2 * BS)])
            data = rng.randbytes(n)
            assert fs.write(fh, offset, data) == n
            if len(model) < offset + n:
                model.extend(bytes(offset + n - len(model)))
            model[offset:offset + n] = data
        elif op < 0.75:
            size = rng.choice([0, rng.randrange(0, limit), rng.randrange(0, 8) * BS,
                               max(0, len(model) - rng.randrange(1, 200))])
            fs.setattr(ino, size=size)
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
        elif op < 0.85:
            fs.fsync(fh)
        elif op < 0.90:
            forget_cached(core)
        elif op < 0.95:
            close(fs, fh)
            fh = fs.open(ino, os.O_RDWR)
        else:
            time.sleep(0.05)  # let background uploads overlap with what follows
        assert fs.getattr(ino).size == len(model), f"step {step}"
        if step % 5 == 0 or op >= 0.55:
            assert fs.read(fh, 0, limit * 2) == bytes(model), f"step {step}"
        else:
            off = rng.randrange(0, limit)
            assert fs.read(fh, off, 3000) == bytes(model[off:off + 3000]), f"step {step}"
    fs.fsync(fh)
    close(fs, fh)
    wait_until(lambda: core.flusher.dirty_bytes == 0, what="uploads done")
    forget_cached(core)
    fh = fs.open(ino, os.O_RDONLY)
    assert fs.read(fh, 0, limit * 2) == bytes(model)
    close(fs, fh)
    assert core.md.inode(ino).size == len(model)
    wait_until(lambda: store_matches_metadata(core), what="no block leaked")


def test_a_range_rewritten_at_every_fsync_keeps_one_patch(core):
    """A database rewrites its header page at every commit: each fsync stores a patch
    that covers the one before whole, which then goes (its small block becomes garbage).
    The block keeps one patch and is never fetched and stored whole again."""
    fs = core.fs
    ino, fh = new_file(fs, b"db", pattern(2 * BS, 7))
    fs.fsync(fh)
    base = refs_of(core, ino)[0]
    for i in range(MAX_PATCHES + 8):
        fs.write(fh, 24, b"header %04d" % i)
        fs.fsync(fh)
    ref = refs_of(core, ino)[0]
    assert ref.block_id == base.block_id
    assert [(p.start, p.length) for p in ref.patches] == [(24, 11)]
    forget_cached(core)
    assert fs.read(fh, 0, 64) == pattern(2 * BS, 7)[:24] + b"header %04d" % (MAX_PATCHES + 7) \
        + pattern(2 * BS, 7)[35:64]
    close(fs, fh)
    wait_until(lambda: store_matches_metadata(core), what="replaced patches deleted")


def held_bytes(core, ino):
    """st_blocks's bytes by their definition, block by block: each block's bytes below the
    size, from memory where it is dirty (a patch: the stored block's), else the stored
    length the metadata records."""
    live = core.flusher.live(ino)
    size = core.fs.getattr(ino).size
    if live is None:
        rows = {idx: ref.length for idx, ref in refs_of(core, ino).items()}
    else:
        with live.lock:  # uploads commit under it: the map and the dirty blocks agree
            rows = {idx: ref.length for idx, ref in refs_of(core, ino).items()}
            for idx, blk in live.dirty.items():
                rows[idx] = blk.base.length if blk.base is not None else len(blk.data)
    return sum(min(n, max(0, size - idx * BS)) for idx, n in rows.items())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_small_writes_over_stored_blocks_match_a_model_across_restarts(make_core, seed):
    """Patches under every change that touches them: small writes into stored blocks
    (patches, patches over patches, overlapping ones), writes that merge a block whole,
    truncations into and past patched blocks, punched holes, fsyncs, dropped caches and
    clean restarts from the metadata on disk. The file always reads as the model; at the
    end the store holds exactly the blocks the block maps read."""
    rng = random.Random(seed)
    core = make_core()
    fs = core.fs
    model = bytearray(pattern(6 * BS, seed))
    ino, fh = new_file(fs, b"model", bytes(model))
    fs.fsync(fh)
    for step in range(300):
        op = rng.random()
        if op < 0.6:
            offset = rng.randrange(0, max(1, len(model) + 100))
            n = rng.choice([1, 5, 512, 4096, rng.randrange(1, BS // 3)])
            data = rng.randbytes(n)
            assert fs.write(fh, offset, data) == n
            model.extend(bytes(max(0, offset + n - len(model))))
            model[offset:offset + n] = data
        elif op < 0.68:
            size = rng.randrange(0, 7 * BS)
            fs.setattr(ino, size=size)
            del model[size:]
            model.extend(bytes(size - len(model)))
        elif op < 0.74:
            start, n = rng.randrange(0, 6 * BS), rng.randrange(1, 2 * BS)
            fs.fallocate(fh, PUNCH, start, n)
            end = min(start + n, len(model))
            if start < end:
                model[start:end] = bytes(end - start)
        elif op < 0.86:
            fs.fsync(fh)
        elif op < 0.92:
            forget_cached(core)
        else:  # a clean restart: everything reads from the metadata written so far
            fs.fsync(fh)
            close(fs, fh)
            store = core.store
            core.close()
            core = make_core(store=store, fresh=False)
            fs = core.fs
            fh = fs.open(ino, os.O_RDWR)
        attrs = fs.getattr(ino)
        assert attrs.size == len(model), f"step {step}"
        assert attrs.stored == held_bytes(core, ino), f"step {step}"
        off = rng.randrange(0, max(1, len(model)))
        assert fs.read(fh, off, 5000) == bytes(model[off:off + 5000]), f"step {step}"
    assert fs.read(fh, 0, len(model) + 10) == bytes(model)
    assert any(r.patches for r in refs_of(core, ino).values()) or len(model) < BS
    fs.fsync(fh)
    close(fs, fh)
    wait_until(lambda: core.flusher.dirty_bytes == 0, what="uploads done")
    wait_until(lambda: store_matches_metadata(core), what="no block leaked")


# -- attributes ------------------------------------------------------------------------------


def test_chmod_chown_utimens_with_nanoseconds_and_ctime(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f", b"x")
    close(fs, fh)
    core.md.set_attrs(ino, ctime_ns=1)  # a known old ctime: any change must move it

    attrs = fs.setattr(ino, mode=0o4751)
    assert attrs.mode == stat.S_IFREG | 0o4751  # the type bits stay
    assert attrs.ctime_ns > 1
    core.md.set_attrs(ino, ctime_ns=1)
    attrs = fs.setattr(ino, uid=1234, gid=5678)
    assert (attrs.uid, attrs.gid) == (1234, 5678)
    assert attrs.ctime_ns > 1
    attrs = fs.setattr(ino, uid=-1, gid=-1)  # -1 means "leave as is"
    assert (attrs.uid, attrs.gid) == (1234, 5678)
    core.md.set_attrs(ino, ctime_ns=1)
    attrs = fs.setattr(ino, atime_ns=1_234_567_890_123_456_789, mtime_ns=987_654_321_987_654_321)
    assert attrs.atime_ns == 1_234_567_890_123_456_789
    assert attrs.mtime_ns == 987_654_321_987_654_321
    assert attrs.ctime_ns > 1
    again = fs.getattr(ino)
    assert (again.atime_ns, again.mtime_ns) == (1_234_567_890_123_456_789,
                                                987_654_321_987_654_321)
    stored = core.md.inode(ino)
    assert (stored.mode, stored.uid, stored.gid) == (stat.S_IFREG | 0o4751, 1234, 5678)
    assert stored.mtime_ns == 987_654_321_987_654_321

    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).ino
    assert fs.setattr(d, mode=0o1777).mode == stat.S_IFDIR | 0o1777


def test_utimens_on_an_open_dirty_file_survives_the_upload(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f", pattern(BS + 5, 9))  # dirty
    fs.setattr(ino, mtime_ns=111_222_333_444_555_666, atime_ns=5)
    assert fs.getattr(ino).mtime_ns == 111_222_333_444_555_666
    fs.fsync(fh)
    assert fs.getattr(ino).mtime_ns == 111_222_333_444_555_666
    assert core.md.inode(ino).mtime_ns == 111_222_333_444_555_666
    assert core.md.inode(ino).atime_ns == 5
    close(fs, fh)
    assert fs.getattr(ino).mtime_ns == 111_222_333_444_555_666


def test_setgid_directory_is_inherited(fs):
    d = fs.mkdir(ROOT_INO, b"shared", 0o775, 0, 0).ino
    fs.setattr(d, gid=500, mode=0o2775)
    assert fs.getattr(d).mode & stat.S_ISGID
    sub = fs.mkdir(d, b"sub", 0o755, 1000, 1000)
    assert sub.gid == 500  # the directory's group, not the creator's
    assert sub.mode & stat.S_ISGID  # and subdirectories stay setgid
    ino, fh = new_file(fs, b"file", parent=sub.ino)
    close(fs, fh)
    f = fs.getattr(ino)
    assert f.gid == 500 and not f.mode & stat.S_ISGID
    # without setgid the creator's group is used
    plain = fs.mkdir(ROOT_INO, b"plain", 0o755, 1000, 1001)
    assert plain.gid == 1001 and not plain.mode & stat.S_ISGID
    inner = fs.mkdir(plain.ino, b"inner", 0o755, 1000, 1002)
    assert inner.gid == 1002


# -- extended attributes ---------------------------------------------------------------------


def test_xattrs_set_get_list_remove(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f")
    close(fs, fh)
    assert fs.listxattr(ino) == []
    core.md.set_attrs(ino, ctime_ns=1)
    fs.setxattr(ino, b"user.b", b"\x00binary\xff")
    assert fs.getattr(ino).ctime_ns > 1
    fs.setxattr(ino, b"user.a", b"")
    assert fs.getxattr(ino, b"user.b") == b"\x00binary\xff"
    assert fs.getxattr(ino, b"user.a") == b""
    assert sorted(fs.listxattr(ino)) == [b"user.a", b"user.b"]
    fs.setxattr(ino, b"user.a", b"replaced")
    assert fs.getxattr(ino, b"user.a") == b"replaced"
    fs.removexattr(ino, b"user.b")
    assert fs.listxattr(ino) == [b"user.a"]
    expect_errno(errno.ENODATA, fs.getxattr, ino, b"user.b")
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).ino
    fs.setxattr(d, b"user.dir", b"v")
    assert fs.getxattr(d, b"user.dir") == b"v"
    assert fs.listxattr(ino) == [b"user.a"]  # per inode


def test_xattr_calls_on_a_file_being_written_do_not_add_up_its_blocks(core, monkeypatch):
    """The kernel asks for security.capability before every write: getxattr (and the other
    xattr calls) must not walk a live file's blocks, which made each 4 KiB write into a
    1 GiB file cost a walk of 1,024 blocks. A unit test of the layer: the block walk
    (DataPath.stored) is made to fail, and every xattr call still works."""
    fs = core.fs
    ino, fh = new_file(fs, b"f", pattern(3 * BS, 5))
    fs.setxattr(ino, b"user.k", b"v")

    def walked(*_):
        raise AssertionError("an xattr call walked the file's blocks")
    monkeypatch.setattr(core.fs.data, "stored", walked)
    expect_errno(errno.ENODATA, fs.getxattr, ino, b"security.capability")
    assert fs.getxattr(ino, b"user.k") == b"v"
    assert b"user.k" in fs.listxattr(ino)
    fs.setxattr(ino, b"user.j", b"w")
    fs.removexattr(ino, b"user.j")
    monkeypatch.undo()
    assert fs.getattr(ino).stored == 3 * BS
    close(fs, fh)


def test_xattr_flags_and_missing_names(fs):
    ino, fh = new_file(fs, b"f")
    close(fs, fh)
    fs.setxattr(ino, b"user.k", b"v1", XATTR_CREATE)
    expect_errno(errno.EEXIST, fs.setxattr, ino, b"user.k", b"v2", XATTR_CREATE)
    assert fs.getxattr(ino, b"user.k") == b"v1"
    expect_errno(errno.ENODATA, fs.setxattr, ino, b"user.none", b"v", XATTR_REPLACE)
    expect_errno(errno.ENODATA, fs.getxattr, ino, b"user.none")
    fs.setxattr(ino, b"user.k", b"v3", XATTR_REPLACE)
    assert fs.getxattr(ino, b"user.k") == b"v3"
    expect_errno(errno.ENODATA, fs.getxattr, ino, b"user.missing")
    expect_errno(errno.ENODATA, fs.removexattr, ino, b"user.missing")
    assert fs.listxattr(ino) == [b"user.k"]
    expect_errno(errno.ENOENT, fs.getxattr, 424242, b"user.k")


def test_xattrs_of_a_removed_inode_are_gone(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f")
    close(fs, fh)
    fs.setxattr(ino, b"user.k", b"v")
    fs.unlink(ROOT_INO, b"f")
    assert core.md.xattr(ino, b"user.k") is None
    ino2, fh = new_file(fs, b"g")
    close(fs, fh)
    assert fs.listxattr(ino2) == []


# -- durability and failures (P1, P7) --------------------------------------------------------


def test_fsync_returns_only_when_the_store_has_the_blocks(core):
    fs = core.fs
    data = pattern(3 * BS + 123, 21)
    ino, fh = new_file(fs, b"f", data)
    fs.fsync(fh)
    refs = refs_of(core, ino)
    assert sorted(refs) == [0, 1, 2, 3]
    stored = core.store.block_ids()
    assert {r.block_id for r in refs.values()} <= stored
    for idx, ref in refs.items():
        assert core.store.get(ref.block_id, ref.checksum) == data[idx * BS:(idx + 1) * BS]
    assert core.md.inode(ino).size == len(data)
    # the block map is committed: another connection sees it
    assert {b for (i, _), b in referenced(core.db_path).items() if i == ino} == {
        r.block_id for r in refs.values()}
    # a second fsync with new data again waits for the new block
    fs.write(fh, BS + 1, b"second")
    fs.fsync(fh, datasync=True)
    new = refs_of(core, ino)[1]
    assert new.block_id == refs[1].block_id and len(new.patches) == 1  # 6 bytes went
    patch = new.patches[0]
    assert (patch.start, patch.length) == (1, 6) and patch.block_id in core.store.block_ids()
    assert core.store.get(patch.block_id, patch.checksum)[patch.at:patch.at + 6] == b"second"
    close(fs, fh)


def test_close_starts_the_upload_without_waiting(make_core):
    """close() returns while the upload it started is still held inside put()."""
    store = HeldStore()
    core = make_core(store=store, max_age=3600)  # only an explicit request uploads
    fs = core.fs
    ino, fh = new_file(fs, b"f", pattern(1000, 8))  # one block, not full: not uploaded yet
    store.hold.clear()
    closer = threading.Thread(target=close, args=(fs, fh), daemon=True)
    try:
        closer.start()
        assert store.entered.wait(GUARD), "close started no upload"
        closer.join(GUARD / 2)  # the held put waits GUARD: a close that waits is still here
        assert not closer.is_alive(), "close waited for the upload"
        assert store.puts == 0 and refs_of(core, ino) == {}  # the put is still held
    finally:
        store.hold.set()
    wait_until(lambda: sorted(refs_of(core, ino)) == [0], what="upload after close")
    assert {r.block_id for r in refs_of(core, ino).values()} <= core.store.block_ids()
    assert core.md.inode(ino).size == 1000


def test_outage_fsync_and_close_report_the_error_and_nothing_is_lost(core):
    fs = core.fs
    first = pattern(2 * BS + 77, 31)
    ino, fh = new_file(fs, b"f", first)
    fs.fsync(fh)
    before = core.store.block_ids()

    core.store.fail_with = errors.Unavailable("down")
    # writes that need no stored bytes: a whole block, and new blocks past the end
    whole = pattern(BS, 32)
    fs.write(fh, BS, whole)
    fs.write(fh, 3 * BS + 5, b"appended during the outage")
    expected = bytearray(first) + bytes(3 * BS + 5 - len(first)) + b"appended during the outage"
    expected[BS:2 * BS] = whole
    with pytest.raises(errors.Unavailable) as info:
        fs.fsync(fh)
    assert isinstance(info.value, errors.StorageError)
    with pytest.raises(errors.StorageError):
        fs.flush(fh)  # close(2) reports it too
    assert fs.read(fh, BS, BS) == whole  # served from memory while the store is down
    assert fs.read(fh, 3 * BS, 100) == bytes(expected[3 * BS:])
    assert fs.getattr(ino).size == len(expected)
    assert core.store.block_ids() == before  # nothing was stored meanwhile
    with pytest.raises(errors.StorageError):
        fs.fsync(fh)  # still failing: still reported

    core.store.fail_with = None
    fs.fsync(fh)
    fs.flush(fh)  # no error left to report: the data is safe now
    refs = refs_of(core, ino)
    assert {r.block_id for r in refs.values()} <= core.store.block_ids()
    fs.release(fh)
    forget_cached(core)
    fh = fs.open(ino, os.O_RDONLY)
    assert fs.read(fh, 0, 4 * BS) == bytes(expected)
    close(fs, fh)


def test_no_stale_error_after_the_store_recovered(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f", b"a")
    core.store.fail_with = errors.Unavailable("down")
    with pytest.raises(errors.Unavailable):
        fs.fsync(fh)
    core.store.fail_with = None
    fs.fsync(fh)
    fs.write(fh, 1, b"b")  # new dirty data, and no upload has failed since
    fs.flush(fh)
    fs.fsync(fh)
    fs.release(fh)
    fh = fs.open(ino, os.O_RDONLY)
    assert fs.read(fh, 0, 10) == b"ab"
    close(fs, fh)


def test_background_upload_failure_is_reported_to_close(make_core):
    core = make_core(max_age=0.05)
    fs = core.fs
    core.store.fail_with = errors.Unavailable("down")
    ino, fh = new_file(fs, b"f", b"data")
    live = core.flusher.live(ino)
    wait_until(lambda: live.error is not None, what="a background upload to fail")
    with pytest.raises(errors.Unavailable):
        fs.flush(fh)
    assert fs.read(fh, 0, 10) == b"data"
    core.store.fail_with = None
    fs.fsync(fh)
    close(fs, fh)
    assert core.md.inode(ino).size == 4


def test_writers_block_on_back_pressure_and_finish_when_the_store_recovers(make_core):
    limit = 1 << 20
    core = make_core(dirty_limit=limit)
    fs = core.fs
    total = 4 * limit
    data = pattern(total, 41)
    ino, fh = new_file(fs, b"f")
    core.store.fail_with = errors.Unavailable("down")
    progress = []
    failures = []

    def writer():
        try:
            for off in range(0, total, BS):
                fs.write(fh, off, data[off:off + BS])
                progress.append(off)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            failures.append(e)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    wait_until(lambda: core.flusher.dirty_bytes > limit or not thread.is_alive(),
               what="dirty memory to reach its bound")
    stuck_at = len(progress)
    # A deliberate window (the check is that nothing happens, so there is nothing to poll):
    time.sleep(0.5)  # give a non-blocking writer every chance to run on
    assert thread.is_alive(), f"the writer did not block (failures: {failures})"
    assert not failures
    assert len(progress) == stuck_at
    assert len(progress) * BS < total
    assert core.flusher.dirty_bytes <= limit + BS  # bounded, and nothing was dropped
    assert fs.read(fh, 0, len(progress) * BS) == data[:len(progress) * BS]

    core.store.fail_with = None
    thread.join(GUARD)
    assert not thread.is_alive(), "the writer never resumed"
    assert not failures
    assert len(progress) == total // BS
    fs.fsync(fh)
    close(fs, fh)
    forget_cached(core)
    fh = fs.open(ino, os.O_RDONLY)
    assert fs.read(fh, 0, total + 10) == data
    close(fs, fh)
    assert len(refs_of(core, ino)) == total // BS


# -- garbage ---------------------------------------------------------------------------------


def test_overwritten_blocks_become_garbage_and_are_collected(core):
    fs = core.fs
    a, fh = new_file(fs, b"a", pattern(3 * BS, 51))
    fs.fsync(fh)
    old = {idx: r.block_id for idx, r in refs_of(core, a).items()}
    fs.write(fh, 0, pattern(BS, 52))  # block 0 fully replaced
    fs.write(fh, 2 * BS + 5, b"x")  # block 2 patched
    fs.fsync(fh)
    new = {idx: r.block_id for idx, r in refs_of(core, a).items()}
    assert new[1] == old[1] and new[0] != old[0] and new[2] == old[2]
    assert len(refs_of(core, a)[2].patches) == 1
    replaced = {old[0]}
    assert replaced <= set(core.md.garbage(10000)) | (replaced - core.store.block_ids())
    b, fh2 = new_file(fs, b"b", pattern(BS, 53))
    fs.fsync(fh2)
    close(fs, fh2)
    fs.setattr(a, size=BS)  # blocks 1, 2 go
    fs.fsync(fh)
    close(fs, fh)
    wait_until(lambda: core.flusher.dirty_bytes == 0, what="uploads done")

    core.flusher.collect_garbage()
    assert core.md.garbage(10000) == []
    wanted = set(referenced(core.db_path).values())
    assert wanted == {new[0]} | {r.block_id for r in refs_of(core, b).values()}
    wait_until(lambda: store_matches_metadata(core), what="store == referenced blocks")
    for ino in (a, b):
        for ref in refs_of(core, ino).values():
            assert len(core.store.get(ref.block_id, ref.checksum)) == ref.length
    forget_cached(core)
    fh = fs.open(a, os.O_RDONLY)
    assert fs.read(fh, 0, 3 * BS) == pattern(BS, 52)
    close(fs, fh)


# -- the whole filesystem --------------------------------------------------------------------


def test_statfs_returns_sane_fields(fs):
    st = fs.statfs()
    for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                "f_ffree", "f_favail", "f_namemax"):
        assert isinstance(st[key], int) and st[key] >= 0, key
    assert st["f_bsize"] > 0 and st["f_frsize"] > 0
    assert st["f_bavail"] <= st["f_bfree"] <= st["f_blocks"]
    assert st["f_favail"] <= st["f_ffree"] <= st["f_files"]
    assert st["f_namemax"] == 255
    used_inodes = st["f_files"] - st["f_ffree"]
    assert used_inodes == 1  # the root
    fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    _, fh = new_file(fs, b"f")
    close(fs, fh)
    st = fs.statfs()
    assert st["f_files"] - st["f_ffree"] == 3


def test_truncate_then_crash_then_extend_reads_zeros_not_old_bytes(make_core):
    """The cut block is still dirty when the process dies: after restart, growing the file
    must not bring back the bytes that were cut off."""
    first = make_core(max_age=3600)  # nothing uploads unless asked
    fs = first.fs
    ino, fh = new_file(fs, b"f", b"\xaa" * (2 * BS))
    fs.fsync(fh)
    cut = BS + 100
    fs.setattr(ino, size=cut)
    assert first.flusher.live(ino).dirty  # the cut copy of block 1 is not uploaded yet
    first.close()  # crash: no flush, no release

    second = make_core(store=first.store, fresh=False)
    fs = second.fs
    assert fs.getattr(ino).size == cut
    fh = fs.open(ino, os.O_RDWR)
    assert fs.read(fh, 0, 2 * BS) == b"\xaa" * cut
    fs.setattr(ino, size=2 * BS)
    assert fs.read(fh, 0, 2 * BS) == b"\xaa" * cut + bytes(2 * BS - cut)
    fs.write(fh, cut + 10, b"x")  # a merge into the block must not revive them either
    expected = b"\xaa" * cut + bytes(10) + b"x" + bytes(2 * BS - cut - 11)
    assert fs.read(fh, 0, 2 * BS) == expected
    fs.fsync(fh)
    forget_cached(second)
    assert fs.read(fh, 0, 2 * BS) == expected
    close(fs, fh)


class GatedLock:
    """Stands in for the flusher's registry lock: `thread` stops before its first
    acquisition until `go` is set, which widens a race window deterministically."""

    def __init__(self, inner):
        self.inner = inner
        self.thread = None
        self.reached = threading.Event()
        self.go = threading.Event()

    def __enter__(self):
        if threading.current_thread() is self.thread and not self.go.is_set():
            self.reached.set()
            self.go.wait(GUARD)
        self.inner.acquire()
        return self

    def __exit__(self, *exc):
        self.inner.release()


def test_open_racing_with_forgetting_an_idle_file_loses_nothing(make_core):
    """The flusher forgets the live state of a closed, clean file while an open of the
    same inode is under way: the open must end up on the registered state, or its
    writes would never be uploaded and a second open would not see them."""
    core = make_core(max_age=3600)
    fs, flusher = core.fs, core.flusher
    ino, fh = new_file(fs, b"f", b"old")
    fs.fsync(fh)
    close(fs, fh)
    idle = flusher.file(ino)  # registered, closed and clean: may be forgotten any time
    gate = GatedLock(flusher._lock)
    flusher._lock = gate
    forgetter = threading.Thread(target=flusher.forget_if_idle, args=(idle,), daemon=True)
    gate.thread = forgetter
    forgetter.start()
    assert gate.reached.wait(GUARD)
    opened = []
    opener = threading.Thread(target=lambda: opened.append(fs.open(ino, os.O_RDWR)),
                              daemon=True)
    opener.start()
    # Returns as soon as the open finishes; the bound is a deliberate window for an open
    # that waits for the forgetter (nothing to poll: either outcome is allowed here).
    opener.join(1.0)  # a racing open gets every chance to slip into the window
    gate.go.set()
    forgetter.join(GUARD)
    opener.join(GUARD)
    flusher._lock = gate.inner
    assert opened, "open did not finish"
    fh = opened[0]
    fs.write(fh, 0, b"new")
    fh2 = fs.open(ino, os.O_RDONLY)
    assert fs.read(fh2, 0, 10) == b"new"  # one live state per inode
    synced = threading.Thread(target=fs.fsync, args=(fh,), daemon=True)
    synced.start()
    synced.join(GUARD)
    assert not synced.is_alive(), "fsync never finished: the dirty data is not uploaded"
    assert core.md.inode(ino).size == 3
    ref = refs_of(core, ino)[0]
    assert core.store.get(ref.block_id, ref.checksum) == b"new"
    close(fs, fh2)
    close(fs, fh)


class HeldStore(MemoryBlockStore):
    """put() waits while `hold` is clear, so a test can act while an upload is in flight."""

    def __init__(self):
        super().__init__()
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def put(self, block_id, data, checksum):
        self.entered.set()
        self.hold.wait(GUARD)
        super().put(block_id, data, checksum)


def test_block_rewritten_after_truncation_during_its_upload_keeps_the_new_data(make_core):
    """Block 0 is uploading when a truncation drops it and a write creates it again: the
    finished upload of the old bytes must not be committed over the new ones."""
    store = HeldStore()
    core = make_core(store=store, max_age=3600)
    fs = core.fs
    ino, fh = new_file(fs, b"f", b"A" * 100)
    store.hold.clear()
    fs.flush(fh)  # starts the upload of "A"*100, which now waits inside put()
    assert store.entered.wait(GUARD)
    fs.setattr(ino, size=0)
    fs.write(fh, 0, b"B" * 100)
    store.hold.set()
    wait_until(lambda: store.puts >= 1, what="the old upload to finish")
    assert fs.read(fh, 0, 200) == b"B" * 100
    fs.fsync(fh)
    assert fs.read(fh, 0, 200) == b"B" * 100
    ref = refs_of(core, ino)[0]
    assert core.store.get(ref.block_id, ref.checksum) == b"B" * 100
    close(fs, fh)
    wait_until(lambda: store_matches_metadata(core), what="the stale upload is garbage")


class SnapshotStore(HeldStore):
    """Records whether the bytes a put() was given changed while it was held."""

    def __init__(self):
        super().__init__()
        self.changed_under_put = []

    def put(self, block_id, data, checksum):
        before = bytes(data)
        try:
            super().put(block_id, data, checksum)
        finally:
            if bytes(data) != before:
                self.changed_under_put.append(block_id)


@pytest.mark.parametrize("change", ["write", "truncate"])
def test_writes_during_an_upload_leave_the_uploaded_bytes_alone(make_core, change):
    """An upload sends the dirty buffer itself (no copy), and the block cache then keeps
    that object: a write into the block meanwhile (in place, appended, or a truncation
    cutting it) changes a copy."""
    store = SnapshotStore()
    core = make_core(store=store, max_age=3600)
    fs = core.fs
    ino, fh = new_file(fs, b"f", b"A" * 100)
    store.hold.clear()
    fs.flush(fh)  # the upload of "A"*100 now waits inside put(), holding the buffer
    assert store.entered.wait(GUARD)
    if change == "write":
        fs.write(fh, 10, b"B" * 10)
        fs.write(fh, 100, b"C" * 50)
        expected = b"A" * 10 + b"B" * 10 + b"A" * 80 + b"C" * 50
    else:
        fs.setattr(ino, size=50)
        expected = b"A" * 50
    store.hold.set()
    wait_until(lambda: store.puts >= 1, what="the first upload to finish")
    fs.fsync(fh)
    assert fs.read(fh, 0, 500) == expected
    ref = refs_of(core, ino)[0]
    assert core.store.get(ref.block_id, ref.checksum) == expected
    assert bytes(core.cache.get(ref.block_id, ref.checksum)) == expected
    assert store.changed_under_put == []
    assert core.flusher.recent_errors() == []  # no upload failed on bytes that moved
    close(fs, fh)


@pytest.mark.parametrize("action", ["open", "truncate"])
def test_state_forgotten_just_after_lookup_is_not_used(make_core, action):
    """open/truncate take a file's live state from the flusher, which may forget it (the
    file being closed and clean) before they lock it: they must notice and not put new
    state into a FileData that nothing uploads any more."""
    core = make_core(max_age=3600)
    fs, flusher = core.fs, core.flusher
    ino, fh = new_file(fs, b"f", b"old")
    fs.fsync(fh)
    close(fs, fh)
    idle = flusher.file(ino)
    original = flusher.file
    paused, go = threading.Event(), threading.Event()
    results = []

    def file_then_pause(i, *rest):
        live = original(i, *rest)
        if threading.current_thread() is worker and not go.is_set():
            paused.set()
            go.wait(GUARD)
        return live

    def work():
        if action == "open":
            results.append(fs.open(ino, os.O_RDWR))
        else:
            fs.setattr(ino, size=1)  # cuts the clean block: a new dirty block
            results.append(None)

    flusher.file = file_then_pause
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        assert paused.wait(GUARD)
        flusher.forget_if_idle(idle)  # closed and clean: forgotten right now
    finally:
        go.set()
        worker.join(GUARD)
        del flusher.file
    assert results, "the call did not finish"
    if action == "open":
        fh = results[0]
        fs.write(fh, 0, b"new")
        fh2 = fs.open(ino, os.O_RDONLY)
        assert fs.read(fh2, 0, 10) == b"new"  # one live state per inode
        close(fs, fh2)
        synced = threading.Thread(target=fs.fsync, args=(fh,), daemon=True)
        synced.start()
        synced.join(GUARD)
        assert not synced.is_alive(), "fsync never finished: the dirty data is not uploaded"
        close(fs, fh)
        expected = b"new"
    else:
        expected = b"o"
        # the cut block is uploaded (in the background: no handle asks for it)
        flusher.request(flusher.file(ino))
        wait_until(lambda: flusher.dirty_bytes == 0, what="the cut block to be uploaded")
    ref = refs_of(core, ino)[0]
    assert core.store.get(ref.block_id, ref.checksum) == expected
    assert core.md.inode(ino).size == len(expected)


def test_a_full_cluster_makes_fsync_fail_with_enospc_and_loses_nothing(core):
    fs = core.fs
    data = pattern(3 * BS + 10, 71)
    ino, fh = new_file(fs, b"f", data)
    core.store.fail_with = errors.StorageFull("every server is full")
    with pytest.raises(errors.StorageError) as raised:
        fs.fsync(fh)
    assert raised.value.errno == errno.ENOSPC
    assert fs.read(fh, 0, len(data)) == data  # still held in memory
    core.store.fail_with = None
    fs.fsync(fh)
    assert fs.read(fh, 0, len(data)) == data


def test_a_block_no_replica_can_return_reads_as_eio(core):
    fs = core.fs
    data = pattern(2 * BS, 72)
    ino, fh = new_file(fs, b"f", data)
    fs.fsync(fh)
    for block_id in core.store.block_ids():
        core.cache.discard(block_id)  # the next read must ask the store
    core.store.fail_with = errors.Unavailable("no replica answered")
    with pytest.raises(errors.StorageError) as raised:
        fs.read(fh, 0, BS)
    assert raised.value.errno == errno.EIO
    core.store.fail_with = None
    assert fs.read(fh, 0, len(data)) == data


# -- crash states are prefixes; retries; garbage only after durable --------------------------


class PartialStore(MemoryBlockStore):
    """While `failing`, put() stores the block and then fails, as a cluster does when some
    servers took the copy and too few for the quorum did. `tried` lists every put's id."""

    def __init__(self):
        super().__init__()
        self.failing = False
        self.tried: list[str] = []
        self.deleted: list[str] = []

    def put(self, block_id, data, checksum):
        self.tried.append(block_id)
        super().put(block_id, data, checksum)
        if self.failing:
            raise errors.QuorumNotReached(f"block {block_id}: refused by the test")

    def delete_many(self, block_ids):
        self.deleted += block_ids
        super().delete_many(block_ids)


def no_upload_running(core, ino):
    live = core.flusher.live(ino)
    with live.lock:
        return not any(b.uploading for b in live.dirty.values())


def test_recorded_size_never_covers_a_block_still_in_memory(make_core):
    """Review #10: block 0 fills and is uploaded while block 1 is still dirty. The size
    recorded with block 0 ends where block 0 ends: after a crash the file is a prefix of
    what was written, never with a zero-filled tail the application did not write."""
    first = make_core(max_age=3600)
    data = pattern(BS + 5000, 61)
    ino, fh = new_file(first.fs, b"f", data)
    wait_until(lambda: 0 in refs_of(first, ino), what="the full block 0 committed")
    assert 1 in first.flusher.live(ino).dirty  # block 1 is in memory only
    assert first.md.inode(ino).size == BS
    first.close()  # crash: no flush, no release

    second = make_core(store=first.store, fresh=False)
    fh = second.fs.open(ino, os.O_RDONLY)
    assert read_all(second.fs, fh, ino) == data[:BS]
    close(second.fs, fh)


@pytest.mark.parametrize("then", ["crash", "fsync"])
def test_a_block_uploaded_before_a_lower_dirty_one_is_committed_after_it(make_core, then):
    """Block 1 is full and goes up at once while block 0, below it, is still dirty. Neither
    the size nor the block map may describe block 1 before block 0 is committed: after a
    crash the file is empty (a past state), never zeros followed by block 1."""
    store = PartialStore()
    first = make_core(store=store, max_age=3600)
    fs = first.fs
    ino, fh = new_file(fs, b"f", b"A" * 100)  # block 0: dirty, not full
    fs.write(fh, BS, pattern(BS, 62))  # block 1: full, so uploaded without waiting
    wait_until(lambda: store.puts >= 1 and no_upload_running(first, ino),
               what="block 1 uploaded and handled")
    assert first.md.inode(ino).size == 0 and refs_of(first, ino) == {}
    if then == "fsync":
        fs.fsync(fh)
        assert first.md.inode(ino).size == 2 * BS and sorted(refs_of(first, ino)) == [0, 1]
        assert len(store.tried) == 2  # block 1 was not uploaded a second time
        forget_cached(first)
        assert read_all(fs, fh, ino) == b"A" * 100 + bytes(BS - 100) + pattern(BS, 62)
        close(fs, fh)
        return
    first.close()  # crash
    second = make_core(store=store, fresh=False)
    assert second.fs.getattr(ino).size == 0 and refs_of(second, ino) == {}


def test_sparse_write_above_clean_blocks_records_the_full_size(make_core):
    """A write far past the end with every block below it clean: the hole is a state that
    existed, so the commit of the far block records the whole size."""
    core = make_core(max_age=3600)
    fs = core.fs
    ino, fh = new_file(fs, b"f", pattern(BS, 63))
    fs.fsync(fh)
    fs.write(fh, 10 * BS, pattern(BS, 64))  # full: uploaded at once
    wait_until(lambda: 10 in refs_of(core, ino), what="the far block committed")
    assert core.md.inode(ino).size == 11 * BS
    close(fs, fh)


def test_a_failed_upload_is_retried_under_the_same_block_id(make_core):
    """Review #13: every retry used to take a fresh id, leaving one copy behind per
    attempt on the servers that took it. The same bytes now go up under the same id."""
    store = PartialStore()
    core = make_core(store=store, max_age=3600)
    fs = core.fs
    ino, fh = new_file(fs, b"f", pattern(5000, 65))
    store.failing = True
    for _ in range(3):
        with pytest.raises(errors.QuorumNotReached):
            fs.fsync(fh)
    store.failing = False
    fs.fsync(fh)
    assert len(store.tried) == 4 and len(set(store.tried)) == 1
    assert refs_of(core, ino)[0].block_id == store.tried[0]
    close(fs, fh)
    wait_until(lambda: store_matches_metadata(core), what="no copy left behind")


def test_a_failed_upload_of_bytes_changed_since_becomes_garbage(make_core):
    """The bytes changed after a failed (partly stored) upload: they go up under a new id
    and the copies of the old attempt are garbage, collected like any other."""
    store = PartialStore()
    core = make_core(store=store, max_age=3600)
    fs = core.fs
    ino, fh = new_file(fs, b"f", pattern(5000, 66))
    store.failing = True
    with pytest.raises(errors.QuorumNotReached):
        fs.fsync(fh)
    first_try = store.tried[0]
    fs.write(fh, 0, b"changed")
    store.failing = False
    fs.fsync(fh)
    assert refs_of(core, ino)[0].block_id != first_try
    close(fs, fh)
    wait_until(lambda: store_matches_metadata(core), what="the old attempt collected")
    assert first_try in store.deleted


def test_garbage_is_deleted_only_after_the_records_that_dropped_it_are_durable(make_core):
    """P2 "no file points at a missing block": the garbage collector waits for `durable`
    (the journal on a mount) before it deletes a replaced block."""
    store = PartialStore()
    core = make_core(store=store)
    fs = core.fs
    ino, fh = new_file(fs, b"f", pattern(BS, 67))
    fs.fsync(fh)
    old = refs_of(core, ino)[0].block_id
    gate, reached = threading.Event(), threading.Event()

    def durable():
        reached.set()
        gate.wait(GUARD)

    core.flusher.durable = durable
    try:
        fs.write(fh, 0, pattern(BS, 68))
        fs.fsync(fh)  # block 0 replaced: the old one is garbage now
        assert old in core.md.garbage(100)
        assert reached.wait(GUARD), "the garbage thread never waited for durability"
        assert store.deleted == [] and old in store.block_ids()
    finally:
        gate.set()
    wait_until(lambda: old in store.deleted, what="garbage deleted once durable")
    close(fs, fh)


@pytest.mark.parametrize("new_size", [50, 5 * BS])
def test_truncating_past_a_dirty_block_records_no_size_it_does_not_hold(make_core, new_size):
    """Review #10's whole class: a truncation (down or up) while block 0 is only in memory
    must not record a size that covers it, or a crash shows zeros nobody wrote."""
    first = make_core(max_age=3600)
    ino, _fh = new_file(first.fs, b"f", b"A" * 100)
    first.fs.setattr(ino, size=new_size)
    first.close()  # crash: block 0 never uploaded
    second = make_core(store=first.store, fresh=False)
    assert second.fs.getattr(ino).size == 0


# -- fallocate: punching holes ---------------------------------------------------------------

PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def stored_bytes(fs, ino):
    return fs.getattr(ino).stored


def test_punch_hole_drops_whole_blocks_zeroes_edges_and_frees_them(core):
    fs = core.fs
    data = pattern(6 * BS, seed=3)
    ino, fh = new_file(fs, b"img", data)
    fs.fsync(fh)
    assert stored_bytes(fs, ino) == 6 * BS
    fs.fallocate(fh, PUNCH, BS // 2, 4 * BS)  # [0.5, 4.5): blocks 1..3 go, 0 and 4 halved
    expected = data[:BS // 2] + bytes(4 * BS) + data[9 * BS // 2:]
    assert fs.getattr(ino).size == 6 * BS
    assert fs.read(fh, 0, 7 * BS) == expected
    assert stored_bytes(fs, ino) == 3 * BS  # blocks 0, 4 and 5 remain
    fs.fsync(fh)
    assert sorted(idx for _, idx in referenced(core.db_path)) == [0, 4, 5]
    forget_cached(core)
    assert fs.read(fh, 0, 7 * BS) == expected
    close(fs, fh)
    wait_until(lambda: store_matches_metadata(core), what="punched blocks deleted")


def test_punch_hole_of_dirty_blocks_survives_a_crash(make_core):
    """The punched blocks are dirty in memory when the process dies: after the restart
    the range reads zeros (the record dropped the clean copies; the dirty ones are gone)."""
    first = make_core(max_age=3600)  # nothing uploads unless asked
    fs = first.fs
    ino, fh = new_file(fs, b"f", b"\xaa" * (4 * BS))
    fs.fsync(fh)
    fs.write(fh, 0, b"\xbb" * (4 * BS))  # dirty, over the recorded blocks
    fs.fallocate(fh, PUNCH, BS, 2 * BS)
    assert set(first.flusher.live(ino).dirty) == {0, 3}
    assert fs.read(fh, 0, 4 * BS) == b"\xbb" * BS + bytes(2 * BS) + b"\xbb" * BS
    first.close()  # crash: no flush

    second = make_core(store=first.store, fresh=False)
    fs = second.fs
    fh = fs.open(ino, os.O_RDONLY)
    got = fs.read(fh, 0, 4 * BS)
    assert got[BS:3 * BS] == bytes(2 * BS)  # never the old \xaa bytes of blocks 1 and 2
    assert got[:BS] in (b"\xaa" * BS, b"\xbb" * BS)  # full blocks may have uploaded
    assert got[3 * BS:] in (b"\xaa" * BS, b"\xbb" * BS)
    close(fs, fh)


def test_truncating_into_a_patched_block_cuts_its_patches_even_across_a_crash(make_core):
    """A truncation records the cut block's new length and cuts its patches with it (one
    wholly past the end goes, with its small block). The process dies before the cut
    block is uploaded again: after the restart, growing the file reads zeros past the
    cut, never a patch's bytes."""
    first = make_core(max_age=3600)
    fs = first.fs
    ino, fh = new_file(fs, b"f", b"\xaa" * (2 * BS))
    fs.fsync(fh)
    fs.write(fh, BS + 1000, b"PATCH-ONE")
    fs.write(fh, BS + 400, b"PATCH-TWO")  # will straddle the cut at BS + 404
    fs.fsync(fh)
    patched = refs_of(first, ino)[1]
    assert len(patched.patches) == 2
    fs.setattr(ino, size=BS + 404)
    first.close()  # crash: the cut block, dirty now, is never uploaded

    second = make_core(store=first.store, fresh=False)
    fs = second.fs
    ref = refs_of(second, ino)[1]
    assert ref.block_id == patched.block_id and ref.length == 404
    assert [(p.start, p.length) for p in ref.patches] == [(400, 4)]
    fh = fs.open(ino, os.O_RDWR)
    fs.setattr(ino, size=2 * BS)
    got = fs.read(fh, BS, BS)
    assert got[:404] == b"\xaa" * 400 + b"PATC" and got[404:] == bytes(BS - 404)
    close(fs, fh)


def test_punch_hole_reaching_the_size_drops_the_last_block(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f", b"x" * (2 * BS + 10))
    fs.fallocate(fh, PUNCH, BS - 5, 10 * BS)
    assert fs.getattr(ino).size == 2 * BS + 10
    assert fs.read(fh, 0, 3 * BS) == b"x" * (BS - 5) + bytes(BS + 15)
    assert stored_bytes(fs, ino) == BS
    fs.fsync(fh)
    assert sorted(idx for _, idx in referenced(core.db_path)) == [0]
    close(fs, fh)


def test_fallocate_mode_zero_grows_other_modes_are_refused(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f", b"abc")
    fs.fallocate(fh, 0, 0, 3 * BS)
    assert fs.getattr(ino).size == 3 * BS and stored_bytes(fs, ino) == 3
    fs.fallocate(fh, 0, 0, 10)  # inside the file: nothing changes
    assert fs.getattr(ino).size == 3 * BS
    expect_errno(errno.EOPNOTSUPP, fs.fallocate, fh, 0x08, 0, BS)  # collapse range
    expect_errno(errno.EINVAL, fs.fallocate, fh, PUNCH, 0, 0)
    close(fs, fh)


@pytest.mark.parametrize("mode", [0, 0x01, 0x10], ids=["grow", "keep-size", "zero-range"])
def test_fallocate_past_the_end_beyond_the_free_space_is_enospc_and_changes_nothing(
        core, mode):
    """As on a local filesystem (xfstests generic/213): asking for more than `df` shows
    free fails at once, instead of a file that cannot be written. Within the free space,
    and inside the file, it succeeds."""
    fs = core.fs
    fs.capacity = lambda: (1 << 30, 10 * BS)
    ino, fh = new_file(fs, b"f", b"abc")
    expect_errno(errno.ENOSPC, fs.fallocate, fh, mode, 0, 11 * BS)
    assert fs.getattr(ino).size == 3 and fs.read(fh, 0, 10) == b"abc"
    fs.fallocate(fh, mode, BS, 9 * BS)  # 10 blocks less the 3 bytes already there
    fs.fallocate(fh, 0, 0, 3)  # inside the file: nothing more is needed
    assert fs.getattr(ino).size == (3 if mode & 0x01 else 10 * BS)
    close(fs, fh)


def test_fallocate_zero_range_zeroes_and_grows_unless_keep_size(core):
    fs = core.fs
    ino, fh = new_file(fs, b"f", b"x" * (3 * BS))
    fs.fallocate(fh, 0x10, BS // 2, BS)  # FALLOC_FL_ZERO_RANGE inside the file
    assert fs.read(fh, 0, 3 * BS) == b"x" * (BS // 2) + bytes(BS) + b"x" * (3 * BS // 2)
    fs.fallocate(fh, 0x10 | 0x01, 3 * BS, BS)  # past the end, KEEP_SIZE: nothing changes
    assert fs.getattr(ino).size == 3 * BS
    fs.fallocate(fh, 0x10, 2 * BS, 2 * BS)  # over the end: zeroed, and grown to 4 blocks
    assert fs.getattr(ino).size == 4 * BS
    assert fs.read(fh, 2 * BS - 1, 2 * BS + 1) == b"x" + bytes(2 * BS)
    expect_errno(errno.EOPNOTSUPP, fs.fallocate, fh, 0x10 | 0x02, 0, BS)  # with PUNCH_HOLE
    close(fs, fh)


def test_statfs_free_space_drops_by_what_is_stored_between_server_reports(core):
    fs = core.fs
    report = {"space": (1 << 30, 1 << 29)}  # what the servers said at their last sample
    fs.capacity = lambda: report["space"]
    free = lambda: fs.statfs()["f_bavail"] * fs.statfs()["f_frsize"]  # noqa: E731
    assert free() == 1 << 29
    ino, fh = new_file(fs, b"f", b"x" * (3 * BS))  # dirty: counted at once
    assert free() == (1 << 29) - 3 * BS
    fs.fsync(fh)  # recorded now: still counted once
    assert free() == (1 << 29) - 3 * BS
    report["space"] = (1 << 30, (1 << 29) - 3 * BS)  # a new sample that includes it
    assert free() == (1 << 29) - 3 * BS
    fs.fallocate(fh, PUNCH, 0, 3 * BS)  # punched: the space comes back
    assert free() == (1 << 29)
    close(fs, fh)


def test_an_append_goes_at_the_files_end_whatever_offset_it_carries(fs):
    """O_APPEND placement is the core's: the adapter passes the kernel's offset, which may
    come from a stale size (another name of the file grew it), and `append` says where."""
    ino, fh = new_file(fs, b"log", b"first ")
    other = fs.open(ino, os.O_WRONLY)
    fs.write(other, 6, b"second ")  # grows the file through another descriptor
    assert fs.write(fh, 0, b"third", append=True) == 5
    assert read_all(fs, fh, ino) == b"first second third"
    writers = [threading.Thread(target=fs.write, args=(fh, 0, b"x" * 1000),
                                kwargs={"append": True}) for _ in range(8)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(GUARD)
    assert fs.getattr(ino).size == 18 + 8 * 1000  # no two appends picked the same end
    close(fs, other)
    close(fs, fh)


def test_garbage_waits_until_it_stops_growing_or_has_waited_long_enough(make_core,
                                                                         monkeypatch):
    """The deletes of a removal wait until it ends (the garbage stopped growing from one
    look to the next), so that the servers do not unlink files while the user's rm -rf
    runs; garbage that keeps growing is deleted anyway after GC_WAIT."""
    from fusefs import flusher as flusher_module
    monkeypatch.setattr(flusher_module, "GC_TICK", 1.0)
    monkeypatch.setattr(flusher_module, "GC_WAIT", 3600.0)
    store = PartialStore()
    core = make_core(store=store)
    fs = core.fs
    for i in range(150):
        close(fs, new_file(fs, b"f%d" % i, pattern(100, i))[1])
    core.flusher.flush_all()
    # A removal going on: a file every 10 ms, so at least one look meanwhile; only a stall
    # of a whole look (1 s) between two unlinks would let the collector see it stopped.
    for i in range(150):
        fs.unlink(ROOT_INO, b"f%d" % i)
        time.sleep(0.01)
        assert store.deleted == [], f"deleted while the removal runs (file {i})"
    wait_until(lambda: len(store.deleted) == 150, what="the garbage deleted once it stopped")
    monkeypatch.setattr(flusher_module, "GC_WAIT", 1.0)  # a removal that goes on and on
    for i in range(600):
        close(fs, new_file(fs, b"g%d" % i, pattern(100, i))[1])
    core.flusher.flush_all()
    for i in range(600):  # 6 s at least
        fs.unlink(ROOT_INO, b"g%d" % i)
        time.sleep(0.01)
        if len(store.deleted) > 150:
            break
    assert len(store.deleted) > 150 and i < 599, "growing garbage waited for the end"
