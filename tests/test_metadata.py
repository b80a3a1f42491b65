"""The metadata database on its own: group commit, what a kill -9 keeps, the caches, the
record format byte for byte, the named whole-filesystem reads.

These use a real SQLite file and, for the crash, a real process killed with SIGKILL.
"""

import dataclasses
import errno
import os
import random
import sqlite3
import stat
import subprocess
import sys

import pytest

from fusefs import metadata as metadata_module
from fusefs.errors import FsError, MetadataFailed
from fusefs.metadata import ROOT_INO, BlockRef, Metadata, decode_record, encode_record

from .journal_workload import dump, records_of
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


def failing_after_its_writes(monkeypatch, op: str, times: int) -> None:
    """Make the next `times` applications of `op` (a change, or a record applied again)
    fail once they have written their rows, as a disk error in a last statement would."""
    spec = metadata_module._OPS[op]
    left = [times]

    def apply(db, *args):
        result = spec.apply(db, *args)
        if left[0] > 0:
            left[0] -= 1
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return result
    monkeypatch.setitem(metadata_module._OPS, op, dataclasses.replace(spec, apply=apply))


def test_a_change_failing_half_way_leaves_every_other_change_of_its_group(
        tmp_path, monkeypatch):
    """A change that fails after some of its writes is undone alone: the group is rolled
    back and its earlier changes (every kind of record, all in one group) applied again,
    so the database and the journal are exactly what they were before it, and the next
    change takes the next sequence number."""
    clock = iter(range(1000, 2000))
    monkeypatch.setattr(metadata_module, "now_ns", lambda: next(clock))
    a = Metadata(str(tmp_path / "a.db"), group_seconds=3600)
    b = Metadata(str(tmp_path / "b.db"))
    try:
        make_old_records(a)
        before = dump(a)
        sub = a.lookup(ROOT_INO, b"sub")
        failing_after_its_writes(monkeypatch, "unlink", 1)
        with pytest.raises(sqlite3.OperationalError, match="injected"):
            a.unlink(ROOT_INO, b"sub", sub, True, remove=True)
        assert a.lookup(ROOT_INO, b"sub") == sub and a.seq == len(OLD_RECORDS)
        assert dump(a) == before
        assert a.statistics() == counted(a)  # the totals were rolled back with the rows
        monkeypatch.undo()
        monkeypatch.setattr(metadata_module, "now_ns", lambda: 5000)
        a.create(sub, b"after", FILE, 0, 0)
        a.sync()
        assert b"sub" in committed_names(a.path)
        raws = [bytes(raw) for _, raw in a.unshipped(0)]
        assert raws[:-1] == OLD_RECORDS and decode_record(raws[-1])[:2] == (24, "create")
        assert b.replay([decode_record(raw) for raw in raws], {}) == len(raws)
        assert dump(b) == dump(a)
        assert b.statistics() == counted(b) == a.statistics()
    finally:
        a.close()
        b.close()


def test_a_group_that_cannot_be_applied_again_fails_the_database(md, monkeypatch):
    """If the earlier changes of the group fail when applied again after a failed change,
    they are lost locally: every later change fails with EIO, saying to mount again."""
    md.create(ROOT_INO, b"a", FILE, 0, 0)
    failing_after_its_writes(monkeypatch, "create", 2)
    with pytest.raises(MetadataFailed, match="mount again"):
        md.create(ROOT_INO, b"b", FILE, 0, 0)
    monkeypatch.undo()
    with pytest.raises(MetadataFailed) as refused:
        md.create(ROOT_INO, b"c", FILE, 0, 0)
    assert refused.value.errno == errno.EIO
    assert committed_names(md.path) == set()


def test_a_group_sqlite_lost_makes_every_later_change_fail_with_eio(md):
    md.create(ROOT_INO, b"a", FILE, 0, 0)
    md._db.execute("ROLLBACK")  # what SQLite does to a transaction on some disk errors
    with pytest.raises(MetadataFailed, match="mount again"):
        md.commit()
    with pytest.raises(MetadataFailed) as refused:
        md.create(ROOT_INO, b"b", FILE, 0, 0)
    assert refused.value.errno == errno.EIO  # what the adapter answers
    assert md.lookup(ROOT_INO, b"a") is None and committed_names(md.path) == set()


