"""Dirty file data in memory, and the background work that makes it durable.

`FileData` is the live state of one inode that is open or has unsaved data: its size and
times as applications see them, its block map (loaded once), and its dirty blocks. The
`Flusher` uploads dirty blocks through the block store, each version of a block as a new
block with its own id (blocks are immutable; retries of the same bytes reuse the id), and
switches the block map in the metadata only once the new block is durable; the block it
replaces becomes garbage, which a background thread deletes after the metadata that
stopped referencing it is durable (`durable`). The size recorded with a commit never
covers bytes still only in memory (`recordable_size`), so a crash leaves each file as a
state it had: blocks uploaded above a lower block still dirty wait ("parked") for it.

Triggers for an upload: a block is full and the writer moved past it; a block has been
dirty for `max_age` seconds; dirty memory is above half its bound (oldest first); or a
flush/fsync/unmount asks for it. A failed upload keeps its data, is retried with back-off,
and the error is kept on the file (`error`, `error_seq`) for the next fsync/close to report.
Nothing dirty is ever dropped to make room: writers wait instead (`wait_for_room`).

States of a dirty block: dirty → uploading → (committed: gone from `dirty`), or parked
(uploaded, its commit waiting for a lower block) → committed, or back to dirty when it
changed during the upload (its version moved) or the upload failed.

Locks, in the order they may be taken: `FileData.lock` (one per inode; guards everything
in that FileData), then `Flusher._lock` (the registry, the dirty-byte count and the work
signal). Neither is held across network I/O: uploads copy the bytes under the file lock,
upload without it, and re-check the version under it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from blockserver import protocol

from . import errors
from .blocks import new_block_id
from .metadata import BlockRef, Metadata

log = logging.getLogger("fusefs.flusher")

SMALL_BLOCK = 256 << 10  # blocks below this size are uploaded in batches
MAX_IN_FLIGHT = 32 << 20  # bytes being uploaded at once; a block written meanwhile is copied


class DirtyBlock:
    __slots__ = ("data", "version", "since", "uploading", "retry_at", "ready", "shared",
                 "block_id", "id_version", "stored")

    def __init__(self, data: bytearray):
        self.data = data
        self.version = 0
        # The id this block's bytes go to the servers under: one per version, so a retry
        # of the same bytes reuses it (servers that already hold it just say so) and
        # failed attempts do not leave one partial copy each.
        self.block_id: str | None = None
        self.id_version = -1  # the version `block_id` was given to
        # Set once the bytes of `id_version` are on W servers but their commit has to wait
        # for a lower block (see Flusher._committable): the ref to commit then.
        self.stored: BlockRef | None = None
        self.since = time.monotonic()
        self.uploading = False
        self.retry_at = 0.0
        self.ready = False  # full, and the writer moved on: upload without waiting for age
        self.shared = False  # an upload (and then the block cache) holds `data` itself

    def current_id(self) -> bool:
        """`block_id` names the bytes of the present version."""
        return self.block_id is not None and self.id_version == self.version

    def parked(self) -> bool:
        """Uploaded, waiting only for its commit."""
        return self.stored is not None and self.current_id()

    def writable(self) -> bytearray:
        """`data`, to change in place: copied first if an upload holds it, so the bytes an
        upload sends (and the cache then keeps) never change under it. Expects the file's
        lock held; the caller also bumps `version`."""
        if self.shared:
            self.data = bytearray(self.data)
            self.shared = False
        return self.data


class FileData:
    """Live state of one inode. Every field is guarded by `lock`."""

    def __init__(self, ino: int, size: int, mtime_ns: int, ctime_ns: int,
                 refs: dict[int, BlockRef]):
        self.ino = ino
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # blocks committed or an upload failed
        self.size = size
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns
        self.refs = refs  # index -> BlockRef of the clean blocks
        self.dirty: dict[int, DirtyBlock] = {}
        self.open_count = 0
        self.flush_wanted = False
        self.error: errors.StorageError | None = None
        self.error_seq = 0
        self.removed = False  # the inode is gone: drop everything, commit nothing
        # Block ids handed to uploads and neither committed nor garbage yet: id -> (index,
        # block). Once its block is gone or has moved on, an id becomes garbage (a failed
        # or superseded upload may have left copies on some servers).
        self.unsettled: dict[str, tuple[int, DirtyBlock]] = {}
        self.last_read_end = -1  # for read-ahead


class Flusher:
    def __init__(self, store, cache, metadata: Metadata, *, dirty_limit: int,
                 max_age: float = 5.0, threads: int = 4, collect_garbage: bool = True,
                 block_size: int | None = None, durable=None):
        self.store = store
        # Needed to keep recorded sizes within committed data (`_committable`); without it
        # (old callers) every commit records the live size, as before.
        self.block_size = block_size
        self.cache = cache
        self.metadata = metadata
        self.dirty_limit = dirty_limit
        self.max_age = max_age
        # Called before garbage is deleted: returns once the records that dropped it are
        # durable (the journal's wait on a mount; a local fsync without one).
        self.durable = durable or metadata.sync
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # new work, or room freed
        self._files: dict[int, FileData] = {}  # guarded by _lock
        self._dirty_bytes = 0  # guarded by _lock
        self._in_flight = 0  # bytes copied into upload jobs not finished yet, guarded by _lock
        self._errors: collections.deque[str] = collections.deque(maxlen=10)  # guarded by _lock
        self._stopping = False
        self._stopped = threading.Event()  # wakes the garbage thread at close
        self._uploads = ThreadPoolExecutor(threads, thread_name_prefix="flusher-upload")
        self._threads = [threading.Thread(target=self._run, name="flusher", daemon=True)]
        if collect_garbage:  # never on a read-only mount: the writer owns the blocks
            self._threads.append(threading.Thread(target=self._collect_garbage, name="gc",
                                                  daemon=True))
        for t in self._threads:
            t.start()

    # -- the registry of live files ---------------------------------------------------------

    def file(self, ino: int) -> FileData:
        """The live state of `ino`, loaded from the metadata on first use."""
        with self._lock:
            fd = self._files.get(ino)
        if fd is not None:
            return fd
        inode = self.metadata.inode(ino)
        refs = self.metadata.block_refs(ino, 0, 2**62) if inode else {}
        fd = FileData(ino, inode.size if inode else 0, inode.mtime_ns if inode else 0,
                      inode.ctime_ns if inode else 0, refs)
        with self._lock:
            return self._files.setdefault(ino, fd)

    def live_files(self) -> list[FileData]:
        with self._lock:
            return list(self._files.values())

    def live(self, ino: int) -> FileData | None:
        with self._lock:
            return self._files.get(ino)

    def registered(self, fd: FileData) -> bool:
        """Expects fd.lock held: fd is (and, while the lock is held, stays) the live state
        of its inode. Check before changing a FileData obtained from file()."""
        with self._lock:
            return self._files.get(fd.ino) is fd

    def forget_if_idle(self, fd: FileData) -> None:
        """Drop a file's live state when it is closed and has nothing left to upload."""
        with fd.lock:  # held throughout, so that no open slips in between check and drop
            stale = self._stale_ids(fd)
            if fd.open_count == 0 and not fd.dirty:
                with self._lock:
                    if self._files.get(fd.ino) is fd:
                        del self._files[fd.ino]
        self._garbage(stale)

    # -- dirty memory -----------------------------------------------------------------------

    def account(self, delta: int) -> None:
        with self._lock:
            self._dirty_bytes += delta
            if delta < 0:
                self._work.notify_all()
            elif self._dirty_bytes > self.dirty_limit // 2:
                self._work.notify_all()

    def wait_for_room(self) -> None:
        """Back-pressure: block the writer while dirty memory is over its bound."""
        with self._lock:
            while self._dirty_bytes > self.dirty_limit and not self._stopping:
                self._work.notify_all()
                self._work.wait(1.0)

    @property
    def dirty_bytes(self) -> int:
        with self._lock:
            return self._dirty_bytes

    def drop(self, fd: FileData) -> None:
        """The inode is gone: discard its dirty data (nothing can read it any more)."""
        with fd.lock:
            fd.removed = True
            freed = sum(len(b.data) for b in fd.dirty.values())
            fd.dirty.clear()
            stale = self._stale_ids(fd)
            fd.changed.notify_all()
        self._garbage(stale)
        self.account(-freed)
        with self._lock:
            if self._files.get(fd.ino) is fd:
                del self._files[fd.ino]

    # -- flushing on request ----------------------------------------------------------------

    def request(self, fd: FileData) -> None:
        """Upload this file's dirty blocks soon (close). The flusher picks the request up at
        its next tick (0.2 s) rather than at once, so the files closed meanwhile share
        batches: untar of small files costs a few requests per server, not one per file."""
        with fd.lock:
            fd.flush_wanted = bool(fd.dirty)

    def flush(self, fd: FileData, timeout: float | None = None) -> None:
        """Upload every block dirty now and wait; raise the upload error if one fails."""
        with fd.lock:
            targets = set(fd.dirty)
            seq = fd.error_seq
            fd.flush_wanted = bool(targets)
            for idx in targets:
                fd.dirty[idx].retry_at = 0.0  # an explicit flush retries at once
        with self._lock:
            self._work.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        with fd.lock:
            while targets & fd.dirty.keys():
                if fd.error_seq != seq and fd.error is not None:
                    raise fd.error
                if deadline is not None and time.monotonic() > deadline:
                    raise errors.Timeout(f"inode {fd.ino}: upload did not finish in time")
                fd.changed.wait(0.5)

    def flush_all(self, progress=None) -> None:
        """Upload everything dirty, retrying until it is done (unmount). Never drops data."""
        delay = 0.5
        while True:
            with self._lock:
                files = [f for f in self._files.values() if f.dirty]
            if not files:
                return
            pending = 0
            for fd in files:
                try:
                    self.flush(fd, timeout=10)
                except errors.StorageError as e:
                    pending += 1
                    log.warning("unsaved data of inode %d waits for the servers: %s", fd.ino, e)
            if pending:  # the servers are failing: back off rather than spin
                if progress:
                    progress(self.dirty_bytes, pending)
                time.sleep(delay)
                delay = min(2 * delay, 5.0)
            else:
                delay = 0.5

    # -- the upload loop --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                self._work.wait(0.2)
                files = list(self._files.values())
                pressure = self._dirty_bytes > self.dirty_limit // 2
            with self._lock:
                budget = MAX_IN_FLIGHT - self._in_flight
            jobs = self._choose(files, pressure, budget)
            with self._lock:
                self._in_flight += sum(len(j[2]) for j in jobs)
            small = [j for j in jobs if len(j[2]) < SMALL_BLOCK]
            for start in range(0, len(small), 64):
                self._uploads.submit(self._upload, small[start:start + 64])
            for job in jobs:
                if len(job[2]) >= SMALL_BLOCK:
                    self._uploads.submit(self._upload, [job])

    def _choose(self, files: list[FileData], pressure: bool, budget: int):
        """Mark eligible blocks uploading; return (fd, idx, bytes, (block, version)) jobs.

        The block object is part of the job: a block dropped by a truncation and written
        again is a new DirtyBlock whose version restarts, and must not be taken for it.
        """
        now = time.monotonic()
        jobs, stale = [], []
        for fd in files:
            with fd.lock:
                stale += self._stale_ids(fd)
                for idx, blk in fd.dirty.items():
                    if budget <= 0:
                        break  # the rest waits for uploads in flight to finish
                    if blk.uploading or blk.retry_at > now or blk.parked():
                        continue
                    if fd.flush_wanted or blk.ready or pressure or now - blk.since >= self.max_age:
                        blk.uploading = True
                        blk.shared = True  # no copy: a later write copies (writable())
                        budget -= len(blk.data)
                        jobs.append((fd, idx, blk.data, (blk, blk.version),
                                     self._id_for(fd, idx, blk)))
        self._garbage(stale)
        return jobs

    @staticmethod
    def _id_for(fd: FileData, idx: int, blk: DirtyBlock) -> str:
        """Expects fd.lock held: the id to upload this version of the block under; the
        same on every retry while the bytes stay the same."""
        if not blk.current_id():
            blk.block_id, blk.id_version, blk.stored = new_block_id(), blk.version, None
            fd.unsettled[blk.block_id] = (idx, blk)
        return blk.block_id

    @staticmethod
    def _stale_ids(fd: FileData) -> list[str]:
        """Expects fd.lock held: take the unsettled ids no block will ever commit (their
        block was dropped or changed since) and that no upload is sending now."""
        stale = []
        for block_id, (idx, blk) in list(fd.unsettled.items()):
            if blk.uploading:
                continue  # its upload's end settles it
            if (fd.removed or fd.dirty.get(idx) is not blk or blk.block_id != block_id
                    or not blk.current_id()):
                del fd.unsettled[block_id]
                stale.append(block_id)
        return stale

    def _garbage(self, block_ids: list[str]) -> None:
        if block_ids:
            self.metadata.add_garbage(block_ids)

    def _upload(self, jobs) -> None:
        try:
            self._upload_jobs(jobs)
        finally:
            with self._lock:
                self._in_flight -= sum(len(j[2]) for j in jobs)
                self._work.notify_all()

    def _upload_jobs(self, jobs) -> None:
        refs = []
        for _, _, data, _, block_id in jobs:
            refs.append(BlockRef(block_id, protocol.checksum(data), len(data)))
        try:
            items = [(r.block_id, job[2], r.checksum) for r, job in zip(refs, jobs)]
            if len(items) == 1:
                self.store.put(*items[0])
            else:
                self.store.put_many(items)
        except errors.StorageError as e:
            self._failed(jobs, e)
            return
        except Exception as e:  # noqa: BLE001 - a bug must not kill the flusher
            log.exception("unexpected error while uploading")
            self._failed(jobs, errors.StorageError(f"unexpected upload error: {e}"))
            return
        for ref, job in zip(refs, jobs):
            self.cache.insert(ref.block_id, ref.checksum, job[2])
        by_file: dict[int, list] = {}
        for ref, job in zip(refs, jobs):
            by_file.setdefault(id(job[0]), []).append((ref, job))
        for entries in by_file.values():
            try:
                self._commit(entries)
            except Exception as e:  # noqa: BLE001 - e.g. the metadata disk is full
                log.exception("could not record uploaded blocks in the metadata")
                self._failed([job for _, job in entries],
                             errors.StorageError(f"metadata commit failed: {e}"))

    def _commit(self, entries) -> None:
        """Record the uploaded blocks that may be recorded now (see `_committable`); the
        others stay dirty, uploaded, until the blocks below them are committed."""
        fd = entries[0][1][0]
        freed = 0
        with fd.lock:
            for ref, (_, idx, _, (uploaded, version), _) in entries:
                uploaded.uploading = False
                if (not fd.removed and fd.dirty.get(idx) is uploaded
                        and uploaded.version == version and uploaded.block_id == ref.block_id):
                    uploaded.stored = ref
            done, size = self._committable(fd)
            if done:  # metadata first: if it fails, the blocks stay dirty (see _upload)
                self.metadata.commit_blocks(fd.ino, done, size, fd.mtime_ns, fd.ctime_ns)
            for idx, ref in done.items():
                freed += len(fd.dirty.pop(idx).data)
                fd.unsettled.pop(ref.block_id, None)
                fd.refs[idx] = ref
            if not fd.dirty:
                fd.flush_wanted = False
                fd.error = None  # everything is durable: an earlier failure is moot
            stale = self._stale_ids(fd)
            fd.changed.notify_all()
        self._garbage(stale)
        self.account(-freed)
        self.forget_if_idle(fd)

    def _committable(self, fd: FileData) -> tuple[dict[int, BlockRef], int]:
        """Expects fd.lock held: the uploaded blocks to commit now, and the size to record
        with them (`recordable_size`). A block not entirely within that size is not
        committed yet (its bytes beyond the recorded size would come back if the file grew
        after a crash); it waits, uploaded, and goes with the block that moves the
        frontier."""
        ready = {i: b.stored for i, b in fd.dirty.items() if b.parked()}
        size = self.recordable_size(fd, set(ready))
        if self.block_size is None or size == fd.size:
            return ready, size
        return {i: r for i, r in ready.items() if i * self.block_size + r.length <= size}, size

    def recordable_size(self, fd: FileData, uploaded=frozenset()) -> int:
        """Expects fd.lock held: the size the metadata may record for this file now.

        Crash states must be prefixes (P2): what is recorded never describes bytes that
        are only in memory. The *frontier* is the first byte that is dirty, not uploaded
        (indexes in `uploaded` count as uploaded), and not covered by the block recorded at
        its index (a new block, or one grown past its recorded length). The answer is the
        live size, but at most the larger of the frontier and the size recorded before:
        within the old size a block still dirty reads as its old bytes or as the old hole,
        a past state. With nothing uncovered dirty, it is the live size. A truncation
        records this too, so that truncating up (or down) past dirty blocks does not
        describe them before they are committed.
        """
        bs = self.block_size
        if bs is None:
            return fd.size
        for idx in sorted(i for i in fd.dirty if i not in uploaded):
            covered = self._recorded_length(fd, idx)
            if len(fd.dirty[idx].data) > covered:
                inode = self.metadata.inode(fd.ino)
                before = inode.size if inode is not None else 0
                return min(fd.size, max(idx * bs + covered, before))
        return fd.size

    def _recorded_length(self, fd: FileData, idx: int) -> int:
        """Expects fd.lock held: how many bytes of block idx the metadata holds. fd.refs
        knows which blocks are recorded; only the metadata knows a length a truncation
        shortened since."""
        if idx not in fd.refs:
            return 0
        recorded = self.metadata.block_refs(fd.ino, idx, idx).get(idx)
        return recorded.length if recorded is not None else 0

    def recent_errors(self) -> list[str]:
        """The last few upload failures, newest last, for `fusefs status`."""
        with self._lock:
            return list(self._errors)

    def _failed(self, jobs, error: errors.StorageError) -> None:
        log.warning("upload of %d block(s) failed, will retry (data kept in memory): %s",
                    len(jobs), error)
        with self._lock:
            self._errors.append(f"{time.strftime('%H:%M:%S')} {error}")
        for fd, idx, _, (uploaded, _version), _ in jobs:
            with fd.lock:
                uploaded.uploading = False
                uploaded.stored = None  # uploaded again (same id, same bytes) on retry
                if fd.dirty.get(idx) is uploaded:
                    uploaded.retry_at = time.monotonic() + 1.0
                fd.error = error
                fd.error_seq += 1
                fd.changed.notify_all()

    # -- garbage ----------------------------------------------------------------------------

    def _collect_garbage(self) -> None:
        while not self._stopped.wait(2.0):
            try:
                self.collect_garbage()
            except errors.StorageError as e:
                log.info("garbage collection postponed: %s", e)
            except Exception:  # noqa: BLE001 - keep the thread alive, say what happened
                log.exception("garbage collection failed")

    def collect_garbage(self) -> int:
        """Delete unreferenced blocks from the cluster. Returns how many were deleted."""
        total = 0
        while not self._stopping:
            ids = self.metadata.garbage(500)
            if not ids:
                return total
            self.durable()  # nothing may reference them again after a crash
            self.store.delete_many(ids)
            for block_id in ids:
                self.cache.discard(block_id)
            self.metadata.forget_garbage(ids)
            total += len(ids)
        return total

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._work.notify_all()
        self._stopped.set()
        for t in self._threads:
            t.join(timeout=10)
        self._uploads.shutdown(wait=True)
