"""The on-disk store of one block server: immutable checksummed blocks and CAS registers.

Layout under the data directory (see docs/blockserver-store.md for states and crashes):

    server-id              this server's stable id, written once on first start
    local-token            a new random token at each start: a client that reads it here
                           and in our status is on this host and may read blocks/ itself
    blocks/XX/<id>         one file per block; XX is the first two hex digits of the id
    tmp/                   files being written; whatever is here at start is debris and removed
    spare/                 empty files of deleted blocks, kept to hold the next blocks written
    quarantine/<id>.<ns>   copies that failed verification, kept for a person to inspect
    registers/<name>       named registers

A block file is a 32-byte header followed by the block's bytes. The header is MAGIC (8 bytes),
the xxh3-128 checksum (16 raw bytes) and the length (u64, little-endian).

Promises: a block becomes visible only complete and durable (written to tmp/, fsynced, then
hard-linked into place, which also refuses to replace an existing block); a copy whose bytes
no longer match its checksum is never returned; nothing is ever created outside the data
directory, because every name comes from a validated id or register name.

Inodes are recycled: a deleted block's file is renamed into spare/ and emptied, and the
next block is written into it, so a delete-then-write workload neither frees nor allocates
inodes (ext4 without a journal scans every inode deleted in the last minutes on each
allocation, which cost 10-20% of the machine's CPU in a rewrite of a large file). Because an
inode can change block, a read checks after reading that the block's name still leads to
the inode it read; otherwise the block was deleted meanwhile (NotFound).

Threads: the store is used from many request threads. link() is the atomic
create-if-absent, so writers of one id need no lock. The counters are kept per prefix
directory: `_prefix_locks[p]` guards `_counts[p]` and `_used[p]` and is held across the
link/unlink/rename that changes that directory, so a recount of one directory (after a
quarantine) never races an update. `_register_lock` serialises register compare-and-swap.
`_spare_lock` guards the list of spare names. No thread holds two of these locks at once.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import stat
import struct
import threading
import time
import uuid

import xxhash

from . import protocol

log = logging.getLogger("blockserver.store")

MAGIC = protocol.BLOCK_MAGIC  # the format is shared with clients that read files themselves
_HEADER = protocol.BLOCK_HEADER
HEADER_SIZE = _HEADER.size
_REGISTER_HEADER = struct.Struct("<8sQ")
_REGISTER_MAGIC = b"FFSREG1\n"
MAX_REGISTER_SIZE = 1 << 20
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DROP_CACHE_MIN = 64 << 10  # blocks this large leave the page cache once durable
SPARE_LIMIT = 16384  # empty inodes kept for reuse: no data blocks, 16 MiB of inode table


class StoreError(Exception):
    """Base of the store's errors. The server maps each subclass to one HTTP status.

    StoreError
    ├── NotFound           no such block or register
    ├── Corrupt            the stored copy failed verification and was quarantined
    ├── Conflict           the id exists with a different checksum (blocks are immutable)
    ├── ChecksumMismatch   the bytes received do not match the checksum sent with them
    ├── StoreFull          not enough free space (after the configured reserve)
    └── StaleGeneration    a register write that does not advance the generation
    """


class NotFound(StoreError):
    """No such block or register."""


class Corrupt(StoreError):
    """The stored copy failed verification and was quarantined."""


class Conflict(StoreError):
    """The id exists with a different checksum: blocks are immutable."""


class ChecksumMismatch(StoreError):
    """The bytes received do not match the checksum sent with them."""


class StoreFull(StoreError):
    """Not enough free space (after the configured reserve)."""


class StaleGeneration(StoreError):
    """A register write that does not advance the generation; `current` is the stored one."""

    def __init__(self, current: int):
        super().__init__(f"register is at generation {current}")
        self.current = current


def _sync_filesystem_fn():
    """syncfs(2) when libc has it: one call makes every file written so far durable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    return fn


