#!/usr/bin/env python3
"""A minimal passthrough filesystem in fusepy: the ceiling for a Python FUSE filesystem.

    python benchmarks/passthrough.py BACKING MOUNTPOINT [--nothreads] [--debug] [-o OPTS]

Mirrors the directory BACKING at MOUNTPOINT and stays in the foreground until it is
unmounted (`fusermount -u MOUNTPOINT`) or interrupted (SIGINT/SIGTERM unmount it).

Every callback is one or two system calls on the backing directory and nothing else, so
whatever a real fusepy filesystem does on top of this (metadata, caching, the network)
shows up as the difference between the two in `fs_bench.py`.

FUSE options (why each: docs/fuse-and-performance.md; `MOUNT_OPTIONS` below):

  big_writes, max_write=131072   write requests of up to 128 KiB instead of 4 KiB: the single
                                 largest factor for sequential writes on libfuse2
  max_read=131072                read requests of up to 128 KiB
  kernel_cache                   never drop the kernel's page cache of a file on open:
                                 warm reads do not reach this process at all
  attr_timeout=60, entry_timeout=60, negative_timeout=60
                                 the kernel caches attributes, names and absent names for a
                                 minute: repeated stat()/lookups do not reach this process
  use_ino                        report the backing files' inode numbers (hard links agree)
  default_permissions            the kernel checks permissions against the mode bits
  allow_other (when root)        other users may use the mount, like fusefs
  multi-threaded                 like fusefs (`--nothreads` makes it single-threaded, which
                                 was ~15% faster for large I/O, docs/fuse-and-performance.md)

kernel_cache and the long timeouts are correct only while this mount is the only writer of
BACKING, which is the case in the benchmark. They make this a best case, not a template:
a filesystem with hard links or several writers must choose shorter timeouts.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time

from fuse import FUSE, FuseOSError, Operations, fuse_get_context

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

MOUNT_OPTIONS = {
    "fsname": "passthrough", "subtype": "passthrough",
    "big_writes": True, "max_write": 131072, "max_read": 131072,
    "kernel_cache": True,
    "attr_timeout": 60, "entry_timeout": 60, "negative_timeout": 60,
    "use_ino": True, "default_permissions": True,
}

_STAT_FIELDS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size",
                "st_blocks", "st_blksize", "st_rdev")
_STATVFS_FIELDS = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                   "f_ffree", "f_favail", "f_flag", "f_namemax")


def _attrs(st: os.stat_result) -> dict:
    d = {k: getattr(st, k) for k in _STAT_FIELDS}
    d["st_atime"], d["st_mtime"], d["st_ctime"] = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    return d


def _oserror(fn):
    """fusepy turns an OSError with an errno into -errno already; make sure one has it."""

    def call(self, *args):
        try:
            return fn(self, *args)
        except OSError as e:
            raise FuseOSError(e.errno or errno.EIO) from None

    call.__name__ = fn.__name__
    return call


class Passthrough(Operations):
    use_ns = True  # times as integer nanoseconds
    flag_utime_omit_ok = 1  # touch -m and tar x set one time only (docs/fuse-and-performance.md)

    def __init__(self, backing: str):
        self.root = os.path.realpath(backing)
        self.me = (os.geteuid(), os.getegid())

    def _p(self, path: str) -> str:
        return self.root + path  # fusepy paths are absolute; "/" maps to root + "/"

    def _own(self, path: str, fd: int | None = None) -> None:
        """New objects belong to the caller (a no-op when the caller is us)."""
        uid, gid, _ = fuse_get_context()
        if (uid, gid) != self.me:
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.lchown(path, uid, gid)

    # -- attributes -------------------------------------------------------------------------

    @_oserror
    def getattr(self, path, fh=None):
        if fh is not None:
            return _attrs(os.fstat(fh.fh))
        return _attrs(os.lstat(self._p(path)))

    @_oserror
    def chmod(self, path, mode):
        os.chmod(self._p(path), mode)

    @_oserror
    def chown(self, path, uid, gid):
        os.lchown(self._p(path), uid, gid)

    @_oserror
    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh.fh, length)
        else:
            os.truncate(self._p(path), length)

    @_oserror
    def utimens(self, path, times=None):
        full = self._p(path)
        if times is None:
            os.utime(full, follow_symlinks=False)
            return
        atime, mtime = times
        if UTIME_OMIT in (atime, mtime):
            st = os.lstat(full)
            atime = st.st_atime_ns if atime == UTIME_OMIT else atime
            mtime = st.st_mtime_ns if mtime == UTIME_OMIT else mtime
        if UTIME_NOW in (atime, mtime):
            now = time.time_ns()
            atime = now if atime == UTIME_NOW else atime
            mtime = now if mtime == UTIME_NOW else mtime
        os.utime(full, ns=(atime, mtime), follow_symlinks=False)

    @_oserror
    def statfs(self, path):
        st = os.statvfs(self._p(path))
        return {k: getattr(st, k) for k in _STATVFS_FIELDS}

    # -- namespace --------------------------------------------------------------------------

    @_oserror
    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._p(path))]

    @_oserror
    def mkdir(self, path, mode):
        full = self._p(path)
        os.mkdir(full, mode)
        self._own(full)

    @_oserror
    def rmdir(self, path):
        os.rmdir(self._p(path))

    @_oserror
    def unlink(self, path):
        os.unlink(self._p(path))

    @_oserror
    def rename(self, old, new):
        os.rename(self._p(old), self._p(new))

    @_oserror
    def symlink(self, target, source):  # fusepy: `target` is the new link, `source` its text
        full = self._p(target)
        os.symlink(source, full)
        self._own(full)

    @_oserror
    def readlink(self, path):
        return os.readlink(self._p(path))

    @_oserror
    def link(self, target, source):  # fusepy: `target` is the new name of `source`
        os.link(self._p(source), self._p(target))

    @_oserror
    def mknod(self, path, mode, dev):
        full = self._p(path)
        os.mknod(full, mode, dev)
        self._own(full)

    # -- files ------------------------------------------------------------------------------
    # Writes go at the offset the kernel sends, so O_APPEND is never passed to the backing
    # file (pwrite on an O_APPEND descriptor would append regardless of the offset).

    @_oserror
    def create(self, path, mode, fi):
        fd = os.open(self._p(path), (fi.flags & ~os.O_APPEND) | os.O_CREAT, mode)
        try:
            self._own(None, fd)
        except OSError:
            os.close(fd)
            raise
        fi.fh = fd

    @_oserror
    def open(self, path, fi):
        fi.fh = os.open(self._p(path), fi.flags & ~(os.O_APPEND | os.O_CREAT))

    @_oserror
    def read(self, path, size, offset, fi):
        return os.pread(fi.fh, size, offset)

    @_oserror
    def write(self, path, data, offset, fi):
        return os.pwrite(fi.fh, data, offset)

    def flush(self, path, fi):
        return 0  # every write already reached the backing file; nothing is buffered here

    @_oserror
    def release(self, path, fi):
        os.close(fi.fh)

    @_oserror
    def fsync(self, path, datasync, fi):
        if datasync:
            os.fdatasync(fi.fh)
        else:
            os.fsync(fi.fh)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Minimal fusepy passthrough of BACKING at "
                                "MOUNTPOINT (foreground); options: docs/fuse-and-performance.md.")
    p.add_argument("backing")
    p.add_argument("mountpoint")
    p.add_argument("--nothreads", action="store_true", help="single-threaded libfuse loop")
    p.add_argument("--debug", action="store_true", help="libfuse debug output")
    p.add_argument("-o", dest="options", default="", metavar="OPT[,OPT...]",
                   help="override or add FUSE options, e.g. -o attr_timeout=0,"
                        "negative_timeout=0 (to measure what a choice of fusefs costs)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.backing) or not os.path.isdir(args.mountpoint):
        p.error("BACKING and MOUNTPOINT must be existing directories")
    logging.basicConfig(level=logging.WARNING)
    os.umask(0)  # the kernel already applied the caller's umask to the modes it sends
    options = dict(MOUNT_OPTIONS, allow_other=os.geteuid() == 0)
    for item in filter(None, (o.strip() for o in args.options.split(","))):
        key, sep, value = item.partition("=")
        options[key] = value if sep else True
    FUSE(Passthrough(args.backing), os.path.abspath(args.mountpoint), raw_fi=True,
         foreground=True, nothreads=args.nothreads, debug=args.debug, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
