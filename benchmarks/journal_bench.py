#!/usr/bin/env python3
"""What the metadata journal costs: fusefs with and without it, and the time to mount.

One invocation, two parts (both by default; `--only workloads` or `--only mount`):

1. Metadata-heavy workloads, the very ones of fs_bench.py (its `Bench.metadata` and
   `Bench.untar_git` run here unchanged), on three targets under one work directory:

     passthrough  benchmarks/passthrough.py: the ceiling for a Python FUSE filesystem
     nojournal    `fusefs up` (3 local block servers, R=3), remounted with the hidden
                  `--unsafe-no-journal`: metadata only in the local SQLite file
     journal      another `fusefs up`, mounted as it comes (the journal shipped to the
                  servers)

   create, stat, list (x5), rename, delete of --meta-files empty files in one directory;
   `tar x` of the Python standard library (the fs_bench tarball) and `git add -A && git
   commit` of the tree. --rounds rounds; within a round the targets take turns, their order
   rotating. Before each timed phase a fusefs target waits until its status file reports
   nothing dirty and, with the journal, every record shipped: a phase's shipping never
   spills into the next one's timing (so the tail of the last second's shipping after a
   phase is not in its figure; its CPU during the phase is).

   The journal cost of a workload is 1 - (journal rate / no-journal rate), from the
   median over rounds of the per-round ratio; the target is <= 20%.

2. Mount time of a filesystem of --files files (default 100,000) in directories of
   --dir-files (1,000): a third `fusefs up` cluster, the files created through the mount
   by --workers threads, a clean unmount (which ships the rest of the journal). Then, per
   round (--mount-rounds, default 3), after `sync` and drop_caches:

     empty cache    `fusefs mount` with a new, empty --cache-dir until it returns (it
                    returns once mounted; the daemon loaded the checkpoint and replayed the
                    journal), then a scandir + stat of the root; unmount
     current cache  the same, mounting again with the cache dir the previous mount just
                    left (its local database is current: replay only)

   plus, untimed for the headline, a walk of every directory counting the files (they
   must all be there). The checkpoint's size comes from the daemon log ("checkpoint of N
   bytes"); the status file's "journal" entry gives the record count.

Everything started here is stopped in `finally`, also on Ctrl-C / SIGTERM: `fusefs down`
per cluster (which unmounts and stops its servers), fusermount -u for the passthrough, then
a kill of any of our processes still alive. Must run as root (drop_caches, allow_other).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

import fs_bench
from fs_bench import (ROWS, Bench, BenchError, Fusefs, Passthrough, Results, alive,
                      drop_caches, fmt, fmt_pct, fmt_ratio, kill_quietly, log,
                      tail)

WORKLOAD_ROWS = ("meta_create", "meta_stat", "meta_list", "meta_rename", "meta_delete",
                 "untar", "git")
TARGET_COST = 0.20  # the journal may cost at most this fraction of the no-journal rate
VARIANTS = (("nojournal", ["--unsafe-no-journal"]), ("journal", []))
PARTS = ("workloads", "mount")

CHECKPOINT_RE = re.compile(r"checkpoint of (\d+) bytes at record (\d+) written \((\d+) chunks\)")
LOADED_RE = re.compile(r"metadata loaded: checkpoint at record (\d+), then (\d+) journal records")
CURRENT_RE = re.compile(r"local metadata is current after (\d+) journal records")
TROUBLE_RE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")


def code_version() -> str:
    """The fusefs code under test: git HEAD, and a hash of fusefs/*.py as they are now."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=fs_bench.REPO,
                          capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "fusefs"], cwd=fs_bench.REPO,
                           capture_output=True, text=True).stdout.strip()
    digest = hashlib.sha256()
    package = os.path.join(fs_bench.REPO, "fusefs")
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return f"git {head}{' + uncommitted changes' if dirty else ''}, fusefs/*.py " \
           f"sha256 {digest.hexdigest()[:12]}"


# -- targets ------------------------------------------------------------------------------------

class Cluster(Fusefs):
    """fs_bench's `fusefs up` target in its own directory, optionally remounted with flags."""

    def __init__(self, work: str, name: str, flags: list[str] = ()):
        super().__init__(work)
        self.name = name
        self.dir = os.path.join(work, name)
        self.mnt = os.path.join(self.dir, "mnt")
        self.variant_flags = list(flags)
        self.logs: set[str] = set()  # daemon logs of every state dir this cluster mounted

    def start(self) -> None:
        super().start()
        if self.variant_flags:
            self.remount(*self.variant_flags)
        self.logs.add(self.log_path)
        status = self.wait_status()
        if (status.get("journal") is None) != ("--unsafe-no-journal" in self.variant_flags):
            raise BenchError(f"{self.name}: the mount's journal is {status.get('journal')!r}, "
                             f"not what the flags {self.variant_flags} ask for")

    @property
    def log_path(self) -> str:
        return os.path.join(self.state_dir, "fusefs.log")

    def wait_status(self, timeout: float = 30) -> dict:
        asked, deadline = time.time(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if s and s.get("time", 0) > asked:
                return s
            time.sleep(0.1)
        raise BenchError(f"{self.name}: the daemon wrote no status in {timeout:.0f} s")

    def settle(self, timeout: float = 600) -> None:
        """Nothing dirty and, with the journal, every record shipped (in a fresh status)."""
        os.sync()
        asked, deadline = time.time(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            j = (s or {}).get("journal") or {}
            if s and s.get("time", 0) > asked and not s.get("dirty_bytes") and \
                    j.get("shipped", 0) >= j.get("seq", 0):
                return
            time.sleep(0.1)
        log(f"journal_bench: {self.name} still has dirty bytes or unshipped records; going on")

    def mount_with_cache(self, cache_dir: str) -> float:
        """`fusefs mount` with this cache dir; returns the seconds until it returned."""
        urls = ",".join(s["url"] for s in self.cluster["servers"])
        t0 = time.perf_counter()
        result = self._fusefs("mount", "--servers", urls, "--secret-file",
                              os.path.join(self.dir, "secret"), "--cache-dir", cache_dir,
                              self.mnt, timeout=1800)
        seconds = time.perf_counter() - t0
        if result.returncode != 0:
            raise BenchError(f"`fusefs mount --cache-dir {cache_dir}` failed: "
                             f"{result.stderr.strip()}")
        self._registered()
        self.logs.add(self.log_path)
        return seconds

    def umount_and_wait(self, timeout: float = 600) -> float:
        """`fusefs umount`, then wait (untimed) until the daemon has exited."""
        pid = self.daemon_pid
        t0 = time.perf_counter()
        self.umount()
        seconds = time.perf_counter() - t0
        deadline = time.monotonic() + timeout
        while alive(pid):
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: daemon {pid} still running {timeout:.0f} s "
                                 "after `fusefs umount` returned")
            time.sleep(0.05)
        return seconds

    def stop(self) -> None:
        super().stop()
        for pid in our_daemons(self.mnt):  # one that never got as far as registering
            kill_quietly(pid, "fusefs daemon")


def our_daemons(mnt: str) -> list[int]:
    """Pids of fusefs daemons serving (or starting to serve) our mountpoint `mnt`."""
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "fusefs" in argv and "--foreground" in argv and mnt in argv:
            pids.append(int(name))
    return pids


def log_matches(paths, pattern: re.Pattern, offsets: dict | None = None) -> list[re.Match]:
    """Matches of `pattern` in the logs, in each after `offsets[path]` bytes if given."""
    found = []
    for path in sorted(paths):
        try:
            with open(path, "rb") as f:
                f.seek((offsets or {}).get(path, 0))
                text = f.read().decode(errors="replace")
        except OSError:
            continue
        found += [m for m in map(pattern.search, text.splitlines()) if m]
    return found


def log_sizes(cache_dir: str) -> dict:
    """{daemon log: its size} of every state dir under a cache dir."""
    sizes = {}
    for entry in os.listdir(cache_dir):
        path = os.path.join(cache_dir, entry, "fusefs.log")
        if os.path.exists(path):
            sizes[path] = os.path.getsize(path)
    return sizes


def trouble(paths) -> list[str]:
    """WARNING/ERROR lines and tracebacks of daemon logs, except the expected warnings."""
    expected = ("the journal is off", "taking over the writer lease")
    lines = []
    for path in sorted(paths):
        try:
            with open(path, errors="replace") as f:
                lines += [f"{path}: {line.rstrip()}" for line in f
                          if TROUBLE_RE.search(line) and not any(e in line for e in expected)]
        except OSError:
            pass
    return lines


# -- part 1: the workloads ----------------------------------------------------------------------

def run_workloads(args, targets: list) -> tuple[Results, dict]:
    results = Results()
    bench = Bench(argparse.Namespace(small_rounds=args.rounds, files=args.meta_files,
                                     quick=args.quick, work=args.work), targets, results)
    bench.metadata()
    bench.untar_git()
    labels = {"files": f"{args.meta_files:,}",
              "tar": f"{bench.tar_files} files, {bench.tar_bytes / 1e6:.0f} MB"}
    return results, labels


def journal_cost(results: Results, row: str) -> float | None:
    ratio = results.ratio(row, "journal", "nojournal")
    return None if ratio is None else 1 - ratio


def render_workloads(results: Results, labels: dict) -> str:
    header = ["workload", "unit", "passthru", "nojournal", "journal", "nj/pt", "j/pt",
              "journal cost", "<=20%", "nj cpu", "j cpu", "j srv cpu"]
    rows = []
    for key, label, unit in ROWS:
        if key not in WORKLOAD_ROWS or not results.get(key, "journal"):
            continue
        cost = journal_cost(results, key)
        verdict = "-" if cost is None else ("PASS" if cost <= TARGET_COST else "MISS")
        rows.append([label.format(**labels), unit,
                     fmt(results.median(key, "passthrough")),
                     fmt(results.median(key, "nojournal")),
                     fmt(results.median(key, "journal")),
                     fmt_ratio(results.ratio(key, "nojournal", "passthrough")),
                     fmt_ratio(results.ratio(key, "journal", "passthrough")),
                     fmt_pct(cost), verdict,
                     fmt_pct(results.cpu(key, "nojournal", "daemon")),
                     fmt_pct(results.cpu(key, "journal", "daemon")),
                     fmt_pct(results.cpu(key, "journal", "servers"))])
    return table(header, rows, left=2)


def table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(widths[i]) if i < left else c.rjust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# -- part 2: mount time -------------------------------------------------------------------------

def build_tree(root: str, files: int, per_dir: int, workers: int) -> float:
    """Create `files` empty files in directories of `per_dir` with a thread pool."""
    dirs = [(f"d{i:05d}", min(per_dir, files - i * per_dir))
            for i in range((files + per_dir - 1) // per_dir)]
    made = [0]  # files created so far, for the progress lines
    lock = threading.Lock()
    stop = threading.Event()  # set on an error or Ctrl-C: the threads end at once

    def make(name: str, count: int) -> None:
        d = os.path.join(root, name)
        os.mkdir(d)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        for i in range(count):
            if stop.is_set():
                return
            os.close(os.open(os.path.join(d, f"f{i:05d}"), flags, 0o644))
            if i % 100 == 99 or i == count - 1:
                with lock:
                    made[0] += i % 100 + 1

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = {pool.submit(make, name, count) for name, count in dirs}
        try:
            while pending:
                finished, pending = concurrent.futures.wait(pending, timeout=5, return_when=(
                    concurrent.futures.FIRST_EXCEPTION))
                for future in finished:
                    future.result()  # a failed create ends the benchmark
                elapsed = time.perf_counter() - t0
                log(f"  built {made[0]:,}/{files:,} files ({made[0] / elapsed:,.0f} "
                    f"files/s, {elapsed:.0f} s)")
        except BaseException:
            stop.set()
            for future in pending:
                future.cancel()
            raise
    return time.perf_counter() - t0


def list_root(root: str) -> int:
    """The `ls -l` of the root: scandir and a stat of every entry."""
    n = 0
    with os.scandir(root) as it:
        for entry in it:
            entry.stat(follow_symlinks=False)
            n += 1
    return n


def count_files(root: str) -> int:
    n = 0
    with os.scandir(root) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                n += len(os.listdir(entry.path))
    return n


def timed_mount(fs: Cluster, cache_dir: str, files: int, dirs: int) -> dict:
    """One timed mount: `fusefs mount` returns, then the root is listed; then a full walk."""
    before = log_sizes(cache_dir)
    drop_caches()
    mount_s = fs.mount_with_cache(cache_dir)
    t0 = time.perf_counter()
    listed = list_root(fs.mnt)
    list_s = time.perf_counter() - t0
    if listed != dirs:
        raise BenchError(f"the root of {fs.mnt} lists {listed} entries, expected {dirs}")
    t0 = time.perf_counter()
    counted = count_files(fs.mnt)
    walk_s = time.perf_counter() - t0
    if counted != files:
        raise BenchError(f"{fs.mnt} holds {counted} files after mounting, expected {files}")
    journal = (fs.wait_status().get("journal") or {})
    log_path = fs.log_path
    umount_s = fs.umount_and_wait()
    loaded = log_matches([log_path], LOADED_RE, before)
    current = log_matches([log_path], CURRENT_RE, before)
    how = (f"checkpoint at record {loaded[-1][1]} + {loaded[-1][2]} records replayed"
           if loaded else f"local database reused + {current[-1][1]} records replayed"
           if current else "?")
    return {"mount": mount_s, "list": list_s, "total": mount_s + list_s, "walk": walk_s,
            "umount": umount_s, "how": how, "seq": journal.get("seq")}


def run_mount_test(args, fs: Cluster) -> dict:
    files, per_dir = args.files, args.dir_files
    dirs = (files + per_dir - 1) // per_dir
    os.rmdir(fs.root)  # fs_bench's `bench` directory: the root holds the tree only
    log(f"[mount] building {files:,} files in {dirs} directories through {fs.mnt} "
        f"({args.workers} threads)")
    build_s = build_tree(fs.mnt, files, per_dir, args.workers)
    fs.settle()
    status = fs.wait_status()
    build_log = fs.log_path
    umount_s = fs.umount_and_wait()
    checkpoints = log_matches([build_log], CHECKPOINT_RE)
    out = {"files": files, "dirs": dirs, "build_s": build_s, "build_umount_s": umount_s,
           "journal": status.get("journal"), "checkpoints": [m.groups() for m in checkpoints],
           "rounds": []}
    log(f"  built in {build_s:.1f} s; journal {status.get('journal')}; unmounted in "
        f"{umount_s:.1f} s; checkpoints written: {out['checkpoints'] or 'none'}")
    for rnd in range(args.mount_rounds):
        cache_dir = os.path.join(fs.dir, f"cache-fresh-{rnd}")
        os.makedirs(cache_dir)
        fresh = timed_mount(fs, cache_dir, files, dirs)
        log(f"[mount] round {rnd + 1}/{args.mount_rounds} empty cache:   mount "
            f"{fresh['mount']:.2f} s + list root {fresh['list']:.3f} s; walk "
            f"{fresh['walk']:.2f} s; umount {fresh['umount']:.1f} s ({fresh['how']})")
        current = timed_mount(fs, cache_dir, files, dirs)
        log(f"[mount] round {rnd + 1}/{args.mount_rounds} current cache: mount "
            f"{current['mount']:.2f} s + list root {current['list']:.3f} s; walk "
            f"{current['walk']:.2f} s; umount {current['umount']:.1f} s ({current['how']})")
        out["rounds"].append({"fresh": fresh, "current": current})
    out["checkpoints_later"] = [m.groups() for m in
                                log_matches(fs.logs - {build_log}, CHECKPOINT_RE)]
    return out


def render_mount(m: dict) -> str:
    header = ["mount, cache dir", "mount returns", "+ list root", "= total", "(min-max total)",
              "walk all files", "umount"]
    rows = []
    for kind, label in (("fresh", "empty (new) cache dir"), ("current", "current cache dir")):
        samples = [r[kind] for r in m["rounds"]]
        totals = [s["total"] for s in samples]

        def med(key):
            return statistics.median(s[key] for s in samples)

        rows.append([label, f"{med('mount'):.2f} s", f"{med('list'):.3f} s",
                     f"{med('total'):.2f} s", f"({min(totals):.2f}-{max(totals):.2f})",
                     f"{med('walk'):.2f} s", f"{med('umount'):.1f} s"])
    lines = [table(header, rows)]
    for i, r in enumerate(m["rounds"]):
        lines.append(f"  round {i + 1}: empty {r['fresh']['total']:.2f} s "
                     f"({r['fresh']['how']}); current {r['current']['total']:.2f} s "
                     f"({r['current']['how']})")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="The journal's cost: metadata workloads on the passthrough, fusefs "
                    "--unsafe-no-journal and fusefs with its journal; and the mount time of "
                    "a filesystem of --files files from an empty and a current cache.",
        epilog="Run as root. Figures are medians over rounds; the journal cost is "
               "1 - journal rate / no-journal rate (median of per-round ratios).")
    p.add_argument("--workdir", default="/var/tmp", help="where to create the temp work "
                   "directory; every target lives there (default /var/tmp)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the workloads (default 3)")
    p.add_argument("--meta-files", type=int, default=10_000,
                   help="files of the create/stat/list/rename/delete workload (default 10000)")
    p.add_argument("--files", type=int, default=100_000,
                   help="files of the mount-time filesystem (default 100000)")
    p.add_argument("--dir-files", type=int, default=1_000,
                   help="files per directory of the mount-time filesystem (default 1000)")
    p.add_argument("--workers", type=int, default=8,
                   help="threads creating the mount-time filesystem (default 8)")
    p.add_argument("--mount-rounds", type=int, default=3,
                   help="timed mounts from an empty, and from a current, cache (default 3)")
    p.add_argument("--only", choices=PARTS, help="run only the workloads or only the "
                   "mount-time part")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few minutes: 1 "
                   "round of 500 files, the small tarball, 5,000 files mounted once")
    p.add_argument("--keep", action="store_true", help="do not delete the work directory")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = args.mount_rounds = 1
        args.meta_files = min(args.meta_files, 500)
        args.files = min(args.files, 5_000)
    if min(args.rounds, args.meta_files, args.files, args.dir_files, args.workers,
           args.mount_rounds) < 1:
        p.error("--rounds, --meta-files, --files, --dir-files, --workers and --mount-rounds "
                "must be >= 1")
    args.parts = [args.only] if args.only else list(PARTS)
    return args


def report_workloads(results: Results, labels: dict, rounds: int) -> None:
    print()
    print(render_workloads(results, labels))
    print()
    print(f"Figures: median over {rounds} round(s), targets interleaved; ratios: median of "
          "per-round ratios. journal cost = 1 - (journal rate / no-journal rate), target <= "
          "20%. cpu: CPU s per wall s of the fusefs daemon (nj, j) and of the journal "
          "cluster's 3 servers, in the timed part.")
    costs = [(key, journal_cost(results, key)) for key in WORKLOAD_ROWS]
    costs = [(k, c) for k, c in costs if c is not None]
    if costs:
        worst = max(costs, key=lambda kc: kc[1])
        verdict = "PASS" if worst[1] <= TARGET_COST else "MISS"
        print(f"  {verdict}  journal cost <= 20% on every workload (worst: {worst[0]} "
              f"{worst[1] * 100:.0f}%)")


def report_mount(m: dict) -> None:
    print()
    print(f"Mount time, {m['files']:,} empty files in {m['dirs']} directories, median of "
          f"{len(m['rounds'])} (page cache dropped before each mount):")
    print(render_mount(m))
    j = m["journal"] or {}
    print(f"  built through the mount in {m['build_s']:.1f} s "
          f"({m['files'] / m['build_s']:,.0f} files/s); journal at the end: record "
          f"{j.get('seq')}, shipped {j.get('shipped')}, segment {j.get('segment')}; "
          f"unmount after the build {m['build_umount_s']:.1f} s")
    for size, seq, chunks in m["checkpoints"]:
        print(f"  checkpoint written while building/unmounting: {int(size):,} bytes at record "
              f"{seq} ({chunks} chunks, zlib-compressed on the servers)")
    later = m["checkpoints_later"]
    if later:
        sizes = sorted({int(s) for s, _, _ in later})
        print(f"  checkpoints written by the timed mounts: {len(later)} "
              f"(sizes {', '.join(f'{s:,}' for s in sizes)} bytes)")
    if not m["checkpoints"] and not later:
        print("  no \"checkpoint of N bytes\" line in the daemon logs")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not fs_bench.prepare_run(args, "journal_bench"):
        return 2
    started = time.monotonic()
    running: list = []  # started and not yet stopped, in the order they started
    clusters: list[Cluster] = []  # every fusefs cluster, for its daemon logs
    passthrough = None
    failed = False

    def start(target) -> None:
        log(f"starting {target.name}")
        running.append(target)
        target.start()
        print(f"{target.name}: {target.describe()}", flush=True)

    def stop(target) -> None:
        running.remove(target)
        target.stop()

    try:
        fs_bench.print_machine(args.work)
        print(f"parts: {', '.join(args.parts)}; workloads: {args.rounds} round(s), "
              f"{args.meta_files:,} files; mount: {args.files:,} files in directories of "
              f"{args.dir_files:,}, {args.mount_rounds} round(s)", flush=True)
        versions = []  # the code each part's daemons loaded when they started

        def note_version(part: str) -> None:
            versions.append(code_version())
            print(f"fusefs code for the {part}: {versions[-1]}", flush=True)

        if "workloads" in args.parts:
            passthrough = Passthrough(args.work)
            variants = [Cluster(args.work, name, flags) for name, flags in VARIANTS]
            clusters += variants
            targets = [passthrough, *variants]
            note_version("workloads")
            for t in targets:
                start(t)
            results, labels = run_workloads(args, targets)
            for t in reversed(targets):  # the mount-time part runs alone on the machine
                stop(t)
            report_workloads(results, labels, args.rounds)
        if "mount" in args.parts:
            fs = Cluster(args.work, "mount-test")
            clusters.append(fs)
            print()
            note_version("mount-time part")
            start(fs)
            report_mount(run_mount_test(args, fs))
            stop(fs)
        if versions and code_version() != versions[-1] or len(set(versions)) > 1:
            print(f"\nWARNING: fusefs/*.py changed during the run (now {code_version()}): "
                  "each daemon ran the code of when it started")
        problems = trouble(set().union(*(c.logs for c in clusters)))
        if problems:
            print(f"\ndaemon log warnings/errors ({len(problems)}; the last 10):")
            for line in problems[-10:]:
                print(f"  {line}")
        print(f"\ntotal time {time.monotonic() - started:.0f}s")
        return 0
    except (BenchError, subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        failed = True
        print(f"journal_bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        failed = True
        print("journal_bench: interrupted", file=sys.stderr)
        return 130
    finally:
        stop_everything(args, running, clusters, passthrough, failed)


def stop_everything(args, running: list, clusters: list[Cluster], passthrough,
                    failed: bool) -> None:
    for t in reversed(running):
        try:
            t.stop()
        except Exception as e:  # noqa: BLE001 - stop the others anyway
            print(f"journal_bench: stopping {t.name}: {type(e).__name__}: {e}", file=sys.stderr)
    if failed:
        for c in clusters:
            for path in sorted(c.logs):
                print(f"fusefs log tail ({path}):\n{tail(path)}", file=sys.stderr)
        if passthrough is not None:
            print(f"passthrough log tail:\n{tail(passthrough.log_path)}", file=sys.stderr)
    mounts = [c.mnt for c in clusters] + ([passthrough.mnt] if passthrough else [])
    leftovers = [m for m in mounts if fs_bench.is_mounted(m)]
    if args.keep or leftovers:
        print(f"kept {args.work}" + (f" (still mounted: {leftovers})" if leftovers else ""),
              file=sys.stderr)
    else:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
