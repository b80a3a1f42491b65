"""The metadata on the cluster: journal shipping, checkpoints, the writer's lease, loading
a filesystem's metadata on any machine, and following a writer read-only.

Words (docs/journal.md has the states and what each crash does):

- record: one metadata change `[seq, op, args]` (metadata.py); sequence numbers have no gaps.
- chain: the journal of one read-write mount, named by its mount id. Segment n (1, 2, ...)
  of chain c is the block `segment_id(fs_id, c, n)` and holds consecutive records. The
  ids are computed, not stored, so a chain is read by asking for n, n+1, ... until a
  segment provably does not exist (`BlockStore.find`).
- checkpoint: the whole database at sequence number `seq`, as compressed chunks and a
  manifest. The superblock names the newest as {"manifest", "checksum", "seq", "chain",
  "segment"}: load it, then replay chain `chain` from segment `segment` on, skipping
  records at or below `seq`.

Invariants: a record reaches the cluster only after the data blocks it references (the
flusher records a block map change only once its blocks are on W servers); segments are
written in order, each retried with the same bytes until W servers have it (cut smaller
only when a server refuses its size); a writer ships only while its lease is valid by its
own clock, and every superblock change is a compare-and-swap, so a writer that lost its
lease can change nothing another mount reads (its chain is no longer the one the
superblock names). Fencing does not rely on clocks: a new writer stores a tombstone
where the old chain ends (`fence_chain`), and a segment counts as shipped only after a
quorum read made after its put shows our lease still held (`confirm_writer`). Garbage
blocks are deleted only once the record that dropped them is shipped in that sense.

Locks: `Journal._lock` guards the shipping state and is never held across network I/O;
`Journal._sb_lock` serialises superblock changes (lease renewal, checkpoints) and is held
across them, which is why nothing else ever waits on it. Neither is taken while holding
the metadata's lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
import zlib

import xxhash

from blockserver import protocol

from . import errors, superblock
from .blocks import PROCESS_TAG, new_block_id
from .metadata import JournalGap, Metadata, decode_record

log = logging.getLogger("fusefs.journal")

SEGMENT_MAGIC = b"fusefs-journal 1\n"
FENCE_MAGIC = b"fusefs-journal-fence 1\n"
CHECKPOINT_MAGIC = b"fusefs-checkpoint 1\n"
CHUNK = 4 << 20  # checkpoint chunk size (uncompressed)
SEGMENT_RECORDS = 5000  # records per segment at most
SEGMENT_BYTES = 4 << 20  # bytes per segment at most (servers refuse blocks over 16 MiB)
GAP_PROBES = 2  # segments looked for past a missing one before calling it the chain's end
LEASE_SECONDS = 30.0


class LeaseHeld(errors.StorageError):
    """Another read-write mount holds the filesystem."""


class Fenced(errors.StorageError):
    """This mount lost its writer lease: it may not change the filesystem any more."""

    errno = errno.EROFS


class ChainGap(errors.Unavailable):
    """A segment of a chain is missing although a later one exists: copies were lost."""


# -- segments ---------------------------------------------------------------------------------

def segment_id(fs_id: str, chain: str, number: int) -> str:
    return xxhash.xxh3_128_hexdigest(f"{fs_id}/journal/{chain}/{number}".encode())


def encode_segment(fs_id: str, chain: str, number: int, records: list[bytes]) -> bytes:
    body = b"\n".join(records)
    header = {"fs_id": fs_id, "chain": chain, "segment": number, "count": len(records),
              "checksum": protocol.checksum(body)}
    return SEGMENT_MAGIC + json.dumps(header).encode() + b"\n" + body


def decode_segment(raw: bytes, fs_id: str, chain: str, number: int) -> list:
    """The records of a segment; ValueError if it is not exactly that segment, intact."""
    if not raw.startswith(SEGMENT_MAGIC):
        raise ValueError("not a journal segment")
    head, _, body = raw[len(SEGMENT_MAGIC):].partition(b"\n")
    header = json.loads(head)
    if not isinstance(header, dict):
        raise ValueError("journal segment header is not an object")
    if (header.get("fs_id"), header.get("chain"), header.get("segment")) != (fs_id, chain,
                                                                           number):
        raise ValueError("a journal segment of another filesystem or chain")
    if protocol.checksum(body) != header.get("checksum"):
        raise ValueError("journal segment damaged (checksum mismatch)")
    records = [decode_record(line) for line in body.split(b"\n")] if body else []
    if len(records) != header.get("count"):
        raise ValueError("journal segment truncated")
    return records


def fence_block(fs_id: str, chain: str, number: int) -> bytes:
    """The tombstone a new writer stores under segment `number` of an old chain, so that
    the old writer can never store that segment on W servers (blocks are immutable). The
    same bytes whoever writes it, so a second fencing of the same place is a no-op."""
    return FENCE_MAGIC + json.dumps({"fs_id": fs_id, "chain": chain,
                                     "segment": number}).encode()


def _valid_segment(fs_id, chain, number):
    fence = fence_block(fs_id, chain, number)

    def verify(raw: bytes) -> bool:
        if raw == fence:
            return True
        try:
            decode_segment(raw, fs_id, chain, number)
        except ValueError:
            return False
        return True
    return verify


FENCED = "fenced"


def _lookup_segment(store, fs_id: str, chain: str, number: int):
    """The records of a segment, FENCED (the chain ends there for good), or None when it
    provably was never stored on W servers."""
    raw = store.find(segment_id(fs_id, chain, number), _valid_segment(fs_id, chain, number))
    if raw is None:
        return None
    if raw == fence_block(fs_id, chain, number):
        return FENCED
    return decode_segment(raw, fs_id, chain, number)


def read_segment(store, fs_id: str, chain: str, number: int) -> list | None:
    """The records of a segment; None if it does not exist or was fenced."""
    records = _lookup_segment(store, fs_id, chain, number)
    return None if records is FENCED else records


def _chain_end(store, fs_id: str, chain: str, number: int) -> None:
    """Segment `number` was not found: make sure that is the end of the chain, not a lost
    segment. A writer stores segment n+1 only once n is on W servers, so a later segment
    that exists means copies of `number` were lost (a replaced disk, a quarantined copy)
    while the servers holding the rest are out of reach. Raises ChainGap then: taking
    the end here would silently drop every later change, for good once a checkpoint is
    written."""
    for later in range(number + 1, number + 1 + GAP_PROBES):
        if read_segment(store, fs_id, chain, later) is not None:
            raise ChainGap(
                f"journal segment {number} of chain {chain} is missing but segment {later} "
                "exists: copies of a shipped segment were lost or are on servers out of "
                "reach. Bring every block server back (or restore the lost disk) and mount "
                "again; mounting now would drop every change after it")


def _stored_instead(transport, answers: dict, fs_id: str, chain: str, number: int):
    """The records of the segment that a server refused our tombstone for (it holds the
    segment itself), or None."""
    for member, answer in answers.items():
        if isinstance(answer, errors.Conflict):
            with contextlib.suppress(errors.StorageError, ValueError):
                return decode_segment(transport.get_block(member, segment_id(
                    fs_id, chain, number)), fs_id, chain, number)
    return None


def fence_chain(store, transport, metadata: Metadata, fs_id: str, chain: str,
                number: int) -> tuple[int, int]:
    """Make `number` the end of `chain` for good: store its tombstone on so many servers
    that no W of them could take the segment any more. A segment found there instead (its
    writer stored it after we looked) is replayed, and the next number fenced.

    Returns (records replayed, the fenced segment number). Raises Unavailable when too
    few servers answered."""
    members = list(store.members)
    need = len(members) - store.config.write_quorum + 1
    applied = 0
    while True:
        block_id = segment_id(fs_id, chain, number)
        data = fence_block(fs_id, chain, number)
        checksum = protocol.checksum(data)
        answers = superblock.ask_all(
            transport, members,
            lambda m: transport.put_block(m, block_id, data, checksum, metadata=True))
        if sum(1 for a in answers.values() if isinstance(a, bool)) >= need:
            return applied, number
        records = _stored_instead(transport, answers, fs_id, chain, number)
        if records is None:
            failures = "; ".join(str(a) for a in answers.values() if not isinstance(a, bool))
            raise errors.Unavailable(f"could not fence journal chain {chain} at segment "
                                     f"{number} on {need} servers: {failures}")
        log.warning("the previous writer stored segment %d of its chain while this mount "
                    "took over; it is replayed", number)
        applied += metadata.replay(records, {"chain": chain, "segment": str(number + 1)})
        number += 1


# -- checkpoints ------------------------------------------------------------------------------

def write_checkpoint(store, metadata: Metadata, fs_id: str, chain: str, segment: int,
                     work_dir: str) -> dict:
    """Upload the whole database; returns the superblock's description of it."""
    fd, path = tempfile.mkstemp(prefix="checkpoint-", suffix=".db", dir=work_dir)
    os.close(fd)
    os.unlink(path)  # VACUUM INTO wants to create it
    try:
        seq = metadata.snapshot(path)
        with open(path, "rb") as f:
            raw = f.read()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    chunks = []
    for start in range(0, len(raw), CHUNK):
        data = zlib.compress(raw[start:start + CHUNK], 3)
        chunks.append((new_block_id(), data, protocol.checksum(data)))
    store.put_many(chunks)
    manifest = CHECKPOINT_MAGIC + json.dumps({
        "fs_id": fs_id, "seq": seq, "size": len(raw), "checksum": protocol.checksum(raw),
        "chunks": [[i, c, len(d)] for i, d, c in chunks]}).encode()
    manifest_id = new_block_id()
    manifest_checksum = protocol.checksum(manifest)
    store.put(manifest_id, manifest, manifest_checksum)
    log.info("checkpoint of %d bytes at record %d written (%d chunks)", len(raw), seq,
             len(chunks))
    return {"manifest": manifest_id, "checksum": manifest_checksum, "seq": seq,
            "chain": chain, "segment": segment}


