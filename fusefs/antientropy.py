"""Anti-entropy repair: every live block gets R healthy copies on its homes.

Whether a block is healthy is a fact anyone can recompute, so nothing has to remember it:
the metadata names every live block and its checksum (`wanted`), and every server lists
what it holds with the checksum it was stored under. A *survey* joins the two:

- a block's homes are its first R servers in the rendezvous ranking of the members;
- a copy is healthy when a server lists it under the wanted checksum (a copy that rotted
  on disk is found by a scrub, which quarantines it, so it stops being listed);
- a home without a healthy copy is *missing* one; a copy on any other server (a hand-off:
  a home was down when the block was written, the membership changed, or the server is
  being drained) is *extra*.

A repair pass copies every missing copy from a healthy holder (verified against the
checksum on the way), then deletes each extra copy, but only after a fresh check shows all
R homes holding a healthy copy: no step ever leaves a block with fewer copies than it had.
Servers being drained (`leaving`) count everything they hold as wanted, so a drain moves
even blocks no metadata names yet (an upload in flight): it ends with the server empty.

Nothing is kept between passes but a summary, so a pass cut short (a crash, an unmount)
is resumed by the next one simply by surveying again: what was done is no longer damage.
Damage reported while serving (a copy found missing or bad by a read, a home that refused
a write, a server coming back) is repaired first ("newest damage first"), then the rest in
id order. The mounted writer runs passes in the background (`Repairer.start`), throttled
to `rate` bytes per second; `fusefs repair` runs one pass on demand.

A pass races harmlessly with the writer: a block it copies may have been dropped meanwhile
(an orphan copy, which `fusefs gc` collects); a block written after its survey is judged by
the next pass. Locks: `_lock` guards the counters and the queue of reported damage, and
is never held across a request.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from blockserver import protocol

from . import errors
from .leftovers import live_blocks
from .placement import rank
from .transport import Member

log = logging.getLogger("fusefs.antientropy")

# The mounted writer's first pass comes this many seconds after the mount, unless damage
# or a server's state calls for one sooner: a mount's first seconds are its user's (a
# pass of 60,000 blocks costs the servers about two seconds of CPU, measured).
FIRST_PASS = 30.0
DUTY = 20  # a periodic pass waits at least this many times as long as the last one took

LIST_PAGE = 5000
CHECK_CHUNK = 500
COPY_ITEMS = 16  # blocks per batch copy
COPY_BYTES = 16 << 20
COPY_STREAMS = 4  # batch copies in flight at once (reads of one overlap writes of another)


def wanted_blocks(metadata, store, checkpoint: dict, fs_id: str, *, chain: str,
                  segments: range) -> dict[str, str | None]:
    """Every live block (the one rule, leftovers.live_blocks, with garbage counted dead:
    nobody needs a dropped block repaired), with its checksum where the metadata has it
    (file data) and None for journal segments and checkpoint chunks."""
    wanted: dict[str, str | None] = {b: c for _, b, c in metadata.block_rows()}
    for block_id in live_blocks(metadata, store, checkpoint, fs_id, chain=chain,
                                segments=segments, keep_garbage=False):
        wanted.setdefault(block_id, None)
    # The fence tombstone of an old writer's chain is meant to be on every server (so no
    # W of them can take that writer's next segment), not on R homes: never moved.
    wanted.pop(checkpoint.get("fence"), None)
    return wanted


@dataclass
class Holdings:
    """What the servers listed: block id -> {server id: checksum}, sizes, and the servers
    that could not be listed (server id -> why)."""

    copies: dict[str, dict[str, str]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    unlisted: dict[str, str] = field(default_factory=dict)
    per_server: dict[str, int] = field(default_factory=dict)  # copies listed, any block


def list_holdings(transport, servers: list[Member], should_stop=lambda: False) -> Holdings:
    """List every server, page by page."""
    found = Holdings()
    for member in servers:
        after, count = "", 0
        try:
            while not should_stop():
                page, after = transport.list_blocks(member, after, LIST_PAGE)
                for entry in page:
                    found.copies.setdefault(entry["id"], {})[member.id] = entry["checksum"]
                    found.sizes[entry["id"]] = entry["size"]
                count += len(page)
                if not after:
                    break
        except errors.StorageError as e:
            found.unlisted[member.id] = str(e)
            continue
        found.per_server[member.id] = count
    return found


@dataclass
class Damage:
    """One block that is not where it should be, and what to do about it."""

    block_id: str
    checksum: str
    size: int
    missing: list[Member]  # homes without a healthy copy that can be given one
    extra: list[Member]  # healthy copies outside the homes, to delete once homes are full
    sources: list[Member]  # servers holding a healthy copy


@dataclass
class Survey:
    """The state of every wanted block, from one listing."""

    blocks: int = 0
    under_replicated: int = 0  # fewer than R healthy copies on its homes
    lost: list[str] = field(default_factory=list)  # no healthy copy on any listed server
    handoffs: int = 0  # healthy copies on servers that are not its homes
    should_hold: dict[str, int] = field(default_factory=dict)  # server id -> homed blocks
    holds: dict[str, int] = field(default_factory=dict)  # server id -> healthy homed copies
    damage: list[Damage] = field(default_factory=list)
    unlisted: dict[str, str] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return not (self.under_replicated or self.handoffs or self.unlisted)

    def summary(self) -> dict:
        return {"blocks": self.blocks, "under_replicated": self.under_replicated,
                "lost": len(self.lost), "handoffs": self.handoffs,
                "unlisted": dict(self.unlisted)}


def survey(wanted: dict[str, str | None], holdings: Holdings, members: list[Member],
           leaving: list[Member], replicas: int) -> Survey:
    """Judge every wanted block (checksum None: whatever most holders list) and every
    copy on a leaving server against the membership."""
    result = Survey(unlisted=dict(holdings.unlisted))
    everyone = {m.id: m for m in members + leaving}
    wanted = dict(wanted)
    for member in leaving:  # a drain moves everything
        for block_id, holders in holdings.copies.items():
            if member.id in holders:
                wanted.setdefault(block_id, None)
    result.should_hold = {m.id: 0 for m in members}
    result.holds = {m.id: 0 for m in members}
    for block_id, checksum in wanted.items():
        holders = holdings.copies.get(block_id, {})
        if checksum is None:
            if not holders:
                continue  # (a segment or checkpoint chunk not stored yet: nothing to judge)
            checksums = list(holders.values())
            checksum = max(set(checksums), key=checksums.count)
        _judge(result, block_id, checksum, holdings, holders, members, everyone, replicas)
    return result


def _judge(result: Survey, block_id: str, checksum: str, holdings: Holdings, holders: dict,
           members: list[Member], everyone: dict, replicas: int) -> None:
    result.blocks += 1
    homes = rank(block_id, members)[:replicas]
    good = [everyone[s] for s, c in holders.items() if c == checksum and s in everyone]
    for home in homes:
        result.should_hold[home.id] += 1
        if home in good:
            result.holds[home.id] += 1
    missing = [h for h in homes if h not in good]
    extra = [m for m in good if m not in homes]
    result.handoffs += len(extra)
    if missing:
        result.under_replicated += 1
    if not good:
        if not holdings.unlisted:
            result.lost.append(block_id)
        return
    reachable = [h for h in missing if h.id not in holdings.unlisted]
    if reachable or extra:
        result.damage.append(Damage(block_id, checksum, holdings.sizes.get(block_id, 0),
                                    reachable, extra, good))


@dataclass
class PassReport:
    """What one repair pass found and did."""

    started: float
    finished: float | None = None
    found: int = 0  # copies missing on homes, plus copies outside their homes
    copied: int = 0
    present: int = 0  # found on its target already (copied meanwhile by someone else)
    moved: int = 0  # hand-off copies deleted once every home had the block
    failed: int = 0
    dropped: int = 0  # deleted everywhere since the survey (their file went): nothing to do
    bytes_copied: int = 0
    survey: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def tally(self, **counts) -> None:
        """Add to the counters (copies run in parallel)."""
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)

    @property
    def fixed(self) -> int:
        return self.copied + self.moved

    def as_dict(self) -> dict:
        return {"started": self.started, "finished": self.finished, "found": self.found,
                "fixed": self.fixed, "copied": self.copied, "present": self.present,
                "moved": self.moved, "dropped": self.dropped,
                "failed": self.failed, "bytes_copied": self.bytes_copied,
                "survey": self.survey, "errors": self.errors[-10:]}


class _Throttle:
    """At most `rate` bytes per second on average (None: no limit)."""

    def __init__(self, rate: float | None, stop: threading.Event):
        self.rate, self.stop = rate, stop
        self.started, self.sent = time.monotonic(), 0
        self._lock = threading.Lock()

    def spend(self, nbytes: int) -> None:
        with self._lock:
            self.sent += nbytes
            sent = self.sent
        if self.rate:
            ahead = sent / self.rate - (time.monotonic() - self.started)
            if ahead > 0:
                self.stop.wait(ahead)


class Repairer:
    """Repair passes over a ReplicatedStore, on demand (`run_pass`) or in the background.

    `wanted()` returns {block id: checksum or None} for every live block, read before the
    servers are listed (so every block it names was stored before the listing began).
    States: idle → surveying → copying → moving → idle; `close` stops at the next step.
    """

    def __init__(self, store, wanted: Callable[[], dict[str, str | None]], *,
                 rate: float | None = None, interval: float = 60.0,
                 first_pass: float = FIRST_PASS,
                 membership: Callable[[], tuple] | None = None,
                 down_out: float | None = None,
                 progress: Callable[[str], None] = lambda message: None,
                 copying: Callable[[int, int, int], None] = lambda done, total, nbytes: None):
        self.store, self.transport = store, store.transport
        self.wanted, self.rate, self.interval = wanted, rate, interval
        self.first_pass = first_pass
        self.progress = progress  # a step, in words
        self.copying = copying  # (copies made, copies to make, bytes copied) as it goes
        self.membership = membership  # () -> (members, leaving) as the superblock says now
        # A member down for longer than this stops counting as a home (its blocks get
        # their R copies on the next servers of their ranking) until it answers again.
        self.down_out = down_out
        self._down_since: dict[str, float] = {}
        self._homes: list[Member] = store.members
        self._judged = _view_ids(store.members, store.leaving)  # the view a survey used
        self._lock = threading.Lock()
        self._reported: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: PassReport | None = None  # the last finished pass
        self.current: PassReport | None = None
        self.last_survey: Survey | None = None
        store.on_damage(self.report_damage)
        store.health.on_up(lambda _member: self._kick.set())

    # -- background -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="repair", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop at the next step, without waiting (a fenced writer's metadata is stale:
        nothing it names may be copied any more)."""
        self._stop.set()
        self._kick.set()

    def close(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def report_damage(self, block_id: str) -> None:
        """A copy of `block_id` was found missing or bad: repair it at the next pass, first."""
        with self._lock:
            self._reported[block_id] = None
            self._reported.move_to_end(block_id)
            while len(self._reported) > 100_000:
                self._reported.popitem(last=False)
        self._kick.set()

    def _run(self) -> None:
        """Passes: at reported damage or a change of the servers' states or homes, at once;
        else `first_pass` seconds after start, then every `interval` seconds, but never
        more than 1/DUTY of the time (a pass of a large filesystem lists every block of
        every server: it must not become the servers' main work)."""
        seen = None
        next_pass = time.monotonic() + self.first_pass
        while not self._stop.is_set():
            self._kick.wait(1.0)
            states = {m: s.up for m, s in self.store.health.snapshot().items()}
            view = (states, [m.id for m in self.homes_among()])
            if seen is None:  # the view at start is no change
                seen = view
            if self._kick.is_set() or view != seen or time.monotonic() >= next_pass:
                self._kick.clear()
                seen = view
                began = time.monotonic()
                try:
                    if self.run_pass().fixed:
                        self._kick.set()  # survey again: what is left, and fresh figures
                except Exception as e:  # noqa: BLE001 - the next pass tries again
                    log.warning("repair pass failed (retried later): %s", e,
                                exc_info=not isinstance(e, errors.StorageError))
                took = time.monotonic() - began
                next_pass = time.monotonic() + max(self.interval, DUTY * took)

    # -- one pass ---------------------------------------------------------------------------

    def homes_among(self, listed=None) -> list[Member]:
        """The members homes are ranked among: all of them, but those down for longer than
        `down_out` while enough others remain for R copies; a server `listed` just now
        counts whatever its health says (its state lags behind)."""
        now = time.monotonic()
        states = self.store.health.snapshot()
        for member_id, state in states.items():
            if state.up:
                self._down_since.pop(member_id, None)
            else:
                self._down_since.setdefault(member_id, now)
        members = self.store.members
        if self.down_out is None:
            return members
        out = {m for m, t in self._down_since.items() if now - t >= self.down_out}
        out -= set(listed or ())
        kept = [m for m in members if m.id not in out]
        return kept if len(kept) >= self.store.config.replicas else members

    def check(self) -> Survey:
        """Survey without repairing."""
        wanted = self.wanted()
        self._judged = _view_ids(self.store.members, self.store.leaving)
        holdings = list_holdings(self.transport, self.store.servers, self._stop.is_set)
        self._homes = self.homes_among(holdings.per_server)
        found = survey(wanted, holdings, self._homes, self.store.leaving,
                       self.store.config.replicas)
        self.last_survey = found
        return found

    def run_pass(self, move: bool = True) -> PassReport:
        """Survey, then repair; `move` False leaves hand-off copies where they are."""
        report = PassReport(started=time.time())
        self.current = report
        try:
            self.progress("listing the blocks on every server")
            found = self.check()
            report.survey = found.summary()
            report.found = sum(len(d.missing) + len(d.extra) for d in found.damage)
            for server, why in found.unlisted.items():
                report.errors.append(f"server {server} could not be listed: {why}")
            if found.damage:
                self._repair(self._ordered(found.damage), report, move)
        finally:
            report.finished = time.time()
            self.current = None
            self.last = report
        if report.found:
            log.info("repair pass: %d copies found out of place, %d copied, %d hand-offs "
                     "moved, %d no longer needed (their files were removed meanwhile), "
                     "%d failed", report.found, report.copied, report.moved, report.dropped,
                     report.failed)
        return report

    def _ordered(self, damage: list[Damage]) -> list[Damage]:
        """Reported damage first, newest report first; then the rest by id."""
        with self._lock:
            order = {b: i for i, b in enumerate(reversed(self._reported))}
        first = sorted((d for d in damage if d.block_id in order),
                       key=lambda d: order[d.block_id])
        rest = sorted((d for d in damage if d.block_id not in order), key=lambda d: d.block_id)
        return first + rest

    def _repair(self, damage: list[Damage], report: PassReport, move: bool) -> None:
        throttle = _Throttle(self.rate, self._stop)
        total = sum(len(d.missing) for d in damage)
        by_target: dict[str, list[Damage]] = {}
        for item in damage:
            for member in item.missing:
                by_target.setdefault(member.id, []).append(item)
        jobs = [(_member(items[0].missing, target_id), chunk)
                for target_id, items in by_target.items() for chunk in _chunks(items)]

        shown = threading.Lock()  # one progress line at a time

        def copy(job) -> None:
            if not self._stop.is_set():
                self._copy_chunk(*job, report, throttle)
                with shown:
                    self.copying(report.copied + report.present, total, report.bytes_copied)

        with ThreadPoolExecutor(COPY_STREAMS, thread_name_prefix="repair-copy") as pool:
            list(pool.map(copy, jobs))
        if self._stop.is_set():
            return
        if move:
            self._move_handoffs([d for d in damage if d.extra], report)
        with self._lock:
            for item in damage:
                self._reported.pop(item.block_id, None)

    def _copy_chunk(self, target: Member, chunk: list[Damage], report: PassReport,
                    throttle: _Throttle) -> None:
        """Copy one batch to `target`: what it holds by now is skipped (the mounted
        writer and a command may repair the same blocks at once), the rest is read from a
        holder, verified, and put."""
        try:
            chunk = self._still_missing(target, chunk, report)
            data, dropped = self._fetch(chunk)
        except errors.StorageError as e:
            report.tally(failed=len(chunk))
            report.error(f"could not copy blocks to {target.url}: {e}")
            return
        items = [(d.block_id, data[d.block_id], d.checksum) for d in chunk if d.block_id in data]
        report.tally(dropped=dropped, failed=len(chunk) - len(items) - dropped)
        if not items:
            return
        try:
            statuses = self.store._call(target, self.transport.batch_put, items)
        except errors.StorageError as e:
            report.tally(failed=len(items))
            report.error(f"could not copy blocks to {target.url}: {e}")
            return
        for (block_id, raw, checksum), status in zip(items, statuses):
            if status == protocol.CONFLICT:  # other bytes under this id: replace them
                try:
                    self.store._repair_copy(target, block_id, raw, checksum)
                    status = protocol.STORED
                except errors.StorageError as e:
                    report.error(f"block {block_id} on {target.url}: {e}")
            if status in protocol.PUT_OK:
                report.tally(copied=1, bytes_copied=len(raw))
                throttle.spend(len(raw))
            else:
                report.tally(failed=1)

    def _still_missing(self, target: Member, chunk: list[Damage],
                       report: PassReport) -> list[Damage]:
        entries = self.store._call(target, self.transport.batch_check,
                                   [d.block_id for d in chunk])
        held = {e["id"]: e.get("checksum") for e in entries if e["status"] == protocol.OK}
        rest = [d for d in chunk if held.get(d.block_id) != d.checksum]
        report.tally(present=len(chunk) - len(rest))
        return rest

    def _fetch(self, chunk: list[Damage]) -> tuple[dict[str, bytes], int]:
        """The verified bytes of each block, from a holder the survey saw (by batch), or
        wherever the store finds them; and how many no server holds any more (deleted
        since the survey: only the garbage collector deletes blocks)."""
        found: dict[str, bytes] = {}
        by_source: dict[str, list[Damage]] = {}
        for item in chunk:
            usable = [m for m in item.sources if self.store.health.usable(m.id)]
            if usable:
                by_source.setdefault(usable[0].id, []).append(item)
        for source_id, items in by_source.items():
            source = _member(items[0].sources, source_id)
            try:
                answer = self.store._call(source, self.transport.batch_get,
                                          [d.block_id for d in items])
            except errors.StorageError:
                continue
            for item in items:
                raw = answer.get(item.block_id)
                if isinstance(raw, bytes) and protocol.checksum(raw) == item.checksum:
                    found[item.block_id] = raw
        dropped = 0
        for item in chunk:
            if item.block_id not in found:
                try:
                    found[item.block_id] = self.store.get(item.block_id, item.checksum)
                except errors.BlockMissing:
                    dropped += 1
        return found, dropped

    def _move_handoffs(self, damage: list[Damage], report: PassReport) -> None:
        """Delete copies outside the homes, each only once every home has a healthy copy."""
        if not damage or not self._view_current():
            return
        self.progress(f"checking the homes of {len(damage)} blocks with copies elsewhere")
        complete = self._homes_complete(damage)
        by_server: dict[str, list[str]] = {}
        for item in damage:
            if item.block_id in complete:
                for member in item.extra:
                    by_server.setdefault(member.id, []).append(item.block_id)
        everyone = {m.id: m for d in damage for m in d.extra}
        for server_id, ids in by_server.items():
            member = everyone[server_id]
            for start in range(0, len(ids), CHECK_CHUNK):
                part = ids[start:start + CHECK_CHUNK]
                if not self._view_current():
                    return
                try:
                    self.store._call(member, self.transport.batch_delete, part)
                    report.moved += len(part)
                except errors.StorageError as e:
                    report.errors.append(f"could not delete hand-off copies on "
                                         f"{member.url}: {e}")

    def _view_current(self) -> bool:
        """Whether the membership the survey judged by is still the superblock's. Homes
        judged by an old view may not be homes any more: deleting by it could race a
        drain that judges by the new one. A changed view is adopted; its hand-offs wait
        for the next pass. Asked again before every batch of deletes."""
        if self.membership is None:
            return True
        members, leaving = self.membership()
        self.store.set_membership(members, leaving)
        if _view_ids(members, leaving) != self._judged:
            log.info("the membership changed during a repair pass; hand-offs wait for "
                     "the next pass")
            self._kick.set()
            return False
        return True

    def _homes_complete(self, damage: list[Damage]) -> set[str]:
        """Ids of the blocks whose every home now lists a healthy copy (asked afresh)."""
        members, replicas = self._homes, self.store.config.replicas
        expected = {d.block_id: d.checksum for d in damage}
        homes = {b: rank(b, members)[:replicas] for b in expected}
        good: dict[str, int] = collections.Counter()
        by_home: dict[Member, list[str]] = {}
        for block_id, places in homes.items():
            for member in places:
                by_home.setdefault(member, []).append(block_id)
        for member, ids in by_home.items():
            for start in range(0, len(ids), CHECK_CHUNK):
                try:
                    entries = self.store._call(member, self.transport.batch_check,
                                               ids[start:start + CHECK_CHUNK])
                except errors.StorageError:
                    break
                for entry in entries:
                    if entry["status"] == protocol.OK and \
                            entry.get("checksum") == expected[entry["id"]]:
                        good[entry["id"]] += 1
        return {b for b in expected if good[b] >= len(homes[b])}

    # -- figures ----------------------------------------------------------------------------

    def stats(self) -> dict:
        last, current, found = self.last, self.current, self.last_survey
        return {"under_replicated": found.under_replicated if found else None,
                "handoffs": found.handoffs if found else None,
                "lost": len(found.lost) if found else None,
                "surveyed_blocks": found.blocks if found else None,
                "copies": {s: {"should_hold": n, "holds": found.holds.get(s, 0)}
                           for s, n in found.should_hold.items()} if found else {},
                "running": current is not None,
                "last_repair": last.as_dict() if last else None}


def _view_ids(members, leaving) -> tuple:
    return tuple(m.id for m in members), tuple(m.id for m in leaving)


def _member(members: list[Member], member_id: str) -> Member:
    return next(m for m in members if m.id == member_id)


def _chunks(items: list[Damage]):
    chunk, size = [], 0
    for item in items:
        if chunk and (len(chunk) >= COPY_ITEMS or size + item.size > COPY_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item.size
    if chunk:
        yield chunk
