"""A running mount: the one place the layers are built, and torn down in reverse.

`run(config)` builds transport → cluster → metadata → cache → flusher → filesystem →
FUSE adapter from one frozen `MountConfig`, serves the mount until it is unmounted,
uploads everything dirty, and closes each layer in the reverse order of building it.
SIGTERM/SIGINT upload everything *first* and then unmount: libfuse's own handling would
unmount at once and upload after, leaving a window in which the filesystem looks gone
but its data is not on the servers yet. One daemon at a time may use a state directory
(an flock on `lock`); a second one waits for the first to finish. While it runs it keeps a small JSON status
file (`status.json` in its state directory) for `fusefs status` and `fusefs umount`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from . import errors, journal, kernel_attrs, superblock
from .cache import BlockCache
from .cluster import ClusterConfig, ReplicatedStore
from .filesystem import Filesystem
from .flusher import Flusher
from .fuse_glue import Mount
from .fuse_ops import FuseOps, mount_options
from .transport import Member, Transport, TransportConfig

log = logging.getLogger("fusefs.daemon")


@dataclass(frozen=True)
class MountConfig:
    mountpoint: str
    superblock: superblock.Superblock
    members: tuple[Member, ...]
    state_dir: str  # metadata database, disk cache, log and status for this filesystem
    secret: bytes | None = None
    role: str = "write"  # what `secret` is: the cluster secret, or a read-only key ("read")
    tls_verify: bool | str = True
    memory_cache: int = 256 << 20
    disk_cache: int = 2 << 30
    dirty_limit: int = 256 << 20
    flush_age: float = 5.0
    read_only: bool = False
    fuse_options: dict = field(default_factory=dict)
    lease_seconds: float = journal.LEASE_SECONDS
    ship_delay: float = 1.0
    checkpoint_records: int = 100_000
    journal: bool = True  # False only to measure what the journal costs
    sync_on_close: bool = False  # close(2) of a writer waits until the file is durable


def runtime_dir() -> str:
    """Where running mounts register themselves (one JSON file per mountpoint)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/fusefs-{os.getuid()}"
    path = os.path.join(base, "fusefs")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def registry_path(mountpoint: str) -> str:
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(runtime_dir(), f"{key}.json")


