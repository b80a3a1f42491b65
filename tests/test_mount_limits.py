"""What libfuse 2's high-level API cannot do, each shown by a strict xfail: if a future
libfuse or kernel makes one work, its test fails and the limit leaves docs/filesystem.md.

The first two calls need FUSE requests that libfuse 2 does not implement (RENAME2 with
flags, TMPFILE): libfuse answers ENOSYS, the kernel turns that into EINVAL or EOPNOTSUPP,
and fusefs's callbacks are never called, so nothing in fusefs can answer them. The third,
a file handle kept across a remount, needs node ids that outlive the daemon; libfuse 2's
are counters of its own, made anew at each mount.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
MAX_HANDLE_SZ = 128


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), what)
    return result


def renameat2(old: str, new: str, flags: int) -> None:
    AT_FDCWD = -100
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), old)


@pytest.mark.parametrize("flag", [RENAME_NOREPLACE, RENAME_EXCHANGE],
                         ids=["RENAME_NOREPLACE", "RENAME_EXCHANGE"])
@pytest.mark.xfail(strict=True, raises=OSError, reason=(
    "libfuse 2 does not implement RENAME2: renameat2 with RENAME_NOREPLACE or "
    "RENAME_EXCHANGE fails with EINVAL before fusefs is called"))
def test_renameat2_with_flags(fusefs_mount, flag):
    m = fusefs_mount()
    a, b = os.path.join(m.path, "a"), os.path.join(m.path, "b")
    for path, text in ((a, b"A"), (b, b"B")):
        with open(path, "wb") as f:
            f.write(text)
    if flag == RENAME_NOREPLACE:
        os.unlink(b)
    renameat2(a, b, flag)
    with open(b, "rb") as f:
        assert f.read() == b"A"


@pytest.mark.xfail(strict=True, raises=OSError, reason=(
    "libfuse 2 does not implement TMPFILE: open(O_TMPFILE) on the mount fails with "
    "EOPNOTSUPP before fusefs is called"))
def test_o_tmpfile(fusefs_mount):
    m = fusefs_mount()
    fd = os.open(m.path, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"anonymous")
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


def test_unsupported_calls_fail_with_a_clear_errno(fusefs_mount):
    """What those limits look like to a program: an errno it can fall back on (tools such
    as mv and git do), never a hang or an EIO."""
    m = fusefs_mount()
    a = os.path.join(m.path, "a")
    open(a, "wb").close()
    with pytest.raises(OSError) as raised:
        renameat2(a, os.path.join(m.path, "b"), RENAME_NOREPLACE)
    assert raised.value.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
    with pytest.raises(OSError) as raised:
        os.close(os.open(m.path, os.O_TMPFILE | os.O_RDWR, 0o600))
    assert raised.value.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)


@pytest.mark.xfail(strict=True, raises=OSError, reason=(
    "libfuse 2 limit: a file handle names libfuse's node id, a counter made anew at each "
    "mount, and the kernel's lookup of a node it forgot ends in libfuse with ESTALE "
    "(xfstests generic/426, 467, 477: open_by_handle_at, as an NFS export uses it)"))
def test_a_file_handle_opens_the_file_after_a_remount(fusefs_mount):
    m = fusefs_mount()
    path = os.path.join(m.path, "f")
    with open(path, "wb") as f:
        f.write(b"by handle")
    handle, mount_id = FileHandle(handle_bytes=MAX_HANDLE_SZ), ctypes.c_int()
    AT_FDCWD = -100
    # Making the handle works (an OSError here would pass for the limit: not allowed)
    assert _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), ctypes.byref(handle),
                                   ctypes.byref(mount_id), 0) == 0, ctypes.get_errno()
    m.umount()
    m.mount()
    root = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _check(_libc.open_by_handle_at(root, ctypes.byref(handle), os.O_RDONLY),
                    "open_by_handle_at")  # ESTALE today
    finally:
        os.close(root)
    try:
        assert os.read(fd, 100) == b"by handle"
    finally:
        os.close(fd)
