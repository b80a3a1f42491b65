"""The filesystem's metadata in an embedded SQLite database: the local, authoritative copy.

Tables: `inodes` (attributes, symlink targets), `dentries` (parent, name) -> inode,
`blocks` (inode, index) -> (block id, checksum, length), `xattrs`, `garbage` (block ids no
longer referenced, deleted from the cluster in the background) and `settings`.

Every method is one transaction, so the database moves from one consistent state to the
next: a crash of the process (kill -9) loses at most the transactions not yet committed,
never half of one. Commits are not fsynced (WAL, synchronous=NORMAL): `sync()` makes
everything committed so far durable, which `fsync` calls. Names are bytes; the FUSE
adapter passes them through unchanged.

Threads: one connection, used under `_lock`. Callers never hold `_lock` (it is private);
they may hold an inode lock while calling in. Nothing here touches the network.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass

ROOT_INO = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inodes (
    ino INTEGER PRIMARY KEY,
    mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    nlink INTEGER NOT NULL, size INTEGER NOT NULL DEFAULT 0,
    atime_ns INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    rdev INTEGER NOT NULL DEFAULT 0, target BLOB);
CREATE TABLE IF NOT EXISTS dentries (
    parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL,
    PRIMARY KEY (parent, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocks (
    ino INTEGER NOT NULL, idx INTEGER NOT NULL, block_id TEXT NOT NULL,
    checksum TEXT NOT NULL, length INTEGER NOT NULL,
    PRIMARY KEY (ino, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS xattrs (
    ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ino, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS garbage (block_id TEXT PRIMARY KEY) WITHOUT ROWID;
"""

_INODE_COLUMNS = ("ino", "mode", "uid", "gid", "nlink", "size", "atime_ns", "mtime_ns",
                  "ctime_ns", "rdev", "target")


@dataclass
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    target: bytes | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass(frozen=True)
class BlockRef:
    block_id: str
    checksum: str
    length: int


def now_ns() -> int:
    return time.time_ns()


