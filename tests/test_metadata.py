"""The metadata database on its own: group commit, what a kill -9 keeps, the inode-row cache.

These use a real SQLite file and, for the crash, a real process killed with SIGKILL.
"""

import errno
import os
import random
import sqlite3
import stat
import subprocess
import sys

import pytest

from fusefs.errors import FsError, MetadataFailed
from fusefs.metadata import ROOT_INO, BlockRef, Metadata, decode_record

from .test_filesystem_core import Core

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE = stat.S_IFREG | 0o644


def committed_names(path) -> set[bytes]:
    """The names in the root directory as another connection sees them (committed only)."""
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM dentries WHERE parent=?",
                                         (ROOT_INO,))}
    finally:
        db.close()


@pytest.fixture
def md(tmp_path):
    metadata = Metadata(str(tmp_path / "metadata.db"), group_seconds=3600)  # no timer commits
    metadata.format(0, 0)
    yield metadata
    metadata.close()


def test_changes_wait_for_their_group_and_sync_commits_it(md):
    md.create(ROOT_INO, b"a", FILE, 0, 0)
    assert md.lookup(ROOT_INO, b"a") is not None  # this connection sees it at once
    assert committed_names(md.path) == set()  # not committed yet: a kill -9 may lose it
    md.sync()
    assert committed_names(md.path) == {b"a"}


def test_nothing_uncommitted_is_ever_handed_out_for_shipping(md):
    md.create(ROOT_INO, b"a", FILE, 0, 0)
    rows = md.unshipped(0)
    assert [decode_record(r)[1] for _, r in rows] == ["format", "create"]
    assert committed_names(md.path) == {b"a"}


def test_the_group_is_committed_by_the_background_thread(tmp_path):
    metadata = Metadata(str(tmp_path / "metadata.db"), group_seconds=0.01)
    try:
        metadata.format(0, 0)
        metadata.create(ROOT_INO, b"a", FILE, 0, 0)
        committer = metadata._committer
        assert committer is not None and committer.is_alive()
        for _ in range(500):  # polls a state, asserts no time
            if committed_names(metadata.path) == {b"a"}:
                break
            committer.join(0.01)
        assert committed_names(metadata.path) == {b"a"}
    finally:
        metadata.close()
    assert not committer.is_alive()


def test_a_failed_change_leaves_the_rest_of_its_group(md):
    a = md.create(ROOT_INO, b"a", FILE, 0, 0)
    with pytest.raises(sqlite3.IntegrityError):
        md.link(a.ino, ROOT_INO, b"a")  # the name exists: the change fails half way
    md.create(ROOT_INO, b"b", FILE, 0, 0)
    md.sync()
    assert committed_names(md.path) == {b"a", b"b"}
    assert md.inode(a.ino).nlink == 1  # the failed link left no trace
    seqs = [s for s, _ in md.unshipped(0)]
    assert seqs == list(range(1, len(seqs) + 1)) == list(range(1, md.seq + 1))


def test_a_group_sqlite_lost_makes_every_later_change_fail_with_eio(md):
    md.create(ROOT_INO, b"a", FILE, 0, 0)
    md._db.execute("ROLLBACK")  # what SQLite does to a transaction on some disk errors
    with pytest.raises(MetadataFailed, match="mount again"):
        md.commit()
    with pytest.raises(MetadataFailed) as refused:
        md.create(ROOT_INO, b"b", FILE, 0, 0)
    assert refused.value.errno == errno.EIO  # what the adapter answers
    assert md.lookup(ROOT_INO, b"a") is None and committed_names(md.path) == set()


CHILD = r"""
import stat, sys
from fusefs.metadata import ROOT_INO, Metadata
md = Metadata(sys.argv[1])  # the default group window, as a mount uses it
md.format(0, 0)
i = 0
while True:
    md.create(ROOT_INO, b"f%07d" % i, stat.S_IFREG | 0o644, 0, 0)
    i += 1
    if i == 500:
        md.sync()
        print("synced", i, flush=True)
    elif i % 100 == 0:
        print("made", i, flush=True)
"""