def checkpoint_blocks(store, checkpoint: dict) -> list[str]:
    """The ids of a checkpoint's manifest and chunks."""
    manifest = _manifest(store, checkpoint)
    return [checkpoint["manifest"], *(c[0] for c in manifest["chunks"])]


def _manifest(store, checkpoint: dict) -> dict:
    raw = store.get(checkpoint["manifest"], checkpoint["checksum"])
    if not raw.startswith(CHECKPOINT_MAGIC):
        raise errors.BlockCorrupt(f"block {checkpoint['manifest']} is not a checkpoint")
    return json.loads(raw[len(CHECKPOINT_MAGIC):])


def load_checkpoint(store, checkpoint: dict, dest: str, fs_id: str) -> None:
    """Download the checkpoint into a new database file `dest`."""
    manifest = _manifest(store, checkpoint)
    if manifest["fs_id"] != fs_id or manifest["seq"] != checkpoint["seq"]:
        raise errors.BlockCorrupt("the checkpoint does not match the superblock")
    tmp = dest + ".partial"
    with open(tmp, "wb") as out:
        chunks = manifest["chunks"]
        for start in range(0, len(chunks), 8):
            batch = chunks[start:start + 8]
            found = store.get_many([(i, c) for i, c, _ in batch])
            for i, _, _ in batch:
                out.write(zlib.decompress(found[i]))
        out.flush()
        os.fsync(out.fileno())
    with open(tmp, "rb") as f:
        if protocol.checksum(f.read()) != manifest["checksum"]:
            os.unlink(tmp)
            raise errors.BlockCorrupt("the checkpoint's database does not match its checksum")
    os.replace(tmp, dest)


