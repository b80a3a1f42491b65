"""Keeping the kernel's cached attributes right for every name of a hard-linked file.

A writer mount lets the kernel cache attributes and names for a minute: every change goes
through this one mount, and the kernel updates what it cached for the name a change was
made through. libfuse 2's path API has a blind spot: it gives each *name* of a file its
own kernel inode. After a write, chmod, truncate, link or unlink through one name, what
the kernel cached for the file's other names is stale: link count, size, times, even the
mode that `default_permissions` checks.

`AttrRefresher.refresh(paths)` fixes that before the change's callback returns: for each
other name it asks the kernel to fetch that name's attributes again (statx with
`AT_STATX_FORCE_SYNC`), which the kernel does by sending this daemon a GETATTR, answered
from the metadata that already holds the change.

Rules that keep this from deadlocking:
- The walk to each name uses only the kernel's caches (openat2 with `RESOLVE_CACHED`, one
  component at a time). It never waits on a directory lock the changing syscall may hold.
  A name that is not cached has nothing stale to fix: its next lookup returns fresh
  attributes. When a directory's own cached attributes expired, the permission check
  would need the daemon, so the walk refreshes that directory first and tries again.
  When a directory's name expired, the names below it may still be cached (a process
  working inside reaches them by relative paths), so that one component is looked up
  through the daemon, but never inside a directory of a name the change was made
  through: that lookup could need the lock the changing syscall holds.
- The statx calls are nested requests. They need a free libfuse worker, and libfuse may
  queue them behind a rename of a directory on the path, which waits for this very
  callback. So they run on two threads of their own, and the callback waits at most
  `wait` seconds. If that runs out, the refresh finishes after the callback returns, and
  the names may show old attributes until then.

Passes: the refreshes of one file run one pass at a time, and a pass covers every change
made before it started, so the changes of a burst share passes. A change waits for its
pass only when the file has at most WAIT_NAMES names; beyond that the pass runs in the
background, since waiting would cost each change a round trip per name: n links made
one after another would cost n²/2 (docs/filesystem.md has the measurements).

The walks and statx calls run in walker processes (`_Walker`, at most one per refresh
thread, started when first needed), not in the daemon: a daemon thread waiting for the
answer to its own request at a kill -9 could never end, which left the daemon a zombie
holding /dev/fuse and hung the mount and every process using it.

No file descriptor on the mount stays open between calls, so unmounting is never
refused as busy.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import logging
import os
import queue
import struct
import subprocess
import sys
import threading
import time

log = logging.getLogger("fusefs.kernel_attrs")

SYS_OPENAT2 = 437  # the same number on every architecture
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_STATX_FORCE_SYNC = 0x2000
AT_SYMLINK_NOFOLLOW = 0x100
STATX_BASIC_STATS = 0x7FF
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_CACHED = 0x20

DONE, UNCACHED, MOVED = "done", "uncached", "moved"
RETRY_SECONDS = 0.5  # how long to keep walking again while names move under a rename


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_statx = getattr(_libc, "statx", None)
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                       ctypes.c_void_p]
    _statx.restype = ctypes.c_int


def _open_cached(dirfd: int, name: bytes, directory: bool, cached: bool = True) -> int:
    """An O_PATH descriptor of dirfd/name found in the kernel's caches alone, or -errno.
    `cached=False`: looked up as any path is, asking the daemon if the cache cannot say."""
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    how = _OpenHow(flags, 0, (RESOLVE_CACHED if cached else 0) | RESOLVE_NO_XDEV
                   | RESOLVE_NO_SYMLINKS)
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_long(dirfd), ctypes.c_char_p(name),
                       ctypes.byref(how), ctypes.c_long(ctypes.sizeof(how)))
    return fd if fd >= 0 else -ctypes.get_errno()


def _force_getattr(fd: int) -> int:
    """Make the kernel fetch fd's attributes from the filesystem now; 0 or -errno."""
    buf = ctypes.create_string_buffer(256)
    rc = _statx(fd, b"", AT_EMPTY_PATH | AT_STATX_FORCE_SYNC | AT_SYMLINK_NOFOLLOW,
                STATX_BASIC_STATS, buf)
    return 0 if rc == 0 else -ctypes.get_errno()