def test_kill_9_keeps_a_gap_free_prefix_and_everything_synced(tmp_path):
    path = str(tmp_path / "metadata.db")
    child = subprocess.Popen([sys.executable, "-c", CHILD, path], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        made = 0
        for line in child.stdout:
            made = int(line.split()[1])
            if made >= 3000:
                break
    finally:
        child.kill()
        child.wait()
    assert made >= 3000, "the child stopped early"
    metadata = Metadata(path)
    try:
        names = metadata.child_names(ROOT_INO)
        assert len(names) >= 500  # synced before the kill
        assert names == [b"f%07d" % i for i in range(len(names))]  # a prefix, no gaps
        seqs = [s for s, _ in metadata.unshipped(0, limit=10**6)]
        assert seqs == list(range(1, len(names) + 2))  # format + one record per file
    finally:
        metadata.close()


def test_cached_rows_names_and_xattr_owners_always_match_the_database(tmp_path):
    """Every change forgets the rows it writes and records the names it writes: after each
    step of a random sequence, each inode and each name as the caches answer equals what
    the database holds, and every inode with xattrs is known to have them."""
    core = Core(tmp_path / "metadata.db")
    fs, md = core.fs, core.md
    rng = random.Random(7)
    known = {ROOT_INO}
    dirs = [ROOT_INO]
    try:
        for step in range(1500):
            parent = rng.choice(dirs)
            name = b"n%d" % rng.randrange(8)
            action = rng.choice(["create", "mkdir", "link", "unlink", "rename", "chmod",
                                 "truncate", "xattr", "rmdir", "write", "o_trunc"])
            if action == "mkdir" and len(dirs) >= 3:
                action = "link"  # few directories, so that names collide often
            try:
                if action == "create":
                    inode, fh = fs.create(parent, name, 0o644, os.O_WRONLY, 0, 0)
                    fs.release(fh)
                    known.add(inode.ino)
                elif action == "mkdir":
                    inode = fs.mkdir(parent, name, 0o755, 0, 0)
                    known.add(inode.ino)
                    dirs.append(inode.ino)
                elif action == "link":
                    source = fs.lookup(parent, b"n%d" % rng.randrange(8))
                    fs.link(source.ino, rng.choice(dirs), name)
                elif action == "unlink":
                    fs.unlink(parent, name)
                elif action == "rmdir":
                    fs.rmdir(parent, name)
                elif action == "rename":
                    fs.rename(parent, name, rng.choice(dirs), b"n%d" % rng.randrange(8))
                elif action == "chmod":
                    fs.setattr(fs.lookup(parent, name).ino, mode=rng.choice([0o600, 0o755]))
                elif action == "truncate":
                    fs.setattr(fs.lookup(parent, name).ino, size=rng.randrange(5000))
                elif action == "o_trunc":
                    fs.release(fs.open(fs.lookup(parent, name).ino, os.O_WRONLY | os.O_TRUNC))
                elif action == "xattr":
                    fs.setxattr(fs.lookup(parent, name).ino, b"user.k", b"v%d" % step, 0)
                else:
                    ino = fs.lookup(parent, name).ino
                    fh = fs.open(ino, os.O_WRONLY)
                    fs.write(fh, rng.randrange(4000), b"x" * rng.randrange(1, 3000))
                    fs.fsync(fh, False)
                    fs.release(fh)
            except FsError:
                pass
            for ino in known:
                rows = md.query("SELECT *, (SELECT COALESCE(SUM(length), 0) FROM blocks "
                                "WHERE ino=?) FROM inodes WHERE ino=?", (ino, ino))
                cached = md.inode(ino)  # its last field: the bytes its blocks hold
                got = tuple(vars(cached).values()) if cached else None
                assert got == (rows[0] if rows else None), f"step {step} ({action}): inode {ino}"
            for d in dirs:  # every name that may exist, and some that never do
                for name in [b"n%d" % i for i in range(9)]:
                    rows = md.query("SELECT ino FROM dentries WHERE parent=? AND name=?",
                                    (d, name))
                    assert md.lookup(d, name) == (rows[0][0] if rows else None), \
                        f"step {step} ({action}): name {name!r} in {d}"
            owners = {r[0] for r in md.query("SELECT DISTINCT ino FROM xattrs")}
            for ino in owners:
                assert md.xattr_names(ino), f"step {step} ({action}): xattrs of {ino} hidden"
    finally:
        core.close()


def test_a_punch_record_replays_to_the_same_block_map_and_garbage(tmp_path):
    """punch_blocks is a journal record: replaying the journal on the formatted state
    gives the same blocks, garbage and times as the database that applied it."""
    from .test_journal import dump, records_of

    a = Metadata(str(tmp_path / "a.db"))
    a.format(uid=0, gid=0)
    a.snapshot(str(tmp_path / "b.db"))
    b = Metadata(str(tmp_path / "b.db"))
    try:
        ino = a.create(ROOT_INO, b"img", stat.S_IFREG | 0o644, 0, 0).ino
        refs = {i: BlockRef(f"{i:032x}", "c" * 32, 4096) for i in range(6)}
        a.commit_blocks(ino, refs, 6 * 4096, 5, 5)
        a.punch_blocks(ino, 1, 4, 9)
        assert sorted(a.block_refs(ino, 0, 100)) == [0, 4, 5]
        assert a.inode(ino).size == 6 * 4096 and a.inode(ino).stored == 3 * 4096
        assert a.inode(ino).mtime_ns == a.inode(ino).ctime_ns == 9
        assert sorted(a.garbage()) == [f"{i:032x}" for i in (1, 2, 3)]
        b.replay(records_of(a), {})
        assert dump(b) == dump(a)
    finally:
        a.close()
        b.close()


def test_the_named_reads_answer_what_fsck_and_the_sweep_ask(md):
    """Each whole-filesystem read against a small tree with a hard link, a subdirectory, a
    block map, garbage, a dangling name and blocks of a missing inode."""
    f = md.create(ROOT_INO, b"f", FILE, 0, 0).ino
    d = md.create(ROOT_INO, b"d", stat.S_IFDIR | 0o755, 0, 0).ino
    md.link(f, d, b"g")
    md.commit_blocks(f, {0: BlockRef("a" * 32, "1" * 32, 10), 1: BlockRef("b" * 32, "2" * 32, 5)},
                     15, 1, 1)
    md.commit_blocks(f, {0: BlockRef("c" * 32, "3" * 32, 10)}, 15, 2, 2)  # "a..." is garbage
    gone = md.create(d, b"gone", FILE, 0, 0).ino
    md.commit_blocks(gone, {0: BlockRef("d" * 32, "4" * 32, 1)}, 1, 3, 3)
    md._db.execute("DELETE FROM inodes WHERE ino=?", (gone,))  # damage, as fsck meets it
    md._forget_cached()
    assert md.inode_modes() == [(ROOT_INO, stat.S_IFDIR | 0o755, 3), (f, FILE, 2),
                                (d, stat.S_IFDIR | 0o755, 2)]
    assert md.dentries() == [(ROOT_INO, b"d", d), (ROOT_INO, b"f", f), (d, b"g", f),
                             (d, b"gone", gone)] and md.named_inodes() == {d, f, gone}
    assert md.name_counts() == {f: 2, d: 1} and md.subdir_counts() == {ROOT_INO: 1}
    assert md.blocks_without_inode() == [gone]
    assert md.block_rows() == [(f, "c" * 32, "3" * 32), (f, "b" * 32, "2" * 32),
                               (gone, "d" * 32, "4" * 32)]
    assert md.referenced_blocks() == {"b" * 32, "c" * 32, "d" * 32}
    assert md.garbage_ids() == {"a" * 32}
    assert md.names(f) == [(ROOT_INO, b"f"), (d, b"g")]
