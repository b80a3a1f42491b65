"""The follower: keeps a read-only mount's metadata current with the writer's journal.

States: *following* chain c from segment n (polls for segment n every `interval`
seconds, applies it, moves to n+1) → *reloading* when the superblock names another
chain (a new writer), a checkpoint past n (the segments it needs were deleted), or
replay meets a gap → following the checkpoint's chain again. It never writes to the
cluster: a crash of a follower, or of the writer it follows, changes nothing on the
servers; a follower that loses track reloads from the checkpoint the superblock names.

*stalled*: the local disk under the state directory is short of room, so the local copy
of the database must not take the writer's changes now: either the mount's `room` (a
LocalRoom) finds less than its reserve free, after the disk block cache gave back what it
could, or applying failed with the disk full (`localroom.disk_full`; replay is one
transaction, so what did not fit is rolled back whole). The copy stays the filesystem as
of its last record, and the mount goes on serving that; the log says so once a minute,
`fusefs status` shows it (and exits 1), and each poll looks again, so following resumes
by itself as soon as there is room. Stopping at the reserve, not at a full disk, leaves
room for the status file and for SQLite to finish what it began.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

from . import errors, superblock
from .checkpoint import load_checkpoint
from .loading import remove_database, replay_chain
from .localroom import REMIND, disk_full
from .metadata import RecordGap  # a record that does not follow the last one
from .metadata import Metadata

log = logging.getLogger("fusefs.follower")


class Follower:
    """Keeps a read-only mount's metadata current with the writer's journal.

    Built after the metadata is loaded (`next_segment` is where that load stopped);
    `subscribe` tells a listener (the filesystem) after each batch of changes applied;
    `start` begins polling in a thread, `close` stops it."""

    def __init__(self, store, transport, sb: superblock.Superblock, metadata: Metadata,
                 work_dir: str, *, next_segment: int, interval: float = 1.0):
        self.store, self.transport, self.metadata = store, transport, metadata
        self.work_dir = work_dir
        self.sb = sb
        self.chain = sb.checkpoint["chain"]
        self.segment = next_segment
        self.interval = interval
        self._listeners: list = []  # called after each applied change
        self.room = None  # a LocalRoom: while it is short, nothing is applied
        self.stalled: str | None = None  # why the writer's changes cannot be applied now
        self._told = 0.0  # when the log last said so
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
        return {"following": self.chain, "segment": self.segment, "seq": self.metadata.seq,
                "stalled": self.stalled}

    def _run(self) -> None:
        last_superblock = 0.0
        while not self._stop.wait(self.interval):
            try:
                if self.room is not None:
                    self.room.check()  # FsError(ENOSPC) while short of room
                if self.catch_up() == 0 and time.monotonic() - last_superblock > 3:
                    last_superblock = time.monotonic()
                    self._check_superblock()
                self._resumed()
            except errors.StorageError as e:
                log.warning("cannot follow the journal right now: %s", e)
            except errors.FsError:  # the room's ENOSPC (the room logs its own message)
                self._stall(f"the disk under {self.work_dir} is short of room")
            except Exception as e:  # noqa: BLE001 - a reader keeps serving what it has
                if disk_full(e):
                    self._stall(f"the disk under {self.work_dir} is full ({e})")
                else:
                    log.exception("unexpected error while following the journal")

    def _stall(self, why: str) -> None:
        """Short of local room: say so (once a minute); the next poll looks again.
        The log says it before `status` can show it, here and in `_resumed`."""
        stalled = (f"the writer's changes are not applied here while {why}; showing "
                   f"the filesystem as of record {self.metadata.seq}")
        if time.monotonic() - self._told >= REMIND:
            self._told = time.monotonic()
            log.warning("%s; free space on that disk (or mount with a smaller "
                        "--cache-size) and this mount catches up by itself", stalled)
        self.stalled = stalled

    def _resumed(self) -> None:
        if self.stalled is not None:
            log.info("following the writer again, at record %d", self.metadata.seq)
            self.stalled, self._told = None, 0.0

    def catch_up(self) -> int:
        """Apply the segments that appeared since the last call; returns records applied."""
        try:
            applied, self.segment = replay_chain(self.store, self.metadata, self.sb.fs_id,
                                                 self.chain, self.segment)
        except (RecordGap, errors.JournalGap) as e:
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
        self.store.set_membership(sb.members, sb.leaving)  # servers added or drained

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
            remove_database(path)
        self.sb, self.chain, self.segment = sb, cp["chain"], cp["segment"]
        applied, self.segment = replay_chain(self.store, self.metadata, sb.fs_id, self.chain,
                                             self.segment)
        self._changed()
