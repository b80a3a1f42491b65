"""Files that stay open after their last name is gone, through a real mount: the patterns
of temp files, log rotation and `rm` of a file a program still reads.

libfuse 2 keeps such a file reachable under a hidden name until the last close; fusefs
keeps that name out of every listing and out of the metadata, so users never see it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile

import pytest

from .support import alive, wait_until
from .test_mount_posix import inode_row_exists, metadata_db

KiB, MiB = 1 << 10, 1 << 20


def nlink_in_database(m, ino: int) -> int | None:
    with contextlib.closing(sqlite3.connect(f"file:{metadata_db(m)}?mode=ro", uri=True,
                                            timeout=10)) as db:
        row = db.execute("SELECT nlink FROM inodes WHERE ino = ?", (ino,)).fetchone()
    return row[0] if row else None


def test_temporary_file_fstat_works(fusefs_mount):
    m = fusefs_mount()
    with tempfile.TemporaryFile(dir=m.path) as f:
        f.write(b"x" * 5000)
        f.flush()
        st = os.fstat(f.fileno())
        assert st.st_size == 5000 and st.st_nlink == 0
        f.seek(0)
        assert f.read() == b"x" * 5000
        assert os.listdir(m.path) == []


def test_every_call_through_a_descriptor_of_an_unlinked_file(fusefs_mount):
    m = fusefs_mount()
    path = os.path.join(m.path, "doomed")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"a" * (3 * MiB))
        os.unlink(path)
        os.pwrite(fd, b"B" * 10, 2 * MiB + 5)
        os.ftruncate(fd, 2 * MiB + 100)
        os.fchmod(fd, 0o600)
        os.fchown(fd, 1234, 5678)
        os.utime(fd, ns=(10**18, 2 * 10**18))
        os.setxattr(fd, "user.k", b"v")
        assert os.getxattr(fd, "user.k") == b"v"
        assert os.listxattr(fd) == ["user.k"]
        os.fsync(fd)
        os.fdatasync(fd)
        st = os.fstat(fd)
        assert (st.st_size, st.st_nlink, st.st_mode & 0o777, st.st_uid, st.st_gid,
                st.st_mtime_ns) == (2 * MiB + 100, 0, 0o600, 1234, 5678, 2 * 10**18)
        with mmap.mmap(fd, MiB, mmap.MAP_SHARED, offset=MiB) as mm:
            mm[:4] = b"MMAP"
            mm.flush()
            assert mm[MiB - 1:MiB] == b"a"
        assert os.pread(fd, 4, MiB) == b"MMAP"
        assert os.pread(fd, 12, 2 * MiB + 4) == b"aBBBBBBBBBBa"
        assert os.listdir(m.path) == []
    finally:
        os.close(fd)


def test_unlinked_file_shared_with_another_process(fusefs_mount):
    """A child writes and truncates through the inherited descriptor after the parent
    unlinked the name; the parent reads what the child wrote."""
    m = fusefs_mount()
    path = os.path.join(m.path, "shared")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.unlink(path)
        code = ("import os, sys; fd = int(sys.argv[1]); os.pwrite(fd, b'0123456789' * 1000, 0);"
                " os.ftruncate(fd, 7000); print(os.fstat(fd).st_size)")
        out = subprocess.run([sys.executable, "-c", code, str(fd)], pass_fds=[fd],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "7000"
        assert os.pread(fd, 10000, 0) == (b"0123456789" * 1000)[:7000]
    finally:
        os.close(fd)


def test_rmdir_of_a_directory_holding_only_open_unlinked_files(fusefs_mount):
    m = fusefs_mount()
    d = os.path.join(m.path, "d")
    os.mkdir(d)
    fds = []
    for i in range(3):
        fd = os.open(os.path.join(d, f"f{i}"), os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"data %d" % i)
        fds.append(fd)
        os.unlink(os.path.join(d, f"f{i}"))
    try:
        assert os.listdir(d) == []
        assert all(os.fstat(fd).st_nlink == 0 for fd in fds)
        os.rmdir(d)
        assert not os.path.exists(d)
        for i, fd in enumerate(fds):
            assert os.pread(fd, 100, 0) == b"data %d" % i
            os.pwrite(fd, b"more", 100)
            assert os.pread(fd, 4, 100) == b"more"
    finally:
        for fd in fds:
            os.close(fd)
    assert os.listdir(m.path) == []


@pytest.mark.xfail(strict=True, raises=FileNotFoundError, reason=(
    "libfuse 2 limit: once the directory of an open, unlinked file is removed, libfuse "
    "has no path for the file and answers the kernel's GETATTR without a file handle "
    "(fstat) with ENOENT itself; the filesystem is never asked. Reads and writes "
    "through the descriptor carry the handle and work."))
def test_fstat_after_the_directory_of_an_unlinked_open_file_is_removed(fusefs_mount):
    m = fusefs_mount()
    d = os.path.join(m.path, "d")
    os.mkdir(d)
    fd = os.open(os.path.join(d, "f"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.unlink(os.path.join(d, "f"))
        os.rmdir(d)
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("removal", ["rmdir", "rename over it"])
@pytest.mark.xfail(strict=True, raises=FileNotFoundError, reason=(
    "libfuse 2 limit: the kernel sends a directory's GETATTR without its open handle "
    "(only regular files get one), and once the directory is removed libfuse has no "
    "path for it and answers ENOENT itself; the filesystem is never asked (xfstests "
    "generic/035)"))
def test_fstat_of_an_open_directory_after_it_is_removed(fusefs_mount, removal):
    m = fusefs_mount()
    old, new = os.path.join(m.path, "old"), os.path.join(m.path, "new")
    os.mkdir(old)
    os.mkdir(new)
    fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if removal == "rmdir":
            os.rmdir(old)
        else:
            os.rename(new, old)
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


def test_log_rotation_under_a_writer(fusefs_mount):
    """The writer keeps its descriptor; the log is renamed aside, a new one created, the
    old one compressed and removed: every line ends up in exactly one of them."""
    m = fusefs_mount()
    log = os.path.join(m.path, "app.log")
    fd = os.open(log, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    try:
        for i in range(100):
            os.write(fd, b"line %d\n" % i)
        os.rename(log, log + ".1")
        new = os.open(log, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        for i in range(100, 150):
            os.write(fd, b"line %d\n" % i)  # still the old file
        os.write(new, b"line 150\n")
        os.close(new)
        with open(log + ".1", "rb") as f:
            rotated = f.read()
        os.unlink(log + ".1")
        for i in range(151, 160):
            os.write(fd, b"line %d\n" % i)  # the old file has no name now
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert rotated == b"".join(b"line %d\n" % i for i in range(150))
    with open(log, "rb") as f:
        assert f.read() == b"line 150\n"
    assert sorted(os.listdir(m.path)) == ["app.log"]


def test_rm_rf_of_a_tree_a_process_still_reads(fusefs_mount):
    m = fusefs_mount()
    tree = os.path.join(m.path, "tree")
    os.makedirs(os.path.join(tree, "a", "b"))
    content = {}
    for i in range(5):
        p = os.path.join(tree, "a", "b", f"f{i}")
        with open(p, "wb") as f:
            content[i] = os.urandom(200 * KiB + i)
            f.write(content[i])
    fds = {i: os.open(os.path.join(tree, "a", "b", f"f{i}"), os.O_RDONLY) for i in range(5)}
    try:
        subprocess.run(["rm", "-rf", tree], check=True, timeout=60)
        assert not os.path.exists(tree)
        for i, fd in fds.items():
            assert os.pread(fd, 300 * KiB, 0) == content[i]
    finally:
        for fd in fds.values():
            os.close(fd)
    assert os.listdir(m.path) == []


def test_rename_over_an_open_file(fusefs_mount):
    """The replaced file stays readable through its descriptor; the name shows the new
    file; no hidden name ever shows in the directory."""
    m = fusefs_mount()
    target = os.path.join(m.path, "config")
    with open(target, "wb") as f:
        f.write(b"old")
    reader = os.open(target, os.O_RDONLY)
    try:
        with open(target + ".new", "wb") as f:
            f.write(b"new contents")
        os.rename(target + ".new", target)
        assert os.listdir(m.path) == ["config"]
        assert os.pread(reader, 100, 0) == b"old"
        assert os.fstat(reader).st_nlink == 0
        with open(target, "rb") as f:
            assert f.read() == b"new contents"
    finally:
        os.close(reader)
    assert os.listdir(m.path) == ["config"]


def test_space_of_an_unlinked_open_file_is_freed_at_the_last_close_and_after_a_crash(
        fusefs_mount):
    m = fusefs_mount()
    path = os.path.join(m.path, "big")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, os.urandom(2 * MiB))
    os.fsync(fd)
    ino = os.fstat(fd).st_ino
    os.unlink(path)
    assert inode_row_exists(m, ino)
    # kill -9 while it is open, once the unlink is committed (a kill may lose the last
    # 10 ms of changes): the next mount removes the nameless inode and its blocks.
    wait_until(lambda: nlink_in_database(m, ino) == 0, "the unlink committed")
    pid = m.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), "the daemon to die")
    try:
        os.close(fd)
    except OSError:
        pass  # the daemon is gone
    m.force_unmount()
    wait_until(lambda: not m.mounted, "the dead mount to go away")
    m.mount()
    wait_until(lambda: not inode_row_exists(m, ino), "the orphan removed by the next mount")
    assert os.listdir(m.path) == []


def test_a_users_own_file_with_a_hidden_looking_name_is_an_ordinary_file(fusefs_mount):
    """Names like libfuse's hidden ones (left by another FUSE filesystem, copied by rsync)
    are ordinary names: created, renamed to, listed, read and removed as any other."""
    m = fusefs_mount()
    name = os.path.join(m.path, ".fuse_hidden0123456789abcdef")
    with open(name, "wb") as f:
        f.write(b"mine")
    assert os.listdir(m.path) == [".fuse_hidden0123456789abcdef"]
    other = os.path.join(m.path, "other")
    with open(other, "wb") as f:
        f.write(b"second")
    target = os.path.join(m.path, ".fuse_hiddenfedcba9876543210")
    os.rename(other, target)  # a closed file: an ordinary rename
    with open(target, "rb") as f:
        assert f.read() == b"second"
    with open(name, "rb") as f:
        assert f.read() == b"mine"
    os.unlink(name)
    os.unlink(target)
    assert os.listdir(m.path) == []
