"""The FUSE glue (fusefs/fuse_glue.py): the stat buffer it writes, and the Python thread
states it keeps for libfuse's threads, through a real kernel mount in this process."""

import ctypes
import errno
import logging
import os
import signal
import stat
import threading
import time
from ctypes import POINTER, c_byte

import pytest
from fuse import FuseOSError, Operations, c_stat, fuse_file_info

from fusefs import errors, fuse_glue
from fusefs.fuse_ops import STAT_KEYS

from .support import is_mounted, unmount, wait_until


def test_the_stat_buffer_gets_every_field_and_zeros_elsewhere():
    buf = ctypes.pointer(c_stat())
    ctypes.memset(buf, 0xFF, ctypes.sizeof(c_stat))  # what a reused buffer might hold
    values = (2**40 + 7, stat.S_IFREG | 0o4755, 3, 1000, 2**32 - 2, 0x0801, 5 * 2**32 + 1,
              131072, 10_485_761, -1_500_000_001, 1_700_000_000_123_456_789, 0)
    fuse_glue.STAT.pack_into(buf.contents, 0, *fuse_glue.STAT_ORDER(fuse_glue._flat(values)))
    st = buf.contents
    got = {k: getattr(st, k) for k in STAT_KEYS if not k.endswith("time")}
    assert got == dict(zip(STAT_KEYS, values[:9]))
    for key, ns in zip(("st_atimespec", "st_mtimespec", "st_ctimespec"), values[9:]):
        spec = getattr(st, key)
        assert spec.tv_sec * 10**9 + spec.tv_nsec == ns and 0 <= spec.tv_nsec < 10**9
    assert st.st_dev == 0  # not written by us: zero, not what the buffer held
    assert fuse_glue.STAT.size == ctypes.sizeof(c_stat)


class _Probe(Operations):
    """A root directory where every other name is missing, slowly (so that concurrent
    callers make libfuse start more threads), recording how threading.local behaves."""

    use_ns = True

    def __init__(self):
        self.local = threading.local()
        self.calls = 0
        self.fresh = 0  # callbacks that found this thread's threading.local empty
        self.threads = set()

    def attributes(self, path, fh=None):
        self.calls += 1
        self.threads.add(threading.get_ident())
        if not hasattr(self.local, "seen"):
            self.local.seen = True
            self.fresh += 1
        time.sleep(0.002)  # without the GIL: other callbacks run meanwhile
        if path == "/":
            return (1, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 0, 4096, 0, 0, 0, 0)
        raise FuseOSError(errno.ENOENT)

    def getattr(self, path, fh=None):  # registers GETATTR with fusepy; the glue calls the above
        raise AssertionError("the glue answers getattr through attributes()")


def _thread_state_count() -> int:
    return len(fuse_glue._thread_states())


def test_each_libfuse_thread_keeps_one_python_thread_state_until_it_ends(tmp_path):
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    probe = _Probe()
    before = fuse_glue.THREAD_STATES.kept
    loop = threading.Thread(target=fuse_glue.Mount, args=(probe, mnt), daemon=True, kwargs=dict(
        foreground=True, attr_timeout=0, entry_timeout=0, negative_timeout=0))
    loop.start()
    try:
        wait_until(lambda: is_mounted(mnt), "the probe mounted", timeout=20)

        def burst():
            for _ in range(20):
                os.stat(mnt)  # GETATTR of the root: concurrent ones run in parallel

        for _ in range(4):  # bursts of 40 callers, then idle: libfuse starts and ends threads
            callers = [threading.Thread(target=burst) for _ in range(40)]
            for c in callers:
                c.start()
            for c in callers:
                c.join()
            time.sleep(0.3)
            tasks = len(os.listdir("/proc/self/task"))
            assert _thread_state_count() <= tasks  # no state outlives its thread
        with pytest.raises(FileNotFoundError):
            os.stat(os.path.join(mnt, "missing"))  # an error answered, not raised through
        assert len(probe.threads) > 10, "the bursts should have made libfuse add threads"
        # Each thread's state (and threading.local) lasts across its callbacks. Thread ids
        # are reused by later threads, which start empty: count generously.
        assert probe.fresh < probe.calls / 5, (probe.fresh, probe.calls)
    finally:
        unmount(mnt)
        if is_mounted(mnt):
            unmount(mnt, lazy=True)
        loop.join(10)
    assert not loop.is_alive()
    assert fuse_glue.THREAD_STATES.kept == before  # every kept state was deleted
    # libfuse puts SIGPIPE back to "terminate" on its way out; a write to a closed socket
    # after that (the daemon closing its connections) would kill the process silently.
    assert _ignored(signal.SIGPIPE), "SIGPIPE no longer ignored after the mount ended"


