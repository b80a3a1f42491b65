"""`df` and `du` tell the truth, through a real mount: statfs follows what is stored,
st_blocks counts stored bytes (sparse files stay sparse), fallocate punches holes, and
readdir gives each entry's real inode number.

One mount serves the module (`shared_mount`: each test works in a directory of its own);
only the free-space test, which needs a filesystem nobody else writes to, mounts its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import subprocess

from .support import wait_until

KiB, MiB = 1 << 10, 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_COLLAPSE_RANGE = 0x01, 0x02, 0x08

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_df_free_space_drops_when_64_mib_are_written(fusefs_mount):
    m = fusefs_mount()
    st = os.statvfs(m.path)
    assert st.f_blocks > 0 and st.f_bavail <= st.f_blocks
    before = free_bytes(m.path)
    data = os.urandom(MiB)
    with open(os.path.join(m.path, "big"), "wb") as f:
        for _ in range(64):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    dropped = before - free_bytes(m.path)
    # The servers here share one disk with everything else on it: generous slack (see
    # docs/filesystem.md, "Space"), but the drop must be there, right after the fsync.
    assert 48 * MiB <= dropped <= 200 * MiB, dropped


def test_df_counts_a_disk_shared_by_the_servers_once(shared_mount):
    """All three servers of the test share one disk: the filesystem can hold a third of
    it (each block is stored three times), not all of it."""
    m, here = shared_mount
    disk = os.statvfs(m.servers[0].data_dir)
    st = os.statvfs(here)
    total = st.f_blocks * st.f_frsize
    assert abs(total - disk.f_blocks * disk.f_frsize // 3) <= 0.02 * total, \
        (total, disk.f_blocks * disk.f_frsize)


def test_du_of_a_sparse_file_is_small_and_cp_sparse_keeps_it_sparse(shared_mount):
    m, here = shared_mount
    path = os.path.join(here, "sparse")
    with open(path, "wb") as f:
        f.write(b"a" * 4096)
        f.seek(100 * MiB)
        f.write(b"z" * 4096)
        os.fsync(f.fileno())
    st = os.stat(path)
    assert st.st_size == 100 * MiB + 4096
    assert st.st_blocks * 512 <= 64 * KiB, st.st_blocks
    du = subprocess.run(["du", "-k", path], capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) <= 64, du.stdout
    copy = os.path.join(here, "copy")
    subprocess.run(["cp", "--sparse=always", path, copy], check=True)
    assert os.stat(copy).st_size == st.st_size
    assert os.stat(copy).st_blocks * 512 <= 2 * MiB, os.stat(copy).st_blocks
    with open(copy, "rb") as f:
        assert f.read(4096) == b"a" * 4096
        f.seek(100 * MiB)
        assert f.read() == b"z" * 4096


def test_st_blocks_counts_the_bytes_written_not_the_size(shared_mount):
    m, here = shared_mount
    path = os.path.join(here, "f")
    with open(path, "wb") as f:
        f.write(b"x" * 3 * MiB)
        assert os.fstat(f.fileno()).st_blocks * 512 >= 3 * MiB  # dirty bytes count too
        os.fsync(f.fileno())
    os.truncate(path, 10 * MiB)  # growing makes a hole: nothing more is stored
    assert 3 * MiB <= os.stat(path).st_blocks * 512 < 4 * MiB


def fsynced_pattern(here: str, name: str, size: int) -> tuple[str, bytes]:
    """here/name holding `size` bytes of a repeating pattern, fsynced: (path, bytes)."""
    path = os.path.join(here, name)
    data = bytes(range(256)) * (size // 256)
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    return path, data


def test_punch_hole_frees_whole_blocks_and_zeroes_the_edges(shared_mount):
    m, here = shared_mount
    path, data = fsynced_pattern(here, "img", 8 * MiB)
    before = os.stat(path).st_blocks
    # 1 MiB blocks: [1.5 MiB, 6.5 MiB) drops blocks 2..5 and zeroes half of 1 and of 6.
    subprocess.run(["fallocate", "-p", "-o", str(3 * MiB // 2), "-l", str(5 * MiB), path],
                   check=True)
    st = os.stat(path)
    assert st.st_size == 8 * MiB
    assert (before - st.st_blocks) * 512 >= 4 * MiB, (before, st.st_blocks)
    expected = data[:3 * MiB // 2] + bytes(5 * MiB) + data[13 * MiB // 2:]
    with open(path, "rb") as f:
        assert f.read() == expected
    # The punch is recorded: the same after an unmount and a mount.
    m.umount()
    m.mount()
    with open(path, "rb") as f:
        assert f.read() == expected
    assert os.stat(path).st_blocks == st.st_blocks


def test_punch_hole_of_unsynced_data_and_at_the_end(shared_mount):
    m, here = shared_mount
    path = os.path.join(here, "db")
    with open(path, "w+b") as f:
        f.write(b"q" * (3 * MiB + 100))  # dirty, not uploaded yet
        fallocate(f.fileno(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, 10 * MiB)
        assert os.fstat(f.fileno()).st_size == 3 * MiB + 100
        assert os.fstat(f.fileno()).st_blocks * 512 <= MiB + 4096
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read() == b"q" * MiB + bytes(2 * MiB + 100)
    m.umount()
    m.mount()
    with open(path, "rb") as f:
        assert f.read() == b"q" * MiB + bytes(2 * MiB + 100)
    assert os.stat(path).st_blocks * 512 <= MiB + 4096


def test_zero_range_zeroes_frees_and_grows_unless_asked_to_keep_the_size(shared_mount):
    """fallocate -z (FALLOC_FL_ZERO_RANGE): the range reads as zeros at once and after a
    remount, whole blocks inside it are freed, and a range past the end grows the file
    unless KEEP_SIZE is given (fallocate -z -n)."""
    m, here = shared_mount
    path, data = fsynced_pattern(here, "z", 4 * MiB)
    with open(path, "rb") as f:
        assert f.read() == data  # cached by the kernel, then zeroed under it
    before = os.stat(path).st_blocks
    subprocess.run(["fallocate", "-z", "-o", str(MiB // 2), "-l", str(2 * MiB), path],
                   check=True)
    expected = data[:MiB // 2] + bytes(2 * MiB) + data[5 * MiB // 2:]
    with open(path, "rb") as f:
        assert f.read() == expected
    assert (before - os.stat(path).st_blocks) * 512 >= MiB  # block 1 is gone
    subprocess.run(["fallocate", "-z", "-n", "-o", str(4 * MiB), "-l", str(MiB), path],
                   check=True)
    assert os.stat(path).st_size == 4 * MiB
    subprocess.run(["fallocate", "-z", "-o", str(7 * MiB // 2), "-l", str(MiB), path],
                   check=True)
    expected = expected[:7 * MiB // 2] + bytes(MiB)
    assert os.stat(path).st_size == 9 * MiB // 2
    m.umount()
    m.mount()
    with open(path, "rb") as f:
        assert f.read() == expected


def test_plain_fallocate_succeeds_and_grows_other_modes_are_refused(shared_mount):
    m, here = shared_mount
    path = os.path.join(here, "f")
    with open(path, "w+b") as f:
        f.write(b"abc")
        os.posix_fallocate(f.fileno(), 0, 5 * MiB)
        assert os.fstat(f.fileno()).st_size == 5 * MiB
        fallocate(f.fileno(), FALLOC_FL_KEEP_SIZE, 0, 10 * MiB)
        assert os.fstat(f.fileno()).st_size == 5 * MiB
        try:
            fallocate(f.fileno(), FALLOC_FL_COLLAPSE_RANGE, 0, MiB)
        except OSError as e:
            assert e.errno == errno.EOPNOTSUPP
        else:
            raise AssertionError("collapse range succeeded")
        f.seek(0)
        assert f.read(3) == b"abc"
    assert os.stat(path).st_size == 5 * MiB


def test_fallocate_of_more_than_is_free_fails_with_enospc(shared_mount):
    """What `xfs_io -c "falloc 0 2*free"` expects (xfstests generic/213): ENOSPC at once,
    the file as it was; glibc's posix_fallocate gets the same errno."""
    m, here = shared_mount
    path = os.path.join(here, "huge")
    with open(path, "w+b") as f:
        f.write(b"abc")
        f.flush()
        too_much = 2 * free_bytes(here)
        for call in (lambda: fallocate(f.fileno(), 0, 0, too_much),
                     lambda: fallocate(f.fileno(), FALLOC_FL_KEEP_SIZE, 0, too_much),
                     lambda: os.posix_fallocate(f.fileno(), 0, too_much)):
            try:
                call()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
            else:
                raise AssertionError("a fallocate of twice the free space succeeded")
        assert os.fstat(f.fileno()).st_size == 3
        f.seek(0)
        assert f.read() == b"abc"


