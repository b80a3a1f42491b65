"""Fencing a writer that lost the filesystem, and the journal and superblock under faults,
on real block-server processes (and, for the large journal, a real mount).

- a writer paused between its lease check and its segment put, resumed after another
  mount took over, never gets that put acknowledged (so neither fsync nor its garbage
  collection goes on), and the old chain is fenced at the storage layer;
- a change refused because the lease was lost finds the reason already in the log;
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
import logging
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from blockserver import protocol
from fusefs import cli, errors, fsck, superblock
from fusefs.host import new_mount_id
from fusefs.lease import acquire, holder_gone, new_lease
from fusefs.loading import open_metadata
from fusefs.segments import encode_segment, fence_chain, segment_id
from fusefs.cluster import ClusterConfig, ReplicatedStore
from fusefs.metadata import ROOT_INO
from fusefs.transport import Transport, TransportConfig

from .journal_workload import Workload, dump
from .support import REPO, members_of, wait_until
from .test_journal import Cluster, CutTransport, Writer, new_transport
from .test_journal import cluster, writers  # fixtures, used by name

FIXTURES = (cluster, writers)  # (imported for pytest to find; named here for linters)

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

    def put_block(self, member, block_id, data, checksum, metadata=False):
        if block_id == self.trigger:
            self.paused.set()
        return super().put_block(member, block_id, data, checksum, metadata)


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


def poison_on_disk(server, generation: int, value: bytes) -> None:
    """Write a server's superblock register file as a replayed request once could (the
    server refuses such generations on the wire now): header, generation, value."""
    from blockserver import store
    path = os.path.join(server.data_dir, "registers", superblock.REGISTER)
    with open(path, "wb") as f:
        f.write(store._REGISTER_HEADER.pack(store._REGISTER_MAGIC, generation) + value)


def short_lease(seconds: float = 3.0) -> dict:
    return new_lease(new_mount_id(), seconds, "/mnt/first")


def wait_expired(cluster: Cluster) -> None:
    wait_until(lambda: cluster.superblock().lease["expires"] < time.time(),
               "the first writer's lease to expire", timeout=60, interval=0.1)


# -- 1. a paused writer after a takeover --------------------------------------------------------

def test_a_writer_paused_before_its_put_is_not_acknowledged_after_a_takeover(
        cluster, writers, tmp_path):
    pausing = PausingTransport()
    a_store = store_over(cluster, pausing)
    made: list = []
    try:
        a_view = copy.copy(cluster)
        a_view.store = a_store  # the first mount: its own store over the pausing transport
        a = Writer(a_view, str(tmp_path / "a"), made, transport=pausing,
                   lease=short_lease())
        a.metadata.create(ROOT_INO, b"v1", stat.S_IFREG | 0o644, 0, 0)
        a.journal.wait_durable(timeout=60)

        pausing.trigger = segment_id(cluster.fs_id, a.journal.chain,
                                             a.journal.stats()["segment"])
        a.metadata.create(ROOT_INO, b"fsynced after the takeover", stat.S_IFREG | 0o644,
                          0, 0)
        outcome: list = []

        def fsync():
            try:
                a.journal.wait_durable(timeout=120)
                outcome.append("acknowledged")
            except errors.StorageError as e:
                outcome.append(e)

        waiter = threading.Thread(target=fsync)
        waiter.start()
        assert pausing.paused.wait(60), "A's segment put never started"

        wait_expired(cluster)  # A is "stopped": it renews nothing
        b = writers("b")
        assert b.metadata.lookup(ROOT_INO, b"v1") is not None
        pausing.resume.set()
        waiter.join(120)
        assert outcome and outcome[0] != "acknowledged", \
            "an fsync was acknowledged after another mount took the filesystem over"
        # GC's `durable` is the same wait: it fails too, so nothing is deleted
        with pytest.raises(errors.StorageError):
            a.journal.wait_durable(timeout=60)
        wait_until(lambda: a.journal.lost, "A to know it is fenced", timeout=60)
        assert cluster.superblock().lease == b.lease
        state, _, _ = cluster.load_elsewhere(tmp_path / "c")
        assert state == dump(b.metadata)
    finally:
        pausing.resume.set()
        for w in made:
            w.close()
        a_store.close()


def test_a_takeover_fences_the_old_chain_at_the_storage_layer(cluster, writers, tmp_path):
    cut = CutTransport()
    a = writers("a", transport=cut, lease=short_lease())
    Workload(a.metadata, seed=3).run(10)
    a.journal.wait_durable(timeout=60)
    nxt = a.journal.stats()["segment"]
    cut.cut.set()  # A can renew nothing: its lease runs out
    wait_expired(cluster)
    b = writers("b")
    assert cluster.superblock().checkpoint["chain"] == b.journal.chain

    # A's late segment (what its ship thread would put when it resumes) reaches no W
    late = encode_segment(cluster.fs_id, a.journal.chain, nxt,
                                  [b'[999999, "noop", []]'])
    with pytest.raises(errors.StorageError):
        cluster.store.put(segment_id(cluster.fs_id, a.journal.chain, nxt), late,
                          protocol.checksum(late))


def test_a_change_refused_for_a_lost_lease_finds_the_reason_already_logged(cluster, writers,
                                                                           caplog):
    """A change waiting on a lapsed lease is refused (Fenced: EROFS) once the renewal finds
    the filesystem taken over; by then the log must already say why, at ERROR: someone
    who sees EROFS and reads the log finds the reason, never a log that says it later."""
    cut = CutTransport()
    a = writers("a", transport=cut, lease=short_lease())
    cut.cut.set()  # A can renew nothing: its lease runs out
    wait_expired(cluster)
    writers("b")
    caplog.set_level(logging.ERROR, logger="fusefs.lease")
    logged_when_refused: list = []  # True/False once refused; what else it raised, if so

    def change():
        try:
            a.gate.check_writable()  # lapsed: waits for the renewal to tell
        except errors.Fenced:
            logged_when_refused.append(any("lost its writer lease" in r.getMessage()
                                           for r in caplog.records))
        except Exception as e:  # noqa: BLE001 - shown by the assertion below
            logged_when_refused.append(repr(e))

    # A slow first listener of the loss: whatever its other listeners (the journal) would
    # log comes half a second after the refusal, so only a log made before it counts.
    a.gate._listeners.insert(0, lambda lost: time.sleep(0.5) if lost else None)
    waiter = threading.Thread(target=change)
    waiter.start()
    cut.cut.clear()  # A's next renewal reaches the servers and finds B's lease
    waiter.join(60)
    assert logged_when_refused == [True], logged_when_refused
    assert a.gate.lost and "lost its writer lease" in a.gate.lost


def test_a_segment_stored_after_the_new_writer_looked_is_replayed_not_lost(
        cluster, writers, tmp_path):
    """The old writer's put lands between the new writer's read of the chain and its
    fencing: the fence finds the segment and replays it instead."""
    cut = CutTransport()
    a = writers("a", transport=cut, lease=short_lease())
    a.metadata.create(ROOT_INO, b"shipped", stat.S_IFREG | 0o644, 0, 0)
    a.journal.wait_durable(timeout=60)
    cut.cut.set()
    wait_expired(cluster)
    sb = acquire(new_transport(), cluster.superblock(),
                         new_lease(new_mount_id(), 30.0))
    os.makedirs(tmp_path / "b")
    md, replayed, end = open_metadata(cluster.store, sb, str(tmp_path / "b" / "m.db"))
    try:
        # now A's ship thread stores its next segment, on every server
        a.metadata.create(ROOT_INO, b"late but durable", stat.S_IFREG | 0o644, 0, 0)
        rows = a.metadata.unshipped(a.journal.stats()["shipped"])
        data = encode_segment(cluster.fs_id, a.journal.chain, end,
                                      [r for _, r in rows])
        for member in cluster.members:
            cluster.transport.put_block(member, segment_id(
                cluster.fs_id, a.journal.chain, end), data, protocol.checksum(data))
        late, fenced_at = fence_chain(cluster.store, cluster.transport, md,
                                              cluster.fs_id, a.journal.chain, end)
        assert (late, fenced_at) == (len(rows), end + 1)
        assert md.lookup(ROOT_INO, b"late but durable") is not None
    finally:
        md.close()


# -- 2. PID namespaces --------------------------------------------------------------------------

def test_a_live_holder_in_another_pid_namespace_is_not_declared_gone(cluster):
    if os.geteuid() != 0:
        pytest.skip("unshare --pid needs root")
    mine = new_lease(new_mount_id(), 30.0, "/mnt/live")  # this process
    sb = superblock.update(new_transport(), cluster.superblock().with_changes(lease=mine))
    script = ("import json, sys; from fusefs import superblock;"
              "from fusefs.lease import holder_gone, refusal;"
              "lease = json.loads(sys.argv[1]);"
              "print(holder_gone(lease), refusal("
              "superblock.Superblock.decode(sys.argv[2].encode(), 5), 'other') is not None)")
    result = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                             "-c", script, json.dumps(mine), sb.encode().decode()],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "unshare" in result.stderr:
        pytest.skip(f"cannot make a PID namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"], result.stdout


def test_a_holder_is_gone_only_when_its_very_process_ended():
    lease = new_lease("m", 30.0)
    assert not holder_gone(lease)  # this process: alive
    reused = {**lease, "start": lease["start"] + 1}  # the pid now names another process
    assert holder_gone(reused)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert holder_gone({**lease, "pid": ended.pid})
    older = {k: v for k, v in lease.items() if k not in ("pidns", "start")}
    assert not holder_gone({**older, "pid": ended.pid})  # cannot tell: not gone


# -- 3. fsck --repair keeps its lease -------------------------------------------------------------

def test_fsck_repair_keeps_its_lease_for_its_whole_run(cluster, writers, tmp_path,
                                                        monkeypatch):
    monkeypatch.setattr(fsck, "LEASE_SECONDS", 2.0)
    attempts: list = []
    slow = fsck.Fsck._check_blocks

    def check_blocks_of_a_large_filesystem(self, md, *args):
        found = slow(self, md, *args)
        time.sleep(3.0)  # longer than the lease: a large filesystem takes that long
        try:
            attempts.append(writers("intruder"))
        except errors.LeaseHeld as e:
            attempts.append(e)
        return found

    monkeypatch.setattr(fsck.Fsck, "_check_blocks", check_blocks_of_a_large_filesystem)
    report = fsck.Fsck(cluster.store, new_transport(), cluster.superblock(),
                       repair=True).run()
    assert report.clean, report
    assert isinstance(attempts[0], errors.LeaseHeld), \
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
    except errors.Rejected:  # a server that refuses them now may hold one from before
        poison_on_disk(cluster.servers[2], (1 << 64) - 1, sb.encode())
    assert transport.register_get(victim, superblock.REGISTER)[0] == (1 << 64) - 1
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
    wanted = sb.with_changes(lease=new_lease("me", 30.0))
    with pytest.raises(errors.Unavailable):
        superblock.update(flaky, wanted)
    done = superblock.update(flaky, wanted)  # the same value again: it is ours
    assert done.generation == sb.generation + 1
    assert superblock.read_quorum(flaky, cluster.members) == done


def test_a_writer_survives_one_server_down_and_one_lost_answer(cluster, writers):
    cluster.servers[2].stop()
    flaky = LostAnswerTransport(cluster.members[1].url)
    a = writers("a", transport=flaky, lease=short_lease())
    start = cluster.superblock().generation
    flaky.fail_once.set()  # the next renewal's answer from server 1 is lost
    wait_until(lambda: not flaky.fail_once.is_set(), "the injected failure", timeout=60)
    wait_until(lambda: a.journal.lost or cluster.superblock().generation >= start + 3,
               "three more renewals", timeout=60, interval=0.1)
    assert a.journal.lost is None
    a.metadata.create(ROOT_INO, b"still writable", stat.S_IFREG | 0o644, 0, 0)
    a.journal.wait_durable(timeout=60)


# -- 9. segments by bytes -------------------------------------------------------------------------

def test_a_segment_larger_than_a_server_takes_is_split(blockservers, make_cluster, writers,
                                                        tmp_path, capsys):
    servers = blockservers(3, args=["--max-block-size", "256KiB"])
    assert cli.main(["mkfs", "--servers", ",".join(s.url for s in servers)]) == 0
    small = Cluster(servers, make_cluster(servers))
    made: list = []
    try:
        w = Writer(small, str(tmp_path / "w"), made)
        ino = w.metadata.create(ROOT_INO, b"big", stat.S_IFREG | 0o644, 0, 0).ino
        for i in range(40):  # 40 x 64 KiB of xattrs: far more than 256 KiB
            w.metadata.set_xattr(ino, b"user.x%d" % i, os.urandom(65536))
        w.journal.wait_durable(timeout=60)
        state, _, _ = small.load_elsewhere(tmp_path / "elsewhere")
        assert state == dump(w.metadata)
    finally:
        for w in made:
            w.close()


def test_many_large_xattrs_through_a_mount_fsync_and_unmount(fusefs_mount):
    m = fusefs_mount(3)
    value = os.urandom(65536)
    for i in range(400):
        path = os.path.join(m.path, f"f{i}")
        with open(path, "wb"):
            pass
        os.setxattr(path, "user.big", value)
    fd = os.open(os.path.join(m.path, "f399"), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    m.cli("umount", m.path, timeout=120)
    assert not m.mounted
    m.mount("--read-only", cache_dir=m.cache_dir + "-fresh")
    assert os.getxattr(os.path.join(m.path, "f399"), "user.big") == value
    assert len(os.listdir(m.path)) == 400


# -- 12. a lost segment is not the end -----------------------------------------------------------

def test_a_lost_segment_is_never_taken_for_the_end_of_the_chain(cluster, writers, tmp_path):
    w = writers("w")
    for seed in range(3):
        Workload(w.metadata, seed=seed).run(5)
        w.journal.wait_durable(timeout=60)
    assert w.journal.stats()["segment"] >= 4
    lost = segment_id(cluster.fs_id, w.journal.chain, 2)
    for member in cluster.members:  # every copy of segment 2 is gone; 3 is still there
        cluster.transport.delete_block(member, lost)
    with pytest.raises(errors.StorageError, match="segment 2"):
        cluster.load_elsewhere(tmp_path / "elsewhere")


# -- the lease check after each segment does not wait for a stalled server ------------------

def test_a_paused_server_does_not_hold_up_shipping(blockservers, make_cluster, tmp_path,
                                                   capsys):
    """The quorum read that confirms the lease after a segment put returns once a
    majority answered: a server that never answers (SIGSTOP) is not waited for."""
    servers = blockservers(3)
    assert cli.main(["mkfs", "--servers", ",".join(s.url for s in servers)]) == 0
    slow = Cluster(servers, make_cluster(servers, read_timeout=300))
    patient = Transport(TransportConfig(connect_timeout=2.0, read_timeout=300))
    made: list = []
    try:
        w = Writer(slow, str(tmp_path / "w"), made, transport=patient)
        servers[2].pause()
        w.metadata.create(ROOT_INO, b"with a server paused", stat.S_IFREG | 0o644, 0, 0)
        w.journal.wait_durable(timeout=120)  # far less than the paused server's timeout
    finally:
        servers[2].resume()
        for w in made:
            w.close()


def test_a_mount_from_another_pid_namespace_is_refused_while_the_writer_lives(
        fusefs_mount, tmp_path):
    """A real writer mount; a second `fusefs mount` on the same host (same hostname and
    boot id) but in its own PID namespace, as in a container, where the writer's pid
    does not exist. It must be refused, not take the live writer's lease."""
    if os.geteuid() != 0:
        pytest.skip("unshare --pid needs root")
    m = fusefs_mount(3)
    with open(os.path.join(m.path, "before"), "wb") as f:
        f.write(b"written by the first writer")
        os.fsync(f.fileno())
    other = tmp_path / "other-mnt"
    other.mkdir()
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "fusefs",
         "mount", *m.cluster_args(), "--cache-dir", str(tmp_path / "other-cache"),
         str(other)], cwd=REPO, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "unshare:" in result.stderr:
        pytest.skip(f"cannot make a PID namespace here: {result.stderr.strip()}")
    assert result.returncode != 0, "a second writer mounted from another PID namespace"
    assert "mounted read-write by" in result.stderr, result.stderr
    lease = superblock.read_quorum(new_transport(), members_of(m.servers)).lease
    assert lease["pid"] == m.daemon_pid()
    with open(os.path.join(m.path, "after"), "wb") as f:  # still the writer
        f.write(b"still writable")
        os.fsync(f.fileno())


