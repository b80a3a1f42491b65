#!/usr/bin/env python3
"""The floor of a fusepy filesystem: everything answered from memory, nothing behind it.

    python benchmarks/floor.py STATE MOUNTPOINT [--no-dtype] [--debug] [-o OPTS]

Serves a filesystem held in this process's memory at MOUNTPOINT, in the foreground, until
it is unmounted (`fusermount -u MOUNTPOINT`; SIGINT/SIGTERM unmount it too). Whatever a
fusepy filesystem does on top of this (a disk, a network, a journal) can only make it
slower, so on a row of benchmarks/compare.py where another filesystem beats this one, no
filesystem on fusepy + libfuse 2 can catch up: the cost is in the stack itself.

State: one tree of `Node`s (files hold their bytes in a bytearray, directories a dict of
their children and, once listed, the prebuilt list of their entries), a dict from every
path to its node, and the table of open handles. The whole tree is written to STATE with
pickle when the filesystem is unmounted (a temporary file, then renamed over STATE) and
read back from it at the next mount, so a "cold" step (unmount, drop the page cache,
mount) finds the same tree. A crash or kill -9 loses every change since the last clean
unmount; fsync does nothing (there is nothing to make durable before the unmount). Exit
status: 0 after a clean unmount with STATE written, 1 when writing it failed.

Invariants: `paths` maps exactly the paths of the nodes reachable from the root; a
directory's `entries` list is either None or equal to its children (names, inode numbers
and file types); every change to the tree holds `_mutex`.

FUSE glue and options, as fusefs mounts (fusefs/fuse_glue.py, fusefs/fuse_ops.py):

  glue       fusefs's `fuse_glue.Mount`: lasting Python thread states for libfuse's
             threads, getattr written with one struct.pack_into, getxattr answered without
             raising, reads and writes without fusepy's copies. readdir is its own here
             (below).
  options    `fuse_ops.mount_options(cache_attributes=True)`, i.e. fusefs's read-write mount
             on a kernel with openat2 RESOLVE_CACHED: use_ino, default_permissions,
             allow_other (as root), big_writes, max_write=max_read=131072,
             attr_timeout=entry_timeout=negative_timeout=60; multi-threaded; fsname and
             subtype "floor". No kernel_cache option, like fusefs.
  flags      use_ns, flag_utime_omit_ok, as fusefs; not flag_nullpath_ok (libfuse renames
             an open file that is unlinked to a hidden name, which this handles as any).

Differences from fusefs, each in favour of this one (it is a floor):
  - keep_cache is set on every open of a file with one name (fusefs keeps the page cache
    only when the file did not change since this path last opened it);
  - (not a difference since fusefs's c1867d8) readdir gives each entry's file type with
    its inode number, so `find` learns from the listing which entries are directories and
    looks nothing else up; fusefs's glue set only the inode number before. `--no-dtype`
    leaves the types out, as fusefs did then, to measure what they are worth.
  - hard links are supported, but nothing refreshes the kernel's attributes of a file's
    other names after a change (fusefs's AttrRefresher does): correct for the benchmark's
    workloads, which never change a hard-linked file.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import pickle
import stat
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from fuse import FuseOSError, Operations, c_stat, fuse_get_context  # noqa: E402

from fusefs.fuse_glue import Mount  # noqa: E402
from fusefs.fuse_ops import mount_options  # noqa: E402

log = logging.getLogger("floor")
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
BLKSIZE = 131072  # what fusefs reports as st_blksize
ROOT_INO = 1


class Node:
    """One inode. `data`: the bytes of a file (bytearray), the target of a symlink (str),
    None otherwise; `children`: name -> Node for a directory, else None; `entries`: the
    directory's prebuilt readdir answer, None when it must be built again; `attrs`: the
    getattr tuple, None when it must be built again (every change sets both to None)."""

    __slots__ = ("ino", "mode", "nlink", "uid", "gid", "rdev", "atime", "mtime", "ctime",
                 "data", "children", "entries", "attrs")

    def __init__(self, ino: int, mode: int, uid: int, gid: int, rdev: int = 0):
        now = time.time_ns()
        self.ino, self.mode, self.uid, self.gid, self.rdev = ino, mode, uid, gid, rdev
        self.atime = self.mtime = self.ctime = now
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.data = bytearray() if stat.S_ISREG(mode) else None
        self.children = {} if stat.S_ISDIR(mode) else None
        self.entries = None
        self.attrs = None

    def __getstate__(self):  # the caches are not saved
        return {k: getattr(self, k) for k in self.__slots__ if k not in ("entries", "attrs")}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)
        self.entries = self.attrs = None

    def size(self) -> int:
        if self.children is not None:
            return len(self.children)
        return len(self.data) if self.data is not None else 0

    def attributes(self) -> tuple:
        """(ino, mode, nlink, uid, gid, rdev, size, blksize, blocks, atime, mtime, ctime),
        the order fusefs's glue writes into struct stat; cached until the next change."""
        a = self.attrs
        if a is None:
            size = self.size()
            a = self.attrs = (self.ino, self.mode, self.nlink, self.uid, self.gid, self.rdev,
                              size, BLKSIZE, (size + 511) // 512, self.atime, self.mtime,
                              self.ctime)
        return a

    def changed(self, data: bool = False) -> None:
        now = time.time_ns()
        self.ctime = now
        if data:
            self.mtime = now
        self.attrs = None


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent or "/", name


