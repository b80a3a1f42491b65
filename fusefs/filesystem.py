"""POSIX semantics on inode numbers: no FUSE, no HTTP.

`Filesystem` answers every call the FUSE adapter makes, raising `FsError(errno)` for
POSIX failures and `StorageError` when block servers fail. Names are bytes. It owns the
namespace, attributes, extended attributes and open handles; metadata calls go to the
local SQLite database only. File data is delegated: `DataPath` (filedata.py) reads and
changes the live `FileData` of each open file (dirty blocks in memory, clean blocks
through the block cache), and the flusher uploads it.

The adapter's refresh of a hard-linked file's other names (nested GETATTR calls back into
this class, see kernel_attrs.py) starts only after the change returned, with no lock held.
The order of all locks: docs/filesystem.md, "Lock order".
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass

from . import replicas
from .errors import Fenced, FsError
from .filedata import DataPath, FileData
from .flusher import Flusher
from .metadata import ROOT_INO, Inode, Metadata, now_ns
from .siblings import DirectoryReadAhead

NAME_MAX = 255
XATTR_MAX = 65536
XATTR_CREATE, XATTR_REPLACE = 1, 2
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


@dataclass
class Handle:
    """An open file description: the inode, its live state (held open by this handle) and
    the open flags."""

    ino: int
    live: FileData
    flags: int


class Filesystem:
    """The POSIX core: namespace, attributes, xattrs and handles, with file data delegated
    to `data` (a DataPath). `_ns` makes a namespace change's checks and change one step;
    `_handles_lock` and `_space_lock` protect the handle table and the statfs sample."""

    def __init__(self, metadata: Metadata, cache, flusher: Flusher, block_size: int, *,
                 capacity=None, readahead_blocks: int = 4, sync_on_close: bool = False,
                 gate=None, durable=None, read_only: str | None = None, changes=None,
                 room=None):
        self.metadata = metadata
        # Asked before a change that adds a name or an attribute (`room.check()`): the
        # local disk under the metadata database (fusefs/localroom.py). None: not asked.
        self.room = room
        self.flusher = flusher
        self.data = DataPath(metadata, cache, flusher, block_size, readahead_blocks)
        # read-ahead across the files of a directory read in name order (tar, cp -r, ...)
        self.siblings = DirectoryReadAhead(metadata, cache) if readahead_blocks else None
        self.capacity = capacity or (lambda: (1 << 50, 1 << 50))  # (total, free) bytes
        self.sync_on_close = sync_on_close  # close(2) of a writer waits as fsync does
        # fsync's last step: the journal's wait on a mount, a local fsync without one
        self.durable = durable or metadata.sync
        self.read_only = read_only  # why changes are refused, when they are
        # Asked before each change (`gate.check_writable()`): the writer lease, which raises
        # Fenced (EROFS) once it is lost. None: always writable.
        self.gate = gate
        self._listeners: list = []  # called after external_change
        self._ns = threading.Lock()
        # Inodes other than directories with more than one name: the adapter keeps the
        # kernel's view of their other names right after each change. Changed under _ns.
        self._linked: set[int] = metadata.multi_linked()
        self._handles: dict[int, Handle] = {}  # guarded by _handles_lock
        self._handles_lock = threading.Lock()
        self._next_fh = 1
        # statfs: ((total, free) last reported, data stored when it was taken, data stored
        # at the last call). Guarded by _space_lock.
        self._space: tuple | None = None
        self._space_lock = threading.Lock()
        if changes is not None:  # last: a follower may call external_change at once
            changes.subscribe(self.external_change)

    def start(self) -> None:
        """Finish what a previous run could not: inodes unlinked while open are removed."""
        for ino in self.metadata.orphans():
            self.metadata.remove_inode(ino)

    def shutdown(self, progress=None) -> None:
        self.flusher.flush_all(progress)
        self.metadata.sync()

    # -- attributes -------------------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        """The inode's attributes as applications see them: a live file's size, times and
        stored bytes come from its FileData."""
        live = self.flusher.live(ino)
        if live is None:
            return self._stored_inode(ino)
        with live.lock:  # the metadata's rows and the FileData agree under it (commits)
            inode = self._stored_inode(ino)  # ours: metadata.inode() makes one each call
            inode.size, inode.mtime_ns = live.size, live.mtime_ns
            inode.ctime_ns = live.ctime_ns
            inode.stored = self.data.stored(live, inode.stored)
        return inode

    def _stored_inode(self, ino: int) -> Inode:
        """The inode as the metadata holds it (ENOENT if none): enough where a live file's
        size and times do not matter (its mode, owner, xattrs)."""
        inode = self.metadata.inode(ino)
        if inode is None:
            raise FsError(errno.ENOENT, f"inode {ino} does not exist")
        return inode

    def _kind(self, ino: int) -> tuple[int, int]:
        """(mode, link count) of an inode (ENOENT if none): all that unlink, rmdir and
        rename need to know of the inodes they remove or replace, for less than `_inode`."""
        found = self.metadata.kind(ino)
        if found is None:
            raise FsError(errno.ENOENT, f"inode {ino} does not exist")
        return found

    def getattr(self, ino: int) -> Inode:
        return self._inode(ino)

    def lookup(self, parent: int, name: bytes) -> Inode:
        return self._inode(self.lookup_ino(parent, name))

    def lookup_ino(self, parent: int, name: bytes) -> int:
        """`lookup`'s inode number alone, for resolving a path: no attributes read (the
        caller asks for them if it needs them, as GETATTR does)."""
        ino = self.metadata.lookup(parent, name)
        if ino is None:
            self._dir(parent)  # ENOTDIR beats ENOENT
            raise FsError(errno.ENAMETOOLONG if len(name) > NAME_MAX else errno.ENOENT)
        return ino

    def has_other_names(self, ino: int) -> bool:
        """Whether the inode is a file with more than one name (a hard link)."""
        return ino in self._linked

    def has_hard_links(self) -> bool:
        """Whether any file has more than one name (most filesystems: none)."""
        return bool(self._linked)

    def paths(self, ino: int) -> list[bytes]:
        """Every path naming an inode, from the root ("/a/b"); [] if it has none. Each
        directory's path is looked up once, however many of the names it holds."""
        found = []
        prefixes: dict[int, bytes | None] = {ROOT_INO: b""}
        for parent, name in self.metadata.names(ino):
            if parent not in prefixes:
                prefixes[parent] = self._dir_path(parent)
            if prefixes[parent] is not None:
                found.append(prefixes[parent] + b"/" + name)
        return found

    def _dir_path(self, ino: int) -> bytes | None:
        """The path of a directory ("/a/b"), or None if it is not reachable (it raced a
        removal or a move)."""
        parts, seen = [], set()
        while ino != ROOT_INO:
            up = self.metadata.names(ino)
            if not up or ino in seen:
                return None
            seen.add(ino)
            ino, name = up[0]
            parts.append(name)
        return b"".join(b"/" + p for p in reversed(parts))

    def _dir(self, ino: int) -> Inode:
        inode = self._inode(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        return inode

    def setattr(self, ino: int, *, mode=None, uid=None, gid=None, size=None,
                atime_ns=None, mtime_ns=None) -> Inode:
        self._writable()
        inode = self._inode(ino)
        t = now_ns()
        if size is not None:
            if inode.is_dir:
                raise FsError(errno.EISDIR)
            if size < 0:
                raise FsError(errno.EINVAL)
            self.data.truncate(ino, size)
        fields = self._attr_fields(inode, mode, uid, gid, atime_ns, mtime_ns)
        if fields or size is not None:
            fields["ctime_ns"] = t
            self._set_attrs(ino, fields)
        return self._inode(ino)

    @staticmethod
    def _attr_fields(inode: Inode, mode, uid, gid, atime_ns, mtime_ns) -> dict:
        """The metadata fields a setattr changes (-1 for uid or gid: unchanged)."""
        fields = {}
        if mode is not None:
            fields["mode"] = (inode.mode & ~0o7777) | (mode & 0o7777)
        if uid is not None and uid != -1:
            fields["uid"] = uid
        if gid is not None and gid != -1:
            fields["gid"] = gid
        if atime_ns is not None:
            fields["atime_ns"] = atime_ns
        if mtime_ns is not None:
            fields["mtime_ns"] = mtime_ns
        return fields

    def _set_attrs(self, ino: int, fields: dict) -> None:
        """Record attribute changes. An open file's live times follow, under its lock held
        around the record, so that an upload's commit never records the older ones."""
        live = self.flusher.live(ino)
        if live is None:
            self.metadata.set_attrs(ino, **fields)
            return
        with live.lock:
            live.ctime_ns = fields["ctime_ns"]
            if "mtime_ns" in fields:
                live.mtime_ns = fields["mtime_ns"]
            self.metadata.set_attrs(ino, **fields)

    # -- namespace --------------------------------------------------------------------------

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if not name or b"/" in name or name in (b".", b".."):
            raise FsError(errno.EINVAL)

    def _new(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
             target: bytes | None = None) -> Inode:
        self._writable()
        self._check_name(name)
        short = self._short_of_room()
        with self._ns:
            directory = self._dir(parent)
            if self.metadata.lookup(parent, name) is not None:
                raise FsError(errno.EEXIST)
            if short is not None:
                raise short
            if directory.mode & stat.S_ISGID:  # BSD group semantics of a setgid directory
                gid = directory.gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            return self.metadata.create(parent, name, mode, uid, gid, rdev, target)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        return self._new(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int,
              gid: int) -> Inode:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        return self._new(parent, name, mode, uid, gid, rdev)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        if len(target) > 4095:
            raise FsError(errno.ENAMETOOLONG)
        return self._new(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def readlink(self, ino: int) -> bytes:
        inode = self._inode(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL)
        return inode.target or b""

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        self._writable()
        self._check_name(name)
        short = self._short_of_room()
        with self._ns:
            if self._inode(ino).is_dir:
                raise FsError(errno.EPERM, "hard links to directories are not allowed")
            self._dir(parent)
            if self.metadata.lookup(parent, name) is not None:
                raise FsError(errno.EEXIST)
            if short is not None:
                raise short
            self.metadata.link(ino, parent, name)
            self._linked.add(ino)
            self._ctime_changed(ino)
        return self._inode(ino)

    def unlink(self, parent: int, name: bytes) -> None:
        self._writable()
        with self._ns:
            ino = self.metadata.lookup(parent, name)
            if ino is None:
                self._dir(parent)
                raise FsError(errno.ENOENT)
            mode, nlink = self._kind(ino)
            if stat.S_ISDIR(mode):
                raise FsError(errno.EISDIR)
            # The last name of a file nobody has open: one record removes both.
            last = nlink <= 1 and not self._is_open(ino)
            left = self.metadata.unlink(parent, name, ino, False, remove=last)
            self._unlinked(ino, left)
            if not last:
                self._ctime_changed(ino)
        if left == 0:
            self._release_inode(ino, removed=last)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._writable()
        if name == b".":
            raise FsError(errno.EINVAL)
        with self._ns:
            ino = self.metadata.lookup(parent, name)
            if ino is None:
                self._dir(parent)
                raise FsError(errno.ENOENT)
            if not stat.S_ISDIR(self._kind(ino)[0]):
                raise FsError(errno.ENOTDIR)
            if self.metadata.has_children(ino):
                raise FsError(errno.ENOTEMPTY)
            self.metadata.unlink(parent, name, ino, True, remove=True)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int,
               new_name: bytes) -> bool:
        """Move a name; returns whether it named a directory (the adapter's path cache
        must then forget the whole subtree)."""
        self._writable()
        self._check_name(new_name)
        with self._ns:
            ino = self.metadata.lookup(old_parent, old_name)
            if ino is None:
                self._dir(old_parent)
                raise FsError(errno.ENOENT)
            self._dir(new_parent)
            is_dir = stat.S_ISDIR(self._kind(ino)[0])
            existing = self.metadata.lookup(new_parent, new_name)
            if existing == ino:
                return is_dir  # two names of one inode: POSIX says do nothing
            if is_dir and self.metadata.is_ancestor(ino, new_parent):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
            replaced_is_dir = False
            if existing is not None:
                replaced_is_dir = stat.S_ISDIR(self._kind(existing)[0])
                if is_dir and not replaced_is_dir:
                    raise FsError(errno.ENOTDIR)
                if not is_dir and replaced_is_dir:
                    raise FsError(errno.EISDIR)
                if replaced_is_dir and self.metadata.has_children(existing):
                    raise FsError(errno.ENOTEMPTY)
            left = self.metadata.rename(old_parent, old_name, new_parent, new_name, ino,
                                        is_dir, existing, replaced_is_dir)
            if existing is not None:
                self._unlinked(existing, left)
            self._ctime_changed(ino)
            self._ctime_changed(existing)
        if existing is not None and left == 0:
            self._release_inode(existing)
        return is_dir

    def _unlinked(self, ino: int, left: int) -> None:
        """A file lost a name (caller holds _ns). While open, a descriptor of the lost name
        still changes it, so it stays in _linked until its last close."""
        if left <= 1 and not self._is_open(ino):
            self._linked.discard(ino)

    def is_open(self, ino: int) -> bool:
        """Whether some descriptor has the inode open now."""
        return self._is_open(ino)

    def _is_open(self, ino: int) -> bool:
        live = self.flusher.live(ino)
        if live is None:
            return False
        with live.lock:
            return live.open_count > 0

    def _ctime_changed(self, ino: int | None) -> None:
        """The metadata moved an inode's ctime; an open file's live state must follow, or
        getattr (and the next upload) would show the older one."""
        live = self.flusher.live(ino) if ino is not None else None
        inode = self.metadata.inode(ino) if live is not None else None
        if inode is not None:
            with live.lock:
                live.ctime_ns = max(live.ctime_ns, inode.ctime_ns)

    def _release_inode(self, ino: int, removed: bool = False) -> None:
        """The inode lost its last name: remove it now, or at the last close if open.
        `removed`: the metadata already removed it (unlink did); forget its live state."""
        live = self.flusher.live(ino)
        if live is not None and not removed:
            with live.lock:
                if live.open_count > 0:
                    return  # still readable through open descriptors; removed at release
        if live is not None:
            self.flusher.drop(live)
        if not removed:
            self.metadata.remove_inode(ino)

    def readdir(self, ino: int) -> list[bytes]:
        """The names of the entries, without "." and "..", in name order. Names only: the
        kernel looks each one up when it needs more (joining the inodes here doubled the
        cost of listing a large directory)."""
        self._dir(ino)
        return self.metadata.child_names(ino)

    def readdir_entries(self, ino: int) -> list[tuple[bytes, int, int]]:
        """(name, inode number, file type) of each entry, as `readdir`: all from the query
        that lists the names (d_ino equals st_ino; the type, kept with each entry, lets
        `find` skip looking up what is not a directory), at no extra cost."""
        self._dir(ino)
        entries = self.metadata.child_entries(ino)
        if self.siblings is not None:
            self.siblings.listed(ino)
        return entries

    # -- open files -------------------------------------------------------------------------

    def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int,
               gid: int) -> tuple[Inode, int]:
        """The kernel sends CREATE for a name its lookup just found missing, so the new
        inode is tried first; a name that exists after all is opened (EEXIST with O_EXCL).
        A new file's attributes are those `_new` returns: nothing else has seen it yet."""
        try:
            inode = self._new(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)
        except FsError as e:  # EEXIST: created by someone else since the kernel's lookup
            if e.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            ino = self.lookup_ino(parent, name)
            fh = self.open(ino, flags)
            return self._inode(ino), fh
        return inode, self.open(inode.ino, flags, inode)

    def open(self, ino: int, flags: int, new: Inode | None = None) -> int:
        """`new`: the inode's attributes when the caller has just created it (nothing to
        read: it has no live state yet)."""
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._writable()
        inode = new if new is not None else self._inode(ino)
        if inode.is_dir and flags & os.O_ACCMODE != os.O_RDONLY:
            raise FsError(errno.EISDIR)
        while True:
            live = self.flusher.file(ino, new)
            with live.lock:
                if self.flusher.registered(live):  # not forgotten since file() returned it
                    live.open_count += 1
                    break
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY and inode.size:
            self.data.truncate(ino, 0)
        elif self.siblings is not None and flags & os.O_ACCMODE == os.O_RDONLY \
                and stat.S_ISREG(inode.mode):
            self.siblings.opened(ino)
        with self._handles_lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = Handle(ino, live, flags)
        return fh

    def handle_ino(self, fh: int) -> int:
        return self._handle(fh).ino

    now_ns = staticmethod(now_ns)

    def _handle(self, fh: int) -> Handle:
        with self._handles_lock:
            handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle

    def flush(self, fh: int) -> None:
        """close(2) of one descriptor: start the upload; report an earlier upload failure.
        With `sync_on_close`, a descriptor opened for writing returns only once the file
        is durable, exactly as after fsync (an upload failure is its error then)."""
        handle = self._handle(fh)
        live = handle.live
        if handle.flags & os.O_ACCMODE == os.O_RDONLY:
            self.flusher.request(live)
            return  # a reader wrote nothing: a writer's failed upload is not its error
        if self.sync_on_close:
            self.flusher.flush(live)
            self.durable()
            return
        self.flusher.request(live)
        with live.lock:
            failed = live.error if live.dirty else None
        if failed is not None:
            raise failed

    def release(self, fh: int) -> None:
        with self._handles_lock:
            handle = self._handles.pop(fh, None)
        if handle is None:
            return
        live = handle.live
        with live.lock:
            live.open_count -= 1
            last = live.open_count == 0
        if not last:
            return
        kind = self.metadata.kind(handle.ino)  # (mode, links): all this needs
        if handle.ino in self._linked:
            with self._ns:
                now = self.metadata.kind(handle.ino)
                if now is None or now[1] <= 1:
                    self._linked.discard(handle.ino)
        if kind is None or kind[1] <= 0:
            self.flusher.drop(live)
            if kind is not None:
                self.metadata.remove_inode(handle.ino)
            return
        self.flusher.request(live)
        self.flusher.forget_if_idle(live)

    def fsync(self, fh: int, datasync: bool = False) -> None:
        """Return only when the file's data is on W servers and its metadata is durable."""
        self.flusher.flush(self._handle(fh).live)
        self.durable()

    def fsyncdir(self) -> None:
        """A directory's entries are metadata: make every change so far durable."""
        self.durable()

    def _short_of_room(self) -> FsError | None:
        """ENOSPC, to raise once the call's other checks passed, if the local disk under
        the metadata is short of room (fusefs/localroom.py); asked outside `_ns` because
        it may look at the disk and shrink the disk cache."""
        if self.room is None:
            return None
        try:
            self.room.check()
        except FsError as e:
            return e
        return None

    def _writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS, self.read_only)
        if self.gate is not None:
            try:
                self.gate.check_writable()
            except Fenced as e:  # the lease is lost for good: read-only from now on
                self.read_only = str(e)
                raise FsError(errno.EROFS, str(e)) from None

    def subscribe(self, listener) -> None:
        """Call `listener()` after each external change (the adapter forgets its paths)."""
        self._listeners.append(listener)

    def external_change(self) -> None:
        """Another mount changed the metadata (a follower applied journal records): open
        files take their new size and block map, and listeners forget cached paths."""
        for live in self.flusher.live_files():
            inode = self.metadata.inode(live.ino)
            refs = self.metadata.block_refs(live.ino, 0, 2**62) if inode else {}
            with live.lock:
                if inode is not None and not live.dirty:
                    live.size, live.mtime_ns, live.ctime_ns = inode.size, inode.mtime_ns, \
                        inode.ctime_ns
                    live.refs = refs
        with self._ns:
            self._linked = self.metadata.multi_linked()
        for listener in self._listeners:
            listener()

    # -- data (DataPath does the work) ------------------------------------------------------

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return self.data.read(self._handle(fh).live, offset, size)

    def read_pieces(self, fh: int, offset: int, size: int) -> list:
        """`read` as a list of bytes-like pieces (DataPath.read_pieces)."""
        return self.data.read_pieces(self._handle(fh).live, offset, size)

    def write(self, fh: int, offset: int, data: bytes, append: bool = False) -> int:
        """Write `data` at `offset`, or with `append` (an O_APPEND write, not the kernel
        writing back mmap pages) at the file's end, whatever `offset` says."""
        self._writable()
        live = self._handle(fh).live
        if append:
            return self.data.append(live, data)
        return self.data.write(live, offset, data)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2). Mode 0 (and KEEP_SIZE alone) reserves nothing (blocks are stored
        as they are written) but succeeds, growing the file to offset+length if mode 0
        asks past its end; asking past the end for more than `df` shows free is ENOSPC,
        as on a local filesystem, with nothing changed. PUNCH_HOLE|KEEP_SIZE frees the
        range (`DataPath.punch`). ZERO_RANGE makes the range read as zeros the same way
        (a hole stores nothing) and, without KEEP_SIZE, grows the file to offset+length.
        Other modes: EOPNOTSUPP."""
        if offset < 0 or length <= 0:
            raise FsError(errno.EINVAL)
        handle = self._handle(fh)
        self._writable()
        if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            self.data.punch(handle.live, offset, offset + length)
            return
        if mode & ~FALLOC_FL_KEEP_SIZE not in (0, FALLOC_FL_ZERO_RANGE):
            raise FsError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} is not supported")
        size = self._inode(handle.ino).size
        wanted = offset + length - max(offset, size)  # the range past the end of the file
        space = self.statfs() if wanted > 0 else None
        if space and wanted > space["f_bavail"] * space["f_frsize"]:
            raise FsError(errno.ENOSPC, f"fallocate of {wanted} bytes past the end of the "
                                        "file: more than the filesystem has free")
        if mode & FALLOC_FL_ZERO_RANGE:
            self.data.punch(handle.live, offset, offset + length)
        if not mode & FALLOC_FL_KEEP_SIZE and offset + length > size:
            self.setattr(handle.ino, size=offset + length)

    # -- extended attributes ----------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        # The kernel asks for security.capability before every write: this stays cheap.
        inode = self._stored_inode(ino)
        if name == replicas.NAME:  # computed, never stored: ENODATA for all but files
            if not stat.S_ISREG(inode.mode):
                raise FsError(errno.ENODATA)
            live = self.flusher.live(ino)
            pending = []
            if live is not None:
                with live.lock:
                    pending = list(live.dirty)
            refs = self.metadata.block_refs(ino, 0, 2**62)
            return replicas.report(self.flusher.store, refs, pending).encode()
        value = self.metadata.xattr(ino, name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        """The stored attributes; never `user.fusefs.replicas`, so that copying tools
        (cp -a, rsync -X) do not try to copy it."""
        self._stored_inode(ino)
        return [n for n in self.metadata.xattr_names(ino) if n != replicas.NAME]

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if name == replicas.NAME:
            raise FsError(errno.EPERM, "user.fusefs.replicas is computed, read-only")
        self._writable()
        self._stored_inode(ino)
        if name.startswith(b"system."):
            # POSIX ACLs and other kernel-defined attributes would need the kernel to act on
            # them; refusing makes tools (cp -a, tar, rsync -A) fall back to chmod.
            raise FsError(errno.EOPNOTSUPP)
        if not name or len(name) > NAME_MAX:
            raise FsError(errno.ERANGE)
        if len(value) > XATTR_MAX:
            raise FsError(errno.E2BIG)
        short = self._short_of_room()
        with self._ns:
            exists = self.metadata.xattr(ino, name) is not None
            if flags & XATTR_CREATE and exists:
                raise FsError(errno.EEXIST)
            if flags & XATTR_REPLACE and not exists:
                raise FsError(errno.ENODATA)
            if short is not None:
                raise short
            self.metadata.set_xattr(ino, name, value)
        self._ctime_changed(ino)

    def removexattr(self, ino: int, name: bytes) -> None:
        if name == replicas.NAME:
            raise FsError(errno.EPERM, "user.fusefs.replicas is computed, read-only")
        self._writable()
        self._stored_inode(ino)
        if not self.metadata.remove_xattr(ino, name):
            raise FsError(errno.ENODATA)
        self._ctime_changed(ino)

    # -- the whole filesystem ---------------------------------------------------------------

    def statfs(self) -> dict:
        """The cluster's space as the block servers report it, divided by R (`capacity`),
        less the file data stored since that report. The servers' numbers are sampled
        every few seconds; what this mount stored (recorded blocks, dirty data) is known
        now: `_free` subtracts what it stored since the sample it answers from."""
        total, free = self.capacity()
        files, stored = self.metadata.statistics()
        free = self._free(total, free, stored + self.flusher.dirty_bytes)
        bs = 4096
        return {"f_bsize": bs, "f_frsize": bs, "f_blocks": total // bs, "f_bfree": free // bs,
                "f_bavail": free // bs, "f_files": files + (1 << 32), "f_ffree": 1 << 32,
                "f_favail": 1 << 32, "f_namemax": NAME_MAX}

    def _free(self, total: int, free: int, used: int) -> int:
        """Free bytes: the servers' `free` less the data stored since they reported it,
        plus what was removed or punched since (its copies are deleted soon after). A new
        report is taken to count everything stored up to the previous statfs (it was
        sampled after that call, at the earliest): a change made in between may be
        counted twice until the next report, never missed."""
        with self._space_lock:
            sample, base, previous = self._space or ((total, free), used, used)
            if sample != (total, free):
                sample, base = (total, free), previous
            self._space = (sample, base, used)
        return max(0, min(free - (used - base), total))
