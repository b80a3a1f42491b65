"""The metadata journal without FUSE on real block-server processes: finding blocks whose
checksum is not known in advance, the superblock's compare-and-swap, and a writer's journal
(shipping, checkpoints, the lease, fencing). Records, their replay and segments, which need
no server, are in test_journal_records.py.

Nothing here mounts anything: a "machine" is a directory with its own metadata database,
and a "mount" is a `journal.Journal` over a `ReplicatedStore`.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from blockserver import protocol
from fusefs import cli, errors, journal, membership, superblock
from fusefs.checkpoint import checkpoint_blocks
from fusefs.host import new_mount_id
from fusefs.lease import Lease, acquire, new_lease
from fusefs.loading import open_metadata
from fusefs.metadata import ROOT_INO
from fusefs.segments import read_segment, segment_id
from fusefs.transport import Member, Transport, TransportConfig

from .journal_workload import Workload, dump, records_of
from .support import members_of, wait_until

# Names other test modules import from here (test_metadata: dump, records_of).
__all__ = ["dump", "records_of"]


# -- helpers ----------------------------------------------------------------------------------

def new_transport() -> Transport:
    return Transport(TransportConfig(connect_timeout=2.0, read_timeout=10.0))


def unreachable(member: Member) -> Member:
    """The same server id at a loopback port where nothing listens (a server that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Member(member.id, f"http://127.0.0.1:{port}")


def assert_on_every_server(transport: Transport, members, sb: superblock.Superblock) -> None:
    """Every server holds exactly `sb`, so a majority read finds it with any one down."""
    for member in members:
        assert transport.register_get(member, superblock.REGISTER) == (sb.generation,
                                                                       sb.encode())
    for down in range(len(members)):
        view = [unreachable(m) if i == down else m for i, m in enumerate(members)]
        assert superblock.read_quorum(transport, view) == sb


def formatted(transport: Transport, members) -> superblock.Superblock:
    """A superblock (no checkpoint, no lease) written as generation 1 on every member."""
    return superblock.write_all(transport, superblock.new(members, 1 << 20, 3, 2), 1)


def blocks_on(transport: Transport, member: Member) -> set[str]:
    ids, after = set(), ""
    while True:
        page, after = transport.list_blocks(member, after)
        ids.update(b["id"] for b in page)
        if not after:
            return ids


# -- 4. ReplicatedStore.find ------------------------------------------------------------------

def test_find_returns_a_verified_copy_none_when_absent_and_never_guesses(blockservers,
                                                                         make_cluster):
    servers = blockservers(3)
    store = make_cluster(servers)
    members, transport = store.members, store.transport
    good, bad = b"the bytes verify accepts", b"other bytes under the same id"

    def good_everywhere(block_id: str) -> bool:
        try:
            return all(transport.get_block(m, block_id) == good for m in members)
        except errors.BlockMissing:
            return False

    # two servers hold a copy that fails verification, one holds the good one
    mixed = protocol.new_block_id()
    for member, data in zip(members, (bad, bad, good)):
        transport.put_block(member, mixed, data, protocol.checksum(data))
    for _ in range(5):
        seen = []
        assert store.find(mixed, lambda data: seen.append(data) or data == good) == good
        assert good in seen and set(seen) <= {good, bad}

    # Read repair replaced the bad copies in the background, each by a delete then a put:
    # while one is in flight its server says "missing", and two of those would rightly
    # make the block look absent below. Once it is done, every server holds the good copy.
    wait_until(lambda: good_everywhere(mixed), "read repair of the two bad copies")
    with pytest.raises(errors.Unavailable):  # copies exist, none is acceptable
        store.find(mixed, lambda data: False)

    stored = protocol.new_block_id()
    store.put(stored, good, protocol.checksum(good))
    wait_until(lambda: good_everywhere(stored), "the third copy")
    assert store.find(stored, lambda data: data == good) == good

    absent = protocol.new_block_id()
    asked = []
    assert store.find(absent, asked.append) is None
    assert asked == []  # nothing to verify

    servers[2].stop()
    assert store.find(absent, asked.append) is None  # two servers say absent: W=2 cannot be
    assert store.find(stored, lambda data: data == good) == good

    servers[1].stop()
    with pytest.raises(errors.Unavailable):  # one "absent" cannot rule out a W=2 block
        store.find(absent, asked.append)
    assert store.find(stored, lambda data: data == good) == good  # but a copy is a copy


# -- 5. the superblock ------------------------------------------------------------------------

def test_read_quorum_takes_the_newest_of_a_majority_and_update_catches_servers_up(
        blockservers):
    servers = blockservers(3)
    members = members_of(servers)
    transport = new_transport()
    sb1 = formatted(transport, members)

    servers[2].stop()  # misses the next update
    sb2 = superblock.update(transport, sb1.with_changes(lease={"mount": "m", "n": 2}))
    assert sb2.generation == 2
    servers[2].start()
    assert transport.register_get(members[2], superblock.REGISTER) == (1, sb1.encode())

    servers[0].stop()  # what is left: one server at generation 2, one at generation 1
    assert superblock.read_quorum(transport, members) == sb2
    servers[1].stop()
    with pytest.raises(errors.Unavailable):
        superblock.read_quorum(transport, members)
    servers[0].start()
    servers[1].start()

    sb3 = superblock.update(transport, sb2.with_changes(lease={"mount": "m", "n": 3}))
    assert sb3.generation == 3
    assert_on_every_server(transport, members, sb3)  # the one that missed 2 caught up


def test_update_is_a_compare_and_swap_with_exactly_one_winner(blockservers):
    servers = blockservers(3)
    members = members_of(servers)
    transport = new_transport()
    sb1 = formatted(transport, members)

    first = superblock.update(transport, sb1.with_changes(lease={"mount": "first"}))
    assert first.generation == 2
    with pytest.raises(errors.Conflict):
        superblock.update(transport, sb1.with_changes(lease={"mount": "second"}))
    assert superblock.read_quorum(transport, members) == first
    for member in members:
        assert transport.register_get(member, superblock.REGISTER) == (2, first.encode())

    base = first
    for round_ in range(6):  # two writers from the same generation at the same moment
        barrier = threading.Barrier(2, timeout=30)
        results: dict[str, object] = {}

        def race(name, base=base, barrier=barrier, results=results, round_=round_):
            barrier.wait()
            try:
                results[name] = superblock.update(
                    transport, base.with_changes(lease={"mount": f"{name}-{round_}"}))
            except errors.StorageError as e:
                results[name] = e

        threads = [threading.Thread(target=race, args=(n,)) for n in ("x", "y")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        winners = [r for r in results.values() if isinstance(r, superblock.Superblock)]
        losers = [r for r in results.values() if isinstance(r, errors.Conflict)]
        assert (len(winners), len(losers)) == (1, 1), results
        winner = winners[0]
        assert winner.generation > base.generation
        assert superblock.read_quorum(transport, members) == winner
        for member in members:  # the loser's value is left nowhere
            assert transport.register_get(member, superblock.REGISTER) == (
                winner.generation, winner.encode())
        base = winner


def test_a_losers_value_at_the_winning_generation_is_never_read(blockservers):
    servers = blockservers(3)
    members = members_of(servers)
    transport = new_transport()
    base = formatted(transport, members)

    # The servers as a race leaves them: the winner's value on two, the loser's on one, at
    # the same generation. Several rounds, so the loser sits on each server and neither
    # value can win by how it happens to hash.
    for generation in range(2, 10):
        winner = base.with_changes(lease={"mount": f"winner-{generation}"})
        loser = base.with_changes(lease={"mount": f"loser-{generation}"})
        loser_at = generation % 3
        for i, member in enumerate(members):
            value = loser if i == loser_at else winner
            transport.register_put(member, superblock.REGISTER, generation, value.encode(),
                                   expect=generation - 1)
        assert superblock.read_quorum(transport, members) == winner.with_changes(
            generation=generation)
        base = winner.with_changes(generation=generation)

    # The loser got to one server first; the winner's update finds it there, and writes
    # once more so that no majority of servers can show the loser's value.
    loser = base.with_changes(lease={"mount": "late loser"})
    transport.register_put(members[1], superblock.REGISTER, base.generation + 1,
                           loser.encode(), expect=base.generation)
    won = superblock.update(transport, base.with_changes(lease={"mount": "late winner"}))
    assert won.generation == base.generation + 2
    assert_on_every_server(transport, members, won)


def test_a_lone_writer_is_not_refused_during_a_rolling_restart(blockservers):
    servers = blockservers(3)
    members = members_of(servers)
    transport = new_transport()
    sb = formatted(transport, members)

    servers[2].stop()
    sb = superblock.update(transport, sb.with_changes(lease={"mount": "only", "n": 1}))
    servers[2].start()  # back, still at generation 1
    servers[1].stop()  # the next server of the rolling restart

    outcomes = []
    for n in range(2, 6):  # retry what cannot be known, as the journal's lease renewal does
        try:
            sb = superblock.update(transport, sb.with_changes(lease={"mount": "only", "n": n}))
        except errors.Conflict:
            outcomes.append("conflict")
            break
        except errors.Unavailable:
            outcomes.append("unavailable")
            continue
        outcomes.append("ok")
        break
    assert outcomes and outcomes[-1] == "ok", outcomes  # no one else ever wrote
    assert superblock.read_quorum(transport, members) == sb


# -- 6. a writer's journal end to end ---------------------------------------------------------

class Cluster:
    def __init__(self, servers, store):
        self.servers, self.store = servers, store
        self.members = store.members
        self.transport = new_transport()
        self.fs_id = self.superblock().fs_id

    def superblock(self) -> superblock.Superblock:
        return superblock.read_quorum(self.transport, self.members)

    def on_servers(self) -> set[str]:
        return set().union(*(blocks_on(self.transport, m) for m in self.members))

    def load_elsewhere(self, path) -> tuple[dict, int, int]:
        """What a new mount on another machine loads: (tables, records replayed, the
        next segment of the chain)."""
        os.makedirs(path)
        md, applied, end = open_metadata(self.store, self.superblock(),
                                                 os.path.join(path, "metadata.db"))
        try:
            return dump(md), applied, end
        finally:
            md.close()


class _ReadCutTransport(Transport):
    """A transport whose superblock reads can be made to fail."""

    def __init__(self):
        super().__init__(TransportConfig(connect_timeout=2.0, read_timeout=10.0))
        self.cut_reads = threading.Event()

    def register_get(self, member, name):
        if self.cut_reads.is_set():
            raise errors.Unavailable(f"{member.url}: reads cut off by the test",
                                     server=member.url)
        return super().register_get(member, name)


def test_a_lease_rebases_over_a_membership_change_but_a_takeover_still_fences(blockservers):
    """`fusefs servers` changes the superblock under a running writer: its next renewal
    meets a conflict, finds its lease and checkpoint untouched, and writes again over the
    new membership. A conflict it cannot read back decides nothing (Unavailable, not
    Fenced); a takeover still fences."""
    members = members_of(blockservers(4))
    transport, other = _ReadCutTransport(), new_transport()
    lease = Lease.take(transport, formatted(transport, members[:3]),
                       new_lease(new_mount_id(), 30.0))
    changed = membership.change(other, lease.superblock, membership.adding(members[3]))
    transport.cut_reads.set()
    with pytest.raises(errors.Unavailable):
        lease.renew()
    assert lease.lost is None
    transport.cut_reads.clear()
    lease.renew()
    assert lease.lost is None
    assert lease.superblock.members == changed.members == tuple(members)
    current = superblock.read_quorum(other, members)
    assert current.lease["mount"] == lease.mount and current.generation > changed.generation
    superblock.update(other, current.with_changes(lease=new_lease(new_mount_id(), 30.0)))
    with pytest.raises(errors.Fenced):
        lease.renew()
    assert lease.lost


class CutTransport(Transport):
    """A transport whose superblock writes can be cut off: a writer cut from the servers
    while its process keeps running. A write already under way when the cut comes still
    reaches every server (its generation was let through), so the cut never leaves the
    servers half-updated."""

    def __init__(self):
        super().__init__(TransportConfig(connect_timeout=2.0, read_timeout=10.0))
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._let_through: set[int] = set()

    def register_put(self, member, name, generation, value, expect=None):
        with self._lock:
            if not self.cut.is_set():
                self._let_through.add(generation)
            elif generation not in self._let_through:
                raise errors.Unavailable(f"{member.url}: cut off by the test",
                                         server=member.url)
        return super().register_put(member, name, generation, value, expect)


class Writer:
    """One read-write mount without FUSE: its lease, metadata database and journal."""

    def __init__(self, cluster: Cluster, work_dir, registry: list, *, lease=None,
                 transport=None, **options):
        registry.append(self)  # closed at teardown whatever happens below
        self.journal = self.metadata = None
        self.transport = transport or new_transport()
        self.lease = lease or new_lease(new_mount_id(), 30.0)
        self.db_path = os.path.join(work_dir, "metadata.db")
        os.makedirs(work_dir)
        # the gate a mount's filesystem asks before each change
        self.gate = Lease.take(self.transport, cluster.superblock(), self.lease)
        self.metadata, self.replayed, end = open_metadata(cluster.store, self.gate.superblock,
                                                          self.db_path)
        self.journal = journal.Journal(cluster.store, self.transport, self.gate, self.metadata,
                                       work_dir, ship_delay=0.05, **options)
        self.journal.start(self.replayed, end)

    def segments(self, cluster: Cluster, first: int = 1) -> list[str]:
        """The ids of this writer's shipped segments."""
        return [segment_id(cluster.fs_id, self.journal.chain, n)
                for n in range(first, self.journal.stats()["segment"])]

    def close(self, **options) -> None:
        if isinstance(self.transport, CutTransport):
            self.transport.cut.clear()
        if self.journal is not None:
            self.journal.close(**options)
        if self.metadata is not None:
            self.metadata.close()
            self.metadata = None


@pytest.fixture
def cluster(blockservers, make_cluster, capsys) -> Cluster:
    """Three block servers, formatted by `fusefs mkfs`, and a ReplicatedStore over them."""
    servers = blockservers(3)
    assert cli.main(["mkfs", "--servers", ",".join(s.url for s in servers)]) == 0
    assert "formatted filesystem" in capsys.readouterr().out
    return Cluster(servers, make_cluster(servers))


@pytest.fixture
def writers(cluster, tmp_path):
    """Factory: `writers(name, **options)` -> a started Writer; all closed at teardown."""
    made: list[Writer] = []
    try:
        yield lambda name, **options: Writer(cluster, str(tmp_path / name), made, **options)
    finally:
        for writer in reversed(made):
            writer.close()


def test_shipped_changes_are_what_another_machine_loads(cluster, writers, tmp_path):
    sb = cluster.superblock()
    assert sb.checkpoint["chain"] == "mkfs" and sb.lease is None
    mkfs_blocks = checkpoint_blocks(cluster.store, sb.checkpoint)

    first = writers("machine1")
    md = first.metadata
    sb = cluster.superblock()
    assert sb.lease == first.lease
    assert (sb.checkpoint["chain"], sb.checkpoint["segment"]) == (first.journal.chain, 1)

    workload = Workload(md, seed=5)
    for _ in range(4):
        workload.run(25)
        first.journal.wait_durable(timeout=60)
    assert first.journal.stats()["shipped"] == md.seq
    assert md.unshipped(0) == []  # what is on the cluster is dropped locally
    segments = first.segments(cluster)
    assert len(segments) >= 4
    assert all(cluster.store.has_many(segments).values())

    state, applied, end = cluster.load_elsewhere(tmp_path / "machine2")
    assert state == dump(md)
    assert applied == md.seq - sb.checkpoint["seq"]
    assert end == len(segments) + 1
    shipped = applied
    final = dump(md)

    first.close()  # a clean unmount gives the lease up
    assert cluster.superblock().lease is None

    # the same machine mounting again brings its own database up to date: no download
    progress = []
    again, applied, _ = open_metadata(cluster.store, cluster.superblock(),
                                              first.db_path, progress.append)
    try:
        assert progress == [] and applied == 0
        assert dump(again) == final
    finally:
        again.close()

    # another machine becomes the writer: its own chain, and the old one is deleted
    second = writers("machine3")
    assert second.replayed == shipped > 0
    assert dump(second.metadata) == final
    sb = cluster.superblock()
    assert sb.lease == second.lease
    assert (sb.checkpoint["chain"], sb.checkpoint["segment"]) == (second.journal.chain, 1)
    assert not any(cluster.store.has_many(segments + mkfs_blocks).values())
    assert not (set(segments) | set(mkfs_blocks)) & cluster.on_servers()

    Workload(second.metadata, seed=6).run(30)
    second.journal.wait_durable(timeout=60)
    state, _, _ = cluster.load_elsewhere(tmp_path / "machine4")
    assert state == dump(second.metadata)


def test_a_close_during_a_close_returns_only_once_everything_is_shipped(cluster, writers):
    """A mount's stop and its session's end may both close the journal, at once. The
    second close must not return while the first still ships (the daemon then closed the
    metadata under it): with two of three servers paused, nothing ships until they
    resume, and neither close returns before."""
    writer = writers("machine1")
    md = writer.metadata
    Workload(md, seed=21).run(30)
    paused = cluster.servers[:2]
    closers, returned = [], []
    try:
        for server in paused:
            server.pause()
        for name in ("signal", "session end"):
            t = threading.Thread(target=lambda n=name: (writer.journal.close(),
                                                         returned.append(n)))
            t.start()
            closers.append(t)
        for t in closers:
            t.join(0.5)  # long enough for a close that does not wait to return
        assert returned == [], f"{returned} returned with records unshipped"
    finally:
        for server in paused:
            server.resume()
    for t in closers:
        t.join(60)
    assert sorted(returned) == ["session end", "signal"]
    assert writer.journal.stats()["shipped"] == md.seq
    assert cluster.superblock().lease is None  # given back once, by the first close


def test_a_checkpoint_is_named_by_the_superblock_and_replaces_old_blocks(cluster, writers,
                                                                         tmp_path):
    writer = writers("machine1")
    md = writer.metadata
    workload = Workload(md, seed=8)
    for _ in range(3):
        workload.run(20)
        writer.journal.wait_durable(timeout=60)

    old_cp = cluster.superblock().checkpoint
    old_blocks = checkpoint_blocks(cluster.store, old_cp)
    old_segments = writer.segments(cluster)
    assert old_segments and all(cluster.store.has_many(old_blocks + old_segments).values())
    next_segment = writer.journal.stats()["segment"]

    cp = writer.journal.checkpoint()
    assert cluster.superblock().checkpoint == cp
    assert (cp["chain"], cp["segment"], cp["seq"]) == (writer.journal.chain, next_segment,
                                                       md.seq)
    new_blocks = checkpoint_blocks(cluster.store, cp)
    assert all(cluster.store.has_many(new_blocks).values())
    assert not any(cluster.store.has_many(old_blocks + old_segments).values())
    assert not (set(old_blocks) | set(old_segments)) & cluster.on_servers()

    state, applied, end = cluster.load_elsewhere(tmp_path / "machine2")
    assert (state, applied, end) == (dump(md), 0, next_segment)

    workload.run(30)  # the chain goes on after the checkpoint
    writer.journal.wait_durable(timeout=60)
    state, applied, _ = cluster.load_elsewhere(tmp_path / "machine3")
    assert state == dump(md)
    assert applied == md.seq - cp["seq"] > 0
    later_segments = writer.segments(cluster, first=next_segment)
    assert later_segments

    final = dump(md)
    writer.close(checkpoint_after=1)  # a long enough chain is checkpointed at unmount
    sb = cluster.superblock()
    assert sb.lease is None
    assert sb.checkpoint["seq"] == cp["seq"] + applied
    assert not any(cluster.store.has_many(new_blocks + later_segments).values())
    state, applied, _ = cluster.load_elsewhere(tmp_path / "machine4")
    assert (state, applied) == (final, 0)


def test_a_writer_whose_lease_was_taken_over_is_fenced(cluster, writers, tmp_path):
    cut = CutTransport()
    a = writers("a", transport=cut, lease=new_lease(new_mount_id(), 3.0,
                                                            "/mnt/a"))
    Workload(a.metadata, seed=13).run(30)
    a.journal.wait_durable(timeout=60)
    durable = dump(a.metadata)

    # while A's lease is live, nobody else gets it, and the refusal names the holder
    lease_b = new_lease(new_mount_id(), 30.0, "/mnt/b")
    with pytest.raises(errors.LeaseHeld) as held:
        acquire(new_transport(), cluster.superblock(), lease_b)
    assert "/mnt/a" in str(held.value) and f"pid {os.getpid()}" in str(held.value)
    assert cluster.superblock().lease["mount"] == a.lease["mount"]

    # A is cut off from the superblock: it cannot renew, and its lease runs out
    cut.cut.set()
    wait_until(lambda: cluster.superblock().lease["expires"] < time.time(),
               "A's lease to expire", timeout=60, interval=0.1)
    # nobody replaced A yet, but by its own clock its lease is over: it ships nothing more
    assert a.journal.lost is None
    a.metadata.create(ROOT_INO, b"after the lease ran out", stat.S_IFREG | 0o644, 0, 0)
    with pytest.raises(errors.Unavailable, match="lease"):
        a.journal.wait_durable(timeout=60)
    unshipped = a.journal.stats()["segment"]
    assert read_segment(cluster.store, cluster.fs_id, a.journal.chain,
                                unshipped) is None
    a_segments = a.segments(cluster)

    # B takes the expired lease over and becomes the writer
    b = writers("b", lease=lease_b)
    assert b.replayed > 0
    assert dump(b.metadata) == durable  # A's unshipped change is not on the cluster
    assert cluster.superblock().lease == lease_b
    assert not any(cluster.store.has_many(a_segments).values())

    # A reaches the servers again: its next renewal finds the superblock changed
    cut.cut.clear()
    wait_until(lambda: a.journal.lost, "A to notice it lost its lease", timeout=60)
    told = a.journal.lost
    with pytest.raises(errors.Fenced) as fenced:  # what A's filesystem hears: read-only
        a.gate.check_writable()
    assert str(fenced.value) == told
    assert "/mnt/b" in a.journal.lost
    with pytest.raises(errors.Fenced):
        a.journal.wait_durable(timeout=60)
    with pytest.raises(errors.Fenced):
        a.journal.checkpoint()
    a.close()  # a fenced writer does not give up a lease it no longer holds
    assert a.journal.lost == told  # lost once, for that reason
    sb = cluster.superblock()
    assert sb.lease == lease_b and sb.checkpoint["chain"] == b.journal.chain

    Workload(b.metadata, seed=14).run(20)
    b.journal.wait_durable(timeout=60)
    state, _, _ = cluster.load_elsewhere(tmp_path / "c")
    assert state == dump(b.metadata)
    assert b.metadata.lookup(ROOT_INO, b"after the lease ran out") is None
    b.close()
    assert cluster.superblock().lease is None


def test_a_lease_is_refused_while_its_holder_lives_and_taken_when_it_is_gone(cluster):
    transport = new_transport()
    stale = cluster.superblock()
    mine = new_lease(new_mount_id(), 30.0, "/mnt/mine")

    remote = new_lease("remote-mount", 600.0, "/mnt/remote")
    remote["host"] = "another-machine.invalid"
    sb = superblock.update(transport, stale.with_changes(lease=remote))
    with pytest.raises(errors.LeaseHeld, match="/mnt/remote"):
        acquire(transport, sb, mine)
    # a superblock read before someone else wrote cannot take the lease either
    with pytest.raises(errors.LeaseHeld):
        acquire(transport, stale, mine)
    assert cluster.superblock().lease == remote

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    gone = new_lease("gone-mount", 600.0, "/mnt/gone")
    gone["pid"] = ended.pid  # this machine, this boot, a process that has exited
    sb = superblock.update(transport, sb.with_changes(lease=gone))
    sb = acquire(transport, sb, mine)
    assert cluster.superblock().lease == mine == sb.lease

    renewed = {**mine, "expires": time.time() + 60}  # the holder itself is never refused
    assert acquire(transport, sb, renewed).lease == renewed


# -- 7. a server dies while the journal ships -------------------------------------------------

def test_the_journal_ships_on_when_a_server_is_killed(cluster, writers, tmp_path):
    writer = writers("machine1")
    md = writer.metadata
    victim = cluster.servers[1]
    kill_now, killed = threading.Event(), threading.Event()

    def killer():
        if kill_now.wait(60):
            victim.kill()
            killed.set()

    thread = threading.Thread(target=killer, name="killer")
    thread.start()
    try:
        workload = Workload(md, seed=21)
        for i in range(40):
            workload.run(5)
            if i == 10:
                kill_now.set()  # killed at some point while the shipping goes on
            if i % 3 == 0:
                writer.journal.wait_durable(timeout=60)
        assert killed.wait(60)
    finally:
        kill_now.set()
        thread.join(60)
    assert not victim.running

    shipped_before = writer.journal.stats()["segment"]
    workload.run(40)  # every one of these ships with the server dead
    writer.journal.wait_durable(timeout=60)
    assert writer.journal.stats()["segment"] > shipped_before
    assert writer.journal.lost is None

    state, _, end = cluster.load_elsewhere(tmp_path / "machine2")
    assert not victim.running
    assert state == dump(md)
    assert end == writer.journal.stats()["segment"]
