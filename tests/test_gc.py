"""`fusefs gc` on real block servers and real mounts: what a crashed client, a fenced
writer and a running writer leave or need, and a writer change in the middle of a run.

Leftovers are made the way they happen. A client writes a few bytes at the start of a new
file and then whole blocks after them, without fsync: the whole blocks are uploaded at
once but wait ("parked") for the first one before any record names them, so a kill -9
then leaves uploads that no metadata, not even the dead client's own database, names.
A writer paused past its lease (SIGSTOP) is taken over and resumed: what it uploads
after is never recorded anywhere. gc runs as the real command (its --json report is
checked) or, to act between its phases, through `fusefs.gc.Collector`. Every test checks
the servers' listings before and after, that the files read back identical (after a
remount from the servers too) and that `fusefs fsck` is clean.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from fusefs import superblock
from fusefs.gc import Collector, Refused, WriterChanged
from fusefs.host import new_mount_id
from fusefs.lease import acquire, new_lease
from fusefs.metadata import Metadata

from .support import check_files, wait_until
from .test_fsck import (BS, MKFS, fsck, plant_leftovers, remount_from_servers,
                        unreferenced_and_garbage, write_file)


# -- helpers --------------------------------------------------------------------------------

@pytest.fixture
def cluster(make_cluster):
    """Factory: `cluster(m)` -> a started ReplicatedStore over m's servers."""
    return lambda m: make_cluster(m.servers, replicas=3, write_quorum=2)


def gc(m, *args: str, expect: int | None = None) -> tuple[int, dict, str]:
    """`fusefs gc --json ARGS`: (exit status, report, stderr)."""
    result = m.cli("gc", *m.cluster_args(), "--json", *args, check=False)
    if expect is not None:
        assert result.returncode == expect, f"gc exited {result.returncode}:\n{result.stderr}"
    return result.returncode, json.loads(result.stdout), result.stderr


def listing(store) -> dict[str, set[str]]:
    """Server URL -> the ids it holds."""
    found = {}
    for member in store.members:
        ids, after = set(), ""
        while True:
            page, after = store.transport.list_blocks(member, after, 1000)
            ids.update(b["id"] for b in page)
            if not after:
                break
        found[member.url] = ids
    return found


def every_id(store) -> set[str]:
    return set().union(*listing(store).values())


def cluster_needs(store, work: str) -> set[str]:
    """The ids on the servers that the metadata a new mount loads needs."""
    unreferenced, _ = unreferenced_and_garbage(store, work)
    return every_id(store) - unreferenced


def lease_of(store) -> dict | None:
    return superblock.read_quorum(store.transport, store.members).lease


def park_uploads(root: str, rng: random.Random, files: int, blocks: int) -> list[int]:
    """New files, each a few bytes at 0 then `blocks` whole blocks after them, not synced
    and left open: the whole blocks are uploaded but wait for block 0 before any record
    names them. Returns the open descriptors."""
    fds = []
    for i in range(files):
        fd = os.open(os.path.join(root, f"parked{i}"), os.O_CREAT | os.O_WRONLY, 0o644)
        os.pwrite(fd, b"x" * 100, 0)
        for b in range(1, blocks + 1):
            os.pwrite(fd, rng.randbytes(BS), b * BS)
        fds.append(fd)
    return fds


PARK = r"""
import os, sys
root, files, blocks, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fds = []
for i in range(files):
    fd = os.open(os.path.join(root, f"parked{i}"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.pwrite(fd, b"x" * 100, 0)
    for b in range(1, blocks + 1):
        os.pwrite(fd, os.urandom(bs), b * bs)
    fds.append(fd)
print("parked", flush=True)
sys.stdin.read()
"""