def supported() -> bool:
    """Whether this kernel and C library have what the refresher needs (Linux >= 5.12)."""
    if _statx is None:
        return False
    fd = _open_cached(AT_FDCWD, b"/", True)
    if fd < 0:
        return fd == -errno.EAGAIN
    try:
        return _force_getattr(fd) == 0
    finally:
        os.close(fd)


WAIT_NAMES = 64  # a change waits for the refresh of at most this many other names


class _Pass:
    """One refresh of one file's names, for every change it covers: `paths()` gives all of
    them, `skip` those that every covered change made through (their attributes came in
    the kernel's reply), `locked` the directories of those names for any covered change
    (its syscall may hold their locks while it waits for the pass)."""

    __slots__ = ("paths", "skip", "locked", "done")

    def __init__(self, paths, skip):
        self.paths, self.skip, self.done = paths, set(skip), threading.Event()
        self.locked = _parents(skip)


class AttrRefresher:
    def __init__(self, mountpoint: str, wait: float = 1.0, threads: int = 2):
        self.mountpoint = os.fsencode(os.path.abspath(mountpoint))
        self.wait = wait
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="attr-refresh")
        self._late = 0  # refreshes that outlasted `wait`, for the log
        # Set by the adapter: whether a rename is running or just ended (the kernel moves
        # its cached names after the daemon's answer, so for a moment they disagree).
        self.busy = lambda: False
        self._lock = threading.Lock()  # guards the two dicts below; a leaf lock
        self._queued: dict = {}  # key -> _Pass not started yet
        self._running: dict = {}  # key -> _Pass under way
        self._walkers: queue.SimpleQueue = queue.SimpleQueue()  # idle _Walker processes
        self._closed = False

    def refresh(self, paths, skip=(), key=None, count: int = 0) -> None:
        """Refresh what the kernel cached for each path that `paths()` returns ("/d/name",
        from the root), except those in `skip`. It is called on a refresh thread, and
        again if a name moved meanwhile (a directory on its path was renamed).

        `key` names the file: changes to one file share a pass that has not started yet,
        and its passes run one at a time, so a burst of changes costs a few passes, not
        one each. The caller waits for the pass (at most `wait` seconds) when the file
        has at most WAIT_NAMES names (`count`); a file with more is refreshed in the
        background, so that each change does not cost a round trip per name."""
        key = object() if key is None else key
        with self._lock:
            job = self._queued.get(key)
            if job is None:
                job = self._queued[key] = _Pass(paths, skip)
                if key not in self._running:
                    self._start(key)
            else:
                job.skip.intersection_update(skip)
                job.locked.update(_parents(skip))
        if count > WAIT_NAMES:
            return
        if not job.done.wait(self.wait):
            with self._lock:
                self._late += 1
                late = self._late
            if late == 1 or late % 100 == 0:
                log.warning("refreshing the kernel's view of other names of a hard-linked "
                            "file took over %.1f s (%d times so far); it finishes in the "
                            "background", self.wait, late)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                self._walkers.get_nowait().close()
            except queue.Empty:
                return

    def _start(self, key) -> None:
        """Caller holds _lock: run the queued pass of `key`."""
        job = self._running[key] = self._queued.pop(key)
        try:
            self._pool.submit(self._run, key, job)
        except RuntimeError:  # closed: nothing is refreshed any more
            del self._running[key]
            job.done.set()

    def _run(self, key, job: _Pass) -> None:
        try:
            self._refresh_all(lambda: [p for p in job.paths() if p not in job.skip],
                              job.locked)
        except Exception:  # noqa: BLE001 - a failed refresh must not fail the change
            log.exception("refreshing the kernel's view of other names of a file failed")
        finally:
            job.done.set()
            with self._lock:
                del self._running[key]
                if key in self._queued:
                    self._start(key)

    def _refresh_all(self, names, locked) -> None:
        delay, deadline = 0.001, time.monotonic() + RETRY_SECONDS
        while True:
            results = set(self._round(names(), locked))
            # A name is missing, or was not found in the cache while a rename runs: the
            # kernel moves its cached names only after this daemon answered the rename.
            if not (MOVED in results or (UNCACHED in results and self.busy())):
                return
            if time.monotonic() + delay > deadline:
                log.debug("gave up refreshing names that kept moving")
                return
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def _round(self, paths: list[bytes], locked=frozenset()) -> list[str]:
        """One round over `paths`, by a walker process (taken from the idle ones, or new)."""
        if not paths:
            return []
        try:
            walker = self._walkers.get_nowait()
        except queue.Empty:
            walker = _Walker(self.mountpoint)
        try:
            return walker.refresh(paths, locked)
        finally:
            if walker.alive and not self._closed:
                self._walkers.put(walker)
            else:
                walker.close()


