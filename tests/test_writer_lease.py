"""The writer lease on real mounts: one read-write mount at a time, read-only mounts beside
it that follow its journal, and what happens when the writer unmounts, pauses or dies.

Every mount here is a real `fusefs mount` daemon on real block servers. A second mount of
the same filesystem gets its own mountpoint and its own cache directory (the `beside`
fixture), as it would on another machine; the fusefs_mount fixture's teardown takes every
one down and applies the suite's log policy to each daemon's log (an ERROR or a traceback
the test did not declare fails it). Nothing asserts how long anything took:
waits poll with `wait_until`, whose timeout only stops a hang.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess

import pytest

from fusefs import superblock
from fusefs.transport import Transport, TransportConfig

from .support import Mount, alive, check_files, members_of, sha256_of, wait_until

KiB, MiB = 1 << 10, 1 << 20
FOLLOW = 20.0  # a reader shows a writer's change within this (the poll's hang guard)


# -- helpers ------------------------------------------------------------------------------------

def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file(path: str, data: bytes, fsync: bool = True) -> str:
    with open(path, "wb") as f:
        view = memoryview(data)
        for start in range(0, len(data), 256 * KiB):
            f.write(view[start:start + 256 * KiB])
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return digest(data)


def read_superblock(m: Mount) -> superblock.Superblock:
    """What the cluster holds now (a majority read, as a mount does)."""
    return superblock.read_quorum(Transport(TransportConfig()), members_of(m.servers))


def try_mount(m: Mount, *extra: str) -> subprocess.CompletedProcess:
    """`fusefs mount` at m.path with m's cache dir; the result, whether it worked or not."""
    os.makedirs(m.path, exist_ok=True)
    return m.cli("mount", *m.cluster_args(), "--cache-dir", m.cache_dir, *extra, m.path,
                 check=False)


def matches(root: str, expected: dict[str, str], absent=()) -> bool:
    """True when root shows exactly these contents and none of the `absent` names (a poll)."""
    try:
        if any(os.path.lexists(os.path.join(root, rel)) for rel in absent):
            return False
        return all(sha256_of(os.path.join(root, rel)) == want
                   for rel, want in expected.items())
    except FileNotFoundError:
        return False


def fails_with(code: int, fn, *args) -> bool:
    try:
        fn(*args)
    except OSError as e:
        assert e.errno == code, f"{getattr(fn, '__name__', fn)}{args}: {e}"
        return True
    return False


def create_file(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"must not be written")


def open_for_writing(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY))


# -- a second mount of the same filesystem ------------------------------------------------------

@pytest.fixture
def beside(fusefs_mount, tmp_path):
    """Factory: `beside(first, name)` -> a Mount of first's filesystem at another mountpoint
    with another cache directory (not mounted yet). The fusefs_mount fixture tracks it: its
    teardown takes it down and applies the log policy to its daemon's log."""

    def make(first: Mount, name: str) -> Mount:
        other = fusefs_mount.track(tmp_path / f"mnt-{name}", tmp_path / f"cache-{name}",
                                   first.servers, first.secret_file)
        os.makedirs(other.path, exist_ok=True)
        return other

    return make


# -- one writer at a time -----------------------------------------------------------------------

def test_second_read_write_mount_is_refused_and_names_the_holder(fusefs_mount, beside):
    m = fusefs_mount()
    before = write_file(os.path.join(m.path, "before"), b"written by the first mount")
    pid = m.daemon_pid()
    assert pid and alive(pid)

    other = beside(m, "second")
    refused = try_mount(other)
    assert refused.returncode != 0, refused.stdout
    message = refused.stderr
    assert re.search(rf"\bpid {pid}\b", message), message
    assert socket.gethostname() in message, message
    assert m.path in message, message
    assert "expires at" in message, message
    assert "--read-only" in message, message
    assert not other.mounted
    assert other.daemon_pid() is None

    # The refusal changed nothing: the first mount still holds the lease and works.
    lease = read_superblock(m).lease
    assert lease is not None and lease["pid"] == pid
    assert m.mounted and m.daemon_pid() == pid
    check_files(m.path, {"before": before})
    after = write_file(os.path.join(m.path, "after"), os.urandom(300 * KiB))
    os.mkdir(os.path.join(m.path, "dir"))
    check_files(m.path, {"before": before, "after": after})
    m.umount()
    m.mount()
    check_files(m.path, {"before": before, "after": after})
    assert os.path.isdir(os.path.join(m.path, "dir"))


