#!/usr/bin/env python3
"""Repair and scrub benchmark: rebuilding a replaced server, and scrubbing, against what the
block servers and the disk do on their own, in one run.

One invocation starts four local block servers (`python -m blockserver serve`, with a
shared secret, on 127.0.0.1, their data directories under one temp directory, so on one
disk), formats them with `fusefs mkfs` (R=3, W=2, 1 MiB blocks), mounts the filesystem
with `fusefs mount`, writes a data set of --size bytes (files of 64 MiB in 1 MiB writes,
each fsynced) and unmounts it. Then, `--rounds` times each:

  1. rebuild   (unmounted) one server is killed with SIGKILL and its data directory
               removed; an empty server is started and `fusefs servers replace OLD NEW`
               is timed from start to exit (it loads the metadata, lists every server,
               copies, moves hand-offs home, checks again); its first pass (listing and
               copies, from its progress lines) is shown too. The bytes rebuilt are
               counted from the servers' own listings: every copy present afterwards that
               no surviving server held before (the new server's, and those of blocks whose
               homes moved to another server because the new server ranks differently from
               the old one). Baseline, same round, same bytes: one thread putting
               1 MiB blocks to a fresh empty server in batches of 16 (`/v1/batch/put`,
               as the rebuild copies them). Page cache dropped before each.
  2. foreground (mounted, --lease-seconds 10) --fg-size bytes written to a new file
               through the mount (1 MiB writes, fsync), alone; then a server is killed
               and replaced (`fusefs servers replace`, no rate limit) and the same write
               runs while it rebuilds. The mounted writer's own background repair (its
               default rate, 32 MiB/s) follows the membership change and copies too
               (how many copies it logged is printed).
               The ratio is foreground-with-rebuild / foreground-alone; the share of the
               foreground that overlapped the rebuild's copying is printed with it.
  3. scrub     (unmounted) `fusefs scrub --restart` of every copy on every server, after
               dropping the page cache, against reading the same block files straight
               from the servers' data directories (one thread, 1 MiB reads) after
               dropping it again.

Figures are medians over rounds; ratios are medians of the per-round ratios. Targets
(informational, exit status 0 unless something failed): rebuild >= 50% of the PUT
throughput; the foreground keeps >= 70% of its speed while a rebuild runs.

Must run as root (drop_caches). Everything started (servers, the mount, commands) is
stopped in `finally`, also on Ctrl-C and SIGTERM; the temp directory is removed
unless --keep.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from blockserver import protocol  # noqa: E402
from blockserver.protocol import parse_size  # noqa: E402
from cluster_bench import Payloads  # noqa: E402
from fs_bench import (alive, drop_caches, kill_quietly, prepare_run, print_machine,  # noqa: E402
                      tail, unmount, write_file, Payload)
from fusefs import errors  # noqa: E402
from fusefs.mounts import is_mounted, read_registry  # noqa: E402
from fusefs.transport import Member, Transport, TransportConfig  # noqa: E402
from servers import BenchError, ServerProcess  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MB = 1_000_000
FILE_SIZE = 64 * MiB  # the data set's files
PUT_BATCH = 16  # 1 MiB blocks per batch PUT in the baseline: antientropy.COPY_ITEMS
LEASE_SECONDS = 10  # of the mount: `servers replace` waits this long before moving hand-offs
REBUILD_TARGET = 0.50
FOREGROUND_TARGET = 0.70
CMD_TIMEOUT = 3600


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds if seconds > 0 else 0.0


# -- the cluster --------------------------------------------------------------------------------

class SignedServer(ServerProcess):
    """A block server that checks every request against the cluster secret."""

    def __init__(self, name: str, work: str, secret: str, transport: Transport):
        super().__init__(name, os.path.join(work, "servers", name),
                         os.path.join(work, "servers", name + ".log"))
        self.secret, self.transport = secret, transport

    def launch(self) -> None:
        cmd = [sys.executable, "-m", "blockserver", "serve", "--data", self.data_dir,
               "--listen", "127.0.0.1:0", "--log-level", "warning",
               "--secret-file", self.secret]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=log_file)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Read the `serving URL` line, then ask /v1/status (signed) for the server's id."""
        got: list[str] = []
        reader = threading.Thread(daemon=True, target=lambda: got.append(
            self.proc.stdout.readline().decode(errors="replace").strip()))
        reader.start()
        reader.join(timeout)
        if not got or not got[0].startswith("serving "):
            raise BenchError(f"server {self.name} did not start; log:\n{self.log_tail()}")
        self.url = got[0].split()[1]
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.server_id = self.transport.status(Member("", self.url), 2.0)["server_id"]
                return
            except errors.StorageError:
                if time.monotonic() > deadline:
                    raise BenchError(f"server {self.name} at {self.url} never answered "
                                     f"/v1/status; log:\n{self.log_tail()}") from None
                time.sleep(0.05)

    @property
    def member(self) -> Member:
        return Member(self.server_id, self.url)

    def kill(self) -> None:
        """Dead for good: SIGKILL, and its disk gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.data_dir, ignore_errors=True)


class Cluster:
    """Four block servers, the filesystem on them, its mount; what the benchmark drives.

    `servers` are the current members, in a fixed order (a replacement takes the place of
    the server it replaces); `spawned` every server started, killed ones and baselines
    included (all of them are stopped at the end)."""

    def __init__(self, work: str):
        self.work = work
        self.secret = os.path.join(work, "secret")
        self.mnt = os.path.join(work, "mnt")
        self.cache = os.path.join(work, "cache")
        self.servers: list[SignedServer] = []
        self.spawned: list[SignedServer] = []  # every server started, in order
        self.daemon_pid: int | None = None
        self.state_dir = ""
        self.transport: Transport | None = None
        self.children: list[subprocess.Popen] = []  # commands run in the background

    def setup(self, n: int) -> None:
        os.makedirs(os.path.join(self.work, "servers"))
        os.makedirs(self.mnt)
        fd = os.open(self.secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
        self.transport = Transport(TransportConfig.from_key_file(self.secret,
                                                                 read_timeout=120.0))
        self.servers = [self.new_server() for _ in range(n)]

    def new_server(self) -> SignedServer:
        """A new empty server, started (kept in `spawned` first: stopped at the end even
        if it never became ready)."""
        server = SignedServer(f"s{len(self.spawned) + 1}", self.work, self.secret,
                              self.transport)
        self.spawned.append(server)
        return server.start()

    @property
    def urls(self) -> str:
        return ",".join(s.url for s in self.servers)

    def fusefs(self, *args: str, timeout: float = CMD_TIMEOUT, check: bool = True
               ) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "fusefs", *args]
        result = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise BenchError(f"`fusefs {' '.join(args)}` exited {result.returncode}:\n"
                             f"{result.stderr.strip()}\n{result.stdout.strip()}")
        return result

    def common(self) -> list[str]:
        return ["--servers", self.urls, "--secret-file", self.secret]

    def mkfs(self) -> None:
        self.fusefs("mkfs", *self.common(), "--replicas", "3", "--write-quorum", "2")

    def mount(self) -> None:
        self.fusefs("mount", *self.common(), "--cache-dir", self.cache,
                    "--lease-seconds", str(LEASE_SECONDS), self.mnt, timeout=120)
        record = read_registry(self.mnt)
        if record is None or not alive(record.get("pid")):
            raise BenchError(f"no running fusefs daemon registered for {self.mnt}")
        self.daemon_pid, self.state_dir = record["pid"], record["state_dir"]

    def umount(self) -> None:
        self.fusefs("umount", self.mnt, timeout=600)
        self.daemon_pid = None

    def settle(self, timeout: float = 600) -> None:
        """Wait until the mount reports nothing dirty in a status written after now."""
        asked, deadline = time.time(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(os.path.join(self.state_dir, "status.json")) as f:
                    s = json.load(f)
                if s.get("time", 0) > asked and not s.get("dirty_bytes"):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        log("repair_bench: the mount still reports dirty bytes; going on")

    def quiet(self, timeout: float = 900) -> float:
        """Wait until the mount's background repair is between passes (its status file,
        written after now, says so); seconds waited."""
        asked, started = time.time(), time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                with open(os.path.join(self.state_dir, "status.json")) as f:
                    s = json.load(f)
                if s.get("time", 0) > asked and not (s.get("health") or {}).get("running"):
                    return time.monotonic() - started
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        log("repair_bench: the mount's background repair is still running; going on")
        return time.monotonic() - started

    def repair(self) -> dict:
        """`fusefs repair` until it says healthy (untimed: the state every round starts in)."""
        for _ in range(5):
            result = self.fusefs("repair", *self.common(), "--json", check=False)
            if result.returncode == 0:
                return json.loads(result.stdout)
            time.sleep(1)
        raise BenchError(f"`fusefs repair` did not end healthy:\n{result.stderr.strip()}\n"
                         f"{result.stdout.strip()}")

    def holdings(self, servers: list[SignedServer] | None = None) -> dict[str, dict[str, int]]:
        """server id -> {block id: size}, from each server's own listing."""
        out: dict[str, dict[str, int]] = {}
        for server in self.servers if servers is None else servers:
            blocks, after = {}, ""
            while True:
                page, after = self.transport.list_blocks(server.member, after, 5000)
                blocks.update((e["id"], e["size"]) for e in page)
                if not after:
                    break
            out[server.server_id] = blocks
        return out

    def kill_and_replace(self, index: int) -> tuple[SignedServer, SignedServer]:
        """Kill server `index` for good and start an empty one (not a member yet)."""
        old = self.servers[index]
        old.kill()
        new = self.new_server()
        self.servers[index] = new
        return old, new

    def stop(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        if is_mounted(self.mnt):
            try:
                self.fusefs("umount", self.mnt, timeout=300, check=False)
            except subprocess.TimeoutExpired:
                log("repair_bench: `fusefs umount` timed out")
            unmount(self.mnt)
        kill_quietly(self.daemon_pid, "fusefs daemon")
        for server in self.spawned:
            server.stop()


# -- measurements -------------------------------------------------------------------------------

@dataclass
class Results:
    rows: dict = field(default_factory=dict)  # name -> [value per round]

    def add(self, name: str, value: float) -> None:
        self.rows.setdefault(name, []).append(value)

    def median(self, name: str) -> float | None:
        values = self.rows.get(name, [])
        return statistics.median(values) if values else None

    def ratio(self, a: str, b: str) -> float | None:
        values = [x / y for x, y in zip(self.rows.get(a, []), self.rows.get(b, [])) if y]
        return statistics.median(values) if values else None


def new_copies(before: dict, after: dict) -> tuple[int, int, dict[str, int]]:
    """(copies, bytes, copies per server) present in `after` and not in `before`."""
    copies = nbytes = 0
    per_server: dict[str, int] = {}
    for server_id, blocks in after.items():
        old = before.get(server_id, {})
        for block_id, size in blocks.items():
            if block_id not in old:
                copies += 1
                nbytes += size
                per_server[server_id] = per_server.get(server_id, 0) + 1
    return copies, nbytes, per_server


def put_baseline(cluster: Cluster, nbytes: int, payloads: Payloads) -> float:
    """Seconds one thread takes to batch-PUT `nbytes` of 1 MiB blocks to an empty server."""
    server = cluster.new_server()
    try:
        blocks = payloads.blocks(max(1, -(-nbytes // MiB)))
        batches = [blocks[i:i + PUT_BATCH] for i in range(0, len(blocks), PUT_BATCH)]
        cluster.transport.status(server.member)  # (the connection is open before timing)
        drop_caches()
        started = time.perf_counter()
        for batch in batches:
            statuses = cluster.transport.batch_put(server.member, batch)
            if any(s not in protocol.PUT_OK for s in statuses):
                raise BenchError(f"baseline PUT to {server.url} answered {sorted(set(statuses))}")
        return time.perf_counter() - started
    finally:
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)


def measure_rebuild(cluster: Cluster, rnd: int, results: Results, payloads: Payloads) -> None:
    index = rnd % len(cluster.servers)
    survivors = [s for i, s in enumerate(cluster.servers) if i != index]
    before = cluster.holdings(survivors)
    old, new = cluster.kill_and_replace(index)
    log(f"round {rnd + 1} rebuild: killed {old.name} ({old.url}), empty {new.name} at "
        f"{new.url}; fusefs servers replace")
    drop_caches()
    run = Background(cluster, "servers", "replace", old.server_id, new.url, "--servers",
                     ",".join(s.url for s in survivors), "--secret-file", cluster.secret)
    out = run.wait()
    run.save(os.path.join(cluster.work, f"rebuild-{rnd + 1}.log"))
    seconds = run.ended - run.started
    copying = run.copy_phase()
    copies, nbytes, per_server = new_copies(before, cluster.holdings())
    where = ", ".join(f"{n} on {_name(cluster, s)}" for s, n in sorted(per_server.items()))
    made = re.search(r"(\d+) copies made, (\d+) hand-offs", out)
    log(f"  rebuilt {copies} copies, {nbytes / MB:.0f} MB ({where}) in {seconds:.1f}s = "
        f"{mb_s(nbytes, seconds):.1f} MB/s; its first pass (listing + copies) "
        f"{copying:.1f}s = {mb_s(nbytes, copying):.1f} MB/s (the command: "
        f"{made.group(1) if made else '?'} copies made, {made.group(2) if made else '?'} "
        "hand-offs moved home)")
    log(f"  (its last progress line: {run.last_count()!r})")
    put_s = put_baseline(cluster, nbytes, payloads)
    log(f"  baseline: batch PUT of the same bytes to an empty server: {put_s:.1f}s = "
        f"{mb_s(nbytes, put_s):.1f} MB/s")
    results.add("rebuild_mb_s", mb_s(nbytes, seconds))
    results.add("rebuild_pass_mb_s", mb_s(nbytes, copying))
    results.add("rebuild_s", seconds)
    results.add("rebuild_mb", nbytes / MB)
    results.add("put_mb_s", mb_s(nbytes, put_s))


def _name(cluster: Cluster, server_id: str) -> str:
    return next((s.name for s in cluster.servers if s.server_id == server_id), server_id)


class Background:
    """A `fusefs` command running beside the benchmark; its stderr lines are noted with the
    time they came (the progress lines say when the copying ended)."""

    def __init__(self, cluster: Cluster, *args: str):
        self.args = args
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "fusefs", *args], cwd=REPO,
                                     text=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        cluster.children.append(self.proc)
        self.lines: list[tuple[float, str]] = []
        self.ended = 0.0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.perf_counter(), line.rstrip()))

    def wait(self) -> str:
        """Its stdout, once it exited 0 (stderr is the reader thread's alone: a second
        reader, as communicate() would be, takes lines from it)."""
        out = self.proc.stdout.read()
        self.proc.wait(timeout=CMD_TIMEOUT)
        self.ended = time.perf_counter()
        self.reader.join(10)
        if self.proc.returncode != 0:
            raise BenchError(f"`fusefs {' '.join(self.args)}` exited {self.proc.returncode}:\n"
                             + "\n".join(line for _, line in self.lines[-20:]) + "\n" + out)
        return out

    def copy_phase(self) -> float:
        """Seconds from the first pass's listing to the end of its copying (see
        `copies_done_at`); the whole command's if those lines are not there."""
        start = next((t for t, line in self.lines if "listing the blocks" in line), None)
        end = self.copies_done_at()
        if start is None or end is None:
            return (self.ended or time.perf_counter()) - self.started
        return end - start

    def copies_done_at(self) -> float | None:
        """When the first pass's copying ended: its 'N of N' progress line, or the next
        step's line (hand-offs checked or waiting, or the second pass listing), as a pass
        with failed copies never shows 'N of N'."""
        listings = 0
        for t, line in self.lines:
            m = re.search(r": (\d+) of (\d+)\b", line)
            listings += "listing the blocks" in line
            if (m and m[1] == m[2]) or listings > 1 or "before moving hand-offs" in line \
                    or "checking the homes" in line:
                return t
        return None

    def save(self, path: str) -> None:
        """Its stderr, with seconds since it started, for --keep."""
        with open(path, "w") as f:
            f.writelines(f"{t - self.started:8.2f} {line}\n" for t, line in self.lines)

    def last_count(self) -> str:
        """The last 'N of M' progress line, for the log."""
        return next((line for _, line in reversed(self.lines)
                     if re.search(r": \d+ of \d+\b", line)), "")


