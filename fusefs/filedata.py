"""The bytes of live files: their state in memory, and every read and change of it.

A live file is an inode that is open or still holds unsaved data. Its state is one
`FileData` (size and times as applications see them, the block map loaded once, the dirty
blocks as `DirtyBlock`s); the flusher keeps the registry of them and uploads their dirty
blocks. `DataPath` is the code that reads and changes that state for `Filesystem`: read
(with read-ahead), write and O_APPEND placement, truncation, hole punching, and what a
file's blocks hold (`st_blocks`).

A file's bytes: block i covers [i*B, (i+1)*B). A block is dirty (in memory), clean (a
BlockRef in the block map), or absent (a hole: zeros). A clean block may be shorter than
B; whatever lies between its end and the file's size reads as zeros. Truncating into a
block cuts that block, so bytes beyond the size never come back when the file grows.

Every method says which lock it expects: "caller holds live.lock", or "takes live.lock"
(the caller must hold neither it nor any lock after it in the order). Block fetches (network) happen with no
lock held: a writer that must merge into a clean block fetches it first, then re-checks
under the file's lock that the block is still the one it fetched. The order of all locks:
docs/filesystem.md, "Lock order".
"""

from __future__ import annotations

import threading
import time

from . import errors
from .metadata import BlockRef, Metadata, Patch, now_ns

APPEND_LOCKS = 64  # O_APPEND writes of one inode are serialised on one of these
# A stored block reads its patches from at most MAX_PATCHES small blocks (one per commit
# that patched it), through at most MAX_RANGES ranges; a write that would go beyond
# either fetches the block and uploads it whole again.
MAX_PATCHES = 32
MAX_RANGES = 512


def live_patches(old: tuple[Patch, ...], new: tuple[Patch, ...]) -> tuple[Patch, ...]:
    """The patches of an entry after `new` (one upload's ranges) went over `old`: those a
    later range covers whole are left out, as they change nothing a read returns. A range
    rewritten at every commit (a database's header page) then keeps one patch, not one per
    commit. (`old` was pruned the same way when it was committed.)"""
    def covered(p: Patch, later) -> bool:
        end = p.start + p.length
        return any(q.start <= p.start and end <= q.start + q.length for q in later)
    kept = [p for p in old if not covered(p, new)]
    kept += [p for i, p in enumerate(new) if not covered(p, new[i + 1:])]
    return tuple(kept)


class DirtyBlock:
    """One block of a live file that is in memory only: its bytes (`data`) and where its
    upload stands. Protected by its FileData's lock."""

    __slots__ = ("data", "version", "since", "uploading", "retry_at", "ready", "shared",
                 "block_id", "id_version", "stored", "base", "extents")

    def __init__(self, data: bytearray, base: BlockRef | None = None):
        self.data = data
        # A patch (`base` set): the block stored at this index stays, and `data` holds only
        # the ranges written over it since, each [start, length, at] in `extents` (the
        # bytes at `at` of `data`, applied in order). Uploaded, `data` is one small block
        # and `extents` its patches. Otherwise `data` is the whole block.
        self.base = base
        self.extents: list[list[int]] = []
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

    def length(self) -> int:
        """Caller holds live.lock: how many bytes of the block this one describes."""
        return self.base.length if self.base is not None else len(self.data)

    def patch(self, within: int, chunk) -> int:
        """Caller holds live.lock; a patch: write `chunk` at `within` (inside the base).
        Rewrites an extent in place when it lies inside one, extends the last one when it
        follows it, else adds one. Returns the bytes `data` grew by."""
        n = len(chunk)
        for extent in reversed(self.extents):  # the newest first: it wins where they overlap
            start, length, at = extent
            if start <= within and within + n <= start + length:
                self.writable()[at + within - start:at + within - start + n] = chunk
                return 0
            if start < within + n and within < start + length:
                break  # a newer extent overlaps part of the range: add one after it
        data = self.writable()
        last = self.extents[-1] if self.extents else None
        if last is not None and last[0] + last[1] == within and last[2] + last[1] == len(data):
            last[1] += n
        else:
            self.extents.append([within, n, len(data)])
        data += chunk
        return n

    def overlay(self, within: int, n: int) -> list[tuple[int, bytes]]:
        """Caller holds live.lock; a patch: (offset from `within`, bytes) of what it wrote
        inside [within, within+n), in the order to apply them."""
        out = []
        for start, length, at in self.extents:
            lo, hi = max(start, within), min(start + length, within + n)
            if lo < hi:
                out.append((lo - within, bytes(self.data[at + lo - start:at + hi - start])))
        return out

    def current_id(self) -> bool:
        """Caller holds live.lock: `block_id` names the bytes of the present version."""
        return self.block_id is not None and self.id_version == self.version

    def parked(self) -> bool:
        """Caller holds live.lock: uploaded, waiting only for its commit."""
        return self.stored is not None and self.current_id()

    def writable(self) -> bytearray:
        """Caller holds live.lock: `data`, to change in place, copied first if an upload
        holds it, so the bytes an upload sends (and the cache then keeps) never change
        under it. The caller also bumps `version`."""
        if self.shared:
            self.data = bytearray(self.data)
            self.shared = False
        return self.data