def read_registry(mountpoint: str) -> dict | None:
    try:
        with open(registry_path(mountpoint)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def _write_json(path: str, value: dict) -> None:
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
    target = os.path.realpath(path)
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
    if record is not None and journal.process_alive(record.get("pid")):
        return "alive"
    return "dead" if _connection_gone(path) else "alive"


def forget_stale(path: str) -> None:
    """Remove the registry record of a daemon that died without removing it."""
    record = read_registry(path)
    if record is not None and not journal.process_alive(record.get("pid")):
        _unlink_quietly(registry_path(path))


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


def private_dir(path: str) -> None:
    """Create `path` (and its parents) readable by its owner only, and take group and
    other access away from one that an older version created open. The state directory
    holds every file name, xattr and cached block of the filesystem."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _lock_state_dir(state_dir: str):
    lock = open(os.path.join(state_dir, "lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning("another fusefs daemon is still finishing with %s; waiting for it",
                    state_dir)
        fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def _unregister(mountpoint: str) -> None:
    record = read_registry(mountpoint)
    if record is not None and record.get("pid") == os.getpid():
        _unlink_quietly(registry_path(mountpoint))


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _stop_on_signal(mountpoint: str, finish) -> None:
    """SIGTERM/SIGINT: upload everything, then unmount, which ends the FUSE loop.

    `run` blocked the signals before starting any thread, so every thread inherits the
    mask (libfuse's too) and only this waiting thread takes them.
    """
    def wait():
        received = signal.sigwait(_STOP_SIGNALS)
        log.info("received %s: uploading everything, then unmounting",
                 signal.Signals(received).name)
        finish()
        if not unmount(mountpoint, lazy=True):
            log.error("could not unmount %s; unmount it by hand", mountpoint)
            return
        # Everything is uploaded and the mount detached; descriptors still open on it are
        # served until closed. `fusefs umount` returns on seeing this mark.
        record = read_registry(mountpoint)
        if record is not None and record.get("pid") == os.getpid():
            _write_json(registry_path(mountpoint), {**record, "detached": True})

    threading.Thread(target=wait, name="signals", daemon=True).start()


_libc = ctypes.CDLL(None)  # the C library: malloc_trim


def _give_freed_memory_back() -> None:
    """Return the free memory inside malloc's heaps to the system (glibc's malloc_trim).

    glibc serves 1 MiB blocks from per-thread heaps once its mmap threshold has adapted
    upward, and those heaps keep what is freed: in fs_bench's random-write rounds the
    daemon's resident size grew to 959-1,072 MiB with 512 MiB of cache bounds. Trimming
    once a second kept it at 621 MiB, with random reads as fast as before; a fixed mmap
    threshold gave 472 MiB but cost random reads 40% (a mapping and its page faults for
    every block fetched). Other C libraries have no malloc_trim: nothing to do."""
    try:
        _libc.malloc_trim(0)
    except AttributeError:
        pass


def run(config: MountConfig) -> None:
    """Serve the mount in this process until it is unmounted."""
    sb = config.superblock
    private_dir(config.state_dir)
    os.umask(0o077)  # the database, cache and status name every file: owner only
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # before any thread starts
    with contextlib.ExitStack() as stack:
        stack.enter_context(_lock_state_dir(config.state_dir))
        transport = Transport(TransportConfig(secret=config.secret, role=config.role,
                                              tls_verify=config.tls_verify))
        store = ReplicatedStore(config.members, transport,
                                ClusterConfig(replicas=sb.replicas, write_quorum=sb.write_quorum))
        store.start()
        stack.callback(store.close)
        db_path = os.path.join(config.state_dir, "metadata.db")
        sb = superblock.read_quorum(transport, config.members)
        if config.read_only:
            sb, metadata, segment = _load_following(store, transport, config, sb, db_path)
            stack.callback(metadata.close)
            keeper = journal.Follower(store, transport, sb, metadata, config.state_dir,
                                      next_segment=segment)
        else:
            keeper, metadata = _become_writer(config, transport, store, sb, db_path)
            stack.callback(metadata.close)
        cache = BlockCache(store, memory_bytes=config.memory_cache,
                           disk_dir=os.path.join(config.state_dir, "blocks"),
                           disk_bytes=config.disk_cache)
        stack.callback(cache.close)
        writer = keeper if not config.read_only else None  # None also for a local store
        durable = writer.wait_durable if writer is not None else None
        flusher = Flusher(store, cache, metadata, block_size=sb.block_size,
                          dirty_limit=config.dirty_limit, max_age=config.flush_age,
                          collect_garbage=not config.read_only, durable=durable)
        stack.callback(flusher.close)
        fs = Filesystem(metadata, cache, flusher, sb.block_size, capacity=store.capacity,
                        sync_on_close=config.sync_on_close, gate=writer, durable=durable,
                        read_only="mounted read-only" if config.read_only else None,
                        changes=keeper if config.read_only else None)
        if config.read_only:
            keeper.start()
            stack.callback(keeper.close)
        else:
            if keeper is not None:
                stack.callback(keeper.close)  # (a no-op after finish() closed it)
            fs.start()
        status_path = os.path.join(config.state_dir, "status.json")
        reporter = _StatusReporter(status_path, config, store, flusher, cache, keeper)
        reporter.start()
        stack.callback(reporter.stop)
        _write_json(registry_path(config.mountpoint),
                    {"pid": os.getpid(), "mountpoint": os.path.realpath(config.mountpoint),
                     "state_dir": config.state_dir, "status": status_path,
                     "log": os.path.join(config.state_dir, "fusefs.log")})
        stack.callback(_unregister, config.mountpoint)

        def finish():
            if config.read_only:
                return
            log.info("unmounting: uploading %d dirty bytes", flusher.dirty_bytes)
            fs.shutdown(progress=lambda dirty, files: log.warning(
                "still waiting to upload %d bytes of %d files", dirty, files))
            if keeper is not None:
                keeper.close()
            log.info("all data and metadata uploaded")

        refresher = None
        if not config.read_only:
            if kernel_attrs.supported():
                refresher = kernel_attrs.AttrRefresher(config.mountpoint)
                stack.callback(refresher.close)
            else:
                log.warning("this kernel has no openat2 RESOLVE_CACHED (Linux 5.12): the "
                            "kernel will cache no attributes, which makes metadata slower")
        ops = FuseOps(fs, on_destroy=finish, refresher=refresher)
        fs.subscribe(ops.forget_paths)  # a follower's changes
        _stop_on_signal(config.mountpoint, finish)
        options = mount_options(config.read_only, config.fuse_options,
                                cache_attributes=refresher is not None)
        log.info("mounting filesystem %s at %s (%d servers, R=%d, W=%d)", sb.fs_id,
                 config.mountpoint, len(config.members), sb.replicas, sb.write_quorum)
        mountpoint = os.fsencode(os.path.abspath(config.mountpoint)).decode("latin-1")
        Mount(ops, mountpoint, raw_fi=True, foreground=True, encoding="latin-1", **options)
        log.info("unmounted %s", config.mountpoint)


def _load_following(store, transport, config: MountConfig, sb, db_path: str):
    """A read-only mount's load. A writer's checkpoint may delete the segments this load
    was replaying (a gap): the superblock then names a newer checkpoint, so read it and
    load once more."""
    try:
        metadata, _, segment = journal.open_metadata(store, sb, db_path, log.info)
    except journal.ChainGap as e:
        log.info("the journal moved on while loading (%s); loading again", e)
        sb = superblock.read_quorum(transport, config.members)
        metadata, _, segment = journal.open_metadata(store, sb, db_path, log.info)
    return sb, metadata, segment


def _become_writer(config: MountConfig, transport, store, sb, db_path: str):
    """Take the writer lease, load the metadata, and start this mount's journal chain.

    Refusals (another writer holds the lease) end the daemon with the message; if
    loading fails after the lease was taken, the lease is given back."""
    lease = journal.new_lease(journal.new_mount_id(), config.lease_seconds, config.mountpoint)
    unclean = sb.lease is not None  # the last writer never gave the lease back
    try:
        sb = journal.acquire(transport, sb, lease)
    except journal.LeaseHeld as e:
        raise SystemExit(f"fusefs: {e}") from None
    try:
        metadata, replayed, end = journal.open_metadata(store, sb, db_path, log.info)
        if not config.journal:
            log.warning("the journal is off (--unsafe-no-journal): changes of this mount stay "
                        "on this machine and the cluster never learns of them")
            return None, metadata
        keeper = journal.Journal(store, transport, sb, metadata, config.state_dir,
                                 ship_delay=config.ship_delay,
                                 checkpoint_records=config.checkpoint_records)
        keeper.start(replayed, end, sweep=unclean)
    except BaseException:
        with contextlib.suppress(errors.StorageError):
            superblock.update(transport, sb.with_changes(lease=None))
        raise
    log.info("writer lease taken (%s); journal chain %s", lease["holder"], keeper.chain)
    return keeper, metadata


class _StatusReporter:
    """Writes status.json every second: servers, dirty bytes, repair backlog, errors; and
    gives the memory freed meanwhile back to the system."""

    def __init__(self, path: str, config: MountConfig, store, flusher, cache, keeper):
        self.path, self.config = path, config
        self.store, self.flusher, self.cache, self.keeper = store, flusher, cache, keeper
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        _unlink_quietly(self.path)

    def _run(self) -> None:
        while True:
            try:
                _write_json(self.path, {
                    "pid": os.getpid(), "mountpoint": self.config.mountpoint,
                    "fs_id": self.config.superblock.fs_id, "time": time.time(),
                    "dirty_bytes": self.flusher.dirty_bytes,
                    "upload_errors": self.flusher.recent_errors(),
                    "cluster": self.store.stats(), "cache": self.cache.stats(),
                    "journal": self.keeper.stats() if self.keeper else None})
            except Exception:  # noqa: BLE001 - status is best effort, never fatal
                log.exception("could not write %s", self.path)
            _give_freed_memory_back()
            if self._stop.wait(1.0):
                return


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
