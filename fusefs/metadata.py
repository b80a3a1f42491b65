"""The filesystem's metadata in an embedded SQLite database: the local, authoritative copy.

Tables: `inodes` (attributes, symlink targets), `dentries` (parent, name) -> inode,
`blocks` (inode, index) -> (block id, checksum, length), `patches` (inode, index, n) -> a
range of that block rewritten by a small block of its own (see `Patch`), `xattrs`,
`garbage` (block ids no
longer referenced, deleted from the cluster in the background), `journal` (records not yet
shipped to the cluster) and `settings` (local bookkeeping: `seq`, `shipped`, the chain
position of a follower).

Every change appends a journal record `[seq, op, args]` in the same transaction
(sequence numbers have no gaps). A record holds all the change needs — the times, the
new inode number — and the function that made the change is the one that replays it, so
a database built from a checkpoint plus the records after it is the database the writer
had (see docs/journal.md). Each kind of record is declared once, in the registry below
the Metadata class (`Op`, `_op`): how it applies, which inode rows and names it writes.

Group commit: changes are not committed one by one. The first change opens a transaction
(the group), each change is applied inside it (its journal row is written with the
group's others just before the COMMIT; a change that fails part way is undone by rolling
the group back and applying its earlier records again), and the group is committed at
most `group_seconds` later (10 ms by default) by a background thread, or at once by
anything that needs committed state: `sync`, `unshipped` (nothing uncommitted is ever
shipped), a checkpoint snapshot, any other transaction, `close`. A COMMIT writes the
pages a group touched once instead of once per change, which halves the cost of a rename
or unlink.
A crash of the process loses at most the last group (changes not fsynced, which P2
allows), never part of one and never a change before a lost one: what survives is a
prefix. Commits are not fsynced locally (WAL, synchronous=NORMAL): durability is the
cluster's copy of the journal, or `sync`.

If SQLite loses an open group (a failed COMMIT that rolled back, a disk error), changes
that callers were told had happened are gone from the local copy: the database refuses
every later change with MetadataFailed (EIO), and the log says to mount again, which
rebuilds from what the cluster holds.

Threads: one connection, every use of it under `_lock` (private, so no caller holds it).
While holding `_lock` this module takes no other lock of fusefs, does no network I/O
and calls no callback; `sync`'s fsync and `snapshot`'s work on its copy run without it.
The committer thread holds it except while it waits for a group's deadline.
`on_record` runs after `_lock` is released, on the thread that made the change, which may
still hold its own locks. Lock order: docs/filesystem.md, Lock order.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .errors import MetadataFailed

log = logging.getLogger(__name__)

# sqlite3 binds exact int, float, str and bytearray parameters directly but sends bytes (every
# name here) through its adaptation protocol, which raises and swallows an AttributeError
# each time. An identity adapter for bytes skips that; it changes nothing but the cost.
sqlite3.register_adapter(bytes, bytes)

ROOT_INO = 1
GROUP_SECONDS = 0.01  # the longest a change waits for its group's COMMIT
MAX_CACHED_INODES = 100_000
MAX_CACHED_NAMES = 200_000
# A directory with at most this many entries is read whole (names and inode rows, one
# query) at its first lookup or listing; a larger one is looked up name by name.
DIR_LOAD_MAX = 16_384
_UNKNOWN = object()  # not in the cache of names (None there means: known to be absent)

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
    kind INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (parent, name)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dentries_by_ino ON dentries (ino);
CREATE TABLE IF NOT EXISTS blocks (
    ino INTEGER NOT NULL, idx INTEGER NOT NULL, block_id TEXT NOT NULL,
    checksum TEXT NOT NULL, length INTEGER NOT NULL,
    PRIMARY KEY (ino, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS patches (
    ino INTEGER NOT NULL, idx INTEGER NOT NULL, n INTEGER NOT NULL,
    start INTEGER NOT NULL, length INTEGER NOT NULL, block_id TEXT NOT NULL,
    checksum TEXT NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY (ino, idx, n)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS xattrs (
    ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ino, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS garbage (block_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, record BLOB NOT NULL);
"""

# What removing an inode's row also removes, as a TEMP trigger made on every connection
# (so the database file itself holds no trigger, and older files need no change): its
# blocks and patches become garbage, its block map and xattrs go.
_INODE_REMOVED = """
CREATE TEMP TRIGGER IF NOT EXISTS inode_removed AFTER DELETE ON main.inodes BEGIN
    INSERT OR IGNORE INTO garbage SELECT block_id FROM blocks WHERE ino=OLD.ino
        UNION ALL SELECT block_id FROM patches WHERE ino=OLD.ino;
    DELETE FROM blocks WHERE ino=OLD.ino;
    DELETE FROM patches WHERE ino=OLD.ino;
    DELETE FROM xattrs WHERE ino=OLD.ino;
END
"""

# The number of inodes and the bytes the block maps reference (what statfs reports), kept
# by TEMP triggers in a TEMP table of one row: counted once when the connection opens, then
# changed in the same transaction as the rows they count (a rolled-back group rolls them
# back too), so that a statfs, which `find` and `du` make at their start, costs one row
# instead of a scan of both tables under the lock. Nothing of it is in the database file.
# (recursive_triggers: a row that INSERT OR REPLACE replaces counts as deleted.)
_TOTALS = (
    "CREATE TEMP TABLE IF NOT EXISTS totals (files INTEGER NOT NULL, used INTEGER NOT NULL)",
    "DELETE FROM temp.totals",
    "INSERT INTO temp.totals SELECT (SELECT COUNT(*) FROM main.inodes), "
    "(SELECT COALESCE(SUM(length), 0) FROM main.blocks)",
    "CREATE TEMP TRIGGER IF NOT EXISTS totals_inode_added AFTER INSERT ON main.inodes "
    "BEGIN UPDATE totals SET files=files+1; END",
    "CREATE TEMP TRIGGER IF NOT EXISTS totals_inode_removed AFTER DELETE ON main.inodes "
    "BEGIN UPDATE totals SET files=files-1; END",
    "CREATE TEMP TRIGGER IF NOT EXISTS totals_block_added AFTER INSERT ON main.blocks "
    "BEGIN UPDATE totals SET used=used+NEW.length; END",
    "CREATE TEMP TRIGGER IF NOT EXISTS totals_block_removed AFTER DELETE ON main.blocks "
    "BEGIN UPDATE totals SET used=used-OLD.length; END",
    "CREATE TEMP TRIGGER IF NOT EXISTS totals_block_changed AFTER UPDATE OF length "
    "ON main.blocks BEGIN UPDATE totals SET used=used+NEW.length-OLD.length; END",
)

_INODE_COLUMNS = ("ino", "mode", "uid", "gid", "nlink", "size", "atime_ns", "mtime_ns",
                  "ctime_ns", "rdev", "target")


@dataclass
class Inode:
    """One inode's attributes as a row of `inodes` holds them, plus `stored` (computed from
    its block map). A copy: each call makes a new one, which later changes never update;
    an open file's live size and times are in its FileData until committed."""

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
    stored: int = 0  # bytes of file data in its stored blocks (st_blocks counts these)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass(frozen=True)
