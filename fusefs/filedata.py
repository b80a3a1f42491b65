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
from .metadata import BlockRef, Metadata, now_ns

APPEND_LOCKS = 64  # O_APPEND writes of one inode are serialised on one of these


class DirtyBlock:
    """One block of a live file that is in memory only: its bytes (`data`) and where its
    upload stands. Protected by its FileData's lock."""

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
        self.changed = threading.Condition(self.lock)
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

    def stored(self, live: FileData) -> int:
        """Caller holds live.lock: bytes the file holds in blocks, dirty or clean, up to its
        size (a hole holds none): what st_blocks counts, so `du` sees sparse files."""
        bs, total = self.block_size, 0
        for idx, blk in live.dirty.items():
            total += min(len(blk.data), max(0, live.size - idx * bs))
        for idx, ref in live.refs.items():
            if idx not in live.dirty:
                total += min(ref.length, max(0, live.size - idx * bs))
        return total

    # -- reading ----------------------------------------------------------------------------

    def read(self, live: FileData, offset: int, size: int) -> bytes:
        """Takes live.lock: up to `size` bytes at `offset` (fewer at the end of the file).
        Clean blocks are fetched once the lock is released."""
        pieces: list = []  # bytes, or (BlockRef, start, end) to fetch, or an int of zeros
        with live.lock:
            ahead = self._plan_read(live, offset, size, pieces)
        if ahead:
            self.cache.prefetch(ahead)
        return self._join(pieces)

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
            if blk is not None:
                piece = bytes(blk.data[within:within + n])
                pieces.append(piece + bytes(n - len(piece)))
            elif idx in live.refs:
                pieces.append((live.refs[idx], within, n))
            else:
                pieces.append(n)
            pos += n
        # Read ahead when a sequential reader enters a block (not at each of the eight
        # 128 KiB reads inside it: the cache ignores what it has or fetches anyway).
        sequential = offset == live.last_read_end
        live.last_read_end = end
        entering = offset % bs == 0 or offset // bs != (end - 1) // bs
        return self._readahead(live, end) if sequential and entering else []

    def _readahead(self, live: FileData, end: int) -> list[tuple[str, str]]:
        """Caller holds live.lock: the clean blocks just after `end`."""
        first = end // self.block_size + 1
        refs = (live.refs.get(i) for i in range(first, first + self.readahead_blocks))
        return [(r.block_id, r.checksum) for r in refs if r is not None]

    def _join(self, pieces: list) -> bytes:
        """No lock held: the pieces of a read as one bytes, clean blocks fetched."""
        out = []
        for piece in pieces:
            if isinstance(piece, int):
                out.append(bytes(piece))
            elif isinstance(piece, tuple):
                ref, within, n = piece  # bytes past ref.length were cut off: zeros
                data = memoryview(self.cache.get(ref.block_id, ref.checksum))[
                    within:min(within + n, ref.length)]  # the join below is the one copy
                out.append(data)
                if len(data) < n:
                    out.append(bytes(n - len(data)))
            else:
                out.append(piece)
        return b"".join(out)

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
        """Takes live.lock: write `chunk` into block idx at `within`, merging into the clean
        block there (fetched with no lock held)."""
        whole = within == 0 and len(chunk) == self.block_size
        while True:
            with live.lock:
                if idx in live.dirty or whole or idx not in live.refs:
                    self._apply(live, idx, within, chunk, None)
                    return
                ref = live.refs[idx]
            base = bytearray(self.cache.get(ref.block_id, ref.checksum))  # no lock held
            del base[ref.length:]  # bytes a truncation cut off do not come back
            with live.lock:
                if idx in live.dirty or live.refs.get(idx) == ref:
                    self._apply(live, idx, within, chunk, base)
                    return

    def _apply(self, live: FileData, idx: int, within: int, chunk, base) -> None:
        """Caller holds live.lock: put `chunk` into dirty block idx at `within`."""
        blk = live.dirty.get(idx)
        if blk is None:
            blk = live.dirty[idx] = DirtyBlock(base if base is not None else bytearray())
            grown = len(blk.data)
        else:
            grown = 0
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
                ref = live.refs.get(idx) if within and idx not in live.dirty else None
                if ref is None or ref.length <= within:
                    self._cut(live, size)
                    break
            base = bytearray(self.cache.get(ref.block_id, ref.checksum)[:within])
            with live.lock:
                if (self.flusher.registered(live) and live.refs.get(idx) == ref
                        and idx not in live.dirty):
                    live.dirty[idx] = DirtyBlock(base)
                    self.flusher.account(len(base))
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
        last = live.dirty.get(size // bs)
        if last is not None and len(last.data) > size % bs:
            freed += len(last.data) - size % bs
            del last.writable()[size % bs:]
            last.version += 1
        for idx in [i for i in live.refs if i >= keep]:
            del live.refs[idx]
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
            held = len(blk.data) if blk is not None else ref.length if ref else 0
        hi = min(hi, held)
        if lo < hi:
            self._write_block(live, idx, lo, memoryview(bytes(hi - lo)))