def mount_repairs(cluster: Cluster, since: int) -> tuple[int, int]:
    """(end offset, copies the mount's background repair logged) of its log after `since`."""
    path = os.path.join(cluster.state_dir, "fusefs.log")
    try:
        with open(path, errors="replace") as f:
            f.seek(since)
            text = f.read()
            end = f.tell()
    except OSError:
        return since, 0
    return end, sum(int(n) for n in re.findall(r"repair pass: .*?, (\d+) copied", text))


def foreground(cluster: Cluster, name: str, size: int, payload: Payload) -> float:
    """Seconds to write `size` bytes to a new file through the mount, fsync included."""
    path = os.path.join(cluster.mnt, name)
    started = time.perf_counter()
    write_file(path, size, payload)
    return time.perf_counter() - started


def measure_foreground(cluster: Cluster, rnd: int, args, results: Results,
                       payload: Payload) -> None:
    cluster.settle()
    waited = cluster.quiet()
    if waited > 2:
        log(f"round {rnd + 1}: waited {waited:.0f}s for the mount's background repair to end")
    alone = foreground(cluster, f"fg-alone-{rnd}", args.fg_size, payload)
    log(f"round {rnd + 1} foreground alone: {args.fg_size // MiB} MiB written + fsync in "
        f"{alone:.1f}s = {mb_s(args.fg_size, alone):.1f} MB/s")
    cluster.settle()
    index = (rnd + 2) % len(cluster.servers)
    survivors = ",".join(s.url for i, s in enumerate(cluster.servers) if i != index)
    log_at, _ = mount_repairs(cluster, 0)
    old, new = cluster.kill_and_replace(index)
    run = Background(cluster, "servers", "replace", old.server_id, new.url, "--servers",
                     survivors, "--secret-file", cluster.secret)
    start_fg = time.perf_counter()
    during = foreground(cluster, f"fg-rebuild-{rnd}", args.fg_size, payload)
    end_fg = start_fg + during
    out = run.wait()
    run.save(os.path.join(cluster.work, f"foreground-rebuild-{rnd + 1}.log"))
    copied_at = run.copies_done_at() or run.ended
    overlap = max(0.0, min(end_fg, copied_at) - start_fg) / during
    made = re.search(r"(\d+) copies made", out)
    busy = cluster.quiet()
    _, by_mount = mount_repairs(cluster, log_at)
    log(f"  with a rebuild (killed {old.name}, replaced by {new.name}; the command made "
        f"{made.group(1) if made else '?'} copies in {copied_at - run.started:.1f}s and "
        f"ended after {run.ended - run.started:.1f}s; the mount's background repair "
        f"logged {by_mount} copied, and was busy {busy:.0f}s more): "
        f"{mb_s(args.fg_size, during):.1f} MB/s, {overlap:.0%} of it while the rebuild "
        "copied")
    log(f"  (its last progress line: {run.last_count()!r})")
    results.add("fg_alone_mb_s", mb_s(args.fg_size, alone))
    results.add("fg_rebuild_mb_s", mb_s(args.fg_size, during))
    results.add("fg_overlap", overlap)
    results.add("fg_copy_s", copied_at - run.started)
    results.add("fg_mount_copies", by_mount)
    results.add("fg_mount_busy_s", busy)
    if made:
        results.add("fg_cmd_copies", int(made.group(1)))
    for name in (f"fg-alone-{rnd}", f"fg-rebuild-{rnd}"):
        os.unlink(os.path.join(cluster.mnt, name))


