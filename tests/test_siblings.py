"""Read-ahead across the files of a directory (fusefs/siblings.py) over a real metadata
database, with a cache that records what it is asked to fetch: when a walk is recognised,
what is asked for, and what is left alone."""

from __future__ import annotations

import sqlite3
import stat

import pytest

from blockserver import protocol
from fusefs.metadata import ROOT_INO, BlockRef, Metadata
from fusefs.siblings import HEAD_BYTES, HEAD_FILES, DirectoryReadAhead

FILE = stat.S_IFREG | 0o644


class RecordingCache:
    """`fetched`: what the open fetched before it returned (fetch_batch); `asked`: the
    batches asked for in the background (prefetch_batch)."""

    def __init__(self):
        self.fetched: list[list[tuple[str, str]]] = []
        self.asked: list[list[tuple[str, str]]] = []

    def fetch_batch(self, items):
        self.fetched.append(list(items))

    def prefetch_batch(self, items):
        self.asked.append(list(items))


def blocks_of(files) -> list:
    return [b for _, blocks in files for b in blocks]


@pytest.fixture
def md(tmp_path):
    metadata = Metadata(str(tmp_path / "metadata.db"), group_seconds=3600)
    metadata.format(uid=0, gid=0)
    yield metadata
    metadata.close()


def make_file(md, parent, name: bytes, blocks: int = 1, length: int = 1000) -> tuple[int, list]:
    ino = md.create(parent, name, FILE, 0, 0).ino
    refs = {i: BlockRef(protocol.new_block_id(), f"{ino:032x}", length) for i in range(blocks)}
    md.commit_blocks(ino, refs, blocks * length, 1, 1)
    return ino, [(r.block_id, r.checksum) for r in refs.values()]


def _first_blocks(md, ino) -> list:
    return [(r.block_id, r.checksum) for r in md.block_refs(ino, 0, 0).values()]


def directory(md, files: int, **kw):
    """A directory of `files` one-block files f0000...: (dir ino, [(file ino, its blocks)])."""
    d = md.create(ROOT_INO, b"d", stat.S_IFDIR | 0o755, 0, 0).ino
    return d, [make_file(md, d, b"f%04d" % i, **kw) for i in range(files)]


def test_a_walk_from_the_first_file_asks_for_the_next_files_in_batches(md):
    """The open that starts the walk fetches its own file's block and the next HEAD_FILES
    files' in one batch before it returns; the rest of the step goes in the background."""
    _, files = directory(md, 300)
    cache = RecordingCache()
    ahead = DirectoryReadAhead(md, cache, files=100)
    ahead.opened(files[0][0])
    assert cache.fetched == [blocks_of(files[:1 + HEAD_FILES])]
    assert cache.asked == [blocks_of(files[1 + HEAD_FILES:101])]
    for ino, _ in files[1:50]:  # not yet past the middle of what was asked for
        ahead.opened(ino)
    assert len(cache.asked) == 1
    ahead.opened(files[51][0])  # past it: the next step, from where the last one ended
    assert cache.asked[1] == [b for _, blocks in files[101:201] for b in blocks]
    for ino, _ in files[52:]:
        ahead.opened(ino)
    asked = [b for batch in cache.fetched + cache.asked for b in batch]
    assert asked == blocks_of(files)  # each once, in order
    assert len(cache.fetched) == 1  # only the open that started the walk waited


def test_one_file_opened_in_the_middle_asks_for_nothing(md):
    _, files = directory(md, 50)
    cache = RecordingCache()
    ahead = DirectoryReadAhead(md, cache)
    ahead.opened(files[20][0])
    ahead.opened(files[20][0])  # again: not forward
    ahead.opened(files[5][0])  # backwards
    assert cache.asked == cache.fetched == []
    ahead.opened(files[6][0])  # forward again: a walk from here, this file first
    assert cache.fetched == [blocks_of(files[6:7 + HEAD_FILES])]
    assert cache.asked == [blocks_of(files[7 + HEAD_FILES:])]