def test_a_writer_whose_journal_fails_to_start_gives_its_lease_back(blockservers, make_cluster,
                                                                    tmp_path, monkeypatch):
    """The journal's start changes the superblock (its new checkpoint) before it can still
    fail; the lease must be given back from that newest superblock, or the next mount is
    refused until the lease expires."""
    from types import SimpleNamespace

    from fusefs import daemon, journal

    servers = blockservers(3)
    assert cli.main(["mkfs", "--servers", ",".join(s.url for s in servers)]) == 0
    transport = new_transport()
    store = make_cluster(servers)
    config = SimpleNamespace(lease_seconds=30.0, mountpoint=str(tmp_path / "mnt"),
                             state_dir=str(tmp_path), journal=True, ship_delay=0.05,
                             checkpoint_records=1000)
    sb = superblock.read_quorum(transport, members_of(servers))
    lease = daemon._take_lease(config, transport, sb)

    def failing_start(self, *args, **kwargs):
        lease.update(checkpoint=dict(lease.superblock.checkpoint))  # as start does first
        raise errors.Unavailable("planted: the journal could not start")

    monkeypatch.setattr(journal.Journal, "start", failing_start)
    with pytest.raises(errors.Unavailable, match="planted"):
        daemon._become_writer(config, transport, store, lease, unclean=False)
    assert superblock.read_quorum(transport, members_of(servers)).lease is None
