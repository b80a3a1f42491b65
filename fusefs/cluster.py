"""The replicated block store: R copies of every block on the cluster's block servers.

What it promises (docs/promises.md P3, P4):
- put returns once W servers acknowledged the block durable. Copies go to the block's R
  homes (its first R servers by rendezvous ranking); a home that is down or fails is
  replaced by the next server in the ranking, so R copies exist whenever R servers are up,
  and the home's missing copy is remembered for repair.
- get asks the best-ranked healthy replica, races a second once if the first is slower
  than usual (an adaptive delay, at least `hedge_delay`), falls over down the ranking on
  any error, verifies the xxh3-128 checksum of what it receives (a server may answer 200
  with other bytes), and re-puts the block on any home found missing it or holding a bad
  copy.
- A server that fails is skipped until a background probe finds it answering again; then
  the copies it missed are repaired. Nothing waits on a dead server longer than the
  request timeout.
- A copy refused by a server that stays usable (507 full, 409, 422, one failed request)
  is remembered too, and the probe loop retries every usable server's backlog
  periodically, backing off from `repair_min` to `repair_max` while rounds make no
  progress: a server that runs full gets its copies once space is freed.

Pending repairs live in memory (`_missing`): they are only the fast path. What nobody
remembers (a client restart, a copy lost on disk) the anti-entropy repair finds by
comparing the metadata with what every server lists (fusefs/antientropy.py).

Membership can change while the store runs (`set_membership`, from the superblock):
`members` are the servers blocks live on (homes and write targets); `leaving` servers are
being drained: never written to, still read from (after every member) until they are empty.

Threads: calls come from many threads. Each server has its own pool of I/O threads
(`_pool`), which runs single requests to it only (hedged reads and replica writes in
parallel) and never waits for anything else: a server that hangs holds its own threads,
never the other servers'. `_probes` runs the heartbeat's status requests, `_fanout` runs
whole put/get fall-backs of batch calls, and `_repairs` runs repair jobs; they wait on
I/O tasks only, so no pool ever waits on itself. `_lock` guards `_missing` and the pools,
and is never held across a request.

A hung server (it accepts connections and answers nothing) is marked down once it has
left requests unanswered for `stall_after` seconds while other servers answered (or by the
heartbeat's status request, when idle). Copies left behind to it until then (put returned at W
without them) are given up at that moment: the ones not started yet are cancelled, the
bytes of the ones in flight stop counting against `behind_bytes`, and every home among them
is remembered for repair. Writers therefore wait on a hung server no longer than it takes
to notice it, instead of the request timeout.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from blockserver import protocol

from . import errors
from .blockstore import BlockStore
from .health import Health
from .placement import rank
from .transport import Member, Transport, wrong_server

log = logging.getLogger("fusefs.cluster")

HEARTBEAT = 2.0  # seconds between status requests to every usable server
SMALL_BATCH = 32  # a batch read of at most this many blocks goes to as few servers as can
STALE_CHECK = 0.25  # seconds between looks, while a put waits, at its servers' health
START_WAIT = 3.0  # seconds start() waits for a server's status (a hung one is marked down)
FIND_GRACE = 1.0  # seconds find() still waits for silent servers once absence is proven

# Failures that say something about the server rather than about one block.
_SERVER_FAILURES = (errors.Unavailable, errors.WrongServer, errors.AuthenticationFailed)


@dataclass(frozen=True)
class ClusterConfig:
    replicas: int = 3
    write_quorum: int = 2
    hedge_delay: float = 0.05  # seconds before a slow read is raced by a second replica
    io_threads: int = 16  # per server: requests in flight to one server, at most
    # A server that leaves requests unanswered this long while others answer is marked
    # down (hung) without waiting for the request timeout.
    stall_after: float = 2.0
    # Copies still being written after their put returned (at W acknowledgements) hold
    # their data: puts wait while these hold more than this many bytes (back-pressure).
    behind_bytes: int = 64 << 20
    batch_bytes: int = 8 << 20  # at most this much data in one batch request
    batch_items: int = 1024
    probe_min: float = 0.5
    probe_max: float = 30.0
    # A usable server with missing copies is repaired again after this long, doubling up
    # to repair_max while a round makes no progress (a server that stays full, say).
    repair_min: float = 1.0
    repair_max: float = 60.0
    # Read the block files of servers on this host directly (protocol.files), not over HTTP.
    local_reads: bool = True


class _Latency:
    """When to hedge a read: after the usual read time plus three deviations, never sooner
    than the configured floor. A busy client's reads are slow everywhere, and hedging them
    after a fixed delay only doubled the work (measured by benchmarks/cluster_bench.py).
    Updates race benignly: a lost update only nudges an estimate."""

    def __init__(self, floor: float):
        self.floor = floor
        self.mean = floor / 2
        self.deviation = 0.0

    def observe(self, seconds: float) -> None:
        error = seconds - self.mean
        self.mean += error / 16
        self.deviation += (abs(error) - self.deviation) / 8

    def hedge_after(self) -> float:
        return max(self.floor, self.mean + 3 * self.deviation)


class ReplicatedStore(BlockStore):
    def __init__(self, members: Sequence[Member], transport: Transport, config: ClusterConfig):
        if not 1 <= config.write_quorum <= config.replicas:
            raise ValueError("need 1 <= write quorum <= replicas")
        if config.replicas > len(members):
            raise ValueError(f"{config.replicas} replicas need at least {config.replicas} "
                             f"servers; the cluster has {len(members)}")
        self.members = list(members)  # replaced whole (never changed in place) on a change
        self.leaving: list[Member] = []
        self.transport = transport
        self.config = config
        self.health = Health([m.id for m in members], config.probe_min, config.probe_max)
        self._by_id = {m.id: m for m in members}
        self._latencies: dict[str, float] = {}  # server id -> seconds of its last status
        self._damage_listeners: list = []
        self._pools: dict[str, ThreadPoolExecutor] = {}  # server id -> its I/O threads
        # server id -> [requests waiting for an answer, when it last answered or, idle
        # until then, when the oldest of them started]; and the last answer of any server
        self._silence: dict[str, list] = {}
        self._answered = 0.0
        self._probes = ThreadPoolExecutor(8, thread_name_prefix="cluster-probe")
        self._fanout = ThreadPoolExecutor(8, thread_name_prefix="cluster-fanout")
        self._repairs = ThreadPoolExecutor(2, thread_name_prefix="cluster-repair")
        self._lock = threading.Lock()
        self._missing: dict[str, dict[str, str]] = {m.id: {} for m in members}  # guarded
        self._stopping = threading.Event()
        self._prober: threading.Thread | None = None
        self._latency = _Latency(config.hedge_delay)
        self._space: dict[str, tuple[int, int]] = {}  # disk -> (capacity, free), guarded
        self._server_space: dict[str, tuple[int, int]] = {}  # the same, by server id
        self._behind = 0  # bytes held by copies left behind by puts; guarded by _behind_changed
        self._behind_changed = threading.Condition()
        # server id -> {copy left behind to it: its bytes}, guarded by _behind_changed
        self._copies: dict[str, dict[Future, int]] = {}
        self._space_checked = 0.0
        # Repair rounds, guarded by _lock: servers with a round running, and per server
        # (when the next round is due, the back-off delay).
        self._repairing: set[str] = set()
        self._repair_due = {m.id: (0.0, config.repair_min) for m in members}
        # server id -> its data directory, for servers on this host whose files we may read
        # (_note_local). Replaced whole under _lock, read without it.
        self._local: dict[str, str] = {}
        self._local_reads: dict[str, int] = {}  # server id -> blocks read from its files
        self.health.on_up(self._server_back)

    @property
    def servers(self) -> list[Member]:
        """Every server that may hold copies: the members, then the leaving ones."""
        return self.members + self.leaving

    def set_membership(self, members: Sequence[Member], leaving: Sequence[Member] = ()) -> bool:
        """Adopt a new membership (a superblock change made by `fusefs servers`); True if
        it changed. New servers start as usable; copies remembered for a server that left
        are dropped (the anti-entropy repair recomputes what is missing)."""
        members, leaving = list(members), [m for m in leaving if m not in members]
        if members == self.members and leaving == self.leaving:
            return False
        if self.config.replicas > len(members):
            raise ValueError(f"{self.config.replicas} replicas need at least "
                             f"{self.config.replicas} members")
        everyone = members + leaving
        self.health.track([m.id for m in everyone])
        with self._lock:
            for member in everyone:
                self._missing.setdefault(member.id, {})
                self._repair_due.setdefault(member.id, (0.0, self.config.repair_min))
            for member_id in set(self._missing) - {m.id for m in members}:
                self._missing[member_id] = {}
            self._by_id = {**self._by_id, **{m.id: m for m in everyone}}
            self.members, self.leaving = members, leaving
        log.info("membership is now %s%s", ", ".join(m.url for m in members),
                 "; leaving: " + ", ".join(m.url for m in leaving) if leaving else "")
        return True

    def on_damage(self, listener) -> None:
        """Call `listener(block_id)` when a copy is found missing or bad, or could not be
        written to its home (the anti-entropy repair serves those first)."""
        self._damage_listeners.append(listener)

    def _damaged(self, block_id: str) -> None:
        for listener in self._damage_listeners:
            listener(block_id)

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Check every member's identity, then start probing servers that are down.

        Raises AuthenticationFailed or WrongServer when a reachable server refuses us or is
        not the member recorded for this filesystem; unreachable servers are only marked
        down (the cluster works without them and repairs them when they return).
        """
        futures = {self._probes.submit(self.transport.status, m, timeout=START_WAIT): m
                   for m in self.servers}
        wait(futures, timeout=START_WAIT + 1.0)
        for future, member in futures.items():
            try:
                if not future.done():  # (its connection alone took too long)
                    raise errors.Timeout(f"{member.url}: no answer in {START_WAIT:.0f} s")
                self._check_identity(member, future.result())
                self._note_space(member, future.result())
                self._note_local(member, future.result())
            except (errors.AuthenticationFailed, errors.WrongServer):
                raise
            except errors.StorageError as e:
                log.warning("block server %s is not reachable yet: %s", member.url, e)
                self.health.failed(member.id, e)
        self._prober = threading.Thread(target=self._probe_loop, name="cluster-prober",
                                        daemon=True)
        self._prober.start()

    @staticmethod
    def _check_identity(member: Member, status: dict) -> None:
        if status.get("server_id") != member.id:
            raise wrong_server(member.url, status.get("server_id"), member.id)

    def close(self) -> None:
        self._stopping.set()
        if self._prober is not None:
            self._prober.join(timeout=5)
        self._repairs.shutdown(wait=True, cancel_futures=True)
        self._fanout.shutdown(wait=True, cancel_futures=True)
        self._probes.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)

    def _pool(self, member: Member) -> ThreadPoolExecutor:
        """The server's own I/O threads (made on first use). RuntimeError once closing."""
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("the store is closed")
            pool = self._pools.get(member.id)
            if pool is None:
                pool = self._pools[member.id] = ThreadPoolExecutor(
                    self.config.io_threads, thread_name_prefix=f"cluster-io-{member.id[:8]}")
            return pool

    def _send(self, member: Member, fn, *args, **kwargs) -> Future:
        """Run `_call(member, fn, ...)` on the server's I/O threads."""
        return self._pool(member).submit(self._call, member, fn, *args, **kwargs)

    def _note_space(self, member: Member, status: dict) -> None:
        with self._lock:
            # Servers on one disk report the same "disk": its space counts once.
            disk = status.get("disk") or member.id
            self._space[disk] = (status["capacity_bytes"], status["free_bytes"])
            self._server_space[member.id] = self._space[disk]

    def _note_local(self, member: Member, status: dict) -> None:
        """Read `member`'s block files ourselves from now on if its status names a data
        directory whose token file we can read and holds the token of the status: the
        server's own directory, seen from its host (protocol.files). Checked at every
        status, so a restarted or moved server is followed."""
        local = status.get("local") if self.config.local_reads else None
        root = None
        if isinstance(local, dict) and isinstance(local.get("root"), str) and \
                isinstance(local.get("token"), str) and local["token"] and \
                os.path.isabs(local["root"]) and \
                protocol.read_token(local["root"]) == local["token"]:
            root = local["root"]
        with self._lock:
            if self._local.get(member.id) == root:
                return
            changed = dict(self._local)
            if root is None:
                changed.pop(member.id, None)
            else:
                changed[member.id] = root
            self._local = changed
        if root is not None:
            log.info("block server %s is on this host: reading its block files in %s "
                     "directly", member.url, root)
        else:
            log.info("block server %s: reading its blocks over HTTP", member.url)

    def _forget_local(self, member: Member, error: OSError) -> None:
        with self._lock:
            if member.id not in self._local:
                return
            self._local = {k: v for k, v in self._local.items() if k != member.id}
        log.warning("cannot read the block files of %s directly (%s); reading them over "
                    "HTTP until its next status says otherwise", member.url, error)

    def local_copy(self, block_id: str) -> str | None:
        """The data directory of the first usable home of the block whose files we read
        directly, or None."""
        local = self._local
        if local:
            for m in self.ranking(block_id)[:self.config.replicas]:
                if m.id in local and self.health.usable(m.id):
                    return local[m.id]
        return None

    def _read_local(self, block_id: str, checksum: str, homes, skip=()):
        """(bytes, None) read from the file of the first usable home on this host;
        (None, that home) when its file is absent or holds other bytes, so that the
        caller asks that server first, which checks its copy and answers why; (None,
        None) when no home's files can be read here."""
        local = self._local
        for member in homes:
            root = local.get(member.id)
            if root is None or member in skip or not self.health.usable(member.id):
                continue
            try:
                data = protocol.read_block_file(root, block_id, checksum)
            except OSError as e:
                self._forget_local(member, e)
                return None, None
            if data is None:
                return None, member
            with self._lock:
                self._local_reads[member.id] = self._local_reads.get(member.id, 0) + 1
            return data, None
        return None, None

    def capacity(self) -> tuple[int, int]:
        """(total, free) bytes of file data the cluster can hold: the raw space of its
        distinct disks / R (every block is stored R times). Cached."""
        with self._lock:
            values = list(self._space.values())
        r = self.config.replicas
        return sum(v[0] for v in values) // r, sum(v[1] for v in values) // r

    def _refresh_space(self) -> None:
        """Ask every usable server for its status: its space, its latency, and whether it
        still answers (an idle mount learns of a stopped server within seconds)."""
        def ask(member: Member) -> None:
            started = time.monotonic()
            try:
                status = self._call(member, self.transport.status, timeout=2.0)
            except errors.StorageError:
                return
            with self._lock:
                self._latencies[member.id] = time.monotonic() - started
            self._note_space(member, status)
            self._note_local(member, status)

        usable = [m for m in self.servers if self.health.usable(m.id)]
        for future in [self._probes.submit(ask, m) for m in usable]:
            try:
                future.result()
            except RuntimeError:  # shutting down
                return

    def _probe_loop(self) -> None:
        while not self._stopping.wait(0.2):
            self._find_hung()
            if time.monotonic() - self._space_checked > HEARTBEAT:
                self._space_checked = time.monotonic()
                self._refresh_space()
            self._repair_backlogs()
            for member_id in self.health.due_probes():
                member = self._by_id[member_id]
                try:
                    status = self.transport.status(member, timeout=2.0)
                    self._check_identity(member, status)
                except errors.StorageError as e:
                    self.health.failed(member_id, e)
                    continue
                self._note_local(member, status)
                log.info("block server %s answers again", member.url)
                self.health.succeeded(member_id)

    # -- calls to one server, with health bookkeeping ---------------------------------------

    def _call(self, member: Member, fn, *args, **kwargs):
        self._waiting(member.id, +1)
        answered = False
        try:
            result = fn(member, *args, **kwargs)
            answered = True
        except _SERVER_FAILURES as e:
            self._mark_down(member, e)
            raise
        except errors.StorageError:
            answered = True  # an answer about the request (missing, full, ...)
            raise
        finally:
            self._waiting(member.id, -1, answered)
        if not self.health.usable(member.id):
            self.health.succeeded(member.id)
        return result

    def _mark_down(self, member: Member, error: errors.StorageError) -> None:
        if self.health.usable(member.id):
            log.warning("block server %s marked down: %s", member.url, error)
        self.health.failed(member.id, error)
        self._give_up_copies(member.id)

    def _waiting(self, member_id: str, change: int, answered: bool = False) -> None:
        """Count a request to the server starting (+1) or ending (-1), and when it last
        answered (or, idle until then, when its oldest waiting request started)."""
        now = time.monotonic()
        with self._lock:
            entry = self._silence.setdefault(member_id, [0, now])
            if change > 0 and entry[0] == 0:
                entry[1] = now
            entry[0] += change
            if answered:
                entry[1] = self._answered = now

    def _find_hung(self) -> None:
        """Mark down a usable server that has left requests unanswered for `stall_after`
        seconds while another server answered: a hung server (stopped, its disk stuck, a
        network path that drops packets) would otherwise be noticed only when a request
        to it times out, and writers wait on its copies until then."""
        now = time.monotonic()
        with self._lock:
            hung = [(member_id, waiting, now - since)
                    for member_id, (waiting, since) in self._silence.items()
                    if waiting and now - since > self.config.stall_after
                    and self._answered > since]
        for member_id, waiting, silent in hung:
            member = self._by_id.get(member_id)
            if member is not None and self.health.usable(member_id):
                self._mark_down(member, errors.Timeout(
                    f"{member.url}: {waiting} requests unanswered for {silent:.1f} s while "
                    "other servers answer", server=member.url))

    def ranking(self, block_id: str) -> list[Member]:
        """The members, best home first (the first R are the block's homes)."""
        return rank(block_id, self.members)

    def read_order(self, block_id: str) -> list[Member]:
        """Where to look for a copy: the ranking, then the leaving servers."""
        return self.ranking(block_id) + rank(block_id, self.leaving)

    def _by_preference(self, members: Iterable[Member], skip=()) -> list[Member]:
        """Usable servers first (in the given order), then the rest, then `skip`."""
        members = list(members)
        usable = [m for m in members if m not in skip and self.health.usable(m.id)]
        down = [m for m in members if m not in skip and m not in usable]
        return usable + down + [m for m in members if m in skip]

    # -- put --------------------------------------------------------------------------------

    def _wait_behind(self) -> None:
        """Back-pressure: before a put, wait while the copies earlier puts left behind hold
        more than `behind_bytes`. A slow or hung server's copies end at the request timeout
        at the latest, so this never waits longer than that."""
        with self._behind_changed:
            while self._behind > self.config.behind_bytes and not self._stopping.is_set():
                self._behind_changed.wait(1.0)

    def _left_behind(self, future: Future, member_id: str, size: int) -> None:
        """`future`, a copy to the server `member_id`, goes on after its put returned,
        holding `size` bytes until it ends or is given up."""
        with self._behind_changed:
            self._behind += size
            self._copies.setdefault(member_id, {})[future] = size

        def ended(done: Future) -> None:
            with self._behind_changed:
                held = self._copies.get(member_id, {}).pop(done, None)
                if held is not None:
                    self._behind -= held
                    self._behind_changed.notify_all()

        future.add_done_callback(ended)
        if not self.health.usable(member_id):
            self._give_up_copies(member_id)  # marked down before this copy was left to it

    def _give_up_copies(self, member_id: str) -> None:
        """The server was marked down: the copies left behind to it stop holding writers
        back. Those not started are cancelled (their callbacks remember the homes for
        repair); those in flight end at their timeout, and no longer count meanwhile."""
        with self._behind_changed:
            copies = self._copies.pop(member_id, {})
            if not copies:
                return
            self._behind -= sum(copies.values())
            self._behind_changed.notify_all()
        cancelled = sum(future.cancel() for future in copies)
        log.info("gave up %d copies left behind to a server marked down (%d not started)",
                 len(copies), cancelled)

    @property
    def behind_bytes(self) -> int:
        """Bytes held by copies still being written after their put returned."""
        with self._behind_changed:
            return self._behind

    def put(self, block_id: str, data: bytes, checksum: str, metadata: bool = False) -> None:
        """Store R copies, returning at W; `metadata` (journal segments) may use the space
        servers keep back from file data."""
        put_block = functools.partial(self.transport.put_block, metadata=metadata)
        self._wait_behind()
        ranking = self.ranking(block_id)
        homes = ranking[:self.config.replicas]
        candidates = iter(self._by_preference(homes) + self._by_preference(
            ranking[self.config.replicas:]))
        acked: list[Member] = []
        failures: dict[str, errors.StorageError] = {}
        pending: dict[Future, Member] = {}
        held_back: list[Member] = []  # known down, tried only if the quorum needs them
        sent_up: set[Future] = set()  # copies sent to a server usable then
        stale: set[Future] = set()  # of those, to a server marked down since: still
        # awaited (an answer still counts), no longer counted on

        def launch() -> None:
            while len(acked) + len(pending) - len(stale) < self.config.replicas:
                needed = len(acked) + len(pending) - len(stale) < self.config.write_quorum
                member = next(candidates, None)  # in ranking order, usable ones first
                if member is None:
                    if not (needed and held_back):
                        return
                    member = held_back.pop(0)
                elif not needed and not self.health.usable(member.id):
                    # A server marked down may hang rather than refuse: a copy sent to it
                    # would hold an I/O thread until the request timeout, and with every
                    # put doing so, the threads run out and writes stall. Its copy (if it
                    # is a home) is remembered for repair instead.
                    held_back.append(member)
                    continue
                future = self._send(member, put_block, block_id, data, checksum)
                pending[future] = member
                if self.health.usable(member.id):
                    sent_up.add(future)

        launch()
        while pending and len(acked) < self.config.write_quorum:
            done, _ = wait(pending, timeout=STALE_CHECK, return_when=FIRST_COMPLETED)
            for future in done:
                member = pending.pop(future)
                stale.discard(future)
                try:
                    future.result()
                    acked.append(member)
                except errors.StorageError as e:
                    failures[member.url] = e
            # A server that hangs is marked down while we wait: the quorum is sought
            # elsewhere (a server held back included) instead of at its request timeout.
            stale.update(f for f, m in pending.items()
                         if f in sent_up and not self.health.usable(m.id))
            launch()
        if len(acked) < self.config.write_quorum:
            raise self._quorum_error(f"block {block_id} was stored on {len(acked)} of the "
                                     f"{self.config.write_quorum} servers required", failures)
        for member in homes:
            if member not in acked and member not in pending.values():
                self._remember_missing(member, block_id, checksum)
        # The rest finish in the background; one that fails there is replaced by the next
        # server not tried yet, as it would have been before the quorum.
        # taken from, under _lock, by the copies' callbacks (not servers marked down: see
        # `launch`)
        untried = [m for m in candidates if self.health.usable(m.id)]
        for future, member in pending.items():
            self._background_put(future, member, (block_id, data, checksum), homes, untried,
                                 put_block)

    def _background_put(self, future: Future, member: Member, block, homes: list[Member],
                        untried: list[Member], put_block) -> None:
        self._left_behind(future, member.id, len(block[1]))
        future.add_done_callback(
            lambda f: self._background_put_done(f, member, block, homes, untried, put_block))

    def _background_put_done(self, future: Future, member: Member, block,
                             homes: list[Member], untried: list[Member], put_block) -> None:
        if not future.cancelled() and future.exception() is None:
            return
        block_id, _, checksum = block
        if member in homes:
            self._remember_missing(member, block_id, checksum)
        with self._lock:
            other = untried.pop(0) if untried else None
        if other is None or self._stopping.is_set():
            return
        try:
            replacement = self._send(other, put_block, *block)
        except RuntimeError:
            return  # shutting down: the home's copy is remembered for repair
        self._background_put(replacement, other, block, homes, untried, put_block)

    @staticmethod
    def _quorum_error(what: str, failures: dict[str, errors.StorageError]) -> errors.StorageError:
        reasons = "; ".join(str(e) for e in failures.values()) or "no server was reachable"
        if failures and all(isinstance(e, errors.AuthenticationFailed)
                            for e in failures.values()):
            return errors.AuthenticationFailed(f"{what}: {reasons}")
        if failures and all(isinstance(e, errors.StorageFull) for e in failures.values()):
            return errors.StorageFull(f"{what}: every server is full ({reasons})")
        return errors.QuorumNotReached(f"{what}: {reasons}")

    def put_many(self, items: list[tuple[str, bytes, str]]) -> None:
        """Store many blocks with one batch request per server and batch of items."""
        if len(items) <= 1:
            for item in items:
                self.put(*item)
            return
        self._wait_behind()
        plans = {}  # server id -> list of item indexes
        homes_of = []
        for index, (block_id, _, _) in enumerate(items):
            ranking = self.ranking(block_id)
            homes_of.append(ranking[:self.config.replicas])
            for member in self._put_targets(ranking):
                plans.setdefault(member.id, []).append(index)
        acks: list[set[str]] = [set() for _ in items]
        pending = {}
        for member_id, indexes in plans.items():
            for chunk in self._chunks(indexes, items):
                future = self._send(self._by_id[member_id], self.transport.batch_put,
                                    [items[i] for i in chunk])
                pending[future] = (member_id, chunk)
        sent_up = {f for f, (member_id, _) in pending.items() if self.health.usable(member_id)}
        while pending and any(len(a) < self.config.write_quorum for a in acks):
            done, _ = wait(pending, timeout=STALE_CHECK, return_when=FIRST_COMPLETED)
            for future in done:
                member_id, chunk = pending.pop(future)
                if future.exception() is None:
                    for index, status in zip(chunk, future.result()):
                        if status in protocol.PUT_OK:
                            acks[index].add(member_id)
            if pending and all(f in sent_up and not self.health.usable(member_id)
                               for f, (member_id, _) in pending.items()):
                break  # all that is left waits on servers marked down since: fail over
        for future, (member_id, chunk) in pending.items():
            self._left_behind(future, member_id, sum(len(items[i][1]) for i in chunk))
            future.add_done_callback(lambda f, m=member_id, c=chunk: self._background_batch_done(
                f, self._by_id[m], [items[i] for i in c]))
        short = [i for i, a in enumerate(acks) if len(a) < self.config.write_quorum]
        if short:  # the slow path does fail-over block by block
            for future in [self._fanout.submit(self.put, *items[i]) for i in short]:
                future.result()
        in_flight = {m: set(c) for m, c in pending.values()}
        for index, (block_id, _, checksum) in enumerate(items):
            for member in homes_of[index]:
                if member.id not in acks[index] and index not in in_flight.get(member.id, ()):
                    self._remember_missing(member, block_id, checksum)

    def _put_targets(self, ranking: list[Member]) -> list[Member]:
        """Where a batch sends a block's copies: R servers, usable ones first, and those
        marked down only as far as W needs them (see `put`: a hung server would hold the
        I/O threads; a home left out has its copy remembered for repair)."""
        targets = self._by_preference(ranking)[:self.config.replicas]
        up = [m for m in targets if self.health.usable(m.id)]
        return up if len(up) >= self.config.write_quorum else \
            targets[:max(len(up), self.config.write_quorum)]

    def _background_batch_done(self, future: Future, member: Member, items) -> None:
        failed = future.cancelled() or future.exception() is not None
        statuses = [0] * len(items) if failed else future.result()
        for (block_id, _, checksum), status in zip(items, statuses):
            if status not in protocol.PUT_OK:
                self._remember_missing(member, block_id, checksum)

    def _chunks(self, indexes: list[int], items) -> Iterable[list[int]]:
        chunk, size = [], 0
        for index in indexes:
            length = len(items[index][1])
            if chunk and (size + length > self.config.batch_bytes
                          or len(chunk) >= self.config.batch_items):
                yield chunk
                chunk, size = [], 0
            chunk.append(index)
            size += length
        if chunk:
            yield chunk

    # -- get --------------------------------------------------------------------------------

    def get(self, block_id: str, checksum: str, skip=()) -> bytes:
        ranking = self.read_order(block_id)
        homes = ranking[:self.config.replicas]
        if self._local:
            data, ask_first = self._read_local(block_id, checksum, homes, skip)
            if data is not None:
                return data
            if ask_first is not None:
                homes = [ask_first] + [m for m in homes if m is not ask_first]
        candidates = iter(self._by_preference(homes, skip) + self._by_preference(
            ranking[self.config.replicas:], skip))
        pending: dict[Future, Member] = {}
        bad: list[Member] = []  # replicas that lacked the block or held a bad copy
        failures: dict[str, errors.StorageError] = {}
        started = time.monotonic()
        hedged = False

        def launch() -> bool:
            member = next(candidates, None)
            if member is None:
                return False
            pending[self._send(member, self.transport.get_block, block_id)] = member
            return True

        launch()
        while pending:
            timeout = None if hedged else self._latency.hedge_after()
            done, _ = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            if not done:
                hedged = True  # race the slow replica with the next one, once
                launch()
                continue
            for future in done:
                member = pending.pop(future)
                try:
                    data = future.result()
                except (errors.BlockMissing, errors.BlockCorrupt) as e:
                    bad.append(member)
                    failures[member.url] = e
                except errors.StorageError as e:
                    failures[member.url] = e
                else:
                    if protocol.checksum(data) == checksum:
                        if not bad and not hedged:
                            self._latency.observe(time.monotonic() - started)
                        self._read_repair(block_id, data, checksum,
                                          [m for m in bad if m in homes])
                        self._repair_late(block_id, data, checksum, pending, homes)
                        return data
                    bad.append(member)
                    failures[member.url] = errors.BlockCorrupt(
                        f"{member.url}: block {block_id} arrived with the wrong checksum")
                    log.warning("block %s from %s failed verification; trying another replica",
                                block_id, member.url)
                if not pending:
                    launch()
        raise self._read_error(block_id, failures)

    def find(self, block_id: str, verify) -> bytes | None:
        """A block whose checksum is not known in advance (journal segments), or None when
        it provably does not exist.

        Every member is asked; the first copy that `verify(data)` accepts wins. Absent
        means so many servers answered "missing" that no W of them can hold it; when too
        few answered to tell, this raises Unavailable rather than guess. Once absent is
        proven, the servers still silent get FIND_GRACE seconds more: a hung one is not
        waited for, but a copy on a slow one still wins. (A "missing" can be transient:
        read repair replaces a copy that holds other bytes by a delete, then a put.)
        """
        futures = {self._send(m, self.transport.get_block, block_id): m
                   for m in self._by_preference(self.servers)}
        pending, deadline = set(futures), None
        missing, failures = 0, {}
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            if not done:
                return None  # proven absent, and the silent servers had their grace
            for future in done:
                member = futures[future]
                try:
                    data = future.result()
                except errors.BlockMissing as e:
                    missing += 1
                    failures[member.url] = e
                    if deadline is None and len(futures) - missing < self.config.write_quorum:
                        deadline = time.monotonic() + FIND_GRACE
                    continue
                except errors.StorageError as e:
                    failures[member.url] = e
                    continue
                if verify(data):
                    self._repair_late(block_id, data, protocol.checksum(data), futures,
                                      self.ranking(block_id)[:self.config.replicas])
                    return data
                failures[member.url] = errors.BlockCorrupt(f"{member.url}: block {block_id} "
                                                           "failed verification")
                log.warning("block %s from %s failed verification", block_id, member.url)
        if len(futures) - missing < self.config.write_quorum:
            return None
        reasons = "; ".join(str(e) for e in failures.values())
        raise errors.Unavailable(f"cannot tell whether block {block_id} exists: {reasons}")

    def _repair_late(self, block_id: str, data: bytes, checksum: str,
                     futures: dict[Future, Member], homes) -> None:
        """Read repair of answers still to come: each of `homes` among `futures` that
        answers it has no good copy (missing, corrupt, other bytes) gets `data`, verified,
        once its answer arrives. A read returns at the first copy that verifies (a hedged
        `get`, a `find`); without this, a slower replica's bad copy would stay as it is
        until anti-entropy came by (for `find`: a journal segment one failure away from
        looking never written)."""
        homes = set(homes)

        def check(future: Future, member: Member) -> None:
            if member not in homes or future.cancelled():
                return
            error = future.exception()
            if isinstance(error, (errors.BlockMissing, errors.BlockCorrupt)) or (
                    error is None and protocol.checksum(future.result()) != checksum):
                self._read_repair(block_id, data, checksum, [member])

        for future, member in list(futures.items()):
            future.add_done_callback(lambda f, m=member: check(f, m))

    @staticmethod
    def _read_error(block_id: str, failures: dict[str, errors.StorageError]):
        reasons = "; ".join(str(e) for e in failures.values()) or "no server was reachable"
        what = f"no replica of block {block_id} could be read"
        values = list(failures.values())
        if values and all(isinstance(e, errors.BlockMissing) for e in values):
            return errors.BlockMissing(f"block {block_id} is on no server")
        if values and all(isinstance(e, (errors.BlockMissing, errors.BlockCorrupt))
                          for e in values):
            return errors.BlockCorrupt(f"{what}: {reasons}")
        if values and all(isinstance(e, errors.AuthenticationFailed) for e in values):
            return errors.AuthenticationFailed(f"{what}: {reasons}")
        return errors.Unavailable(f"{what}: {reasons}")

    def get_many(self, items: list[tuple[str, str]]) -> dict[str, bytes]:
        """Fetch many blocks with one batch request per server (the blocks on this host:
        from their files); fail-over block by block. A home whose answer shows it has no
        good copy (missing, quarantined, other bytes) is read-repaired, as `get` does."""
        wanted = dict(items)
        found: dict[str, bytes] = {}
        # Blocks for `get`: (id, server to try last or None, whether it lacks a good copy).
        slow: list[tuple[str, str | None, bool]] = []
        batch = []
        for block_id, checksum in items:
            if self._local:
                homes = self.ranking(block_id)[:self.config.replicas]
                data, ask_first = self._read_local(block_id, checksum, homes)
                if data is not None:
                    found[block_id] = data
                    continue
                if ask_first is not None:  # a bad file here: `get` asks its server why
                    slow.append((block_id, None, False))
                    continue
            batch.append(block_id)
        if len(batch) > 1:
            slow += self._batch_fetch(batch, wanted, found)
        else:
            slow += [(block_id, None, False) for block_id in batch]
        if len(slow) == 1:  # no thread hop for the one block (a small file, a hole)
            block_id, asked, lacks = slow[0]
            found[block_id] = self._fetch_one(block_id, wanted[block_id], asked, lacks)
            return found
        fallbacks = {self._fanout.submit(self._fetch_one, b, wanted[b], m, bad): b
                     for b, m, bad in slow}
        for future, block_id in fallbacks.items():
            found[block_id] = future.result()
        return found

    def _batch_fetch(self, block_ids: list[str], checksums: dict[str, str],
                     found: dict[str, bytes]) -> list[tuple[str, str, bool]]:
        """Ask for `block_ids` in batches (`_read_plan`); what verifies goes into `found`.
        Returns the rest as (id, server asked, whether it answered it has no good copy)."""
        pending = {}
        for member_id, ids in self._read_plan(block_ids).items():
            for start in range(0, len(ids), self.config.batch_items):
                chunk = ids[start:start + self.config.batch_items]
                future = self._send(self._by_id[member_id], self.transport.batch_get, chunk)
                pending[future] = (member_id, chunk)
        slow: list[tuple[str, str, bool]] = []
        done, not_done = wait(pending, timeout=max(0.25, 4 * self.config.hedge_delay))
        for future in not_done:  # a hanging server: fetch its blocks elsewhere
            member_id, chunk = pending[future]
            slow += [(b, member_id, False) for b in chunk]
        for future in done:
            member_id, chunk = pending[future]
            answer = future.result() if future.exception() is None else {}
            for block_id in chunk:
                data = answer.get(block_id)
                if isinstance(data, bytes) and protocol.checksum(data) == checksums[block_id]:
                    found[block_id] = data
                else:
                    lacks = isinstance(data, bytes) or data in (protocol.MISSING,
                                                                 protocol.CORRUPT)
                    slow.append((block_id, member_id, lacks))
        return slow

    def _fetch_one(self, block_id: str, checksum: str, asked: str | None,
                   lacks: bool) -> bytes:
        """`get` of one block a batch did not bring, `asked` (the server the batch asked)
        tried last; when that server answered it has no good copy, and is a home, the
        block is put back on it."""
        member = None if asked is None else self._by_id[asked]
        data = self.get(block_id, checksum, () if member is None else (member,))
        if lacks and member in self.ranking(block_id)[:self.config.replicas]:
            self._read_repair(block_id, data, checksum, [member])
        return data

    def _read_plan(self, block_ids: list[str]) -> dict[str, list[str]]:
        """Server id -> the blocks of a batch read to ask it for. A batch of up to
        SMALL_BATCH blocks goes to as few usable servers as hold them all (greedily: the
        one holding most of what is left, ties to the first block's preferred one), so
        with a copy on every server it is one request: for small blocks the request costs
        more than the bytes. A larger batch is spread, each block to the first usable
        server of its ranking, so that the servers read in parallel."""
        homes = {b: self._by_preference(self.ranking(b)[:self.config.replicas])
                 for b in block_ids}
        plans: dict[str, list[str]] = {}
        left = block_ids if len(block_ids) <= SMALL_BATCH else []
        for block_id in block_ids[len(left):]:
            plans.setdefault(homes[block_id][0].id, []).append(block_id)
        while left:
            holders = collections.Counter(m.id for b in left for m in homes[b]
                                          if self.health.usable(m.id))
            if not holders:  # nothing usable: each to its first, as a larger batch
                for block_id in left:
                    plans.setdefault(homes[block_id][0].id, []).append(block_id)
                break
            first = homes[left[0]][0].id
            best = max(holders, key=lambda m: (holders[m], m == first))
            plans.setdefault(best, []).extend(
                b for b in left if any(m.id == best for m in homes[b]))
            left = [b for b in left if all(m.id != best for m in homes[b])]
        return plans

    # -- has / delete -----------------------------------------------------------------------

    def has_many(self, block_ids: list[str]) -> dict[str, bool]:
        answer = {b: False for b in block_ids}
        by_server: dict[str, list[str]] = {}
        for block_id in block_ids:
            homes = self.ranking(block_id)[:self.config.replicas]
            for member in self._by_preference(homes + self.leaving):
                by_server.setdefault(member.id, []).append(block_id)
        futures = [self._send(self._by_id[m], self.transport.batch_check, ids)
                   for m, ids in by_server.items()]
        reached = 0
        for future in futures:
            try:
                entries = future.result()
            except errors.StorageError:
                continue
            reached += 1
            for entry in entries:
                if entry["status"] == protocol.OK:
                    answer[entry["id"]] = True
        if not reached and block_ids:
            raise errors.Unavailable("no block server could be asked")
        return answer

    def delete_many(self, block_ids: list[str]) -> None:
        """Delete on every reachable server (handed-off copies may sit outside the homes)."""
        futures = []
        for member in self.servers:
            if self.health.usable(member.id):
                for start in range(0, len(block_ids), self.config.batch_items):
                    futures.append(self._send(member, self.transport.batch_delete,
                                              block_ids[start:start + self.config.batch_items]))
        for future in futures:
            try:
                future.result()
            except errors.StorageError as e:
                log.info("delete skipped on a server (garbage is collected later): %s", e)
        with self._lock:
            for missing in self._missing.values():
                for block_id in block_ids:
                    missing.pop(block_id, None)

    # -- repair -----------------------------------------------------------------------------

    def _remember_missing(self, member: Member, block_id: str, checksum: str) -> None:
        with self._lock:
            self._missing.setdefault(member.id, {})[block_id] = checksum
        self._damaged(block_id)

    def _read_repair(self, block_id: str, data: bytes, checksum: str, members) -> None:
        if members:
            self._damaged(block_id)
        for member in members:
            log.info("repairing block %s on %s", block_id, member.url)
            future = self._repairs.submit(self._repair_copy, member, block_id, data, checksum)
            future.add_done_callback(lambda f, m=member: self._read_repair_done(
                f, m, block_id, checksum))

    def _read_repair_done(self, future: Future, member: Member, block_id: str,
                          checksum: str) -> None:
        error = future.exception()
        if error is not None and not isinstance(error, errors.Rejected):
            self._remember_missing(member, block_id, checksum)  # a later round retries it
        # Rejected: this client's key may not write (a read-only mount); the writer repairs.

    def _repair_copy(self, member: Member, block_id: str, data: bytes, checksum: str) -> None:
        """Put a verified copy on `member`. A server holding other bytes under the id (with
        their own valid checksum, so it cannot tell) refuses the put with 409: those bytes
        are wrong, ours are verified, so the bad copy is deleted and ours put in its place."""
        try:
            self._call(member, self.transport.put_block, block_id, data, checksum)
        except errors.Conflict:
            log.warning("block %s on %s holds other bytes: replacing them with a verified "
                        "copy", block_id, member.url)
            self._call(member, self.transport.delete_block, block_id)
            self._call(member, self.transport.put_block, block_id, data, checksum)

    def _server_back(self, member_id: str) -> None:
        """A server answers again: repair its backlog at the probe loop's next turn."""
        with self._lock:
            self._repair_due[member_id] = (0.0, self.config.repair_min)

    def _repair_backlogs(self) -> None:
        """Start a repair round for each usable server with missing copies whose round is
        due. Copies refused one by one (507 full, 409, 422, a timeout of one request) do
        not mark a server down, so waiting for a down->up transition would never retry
        them; this does, with a back-off while rounds make no progress."""
        now = time.monotonic()
        for member in self.members:
            if not self.health.usable(member.id) or self._stopping.is_set():
                continue
            with self._lock:
                due = (self._missing[member.id] and member.id not in self._repairing
                       and self._repair_due[member.id][0] <= now)
                if due:
                    self._repairing.add(member.id)
            if due:
                try:
                    self._repairs.submit(self._repair_round, member.id)
                except RuntimeError:  # shutting down
                    with self._lock:
                        self._repairing.discard(member.id)

    def _repair_round(self, member_id: str) -> None:
        repaired = 0
        try:
            repaired = self.repair_server(member_id)
        except Exception:  # noqa: BLE001 - keep repairing later; say what happened
            log.exception("repair round failed")
        finally:
            with self._lock:
                self._repairing.discard(member_id)
                _, delay = self._repair_due[member_id]
                delay = self.config.repair_min if repaired else min(
                    2 * delay, self.config.repair_max)
                self._repair_due[member_id] = (time.monotonic() + delay, delay)

    def repair_backlog(self) -> int:
        with self._lock:
            return sum(len(m) for m in self._missing.values())

    def repair(self) -> int:
        """Copy every remembered missing block to its home now; returns how many were copied."""
        return sum(self.repair_server(m.id) for m in self.members if self.health.usable(m.id))

    def repair_server(self, member_id: str) -> int:
        """Copy the blocks `member_id` is missing to it, 64 at a time; returns how many
        left the backlog (landed, or deleted meanwhile). A round stops at the first chunk
        that lands nothing (the server is still full, say): the next round starts over
        after a back-off."""
        member = self._by_id[member_id]
        with self._lock:
            todo = list(self._missing[member_id].items())
        if not todo:
            return 0
        log.info("repairing %d block copies on %s", len(todo), member.url)
        repaired = gone = 0
        for start in range(0, len(todo), 64):
            try:
                landed, deleted = self._repair_chunk(member, todo[start:start + 64])
            except errors.StorageError as e:
                log.warning("repair of %s paused: %s (retried later)", member.url, e)
                break
            repaired += landed
            gone += deleted
            if not landed and not deleted:
                log.info("repair of %s paused: no copy of a batch landed (retried later)",
                         member.url)
                break
        log.info("repaired %d block copies on %s%s", repaired, member.url,
                 f" ({gone} others were deleted meanwhile: nothing to repair)" if gone else "")
        return repaired + gone

    def _fetch_for_repair(self, member: Member, chunk: list[tuple[str, str]]) -> dict:
        """The blocks of `chunk` that are still stored somewhere. A block on no server was
        deleted after its copy was remembered (its file went: a copy that failed in the
        background, or was given up, can be remembered after the delete); it leaves the
        backlog, or every later round would stop at it."""
        try:
            return self.get_many(chunk)
        except errors.BlockMissing:
            pass
        found = {}
        for block_id, checksum in chunk:
            try:
                found[block_id] = self.get(block_id, checksum)
            except errors.BlockMissing:
                with self._lock:
                    if self._missing[member.id].get(block_id) == checksum:
                        del self._missing[member.id][block_id]
        return found

    def _repair_chunk(self, member: Member, chunk: list[tuple[str, str]]) -> tuple[int, int]:
        """(copies that landed, blocks dropped from the backlog as deleted)."""
        blocks = self._fetch_for_repair(member, chunk)
        deleted = len(chunk) - len(blocks)
        chunk = [(b, c) for b, c in chunk if b in blocks]
        if not chunk:
            return 0, deleted
        statuses = self._call(member, self.transport.batch_put,
                              [(b, blocks[b], c) for b, c in chunk])
        landed = 0
        for (block_id, checksum), status in zip(chunk, statuses):
            if status == protocol.CONFLICT:  # other bytes under this id there: replace them
                try:
                    self._repair_copy(member, block_id, blocks[block_id], checksum)
                    status = protocol.STORED
                except errors.StorageError as e:
                    log.warning("repair of block %s on %s failed: %s", block_id,
                                member.url, e)
            if status not in protocol.PUT_OK:
                continue
            landed += 1
            with self._lock:
                if self._missing[member.id].get(block_id) == checksum:
                    del self._missing[member.id][block_id]
        return landed, deleted

    def stats(self) -> dict:
        states = self.health.snapshot()
        with self._lock:
            missing = {m: len(v) for m, v in self._missing.items()}
            latencies = dict(self._latencies)
            space = dict(self._server_space)
            local_reads = dict(self._local_reads)
        local = self._local
        leaving = set(m.id for m in self.leaving)
        return {"servers": [{"id": m.id, "url": m.url, "up": states[m.id].up,
                             "leaving": m.id in leaving,
                             "last_error": states[m.id].last_error,
                             "latency_ms": round(1000 * latencies[m.id], 2)
                             if m.id in latencies else None,
                             "capacity_bytes": space.get(m.id, (None, None))[0],
                             "free_bytes": space.get(m.id, (None, None))[1],
                             "missing_copies": missing.get(m.id, 0),
                             "files_read_directly": m.id in local,
                             "blocks_read_from_files": local_reads.get(m.id, 0)}
                            for m in self.servers],
                "repair_backlog": sum(missing.values()),
                "copies_behind_bytes": self.behind_bytes}