def park_in_child(root: str, files: int, blocks: int) -> subprocess.Popen:
    """`park_uploads` in a child process that keeps the files open until killed: this
    process then holds nothing open on a mount whose daemon a test pauses (a fork would
    close it, and wait on the paused daemon)."""
    child = subprocess.Popen([sys.executable, "-c", PARK, root, str(files), str(blocks),
                              str(BS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "parked\n"
    return child


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):  # the mount is gone: that is the point
            os.close(fd)


def local_references(m, fs_id: str, work: str) -> set[str]:
    """The block ids the database a mount left in its cache directory references."""
    source = os.path.join(m.cache_dir, fs_id, "metadata.db")
    copy = os.path.join(work, "dead.db")
    for suffix in ("", "-wal"):
        if os.path.exists(source + suffix):
            shutil.copyfile(source + suffix, copy + suffix)
    md = Metadata(copy)
    try:
        return md.referenced_blocks()
    finally:
        md.close()


def read_all(root: str) -> None:
    """Read every file under root to its end (a missing block fails the read)."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(1 << 20):
                    pass


# -- (a) a client killed in the middle of uploads --------------------------------------------

def crash_in_the_middle_of_uploads(m, store) -> tuple[dict[str, str], str]:
    """Synced files, one written and closed but not synced, three with parked uploads;
    then kill -9 of the client. Returns (synced file -> sha256, filesystem id)."""
    rng = random.Random(16)
    synced = {f"synced{i}": write_file(os.path.join(m.path, f"synced{i}"),
                                       rng.randbytes(3 * BS + 17 * i)) for i in range(4)}
    with open(os.path.join(m.path, "unsynced"), "wb") as f:  # closed, never fsynced
        f.write(rng.randbytes(2 * BS))
    before = every_id(store)
    fds = park_uploads(m.path, rng, files=3, blocks=4)
    wait_until(lambda: len(every_id(store) - before) >= 12, "the parked blocks' uploads")
    fs_id = superblock.read_quorum(store.transport, store.members).fs_id
    m.force_unmount()  # kill -9 of the client, then the dead mount detached
    close_all(fds)
    return synced, fs_id


def reads_back_and_checks_clean(m, synced: dict[str, str]) -> None:
    """Mount from the same cache directory (the dead client's records come back), read
    every file, fsck; then again from the servers alone."""
    m.mount()
    check_files(m.path, synced)
    read_all(m.path)
    assert fsck(m)[0] == 0
    remount_from_servers(m)
    check_files(m.path, synced)
    read_all(m.path)


def test_a_crashed_client_leaves_orphans_gc_deletes_and_nothing_else(fusefs_mount, cluster,
                                                                     tmp_path):
    m = fusefs_mount(mkfs=MKFS)
    store = cluster(m)
    synced, fs_id = crash_in_the_middle_of_uploads(m, store)

    # What gc must find: blocks nothing needs, neither the cluster's metadata nor the
    # dead client's own database (a mount from its cache directory carries its records
    # over).
    held = listing(store)
    kept = cluster_needs(store, str(tmp_path)) | local_references(m, fs_id, str(tmp_path))
    orphans = set().union(*held.values()) - kept
    assert orphans, "the crash left no orphan uploads to collect"

    code, report, _ = gc(m, expect=1)
    assert report["leftover_blocks"] == len(orphans) and not report["deleted"]
    for url, ids in held.items():
        assert report["servers"][url]["leftover_blocks"] == len(ids & orphans)
    assert listing(store) == held, "a dry run deleted something"

    code, report, stderr = gc(m, "--delete", expect=0)
    assert report["deleted"] and report["leftover_blocks"] == len(orphans)
    assert "gc: listing" in stderr  # progress lines
    after = listing(store)
    for url, ids in held.items():
        assert ids - after[url] == ids & orphans, f"{url}: not exactly the orphans deleted"
    gc(m, expect=0)  # nothing left
    reads_back_and_checks_clean(m, synced)


def test_without_the_dead_clients_database_its_blocks_are_left_alone(fusefs_mount, cluster,
                                                                     tmp_path):
    """The client's cache directory is elsewhere (another path, another machine): gc
    cannot tell which of its uploads its records name, so it judges none of them."""
    m = fusefs_mount(mkfs=MKFS)
    store = cluster(m)
    tag = lease_of(store)["tag"]
    synced, _ = crash_in_the_middle_of_uploads(m, store)
    tagged = {i for i in every_id(store) if i.startswith(tag)}
    hidden = tmp_path / "moved-cache"
    os.rename(m.cache_dir, hidden)
    try:
        code, report, stderr = gc(m, "--delete", expect=0)
        assert "local metadata is not found" in stderr
        assert report["kept_for_writer"] > 0
        assert tagged <= every_id(store), "blocks of the dead client were deleted"
    finally:
        os.rename(hidden, m.cache_dir)
    reads_back_and_checks_clean(m, synced)


# -- (b) a writer that lost its lease, then killed -------------------------------------------

@pytest.mark.expect_log(r"this mount lost its writer lease")
def test_uploads_of_a_fenced_writer_are_collected_nothing_live_is(fusefs_mount, cluster,
                                                                  tmp_path):
    a = fusefs_mount(mkfs=MKFS, mount=["--lease-seconds", "3"])
    store = cluster(a)
    rng = random.Random(17)
    synced = {f"a{i}": write_file(os.path.join(a.path, f"a{i}"), rng.randbytes(2 * BS + i))
              for i in range(3)}
    tag_a = lease_of(store)["tag"]
    child = park_in_child(a.path, files=3, blocks=2)
    pid_a = a.daemon_pid()
    try:
        os.kill(pid_a, signal.SIGSTOP)
        try:
            wait_until(lambda: lease_of(store)["expires"] < time.time(), "a's lease to expire")
            b = fusefs_mount.track(tmp_path / "mntb", tmp_path / "cacheb", a.servers,
                                   a.secret_file)
            b.mount()
            # b sweeps what a left so far; what a uploads after that is for gc.
            wait_until(lambda: "leftover blocks of an earlier writer" in b.logs()
                       or "leftover sweep skipped" in b.logs(), "b's sweep")
            before = every_id(store)
        finally:
            os.kill(pid_a, signal.SIGCONT)
        # Resumed, a's flusher uploads the parked files' first blocks (old enough now).
        late = wait_until(lambda: {i for i in every_id(store) - before
                                   if i.startswith(tag_a)},
                          "a's uploads after it lost its lease")
        a.force_unmount()
    finally:
        child.kill()
        child.wait()
    tag_b = lease_of(store)["tag"]
    synced.update({f"b{i}": write_file(os.path.join(b.path, f"b{i}"), rng.randbytes(BS + i))
                   for i in range(3)})

    held = every_id(store)
    needed = cluster_needs(store, str(tmp_path))
    code, report, _ = gc(a, expect=1)
    assert report["leftover_blocks"] >= len(late) and report["kept_for_writer"] > 0
    code, report, _ = gc(a, "--delete", expect=0)
    after = every_id(store)
    assert not late & after, "a's uploads after its lease loss were not collected"
    assert needed <= after, "gc deleted blocks the metadata needs"
    assert {i for i in held if i.startswith(tag_b)} <= after, "gc deleted the writer's blocks"
    check_files(b.path, synced)
    assert fsck(b)[0] == 0
    remount_from_servers(b)
    check_files(b.path, synced)


# -- (c) gc beside a writer that keeps writing -----------------------------------------------

def test_gc_while_a_writer_writes_loses_nothing(fusefs_mount, cluster, tmp_path):
    m = fusefs_mount(mkfs=MKFS)
    store = cluster(m)
    planted = plant_leftovers(store, count=5)
    expected: dict[str, str] = {}
    stop = threading.Event()
    failure: list[BaseException] = []

    def write_on():
        rng = random.Random(18)
        try:
            i = 0
            while not stop.is_set() or i < 6:
                rel = f"w{i % 8}"  # rewrites make garbage too
                data = rng.randbytes(rng.randrange(1, 3 * BS))
                if i % 2:
                    with open(os.path.join(m.path, rel), "wb") as f:
                        f.write(data)
                    expected[rel] = hashlib.sha256(data).hexdigest()
                else:
                    expected[rel] = write_file(os.path.join(m.path, rel), data)
                i += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failure.append(e)

    writer = threading.Thread(target=write_on)
    writer.start()
    try:
        wait_until(lambda: len(expected) >= 3 or failure, "the writer to get going")
        for _ in range(2):
            code, report, _ = gc(m, "--delete", expect=0)
            assert report["kept_for_writer"] > 0  # the writer's own blocks, not judged
    finally:
        stop.set()
        writer.join()
    assert not failure, failure
    assert not set(planted) & every_id(store), "the planted leftovers are still there"
    check_files(m.path, expected)
    assert fsck(m)[0] == 0
    remount_from_servers(m)
    check_files(m.path, expected)
    assert fsck(m)[0] == 0


# -- (d) the writer changes between the survey and the deletion ------------------------------

def test_a_writer_change_after_the_survey_deletes_nothing(fusefs_mount, cluster, tmp_path):
    m = fusefs_mount(mkfs=MKFS)
    write_file(os.path.join(m.path, "f"), b"data" * 1000)
    m.umount()
    store = cluster(m)
    planted = set(plant_leftovers(store, count=3))
    work = tmp_path / "gc"
    work.mkdir()
    collector = Collector(store, store.transport, store.members, work_dir=str(work))

    plan = collector.survey()  # no writer
    assert planted <= plan.ids
    m.mount()  # a writer came and went: the lease is free again, the chain is not the same
    m.umount()
    with pytest.raises(WriterChanged):
        collector.delete(plan)
    assert planted <= every_id(store)

    plan = collector.survey()
    m.mount()  # a writer came and stays
    with pytest.raises(WriterChanged):
        collector.delete(plan)
    assert planted <= every_id(store)

    plan = collector.survey()  # beside that writer: same writer at both ends
    collector.delete(plan)
    assert not planted & every_id(store)
    assert fsck(m)[0] == 0


def test_a_writer_that_has_not_started_its_journal_makes_gc_refuse(fusefs_mount, cluster,
                                                                   tmp_path):
    """A lease taken whose chain the superblock does not name yet: the writer may be
    carrying records of a crashed process over, whose blocks gc cannot tell."""
    m = fusefs_mount(mkfs=MKFS)
    m.umount()
    store = cluster(m)
    planted = set(plant_leftovers(store, count=2))
    sb = superblock.read_quorum(store.transport, store.members)
    sb = acquire(store.transport, sb, new_lease(new_mount_id(), 600.0, "/mnt/starting"))
    code, report, stderr = gc(m, "--delete", expect=2)
    assert "has not started its journal" in stderr and report["exit_status"] == 2
    with pytest.raises(Refused):
        Collector(store, store.transport, store.members, work_dir=str(tmp_path)).survey()
    assert planted <= every_id(store)
    superblock.update(store.transport, sb.with_changes(lease=None))
    gc(m, "--delete", expect=0)
    assert not planted & every_id(store)


# -- keys -----------------------------------------------------------------------------------

def test_a_read_only_key_surveys_but_cannot_delete(fusefs_mount, make_cluster, tmp_path):
    """A dry run needs only reads (a reader's key); --delete needs the cluster secret, and
    its refusal is exit 2 (1 would tell a script that leftovers were found)."""
    secret = b"gc-test-secret-0123456789abcdef!"
    m = fusefs_mount(secret=secret, mkfs=MKFS)
    store = make_cluster(m.servers, secret=secret, replicas=3, write_quorum=2)
    planted = set(plant_leftovers(store, count=2))
    key = tmp_path / "read.key"
    m.cli("read-key", "--secret-file", m.secret_file, str(key))
    reader = ["gc", "--servers", m.urls, "--secret-file", str(key)]
    result = m.cli(*reader, "--json", check=False)
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["leftover_blocks"] == len(planted)
    result = m.cli(*reader, "--delete", check=False)
    assert result.returncode == 2 and "read-only key" in result.stderr
    assert planted <= every_id(store)
    gc(m, "--delete", expect=0)
    assert not planted & every_id(store)
