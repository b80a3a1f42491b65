"""LocalRoom, on its own: when it looks at the disk, what it asks the disk cache for, what
it refuses and when it stops refusing. The disk is a stand-in (`free` overridden) and so
is the clock; the mounted behaviour is tested in test_mount_promises.py."""

from __future__ import annotations

import errno

import pytest

from fusefs import localroom
from fusefs.errors import FsError
from fusefs.localroom import LocalRoom

MiB = 1 << 20


class Disk(LocalRoom):
    """A LocalRoom over a disk whose free bytes the test sets (and that counts looks)."""

    def __init__(self, free: int, reserve: int = 10 * MiB, cache: int = 0):
        self.now, self.bytes_free, self.cache, self.looks, self.asked = 0.0, free, cache, 0, []
        super().__init__("/nowhere", reserve, make_room=self.shrink, clock=lambda: self.now)

    def free(self) -> int:
        self.looks += 1
        return self.bytes_free

    def shrink(self, nbytes: int) -> int:
        self.asked.append(nbytes)
        given = min(nbytes, self.cache)
        self.cache -= given
        self.bytes_free += given
        return given


def test_far_from_the_reserve_the_disk_is_looked_at_once_per_interval():
    disk = Disk(free=100 * MiB)
    for _ in range(50):
        disk.check()
    assert disk.looks == 1 and disk.low is None
    disk.now += localroom.INTERVAL
    disk.check()
    assert disk.looks == 2


def test_near_the_reserve_every_check_looks():
    disk = Disk(free=30 * MiB)  # under NEAR x 10 MiB
    for _ in range(5):
        disk.check()
    assert disk.looks == 5 and disk.low is None


def test_short_of_room_the_cache_gives_back_first_then_enospc_with_what_to_do():
    disk = Disk(free=4 * MiB, cache=3 * MiB)
    with pytest.raises(FsError) as refused:
        disk.check()
    assert refused.value.errno == errno.ENOSPC
    assert disk.asked == [16 * MiB]  # twice the reserve, less what is free
    assert "free space on that disk" in str(refused.value) and disk.low


def test_when_the_cache_gives_enough_nothing_is_refused():
    disk = Disk(free=4 * MiB, cache=50 * MiB)
    disk.check()
    assert disk.low is None and disk.bytes_free == 20 * MiB


def test_refusing_ends_as_soon_as_there_is_room_again():
    disk = Disk(free=1 * MiB)
    for _ in range(3):
        with pytest.raises(FsError):
            disk.check()
    disk.bytes_free = 12 * MiB  # freed by someone; no time passes
    disk.check()
    assert disk.low is None


def test_a_directory_that_cannot_be_looked_at_refuses_nothing(tmp_path):
    room = LocalRoom(str(tmp_path / "gone"), 10 * MiB)
    room.check()
    assert room.low is None


def test_only_a_full_disk_counts_as_a_full_disk():
    import sqlite3

    from fusefs.localroom import disk_full

    assert disk_full(sqlite3.OperationalError("database or disk is full"))
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not disk_full(sqlite3.OperationalError("database is locked"))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(ValueError("database or disk is full"))


def test_one_shrink_at_a_time():
    """A check that finds the disk short while another check is shrinking the cache does
    not shrink it again (it would give back twice what is needed)."""
    import threading

    inside, go = threading.Event(), threading.Event()

    class Slow(Disk):
        def shrink(self, nbytes: int) -> int:
            inside.set()
            go.wait(5)
            return super().shrink(nbytes)

    disk = Slow(free=4 * MiB, cache=100 * MiB)
    first = threading.Thread(target=disk.check)
    first.start()
    assert inside.wait(5)
    with pytest.raises(FsError):  # still short: the first shrink has not given back yet
        disk.check()
    go.set()
    first.join(5)
    assert disk.asked == [16 * MiB] and disk.low is None


def test_a_follower_on_a_full_disk_stalls_says_so_once_and_resumes(tmp_path, caplog):
    """A read-only mount's follower whose replay fails with the disk full (no reserve left
    to stop it first) is stalled: a warning, not a traceback, `stats()` says why, each poll
    tries again, and the first poll that applies says it follows again. Any other error is
    still logged as unexpected. (The mount-level test, with a reserve, is in
    tests/test_writer_lease.py; this is the branch a reserve of 0 leaves.)"""
    import logging
    import sqlite3
    import threading
    from types import SimpleNamespace

    from fusefs.follower import Follower
    from fusefs.metadata import Metadata

    md = Metadata(str(tmp_path / "metadata.db"), group_seconds=3600)
    md.format(uid=0, gid=0)
    sb = SimpleNamespace(checkpoint={"chain": "c"}, fs_id="f")
    follower = Follower(None, None, sb, md, str(tmp_path), next_segment=0, interval=0.01)
    # popped from the end: three full disks, then an error that is something else
    failures = [sqlite3.OperationalError("database is locked"),
                *[sqlite3.OperationalError("database or disk is full")] * 3]
    polls = threading.Semaphore(0)
    stalled_seen = []  # what stats() said at each poll

    def catch_up():
        stalled_seen.append(follower.stats()["stalled"])
        polls.release()
        if failures:
            raise failures.pop()
        return 1  # applied something: no superblock check in this test
    follower.catch_up = catch_up
    try:
        with caplog.at_level(logging.INFO, logger="fusefs.follower"):
            follower.start()
            for _ in range(6):  # four failed polls, then two that apply
                assert polls.acquire(timeout=30)
            follower.close()
    finally:
        md.close()
    said = [r for r in caplog.records if r.name == "fusefs.follower"]
    assert [r.levelname for r in said] == ["WARNING", "ERROR", "INFO"], caplog.text
    assert "disk is full" in said[0].getMessage() and "as of record" in said[0].getMessage()
    assert not said[0].exc_info  # a full disk: one line, no traceback
    assert "unexpected" in said[1].getMessage() and said[1].exc_info  # anything else: as before
    assert "following the writer again" in said[2].getMessage()
    assert stalled_seen[0] is None and "disk is full" in stalled_seen[1]  # while stalled
    assert follower.stats()["stalled"] is None
