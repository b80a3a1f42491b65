"""The block cache: verified immutable blocks in memory, then on local disk, then the store.

What it owns and promises (docs/promises.md: the read path; P4):
- get() returns only bytes whose xxh3-128 is the checksum the caller asked for. Bytes enter
  memory verified (the store verifies what it returns, a disk file is verified on every
  read, insert() takes blocks the store has just verified on put), and a memory entry is
  returned only for the checksum it entered with.
- Memory holds at most `memory_bytes` of block data, the disk directory at most `disk_bytes`
  (sum of file lengths); the least recently used block goes first. Blocks are immutable,
  so nothing cached is ever stale; discard() is the only invalidation.
- Concurrent misses of one block make one store fetch (single flight), also when one of
  them is a batch read-ahead (`prefetch_batch`): a reader waits for the batch, and fetches
  the block itself if the batch did not bring it.
- The disk directory is disposable: see docs/cache.md for its states and crashes.

Caveats: one BlockCache per disk directory at a time (not enforced: two would each keep
their own bound and delete each other's temporary files at start). A block discarded while
a fetch of it is in flight may be cached again; it is only wasted space until evicted.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import sys
import struct
import threading
import time
from collections import OrderedDict

import xxhash

from blockserver import protocol

from .blockstore import BlockStore

log = logging.getLogger("fusefs.cache")

PREFETCH_QUEUE = 256  # read-ahead requests waiting for a thread; more are dropped
PREFETCH_BATCH = 64  # blocks per batch read-ahead request (prefetch_batch)
# Bytes of fetched blocks waiting for the disk writer at most; a block beyond it is not
# written to the disk level (it is in memory; the disk level is only a cache).
DISK_BACKLOG = 64 << 20
# A sequential read is a scan once it has run past 1/SCAN_SHARE of the disk level (1 GiB
# of the default 2 GiB): the blocks read ahead for it beyond that go to disk only when seen
# before (SCAN_SEEN ids remembered), so one pass over a file too large to keep neither
# flushes the disk level nor pays a local write of every byte it reads (docs/cache.md).
SCAN_SHARE = 2
SCAN_SEEN = 1 << 16
# Blocks read from a local server's file whose segment sums are kept (about 300 bytes
# each: 16 GiB of 1 MiB blocks in 5 MiB), so a random reader's later misses read a segment.
LOCAL_SUMS = 1 << 14
WRITE_REMIND = 60.0  # seconds between log lines while writes to the disk level fail
_BAD = object()  # a disk cache file that is torn, not ours, or failed verification
# A block's file in the disk cache: its bytes, then the xxh3-64 of each SEGMENT of them, then
# TRAILER (magic, the block's xxh3-128 checksum, its length): a read of a few KiB of a
# cached 1 MiB block reads and checks only the segments it needs, and the checksum in the
# trailer ties them to the checksum the reader asked for.
SEGMENT = 64 << 10
TRAILER = struct.Struct("<8s16sQ")
MAGIC = b"fusefsc2"
_HEX = frozenset("0123456789abcdef")


class _Lru:
    """Keys in least-recently-used order with a byte total bounded by `limit`.

    Not thread-safe: BlockCache calls it with its lock held.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0
        self.entries: OrderedDict[str, tuple[object, int]] = OrderedDict()  # key -> (value, size)

    def fits(self, size: int) -> bool:
        return size <= self.limit

    def get(self, key: str):
        """The entry's value (marking it recently used), or None."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.entries.move_to_end(key)
        return entry[0]

    def touch(self, key: str) -> bool:
        """Mark `key` recently used; False if it is not here."""
        if key not in self.entries:
            return False
        self.entries.move_to_end(key)
        return True

    def add(self, key: str, value, size: int) -> list[str]:
        """Insert (or touch) `key`; returns the keys evicted to stay within the limit."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return []
        if not self.fits(size):
            return []
        self.entries[key] = (value, size)
        self.total += size
        evicted = []
        while self.total > self.limit:
            old, (_, old_size) = self.entries.popitem(last=False)
            self.total -= old_size
            evicted.append(old)
        return evicted

    def pop(self, key: str) -> bool:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.total -= entry[1]
        return entry is not None