def test_read_only_mount_follows_the_writer(fusefs_mount, beside):
    m = fusefs_mount()
    rng = random.Random(11)
    os.makedirs(os.path.join(m.path, "dir", "sub"))
    expected = {
        "small": write_file(os.path.join(m.path, "small"), b"hello reader\n"),
        "big.bin": write_file(os.path.join(m.path, "big.bin"), rng.randbytes(3 * MiB + 4321)),
        "dir/sub/nested": write_file(os.path.join(m.path, "dir", "sub", "nested"),
                                     rng.randbytes(70 * KiB)),
        "to-rename": write_file(os.path.join(m.path, "to-rename"), rng.randbytes(5000)),
        "to-delete": write_file(os.path.join(m.path, "to-delete"), rng.randbytes(6000)),
        "to-overwrite": write_file(os.path.join(m.path, "to-overwrite"),
                                   rng.randbytes(1 * MiB + 10)),
        "empty": write_file(os.path.join(m.path, "empty"), b""),
    }

    reader = beside(m, "reader")
    reader.mount("--read-only")
    assert reader.mounted
    # Existing files, byte for byte (the big one spans several blocks).
    check_files(reader.path, expected)
    assert sorted(os.listdir(reader.path)) == sorted(os.listdir(m.path))

    # Changes on the writer: a new file (fsynced), another one only closed, a new
    # directory, a rename, a delete, an overwrite in place.
    new_data = rng.randbytes(2 * MiB + 99)
    expected["new.bin"] = write_file(os.path.join(m.path, "new.bin"), new_data)
    expected["closed-only"] = write_file(os.path.join(m.path, "closed-only"),
                                         rng.randbytes(200 * KiB), fsync=False)
    os.mkdir(os.path.join(m.path, "newdir"))
    expected["newdir/inside"] = write_file(os.path.join(m.path, "newdir", "inside"), b"in")
    os.rename(os.path.join(m.path, "to-rename"), os.path.join(m.path, "renamed"))
    expected["renamed"] = expected.pop("to-rename")
    os.unlink(os.path.join(m.path, "to-delete"))
    del expected["to-delete"]
    expected["to-overwrite"] = write_file(os.path.join(m.path, "to-overwrite"),
                                          rng.randbytes(300 * KiB + 1))
    gone = ("to-rename", "to-delete")
    wait_until(lambda: matches(reader.path, expected, absent=gone),
               "the reader to show the writer's changes", timeout=FOLLOW)
    check_files(reader.path, expected)
    assert sorted(os.listdir(reader.path)) == sorted(os.listdir(m.path))
    with open(os.path.join(reader.path, "new.bin"), "rb") as f:
        assert f.read() == new_data

    # Nothing can be changed through the reader; what the writer sees is untouched.
    r = reader.path
    assert fails_with(errno.EROFS, create_file, os.path.join(r, "nope"))
    assert fails_with(errno.EROFS, open_for_writing, os.path.join(r, "small"))
    assert fails_with(errno.EROFS, os.mkdir, os.path.join(r, "nodir"))
    assert fails_with(errno.EROFS, os.unlink, os.path.join(r, "small"))
    assert fails_with(errno.EROFS, os.rename, os.path.join(r, "small"),
                      os.path.join(r, "moved"))
    assert fails_with(errno.EROFS, os.truncate, os.path.join(r, "small"), 0)
    assert fails_with(errno.EROFS, os.setxattr, os.path.join(r, "small"), "user.x", b"1")
    assert not os.path.lexists(os.path.join(m.path, "nope"))
    assert not os.path.lexists(os.path.join(m.path, "nodir"))
    check_files(m.path, expected)

    # The reader keeps following after all that.
    expected["late"] = write_file(os.path.join(m.path, "late"), b"one more")
    wait_until(lambda: matches(reader.path, expected), "the reader to show a late file",
               timeout=FOLLOW)
    # A new writer elsewhere (the old one unmounted): the reader follows it too.
    m.umount()
    successor = beside(m, "successor")
    successor.mount()
    os.unlink(os.path.join(successor.path, "small"))
    del expected["small"]
    expected["from-successor"] = write_file(os.path.join(successor.path, "from-successor"),
                                            rng.randbytes(150 * KiB))
    wait_until(lambda: matches(reader.path, expected, absent=["small"]),
               "the reader to follow the next writer", timeout=FOLLOW)
    check_files(reader.path, expected)
    reader.umount()
    assert not reader.mounted
    check_files(successor.path, expected)