def _fail(code: int):
    raise FuseOSError(code)


class Floor(Operations):
    """The in-memory filesystem (see the module docstring for its state and invariants)."""

    use_ns = True
    flag_utime_omit_ok = 1

    def __init__(self, state_path: str, dtype: bool = True):
        self.state_path = state_path
        self.dtype = dtype  # readdir reports file types (see the module docstring)
        self._mutex = threading.Lock()  # (`lock` is a FUSE operation's name)
        self.handles: dict[int, Node] = {}
        self.next_fh = 1
        self.saved = False
        self.next_ino, root = self._load()
        self.paths: dict[str, Node] = {}
        self._index("/", root)

    # -- persistence ----------------------------------------------------------------------

    def _load(self) -> tuple[int, Node]:
        try:
            with open(self.state_path, "rb") as f:
                return pickle.load(f)
        except FileNotFoundError:
            uid, gid = os.geteuid(), os.getegid()
            return ROOT_INO + 1, Node(ROOT_INO, stat.S_IFDIR | 0o755, uid, gid)

    def _index(self, path: str, node: Node) -> None:
        """Enter node and everything under it into `paths`, node at `path`."""
        self.paths[path] = node
        if node.children:
            prefix = path.rstrip("/") + "/"
            for name, child in node.children.items():
                self._index(prefix + name, child)

    def _unindex(self, path: str, node: Node) -> None:
        del self.paths[path]
        if node.children:
            prefix = path + "/"
            for name, child in node.children.items():
                self._unindex(prefix + name, child)

    def destroy(self, path) -> None:
        """Unmounted: write the tree to STATE (temporary file, fsync, rename)."""
        tmp = self.state_path + ".tmp"
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                pickle.dump((self.next_ino, self.paths["/"]), f, protocol=5)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
            self.saved = True
        except Exception:  # noqa: BLE001 - reported by the exit status
            log.exception("could not save the tree to %s", self.state_path)

    # -- the error policy -----------------------------------------------------------------

    def __call__(self, op, *args):
        """fusepy calls every operation through here: an OSError goes on as its errno,
        anything else is logged and answered EIO (fusepy itself would answer EINVAL)."""
        try:
            return getattr(self, op)(*args)
        except OSError:
            raise
        except Exception:  # noqa: BLE001 - the policy: logged, EIO, never an escape
            log.exception("unexpected error in %s%r; answered EIO", op, args[:2])
            raise FuseOSError(errno.EIO) from None

    # -- lookups --------------------------------------------------------------------------

    def _node(self, path: str) -> Node:
        node = self.paths.get(path)
        return node if node is not None else _fail(errno.ENOENT)

    def _dir(self, path: str) -> Node:
        node = self._node(path)
        return node if node.children is not None else _fail(errno.ENOTDIR)

    def attributes(self, path, fi=None) -> tuple:
        """fuse_glue.Mount's getattr: the tuple of the node at path (or of the handle)."""
        if fi is not None and fi.fh:
            return self.handles[fi.fh].attributes()
        return self._node(path).attributes()

    def getattr(self, path, fh=None):  # fusepy's form, for completeness (the glue uses the above)
        keys = ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                "st_blksize", "st_blocks", "st_atime", "st_mtime", "st_ctime")
        return dict(zip(keys, self.attributes(path, fh)))

    def entries(self, path) -> list:
        """readdir's answer: [(name bytes, c_stat or None)], prebuilt once per change."""
        node = self._dir(path)
        listing = node.entries
        if listing is None:
            with self._mutex:
                listing = node.entries = [(b".", None), (b"..", None)] + [
                    (name.encode("latin-1"), self._dirent(child))
                    for name, child in node.children.items()]
        return listing

    def _dirent(self, node: Node):
        st = c_stat()
        st.st_ino = node.ino
        if self.dtype:
            st.st_mode = stat.S_IFMT(node.mode)
        return st

    def xattr_value(self, path, name) -> bytes:
        raise FuseOSError(errno.ENODATA)

    def readlink(self, path):
        node = self._node(path)
        return node.data if stat.S_ISLNK(node.mode) else _fail(errno.EINVAL)

    def statfs(self, path):
        files = len(self.paths)
        return {"f_bsize": BLKSIZE, "f_frsize": 4096, "f_blocks": 1 << 24, "f_bfree": 1 << 23,
                "f_bavail": 1 << 23, "f_files": files + (1 << 20), "f_ffree": 1 << 20,
                "f_favail": 1 << 20, "f_namemax": 255}

    # -- the namespace --------------------------------------------------------------------

    def _add(self, path: str, mode: int, rdev: int = 0) -> Node:
        """A new node at path (its parent must be a directory without that name)."""
        parent_path, name = _split(path)
        uid, gid, _ = fuse_get_context()
        with self._mutex:
            parent = self._dir(parent_path)
            if name in parent.children:
                _fail(errno.EEXIST)
            node = Node(self.next_ino, mode, uid, gid, rdev)
            self.next_ino += 1
            self._link(parent, name, node)
            self.paths[path] = node
        return node

    @staticmethod
    def _link(parent: Node, name: str, node: Node) -> None:
        parent.children[name] = node
        parent.entries = None
        if node.children is not None:
            parent.nlink += 1
        parent.changed(data=True)

    @staticmethod
    def _unlink(parent: Node, name: str) -> Node:
        node = parent.children.pop(name)
        parent.entries = None
        if node.children is not None:
            parent.nlink -= 1
        parent.changed(data=True)
        node.nlink -= 1 if node.children is None else 2
        node.changed()
        return node

    def mkdir(self, path, mode):
        self._add(path, stat.S_IFDIR | (mode & 0o7777))

    def mknod(self, path, mode, dev):
        self._add(path, mode, dev)

    def symlink(self, target, source):  # fusepy: `target` is the new link, `source` its text
        self._add(target, stat.S_IFLNK | 0o777).data = source

    def link(self, target, source):  # fusepy: `target` is the new name of `source`
        parent_path, name = _split(target)
        with self._mutex:
            node, parent = self._node(source), self._dir(parent_path)
            if node.children is not None:
                _fail(errno.EPERM)
            if name in parent.children:
                _fail(errno.EEXIST)
            self._link(parent, name, node)
            node.nlink += 1
            node.changed()
            self.paths[target] = node

    def unlink(self, path):
        parent_path, name = _split(path)
        with self._mutex:
            parent, node = self._dir(parent_path), self._node(path)
            if node.children is not None:
                _fail(errno.EISDIR)
            self._unlink(parent, name)
            del self.paths[path]

    def rmdir(self, path):
        parent_path, name = _split(path)
        with self._mutex:
            parent, node = self._dir(parent_path), self._dir(path)
            if node.children:
                _fail(errno.ENOTEMPTY)
            self._unlink(parent, name)
            del self.paths[path]

    def rename(self, old, new):
        (old_parent_path, old_name), (new_parent_path, new_name) = _split(old), _split(new)
        with self._mutex:
            node = self._node(old)
            old_parent, new_parent = self._dir(old_parent_path), self._dir(new_parent_path)
            if node.children is not None and (new + "/").startswith(old.rstrip("/") + "/"):
                _fail(errno.EINVAL)  # into itself
            victim = self.paths.get(new)
            if victim is node:
                return
            if victim is not None:
                self._check_replace(node, victim)
                self._unlink(new_parent, new_name)
                self._unindex(new, victim)
            self._unlink(old_parent, old_name)
            node.nlink += 1 if node.children is None else 2
            self._unindex(old, node)
            self._link(new_parent, new_name, node)
            self._index(new, node)

    @staticmethod
    def _check_replace(node: Node, victim: Node) -> None:
        if victim.children is not None:
            if node.children is None:
                _fail(errno.EISDIR)
            if victim.children:
                _fail(errno.ENOTEMPTY)
        elif node.children is not None:
            _fail(errno.ENOTDIR)

    # -- attributes -----------------------------------------------------------------------

    def chmod(self, path, mode):
        node = self._node(path)
        with self._mutex:
            node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
            node.changed()

    def chown(self, path, uid, gid):
        node = self._node(path)
        with self._mutex:
            if uid != -1 and uid != 0xFFFFFFFF:
                node.uid = uid
            if gid != -1 and gid != 0xFFFFFFFF:
                node.gid = gid
            node.changed()

    def utimens(self, path, times=None):
        node = self._node(path)
        now = time.time_ns()
        atime, mtime = times if times is not None else (now, now)
        with self._mutex:
            if atime != UTIME_OMIT:
                node.atime = now if atime == UTIME_NOW else atime
            if mtime != UTIME_OMIT:
                node.mtime = now if mtime == UTIME_NOW else mtime
            node.changed()

    def truncate(self, path, length, fi=None):
        node = self.handles[fi.fh] if fi is not None and fi.fh else self._node(path)
        if node.data is None or isinstance(node.data, str):
            _fail(errno.EISDIR if node.children is not None else errno.EINVAL)
        with self._mutex:
            self._resize(node, length)
            node.changed(data=True)

    @staticmethod
    def _resize(node: Node, length: int) -> None:
        data = node.data
        if length < len(data):
            del data[length:]
        else:
            data.extend(bytes(length - len(data)))

    def fallocate(self, path, mode, offset, length, fh):  # registers the op; the glue
        self.allocate(path, mode, offset, length, fh)     # calls allocate itself

    def allocate(self, path, mode, offset, length, fh) -> None:
        """fallocate: mode 0 (and KEEP_SIZE, a no-op here) only."""
        if mode & ~1:
            _fail(errno.EOPNOTSUPP)
        node = self.handles[fh]
        with self._mutex:
            if not mode & 1 and offset + length > len(node.data):
                self._resize(node, offset + length)
                node.changed(data=True)

    # -- files ----------------------------------------------------------------------------

    def _handle(self, node: Node, fi) -> None:
        with self._mutex:
            fi.fh, self.next_fh = self.next_fh, self.next_fh + 1
            self.handles[fi.fh] = node
        fi.keep_cache = 1 if node.nlink == 1 else 0

    def create(self, path, mode, fi):
        self._handle(self._add(path, stat.S_IFREG | (mode & 0o7777)), fi)

    def open(self, path, fi):
        node = self._node(path)
        if node.data is None or isinstance(node.data, str):
            _fail(errno.EISDIR if node.children is not None else errno.EINVAL)
        self._handle(node, fi)

    def read(self, path, size, offset, fi):
        return bytes(self.handles[fi.fh].data[offset:offset + size])

    def read_pieces(self, path, size, offset, fi):
        """What fusefs's glue asks for (it copies the pieces into the kernel's buffer)."""
        return (self.read(path, size, offset, fi),)

    def write(self, path, data, offset, fi):
        node = self.handles[fi.fh]
        with self._mutex:
            buf = node.data
            if offset > len(buf):
                buf.extend(bytes(offset - len(buf)))
            buf[offset:offset + len(data)] = data
            node.changed(data=True)
        return len(data)

    def flush(self, path, fi):
        return 0

    def fsync(self, path, datasync, fi):
        return 0  # nothing is durable before the unmount (module docstring)

    def release(self, path, fi):
        with self._mutex:
            self.handles.pop(fi.fh, None)
        return 0