class BlockStore:
    """The blocks and registers of one data directory (docs/blockserver-store.md): each
    block a file under blocks/<first two hex digits>/, written in tmp/, made durable, then
    linked into place; failed copies go to quarantine/, empty files of deleted blocks wait
    in spare/ for new ones. Locks: one per two-digit prefix (its names, count and bytes),
    one for the spares, and one that makes a register write a compare-and-swap."""

    def __init__(self, root: str, *, reserve_bytes: int = 0):
        self.root = os.path.abspath(root)
        self.reserve_bytes = reserve_bytes
        self._blocks = os.path.join(self.root, "blocks")
        self._tmp = os.path.join(self.root, "tmp")
        self._quarantine = os.path.join(self.root, "quarantine")
        self._registers = os.path.join(self.root, "registers")
        self._spare = os.path.join(self.root, "spare")
        self._spare_lock = threading.Lock()
        self._spares: list[str] = []  # names in spare/: empty, one link, free to take
        self._prefix_locks = [threading.Lock() for _ in range(256)]
        self._counts = [0] * 256  # blocks per prefix directory, guarded by _prefix_locks
        self._used = [0] * 256  # block bytes per prefix directory, guarded by _prefix_locks
        self._register_lock = threading.Lock()
        self._syncfs = _sync_filesystem_fn()
        self._corrupt = [0] * 256  # copies quarantined per prefix, guarded by _prefix_locks
        # Ids whose only copy here was quarantined: answered 410 (lost), never 404 (never
        # written), until a good copy is put again or the id is deleted. Rebuilt from
        # quarantine/ at start. Single set operations only (atomic under the GIL).
        self._lost: set[str] = set()
        self._prepare()

    @property
    def block_count(self) -> int:
        return sum(self._counts)

    @property
    def used_bytes(self) -> int:
        return sum(self._used)

    @property
    def corrupt_found(self) -> int:
        return sum(self._corrupt)

    # -- start-up ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        for d in (self.root, self._blocks, self._tmp, self._spare, self._quarantine,
                  self._registers):
            os.makedirs(d, exist_ok=True)
        for i in range(256):
            os.makedirs(os.path.join(self._blocks, f"{i:02x}"), exist_ok=True)
        self.server_id = self._load_server_id()
        self.local_token = self._new_local_token()
        debris = os.listdir(self._tmp)
        for name in debris:
            os.unlink(os.path.join(self._tmp, name))
        if debris:
            log.info("removed %d unfinished writes left by an earlier stop", len(debris))
        self._load_spares()
        self._lost = {name.split(".")[0] for name in os.listdir(self._quarantine)}
        self._fsync_dir(self.root)
        started = time.monotonic()
        for prefix in range(256):
            self._recount(prefix)
        log.info("data directory %s: %d blocks, %d bytes, %d spare files (scanned in %.2fs)",
                 self.root, self.block_count, self.used_bytes, len(self._spares),
                 time.monotonic() - started)

    def _load_spares(self) -> None:
        """Keep the spare files that are empty and nobody else's; remove the rest.

        A crash can leave in spare/ a file being written (data, one link), a block's file
        between its link into blocks/ and the removal of its spare name (two links: only
        the name goes), or a deleted block not yet emptied (data, one link).
        """
        for name in os.listdir(self._spare):
            path = os.path.join(self._spare, name)
            st = os.lstat(path)
            if (stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_nlink == 1
                    and len(self._spares) < SPARE_LIMIT):
                self._spares.append(name)
            else:
                os.unlink(path)

    @property
    def spare_count(self) -> int:
        return len(self._spares)

    def _recount(self, prefix: int) -> None:
        """Count one prefix directory from disk. Expects `_prefix_locks[prefix]` held
        (or no other thread yet)."""
        count = used = 0
        with os.scandir(os.path.join(self._blocks, f"{prefix:02x}")) as it:
            for entry in it:
                if protocol.is_block_id(entry.name):
                    count += 1
                    used += max(0, entry.stat().st_size - HEADER_SIZE)
        self._counts[prefix], self._used[prefix] = count, used

    def _load_server_id(self) -> str:
        path = os.path.join(self.root, "server-id")
        try:
            with open(path) as f:
                value = f.read().strip()
            if value:
                return value
        except FileNotFoundError:
            pass
        value = uuid.uuid4().hex
        self._write_atomic(path, value.encode() + b"\n")
        return value

    def _new_local_token(self) -> str | None:
        """Write a new token for clients on this host (protocol.files); None when it cannot
        be written (a full disk): clients then read through the API only."""
        token = uuid.uuid4().hex
        try:
            self._write_atomic(os.path.join(self.root, protocol.TOKEN_FILE),
                               token.encode() + b"\n")
        except (OSError, StoreError) as e:
            log.warning("cannot write %s (%s): clients on this host will read blocks "
                        "through the API only", protocol.TOKEN_FILE, e)
            return None
        return token

    # -- paths and durability ---------------------------------------------------------------

    def _block_path(self, block_id: str) -> str:
        # Callers validated block_id with protocol.is_block_id: 32 lowercase hex, no separators.
        return protocol.block_file(self.root, block_id)

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_all(self, paths: list[str], uncache: frozenset = frozenset()) -> None:
        """Make the given files durable: one fsync each for a few, one syncfs for many.
        Then the pages of those also in `uncache` are dropped (see _drop_cached)."""
        if len(paths) > 2 and self._sync_filesystem():
            for path in uncache:
                _drop_cached_file(path)
            return
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                if path in uncache:
                    _drop_cached(fd)
            finally:
                os.close(fd)

    def _sync_filesystem(self) -> bool:
        """syncfs(2) of the data directory's filesystem; False where it is missing or failed."""
        if self._syncfs is None:
            return False
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return self._syncfs(fd) == 0
        finally:
            os.close(fd)

    def _write_new_tmp(self, name: str, parts, sync: bool) -> str:
        """Write `parts` to a new file in tmp/; StoreFull when the disk (or inodes) ran out."""
        tmp = os.path.join(self._tmp, f"{name}.{uuid.uuid4().hex}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            if not (e.errno in _FULL_ERRNOS and self._drop_spares()):
                raise _full_or(e) from None
            try:  # out of inodes, and the spares held some: once more
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as e2:
                raise _full_or(e2) from None
        try:
            _write_all(fd, parts)
            if sync:
                os.fsync(fd)
        except OSError as e:
            os.close(fd)
            _unlink_quietly(tmp)
            raise _full_or(e) from None
        os.close(fd)
        return tmp

    def _write_atomic(self, path: str, data: bytes) -> None:
        tmp = self._write_new_tmp(os.path.basename(path), (data,), sync=True)
        try:
            os.replace(tmp, path)
        except OSError as e:
            _unlink_quietly(tmp)
            raise _full_or(e) from None
        self._fsync_dir(os.path.dirname(path))

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def disk_id(self) -> str:
        """Which disk holds the data: servers that share one report the same id, so a
        client counts that disk's space once (each copy of a block uses it again)."""
        try:
            with open("/etc/machine-id") as f:
                machine = f.read().strip()
        except OSError:
            machine = socket.gethostname()
        return f"{machine}:{os.stat(self.root).st_dev}"

    def capacity_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize

    # -- blocks -----------------------------------------------------------------------------

    def put(self, block_id: str, data, expected: str, verified: bool = False,
            use_reserve: bool = False) -> bool:
        """Store a block durably. True if created, False if it was already there (harmless).
        `verified`: the caller has checked `data` against `expected` already.
        `use_reserve`: the block may take the reserved space (metadata, see put_many)."""
        return self.put_many([(block_id, data, expected)], verified, use_reserve)[0].result()

    def put_many(self, items, verified: bool = False,
                 use_reserve: bool = False) -> list["Outcome"]:
        """Store many blocks sharing two filesystem syncs. One Outcome per (id, data, checksum).

        Data is made durable before any block is linked into place, and the links are made
        durable before this returns, so an acknowledged block survives a crash and an
        unacknowledged one is either absent or complete.
        """
        outcomes = [Outcome() for _ in items]
        staged = []  # (index, block_id, tmp path, size, checksum)
        # One statvfs for the whole batch. Data stops short of the reserve; metadata
        # (journal segments, checkpoints) may use it, so that a full disk never keeps a
        # client from recording the removals that would free space.
        room = self.free_bytes() - (0 if use_reserve else self.reserve_bytes)
        try:
            for i, (block_id, data, expected) in enumerate(items):
                if not verified and protocol.checksum(data) != expected:
                    outcomes[i].error = ChecksumMismatch(
                        f"block {block_id}: body does not match checksum {expected}")
                    continue
                try:
                    room -= len(data) + HEADER_SIZE
                    if room < 0:
                        raise StoreFull("not enough free space on the data directory's disk")
                    staged.append((i, block_id, self._write_tmp(block_id, data, expected),
                                   len(data), expected))
                except StoreError as e:
                    outcomes[i].error = e
            if not staged:
                return outcomes
            self._sync_all([s[2] for s in staged],
                           frozenset(s[2] for s in staged if s[3] >= DROP_CACHE_MIN))
            dirs = set()
            for i, block_id, tmp, size, expected in staged:
                try:
                    outcomes[i].value = self._publish(block_id, tmp, size, expected)
                    dirs.add(os.path.dirname(self._block_path(block_id)))
                except StoreError as e:
                    outcomes[i].error = e
            self._sync_all(sorted(dirs))
            return outcomes
        finally:
            for s in staged:
                _unlink_quietly(s[2])

    def _write_tmp(self, block_id: str, data, expected: str) -> str:
        header = _HEADER.pack(MAGIC, bytes.fromhex(expected), len(data))
        with self._spare_lock:
            name = self._spares.pop() if self._spares else None
        if name is None:
            return self._write_new_tmp(block_id, (header, data), sync=False)
        path = os.path.join(self._spare, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        except FileNotFoundError:  # removed by hand: make a new file instead
            return self._write_new_tmp(block_id, (header, data), sync=False)
        try:
            _write_all(fd, (header, data))
        except OSError as e:
            _unlink_quietly(path)
            raise _full_or(e) from None
        finally:
            os.close(fd)
        return path

    def _publish(self, block_id: str, tmp: str, size: int, expected: str) -> bool:
        path = self._block_path(block_id)
        prefix = int(block_id[:2], 16)
        for _ in range(3):
            try:
                with self._prefix_locks[prefix]:
                    os.link(tmp, path)  # atomic, and never replaces an existing block
                    self._counts[prefix] += 1
                    self._used[prefix] += size
                self._lost.discard(block_id)
                return True
            except FileExistsError:
                try:
                    existing = self._read_verified(block_id)[1]
                except Corrupt:
                    continue  # quarantined: our good copy takes its place
                except NotFound:
                    continue  # deleted meanwhile
                if existing != expected:
                    raise Conflict(f"block {block_id} exists with checksum {existing}")
                return False
            except OSError as e:
                # A link can need an inode's worth of room too (tmpfs counts links).
                if not (e.errno in _FULL_ERRNOS and self._drop_spares()):
                    raise _full_or(e) from None
        raise Conflict(f"block {block_id} is being changed concurrently; retry")

    def get(self, block_id: str) -> tuple[memoryview, str]:
        """The block's bytes and checksum, verified. Raises NotFound or Corrupt."""
        return self._read_verified(block_id)

    def _read_verified(self, block_id: str) -> tuple[memoryview, str]:
        path = self._block_path(block_id)
        try:
            with open(path, "rb", buffering=0) as f:
                raw = f.readall()
                self._still_named(path, os.fstat(f.fileno()), block_id)
        except FileNotFoundError:
            raise self._missing(block_id) from None
        if len(raw) >= HEADER_SIZE:
            magic, digest, length = _HEADER.unpack_from(raw)
            body = memoryview(raw)[HEADER_SIZE:]
            if magic == MAGIC and length == len(body) and xxhash.xxh3_128_digest(body) == digest:
                return body, digest.hex()
        self._quarantine_file(block_id, path)
        raise Corrupt(f"stored copy of block {block_id} failed verification")

    def _missing(self, block_id: str) -> StoreError:
        """Why a block has no file here: lost to corruption (Corrupt, answered 410), or
        never stored or deleted (NotFound, 404). A reader may take 404 from enough
        servers as proof that a block was never written; a lost copy must not count."""
        if block_id in self._lost:
            return Corrupt(f"the copy of block {block_id} here failed verification and was "
                           "quarantined")
        return NotFound(block_id)

    @staticmethod
    def _still_named(path: str, opened: os.stat_result, block_id: str) -> None:
        """FileNotFoundError unless `path` still leads to the inode that was read: a delete
        during the read may have recycled that inode for another block."""
        now = os.stat(path)
        if (now.st_ino, now.st_dev) != (opened.st_ino, opened.st_dev):
            raise FileNotFoundError(errno.ENOENT, f"block {block_id} was deleted while read")

    def _quarantine_file(self, block_id: str, path: str) -> None:
        prefix = int(block_id[:2], 16)
        with self._prefix_locks[prefix]:
            try:
                os.rename(path, os.path.join(self._quarantine, f"{block_id}.{time.time_ns()}"))
            except FileNotFoundError:
                return  # another request quarantined it first
            # Damage may have resized the file, so the size once counted for it is unknown:
            # count this one directory again (1/256 of the store; corruption is rare).
            self._recount(prefix)
            self._corrupt[prefix] += 1
            self._lost.add(block_id)
        log.warning("block %s failed verification; moved to quarantine/ (a client will "
                    "re-replicate it from another server)", block_id)

    def head(self, block_id: str) -> tuple[int, str]:
        """(size, checksum) from the header alone; the bytes are not read or verified."""
        try:
            path = self._block_path(block_id)
            with open(path, "rb", buffering=0) as f:
                raw = f.read(HEADER_SIZE)
                st = os.fstat(f.fileno())
                self._still_named(path, st, block_id)
                size = st.st_size - HEADER_SIZE
        except FileNotFoundError:
            raise self._missing(block_id) from None
        if len(raw) == HEADER_SIZE:
            magic, digest, length = _HEADER.unpack(raw)
            if magic == MAGIC and length == size:
                return length, digest.hex()
        self._read_verified(block_id)  # a damaged header: quarantines and raises Corrupt
        raise Corrupt(block_id)  # not reached unless the file was replaced meanwhile

    def check(self, block_id: str, verify: bool) -> tuple[int, str]:
        if verify:
            body, digest = self._read_verified(block_id)
            return len(body), digest
        return self.head(block_id)

    def delete(self, block_id: str) -> bool:
        """Remove a block; True if it existed. Deleting a missing block is not an error."""
        return self.delete_many([block_id]) == 1

    def delete_many(self, block_ids) -> int:
        """Remove blocks; how many existed. Durable when it returns: each directory a name
        left (and spare/, which got it) is fsynced once, and only then are the moved files
        emptied and offered for reuse. Without that, a power cut could bring an old name
        back pointing at an inode that meanwhile holds another block."""
        dirs, spares, removed = set(), [], 0
        for block_id in block_ids:
            moved = self._unlink_block(block_id)
            if moved is False:
                continue
            removed += 1
            dirs.add(os.path.dirname(self._block_path(block_id)))
            if moved is not True:
                spares.append(moved)
        if spares:
            dirs.add(self._spare)
        for path in sorted(dirs):
            self._fsync_dir(path)
        for name in spares:
            self._recycle(name)
        return removed

    def _unlink_block(self, block_id: str) -> str | bool:
        """Take a block's name away: the spare name it moved to, True if unlinked, False if
        there was no such block."""
        path = self._block_path(block_id)
        prefix = int(block_id[:2], 16)
        self._lost.discard(block_id)  # deleted on purpose: absent from now on
        with self._prefix_locks[prefix]:
            try:
                st = os.stat(path)
                if st.st_nlink == 1 and len(self._spares) < SPARE_LIMIT:
                    moved = uuid.uuid4().hex
                    os.rename(path, os.path.join(self._spare, moved))
                else:  # a second link is a PUT of this id still staging: leave its inode be
                    os.unlink(path)
                    moved = True
            except FileNotFoundError:
                return False
            self._counts[prefix] -= 1
            self._used[prefix] -= max(0, st.st_size - HEADER_SIZE)
        return moved

    def _drop_spares(self) -> bool:
        """Give every spare inode back to the filesystem (it ran out); True if there were any."""
        with self._spare_lock:
            names, self._spares = self._spares, []
        for name in names:
            _unlink_quietly(os.path.join(self._spare, name))
        if names:
            log.info("out of inodes: gave back %d spare files", len(names))
        return bool(names)

    def _recycle(self, name: str) -> None:
        """Empty a deleted block's file (its space is free at once) and keep it as a spare."""
        path = os.path.join(self._spare, name)
        try:
            os.truncate(path, 0)
        except OSError:
            _unlink_quietly(path)
            return
        with self._spare_lock:
            self._spares.append(name)

    def list(self, after: str = "", limit: int = 1000) -> tuple[list[dict], str | None]:
        """Blocks with ids greater than `after`, in id order: ([{id, size, checksum}], next)."""
        entries: list[dict] = []
        start = int(after[:2], 16) if after else 0
        for i in range(start, 256):
            names = sorted(n for n in os.listdir(os.path.join(self._blocks, f"{i:02x}"))
                           if n > after and protocol.is_block_id(n))
            for name in names:
                try:
                    size, digest = self.head(name)
                except (NotFound, Corrupt):
                    continue
                entries.append({"id": name, "size": size, "checksum": digest})
                if len(entries) >= limit:
                    return entries, name
        return entries, None

    # -- registers --------------------------------------------------------------------------

    def register_get(self, name: str) -> tuple[int, bytes]:
        try:
            with open(os.path.join(self._registers, name), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise NotFound(name) from None
        if len(raw) < _REGISTER_HEADER.size or raw[:8] != _REGISTER_MAGIC:
            raise Corrupt(f"register {name} is damaged")
        generation = _REGISTER_HEADER.unpack_from(raw)[1]
        return generation, raw[_REGISTER_HEADER.size:]

    def register_put(self, name: str, generation: int, value: bytes,
                     expect: int | None = None) -> None:
        """Write a register if `generation` is newer than the stored one (compare-and-swap).

        With `expect`, the stored generation must also equal it (0 meaning absent).
        """
        with self._register_lock:
            try:
                current = self.register_get(name)[0]
            except NotFound:
                current = 0
            if generation <= current or (expect is not None and expect != current):
                raise StaleGeneration(current)
            self._write_atomic(os.path.join(self._registers, name),
                               _REGISTER_HEADER.pack(_REGISTER_MAGIC, generation) + value)


class Outcome:
    """The result of one item of a batch: a value, or the StoreError that item met."""

    __slots__ = ("value", "error")

    def __init__(self):
        self.value = None
        self.error: StoreError | None = None

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


def _drop_cached(fd: int) -> None:
    """Let the kernel drop the (clean, durable) pages of a file just written.

    Clients cache what they read and write, so these pages are rarely read again here, and
    a page cache that only grows makes each new page dearer: on this machine's VMs a 1 MiB
    write+fsync cost 3 ms of kernel CPU with the pages kept and about 1 ms with them
    dropped (freed pages go back to the host, and taking them again faults there).
    """
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # advice only


def _drop_cached_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # advice only
    try:
        _drop_cached(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, parts) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            n = os.write(fd, view)
            view = view[n:]


def _full_or(error: OSError) -> Exception:
    """StoreFull for out-of-space (or out-of-inodes) errors, the error itself otherwise."""
    if error.errno in _FULL_ERRNOS:
        return StoreFull("the data directory's disk is full")
    return error


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