def test_clean_unmount_gives_the_lease_back(fusefs_mount, beside):
    # A long lease: if unmount did not release it, nobody could take it for a minute.
    m = fusefs_mount(mount=["--lease-seconds", "60"])
    data = write_file(os.path.join(m.path, "f"), os.urandom(100 * KiB))
    assert read_superblock(m).lease["pid"] == m.daemon_pid()
    m.umount()
    assert not m.mounted
    assert read_superblock(m).lease is None, "unmount left the writer lease taken"

    other = beside(m, "next")
    other.mount("--lease-seconds", "60")  # one attempt, no retries: it must work at once
    assert other.mounted
    lease = read_superblock(m).lease
    assert lease["pid"] == other.daemon_pid()
    assert other.path in lease["holder"]
    check_files(other.path, {"f": data})
    write_file(os.path.join(other.path, "g"), b"the new writer writes")


def test_a_read_only_mount_short_of_local_room_keeps_serving_and_catches_up(
        fusefs_mount, beside, tmp_path):
    """The disk under a read-only mount's --cache-dir fills up: its copy of the database
    cannot take the writer's changes. Before, the follower logged a traceback at every poll,
    the status file could not be written any more and `fusefs status` said all was well.
    Now it stops applying at the reserve, goes on serving the filesystem as it was, says so
    (a warning, no traceback; `fusefs status` names it and exits 1), and catches up by
    itself once there is room."""
    from .test_mount_promises import small_disk
    m = fusefs_mount()
    rng = random.Random(21)
    before = write_file(os.path.join(m.path, "before"), rng.randbytes(300 * KiB))
    attrs = os.path.join(m.path, "attrs")
    write_file(attrs, b"")
    with small_disk(tmp_path / "small", "40m") as small:
        reader = beside(m, "reader")
        reader.mount("--read-only", "--cache-dir-reserve", "16MiB", cache_dir=small)
        wait_until(lambda: matches(reader.path, {"before": before}), "the reader to start",
                   timeout=FOLLOW)
        value = rng.randbytes(60 * KiB)  # 480 of them: more than the small disk holds
        for i in range(480):
            os.setxattr(attrs, f"user.fill{i}", value)

        def status():
            return reader.cli("status", reader.path, check=False)

        wait_until(lambda: "STALLED" in status().stdout, "the reader to say it stopped",
                   timeout=60)
        shown = status()
        assert shown.returncode == 1 and "short of room" in shown.stdout, shown.stdout
        # It serves what it had, byte for byte.
        assert matches(reader.path, {"before": before})
        assert "fusefs.follower" in reader.logs() and "catches up by itself" in reader.logs()

        after = write_file(os.path.join(m.path, "after"), rng.randbytes(100 * KiB))
        subprocess.run(["mount", "-o", "remount,size=200m", small], check=True)
        wait_until(lambda: matches(reader.path, {"before": before, "after": after}),
                   "the reader to catch up once there is room", timeout=60)
        assert os.getxattr(os.path.join(reader.path, "attrs"), "user.fill479") == value
        wait_until(lambda: status().returncode == 0, "the reader's status to be healthy",
                   timeout=FOLLOW)
        assert "following the writer again" in reader.logs()
        reader.umount()