class FloorMount(Mount):
    """fusefs's glue, with a readdir that hands libfuse prebuilt stat buffers."""

    def readdir(self, path, buf, filler, offset, fip):
        name = None if path is None else path.decode(self.encoding)
        try:
            listing = self.operations.entries(name)
        except FuseOSError as e:
            return -e.errno
        except Exception:  # noqa: BLE001 - the policy: logged, EIO
            log.exception("unexpected error in readdir(%r); answered EIO", name)
            return -errno.EIO
        for entry, st in listing:
            if filler(buf, entry, st, 0) != 0:
                break
        return 0


def options_for(extra: str) -> dict:
    """fusefs's read-write mount options, renamed, with `-o` overrides applied."""
    options = mount_options(cache_attributes=True)
    options.update(fsname="floor", subtype="floor")
    options.pop("ro", None)
    for item in filter(None, (o.strip() for o in extra.split(","))):
        key, sep, value = item.partition("=")
        options[key] = value if sep else True
    return options


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="floor.py",
        description="An in-memory fusepy filesystem with fusefs's FUSE glue and options: "
                    "the fastest a filesystem on fusepy + libfuse 2 can be. Serves in the "
                    "foreground until unmounted; the tree is saved to STATE at unmount and "
                    "loaded from it at mount.",
        epilog="Exit status 0 after a clean unmount with STATE written, 1 when it could "
               "not be written (the log says why), 2 on bad usage.")
    p.add_argument("state", help="file the tree is loaded from (if it exists) and saved to")
    p.add_argument("mountpoint", help="an existing directory")
    p.add_argument("--no-dtype", dest="dtype", action="store_false",
                   help="report no file types in readdir, as fusefs did before c1867d8 "
                        "(to measure what they are worth to find)")
    p.add_argument("--debug", action="store_true", help="libfuse debug output")
    p.add_argument("-o", dest="options", default="", metavar="OPT[,OPT...]",
                   help="override or add FUSE options, e.g. -o entry_timeout=0")
    args = p.parse_args(argv)
    if not os.path.isdir(args.mountpoint):
        p.error(f"{args.mountpoint} is not a directory: create it first")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s floor %(message)s")
    os.umask(0)  # the kernel already applied the caller's umask to the modes it sends
    fs = Floor(os.path.abspath(args.state), dtype=args.dtype)
    mountpoint = os.fsencode(os.path.abspath(args.mountpoint)).decode("latin-1")
    FloorMount(fs, mountpoint, raw_fi=True, foreground=True, encoding="latin-1",
               debug=args.debug, **options_for(args.options))
    return 0 if fs.saved else 1


if __name__ == "__main__":
    sys.exit(main())
