"""`fusefs fsck` on real block servers: a clean filesystem, fsck beside a mounted writer,
damaged and lost copies of blocks, leftover blocks, and metadata damage that --repair
fixes.

The filesystem is made through a real mount; damage is done the way it happens: block
files deleted or altered in a server's data directory (`blocks/XX/<id>`, a 32-byte header
then the bytes), blocks uploaded that nothing references, and inconsistent metadata
published as a checkpoint through the Python API while holding the writer lease, as a
buggy writer would. fsck runs as the real command; its --json report is what is checked.
Files are read back after every repair from a mount whose block cache was emptied, so
what is read comes from the servers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import stat
import struct

import pytest
import xxhash

from blockserver import protocol
from fusefs import errors, superblock
from fusefs.checkpoint import checkpoint_blocks, write_checkpoint
from fusefs.fsck import Fsck
from fusefs.host import new_mount_id
from fusefs.lease import acquire, new_lease
from fusefs.loading import open_metadata
from fusefs.metadata import ROOT_INO
from fusefs.segments import segment_id

from .support import Mount, check_files, wait_until

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB  # the block size these filesystems are formatted with
MKFS = ["--block-size", "64KiB"]
HEADER = struct.Struct("<8s16sQ")  # a block file's header: magic, xxh3-128, length


# -- helpers ------------------------------------------------------------------------------------



def write_file(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()




def fsck(m: Mount, *args: str) -> tuple[int, dict, str]:
    """`fusefs fsck --json ARGS`: (exit status, report, stderr)."""
    result = m.cli("fsck", *m.cluster_args(), "--json", *args, check=False)
    assert result.returncode in (0, 1), f"fsck could not check:\n{result.stderr}"
    return result.returncode, json.loads(result.stdout), result.stderr


def remount_from_servers(m: Mount) -> None:
    """Unmount if mounted, drop the local block cache (keep the metadata), mount."""
    if m.mounted:
        m.umount()
    assert not m.mounted
    for entry in os.listdir(m.cache_dir):
        blocks = os.path.join(m.cache_dir, entry, "blocks")
        if os.path.isdir(blocks):
            shutil.rmtree(blocks)
    m.mount()


def block_file(server, block_id: str) -> str:
    return os.path.join(server.data_dir, "blocks", block_id[:2], block_id)


def intact_copy(server, block_id: str, checksum: str) -> bytes | None:
    """The bytes of the server's copy if it is there and matches its checksum, else None."""
    try:
        with open(block_file(server, block_id), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    magic, digest, length = HEADER.unpack_from(raw)
    body = raw[HEADER.size:]
    if magic != b"FFSBLK1\n" or length != len(body) or digest.hex() != checksum or \
            xxhash.xxh3_128_hexdigest(body) != checksum:
        return None
    return body


@pytest.fixture
def cluster(make_cluster):
    """Factory: `cluster(m)` -> a started ReplicatedStore over m's servers (closed at
    teardown); its `.transport` talks to them directly."""
    return lambda m: make_cluster(m.servers, replicas=3, write_quorum=2)


def load_metadata(store, work_dir: str):
    """The metadata a new mount would load, in a private database (nothing is written to
    the cluster). The caller closes it."""
    sb = superblock.read_quorum(store.transport, store.members)
    md, _, _ = open_metadata(store, sb, os.path.join(work_dir, "metadata.db"))
    return md


def ino_of(md, rel: str) -> int:
    ino = ROOT_INO
    for name in rel.split("/"):
        rows = md._query("SELECT ino FROM dentries WHERE parent=? AND name=?",
                        (ino, name.encode()))
        assert rows, f"{rel}: no {name!r} in inode {ino}"
        ino = rows[0][0]
    return ino


def blocks_of(md, ino: int) -> list[tuple[str, str]]:
    """(block id, checksum) of the inode's blocks, in file order."""
    return [(b, c) for b, c in md._query(
        "SELECT block_id, checksum FROM blocks WHERE ino=? ORDER BY idx", (ino,))]


def referenced_blocks(md) -> dict[str, str]:
    return dict(md._query("SELECT block_id, checksum FROM blocks"))


def unreferenced_and_garbage(store, work_dir: str) -> tuple[set[str], set[str]]:
    """(ids of blocks on the servers that neither a file nor the metadata's checkpoint and
    journal use, ids the metadata lists as garbage to delete). The garbage list may name
    blocks already deleted: a mount forgets them only locally, until its next checkpoint."""
    sb = superblock.read_quorum(store.transport, store.members)
    md, _, end = open_metadata(store, sb, os.path.join(work_dir, "listing.db"))
    try:
        used = set(referenced_blocks(md))
        garbage = {r[0] for r in md._query("SELECT block_id FROM garbage")}
    finally:
        md.close()
    cp = sb.checkpoint
    used.update(checkpoint_blocks(store, cp))
    used.update(segment_id(sb.fs_id, cp["chain"], n) for n in range(cp["segment"], end))
    used.update(f for f in [cp.get("fence")] if f)  # the tombstone ending the last chain
    stored = set()
    for member in store.members:
        after = ""
        while True:
            page, after = store.transport.list_blocks(member, after, 1000)
            stored.update(b["id"] for b in page)
            if not after:
                break
    return stored - used, garbage


def make_tree(root: str, seed: int) -> dict[str, bytes]:
    """A few directories and files of several blocks each (fsynced): relative path -> data."""
    rng = random.Random(seed)
    contents = {}
    os.makedirs(os.path.join(root, "d", "e"))
    for rel, size in [("a", 3 * BS + 100), ("b", BS), ("d/c", 2 * BS + 1), ("d/e/f", 5000),
                      ("g", 0)]:
        contents[rel] = rng.randbytes(size)
        write_file(os.path.join(root, rel), contents[rel])
    return contents


def plant_leftovers(store, count: int = 3) -> dict[str, tuple[bytes, str]]:
    """Blocks on every server that nothing references, as a client killed between
    uploading and recording them leaves: id -> (data, checksum)."""
    uploads = {}
    for i in range(count):
        data = os.urandom(1000 + i)
        uploads[protocol.new_block_id()] = (data, protocol.checksum(data))
    for member in store.members:
        for block_id, (data, checksum) in uploads.items():
            store.transport.put_block(member, block_id, data, checksum)
    return uploads


def digests(contents: dict[str, bytes]) -> dict[str, str]:
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in contents.items()}


