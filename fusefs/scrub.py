"""`fusefs scrub`: read and verify every copy of every block on every server, and put a
verified copy back wherever one was bad.

A pass walks each server's own listing (ids in order, a page at a time), so it needs no
metadata: for each batch of ids the server re-reads the files and compares them with
their checksums (`batch_check` with `verify`). A copy that fails is quarantined by the
server itself (answered 410, CORRUPT); the scrubber then fetches the block from another
server (each server verifies what it sends, and the bytes are checked again here against
the checksum its listing gave) and puts it back on the server that lost it. A block with
no intact copy anywhere is reported by id, never replaced with other bytes. A server
bounds the bytes it verifies per request and answers the rest TOO_LARGE: they are asked
again. A block listed and then deleted (404) was removed by its writer meanwhile: not
counted.

States: between passes the state file holds the last finished pass (`last`: when it
finished and its counts); during a pass it also holds `pass`: per server a cursor (the
last id verified) and the pass's counts so far. It is rewritten (atomically) after every
batch, so a scrub stopped in any way (Ctrl-C, kill -9, a server down, the mount
unmounted) continues after the cursor at its next run and its counts add up; a pass ends
when every server of the membership reached the end of its listing. A state file of
another filesystem is ignored.

Invariant: a cursor only moves past ids whose copies were verified, or found bad and
handled (repaired, or recorded as unrepairable); so an interruption loses no finding.
One scrubber at a time per state file (an flock on `<state>.lock`); the others are told
so (ScrubBusy). Reads go at most at `rate` bytes per second (`Throttle`). No lock is held
across network I/O except that file lock, which only excludes other scrubbers.

Exit meaning (`ScrubReport.exit_status`): 0 every copy good or repaired, 1 a block could
not be repaired, 2 the pass could not finish (a server unreachable, stopped).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from blockserver import protocol
from blockserver.protocol import format_size

from . import errors
from .mounts import write_json
from .transport import Member, Transport

log = logging.getLogger("fusefs.scrub")

STATE_VERSION = 1
BACKGROUND_RATE = 4 << 20  # bytes/s a mount's background scrubber reads at
LIST_PAGE = 1000  # ids asked per listing request
BATCH_ITEMS = 256  # ids per verify request, at most
BATCH_BYTES = 8 << 20  # bytes per verify request, at most (fewer when throttled)
_COUNTS = ("checked", "bytes", "corrupt", "repaired", "unrepairable")


class ScrubBusy(Exception):
    """Another scrubber holds this state file."""


class _Stopped(Exception):
    """The scrubber was asked to stop (the mount ends)."""


@dataclass
class ServerCounts:
    """One server's results in one run (not the whole pass: see the state file)."""

    id: str
    url: str
    checked: int = 0  # copies verified good
    bytes: int = 0  # bytes verified
    corrupt: int = 0  # copies found bad (quarantined by the server)
    repaired: int = 0  # of those, put back from a good copy
    unrepairable: int = 0  # of those, with no intact copy anywhere
    unrepairable_ids: list = field(default_factory=list)
    resumed_from: str = ""  # the cursor this run started after ("" from the start)
    finished: bool = False  # the end of this server's listing was reached in this pass
    error: str | None = None  # why this server could not be scrubbed to its end


@dataclass
class ScrubReport:
    servers: list[ServerCounts]
    complete: bool = False  # the pass ended: every server reached its end
    last: dict | None = None  # the state file's last finished pass

    def totals(self) -> dict:
        return {k: sum(getattr(s, k) for s in self.servers) for k in _COUNTS}

    @property
    def exit_status(self) -> int:
        if not self.complete:
            return 2
        return 1 if self.totals()["unrepairable"] else 0

    def as_dict(self) -> dict:
        return {"complete": self.complete, "exit_status": self.exit_status,
                "totals": self.totals(), "servers": [asdict(s) for s in self.servers],
                "last_scrub": self.last}


class Throttle:
    """At most `rate` bytes per second on average (None: no limit). `spend(n)` after
    reading n bytes waits until the reads so far fit the rate; `stop` ends a wait."""

    def __init__(self, rate: float | None, stop: threading.Event):
        self.rate, self._stop = rate, stop
        self._next = time.monotonic()

    def batch_bytes(self) -> int:
        """Bytes worth asking for at once: a second's worth when throttled."""
        return BATCH_BYTES if not self.rate else max(1, min(BATCH_BYTES, int(self.rate)))

    def spend(self, n: int) -> None:
        if self._stop.is_set():
            raise _Stopped()
        if not self.rate:
            return
        now = time.monotonic()
        self._next = max(self._next, now) + n / self.rate
        if self._stop.wait(max(0.0, self._next - now)):
            raise _Stopped()


