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
- The statx calls are nested requests. They need a free libfuse worker, and libfuse may
  queue them behind a rename of a directory on the path, which waits for this very
  callback. So they run on two threads of their own, and the callback waits at most
  `wait` seconds. If that runs out, the refresh finishes after the callback returns, and
  the names may show old attributes until then.

No file descriptor on the mount stays open between calls, so unmounting is never
refused as busy.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import logging
import os
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


def _open_cached(dirfd: int, name: bytes, directory: bool) -> int:
    """An O_PATH descriptor of dirfd/name found in the kernel's caches alone, or -errno."""
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    how = _OpenHow(flags, 0, RESOLVE_CACHED | RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS)
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
        self._lock = threading.Lock()

    def refresh(self, names) -> None:
        """Refresh what the kernel cached for each path that `names()` returns ("/d/name",
        from the root). It is called on the refresh thread, and again if a name moved
        meanwhile (a directory on its path was renamed)."""
        future = self._pool.submit(self._refresh_all, names)
        try:
            future.result(timeout=self.wait)
        except concurrent.futures.TimeoutError:
            with self._lock:
                self._late += 1
                late = self._late
            if late == 1 or late % 100 == 0:
                log.warning("refreshing the kernel's view of other names of a hard-linked "
                            "file took over %.1f s (%d times so far); it finishes in the "
                            "background", self.wait, late)
        except Exception:  # noqa: BLE001 - a failed refresh must not fail the change
            log.exception("refreshing the kernel's view of other names of a file failed")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _refresh_all(self, names) -> None:
        delay, deadline = 0.001, time.monotonic() + RETRY_SECONDS
        while True:
            results = {self._refresh_one(path) for path in names()}
            # A name is missing, or was not found in the cache while a rename runs: the
            # kernel moves its cached names only after this daemon answered the rename.
            if not (MOVED in results or (UNCACHED in results and self.busy())):
                return
            if time.monotonic() + delay > deadline:
                log.debug("gave up refreshing names that kept moving")
                return
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def _refresh_one(self, path: bytes) -> str:
        """DONE if the name was in the kernel's cache and got fresh attributes, UNCACHED if
        the kernel has nothing cached under it (or cannot be asked), MOVED if it is not
        there any more."""
        try:
            fd = os.open(self.mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            log.debug("cannot open the mount root %r: %s", self.mountpoint, e)
            return UNCACHED
        try:
            parts = [p for p in path.split(b"/") if p]
            for i, part in enumerate(parts):
                directory = i < len(parts) - 1
                nxt = _open_cached(fd, part, directory)
                if nxt == -errno.EAGAIN:
                    # The directory's attributes expired (its permission check needs the
                    # daemon), a rename raced the walk, or the name is not cached: refresh
                    # the directory and try twice more.
                    if _force_getattr(fd) < 0:
                        return MOVED
                    nxt = _open_cached(fd, part, directory)
                    if nxt == -errno.EAGAIN:
                        nxt = _open_cached(fd, part, directory)
                if nxt in (-errno.ENOENT, -errno.ENOTDIR, -errno.ESTALE):
                    return MOVED  # renamed or removed meanwhile
                if nxt < 0:
                    return UNCACHED  # EAGAIN: nothing cached; EXDEV, EACCES: cannot walk
                os.close(fd)
                fd = nxt
            return DONE if _force_getattr(fd) == 0 else MOVED
        finally:
            os.close(fd)
