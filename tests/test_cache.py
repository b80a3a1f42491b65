"""The block cache (fusefs/cache.py) over an in-memory block store: levels, bounds, single
flight, read-ahead, corruption of the disk level."""

from __future__ import annotations

import errno
import logging
import os
import random
import sys
import threading

import pytest

from blockserver import protocol
from fusefs import errors
from fusefs.cache import PREFETCH_BATCH, PREFETCH_QUEUE, BlockCache
from fusefs.memstore import MemoryBlockStore

from .support import wait_until


class CountingStore(MemoryBlockStore):
    """Counts get() calls; get() can be held at a gate to widen race windows."""

    def __init__(self):
        super().__init__()
        self.gets = 0
        self.gate = threading.Event()
        self.gate.set()
        self._count_lock = threading.Lock()

    def get(self, block_id, checksum):
        with self._count_lock:
            self.gets += 1
        self.gate.wait(30)
        return super().get(block_id, checksum)


class BatchStore(CountingStore):
    """Also counts get_many() calls (batches), which can be held at `batch_gate`, made to
    fail (`batch_fails`), or to bring back only some blocks (`batch_skips`)."""

    def __init__(self):
        super().__init__()
        self.batches = 0
        self.batch_gate = threading.Event()
        self.batch_gate.set()
        self.batch_fails = None
        self.batch_skips = set()

    def get_many(self, items):
        with self._count_lock:
            self.batches += 1
        self.batch_gate.wait(30)
        if self.batch_fails is not None:
            raise self.batch_fails
        return {b: MemoryBlockStore.get(self, b, c) for b, c in items
                if b not in self.batch_skips}


def new_block(size: int = 1000, rng=random):
    data = rng.randbytes(size)
    return protocol.new_block_id(), data, protocol.checksum(data)


def stored(store, size=1000):
    block_id, data, checksum = new_block(size)
    store.put(block_id, data, checksum)
    return block_id, data, checksum


def cache_file(disk_dir, block_id) -> str:
    return os.path.join(disk_dir, block_id[:2], block_id)