def _parents(paths) -> set[bytes]:
    return {path.rpartition(b"/")[0] for path in paths}


def refresh_round(mountpoint: bytes, paths: list[bytes], locked=frozenset()) -> list[str]:
    """DONE, UNCACHED or MOVED for each path (`_refresh_one`), walking each directory
    once. `locked`: directories ("" is the root) whose lock the changing syscall may
    hold; the walk never looks a name up through the daemon in them. Runs in a walker
    process (`_Walker`), never in the daemon."""
    dirs: dict[bytes, int | str] = {}  # directory path -> its descriptor, or why none
    try:
        return [_refresh_one(mountpoint, path, dirs, locked) for path in paths]
    finally:
        for fd in dirs.values():
            if not isinstance(fd, str):
                os.close(fd)


def _refresh_one(mountpoint: bytes, path: bytes, dirs: dict, locked) -> str:
    """DONE if the name was in the kernel's cache and got fresh attributes, UNCACHED if
    the kernel has nothing cached under it (or cannot be asked), MOVED if it is not
    there any more. `dirs` keeps the walks to directories (a descriptor, or why there
    is none) for the other names of the same round."""
    parent, _, name = path.rpartition(b"/")
    fd = dirs.get(parent)
    if fd is None:
        fd = dirs[parent] = _walk(mountpoint, parent, locked)
    if isinstance(fd, str):
        return fd
    fd = _step(fd, name, False)
    if isinstance(fd, str):
        return fd
    try:
        return DONE if _force_getattr(fd) == 0 else MOVED
    finally:
        os.close(fd)


def _walk(mountpoint: bytes, directory: bytes, locked=frozenset()):
    """An O_PATH descriptor of `directory` ("/d/e" from the mount's root; "" is the
    root) found through the kernel's caches alone, or UNCACHED or MOVED."""
    try:
        fd = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        log.debug("cannot open the mount root %r: %s", mountpoint, e)
        return UNCACHED
    here = b""
    for part in [p for p in directory.split(b"/") if p]:
        nxt = _step(fd, part, True, look_up=here not in locked)
        here += b"/" + part
        os.close(fd)
        if isinstance(nxt, str):
            return nxt
        fd = nxt
    return fd