def test_a_step_stops_at_its_byte_budget_and_takes_the_first_blocks_of_large_files(md):
    d = md.create(ROOT_INO, b"d", stat.S_IFDIR | 0o755, 0, 0).ino
    first, _ = make_file(md, d, b"a")
    big = [make_file(md, d, b"b%d" % i, blocks=5, length=1 << 20) for i in range(6)]
    cache = RecordingCache()
    ahead = DirectoryReadAhead(md, cache, file_blocks=2, step_bytes=5 << 20)
    ahead.opened(first)
    # the open fetches its own block and what fits in HEAD_BYTES (1 MiB: b0's first
    # block); then two blocks of each file until 5 MiB are asked for: the rest of b0,
    # b1, b2 (the file that crosses the budget is taken whole, never half of its first
    # blocks)
    assert HEAD_BYTES == 1 << 20
    assert cache.fetched == [_first_blocks(md, first) + [big[0][1][0]]]
    assert cache.asked == [[big[0][1][1]] + [b for _, blocks in big[1:3] for b in blocks[:2]]]


def test_directories_empty_files_and_hard_links_are_passed_over(md):
    d = md.create(ROOT_INO, b"d", stat.S_IFDIR | 0o755, 0, 0).ino
    md.create(d, b"a-subdir", stat.S_IFDIR | 0o755, 0, 0)
    md.create(d, b"b-empty", FILE, 0, 0)
    first, _ = make_file(md, d, b"c")
    later, blocks = make_file(md, d, b"d")
    cache = RecordingCache()
    ahead = DirectoryReadAhead(md, cache)
    ahead.opened(first)  # nothing before it holds data: a walk starts
    assert cache.fetched == [_first_blocks(md, first) + blocks]
    assert cache.asked == []
    md.link(later, ROOT_INO, b"second-name")
    other = DirectoryReadAhead(md, RecordingCache())
    other.opened(later)  # two names: no one directory to follow, nothing recorded
    assert other._walks == {}


class FailingMetadata:
    def names(self, ino):
        raise sqlite3.OperationalError("disk I/O error")


def test_a_failure_is_logged_and_never_raised(caplog):
    ahead = DirectoryReadAhead(FailingMetadata(), RecordingCache())
    ahead.opened(5)
    assert "read-ahead across the files of a directory failed: disk I/O error" in caplog.text


def test_a_subdirectory_listed_during_a_walk_of_its_parent_is_walked_at_once(md):
    """tar, cp -r and rsync list a subdirectory before reading its files: once its parent
    is walked, listing the subdirectory asks for its first files in the background, and
    its first open then waits for nothing. A listing where nobody reads, or where one file
    was opened in the middle of the parent (no walk), asks nothing."""
    d, files = directory(md, 40)
    sub = md.create(d, b"sub", stat.S_IFDIR | 0o755, 0, 0).ino
    inner = [make_file(md, sub, b"g%d" % i) for i in range(4)]
    other = md.create(ROOT_INO, b"other", stat.S_IFDIR | 0o755, 0, 0).ino
    cache = RecordingCache()
    ahead = DirectoryReadAhead(md, cache)
    ahead.listed(other)  # nobody reads in its parent
    ahead.listed(sub)  # nobody reads in d yet
    ahead.opened(files[20][0])  # one file in the middle: recorded, no walk
    ahead.listed(sub)
    assert cache.asked == cache.fetched == []
    ahead.opened(files[21][0])  # the next one: a walk of d from here
    before = len(cache.asked)
    ahead.listed(sub)
    assert cache.asked[before:] == [blocks_of(inner)]
    ahead.listed(sub)  # listed again: already walked
    for ino, _ in inner:  # the reader goes through it: nothing more to ask, nothing waits
        ahead.opened(ino)
    assert cache.asked[before:] == [blocks_of(inner)]
    assert len(cache.fetched) == 1  # d's walk from files[21] only