def test_a_failed_database_records_its_shipping_but_writes_little_more(md):
    """Once failed, the database keeps recording how far the journal was shipped, but
    neither deletes the shipped records (freed pages fill the WAL) nor checkpoints by
    itself (a copy of the WAL into the database): its disk is likely the full one."""
    md.create(ROOT_INO, b"a", FILE, 0, 0)
    md.commit()
    md.create(ROOT_INO, b"b", FILE, 0, 0)
    md._db.execute("ROLLBACK")
    with pytest.raises(MetadataFailed):
        md.commit()
    assert md._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    kept = [seq for seq, _ in md.unshipped(0)]  # up to "a", committed before the failure
    assert kept and md.seq not in kept  # "b"'s record was lost with its group
    md.shipped(kept[-1], {"segment": "7"})
    assert md.setting("shipped") == str(kept[-1]) and md.setting("segment") == "7"
    assert md.unshipped(kept[-1]) == []
    assert [seq for seq, in md._db.execute("SELECT seq FROM journal")] == kept


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


@pytest.mark.parametrize("load_max", [16_384, 3])
def test_cached_rows_names_and_xattr_owners_always_match_the_database(tmp_path, monkeypatch,
                                                                      load_max):
    """Every change forgets or rewrites the rows it writes and records the names it writes;
    a directory read whole (at a lookup or a listing, or created empty) answers absent
    names from memory: after each step of a random sequence, each inode and each name as
    the caches answer equals what the database holds, and every inode with xattrs is known
    to have them. With a load limit of 3, most directories are too big to read whole."""
    monkeypatch.setattr(metadata_module, "DIR_LOAD_MAX", load_max)
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
                                 "truncate", "xattr", "rmdir", "write", "o_trunc", "list",
                                 "forget"])
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
                elif action == "list":
                    listed = [(n, i) for n, i, _ in fs.readdir_entries(parent)]
                    assert listed == md._query("SELECT name, ino FROM dentries WHERE parent=? "
                                               "ORDER BY name", (parent,))
                elif action == "forget":  # as a replay or a rollback does
                    with md._lock:
                        md._forget_cached()
                else:
                    ino = fs.lookup(parent, name).ino
                    fh = fs.open(ino, os.O_WRONLY)
                    fs.write(fh, rng.randrange(4000), b"x" * rng.randrange(1, 3000))
                    fs.fsync(fh, False)
                    fs.release(fh)
            except FsError:
                pass
            for ino in known:
                rows = md._query("SELECT *, (SELECT COALESCE(SUM(length), 0) FROM blocks "
                                 "WHERE ino=?) FROM inodes WHERE ino=?", (ino, ino))
                cached = md.inode(ino)  # its last field: the bytes its blocks hold
                got = tuple(vars(cached).values()) if cached else None
                assert got == (rows[0] if rows else None), f"step {step} ({action}): inode {ino}"
                # what unlink, rmdir and rename check: (mode, links), cached or not
                assert md.kind(ino) == ((rows[0][1], rows[0][4]) if rows else None), \
                    f"step {step} ({action}): kind of inode {ino}"
            for d in rng.sample(dirs, (len(dirs) + 1) // 2):  # some not read since a forget
                # every name that may exist, and some that never do
                for name in [b"n%d" % i for i in range(9)]:
                    rows = md._query("SELECT ino FROM dentries WHERE parent=? AND name=?",
                                     (d, name))
                    assert md.lookup(d, name) == (rows[0][0] if rows else None), \
                        f"step {step} ({action}): name {name!r} in {d}"
            owners = {r[0] for r in md._query("SELECT DISTINCT ino FROM xattrs")}
            for ino in owners:
                assert md.xattr_names(ino), f"step {step} ({action}): xattrs of {ino} hidden"
            assert md.statistics() == counted(md), f"step {step} ({action}): statfs totals"
    finally:
        core.close()


def counted(md: Metadata) -> tuple[int, int]:
    """What `statistics` keeps (inodes, bytes the block maps reference), by a scan."""
    return tuple(md._query("SELECT (SELECT COUNT(*) FROM inodes), "
                           "(SELECT COALESCE(SUM(length), 0) FROM blocks)")[0])


def test_a_punch_record_replays_to_the_same_block_map_and_garbage(tmp_path):
    """punch_blocks is a journal record: replaying the journal on the formatted state
    gives the same blocks, garbage and times as the database that applied it."""
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
    md.commit()
    other = sqlite3.connect(md.path)  # damage, as fsck meets it: another connection has
    try:  # none of this one's triggers, so the inode's blocks stay
        with other:
            other.execute("DELETE FROM inodes WHERE ino=?", (gone,))
    finally:
        other.close()
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


def test_removing_an_inode_takes_its_blocks_patches_and_xattrs_with_it(md):
    """Whether the inode's row is there (the connection's trigger does the rest) or gone
    already (fsck's damage: the blocks are moved by hand), every block and patch it held
    becomes garbage and nothing of it is left; other inodes keep theirs."""
    keep = md.create(ROOT_INO, b"keep", FILE, 0, 0).ino
    md.commit_blocks(keep, {0: BlockRef("k" * 32, "3" * 32, 1)}, 1, 1, 1)
    md.set_xattr(keep, b"user.k", b"v")
    for name, block, patch in ((b"f", "a", "b"), (b"g", "c", "d")):
        ino = md.create(ROOT_INO, name, FILE, 0, 0).ino
        patched = BlockRef(block * 32, "1" * 32, 8192,
                           (metadata_module.Patch(0, 4096, patch * 32, "2" * 32, 0),))
        md.commit_blocks(ino, {0: patched, 1: BlockRef(name.decode() * 32, "4" * 32, 1)},
                         8193, 2, 2)
        md.set_xattr(ino, b"user.x", b"y")
        if name == b"f":
            md.unlink(ROOT_INO, name, ino, False, remove=True)
        else:
            md.commit()
            other = sqlite3.connect(md.path)  # no trigger on this connection
            try:
                with other:
                    other.execute("DELETE FROM inodes WHERE ino=?", (ino,))
            finally:
                other.close()
            md._forget_cached()
            md.remove_dentry(ROOT_INO, name)
            md.remove_inode(ino)
        for table in ("blocks", "patches", "xattrs", "inodes"):
            assert md._query(f"SELECT * FROM {table} WHERE ino=?", (ino,)) == [], table
    assert md.garbage_ids() == {c * 32 for c in "abcdfg"}
    assert md.block_rows() == [(keep, "k" * 32, "3" * 32)]
    assert md.xattr_names(keep) == [b"user.k"]


# Records as this format has always written them, one of every kind of change (with and
# without its optional parts): a filesystem made before any refactoring replays them.
OLD_RECORDS = [
    b'[1,"format",[0,0,493,1000]]',
    b'[2,"create",[2,1,{"b":"Y2Fmw6k="},33188,1000,100,0,null,1001]]',
    b'[3,"create",[3,1,{"b":"c3Vi"},16877,0,0,0,null,1002]]',
    b'[4,"create",[4,3,{"b":"//4="},41471,0,0,0,{"b":"Li4vY2Fmw6k="},1003]]',
    b'[5,"create",[5,3,{"b":"ZGV2"},8576,0,0,259,null,1004]]',
    b'[6,"link",[2,3,{"b":"YWdhaW4="},1005]]',
    b'[7,"set_xattr",[2,{"b":"dXNlci6A"},{"b":"dgBhbA=="},1006]]',
    b'[8,"set_xattr",[2,{"b":"dXNlci5r"},{"b":""},1007]]',
    b'[9,"remove_xattr",[2,{"b":"dXNlci5r"},1008]]',
    b'[10,"set_attrs",[2,{"mode":33152,"uid":7,"atime_ns":5}]]',
    b'[11,"commit_blocks",[2,[[0,"00000000000000000000000000000000","aaaaaaaaaaaaaaaaaaaaaaaaaaaa'
    b'aaaa",4096],[1,"11111111111111111111111111111111","bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",100]'
    b'],4196,11,12]]',
    b'[12,"commit_blocks",[2,[[1,"22222222222222222222222222222222","cccccccccccccccccccccccccc'
    b'cccccc",4096]],8192,13,14]]',
    b'[13,"truncate_blocks",[2,1,10,15,10]]',
    b'[14,"commit_blocks",[2,[[3,"33333333333333333333333333333333","dddddddddddddddddddddddddd'
    b'dddddd",4096]],16384,16,17]]',
    b'[15,"punch_blocks",[2,2,4,18]]',
    b'[16,"truncate_blocks",[2,0,0,19,null]]',
    b'[17,"rename",[3,{"b":"ZGV2"},1,{"b":"ZGV2Mg=="},5,false,null,false,1009]]',
    b'[18,"rename",[1,{"b":"ZGV2Mg=="},3,{"b":"//4="},5,false,4,false,1010]]',
    b'[19,"unlink",[3,{"b":"YWdhaW4="},2,false,1011]]',
    b'[20,"unlink",[1,{"b":"Y2Fmw6k="},2,false,1012,true]]',
    b'[21,"set_nlink",[3,2]]',
    b'[22,"remove_dentry",[3,{"b":"//4="}]]',
    b'[23,"remove_inode",[5]]',
]


def make_old_records(md: Metadata) -> None:
    """The calls that wrote OLD_RECORDS (with a clock that counts from 1000)."""
    md.format(0, 0)
    f = md.create(ROOT_INO, b"caf\xc3\xa9", FILE, 1000, 100).ino
    sub = md.create(ROOT_INO, b"sub", stat.S_IFDIR | 0o755, 0, 0).ino
    ln = md.create(sub, b"\xff\xfe", stat.S_IFLNK | 0o777, 0, 0, target=b"../caf\xc3\xa9").ino
    dev = md.create(sub, b"dev", stat.S_IFCHR | 0o600, 0, 0, rdev=259).ino
    md.link(f, sub, b"again")
    md.set_xattr(f, b"user.\x80", b"v\x00al")
    md.set_xattr(f, b"user.k", b"")
    md.remove_xattr(f, b"user.k")
    md.set_attrs(f, mode=stat.S_IFREG | 0o600, uid=7, atime_ns=5)
    md.commit_blocks(f, {0: BlockRef("0" * 32, "a" * 32, 4096),
                         1: BlockRef("1" * 32, "b" * 32, 100)}, 4196, 11, 12)
    md.commit_blocks(f, {1: BlockRef("2" * 32, "c" * 32, 4096)}, 8192, 13, 14)
    md.truncate_blocks(f, 1, 10, 15, last_length=10)
    md.commit_blocks(f, {3: BlockRef("3" * 32, "d" * 32, 4096)}, 16384, 16, 17)
    md.punch_blocks(f, 2, 4, 18)
    md.truncate_blocks(f, 0, 0, 19)
    md.rename(sub, b"dev", ROOT_INO, b"dev2", dev, False, None, False)
    md.rename(ROOT_INO, b"dev2", sub, b"\xff\xfe", dev, False, ln, False)
    md.unlink(sub, b"again", f, False)
    md.unlink(ROOT_INO, b"caf\xc3\xa9", f, False, remove=True)
    md.set_nlink(sub, 2)
    md.remove_dentry(sub, b"\xff\xfe")
    md.remove_inode(dev)


def test_records_keep_their_bytes_and_old_records_replay_to_the_same_state(tmp_path,
                                                                          monkeypatch):
    """The record format is byte for byte what it was: the same calls write the same
    records, each decodes and encodes back to itself, and replaying the old records on an
    empty database gives the state the calls made."""
    clock = iter(range(1000, 2000))
    monkeypatch.setattr(metadata_module, "now_ns", lambda: next(clock))
    a = Metadata(str(tmp_path / "a.db"))
    b = Metadata(str(tmp_path / "b.db"))
    try:
        make_old_records(a)
        assert [bytes(raw) for _, raw in a.unshipped(0)] == OLD_RECORDS
        assert [encode_record(*decode_record(raw)) for raw in OLD_RECORDS] == OLD_RECORDS
        assert b.replay([decode_record(raw) for raw in OLD_RECORDS], {}) == len(OLD_RECORDS)
        assert dump(b) == dump(a) and b.seq == a.seq == len(OLD_RECORDS)
        assert dump(b)["garbage"] == [(c * 32,) for c in "0123"]
    finally:
        a.close()
        b.close()


def test_entries_carry_their_file_type_and_an_older_database_gains_the_column(tmp_path):
    """Each entry records its inode's file type (create: from the mode; link: from the
    inode), kept by rename. A database from before has no such column: it is added at
    open, its old entries read as type 0 (unknown: readdir leaves it to a lookup)."""
    path = str(tmp_path / "old.db")
    md = Metadata(path)
    md.format(0, 0)
    d = md.create(ROOT_INO, b"d", stat.S_IFDIR | 0o755, 0, 0).ino
    f = md.create(d, b"f", FILE, 0, 0).ino
    md.create(ROOT_INO, b"s", stat.S_IFLNK | 0o777, 0, 0, target=b"d/f")
    md.link(f, ROOT_INO, b"h")
    md.rename(d, b"f", ROOT_INO, b"g", f, False, None, False)
    assert md.child_entries(ROOT_INO) == [(b"d", d, stat.S_IFDIR), (b"g", f, stat.S_IFREG),
                                          (b"h", f, stat.S_IFREG),
                                          (b"s", f + 1, stat.S_IFLNK)]
    md.close()
    db = sqlite3.connect(path)  # the table as an older version made it
    db.executescript("CREATE TABLE old AS SELECT parent, name, ino FROM dentries; "
                     "DROP TABLE dentries; CREATE TABLE dentries (parent INTEGER NOT NULL, "
                     "name BLOB NOT NULL, ino INTEGER NOT NULL, PRIMARY KEY (parent, name)) "
                     "WITHOUT ROWID; INSERT INTO dentries SELECT * FROM old; DROP TABLE old;")
    db.close()
    md = Metadata(path)
    try:
        assert [k for _, _, k in md.child_entries(ROOT_INO)] == [0, 0, 0, 0]
        new = md.create(ROOT_INO, b"new", FILE, 0, 0).ino
        assert (b"new", new, stat.S_IFREG) in md.child_entries(ROOT_INO)
    finally:
        md.close()