# -- loading the metadata at mount ------------------------------------------------------------

def _remove_database(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def _reusable(metadata: Metadata, sb: superblock.Superblock) -> bool:
    """A local database can be brought up to date by replay alone: same filesystem, same
    chain, at or past the checkpoint.

    It may hold records its writer never shipped (it was killed): no other writer came
    since (the chain is the same), every segment of the chain was made from this very
    database's records, and the blocks they reference are durable, so those records are
    a true continuation and are kept; the new writer's first checkpoint ships them."""
    cp = sb.checkpoint
    get = metadata.setting
    return (get("fs_id") == sb.fs_id and get("chain") == cp["chain"]
            and metadata.seq >= cp["seq"]
            and int(get("segment", "0")) >= cp["segment"])


def replay_chain(store, metadata: Metadata, fs_id: str, chain: str, segment: int) -> tuple[int, int]:
    """Apply segments segment, segment+1, ... of `chain` until one does not exist.

    Returns (records applied, the first segment number that does not exist)."""
    applied = 0
    while True:
        records = _lookup_segment(store, fs_id, chain, segment)
        if records is FENCED:
            return applied, segment
        if records is None:
            _chain_end(store, fs_id, chain, segment)
            return applied, segment
        applied += metadata.replay(records, {"chain": chain, "segment": str(segment + 1)})
        segment += 1


def open_metadata(store, sb: superblock.Superblock, db_path: str,
                  progress=lambda message: None) -> tuple[Metadata, int, int]:
    """The filesystem's metadata as the cluster has it, in the database at `db_path`.

    A local database that is current (or behind on the same chain) is used as is and
    brought up to date; anything else is replaced by the latest checkpoint. Returns
    (metadata, records replayed, the next segment number of the checkpoint's chain).
    """
    cp = sb.checkpoint
    if cp is None:
        raise errors.Rejected("the superblock names no checkpoint; format with fusefs mkfs")
    if os.path.exists(db_path):
        metadata = Metadata(db_path)
        if _reusable(metadata, sb):
            try:
                applied, segment = replay_chain(store, metadata, sb.fs_id, cp["chain"],
                                                int(metadata.setting("segment")))
                log.info("local metadata is current after %d journal records", applied)
                return metadata, applied, segment
            except JournalGap as e:
                log.warning("local metadata cannot be brought up to date (%s); "
                            "loading the checkpoint instead", e)
        else:
            log.info("local metadata is not current; loading the checkpoint")
        metadata.close()
        _remove_database(db_path)
    progress(f"loading checkpoint of record {cp['seq']}")
    load_checkpoint(store, cp, db_path, sb.fs_id)
    metadata = Metadata(db_path)
    metadata.set_settings({"fs_id": sb.fs_id, "chain": cp["chain"],
                           "segment": str(cp["segment"]), "shipped": str(cp["seq"])})
    progress("replaying the journal")
    applied, segment = replay_chain(store, metadata, sb.fs_id, cp["chain"], cp["segment"])
    log.info("metadata loaded: checkpoint at record %d, then %d journal records", cp["seq"],
             applied)
    return metadata, applied, segment


def list_everything(transport, members) -> tuple[set[str], dict[str, errors.StorageError]]:
    """The ids of every block on every member; the servers that could not be listed."""
    listed: set[str] = set()
    failures = {}
    for member in members:
        after = ""
        try:
            while True:
                page, after = transport.list_blocks(member, after, 5000)
                listed.update(b["id"] for b in page)
                if not after:
                    break
        except errors.StorageError as e:
            failures[member.url] = e
    return listed, failures


# -- the writer's lease -----------------------------------------------------------------------

def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_alive(pid: int | None) -> bool:
    """True if `pid` names a running (or stopped) process, not a zombie."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def describe_lease(lease: dict) -> str:
    left = lease["expires"] - time.time()
    when = time.strftime("%H:%M:%S", time.localtime(lease["expires"]))
    state = f"expires at {when}, in {left:.0f} s unless renewed" if left > 0 else \
        f"expired at {when}"
    return f"{lease['holder']} (lease {state})"


def pid_namespace() -> int | None:
    """The inode of this process's PID namespace (None where /proc cannot tell)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def process_start(pid: int | None) -> int | None:
    """When process `pid` (of our PID namespace) started, in clock ticks since boot; None
    if there is no such process (or /proc cannot tell)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def holder_gone(lease: dict) -> bool:
    """The lease holder provably ended: it was a process of this machine, this boot and
    this very PID namespace (another container on the same host cannot see our pids,
    nor we its), and no process with its pid and start time is alive. A lease that does
    not say (an older fusefs) is never declared gone: it expires by itself."""
    pid = lease.get("pid")
    if not (lease.get("host") == socket.gethostname() and lease.get("boot") == boot_id()
            and lease.get("pidns") is not None and lease.get("pidns") == pid_namespace()
            and lease.get("start") is not None):
        return False
    return not process_alive(pid) or process_start(pid) != lease["start"]


def new_lease(mount_id: str, seconds: float, mountpoint: str = "") -> dict:
    host = socket.gethostname()
    return {"mount": mount_id, "host": host, "boot": boot_id(), "pid": os.getpid(),
            "pidns": pid_namespace(), "start": process_start(os.getpid()),
            "holder": f"pid {os.getpid()} on {host}" + (f" at {mountpoint}" if mountpoint
                                                         else ""),
            "seconds": seconds, "expires": time.time() + seconds}


def refusal(sb: superblock.Superblock, mount_id: str = "") -> str | None:
    """Why a read-write mount may not take the lease now, or None if it may: another mount
    holds an unexpired lease, and its process is not known to be gone."""
    held = sb.lease
    if not held or held.get("mount") == mount_id:
        return None
    if held["expires"] <= time.time() or holder_gone(held):
        return None
    return (f"filesystem {sb.fs_id} is mounted read-write by {describe_lease(held)}. Only "
            "one read-write mount at a time: mount this one with --read-only, or unmount "
            "the other first")


def acquire(transport, sb: superblock.Superblock, lease: dict) -> superblock.Superblock:
    """Take the writer lease (see `refusal`). Returns the updated superblock."""
    why = refusal(sb, lease["mount"])
    if why:
        raise LeaseHeld(why)
    if sb.lease and sb.lease.get("mount") != lease["mount"]:
        log.warning("taking over the writer lease from %s", describe_lease(sb.lease))
    try:
        return superblock.update(transport, sb.with_changes(lease=lease))
    except errors.Conflict:
        raise LeaseHeld(f"another mount of filesystem {sb.fs_id} took the writer lease at the "
                        "same moment; try again") from None


# -- the writer -------------------------------------------------------------------------------

class Journal:
    """Ships a read-write mount's journal, keeps its lease, and writes checkpoints."""

    def __init__(self, store, transport, sb: superblock.Superblock, metadata: Metadata,
                 work_dir: str, *, ship_delay: float = 1.0, checkpoint_records: int = 100_000,
                 checkpoint_seconds: float = 600.0, on_lost=None):
        self.store, self.transport, self.metadata = store, transport, metadata
        self.work_dir = work_dir
        self.fs_id = sb.fs_id
        self.chain = sb.lease["mount"]
        self.lease_seconds = float(sb.lease["seconds"])
        self.ship_delay = ship_delay
        self.checkpoint_records = checkpoint_records
        self.checkpoint_seconds = checkpoint_seconds
        self.on_lost = on_lost
        self._sb = sb  # guarded by _sb_lock
        self._sb_lock = threading.Lock()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # shipped moved, work, or a failure
        self._shipped = metadata.seq  # guarded by _lock
        self._segment = 1  # next segment of our chain, guarded by _lock
        self._pending: tuple[int, int, bytes] | None = None  # (segment, last seq, bytes)
        self._wanted = 0  # a waiter needs records up to here shipped now, guarded by _lock
        self._error: errors.StorageError | None = None
        self._error_seq = 0
        self._lost: str | None = None  # why this mount may no longer write
        self._stopping = False
        self._closed = False
        # The lease counts from when it was taken (loading may have taken a while since).
        taken = float(sb.lease["expires"]) - self.lease_seconds
        self._valid_until = time.monotonic() - max(0.0, time.time() - taken) + \
            0.75 * self.lease_seconds
        self._last_checkpoint = (metadata.seq, time.monotonic())
        self._obsolete: list[str] = []  # blocks to delete once the next checkpoint is named
        self._threads: list[threading.Thread] = []
        self._unsure: superblock.Superblock | None = None  # a change whose fate is unknown
        self._segment_bytes = SEGMENT_BYTES  # lowered when a server refuses a segment's size

    # -- start: our own chain, based on a checkpoint of what was loaded ---------------------

    def start(self, replayed: int, old_chain_end: int, sweep: bool = False) -> None:
        """Make this mount's chain the one the superblock names, then ship in the background.

        When the load replayed records of another chain, a fresh checkpoint is written
        first: the old chain is then never needed again (it may hold a copy of a segment
        its crashed writer never finished, which a later reader might not find).
        """
        cp = self._sb.checkpoint
        fence = None
        if cp["chain"] != self.chain:
            # The previous writer may still be running (paused, or partitioned): from now on
            # it cannot store another segment of its chain on W servers. The tombstone is
            # named by our checkpoints (so no sweep takes it for a leftover) until the next
            # writer fences our chain.
            late, old_chain_end = fence_chain(self.store, self.transport, self.metadata,
                                              self.fs_id, cp["chain"], old_chain_end)
            replayed += late
            fence = segment_id(self.fs_id, cp["chain"], old_chain_end)
        if replayed or self.metadata.seq != cp["seq"]:
            new_cp = write_checkpoint(self.store, self.metadata, self.fs_id, self.chain, 1,
                                      self.work_dir)
            self._obsolete += self._blocks_of(cp)
        else:
            new_cp = {**cp, "chain": self.chain, "segment": 1}
        if cp["chain"] != self.chain:  # the previous writer's chain is not needed any more
            self._obsolete += [segment_id(self.fs_id, cp["chain"], n)
                               for n in range(cp["segment"], old_chain_end)]
        if cp.get("fence") not in (None, fence):  # the chain before the last one's
            self._obsolete.append(cp["fence"])
        new_cp = {k: v for k, v in new_cp.items() if k != "fence"}
        if fence:
            new_cp["fence"] = fence
        self._set_superblock(checkpoint=new_cp)
        self.metadata.shipped(self.metadata.seq, {"chain": self.chain, "segment": "1"})
        self._last_checkpoint = (new_cp["seq"], time.monotonic())
        self._delete_obsolete()
        self.metadata.on_record = self._noticed
        work = [(self._ship_loop, "journal-ship"), (self._renew_loop, "lease")]
        if sweep:  # the last writer did not finish cleanly: it may have left uploads behind
            work.append((self._sweep_later, "sweep"))
        for target, name in work:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _blocks_of(self, checkpoint: dict) -> list[str]:
        try:
            return checkpoint_blocks(self.store, checkpoint)
        except errors.StorageError as e:
            log.info("old checkpoint not deleted (%s); fsck --repair finds it", e)
            return []

    # -- superblock changes -----------------------------------------------------------------

    def _set_superblock(self, **changes) -> None:
        """Compare-and-swap our superblock; a conflict means the lease is gone.

        A change that failed as Unavailable may have reached some servers: it is written
        again, the very same value at the same generation, before the next change, so our
        own earlier try is never taken for somebody else's write."""
        with self._sb_lock:
            if self._lost:
                raise Fenced(self._lost)
            try:
                if self._unsure is not None:
                    self._sb = superblock.update(self.transport, self._unsure)
                    self._unsure = None
                wanted = self._sb.with_changes(**changes)
                try:
                    self._sb = superblock.update(self.transport, wanted)
                except errors.Unavailable:
                    self._unsure = wanted
                    raise
            except errors.Conflict:
                current = None
                with contextlib.suppress(errors.StorageError):
                    current = superblock.read_quorum(self.transport, self._sb.members)
                holder = describe_lease(current.lease) if current and current.lease else \
                    "another command"
                self._lose(f"the superblock was changed by {holder}")
                raise Fenced(self._lost) from None

    def _renew_loop(self) -> None:
        """Renew every third of the lease time (at once after a pause: the monotonic clock
        ran on); a failed attempt is retried after 1 s."""
        period = self.lease_seconds / 3
        due = time.monotonic() + period
        while True:
            with self._lock:
                while not (self._stopping or self._lost):
                    now = time.monotonic()
                    if now >= due:  # (after a pause, the clock has run past it)
                        break
                    self._changed.wait(due - now)
                if self._stopping or self._lost:
                    return
            started = time.monotonic()
            due = started + 1.0  # until this attempt succeeds
            lease = {**self._sb.lease, "expires": time.time() + self.lease_seconds}
            if started > self._valid_until:
                # Paused (or cut off) past our own view of the lease: another mount may have
                # taken it. The compare-and-swap below tells: it fails if anyone wrote.
                log.warning("the writer lease lapsed (this process was paused or cut off "
                            "for %.0f s); checking whether it was taken over",
                            started - self._valid_until + 0.75 * self.lease_seconds)
            try:
                self._set_superblock(lease=lease)
            except Fenced:
                return
            except errors.StorageError as e:
                log.warning("could not renew the writer lease (will retry): %s", e)
                continue
            with self._lock:
                self._valid_until = started + 0.75 * self.lease_seconds
                self._changed.notify_all()
            due = started + period

    def check_writable(self) -> None:
        """Before a change: refuse (Fenced) once the lease is lost, and while it has lapsed
        by our own clock (this process was paused, or the servers were out of reach)
        wait for the renewal to tell whether it is still ours, rather than accept a
        change nobody may ever see."""
        with self._lock:
            if self._lost:
                raise Fenced(self._lost)
            if time.monotonic() < self._valid_until:
                return
            deadline = time.monotonic() + self.lease_seconds
            while not self._lost and time.monotonic() >= self._valid_until:
                if time.monotonic() > deadline:
                    raise errors.Unavailable("the writer lease could not be renewed (are "
                                             "the block servers reachable?)")
                self._changed.wait(0.5)
            if self._lost:
                raise Fenced(self._lost)

    def _lease_valid(self) -> bool:
        with self._lock:
            return not self._lost and time.monotonic() < self._valid_until

    def _lose(self, why: str) -> None:
        with self._lock:
            if self._lost:
                return
            self._lost = f"this mount lost its writer lease: {why}; it is read-only now"
            self._changed.notify_all()
        log.error("%s; changes not yet shipped are dropped (%d journal records after %d)",
                  self._lost, self.metadata.seq - self._shipped, self._shipped)
        if self.on_lost is not None:
            try:
                self.on_lost(self._lost)
            except Exception:  # noqa: BLE001 - the journal must stop whatever happens
                log.exception("could not switch the mount to read-only")

    @property
    def lost(self) -> str | None:
        with self._lock:
            return self._lost

    def confirm_writer(self) -> None:
        """Raise Fenced unless a majority of servers still names this mount's lease, i.e.
        no other mount or command took the filesystem over. One quorum read; whatever
        was stored before it is seen by any writer that takes over after it. Raises
        Unavailable when too few servers answer to tell."""
        if self.lost:
            raise Fenced(self._lost)
        current = superblock.read_quorum(self.transport, self._sb.members)
        if current.lease and current.lease.get("mount") == self.chain:
            return
        holder = describe_lease(current.lease) if current.lease else "another command"
        self._lose(f"the superblock was changed by {holder}")
        raise Fenced(self._lost)

    # -- shipping ---------------------------------------------------------------------------

    def _noticed(self, seq: int) -> None:
        """A new record (metadata.on_record): ship soon; at once if many are waiting."""
        if seq - self._shipped >= SEGMENT_RECORDS:
            with self._lock:
                self._changed.notify_all()

    def wait_durable(self, seq: int | None = None, timeout: float | None = None) -> None:
        """Return once every record up to `seq` (default: all so far) is on W servers.

        Raises the shipping error if an attempt fails meanwhile, Fenced if the lease is
        lost, and Timeout after `timeout` seconds."""
        target = self.metadata.seq if seq is None else seq
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            seen_error = self._error_seq
            if self._shipped >= target:
                return
            self._wanted = max(self._wanted, target)
            self._changed.notify_all()
            while self._shipped < target:
                if self._lost:
                    raise Fenced(self._lost)
                if self._stopping and not any(t.is_alive() for t in self._threads):
                    raise errors.Unavailable("the journal has stopped (unmounting)")
                if self._error_seq != seen_error and self._error is not None:
                    raise self._error
                if deadline is not None and time.monotonic() > deadline:
                    raise errors.Timeout(f"the journal is not shipped up to record {target}")
                self._changed.wait(0.5)

    def _urgent(self) -> bool:
        """Expects _lock held: ship now rather than after ship_delay."""
        return (self._pending is not None or self._wanted > self._shipped
                or self.metadata.seq - self._shipped >= SEGMENT_RECORDS)

    def _ship_loop(self) -> None:
        """Ship pending records every ship_delay seconds, at once when someone waits."""
        delay = 0.5
        while True:
            with self._lock:
                if self._lost:
                    return
                if self._stopping and self._pending is None and \
                        self.metadata.seq == self._shipped:
                    return
                if not self._stopping and not self._urgent():
                    self._changed.wait(self.ship_delay)
            try:
                self._ship_once()
                if self._checkpoint_due() and not self._stopping:
                    self.checkpoint()
                delay = 0.5
            except Fenced:
                return
            except errors.StorageError as e:
                with self._lock:
                    self._error, self._error_seq = e, self._error_seq + 1
                    self._changed.notify_all()
                log.warning("journal shipping failed, retrying in %.1f s: %s", delay, e)
                if self._wait_stopping(delay, even_when_stopping=True):
                    return
                delay = min(delay * 2, 5.0)
            except Exception:  # noqa: BLE001 - keep shipping; the log says what went wrong
                log.exception("unexpected error while shipping the journal")
                if self._wait_stopping(delay, even_when_stopping=True):
                    return

    def _ship_once(self) -> None:
        with self._lock:
            pending = self._pending
            if pending is None:
                rows = _by_bytes(self.metadata.unshipped(self._shipped, SEGMENT_RECORDS),
                                 self._segment_bytes)
                if not rows:
                    return
                pending = (self._segment, rows[-1][0],
                           encode_segment(self.fs_id, self.chain, self._segment,
                                          [r for _, r in rows]))
                self._pending = pending
        number, last, data = pending
        if not self._lease_valid():
            if self.lost:
                raise Fenced(self._lost)
            raise errors.Unavailable("the writer lease could not be renewed in time; "
                                     "journal shipping waits for it")
        try:
            self.store.put(segment_id(self.fs_id, self.chain, number), data,
                           protocol.checksum(data), metadata=True)
        except errors.StorageError:
            if self._after_failed_put(data):
                return self._ship_once()  # cut smaller now: ship that at once
            raise
        # Only now may waiters be told (and garbage deleted): a mount that took over before
        # this check changed the superblock; one that takes over after it finds the segment.
        self.confirm_writer()
        self.metadata.shipped(last, {"chain": self.chain, "segment": str(number + 1)})
        with self._lock:
            self._pending = None
            self._shipped = last
            self._segment = number + 1
            self._error = None
            self._changed.notify_all()

    def _after_failed_put(self, data: bytes) -> bool:
        """A segment was not stored: stop at once if another mount took over (its tombstone
        refused the segment), and cut the segment smaller if it is larger than a server
        takes, instead of sending the same refused bytes for ever. (A copy of the larger
        segment on some server is harmless: both start at the same record, and replay
        skips records it already has.) True if the segment is to be cut again."""
        with contextlib.suppress(errors.Unavailable):
            self.confirm_writer()
        with self._lock:
            pending = self._pending
        if pending is None or pending[2] is not data or data.count(b"\n") < 3:
            return False
        limit = self._server_limit()
        if limit is None or len(data) <= limit:
            return False
        log.warning("journal segment of %d bytes is more than a block server takes; "
                    "cutting segments at %d bytes", len(data), limit)
        with self._lock:
            self._segment_bytes = min(self._segment_bytes, max(1, limit))
            if self._pending is not pending:
                return False
            self._pending = None
        return True

    def _server_limit(self) -> int | None:
        """Half the smallest block size the servers accept, or None if none answered."""
        sizes = [s.get("max_block_size") for s in superblock.probe(
            self.transport, [m.url for m in self._sb.members]).values()
            if isinstance(s, dict)]
        sizes = [n for n in sizes if isinstance(n, int) and n > 0]
        return min(sizes) // 2 if sizes else None

    # -- checkpoints ------------------------------------------------------------------------

    def _checkpoint_due(self) -> bool:
        seq, at = self._last_checkpoint
        behind = self.metadata.seq - seq
        return behind >= self.checkpoint_records or (
            behind > 0 and time.monotonic() - at >= self.checkpoint_seconds)

    def checkpoint(self) -> dict:
        """Write a checkpoint and name it in the superblock; then delete what it replaced:
        the previous checkpoint and the segments it no longer needs. Call from the
        shipping thread (or once it has stopped): the next segment number must not move."""
        with self._lock:
            segment = self._segment if self._pending is None else self._pending[0]
        old = self._sb.checkpoint
        cp = write_checkpoint(self.store, self.metadata, self.fs_id, self.chain, segment,
                              self.work_dir)
        if old.get("fence"):
            cp["fence"] = old["fence"]
        self._obsolete += self._blocks_of(old)
        first = old["segment"] if old["chain"] == self.chain else 1
        self._obsolete += [segment_id(self.fs_id, self.chain, n) for n in range(first, segment)]
        self._set_superblock(checkpoint=cp)
        self._last_checkpoint = (cp["seq"], time.monotonic())
        self._delete_obsolete()
        return cp

    def _delete_obsolete(self) -> None:
        ids, self._obsolete = self._obsolete, []
        if ids:
            try:
                self.store.delete_many(ids)
            except errors.StorageError as e:
                log.info("old journal blocks not deleted (%s); fsck --repair finds them", e)

    # -- leftovers of a crashed writer ------------------------------------------------------

    def _sweep_later(self) -> None:
        if self._wait_stopping(5.0):
            return
        try:
            deleted = self.sweep()
            log.info("deleted %d leftover blocks of an earlier writer", deleted)
        except errors.StorageError as e:
            log.info("leftover sweep skipped (fsck --repair does it too): %s", e)
        except Exception:  # noqa: BLE001 - a sweep is housekeeping, never fatal
            log.exception("leftover sweep failed")

    def sweep(self) -> int:
        """Delete blocks that nothing references: uploads a killed writer never recorded,
        segments and checkpoints it never got to delete. Blocks this process created are
        never touched (their ids carry its tag), so uploads in flight are safe; anything
        else that exists was created before this mount and is either known now or never
        will be."""
        listed, failures = list_everything(self.transport, self._sb.members)
        for url, e in failures.items():
            log.info("sweep: %s not listed: %s", url, e)
        keep = {r[0] for r in self.metadata.query("SELECT block_id FROM blocks")}
        keep.update(r[0] for r in self.metadata.query("SELECT block_id FROM garbage"))
        keep.update(checkpoint_blocks(self.store, self._sb.checkpoint))
        keep.update(f for f in [self._sb.checkpoint.get("fence")] if f)
        with self._lock:
            upto = self._segment + 1
        keep.update(segment_id(self.fs_id, self.chain, n) for n in range(1, upto + 1))
        leftovers = sorted(b for b in listed - keep if not b.startswith(PROCESS_TAG))
        if not leftovers:
            return 0
        # Everything listed existed before this check; if we still hold the lease now, no
        # other writer came since we took it, so none of it is another writer's.
        self.confirm_writer()
        self.store.delete_many(leftovers)
        return len(leftovers)

    # -- stopping ---------------------------------------------------------------------------

    def _wait_stopping(self, seconds: float, even_when_stopping: bool = False) -> bool:
        """Sleep; True if the journal is stopping (or lost) and the caller should end."""
        with self._lock:
            if not self._stopping and not self._lost:
                self._changed.wait(seconds)
            if self._lost:
                return True
            return self._stopping and not even_when_stopping

    def close(self, checkpoint_after: int = 1000, progress=None) -> None:
        """Unmount: ship everything (retrying until it is done), checkpoint if the chain
        grew long, and give the lease up so the next mount need not wait for it."""
        if self._closed:
            return
        self._closed = True
        if self.lost:
            self._stop_threads()
            return
        while True:
            try:
                self.wait_durable(timeout=10)
                break
            except Fenced:
                break
            except errors.StorageError as e:
                log.warning("unmount waits for the journal to reach the servers: %s", e)
                if progress:
                    progress(e)
        self._stop_threads()
        if self.lost:
            return
        try:
            if self.metadata.seq - self._sb.checkpoint["seq"] >= checkpoint_after:
                self.checkpoint()
            self._set_superblock(lease=None)
            log.info("writer lease released")
        except errors.StorageError as e:
            log.warning("could not release the writer lease (it expires by itself): %s", e)

    def _stop_threads(self) -> None:
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout=15)

    def stats(self) -> dict:
        with self._lock:
            return {"chain": self.chain, "shipped": self._shipped, "seq": self.metadata.seq,
                    "segment": self._segment, "lost": self._lost,
                    "error": str(self._error) if self._error else None,
                    "lease_valid_for": round(self._valid_until - time.monotonic(), 1)}