class _Retry(Exception):
    """A batch read-ahead ended without this block: the waiter fetches it itself."""


class _Flight:
    """One store fetch (or disk read) that concurrent get() calls of a block wait for."""

    def __init__(self):
        self.done = threading.Event()
        self.data: bytes | None = None
        self.source = "misses"
        self.error: BaseException | None = None

    def result(self) -> tuple[bytes, str]:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.data, self.source


class BlockCache:
    """Verified immutable blocks: a memory LRU, then a disk LRU, then the block store.

    Threads: get/insert/discard/prefetch come from many fusepy and flusher threads;
    read-ahead runs on `prefetch_threads` daemon threads fed by a bounded queue.

    `_lock` guards `_memory`, `_disk` (the index of the disk files), `_flights`, `_queued`
    and `_counts`. It is a leaf in the client's lock order (docs/filesystem.md, "Lock
    order") and is never held across disk or store I/O: decisions are made under it, files
    are read, written and unlinked after it is released. The disk index and the files may
    therefore disagree for a moment; "index before file" keeps that harmless: a file is
    unlinked only after its entry left the index, and an entry is added only after its file
    was renamed into place. So the index may name a missing file (read as a miss), but a
    file outlives its entry only while it is being written.
    """

    def __init__(self, store: BlockStore, *, memory_bytes: int, disk_dir: str | None,
                 disk_bytes: int, prefetch_threads: int = 4):
        self.store = store
        self._lock = threading.Lock()
        self._dir = disk_dir if disk_dir and disk_bytes > 0 else None
        self._memory = _Lru(memory_bytes)  # id -> (bytes, checksum)
        self._disk = _Lru(disk_bytes if self._dir else 0)  # id -> None; file _dir/<id[:2]>/<id>
        self._flights: dict[tuple[str, str], _Flight] = {}  # (id, checksum) -> fetch under way
        self._queued: set[tuple[str, str]] = set()  # read-ahead requests not yet started
        self._counts = dict.fromkeys(
            ("hits_memory", "hits_disk", "hits_local", "misses", "fetches", "evictions",
             "scan_skips", "local_skips"), 0)
        self.scan_after = (disk_bytes if self._dir else 0) // SCAN_SHARE
        self._scan_seen: OrderedDict[str, None] = OrderedDict()  # scanned, not kept on disk
        # Blocks left off the disk level because a server on this host holds them (see
        # _write_disk_later): id -> (checksum, length, xxh3-64 of each SEGMENT), so that a
        # range of one is read and checked from the server's file without reading it all.
        self._local_sums: OrderedDict[str, tuple[str, int, bytes]] = OrderedDict()
        # Fetched blocks the disk writer has not written yet: id -> (checksum, bytes); a
        # read takes them from here as from their file. `_written` tells when it empties.
        self._pending: dict[str, tuple[str, bytes]] = {}
        self._pending_bytes = 0
        self._written = threading.Condition(self._lock)
        self._writes: queue.SimpleQueue = queue.SimpleQueue()
        self._unwritten, self._told_unwritten = 0, -WRITE_REMIND  # (the writer's own)
        self._writer = None
        self.room = None  # a LocalRoom: while it is low, nothing more is written to disk
        if self._dir:
            self._open_disk()
            self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                            name="cache-disk-writer")
            self._writer.start()
        self._stopping = threading.Event()
        self._queue: queue.Queue = queue.Queue(PREFETCH_QUEUE)
        self._threads = [threading.Thread(target=self._prefetch_loop, daemon=True,
                                          name=f"cache-prefetch-{i}")
                         for i in range(prefetch_threads)]
        for thread in self._threads:
            thread.start()

    # -- the interface ----------------------------------------------------------------------

    def get(self, block_id: str, checksum: str) -> bytes | bytearray:
        """The block's verified bytes, from memory, disk or the store (StorageError if none).
        Never to be changed by the caller (a block this client wrote is its bytearray)."""
        _check_id(block_id)
        source = "misses"  # what a failed fetch counts as
        try:
            data, source = self._obtain(block_id, checksum)
            return data
        finally:
            with self._lock:
                self._counts[source] += 1

    def prefetch(self, items: list[tuple[str, str]], run: int = 0) -> None:
        """Read (id, checksum) pairs ahead in the background; drops what does not fit.
        `run`: the bytes the sequential reader asking for them has read so far; past
        `scan_after`, the blocks are written to the disk level only if seen before."""
        if self._stopping.is_set() or not self._threads:
            return
        scan = self._dir is not None and run > self.scan_after
        for done, key in enumerate(items):
            _check_id(key[0])
            with self._lock:
                if self._in_memory_or_coming(key):
                    continue  # (a block on disk is read ahead too, into memory)
                self._queued.add(key)
            try:
                self._queue.put_nowait((key, scan))
            except queue.Full:
                with self._lock:
                    self._queued.discard(key)
                log.debug("read-ahead queue full; dropped %d requests", len(items) - done)
                return

    def prefetch_batch(self, items: list[tuple[str, str]]) -> None:
        """Read (id, checksum) pairs ahead in the background, PREFETCH_BATCH blocks per
        batch request (one per server): for many small blocks, such as the next files of
        a directory. Drops what does not fit in the queue."""
        if self._stopping.is_set() or not self._threads:
            return
        for key in items:
            _check_id(key[0])
        with self._lock:
            todo = [k for k in dict.fromkeys(items) if not self._is_cached_or_coming(k)]
            self._queued.update(todo)
        for start in range(0, len(todo), PREFETCH_BATCH):
            try:
                self._queue.put_nowait(todo[start:start + PREFETCH_BATCH])
            except queue.Full:
                with self._lock:
                    self._queued.difference_update(todo[start:])
                log.debug("read-ahead queue full; dropped %d blocks", len(todo) - start)
                return

    def fetch_batch(self, items: list[tuple[str, str]]) -> None:
        """Bring (id, checksum) pairs into the cache now, in this thread, with one batch
        request per server for those not cached or coming (concurrent get() calls wait
        for them). A block the batch does not bring is left to get(); nothing raises."""
        for key in items:
            _check_id(key[0])
        self._fetch_batch(list(dict.fromkeys(items)))

    def get_range(self, block_id: str, checksum: str, start: int, n: int):
        """Bytes [start, start+n) of the block (fewer past its end), verified: from memory,
        else only the segments of its disk file that hold them (not kept in memory: a
        random reader of a large file needs a few KiB of it), else the whole block fetched
        as by get(). Never to be changed by the caller."""
        _check_id(block_id)
        with self._lock:
            entry = self._memory.get(block_id)
            if entry is not None and entry[1] == checksum:
                self._counts["hits_memory"] += 1
                return memoryview(entry[0])[start:start + n]
            entry = self._pending.get(block_id)
            if entry is not None and entry[0] == checksum:
                self._counts["hits_disk"] += 1
                return memoryview(entry[1])[start:start + n]
            on_disk = (block_id, checksum) not in self._flights and \
                self._disk.touch(block_id)
            local = self._local_sums.get(block_id)
            if local is not None:
                self._local_sums.move_to_end(block_id)
        if on_disk:
            data = self._read_disk_range(block_id, checksum, start, n)
            if data is not None:
                with self._lock:
                    self._counts["hits_disk"] += 1
                return data
        elif local is not None and local[0] == checksum:
            data = self._read_local_range(block_id, checksum, local, start, n)
            if data is not None:
                with self._lock:
                    self._counts["hits_local"] += 1
                return data
        return memoryview(self.get(block_id, checksum))[start:start + n]

    def _read_local_range(self, block_id: str, checksum: str, local: tuple[str, int, bytes],
                          start: int, n: int) -> bytes | None:
        """Bytes [start, start+n) of the block from the file of a server on this host,
        checked segment by segment against the sums taken when it was read whole; None
        (the caller reads it whole, the way that finds and repairs a bad copy) when that
        file is gone, is another block's or does not match."""
        root = self.store.local_copy(block_id)
        if root is None:
            return None
        try:
            opened = protocol.open_block_file(root, block_id, checksum)
            if opened is None:
                return None
            fd, length = opened
            try:
                if length != local[1]:
                    return None
                return _read_segments(fd, length, local[2], start, n,
                                      base=protocol.BLOCK_HEADER.size)
            finally:
                os.close(fd)
        except OSError as e:
            log.debug("reading part of block %s from %s failed: %s", block_id, root, e)
            return None

    def insert(self, block_id: str, checksum: str, data) -> None:
        """Cache a block the caller has just stored (put verified it against `checksum`).

        `data` is kept as given, not copied: bytes, or a bytearray that nobody changes any
        more (the flusher's uploaded buffers, which writers copy before changing).

        Memory only: writing it to the disk level too would add a copy of every byte
        written to a disk that already holds R server copies on a one-disk machine (a
        third more disk writes, measured by benchmarks/fs_bench.py). Blocks reach the
        disk level when they are fetched."""
        _check_id(block_id)
        with self._lock:
            self._add_memory(block_id, checksum, data)

    def discard(self, block_id: str) -> None:
        """The block was deleted: forget it in memory and on disk."""
        _check_id(block_id)
        with self._lock:
            self._memory.pop(block_id)
            self._disk.pop(block_id)
            self._local_sums.pop(block_id, None)
            self._forget_pending(block_id)
        if self._dir:
            self._unlink(block_id)

    def shrink_disk(self, nbytes: int) -> int:
        """Give back at least `nbytes` of disk (the least recently used files first), or
        all there is: the disk under the cache is short of room. Returns the bytes freed."""
        doomed, freed = [], 0
        with self._lock:
            while freed < nbytes and self._disk.entries:
                block_id, (_, size) = next(iter(self._disk.entries.items()))
                self._disk.pop(block_id)
                doomed.append(block_id)
                freed += size
            self._counts["evictions"] += len(doomed)
        for block_id in doomed:
            self._unlink(block_id)
        return freed

    def stats(self) -> dict:
        with self._lock:
            return dict(self._counts, memory_bytes=self._memory.total,
                        disk_bytes=self._disk.total)

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until every fetched block waiting for the disk writer is written (or found
        not to fit); False if `timeout` seconds passed first."""
        with self._lock:
            return self._written.wait_for(lambda: not self._pending, timeout)

    def close(self) -> None:
        """Stop read-ahead, dropping what is queued, and let the disk writer finish what it
        was given; waits at most about two seconds for the first, ten for the second (what
        is not written then is only missing from the cache)."""
        self._stopping.set()  # a thread checks it before each request it takes
        for _ in self._threads:
            try:
                self._queue.put_nowait(None)  # wakes a thread waiting on an empty queue
            except queue.Full:
                break  # then no thread is waiting
        deadline = time.monotonic() + 2.0
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join(10.0)

    # -- the read path ----------------------------------------------------------------------

    def _obtain(self, block_id: str, checksum: str,
                scan: bool = False) -> tuple[bytes, str]:
        key = (block_id, checksum)
        with self._lock:
            entry = self._memory.get(block_id)
            if entry is not None and entry[1] == checksum:
                return entry[0], "hits_memory"
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if not leader:
            try:
                return flight.result()
            except _Retry:  # a batch read-ahead that did not bring it: fetch it now
                return self._obtain(block_id, checksum)
        try:
            data = self._read_disk(block_id, checksum)
            if data is not None:
                flight.source = "hits_disk"
            else:
                data = self._fetch(block_id, checksum)
        except BaseException as e:
            flight.error = e
            self._land(key, flight)
            raise
        flight.data = data
        self._land(key, flight)
        if flight.source == "misses":
            self._write_disk_later(block_id, checksum, data, scan)
        return data, flight.source

    def _seen_in_scan(self, block_id: str) -> bool:
        """A scan fetched this block: True if a scan fetched it before (recently), else
        remember it and return False."""
        with self._lock:
            if self._scan_seen.pop(block_id, 0) is None:
                return True
            self._scan_seen[block_id] = None
            if len(self._scan_seen) > SCAN_SEEN:
                self._scan_seen.popitem(last=False)
            self._counts["scan_skips"] += 1
            return False

    def _fetch(self, block_id: str, checksum: str) -> bytes:
        with self._lock:
            self._counts["fetches"] += 1
        return self.store.get(block_id, checksum)

    def _land(self, key: tuple[str, str], flight: _Flight) -> None:
        """End a flight: cache its bytes, then wake its waiters."""
        with self._lock:
            if flight.data is not None:
                self._add_memory(key[0], key[1], flight.data)
            del self._flights[key]
        flight.done.set()

    def _add_memory(self, block_id: str, checksum: str, data: bytes) -> None:
        """Caller holds _lock."""
        self._memory.pop(block_id)  # a different checksum must not linger
        # A bytearray (a block this client wrote) may hold up to 1/8 more than its length,
        # grown by appends: count what it really holds, so the bound is one of memory.
        size = len(data) if type(data) is bytes else sys.getsizeof(data)
        self._counts["evictions"] += len(self._memory.add(block_id, (data, checksum), size))

    def _is_cached_or_coming(self, key: tuple[str, str]) -> bool:
        """Caller holds _lock."""
        return self._in_memory_or_coming(key) or key[0] in self._disk.entries

    def _in_memory_or_coming(self, key: tuple[str, str]) -> bool:
        """Caller holds _lock."""
        entry = self._memory.entries.get(key[0])
        return ((entry is not None and entry[0][1] == key[1])
                or key in self._flights or key in self._queued)

    def _prefetch_loop(self) -> None:
        while True:
            key = self._queue.get()
            if key is None or self._stopping.is_set():
                return
            if isinstance(key, list):
                self._fetch_batch(key)
                continue
            key, scan = key
            with self._lock:
                self._queued.discard(key)
            try:
                self._obtain(*key, scan=scan)
            except Exception as e:  # noqa: BLE001 - read-ahead is a hint; get() will report
                log.debug("read-ahead of block %s failed: %s", key[0], e)

    def _fetch_batch(self, keys: list[tuple[str, str]]) -> None:
        """Fetch the blocks of `keys` not cached or coming yet with one store.get_many, as
        flights that concurrent get() calls wait for. Every flight lands, whatever fails:
        a block the batch did not bring wakes its waiters with _Retry."""
        mine: dict[tuple[str, str], _Flight] = {}
        with self._lock:
            self._queued.difference_update(keys)
            for key in keys:
                if not self._is_cached_or_coming(key):
                    mine[key] = self._flights[key] = _Flight()
        found: dict[str, bytes] = {}
        try:
            if mine:
                found = self.store.get_many(list(mine))
        except Exception as e:  # noqa: BLE001 - read-ahead is a hint; get() will report
            log.debug("batch read-ahead of %d blocks failed: %s", len(mine), e)
        finally:
            with self._lock:
                self._counts["fetches"] += len(found)
            for key, flight in mine.items():
                data = found.get(key[0])
                if data is None:
                    flight.error = _Retry()
                else:
                    flight.data = data
                self._land(key, flight)
                if data is not None:
                    self._write_disk_later(key[0], key[1], data)

    # -- the disk level ---------------------------------------------------------------------

    def _path(self, block_id: str) -> str:
        return os.path.join(self._dir, block_id[:2], block_id)

    def _open_disk(self) -> None:
        """Delete write debris, then index the files present, oldest first, within bound."""
        tmp = os.path.join(self._dir, "tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
        found = []
        for sub in os.scandir(self._dir):
            if len(sub.name) != 2 or not _HEX.issuperset(sub.name) \
                    or not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                if protocol.is_block_id(entry.name) and entry.name.startswith(sub.name) \
                        and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    found.append((st.st_mtime_ns, entry.name, st.st_size))
        doomed = []
        for _, block_id, size in sorted(found):
            doomed += self._disk.add(block_id, None, size) if self._disk.fits(size) \
                else [block_id]
        for block_id in doomed:
            self._unlink(block_id)
        log.debug("disk cache %s: %d blocks, %d bytes (%d removed to fit)", self._dir,
                  len(self._disk.entries), self._disk.total, len(doomed))

    def _read_disk(self, block_id: str, checksum: str) -> bytes | None:
        """The verified bytes of the block's file (or of the block waiting to be written
        to it), or None (a bad file is deleted)."""
        with self._lock:
            entry = self._pending.get(block_id)
            if entry is not None and entry[0] == checksum:
                return entry[1]
            if not self._disk.touch(block_id):
                return None
        path = self._path(block_id)
        data = self._read_file(path, checksum, lambda fd, length, _: os.pread(fd, length, 0))
        if data is not None and data is not _BAD and protocol.checksum(data) == checksum:
            try:
                os.utime(path)  # the LRU order survives a restart
            except OSError:
                pass
            return data
        self._drop_disk(block_id, path, data is not None)
        return None

    def _read_disk_range(self, block_id: str, checksum: str, start: int,
                         n: int) -> bytes | None:
        """Bytes [start, start+n) of the block's file, if its trailer names `checksum`, the
        segments holding them checked against their xxh3-64s; None if the file is missing
        or bad (a bad one is deleted). Its last use is not recorded on disk (os.utime): a
        whole read does that."""
        path = self._path(block_id)
        data = self._read_file(path, checksum, lambda fd, length, sums: _read_segments(
            fd, length, sums, start, n))
        if data is None or data is _BAD:
            self._drop_disk(block_id, path, data is _BAD)
            return None
        return data

    @staticmethod
    def _read_file(path: str, checksum: str, read):
        """read(fd, the block's length, its segment sums) on the block's file, after its
        trailer was checked (ours, whole, written for `checksum`); None if the file is
        missing, _BAD if the trailer is not right or read() found the file bad."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read disk cache file %s: %s; fetching the block", path, e)
            return None
        try:
            size = os.fstat(fd).st_size
            if size < TRAILER.size:
                return _BAD
            magic, named, length = TRAILER.unpack(
                os.pread(fd, TRAILER.size, size - TRAILER.size))
            count = -(-length // SEGMENT)
            if magic != MAGIC or named.hex() != checksum or \
                    size != length + 8 * count + TRAILER.size:
                return _BAD
            sums = os.pread(fd, 8 * count, length)
            data = read(fd, length, sums)
            return _BAD if data is None else data
        except OSError as e:
            log.warning("cannot read disk cache file %s: %s; fetching the block", path, e)
            return None
        finally:
            os.close(fd)

    def _drop_disk(self, block_id: str, path: str, failed: bool) -> None:
        if failed:
            log.warning("disk cache file %s failed verification; deleted", path)
        with self._lock:
            self._disk.pop(block_id)
        self._unlink(block_id)

    def _write_disk_later(self, block_id: str, checksum: str, data: bytes,
                          scan: bool = False) -> None:
        """Give a fetched block to the disk writer: a file per block costs a few hundred
        microseconds of file-system work that no reader or read-ahead should wait for.
        A block with a copy on a server of this host is not written: it was read from
        that copy's file, which serves its next reads as cheaply, whole or (with the
        segment sums kept here) in part. One read ahead for a scan is written only if
        a scan read it before (`_seen_in_scan`)."""
        if self.store.local_copy(block_id) is not None:
            sums = _segment_sums(data) if len(data) > SEGMENT else None
            with self._lock:
                self._counts["local_skips"] += 1
                if sums is not None:
                    self._local_sums[block_id] = (checksum, len(data), sums)
                    self._local_sums.move_to_end(block_id)
                    while len(self._local_sums) > LOCAL_SUMS:
                        self._local_sums.popitem(last=False)
            return
        if self._writer is None or (scan and not self._seen_in_scan(block_id)):
            return
        with self._lock:
            if block_id in self._pending or block_id in self._disk.entries \
                    or self._pending_bytes + len(data) > DISK_BACKLOG:
                return
            self._pending[block_id] = (checksum, data)
            self._pending_bytes += len(data)
        self._writes.put(block_id)

    def _write_loop(self) -> None:
        """The disk writer: writes the blocks it is given in order (those not discarded
        since), until close()."""
        while (block_id := self._writes.get()) is not None:
            with self._lock:
                entry = self._pending.get(block_id)
            if entry is None:
                continue
            try:
                self._write_disk(block_id, *entry)
            except Exception:  # noqa: BLE001 - the cache goes on without this file
                log.exception("unexpected error writing block %s to the disk cache", block_id)
            finally:
                with self._lock:
                    self._forget_pending(block_id)

    def _forget_pending(self, block_id: str) -> None:
        """Caller holds _lock."""
        entry = self._pending.pop(block_id, None)
        if entry is not None:
            self._pending_bytes -= len(entry[1])
            self._written.notify_all()

    def _write_disk(self, block_id: str, checksum: str, data: bytes) -> None:
        size = len(data) + 8 * -(-len(data) // SEGMENT) + TRAILER.size  # the file's
        if not self._dir or not self._disk.fits(size) or (
                self.room is not None and self.room.low):
            return  # (a disk short of room keeps what it has for the metadata)
        with self._lock:
            if self._disk.touch(block_id):
                return
        path = self._path(block_id)
        # Only this thread writes this name (ids are unique, the thread id tells writers of
        # one id apart), and the directory is emptied at start: no need for mkstemp.
        tmp = os.path.join(self._dir, "tmp", f"{block_id}.{threading.get_ident()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                try:
                    trailer = TRAILER.pack(MAGIC, bytes.fromhex(checksum), len(data))
                    _write_all(fd, [data, _segment_sums(data), trailer])
                finally:
                    os.close(fd)
                try:
                    os.replace(tmp, path)  # no fsync: a torn file fails verification later
                except FileNotFoundError:  # the first block of its subdirectory
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    os.replace(tmp, path)
            except BaseException:
                _remove(tmp)
                raise
        except OSError as e:
            self._write_failed(block_id, e)
            return
        with self._lock:
            evicted = self._disk.add(block_id, None, size)
            self._counts["evictions"] += len(evicted)
        for old in evicted:
            self._unlink(old)

    def _write_failed(self, block_id: str, e: OSError) -> None:
        """A write that failed is said once a minute, not once a block: a disk out of room
        or out of inodes (which statvfs's free bytes do not show) fails every one. Called
        on the writer thread only."""
        self._unwritten += 1
        now = time.monotonic()
        if now - self._told_unwritten >= WRITE_REMIND:
            log.warning("cannot write block %s to the disk cache in %s: %s (%d blocks left "
                        "uncached since the last such line; they are read from the servers)",
                        block_id, self._dir, e, self._unwritten)
            self._told_unwritten, self._unwritten = now, 0

    def _unlink(self, block_id: str) -> None:
        _remove(self._path(block_id))


def _write_all(fd: int, parts: list) -> None:
    """Write `parts` one after another: one system call unless the kernel takes less."""
    left = sum(map(len, parts))
    while left:
        done = os.writev(fd, parts)
        left -= done
        while parts and done >= len(parts[0]):
            done -= len(parts[0])
            parts = parts[1:]
        if done:
            parts[0] = memoryview(parts[0])[done:]


def _segment_sums(data) -> bytes:
    """The xxh3-64 of each SEGMENT of `data`, 8 bytes each."""
    view = memoryview(data)
    return b"".join(xxhash.xxh3_64_digest(view[i:i + SEGMENT])
                    for i in range(0, len(view), SEGMENT))


def _read_segments(fd: int, length: int, sums: bytes, start: int, n: int,
                   base: int = 0) -> bytes | None:
    """Bytes [start, start+n) of a block of `length` bytes (clipped to it) stored from
    offset `base` of file `fd`, read segment by segment and checked against `sums`; None
    if a segment does not match or the file is short."""
    end = min(start + n, length)
    if start >= end:
        return b""
    first, last = start // SEGMENT, (end - 1) // SEGMENT
    want = min((last + 1) * SEGMENT, length) - first * SEGMENT
    raw = os.pread(fd, want, base + first * SEGMENT)
    if len(raw) != want:
        return None
    view = memoryview(raw)
    for i in range(first, last + 1):
        part = view[(i - first) * SEGMENT:(i - first + 1) * SEGMENT]
        if xxhash.xxh3_64_digest(part) != sums[8 * i:8 * i + 8]:
            return None
    return raw[start - first * SEGMENT:end - first * SEGMENT]


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove disk cache file %s: %s", path, e)


def _check_id(block_id: str) -> None:
    # Ids name files in the disk cache: anything else could write outside it.
    if not protocol.is_block_id(block_id):
        raise ValueError(f"not a block id: {block_id!r}")
