"""Read-ahead across the files of a directory.

Tools that copy, archive or scan a tree (tar, cp -r, rsync, backup tools) open the files of
a directory one after another in name order, the order readdir gives them. A small file is
one block, so with nothing cached each file costs the reader a round trip to a server, one
at a time. `DirectoryReadAhead` notices a reader going forward through a directory in name
order and has the cache fetch the blocks of the next files before they are opened, many per
batch request (`BlockCache.prefetch_batch`).

When: an open for reading of a file whose name comes after the name opened last in the same
directory, or the first open in a directory of the first of its files that holds data (a
walk starting). Any other first open in a directory only records its name, so reading one
file here and there costs one query more. Each step asks for the first FILE_BLOCKS blocks of
up to FILES entries after the highest name requested so far, at most STEP_BYTES, and the
next step starts once the reader has opened a file past the middle of the previous one, so
the requests stay ahead of the reader without running far beyond it. Larger files get their
first blocks; their own sequential read-ahead (fusefs/filedata.py) takes the rest.

A step from the opened file itself (a walk starting, or jumping ahead) also needs that
file's first block, which the reader is about to read: the open fetches it together with
the next files' first blocks, up to HEAD_FILES files and HEAD_BYTES, in one batch before it
returns (`BlockCache.fetch_batch`), instead of the read fetching it alone. In a tree of
small directories (a source tree: five files each) that is one request per directory fewer,
a third of them. The rest of the step is fetched in the background as before.

Into subdirectories: a tool that copies or archives a tree lists each subdirectory before
it opens the files in it (GNU tar when it reaches the subdirectory's name, often after only
one or two files of the parent). When a directory is listed while its parent is being
walked (a step was asked for there, or a file opened after another in name order), a walk
of the listed directory starts at once, in the background, from its first file: by the
time the reader opens that file, its block is on its way. A listing alone (`ls`, `find`,
`du`) starts nothing.

State: per directory (the DIRECTORIES used last), the name opened last, the name requested up
to and the name at which to ask for more. Nothing is kept across mounts, nothing is written:
a wrong guess costs only reads of blocks nobody asked for, within the cache's bounds, and a
crash loses nothing. Blocks are immutable and fetched by checksum, so a file changed since
its blocks were requested is read correctly (the new blocks are simply not prefetched).

Threads: `opened` runs on fusepy threads. `_lock` guards the table only; it is a leaf and is
never held while metadata is queried or blocks are queued.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger("fusefs.siblings")

DIRECTORIES = 64  # directories followed at once; the least recently used is dropped
FILES = 128  # entries looked at per step
FILE_BLOCKS = 2  # blocks asked for per file (the first ones)
STEP_BYTES = 16 << 20  # bytes asked for per step
HEAD_FILES = 16  # files whose blocks an open that starts a step fetches before it returns
HEAD_BYTES = 1 << 20  # and at most these bytes of them (beyond the opened file's own)


@dataclass
class _Walk:
    """A reader's progress through one directory (names are bytes, compared as SQLite
    orders them: memcmp)."""
    last: bytes  # the name opened last
    forward: int = 0  # opens in name order so far
    ahead: bytes | None = None  # blocks were requested for the entries up to this name
    refill_at: bytes | None = None  # ask for more once a name past this one is opened


class DirectoryReadAhead:
    """See the module docstring. `metadata` answers `names` and `blocks_after`; `cache`
    takes `prefetch_batch` and `fetch_batch`."""

    def __init__(self, metadata, cache, *, files: int = FILES, file_blocks: int = FILE_BLOCKS,
                 step_bytes: int = STEP_BYTES):
        self.metadata = metadata
        self.cache = cache
        self.files = files
        self.file_blocks = file_blocks
        self.step_bytes = step_bytes
        self._lock = threading.Lock()
        self._walks: OrderedDict[int, _Walk] = OrderedDict()  # directory inode -> walk

    def opened(self, ino: int) -> None:
        """A file was opened for reading: read ahead if its directory is being walked.
        Never raises: read-ahead is a hint, and the open must not fail for it."""
        try:
            self._opened(ino)
        except Exception as e:  # noqa: BLE001
            log.warning("read-ahead across the files of a directory failed: %s", e)

    def _opened(self, ino: int) -> None:
        names = self.metadata.names(ino)
        if len(names) != 1:  # unlinked, or hard links: no one directory to follow
            return
        parent, name = names[0]
        with self._lock:
            new = parent not in self._walks
        if new:
            self._begin(parent, name)
            return
        start = self._step(parent, name)
        if start is not None:
            self._request(parent, start, opened=start == name)

    def listed(self, ino: int) -> None:
        """A directory was listed: start a walk of it if its parent is being walked (see
        the module docstring). Never raises."""
        try:
            with self._lock:
                if not self._walks:  # nobody reads anywhere: no query per listing
                    return
            names = self.metadata.names(ino)
            if len(names) != 1:
                return
            with self._lock:
                parent = self._walks.get(names[0][0])
                if parent is None or (parent.ahead is None and not parent.forward) \
                        or ino in self._walks:
                    return
                self._walks[ino] = _Walk(b"")
                while len(self._walks) > DIRECTORIES:
                    self._walks.popitem(last=False)
            self._request(ino, b"")
        except Exception as e:  # noqa: BLE001
            log.warning("read-ahead across the files of a directory failed: %s", e)

    def _begin(self, parent: int, name: bytes) -> None:
        """The first open in a directory: a walk starts if no file before it holds data."""
        starting = not self.metadata.data_before(parent, name)
        with self._lock:
            self._walks[parent] = _Walk(name)
            while len(self._walks) > DIRECTORIES:
                self._walks.popitem(last=False)
        if starting:
            self._request(parent, name, opened=True)

    def _step(self, parent: int, name: bytes) -> bytes | None:
        """Record the open; the name after which to request blocks, or None."""
        with self._lock:
            walk = self._walks.get(parent)
            if walk is None:  # dropped meanwhile: start again
                self._walks[parent] = _Walk(name)
                return None
            self._walks.move_to_end(parent)
            forward, walk.last = name > walk.last, name
            if not forward:
                return None
            walk.forward += 1
            if walk.ahead is None or walk.ahead < name:  # a new walk, or it jumped ahead
                start = name
            elif walk.refill_at is not None and name >= walk.refill_at:
                start = walk.ahead
            else:
                return None
            walk.refill_at = None  # no second request for this step while this one runs
            return start

    def _request(self, parent: int, start: bytes, opened: bool = False) -> None:
        """Ask for the blocks of the entries after `start`; `opened`: `start` is the file
        being opened, whose blocks and the next few files' are fetched now (the head)."""
        rows = self.metadata.blocks_after(parent, start, self.files + opened,
                                          self.file_blocks, including=opened)
        head, items, names = [], [], []
        head_bytes = used = 0
        for name, block_id, checksum, length in rows:
            new_name = not names or names[-1] != name
            if opened and not items and (name == start or (
                    len(names) - new_name < HEAD_FILES and head_bytes + length <= HEAD_BYTES)):
                head.append((block_id, checksum))
                head_bytes += length if name != start else 0
            else:
                if items and used >= self.step_bytes and new_name:
                    break
                items.append((block_id, checksum))
                used += length
            if new_name:
                names.append(name)
        with self._lock:
            walk = self._walks.get(parent)
            if walk is not None and names:
                walk.ahead = names[-1]
                walk.refill_at = names[len(names) // 2]
        if head:
            self.cache.fetch_batch(head)
        if items:
            self.cache.prefetch_batch(items)
