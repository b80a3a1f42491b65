"""The background work that makes dirty file data durable.

The `Flusher` keeps the registry of live files (`FileData`, in filedata.py: inodes that are
open or hold unsaved data) and the count of dirty bytes, and uploads dirty blocks through
the block store, each version of a block as a new block with its own id (blocks are
immutable; retries of the same bytes reuse the id). It switches the block map in the
metadata only once the new block is durable; the block it replaces becomes garbage, which
a background thread deletes after the metadata that stopped referencing it is durable
(`durable`). The size recorded with a commit never covers bytes still only in memory
(`recordable_size`), so a crash leaves each file as a state it had: blocks uploaded above
a lower block still dirty wait ("parked") for it.

Triggers for an upload: a block is full and the writer moved past it; a block has been
dirty for `max_age` seconds; dirty memory is above half its bound (oldest first); or a
flush/fsync/unmount asks for it. A failed upload keeps its data, is retried with back-off,
and the error is kept on the file (`error`, `error_seq`) for the next fsync/close to report.
Nothing dirty is ever dropped to make room: writers wait instead (`wait_for_room`).

States of a dirty block: dirty → uploading → (committed: gone from `dirty`), or parked
(uploaded, its commit waiting for a lower block) → committed, or back to dirty when it
changed during the upload (its version moved) or the upload failed.

Which locks each method expects is said on it; the order of all locks, and why none is
held across network I/O: docs/filesystem.md, "Lock order".
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from blockserver import protocol
from blockserver.protocol import new_block_id

from . import errors
from .filedata import DirtyBlock, FileData, live_patches
from .metadata import BlockRef, Inode, Metadata, Patch

log = logging.getLogger("fusefs.flusher")

SMALL_BLOCK = 256 << 10  # blocks below this size are uploaded in batches
MAX_IN_FLIGHT = 32 << 20  # bytes being uploaded at once; a block written meanwhile is copied
GC_TICK = 2.0  # seconds between looks at the garbage
GC_WAIT = 30.0  # garbage still growing is deleted anyway once it has waited this long


@dataclass(slots=True)
class UploadJob:
    """One version of one dirty block, handed to an upload thread. `data` is the block's
    buffer itself (marked shared, so a later write copies it first); `block` is the
    object, not only its index: a block dropped by a truncation and written again is a new
    DirtyBlock whose version restarts, and must not be taken for this one."""

    live: FileData
    idx: int
    data: bytearray
    block: DirtyBlock
    version: int
    block_id: str


class Flusher:
    """Registry of live files, dirty-memory bound, upload triggers and pool, commits of
    uploaded blocks, and garbage collection. `_lock` protects the registry (`_files`), the
    dirty and in-flight byte counts, the recent errors and the work signal; everything in
    a FileData is protected by its own lock."""

    def __init__(self, store, cache, metadata: Metadata, *, dirty_limit: int,
                 max_age: float = 5.0, threads: int = 4, collect_garbage: bool = True,
                 block_size: int, durable=None):
        self.store = store
        self.block_size = block_size  # to keep recorded sizes within committed data
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
        self._in_flight = 0  # bytes handed to upload jobs not finished yet, guarded by _lock
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

    def file(self, ino: int, inode: Inode | None = None) -> FileData:
        """The live state of `ino`, loaded from the metadata on first use (`inode`: its
        attributes there, when the caller has just read or made them)."""
        with self._lock:
            live = self._files.get(ino)
        if live is not None:
            return live
        if inode is None:
            inode = self.metadata.inode(ino)
        # An empty file stores nothing (a truncation drops every block row past its size):
        # a new file's open reads no block map.
        stored = inode is not None and (inode.size or inode.stored)
        refs = self.metadata.block_refs(ino, 0, 2**62) if stored else {}
        live = FileData(ino, inode.size if inode else 0, inode.mtime_ns if inode else 0,
                      inode.ctime_ns if inode else 0, refs)
        with self._lock:
            return self._files.setdefault(ino, live)

    def live_files(self) -> list[FileData]:
        with self._lock:
            return list(self._files.values())

    def live(self, ino: int) -> FileData | None:
        with self._lock:
            return self._files.get(ino)

    def registered(self, live: FileData) -> bool:
        """Caller holds live.lock: live is (and, while the lock is held, stays) the live state
        of its inode. Check before changing a FileData obtained from file()."""
        with self._lock:
            return self._files.get(live.ino) is live

    def forget_if_idle(self, live: FileData) -> None:
        """Drop a file's live state when it is closed and has nothing left to upload."""
        with live.lock:  # held throughout, so that no open slips in between check and drop
            stale = self._stale_ids(live)
            if live.open_count == 0 and not live.dirty:
                with self._lock:
                    if self._files.get(live.ino) is live:
                        del self._files[live.ino]
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

    def drop(self, live: FileData) -> None:
        """The inode is gone: discard its dirty data (nothing can read it any more)."""
        with live.lock:
            live.removed = True
            freed = sum(len(b.data) for b in live.dirty.values())
            live.dirty.clear()
            stale = self._stale_ids(live)
            live.changed.notify_all()
        self._garbage(stale)
        self.account(-freed)
        with self._lock:
            if self._files.get(live.ino) is live:
                del self._files[live.ino]

    # -- flushing on request ----------------------------------------------------------------

    def request(self, live: FileData) -> None:
        """Upload this file's dirty blocks soon (close). The flusher picks the request up at
        its next tick (0.2 s) rather than at once, so the files closed meanwhile share
        batches: untar of small files costs a few requests per server, not one per file."""
        with live.lock:
            live.flush_wanted = bool(live.dirty)

    def flush(self, live: FileData, timeout: float | None = None) -> None:
        """Upload every block dirty now and wait; raise the upload error if one fails."""
        with live.lock:
            targets = set(live.dirty)
            seq = live.error_seq
            live.flush_wanted = bool(targets)
            for idx in targets:
                live.dirty[idx].retry_at = 0.0  # an explicit flush retries at once
        with self._lock:
            self._work.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        with live.lock:
            while targets & live.dirty.keys():
                if live.error_seq != seq and live.error is not None:
                    raise live.error
                if deadline is not None and time.monotonic() > deadline:
                    raise errors.Timeout(f"inode {live.ino}: upload did not finish in time")
                live.changed.wait(0.5)

    def flush_all(self, progress=None) -> None:
        """Upload everything dirty, retrying until it is done (unmount). Never drops data,
        unless the metadata database has failed (MetadataFailed): then no upload can ever
        be recorded in this mount, and waiting would only make the unmount hang; the log
        names each file whose unsaved data is given up."""
        delay = 0.5
        while True:
            with self._lock:
                files = [f for f in self._files.values() if f.dirty]
            if not files:
                return
            failed = getattr(self.metadata, "failed", None)
            if failed:
                for live in files:
                    with live.lock:
                        size = sum(len(block.data) for block in live.dirty.values())
                    log.error("unmounting: the unsaved data of inode %d (%d bytes in blocks "
                              "not yet recorded) is lost, as nothing can be recorded once %s",
                              live.ino, size, failed)
                return
            pending = 0
            for live in files:
                try:
                    self.flush(live, timeout=10)
                except errors.StorageError as e:
                    pending += 1
                    log.warning("unsaved data of inode %d waits for the servers: %s", live.ino, e)
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
                self._in_flight += sum(len(job.data) for job in jobs)
            self._dispatch(jobs)

    def _dispatch(self, jobs: list[UploadJob]) -> None:
        """Hand jobs to the upload pool: small blocks in batches of 64, others one each."""
        small = [job for job in jobs if len(job.data) < SMALL_BLOCK]
        for start in range(0, len(small), 64):
            self._uploads.submit(self._upload, small[start:start + 64])
        for job in jobs:
            if len(job.data) >= SMALL_BLOCK:
                self._uploads.submit(self._upload, [job])

    def _choose(self, files: list[FileData], pressure: bool, budget: int) -> list[UploadJob]:
        """Takes each file's lock in turn: mark the blocks due for upload uploading and
        return them as jobs, up to `budget` bytes."""
        now = time.monotonic()
        jobs: list[UploadJob] = []
        stale: list[str] = []
        for live in files:
            with live.lock:
                stale += self._stale_ids(live)
                budget = self._choose_in(live, now, pressure, budget, jobs)
        self._garbage(stale)
        return jobs

    def _choose_in(self, live: FileData, now: float, pressure: bool, budget: int,
                   jobs: list[UploadJob]) -> int:
        """Caller holds live.lock: add this file's due blocks to `jobs`; returns the budget
        left."""
        for idx, blk in live.dirty.items():
            if budget <= 0:
                break  # the rest waits for uploads in flight to finish
            if blk.uploading or blk.retry_at > now or blk.parked():
                continue
            if live.flush_wanted or blk.ready or pressure or now - blk.since >= self.max_age:
                blk.uploading = True
                blk.shared = True  # no copy: a later write copies (writable())
                budget -= len(blk.data)
                jobs.append(UploadJob(live, idx, blk.data, blk, blk.version,
                                      self._id_for(live, idx, blk)))
        return budget

    @staticmethod
    def _id_for(live: FileData, idx: int, blk: DirtyBlock) -> str:
        """Caller holds live.lock: the id to upload this version of the block under; the
        same on every retry while the bytes stay the same."""
        if not blk.current_id():
            blk.block_id, blk.id_version, blk.stored = new_block_id(), blk.version, None
            live.unsettled[blk.block_id] = (idx, blk)
        return blk.block_id

    @staticmethod
    def _stale_ids(live: FileData) -> list[str]:
        """Caller holds live.lock: take the unsettled ids no block will ever commit (their
        block was dropped or changed since) and that no upload is sending now."""
        stale = []
        for block_id, (idx, blk) in list(live.unsettled.items()):
            if blk.uploading:
                continue  # its upload's end settles it
            if (live.removed or live.dirty.get(idx) is not blk or blk.block_id != block_id
                    or not blk.current_id()):
                del live.unsettled[block_id]
                stale.append(block_id)
        return stale

    def _garbage(self, block_ids: list[str]) -> None:
        if block_ids:
            self.metadata.add_garbage(block_ids)

    def _upload(self, jobs: list[UploadJob]) -> None:
        """On an upload thread, no lock held: store the jobs' blocks, then commit them."""
        try:
            refs = self._put(jobs)
            if refs is not None:
                self._commit_all(jobs, refs)
        finally:
            with self._lock:
                self._in_flight -= sum(len(job.data) for job in jobs)
                self._work.notify_all()

    def _put(self, jobs: list[UploadJob]) -> list[BlockRef] | None:
        """No lock held: store the blocks on W servers and cache them; their refs, or None
        if the upload failed (then recorded on the files by `_failed`)."""
        refs = [BlockRef(job.block_id, protocol.checksum(job.data), len(job.data))
                for job in jobs]
        try:
            items = [(r.block_id, job.data, r.checksum) for r, job in zip(refs, jobs)]
            if len(items) == 1:
                self.store.put(*items[0])
            else:
                self.store.put_many(items)
        except errors.StorageError as e:
            self._failed(jobs, e)
            return None
        except Exception as e:  # noqa: BLE001 - a bug must not kill the flusher
            log.exception("unexpected error while uploading")
            self._failed(jobs, errors.StorageError(f"unexpected upload error: {e}"))
            return None
        for ref, job in zip(refs, jobs):
            self.cache.insert(ref.block_id, ref.checksum, job.data)
        return refs

    def _commit_all(self, jobs: list[UploadJob], refs: list[BlockRef]) -> None:
        """No lock held: commit the stored blocks, file by file."""
        by_file: dict[int, list] = {}
        for ref, job in zip(refs, jobs):
            by_file.setdefault(id(job.live), []).append((ref, job))
        for entries in by_file.values():
            try:
                self._commit(entries)
            except Exception as e:  # noqa: BLE001 - e.g. the metadata disk is full
                log.exception("could not record uploaded blocks in the metadata")
                self._failed([job for _, job in entries],
                             errors.StorageError(f"metadata commit failed: {e}"))

    def _commit(self, entries: list[tuple[BlockRef, UploadJob]]) -> None:
        """Takes the file's lock: record the uploaded blocks that may be recorded now (see
        `_committable`); the others stay dirty, uploaded, until the blocks below them are
        committed."""
        live = entries[0][1].live
        freed = 0
        with live.lock:
            for ref, job in entries:
                self._uploaded(live, ref, job)
            done, size = self._committable(live)
            if done:  # metadata first: if it fails, the blocks stay dirty (see _upload)
                self.metadata.commit_blocks(live.ino, done, size, live.mtime_ns, live.ctime_ns)
            for idx, ref in done.items():
                blk = live.dirty.pop(idx)
                freed += len(blk.data)
                live.unsettled.pop(blk.block_id, None)
                live.refs[idx] = ref
            if not live.dirty:
                live.flush_wanted = False
                live.error = None  # everything is durable: an earlier failure is moot
            stale = self._stale_ids(live)
            live.changed.notify_all()
        self._garbage(stale)
        self.account(-freed)
        self.forget_if_idle(live)

    @staticmethod
    def _uploaded(live: FileData, ref: BlockRef, job: UploadJob) -> None:
        """Caller holds live.lock: the job's upload ended well; park its block for commit
        if it is still the dirty block at its index, unchanged since."""
        blk = job.block
        blk.uploading = False
        if (not live.removed and live.dirty.get(job.idx) is blk
                and blk.version == job.version and blk.block_id == ref.block_id):
            if blk.base is None:
                blk.stored = ref
            else:  # a patch: the stored block stays, with the uploaded ranges over it
                blk.stored = replace(blk.base, patches=live_patches(blk.base.patches, tuple(
                    Patch(start, length, ref.block_id, ref.checksum, at)
                    for start, length, at in blk.extents)))

    def _committable(self, live: FileData) -> tuple[dict[int, BlockRef], int]:
        """Caller holds live.lock: the uploaded blocks to commit now, and the size to record
        with them (`recordable_size`). A block not entirely within that size is not
        committed yet (its bytes beyond the recorded size would come back if the file grew
        after a crash); it waits, uploaded, and goes with the block that moves the
        frontier."""
        ready = {i: b.stored for i, b in live.dirty.items() if b.parked()}
        size = self.recordable_size(live, set(ready))
        if size == live.size:
            return ready, size
        return {i: r for i, r in ready.items() if i * self.block_size + r.length <= size}, size

    def recordable_size(self, live: FileData, uploaded=frozenset()) -> int:
        """Caller holds live.lock: the size the metadata may record for this file now.

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
        for idx in sorted(i for i in live.dirty if i not in uploaded):
            if live.dirty[idx].base is not None:
                continue  # a patch lies inside the stored block: it moves no size
            covered = self._recorded_length(live, idx)
            if len(live.dirty[idx].data) > covered:
                inode = self.metadata.inode(live.ino)
                before = inode.size if inode is not None else 0
                return min(live.size, max(idx * bs + covered, before))
        return live.size

    def _recorded_length(self, live: FileData, idx: int) -> int:
        """Caller holds live.lock: how many bytes of block idx the metadata holds. live.refs
        knows which blocks are recorded; only the metadata knows a length a truncation
        shortened since."""
        if idx not in live.refs:
            return 0
        recorded = self.metadata.block_refs(live.ino, idx, idx).get(idx)
        return recorded.length if recorded is not None else 0

    def recent_errors(self) -> list[str]:
        """The last few upload failures, newest last, for `fusefs status`."""
        with self._lock:
            return list(self._errors)

    def _failed(self, jobs: list[UploadJob], error: errors.StorageError) -> None:
        """Takes each job's file lock: the upload failed; keep the data, retry in a
        second, and keep the error on the file for its next fsync/close."""
        log.warning("upload of %d block(s) failed, will retry (data kept in memory): %s",
                    len(jobs), error)
        with self._lock:
            self._errors.append(f"{time.strftime('%H:%M:%S')} {error}")
        for job in jobs:
            live, blk = job.live, job.block
            with live.lock:
                blk.uploading = False
                blk.stored = None  # uploaded again (same id, same bytes) on retry
                if live.dirty.get(job.idx) is blk:
                    blk.retry_at = time.monotonic() + 1.0
                live.error = error
                live.error_seq += 1
                live.changed.notify_all()

    # -- garbage ----------------------------------------------------------------------------

    def _collect_garbage(self) -> None:
        """Every GC_TICK seconds, delete the garbage once it stopped growing (the deletes
        of an `rm -rf` wait until it ends, rather than make the servers unlink files and
        the journal ship early while it runs), or once it has waited GC_WAIT seconds."""
        seen, since = 0, None
        while not self._stopped.wait(GC_TICK):
            try:
                count = self.metadata.garbage_count()
                now = time.monotonic()
                if count and since is None:
                    since = now
                if count and (count == seen or now - since >= GC_WAIT):
                    self.collect_garbage()
                    count, since = self.metadata.garbage_count(), None
                seen = count
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