def test_readdir_inode_numbers_match_stat(shared_mount):
    m, here = shared_mount
    for i in range(20):
        open(os.path.join(here, f"f{i}"), "w").close()
    os.mkdir(os.path.join(here, "d"))
    os.link(os.path.join(here, "f3"), os.path.join(here, "hard"))
    entries = list(os.scandir(here))
    assert len(entries) == 22
    for entry in entries:
        assert entry.inode() == os.stat(entry.path, follow_symlinks=False).st_ino, entry.name
    listed = subprocess.run(["ls", "-i", here], capture_output=True, text=True, check=True)
    for line in listed.stdout.splitlines():
        ino, name = line.split()
        assert int(ino) == os.stat(os.path.join(here, name)).st_ino, line


def test_punch_hole_through_one_name_shows_through_another(shared_mount):
    m, here = shared_mount
    a, b = os.path.join(here, "a"), os.path.join(here, "b")
    with open(a, "wb") as f:
        f.write(b"x" * 4 * MiB)
        os.fsync(f.fileno())
    os.link(a, b)
    before = os.stat(b).st_blocks  # the kernel caches b's attributes now
    with open(a, "r+b") as f:
        fallocate(f.fileno(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 3 * MiB)
    assert wait_until(lambda: os.stat(b).st_blocks * 512 <= MiB, timeout=10,
                      what="b's st_blocks refreshed"), before


def test_tar_sparse_archives_a_sparse_file_as_sparse(shared_mount, tmp_path):
    m, here = shared_mount
    path = os.path.join(here, "sparse")
    with open(path, "wb") as f:
        f.write(b"a" * 4096)
        f.truncate(50 * MiB)
    archive, out = tmp_path / "a.tar", tmp_path / "out"
    subprocess.run(["tar", "-S", "-cf", str(archive), "-C", here, "sparse"], check=True)
    assert archive.stat().st_size < MiB  # tar stored the hole as a hole
    out.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(out)], check=True)
    with open(out / "sparse", "rb") as f:
        assert f.read(4096) == b"a" * 4096 and os.fstat(f.fileno()).st_size == 50 * MiB