def file_size(n: int) -> int:
    """The size of a block of n bytes in the disk cache: its bytes, an 8-byte sum per 64 KiB
    segment, a 16-byte trailer."""
    return n + 8 * -(-n // (64 << 10)) + 32


def files_on_disk(disk_dir) -> dict[str, int]:
    """id -> size of every block file under disk_dir (tmp/ excluded)."""
    found = {}
    for sub in os.listdir(disk_dir):
        if sub != "tmp" and os.path.isdir(os.path.join(disk_dir, sub)):
            for name in os.listdir(os.path.join(disk_dir, sub)):
                found[name] = os.path.getsize(os.path.join(disk_dir, sub, name))
    return found


@pytest.fixture
def store():
    return CountingStore()


def _settling(cache, read):
    def settled(*args):
        try:
            return read(*args)
        finally:
            assert cache.settle(10.0), "the disk writer did not finish in 10 s"
    return settled


@pytest.fixture
def make_cache(store):
    """Factory for caches over `store`; every cache made is closed at teardown."""
    caches = []

    def make(*, settled=True, **kw):
        """settled: each get and get_range returns once the disk writer has written what
        it fetched, so that a test sees the files (the tests of the writer itself say
        settled=False)."""
        kw.setdefault("memory_bytes", 1 << 20)
        kw.setdefault("disk_dir", None)
        kw.setdefault("disk_bytes", 0)
        cache = BlockCache(kw.pop("store", store), **kw)
        caches.append(cache)
        if settled:
            for name in ("get", "get_range"):
                setattr(cache, name, _settling(cache, getattr(cache, name)))
        return cache

    try:
        yield make
    finally:
        store.gate.set()
        for cache in caches:
            cache.close()


# -- memory level -------------------------------------------------------------------------

def test_miss_then_memory_hit(store, make_cache):
    cache = make_cache()
    block_id, data, checksum = stored(store)
    assert cache.get(block_id, checksum) == data
    assert cache.get(block_id, checksum) == data
    assert store.gets == 1
    s = cache.stats()
    assert (s["misses"], s["hits_memory"], s["fetches"], s["memory_bytes"]) == (1, 1, 1, 1000)


def test_memory_evicts_least_recently_used(store, make_cache):
    cache = make_cache(memory_bytes=3000)
    a, b, c, d = (stored(store) for _ in range(4))
    for block_id, _, checksum in (a, b, c, a, d):  # a is used again, so b is the oldest
        cache.get(block_id, checksum)
    assert store.gets == 4
    for block_id, data, checksum in (a, c, d):
        assert cache.get(block_id, checksum) == data
    assert store.gets == 4
    assert cache.get(b[0], b[2]) == b[1]
    assert store.gets == 5
    assert cache.stats()["evictions"] == 2  # b for d, then a (least recent) for b


def test_block_larger_than_memory_bound_is_not_cached(store, make_cache):
    cache = make_cache(memory_bytes=500)
    block_id, data, checksum = stored(store, 1000)
    assert cache.get(block_id, checksum) == data
    assert cache.get(block_id, checksum) == data
    assert store.gets == 2
    assert cache.stats()["memory_bytes"] == 0


def test_an_inserted_bytearray_counts_what_it_holds_not_its_length(store, make_cache):
    """Blocks this client wrote are cached as the bytearrays they were built in, which
    appends over-allocate: the bound must count the allocation."""
    cache = make_cache(memory_bytes=1 << 20)
    data = bytearray()
    for _ in range(8):
        data += b"x" * 1000  # grown like a dirty block
    block_id, checksum = protocol.new_block_id(), protocol.checksum(data)
    cache.insert(block_id, checksum, data)
    assert cache.stats()["memory_bytes"] == sys.getsizeof(data) > len(data)
    assert cache.get(block_id, checksum) == data


def test_memory_bound_holds_after_many_inserts(store, make_cache):
    bound = 50_000
    cache = make_cache(memory_bytes=bound)
    rng = random.Random(1)
    blocks = [new_block(rng.randrange(0, 8000), rng) for _ in range(300)]
    for block_id, data, checksum in blocks:
        cache.insert(block_id, checksum, data)
        assert cache.stats()["memory_bytes"] <= bound
    # the most recent blocks that fit are the ones kept
    assert cache.stats()["memory_bytes"] > bound - 8000
    block_id, data, checksum = blocks[-1]
    assert cache.get(block_id, checksum) == data
    assert store.gets == 0


def test_memory_entry_is_not_returned_for_another_checksum(store, make_cache):
    cache = make_cache()
    block_id, data, checksum = stored(store)
    assert cache.get(block_id, checksum) == data
    with pytest.raises(errors.BlockCorrupt):
        cache.get(block_id, protocol.checksum(b"other bytes"))


def test_wrong_checksum_from_the_store_surfaces_its_exception(store, make_cache, tmp_path):
    cache = make_cache(disk_dir=str(tmp_path), disk_bytes=1 << 20)
    block_id, data, _ = stored(store)
    with pytest.raises(errors.BlockCorrupt):
        cache.get(block_id, protocol.checksum(b"not these bytes"))
    assert cache.stats()["memory_bytes"] == 0
    assert files_on_disk(tmp_path) == {}


def test_missing_block_surfaces_block_missing(make_cache):
    cache = make_cache()
    block_id, _, checksum = new_block()
    with pytest.raises(errors.BlockMissing):
        cache.get(block_id, checksum)
    assert cache.stats()["misses"] == 1


def test_ids_that_are_not_block_ids_are_refused(make_cache, tmp_path):
    cache = make_cache(disk_dir=str(tmp_path / "cache"), disk_bytes=1 << 20)
    with pytest.raises(ValueError):
        cache.insert("../../escape" + "0" * 20, protocol.checksum(b"x"), b"x")
    with pytest.raises(ValueError):
        cache.get("ABCDEF" * 5 + "00", protocol.checksum(b"x"))
    assert sorted(os.listdir(tmp_path)) == ["cache"]
    assert files_on_disk(tmp_path / "cache") == {}


# -- disk level ---------------------------------------------------------------------------

def test_disk_level_survives_a_new_instance(store, make_cache, tmp_path):
    first = make_cache(disk_dir=str(tmp_path), disk_bytes=1 << 20)
    block_id, data, checksum = stored(store)
    first.get(block_id, checksum)
    first.close()
    assert files_on_disk(tmp_path) == {block_id: file_size(1000)}
    store.fail_with = errors.Unavailable("the cluster is gone")
    second = make_cache(disk_dir=str(tmp_path), disk_bytes=1 << 20)
    assert second.stats()["disk_bytes"] == file_size(1000)
    assert second.get(block_id, checksum) == data
    assert second.get(block_id, checksum) == data
    s = second.stats()
    assert (s["hits_disk"], s["hits_memory"], s["fetches"]) == (1, 1, 0)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_disk_file_is_deleted_and_refetched(store, make_cache, tmp_path, caplog, damage):
    first = make_cache(disk_dir=str(tmp_path), disk_bytes=1 << 20)
    block_id, data, checksum = stored(store)
    first.get(block_id, checksum)
    first.close()
    path = cache_file(tmp_path, block_id)
    with open(path, "rb") as f:
        good = f.read()
    bad = {"flip": good[:500] + bytes([good[500] ^ 1]) + good[501:],
           "truncate": good[:-1], "empty": b""}[damage]
    with open(path, "wb") as f:
        f.write(bad)
    second = make_cache(disk_dir=str(tmp_path), disk_bytes=1 << 20)
    with caplog.at_level(logging.WARNING, logger="fusefs.cache"):
        assert second.get(block_id, checksum) == data
    assert "failed verification" in caplog.text
    assert store.gets == 2
    s = second.stats()
    assert (s["hits_disk"], s["misses"], s["fetches"]) == (0, 1, 1)
    with open(path, "rb") as f:
        assert f.read() == good  # the refetched block replaced the bad file


def test_a_part_of_a_disk_cached_block_reads_and_checks_only_its_segments(
        store, make_cache, tmp_path, caplog):
    """get_range of a block on disk reads the 64 KiB segments holding the range and checks
    them against their own sums: damage in another segment goes unnoticed (the whole block
    is never read), damage inside the range makes it a miss, fetched again, the bad file
    deleted and replaced. Nothing of a ranged disk read is kept in memory."""
    seg = 64 << 10
    cache = make_cache(memory_bytes=0, disk_dir=str(tmp_path), disk_bytes=1 << 24)
    data = random.Random(3).randbytes(5 * seg + 123)
    block_id, checksum = protocol.new_block_id(), protocol.checksum(data)
    store.put(block_id, data, checksum)
    cache.get(block_id, checksum)  # fetched, written to disk
    path = cache_file(tmp_path, block_id)
    with open(path, "r+b") as f:  # damage segment 4
        f.seek(4 * seg + 10)
        f.write(bytes([data[4 * seg + 10] ^ 0xFF]))
    assert bytes(cache.get_range(block_id, checksum, seg - 5, 4096)) == data[seg - 5:seg + 4091]
    assert bytes(cache.get_range(block_id, checksum, 5 * seg, 4096)) == data[5 * seg:]
    assert bytes(cache.get_range(block_id, checksum, 9 * seg, 10)) == b""
    s = cache.stats()
    assert (s["hits_disk"], s["misses"], s["memory_bytes"], store.gets) == (3, 1, 0, 1)
    with caplog.at_level(logging.WARNING, logger="fusefs.cache"):
        got = cache.get_range(block_id, checksum, 4 * seg, 100)  # the damaged segment
    assert bytes(got) == data[4 * seg:4 * seg + 100]
    assert "failed verification" in caplog.text and store.gets == 2
    assert bytes(cache.get_range(block_id, checksum, 4 * seg, 100)) == data[4 * seg:4 * seg + 100]
    assert store.gets == 2 and cache.stats()["hits_disk"] == 4  # the file was replaced
    # Asked for under another checksum (bytes no block of this id ever had here), the
    # file is not taken for them: the store answers (and refuses the wrong checksum).
    other = protocol.checksum(b"other bytes")
    with pytest.raises(errors.StorageError):
        cache.get_range(block_id, other, 0, 100)
    assert store.gets == 3


def test_file_deleted_behind_the_cache_is_a_miss(store, make_cache, tmp_path):
    cache = make_cache(memory_bytes=0, disk_dir=str(tmp_path), disk_bytes=1 << 20)
    block_id, data, checksum = stored(store)
    cache.get(block_id, checksum)
    os.unlink(cache_file(tmp_path, block_id))
    assert cache.get(block_id, checksum) == data
    assert store.gets == 2
    assert cache.get(block_id, checksum) == data
    assert store.gets == 2 and cache.stats()["hits_disk"] == 1


def test_disk_bound_holds_and_evicts_least_recently_used(store, make_cache, tmp_path):
    bound = 20_000
    cache = make_cache(memory_bytes=0, disk_dir=str(tmp_path), disk_bytes=bound)
    rng = random.Random(2)
    blocks = [new_block(rng.randrange(1, 3000), rng) for _ in range(200)]
    for block_id, data, checksum in blocks:
        fetch(store, cache, block_id, data, checksum)
        assert cache.stats()["disk_bytes"] <= bound
        assert sum(files_on_disk(tmp_path).values()) <= bound
    on_disk = files_on_disk(tmp_path)
    assert cache.stats()["disk_bytes"] == sum(on_disk.values())
    kept = [b for b, _, _ in blocks if b in on_disk]
    assert kept == [b for b, _, _ in blocks[-len(kept):]]  # the newest survive
    assert cache.stats()["evictions"] == 200 - len(kept)


def test_restart_with_a_smaller_bound_keeps_the_most_recent_files(store, make_cache, tmp_path):
    first = make_cache(memory_bytes=0, disk_dir=str(tmp_path), disk_bytes=1 << 20)
    blocks = [new_block(1000) for _ in range(10)]
    for block_id, data, checksum in blocks:
        fetch(store, first, block_id, data, checksum)
    first.close()
    for age, (block_id, _, _) in enumerate(reversed(blocks)):  # blocks[-1] newest
        stamp = 1_700_000_000 - age * 60
        os.utime(cache_file(tmp_path, block_id), (stamp, stamp))
    second = make_cache(memory_bytes=0, disk_dir=str(tmp_path), disk_bytes=3500)
    assert set(files_on_disk(tmp_path)) == {b for b, _, _ in blocks[-3:]}
    assert second.stats()["disk_bytes"] == 3 * file_size(1000)


def test_disk_hit_refreshes_the_order_kept_across_restarts(store, make_cache, tmp_path):
    first = make_cache(memory_bytes=0, disk_dir=str(tmp_path), disk_bytes=1 << 20)
    a, b = new_block(), new_block()
    for block_id, data, checksum in (a, b):
        fetch(store, first, block_id, data, checksum)
        os.utime(cache_file(tmp_path, block_id), (1_600_000_000, 1_600_000_000))
    os.utime(cache_file(tmp_path, a[0]), (1_500_000_000, 1_500_000_000))  # a is older
    assert first.get(a[0], a[2]) == a[1]  # ... until it is read
    first.close()
    make_cache(memory_bytes=0, disk_dir=str(tmp_path), disk_bytes=1500)
    assert set(files_on_disk(tmp_path)) == {a[0]}


def test_start_removes_write_debris_and_ignores_foreign_files(make_cache, tmp_path):
    os.makedirs(tmp_path / "tmp")
    (tmp_path / "tmp" / "tmpabc123").write_bytes(b"half a block")
    (tmp_path / "notes.txt").write_bytes(b"x" * 100)
    os.makedirs(tmp_path / "ab")
    (tmp_path / "ab" / "not-an-id").write_bytes(b"y" * 100)
    (tmp_path / "ab" / ("cd" + "0" * 30)).write_bytes(b"z" * 100)  # an id in the wrong folder
    cache = make_cache(disk_dir=str(tmp_path), disk_bytes=1 << 20)
    assert os.listdir(tmp_path / "tmp") == []
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "ab" / "not-an-id").exists()
    assert cache.stats()["disk_bytes"] == 0