class FileData:
    """Live state of one inode: what applications see of it now and what is not saved
    yet. Every field is protected by `lock`; `changed` (on the same lock) is signalled when
    blocks are committed or dropped, or an upload fails. Built by `Flusher.file`, read and
    changed by `DataPath`, `Filesystem` and the flusher."""

    def __init__(self, ino: int, size: int, mtime_ns: int, ctime_ns: int,
                 refs: dict[int, BlockRef]):
        self.ino = ino
        self.lock = threading.Lock()
        self._changed: threading.Condition | None = None
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
        self.run_start = 0  # where the current sequential run of reads began

    @property
    def changed(self) -> threading.Condition:
        """Caller holds `lock` (as waiting and notifying require): the condition, made at
        its first use. Most files (created, closed, never fsynced while uploading) never
        need one, and making a Condition costs more than the rest of this object."""
        if self._changed is None:
            self._changed = threading.Condition(self.lock)
        return self._changed


class DataPath:
    """Reads and changes the bytes of live files, for `Filesystem`.

    `flusher` is the registry of live files and the owner of dirty memory (`file`,
    `registered`, `forget_if_idle`, `account`, `wait_for_room`, `recordable_size`); clean
    blocks come from `cache`; truncations and punched holes are recorded in `metadata`.
    Holds no state of its own but the O_APPEND locks.
    """

    def __init__(self, metadata: Metadata, cache, flusher, block_size: int,
                 readahead_blocks: int = 4):
        self.metadata = metadata
        self.cache = cache
        self.flusher = flusher
        self.block_size = block_size
        self.readahead_blocks = readahead_blocks
        self._append_locks = [threading.Lock() for _ in range(APPEND_LOCKS)]

    def stored(self, live: FileData, committed: int) -> int:
        """Caller holds live.lock: bytes the file holds in blocks, dirty or clean, up to its
        size (a hole holds none): what st_blocks counts, so `du` sees sparse files.
        `committed` is what its block map holds (the metadata's sum of lengths, read under
        the same lock: `live.refs` is that map, with the same lengths); only the dirty
        blocks are looked at, so a stat of a large file costs no more than of a small one."""
        bs, total = self.block_size, committed
        for idx, blk in live.dirty.items():
            total += min(blk.length(), max(0, live.size - idx * bs))
            ref = live.refs.get(idx)
            if ref is not None:
                total -= ref.length
        return total

    # -- reading ----------------------------------------------------------------------------

    def read(self, live: FileData, offset: int, size: int) -> bytes:
        """Takes live.lock: up to `size` bytes at `offset` (fewer at the end of the file).
        Clean blocks are fetched once the lock is released."""
        return b"".join(self.read_pieces(live, offset, size))

    def read_pieces(self, live: FileData, offset: int, size: int) -> list:
        """`read` as a list of bytes-like pieces in order, not joined: the FUSE glue copies
        them straight into the kernel's buffer. Never to be changed by the caller."""
        pieces: list = []  # bytes; (BlockRef, start, n, overlay) to fetch; an int of zeros
        with live.lock:
            ahead = self._plan_read(live, offset, size, pieces)
            run = live.last_read_end - live.run_start
        if ahead:
            self.cache.prefetch(ahead, run=run)
        return self._fetched(pieces)

    def _plan_read(self, live: FileData, offset: int, size: int, pieces: list) -> list:
        """Caller holds live.lock: fill `pieces` with what the read returns; return the
        clean blocks to read ahead."""
        bs = self.block_size
        end = min(offset + size, live.size)
        pos = offset
        while pos < end:
            idx, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            blk = live.dirty.get(idx)
            if blk is not None and blk.base is not None:  # a patch over a stored block
                pieces.append((blk.base, within, n, blk.overlay(within, n)))
            elif blk is not None:
                piece = bytes(blk.data[within:within + n])
                pieces.append(piece + bytes(n - len(piece)))
            elif idx in live.refs:
                pieces.append((live.refs[idx], within, n, ()))
            else:
                pieces.append(n)
            pos += n
        # Read ahead when a sequential reader enters a block (not at each of the eight
        # 128 KiB reads inside it: the cache ignores what it has or fetches anyway).
        sequential = offset == live.last_read_end
        # The run of a sequential reader goes on across the kernel's slightly reordered
        # reads; a jump of more than a block starts a new one (the cache's scans).
        if abs(offset - live.last_read_end) > bs:
            live.run_start = offset
        live.last_read_end = end
        entering = offset % bs == 0 or offset // bs != (end - 1) // bs
        return self._readahead(live, end) if sequential and entering else []

    def _readahead(self, live: FileData, end: int) -> list[tuple[str, str]]:
        """Caller holds live.lock: the clean blocks just after `end`."""
        first = end // self.block_size + 1
        refs = (live.refs.get(i) for i in range(first, first + self.readahead_blocks))
        return [(r.block_id, r.checksum) for r in refs if r is not None]

    def _fetched(self, pieces: list) -> list:
        """No lock held: the pieces of a read with clean blocks fetched and zeros made."""
        out = []
        for piece in pieces:
            if isinstance(piece, int):
                out.append(bytes(piece))
            elif isinstance(piece, tuple):
                out.extend(self._stored_range(*piece))
            else:
                out.append(piece)
        return out

    def _stored_range(self, ref: BlockRef, within: int, n: int, overlay=(),
                      whole: bool = False) -> list:
        """No lock held: bytes [within, within+n) of the stored block `ref`, its patches
        applied (their small blocks fetched in one batch), then `overlay` ((offset, bytes)
        written since, not stored yet); past ref.length, zeros. As a list of pieces."""
        # Bytes past ref.length were cut off. A part of a block from the disk cache reads
        # only the segments it needs (a whole one is kept in memory, for the next reads).
        stop = min(within + n, ref.length)
        data = memoryview(self.cache.get(ref.block_id, ref.checksum))[within:stop] \
            if whole else self.cache.get_range(ref.block_id, ref.checksum, within,
                                               max(0, stop - within))
        patches = [p for p in ref.patches if p.start < within + n and within < p.start + p.length]
        if not patches and not overlay:  # the common case: no copy but the caller's join
            return [data, bytes(n - len(data))] if len(data) < n else [data]
        out = bytearray(data)
        out.extend(bytes(n - len(out)))
        if len(patches) > 1:
            self.cache.prefetch_batch(list(dict.fromkeys((p.block_id, p.checksum)
                                                         for p in patches)))
        for p in patches:
            lo, hi = max(p.start, within), min(p.start + p.length, within + n)
            small = self.cache.get(p.block_id, p.checksum)
            out[lo - within:hi - within] = small[p.at + lo - p.start:p.at + hi - p.start]
        for offset, piece in overlay:
            out[offset:offset + len(piece)] = piece
        return [out]

    def _stored_block(self, ref: BlockRef) -> bytearray:
        """No lock held: the whole stored block `ref`, its patches applied, to change."""
        return bytearray().join(self._stored_range(ref, 0, ref.length, whole=True))

    # -- writing ----------------------------------------------------------------------------

    def write(self, live: FileData, offset: int, data) -> int:
        """Takes live.lock, once per block: write `data` at `offset`. Waits first while
        dirty memory is over its bound (back-pressure)."""
        self.flusher.wait_for_room()
        bs = self.block_size
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            idx, within = divmod(offset + pos, bs)
            n = min(bs - within, len(data) - pos)
            self._write_block(live, idx, within, view[pos:pos + n])
            pos += n
        return len(data)

    def append(self, live: FileData, data) -> int:
        """Takes the inode's append lock, then live.lock: write `data` at the file's end
        (O_APPEND), one append of the file at a time. The offset the kernel sends comes
        from the size it caches for the name written through, which is stale when the
        file grew through another of its names (libfuse 2 gives each name its own kernel
        inode): writing there would overwrite that data."""
        with self._append_locks[live.ino % APPEND_LOCKS]:
            with live.lock:
                end = live.size
            return self.write(live, end, data)

    def _write_block(self, live: FileData, idx: int, within: int, chunk) -> None:
        """Takes live.lock: write `chunk` into block idx at `within`. Over a stored block,
        a write inside it becomes a patch (see DirtyBlock; nothing fetched) while the block
        has room for one; otherwise the stored block is fetched (no lock held) and the
        write merged into it, and it is uploaded whole."""
        whole = within == 0 and len(chunk) == self.block_size
        while True:
            with live.lock:
                blk = live.dirty.get(idx)
                ref = live.refs.get(idx) if blk is None else blk.base
                if whole or ref is None:  # a whole block, a hole, or a block in memory
                    self._apply(live, idx, within, chunk, None)
                    return
                if self._patchable(blk, ref, within, len(chunk)):
                    self._apply_patch(live, idx, ref, within, chunk)
                    return
            stored = self._stored_block(ref)  # no lock held
            with live.lock:
                now = live.dirty.get(idx)
                if now is blk and (ref == (live.refs.get(idx) if blk is None else blk.base)):
                    self._apply(live, idx, within, chunk, stored)
                    return

    @staticmethod
    def _patchable(blk: DirtyBlock | None, ref: BlockRef, within: int, n: int) -> bool:
        """Caller holds live.lock: a write of n bytes at `within` over the stored block
        `ref` (with `blk`, the patch pending over it, if any) may be a patch: it lies
        inside the block, the block has room for one more small block and range, and the
        pending bytes stay below a block's worth (beyond, uploading it whole costs less)."""
        ranges, held = (len(blk.extents), len(blk.data)) if blk is not None else (0, 0)
        return (within + n <= ref.length and ref.small_blocks < MAX_PATCHES
                and len(ref.patches) + ranges < MAX_RANGES and held + n <= ref.length)

    def _apply_patch(self, live: FileData, idx: int, ref: BlockRef, within: int,
                     chunk) -> None:
        """Caller holds live.lock: write `chunk` at `within` as a patch over `ref`. Once
        one extent covers the whole block, it is the block: no longer a patch."""
        blk = live.dirty.get(idx)
        if blk is None:
            blk = live.dirty[idx] = DirtyBlock(bytearray(), ref)
        else:
            blk.version += 1
        grown = blk.patch(within, chunk)
        if blk.extents == [[0, ref.length, 0]] and len(blk.data) == ref.length:
            blk.base, blk.extents = None, []
        blk.ready = blk.base is None and within + len(chunk) == self.block_size
        live.size = max(live.size, idx * self.block_size + within + len(chunk))
        live.mtime_ns = live.ctime_ns = now_ns()
        if grown:
            self.flusher.account(grown)

    @staticmethod
    def _unpatch(blk: DirtyBlock, stored: bytearray | None) -> int:
        """Caller holds live.lock: turn the patch `blk` into the whole block: `stored` (its
        base, fetched) with the patch's writes applied; None when a write of the whole
        block replaces it anyway. Returns the bytes it grew by."""
        whole = stored if stored is not None else bytearray()
        if stored is not None:
            for start, length, at in blk.extents:
                whole[start:start + length] = blk.data[at:at + length]
        grown = len(whole) - len(blk.data)
        blk.data, blk.shared, blk.base, blk.extents = whole, False, None, []
        blk.version += 1
        return grown

    def _apply(self, live: FileData, idx: int, within: int, chunk, base) -> None:
        """Caller holds live.lock: put `chunk` into dirty block idx at `within` (`base`:
        the stored block there, fetched, when there is one and the write merges into it)."""
        blk = live.dirty.get(idx)
        if blk is None:
            blk = live.dirty[idx] = DirtyBlock(base if base is not None else bytearray())
            grown = len(blk.data)
        else:
            grown = self._unpatch(blk, base) if blk.base is not None else 0
            blk.version += 1
        data = blk.writable()
        before = len(data)
        if within >= before:  # appending (sequential writes): grow in place
            if within > before:
                data.extend(bytes(within - before))
            # `+=` (in place), not a slice assignment past the end, which reallocates the
            # whole buffer at every append: 419 us instead of 28 us per MiB here.
            data += chunk
        else:
            data[within:within + len(chunk)] = chunk
        grown += len(data) - before
        blk.ready = within + len(chunk) == self.block_size
        live.size = max(live.size, idx * self.block_size + within + len(chunk))
        live.mtime_ns = live.ctime_ns = now_ns()
        if grown:
            self.flusher.account(grown)

    # -- truncating -------------------------------------------------------------------------

    def truncate(self, ino: int, size: int) -> None:
        """Takes the file's lock: set the size of `ino`, loading its live state if it has
        none. A clean block cut in the middle is fetched (no lock held) and becomes dirty."""
        idx, within = divmod(size, self.block_size)
        while True:
            live = self.flusher.file(ino)
            with live.lock:
                if not self.flusher.registered(live):
                    continue  # forgotten since file() returned it
                blk = live.dirty.get(idx) if within else None
                ref = (live.refs.get(idx) if blk is None else blk.base) if within else None
                if ref is None or ref.length <= within:
                    self._cut(live, size)
                    break
            stored = self._stored_block(ref)  # a patch pending over it is made whole first
            with live.lock:
                if (self.flusher.registered(live) and live.dirty.get(idx) is blk
                        and ref == (live.refs.get(idx) if blk is None else blk.base)):
                    if blk is None:
                        live.dirty[idx] = DirtyBlock(stored)
                        self.flusher.account(len(stored))
                    else:
                        self.flusher.account(self._unpatch(blk, stored))
                    self._cut(live, size)
                    break
        self.flusher.forget_if_idle(live)

    def _cut(self, live: FileData, size: int) -> None:
        """Caller holds live.lock: set the size, dropping and cutting blocks beyond it, and
        record it."""
        bs = self.block_size
        keep = -(-size // bs)  # blocks that still hold bytes below `size`
        freed = 0
        for idx in [i for i in live.dirty if i >= keep]:
            freed += len(live.dirty.pop(idx).data)
        last = live.dirty.get(size // bs)  # a patch here lies below the size (truncate)
        if last is not None and last.base is None and len(last.data) > size % bs:
            freed += len(last.data) - size % bs
            del last.writable()[size % bs:]
            last.version += 1
        for idx in [i for i in live.refs if i >= keep]:
            del live.refs[idx]
        cut = live.refs.get(size // bs) if size % bs else None
        if cut is not None and cut.length > size % bs:  # as truncate_blocks records it
            live.refs[size // bs] = cut.cut(size % bs)
        live.size = size
        live.mtime_ns = live.ctime_ns = now_ns()
        # The size recorded never covers a block still only in memory (crash states are
        # prefixes): the flusher's rule, which its commits follow too.
        self.metadata.truncate_blocks(live.ino, keep, self.flusher.recordable_size(live),
                                      live.mtime_ns, size % bs or None)
        if freed:
            self.flusher.account(-freed)

    # -- punching holes ---------------------------------------------------------------------

    def punch(self, live: FileData, start: int, stop: int) -> None:
        """Takes live.lock: make [start, stop) a hole, the size unchanged. The blocks
        entirely inside (and the last one, when the range reaches the size) are dropped,
        dirty or clean, by a journaled record (their stored copies become garbage); the
        partial blocks at the edges get zeros written over the range, as any write."""
        bs = self.block_size
        with live.lock:
            end = min(stop, live.size)
            if start >= end:
                return
            first = -(-start // bs)
            last = -(-end // bs) if end == live.size else end // bs
            edges = [i for i in {start // bs, (end - 1) // bs} if not first <= i < last]
            freed = self._drop_blocks(live, first, last) if first < last else 0
        if freed:
            self.flusher.account(-freed)
        for idx in sorted(edges):
            self._zero(live, idx, max(start - idx * bs, 0), min(end - idx * bs, bs))

    def _drop_blocks(self, live: FileData, first: int, last: int) -> int:
        """Caller holds live.lock: forget blocks first..last-1 (dirty data too: a crash must
        never bring back what the punch removed) and record it. Returns the dirty bytes
        freed."""
        freed = 0
        for idx in [i for i in live.dirty if first <= i < last]:
            freed += len(live.dirty.pop(idx).data)
        for idx in [i for i in live.refs if first <= i < last]:
            del live.refs[idx]
        live.mtime_ns = live.ctime_ns = now_ns()
        self.metadata.punch_blocks(live.ino, first, last, live.mtime_ns)
        live.changed.notify_all()  # an fsync waiting for a dropped block stops waiting
        return freed

    def _zero(self, live: FileData, idx: int, lo: int, hi: int) -> None:
        """Takes live.lock: write zeros over [lo, hi) of block idx, only where the block
        holds bytes (past its end it reads as zeros already; a hole stays a hole)."""
        with live.lock:
            blk = live.dirty.get(idx)
            ref = live.refs.get(idx)
            held = blk.length() if blk is not None else ref.length if ref else 0
        hi = min(hi, held)
        if lo < hi:
            self._write_block(live, idx, lo, memoryview(bytes(hi - lo)))