def read_block_files(cluster: Cluster) -> tuple[int, float]:
    """Bytes and seconds to read every block file of every server, one thread, 1 MiB reads."""
    buf, total = bytearray(MiB), 0
    started = time.perf_counter()
    for server in cluster.servers:
        for root, _, files in os.walk(os.path.join(server.data_dir, "blocks")):
            for name in files:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    while n := os.readv(fd, [buf]):
                        total += n
                finally:
                    os.close(fd)
    return total, time.perf_counter() - started


def measure_scrub(cluster: Cluster, rnd: int, results: Results) -> None:
    listed = sum(sum(b.values()) for b in cluster.holdings().values())
    state = os.path.join(cluster.work, f"scrub-{rnd}.json")
    order = ("scrub", "disk") if rnd % 2 == 0 else ("disk", "scrub")
    for what in order:
        drop_caches()
        if what == "disk":
            disk_bytes, disk_s = read_block_files(cluster)
            continue
        started = time.perf_counter()
        result = cluster.fusefs("scrub", *cluster.common(), "--state", state, "--restart",
                                "--json")
        scrub_s = time.perf_counter() - started
        report = json.loads(result.stdout)
    scrubbed = _scrubbed_bytes(report)
    log(f"round {rnd + 1} scrub: {scrubbed / MB:.0f} MB verified (servers list "
        f"{listed / MB:.0f} MB) in {scrub_s:.1f}s = {mb_s(scrubbed, scrub_s):.1f} MB/s; "
        f"reading the block files: {disk_bytes / MB:.0f} MB in {disk_s:.1f}s = "
        f"{mb_s(disk_bytes, disk_s):.1f} MB/s")
    results.add("scrub_mb_s", mb_s(scrubbed, scrub_s))
    results.add("scrub_s", scrub_s)
    results.add("scrub_mb", scrubbed / MB)
    results.add("disk_mb_s", mb_s(disk_bytes, disk_s))
    results.add("disk_s", disk_s)


