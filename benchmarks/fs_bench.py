#!/usr/bin/env python3
"""Filesystem benchmark: a native directory, a minimal fusepy passthrough, and fusefs, in one run.

One invocation prepares three targets under one work directory (so all of them use the
same disk):

  native       a plain directory                              (the hardware)
  passthrough  benchmarks/passthrough.py mirroring a directory (the ceiling for a Python
               FUSE filesystem: fusepy/libfuse2 with the options of docs/fuse-and-performance.md)
  fusefs       `python -m fusefs up DIR`: three local block servers, R=3, mounted at DIR/mnt

and runs the same workloads on each, the targets interleaved within every round (their order
rotates from round to round) so that the noise of a shared machine hits all of them alike:

  seq write      one file of --size written in 1 MiB writes, fsync and close included
  seq read cold  the file read in 1 MiB reads after `sync; echo 3 > drop_caches`; fusefs is
                 also remounted (its memory cache is emptied) and its disk block cache
                 removed first, so every block comes from the block servers
  ... disk cache fusefs only: remounted and page cache dropped, its disk block cache kept
  seq read warm  the same file read again at once
  random read    --ops 4 KiB preads at random aligned offsets of that file, after dropping
                 the page cache (readahead disabled with POSIX_FADV_RANDOM); fusefs keeps
                 whatever its own caches hold
  random write   --ops 4 KiB pwrites at random aligned offsets, then fsync
  metadata       --files empty files in one directory: create, stat, list (listdir, 5
                 times; entries/s), rename (same directory), delete
  small files    --small-files files of 1-16 KiB written (open, write, close), then read
                 back after dropping the page cache (files/s)
  untar, git     a tarball of the Python standard library without its tests (made once,
                 uncompressed: ~1,100 files, ~33 MB) extracted with `tar x`, then
                 `git add -A && git commit` of the tree (files/s)

Also measured in the same run: the physical ceiling for replicated writes on this disk (the
same bytes written R=3 times by a local loop, fsync at the end, divided by R; and, for
information, the block servers' way: one temp file + fsync + rename per 1 MiB block and
copy), and the memory of the fusefs daemon: its peak resident size (VmHWM) while a freshly
mounted daemon with a small --memory-cache and --dirty-limit writes, then reads back, a file
4 times the memory cache, against "memory cache + dirty limit + 200 MiB".

The table shows medians over rounds and the median over rounds of each per-round ratio
(fusefs/passthrough, fusefs/native, passthrough/native). cpu columns: CPU seconds per wall
second (100% = one core) of the passthrough process, of the fusefs daemon and of the three
block servers together, during the timed part. Targets at the end are informational.

Everything this script starts is stopped in `finally` (also on Ctrl-C / SIGTERM): the
fusefs mount with `fusefs down`, the passthrough with fusermount -u (-z as a fallback), and
then any process of ours still alive is killed. --keep leaves the work directory in place.
Must run as root (drop_caches).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from blockserver.protocol import parse_size  # noqa: E402
from fusefs.mounts import is_mounted, read_registry  # noqa: E402
from servers import filesystem_of, load_average  # noqa: E402
from servers import process_cpu_seconds as cpu_seconds  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MB = 1_000_000  # throughput in decimal MB/s, like docs/fuse-and-performance.md
CHUNK = 1 * MiB
R = 3  # replicas of the fusefs cluster that `fusefs up` formats
TARGETS = ("native", "passthrough", "fusefs")
TARGET_ALIASES = {"a": "native", "b": "passthrough", "c": "fusefs", "pt": "passthrough",
                  "native": "native", "passthrough": "passthrough", "fusefs": "fusefs"}
GROUPS = ("seq", "random", "meta", "small", "untar", "ceiling", "memory")

# (key, label, unit); the table's rows in this order. `BASE` names the row whose native and
# passthrough figures a fusefs-only row is compared with.
ROWS = [
    ("seq_write", "seq write {size} + fsync", "MB/s"),
    ("seq_read_cold", "seq read cold (fusefs: from servers)", "MB/s"),
    ("seq_read_cold_disk", "seq read cold (fusefs: disk cache)", "MB/s"),
    ("seq_read_warm", "seq read warm", "MB/s"),
    ("rand_read", "random 4 KiB read, {ops} ops", "IOPS"),
    ("rand_write", "random 4 KiB write + fsync, {ops}", "IOPS"),
    ("meta_create", "create {files} files", "ops/s"),
    ("meta_stat", "stat {files} files", "ops/s"),
    ("meta_list", "list dir of {files} (x5)", "entries/s"),
    ("meta_rename", "rename {files} files", "ops/s"),
    ("meta_delete", "delete {files} files", "ops/s"),
    ("small_write", "small files write ({small} x 1-16 KiB)", "files/s"),
    ("small_read", "small files read (cold page cache)", "files/s"),
    ("untar", "untar {tar}", "files/s"),
    ("git", "git add -A && git commit", "files/s"),
]
BASE = {"seq_read_cold_disk": "seq_read_cold"}
CEILING_ROWS = [
    ("ceiling_stream", "replicated write ceiling: 3 copies, fsync at end, /3", "MB/s"),
    ("ceiling_block", "  per 1 MiB block: temp+fsync+rename x3, /3 (info)", "MB/s"),
]
META_REPEAT_LIST = 5
QUICK_TAR_DIRS = ("asyncio", "email", "json", "http", "xml")
TARGET_CHECKS = [  # (row, against, minimum, text)
    ("seq_write", "ceiling", 0.50, "sequential write >= 50% of the replicated-write ceiling"),
    ("seq_read_warm", "passthrough", 0.80, "warm sequential read >= 0.8 of passthrough"),
    ("seq_read_cold", "passthrough", 0.30, "cold sequential read >= 0.3 of passthrough"),
    ("meta_create", "passthrough", 0.70, "metadata: create >= 0.7 of passthrough"),
    ("meta_stat", "passthrough", 0.70, "metadata: stat >= 0.7 of passthrough"),
    ("meta_list", "passthrough", 0.70, "metadata: list >= 0.7 of passthrough"),
    ("meta_rename", "passthrough", 0.70, "metadata: rename >= 0.7 of passthrough"),
    ("meta_delete", "passthrough", 0.70, "metadata: delete >= 0.7 of passthrough"),
    ("small_write", "passthrough", 0.50, "small-file writes >= 0.5 of passthrough"),
    ("untar", "passthrough", 0.50, "untar >= 0.5 of passthrough"),
]


class BenchError(Exception):
    """Something went wrong that makes the figures meaningless."""


# -- small helpers ------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mount_options_of(path: str) -> str:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                sep = fields.index("-")
                return f"{fields[5]} / {fields[sep + 3]}"
    return "?"


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def drop_caches() -> None:
    """Write back everything, then drop the page cache, dentries and inodes (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def kill_quietly(pid: int | None, what: str, stray: bool = True) -> None:
    """SIGTERM, then SIGKILL after 10 s; `stray=False` when that is the normal way to stop."""
    if not alive(pid):
        return
    if stray:
        log(f"fs_bench: stopping stray {what} (pid {pid})")
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not alive(pid):
            return


def unmount(path: str) -> None:
    """fusermount -u, then a lazy unmount if it is busy; quiet when nothing is mounted."""
    if not is_mounted(path):
        return
    for cmd in (["fusermount", "-u", path], ["fusermount", "-u", "-z", path],
                ["umount", "-l", path]):
        if subprocess.run(cmd, capture_output=True).returncode == 0 and not is_mounted(path):
            return
    log(f"fs_bench: could not unmount {path}")


class Payload:
    """Incompressible bytes to write, made once; slices of it differ from one another."""

    def __init__(self, seed: int = 7):
        self.data = memoryview(random.Random(seed).randbytes(17 * MiB))

    def chunk(self, i: int, size: int = CHUNK) -> memoryview:
        off = (i * 65_537 * 64) % (16 * MiB)
        return self.data[off:off + size]


# -- the targets --------------------------------------------------------------------------------

class Target:
    name = ""

    def __init__(self, work: str):
        self.work = work
        self.root = ""  # where the workloads create their files

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def settle(self) -> None:
        """Untimed, before a timed phase: nothing left over from the previous one."""
        os.sync()

    def make_cold(self, keep_disk_cache: bool = False) -> None:
        drop_caches()

    def processes(self) -> dict[str, int | None]:
        """Processes whose CPU is reported: {"pt": pid} / {"daemon": pid, "servers": [...]}."""
        return {}

    def describe(self) -> str:
        return self.root


class Native(Target):
    name = "native"

    def start(self) -> None:
        self.root = os.path.join(self.work, "native")
        os.makedirs(self.root)


class Passthrough(Target):
    name = "passthrough"

    def __init__(self, work: str):
        super().__init__(work)
        self.backing = os.path.join(work, "pt-backing")
        self.mnt = os.path.join(work, "pt-mnt")
        self.log_path = os.path.join(work, "passthrough.log")
        self.proc: subprocess.Popen | None = None
        self.options = ""  # extra FUSE options (-o of passthrough.py)

    def start(self) -> None:
        os.makedirs(self.backing)
        os.makedirs(self.mnt)
        self._spawn()

    def _argv(self) -> list[str]:
        script = os.path.join(REPO, "benchmarks", "passthrough.py")
        extra = ["-o", self.options] if self.options else []
        return [sys.executable, script, self.backing, self.mnt, *extra]

    def _spawn(self) -> None:
        """Start the filesystem's process and wait until its mount appears."""
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 20
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not mount; log:\n{tail(self.log_path)}")
            time.sleep(0.05)
        self.root = self.mnt

    def stop(self) -> None:
        unmount(self.mnt)
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                kill_quietly(self.proc.pid, "passthrough")
                self.proc.wait(5)

    def processes(self):
        return {"pt": self.proc.pid if self.proc else None}

    def describe(self) -> str:
        return f"{self.mnt} ({mount_options_of(self.mnt)}), backing {self.backing}"


class Floor(Passthrough):
    """benchmarks/floor.py: an in-memory filesystem with fusefs's FUSE glue and options,
    the fastest a fusepy filesystem can be. Its tree is saved to `state` at unmount and
    loaded at mount, so a cold step (unmount, drop caches, mount) finds the same files."""

    name = "floor"

    def __init__(self, work: str):
        super().__init__(work)
        self.backing = os.path.join(work, "floor.pickle")  # its saved tree
        self.mnt = os.path.join(work, "floor-mnt")
        self.log_path = os.path.join(work, "floor.log")
        self.flags: list[str] = []  # more floor.py arguments, e.g. --no-dtype

    def start(self) -> None:
        os.makedirs(self.mnt)
        self._spawn()

    def _argv(self) -> list[str]:
        script = os.path.join(REPO, "benchmarks", "floor.py")
        extra = ["-o", self.options] if self.options else []
        return [sys.executable, script, self.backing, self.mnt, *self.flags, *extra]

    def make_cold(self, keep_disk_cache: bool = False) -> None:
        self.stop()
        if self.proc is not None and self.proc.returncode != 0:
            raise BenchError(f"floor did not save its tree; log:\n{tail(self.log_path)}")
        drop_caches()
        self._spawn()

    def describe(self) -> str:
        return f"{self.mnt} ({mount_options_of(self.mnt)}), tree saved to {self.backing}"


class Fusefs(Target):
    name = "fusefs"

    def __init__(self, work: str):
        super().__init__(work)
        self.dir = os.path.join(work, "fusefs")
        self.mnt = os.path.join(self.dir, "mnt")
        self.cluster: dict = {}
        self.daemon_pid: int | None = None
        self.state_dir = ""
        self.started = False
        self.peak_rss_kib = 0  # max VmHWM of every daemon this run mounted (main workloads)
        self.mount_flags: list[str] = []

    def _fusefs(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fusefs", *args], cwd=REPO, text=True,
                              capture_output=True, timeout=timeout)

    def start(self) -> None:
        os.makedirs(self.dir)
        self.started = True
        result = self._fusefs("up", self.dir, timeout=120)
        self._load_cluster()
        if result.returncode != 0 or not is_mounted(self.mnt):
            raise BenchError(f"`fusefs up {self.dir}` failed:\n{result.stderr}{result.stdout}")
        self._registered()
        self.root = os.path.join(self.mnt, "bench")
        os.makedirs(self.root, exist_ok=True)

    def _load_cluster(self) -> None:
        try:
            with open(os.path.join(self.dir, "cluster.json")) as f:
                self.cluster = json.load(f)
        except (FileNotFoundError, ValueError):
            self.cluster = {}

    def _registered(self) -> None:
        record = read_registry(self.mnt)
        if record is None or not alive(record.get("pid")):
            raise BenchError(f"no running fusefs daemon registered for {self.mnt}")
        self.daemon_pid, self.state_dir = record["pid"], record["state_dir"]

    @property
    def server_pids(self) -> list[int]:
        return [s.get("pid") for s in self.cluster.get("servers", [])]

    def _note_peak(self) -> None:
        if alive(self.daemon_pid):
            self.peak_rss_kib = max(self.peak_rss_kib,
                                    proc_status_kib(self.daemon_pid, "VmHWM") or 0)

    def umount(self) -> None:
        self._note_peak()
        result = self._fusefs("umount", self.mnt)
        if result.returncode != 0:
            raise BenchError(f"`fusefs umount` failed: {result.stderr.strip()}")
        self.daemon_pid = None

    def mount(self, *flags: str) -> None:
        """Mount again like `fusefs up` does, plus `flags` (e.g. --memory-cache 64MiB)."""
        urls = ",".join(s["url"] for s in self.cluster["servers"])
        result = self._fusefs("mount", "--servers", urls, "--secret-file",
                              os.path.join(self.dir, "secret"), "--cache-dir",
                              os.path.join(self.dir, "cache"), *flags, self.mnt, timeout=120)
        if result.returncode != 0:
            raise BenchError(f"`fusefs mount` failed: {result.stderr.strip()}")
        self.mount_flags = list(flags)
        self._registered()

    def remount(self, *flags: str, drop_disk_cache: bool = False) -> None:
        self.umount()
        if drop_disk_cache:
            shutil.rmtree(os.path.join(self.state_dir, "blocks"), ignore_errors=True)
        drop_caches()
        self.mount(*flags)

    def make_cold(self, keep_disk_cache: bool = False) -> None:
        self.remount(*self.mount_flags, drop_disk_cache=not keep_disk_cache)

    def status(self) -> dict | None:
        try:
            with open(os.path.join(self.state_dir, "status.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def settle(self, timeout: float = 600) -> None:
        """Wait until the daemon reports nothing dirty in a status written after now."""
        os.sync()
        asked, deadline = time.time(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if s and s.get("time", 0) > asked and not s.get("dirty_bytes"):
                return
            time.sleep(0.1)
        log("fs_bench: fusefs still reports dirty bytes; going on")

    def stop(self) -> None:
        if not self.started:
            return
        self._note_peak()
        try:
            result = self._fusefs("down", self.dir, timeout=600)
            if result.returncode != 0:
                log(f"fs_bench: `fusefs down` failed: {result.stderr.strip()}")
        except subprocess.TimeoutExpired:
            log("fs_bench: `fusefs down` timed out")
        unmount(self.mnt)
        kill_quietly(self.daemon_pid, "fusefs daemon")
        self._load_cluster()
        for pid in self.server_pids:
            kill_quietly(pid, "block server")

    def processes(self):
        return {"daemon": self.daemon_pid, "servers": self.server_pids}

    def describe(self) -> str:
        return f"{self.mnt} ({mount_options_of(self.mnt)}), state {self.state_dir}"


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


# -- measuring ----------------------------------------------------------------------------------

@dataclass
class Sample:
    value: float  # the figure: higher is better
    seconds: float
    cpu: dict = field(default_factory=dict)  # "pt"/"daemon"/"servers" -> CPU s per wall s


class Meter:
    """Wall time and the target's processes' CPU time around the timed part of a phase."""

    def __init__(self, target: Target):
        self.target = target
        self.seconds = 0.0
        self.cpu: dict = {}

    def _cpu(self) -> dict:
        out = {}
        for key, pids in self.target.processes().items():
            values = [cpu_seconds(p) for p in (pids if isinstance(pids, list) else [pids])]
            if values and None not in values:
                out[key] = sum(values)
        return out

    def __enter__(self):
        self._before = self._cpu()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        after = self._cpu()
        self.cpu = {k: (after[k] - self._before[k]) / self.seconds
                    for k in after if k in self._before and self.seconds > 0}
        return False

    def sample(self, amount: float) -> Sample:
        return Sample(amount / self.seconds, self.seconds, self.cpu)


class Results:
    def __init__(self):
        self.samples: dict[tuple[str, str], list[Sample]] = {}  # (row, target) -> by round

    def add(self, row: str, target: str, sample: Sample) -> None:
        self.samples.setdefault((row, target), []).append(sample)

    def get(self, row: str, target: str) -> list[Sample]:
        return self.samples.get((row, target), [])

    def median(self, row: str, target: str) -> float | None:
        values = [s.value for s in self.get(row, target)]
        return statistics.median(values) if values else None

    def cpu(self, row: str, target: str, key: str) -> float | None:
        values = [s.cpu[key] for s in self.get(row, target) if key in s.cpu]
        return statistics.median(values) if values else None

    def ratio(self, row: str, target: str, base: str, base_row: str | None = None) -> float | None:
        """Median over rounds of target/base measured in the same round."""
        a = self.get(row, target)
        b = self.get(base_row or BASE.get(row, row), base)
        values = [x.value / y.value for x, y in zip(a, b) if y.value > 0]
        return statistics.median(values) if values else None


# -- workloads ----------------------------------------------------------------------------------

def write_file(path: str, size: int, payload: Payload) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(size // CHUNK):
            os.write(fd, payload.chunk(i))
        if size % CHUNK:
            os.write(fd, payload.chunk(0, size % CHUNK))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: str, size: int) -> None:
    buf = bytearray(CHUNK)
    fd = os.open(path, os.O_RDONLY)
    total = 0
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    if total != size:
        raise BenchError(f"read {total} bytes of {path}, expected {size}")


def random_reads(path: str, size: int, offsets: list[int]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for off in offsets:
            if len(os.pread(fd, 4096, off)) != 4096:
                raise BenchError(f"short read at {off} of {path}")
    finally:
        os.close(fd)


def random_writes(path: str, offsets: list[int], payload: Payload) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for i, off in enumerate(offsets):
            os.pwrite(fd, payload.chunk(i, 4096), off)
        os.fsync(fd)
    finally:
        os.close(fd)


def git(*args: str, cwd: str) -> None:
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull,
               GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
    result = subprocess.run(["git", "-c", "gc.auto=0", "-c", "init.defaultBranch=main", *args],
                            cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"git {' '.join(args)} in {cwd} failed: {result.stderr.strip()}")


class Bench:
    def __init__(self, args, targets: list[Target], results: Results):
        self.args = args
        self.targets = targets
        self.results = results
        self.payload = Payload()
        self.tarball = ""
        self.tar_files = 0
        self.tar_bytes = 0
        self.mem_result: dict = {}
        self.hwm_by_group: list[tuple[str, int]] = []  # fusefs daemon VmHWM (KiB) after each

    def note_memory(self, group: str) -> None:
        """The fusefs daemon's VmHWM since its last (re)mount, after a workload group."""
        fs = next((t for t in self.targets if isinstance(t, Fusefs)), None)
        if fs is not None and alive(fs.daemon_pid):
            kib = proc_status_kib(fs.daemon_pid, "VmHWM") or 0
            self.hwm_by_group.append((group, kib))
            log(f"  fusefs daemon VmHWM after {group}: {kib / 1024:.0f} MiB")

    # Targets in a different order each round, so none is always first after a cold drop.
    def order(self, rnd: int) -> list[Target]:
        k = rnd % len(self.targets)
        return self.targets[k:] + self.targets[:k]

    def record(self, row: str, target: Target, sample: Sample, extra: str = "") -> None:
        self.results.add(row, target.name, sample)
        unit = dict((k, u) for k, _, u in ROWS + CEILING_ROWS)[row]
        cpu = " ".join(f"{k} {v * 100:.0f}%" for k, v in sample.cpu.items())
        log(f"  {row:<18} {target.name:<11} {sample.value:10.1f} {unit:<9} "
            f"({sample.seconds:6.2f}s{', cpu ' + cpu if cpu else ''}){extra}")

    # -- big file --------------------------------------------------------------------------

    def big_file(self) -> None:
        a = self.args
        size = a.size
        path = {t.name: os.path.join(t.root, "big") for t in self.targets}
        rng = random.Random(11)
        blocks = size // 4096
        for rnd in range(a.rounds):
            log(f"[seq] round {rnd + 1}/{a.rounds}: {size // MiB} MiB file")
            for t in self.order(rnd):
                if os.path.exists(path[t.name]):
                    os.unlink(path[t.name])
                t.settle()
                with Meter(t) as m:
                    write_file(path[t.name], size, self.payload)
                self.record("seq_write", t, m.sample(size / MB))
            for t in self.order(rnd):
                t.settle()
                t.make_cold()
                with Meter(t) as m:
                    read_file(path[t.name], size)
                self.record("seq_read_cold", t, m.sample(size / MB))
                if isinstance(t, Fusefs):
                    t.make_cold(keep_disk_cache=True)
                    with Meter(t) as m:
                        read_file(path[t.name], size)
                    self.record("seq_read_cold_disk", t, m.sample(size / MB))
                with Meter(t) as m:
                    read_file(path[t.name], size)
                self.record("seq_read_warm", t, m.sample(size / MB))
        self.note_memory("seq")
        if "random" not in a.groups:
            return
        for rnd in range(a.small_rounds):
            log(f"[random] round {rnd + 1}/{a.small_rounds}: {a.ops} ops of 4 KiB")
            offsets = [rng.randrange(blocks) * 4096 for _ in range(a.ops)]
            for t in self.order(rnd):
                t.settle()
                drop_caches()
                with Meter(t) as m:
                    random_reads(path[t.name], size, offsets)
                self.record("rand_read", t, m.sample(a.ops))
            offsets = [rng.randrange(blocks) * 4096 for _ in range(a.ops)]
            for t in self.order(rnd):
                t.settle()
                with Meter(t) as m:
                    random_writes(path[t.name], offsets, self.payload)
                self.record("rand_write", t, m.sample(a.ops))
        self.note_memory("random")

    def cleanup_big(self) -> None:
        for t in self.targets:
            p = os.path.join(t.root, "big")
            if os.path.exists(p):
                os.unlink(p)

    # -- metadata ---------------------------------------------------------------------------

    def metadata(self) -> None:
        for rnd in range(self.args.small_rounds):
            log(f"[meta] round {rnd + 1}/{self.args.small_rounds}: {self.args.files} files")
            self.metadata_round(rnd)

    def metadata_round(self, rnd: int) -> None:
        """One round of create, stat, list (x5), rename, delete of --files empty files in a
        new directory `meta-<rnd>` of every target (removed again), targets in turn."""
        n = self.args.files
        names = [f"file-{i:06d}" for i in range(n)]
        for t in self.order(rnd):
            d = os.path.join(t.root, f"meta-{rnd}")
            os.mkdir(d)
            paths = [os.path.join(d, x) for x in names]
            moved = [os.path.join(d, "r" + x) for x in names]
            t.settle()
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            with Meter(t) as m:
                for p in paths:
                    os.close(os.open(p, flags, 0o644))
            self.record("meta_create", t, m.sample(n))
            t.settle()
            with Meter(t) as m:
                for p in paths:
                    os.stat(p)
            self.record("meta_stat", t, m.sample(n))
            with Meter(t) as m:
                for _ in range(META_REPEAT_LIST):
                    if len(os.listdir(d)) != n:
                        raise BenchError(f"{d} does not list {n} entries")
            self.record("meta_list", t, m.sample(n * META_REPEAT_LIST))
            t.settle()
            with Meter(t) as m:
                for p, q in zip(paths, moved):
                    os.rename(p, q)
            self.record("meta_rename", t, m.sample(n))
            t.settle()
            with Meter(t) as m:
                for q in moved:
                    os.unlink(q)
            self.record("meta_delete", t, m.sample(n))
            os.rmdir(d)

    # -- small files ------------------------------------------------------------------------

    def small_files(self) -> None:
        n = self.args.small_files
        rng = random.Random(5)
        sizes = [rng.randint(1 * KiB, 16 * KiB) for _ in range(n)]
        for rnd in range(self.args.small_rounds):
            log(f"[small] round {rnd + 1}/{self.args.small_rounds}: {n} files, "
                f"{sum(sizes) / MiB:.1f} MiB")
            for t in self.order(rnd):
                d = os.path.join(t.root, f"small-{rnd}")
                os.mkdir(d)
                paths = [os.path.join(d, f"s{i:05d}") for i in range(n)]
                t.settle()
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
                with Meter(t) as m:
                    for i, (p, s) in enumerate(zip(paths, sizes)):
                        fd = os.open(p, flags, 0o644)
                        os.write(fd, self.payload.chunk(i, s))
                        os.close(fd)
                self.record("small_write", t, m.sample(n))
                t.settle()
                drop_caches()
                with Meter(t) as m:
                    for p, s in zip(paths, sizes):
                        with open(p, "rb", buffering=0) as f:
                            if len(f.read(s + 1)) != s:
                                raise BenchError(f"{p} is not {s} bytes long")
                self.record("small_read", t, m.sample(n))
                shutil.rmtree(d)

    # -- untar and git ----------------------------------------------------------------------

    def make_tarball(self) -> None:
        stdlib = os.path.dirname(os.__file__)
        self.tarball = os.path.join(self.args.work, "stdlib.tar")
        # The pure-Python standard library and its extension modules: ~1,100 files, ~33 MB
        # (the test suite, byte code, installed packages and the build config left out).
        excludes = ["--exclude=__pycache__", "--exclude=./site-packages", "--exclude=./test",
                    "--exclude=./config-*", "--exclude=./dist-packages"]
        what = ["."]
        if self.args.quick:  # a few packages only: a couple of hundred files
            what = [d for d in QUICK_TAR_DIRS if os.path.isdir(os.path.join(stdlib, d))]
        subprocess.run(["tar", "cf", self.tarball, *excludes, *what], cwd=stdlib, check=True)
        listing = subprocess.run(["tar", "tvf", self.tarball], capture_output=True, text=True,
                                 check=True).stdout.splitlines()
        self.tar_files = sum(1 for line in listing if not line.startswith("d"))
        self.tar_bytes = os.path.getsize(self.tarball)
        log(f"tarball: {self.tarball} from {stdlib}: {len(listing)} entries, "
            f"{self.tar_files} files, {self.tar_bytes / MB:.1f} MB")

    def untar_git(self) -> None:
        self.make_tarball()
        for rnd in range(self.args.small_rounds):
            log(f"[untar] round {rnd + 1}/{self.args.small_rounds}")
            with open(self.tarball, "rb") as f:  # keep the tarball itself in the page cache
                while f.read(8 * MiB):
                    pass
            for t in self.order(rnd):
                d = os.path.join(t.root, f"tree-{rnd}")
                os.mkdir(d)
                t.settle()
                with Meter(t) as m:
                    subprocess.run(["tar", "xf", self.tarball, "-C", d], check=True)
                self.record("untar", t, m.sample(self.tar_files))
                git("init", "-q", cwd=d)
                t.settle()
                with Meter(t) as m:
                    git("add", "-A", cwd=d)
                    git("commit", "-q", "-m", "stdlib", cwd=d)
                self.record("git", t, m.sample(self.tar_files))
                shutil.rmtree(d)

    # -- the replicated-write ceiling -------------------------------------------------------

    def ceiling(self, native_dir: str) -> None:
        size = self.args.size
        d = os.path.join(native_dir, "ceiling")
        os.makedirs(d, exist_ok=True)
        probe = Target(self.args.work)
        probe.name = "native"
        for rnd in range(self.args.rounds):
            log(f"[ceiling] round {rnd + 1}/{self.args.rounds}: {R} x {size // MiB} MiB")
            paths = [os.path.join(d, f"copy{r}") for r in range(R)]
            os.sync()
            with Meter(probe) as m:
                fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for p in paths]
                for i in range(size // CHUNK):
                    for fd in fds:
                        os.write(fd, self.payload.chunk(i))
                for fd in fds:
                    os.fsync(fd)
                    os.close(fd)
            self.record("ceiling_stream", probe, m.sample(size / MB))
            for p in paths:
                os.unlink(p)
            # The block servers' way: every copy of every block its own file, made durable
            # before it is acknowledged (temp file, fsync, rename). At most 256 MiB of it.
            blocks = min(size, 256 * MiB) // CHUNK
            os.sync()
            with Meter(probe) as m:
                for i in range(blocks):
                    for r in range(R):
                        tmp = os.path.join(d, f"tmp{r}")
                        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                        os.write(fd, self.payload.chunk(i))
                        os.fsync(fd)
                        os.close(fd)
                        os.rename(tmp, os.path.join(d, f"b{r}-{i}"))
            self.record("ceiling_block", probe, m.sample(blocks * CHUNK / MB))
            shutil.rmtree(d)
            os.makedirs(d)
        shutil.rmtree(d, ignore_errors=True)

    # -- memory of the fusefs daemon --------------------------------------------------------

    def memory(self, fs: Fusefs) -> None:
        a = self.args
        cache, dirty = a.mem_cache, a.mem_dirty
        size = 4 * cache
        flags = ["--memory-cache", f"{cache // KiB}KiB", "--dirty-limit", f"{dirty // KiB}KiB"]
        log(f"[memory] remount fusefs with {' '.join(flags)}; write and read {size // MiB} MiB")
        fs.remount(*flags)
        pid = fs.daemon_pid
        start_rss = proc_status_kib(pid, "VmRSS") or 0
        peak_rss = [start_rss]
        stop = threading.Event()

        def sampler():
            while not stop.wait(0.05):
                v = proc_status_kib(pid, "VmRSS")
                if v:
                    peak_rss[0] = max(peak_rss[0], v)

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        path = os.path.join(fs.root, "memory-test")
        try:
            t0 = time.perf_counter()
            write_file(path, size, self.payload)
            write_s = time.perf_counter() - t0
            hwm_write = proc_status_kib(pid, "VmHWM") or 0
            drop_caches()
            t0 = time.perf_counter()
            read_file(path, size)
            read_s = time.perf_counter() - t0
            hwm_read = proc_status_kib(pid, "VmHWM") or 0
        finally:
            stop.set()
            thread.join()
        os.unlink(path)
        self.mem_result = {"cache": cache, "dirty": dirty, "size": size, "pid": pid,
                       "start_kib": start_rss, "hwm_write_kib": hwm_write,
                       "hwm_read_kib": hwm_read, "sampled_peak_kib": peak_rss[0],
                       "bound": cache + dirty + 200 * MiB,
                       "write_mb_s": size / MB / write_s, "read_mb_s": size / MB / read_s}
        log(f"  fusefs pid {pid}: RSS at mount {start_rss / 1024:.0f} MiB, VmHWM after write "
            f"{hwm_write / 1024:.0f} MiB ({size / MB / write_s:.1f} MB/s), after read "
            f"{hwm_read / 1024:.0f} MiB ({size / MB / read_s:.1f} MB/s)")
        peak = fs.peak_rss_kib  # the workloads' peak: this test's daemon is reported apart
        fs.remount()  # back to the defaults of `fusefs up`
        fs.peak_rss_kib = peak


# -- report -------------------------------------------------------------------------------------

def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def render(results: Results, labels: dict) -> str:
    header = ["workload", "unit", "native", "passthru", "fusefs", "pt/nat", "fs/pt", "fs/nat",
              "pt cpu", "fs cpu", "srv cpu"]
    rows = []
    for key, label, unit in ROWS:
        if not any(results.get(key, t) for t in TARGETS):
            continue
        rows.append([label.format(**labels), unit,
                     fmt(results.median(key, "native")),
                     fmt(results.median(key, "passthrough")),
                     fmt(results.median(key, "fusefs")),
                     fmt_ratio(results.ratio(key, "passthrough", "native")),
                     fmt_ratio(results.ratio(key, "fusefs", "passthrough")),
                     fmt_ratio(results.ratio(key, "fusefs", "native")),
                     fmt_pct(results.cpu(key, "passthrough", "pt")),
                     fmt_pct(results.cpu(key, "fusefs", "daemon")),
                     fmt_pct(results.cpu(key, "fusefs", "servers"))])
    for key, label, unit in CEILING_ROWS:
        if results.get(key, "native"):
            rows.append([label, unit, fmt(results.median(key, "native"))] + ["-"] * 8)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def checks(results: Results, memory: dict, workload_peak_kib: int = 0) -> list[str]:
    out = []
    ceiling = results.median("ceiling_stream", "native")
    for row, against, minimum, text in TARGET_CHECKS:
        fs = results.median(row, "fusefs")
        if against == "ceiling":
            ratio = fs / ceiling if fs is not None and ceiling else None
            detail = (f"fusefs {fmt(fs)} MB/s = {ratio:.0%} of ceiling {fmt(ceiling)} MB/s"
                      if ratio is not None else "")
        else:
            ratio = results.ratio(row, "fusefs", against)
            detail = (f"fusefs {fmt(fs)} vs passthrough {fmt(results.median(row, against))}"
                      f" = {ratio:.2f}" if ratio is not None else "")
        if ratio is None:
            out.append(f"  -     {text}: not measured")
        else:
            out.append(f"  {'PASS' if ratio >= minimum else 'MISS'}  {text}: {detail}")
    if memory:
        peak = max(memory["hwm_write_kib"], memory["hwm_read_kib"]) * KiB
        verdict = "PASS" if peak <= memory["bound"] else "MISS"
        out.append(f"  {verdict}  fusefs daemon peak RSS <= memory cache + dirty limit + 200 MiB: "
                   f"{peak / MiB:.0f} MiB vs {memory['bound'] / MiB:.0f} MiB")
    else:
        out.append("  -     fusefs daemon memory: not measured")
    if workload_peak_kib:
        bound = (256 + 256 + 200) * MiB  # the defaults of `fusefs up`
        verdict = "PASS" if workload_peak_kib * KiB <= bound else "MISS"
        out.append(f"  {verdict}  (also) peak RSS over all workloads, default bounds 256+256+200 "
                   f"MiB: {workload_peak_kib / 1024:.0f} MiB vs {bound / MiB:.0f} MiB")
    return out


# -- command line -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="The same workloads on a native directory, a minimal fusepy passthrough "
                    "and a fusefs mount (3 local block servers, R=3), in one run.",
        epilog="Figures are medians over interleaved rounds; on a shared machine trust the "
               "ratios more than the absolute figures. Exit status 0 unless an error "
               "occurred (the targets are informational). Run as root.")
    p.add_argument("--workdir", default="/var/tmp", help="directory to create the temp work "
                   "directory in; every target lives there, so on one disk (default /var/tmp)")
    p.add_argument("--size", type=parse_size, default=1 * GiB, help="size of the big file "
                   "(default 1GiB, as the issue asks; a full run with --rounds 3 took ~10 min "
                   "here, most of it fusefs random writes); also what the replicated-write "
                   "ceiling writes R times")
    p.add_argument("--rounds", type=int, default=1, help="rounds of the big-file sequential "
                   "workloads and of the ceiling (default 1)")
    p.add_argument("--small-rounds", type=int, default=3, help="rounds of every quick "
                   "workload: random I/O, metadata, small files, untar/git (default 3)")
    p.add_argument("--ops", type=int, default=10_000,
                   help="random 4 KiB reads, and writes, per round (default 10000)")
    p.add_argument("--files", type=int, default=10_000,
                   help="files of the metadata workload (default 10000)")
    p.add_argument("--small-files", type=int, default=5_000,
                   help="files of 1-16 KiB of the small-file workload (default 5000)")
    p.add_argument("--mem-cache", type=parse_size, default=64 * MiB, help="--memory-cache "
                   "of the fusefs mount for the memory test; it writes 4x this (default 64MiB)")
    p.add_argument("--mem-dirty", type=parse_size, default=64 * MiB, help="--dirty-limit of "
                   "the fusefs mount for the memory test (default 64MiB)")
    p.add_argument("--only", default="", metavar="X[,X...]",
                   help="run a subset: targets (a/native, b/passthrough/pt, c/fusefs) and/or "
                        f"workload groups ({', '.join(GROUPS)}); default everything")
    p.add_argument("--quick", action="store_true", help="a smoke run of about a minute: 64 MiB "
                   "file, 500 files, 1000 random ops, 1 round, a smaller tarball")
    p.add_argument("--pt-options", default="", metavar="OPT[,OPT...]", help="extra FUSE "
                   "options for the passthrough, e.g. attr_timeout=0,negative_timeout=0,"
                   "entry_timeout=1 (fusefs's timeouts) to see what they cost")
    p.add_argument("--keep", action="store_true", help="do not delete the work directory")
    args = p.parse_args(argv)
    if args.quick:
        args.size = min(args.size, 64 * MiB)
        args.files = min(args.files, 500)
        args.small_files = min(args.small_files, 500)
        args.ops = min(args.ops, 1000)
        args.rounds = args.small_rounds = 1
        args.mem_cache = min(args.mem_cache, 16 * MiB)
        args.mem_dirty = min(args.mem_dirty, 16 * MiB)
    targets, groups = [], []
    for token in filter(None, (x.strip().lower() for x in args.only.split(","))):
        if token in TARGET_ALIASES:
            targets.append(TARGET_ALIASES[token])
        elif token in GROUPS:
            groups.append(token)
        else:
            p.error(f"--only: {token!r} is neither a target (a, b, c, native, passthrough, "
                    f"fusefs) nor a workload group ({', '.join(GROUPS)})")
    args.targets = [t for t in TARGETS if t in targets] if targets else list(TARGETS)
    args.groups = [g for g in GROUPS if g in groups] if groups else list(GROUPS)
    if min(args.rounds, args.small_rounds, args.ops, args.files, args.small_files) < 1:
        p.error("--rounds, --small-rounds, --ops, --files and --small-files must be >= 1")
    if args.size < 4 * CHUNK or args.size % CHUNK:
        p.error("--size must be a whole number of MiB, at least 4MiB")
    return args


def _unwind(signum, frame):
    raise KeyboardInterrupt  # unwinds through `finally`: everything unmounted and stopped


def prepare_run(args, name: str) -> bool:
    """What every benchmark run needs first: root, SIGTERM unwinding through `finally`, and
    a fresh work directory in args.work (named after the benchmark)."""
    if os.geteuid() != 0:
        print(f"{name}: must run as root (it drops the page cache and mounts)",
              file=sys.stderr)
        return False
    signal.signal(signal.SIGTERM, _unwind)
    os.makedirs(args.workdir, exist_ok=True)
    args.work = tempfile.mkdtemp(prefix=name.replace("_", "-") + "-", dir=args.workdir)
    return True


def print_machine(work: str) -> None:
    """The line that says where and on what a run's figures were taken."""
    print(f"work: {work} ({filesystem_of(work)}); {os.cpu_count()} CPUs, "
          f"load {load_average()}, python {sys.version.split()[0]}, kernel {os.uname().release}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not prepare_run(args, "fs_bench"):
        return 2
    started = time.monotonic()
    classes = {"native": Native, "passthrough": Passthrough, "fusefs": Fusefs}
    targets = [classes[name](args.work) for name in args.targets]
    for t in targets:
        if isinstance(t, Passthrough):
            t.options = args.pt_options
    results = Results()
    bench = Bench(args, targets, results)
    failed = False
    try:
        print_machine(args.work)
        print(f"size {args.size // MiB} MiB x {args.rounds} round(s); quick workloads x "
              f"{args.small_rounds} round(s): {args.ops} random ops, {args.files} files, "
              f"{args.small_files} small files; targets {', '.join(args.targets)}; "
              f"groups {', '.join(args.groups)}", flush=True)
        for t in targets:
            t.start()
            print(f"{t.name}: {t.describe()}", flush=True)
        fs = next((t for t in targets if isinstance(t, Fusefs)), None)
        if "ceiling" in args.groups:
            bench.ceiling(args.work)
        if "seq" in args.groups or "random" in args.groups:
            bench.big_file()
            bench.cleanup_big()
        if "meta" in args.groups:
            bench.metadata()
            bench.note_memory("meta")
        if "small" in args.groups:
            bench.small_files()
            bench.note_memory("small")
        if "untar" in args.groups:
            bench.untar_git()
            bench.note_memory("untar")
        if fs is not None:
            fs._note_peak()
        if "memory" in args.groups and fs is not None:
            bench.memory(fs)

        labels = {"size": f"{args.size // MiB} MiB", "ops": args.ops, "files": args.files,
                  "small": args.small_files,
                  "tar": f"{bench.tar_files} files, {bench.tar_bytes / MB:.0f} MB"}
        print()
        print(render(results, labels))
        print()
        print("Figures: median over rounds (seq: {}, others: {}); ratios: median of per-round "
              "ratios. MB = 10^6 bytes.".format(args.rounds, args.small_rounds))
        print("cpu: CPU s per wall s (100% = one core) of the passthrough process, the fusefs "
              "daemon and the 3 block servers, in the timed part.")
        print("fusefs 'cold (from servers)': remounted, disk block cache deleted, page cache "
              "dropped; 'cold (disk cache)': remounted, page cache dropped.")
        if fs is not None and fs.peak_rss_kib:
            groups = ", ".join(f"{g} {k / 1024:.0f}" for g, k in bench.hwm_by_group)
            print(f"fusefs daemon peak RSS during the workloads (default bounds 256 MiB memory "
                  f"cache + 256 MiB dirty): {fs.peak_rss_kib / 1024:.0f} MiB; VmHWM since its "
                  f"last mount, after each group (MiB): {groups}")
        m = bench.mem_result
        if m:
            print(f"fusefs memory test: --memory-cache {m['cache'] // MiB}MiB --dirty-limit "
                  f"{m['dirty'] // MiB}MiB, {m['size'] // MiB} MiB written "
                  f"({m['write_mb_s']:.1f} MB/s) then read cold ({m['read_mb_s']:.1f} MB/s): "
                  f"VmRSS at mount {m['start_kib'] / 1024:.0f} MiB, VmHWM after write "
                  f"{m['hwm_write_kib'] / 1024:.0f} MiB, after read {m['hwm_read_kib'] / 1024:.0f}"
                  f" MiB; bound {m['bound'] // MiB} MiB")
        print()
        print("targets (informational):")
        for line in checks(results, m, fs.peak_rss_kib if fs is not None else 0):
            print(line)
        print(f"\ntotal time {time.monotonic() - started:.0f}s")
        return 0
    except (BenchError, subprocess.CalledProcessError, OSError) as e:
        failed = True
        print(f"fs_bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        failed = True
        print("fs_bench: interrupted", file=sys.stderr)
        return 130
    finally:
        for t in reversed(targets):
            try:
                t.stop()
            except Exception as e:  # noqa: BLE001 - stop the others anyway
                print(f"fs_bench: stopping {t.name}: {type(e).__name__}: {e}", file=sys.stderr)
        for t in targets:
            if isinstance(t, Passthrough) and (failed or "Traceback" in tail(t.log_path, 200)):
                text = tail(t.log_path)
                if text.strip():
                    print(f"passthrough log tail:\n{text}", file=sys.stderr)
            if isinstance(t, Fusefs) and t.state_dir and failed:
                print(f"fusefs log tail:\n{tail(os.path.join(t.state_dir, 'fusefs.log'))}",
                      file=sys.stderr)
        if args.keep:
            print(f"kept {args.work}", file=sys.stderr)
        else:
            leftovers = [t.mnt for t in targets if hasattr(t, "mnt") and is_mounted(t.mnt)]
            if leftovers:
                print(f"fs_bench: still mounted, not deleting {args.work}: {leftovers}",
                      file=sys.stderr)
            else:
                shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
