"""Facts about this machine and its processes that a lease and the mount registry need:
which boot this is, which PID namespace we live in, whether a pid still names a live
process and when that process started, and fresh mount ids.

Everything here reads /proc and answers "cannot tell" (an empty or None value) where
/proc cannot say; callers treat "cannot tell" as "not proven gone".
"""

from __future__ import annotations

import os
import uuid


def boot_id() -> str:
    """This boot of this machine ("" where /proc cannot tell): a pid means nothing across
    a reboot."""
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
    return process_state(pid) not in (None, "Z")


def process_state(pid: int | None) -> str | None:
    """The state letter /proc gives process `pid` ("R", "S", "D", "T" stopped, "Z"...);
    None if there is no such process (or /proc cannot tell)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


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


def new_mount_id() -> str:
    """A fresh id for one read-write mount (it names its lease and its journal chain)."""
    return uuid.uuid4().hex