def test_mount_anywhere_with_an_empty_cache_reads_the_same(fusefs_mount, beside):
    m = fusefs_mount()
    rng = random.Random(4)
    expected = {}
    for d in range(3):
        os.makedirs(os.path.join(m.path, f"d{d}", "deeper"))
        for i in range(5):
            rel = os.path.join(f"d{d}", "deeper" if i % 2 else "", f"f{i}")
            size = rng.choice([0, 1, 4095, 4096, 65537, rng.randint(0, 2 * MiB)])
            expected[rel] = write_file(os.path.join(m.path, rel), rng.randbytes(size))
    expected["large"] = write_file(os.path.join(m.path, "large"), rng.randbytes(9 * MiB + 7))
    os.symlink("d0/f0", os.path.join(m.path, "link"))
    check_files(m.path, expected)
    m.umount()
    assert not m.mounted

    other = beside(m, "elsewhere")
    assert not os.path.exists(other.cache_dir)  # nothing of the first mount's cache
    other.mount()
    check_files(other.path, expected)
    assert os.readlink(os.path.join(other.path, "link")) == "d0/f0"
    assert sorted(os.listdir(other.path)) == ["d0", "d1", "d2", "large", "link"]
    for d in range(3):
        top = sorted(os.path.basename(r) for r in expected if r.startswith(f"d{d}/f"))
        assert sorted(os.listdir(os.path.join(other.path, f"d{d}"))) == ["deeper", *top]


# -- the lease outlives a paused writer -----------------------------------------------------------

LEASE = 6.0  # seconds: short enough to wait out, long enough to be refused at least once


def test_paused_writer_loses_the_lease_and_turns_read_only(fusefs_mount, beside,
                                                          blockservers):
    m = fusefs_mount(mount=["--lease-seconds", str(LEASE)])
    # Expected: the old writer says at ERROR that it lost the lease (nothing else).
    blockservers.servers.allow(r"this mount lost its writer lease")
    first_pid = m.daemon_pid()
    assert first_pid
    rng = random.Random(5)
    old = {f"old{i}": write_file(os.path.join(m.path, f"old{i}"), rng.randbytes(150 * KiB * i))
           for i in range(3)}
    new: dict[str, str] = {}
    probes: list[str] = []
    second = beside(m, "second")
    attempts: list[subprocess.CompletedProcess] = []

    def take_over() -> bool:
        result = try_mount(second, "--lease-seconds", str(LEASE))
        attempts.append(result)
        return result.returncode == 0

    os.kill(first_pid, signal.SIGSTOP)
    try:
        wait_until(take_over, "the second writer to get the lease once it expired",
                   timeout=90, interval=0.5)
        assert second.mounted
        refusals = [a for a in attempts if a.returncode != 0]
        assert refusals, "a second writer got the lease while it was still valid"
        for r in refusals:
            assert re.search(rf"\bpid {first_pid}\b", r.stderr), r.stderr
        lease = read_superblock(m).lease
        assert lease["pid"] == second.daemon_pid() != first_pid

        # The second writer sees what the first one made durable, and writes its own.
        check_files(second.path, old)
        os.mkdir(os.path.join(second.path, "by-second"))
        for i in range(3):
            rel = f"by-second/n{i}"
            new[rel] = write_file(os.path.join(second.path, rel), rng.randbytes(90 * KiB + i))
    finally:
        os.kill(first_pid, signal.SIGCONT)

    # The first writer wakes up with its lease lapsed by its own clock: its very first
    # change waits for the renewal, which finds the lease gone, and is refused; so is
    # every change from then on. Nothing it does after waking may reach the cluster.
    probes.append("probe0")
    assert fails_with(errno.EROFS, create_file, os.path.join(m.path, "probe0"))
    assert fails_with(errno.EROFS, os.mkdir, os.path.join(m.path, "nodir"))
    assert fails_with(errno.EROFS, open_for_writing, os.path.join(m.path, "old1"))
    assert fails_with(errno.EROFS, os.unlink, os.path.join(m.path, "old0"))
    assert "lost its writer lease" in m.logs(), m.logs()[-3000:]
    assert alive(first_pid) and m.mounted

    # The second writer is unaffected, and the filesystem is consistent.
    new["after-wakeup"] = write_file(os.path.join(second.path, "after-wakeup"), b"still mine")
    assert read_superblock(m).lease["pid"] == second.daemon_pid()
    report = fsck_json(m)
    assert report["clean"] and report["errors"] == [], report

    second.umount()
    assert not second.mounted
    m.umount()  # a fenced mount still unmounts
    assert not m.mounted
    wait_until(lambda: not alive(first_pid), "the old writer's daemon to exit")

    fresh = beside(m, "fresh")
    fresh.mount()
    check_files(fresh.path, {**old, **new})
    leaked = [p for p in probes if os.path.lexists(os.path.join(fresh.path, p))]
    assert not leaked, f"changes of the writer that lost its lease reached the cluster: {leaked}"
    assert sorted(os.listdir(fresh.path)) == sorted([*old, "by-second", "after-wakeup"])
    fresh.umount()
    report = fsck_json(m)
    assert report["clean"] and report["errors"] == [], report


