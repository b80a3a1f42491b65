"""The mounts of this machine: the registry of running fusefs daemons, what the kernel
has mounted where, and detaching a mount. Nothing here imports FUSE, so the CLI's
status, umount and recovery commands (and the tests) use it without the adapter.

The registry is one JSON file per mountpoint in `runtime_dir()`, written by a daemon
just before it mounts ({"pid", "mountpoint", "state_dir", "status", "log"}, plus
"serving" once FUSE's init reached it, and "detached" once a signal made it unmount) and
removed when it ends. A daemon killed with -9 leaves its record behind: a record whose
pid is gone is stale (`forget_stale`).

A mountpoint's states (`mount_state`): "none"; "alive" or "dead" for a fusefs mount
(dead: its daemon died and the kernel answers ENOTCONN); "foreign" or "foreign-dead"
for anything else, which fusefs never detaches.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import subprocess
import threading

from .host import process_alive


def runtime_dir() -> str:
    """Where running mounts register themselves (one JSON file per mountpoint)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/fusefs-{os.getuid()}"
    path = os.path.join(base, "fusefs")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def canonical(path: str) -> str:
    """`path` absolute with its symbolic links resolved, as os.path.realpath gives it, but
    without a request to a filesystem mounted at `path` itself. realpath stats every name,
    the last one too, and a FUSE mount whose daemon is stopped or hung holds that stat
    (and the caller with it: only SIGKILL ends the wait). Here the parent is resolved,
    and the last name only if it is a symbolic link: readlink of a mount's root is
    refused by the kernel without asking its daemon."""
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    for _ in range(40):  # (the kernel's own limit of links in one path)
        parent, name = os.path.split(path.rstrip("/"))
        if not name:
            return "/"
        if name == ".":
            path = parent
            continue
        if name == "..":
            return os.path.dirname(canonical(parent))
        path = os.path.join(os.path.realpath(parent), name)
        try:
            target = os.readlink(path)
        except OSError:
            return path
        path = os.path.join(os.path.dirname(path), target)
    return path


def registry_path(mountpoint: str) -> str:
    key = hashlib.sha256(canonical(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(runtime_dir(), f"{key}.json")


def read_registry(mountpoint: str) -> dict | None:
    return read_record(registry_path(mountpoint))


def read_record(path: str) -> dict | None:
    """The registry record in the file at `path`, or None if there is none."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def write_json(path: str, value: dict) -> None:
    """Replace the JSON file at `path` at once (readers see the old or the new one)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) of every mount this process sees, in mount order."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            rest = fields[fields.index("-") + 1:]
            found.append((_unescape(fields[4]), rest[0], _unescape(rest[1])))
    return found


def _mount_entry(path: str) -> tuple[str, str] | None:
    """(fstype, source) of the topmost mount exactly at `path`, or None."""
    target = canonical(path)
    entries = [(fstype, source) for point, fstype, source in _mounts() if point == target]
    return entries[-1] if entries else None


def _is_fusefs(fstype: str, source: str) -> bool:
    return fstype == "fuse.fusefs" or (fstype == "fuse" and source == "fusefs")


def is_mounted(path: str) -> bool:
    """True if something is mounted exactly at `path`."""
    return _mount_entry(path) is not None


def fusefs_mountpoints() -> list[str]:
    """Every fusefs mount this process sees, alive or dead."""
    return [point for point, fstype, source in _mounts() if _is_fusefs(fstype, source)]


def _connection_gone(path: str, timeout: float = 2.0) -> bool:
    """True if the FUSE mount at `path` answers ENOTCONN: the program serving it died.
    statfs always reaches that program (stat may be answered from the kernel's attribute
    cache); one that does not answer within `timeout` (stopped, busy) counts as alive."""
    answer = []

    def probe():
        try:
            os.statvfs(path)
            answer.append(0)
        except OSError as e:
            answer.append(e.errno)

    prober = threading.Thread(target=probe, name="mount-probe", daemon=True)
    prober.start()
    prober.join(timeout)
    return bool(answer) and answer[0] in (errno.ENOTCONN, errno.ECONNABORTED)


def mount_state(path: str) -> str:
    """What is mounted at `path`: "none"; "alive" or "dead" for a fusefs mount (dead: its
    daemon died, kill -9 or out of memory, and the mount is left "Transport endpoint is not
    connected"); "foreign" or "foreign-dead" for a mount of anything else, which fusefs
    never detaches. A registered daemon that still runs means alive without asking the
    mount (a stopped daemon would not answer)."""
    entry = _mount_entry(path)
    if entry is None:
        return "none"
    if not _is_fusefs(*entry):
        dead = entry[0].startswith("fuse") and _connection_gone(path)
        return "foreign-dead" if dead else "foreign"
    record = read_registry(path)
    if record is not None and process_alive(record.get("pid")):
        return "alive"
    return "dead" if _connection_gone(path) else "alive"


def forget_stale(path: str) -> None:
    """Remove the registry record of a daemon that died without removing it."""
    record = read_registry(path)
    if record is not None and not process_alive(record.get("pid")):
        unlink_quietly(registry_path(path))


def unmount(path: str, lazy: bool = False) -> bool:
    """Ask the kernel to unmount a FUSE mount; True if one of the tools succeeded."""
    flags = ["-u", "-z"] if lazy else ["-u"]
    for cmd in (["fusermount3", *flags, path], ["fusermount", *flags, path],
                ["umount", *(["-l"] if lazy else []), path]):
        try:
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return True
        except FileNotFoundError:
            continue
    return False


def register(mountpoint: str, record: dict) -> str:
    """Record the daemon serving `mountpoint` (this process); returns the record's path."""
    path = registry_path(mountpoint)
    write_json(path, record)
    return path


def unregister(mountpoint: str) -> None:
    """Remove this process's record of `mountpoint` (another daemon's stays)."""
    record = read_registry(mountpoint)
    if record is not None and record.get("pid") == os.getpid():
        unlink_quietly(registry_path(mountpoint))


def mark_detached(mountpoint: str) -> None:
    """Everything is uploaded and the mount detached: `fusefs umount` returns on this."""
    _mark(registry_path(mountpoint), detached=True)


def mark_serving(record_path: str) -> None:
    """FUSE's init reached this daemon: libfuse took every option and serves the mount.
    `fusefs mount` returns on this mark, not on the mount table: libfuse 2 mounts before
    it parses its options, and unmounts again if one is unknown. `record_path` is
    `registry_path` computed before mounting; resolving the mountpoint here would be a
    request to this daemon, which serves nothing until init returns."""
    _mark(record_path, serving=True)


def serving(record_path: str, pid: int) -> bool:
    """True once the daemon `pid` marked its record at `record_path` serving."""
    record = read_record(record_path)
    return record is not None and record.get("pid") == pid and bool(record.get("serving"))


def _mark(record_path: str, **fields) -> None:
    record = read_record(record_path)
    if record is not None and record.get("pid") == os.getpid():
        write_json(record_path, {**record, **fields})


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
