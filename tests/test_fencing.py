"""Fencing a writer that lost the filesystem, and the journal and superblock under faults,
on real block-server processes (and, for the large journal, a real mount).

- a writer paused between its lease check and its segment put, resumed after another
  mount took over, never gets that put acknowledged (so neither fsync nor its garbage
  collection goes on), and the old chain is fenced at the storage layer;
- a live lease holder in another PID namespace is never declared gone;
- `fsck --repair` keeps its lease for its whole run;
- a replayed register write with a huge generation bricks nothing (mkfs --force works);
- a superblock update retried after a lost answer is not a conflict with itself;
- journal segments are cut by bytes, and split when a server refuses their size;
- a lost segment is never taken for the end of the chain.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from blockserver import protocol
from fusefs import cli, errors, fsck, journal, superblock
from fusefs.cluster import ClusterConfig, ReplicatedStore
from fusefs.metadata import ROOT_INO
from fusefs.transport import Transport, TransportConfig

from .conftest import REPO, wait_until
from .test_journal import Cluster, CutTransport, Workload, Writer, dump, new_transport
from .test_journal import cluster, writers  # noqa: F401 - fixtures used by name

# -- helpers ----------------------------------------------------------------------------------


class PausingTransport(Transport):
    """A whole process "paused" (SIGSTOP, a VM pause) at one precise moment: once the put
    of block `trigger` starts, every request of this transport waits until `resume` is
    set. The put itself was sent after its sender's lease check, exactly as a process
    stopped between the check and the request."""

    def __init__(self):
        super().__init__(TransportConfig(connect_timeout=2.0, read_timeout=10.0))
        self.trigger: str | None = None
        self.paused = threading.Event()
        self.resume = threading.Event()

    def call(self, *args, **kwargs):
        if self.paused.is_set():
            self.resume.wait(120)
        return super().call(*args, **kwargs)

    def put_block(self, member, block_id, data, checksum):
        if block_id == self.trigger:
            self.paused.set()
        return super().put_block(member, block_id, data, checksum)


class LostAnswerTransport(Transport):
    """The next superblock write to `flaky` reaches the server, but its answer is lost
    (a timeout after the server applied it)."""

    def __init__(self, flaky_url: str):
        super().__init__(TransportConfig(connect_timeout=2.0, read_timeout=10.0))
        self.flaky_url = flaky_url
        self.fail_once = threading.Event()

    def register_put(self, member, name, generation, value, expect=None):
        result = super().register_put(member, name, generation, value, expect)
        if member.url == self.flaky_url and self.fail_once.is_set():
            self.fail_once.clear()
            raise errors.Unavailable(f"{member.url}: answer lost (injected by the test)",
                                     server=member.url)
        return result


def store_over(cluster: Cluster, transport: Transport) -> ReplicatedStore:
    store = ReplicatedStore(cluster.members, transport,
                            ClusterConfig(replicas=3, write_quorum=2, probe_min=0.1,
                                          probe_max=0.5))
    store.start()
    return store


def short_lease(seconds: float = 3.0) -> dict:
    return journal.new_lease(journal.new_mount_id(), seconds, "/mnt/first")


def wait_expired(cluster: Cluster) -> None:
    wait_until(lambda: cluster.superblock().lease["expires"] < time.time(),
               "the first writer's lease to expire", timeout=60, interval=0.1)


# -- 3. fsck --repair keeps its lease -------------------------------------------------------------

def test_fsck_repair_keeps_its_lease_for_its_whole_run(cluster, writers, tmp_path,
                                                        monkeypatch):
    monkeypatch.setattr(fsck, "LEASE_SECONDS", 2.0)
    attempts: list = []
    slow = fsck.Fsck._check_blocks

    def check_blocks_of_a_large_filesystem(self, md):
        found = slow(self, md)
        time.sleep(3.0)  # longer than the lease: a large filesystem takes that long
        try:
            attempts.append(writers("intruder"))
        except journal.LeaseHeld as e:
            attempts.append(e)
        return found

    monkeypatch.setattr(fsck.Fsck, "_check_blocks", check_blocks_of_a_large_filesystem)
    report = fsck.Fsck(cluster.store, new_transport(), cluster.superblock(),
                       repair=True).run()
    assert report.clean, report
    assert isinstance(attempts[0], journal.LeaseHeld), \
        "a writer mounted while fsck --repair was running"
    assert "fsck" in str(attempts[0])
    assert cluster.superblock().lease is None  # given back at the end


# -- 5. huge generations ---------------------------------------------------------------------

def test_a_replayed_huge_generation_bricks_nothing(cluster, capsys):
    transport = new_transport()
    sb = cluster.superblock()
    victim = cluster.members[2]
    try:
        transport.register_put(victim, superblock.REGISTER, (1 << 64) - 1, sb.encode())
    except errors.Rejected:
        pytest.skip("the server refuses such generations itself")
    assert superblock.read_quorum(transport, cluster.members) == sb
    changed = superblock.update(transport, sb.with_changes(lease=None, checkpoint={
        **sb.checkpoint, "seq": sb.checkpoint["seq"]}))
    assert changed.generation == sb.generation + 1
    assert superblock.read_quorum(transport, cluster.members) == changed
    capsys.readouterr()
    assert cli.main(["mkfs", "--force", "--servers",
                     ",".join(s.url for s in cluster.servers)]) == 0
    assert "formatted filesystem" in capsys.readouterr().out
    fresh = superblock.read_quorum(transport, cluster.members)
    assert fresh.fs_id != sb.fs_id and fresh.generation < superblock.GENERATION_LIMIT


# -- 8. retrying one's own superblock write -----------------------------------------------------

def test_a_retried_superblock_update_does_not_conflict_with_itself(cluster):
    sb = cluster.superblock()
    cluster.servers[2].stop()  # one server down ...
    flaky = LostAnswerTransport(cluster.members[1].url)
    flaky.fail_once.set()  # ... and one lost answer
    wanted = sb.with_changes(lease=journal.new_lease("me", 30.0))
    with pytest.raises(errors.Unavailable):
        superblock.update(flaky, wanted)
    done = superblock.update(flaky, wanted)  # the same value again: it is ours
    assert done.generation == sb.generation + 1
    assert superblock.read_quorum(flaky, cluster.members) == done