def fsck_json(m: Mount) -> dict:
    result = m.cli("fsck", *m.cluster_args(), "--json", check=False)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


# -- a writer killed on this machine --------------------------------------------------------------

def test_new_writer_right_after_kill_9_of_the_old_one(fusefs_mount, beside):
    # A lease far longer than the test: only knowing the holder is dead lets the next in.
    m = fusefs_mount(mount=["--lease-seconds", "300"])
    rng = random.Random(9)
    expected = {f"f{i}": write_file(os.path.join(m.path, f"f{i}"), rng.randbytes(i * 200 * KiB))
                for i in range(4)}
    pid = m.daemon_pid()
    lease = read_superblock(m).lease
    assert lease["pid"] == pid and lease["host"] == socket.gethostname()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), "the killed daemon to be gone")
    m.force_unmount()  # the dead mount's kernel side (ENOTCONN) goes away
    wait_until(lambda: not m.mounted, "the dead mount to go away")
    held = read_superblock(m).lease
    assert held is not None and held["pid"] == pid, "the killed writer's lease is unchanged"

    other = beside(m, "after-kill")
    result = try_mount(other, "--lease-seconds", "300")  # one attempt: no waiting for expiry
    assert result.returncode == 0, result.stderr
    assert other.mounted
    assert read_superblock(m).lease["pid"] == other.daemon_pid()
    assert "taking over the writer lease" in other.logs()
    check_files(other.path, expected)
    expected["g"] = write_file(os.path.join(other.path, "g"), b"new writer")
    other.umount()
    assert read_superblock(m).lease is None
    m.mount()
    check_files(m.path, expected)


def test_a_read_only_key_mounts_read_only_and_follows_but_cannot_write(fusefs_mount,
                                                                       beside, tmp_path):
    """`fusefs read-key` derives a key that can only read: a reader mounted with it sees
    the writer's files; the CLI refuses it for anything that writes."""
    m = fusefs_mount(secret=b"k" * 32)
    data = random.Random(12).randbytes(MiB + 5)
    expected = {"f": write_file(os.path.join(m.path, "f"), data)}
    key = str(tmp_path / "read.key")
    m.cli("read-key", "--secret-file", m.secret_file, key)
    assert os.stat(key).st_mode & 0o077 == 0
    reader = beside(m, "keyed")
    reader.secret_file = key
    for refused in (["mount", *reader.cluster_args(), reader.path],
                    ["mkfs", *reader.cluster_args(), "--force"],
                    ["fsck", *reader.cluster_args(), "--repair"]):
        result = reader.cli(*refused, check=False)
        assert result.returncode != 0 and "read-only key" in result.stderr, result.stderr
    reader.mount("--read-only")
    check_files(reader.path, expected)
    expected["g"] = write_file(os.path.join(m.path, "g"), b"later")
    wait_until(lambda: os.path.exists(os.path.join(reader.path, "g")), "the reader to follow",
               timeout=FOLLOW)
    check_files(reader.path, expected)