class Patch:
    """Bytes [start, start+length) of a block, rewritten: they are the bytes at `at` of the
    small block `block_id` (one such block holds every range one upload rewrote). A 4 KiB
    write into a stored 1 MiB block uploads 4 KiB instead of the whole block again."""

    start: int
    length: int
    block_id: str
    checksum: str
    at: int


@dataclass(frozen=True)
class BlockRef:
    """One entry of a file's block map: the block id on the cluster, the checksum of its
    bytes, and how many of them belong to the file (a last or cut block may be shorter
    than the block size; the rest reads as zeros). `patches`, applied in order over the
    block's bytes, are ranges rewritten since; they never reach past `length`."""

    block_id: str
    checksum: str
    length: int
    patches: tuple[Patch, ...] = ()

    def ids(self) -> set[str]:
        """Every block id this entry reads from."""
        return {self.block_id, *(p.block_id for p in self.patches)}

    def cut(self, length: int) -> BlockRef:
        """This entry ending at `length` (<= its length), its patches cut there too: what
        the truncate_blocks record makes of its row."""
        patches = tuple(replace(p, length=min(p.length, length - p.start))
                        for p in self.patches if p.start < length)
        return BlockRef(self.block_id, self.checksum, length, patches)

    @functools.cached_property
    def small_blocks(self) -> int:
        """How many small blocks its patches read from (one per commit that patched it)."""
        return len({p.block_id for p in self.patches})


def now_ns() -> int:
    return time.time_ns()


def _free_ino(db: sqlite3.Connection) -> int:
    """The number after the highest inode in use (1 in an empty database). Block-map rows
    left without their inode (fsck reports them) count as in use: a new inode never has
    block rows, which the row cache relies on (`_create_rows`)."""
    return db.execute("SELECT COALESCE(MAX(m), 0) + 1 FROM (SELECT MAX(ino) AS m FROM inodes "
                      "UNION ALL SELECT MAX(ino) FROM blocks UNION ALL SELECT MAX(ino) "
                      "FROM patches)").fetchone()[0]