def test_a_disk_that_takes_no_more_files_is_said_once_not_per_block(
        store, make_cache, tmp_path, caplog, monkeypatch):
    """Out of inodes, statvfs still shows free bytes, so nothing else stops the writer
    trying: every block fails to be written. The log says so once (a minute), with the
    count, not once per block; reads go on from the servers."""
    from fusefs import cache as cache_module
    cache = make_cache(memory_bytes=0, disk_dir=str(tmp_path), disk_bytes=1 << 20)
    real_open = os.open

    def no_inodes(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *args)
    monkeypatch.setattr(cache_module.os, "open", no_inodes)
    blocks = [stored(store) for _ in range(5)]
    with caplog.at_level(logging.WARNING, logger="fusefs.cache"):
        for block_id, data, checksum in blocks:
            assert cache.get(block_id, checksum) == data
    said = [r for r in caplog.records if "cannot write block" in r.getMessage()]
    assert len(said) == 1 and "No space left" in said[0].getMessage(), caplog.text
    assert files_on_disk(str(tmp_path)) == {}
    monkeypatch.setattr(cache_module, "WRITE_REMIND", 0.0)  # a minute later: said again,
    block_id, data, checksum = stored(store)  # with the count of what was left uncached
    with caplog.at_level(logging.WARNING, logger="fusefs.cache"):
        assert cache.get(block_id, checksum) == data
    said = [r.getMessage() for r in caplog.records if "cannot write block" in r.getMessage()]
    assert len(said) == 2 and "(5 blocks left uncached" in said[1], said


