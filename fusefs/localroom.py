"""Room on the local disk that holds a mount's state directory.

The state directory holds the metadata database (SQLite, with its WAL and the journal
records not yet shipped) and the disk block cache. When the disk under it fills up, a
change that SQLite cannot write may take the whole open group of changes with it (SQLite
rolls a transaction back on "database or disk is full"), and the mount then refuses every
change until it is mounted again. So the filesystem asks `LocalRoom.check()` before each
change that adds a name or an attribute, and that answers ENOSPC, with a message saying
what to do, while the free space is below the reserve:

- first the disk block cache gives back files (it only holds copies of what the servers
  have), as much as it takes to get twice the reserve free;
- if the space is still short, the change is refused before it touches the database.
  Removals, renames, writes and fsync go on: they need little room, and the reserve is
  there for them (and for SQLite to finish what it has begun).

States: `ok` (free >= reserve at the last look) and `low`. Far from the reserve (more
than NEAR times it free) the disk is looked at no more often than every INTERVAL seconds,
so a burst of creates costs one statvfs per INTERVAL; nearer, and in `low`, at every
check: a fast burst of large attributes crossed a 16 MiB reserve within one INTERVAL in a
test, and `low` must end as soon as space is freed, without a remount. A crash loses
nothing here: the state is only what statvfs says.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time

from .errors import FsError

log = logging.getLogger("fusefs.localroom")

DEFAULT_RESERVE = 64 << 20
INTERVAL = 0.25  # seconds between looks while there is plenty of room
NEAR = 4  # "plenty": more than NEAR x the reserve free
REMIND = 60.0  # seconds between log lines while the disk stays short
REFUSED = "new files, directories and attributes are refused (ENOSPC)"  # a read-write mount
BEHIND = ("this read-only mount stops applying the writer's changes (it goes on showing "
          "the filesystem as it was)")


def disk_full(e: BaseException) -> bool:
    """The local disk (or the user's quota on it) is full: SQLite's SQLITE_FULL, or an
    OSError saying so. Any other error is not, whatever its message."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, sqlite3.Error) and (
        getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        or "disk is full" in str(e))


class LocalRoom:
    def __init__(self, path: str, reserve: int = DEFAULT_RESERVE, make_room=None,
                 clock=time.monotonic, consequence: str = REFUSED):
        """`make_room(nbytes)` frees up to nbytes on that disk (the disk cache's
        `shrink_disk`) and returns how much it freed. `consequence`: what being short of
        room means for this mount, as the message says it."""
        self.path = path
        self.consequence = consequence
        self.reserve = reserve
        self.make_room = make_room
        self._clock = clock
        self._lock = threading.Lock()  # guards the fields below; statvfs runs outside it
        # One shrink at a time: a thread that finds one under way only looks again, or
        # every thread short of room at once would give back its own twice-the-reserve.
        self._shrinking = threading.Lock()
        self._next_look = 0.0
        self._low: str | None = None  # the message while short of room
        self._told = -REMIND  # when the log last said so

    @property
    def low(self) -> str | None:
        """Why changes are refused now, or None."""
        with self._lock:
            return self._low

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def check(self) -> None:
        """Raise FsError(ENOSPC) if the disk is short of the reserve (after the disk cache
        gave back what it could)."""
        now = self._clock()
        with self._lock:
            if self._low is None and now < self._next_look:
                return
        try:
            free = self.free()
            if free < self.reserve and self.make_room is not None:
                if self._shrinking.acquire(blocking=False):
                    try:
                        freed = self.make_room(2 * self.reserve - free)
                    finally:
                        self._shrinking.release()
                    if freed:
                        log.info("local disk holding %s was short of room: the disk block "
                                 "cache gave back %d MiB", self.path, freed >> 20)
                free = self.free()
        except OSError as e:  # the directory is gone or unreadable: nothing to say here
            log.debug("statvfs of %s failed: %s", self.path, e)
            return
        with self._lock:
            self._next_look = now + INTERVAL if free > NEAR * self.reserve else now
            if free >= self.reserve:
                if self._low is not None:
                    log.warning("local disk holding %s has room again (%d MiB free)",
                                self.path, free >> 20)
                self._low = None
                return
            self._low = (f"the local disk holding {self.path} has {free >> 20} MiB free, less "
                         f"than the {self.reserve >> 20} MiB fusefs keeps for its metadata; "
                         f"{self.consequence} until there is room: free space on that disk, "
                         "or mount with --cache-dir on another one")
            remind = now - self._told >= REMIND
            if remind:
                self._told = now
            message = self._low
        if remind:
            log.warning("%s", message)
        raise FsError(errno.ENOSPC, message)