class Metadata:
    """The metadata database of one filesystem (see the module docstring): namespace,
    attributes, block maps, xattrs and garbage, each change journaled as it is applied.

    Changes (`create`, `rename`, `commit_blocks`, ...) are journal records applied through
    `_record`; reads of one inode or name answer from caches; whole-filesystem reads serve
    fsck and the journal's sweep; `unshipped`/`shipped`/`replay`/`snapshot`/`replace_with`
    serve the journal. Thread-safe; the rules are in the module docstring."""

    def __init__(self, path: str, group_seconds: float = GROUP_SECONDS):
        self.path = path
        self._lock = threading.Lock()
        self._db = self._connect()
        # The open group, guarded by _lock: when its first change was made (None: no group)
        # and its changes' journal records, (seq, encoded), written to the journal table
        # just before its COMMIT (the first `_journaled` of them already are): one
        # statement per group instead of one per change, and what `_redo_group` applies
        # again when a change fails. `_grouped` wakes the committer when a group opens.
        self.group_seconds = group_seconds
        self._group_since: float | None = None
        self._group_records: list[tuple[int, bytes]] = []
        self._journaled = 0
        self._grouped = threading.Condition(self._lock)
        self._committer: threading.Thread | None = None
        self._closing = False
        self._failed: str | None = None  # why changes are refused (a group was lost)
        # Caches, guarded by _lock. A change forgets the rows and records the names that
        # its Op declares it writes (_learn); anything else that may write those tables
        # (replay, a rollback, a new database) forgets everything (_forget_cached).
        # Rows of the inodes table read lately:
        self._rows: dict[int, tuple] = {}
        # Directory entries looked up lately: (parent, name) -> ino, or None for a name
        # known to be absent (the kernel looks up every name before creating it):
        self._names: dict[tuple[int, bytes], int | None] = {}
        # Directories whose every entry is in _names (read whole, or created empty since):
        # a name not there is absent, with no query. Larger directories, not to read whole:
        self._complete: set[int] = set()
        self._too_big: set[int] = set()
        # Every inode that may have extended attributes (a superset: only set_xattr adds
        # rows, and it adds the inode here), so that the getxattr the kernel makes before
        # every write to a file without any is answered without a query; None: not known
        # (read again at the next xattr lookup):
        self._xattr_inos: set[int] | None = None
        # The last journal record, guarded by _lock: the newest unshipped one, or else what
        # replay or shipping recorded (a change writes only its journal row, no setting).
        self._seq = max(int(self.setting("seq", "0")), int(self.setting("shipped", "0")),
                        self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM journal")
                        .fetchone()[0])
        self._next_ino = _free_ino(self._db)
        # Called with the new record's seq after each change, once _lock is released (the
        # caller's own locks may still be held): wakes a shipper.
        self.on_record = None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # Before any TEMP object: a change of temp_store deletes them all.
        db.execute("PRAGMA temp_store=MEMORY")
        db.execute("PRAGMA recursive_triggers=ON")  # for _TOTALS
        db.executescript(_SCHEMA)
        db.execute(_INODE_REMOVED)
        for statement in _TOTALS:
            db.execute(statement)
        if "kind" not in {r[1] for r in db.execute("PRAGMA table_info(dentries)")}:
            # A database from before entries carried their file type: theirs stay unknown
            # (0; readdir then leaves the type to a lookup, as before).
            db.execute("ALTER TABLE dentries ADD COLUMN kind INTEGER NOT NULL DEFAULT 0")
        return db

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._grouped.notify_all()
            committer = self._committer
        if committer is not None:
            committer.join()
        with self._lock:
            try:
                self._commit_group()
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()

    def _txn(self, writes_namespace: bool = False):
        """A transaction for bookkeeping (`writes_namespace`: it may also write inodes,
        names or xattrs, so every cache is dropped after it, as replay needs)."""
        return _Transaction(self, writes_namespace)

    def commit(self) -> None:
        """Commit the open group now (the changes so far survive a crash of the process)."""
        with self._lock:
            self._commit_group()

    def sync(self) -> None:
        """Make every change so far durable: commit the group, fsync the write-ahead log.

        The fsync runs without the lock: a committed transaction is already written to
        the log or, once checkpointed, to the database file, so syncing both files covers
        it whatever other threads do meanwhile, and lookups need not wait for the disk."""
        self.commit()
        for suffix in ("-wal", ""):
            try:
                fd = os.open(self.path + suffix, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- the journal ------------------------------------------------------------------------

    def _record(self, op: str, *args):
        """Apply one change and journal it, inside the open group; returns what the op
        returns. A change that fails leaves the group as it was.

        The record holds everything the change needs (times, the new inode number), so
        applying it again to the state before it gives the same state (see `replay`).
        """
        spec = _OPS[op]
        with self._lock:
            if self._failed:
                raise MetadataFailed(self._failed)
            seq = self._seq + 1
            if self._group_since is not None and not self._db.in_transaction:
                self._group_lost(None)  # SQLite rolled the group back (a disk error)
            if self._group_since is None:
                self._db.execute("BEGIN IMMEDIATE")
                self._group_since = time.monotonic()
                self._wake_committer()
            record = encode_record(seq, op, args)
            try:
                result = spec.apply(self._db, *args)
            except BaseException:
                self._forget_cached()
                self._redo_group()
                raise
            self._group_records.append((seq, record))
            self._learn(spec, args)
            self._seq = seq
            if self.group_seconds <= 0:
                self._commit_group()
        if self.on_record is not None:
            self.on_record(seq)
        return result

    def _learn(self, spec: Op, args: tuple) -> None:
        """Expects _lock: a change `spec` with `args` was applied; update the caches with
        what it declares it wrote (the rows it may have written are forgotten, or taken
        as `spec.rows` computes them; the names it wrote are known)."""
        rows = self._rows
        if spec.rows is None:
            for ino in spec.inodes(*args):
                rows.pop(ino, None)
        else:
            if len(rows) >= MAX_CACHED_INODES:
                rows.clear()
            for ino, row in spec.rows(rows.get, *args).items():
                if row is None:
                    rows.pop(ino, None)
                else:
                    rows[ino] = row
        if len(self._names) >= MAX_CACHED_NAMES:
            self._forget_names()
        self._names.update(spec.names(*args))
        if spec.new_dir is not None:
            made = spec.new_dir(*args)
            if made is not None:
                self._complete.add(made)
        if spec.xattr_owner is not None and self._xattr_inos is not None:
            self._xattr_inos.add(spec.xattr_owner(*args))

    def _forget_cached(self) -> None:
        """Expects _lock: the database may have changed in any way (a transaction, a
        replay, a rollback): drop every cache. Runs no query: it is called on the way out
        of failures, where the database may be failing too."""
        self._rows.clear()
        self._forget_names()
        self._xattr_inos = None

    def _forget_names(self) -> None:
        """Expects _lock."""
        self._names.clear()
        self._complete.clear()
        self._too_big.clear()

    def _may_have_xattrs(self, ino: int) -> bool:
        """Expects _lock."""
        if self._xattr_inos is None:
            self._xattr_inos = {r[0] for r in self._db.execute(
                "SELECT DISTINCT ino FROM xattrs")}
        return ino in self._xattr_inos

    def _redo_group(self) -> None:
        """Expects _lock: a change failed part way through the open group. Undo it by
        rolling the whole group back and applying the group's earlier changes again from
        their records, which are kept in memory until the group commits. A savepoint per
        change would undo it alone, but costs two statements on every change for a
        failure that the filesystem's own checks make rare."""
        records = self._group_records
        self._group_since, self._journaled = None, 0
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if records:
                self._db.execute("BEGIN IMMEDIATE")
                self._group_since = time.monotonic()
                for _, raw in records:
                    _, op, args = decode_record(raw)
                    _OPS[op].apply(self._db, *args)
                self._wake_committer()
        except Exception as e:  # noqa: BLE001 - whatever it was, the group is not whole
            try:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._group_lost(e)

    def _group_lost(self, error: Exception | None) -> None:
        """Expects _lock: the open group is gone; refuse changes from now on if it held any."""
        changes = len(self._group_records)
        self._group_since, self._group_records, self._journaled = None, [], 0
        self._forget_cached()
        if changes and not self._failed:
            self._failed = (f"the local metadata database {self.path} lost its last "
                            f"{changes} changes ({error or 'rolled back by SQLite'}); "
                            "unmount and mount again to continue from the cluster's copy")
            # From now on little is written (the shipped position: a page or two in the
            # WAL). SQLite's automatic checkpoint would copy the whole WAL into the
            # database file and take whatever room is freed on that (likely full) disk
            # from the log lines that say what was lost; the unmount's checkpoint still
            # runs, after them.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_autocheckpoint=0")
            raise MetadataFailed(self._failed)

    def _commit_group(self) -> None:
        """Expects _lock: COMMIT the open group, if any. A COMMIT that fails but leaves the
        group open raises and can be tried again; one that loses the group fails the
        database (see MetadataFailed)."""
        if self._group_since is None:
            return
        if not self._db.in_transaction:  # SQLite rolled the group back (a disk error)
            self._group_lost(None)
            return
        try:
            if self._journaled < len(self._group_records):
                # OR REPLACE: an insert that failed half way may have left some rows.
                self._db.executemany("INSERT OR REPLACE INTO journal VALUES (?, ?)",
                                     self._group_records[self._journaled:])
                self._journaled = len(self._group_records)
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                raise
            self._group_lost(e)
            return
        self._group_since, self._group_records, self._journaled = None, [], 0

    def _wake_committer(self) -> None:
        """Expects _lock: a group just opened; the committer commits it in group_seconds."""
        if self.group_seconds <= 0:
            return
        if self._committer is None and not self._closing:
            self._committer = threading.Thread(target=self._commit_loop,
                                               name="metadata-commit", daemon=True)
            self._committer.start()
        self._grouped.notify()

    def _commit_loop(self) -> None:
        retry = 0.0
        with self._lock:
            while not self._closing:
                since = self._group_since
                if since is None:
                    self._grouped.wait()
                    continue
                wait = since + self.group_seconds + retry - time.monotonic()
                if wait > 0:
                    self._grouped.wait(wait)
                    continue
                try:
                    self._commit_group()
                    retry = 0.0
                except sqlite3.Error as e:
                    retry = min(max(retry * 2, 0.1), 5.0)
                    log.warning("committing metadata changes failed, retrying in %.1f s: %s",
                                 retry, e)
                except MetadataFailed as e:
                    log.error("%s", e)

    @property
    def failed(self) -> str | None:
        """Why every change is refused (an open group was lost), or None."""
        with self._lock:
            return self._failed

    @property
    def seq(self) -> int:
        """The number of the newest journal record (0 before the first)."""
        with self._lock:
            return self._seq

    def unshipped(self, after: int, limit: int = 5000) -> list[tuple[int, bytes]]:
        """(seq, encoded record) of journal records after `after`, in order. Commits the
        open group first: a record on the cluster is always also committed here."""
        with self._lock:
            self._commit_group()
            return self._db.execute("SELECT seq, record FROM journal WHERE seq > ? "
                                    "ORDER BY seq LIMIT ?", (after, limit)).fetchall()

    def shipped(self, upto: int, position: dict[str, str]) -> None:
        """Records up to `upto` are durable on the cluster: drop them, remember where.
        A failed database keeps them (`unshipped` never reads them again): deleting large
        records would fill the WAL with freed pages, on a disk that is likely full."""
        with self._txn() as db:
            if not self._failed:
                db.execute("DELETE FROM journal WHERE seq <= ?", (upto,))
            db.executemany("INSERT OR REPLACE INTO settings VALUES (?, ?)",
                           [("shipped", str(upto)), *position.items()])

    def replay(self, records: list[tuple[int, str, list]], position: dict[str, str]) -> int:
        """Apply records shipped by a writer, in one transaction; returns how many applied.

        Records at or below the current sequence number are skipped (a checkpoint may
        already hold them); a gap raises RecordGap and applies nothing.
        """
        applied = 0
        with self._txn(writes_namespace=True) as db:
            seq = self._seq
            for rec_seq, op, args in records:
                if rec_seq <= seq:
                    continue
                if rec_seq != seq + 1:
                    raise RecordGap(f"journal record {rec_seq} follows {seq}")
                _OPS[op].apply(db, *args)
                seq = rec_seq
                applied += 1
            db.executemany("INSERT OR REPLACE INTO settings VALUES (?, ?)",
                           [("seq", str(seq)), ("shipped", str(seq)), *position.items()])
            self._seq = seq
            self._next_ino = max(self._next_ino, _free_ino(db))
        return applied

    def snapshot(self, dest: str) -> int:
        """Write a compact copy of the whole database to `dest`; returns its sequence number.

        The copy holds no journal records (they are all in it already) and no local
        settings but `seq`: it is what a checkpoint uploads.
        """
        with self._lock:
            self._commit_group()
            self._db.execute("VACUUM INTO ?", (dest,))
            seq = self._seq
        copy = sqlite3.connect(dest, isolation_level=None)
        try:
            copy.execute("DELETE FROM journal")
            copy.execute("DELETE FROM settings")
            copy.execute("INSERT INTO settings VALUES ('seq', ?)", (str(seq),))
            copy.execute("PRAGMA journal_mode=DELETE")
        finally:
            copy.close()
        return seq

    def replace_with(self, path: str, settings: dict[str, str]) -> None:
        """Swap in another database file (a follower loading a newer checkpoint)."""
        with self._lock:
            self._commit_group()
            self._db.close()
            for suffix in ("-wal", "-shm"):
                try:
                    os.unlink(self.path + suffix)
                except FileNotFoundError:
                    pass
            os.replace(path, self.path)
            self._db = self._connect()
            self._db.executemany("INSERT OR REPLACE INTO settings VALUES (?, ?)",
                                 settings.items())
            self._seq = int(dict(settings).get("seq") or self._db.execute(
                "SELECT value FROM settings WHERE key='seq'").fetchone()[0])
            self._next_ino = _free_ino(self._db)
            self._forget_cached()

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
        self._record("format", uid, gid, mode, now_ns())
        with self._lock:
            self._next_ino = max(self._next_ino, ROOT_INO + 1)

    # -- inodes and names -------------------------------------------------------------------

    def inode(self, ino: int) -> Inode | None:
        with self._lock:
            row = self._rows.get(ino)
            if row is None:
                row = self._db.execute(
                    "SELECT *, (SELECT COALESCE(SUM(length), 0) FROM blocks WHERE ino=?) "
                    "FROM inodes WHERE ino=?", (ino, ino)).fetchone()
                if row is not None:
                    if len(self._rows) >= MAX_CACHED_INODES:
                        self._rows.clear()
                    self._rows[ino] = row
        return Inode(*row) if row else None

    def kind(self, ino: int) -> tuple[int, int] | None:
        """(mode, link count) of an inode, None if there is none: what unlink, rmdir and
        rename check. From the cached row when there is one, else one query of the row
        alone: a file's row is forgotten when its blocks are committed, and `inode()`
        would then also sum the sizes of its blocks."""
        with self._lock:
            row = self._rows.get(ino)
            if row is not None:
                return row[1], row[4]
            return self._db.execute("SELECT mode, nlink FROM inodes WHERE ino=?",
                                    (ino,)).fetchone()

    def lookup(self, parent: int, name: bytes) -> int | None:
        key = (parent, name)
        with self._lock:
            ino = self._names.get(key, _UNKNOWN)
            if ino is not _UNKNOWN:
                return ino
            if parent in self._complete:
                return None
            if parent not in self._too_big and self._load_dir(parent):
                return self._names.get(key)
            row = self._db.execute("SELECT ino FROM dentries WHERE parent=? AND name=?",
                                   key).fetchone()
            ino = row[0] if row else None
            if len(self._names) >= MAX_CACHED_NAMES:
                self._forget_names()
            self._names[key] = ino
        return ino

    def _load_dir(self, parent: int) -> bool:
        """Expects _lock: read a directory whole into the caches, its entries' names and
        their inodes' rows, in one query, and mark it complete; False (and marked too big,
        nothing kept) if it has more than DIR_LOAD_MAX entries. Reading the rows with the
        names is what makes `du`, `ls -l` or `tar c` of a directory a query per directory
        rather than two per entry."""
        found = self._db.execute(
            "SELECT d.name, i.*, (SELECT COALESCE(SUM(length), 0) FROM blocks b "
            "WHERE b.ino=d.ino), d.ino FROM dentries d LEFT JOIN inodes i ON i.ino=d.ino "
            "WHERE d.parent=? LIMIT ?", (parent, DIR_LOAD_MAX + 1)).fetchall()
        if len(found) > DIR_LOAD_MAX:
            self._too_big.add(parent)
            return False
        if len(self._names) + len(found) >= MAX_CACHED_NAMES:
            self._forget_names()
        if len(self._rows) + len(found) >= MAX_CACHED_INODES:
            self._rows.clear()
        names, rows = self._names, self._rows
        for name, *row, ino in found:
            names[(parent, name)] = ino
            if row[0] is not None:  # a name without an inode row (fsck's to mend) is not
                rows[ino] = tuple(row)
        self._complete.add(parent)
        return True

    def child_names(self, parent: int) -> list[bytes]:
        """The names in a directory, in name order."""
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT name FROM dentries WHERE parent=? ORDER BY name", (parent,))]

    def child_entries(self, parent: int) -> list[tuple[bytes, int, int]]:
        """(name, inode number, file type: its mode's S_IFMT bits, 0 if unknown) of the
        entries in a directory, in name order: one query of the entries alone (and, the
        first time, one that reads the directory into the caches: `ls -l` and `du` look up
        every name they list)."""
        with self._lock:
            if parent not in self._complete and parent not in self._too_big:
                self._load_dir(parent)
            return self._db.execute(
                "SELECT name, ino, kind FROM dentries WHERE parent=? ORDER BY name",
                (parent,)).fetchall()

    def has_children(self, parent: int) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1",
                                    (parent,)).fetchone() is not None

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
               rdev: int = 0, target: bytes | None = None) -> Inode:
        """A new inode linked as parent/name; the parent's times (and link count) change."""
        t = now_ns()
        with self._lock:
            ino = self._next_ino
            self._next_ino += 1
        self._record("create", ino, parent, name, mode, uid, gid, rdev, target, t)
        return Inode(ino, mode, uid, gid, 2 if stat.S_ISDIR(mode) else 1,
                     len(target) if target is not None else 0, t, t, t, rdev, target)

    def link(self, ino: int, parent: int, name: bytes) -> None:
        self._record("link", ino, parent, name, now_ns())

    def unlink(self, parent: int, name: bytes, ino: int, is_dir: bool,
               remove: bool = False) -> int:
        """Remove parent/name (-> ino). Returns the inode's remaining link count.

        `remove`: if that was the last name, remove the inode too, in the same record
        (as `remove_inode` would; the caller knows it is not open)."""
        extra = (True,) if remove else ()
        return self._record("unlink", parent, name, ino, is_dir, now_ns(), *extra)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               ino: int, is_dir: bool, replaced: int | None,
               replaced_is_dir: bool) -> int | None:
        """Move old_parent/old_name to new_parent/new_name in one transaction.

        `replaced` is the inode that new_name pointed to: its link is dropped and its
        remaining link count returned.
        """
        return self._record("rename", old_parent, old_name, new_parent, new_name, ino,
                            is_dir, replaced, replaced_is_dir, now_ns())

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
        self._record("set_attrs", ino, fields)

    def remove_inode(self, ino: int) -> None:
        """Delete an inode that has no names left; its blocks become garbage."""
        self._record("remove_inode", ino)

    def names(self, ino: int) -> list[tuple[int, bytes]]:
        """(parent, name) of every directory entry naming an inode."""
        with self._lock:
            return self._db.execute("SELECT parent, name FROM dentries WHERE ino=?",
                                    (ino,)).fetchall()

    def multi_linked(self) -> set[int]:
        """Every inode other than a directory that has more than one name."""
        with self._lock:
            return {r[0] for r in self._db.execute(
                "SELECT ino FROM inodes WHERE nlink > 1 AND (mode & ?) != ?",
                (stat.S_IFMT(0o177777), stat.S_IFDIR))}

    def orphans(self) -> list[int]:
        """Inodes with no names left (open when the last process died)."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT ino FROM inodes WHERE nlink<=0")]

    def statistics(self) -> tuple[int, int]:
        """(number of inodes, bytes of file data referenced): one row (`_TOTALS`)."""
        with self._lock:
            return self._db.execute("SELECT files, used FROM temp.totals").fetchone()

    # -- block maps -------------------------------------------------------------------------

    def block_refs(self, ino: int, first: int, last: int) -> dict[int, BlockRef]:
        """index -> BlockRef for the blocks first..last (inclusive) that exist."""
        with self._lock:
            rows = self._db.execute(
                "SELECT idx, block_id, checksum, length FROM blocks "
                "WHERE ino=? AND idx BETWEEN ? AND ?", (ino, first, last)).fetchall()
            patched = self._db.execute(
                "SELECT idx, start, length, block_id, checksum, at FROM patches "
                "WHERE ino=? AND idx BETWEEN ? AND ? ORDER BY idx, n",
                (ino, first, last)).fetchall()
        patches: dict[int, list[Patch]] = {}
        for idx, *fields in patched:
            patches.setdefault(idx, []).append(Patch(*fields))
        return {idx: BlockRef(b, c, n, tuple(patches.get(idx, ())))
                for idx, b, c, n in rows}

    def blocks_after(self, parent: int, after: bytes, files: int, blocks: int,
                     including: bool = False) -> list[tuple[bytes, str, str, int]]:
        """(name, block id, checksum, length) of the first `blocks` blocks of each of the
        next `files` entries of a directory after the name `after` (from it on, if
        `including`), in name order (one query): what a reader going through the
        directory in name order reads next."""
        with self._lock:
            return self._db.execute(
                "SELECT d.name, b.block_id, b.checksum, b.length FROM (SELECT name, ino "
                f"FROM dentries WHERE parent=? AND name{'>=' if including else '>'}? "
                "ORDER BY name LIMIT ?) AS d JOIN blocks AS b ON b.ino=d.ino AND b.idx<? "
                "ORDER BY d.name, b.idx", (parent, after, files, blocks)).fetchall()

    def data_before(self, parent: int, name: bytes) -> bool:
        """Whether an entry of the directory named before `name` has a block (one query)."""
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM dentries AS d JOIN blocks AS b ON b.ino=d.ino AND b.idx=0 "
                "WHERE d.parent=? AND d.name<? LIMIT 1", (parent, name)).fetchone() is not None

    def commit_blocks(self, ino: int, refs: dict[int, BlockRef], size: int,
                      mtime_ns: int, ctime_ns: int) -> None:
        """Switch the block map to freshly uploaded blocks and persist size and times.

        The blocks they replace become garbage in the same transaction.
        """
        self._record("commit_blocks", ino,
                     [[i, r.block_id, r.checksum, r.length] if not r.patches else
                      [i, r.block_id, r.checksum, r.length,
                       [[p.start, p.length, p.block_id, p.checksum, p.at] for p in r.patches]]
                      for i, r in refs.items()],
                     size, mtime_ns, ctime_ns)

    def truncate_blocks(self, ino: int, keep_below: int, size: int, t: int,
                        last_length: int | None = None) -> None:
        """Drop blocks with index >= keep_below (they become garbage) and set the size.

        `last_length`: block keep_below-1 now ends inside; only its first `last_length`
        bytes belong to the file (the rest must never come back, even after a crash).
        """
        self._record("truncate_blocks", ino, keep_below, size, t, last_length)

    def punch_blocks(self, ino: int, first: int, last: int, t: int) -> None:
        """Drop the blocks with index first..last-1 (they become garbage, deleted once this
        record is durable, as truncation's are): a hole there reads as zeros. The size
        stays; mtime and ctime become `t`."""
        self._record("punch_blocks", ino, first, last, t)

    def add_garbage(self, block_ids: list[str]) -> None:
        """Blocks that no record ever referenced (not journaled: if this is lost, the
        blocks are unreferenced and `fusefs fsck --repair` finds them)."""
        with self._txn() as db:
            db.executemany("INSERT OR IGNORE INTO garbage VALUES (?)", [(b,) for b in block_ids])

    def garbage(self, limit: int = 1000) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT block_id FROM garbage LIMIT ?",
                                                   (limit,))]

    def garbage_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM garbage").fetchone()[0]

    def forget_garbage(self, block_ids: list[str]) -> None:
        with self._txn() as db:
            db.executemany("DELETE FROM garbage WHERE block_id=?", [(b,) for b in block_ids])

    # -- extended attributes ----------------------------------------------------------------

    def xattr(self, ino: int, name: bytes) -> bytes | None:
        with self._lock:
            if not self._may_have_xattrs(ino):
                return None
            row = self._db.execute("SELECT value FROM xattrs WHERE ino=? AND name=?",
                                   (ino, name)).fetchone()
        return row[0] if row else None

    def xattr_names(self, ino: int) -> list[bytes]:
        with self._lock:
            if not self._may_have_xattrs(ino):
                return []
            return [r[0] for r in self._db.execute(
                "SELECT name FROM xattrs WHERE ino=? ORDER BY name", (ino,))]

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._record("set_xattr", ino, name, value, now_ns())

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        if self.xattr(ino, name) is None:
            return False
        return self._record("remove_xattr", ino, name, now_ns())

    # -- whole-filesystem reads (fsck, the journal's sweep) ---------------------------------
    # Each reads committed-or-open state under the lock, like every read here; none uses or
    # fills the caches.

    def inode_modes(self) -> list[tuple[int, int, int]]:
        """(ino, mode, nlink) of every inode, in inode order."""
        return self._query("SELECT ino, mode, nlink FROM inodes ORDER BY ino")

    def dentries(self) -> list[tuple[int, bytes, int]]:
        """(parent, name, ino) of every directory entry, in (parent, name) order; the
        inode it names may be missing (fsck looks for that)."""
        return self._query("SELECT parent, name, ino FROM dentries ORDER BY parent, name")

    def named_inodes(self) -> set[int]:
        """Every inode number that at least one directory entry names."""
        return {r[0] for r in self._query("SELECT DISTINCT ino FROM dentries")}

    def name_counts(self) -> dict[int, int]:
        """ino -> how many directory entries name it, for inodes that exist."""
        return dict(self._query("SELECT d.ino, COUNT(*) FROM dentries d "
                                "JOIN inodes i ON i.ino = d.ino GROUP BY d.ino"))

    def subdir_counts(self) -> dict[int, int]:
        """parent -> how many of its entries name an existing directory (a directory's
        link count is 2 plus this)."""
        return dict(self._query("SELECT d.parent, COUNT(*) FROM dentries d "
                                "JOIN inodes i ON i.ino = d.ino WHERE (i.mode & ?) = ? "
                                "GROUP BY d.parent", (stat.S_IFMT(0o177777), stat.S_IFDIR)))

    def blocks_without_inode(self) -> list[int]:
        """Inode numbers that have block-map rows (or patches) but no inode row, in order."""
        return [r[0] for r in self._query(
            "SELECT ino FROM blocks WHERE ino NOT IN (SELECT ino FROM inodes) UNION "
            "SELECT ino FROM patches WHERE ino NOT IN (SELECT ino FROM inodes) ORDER BY ino")]

    def block_rows(self) -> list[tuple[int, str, str]]:
        """(ino, block id, checksum) of every block the block maps read, patches included,
        each once, in (ino, index) order."""
        return self._query("SELECT ino, block_id, checksum FROM (SELECT ino, idx, block_id, "
                           "checksum FROM blocks UNION SELECT ino, idx, block_id, checksum "
                           "FROM patches) ORDER BY ino, idx")

    def figures(self) -> dict:
        """How much the filesystem holds: inodes, regular files and their bytes, blocks."""
        inodes, files, size = self._query(
            "SELECT COUNT(*), COALESCE(SUM((mode & 61440) = 32768), 0), "
            "COALESCE(SUM(CASE WHEN (mode & 61440) = 32768 THEN size ELSE 0 END), 0) "
            "FROM inodes")[0]
        (blocks,) = self._query("SELECT COUNT(*) FROM blocks")[0]
        return {"inodes": inodes, "files": files, "bytes": size, "block_refs": blocks}

    def referenced_blocks(self) -> set[str]:
        """The block ids the metadata references: every id in a block map. These are the
        file data a reader may still fetch; no other rule says which data blocks are live
        (garbage ids are not: see `garbage_ids`)."""
        return {r[0] for r in self._query("SELECT block_id FROM blocks UNION "
                                          "SELECT block_id FROM patches")}

    def garbage_ids(self) -> set[str]:
        """Every block id waiting in `garbage` to be deleted from the cluster (no block map
        references them; `garbage(limit)` hands them out in batches)."""
        return {r[0] for r in self._query("SELECT block_id FROM garbage")}

    # -- repairs (fsck) ---------------------------------------------------------------------

    def set_nlink(self, ino: int, nlink: int) -> None:
        self._record("set_nlink", ino, nlink)

    def remove_dentry(self, parent: int, name: bytes) -> None:
        """Drop a name whose inode is gone (fsck); nothing else changes."""
        self._record("remove_dentry", parent, name)

    def _query(self, sql: str, args=()) -> list[tuple]:
        """Any read-only query, for the named reads and for tests."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()


# -- the changes a journal record can carry ---------------------------------------------------
# Each kind of record is declared once, by `@_op(...)` on the function that applies it: its
# name in the record, the inode rows and the directory entries it writes (what the caches
# must learn), and the function itself. The function takes the connection (inside the
# caller's transaction) and the record's arguments, and depends on nothing else: replaying
# a record reproduces the change exactly. Its parameters after `db` are the record's
# arguments in order: they are the format on disk and on the cluster, never reorder them
# (a new argument goes last, with a default, so that older records still apply).


def _nothing(*_) -> tuple:
    return ()


@dataclass(frozen=True, slots=True)
class Op:
    """One kind of journal record, as `_op` declared it.

    `apply(db, *args)` makes the change and returns what the Metadata method returns.
    `inodes(*args)`: every inode whose row it may write (the cache of rows forgets exactly
    these). `names(*args)`: every directory entry it writes, as ((parent, name), ino), ino
    None for a name now absent (the cache of names takes exactly these). `xattr_owner(*args)`:
    set only for an op that adds xattr rows, the inode that gets them (the set of inodes
    that may have xattrs must include it). `rows(cached, *args)`, where given: the rows
    (as `Metadata.inode` reads them) of every inode in `inodes(*args)` after the change,
    None for one it cannot tell; `cached(ino)` is the row before it, or None if unknown.
    It saves the next read of a row the change itself wrote (a new file, its directory).
    `new_dir(*args)`, where given: the directory it created, empty (its names are all
    known: none), or None.
    """

    name: str
    apply: Callable[..., Any]
    inodes: Callable[..., tuple]
    names: Callable[..., tuple]
    xattr_owner: Callable[..., int] | None = None
    rows: Callable[..., dict] | None = None
    new_dir: Callable[..., int | None] | None = None


_OPS: dict[str, Op] = {}  # the registry: a record's op name -> its Op


def _op(name: str, *, inodes, names, xattr_owner=None, rows=None, new_dir=None):
    """Declare the decorated function as the change `name` (see Op)."""
    def register(apply):
        if name in _OPS:
            raise ValueError(f"journal op {name!r} declared twice")
        _OPS[name] = Op(name, apply, inodes, names, xattr_owner, rows, new_dir)
        return apply
    return register


@_op("format", inodes=lambda *_: (ROOT_INO,), names=_nothing)
def _op_format(db, uid, gid, mode, t):
    db.execute("INSERT INTO inodes VALUES (?,?,?,?,?,?,?,?,?,0,NULL)",
               (ROOT_INO, stat.S_IFDIR | mode, uid, gid, 2, 0, t, t, t))


def _touched(cached, ino: int, t: int, links: int = 0, times: int = 2):
    """The row of `ino` after a change set its mtime and ctime (`times` 2) or its ctime
    alone (1) to `t` and added `links` to its link count, from the cached row before it;
    None if that is not known. (Columns as `Metadata.inode` reads them: ino, mode, uid,
    gid, nlink, size, atime, mtime, ctime, rdev, target, bytes stored.)"""
    old = cached(ino)
    if old is None:
        return None
    mtime = t if times == 2 else old[7]
    return (*old[:4], old[4] + links, old[5], old[6], mtime, t, *old[9:])


def _create_rows(cached, ino, parent, name, mode, uid, gid, rdev, target, t):
    """The rows `_op_create` writes: the new inode's whole (no blocks: `_free_ino`), and
    its directory's from the cached one (times, link count), if that is known."""
    up = 1 if stat.S_ISDIR(mode) else 0
    return {ino: (ino, mode, uid, gid, 1 + up, len(target) if target is not None else 0,
                  t, t, t, rdev, target, 0),
            parent: _touched(cached, parent, t, up)}


def _link_rows(cached, ino, parent, name, t):
    """`_op_link`'s rows: one more link and a new ctime for the file, new times for the
    directory (a directory is never linked: ino != parent)."""
    return {ino: _touched(cached, ino, t, 1, times=1), parent: _touched(cached, parent, t)}


def _unlink_rows(cached, parent, name, ino, is_dir, t, remove=False):
    """`_op_unlink`'s rows: the directory's (times; one link less for a subdirectory);
    the inode's is forgotten (its link count left is the database's to tell)."""
    return {ino: None, parent: _touched(cached, parent, t, -1 if is_dir else 0)}


def _rename_rows(cached, old_parent, old_name, new_parent, new_name, ino, is_dir, replaced,
                 replaced_is_dir, t):
    """`_op_rename`'s rows: both directories' (times, links of a moved or replaced
    subdirectory), the moved inode's ctime; the replaced inode's is forgotten."""
    parents = {old_parent, new_parent}
    others = [ino] + ([replaced] if replaced is not None else [])
    if len(parents | set(others)) < len(parents) + len(others):  # one inode in two roles
        return {i: None for i in (*parents, *others)}
    lost = 1 if replaced is not None and replaced_is_dir else 0
    if old_parent == new_parent:
        rows = {old_parent: _touched(cached, old_parent, t, -lost)}
    else:
        moved = 1 if is_dir else 0
        rows = {old_parent: _touched(cached, old_parent, t, -moved),
                new_parent: _touched(cached, new_parent, t, moved - lost)}
    rows[ino] = _touched(cached, ino, t, times=1)
    if replaced is not None:
        rows[replaced] = None
    return rows


@_op("create", inodes=lambda ino, parent, *_: (ino, parent),
     names=lambda ino, parent, name, *_: (((parent, name), ino),), rows=_create_rows,
     new_dir=lambda ino, parent, name, mode, *_: ino if stat.S_ISDIR(mode) else None)
def _op_create(db, ino, parent, name, mode, uid, gid, rdev, target, t):
    is_dir = stat.S_ISDIR(mode)
    db.execute("INSERT INTO inodes VALUES (?,?,?,?,?,?,?,?,?,?,?)",
               (ino, mode, uid, gid, 2 if is_dir else 1,
                len(target) if target is not None else 0, t, t, t, rdev, target))
    db.execute("INSERT INTO dentries VALUES (?,?,?,?)", (parent, name, ino, stat.S_IFMT(mode)))
    db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=?, nlink=nlink+? WHERE ino=?",
               (t, t, 1 if is_dir else 0, parent))


