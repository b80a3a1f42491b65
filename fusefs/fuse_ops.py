"""The fusepy adapter: converts arguments, calls the filesystem core, converts results.

This is the one place errors become errnos: `FsError` and `StorageError` carry theirs;
anything else is a bug, logged with its traceback and answered EIO, so nothing ever
escapes a callback (fusepy would turn it into EINVAL, or abort the mount on an OSError
without an errno).

fusepy's API is path based; the core works on inode numbers. A `PathCache` (paths.py,
with its invalidation rules) maps paths to inodes; every callback that changes the
namespace tells it which paths changed. Paths are decoded as latin-1 so any byte sequence
survives the round trip (names are bytes in the core). Every callback is mechanical:
convert the arguments, call the core, tell the path cache and the refresher what changed,
convert the answer.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import threading
import time

from fuse import FuseOSError, Operations, fuse_get_context

from . import errors, replicas
from .filesystem import Filesystem
from .metadata import ROOT_INO
from .paths import PathCache

log = logging.getLogger("fusefs.fuse")

REPLICAS_MEMO = 2.0  # seconds a computed user.fusefs.replicas value is answered again
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _b(text: str) -> bytes:
    return text.encode("latin-1")


def _s(raw: bytes) -> str:
    return raw.decode("latin-1")


def errno_of(e: Exception, call: str, args: tuple) -> int:
    """The errno that answers a callback which raised `e`: the one it carries, or EIO,
    logged with its traceback, for anything unexpected. The whole error policy is here."""
    if isinstance(e, errors.FsError):
        return e.errno
    if isinstance(e, (errors.StorageError, errors.MetadataFailed)):
        log.warning("%s %s failed: %s", call, _shown(args[0]) if args else "", e)
        return e.errno
    if isinstance(e, FuseOSError):
        return e.errno
    log.error("unexpected error in %s(%s); answered EIO", call,
              ", ".join(map(_shown, args[:2])), exc_info=e)
    return errno.EIO


def _shown(arg, limit: int = 300) -> str:
    """An argument as a log line shows it (a path as it is, anything else as its repr): a
    path of thousands of characters (a deep tree) by its two ends."""
    text = arg if isinstance(arg, str) else repr(arg)
    if len(text) > limit:
        return f"{text[:limit // 2]}...({len(text)} characters)...{text[-limit // 2:]}"
    return text


def _quiet_errno(e: Exception) -> int:
    """The errno `errno_of` answers `e` with, without logging (for counting)."""
    if isinstance(e, (errors.FsError, errors.StorageError, errors.MetadataFailed,
                      FuseOSError)):
        return e.errno
    return errno.EIO


def _op(fn, timed: bool = True):
    """Run a callback; turn every failure into an errno (EIO for the unexpected). With a
    meter (`--metrics`), count it and its errors under its name (unless `timed` is False:
    the glue calls another, timed, method for it)."""
    name = fn.__name__

    @functools.wraps(fn)
    def callback(self, *args):
        meter = self.meter if timed else None
        started = time.perf_counter() if meter is not None else 0.0
        try:
            return fn(self, *args)
        except Exception as e:  # noqa: BLE001 - the contract: an errno, never an escape
            code = errno_of(e, name, args)
            if meter is not None:
                meter.op_failed(name, code)
            raise FuseOSError(code) from None
        finally:
            if meter is not None:
                meter.op_done(name, time.perf_counter() - started)

    callback.errno_wrapper = True  # what tests check: this wrapper, not any functools.wraps
    return callback


def _glue_op(fn):
    """A callback that fuse_glue.Mount answers through another method (timed there)."""
    return _op(fn, timed=False)


def _timed(name: str):
    """Count a method that fuse_glue.Mount calls directly for the operation `name`; its
    errors go on to the glue, which turns them into errnos."""
    def decorate(fn):
        @functools.wraps(fn)
        def timed(self, *args):
            meter = self.meter
            if meter is None:
                return fn(self, *args)
            started = time.perf_counter()
            try:
                return fn(self, *args)
            except Exception as e:
                meter.op_failed(name, _quiet_errno(e))
                raise
            finally:
                meter.op_done(name, time.perf_counter() - started)
        return timed
    return decorate


# libfuse 2 keeps a file that is unlinked (or renamed over) while open reachable: it renames
# it to ".fuse_hidden" + 16 hex digits in the same directory, answers the kernel's calls
# on it through that name, and unlinks that name after the last release. Such a rename is
# an unlink here (the core keeps an open inode with no name until its last release) and
# the hidden name lives only in the adapter: never in a directory listing, never in the
# journal, never in the way of rmdir. After a crash the nameless inode is an orphan,
# removed (with its blocks) by the next mount.
_HIDDEN = re.compile(r"\.fuse_hidden[0-9a-f]{16}\Z")


def _hidden_name(path: str) -> bool:
    return ".fuse_hidden" in path and bool(_HIDDEN.match(path.rpartition("/")[2]))


# What `FuseOps.attributes` answers, in this order (times in nanoseconds).
STAT_KEYS = ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
             "st_blksize", "st_blocks", "st_atime", "st_mtime", "st_ctime")


class FuseOps(Operations):
    """fusepy's Operations over a `Filesystem`: paths to inodes (`paths`), errors to errnos
    (`_op`), libfuse's hidden names of open files whose name is gone (`_hidden`), and the
    refresh of a hard-linked file's other names after a change (`refresher`). With a
    `meter` (fusefs/metrics.py), every callback is counted and timed under its name, and
    its errors under their errno. `_lock` protects `_renames`, `_last_rename`, `_hidden`
    and `_replicas` (the memo of the computed xattr); it is a leaf."""

    use_ns = True  # times as integer nanoseconds
    flag_utime_omit_ok = 1  # receive UTIME_OMIT/UTIME_NOW: touch -m, tar x keep mtimes
    flag_nullpath_ok = 1  # calls on open-but-unlinked files arrive without a path

    def __init__(self, fs: Filesystem, on_destroy=None, refresher=None, meter=None,
                 on_init=None):
        self.fs = fs
        self.on_destroy = on_destroy
        self.on_init = on_init
        self.meter = meter  # metrics.MountMetrics with --metrics, else None
        self._replicas: dict[int, tuple[float, bytes]] = {}  # guarded by _lock
        # With kernel attribute caching on, refreshes the other names of hard-linked files
        # after a change (see kernel_attrs.py); None when the kernel caches no attributes.
        self.refresher = refresher
        self._renames = 0  # running renames; guarded by _lock
        self._last_rename = 0.0
        if refresher is not None:
            refresher.busy = self._renaming
        self._lock = threading.Lock()
        self.started = threading.Event()  # set by init: the kernel mounted us
        self.paths = PathCache(self._lookup, ROOT_INO, pinned=self._hidden_ino)
        # hidden name -> inode of an open file whose last name is gone. libfuse makes each
        # name unique in the mount (node id and a counter), so the name alone is the key:
        # the file stays reachable when its directory is renamed or removed.
        self._hidden: dict[bytes, int] = {}  # guarded by _lock
        # open directory handle -> its listing, taken at offset 0 (opendir, rewinddir) and
        # served from there by position: any offset is an entry's place, never a byte
        # inside one (see `listing`). Guarded by _lock.
        self._listings: dict[int, list] = {}
        self._next_listing = 1  # guarded by _lock

    def forget_paths(self) -> None:
        """Another mount changed the namespace: no cached path may be trusted."""
        self.paths.forget()

    # -- paths ------------------------------------------------------------------------------

    def _lookup(self, parent: int, name: str) -> int:
        return self.fs.lookup_ino(parent, _b(name))

    def _hidden_ino(self, path: str) -> int | None:
        """The open file a hidden name stands for; None for any other path (a file that
        really has such a name is looked up as any)."""
        if not _hidden_name(path):
            return None
        with self._lock:
            return self._hidden.get(_b(path.rpartition("/")[2]))

    def _parent(self, path: str) -> tuple[int, bytes]:
        parent, _, name = path.rpartition("/")
        return self.paths.resolve(parent or "/"), _b(name)

    def _linked(self, path: str) -> int | None:
        """The inode at path if it is a file with other names (its change must reach the
        kernel's view of them), else None. Never fails: the change itself reports errors."""
        if self.refresher is None or not path or not self.fs.has_hard_links():
            return None
        try:
            ino = self.paths.resolve(path)
        except errors.FsError:
            return None
        return ino if self.fs.has_other_names(ino) else None

    def _renaming(self) -> bool:
        """A rename runs, or ended so recently that the kernel may not have moved its
        cached names yet."""
        with self._lock:
            return self._renames > 0 or time.monotonic() - self._last_rename < 0.05

    def _after_change(self, ino: int, path: str | None) -> None:
        """An inode's attributes changed through `path` (None: an open, unlinked file)."""
        if self.refresher is not None and self.fs.has_other_names(ino):
            self._refresh_others(ino, path)

    def _refresh_others(self, ino: int | None, *through: str | None) -> None:
        """The inode changed through the names in `through`: the kernel updated what it
        cached for those; make it fetch the attributes of every other name again."""
        if ino is None or self.refresher is None:
            return
        try:
            count = self.fs.getattr(ino).nlink
        except Exception:  # noqa: BLE001 - the change is made; its refresh must not fail it
            count = 0
        self.refresher.refresh(lambda: self.fs.paths(ino), {_b(p) for p in through if p},
                               key=ino, count=count)

    # -- attributes -------------------------------------------------------------------------

    @_timed("getattr")
    def attributes(self, path, fh=None) -> tuple:
        """getattr's answer as a tuple in STAT_KEYS order. Raises what the core raises:
        for the glue (fuse_glue.py), which translates errors with `errno_of`."""
        if fh is not None and not isinstance(fh, int):
            fh = fh.fh
        i = self.fs.getattr(self.fs.handle_ino(fh) if fh else self.paths.resolve(path))
        return (i.ino, i.mode, i.nlink, i.uid, i.gid, i.rdev, i.size, 131072,
                (i.stored + 511) // 512, i.atime_ns, i.mtime_ns, i.ctime_ns)

    @_glue_op
    def getattr(self, path, fh=None):
        return dict(zip(STAT_KEYS, self.attributes(path, fh)))

    @_op
    def access(self, path, amode):
        self.paths.resolve(path)  # permissions are the kernel's (default_permissions)
        return 0

    @_op
    def chmod(self, path, mode):
        ino = self.paths.resolve(path)
        self.fs.setattr(ino, mode=mode)
        self._after_change(ino, path)
        return 0

    @_op
    def chown(self, path, uid, gid):
        ino = self.paths.resolve(path)
        self.fs.setattr(ino, uid=uid, gid=gid)
        self._after_change(ino, path)
        return 0

    @_op
    def truncate(self, path, length, fh=None):
        ino = self.fs.handle_ino(fh.fh) if fh is not None else self.paths.resolve(path)
        self.fs.setattr(ino, size=length)
        self._after_change(ino, path)
        return 0

    @_op
    def utimens(self, path, times=None):
        now = self.fs.now_ns()
        atime, mtime = times if times is not None else (UTIME_NOW, UTIME_NOW)
        pick = {UTIME_NOW: now, UTIME_OMIT: None}
        ino = self.paths.resolve(path)
        self.fs.setattr(ino, atime_ns=pick.get(atime, atime), mtime_ns=pick.get(mtime, mtime))
        self._after_change(ino, path)
        return 0

    # -- namespace --------------------------------------------------------------------------

    @_op
    def mkdir(self, path, mode):
        uid, gid, _ = fuse_get_context()
        parent, name = self._parent(path)
        self.fs.mkdir(parent, name, mode, uid, gid)
        self.paths.changed(path)
        return 0

    @_op
    def mknod(self, path, mode, dev):
        uid, gid, _ = fuse_get_context()
        parent, name = self._parent(path)
        self.fs.mknod(parent, name, mode, dev, uid, gid)
        self.paths.changed(path)
        return 0

    @_op
    def symlink(self, target, source):  # fusepy: target is the new link, source its text
        uid, gid, _ = fuse_get_context()
        parent, name = self._parent(target)
        self.fs.symlink(parent, name, _b(source), uid, gid)
        self.paths.changed(target)
        return 0

    @_op
    def readlink(self, path):
        return _s(self.fs.readlink(self.paths.resolve(path)))

    @_op
    def link(self, target, source):  # fusepy: target is the new name, source the existing
        parent, name = self._parent(target)
        ino = self.paths.resolve(source)
        self.fs.link(ino, parent, name)
        self.paths.changed(target)
        if self.refresher is not None:
            # The kernel keeps what it cached for `source` (its link count included), so
            # every older name is refreshed; the new one got its attributes in the reply.
            self._refresh_others(ino, target)
        return 0

    def _hiding(self, old: str, new: str) -> bool:
        """Whether a rename is libfuse hiding an open file. A user may give a file such a
        name too; libfuse only hides an open file, under a name nobody holds."""
        if not _hidden_name(new):
            return False
        try:
            self.paths.resolve(new)
            return False  # the name exists: an ordinary rename over it
        except errors.FsError:
            pass
        return self.fs.is_open(self.paths.resolve(old))

    def _hide(self, path: str, hidden: str) -> int:
        """libfuse hides an open file whose name goes away: the name is unlinked, and the
        hidden name answers for the inode until libfuse unlinks it after the last close."""
        parent, name = self._parent(path)
        ino = self.paths.resolve(path)
        linked = self._linked(path)
        key = _b(hidden.rpartition("/")[2])
        self.fs.unlink(parent, name)
        with self._lock:
            self._hidden[key] = ino
        self.paths.changed(path)
        self._refresh_others(linked, path)
        return 0

    @_op
    def unlink(self, path):
        if _hidden_name(path):  # libfuse, after the last close of a hidden file
            with self._lock:
                ino = self._hidden.pop(_b(path.rpartition("/")[2]), None)
            if ino is not None:
                return 0
        parent, name = self._parent(path)
        linked = self._linked(path)
        self.fs.unlink(parent, name)
        self.paths.changed(path)
        self._refresh_others(linked, path)
        return 0

    @_op
    def rmdir(self, path):
        parent, name = self._parent(path)
        self.fs.rmdir(parent, name)
        # Not subtree=True: the directory was empty, and every name that left it was
        # forgotten by its own change. Emptying the whole cache made each rmdir of a deep
        # tree's removal resolve its path again from the root.
        self.paths.changed(path)
        return 0

    @_op
    def rename(self, old, new):
        if self._hiding(old, new):
            return self._hide(old, new)
        old_parent, old_name = self._parent(old)
        new_parent, new_name = self._parent(new)
        moved, replaced = self._linked(old), self._linked(new)
        with self._lock:
            self._renames += 1
        try:
            is_dir = self.fs.rename(old_parent, old_name, new_parent, new_name)
        finally:
            with self._lock:
                self._renames -= 1
                self._last_rename = time.monotonic()
        self.paths.changed(old, new, subtree=is_dir)
        if moved != replaced:  # renaming a name over another name of the same file: no-op
            self._refresh_others(moved, old, new)  # its ctime moved
            self._refresh_others(replaced, new)  # it lost a name
        return 0

    @_op
    def opendir(self, path):
        self.paths.resolve(path)
        with self._lock:
            fh, self._next_listing = self._next_listing, self._next_listing + 1
        return fh

    @_op
    def releasedir(self, path, fh):
        with self._lock:
            self._listings.pop(fh, None)
        return 0

    def listing(self, path, fh: int, offset: int) -> list[tuple[bytes, int, int]]:
        """The listing of the open directory `fh`, for a read from position `offset` on:
        entry i's position is i + 1, what the glue gives libfuse as its d_off (the glue
        reads from index `offset`; a list past its end reads nothing). Offset 0 lists the
        directory anew, as POSIX asks of rewinddir; later offsets read that listing, so a
        directory read in several requests is listed once. Any offset names an entry or
        the end: a seek to a made-up position reads on from the next entry, where libfuse's
        own buffer (offsets 0 everywhere) would hand the kernel bytes from inside one."""
        with self._lock:
            entries = None if offset == 0 else self._listings.get(fh)
        if entries is None:
            entries = self.entries(path)
            with self._lock:
                self._listings[fh] = entries
        return entries

    @_timed("readdir")
    def entries(self, path) -> list[tuple[bytes, int, int]]:
        """readdir's answer as (name, inode number, file type) triples, "." and ".." first
        (0: libfuse fills in nothing for them). Raises what the core raises: for the
        glue."""
        ino = self.paths.resolve(path)
        return [(b".", 0, 0), (b"..", 0, 0)] + self.fs.readdir_entries(ino)

    @_glue_op
    def readdir(self, path, fh):
        return [(_s(name), {"st_ino": ino, "st_mode": kind} if ino else None, 0)
                for name, ino, kind in self.entries(path)]

    # -- files ------------------------------------------------------------------------------

    def _keep_cache(self, path: str, ino: int) -> bool:
        """Keep the kernel's cached pages if the file did not change since it was last
        opened by this same path.

        libfuse 2 gives each name of a file its own kernel inode, with its own page cache,
        so what was seen through another name says nothing about this one: records are
        per path, taken at open only (a close may follow changes made through other names
        meanwhile), and dropped when the name changes. Every data change moves ctime.
        Hard-linked files never keep their pages.
        """
        inode = self.fs.getattr(ino)
        same = self.paths.opened(path, (ino, inode.mtime_ns, inode.ctime_ns, inode.size))
        return same and inode.nlink == 1

    @_op
    def create(self, path, mode, fi):
        uid, gid, _ = fuse_get_context()
        parent, name = self._parent(path)
        inode, fi.fh = self.fs.create(parent, name, mode, fi.flags, uid, gid)
        self.paths.changed(path)
        return 0

    @_op
    def open(self, path, fi):
        ino = self.paths.resolve(path)
        fi.fh = self.fs.open(ino, fi.flags)
        fi.keep_cache = 1 if self._keep_cache(path, ino) else 0
        return 0

    @_timed("read")
    def read_pieces(self, path, size, offset, fi) -> list:
        """read's answer as bytes-like pieces (the glue copies them into the kernel's
        buffer). Raises what the core raises, for the glue."""
        return self.fs.read_pieces(fi.fh, offset, size)

    @_glue_op
    def read(self, path, size, offset, fi):
        return b"".join(self.read_pieces(path, size, offset, fi))

    @_op
    def write(self, path, data, offset, fi):
        # O_APPEND: the core writes at the file's end; mmap write-back keeps its offset
        append = bool(fi.flags & os.O_APPEND) and not fi.writepage
        written = self.fs.write(fi.fh, offset, data, append)
        if self.refresher is not None and self.fs.has_hard_links():
            self._after_change(self.fs.handle_ino(fi.fh), path)
        return written

    @_timed("fallocate")
    def allocate(self, path, mode, offset, length, fh) -> None:
        """fallocate(2) through an open file (the glue calls this; it raises what the core
        raises)."""
        self.fs.fallocate(fh, mode, offset, length)
        if self.refresher is not None and self.fs.has_hard_links():
            self._after_change(self.fs.handle_ino(fh), path)

    @_glue_op
    def fallocate(self, path, mode, offset, length, fh):
        self.allocate(path, mode, offset, length, fh)
        return 0

    @_op
    def flush(self, path, fi):
        self.fs.flush(fi.fh)
        return 0

    @_op
    def release(self, path, fi):
        self.fs.release(fi.fh)
        return 0

    @_op
    def fsync(self, path, datasync, fi):
        self.fs.fsync(fi.fh, bool(datasync))
        return 0

    @_op
    def fsyncdir(self, path, datasync, fh):
        self.fs.fsyncdir()
        return 0

    # -- extended attributes ----------------------------------------------------------------

    @_timed("getxattr")
    def xattr_value(self, path, name) -> bytes:
        """getxattr's answer; raises what the core raises (for the glue, like attributes)."""
        ino, raw = self.paths.resolve(path), _b(name)
        if raw == replicas.NAME:
            return self._replicas_value(ino)
        return self.fs.getxattr(ino, raw)

    def _replicas_value(self, ino: int) -> bytes:
        """The computed `user.fusefs.replicas`, kept for REPLICAS_MEMO seconds: a reader
        asks for the size first, then for the value, and both must agree (and the second
        should not ask every server again)."""
        now = time.monotonic()
        with self._lock:
            memo = self._replicas.get(ino)
        if memo is not None and now - memo[0] < REPLICAS_MEMO:
            return memo[1]
        value = self.fs.getxattr(ino, replicas.NAME)  # asks the servers: no lock held
        with self._lock:
            if len(self._replicas) >= 64:
                self._replicas.clear()
            self._replicas[ino] = (now, value)
        return value

    @_glue_op
    def getxattr(self, path, name, position=0):
        return self.xattr_value(path, name)

    @_op
    def listxattr(self, path):
        return [_s(n) for n in self.fs.listxattr(self.paths.resolve(path))]

    @_op
    def setxattr(self, path, name, value, options, position=0):
        ino = self.paths.resolve(path)
        self.fs.setxattr(ino, _b(name), bytes(value), options)
        self._after_change(ino, path)
        return 0

    @_op
    def removexattr(self, path, name):
        ino = self.paths.resolve(path)
        self.fs.removexattr(ino, _b(name))
        self._after_change(ino, path)
        return 0

    # -- the whole filesystem ---------------------------------------------------------------

    @_op
    def statfs(self, path):
        return self.fs.statfs()

    def init(self, path):
        self.started.set()
        try:
            if self.on_init is not None:
                self.on_init()
        except Exception:  # noqa: BLE001 - the mount serves all the same
            log.exception("error while marking the mount as serving")

    def destroy(self, path):
        try:
            if self.on_destroy is not None:
                self.on_destroy()
        except Exception:  # noqa: BLE001 - unmounting must not crash the daemon
            log.exception("error while finishing at unmount")


def mount_options(read_only: bool = False, extra: dict | None = None,
                  cache_attributes: bool = False) -> dict:
    """The FUSE options that matter (why each: docs/fuse-and-performance.md).

    A writer is the filesystem's only one, and the kernel keeps what it caches right for
    changes made through it, so it may cache names and attributes for a minute. The one
    gap, the other names of a hard-linked file, is closed by an `AttrRefresher`; a
    `cache_attributes=False` writer (no refresher on this kernel) caches no attributes.
    A read-only mount follows another machine's changes, so it caches for one second.
    """
    if read_only:
        timeouts = {"attr_timeout": 1.0, "entry_timeout": 1.0, "negative_timeout": 1.0}
    elif cache_attributes:
        timeouts = {"attr_timeout": 60.0, "entry_timeout": 60.0, "negative_timeout": 60.0}
    else:
        timeouts = {"attr_timeout": 0.0, "entry_timeout": 10.0, "negative_timeout": 10.0}
    options = {
        "fsname": "fusefs", "subtype": "fusefs", "use_ino": True, "default_permissions": True,
        "allow_other": os.geteuid() == 0,
        "big_writes": True, "max_write": 131072, "max_read": 131072,
        **timeouts,
        "ro": read_only,
    }
    options.update(extra or {})
    return options