def _ignored(signum: int) -> bool:
    """The kernel's view (Python's signal.getsignal only knows what Python set)."""
    with open("/proc/self/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return bool(mask & (1 << (signum - 1)))


class _Stub:
    """What the glue needs of fusepy's FUSE object: `operations` and `encoding`."""

    encoding = "latin-1"

    def __init__(self, operations):
        self.operations = operations


class _Failing:
    def __init__(self, exc):
        self.exc = exc

    def attributes(self, path, fh=None):
        raise self.exc

    def xattr_value(self, path, name):
        raise self.exc

    def read_pieces(self, path, size, offset, fi):
        raise self.exc


GLUE_CASES = [
    (errors.FsError(errno.ENOENT), errno.ENOENT, None),
    (errors.Unavailable("no server answered"), errno.EIO, logging.WARNING),
    (RuntimeError("a bug"), errno.EIO, logging.ERROR),
    (OSError("no errno, as requests raises"), errno.EIO, logging.ERROR),
]


@pytest.mark.parametrize("exc, code, level", GLUE_CASES,
                         ids=[type(c[0]).__name__ for c in GLUE_CASES])
def test_the_glue_answers_failures_with_the_adapters_errno(exc, code, level, caplog):
    glue = _Stub(_Failing(exc))
    buf = ctypes.pointer(c_stat())
    with caplog.at_level(logging.WARNING, logger="fusefs.fuse"):
        assert fuse_glue.Mount.fgetattr(glue, b"/a", buf, None) == -code
        assert fuse_glue.Mount.getxattr(glue, b"/a", b"user.x", None, 0) == -code
        buf = ctypes.create_string_buffer(8)
        assert fuse_glue.Mount.read(glue, b"/a", ctypes.cast(buf, POINTER(c_byte)), 8, 0,
                                    ctypes.pointer(fuse_file_info())) == -code
    levels = {r.levelno for r in caplog.records}
    assert levels == ({level} if level else set())
    if level == logging.ERROR:  # a bug is logged with its traceback
        assert all(r.exc_info for r in caplog.records)


def test_getxattr_answers_size_queries_and_refuses_short_buffers():
    class Ops:
        def xattr_value(self, path, name):
            return b"value"

    glue = _Stub(Ops())
    assert fuse_glue.Mount.getxattr(glue, b"/a", b"user.x", None, 0) == 5  # size query
    short = ctypes.create_string_buffer(4)
    assert fuse_glue.Mount.getxattr(glue, b"/a", b"user.x", short, 4) == -errno.ERANGE
    room = ctypes.create_string_buffer(8)
    assert fuse_glue.Mount.getxattr(glue, b"/a", b"user.x", room, 8) == 5
    assert room.raw[:5] == b"value"


def test_read_copies_the_pieces_of_the_answer_into_the_kernels_buffer():
    class Ops:
        def read_pieces(self, path, size, offset, fi):
            assert (path, size, offset, fi.fh) == ("/a", 10, 4, 7)
            return [b"abc", memoryview(b"--defg--")[2:6], bytearray(b"hij"), b""]

    buf = ctypes.create_string_buffer(b"\xff" * 12)
    fi = fuse_file_info()
    fi.fh = 7
    glue = _Stub(Ops())
    got = fuse_glue.Mount.read(glue, b"/a", ctypes.cast(buf, POINTER(c_byte)), 10, 4,
                               ctypes.pointer(fi))
    assert got == 10
    assert buf.raw == b"abcdefghij\xff\xff\0"  # nothing past the answer is touched


@pytest.mark.parametrize("raw_fi", [True, False])
def test_write_hands_the_adapter_a_view_of_the_kernels_bytes(raw_fi):
    """No copy on the way in (fusepy's string_at made one per 128 KiB): the adapter gets
    a view of exactly the `size` bytes in libfuse's buffer, with the handle as fusepy
    would give it."""
    seen = []

    class Ops:
        def __call__(self, op, *args):
            path, data, offset, fh = args
            seen.append((op, path, bytes(data), type(data), offset,
                         fh.fh if raw_fi else fh))
            return len(data)

    buf = ctypes.create_string_buffer(b"0123456789")
    fi = fuse_file_info()
    fi.fh = 9
    glue = _Stub(Ops())
    glue.raw_fi = raw_fi
    glue._decode_optional_path = lambda path: path.decode(glue.encoding)
    got = fuse_glue.Mount.write(glue, b"/w", ctypes.cast(buf, POINTER(c_byte)), 7, 4096,
                                ctypes.pointer(fi))
    assert got == 7
    assert seen == [("write", "/w", b"0123456", memoryview, 4096, 9)]