@_op("link", inodes=lambda ino, parent, *_: (ino, parent),
     names=lambda ino, parent, name, *_: (((parent, name), ino),), rows=_link_rows)
def _op_link(db, ino, parent, name, t):
    db.execute("INSERT INTO dentries SELECT ?, ?, ?, COALESCE((SELECT mode & ? FROM inodes "
               "WHERE ino=?), 0)", (parent, name, ino, stat.S_IFMT(0o177777), ino))
    db.execute("UPDATE inodes SET nlink=nlink+1, ctime_ns=? WHERE ino=?", (t, ino))
    db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE ino=?", (t, t, parent))


@_op("unlink", inodes=lambda parent, name, ino, *_: (parent, ino),
     names=lambda parent, name, *_: (((parent, name), None),), rows=_unlink_rows)
def _op_unlink(db, parent, name, ino, is_dir, t, remove=False):
    db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
    db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=?, nlink=nlink-? WHERE ino=?",
               (t, t, 1 if is_dir else 0, parent))
    if remove:
        # The caller saw the last name of a file (nlink 1), or an empty directory, which
        # goes whatever its count: nothing is left of it.
        _op_remove_inode(db, ino)  # no use updating a row that goes
        return 0
    drop = 2 if is_dir else 1  # a directory also loses its "." link
    left = max(db.execute("SELECT nlink FROM inodes WHERE ino=?", (ino,)).fetchone()[0]
               - drop, 0)
    db.execute("UPDATE inodes SET nlink=?, ctime_ns=? WHERE ino=?", (left, t, ino))
    return left