# -- the state file ----------------------------------------------------------------------------

def _fresh_state(fs_id: str) -> dict:
    return {"version": STATE_VERSION, "fs_id": fs_id, "pass": None, "last": None}


def load_state(path: str, fs_id: str) -> dict:
    """The state of `path`, or a fresh one when it is absent, unreadable or another
    filesystem's (a scrub then starts from the beginning)."""
    try:
        with open(path) as f:
            state = json.load(f)
    except (FileNotFoundError, ValueError, OSError):
        return _fresh_state(fs_id)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or \
            state.get("fs_id") != fs_id:
        return _fresh_state(fs_id)
    return state


def _new_entry() -> dict:
    """A server's part of a pass: cursor, whether it reached its end, the pass's counts,
    and `pending`: [id, checksum] of bad copies (already quarantined, so no longer listed)
    whose repair waits for a server that could not be reached."""
    return {"cursor": "", "done": False, "unrepairable_ids": [], "pending": [],
            **{k: 0 for k in _COUNTS}}


def _summary(entries: Sequence[dict], finished: float | None) -> dict:
    totals = {k: sum(e[k] for e in entries) for k in _COUNTS}
    ids = sorted({i for e in entries for i in e["unrepairable_ids"]})
    return {"finished": finished, **totals, "unrepairable_ids": ids[:1000]}


def _lock(path: str):
    """The file lock of the state at `path`, or ScrubBusy."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    handle = open(path + ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ScrubBusy(f"another scrub of this filesystem is running with {path} (a "
                        "mount's background scrub, or another `fusefs scrub`); wait for "
                        "it, or give this one its own --state FILE") from None
    return handle


# -- the scrubber ------------------------------------------------------------------------------

class _Run:
    """One run of a pass: the state file's content, the servers in order, and per server
    this run's counts and the pass's counts as they were when the run began."""

    def __init__(self, state: dict, servers: Sequence[Member]):
        self.state, self.servers = state, list(servers)
        self.entries = state["pass"]["servers"]
        for member in self.servers:
            entry = self.entries.setdefault(member.id, _new_entry())
            entry.setdefault("pending", [])
        self.counts = {m.id: ServerCounts(m.id, m.url,
                                          resumed_from=self.entries[m.id]["cursor"],
                                          finished=self.entries[m.id]["done"])
                       for m in self.servers}
        self.bases = {m.id: {k: self.entries[m.id][k] for k in _COUNTS} for m in self.servers}

    def fold(self) -> None:
        """The pass's counts = as they were at the run's start + this run's."""
        for member in self.servers:
            entry, counts = self.entries[member.id], self.counts[member.id]
            for k in _COUNTS:
                entry[k] = self.bases[member.id][k] + getattr(counts, k)
            entry["unrepairable_ids"] = sorted(set(entry["unrepairable_ids"])
                                               | set(counts.unrepairable_ids))[:1000]