@pytest.mark.parametrize("disk", [(None, 1 << 20), ("dir", 0)])
def test_no_disk_level(store, make_cache, tmp_path, disk):
    disk_dir = None if disk[0] is None else str(tmp_path / "cache")
    cache = make_cache(memory_bytes=0, disk_dir=disk_dir, disk_bytes=disk[1])
    block_id, data, checksum = stored(store)
    assert cache.get(block_id, checksum) == data
    assert cache.get(block_id, checksum) == data
    assert store.gets == 2
    assert cache.stats()["disk_bytes"] == 0
    assert not os.path.exists(tmp_path / "cache") or files_on_disk(tmp_path / "cache") == {}


# -- insert / discard ---------------------------------------------------------------------

def fetch(store, cache, block_id, data, checksum):
    """Put a block in the store and read it through the cache (which fills the disk)."""
    store.put(block_id, data, checksum)
    assert cache.get(block_id, checksum) == data


def test_insert_is_read_back_without_a_fetch_and_stays_off_the_disk(store, make_cache,
                                                                   tmp_path):
    cache = make_cache(disk_dir=str(tmp_path), disk_bytes=1 << 20)
    block_id, data, checksum = new_block()  # not in the store: a fetch would fail
    cache.insert(block_id, checksum, bytearray(data))
    assert cache.get(block_id, checksum) == data
    assert store.gets == 0
    assert not os.path.exists(cache_file(tmp_path, block_id))  # just written: memory only


def test_discard_drops_memory_and_disk(store, make_cache, tmp_path):
    cache = make_cache(disk_dir=str(tmp_path), disk_bytes=1 << 20)
    block_id, data, checksum = stored(store)
    cache.get(block_id, checksum)
    cache.discard(block_id)
    assert not os.path.exists(cache_file(tmp_path, block_id))
    s = cache.stats()
    assert (s["memory_bytes"], s["disk_bytes"]) == (0, 0)
    store.delete(block_id)
    with pytest.raises(errors.BlockMissing):
        cache.get(block_id, checksum)
    cache.discard(block_id)  # discarding what is not cached is harmless


# -- single flight ------------------------------------------------------------------------

def run_threads(n, target):
    results, threads = [None] * n, []
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        try:
            results[i] = ("ok", target())
        except Exception as e:  # noqa: BLE001 - the test inspects it
            results[i] = ("error", e)

    for i in range(n):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
    return threads, results


def join_all(threads):
    for t in threads:
        t.join(30)
        assert not t.is_alive()