def _by_bytes(rows: list[tuple[int, bytes]], limit: int) -> list[tuple[int, bytes]]:
    """The first rows whose records add up to at most `limit` bytes (at least one)."""
    total = 0
    for i, (_, record) in enumerate(rows):
        total += len(record) + 1
        if total > limit and i > 0:
            return rows[:i]
    return rows


# -- the follower (read-only mounts) ----------------------------------------------------------

class Follower:
    """Keeps a read-only mount's metadata current with the writer's journal."""

    def __init__(self, store, transport, sb: superblock.Superblock, metadata: Metadata,
                 work_dir: str, *, next_segment: int, interval: float = 1.0):
        self.store, self.transport, self.metadata = store, transport, metadata
        self.work_dir = work_dir
        self.sb = sb
        self.chain = sb.checkpoint["chain"]
        self.segment = next_segment
        self.interval = interval
        self._listeners: list = []  # called after each applied change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="journal-follow", daemon=True)

    def subscribe(self, listener) -> None:
        """Call `listener()` after each batch of changes applied from the writer."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def stats(self) -> dict:
        return {"following": self.chain, "segment": self.segment, "seq": self.metadata.seq}

    def _run(self) -> None:
        last_superblock = 0.0
        while not self._stop.wait(self.interval):
            try:
                if self.catch_up() == 0 and time.monotonic() - last_superblock > 3:
                    last_superblock = time.monotonic()
                    self._check_superblock()
            except errors.StorageError as e:
                log.warning("cannot follow the journal right now: %s", e)
            except Exception:  # noqa: BLE001 - a reader keeps serving what it has
                log.exception("unexpected error while following the journal")

    def catch_up(self) -> int:
        """Apply the segments that appeared since the last call; returns records applied."""
        try:
            applied, self.segment = replay_chain(self.store, self.metadata, self.sb.fs_id,
                                                 self.chain, self.segment)
        except (JournalGap, ChainGap) as e:
            log.warning("%s; reloading the checkpoint", e)
            self._reload(superblock.read_quorum(self.transport, self.sb.members))
            return 1
        if applied:
            self._changed()
        return applied

    def _check_superblock(self) -> None:
        sb = superblock.read_quorum(self.transport, self.sb.members)
        cp = sb.checkpoint
        if cp["chain"] != self.chain or cp["segment"] > self.segment:
            self._reload(sb)  # a new writer, or we fell behind what the writer keeps
        self.sb = sb

    def _reload(self, sb: superblock.Superblock) -> None:
        cp = sb.checkpoint
        log.info("following a new checkpoint (record %d, chain %s)", cp["seq"], cp["chain"])
        fd, path = tempfile.mkstemp(prefix="follow-", suffix=".db", dir=self.work_dir)
        os.close(fd)
        try:
            load_checkpoint(self.store, cp, path, sb.fs_id)
            self.metadata.replace_with(path, {"fs_id": sb.fs_id, "chain": cp["chain"],
                                              "segment": str(cp["segment"]),
                                              "shipped": str(cp["seq"])})
        finally:
            _remove_database(path)
        self.sb, self.chain, self.segment = sb, cp["chain"], cp["segment"]
        applied, self.segment = replay_chain(self.store, self.metadata, sb.fs_id, self.chain,
                                             self.segment)
        self._changed()


def new_mount_id() -> str:
    return uuid.uuid4().hex