# -- a consistent filesystem --------------------------------------------------------------------

def test_clean_filesystem_after_a_mix_of_operations(fusefs_mount, cluster, tmp_path):
    m = fusefs_mount(mkfs=MKFS)
    rng = random.Random(1)
    p = lambda rel: os.path.join(m.path, rel)  # noqa: E731
    for d in ("d1", "d1/d2", "d3", "gone-dir"):
        os.mkdir(p(d))
    sizes = {"f0": 0, "f1": 100, "f2": 3 * BS, "f3": 3 * BS + 7, "d1/f4": 2 * BS + 1,
             "d1/d2/f5": KiB, "f6": 5 * BS, "f7": 10 * KiB, "deleted": 2 * BS}
    expected = {rel: write_file(p(rel), rng.randbytes(n)) for rel, n in sizes.items()}
    os.link(p("f3"), p("d3/f3-link"))
    expected["d3/f3-link"] = expected["f3"]
    os.symlink("f1", p("s1"))
    os.symlink("../nowhere", p("d1/s2"))
    os.setxattr(p("f1"), "user.colour", b"blue")
    os.setxattr(p("d1"), "user.tag", b"x" * 300)
    os.setxattr(p("f2"), "user.gone", b"1")
    os.removexattr(p("f2"), "user.gone")
    os.unlink(p("deleted"))
    del expected["deleted"]
    os.rmdir(p("gone-dir"))
    expected["f6"] = write_file(p("f6"), rng.randbytes(BS + 10))  # overwritten: 2 blocks
    os.rename(p("f7"), p("d3/f7-moved"))
    expected["d3/f7-moved"] = expected.pop("f7")
    with open(p("f2"), "r+b") as f:  # cut to a block and a half
        f.truncate(BS + BS // 2)
        os.fsync(f.fileno())
    with open(p("f2"), "rb") as f:
        expected["f2"] = hashlib.sha256(f.read()).hexdigest()
    check_files(m.path, expected)
    m.umount()

    status, report, _ = fsck(m)
    assert status == 0, report
    assert report["clean"] is True and report["errors"] == [] and report["repaired"] == []
    counts = report["counts"]
    # Blocks of deleted, overwritten and cut files may wait for the next mount's garbage
    # collection: they are the only thing worth a note here, and exactly those.
    assert all("referenced by nothing" in w for w in report["warnings"]), report
    leftovers, garbage = unreferenced_and_garbage(cluster(m), str(tmp_path))
    assert len(leftovers) == counts["unreferenced"], (counts, leftovers)
    assert leftovers <= garbage, f"blocks leaked, not garbage: {sorted(leftovers - garbage)}"
    # root, d1, d1/d2, d3; f0..f7 (deleted is gone); s1, d1/s2
    assert counts["inodes"] == 4 + 8 + 2, counts
    # every name but the root's, and the hard link is a second name of f3
    assert counts["names"] == 3 + 8 + 2 + 1, counts
    sizes_now = {"f0": 0, "f1": 100, "f2": BS + BS // 2, "f3": 3 * BS + 7,
                 "d1/f4": 2 * BS + 1, "d1/d2/f5": KiB, "f6": BS + 10, "f7": 10 * KiB}
    assert counts["blocks"] == sum(-(-n // BS) for n in sizes_now.values()), counts
    assert counts["under_replicated"] == 0, counts

    remount_from_servers(m)
    check_files(m.path, expected)
    assert os.getxattr(p("f1"), "user.colour") == b"blue"
    assert os.readlink(p("d1/s2")) == "../nowhere"
    assert os.stat(p("f3")).st_nlink == 2

    # The mount collects that garbage; fsck beside it then finds nothing left over.
    def collected() -> bool:
        status, report, _ = fsck(m)
        assert status == 0 and report["errors"] == [], report
        return report["counts"]["unreferenced"] == 0

    wait_until(collected, "the mount to delete the garbage blocks", timeout=60, interval=1)


def test_fsck_beside_a_mounted_writer_and_repair_refused(fusefs_mount, cluster):
    m = fusefs_mount(mkfs=MKFS)
    expected = digests(make_tree(m.path, 2))
    status, report, _ = fsck(m)
    assert status == 0, report
    assert report["clean"] and report["errors"] == [] and report["repaired"] == [], report
    assert report["counts"]["inodes"] == 1 + 2 + 5, report["counts"]

    # A leftover block, so that a repair would have something to delete.
    store = cluster(m)
    leftover = os.urandom(5000)
    leftover_id, leftover_sum = protocol.new_block_id(), protocol.checksum(leftover)
    for member in store.members:
        store.transport.put_block(member, leftover_id, leftover, leftover_sum)
    before = superblock.read_quorum(store.transport, store.members)

    refused = m.cli("fsck", *m.cluster_args(), "--repair", check=False)
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "cannot repair" in refused.stderr, refused.stderr
    assert "mounted read-write" in refused.stderr, refused.stderr
    assert "Unmount it first" in refused.stderr, refused.stderr

    after = superblock.read_quorum(store.transport, store.members)
    assert after.lease is not None and after.lease["mount"] == before.lease["mount"]
    assert after.lease["pid"] == m.daemon_pid()
    assert after.checkpoint == before.checkpoint
    for member in store.members:
        assert store.transport.get_block(member, leftover_id) == leftover
    # The writer never noticed.
    expected["later"] = write_file(os.path.join(m.path, "later"), b"written after")
    check_files(m.path, expected)
    text = m.cli("fsck", *m.cluster_args())
    assert "the filesystem is consistent" in text.stdout, text.stdout
    assert f"{1 + 2 + 6} inodes" in text.stdout, text.stdout
    assert "referenced by nothing (a writer is mounted" in text.stdout, text.stdout

    # A file unlinked while the writer holds it open is not an orphan yet: only a note.
    held = os.open(os.path.join(m.path, "held"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(held, os.urandom(BS + 3))
        os.fsync(held)
        held_ino = os.fstat(held).st_ino
        os.unlink(os.path.join(m.path, "held"))
        root = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(root)  # the unlink is durable: fsck sees it
        finally:
            os.close(root)
        status, report, _ = fsck(m)
        assert status == 0 and report["errors"] == [], report
        assert f"inode {held_ino} is unlinked but open on the writer; it goes at the last " \
               "close" in report["warnings"], report
    finally:
        os.close(held)

    def gone_at_last_close() -> bool:
        status, report, _ = fsck(m)
        assert status == 0 and report["errors"] == [], report
        return not any(f"inode {held_ino} " in w for w in report["warnings"])

    wait_until(gone_at_last_close, "the writer to remove the closed unlinked file",
               timeout=30, interval=0.5)


# -- blocks -------------------------------------------------------------------------------------

def test_damaged_replicas_are_reported_and_copied_again(fusefs_mount, cluster, tmp_path):
    m = fusefs_mount(mkfs=MKFS)
    expected = digests(make_tree(m.path, 3))
    m.umount()
    store = cluster(m)
    md = load_metadata(store, str(tmp_path))
    try:
        (missing_id, missing_sum) = blocks_of(md, ino_of(md, "a"))[1]
        (bad_id, bad_sum) = blocks_of(md, ino_of(md, "d/c"))[0]
        every = referenced_blocks(md)
    finally:
        md.close()
    s0, s1, s2 = m.servers
    good_missing = intact_copy(s0, missing_id, missing_sum)
    good_bad = intact_copy(s1, bad_id, bad_sum)
    assert good_missing is not None and good_bad is not None
    os.unlink(block_file(s0, missing_id))  # one replica gone
    with open(block_file(s1, bad_id), "r+b") as f:  # one replica with a flipped bit
        f.seek(HEADER.size + 1234)
        byte = f.read(1)
        f.seek(HEADER.size + 1234)
        f.write(bytes([byte[0] ^ 0x10]))

    status, report, _ = fsck(m)
    assert status == 0, report  # fewer copies is worth a warning, not an error
    assert report["clean"] and report["errors"] == [], report
    assert report["counts"]["under_replicated"] == 2, report
    assert any("2 blocks have fewer than 3 intact copies" in w for w in report["warnings"]), \
        report
    assert intact_copy(s0, missing_id, missing_sum) is None  # a check repairs nothing

    status, report, _ = fsck(m, "--repair")
    assert status == 0, report
    assert report["errors"] == [], report
    assert any("copied again" in r for r in report["repaired"]), report
    assert intact_copy(s0, missing_id, missing_sum) == good_missing
    assert intact_copy(s1, bad_id, bad_sum) == good_bad

    status, report, _ = fsck(m)
    assert status == 0, report
    assert report["errors"] == [] and report["warnings"] == [] and report["repaired"] == [], \
        report
    assert report["counts"]["under_replicated"] == 0
    for block_id, checksum in every.items():  # every block, on every server, intact
        for server in m.servers:
            assert intact_copy(server, block_id, checksum) is not None, (server.url, block_id)

    remount_from_servers(m)
    check_files(m.path, expected)


def test_copies_a_server_leaves_for_another_request_are_checked_not_lost(
        fusefs_mount, blockservers, tmp_path):
    """A server verifies a bounded number of bytes per batch check (--max-batch-size) and
    answers the rest "ask again". fsck took those for missing copies: on the 1 GiB file
    of a benchmark mount it reported 872 blocks with no intact copy, and exit status 1."""
    servers = blockservers.servers.start(3, args=["--max-batch-size", "2MiB"])
    m = fusefs_mount.track(str(tmp_path / "mnt"), str(tmp_path / "cache"), servers)
    m.cli("mkfs", *m.cluster_args(), *MKFS)
    m.mount()
    write_file(os.path.join(m.path, "f"), os.urandom(6 << 20))  # 96 blocks: 3 requests
    m.umount()
    status, report, _ = fsck(m)
    assert status == 0 and report["clean"], report
    assert report["counts"]["blocks"] == 96 and report["counts"]["under_replicated"] == 0


@pytest.mark.parametrize("checkpoint", [False, True], ids=["remove", "remove+checkpoint"])
def test_a_check_beside_a_writer_that_moves_on_finishes_and_reports_nothing_lost(
        fusefs_mount, cluster, tmp_path, checkpoint):
    """A check takes its time; a mounted writer goes on meanwhile. Found under fault
    injection: fsck said "could not finish: block ... is on no server" because the
    writer's new checkpoint had deleted the one the check loaded. And a file removed
    during the check has its blocks deleted: they are gone, not lost."""
    m = fusefs_mount(mkfs=MKFS)
    expected = {"kept": write_file(os.path.join(m.path, "kept"), os.urandom(3 * BS))}
    doomed = os.path.join(m.path, "doomed")
    write_file(doomed, os.urandom(4 * BS))
    os.mkdir(os.path.join(m.path, "many"))
    for i in range(1100):  # a chain long enough that the unmount writes a checkpoint
        os.close(os.open(os.path.join(m.path, "many", f"{i}"), os.O_CREAT | os.O_WRONLY))
    root = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(root)
    finally:
        os.close(root)
    store = cluster(m)
    md = load_metadata(store, str(tmp_path))
    try:
        doomed_ino = ino_of(md, "doomed")
        doomed_blocks = [b for ino, b, _ in md.block_rows() if ino == doomed_ino]
    finally:
        md.close()
    assert len(doomed_blocks) == 4
    sb = superblock.read_quorum(store.transport, store.members)
    assert sb.lease is not None

    said = []

    def progress(message: str) -> None:
        said.append(message)
        if message.startswith("verifying") and sum(s.startswith("verifying") for s in said) == 1:
            os.unlink(doomed)  # its blocks become garbage the writer deletes
            wait_until(lambda: not any(store.has_many(doomed_blocks).values()),
                       "the writer deleted the removed file's blocks", timeout=90)
            if checkpoint:
                m.umount()  # a clean unmount writes a checkpoint and deletes the old one

    report = Fsck(store, store.transport, sb, progress=progress).run()
    assert report.clean and report.errors == [], (report, said)
    assert any("loading the metadata again" in s for s in said), said
    assert any("new checkpoint during the check" in s and "checking again" in s
               for s in said) == checkpoint, said
    if checkpoint:  # the second pass loaded the new checkpoint: the file is not in it
        assert report.counts["inodes"] == 1 + 1 + 1 + 1100, report.counts  # root, kept, many
        m.mount()
    else:
        assert report.counts["dropped_meanwhile"] == 4, report.counts
    status, final, _ = fsck(m)
    assert status == 0 and final["clean"], final
    check_files(m.path, expected)
    assert not os.path.exists(doomed)


def test_leftover_blocks_are_reported_and_deleted(fusefs_mount, cluster):
    m = fusefs_mount(mkfs=MKFS)
    expected = digests(make_tree(m.path, 4))
    m.umount()
    status, report, _ = fsck(m)
    assert status == 0 and report["clean"], report
    baseline = report["counts"]["unreferenced"]
    assert baseline == 0, f"a clean unmount left {baseline} unreferenced blocks: {report}"

    store = cluster(m)
    uploads = plant_leftovers(store)

    status, report, _ = fsck(m)
    assert status == 0, report
    assert report["clean"] and report["errors"] == [], report
    assert report["counts"]["unreferenced"] == 3, report
    assert any("3 blocks on the servers are referenced by nothing" in w
               for w in report["warnings"]), report
    for member in store.members:
        for block_id, (data, _) in uploads.items():
            assert store.transport.get_block(member, block_id) == data

    status, report, _ = fsck(m, "--repair")
    assert status == 0, report
    assert any("deleted 3 unreferenced blocks" in r for r in report["repaired"]), report
    for member in store.members:
        for block_id in uploads:
            with pytest.raises(errors.BlockMissing):
                store.transport.get_block(member, block_id)

    status, report, _ = fsck(m)
    assert status == 0, report
    assert report["warnings"] == [] and report["counts"]["unreferenced"] == 0, report
    remount_from_servers(m)
    check_files(m.path, expected)


def test_total_loss_of_a_block_is_an_error_repair_cannot_fix(fusefs_mount, cluster, tmp_path):
    m = fusefs_mount(mkfs=MKFS)
    contents = make_tree(m.path, 6)
    expected = digests(contents)
    m.umount()
    store = cluster(m)
    md = load_metadata(store, str(tmp_path))
    try:
        lost_ino = ino_of(md, "a")
        lost_id, _ = blocks_of(md, lost_ino)[2]
        others = {b: c for b, c in referenced_blocks(md).items() if b != lost_id}
    finally:
        md.close()
    for server in m.servers:
        os.unlink(block_file(server, lost_id))

    status, report, _ = fsck(m)
    assert status == 1, report
    assert report["clean"] is False
    assert len(report["errors"]) == 1, report
    error = report["errors"][0]
    assert lost_id in error and f"inode {lost_ino}" in error and "no intact copy" in error

    status, report, _ = fsck(m, "--repair")
    assert status == 1, report
    assert report["errors"] == [error], report

    # Nothing else was touched: every other block is intact everywhere, the lease is free,
    # the other files read back, and the damaged file is still there (it cannot be read in
    # full, which is the truth).
    for block_id, checksum in others.items():
        for server in m.servers:
            assert intact_copy(server, block_id, checksum) is not None, (server.url, block_id)
    assert superblock.read_quorum(store.transport, store.members).lease is None
    status, again, _ = fsck(m)
    assert status == 1 and again["errors"] == [error], again
    remount_from_servers(m)
    del expected["a"]
    check_files(m.path, expected)
    assert os.path.getsize(os.path.join(m.path, "a")) == 3 * BS + 100
    with open(os.path.join(m.path, "a"), "rb", buffering=0) as f:
        assert f.read(2 * BS) == contents["a"][:2 * BS]  # the blocks before it are fine
        with pytest.raises(OSError) as failed:
            f.read(BS)
        assert failed.value.errno == errno.EIO
    assert sorted(os.listdir(m.path)) == ["a", "b", "d", "g"]


# -- metadata damage ------------------------------------------------------------------------------

def publish_damaged_metadata(store, work_dir: str, damage) -> None:
    """Take the writer lease, load the metadata, call damage(md), and publish the result as
    the filesystem's checkpoint: what a buggy writer could leave behind."""
    transport = store.transport
    sb = superblock.read_quorum(transport, store.members)
    lease = new_lease(new_mount_id(), 60.0)
    lease["holder"] = f"the test that damages the metadata ({lease['holder']})"
    sb = acquire(transport, sb, lease)
    try:
        md, _, _ = open_metadata(store, sb, os.path.join(work_dir, "damaged.db"))
        try:
            damage(md)
            cp = write_checkpoint(store, md, sb.fs_id, lease["mount"], 1, work_dir)
        finally:
            md.close()
        sb = superblock.update(transport, sb.with_changes(checkpoint=cp, lease=None))
    finally:
        if sb.lease is not None:
            superblock.update(transport, sb.with_changes(lease=None))


def test_metadata_damage_is_found_and_repaired(fusefs_mount, cluster, tmp_path):
    m = fusefs_mount(mkfs=MKFS)
    rng = random.Random(7)
    p = lambda rel: os.path.join(m.path, rel)  # noqa: E731
    os.makedirs(p("d/s1"))
    os.mkdir(p("d/s2"))
    expected = {rel: write_file(p(rel), rng.randbytes(n)) for rel, n in
                [("a", 2 * BS + 5), ("keep", 3000), ("d/s1/deep", BS + 1),
                 ("orphan", 2 * BS), ("dangling", 4000)]}
    os.link(p("a"), p("d/a-link"))
    expected["d/a-link"] = expected["a"]
    m.umount()
    store = cluster(m)
    found = {}

    def damage(md):
        for rel in ("a", "d", "orphan", "dangling"):
            found[rel] = ino_of(md, rel)
        found["orphan blocks"] = blocks_of(md, found["orphan"])
        md.set_nlink(found["a"], 5)  # has two names
        md.set_nlink(found["d"], 7)  # has two subdirectories
        md.remove_dentry(ROOT_INO, b"orphan")  # an inode no name reaches
        md.remove_inode(found["dangling"])  # a name whose inode is gone

    publish_damaged_metadata(store, str(tmp_path), damage)
    problems = {
        f"inode {found['a']} has link count 5, should be 2",
        f"inode {found['d']} has link count 7, should be 4",
        f"inode {found['orphan']} cannot be reached from the root",
        f"name 'dangling' in directory {ROOT_INO} points to missing inode {found['dangling']}",
    }

    status, report, _ = fsck(m)
    assert status == 1, report
    assert report["clean"] is False
    assert set(report["errors"]) == problems, report
    text = m.cli("fsck", *m.cluster_args(), check=False)
    assert text.returncode == 1
    assert "4 problems found" in text.stdout and "--repair" in text.stdout, text.stdout

    status, report, _ = fsck(m, "--repair")
    assert status == 0, report
    assert report["errors"] == [], report
    assert problems <= set(report["repaired"]), report

    status, report, _ = fsck(m)
    assert status == 0, report
    assert report["errors"] == [] and report["repaired"] == [] and report["warnings"] == [], \
        report
    # The orphan is not deleted: it waits in /lost+found, its blocks kept.
    for block_id, _ in found["orphan blocks"]:
        for server in m.servers:
            assert os.path.exists(block_file(server, block_id))
    assert superblock.read_quorum(store.transport, store.members).lease is None

    expected[f"lost+found/#{found['orphan']}"] = expected.pop("orphan")
    del expected["dangling"]
    remount_from_servers(m)
    check_files(m.path, expected)
    assert sorted(os.listdir(m.path)) == ["a", "d", "keep", "lost+found"]
    assert os.stat(p("a")).st_nlink == 2
    assert os.stat(p("d")).st_nlink == 4
    assert stat.S_ISDIR(os.stat(p("d/s2")).st_mode)
    # The repaired filesystem works as one: change it, unmount, check it again.
    os.unlink(p("d/a-link"))
    expected["new"] = write_file(p("new"), b"after the repair")
    del expected["d/a-link"]
    assert os.stat(p("a")).st_nlink == 1
    m.umount()
    status, report, _ = fsck(m)
    assert status == 0 and report["errors"] == [], report
    remount_from_servers(m)
    check_files(m.path, expected)


def test_repair_of_an_orphaned_directory_tree_is_complete_in_one_run(fusefs_mount, cluster,
                                                                      tmp_path):
    m = fusefs_mount(mkfs=MKFS)
    p = lambda rel: os.path.join(m.path, rel)  # noqa: E731
    os.makedirs(p("lost/sub"))
    expected = {"kept": write_file(p("kept"), os.urandom(BS + 9))}
    write_file(p("lost/file"), os.urandom(2000))
    write_file(p("lost/sub/deeper"), os.urandom(3000))
    os.link(p("kept"), p("lost/kept-link"))
    m.umount()

    found = {}

    def damage(md):
        found["lost"] = ino_of(md, "lost")
        md.remove_dentry(ROOT_INO, b"lost")  # the whole tree below loses its way in

    publish_damaged_metadata(cluster(m), str(tmp_path), damage)
    status, report, _ = fsck(m)
    assert status == 1, report
    assert f"inode {found['lost']} cannot be reached from the root" in report["errors"], report

    status, report, _ = fsck(m, "--repair")
    assert status == 0, report
    status, report, _ = fsck(m)  # one repair leaves a consistent filesystem
    assert status == 0 and report["errors"] == [], report

    remount_from_servers(m)
    check_files(m.path, expected)
    # Nothing is lost: the tree hangs in /lost+found under its inode number.
    moved = p(f"lost+found/#{found['lost']}")
    assert sorted(os.listdir(moved)) == ["file", "kept-link", "sub"]
    assert os.listdir(os.path.join(moved, "sub")) == ["deeper"]
    # The link count of "kept" matches the names it has.
    kept = os.stat(p("kept"))
    names = sum(1 for top, _, files in os.walk(m.path) for name in files
                if os.lstat(os.path.join(top, name)).st_ino == kept.st_ino)
    assert kept.st_nlink == names


def test_a_directory_cycle_cut_off_from_the_root_is_found(fusefs_mount, cluster, tmp_path):
    m = fusefs_mount(mkfs=MKFS)
    os.makedirs(os.path.join(m.path, "d", "e"))
    write_file(os.path.join(m.path, "d", "e", "f"), os.urandom(2 * BS))
    expected = {"top": write_file(os.path.join(m.path, "top"), os.urandom(1000))}
    m.umount()

    def damage(md):
        # What a rename of a directory into its own subdirectory would leave.
        d, e = ino_of(md, "d"), ino_of(md, "d/e")
        md.remove_dentry(ROOT_INO, b"d")
        md.link(d, e, b"loop")

    publish_damaged_metadata(cluster(m), str(tmp_path), damage)
    status, report, _ = fsck(m)
    assert status == 1, report
    status, report, _ = fsck(m, "--repair")
    assert status == 0, report
    status, report, _ = fsck(m)
    assert status == 0 and report["errors"] == [], report

    # Consistent means every inode fsck counts can be reached from the root.
    remount_from_servers(m)
    check_files(m.path, expected)
    reachable = {os.lstat(m.path).st_ino}
    for top, dirs, files in os.walk(m.path):
        reachable.update(os.lstat(os.path.join(top, n)).st_ino for n in dirs + files)
    assert len(reachable) == report["counts"]["inodes"], (sorted(reachable), report)


def test_next_writer_sweeps_what_a_killed_writer_left(fusefs_mount, cluster):
    """Uploads a killed client never recorded are deleted by the next read-write mount
    (no fsck needed); blocks the new mount uploads meanwhile are never touched."""
    m = fusefs_mount(mkfs=MKFS)
    expected = digests(make_tree(m.path, 4))
    store = cluster(m)
    uploads = plant_leftovers(store)
    m.force_unmount()  # kill -9: the lease is never given back

    m.mount()  # takes the dead writer's lease at once, and sweeps a few seconds later
    during = {f"during/{i}": os.urandom(3000 + i) for i in range(20)}
    os.mkdir(os.path.join(m.path, "during"))

    def gone() -> bool:
        for name, data in list(during.items())[:2]:  # keep uploading while it sweeps
            write_file(os.path.join(m.path, name), data)
        return not any(store.has_many(list(uploads)).values())

    wait_until(gone, "the new writer to sweep the leftovers", timeout=90, interval=0.5)
    for name, data in during.items():
        write_file(os.path.join(m.path, name), data)
    expected.update({name: hashlib.sha256(data).hexdigest() for name, data in during.items()})
    m.umount()
    status, report, _ = fsck(m)
    assert status == 0 and report["errors"] == [], report
    remount_from_servers(m)
    check_files(m.path, expected)
