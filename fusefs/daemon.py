"""A running mount: the one place the layers are built, and torn down in reverse.

`run(config)` builds transport → cluster → lease (read-write) → metadata → journal (or
follower) → cache → flusher → filesystem → FUSE adapter from one frozen `MountConfig`,
each given its collaborators in its constructor (nothing is wired after), serves the
mount until it is unmounted, uploads everything dirty, and closes each layer in the
reverse order of building it.
SIGTERM/SIGINT upload everything *first* and then unmount: libfuse's own handling would
unmount at once and upload after, leaving a window in which the filesystem looks gone
but its data is not on the servers yet. One daemon at a time may use a state directory
(an flock on `lock`); a second one waits for the first to finish. While it runs it keeps a small JSON status
file (`status.json` in its state directory) for `fusefs status` and `fusefs umount`, and
registers itself in the mount registry (fusefs/mounts.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from . import errors, kernel_attrs, mounts, superblock
from .antientropy import FIRST_PASS, Repairer, wanted_blocks
from .cache import BlockCache
from .cluster import ClusterConfig, ReplicatedStore
from .filesystem import Filesystem
from .flusher import Flusher
from .follower import Follower
from .fuse_glue import Mount
from .fuse_ops import FuseOps, mount_options
from .host import new_mount_id
from .journal import Journal
from .lease import LEASE_SECONDS, Lease, new_lease
from .loading import open_metadata
from .localroom import BEHIND, DEFAULT_RESERVE, REFUSED, LocalRoom
from .metrics import MetricsError, MountMetrics, oldest_dirty_seconds, parse_address, status_file
from .transport import Member, Transport, TransportConfig, at_given_urls

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
    local_reserve: int = DEFAULT_RESERVE  # free bytes kept on state_dir's disk (localroom.py)
    dirty_limit: int = 256 << 20
    flush_age: float = 5.0
    read_only: bool = False
    fuse_options: dict = field(default_factory=dict)
    lease_seconds: float = LEASE_SECONDS
    ship_delay: float = 1.0
    checkpoint_records: int = 100_000
    journal: bool = True  # False only to measure what the journal costs
    sync_on_close: bool = False  # close(2) of a writer waits until the file is durable
    local_reads: bool = True  # read the block files of servers on this host directly
    metrics: str | None = None  # ADDR:PORT of the Prometheus endpoint (metrics.py); None: off
    repair_rate: float | None = 32 << 20  # bytes/s the background repair copies, at most
    repair_interval: float = 60.0  # seconds between repair passes when nothing happens
    repair_delay: float = FIRST_PASS  # seconds from the mount to the first repair pass
    rehome_after: float | None = 600.0  # a server down this long stops being a home
    scrub_interval: float = 0  # seconds between background scrub passes; 0: no scrubbing


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


def _remove_temporary_databases(state_dir: str) -> None:
    """Checkpoint and follower copies a daemon killed while making one left behind (the
    state directory is ours alone once locked)."""
    for name in os.listdir(state_dir):
        if name.startswith(("checkpoint-", "follow-")) and ".db" in name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(state_dir, name))


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _stop_on_signal(mountpoint: str, finish) -> "_SignalStop":
    """SIGTERM/SIGINT: upload everything, then unmount, which ends the FUSE loop. Returns
    what tells whether a signal started that, and waits for it to end.

    `run` blocked the signals before starting any thread, so every thread inherits the
    mask (libfuse's too) and only this waiting thread takes them.
    """
    stop = _SignalStop()

    def wait():
        received = signal.sigwait(_STOP_SIGNALS)
        log.info("received %s: uploading everything, then unmounting",
                 signal.Signals(received).name)
        stop.stopping.set()
        try:
            finish()
            if not mounts.unmount(mountpoint, lazy=True):
                if not mounts.is_mounted(mountpoint):  # unmounted meanwhile (umount)
                    log.info("%s was unmounted meanwhile", mountpoint)
                else:
                    log.error("could not unmount %s; unmount it by hand", mountpoint)
                return
            # Everything is uploaded and the mount detached; descriptors still open on it
            # are served until closed. `fusefs umount` returns on seeing this mark.
            mounts.mark_detached(mountpoint)
        except Exception:  # noqa: BLE001 - logged; the session's end finishes again
            log.exception("error while stopping on a signal")
        finally:
            stop.ended.set()

    threading.Thread(target=wait, name="signals", daemon=True).start()
    return stop


class _SignalStop:
    """A stop signal's progress: `stopping` once one arrived, `ended` once its upload and
    unmount are over. The session may end before that (the kernel aborting the connection
    after the signal): the daemon then waits for `ended` before closing anything, or it
    would close the journal and the metadata under the upload and exit before unmounting."""

    def __init__(self):
        self.stopping = threading.Event()
        self.ended = threading.Event()

    def wait(self) -> None:
        if self.stopping.is_set():
            self.ended.wait()


class _Once:
    """`action` run once, whoever calls first: the signal thread and the session's end
    (destroy) both finish the mount, and may do so at the same time. A caller arriving while
    it runs waits for it to end; if it raised, the next caller runs it again. No lock is
    held while it runs."""

    def __init__(self, action):
        self._action = action
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._state = "new"  # new -> running -> done (or back to new if it raised)

    def __call__(self) -> None:
        with self._lock:
            while self._state == "running":
                self._idle.wait()
            if self._state == "done":
                return
            self._state = "running"
        ok = False
        try:
            self._action()
            ok = True
        finally:
            with self._lock:
                self._state = "done" if ok else "new"
                self._idle.notify_all()


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
    """Serve the mount in this process until it is unmounted.

    Each layer is built once, given its collaborators in its constructor, in this order:
    transport, store, lease (read-write) or nothing, metadata, journal or follower, cache,
    flusher, filesystem, FUSE adapter; each is closed in the reverse order."""
    private_dir(config.state_dir)
    os.umask(0o077)  # the database, cache and status name every file: owner only
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # before any thread starts
    with contextlib.ExitStack() as stack:
        stack.enter_context(_lock_state_dir(config.state_dir))
        _remove_temporary_databases(config.state_dir)
        meter = _start_metrics(config, stack)
        transport = Transport(TransportConfig(secret=config.secret, role=config.role,
                                              tls_verify=config.tls_verify),
                              observe=meter.request if meter is not None else None)
        sb = config.superblock
        store = ReplicatedStore(config.members, transport,
                                ClusterConfig(replicas=sb.replicas, write_quorum=sb.write_quorum,
                                              local_reads=config.local_reads))
        store.start()
        stack.callback(store.close)
        sb = superblock.read_quorum(transport, config.members)
        if config.read_only:
            sb, metadata, keeper = _follow(config, transport, store, sb, stack)
            gate = writer = scrubber = None
        else:
            lease = _take_lease(config, transport, sb)
            writer, metadata = _become_writer(config, transport, store, lease,
                                              unclean=sb.lease is not None)
            stack.callback(metadata.close)
            keeper = writer
            gate = lease if writer is not None else None  # None also for a local store
            scrubber = _start_scrubber(config, stack, transport, lease)
        _serve(config, stack, sb, store, metadata, keeper, gate, writer, meter, scrubber)


def _serve(config: MountConfig, stack, sb, store, metadata, keeper, gate, writer,
           meter=None, scrubber=None) -> None:
    """Build the cache, flusher, filesystem and adapter over the loaded metadata, and
    serve the mount until it is unmounted. `keeper` is the journal (or follower)."""
    cache = BlockCache(store, memory_bytes=config.memory_cache,
                       disk_dir=os.path.join(config.state_dir, "blocks"),
                       disk_bytes=config.disk_cache)
    stack.callback(cache.close)
    durable = writer.wait_durable if writer is not None else None
    flusher = Flusher(store, cache, metadata, block_size=sb.block_size,
                      dirty_limit=config.dirty_limit, max_age=config.flush_age,
                      collect_garbage=not config.read_only, durable=durable)
    stack.callback(flusher.close)
    # A read-only mount needs room too: its copy of the database takes the writer's changes.
    room = LocalRoom(config.state_dir, config.local_reserve, make_room=cache.shrink_disk,
                     consequence=BEHIND if config.read_only else REFUSED)
    cache.room = room
    fs = Filesystem(metadata, cache, flusher, sb.block_size, capacity=store.capacity,
                    sync_on_close=config.sync_on_close, gate=gate, durable=durable,
                    read_only="mounted read-only" if config.read_only else None,
                    changes=keeper if config.read_only else None, room=room)
    if config.read_only:
        keeper.room = room
        keeper.start()
        stack.callback(keeper.close)
    else:
        if keeper is not None:
            stack.callback(keeper.close)  # (a no-op after finish() closed it)
        fs.start()
    repairer = _start_repairer(config, stack, store, metadata, writer)
    status_path = os.path.join(config.state_dir, "status.json")
    reporter = _StatusReporter(status_path, config, store, flusher, cache, keeper, repairer,
                               scrubber, room)
    reporter.start()
    stack.callback(reporter.stop)
    record_path = mounts.register(  # (before anything is mounted there)
        config.mountpoint,
        {"pid": os.getpid(), "mountpoint": os.path.realpath(config.mountpoint),
         "state_dir": config.state_dir, "status": status_path,
         "log": os.path.join(config.state_dir, "fusefs.log")})
    stack.callback(mounts.unregister, config.mountpoint)

    @_Once
    def finish():
        if config.read_only:
            return
        log.info("unmounting: uploading %d dirty bytes", flusher.dirty_bytes)
        fs.shutdown(progress=lambda dirty, files: log.warning(
            "still waiting to upload %d bytes of %d files", dirty, files))
        if keeper is not None:
            keeper.close()
        if metadata.failed:  # (the lines above name what was given up)
            log.error("unmounting with changes that were not saved: %s", metadata.failed)
        else:
            log.info("all data and metadata uploaded")

    if meter is not None:
        meter.dirty_age = lambda: oldest_dirty_seconds(flusher)
    _mount(config, stack, sb, fs, finish, meter,
           on_init=lambda: mounts.mark_serving(record_path))


def _mount(config: MountConfig, stack, sb, fs: Filesystem, finish, meter=None,
           on_init=None) -> None:
    """The FUSE adapter over `fs`: serve until unmounted; `finish` uploads everything,
    `on_init` is called when FUSE's init reached the daemon (libfuse serves the mount)."""
    refresher = None
    if not config.read_only:
        if kernel_attrs.supported():
            refresher = kernel_attrs.AttrRefresher(config.mountpoint)
            stack.callback(refresher.close)
        else:
            log.warning("this kernel has no openat2 RESOLVE_CACHED (Linux 5.12): the "
                        "kernel will cache no attributes, which makes metadata slower")
    ops = FuseOps(fs, on_destroy=finish, refresher=refresher, meter=meter, on_init=on_init)
    fs.subscribe(ops.forget_paths)  # a follower's changes
    stop = _stop_on_signal(config.mountpoint, finish)
    options = mount_options(config.read_only, config.fuse_options,
                            cache_attributes=refresher is not None)
    log.info("mounting filesystem %s at %s (%d servers, R=%d, W=%d)", sb.fs_id,
             config.mountpoint, len(config.members), sb.replicas, sb.write_quorum)
    mountpoint = os.fsencode(os.path.abspath(config.mountpoint)).decode("latin-1")
    serve_session(lambda: Mount(ops, mountpoint, raw_fi=True, foreground=True,
                                encoding="latin-1", **options), stop.stopping, ops.started)
    stop.wait()  # a stop signal's upload and unmount, if the session ended under them
    log.info("unmounted %s", config.mountpoint)


def serve_session(serve, stopping: threading.Event, started: threading.Event) -> None:
    """Run the FUSE session (`serve`, fusepy's Mount: returns when it ends). An error from
    libfuse's loop (fusepy raises RuntimeError) once a stop signal started the unmount
    (`stopping`) ends it like the unmount: the kernel may end the session by aborting the
    connection (libfuse reads ECONNABORTED, not ENODEV, and returns 1), and everything was
    uploaded before the unmount and again at the session's end (destroy). One before the
    session `started` (FUSE's init) is libfuse refusing to mount: MountRefused, said in a
    line under libfuse's own. Any other is raised."""
    try:
        serve()
    except RuntimeError as e:
        if stopping.is_set():
            log.info("the FUSE session ended with status %s after the unmount", e)
        elif not started.is_set():
            raise errors.MountRefused("FUSE did not mount; libfuse's reason is its line "
                                      "('fuse: ...') above: an unknown -o option? a "
                                      "mountpoint it cannot use?") from None
        else:
            raise


def _start_scrubber(config: MountConfig, stack, transport, lease: Lease):
    """The background scrub of a read-write mount (fusefs/scrub.py), slow and resumable
    from `scrub.json` in the state directory; stopped before the transport closes. The
    servers are the lease's newest superblock's, at the URLs this mount was given."""
    if config.scrub_interval <= 0:
        return None
    from .scrub import BACKGROUND_RATE, Scrubber

    scrubber = Scrubber(transport, lambda: _at_given_urls(config, lease.superblock.servers),
                        os.path.join(config.state_dir, "scrub.json"),
                        lease.superblock.fs_id, rate=BACKGROUND_RATE)
    scrubber.start(config.scrub_interval)
    stack.callback(scrubber.stop)
    return scrubber


def _at_given_urls(config: MountConfig, members) -> list[Member]:
    """`members` at the URLs this mount was given for them (servers may have moved since
    the superblock recorded theirs); a server added since keeps its recorded URL."""
    return list(at_given_urls(members, {m.id: m.url for m in config.members}))


def _start_repairer(config: MountConfig, stack, store, metadata, journal):
    """The writer's background anti-entropy repair (fusefs/antientropy.py), and the
    writer following membership changes: at each lease renewal (a change made by `fusefs
    servers` reaches the lease as a compare-and-swap conflict it rebases over) and before
    a repair pass deletes anything."""
    if journal is None:
        return None
    lease = journal.lease

    def follow(lost) -> None:
        if lost is not None:
            repairer.stop()
            return
        sb = lease.superblock
        store.set_membership(_at_given_urls(config, sb.members),
                             _at_given_urls(config, sb.leaving))

    def membership():
        sb = superblock.read_quorum(store.transport, store.members)
        return _at_given_urls(config, sb.members), _at_given_urls(config, sb.leaving)

    def wanted():
        sb = lease.superblock
        cp, segment = sb.checkpoint, journal.stats()["segment"]
        first = cp["segment"] if cp["chain"] == journal.chain else 1
        return wanted_blocks(metadata, store, cp, sb.fs_id, chain=journal.chain,
                             segments=range(first, segment + 1))

    repairer = Repairer(store, wanted, rate=config.repair_rate,
                        interval=config.repair_interval, first_pass=config.repair_delay,
                        membership=membership,
                        down_out=config.rehome_after)
    lease.subscribe(follow)
    repairer.start()
    stack.callback(repairer.close)
    return repairer


def _start_metrics(config: MountConfig, stack) -> MountMetrics | None:
    """With --metrics: the mount's metrics (fusefs/metrics.py), served from now on, before
    anything is mounted, so a port in use fails the mount at once. Gauges are read from
    status.json at each scrape: the figures `fusefs status` shows."""
    if config.metrics is None:
        return None
    meter = MountMetrics(status=status_file(os.path.join(config.state_dir, "status.json")))
    try:
        meter.serve(*parse_address(config.metrics))
    except (MetricsError, ValueError) as e:
        raise SystemExit(f"fusefs: {e}") from None
    stack.callback(meter.close)
    return meter


def _db_path(config: MountConfig) -> str:
    return os.path.join(config.state_dir, "metadata.db")


def _follow(config: MountConfig, transport, store, sb, stack):
    """A read-only mount's load, and the follower that keeps it current. A writer's
    checkpoint may delete the segments this load was replaying (a gap): the superblock
    then names a newer checkpoint, so read it and load once more."""
    try:
        metadata, _, segment = open_metadata(store, sb, _db_path(config), log.info)
    except errors.JournalGap as e:
        log.info("the journal moved on while loading (%s); loading again", e)
        sb = superblock.read_quorum(transport, config.members)
        metadata, _, segment = open_metadata(store, sb, _db_path(config), log.info)
    stack.callback(metadata.close)
    follower = Follower(store, transport, sb, metadata, config.state_dir,
                        next_segment=segment)
    return sb, metadata, follower


def _take_lease(config: MountConfig, transport, sb) -> Lease:
    """The writer lease; a refusal (another writer holds it) ends the daemon with why."""
    try:
        return Lease.take(transport, sb, new_lease(new_mount_id(), config.lease_seconds,
                                                   config.mountpoint))
    except errors.LeaseHeld as e:
        raise SystemExit(f"fusefs: {e}") from None


def _become_writer(config: MountConfig, transport, store, lease: Lease, unclean: bool):
    """Load the metadata and start this mount's journal chain under `lease`. If this
    fails, the lease is given back. `unclean`: the last writer never gave the lease back
    (the journal sweeps what it may have left)."""
    sb = lease.superblock
    try:
        metadata, replayed, end = open_metadata(store, sb, _db_path(config), log.info)
        if not config.journal:
            log.warning("the journal is off (--unsafe-no-journal): changes of this mount stay "
                        "on this machine and the cluster never learns of them")
            return None, metadata
        keeper = Journal(store, transport, lease, metadata, config.state_dir,
                         ship_delay=config.ship_delay,
                         checkpoint_records=config.checkpoint_records)
        keeper.start(replayed, end, sweep=unclean)
    except BaseException:
        lease.stop()
        with contextlib.suppress(errors.StorageError):
            lease.release()  # through the lease: its newest superblock, under its lock
        raise
    log.info("writer lease taken (%s); journal chain %s", sb.lease["holder"], keeper.chain)
    return keeper, metadata


def _health(repairer, config: MountConfig, scrubber=None) -> dict | None:
    """The background repair's figures, and the last scrub as `scrub.json` in the state
    directory records it (this mount's background scrub, or `fusefs scrub` run with the
    same cache directory). None where no repair runs (a read-only mount)."""
    if repairer is None:
        return None
    from .scrub import last_scrub

    state = os.path.join(config.state_dir, "scrub.json")
    return {**repairer.stats(), "last_scrub": last_scrub(state, config.superblock.fs_id),
            "scrub_running": scrubber.stats()["running"] if scrubber else False}


class _StatusReporter:
    """Writes status.json every second: servers, dirty bytes, repair backlog, errors; and
    gives the memory freed meanwhile back to the system."""

    def __init__(self, path: str, config: MountConfig, store, flusher, cache, keeper,
                 repairer=None, scrubber=None, room=None):
        self.path, self.config, self.repairer, self.scrubber = path, config, repairer, scrubber
        self.room = room
        self._full_since = None  # when writing the file last failed for want of room
        self.store, self.flusher, self.cache, self.keeper = store, flusher, cache, keeper
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        mounts.unlink_quietly(self.path)

    def _run(self) -> None:
        while True:
            if self.room is not None:  # looked at each second, creates or not
                with contextlib.suppress(errors.FsError):
                    self.room.check()
            try:
                mounts.write_json(self.path, {
                    "pid": os.getpid(), "mountpoint": self.config.mountpoint,
                    "fs_id": self.config.superblock.fs_id, "time": time.time(),
                    "dirty_bytes": self.flusher.dirty_bytes,
                    "dirty_oldest_seconds": round(oldest_dirty_seconds(self.flusher), 1),
                    "upload_errors": self.flusher.recent_errors(),
                    "cluster": self.store.stats(), "cache": self.cache.stats(),
                    "journal": self.keeper.stats() if self.keeper else None,
                    "health": _health(self.repairer, self.config, self.scrubber),
                    "local_room": self.room.low if self.room is not None else None})
                self._full_since = None
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    log.exception("could not write %s", self.path)
                elif self._full_since is None or time.monotonic() - self._full_since > 60:
                    self._full_since = time.monotonic()  # once a minute, not every second
                    log.warning("could not write %s: %s (`fusefs status` shows an older "
                                "state meanwhile)", self.path, e)
            except Exception:  # noqa: BLE001 - status is best effort, never fatal
                log.exception("could not write %s", self.path)
            _give_freed_memory_back()
            if self._stop.wait(1.0):
                return