@_op("rename",
     inodes=lambda old_parent, old_name, new_parent, new_name, ino, is_dir, replaced, *_:
     (old_parent, new_parent, ino, replaced),
     names=lambda old_parent, old_name, new_parent, new_name, ino, *_:
     (((old_parent, old_name), None), ((new_parent, new_name), ino)), rows=_rename_rows)
def _op_rename(db, old_parent, old_name, new_parent, new_name, ino, is_dir, replaced,
               replaced_is_dir, t):
    left = None
    if replaced is not None:
        db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (new_parent, new_name))
        db.execute("UPDATE inodes SET nlink=MAX(nlink-?, 0), ctime_ns=? WHERE ino=?",
                   (2 if replaced_is_dir else 1, t, replaced))
        if replaced_is_dir:
            db.execute("UPDATE inodes SET nlink=nlink-1 WHERE ino=?", (new_parent,))
        left = db.execute("SELECT nlink FROM inodes WHERE ino=?", (replaced,)).fetchone()[0]
    db.execute("UPDATE dentries SET parent=?, name=? WHERE parent=? AND name=?",
               (new_parent, new_name, old_parent, old_name))
    if is_dir and old_parent != new_parent:
        db.execute("UPDATE inodes SET nlink=nlink-1 WHERE ino=?", (old_parent,))
        db.execute("UPDATE inodes SET nlink=nlink+1 WHERE ino=?", (new_parent,))
    # One statement per inode: `ino IN (?, ?)` makes SQLite build a temporary index for
    # the list, which cost five times as much here.
    db.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (t, ino))
    if replaced is not None:
        db.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (t, replaced))
    for parent in {old_parent, new_parent}:
        db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE ino=?", (t, t, parent))
    return left