def joined_a_fetch(thread) -> bool:
    """True while `thread` waits for a fetch another thread leads (in _Flight.result)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_qualname == "_Flight.result":
            return True
        frame = frame.f_back
    return False


def all_parked(threads, store, other_fetches: int = 0) -> bool:
    """Every thread has joined a fetch under way or started one of its own (the store
    counted it, beside `other_fetches` started elsewhere): past the moment at which a
    second fetch would start."""
    joined = sum(joined_a_fetch(t) for t in threads)
    return joined + store.gets - other_fetches >= len(threads)


def test_concurrent_misses_make_one_fetch(store, make_cache, tmp_path):
    cache = make_cache(disk_dir=str(tmp_path), disk_bytes=1 << 20)
    block_id, data, checksum = stored(store)
    store.gate.clear()  # the first fetch waits here while the others pile up
    threads, results = run_threads(16, lambda: cache.get(block_id, checksum))
    wait_until(lambda: store.gets >= 1, "the first fetch")
    wait_until(lambda: all_parked(threads, store), "every get joined or started a fetch")
    store.gate.set()
    join_all(threads)
    assert store.gets == 1
    assert all(r == ("ok", data) for r in results)
    s = cache.stats()
    assert s["fetches"] == 1 and s["misses"] + s["hits_memory"] == 16


def test_single_flight_shares_the_error_and_a_later_get_retries(store, make_cache):
    cache = make_cache()
    block_id, data, checksum = stored(store)
    store.fail_with = errors.Unavailable("no server answers")
    store.gate.clear()
    threads, results = run_threads(16, lambda: cache.get(block_id, checksum))
    wait_until(lambda: store.gets >= 1, "the first fetch")
    wait_until(lambda: all_parked(threads, store), "every get joined or started a fetch")
    store.gate.set()
    join_all(threads)
    assert store.gets == 1
    failures = [r[1] for r in results if r[0] == "error"]
    assert len(failures) == 16 and all(e is failures[0] for e in failures)
    assert isinstance(failures[0], errors.Unavailable)
    store.fail_with = None
    assert cache.get(block_id, checksum) == data
    assert store.gets == 2


def test_many_threads_many_blocks_small_bounds(store, make_cache, tmp_path):
    mem_bound, disk_bound = 6000, 15_000
    cache = make_cache(memory_bytes=mem_bound, disk_dir=str(tmp_path), disk_bytes=disk_bound)
    blocks = [stored(store, 1000 + i) for i in range(40)]
    errors_seen = []

    def reader(seed):
        rng = random.Random(seed)
        for _ in range(300):
            block_id, data, checksum = rng.choice(blocks)
            if cache.get(block_id, checksum) != data:
                errors_seen.append(block_id)
            if rng.random() < 0.05:
                cache.discard(rng.choice(blocks)[0])

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    join_all(threads)
    assert errors_seen == []
    s = cache.stats()
    assert s["memory_bytes"] <= mem_bound and s["disk_bytes"] <= disk_bound
    assert sum(files_on_disk(tmp_path).values()) <= disk_bound
    assert s["hits_memory"] + s["hits_disk"] + s["misses"] == 8 * 300


# -- read-ahead ---------------------------------------------------------------------------

def test_prefetch_fills_the_cache(store, make_cache):
    cache = make_cache()
    blocks = [stored(store) for _ in range(10)]
    cache.prefetch([(b, c) for b, _, c in blocks])
    wait_until(lambda: cache.stats()["memory_bytes"] == 10_000, "read-ahead")
    for block_id, data, checksum in blocks:
        assert cache.get(block_id, checksum) == data
    assert store.gets == 10
    assert cache.stats()["hits_memory"] == 10


def test_prefetch_fetches_only_what_is_not_cached_and_brings_disk_blocks_to_memory(
        store, make_cache, tmp_path):
    """A sequential reader's read-ahead: a block in memory or on its way is skipped, one
    on disk is read into memory from there (the reader's next reads then wait for no
    disk), only the rest comes from the store."""
    first = make_cache(memory_bytes=0, disk_dir=str(tmp_path), disk_bytes=1 << 20)
    on_disk = stored(store)
    first.get(on_disk[0], on_disk[2])
    first.close()
    cache = make_cache(disk_dir=str(tmp_path), disk_bytes=1 << 20, prefetch_threads=1)
    in_memory, new = stored(store), stored(store)
    cache.get(in_memory[0], in_memory[2])
    gets_before = store.gets
    store.gate.clear()
    cache.prefetch([(b, c) for b, _, c in (on_disk, in_memory, new, new, new)])
    wait_until(lambda: store.gets > gets_before, "the read-ahead fetch")
    cache.prefetch([(new[0], new[2])])  # in flight now: skipped too
    store.gate.set()
    assert cache.get(new[0], new[2]) == new[1]  # joins the read-ahead or hits memory
    assert store.gets == gets_before + 1
    assert cache.stats()["fetches"] == 2  # in_memory by get, new by read-ahead: nothing else
    # one thread works in order, so on_disk was handled before new: read from disk
    assert cache.stats()["memory_bytes"] == 3000
    hits = cache.stats()["hits_memory"]
    assert cache.get(on_disk[0], on_disk[2]) == on_disk[1]
    assert cache.stats()["hits_memory"] == hits + 1 and store.gets == gets_before + 1


def test_a_long_scan_keeps_on_disk_only_what_it_read_before(store, make_cache, tmp_path):
    """Read ahead for a sequential read past scan_after (half the disk level): a block
    seen for the first time stays off the disk, the second time it goes there; read-ahead
    for a shorter run, and get(), write every fetched block to disk as before."""
    cache = make_cache(memory_bytes=0, disk_dir=str(tmp_path), disk_bytes=2 << 20,
                       prefetch_threads=1)
    assert cache.scan_after == 1 << 20
    scanned, short = [stored(store) for _ in range(4)], [stored(store) for _ in range(2)]
    read = stored(store)

    def prefetched(blocks, run):
        before = cache.stats()["fetches"]
        cache.prefetch([(b, c) for b, _, c in blocks], run=run)
        wait_until(lambda: cache.stats()["fetches"] == before + len(blocks), "read-ahead")
        assert cache.settle(10.0)

    prefetched(scanned, run=(1 << 20) + 1)
    prefetched(short, run=1 << 20)
    cache.get(read[0], read[2])
    assert set(files_on_disk(str(tmp_path))) == {b for b, _, _ in short + [read]}
    assert cache.stats()["scan_skips"] == 4
    prefetched(scanned[:2], run=64 << 20)  # seen before: now kept
    assert set(files_on_disk(str(tmp_path))) == {b for b, _, _ in short + [read] + scanned[:2]}
    assert cache.stats()["scan_skips"] == 4
    for block_id, data, checksum in scanned:
        assert cache.get(block_id, checksum) == data  # a get is no scan: all kept now
    assert len(files_on_disk(str(tmp_path))) == 7


class PartlyLocalStore(BatchStore):
    """A store that also has the blocks in `local` as a server's files under `root`, in
    the block server's format, as a server on this host would."""

    def __init__(self, root):
        super().__init__()
        self.root = str(root)
        self.local = set()

    def make_local(self, block_id, data, checksum):
        path = protocol.block_file(self.root, block_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(protocol.BLOCK_HEADER.pack(protocol.BLOCK_MAGIC, bytes.fromhex(checksum),
                                               len(data)) + data)
        self.local.add(block_id)

    def local_copy(self, block_id):
        return self.root if block_id in self.local else None


def test_blocks_with_a_copy_on_this_host_are_not_written_to_the_disk_level(tmp_path):
    """Whether a get, read-ahead or a batch read-ahead fetched it, a block a server of
    this host holds is not written to the disk level: it came from that server's file."""
    store = PartlyLocalStore(tmp_path / "server")
    cache = BlockCache(store, memory_bytes=1 << 20, disk_dir=str(tmp_path / "cache"),
                       disk_bytes=64 << 20, prefetch_threads=1)
    try:
        blocks = [stored(store) for _ in range(9)]
        for block in blocks[::2]:
            store.make_local(*block)
        for block_id, data, checksum in blocks[:3]:
            assert cache.get(block_id, checksum) == data
        cache.prefetch([(b, c) for b, _, c in blocks[3:6]])
        cache.prefetch_batch([(b, c) for b, _, c in blocks[6:]])
        wait_until(lambda: cache.stats()["fetches"] == 9, "read-ahead")
        assert cache.settle(10.0)
        assert set(files_on_disk(str(tmp_path / "cache"))) == {b for b, _, _ in blocks[1::2]}
        assert cache.stats()["local_skips"] == 5
    finally:
        cache.close()


def test_a_range_of_a_block_on_this_host_is_read_from_its_file_segment_by_segment(tmp_path):
    """A random reader's miss on a block read whole before (and dropped from memory since)
    reads and checks only the segments it needs from the server's file; a file that no
    longer matches sends it to a whole read, which returns the right bytes."""
    store = PartlyLocalStore(tmp_path / "server")
    cache = BlockCache(store, memory_bytes=300_000, disk_dir=str(tmp_path / "cache"),
                       disk_bytes=64 << 20, prefetch_threads=0)
    try:
        big, other = stored(store, 200_000), stored(store, 200_000)
        store.make_local(*big)
        store.make_local(*other)
        assert cache.get(big[0], big[2]) == big[1]
        assert cache.get(other[0], other[2]) == other[1]  # evicts big from memory
        gets = store.gets
        assert bytes(cache.get_range(big[0], big[2], 70_000, 4096)) == big[1][70_000:74_096]
        assert bytes(cache.get_range(big[0], big[2], 131_000, 2000)) == \
            big[1][131_000:133_000]  # across two segments
        assert cache.stats()["hits_local"] == 2 and store.gets == gets
        path = protocol.block_file(store.root, big[0])
        with open(path, "r+b") as f:  # damage the second segment
            f.seek(protocol.BLOCK_HEADER.size + 70_000)
            f.write(b"\xff" * 8)
        assert bytes(cache.get_range(big[0], big[2], 70_000, 4096)) == big[1][70_000:74_096]
        assert store.gets == gets + 1 and cache.stats()["hits_local"] == 2
    finally:
        cache.close()


def test_a_damaged_file_on_this_host_is_never_returned_in_part(tmp_path):
    store = PartlyLocalStore(tmp_path / "server")
    cache = BlockCache(store, memory_bytes=0, disk_dir=None, disk_bytes=0, prefetch_threads=0)
    try:
        big = stored(store, 200_000)
        store.make_local(*big)
        assert cache.get(big[0], big[2]) == big[1]  # sums taken from the verified bytes
        with open(protocol.block_file(store.root, big[0]), "r+b") as f:
            f.seek(protocol.BLOCK_HEADER.size + 70_000)
            f.write(b"\xff" * 8)
        gets = store.gets
        assert bytes(cache.get_range(big[0], big[2], 70_000, 4096)) == big[1][70_000:74_096]
        assert store.gets == gets + 1 and cache.stats()["hits_local"] == 0
        assert bytes(cache.get_range(big[0], big[2], 0, 4096)) == big[1][:4096]
        assert cache.stats()["hits_local"] == 1  # the segments that match still serve
    finally:
        cache.close()


def test_without_a_disk_level_nothing_counts_as_a_scan(store, make_cache):
    cache = make_cache()
    blocks = [stored(store) for _ in range(3)]
    cache.prefetch([(b, c) for b, _, c in blocks], run=1 << 40)
    wait_until(lambda: cache.stats()["fetches"] == 3, "read-ahead")
    assert cache.stats()["scan_skips"] == 0


def test_a_get_joins_the_read_ahead_fetch(store, make_cache):
    cache = make_cache(prefetch_threads=1)
    block_id, data, checksum = stored(store)
    store.gate.clear()
    cache.prefetch([(block_id, checksum)])
    wait_until(lambda: store.gets == 1, "the read-ahead fetch")
    threads, results = run_threads(1, lambda: cache.get(block_id, checksum))
    wait_until(lambda: all_parked(threads, store, other_fetches=1),
               "the get joined the read-ahead fetch or started its own")
    store.gate.set()
    join_all(threads)
    assert results == [("ok", data)] and store.gets == 1


def test_prefetch_never_blocks_and_drops_what_does_not_fit(store, make_cache):
    cache = make_cache(memory_bytes=10 << 20, prefetch_threads=1)
    blocks = [stored(store, 100) for _ in range(PREFETCH_QUEUE + 200)]
    store.gate.clear()  # the one read-ahead thread is stuck: the queue fills up
    caller = threading.Thread(target=cache.prefetch, args=([(b, c) for b, _, c in blocks],))
    caller.start()
    caller.join(30)
    assert not caller.is_alive()
    store.gate.set()
    wait_until(lambda: cache.stats()["memory_bytes"] >= 100 * PREFETCH_QUEUE, "read-ahead")
    assert store.gets <= PREFETCH_QUEUE + 1 < len(blocks)


def test_prefetch_errors_are_only_logged(store, make_cache, caplog):
    cache = make_cache(prefetch_threads=1)
    missing = new_block()
    present = stored(store)
    with caplog.at_level(logging.DEBUG, logger="fusefs.cache"):
        cache.prefetch([(missing[0], missing[2]), (present[0], present[2])])
        wait_until(lambda: cache.stats()["memory_bytes"] == 1000, "read-ahead")
    assert any(r.levelno == logging.DEBUG and missing[0] in r.getMessage()
               for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_batch_read_ahead_asks_for_many_blocks_per_request(make_cache):
    store = BatchStore()
    cache = make_cache(store=store)
    blocks = [stored(store, 100) for _ in range(PREFETCH_BATCH + 10)]
    cache.prefetch_batch([(b, c) for b, _, c in blocks] + [(blocks[0][0], blocks[0][2])])
    wait_until(lambda: cache.stats()["memory_bytes"] == 100 * len(blocks), "read-ahead")
    for block_id, data, checksum in blocks:
        assert cache.get(block_id, checksum) == data
    assert (store.batches, store.gets) == (2, 0)  # two batches, no block fetched alone
    assert cache.stats()["hits_memory"] == len(blocks)
    assert cache.stats()["fetches"] == len(blocks)


def test_batch_read_ahead_skips_what_is_cached_or_coming(make_cache, tmp_path):
    store = BatchStore()
    cache = make_cache(store=store, disk_dir=str(tmp_path), disk_bytes=1 << 20)
    cached = stored(store)
    cache.get(cached[0], cached[2])
    fresh = stored(store)
    store.batch_gate.clear()
    cache.prefetch_batch([(cached[0], cached[2]), (fresh[0], fresh[2])])
    wait_until(lambda: store.batches == 1, "the batch")
    cache.prefetch_batch([(fresh[0], fresh[2])])  # in flight: not asked for again
    store.batch_gate.set()
    wait_until(lambda: cache.stats()["fetches"] == 2, "the batch to land")
    assert store.batches == 1 and store.gets == 1  # the get() of `cached` only
    assert cache.settle(10.0)
    assert fresh[0] in files_on_disk(str(tmp_path))  # fetched blocks reach the disk level


def test_a_get_waits_for_the_batch_and_fetches_itself_what_it_did_not_bring(make_cache):
    store = BatchStore()
    cache = make_cache(store=store)
    brought, left_out = stored(store), stored(store)
    store.batch_skips = {left_out[0]}
    store.batch_gate.clear()
    cache.prefetch_batch([(b, c) for b, _, c in (brought, left_out)])
    wait_until(lambda: store.batches == 1, "the batch")
    threads, results = [], []
    for block in (brought, left_out):
        t, r = run_threads(1, lambda b=block: cache.get(b[0], b[2]))
        threads += t
        results += [r]
    wait_until(lambda: all(joined_a_fetch(t) for t in threads), "both gets wait for the batch")
    store.batch_gate.set()
    join_all(threads)
    assert results == [[("ok", brought[1])], [("ok", left_out[1])]]
    assert store.gets == 1  # only the block the batch did not bring


def test_a_failed_batch_is_only_logged_and_get_still_reads(make_cache, caplog):
    store = BatchStore()
    cache = make_cache(store=store)
    block_id, data, checksum = stored(store)
    store.batch_fails = errors.Unavailable("no server answers")
    missing_id, _, missing_checksum = new_block()
    with caplog.at_level(logging.DEBUG, logger="fusefs.cache"):
        cache.prefetch_batch([(block_id, checksum), (missing_id, missing_checksum)])
        wait_until(lambda: store.batches == 1 and not cache._flights, "the failed batch")
    assert cache.get(block_id, checksum) == data
    assert any("batch read-ahead" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_close_stops_read_ahead_threads(store, make_cache):
    before = set(threading.enumerate())
    cache = make_cache(prefetch_threads=2)
    mine = set(threading.enumerate()) - before
    assert len(mine) == 2
    blocks = [stored(store) for _ in range(20)]
    store.gate.clear()
    cache.prefetch([(b, c) for b, _, c in blocks])
    wait_until(lambda: store.gets == 2, "both threads fetching")
    closer = threading.Thread(target=cache.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive()
    store.gate.set()
    wait_until(lambda: not any(t.is_alive() for t in mine), "threads to end")
    assert store.gets == 2  # the queued requests were dropped, not fetched
    cache.prefetch([(b, c) for b, _, c in blocks])  # after close: nothing happens
    assert store.gets == 2


# -- stats --------------------------------------------------------------------------------

def test_stats_count_every_level(store, make_cache, tmp_path):
    cache = make_cache(memory_bytes=1500, disk_dir=str(tmp_path), disk_bytes=1 << 20)
    a, b = stored(store), stored(store)
    cache.get(a[0], a[2])  # miss, fetch
    cache.get(a[0], a[2])  # memory
    cache.get(b[0], b[2])  # miss, fetch; evicts a from memory
    cache.get(a[0], a[2])  # disk; evicts b from memory
    cache.insert(protocol.new_block_id(), protocol.EMPTY_CHECKSUM, b"")  # 0 bytes
    assert cache.stats() == {"hits_memory": 1, "hits_disk": 1, "misses": 2, "fetches": 2,
                             "evictions": 2, "scan_skips": 0, "local_skips": 0,
                             "hits_local": 0, "memory_bytes": 1000,
                             "disk_bytes": 2 * file_size(1000)}


def _held_writer(cache, monkeypatch) -> threading.Event:
    """Hold the cache's disk writer before each file it writes until the event is set."""
    go = threading.Event()
    write = cache._write_disk

    def held(*args):
        assert go.wait(30), "the test never let the disk writer go"
        write(*args)

    monkeypatch.setattr(cache, "_write_disk", held)
    return go


def test_a_fetch_does_not_wait_for_its_disk_file(store, make_cache, tmp_path, monkeypatch):
    """A fetched block is written to the disk level by the disk writer, after get() returned:
    while it waits, reads of it (whole or a range) come from the waiting copy, even when
    memory has dropped it, and nothing is fetched twice; close() writes it, and a new cache
    on the directory finds it."""
    cache = make_cache(settled=False, memory_bytes=0, disk_dir=str(tmp_path),
                       disk_bytes=1 << 20)
    go = _held_writer(cache, monkeypatch)
    block_id, data, checksum = stored(store)
    assert cache.get(block_id, checksum) == data
    assert not os.path.exists(cache_file(tmp_path, block_id))
    assert cache.get(block_id, checksum) == data  # memory holds nothing (memory_bytes=0)
    assert bytes(cache.get_range(block_id, checksum, 10, 20)) == data[10:30]
    assert store.gets == 1
    assert cache.stats()["hits_disk"] == 2
    assert not cache.settle(0.2)  # the writer is held
    go.set()
    cache.close()
    assert files_on_disk(tmp_path) == {block_id: file_size(len(data))}
    again = make_cache(disk_dir=str(tmp_path), disk_bytes=1 << 20)
    assert again.get(block_id, checksum) == data
    assert store.gets == 1 and again.stats()["hits_disk"] == 1


def test_the_disk_writer_backlog_is_bounded(store, make_cache, tmp_path, monkeypatch):
    """Blocks beyond DISK_BACKLOG bytes waiting for the disk writer are not written to the
    disk level (memory still has them): a slow disk never holds more than the bound."""
    monkeypatch.setattr("fusefs.cache.DISK_BACKLOG", 2500)
    cache = make_cache(settled=False, disk_dir=str(tmp_path), disk_bytes=1 << 20)
    go = _held_writer(cache, monkeypatch)
    blocks = [stored(store) for _ in range(4)]  # 1,000 bytes each: two fit, then none
    for block_id, data, checksum in blocks:
        assert cache.get(block_id, checksum) == data
    go.set()
    assert cache.settle(10.0)
    assert sorted(files_on_disk(tmp_path)) == sorted(b for b, _, _ in blocks[:2])
    for block_id, data, checksum in blocks:  # all in memory
        assert cache.get(block_id, checksum) == data
    assert store.gets == 4


def test_fetch_batch_brings_blocks_before_it_returns(make_cache):
    """fetch_batch: one batch request for what is neither cached nor coming, done when it
    returns; a block the batch did not bring is left to get()."""
    store = BatchStore()
    cache = make_cache(store=store)
    cached, fresh, left_out = stored(store), stored(store), stored(store)
    cache.get(cached[0], cached[2])
    store.batch_skips = {left_out[0]}
    cache.fetch_batch([(b, c) for b, _, c in (cached, fresh, left_out, fresh)])
    assert (store.batches, store.gets) == (1, 1)  # the batch, and the first get()
    assert cache.stats()["fetches"] == 2
    for block_id, data, checksum in (cached, fresh, left_out):
        assert cache.get(block_id, checksum) == data
    assert (store.batches, store.gets) == (1, 2)  # left_out, fetched by get()


def test_a_block_discarded_while_waiting_for_the_disk_writer_is_not_written(
        store, make_cache, tmp_path, monkeypatch):
    cache = make_cache(settled=False, disk_dir=str(tmp_path), disk_bytes=1 << 20)
    go = _held_writer(cache, monkeypatch)
    (a, _, a_sum), (b, _, b_sum) = stored(store), stored(store)
    cache.get(a, a_sum)  # the writer takes it and waits
    cache.get(b, b_sum)  # waits for the writer
    cache.discard(b)
    go.set()
    assert cache.settle(10.0)
    assert set(files_on_disk(tmp_path)) == {a}


def test_a_disk_cache_file_is_written_whole_when_the_kernel_takes_a_little_at_a_time(
        tmp_path, monkeypatch):
    """The disk writer writes a block, its segment sums and its trailer with one writev;
    when the kernel takes fewer bytes than asked, the rest follows in order."""
    from fusefs import cache as cache_module

    real = os.writev
    calls = []

    def stingy(fd, parts):  # takes at most 5,000 bytes per call
        calls.append(len(parts))
        data = b"".join(bytes(p) for p in parts)[:5000]
        return real(fd, [data])

    monkeypatch.setattr(cache_module.os, "writev", stingy)
    parts = [os.urandom(12_345), b"", os.urandom(77), os.urandom(4_999)]
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        cache_module._write_all(fd, list(parts))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(parts)
    assert len(calls) == 4  # 17,421 bytes, 5,000 at a time
