"""The writer lease: one read-write mount at a time, proven by the superblock.

A lease is a dict in the superblock: {"mount", "host", "boot", "pid", "pidns", "start",
"holder", "seconds", "expires"}. A mount takes it (`acquire`) with a compare-and-swap,
refused while another holder's lease is unexpired and that holder is not provably gone
(`refusal`, `holder_gone`). `Lease` then keeps it for a running writer.

States of a `Lease`: *valid* (renewed less than 75% of the lease time ago, by our own
monotonic clock) → *lapsed* (not renewed in time: changes wait for the next renewal to
tell whether the lease is still ours) → back to valid, or *lost* for good (a
compare-and-swap found the superblock changed by someone else, or a quorum read shows
another lease). Lost is final: every later change, renewal or superblock update raises
Fenced.

Locks: `_lock` guards the state (valid until, lost, stopping) and is never held across
network I/O; `_sb_lock` serialises superblock changes (renewals, checkpoints, release)
and is held across them, which is why nothing but another change ever waits on it.
`_lock` may be taken inside a caller's lock (the journal reads `lost` under its own),
never the other way round: listeners are called without `_lock` (the loss may be heard
under `_sb_lock`), so a listener may take its own lock.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from blockserver import protocol

from . import errors, superblock
from .errors import Fenced, LeaseHeld
from .host import boot_id, pid_namespace, process_alive, process_start

log = logging.getLogger("fusefs.lease")

LEASE_SECONDS = 30.0
VALID_PART = 0.75  # a writer acts on its lease for this part of the lease time only


def describe_lease(lease: dict) -> str:
    left = lease["expires"] - time.time()
    when = time.strftime("%H:%M:%S", time.localtime(lease["expires"]))
    state = f"expires at {when}, in {left:.0f} s unless renewed" if left > 0 else \
        f"expired at {when}"
    return f"{lease['holder']} (lease {state})"


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
    """A lease for this process. "tag" is the prefix of every block id this process
    creates (protocol.PROCESS_TAG): `fusefs gc` leaves the holder's blocks alone, since
    its uploads not yet recorded or shipped carry it."""
    host = socket.gethostname()
    return {"mount": mount_id, "host": host, "boot": boot_id(), "pid": os.getpid(),
            "pidns": pid_namespace(), "start": process_start(os.getpid()),
            "holder": f"pid {os.getpid()} on {host}" + (f" at {mountpoint}" if mountpoint
                                                         else ""),
            "seconds": seconds, "expires": time.time() + seconds,
            "tag": protocol.PROCESS_TAG}


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


class Lease:
    """A running writer's lease (a mount's, or fsck --repair's), and the only way that
    writer changes the superblock.

    Built from the superblock that `acquire` returned (`Lease.take` does both). `start`
    renews it from a thread every third of the lease time (`renew` does it at once);
    `check_writable` is the gate the filesystem asks before each change; `confirm`
    proves by a quorum read that no one took over; `update` is every superblock change
    of this writer (checkpoints, release), each a compare-and-swap that loses the lease
    on a conflict. Listeners (`subscribe`) hear of each renewal (`None`) and of the
    loss (why, once)."""

    def __init__(self, transport, sb: superblock.Superblock):
        self.transport = transport
        self.mount = sb.lease["mount"]
        self.seconds = float(sb.lease["seconds"])
        self.members = sb.members
        self._sb = sb  # changed under _sb_lock; read without it (the newest one written)
        self._sb_lock = threading.Lock()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # renewed, lost or stopping
        self._lost: str | None = None  # why this mount may no longer write
        self._stopping = False
        # The lease counts from when it was taken (by the wall clock it carries).
        taken = float(sb.lease["expires"]) - self.seconds
        self._valid_until = time.monotonic() - max(0.0, time.time() - taken) + \
            VALID_PART * self.seconds
        self._unsure: superblock.Superblock | None = None  # a change whose fate is unknown
        self._listeners: list = []
        self._thread: threading.Thread | None = None

    @classmethod
    def take(cls, transport, sb: superblock.Superblock, lease: dict) -> Lease:
        """Acquire `lease` (LeaseHeld if another mount holds the filesystem)."""
        return cls(transport, acquire(transport, sb, lease))

    @property
    def superblock(self) -> superblock.Superblock:
        """The superblock as our last change left it (no lock: a change in progress
        is not waited for)."""
        return self._sb

    def subscribe(self, listener) -> None:
        """Call `listener(None)` after each renewal and `listener(why)` once when lost."""
        self._listeners.append(listener)

    def _tell(self, lost: str | None) -> None:
        for listener in self._listeners:
            listener(lost)

    # -- superblock changes -----------------------------------------------------------------

    def update(self, **changes) -> superblock.Superblock:
        """Compare-and-swap our superblock; a conflict means the lease is gone (Fenced).

        A change that failed as Unavailable may have reached some servers: it is written
        again, the very same value at the same generation, before the next change, so our
        own earlier try is never taken for somebody else's write."""
        with self._sb_lock:
            if self.lost:
                raise Fenced(self.lost)
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
                return self._sb
            except errors.Conflict:
                current = self._read_after_conflict()
                if self._still_ours(current):
                    return self._rebase(current, changes)
                self._lose(f"the superblock was changed by {_holder(current)}")
                raise Fenced(self.lost) from None

    def _read_after_conflict(self) -> superblock.Superblock:
        """The superblock that beat our compare-and-swap. When it cannot be read, nothing
        is decided: Unavailable, and the next change (a renewal retries within a second)
        meets the conflict again; the lease lapses meanwhile, which stops changes."""
        try:
            return superblock.read_quorum(self.transport, self.members)
        except errors.StorageError as e:
            raise errors.Unavailable(f"the superblock changed and could not be read "
                                     f"back: {e}") from None

    def _still_ours(self, current: superblock.Superblock) -> bool:
        """The superblock changed under us, but only where others may change it (the
        membership, by `fusefs servers`): our lease and checkpoint are still there."""
        mine = self._unsure or self._sb
        return bool(current.lease and current.lease.get("mount") == self.mount
                    and current.checkpoint in (mine.checkpoint, self._sb.checkpoint))

    def _rebase(self, current: superblock.Superblock, changes: dict) -> superblock.Superblock:
        """Apply `changes` over `current` (under _sb_lock), again over the newest value
        while others keep changing only the membership; Fenced once anything else did."""
        for _ in range(superblock.RACED_RETRIES):
            log.info("the superblock's membership changed: now %s",
                     ", ".join(m.url for m in current.members))
            self._unsure = None
            self.members = current.members
            wanted = current.with_changes(**changes)
            try:
                self._sb = superblock.update(self.transport, wanted)
                return self._sb
            except errors.Unavailable:
                self._sb, self._unsure = current, wanted
                raise
            except errors.Conflict:
                self._sb = current
                current = self._read_after_conflict()
                if not self._still_ours(current):
                    break
        self._lose(f"the superblock was changed by {_holder(current)}")
        raise Fenced(self.lost)

    def release(self) -> None:
        """Give the lease up, so the next mount need not wait for it to expire."""
        self.update(lease=None)

    # -- renewal ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (unmount); the lease stays held until released or expired."""
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _wait_due(self, due: float) -> bool:
        """Sleep until `due` by the monotonic clock; False if stopping or lost meanwhile."""
        with self._lock:
            while not (self._stopping or self._lost):
                now = time.monotonic()
                if now >= due:  # (after a pause, the clock has run past it)
                    return True
                self._changed.wait(due - now)
            return False

    def _renew_loop(self) -> None:
        """Renew every third of the lease time (at once after a pause: the monotonic clock
        ran on); a failed attempt is retried after 1 s."""
        period = self.seconds / 3
        due = time.monotonic() + period
        while self._wait_due(due):
            started = time.monotonic()
            due = started + 1.0  # until this attempt succeeds
            if self._try_renew(started):
                due = started + period

    def _try_renew(self, started: float) -> bool:
        """One renewal attempt of the loop; True if it succeeded."""
        with self._lock:
            lapsed = started - self._valid_until
        if lapsed > 0:
            # Paused (or cut off) past our own view of the lease: another mount may have
            # taken it. The compare-and-swap below tells: it fails if anyone wrote.
            log.warning("the writer lease lapsed (this process was paused or cut off "
                        "for %.0f s); checking whether it was taken over",
                        lapsed + VALID_PART * self.seconds)
        try:
            self.renew(started)
        except Fenced:
            return False
        except errors.StorageError as e:
            log.warning("could not renew the writer lease (will retry): %s", e)
            return False
        return True

    def renew(self, started: float | None = None) -> None:
        """Extend the lease now (a compare-and-swap: Fenced if anyone else wrote the
        superblock since our last change). Nothing to do once it was given back."""
        started = time.monotonic() if started is None else started
        held = self.superblock.lease
        if held is None:
            return
        self.update(lease={**held, "expires": time.time() + self.seconds})
        with self._lock:
            self._valid_until = started + VALID_PART * self.seconds
            self._changed.notify_all()
        self._tell(None)

    # -- the writer's checks ----------------------------------------------------------------

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
            deadline = time.monotonic() + self.seconds
            while not self._lost and time.monotonic() >= self._valid_until:
                if time.monotonic() > deadline:
                    raise errors.Unavailable("the writer lease could not be renewed (are "
                                             "the block servers reachable?)")
                self._changed.wait(0.5)
            if self._lost:
                raise Fenced(self._lost)

    def valid(self) -> bool:
        """Held and renewed in time, by our own clock: shipping may go on."""
        with self._lock:
            return not self._lost and time.monotonic() < self._valid_until

    def valid_for(self) -> float:
        """Seconds until the lease lapses by our own clock (negative once it has)."""
        with self._lock:
            return self._valid_until - time.monotonic()

    @property
    def lost(self) -> str | None:
        with self._lock:
            return self._lost

    def _lose(self, why: str) -> None:
        with self._lock:
            if self._lost:
                return
            lost = f"this mount lost its writer lease: {why}; it is read-only now"
            # Logged before anyone can see it: no change is refused (EROFS) before the
            # reason is in the log.
            log.error("%s", lost)
            self._lost = lost
            self._changed.notify_all()
        self._tell(lost)

    def confirm(self) -> None:
        """Raise Fenced unless a majority of servers still names this mount's lease, i.e.
        no other mount or command took the filesystem over. One quorum read; whatever
        was stored before it is seen by any writer that takes over after it. Raises
        Unavailable when too few servers answer to tell."""
        if self.lost:
            raise Fenced(self.lost)
        current = superblock.read_quorum(self.transport, self.members)
        if current.lease and current.lease.get("mount") == self.mount:
            return
        self._lose(f"the superblock was changed by {_holder(current)}")
        raise Fenced(self.lost)


def _holder(sb: superblock.Superblock | None) -> str:
    return describe_lease(sb.lease) if sb is not None and sb.lease else "another command"
