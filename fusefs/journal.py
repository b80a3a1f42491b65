"""Shipping a read-write mount's journal to the cluster, and the checkpoints that end it.

`Journal` is given the mount's `Lease` (lease.py) and its loaded `Metadata`. It starts a
chain of its own (segments.py), ships every committed record in segments, writes
checkpoints (checkpoint.py) and names them in the superblock through the lease, and
sweeps what a crashed writer left behind (leftovers.py). docs/journal.md has the
states and what each crash does.

A record's states: *committed* locally → *pending* (packed into the next segment, kept
with the same bytes until it is stored) → *shipped* (the segment is on W servers and a
quorum read after the put showed our lease still held, `Lease.confirm`) →
*checkpointed* (a checkpoint at or past it is named; its segment is deleted).

Invariants: a record reaches the cluster only after the data blocks it references (the
flusher records a block map change only once its blocks are on W servers); segments are
written in order, each retried with the same bytes until W servers have it (cut smaller
only when a server refuses its size); a writer ships only while its lease is valid by its
own clock, and every superblock change is a compare-and-swap, so a writer that lost its
lease can change nothing another mount reads (its chain is no longer the one the
superblock names). Garbage blocks are deleted only once the record that dropped them is
shipped in that sense (`wait_durable` is the flusher's `durable`).

Locks: `Journal._lock` guards the shipping state and is never held across network I/O;
the lease's own locks serialise superblock changes (lease.py). `Journal._lock` is never
taken while holding the metadata's lock or the lease's state lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from blockserver import protocol
from blockserver.protocol import PROCESS_TAG

from . import errors, superblock
from .checkpoint import checkpoint_blocks, write_checkpoint
from .errors import Fenced
from .lease import Lease
from .leftovers import list_everything, live_blocks
from .localroom import disk_full
from .metadata import Metadata
from .segments import encode_segment, fence_chain, segment_id

log = logging.getLogger("fusefs.journal")

SEGMENT_RECORDS = 5000  # records per segment at most
SEGMENT_BYTES = 4 << 20  # bytes per segment at most (servers refuse blocks over 16 MiB)
CHECKPOINT_RETRY = 60  # seconds before a checkpoint that found no local room is tried again


class Journal:
    """Ships a read-write mount's journal and writes its checkpoints, while `lease` holds.

    Built after the metadata is loaded; `start` names a checkpoint on this mount's own
    chain and starts the shipping thread (and the lease's renewal); `close` ships
    everything, checkpoints a long chain and gives the lease back."""

    def __init__(self, store, transport, lease: Lease, metadata: Metadata, work_dir: str, *,
                 ship_delay: float = 1.0, checkpoint_records: int = 100_000,
                 checkpoint_seconds: float = 600.0):
        self.store, self.transport, self.metadata = store, transport, metadata
        self.lease = lease
        self.work_dir = work_dir
        self.fs_id = lease.superblock.fs_id
        self.chain = lease.mount
        self.ship_delay = ship_delay
        self.checkpoint_records = checkpoint_records
        self.checkpoint_seconds = checkpoint_seconds
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # shipped moved, work, or a failure
        self._shipped = metadata.seq  # guarded by _lock
        self._segment = 1  # next segment of our chain, guarded by _lock
        self._pending: tuple[int, int, bytes] | None = None  # (segment, last seq, bytes)
        self._wanted = 0  # a waiter needs records up to here shipped now, guarded by _lock
        self._error: errors.StorageError | None = None
        self._error_seq = 0
        self._stopping = False
        self._closed = False  # a close started: a second close waits for `_close_ended`
        self._close_ended = threading.Event()
        self._last_checkpoint = (metadata.seq, time.monotonic())
        self._checkpoint_retry_at = 0.0  # (monotonic) after a checkpoint found no room
        self._obsolete: list[str] = []  # blocks to delete once the next checkpoint is named
        self._threads: list[threading.Thread] = []
        self._segment_bytes = SEGMENT_BYTES  # lowered when a server refuses a segment's size
        lease.subscribe(self._lease_changed)

    # -- start: our own chain, based on a checkpoint of what was loaded ---------------------

    def start(self, replayed: int, old_chain_end: int, sweep: bool = False) -> None:
        """Make this mount's chain the one the superblock names, then ship in the background.

        When the load replayed records of another chain, a fresh checkpoint is written
        first: the old chain is then never needed again (it may hold a copy of a segment
        its crashed writer never finished, which a later reader might not find).
        """
        cp = self.lease.superblock.checkpoint
        fence = None
        if cp["chain"] != self.chain:
            # The previous writer may still be running (paused, or partitioned): from now on
            # it cannot store another segment of its chain on W servers. The tombstone is
            # named by our checkpoints (so no sweep takes it for a leftover) until the next
            # writer fences our chain.
            late, old_chain_end = fence_chain(self.store, self.transport, self.metadata,
                                              self.fs_id, cp["chain"], old_chain_end)
            replayed += late
            fence = segment_id(self.fs_id, cp["chain"], old_chain_end)
        if replayed or self.metadata.seq != cp["seq"]:
            new_cp = write_checkpoint(self.store, self.metadata, self.fs_id, self.chain, 1,
                                      self.work_dir)
            self._obsolete += self._blocks_of(cp)
        else:
            new_cp = {**cp, "chain": self.chain, "segment": 1}
        if cp["chain"] != self.chain:  # the previous writer's chain is not needed any more
            self._obsolete += [segment_id(self.fs_id, cp["chain"], n)
                               for n in range(cp["segment"], old_chain_end)]
        if cp.get("fence") not in (None, fence):  # the chain before the last one's
            self._obsolete.append(cp["fence"])
        new_cp = {k: v for k, v in new_cp.items() if k != "fence"}
        if fence:
            new_cp["fence"] = fence
        self.lease.update(checkpoint=new_cp)
        self.metadata.shipped(self.metadata.seq, {"chain": self.chain, "segment": "1"})
        self._last_checkpoint = (new_cp["seq"], time.monotonic())
        self._delete_obsolete()
        self.metadata.on_record = self._noticed
        self.lease.start()
        work = [(self._ship_loop, "journal-ship")]
        if sweep:  # the last writer did not finish cleanly: it may have left uploads behind
            work.append((self._sweep_later, "sweep"))
        for target, name in work:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _blocks_of(self, checkpoint: dict) -> list[str]:
        try:
            return checkpoint_blocks(self.store, checkpoint)
        except errors.StorageError as e:
            log.info("old checkpoint not deleted (%s); fsck --repair finds it", e)
            return []

    # -- the lease --------------------------------------------------------------------------

    def _lease_changed(self, lost: str | None) -> None:
        """The lease was renewed (shipping may go on at once) or lost (everyone stops)."""
        with self._lock:
            self._changed.notify_all()
            shipped = self._shipped
        if lost and self.metadata.seq > shipped:
            # The lease logged why; this says what it cost.
            log.error("this mount lost its writer lease, so its changes not yet shipped are "
                      "dropped: %d journal records after record %d",
                      self.metadata.seq - shipped, shipped)

    @property
    def lost(self) -> str | None:
        """Why this mount may no longer write (its lease is lost), or None."""
        return self.lease.lost

    # -- shipping ---------------------------------------------------------------------------

    def _noticed(self, seq: int) -> None:
        """A new record (metadata.on_record): ship soon; at once if many are waiting."""
        if seq - self._shipped >= SEGMENT_RECORDS:
            with self._lock:
                self._changed.notify_all()

    def wait_durable(self, seq: int | None = None, timeout: float | None = None) -> None:
        """Return once every record up to `seq` (default: all so far) is on W servers.

        Raises the shipping error if an attempt fails meanwhile, Fenced if the lease is
        lost, and Timeout after `timeout` seconds."""
        target = self.metadata.seq if seq is None else seq
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            seen_error = self._error_seq
            if self._shipped >= target:
                return
            self._wanted = max(self._wanted, target)
            self._changed.notify_all()
            while self._shipped < target:
                lost = self.lease.lost
                if lost:
                    raise Fenced(lost)
                if self._stopping and not any(t.is_alive() for t in self._threads):
                    raise errors.Unavailable("the journal has stopped (unmounting)")
                if self._error_seq != seen_error and self._error is not None:
                    raise self._error
                if deadline is not None and time.monotonic() > deadline:
                    raise errors.Timeout(f"the journal is not shipped up to record {target}")
                self._changed.wait(0.5)

    def _urgent(self) -> bool:
        """Expects _lock held: ship now rather than after ship_delay."""
        return (self._pending is not None or self._wanted > self._shipped
                or self.metadata.seq - self._shipped >= SEGMENT_RECORDS)

    def _ship_loop(self) -> None:
        """Ship pending records every ship_delay seconds, at once when someone waits."""
        delay = 0.5
        while True:
            with self._lock:
                if self.lease.lost:
                    return
                if self._stopping and (self.metadata.failed or (
                        self._pending is None and self.metadata.seq == self._shipped)):
                    return  # (a failed database can record no shipping: see _close)
                if not self._stopping and not self._urgent():
                    self._changed.wait(self.ship_delay)
            try:
                self._ship_once()
                if self._checkpoint_due() and not self._stopping:
                    self._checkpoint_if_room()
                delay = 0.5
            except Fenced:
                return
            except errors.StorageError as e:
                with self._lock:
                    self._error, self._error_seq = e, self._error_seq + 1
                    self._changed.notify_all()
                log.warning("journal shipping failed, retrying in %.1f s: %s", delay, e)
                if self._wait_stopping(delay, even_when_stopping=True):
                    return
                delay = min(delay * 2, 5.0)
            except Exception as e:  # noqa: BLE001 - keep shipping; the log says what failed
                full = disk_full(e)
                if full:
                    log.warning("journal shipping waits %.1f s: the local metadata database "
                                "cannot be written (%s); free space on the disk of %s",
                                delay, e, self.work_dir)
                else:
                    log.exception("unexpected error while shipping the journal")
                if self._wait_stopping(delay, even_when_stopping=True):
                    return
                if full:
                    delay = min(delay * 2, 5.0)

    def _ship_once(self) -> None:
        with self._lock:
            pending = self._pending
            if pending is None:
                rows = _by_bytes(self.metadata.unshipped(self._shipped, SEGMENT_RECORDS),
                                 self._segment_bytes)
                if not rows:
                    return
                pending = (self._segment, rows[-1][0],
                           encode_segment(self.fs_id, self.chain, self._segment,
                                          [r for _, r in rows]))
                self._pending = pending
        number, last, data = pending
        if not self.lease.valid():
            if self.lost:
                raise Fenced(self.lost)
            raise errors.Unavailable("the writer lease could not be renewed in time; "
                                     "journal shipping waits for it")
        try:
            self.store.put(segment_id(self.fs_id, self.chain, number), data,
                           protocol.checksum(data), metadata=True)
        except errors.StorageError:
            if self._after_failed_put(data):
                return self._ship_once()  # cut smaller now: ship that at once
            raise
        # Only now may waiters be told (and garbage deleted): a mount that took over before
        # this check changed the superblock; one that takes over after it finds the segment.
        self.lease.confirm()
        self.metadata.shipped(last, {"chain": self.chain, "segment": str(number + 1)})
        with self._lock:
            self._pending = None
            self._shipped = last
            self._segment = number + 1
            self._error = None
            self._changed.notify_all()

    def _after_failed_put(self, data: bytes) -> bool:
        """A segment was not stored: stop at once if another mount took over (its tombstone
        refused the segment), and cut the segment smaller if it is larger than a server
        takes, instead of sending the same refused bytes for ever. (A copy of the larger
        segment on some server is harmless: both start at the same record, and replay
        skips records it already has.) True if the segment is to be cut again."""
        with contextlib.suppress(errors.Unavailable):
            self.lease.confirm()
        with self._lock:
            pending = self._pending
        if pending is None or pending[2] is not data or data.count(b"\n") < 3:
            return False
        limit = self._server_limit()
        if limit is None or len(data) <= limit:
            return False
        log.warning("journal segment of %d bytes is more than a block server takes; "
                    "cutting segments at %d bytes", len(data), limit)
        with self._lock:
            self._segment_bytes = min(self._segment_bytes, max(1, limit))
            if self._pending is not pending:
                return False
            self._pending = None
        return True

    def _server_limit(self) -> int | None:
        """Half the smallest block size the servers accept, or None if none answered."""
        sizes = [s.get("max_block_size") for s in superblock.probe(
            self.transport, [m.url for m in self.lease.members]).values()
            if isinstance(s, dict)]
        sizes = [n for n in sizes if isinstance(n, int) and n > 0]
        return min(sizes) // 2 if sizes else None

    # -- checkpoints ------------------------------------------------------------------------

    def _checkpoint_due(self) -> bool:
        seq, at = self._last_checkpoint
        behind = self.metadata.seq - seq
        return behind >= self.checkpoint_records or (
            behind > 0 and time.monotonic() - at >= self.checkpoint_seconds)

    def _checkpoint_if_room(self) -> None:
        """A checkpoint, unless the last one failed for want of local room less than
        CHECKPOINT_RETRY seconds ago: its compact copy of the database is made in the
        state directory first, and may not fit where the database itself still does. The
        journal then grows on the servers meanwhile (a longer replay, nothing lost), and
        shipping goes on without waiting for it."""
        if time.monotonic() < self._checkpoint_retry_at:
            return
        try:
            self.checkpoint()
        except Exception as e:
            if not disk_full(e):
                raise
            self._checkpoint_retry_at = time.monotonic() + CHECKPOINT_RETRY
            log.warning("checkpoint postponed for %d s: its copy of the metadata database "
                        "does not fit on the disk of %s (%s); free space there",
                        CHECKPOINT_RETRY, self.work_dir, e)

    def checkpoint(self) -> dict:
        """Write a checkpoint and name it in the superblock; then delete what it replaced:
        the previous checkpoint and the segments it no longer needs. Call from the
        shipping thread (or once it has stopped): the next segment number must not move."""
        with self._lock:
            segment = self._segment if self._pending is None else self._pending[0]
        old = self.lease.superblock.checkpoint
        cp = write_checkpoint(self.store, self.metadata, self.fs_id, self.chain, segment,
                              self.work_dir)
        if old.get("fence"):
            cp["fence"] = old["fence"]
        self._obsolete += self._blocks_of(old)
        first = old["segment"] if old["chain"] == self.chain else 1
        self._obsolete += [segment_id(self.fs_id, self.chain, n) for n in range(first, segment)]
        self.lease.update(checkpoint=cp)
        self._last_checkpoint = (cp["seq"], time.monotonic())
        self._delete_obsolete()
        return cp

    def _delete_obsolete(self) -> None:
        ids, self._obsolete = self._obsolete, []
        if ids:
            try:
                self.store.delete_many(ids)
            except errors.StorageError as e:
                log.info("old journal blocks not deleted (%s); fsck --repair finds them", e)

    # -- leftovers of a crashed writer ------------------------------------------------------

    def _sweep_later(self) -> None:
        if self._wait_stopping(5.0):
            return
        try:
            deleted = self.sweep()
            log.info("deleted %d leftover blocks of an earlier writer", deleted)
        except errors.StorageError as e:
            log.info("leftover sweep skipped (fsck --repair does it too): %s", e)
        except Exception:  # noqa: BLE001 - a sweep is housekeeping, never fatal
            log.exception("leftover sweep failed")

    def sweep(self) -> int:
        """Delete blocks that nothing references: uploads a killed writer never recorded,
        segments and checkpoints it never got to delete. Blocks this process created are
        never touched (their ids carry its tag), so uploads in flight are safe; anything
        else that exists was created before this mount and is either known now or never
        will be."""
        listed, failures = list_everything(self.transport, self.lease.members)
        for url, e in failures.items():
            log.info("sweep: %s not listed: %s", url, e)
        with self._lock:
            upto = self._segment + 1
        keep = live_blocks(self.metadata, self.store, self.lease.superblock.checkpoint,
                           self.fs_id, chain=self.chain, segments=range(1, upto + 1),
                           keep_garbage=True)
        leftovers = sorted(b for b in listed - keep if not b.startswith(PROCESS_TAG))
        if not leftovers:
            return 0
        # Everything listed existed before this check; if we still hold the lease now, no
        # other writer came since we took it, so none of it is another writer's.
        self.lease.confirm()
        self.store.delete_many(leftovers)
        return len(leftovers)

    # -- stopping ---------------------------------------------------------------------------

    def _wait_stopping(self, seconds: float, even_when_stopping: bool = False) -> bool:
        """Sleep; True if the journal is stopping (or lost) and the caller should end."""
        with self._lock:
            if not self._stopping and not self.lease.lost:
                self._changed.wait(seconds)
            if self.lease.lost:
                return True
            return self._stopping and not even_when_stopping

    def close(self, checkpoint_after: int = 1000, progress=None) -> None:
        """Unmount: ship everything (retrying until it is done), checkpoint if the chain
        grew long, and give the lease up so the next mount need not wait for it. A close
        called while another runs returns when that one ends: everything shipped then."""
        with self._lock:
            closing, self._closed = self._closed, True
        if closing:
            self._close_ended.wait()
            return
        try:
            self._close(checkpoint_after, progress)
        finally:
            self._close_ended.set()

    def _close(self, checkpoint_after: int, progress) -> None:
        if self.lost:
            self._stop_threads()
            return
        while True:
            failed = self.metadata.failed
            if failed:  # nothing more can be shipped or recorded: waiting is for ever
                log.error("unmounting without shipping the last %d journal records: %s",
                          self.metadata.seq - self._shipped, failed)
                break
            try:
                self.wait_durable(timeout=10)
                break
            except Fenced:
                break
            except errors.StorageError as e:
                log.warning("unmount waits for the journal to reach the servers: %s", e)
                if progress:
                    progress(e)
        self._stop_threads()
        if self.lost:
            return
        try:
            if self.metadata.seq - self.lease.superblock.checkpoint["seq"] >= checkpoint_after:
                self._checkpoint_if_room()
            self.lease.release()
            log.info("writer lease released")
        except errors.StorageError as e:
            log.warning("could not release the writer lease (it expires by itself): %s", e)

    def _stop_threads(self) -> None:
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
        self.lease.stop()
        for thread in self._threads:
            thread.join(timeout=15)

    def stats(self) -> dict:
        with self._lock:
            return {"chain": self.chain, "shipped": self._shipped, "seq": self.metadata.seq,
                    "segment": self._segment, "lost": self.lease.lost,
                    "error": str(self._error) if self._error else None,
                    "lease_valid_for": round(self.lease.valid_for(), 1)}


def _by_bytes(rows: list[tuple[int, bytes]], limit: int) -> list[tuple[int, bytes]]:
    """The first rows whose records add up to at most `limit` bytes (at least one)."""
    total = 0
    for i, (_, record) in enumerate(rows):
        total += len(record) + 1
        if total > limit and i > 0:
            return rows[:i]
    return rows