def _scrubbed_bytes(report: dict) -> int:
    totals = report.get("totals") or {}
    if "bytes" in totals:
        return int(totals["bytes"])
    return sum(int(s.get("bytes", 0)) for s in report.get("servers", []))


# -- report -------------------------------------------------------------------------------------

def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def render(results: Results, args) -> str:
    r = results
    rows = [
        ("rebuild (fusefs servers replace)", "MB/s", fmt(r.median("rebuild_mb_s")),
         f"{fmt(r.median('rebuild_mb'), '.0f')} MB in {fmt(r.median('rebuild_s'))} s"),
        ("  its first pass: listing + copies", "MB/s", fmt(r.median("rebuild_pass_mb_s")),
         "same bytes"),
        ("batch PUT to an empty server", "MB/s", fmt(r.median("put_mb_s")), "same bytes"),
        ("  rebuild / PUT", "ratio", fmt(r.ratio("rebuild_mb_s", "put_mb_s"), ".2f"),
         f"target >= {REBUILD_TARGET:.2f}"),
        (f"foreground write {args.fg_size // MiB} MiB + fsync, alone", "MB/s",
         fmt(r.median("fg_alone_mb_s")), ""),
        ("  ... while a replace rebuilds", "MB/s", fmt(r.median("fg_rebuild_mb_s")),
         f"{fmt(r.median('fg_overlap') and 100 * r.median('fg_overlap'), '.0f')}% overlapped"
         f" the copying ({fmt(r.median('fg_copy_s'))} s)"),
        ("  with / alone", "ratio", fmt(r.ratio("fg_rebuild_mb_s", "fg_alone_mb_s"), ".2f"),
         f"target >= {FOREGROUND_TARGET:.2f}"),
        ("  copies by the mount's own repair", "copies", fmt(r.median("fg_mount_copies"), ".0f"),
         f"meanwhile; the command made {fmt(r.median('fg_cmd_copies'), '.0f')}"),
        ("scrub of every copy (fusefs scrub)", "MB/s", fmt(r.median("scrub_mb_s")),
         f"{fmt(r.median('scrub_mb'), '.0f')} MB in {fmt(r.median('scrub_s'))} s"),
        ("read the block files from disk", "MB/s", fmt(r.median("disk_mb_s")),
         f"in {fmt(r.median('disk_s'))} s"),
        ("  scrub / disk", "ratio", fmt(r.ratio("scrub_mb_s", "disk_mb_s"), ".2f"), ""),
    ]
    header = ("measurement", "unit", "median", "")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

    def line(cells):
        return "  ".join(c.rjust(widths[i]) if i == 2 else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def checks(results: Results) -> list[str]:
    out = []
    for name, a, b, target in (
            ("rebuild >= 50% of the servers' batch PUT", "rebuild_mb_s", "put_mb_s",
             REBUILD_TARGET),
            ("foreground keeps >= 70% of its speed during a rebuild", "fg_rebuild_mb_s",
             "fg_alone_mb_s", FOREGROUND_TARGET)):
        ratio = results.ratio(a, b)
        if ratio is None:
            out.append(f"  -     {name}: not measured")
        else:
            out.append(f"  {'PASS' if ratio >= target else 'MISS'}  {name}: "
                       f"{fmt(results.median(a))} vs {fmt(results.median(b))} MB/s = {ratio:.2f}")
    scrub_s, mb = results.median("scrub_s"), results.median("scrub_mb")
    if scrub_s and mb:
        out.append(f"  info  a full scrub takes {scrub_s / (mb * MB / GiB):.1f} s per GiB of "
                   f"copies ({mb * MB / GiB:.2f} GiB here: every copy on every server)")
    return out


# -- command line -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Rebuild a replaced block server (fusefs servers replace) against the "
                    "servers' own batch PUT, a foreground writer with and without a rebuild, "
                    "and fusefs scrub against reading the same bytes from disk; 4 local "
                    "servers, R=3, in one run.",
        epilog="Figures are medians over rounds; on a shared machine trust the ratios more "
               "than the absolute MB/s. Exit status 0 unless something failed (the targets "
               "are informational). Run as root (it drops the page cache and mounts).")
    p.add_argument("--size", type=parse_size, default=1 * GiB,
                   help="data set written through the mount (default 1GiB); a rebuild "
                        "copies about 3/4 of it (the dead server's share: the new server "
                        "takes its place in the ranking), a scrub reads 3x it")
    p.add_argument("--rounds", type=int, default=3, help="repetitions of each measurement "
                   "(default 3); each rebuild kills and replaces another server")
    p.add_argument("--fg-size", type=parse_size, default=None,
                   help="bytes the foreground writer writes (default size/4, at most 256MiB)")
    p.add_argument("--only", default="rebuild,foreground,scrub", help="measurements to run, "
                   "comma-separated: rebuild, foreground, scrub (default all)")
    p.add_argument("--workdir", default="/var/tmp", help="where the temp work directory "
                   "goes (servers' data, mount cache); on a real disk (default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="do not delete the work directory")
    args = p.parse_args(argv)
    if args.size < 4 * MiB or args.size % MiB:
        p.error("--size must be a whole number of MiB, at least 4MiB")
    if args.fg_size is None:
        args.fg_size = max(MiB, min(args.size // 4, 256 * MiB) // MiB * MiB)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    args.parts = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(args.parts) - {"rebuild", "foreground", "scrub"}
    if unknown or not args.parts:
        p.error(f"--only takes rebuild, foreground, scrub (not {', '.join(sorted(unknown))})")
    return args


def write_data_set(cluster: Cluster, size: int, payload: Payload) -> None:
    os.makedirs(os.path.join(cluster.mnt, "data"))
    started, done, i = time.perf_counter(), 0, 0
    while done < size:
        n = min(FILE_SIZE, size - done)
        write_file(os.path.join(cluster.mnt, "data", f"f{i:04d}"), n, Payload(seed=i + 1))
        done, i = done + n, i + 1
        log(f"data set: {done // MiB} of {size // MiB} MiB written "
            f"({mb_s(done, time.perf_counter() - started):.1f} MB/s)")


def run(args, cluster: Cluster, results: Results) -> None:
    cluster.setup(4)
    cluster.mkfs()
    print(f"servers: {cluster.urls} (R=3, W=2, 1 MiB blocks, a shared secret)", flush=True)
    cluster.mount()
    payload = Payload()
    write_data_set(cluster, args.size, payload)
    cluster.umount()
    healed = cluster.repair()
    log(f"data set unmounted; fusefs repair: {healed['survey']['blocks']} live blocks, "
        f"{healed['copied']} copies made")
    if "rebuild" in args.parts:
        payloads = Payloads()
        for rnd in range(args.rounds):
            measure_rebuild(cluster, rnd, results, payloads)
    if "foreground" in args.parts:
        cluster.mount()
        for rnd in range(args.rounds):
            measure_foreground(cluster, rnd, args, results, payload)
            cluster.repair()
        cluster.umount()
    if "scrub" in args.parts:
        cluster.repair()
        for rnd in range(args.rounds):
            measure_scrub(cluster, rnd, results)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not prepare_run(args, "repair_bench"):
        return 2
    started = time.monotonic()
    cluster = Cluster(args.work)
    results = Results()
    failed = False
    try:
        print_machine(args.work)
        print(f"data set {args.size // MiB} MiB, foreground {args.fg_size // MiB} MiB, "
              f"{args.rounds} round(s), measurements {', '.join(args.parts)}", flush=True)
        run(args, cluster, results)
        print()
        print(render(results, args))
        print()
        print(f"MB = 10^6 bytes; medians of {args.rounds} round(s), ratios: medians of "
              "per-round ratios. rebuild: the whole command (metadata load, listings, copies, "
              "check), bytes counted from the servers' listings; PUT: one thread, 16 x 1 MiB "
              "per /v1/batch/put, like the rebuild. foreground: mounted writer, whose own "
              "background repair (32 MiB/s) runs too. scrub/disk: page cache dropped first.")
        print()
        print("targets (informational):")
        for line in checks(results):
            print(line)
        print(f"\ntotal time {time.monotonic() - started:.0f}s")
        return 0
    except (BenchError, errors.StorageError, subprocess.SubprocessError, OSError) as e:
        failed = True
        print(f"repair_bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        failed = True
        print("repair_bench: interrupted", file=sys.stderr)
        return 130
    finally:
        cluster.stop()
        if failed and cluster.state_dir:
            print(f"fusefs log tail:\n{tail(os.path.join(cluster.state_dir, 'fusefs.log'))}",
                  file=sys.stderr)
        for server in cluster.spawned:
            text = server.log_tail(200)
            if (failed or "Traceback" in text) and text.strip():
                print(f"server {server.name} log tail:\n{text}", file=sys.stderr)
        if args.keep:
            print(f"kept {args.work}", file=sys.stderr)
        elif is_mounted(cluster.mnt):
            print(f"repair_bench: still mounted, not deleting {args.work}", file=sys.stderr)
        else:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