@_op("set_attrs", inodes=lambda ino, *_: (ino,), names=_nothing)
def _op_set_attrs(db, ino, fields):
    if not set(fields) <= set(_INODE_COLUMNS[1:]):
        raise ValueError(f"not inode attributes: {sorted(fields)}")
    columns = ", ".join(f"{k}=?" for k in fields)
    db.execute(f"UPDATE inodes SET {columns} WHERE ino=?", (*fields.values(), ino))


@_op("remove_inode", inodes=lambda ino: (ino,),
     names=_nothing)  # only an inode without names is removed
def _op_remove_inode(db, ino):
    # The connection's trigger (_INODE_REMOVED) moves the blocks and patches of a deleted
    # row to the garbage and deletes its xattrs: one statement from Python, not five.
    if db.execute("DELETE FROM inodes WHERE ino=?", (ino,)).rowcount == 0:
        # No row (fsck's to mend), so no trigger: the rest one by one.
        db.execute("INSERT OR IGNORE INTO garbage SELECT block_id FROM blocks WHERE ino=? "
                   "UNION ALL SELECT block_id FROM patches WHERE ino=?", (ino, ino))
        for table in ("blocks", "patches", "xattrs"):
            db.execute(f"DELETE FROM {table} WHERE ino=?", (ino,))


