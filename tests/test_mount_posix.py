"""POSIX behaviour of a real fusefs mount, through the kernel, with exact errnos.

The checks that need no fresh filesystem share one mount for the module (`shared_mount`):
each works in a directory of its own, and its listings and link counts are of that
directory. The others start real block servers, format and mount (the `fusefs_mount`
fixture): those that need special mkfs options, a remount or to kill the daemon. Either
way teardown unmounts what the test mounted and the test fails if a daemon logged an error
it did not declare. A mount costs a few seconds, so each test covers one area thoroughly
rather than one assertion.

Known limits of the libfuse 2 high-level API that the tests respect rather than assert:
an open() racing a rename() over the same name may see ENOENT, so rename atomicity is
checked by what each name and each open descriptor shows afterwards, not by racing readers;
and descriptors open through two names of one hard-linked file at once are not coherent.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import mmap
import os
import random
import sqlite3
import stat
import struct
import subprocess
import threading
import time

import pytest

from .support import NOBODY, as_user, wait_until

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
SMALL_BLOCKS = ["--block-size", "64KiB"]
BS = 64 * KiB
GUARD = 20.0  # seconds; only bounds waits for asynchronous work, never asserted


# -- helpers --------------------------------------------------------------------------------

def errno_of(fn, *args, **kwargs) -> int | None:
    """The errno fn(*args) fails with, or None if it succeeds."""
    try:
        fn(*args, **kwargs)
    except OSError as e:
        return e.errno
    return None


def expect_errno(code: int, fn, *args, **kwargs) -> None:
    got = errno_of(fn, *args, **kwargs)
    assert got == code, (f"{fn.__name__}{args!r}: expected {errno.errorcode[code]}, got "
                         f"{errno.errorcode.get(got, got) if got else 'success'}")


def write_file(path, data: bytes, mode: int | None = None) -> None:
    with open(path, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(path, mode)


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def pattern(n: int, seed: int = 0) -> bytes:
    """n reproducible pseudo-random bytes (no short period that could hide a misplaced block)."""
    return random.Random(seed).randbytes(n)


def metadata_db(m) -> str:
    (path,) = glob.glob(os.path.join(m.cache_dir, "*", "metadata.db"))
    return path


def inode_row_exists(m, ino: int) -> bool:
    db = sqlite3.connect(f"file:{metadata_db(m)}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT 1 FROM inodes WHERE ino=?", (ino,)).fetchone() is not None
    finally:
        db.close()


# -- regular files --------------------------------------------------------------------------

def check_append(root: str) -> None:
    """O_APPEND in directory `root`: descriptors interleave, none overwrites another's
    records."""
    path = os.path.join(root, "log")
    write_file(path, b"HEAD\n")

    a = os.open(path, os.O_WRONLY | os.O_APPEND)
    b = os.open(path, os.O_WRONLY | os.O_APPEND)
    expected = b"HEAD\n"
    for i in range(20):
        for fd, tag in ((a, b"A"), (b, b"B")):
            record = tag + b"%02d;" % i
            os.write(fd, record)
            expected += record
    assert read_file(path) == expected
    # Another descriptor moves the end; appends follow it.
    with open(path, "r+b") as f:
        f.truncate(5)
    os.write(a, b"after-truncate")
    os.lseek(b, 0, os.SEEK_SET)  # the position of an O_APPEND descriptor does not matter
    os.write(b, b"|b")
    big = pattern(2 * MiB + 17)  # a record across block boundaries
    os.write(a, big)
    os.close(a)
    os.close(b)
    assert read_file(path) == b"HEAD\nafter-truncate|b" + big

    # Concurrent appenders (threads): no record is lost or overwritten.
    records = {}

    def appender(tag: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            for i in range(150):
                record = f"<{tag}{i:04d}{'.' * 50}>".encode()
                records[(tag, i)] = record
                os.write(fd, record)
        finally:
            os.close(fd)

    os.truncate(path, 0)
    threads = [threading.Thread(target=appender, args=(t,)) for t in "XYZ"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GUARD)
    data = read_file(path)
    assert len(data) == sum(len(r) for r in records.values())
    for record in records.values():
        assert data.count(record) == 1
    # Appends landing through an O_RDWR|O_APPEND descriptor, read back through it.
    with open(path, "a+b") as f:
        f.write(b"END")
        f.seek(0)
        assert f.read() == data + b"END"


def test_regular_files_excl_trunc_append_and_errnos(shared_mount):
    here = shared_mount.path
    p = lambda *names: os.path.join(here, *names)  # noqa: E731

    data = pattern(2 * MiB + 123)  # spans three 1 MiB blocks
    write_file(p("f"), data)
    st = os.stat(p("f"))
    assert stat.S_ISREG(st.st_mode) and st.st_size == len(data)
    assert read_file(p("f")) == data
    assert os.listdir(here) == ["f"]

    # O_EXCL: the file exists, and even a dangling symlink counts as existing.
    with pytest.raises(FileExistsError) as e:
        os.open(p("f"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(FileExistsError):
        open(p("f"), "xb")
    os.symlink("nowhere", p("dangling"))
    expect_errno(errno.EEXIST, os.open, p("dangling"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    fd = os.open(p("new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.write(fd, b"fresh")
    os.close(fd)
    assert read_file(p("new")) == b"fresh"
    assert stat.S_IMODE(os.stat(p("new")).st_mode) == 0o640

    # O_TRUNC: of data already uploaded (fsync) and of data still dirty.
    with open(p("f"), "r+b") as f:
        os.fsync(f.fileno())
    fd = os.open(p("f"), os.O_WRONLY | os.O_TRUNC)
    assert os.stat(p("f")).st_size == 0
    os.write(fd, b"short")
    os.close(fd)
    assert read_file(p("f")) == b"short"
    write_file(p("g"), pattern(200 * KiB, 7))
    with open(p("g"), "wb") as f:  # "w" is O_TRUNC
        f.write(b"xy")
    assert read_file(p("g")) == b"xy" and os.stat(p("g")).st_size == 2

    # Overwrite in the middle, read/write through one descriptor.
    with open(p("g"), "r+b") as f:
        f.seek(1)
        f.write(b"Z")
        f.seek(0)
        assert f.read() == b"xZ"

    # ENOENT
    expect_errno(errno.ENOENT, os.open, p("missing"), os.O_RDONLY)
    expect_errno(errno.ENOENT, os.stat, p("missing"))
    expect_errno(errno.ENOENT, os.unlink, p("missing"))
    expect_errno(errno.ENOENT, os.open, p("nodir", "x"), os.O_WRONLY | os.O_CREAT)
    expect_errno(errno.ENOENT, os.stat, p("dangling"))  # follows the link
    # EEXIST
    expect_errno(errno.EEXIST, os.mkdir, p("f"))
    expect_errno(errno.EEXIST, os.symlink, "x", p("f"))
    expect_errno(errno.EEXIST, os.link, p("g"), p("f"))
    # ENOTDIR: a file used as a directory
    expect_errno(errno.ENOTDIR, os.stat, p("f", "x"))
    expect_errno(errno.ENOTDIR, os.open, p("f", "x"), os.O_WRONLY | os.O_CREAT)
    expect_errno(errno.ENOTDIR, os.mkdir, p("f", "x"))
    expect_errno(errno.ENOTDIR, os.listdir, p("f"))
    # EISDIR: a directory used as a file
    os.mkdir(p("d"))
    expect_errno(errno.EISDIR, os.open, p("d"), os.O_WRONLY)
    expect_errno(errno.EISDIR, os.open, p("d"), os.O_RDWR)
    expect_errno(errno.EISDIR, os.unlink, p("d"))
    # ENAMETOOLONG: 255 bytes is the limit
    long_ok, too_long = "n" * 255, "n" * 256
    write_file(p(long_ok), b"255")
    assert read_file(p(long_ok)) == b"255"
    expect_errno(errno.ENAMETOOLONG, os.open, p(too_long), os.O_WRONLY | os.O_CREAT)
    expect_errno(errno.ENAMETOOLONG, os.stat, p(too_long))
    expect_errno(errno.ENAMETOOLONG, os.mkdir, p(too_long))
    expect_errno(errno.ENAMETOOLONG, os.symlink, "t", p(too_long))
    expect_errno(errno.ENAMETOOLONG, os.link, p("g"), p(too_long))
    assert too_long not in os.listdir(here)

    check_append(here)


def test_directories_statfs_and_names(fusefs_mount):
    m = fusefs_mount()
    p = lambda *names: os.path.join(m.path, *names)  # noqa: E731
    root_links = os.stat(m.path).st_nlink

    os.mkdir(p("a"), 0o750)
    st = os.stat(p("a"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert st.st_nlink == 2
    assert os.stat(m.path).st_nlink == root_links + 1
    os.makedirs(p("a", "b", "c"))
    write_file(p("a", "file"), b"1")
    assert sorted(os.listdir(p("a"))) == ["b", "file"]
    assert os.stat(p("a")).st_nlink == 3  # ".", its name, and b's ".."
    with os.scandir(p("a")) as entries:
        kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                 for e in entries}
    assert kinds == {"b": (True, False), "file": (False, True)}

    expect_errno(errno.ENOTEMPTY, os.rmdir, p("a"))
    expect_errno(errno.ENOTEMPTY, os.rmdir, p("a", "b"))
    expect_errno(errno.ENOTDIR, os.rmdir, p("a", "file"))
    expect_errno(errno.ENOENT, os.rmdir, p("a", "missing"))
    expect_errno(errno.EINVAL, os.rmdir, p("a", "b", "c", "."))
    expect_errno(errno.EEXIST, os.mkdir, p("a", "b"))
    os.rmdir(p("a", "b", "c"))
    assert os.stat(p("a", "b")).st_nlink == 2
    os.rmdir(p("a", "b"))
    assert os.stat(p("a")).st_nlink == 2
    assert os.listdir(p("a")) == ["file"]
    os.unlink(p("a", "file"))
    os.rmdir(p("a"))
    expect_errno(errno.ENOENT, os.stat, p("a"))
    assert os.stat(m.path).st_nlink == root_links
    # A name that was a directory can become a file, and its old children are gone.
    os.makedirs(p("x", "y"))
    os.rmdir(p("x", "y"))
    os.rmdir(p("x"))
    write_file(p("x"), b"now a file")
    expect_errno(errno.ENOTDIR, os.stat, p("x", "y"))
    assert read_file(p("x")) == b"now a file"

    # umask is the kernel's: applied once, not twice.
    old = os.umask(0o027)
    try:
        os.mkdir(p("masked"), 0o777)
        os.close(os.open(p("masked-file"), os.O_CREAT | os.O_WRONLY, 0o666))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p("masked")).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(p("masked-file")).st_mode) == 0o640

    # Many entries: readdir returns each exactly once.
    os.mkdir(p("many"))
    names = [f"entry-{i:04d}" for i in range(300)]
    for n in names:
        os.close(os.open(p("many", n), os.O_CREAT | os.O_WRONLY))
    assert sorted(os.listdir(p("many"))) == names

    # statfs
    sv = os.statvfs(m.path)
    assert sv.f_blocks > 0 and sv.f_bavail > 0 and sv.f_bfree >= sv.f_bavail
    assert sv.f_bsize > 0 and sv.f_frsize > 0
    assert sv.f_namemax == 255
    assert sv.f_files > 0

    # Names that are not UTF-8 survive the round trip as bytes; UTF-8 ones as text.
    broot = os.fsencode(m.path)
    odd = b"\xff\xfe.bin"
    with open(os.path.join(broot, odd), "wb") as f:
        f.write(b"odd name")
    assert odd in os.listdir(broot)
    assert read_file(os.path.join(broot, odd)) == b"odd name"
    os.rename(os.path.join(broot, odd), os.path.join(broot, b"caf\xe9"))
    listing = os.listdir(broot)
    assert b"caf\xe9" in listing and odd not in listing
    os.mkdir(os.path.join(broot, b"dir-\x80"))
    write_file(os.path.join(broot, b"dir-\x80", b"\xc3\x28"), b"inside")
    assert os.listdir(os.path.join(broot, b"dir-\x80")) == [b"\xc3\x28"]
    os.symlink(b"\xff\xfe-target", os.path.join(broot, b"odd-link"))
    assert os.readlink(os.path.join(broot, b"odd-link")) == b"\xff\xfe-target"
    text = "héllo-日本語.txt"
    write_file(p(text), b"utf8")
    assert text in os.listdir(m.path) and read_file(p(text)) == b"utf8"
    wide = "é" * 127 + "x"  # 255 bytes in UTF-8
    write_file(p(wide), b"w")
    assert wide in os.listdir(m.path)
    expect_errno(errno.ENAMETOOLONG, os.open, p("é" * 128), os.O_CREAT | os.O_WRONLY)


_libc = ctypes.CDLL(None, use_errno=True)
SYS_GETDENTS64 = 217  # x86_64


def getdents(fd: int) -> list[tuple[int, bytes]]:
    """One getdents64 call on `fd` (a 4 KiB buffer): (d_off, name) of what it returned."""
    buf = ctypes.create_string_buffer(4096)
    n = _libc.syscall(SYS_GETDENTS64, fd, buf, len(buf))
    if n < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    out, at = [], 0
    while at < n:
        _ino, d_off, reclen = struct.unpack_from("<QqH", buf.raw, at)
        name = buf.raw[at + 19:at + reclen].split(b"\0", 1)[0]
        out.append((d_off, name))
        at += reclen
    return out


def test_directory_positions_telldir_seekdir_and_made_up_offsets(shared_mount):
    """A listing read in many requests, each entry's d_off a place to come back to
    (telldir/seekdir); a made-up offset reads on from an entry, never from bytes inside
    one (xfstests generic/676); a rewind lists the directory anew (POSIX rewinddir)."""
    here = shared_mount.path
    names = {b"entry-%04d-%s" % (i, b"x" * (i % 50)) for i in range(600)}
    for name in names:
        open(os.path.join(os.fsencode(here), name), "w").close()
    fd = os.open(here, os.O_RDONLY | os.O_DIRECTORY)
    try:
        listed, calls = [], 0
        while batch := getdents(fd):
            listed += batch
            calls += 1
        assert calls > 5  # many kernel requests, not one
        assert {name for _, name in listed} == names | {b".", b".."}
        assert len(listed) == len(names) + 2
        rng = random.Random(676)
        for i in rng.sample(range(len(listed) - 1), 40):  # back to where entry i ended
            os.lseek(fd, listed[i][0], os.SEEK_SET)
            assert getdents(fd)[0] == listed[i + 1]
        top = max(off for off, _ in listed)
        for position in rng.sample(range(top), 60):  # anything below the end
            os.lseek(fd, position, os.SEEK_SET)
            got = getdents(fd)
            assert got, f"EOF at made-up position {position} of {top}"
            assert {name for _, name in got} <= names | {b".", b".."}, position
        os.lseek(fd, top, os.SEEK_SET)
        assert getdents(fd) == []
        open(os.path.join(here, "late"), "w").close()
        os.lseek(fd, 0, os.SEEK_SET)  # rewinddir: the new entry is there
        again = []
        while batch := getdents(fd):
            again += batch
        assert b"late" in {name for _, name in again} and len(again) == len(listed) + 1
    finally:
        os.close(fd)


# -- links ----------------------------------------------------------------------------------

def test_symlinks_and_hard_links(shared_mount):
    here = shared_mount.path
    p = lambda *names: os.path.join(here, *names)  # noqa: E731

    # Symbolic links
    write_file(p("target"), b"through the link")
    os.symlink("target", p("rel"))
    os.symlink(p("target"), p("abs"))
    os.symlink("../" * 3 + "does/not/exist", p("dangling"))
    assert os.readlink(p("rel")) == "target"
    assert os.readlink(p("abs")) == p("target")
    assert os.readlink(p("dangling")) == "../../../does/not/exist"
    lst = os.lstat(p("rel"))
    assert stat.S_ISLNK(lst.st_mode) and lst.st_size == len("target")
    assert stat.S_ISREG(os.stat(p("rel")).st_mode)
    assert os.stat(p("rel")).st_ino == os.stat(p("target")).st_ino != lst.st_ino
    assert read_file(p("rel")) == b"through the link" == read_file(p("abs"))
    with open(p("rel"), "ab") as f:
        f.write(b"!")
    assert read_file(p("target")) == b"through the link!"
    expect_errno(errno.ENOENT, os.stat, p("dangling"))
    expect_errno(errno.EINVAL, os.readlink, p("target"))
    os.mkdir(p("dir"))
    os.symlink("dir", p("dirlink"))
    write_file(p("dirlink", "inner"), b"in")
    assert os.listdir(p("dir")) == ["inner"]
    assert os.path.islink(p("dirlink")) and not os.path.islink(p("dir"))
    long_target = "t" * 4000
    os.symlink(long_target, p("longlink"))
    assert os.readlink(p("longlink")) == long_target
    os.unlink(p("rel"))  # removes the link, not the target
    assert os.path.exists(p("target")) and not os.path.lexists(p("rel"))

    # Hard links: one inode, link counts right through every name at once.
    write_file(p("a"), b"v1")
    assert os.stat(p("a")).st_nlink == 1
    os.link(p("a"), p("b"))
    sa, sb = os.stat(p("a")), os.stat(p("b"))
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == sb.st_nlink == 2
    os.link(p("b"), p("dir", "c"))
    assert [os.stat(p(n)).st_nlink for n in ("a", "b", "dir/c")] == [3, 3, 3]
    os.unlink(p("a"))
    assert [os.stat(p(n)).st_nlink for n in ("b", "dir/c")] == [2, 2]
    expect_errno(errno.ENOENT, os.stat, p("a"))
    os.link(p("dir", "c"), p("a"))
    assert [os.stat(p(n)).st_nlink for n in ("a", "b", "dir/c")] == [3, 3, 3]
    os.unlink(p("dir", "c"))
    os.unlink(p("b"))
    assert os.stat(p("a")).st_nlink == 1 and read_file(p("a")) == b"v1"
    expect_errno(errno.EPERM, os.link, p("dir"), p("dirhard"))
    expect_errno(errno.ENOENT, os.link, p("missing"), p("x"))
    expect_errno(errno.EEXIST, os.link, p("a"), p("target"))

    # Data written through one name is seen through the other, size included.
    os.link(p("a"), p("b"))
    with open(p("b"), "r+b") as f:
        f.write(b"V2 longer")
    assert read_file(p("a")) == b"V2 longer" and os.stat(p("a")).st_size == 9
    with open(p("a"), "ab") as f:
        f.write(b"+tail")
    assert read_file(p("b")) == b"V2 longer+tail" and os.stat(p("b")).st_size == 14
    os.truncate(p("b"), 2)
    assert read_file(p("a")) == b"V2"

    # Pages the kernel cached for one name must not survive a change made through another
    # name once that other name is gone (libfuse gives each name its own kernel inode).
    write_file(p("k"), b"old data")
    assert read_file(p("k")) == b"old data"  # cached for "k"
    os.link(p("k"), p("k2"))
    with open(p("k2"), "r+b") as f:
        f.write(b"NEW DATA")  # same size: the size cannot give the change away
    os.unlink(p("k2"))
    assert os.stat(p("k")).st_nlink == 1
    assert read_file(p("k")) == b"NEW DATA"
    assert read_file(p("k")) == b"NEW DATA"  # and again, now that it may be cached
    # Same, with the other name unlinked while its descriptor was still open.
    assert read_file(p("k")) == b"NEW DATA"
    os.link(p("k"), p("k3"))
    fd = os.open(p("k3"), os.O_RDWR)
    os.pwrite(fd, b"3RD DATA", 0)
    os.unlink(p("k3"))
    os.close(fd)
    assert read_file(p("k")) == b"3RD DATA"
    # An unchanged single-name file reads the same however often it is opened.
    assert read_file(p("k")) == b"3RD DATA"

    # O_APPEND through two names: each append lands at the real end of the file, even
    # though the kernel's idea of the size for the other name is stale.
    write_file(p("log"), b"0123")
    os.link(p("log"), p("log2"))
    fa = os.open(p("log"), os.O_WRONLY | os.O_APPEND)
    fb = os.open(p("log2"), os.O_WRONLY | os.O_APPEND)
    try:
        with open(p("log2"), "ab") as f:
            f.write(b"BBBB")
        os.write(fa, b"aa")
        os.write(fb, b"bb")
        os.write(fa, pattern(300 * KiB, 5))  # several write requests
        os.write(fb, b"cc")
    finally:
        os.close(fa)
        os.close(fb)
    assert read_file(p("log")) == b"0123BBBBaabb" + pattern(300 * KiB, 5) + b"cc"


# -- rename ---------------------------------------------------------------------------------

def test_rename(shared_mount):
    here = shared_mount.path
    p = lambda *names: os.path.join(here, *names)  # noqa: E731

    # Simple rename keeps the inode.
    write_file(p("one"), b"1")
    ino = os.stat(p("one")).st_ino
    os.rename(p("one"), p("two"))
    assert os.stat(p("two")).st_ino == ino and read_file(p("two")) == b"1"
    expect_errno(errno.ENOENT, os.stat, p("one"))

    # Over an existing file: the name switches to the new inode in one step; a descriptor
    # open on the replaced file still reads the replaced data.
    write_file(p("victim"), b"old contents")
    old_fd = os.open(p("victim"), os.O_RDONLY)
    write_file(p("victim.tmp"), b"new contents, longer")
    new_ino = os.stat(p("victim.tmp")).st_ino
    os.replace(p("victim.tmp"), p("victim"))
    assert os.stat(p("victim")).st_ino == new_ino
    assert read_file(p("victim")) == b"new contents, longer"
    assert not os.path.exists(p("victim.tmp"))
    assert os.pread(old_fd, 100, 0) == b"old contents"
    os.close(old_fd)
    assert sorted(os.listdir(here)) == ["two", "victim"]

    # Over one name of a hard-linked file: the other name keeps the data, one link fewer.
    write_file(p("h1"), b"linked")
    os.link(p("h1"), p("h2"))
    write_file(p("src"), b"src")
    os.rename(p("src"), p("h1"))
    assert read_file(p("h1")) == b"src"
    assert read_file(p("h2")) == b"linked" and os.stat(p("h2")).st_nlink == 1
    # Renaming a name onto another name of the same inode does nothing (POSIX).
    os.link(p("h2"), p("h3"))
    os.rename(p("h2"), p("h3"))
    assert os.path.exists(p("h2")) and os.path.exists(p("h3"))
    assert os.stat(p("h3")).st_nlink == 2

    # Directories: across parents, over an empty directory; link counts follow.
    os.makedirs(p("d1", "sub"))
    write_file(p("d1", "sub", "f"), b"deep")
    os.mkdir(p("d2"))
    os.mkdir(p("empty"))
    root_links = os.stat(here).st_nlink
    os.rename(p("d1", "sub"), p("d2", "moved"))
    assert read_file(p("d2", "moved", "f")) == b"deep"
    expect_errno(errno.ENOENT, os.stat, p("d1", "sub", "f"))
    assert os.stat(p("d1")).st_nlink == 2 and os.stat(p("d2")).st_nlink == 3
    os.mkdir(p("d1", "sub"))  # the old path is a new, empty directory
    assert os.listdir(p("d1", "sub")) == []
    expect_errno(errno.ENOENT, os.stat, p("d1", "sub", "f"))
    os.rename(p("d2"), p("empty"))  # over an empty directory
    assert read_file(p("empty", "moved", "f")) == b"deep"
    expect_errno(errno.ENOENT, os.stat, p("d2"))
    assert os.stat(here).st_nlink == root_links - 1

    # Error cases; nothing changes when they fail.
    write_file(p("file"), b"f")
    expect_errno(errno.ENOTEMPTY, os.rename, p("d1"), p("empty"))  # empty/ has moved/
    assert os.listdir(p("empty")) == ["moved"] and os.listdir(p("d1")) == ["sub"]
    expect_errno(errno.EISDIR, os.rename, p("file"), p("d1"))
    expect_errno(errno.ENOTDIR, os.rename, p("d1"), p("file"))
    expect_errno(errno.EINVAL, os.rename, p("empty"), p("empty", "moved", "inside"))
    expect_errno(errno.EINVAL, os.rename, p("empty"), p("empty", "self"))
    expect_errno(errno.ENOENT, os.rename, p("missing"), p("x"))
    expect_errno(errno.ENOENT, os.rename, p("file"), p("nodir", "x"))
    expect_errno(errno.ENOTDIR, os.rename, p("file"), p("two", "x"))
    expect_errno(errno.ENAMETOOLONG, os.rename, p("file"), p("n" * 256))
    assert read_file(p("file")) == b"f" and read_file(p("empty", "moved", "f")) == b"deep"

    # A renamed file keeps the data it had, including data not yet uploaded.
    fd = os.open(p("dirty"), os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, pattern(300 * KiB))
    os.rename(p("dirty"), p("d1", "clean"))
    os.write(fd, b"after rename")
    os.close(fd)
    assert read_file(p("d1", "clean")) == pattern(300 * KiB) + b"after rename"


# -- unlink while open ----------------------------------------------------------------------

def test_unlinked_open_file_stays_usable_until_close(fusefs_mount):
    m = fusefs_mount(mkfs=SMALL_BLOCKS)
    p = lambda *names: os.path.join(m.path, *names)  # noqa: E731

    body = pattern(3 * BS + 10)
    fd = os.open(p("doomed"), os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, body)
    os.fsync(fd)  # part of it uploaded, then more dirty data
    os.pwrite(fd, b"dirty", 5)
    expected = bytearray(body)
    expected[5:10] = b"dirty"
    ino = os.stat(p("doomed")).st_ino
    reader = os.open(p("doomed"), os.O_RDONLY)

    os.unlink(p("doomed"))
    assert "doomed" not in os.listdir(m.path)
    expect_errno(errno.ENOENT, os.stat, p("doomed"))
    expect_errno(errno.ENOENT, os.open, p("doomed"), os.O_RDONLY)

    # Still readable and writable through both descriptors.
    assert os.pread(fd, len(expected) + 100, 0) == bytes(expected)
    os.pwrite(fd, b"more", len(expected))
    expected += b"more"
    assert os.pread(reader, len(expected) + 100, 0) == bytes(expected)
    assert os.lseek(reader, 0, os.SEEK_END) == len(expected)
    os.ftruncate(fd, BS + 1)
    del expected[BS + 1:]
    assert os.pread(reader, 4 * BS, 0) == bytes(expected)
    os.fsync(fd)

    # The name is free for a new, unrelated file.
    write_file(p("doomed"), b"a new file")
    assert os.stat(p("doomed")).st_ino != ino
    assert os.pread(fd, 4 * BS, 0) == bytes(expected)
    assert read_file(p("doomed")) == b"a new file"

    # After the last close the inode is gone from the metadata (its blocks become garbage).
    assert inode_row_exists(m, ino)
    os.close(fd)
    assert inode_row_exists(m, ino)  # one descriptor is still open
    assert os.pread(reader, 10, 0) == bytes(expected[:10])
    os.close(reader)
    wait_until(lambda: not inode_row_exists(m, ino), "inode removed after the last close")
    assert read_file(p("doomed")) == b"a new file"
    assert os.listdir(m.path) == ["doomed"]


def test_fstat_of_unlinked_open_file(shared_mount):
    here = shared_mount.path
    path = os.path.join(here, "tmp")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"12345")
        os.unlink(path)
        st = os.fstat(fd)
        assert st.st_size == 5 and st.st_nlink == 0
    finally:
        os.close(fd)


# -- attributes and extended attributes ----------------------------------------------------

def check_xattrs(root: str) -> None:
    """user.* attributes (in directory `root`) with their flags and errnos; no POSIX ACLs."""
    p = lambda *names: os.path.join(root, "x", *names)  # noqa: E731
    os.mkdir(p())
    write_file(p("f"), b"x")
    os.mkdir(p("d"))
    os.symlink("f", p("l"))

    assert os.listxattr(p("f")) == []
    os.setxattr(p("f"), "user.plain", b"value")
    os.setxattr(p("f"), "user.binary", bytes(range(256)) + b"\0\0")
    os.setxattr(p("f"), "user.empty", b"")
    os.setxattr(p("f"), "user.big", pattern(16 * KiB))
    assert os.getxattr(p("f"), "user.plain") == b"value"
    assert os.getxattr(p("f"), "user.binary") == bytes(range(256)) + b"\0\0"
    assert os.getxattr(p("f"), "user.empty") == b""
    assert os.getxattr(p("f"), "user.big") == pattern(16 * KiB)
    assert sorted(os.listxattr(p("f"))) == ["user.big", "user.binary", "user.empty",
                                           "user.plain"]
    os.setxattr(p("f"), "user.ünïcode", b"u")  # names are bytes: UTF-8 ones round-trip
    assert os.getxattr(p("f"), "user.ünïcode") == b"u"
    assert "user.ünïcode" in os.listxattr(p("f"))
    os.removexattr(p("f"), "user.ünïcode")
    # Through a symlink the target's attributes are seen.
    assert os.getxattr(p("l"), "user.plain") == b"value"

    # Flags
    expect_errno(errno.EEXIST, os.setxattr, p("f"), "user.plain", b"v2", os.XATTR_CREATE)
    assert os.getxattr(p("f"), "user.plain") == b"value"
    expect_errno(errno.ENODATA, os.setxattr, p("f"), "user.absent", b"v", os.XATTR_REPLACE)
    expect_errno(errno.ENODATA, os.getxattr, p("f"), "user.absent")
    os.setxattr(p("f"), "user.plain", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(p("f"), "user.plain") == b"replaced"
    os.setxattr(p("f"), "user.created", b"c", os.XATTR_CREATE)
    assert os.getxattr(p("f"), "user.created") == b"c"

    # Remove
    os.removexattr(p("f"), "user.plain")
    expect_errno(errno.ENODATA, os.getxattr, p("f"), "user.plain")
    expect_errno(errno.ENODATA, os.removexattr, p("f"), "user.plain")
    assert "user.plain" not in os.listxattr(p("f"))

    # On directories; not on other files; user.* is not allowed on symlinks (kernel rule).
    os.setxattr(p("d"), "user.dir", b"d")
    assert os.getxattr(p("d"), "user.dir") == b"d" and os.listxattr(p("d")) == ["user.dir"]
    assert "user.dir" not in os.listxattr(p("f"))
    expect_errno(errno.EPERM, os.setxattr, p("l"), "user.x", b"1", follow_symlinks=False)
    expect_errno(errno.ENOENT, os.getxattr, p("missing"), "user.x")

    # POSIX ACLs are not supported: refused, so tools fall back to plain modes.
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm,
                                          ident in [(0x01, 6, 0xFFFFFFFF), (0x02, 4, 1000),
                                                    (0x04, 4, 0xFFFFFFFF),
                                                    (0x10, 6, 0xFFFFFFFF),
                                                    (0x20, 4, 0xFFFFFFFF)])
    expect_errno(errno.EOPNOTSUPP, os.setxattr, p("f"), "system.posix_acl_access", acl)
    assert errno_of(os.getxattr, p("f"), "system.posix_acl_access") in (errno.ENODATA,
                                                                         errno.EOPNOTSUPP)

    # Attributes belong to the inode: all hard links share them (persistence across a
    # remount: test_mmap_fsync_and_persistence_across_remount).
    os.link(p("f"), p("f2"))
    assert os.getxattr(p("f2"), "user.binary") == bytes(range(256)) + b"\0\0"
    assert sorted(os.listxattr(p("f2"))) == ["user.big", "user.binary", "user.created",
                                            "user.empty"]
    # An unlinked file's attributes go with it; a new file of that name has none.
    os.unlink(p("f"))
    os.unlink(p("f2"))
    write_file(p("f"), b"new")
    assert os.listxattr(p("f")) == []


def test_chmod_chown_utime_touch_and_xattrs(shared_mount):
    here = shared_mount.path
    p = lambda *names: os.path.join(here, *names)  # noqa: E731
    write_file(p("f"), b"attrs")
    os.mkdir(p("d"))

    before = os.stat(p("f"))
    time.sleep(0.002)  # ctime must move; the clock has finer steps than this
    os.chmod(p("f"), 0o640)
    st = os.stat(p("f"))
    assert stat.S_IMODE(st.st_mode) == 0o640 and stat.S_ISREG(st.st_mode)
    assert st.st_ctime_ns > before.st_ctime_ns
    assert st.st_mtime_ns == before.st_mtime_ns  # chmod does not touch mtime
    os.chmod(p("f"), 0o4755)
    assert stat.S_IMODE(os.stat(p("f")).st_mode) == 0o4755
    os.chmod(p("d"), 0o1777)
    st = os.stat(p("d"))
    assert stat.S_IMODE(st.st_mode) == 0o1777 and stat.S_ISDIR(st.st_mode)

    os.chown(p("f"), 1234, 5678)
    st = os.stat(p("f"))
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert stat.S_IMODE(st.st_mode) == 0o755  # chown of a file clears set-user-ID (Linux)
    os.chown(p("f"), -1, 42)  # -1 leaves the owner alone
    st = os.stat(p("f"))
    assert (st.st_uid, st.st_gid) == (1234, 42)
    os.chown(p("f"), 7, -1)
    assert (os.stat(p("f")).st_uid, os.stat(p("f")).st_gid) == (7, 42)
    os.symlink("f", p("l"))
    os.chown(p("l"), 99, 98, follow_symlinks=False)
    assert (os.lstat(p("l")).st_uid, os.lstat(p("l")).st_gid) == (99, 98)
    assert os.stat(p("f")).st_uid == 7

    # Nanosecond times, exactly; also far past and future.
    os.utime(p("f"), ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(p("f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    os.utime(p("f"), ns=(4_102_444_800_999_999_999, 1))
    st = os.stat(p("f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (4_102_444_800_999_999_999, 1)
    os.utime(p("d"), ns=(5, 6))
    assert (os.stat(p("d")).st_atime_ns, os.stat(p("d")).st_mtime_ns) == (5, 6)

    # touch -m / -a change one time and leave the other (UTIME_OMIT).
    os.utime(p("f"), ns=(1_111_111_111_111_111_111, 1_222_222_222_222_222_222))
    subprocess.run(["touch", "-m", "-d", "@1500000000.123456789", p("f")], check=True)
    st = os.stat(p("f"))
    assert st.st_mtime_ns == 1_500_000_000_123_456_789
    assert st.st_atime_ns == 1_111_111_111_111_111_111
    subprocess.run(["touch", "-a", "-d", "@1600000000.5", p("f")], check=True)
    st = os.stat(p("f"))
    assert st.st_atime_ns == 1_600_000_000_500_000_000
    assert st.st_mtime_ns == 1_500_000_000_123_456_789
    # touch -m without a date: mtime becomes "now" (UTIME_NOW), atime stays.
    t0 = time.time_ns()
    subprocess.run(["touch", "-m", p("f")], check=True)
    t1 = time.time_ns()
    st = os.stat(p("f"))
    assert t0 <= st.st_mtime_ns <= t1
    assert st.st_atime_ns == 1_600_000_000_500_000_000
    # Plain utime(): both become now.
    t0 = time.time_ns()
    os.utime(p("f"))
    t1 = time.time_ns()
    st = os.stat(p("f"))
    assert t0 <= st.st_atime_ns <= t1 and t0 <= st.st_mtime_ns <= t1

    # Writing moves mtime and ctime; the size follows.
    os.utime(p("f"), ns=(10, 20))
    with open(p("f"), "ab") as f:
        f.write(b"+")
    st = os.stat(p("f"))
    assert st.st_mtime_ns > 20 and st.st_size == len(b"attrs+")
    # utime while the file is open with unsaved data must stick (and survive the flush).
    fd = os.open(p("f"), os.O_WRONLY)
    os.write(fd, b"A")
    os.utime(p("f"), ns=(30, 40))
    os.fsync(fd)
    os.close(fd)
    st = os.stat(p("f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (30, 40)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (7, 42, 0o755)
    assert read_file(p("f")) == b"Attrs+"

    check_xattrs(here)


def test_ctime_moves_on_link_and_xattr_while_open(shared_mount):
    here = shared_mount.path
    path = os.path.join(here, "f")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"x" * 100)
        c0 = os.stat(path).st_ctime_ns
        time.sleep(0.002)
        os.link(path, path + ".2")
        c1 = os.stat(path).st_ctime_ns
        assert c1 > c0, "link(2) must change the inode's ctime"
        time.sleep(0.002)
        os.setxattr(path, "user.k", b"v")
        assert os.stat(path).st_ctime_ns > c1, "setxattr(2) must change ctime"
    finally:
        os.close(fd)


# -- sizes and holes ------------------------------------------------------------------------

def test_truncate_extend_holes_and_large_sparse_files(fusefs_mount):
    m = fusefs_mount(mkfs=SMALL_BLOCKS)
    p = lambda *names: os.path.join(m.path, *names)  # noqa: E731

    for uploaded in (False, True):  # blocks still dirty in memory, and blocks on servers
        name = p(f"t-{uploaded}")
        body = pattern(3 * BS + 500, seed=uploaded)
        fd = os.open(name, os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, body)
        if uploaded:
            os.fsync(fd)
        os.ftruncate(fd, BS + 100)  # into the middle of block 1
        assert os.stat(name).st_size == BS + 100
        os.ftruncate(fd, 2 * BS + 7)  # grow again: the cut bytes must not come back
        want = body[:BS + 100] + bytes(BS - 93)
        assert os.pread(fd, 4 * BS, 0) == want
        os.truncate(name, 10)  # by path, into block 0
        os.truncate(name, 5 * BS)
        want = body[:10] + bytes(5 * BS - 10)
        assert os.stat(name).st_size == 5 * BS
        assert os.pread(fd, 6 * BS, 0) == want
        assert read_file(name) == want
        os.pwrite(fd, b"mid", 3 * BS - 1)  # write across a boundary inside the hole
        want = want[:3 * BS - 1] + b"mid" + want[3 * BS + 2:]
        assert read_file(name) == want
        if uploaded:
            os.fsync(fd)
        os.truncate(name, 0)
        assert read_file(name) == b"" and os.stat(name).st_size == 0
        os.pwrite(fd, b"z", BS)
        assert read_file(name) == bytes(BS) + b"z"
        os.close(fd)
        expect_errno(errno.EINVAL, os.truncate, name, -1)
    expect_errno(errno.EISDIR, os.truncate, m.path, 0)

    # A sparse file: seek far, write; everything before reads as zeros.
    fd = os.open(p("sparse"), os.O_CREAT | os.O_RDWR, 0o644)
    os.lseek(fd, 10 * MiB + 3, os.SEEK_SET)
    os.write(fd, b"far")
    assert os.stat(p("sparse")).st_size == 10 * MiB + 6
    assert os.pread(fd, 4096, 5 * MiB) == bytes(4096)
    assert os.pread(fd, 10, 10 * MiB) == bytes(3) + b"far"
    os.close(fd)
    with open(p("sparse"), "rb") as f:
        whole = f.read()
    assert len(whole) == 10 * MiB + 6 and whole[-3:] == b"far"
    assert whole.count(0) == len(whole) - 3

    # Beyond 4 GiB: offsets must not wrap at 32 bits.
    big = p("big")
    fd = os.open(big, os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, b"beyond", 5 * GiB)
    os.pwrite(fd, b"edge", 4 * GiB - 2)  # straddles 2**32
    assert os.stat(big).st_size == 5 * GiB + 6
    assert os.lseek(fd, 0, os.SEEK_END) == 5 * GiB + 6
    assert os.pread(fd, 6, 5 * GiB) == b"beyond"
    assert os.pread(fd, 8, 4 * GiB - 4) == b"\0\0edge\0\0"
    assert os.pread(fd, 64, 0) == bytes(64)  # nothing landed at offset mod 2**32
    assert os.pread(fd, 4096, 4 * GiB + 4096) == bytes(4096)
    os.fsync(fd)
    os.ftruncate(fd, 6 * GiB)
    assert os.stat(big).st_size == 6 * GiB
    assert os.pread(fd, 16, 6 * GiB - 16) == bytes(16)
    os.ftruncate(fd, 5 * GiB + 2)
    assert os.pread(fd, 100, 5 * GiB) == b"be"
    os.close(fd)
    with open(big, "rb") as f:
        f.seek(4 * GiB - 2)
        assert f.read(4) == b"edge"
        f.seek(5 * GiB)
        assert f.read() == b"be"


# -- mmap, fsync and durability -------------------------------------------------------------

def test_mmap_fsync_and_persistence_across_remount(fusefs_mount):
    m = fusefs_mount(mkfs=SMALL_BLOCKS)
    p = lambda *names: os.path.join(m.path, *names)  # noqa: E731

    # Shared writable mapping, across block boundaries.
    size = 3 * BS + 1000
    original = pattern(size, 3)
    write_file(p("mapped"), original)
    expected = bytearray(original)
    fd = os.open(p("mapped"), os.O_RDWR)
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
        assert mm[:100] == original[:100]
        for offset, patch in ((0, b"START"), (BS - 3, b"ACROSS"), (2 * BS + 77, b"MIDDLE"),
                              (size - 4, b"END!")):
            mm[offset:offset + len(patch)] = patch
            expected[offset:offset + len(patch)] = patch
        mm.flush()
    os.close(fd)
    assert os.stat(p("mapped")).st_size == size
    assert read_file(p("mapped")) == bytes(expected)
    # Write-back of a mapping made through an O_APPEND descriptor keeps its offsets; only
    # write(2) appends.
    write_file(p("mapped-append"), bytes(3 * BS))
    fd = os.open(p("mapped-append"), os.O_RDWR | os.O_APPEND)
    with mmap.mmap(fd, 3 * BS, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
        mm[BS + 5:BS + 9] = b"MMAP"
        mm.flush()
    os.write(fd, b"tail")
    os.close(fd)
    want = bytearray(3 * BS)
    want[BS + 5:BS + 9] = b"MMAP"
    assert read_file(p("mapped-append")) == bytes(want) + b"tail"

    # fsync and fdatasync succeed (return 0).
    synced = pattern(5 * BS + 3, 11)
    fd = os.open(p("synced"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, synced)
    assert os.fsync(fd) is None
    os.close(fd)
    datasynced = pattern(2 * BS, 12)
    with open(p("datasynced"), "wb") as f:
        f.write(datasynced)
        f.flush()
        assert os.fdatasync(f.fileno()) is None
    fd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)  # fsync of a directory is allowed (editors and databases do it)
    os.close(fd)

    # Other state a remount must bring back.
    write_file(p("attrs"), b"a")
    os.chmod(p("attrs"), 0o600)
    os.chown(p("attrs"), 321, 654)
    os.utime(p("attrs"), ns=(111_222_333_444, 555_666_777_888))
    os.setxattr(p("attrs"), "user.big", pattern(16 * KiB, 15))
    os.setxattr(p("attrs"), "user.empty", b"")
    os.mkdir(p("xdir"))
    os.setxattr(p("xdir"), "user.dir", b"d")
    fd = os.open(p("timed"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"dirty")
    os.utime(p("timed"), ns=(30, 40))  # while the data is not uploaded yet
    os.close(fd)
    os.symlink("synced", p("link"))
    os.link(p("synced"), p("hard"))
    os.makedirs(p("a", "b"))
    write_file(p("a", "b", "deep"), b"deep")
    write_file(os.path.join(os.fsencode(m.path), b"\xff\xfe.bin"), b"odd")
    fd = os.open(p("big"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.pwrite(fd, b"edge", 4 * GiB - 2)
    os.pwrite(fd, b"beyond", 5 * GiB)
    os.close(fd)
    unsynced = pattern(BS + 5, 13)
    write_file(p("unsynced"), unsynced)  # close() only: unmount must upload it

    m.umount()
    assert not m.mounted
    m.mount()
    assert read_file(p("mapped")) == bytes(expected)
    assert read_file(p("synced")) == synced
    assert read_file(p("datasynced")) == datasynced
    assert read_file(p("unsynced")) == unsynced
    st = os.stat(p("attrs"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 321, 654)
    assert (st.st_atime_ns, st.st_mtime_ns) == (111_222_333_444, 555_666_777_888)
    assert sorted(os.listxattr(p("attrs"))) == ["user.big", "user.empty"]
    assert os.getxattr(p("attrs"), "user.big") == pattern(16 * KiB, 15)
    assert os.getxattr(p("attrs"), "user.empty") == b""
    assert os.getxattr(p("xdir"), "user.dir") == b"d"
    st = os.stat(p("timed"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (30, 40)
    assert read_file(p("timed")) == b"dirty"
    assert os.readlink(p("link")) == "synced"
    assert os.stat(p("hard")).st_ino == os.stat(p("synced")).st_ino
    assert os.stat(p("hard")).st_nlink == 2
    assert read_file(p("a", "b", "deep")) == b"deep"
    assert read_file(os.path.join(os.fsencode(m.path), b"\xff\xfe.bin")) == b"odd"
    assert os.stat(p("big")).st_size == 5 * GiB + 6
    with open(p("big"), "rb") as f:
        f.seek(4 * GiB - 4)
        assert f.read(8) == b"\0\0edge\0\0"
        f.seek(5 * GiB)
        assert f.read() == b"beyond"

    # mmap of the remounted file sees the same bytes; a second mapping write persists too.
    fd = os.open(p("mapped"), os.O_RDWR)
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
        assert mm[:] == bytes(expected)
        mm[BS:BS + 4] = b"TWO!"
        expected[BS:BS + 4] = b"TWO!"
        mm.flush()
    os.fsync(fd)
    os.close(fd)

    # fsync is durable even if the client dies right after it (kill -9, no unmount); a
    # file unlinked while open when the client died is removed at the next mount.
    after = pattern(3 * BS + 1, 14)
    fd = os.open(p("after-crash"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, after)
    os.fsync(fd)
    os.close(fd)
    orphan_fd = os.open(p("orphan"), os.O_CREAT | os.O_RDWR, 0o644)
    os.write(orphan_fd, b"x" * 1000)
    os.fsync(orphan_fd)
    orphan = os.stat(p("orphan")).st_ino
    os.unlink(p("orphan"))
    dir_fd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dir_fd)  # the unlink is durable (an unsynced one may be lost, as P2 allows)
    os.close(dir_fd)
    try:
        m.force_unmount()  # SIGKILL the daemon, lazy unmount
        wait_until(lambda: not m.mounted, "the killed mount to go away")
    finally:
        try:
            os.close(orphan_fd)
        except OSError:
            pass  # the connection it belonged to is gone
    assert inode_row_exists(m, orphan)  # it really was open when the client died
    m.mount()
    assert read_file(p("after-crash")) == after
    assert read_file(p("mapped")) == bytes(expected)
    assert read_file(p("synced")) == synced
    assert "orphan" not in os.listdir(m.path)
    assert not inode_row_exists(m, orphan)


# -- permissions ----------------------------------------------------------------------------

def test_permissions_with_default_permissions(fusefs_mount):
    m = fusefs_mount()
    p = lambda *names: os.path.join(m.path, *names)  # noqa: E731
    write_file(p("secret"), b"root only", 0o600)
    write_file(p("public"), b"everyone", 0o644)
    write_file(p("group"), b"group", 0o640)
    os.chown(p("group"), 0, NOBODY)
    write_file(p("shared-rw"), b"", 0o666)
    write_file(p("none"), b"mode 000", 0o000)
    os.mkdir(p("private"), 0o700)
    write_file(p("private", "inside"), b"hidden", 0o644)
    os.mkdir(p("open"))
    os.chmod(p("open"), 0o777)
    os.mkdir(p("sticky"))
    os.chmod(p("sticky"), 0o1777)
    write_file(p("sticky", "roots"), b"r", 0o666)
    st = os.stat(p("secret"))
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    root = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)

    def read(name):
        fd = os.open(name, os.O_RDONLY, dir_fd=root)
        try:
            return os.read(fd, 100)
        finally:
            os.close(fd)

    def write(name, flags=os.O_WRONLY, data=b"w"):
        fd = os.open(name, flags, 0o644, dir_fd=root)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)

    try:
        assert as_user(lambda: read("secret")) == ("errno", errno.EACCES)
        assert as_user(lambda: read("public")) == ("ok", b"everyone")
        assert as_user(lambda: write("public")) == ("errno", errno.EACCES)
        assert as_user(lambda: read("group")) == ("ok", b"group")  # via the group bits
        assert as_user(lambda: read("group"), gid=1) == ("errno", errno.EACCES)
        assert as_user(lambda: write("shared-rw", data=b"by nobody")) == ("ok", 9)
        assert as_user(lambda: read("private/inside")) == ("errno", errno.EACCES)
        assert as_user(lambda: os.open("private", os.O_RDONLY | os.O_DIRECTORY,
                                       dir_fd=root)) == ("errno", errno.EACCES)
        assert as_user(lambda: write("newfile", os.O_WRONLY | os.O_CREAT)) == \
            ("errno", errno.EACCES)  # the root directory is 0755, owned by root
        assert as_user(lambda: os.unlink("public", dir_fd=root)) == ("errno", errno.EACCES)
        assert as_user(lambda: os.chmod("public", 0o777, dir_fd=root)) == \
            ("errno", errno.EPERM)
        assert as_user(lambda: os.chown("public", NOBODY, NOBODY, dir_fd=root)) == \
            ("errno", errno.EPERM)
        assert as_user(lambda: os.utime("public", ns=(1, 2), dir_fd=root)) == \
            ("errno", errno.EPERM)
        assert as_user(lambda: os.utime("public", dir_fd=root)) == ("errno", errno.EACCES)
        # "Now" needs only write permission; explicit times need ownership.
        os.utime(p("shared-rw"), ns=(1, 2))
        assert as_user(lambda: os.utime("shared-rw", dir_fd=root)) == ("ok", None)
        assert os.stat(p("shared-rw")).st_mtime_ns > 2
        assert as_user(lambda: os.utime("shared-rw", ns=(5, 6), dir_fd=root)) == \
            ("errno", errno.EPERM)
        # Files created by a user belong to that user (uid and gid of the caller).
        assert as_user(lambda: write("open/mine", os.O_WRONLY | os.O_CREAT, b"m")) == \
            ("ok", 1)
        st = os.stat(p("open", "mine"))
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
        assert as_user(lambda: os.chmod("open/mine", 0o600, dir_fd=root)) == ("ok", None)
        assert stat.S_IMODE(os.stat(p("open", "mine")).st_mode) == 0o600
        assert as_user(lambda: os.mkdir("open/subdir", 0o755, dir_fd=root)) == ("ok", None)
        assert os.stat(p("open", "subdir")).st_uid == NOBODY
        # Sticky directory: others may not remove root's file.
        assert as_user(lambda: os.unlink("sticky/roots", dir_fd=root)) == \
            ("errno", errno.EPERM)
        assert os.path.exists(p("sticky", "roots"))
    finally:
        os.close(root)
    # Root passes the permission bits.
    assert read_file(p("none")) == b"mode 000"
    assert read_file(p("shared-rw")) == b"by nobody"
    assert read_file(p("open", "mine")) == b"m"


def test_a_tree_deeper_than_path_max_works_with_a_cold_path_cache(fusefs_mount):
    """libfuse 2 hands every call the whole path, which can be far longer than PATH_MAX
    (stress-ng's dirdeep stressor reached 1,600 levels). Resolving it walked up one
    recursive call per level, so past about 1,000 uncached levels every call answered
    EIO (RecursionError), and the tree could not even be removed. With the path cache
    cold (after a remount), every level must resolve; rmdir must not make the next one
    resolve from the root either."""
    depth = 1500
    m = fusefs_mount()
    top = os.path.join(m.path, "deep")
    os.mkdir(top)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):  # relative calls: the path never passes through one syscall
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"at the bottom")
    finally:
        os.close(fd)
    m.umount()
    m.mount()  # nothing cached: every level is looked up

    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        with open(os.open("leaf", os.O_RDONLY, dir_fd=fd), "rb") as f:
            assert f.read() == b"at the bottom"
        os.rename("leaf", "moved", src_dir_fd=fd, dst_dir_fd=fd)
        assert os.listdir(fd) == ["moved"]
    finally:
        os.close(fd)
    found = subprocess.run(["find", top, "-name", "moved"], capture_output=True, check=True)
    assert found.stdout.count(b"\n") == 1
    subprocess.run(["rm", "-rf", top], check=True)
    assert not os.path.exists(top)