class Metadata:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    def _txn(self):
        return _Transaction(self._lock, self._db)

    def sync(self) -> None:
        """Make every committed transaction durable (fsync of the write-ahead log).

        No lock: a committed transaction is already written to the log or, once
        checkpointed, to the database file, so syncing both files covers it whatever
        other threads do meanwhile, and lookups need not wait for the disk."""
        for suffix in ("-wal", ""):
            try:
                fd = os.open(self.path + suffix, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- settings ---------------------------------------------------------------------------

    def setting(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_settings(self, values: dict[str, str]) -> None:
        with self._txn() as db:
            db.executemany("INSERT OR REPLACE INTO settings VALUES (?, ?)", values.items())

    def format(self, uid: int, gid: int, mode: int = 0o755) -> None:
        """Create the root directory of an empty filesystem."""
        t = now_ns()
        with self._txn() as db:
            db.execute("INSERT INTO inodes VALUES (?,?,?,?,?,?,?,?,?,0,NULL)",
                       (ROOT_INO, stat.S_IFDIR | mode, uid, gid, 2, 0, t, t, t))

    # -- inodes and names -------------------------------------------------------------------

    def inode(self, ino: int) -> Inode | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM inodes WHERE ino=?", (ino,)).fetchone()
        return Inode(*row) if row else None

    def lookup(self, parent: int, name: bytes) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT ino FROM dentries WHERE parent=? AND name=?",
                                   (parent, name)).fetchone()
        return row[0] if row else None

    def children(self, parent: int) -> list[tuple[bytes, int, int]]:
        """(name, ino, mode) of every entry of a directory, in name order."""
        with self._lock:
            return self._db.execute(
                "SELECT d.name, d.ino, i.mode FROM dentries d JOIN inodes i ON i.ino=d.ino "
                "WHERE d.parent=? ORDER BY d.name", (parent,)).fetchall()

    def has_children(self, parent: int) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1",
                                    (parent,)).fetchone() is not None

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
               rdev: int = 0, target: bytes | None = None) -> Inode:
        """A new inode linked as parent/name; the parent's times (and link count) change."""
        t = now_ns()
        is_dir = stat.S_ISDIR(mode)
        with self._txn() as db:
            cur = db.execute("INSERT INTO inodes (mode, uid, gid, nlink, size, atime_ns, "
                             "mtime_ns, ctime_ns, rdev, target) VALUES (?,?,?,?,?,?,?,?,?,?)",
                             (mode, uid, gid, 2 if is_dir else 1,
                              len(target) if target is not None else 0, t, t, t, rdev, target))
            ino = cur.lastrowid
            db.execute("INSERT INTO dentries VALUES (?,?,?)", (parent, name, ino))
            db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=?, nlink=nlink+? WHERE ino=?",
                       (t, t, 1 if is_dir else 0, parent))
        return Inode(ino, mode, uid, gid, 2 if is_dir else 1,
                     len(target) if target is not None else 0, t, t, t, rdev, target)

    def link(self, ino: int, parent: int, name: bytes) -> None:
        t = now_ns()
        with self._txn() as db:
            db.execute("INSERT INTO dentries VALUES (?,?,?)", (parent, name, ino))
            db.execute("UPDATE inodes SET nlink=nlink+1, ctime_ns=? WHERE ino=?", (t, ino))
            db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE ino=?", (t, t, parent))

    def unlink(self, parent: int, name: bytes, ino: int, is_dir: bool) -> int:
        """Remove parent/name (-> ino). Returns the inode's remaining link count."""
        t = now_ns()
        with self._txn() as db:
            db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
            drop = 2 if is_dir else 1  # a directory also loses its "." link
            db.execute("UPDATE inodes SET nlink=MAX(nlink-?, 0), ctime_ns=? WHERE ino=?",
                       (drop, t, ino))
            db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=?, nlink=nlink-? WHERE ino=?",
                       (t, t, 1 if is_dir else 0, parent))
            return db.execute("SELECT nlink FROM inodes WHERE ino=?", (ino,)).fetchone()[0]

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               ino: int, is_dir: bool, replaced: int | None,
               replaced_is_dir: bool) -> int | None:
        """Move old_parent/old_name to new_parent/new_name in one transaction.

        `replaced` is the inode that new_name pointed to: its link is dropped and its
        remaining link count returned.
        """
        t = now_ns()
        left = None
        with self._txn() as db:
            if replaced is not None:
                db.execute("DELETE FROM dentries WHERE parent=? AND name=?",
                           (new_parent, new_name))
                db.execute("UPDATE inodes SET nlink=MAX(nlink-?, 0), ctime_ns=? WHERE ino=?",
                           (2 if replaced_is_dir else 1, t, replaced))
                if replaced_is_dir:
                    db.execute("UPDATE inodes SET nlink=nlink-1 WHERE ino=?", (new_parent,))
                left = db.execute("SELECT nlink FROM inodes WHERE ino=?",
                                  (replaced,)).fetchone()[0]
            db.execute("UPDATE dentries SET parent=?, name=? WHERE parent=? AND name=?",
                       (new_parent, new_name, old_parent, old_name))
            if is_dir and old_parent != new_parent:
                db.execute("UPDATE inodes SET nlink=nlink-1 WHERE ino=?", (old_parent,))
                db.execute("UPDATE inodes SET nlink=nlink+1 WHERE ino=?", (new_parent,))
            db.execute("UPDATE inodes SET ctime_ns=? WHERE ino IN (?, ?)", (t, ino, replaced))
            db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE ino IN (?, ?)",
                       (t, t, old_parent, new_parent))
        return left

    def is_ancestor(self, ancestor: int, ino: int) -> bool:
        """True if `ancestor` is `ino` or one of the directories above it."""
        with self._lock:
            while True:
                if ino == ancestor:
                    return True
                if ino == ROOT_INO:
                    return False
                row = self._db.execute("SELECT parent FROM dentries WHERE ino=? LIMIT 1",
                                       (ino,)).fetchone()
                if row is None:
                    return False
                ino = row[0]

    def set_attrs(self, ino: int, **fields) -> None:
        """Update inode columns (mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns)."""
        if not fields:
            return
        assert set(fields) <= set(_INODE_COLUMNS[1:]), fields
        columns = ", ".join(f"{k}=?" for k in fields)
        with self._txn() as db:
            db.execute(f"UPDATE inodes SET {columns} WHERE ino=?", (*fields.values(), ino))

    def remove_inode(self, ino: int) -> None:
        """Delete an inode that has no names left; its blocks become garbage."""
        with self._txn() as db:
            db.execute("INSERT OR IGNORE INTO garbage SELECT block_id FROM blocks WHERE ino=?",
                       (ino,))
            for table in ("blocks", "xattrs", "inodes"):
                db.execute(f"DELETE FROM {table} WHERE ino=?", (ino,))

    def orphans(self) -> list[int]:
        """Inodes with no names left (open when the last process died)."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT ino FROM inodes WHERE nlink<=0")]

    def statistics(self) -> tuple[int, int]:
        """(number of inodes, bytes of file data referenced)."""
        with self._lock:
            files = self._db.execute("SELECT COUNT(*) FROM inodes").fetchone()[0]
            used = self._db.execute("SELECT COALESCE(SUM(length), 0) FROM blocks").fetchone()[0]
        return files, used

    # -- block maps -------------------------------------------------------------------------

    def block_refs(self, ino: int, first: int, last: int) -> dict[int, BlockRef]:
        """index -> BlockRef for the blocks first..last (inclusive) that exist."""
        with self._lock:
            rows = self._db.execute(
                "SELECT idx, block_id, checksum, length FROM blocks "
                "WHERE ino=? AND idx BETWEEN ? AND ?", (ino, first, last)).fetchall()
        return {idx: BlockRef(b, c, n) for idx, b, c, n in rows}

    def commit_blocks(self, ino: int, refs: dict[int, BlockRef], size: int,
                      mtime_ns: int, ctime_ns: int) -> None:
        """Switch the block map to freshly uploaded blocks and persist size and times.

        The blocks they replace become garbage in the same transaction.
        """
        with self._txn() as db:
            if db.execute("SELECT 1 FROM inodes WHERE ino=?", (ino,)).fetchone() is None:
                db.executemany("INSERT OR IGNORE INTO garbage VALUES (?)",
                               [(r.block_id,) for r in refs.values()])
                return  # removed meanwhile: what was uploaded is garbage already
            for idx, ref in refs.items():
                db.execute("INSERT OR IGNORE INTO garbage SELECT block_id FROM blocks "
                           "WHERE ino=? AND idx=? AND block_id<>?", (ino, idx, ref.block_id))
                db.execute("INSERT OR REPLACE INTO blocks VALUES (?,?,?,?,?)",
                           (ino, idx, ref.block_id, ref.checksum, ref.length))
            # MAX: a namespace change may have moved ctime after the caller read it.
            db.execute("UPDATE inodes SET size=?, mtime_ns=?, ctime_ns=MAX(ctime_ns, ?) "
                       "WHERE ino=?", (size, mtime_ns, ctime_ns, ino))

    def truncate_blocks(self, ino: int, keep_below: int, size: int, t: int,
                        last_length: int | None = None) -> None:
        """Drop blocks with index >= keep_below (they become garbage) and set the size.

        `last_length`: block keep_below-1 now ends inside; only its first `last_length`
        bytes belong to the file (the rest must never come back, even after a crash).
        """
        with self._txn() as db:
            db.execute("INSERT OR IGNORE INTO garbage SELECT block_id FROM blocks "
                       "WHERE ino=? AND idx>=?", (ino, keep_below))
            db.execute("DELETE FROM blocks WHERE ino=? AND idx>=?", (ino, keep_below))
            if last_length is not None:
                db.execute("UPDATE blocks SET length=MIN(length, ?) WHERE ino=? AND idx=?",
                           (last_length, ino, keep_below - 1))
            db.execute("UPDATE inodes SET size=?, mtime_ns=?, ctime_ns=? WHERE ino=?",
                       (size, t, t, ino))

    def add_garbage(self, block_ids: list[str]) -> None:
        with self._txn() as db:
            db.executemany("INSERT OR IGNORE INTO garbage VALUES (?)", [(b,) for b in block_ids])

    def garbage(self, limit: int = 1000) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT block_id FROM garbage LIMIT ?",
                                                   (limit,))]

    def forget_garbage(self, block_ids: list[str]) -> None:
        with self._txn() as db:
            db.executemany("DELETE FROM garbage WHERE block_id=?", [(b,) for b in block_ids])

    # -- extended attributes ----------------------------------------------------------------

    def xattr(self, ino: int, name: bytes) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM xattrs WHERE ino=? AND name=?",
                                   (ino, name)).fetchone()
        return row[0] if row else None

    def xattr_names(self, ino: int) -> list[bytes]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT name FROM xattrs WHERE ino=? ORDER BY name", (ino,))]

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        with self._txn() as db:
            db.execute("INSERT OR REPLACE INTO xattrs VALUES (?,?,?)", (ino, name, value))
            db.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (now_ns(), ino))

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        with self._txn() as db:
            gone = db.execute("DELETE FROM xattrs WHERE ino=? AND name=?", (ino, name)).rowcount
            if gone:
                db.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (now_ns(), ino))
        return bool(gone)


class _Transaction:
    """`with`: take the connection lock, BEGIN; COMMIT on success, ROLLBACK on error."""

    def __init__(self, lock: threading.Lock, db: sqlite3.Connection):
        self._lock, self._db = lock, db

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()