class Scrubber:
    """Scrub passes over the servers `servers()` names (read at the start of each pass, so
    membership changes are followed), resumable through the state file at `state_path`.

    `progress(done, total, nbytes, line)` is called after every batch (copies verified
    in this run, copies expected, bytes verified; line None) and at every step worth a
    line of its own (a fusefs.progress.Progress shows them). `start(interval)` runs one
    pass per interval in a thread until `stop()`; `stats()` is safe from any thread."""

    def __init__(self, transport: Transport, servers: Callable[[], Sequence[Member]],
                 state_path: str, fs_id: str, *, rate: float | None = None,
                 progress: Callable[[int, int, int, str | None], None] | None = None):
        self.transport, self._servers = transport, servers
        self.state_path, self.fs_id = state_path, fs_id
        self._stop = threading.Event()
        self.throttle = Throttle(rate, self._stop)
        self.progress = progress or (lambda done, total, nbytes, line: None)
        self._lock = threading.Lock()  # guards _running; never held over I/O
        self._running = False
        self._thread: threading.Thread | None = None
        self._done = self._total = self._bytes = 0  # of this run, for progress

    def _say(self, line: str | None) -> None:
        self.progress(self._done, self._total, self._bytes, line)

    # -- one pass ------------------------------------------------------------------------

    def run_pass(self, restart: bool = False) -> ScrubReport:
        """Scrub until the pass ends, a server fails, or `stop()`; ScrubBusy if another
        scrubber holds the state file."""
        lock = _lock(self.state_path)
        with self._lock:
            self._running = True
        try:
            return self._pass(restart)
        finally:
            with self._lock:
                self._running = False
            lock.close()

    def _pass(self, restart: bool) -> ScrubReport:
        state = load_state(self.state_path, self.fs_id)
        if restart or state["pass"] is None:
            state["pass"] = {"started": time.time(), "servers": {}}
        run = _Run(state, self._servers())
        report = ScrubReport([run.counts[m.id] for m in run.servers], last=state["last"])
        self._plan(run)
        for member in run.servers:
            entry = run.entries[member.id]
            if entry["done"] and not entry["pending"]:
                continue
            try:
                if entry["done"]:  # bad copies found from another server's scrub
                    self._retry_pending(run, member)
                else:
                    self._scrub_server(run, member)
            except errors.StorageError as e:
                run.counts[member.id].error = str(e)
                self._say(f"{member.url}: could not finish: {e}")
            except _Stopped:
                break
        run.fold()
        if all(run.entries[m.id]["done"] and not run.entries[m.id]["pending"]
               for m in run.servers):
            state["last"] = _summary([run.entries[m.id] for m in run.servers], time.time())
            state["pass"] = None
            report.complete = True
            report.last = state["last"]
        write_json(self.state_path, state)
        return report

    def _plan(self, run: _Run) -> None:
        """How many copies this run should verify: what each server's status says it
        holds, less what this pass already verified there."""
        self._done = self._total = self._bytes = 0
        for member in run.servers:
            entry = run.entries[member.id]
            if entry["done"]:
                continue
            try:
                held = self.transport.status(member)["block_count"]
            except (errors.StorageError, KeyError, TypeError, ValueError):
                continue
            self._total += max(0, held - entry["checked"] - entry["corrupt"])

    def _scrub_server(self, run: _Run, member: Member) -> None:
        entry, counts = run.entries[member.id], run.counts[member.id]
        where = f"after {entry['cursor'][:8]}..." if entry["cursor"] else "from the start"
        self._say(f"{member.url}: verifying every copy {where}")
        after = entry["cursor"]
        while True:
            page, following = self.transport.list_blocks(member, after, LIST_PAGE)
            for batch in _batches(page, self.throttle.batch_bytes()):
                self._verify(run, member, batch)
                entry["cursor"] = batch[-1]["id"]
                run.fold()
                write_json(self.state_path, run.state)
            if following is None:
                break
            after = following
        self._retry_pending(run, member)
        entry["done"] = counts.finished = True
        run.fold()
        write_json(self.state_path, run.state)
        self._say(f"{member.url}: done: {_counts_text(counts)}")

    def _retry_pending(self, run: _Run, member: Member) -> None:
        """Repair the bad copies whose repair had to wait; Unavailable if some still wait."""
        entry = run.entries[member.id]
        waiting, entry["pending"] = entry["pending"], []
        for block_id, checksum in waiting:
            self._fix(run, member, block_id, checksum)
        if entry["pending"]:
            raise errors.Unavailable(f"{len(entry['pending'])} bad copies on {member.url} "
                                     "wait for a repair: a server holding them could not be "
                                     "reached")
        run.counts[member.id].error = None

    def _verify(self, run: _Run, member: Member, batch: list[dict]) -> None:
        """Verify the copies of `batch` on `member`, asking again for those the server
        left for another request, and repair every bad one before returning."""
        counts = run.counts[member.id]
        listed = {e["id"]: e for e in batch}
        todo = list(listed)
        while todo:
            answers = self.transport.batch_check(member, todo, verify=True)
            again, read, verified = [], 0, 0
            for answer in answers:
                block_id, status = answer["id"], answer["status"]
                if status == protocol.OK:
                    counts.checked += 1
                    counts.bytes += answer["size"]
                    read += answer["size"]
                    verified += 1
                elif status == protocol.TOO_LARGE:
                    again.append(block_id)
                elif status == protocol.CORRUPT:
                    read += listed[block_id]["size"]
                    verified += 1
                    counts.corrupt += 1
                    self._fix(run, member, block_id, listed[block_id]["checksum"])
                # MISSING: deleted since it was listed (its writer dropped it): nothing to do
            if again and len(again) == len(todo):
                raise errors.Unavailable(f"{member.url} verified none of {len(todo)} blocks "
                                         "asked for (its batch limit is too small)")
            todo = again
            self._done += verified
            self._bytes += read
            self._say(None)
            self.throttle.spend(read)

    # -- repair --------------------------------------------------------------------------

    def _fix(self, run: _Run, member: Member, block_id: str, checksum: str) -> None:
        """Repair one bad copy; when a server needed for it fails, the copy joins the
        entry's `pending` (it is quarantined, so the listing will not show it again)."""
        try:
            self._repair(run, member, block_id, checksum)
        except errors.StorageError as e:
            run.entries[member.id]["pending"].append([block_id, checksum])
            run.counts[member.id].error = f"repair of block {block_id} waits: {e}"
            self._say(f"{member.url}: block {block_id} is bad; its repair waits: {e}")

    def _repair(self, run: _Run, member: Member, block_id: str, listed_checksum: str) -> None:
        """Put an intact copy from another server on `member`, and on every other server
        found holding a bad copy meanwhile (its server quarantined it while sending it:
        counted there as found)."""
        found, bad = self._good_copy(run, member, block_id, listed_checksum)
        for other in bad:
            run.counts[other.id].corrupt += 1
        if found is None:
            for holder in [member, *bad]:
                run.counts[holder.id].unrepairable += 1
                run.counts[holder.id].unrepairable_ids.append(block_id)
            log.error("block %s: no server holds an intact copy (bad on %s); it cannot be "
                      "repaired", block_id, ", ".join(m.url for m in [member, *bad]))
            self._say(f"{member.url}: block {block_id} is bad and has NO intact copy "
                      "anywhere (unrepairable)")
            return
        data, checksum = found
        for other in bad:
            try:
                self._put(other, block_id, data, checksum)
                run.counts[other.id].repaired += 1
            except errors.StorageError as e:
                run.entries[other.id]["pending"].append([block_id, checksum])
                self._say(f"{other.url}: block {block_id} is bad; its repair waits: {e}")
        self._put(member, block_id, data, checksum)
        run.counts[member.id].repaired += 1
        self._say(f"{member.url}: block {block_id} was bad; repaired from another copy")

    def _put(self, member: Member, block_id: str, data: bytes, checksum: str) -> None:
        try:
            self.transport.put_block(member, block_id, data, checksum)
        except errors.Conflict:  # other bytes under the id appeared there: ours are verified
            self.transport.delete_block(member, block_id)
            self.transport.put_block(member, block_id, data, checksum)
        log.info("block %s: bad copy on %s replaced with a verified one", block_id,
                 member.url)

    def _good_copy(self, run: _Run, member: Member, block_id: str, listed_checksum: str):
        """((bytes, checksum) of an intact copy on another server or None, [servers that
        answered their copy is bad]).

        A copy matching the checksum `member` listed is taken at once. If none does, the
        damage may have hit that checksum (in the file's header) instead of the bytes: a
        copy is then taken only when every intact copy found agrees on one checksum.
        Raises Unavailable when no copy was found but a server could not be asked."""
        copies: dict[str, bytes] = {}
        bad, unreachable = [], []
        for other in run.servers:
            if other.id == member.id:
                continue
            try:
                data = self.transport.get_block(other, block_id)
            except errors.BlockCorrupt:
                bad.append(other)
                continue
            except errors.BlockMissing:
                continue
            except errors.StorageError as e:
                unreachable.append(f"{other.url}: {e}")
                continue
            checksum = protocol.checksum(data)
            if checksum == listed_checksum:
                return (data, checksum), bad
            copies[checksum] = data
        if len(copies) == 1:
            return next((data, checksum) for checksum, data in copies.items()), bad
        if not copies and unreachable:
            for other in bad:  # found bad, not repaired: they wait with this one
                run.entries[other.id]["pending"].append([block_id, listed_checksum])
                run.counts[other.id].corrupt += 1
            raise errors.Unavailable(f"block {block_id} is bad on {member.url} and the "
                                     "servers that may hold it could not be asked: "
                                     + "; ".join(unreachable))
        return None, bad

    # -- in the background ---------------------------------------------------------------

    def start(self, interval: float) -> None:
        """One pass now (continuing an interrupted one), then one every `interval`
        seconds after the last pass finished, in a daemon thread, until `stop()`."""
        self._thread = threading.Thread(target=self._loop, args=(interval,),
                                        name="scrubber", daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            delay = self._delay(interval)
            if delay > 0 and self._stop.wait(delay):
                return
            try:
                report = self.run_pass()
                if not report.complete:
                    log.info("background scrub paused; it continues at its next turn")
            except ScrubBusy as e:
                log.info("background scrub skipped: %s", e)
            except Exception:  # noqa: BLE001 - a failed pass must not end the scrubber
                log.exception("background scrub failed; retried at its next turn")
            if self._stop.wait(min(interval, 60.0)):
                return

    def _delay(self, interval: float) -> float:
        """Seconds until the next pass is due: `interval` after the last one finished; an
        interrupted pass is due at once."""
        state = load_state(self.state_path, self.fs_id)
        finished = (state.get("last") or {}).get("finished")
        if state.get("pass") is not None or finished is None:
            return 0.0
        return finished + interval - time.time()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def stats(self) -> dict:
        """{"last_scrub": {"finished": unix time or None, "checked", "corrupt",
        "repaired", "unrepairable", "found", "fixed"}, "running": whether a pass is under
        way}. The last pass is read from the state file, so a pass that `fusefs scrub`
        finished with the same file counts too."""
        with self._lock:
            running = self._running
        return {"last_scrub": last_scrub(self.state_path, self.fs_id), "running": running}


def _shown(last: dict | None) -> dict:
    """A last pass as status and metrics show it ("found"/"fixed": the names the other
    background pass, repair, uses for corrupt/repaired)."""
    last = last or {}
    counts = {k: last.get(k, 0) for k in ("checked", "corrupt", "repaired", "unrepairable")}
    return {"finished": last.get("finished"), **counts, "found": counts["corrupt"],
            "fixed": counts["repaired"]}


def last_scrub(state_path: str, fs_id: str) -> dict:
    """The last finished pass recorded at `state_path` (by `fusefs scrub` or a mount's
    background scrub), as `Scrubber.stats()["last_scrub"]` shows it; finished None when
    no pass of this filesystem finished there. For `fusefs status`."""
    return _shown(load_state(state_path, fs_id).get("last"))


def _batches(page: list[dict], limit: int):
    """Runs of listed entries of at most `limit` bytes (at least one entry) and
    BATCH_ITEMS ids."""
    batch, size = [], 0
    for entry in page:
        if batch and (size + entry["size"] > limit or len(batch) >= BATCH_ITEMS):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry["size"]
    if batch:
        yield batch


def format_report(report: ScrubReport) -> str:
    lines = []
    for s in report.servers:
        state = "done" if s.finished else f"NOT FINISHED ({s.error})" if s.error else \
            "not finished"
        resumed = f", resumed after {s.resumed_from[:8]}..." if s.resumed_from else ""
        lines.append(f"{s.url}: {_counts_text(s)}{resumed}; {state}")
        for block_id in s.unrepairable_ids:
            lines.append(f"  block {block_id}: no intact copy on any server")
    t = report.totals()
    if not report.complete:
        lines.append("the scrub did not finish; run it again to continue where it stopped")
    elif t["unrepairable"]:
        lines.append(f"{_copies(t['unrepairable'], 'bad copy', 'bad copies')} could not be "
                     "repaired: no server holds an intact copy of those blocks (files using "
                     "them cannot be read in full; `fusefs fsck` names them)")
    else:
        last = report.last or {}
        lines.append(f"every copy is intact: "
                     f"{_copies(last.get('checked', t['checked']))} verified in this pass, "
                     f"{_copies(last.get('corrupt', t['corrupt']), 'bad copy', 'bad copies')} "
                     "repaired")
    return "\n".join(lines)


def _copies(n: int, one: str = "copy", many: str = "copies") -> str:
    return f"{n} {one if n == 1 else many}"


def _counts_text(s: ServerCounts) -> str:
    return (f"{_copies(s.checked)} good ({format_size(s.bytes)}), {s.corrupt} bad, "
            f"{s.repaired} repaired, {s.unrepairable} unrepairable")