def _step(fd: int, part: bytes, directory: bool, look_up: bool = False):
    """The descriptor of fd/part found through the kernel's caches, or UNCACHED or
    MOVED. `look_up`: a directory whose name expired is looked up through the daemon
    (never where the changing syscall may hold fd's lock)."""
    nxt = _open_cached(fd, part, directory)
    if nxt == -errno.EAGAIN:
        # The directory's attributes expired (its permission check needs the daemon),
        # a rename raced the walk, or the name is not cached: refresh the directory
        # and try twice more.
        if _force_getattr(fd) < 0:
            return MOVED
        nxt = _open_cached(fd, part, directory)
        if nxt == -errno.EAGAIN:
            nxt = _open_cached(fd, part, directory)
    if nxt == -errno.EAGAIN and look_up:
        # The directory's own name expired (entry_timeout), or it is not cached at all.
        # Expired: it was looked up long ago and is kept by a process working below it,
        # which reaches names under it by relative paths and never looks it up again,
        # so names under it may be cached with attributes that are stale now. Look it
        # up as any path is: for an expired name, the daemon confirms it (a LOOKUP) and
        # no lock is taken; a name not cached at all takes fd's lock, which the changing
        # syscall does not hold (its directories are `locked`, and never looked up).
        nxt = _open_cached(fd, part, directory, cached=False)
    if nxt in (-errno.ENOENT, -errno.ENOTDIR, -errno.ESTALE):
        return MOVED  # renamed or removed meanwhile
    if nxt < 0:
        return UNCACHED  # EAGAIN: nothing cached; EXDEV, EACCES: cannot walk
    return nxt


_RESULTS = {b"D": DONE, b"U": UNCACHED, b"M": MOVED}
_CODES = {v: k for k, v in _RESULTS.items()}
_FRAME = struct.Struct(">I")


class _Walker:
    """A process of its own that walks to names and forces their GETATTRs: a request to
    the mount made by a thread of the daemon itself would keep the daemon from dying. A
    thread killed (kill -9) while its request waits for an answer only the daemon can
    give never ends, so the process never exits, /dev/fuse stays open, and the mount and
    everything using it hang until someone aborts the connection by hand. A separate
    process holds no /dev/fuse: when the daemon dies, the connection ends, its request
    fails, and it exits (it also goes when its pipe closes)."""

    def __init__(self, mountpoint: bytes):
        self.alive = True
        # This very package, wherever the daemon's working directory is.
        top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (top, os.environ.get("PYTHONPATH")) if p))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "fusefs.kernel_attrs", os.fsdecode(mountpoint)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, cwd="/",
            env=env)

    def refresh(self, paths: list[bytes], locked=frozenset()) -> list[str]:
        """refresh_round in the walker; every name UNCACHED if the walker is gone."""
        # Each directory after a "d": the root is "" and must not read as no directory.
        payload, dirs = b"\0".join(paths), b"\0".join(b"d" + d for d in locked)
        try:
            self._proc.stdin.write(_FRAME.pack(len(payload)) + payload
                                   + _FRAME.pack(len(dirs)) + dirs)
            self._proc.stdin.flush()
            answer = self._proc.stdout.read(len(paths))
        except OSError:
            answer = b""
        if len(answer) != len(paths):
            self.alive = False
            log.warning("the process refreshing the kernel's view of hard-linked files "
                        "ended; starting another")
            return [UNCACHED] * len(paths)
        return [_RESULTS[answer[i:i + 1]] for i in range(len(paths))]

    def close(self) -> None:
        self.alive = False
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def _serve(mountpoint: str) -> None:
    """A walker's loop: a frame of NUL-separated paths and one of NUL-separated locked
    directories in, one result byte per path out, until the daemon closes the pipe."""
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = source.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return
        paths = source.read(_FRAME.unpack(head)[0]).split(b"\0")
        head = source.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return
        dirs = source.read(_FRAME.unpack(head)[0])
        locked = {d[1:] for d in dirs.split(b"\0")} if dirs else set()
        results = refresh_round(os.fsencode(mountpoint), paths, locked)
        sink.write(b"".join(_CODES[r] for r in results))
        sink.flush()


if __name__ == "__main__":
    try:
        _serve(sys.argv[1])
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the daemon is gone: nothing to answer
    os._exit(0)  # nothing buffered to flush into a pipe nobody reads