@_op("commit_blocks", inodes=lambda ino, *_: (ino,), names=_nothing)
def _op_commit_blocks(db, ino, refs, size, mtime_ns, ctime_ns):
    if db.execute("SELECT 1 FROM inodes WHERE ino=?", (ino,)).fetchone() is None:
        db.executemany("INSERT OR IGNORE INTO garbage VALUES (?)",
                       [(b,) for r in refs for b in _entry_ids(r)])
        return  # removed meanwhile: what was uploaded is garbage already
    for idx, block_id, checksum, length, *patched in refs:
        keep = _entry_ids((idx, block_id, checksum, length, *patched))
        _garbage_entry(db, ino, "idx=?", (idx,), keep)
        db.execute("INSERT OR REPLACE INTO blocks VALUES (?,?,?,?,?)",
                   (ino, idx, block_id, checksum, length))
        db.executemany("INSERT INTO patches VALUES (?,?,?,?,?,?,?,?)",
                       [(ino, idx, n, *p) for n, p in enumerate(patched[0] if patched else ())])
    # MAX: a namespace change may have moved ctime after the caller read it.
    db.execute("UPDATE inodes SET size=?, mtime_ns=?, ctime_ns=MAX(ctime_ns, ?) WHERE ino=?",
               (size, mtime_ns, ctime_ns, ino))


def _entry_ids(entry) -> set[str]:
    """The block ids one commit_blocks entry [idx, id, checksum, length, (patches)] reads."""
    return {entry[1], *(p[2] for p in (entry[4] if len(entry) > 4 else ()))}


def _garbage_entry(db, ino, where: str, args: tuple, keep=frozenset()) -> None:
    """Drop the block-map entries of `ino` that match `where` (on idx), with their patches;
    the ids they read, but for `keep`, become garbage."""
    for table in ("blocks", "patches"):
        ids = {r[0] for r in db.execute(f"SELECT block_id FROM {table} WHERE ino=? AND {where}",
                                        (ino, *args))}
        db.executemany("INSERT OR IGNORE INTO garbage VALUES (?)", [(b,) for b in ids - keep])
        db.execute(f"DELETE FROM {table} WHERE ino=? AND {where}", (ino, *args))


def _cut_patches(db, ino, idx, length) -> None:
    """Block idx of `ino` now ends at `length`: its patches end there too (a patch wholly
    past it goes, and its small block too once no patch reads it)."""
    before = {r[0] for r in db.execute("SELECT block_id FROM patches WHERE ino=? AND idx=?",
                                       (ino, idx))}
    db.execute("DELETE FROM patches WHERE ino=? AND idx=? AND start>=?", (ino, idx, length))
    db.execute("UPDATE patches SET length=?-start WHERE ino=? AND idx=? AND start+length>?",
               (length, ino, idx, length))
    after = {r[0] for r in db.execute("SELECT block_id FROM patches WHERE ino=? AND idx=?",
                                      (ino, idx))}
    db.executemany("INSERT OR IGNORE INTO garbage VALUES (?)", [(b,) for b in before - after])


@_op("truncate_blocks", inodes=lambda ino, *_: (ino,), names=_nothing)
def _op_truncate_blocks(db, ino, keep_below, size, t, last_length):
    _garbage_entry(db, ino, "idx>=?", (keep_below,))
    if last_length is not None:
        db.execute("UPDATE blocks SET length=MIN(length, ?) WHERE ino=? AND idx=?",
                   (last_length, ino, keep_below - 1))
        _cut_patches(db, ino, keep_below - 1, last_length)
    db.execute("UPDATE inodes SET size=?, mtime_ns=?, ctime_ns=? WHERE ino=?",
               (size, t, t, ino))


@_op("punch_blocks", inodes=lambda ino, *_: (ino,), names=_nothing)
def _op_punch_blocks(db, ino, first, last, t):
    _garbage_entry(db, ino, "idx>=? AND idx<?", (first, last))
    db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE ino=?", (t, t, ino))


@_op("set_xattr", inodes=lambda ino, *_: (ino,), names=_nothing,
     xattr_owner=lambda ino, *_: ino)
def _op_set_xattr(db, ino, name, value, t):
    db.execute("INSERT OR REPLACE INTO xattrs VALUES (?,?,?)", (ino, name, value))
    db.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (t, ino))


@_op("remove_xattr", inodes=lambda ino, *_: (ino,), names=_nothing)
def _op_remove_xattr(db, ino, name, t):
    gone = db.execute("DELETE FROM xattrs WHERE ino=? AND name=?", (ino, name)).rowcount
    if gone:
        db.execute("UPDATE inodes SET ctime_ns=? WHERE ino=?", (t, ino))
    return bool(gone)


@_op("set_nlink", inodes=lambda ino, _: (ino,), names=_nothing)
def _op_set_nlink(db, ino, nlink):
    db.execute("UPDATE inodes SET nlink=? WHERE ino=?", (nlink, ino))


@_op("remove_dentry", inodes=_nothing,  # a name only
     names=lambda parent, name: (((parent, name), None),))
def _op_remove_dentry(db, parent, name):
    db.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))


# -- the record format ------------------------------------------------------------------------
# One record is a JSON array [seq, op, [args...]]; bytes travel as {"b": base64}.

def _to_json(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"b": base64.b64encode(value).decode()}
    raise TypeError(f"cannot journal a {type(value).__name__}")


def _from_json(obj: dict):
    return base64.b64decode(obj["b"], validate=True) if obj.keys() == {"b"} else obj


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_to_json)  # one, not one per call


def encode_record(seq: int, op: str, args) -> bytes:
    # Names and values (bytes) are arguments of their own: converting them here spares
    # the encoder a call back into Python for each (deeper ones still go through it).
    args = [{"b": base64.b64encode(a).decode()} if type(a) is bytes else a for a in args]
    return _ENCODER.encode([seq, op, args]).encode()


def decode_record(raw: bytes | str) -> tuple[int, str, list]:
    """Raises ValueError for anything that is not a well-formed record of a known op."""
    try:
        seq, op, args = json.loads(raw, object_hook=_from_json)
    except (TypeError, ValueError) as e:
        raise ValueError(f"malformed journal record: {e}") from None
    if type(seq) is not int or not isinstance(op, str) or op not in _OPS \
            or not isinstance(args, list):
        raise ValueError(f"malformed journal record {str(raw)[:80]}")
    return seq, op, args


class RecordGap(Exception):
    """Replay met a record that does not follow the last one applied."""


class _Transaction:
    """`with`: take the connection lock, commit the open group, BEGIN; COMMIT on success,
    ROLLBACK on error. For bookkeeping that is not a journaled change."""

    def __init__(self, metadata: Metadata, writes_namespace: bool):
        self._md = metadata
        self._writes_namespace = writes_namespace

    def __enter__(self) -> sqlite3.Connection:
        self._md._lock.acquire()
        try:
            self._md._commit_group()
            self._md._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._md._lock.release()
            raise
        return self._md._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not exc_type:
                self._md._db.execute("COMMIT")
            elif self._md._db.in_transaction:  # (SQLite may have rolled it back: disk full)
                self._md._db.execute("ROLLBACK")
        finally:
            try:
                if self._writes_namespace:
                    self._md._forget_cached()
            finally:
                self._md._lock.release()
