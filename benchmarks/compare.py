#!/usr/bin/env python3
"""fusefs side by side with MooseFS and GlusterFS: one matrix, interleaved by round.

    sudo .venv/bin/python benchmarks/compare.py --quick     # smoke run
    sudo .venv/bin/python benchmarks/compare.py             # the full matrix, 2 rounds

Targets, all on the same disk under one work directory (default /var/tmp):

  floor        benchmarks/floor.py: an in-memory fusepy filesystem with fusefs's glue and
               mount options, the fastest any filesystem on fusepy + libfuse 2 can be
  passthrough  benchmarks/passthrough.py: the ceiling for a Python FUSE filesystem
  fusefs       `python -m fusefs up DIR` at its defaults (3 local block servers, R=3, W=2)
  moosefs      a master and 3 chunkservers, goal 3, in a private network namespace
  glusterfs    one replica-3 volume of 3 bricks on loopback

(set up and torn down by benchmarks/peers.py; fs_bench.py provides the passthrough and
fusefs targets, the timing and the medians). Every round runs each workload group on every
target in turn, the order rotating from round to round. Figures are medians over rounds;
ratios are medians of the per-round ratios, fusefs / each other target: above 1 means
fusefs is faster. Every figure is a rate (higher is better), including the tree steps
(entries of the tree per second).

Sequential writes are also set against this disk's replicated-write ceiling, measured in
the same rounds: the large file's bytes written three times (R=3) by a plain loop into
three local files, fsync at the end, the rate divided by three. Three copies on one disk
can go no faster; the line under the table gives each target's seq write as a share of it.

Cold = `sync; echo 3 > /proc/sys/vm/drop_caches` and every FUSE client remounted (MooseFS
and GlusterFS clients, fusefs), with fusefs's local disk block cache deleted; the column
"fusefs kept" is the same step again with fusefs's disk block cache kept (remounted, page
cache dropped). Random reads drop the page cache only: each client keeps its own caches.

Everything started is stopped in `finally` (also on Ctrl-C / SIGTERM), by each peer's own
stop command and then by PID. Must run as root. Exit status: 0 when every workload ran,
1 when one failed (the message says which), 2 for bad usage or not root, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import fs_bench  # noqa: E402
from fs_bench import (CHUNK, R, GiB, KiB, MB, MiB, Bench, BenchError, Floor,  # noqa: E402
                      Fusefs, Meter, Passthrough, Results, drop_caches, fmt, fmt_ratio, git,
                      random_reads, random_writes, read_file, write_file)
from fusefs.daemon import MountConfig  # noqa: E402
from peers import GlusterFS, MooseFS  # noqa: E402

TARGETS = ("floor", "passthrough", "fusefs", "moosefs", "glusterfs")
TARGET_ALIASES = {"pt": "passthrough", "mfs": "moosefs", "gluster": "glusterfs",
                  **{t: t for t in TARGETS}}
PEERS = ("floor", "passthrough", "moosefs", "glusterfs")  # fusefs / each of these
RATIO_HEADERS = {"floor": "fs/floor", "passthrough": "fs/pass", "moosefs": "fs/Moos",
                 "glusterfs": "fs/Glus"}
KEPT = "fusefs-kept"  # fusefs again on cold steps, its disk block cache kept
GROUPS = ("seq", "random", "meta", "small", "tree")
DIRTY_LIMIT = MountConfig.dirty_limit  # fusefs's default --dirty-limit

# (key, group, label, unit, cold): the table's rows in this order.
ROWS = [
    ("seq_write", "seq", "seq write {large} + fsync", "MB/s", False),
    ("seq_read_cold", "seq", "seq read cold", "MB/s", True),
    ("seq_read_warm", "seq", "seq read warm", "MB/s", False),
    ("rand_read_small", "random", "random 4 KiB read, {small} file", "IOPS", False),
    ("rand_write_small", "random", "random 4 KiB write + fsync, {small}", "IOPS", False),
    ("rand_read_large", "random", "random 4 KiB read, {large} file", "IOPS", False),
    ("rand_write_large", "random", "random 4 KiB write + fsync, {large}", "IOPS", False),
    ("meta_create", "meta", "create {files} files", "ops/s", False),
    ("meta_stat", "meta", "stat {files}", "ops/s", False),
    ("meta_list", "meta", "list {files} (x5)", "entries/s", False),
    ("meta_rename", "meta", "rename {files}", "ops/s", False),
    ("meta_delete", "meta", "unlink {files}", "ops/s", False),
    ("small_write", "small", "{nsmall} small files (4-64 KiB) write", "files/s", False),
    ("small_read", "small", "small files read cold", "files/s", True),
    ("small_remove", "small", "small files remove (rm -r)", "files/s", False),
    ("tree_untar", "tree", "untar tree ({entries} entries, {mb})", "entries/s", False),
    ("tree_find", "tree", "find, cold", "entries/s", True),
    ("tree_du", "tree", "du -s, cold", "entries/s", True),
    ("tree_tar", "tree", "tar c, cold", "entries/s", True),
    ("tree_git_add", "tree", "git add -A", "entries/s", False),
    ("tree_git_commit", "tree", "git commit", "entries/s", False),
    ("tree_git_status", "tree", "git status", "entries/s", False),
    ("tree_rm", "tree", "rm -rf tree", "entries/s", False),
]
UNITS = {key: unit for key, _, _, unit, _ in ROWS}
QUICK_LEAVE_OUT = ("test", "site-packages", "__pycache__")


# -- the source tree ----------------------------------------------------------------------------

def tree_sources(quick: bool) -> list[tuple[str, str, list[str]]]:
    """(name in the tarball, directory, members) of the source tree: the standard library of
    the interpreter running this (tests included) and the packages of its venv, without
    byte code. Both exist on any machine where the project's venv is set up."""
    stdlib = os.path.dirname(os.__file__)
    if quick:  # without its tests (about 1,100 entries, 30 MB)
        return [("stdlib", stdlib, [f"./{d}" for d in sorted(os.listdir(stdlib))
                                    if d not in QUICK_LEAVE_OUT])]
    out = [("stdlib", stdlib, ["."])]
    purelib = sysconfig.get_paths()["purelib"]
    if os.path.isdir(purelib) and os.path.realpath(purelib) != os.path.realpath(stdlib):
        out.append(("site-packages", purelib, ["."]))
    return out


def make_tarball(path: str, quick: bool) -> tuple[int, int]:
    """Write the tree's uncompressed tarball; returns (entries, bytes)."""
    excludes = ["--exclude=__pycache__", "--exclude=./site-packages", "--exclude=./config-*",
                "--exclude=./dist-packages"]
    mode = "cf"
    for name, directory, members in tree_sources(quick):
        rename = f"--transform=s,^\\./,{name}/,"  # every member starts with ./
        subprocess.run(["tar", mode, path, *excludes, rename, "-C", directory, *members],
                       check=True)
        mode = "rf"
    names = subprocess.run(["tar", "tf", path], capture_output=True, text=True,
                           check=True).stdout.split("\n")
    return sum(1 for n in names if n.strip()), os.path.getsize(path)


def drain(cmd: list[str], cwd: str) -> int:
    """Run cmd, read its whole stdout (so `tar c` really reads every file), return bytes."""
    total = 0
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as proc:
        while chunk := proc.stdout.read(1 * MiB):
            total += len(chunk)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} in {cwd} failed ({proc.returncode})")
    return total


# -- the matrix ---------------------------------------------------------------------------------

class Compare(Bench):
    """fs_bench's Bench (order, metadata workload) with the matrix of issue 18."""

    def __init__(self, args, targets, results):
        super().__init__(args, targets, results)
        self.entries = 0
        self.ceilings: list[float] = []  # MB/s per round: the replicated-write ceiling

    def record(self, row, target, sample, extra: str = "", as_name: str = "") -> None:
        name = as_name or target.name
        self.results.add(row, name, sample)
        fs_bench.log(f"  {row:<17} {name:<12} {sample.value:11.1f} {UNITS[row]:<9} "
                     f"({sample.seconds:6.2f}s){extra}")

    def cold(self, row: str, target, amount: float, step) -> None:
        """Time step() (which does `amount` of work) after making `target` cold; for
        fusefs twice: its disk block cache deleted, then kept (the KEPT column)."""
        variants = [(False, target.name)]
        if isinstance(target, Fusefs) and self.args.kept:
            variants.append((True, KEPT))
        for keep, name in variants:
            target.settle()
            target.make_cold(keep_disk_cache=keep)
            with Meter(target) as m:
                step()
            self.record(row, target, m.sample(amount), as_name=name)

    def timed(self, row: str, target, amount: float, step) -> None:
        target.settle()
        with Meter(target) as m:
            step()
        self.record(row, target, m.sample(amount))

    # -- big files ------------------------------------------------------------------------

    def seq(self, rnd: int) -> None:
        size = self.args.large
        for t in self.order(rnd):
            path = os.path.join(t.root, "large")
            self.timed("seq_write", t, size / MB, lambda: write_file(path, size, self.payload))
        self.ceilings.append(self.ceiling(size))
        for t in self.order(rnd):
            path = os.path.join(t.root, "large")
            self.cold("seq_read_cold", t, size / MB, lambda: read_file(path, size))
            self.timed("seq_read_warm", t, size / MB, lambda: read_file(path, size))

    def ceiling(self, size: int) -> float:
        """The replicated-write ceiling of this disk, MB/s: `size` bytes written R times
        into R files of the work directory (next to every target), fsync at the end,
        divided by R."""
        d = os.path.join(self.args.work, "ceiling")
        os.makedirs(d, exist_ok=True)
        os.sync()
        started = time.monotonic()
        fds = [os.open(os.path.join(d, f"copy{r}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                       0o644) for r in range(R)]
        try:
            for i in range(size // CHUNK):
                for fd in fds:
                    os.write(fd, self.payload.chunk(i))
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        rate = size / MB / (time.monotonic() - started)
        shutil.rmtree(d)
        fs_bench.log(f"  {'seq_ceiling':<17} {'disk':<12} {rate:11.1f} MB/s      "
                     f"({R} copies, /{R})")
        return rate

    def random_io(self, rnd: int) -> None:
        a, rng = self.args, random.Random(1000 + rnd)
        for t in self.order(rnd):
            large = os.path.join(t.root, "large")
            if not os.path.exists(large):  # the seq group did not run
                write_file(large, a.large, self.payload)
            write_file(os.path.join(t.root, "small"), a.small, self.payload)
        for which, size in (("small", a.small), ("large", a.large)):
            reads = [rng.randrange(size // 4096) * 4096 for _ in range(a.ops)]
            writes = [rng.randrange(size // 4096) * 4096 for _ in range(a.ops)]
            for t in self.order(rnd):
                path = os.path.join(t.root, which)
                t.settle()
                drop_caches()
                self.timed(f"rand_read_{which}", t, a.ops,
                           lambda: random_reads(path, size, reads))
                self.timed(f"rand_write_{which}", t, a.ops,
                           lambda: random_writes(path, writes, self.payload))

    def remove_big(self) -> None:
        for t in self.targets:
            for name in ("large", "small"):
                p = os.path.join(t.root, name)
                if os.path.exists(p):
                    os.unlink(p)

    # -- small files ----------------------------------------------------------------------

    def small(self, rnd: int) -> None:
        n, rng = self.args.small_files, random.Random(5)
        sizes = [rng.randint(4 * KiB, 64 * KiB) for _ in range(n)]
        for t in self.order(rnd):
            d = os.path.join(t.root, f"small-{rnd}")
            os.mkdir(d)
            paths = [os.path.join(d, f"s{i:05d}") for i in range(n)]
            self.timed("small_write", t, n, lambda: self._write_small(paths, sizes))
            self.cold("small_read", t, n, lambda: self._read_small(paths, sizes))
            self.timed("small_remove", t, n, lambda: shutil.rmtree(d))

    def _write_small(self, paths, sizes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        for i, (p, s) in enumerate(zip(paths, sizes)):
            fd = os.open(p, flags, 0o644)
            try:
                os.write(fd, self.payload.chunk(i, s))
            finally:
                os.close(fd)

    @staticmethod
    def _read_small(paths, sizes) -> None:
        for p, s in zip(paths, sizes):
            with open(p, "rb", buffering=0) as f:
                if len(f.read(s + 1)) != s:
                    raise BenchError(f"{p} is not {s} bytes long")

    # -- a source tree --------------------------------------------------------------------

    def tree(self, rnd: int) -> None:
        n = self.entries
        with open(self.tarball, "rb") as f:  # the tarball itself in the page cache
            while f.read(8 * MiB):
                pass
        for t in self.order(rnd):
            d = os.path.join(t.root, f"tree-{rnd}")
            os.mkdir(d)
            self.timed("tree_untar", t, n, lambda: subprocess.run(
                ["tar", "xf", self.tarball, "-C", d], check=True))
            self.cold("tree_find", t, n, lambda: drain(["find", "."], d))
            self.cold("tree_du", t, n, lambda: drain(["du", "-s", "."], d))
            self.cold("tree_tar", t, n, lambda: drain(["tar", "cf", "-", "."], d))
            git("init", "-q", cwd=d)
            self.timed("tree_git_add", t, n, lambda: git("add", "-A", cwd=d))
            self.timed("tree_git_commit", t, n, lambda: git("commit", "-q", "-m", "tree",
                                                            cwd=d))
            self.timed("tree_git_status", t, n, lambda: git("status", "--porcelain", cwd=d))
            self.timed("tree_rm", t, n, lambda: subprocess.run(["rm", "-rf", d], check=True))

    def run(self) -> None:
        a = self.args
        if "tree" in a.groups:
            self.tarball = os.path.join(a.work, "tree.tar")
            self.entries, self.tar_bytes = make_tarball(self.tarball, a.quick)
            fs_bench.log(f"tree: {self.entries} entries, {self.tar_bytes / MB:.1f} MB "
                         f"({', '.join(d for _, d, _ in tree_sources(a.quick))})")
        for rnd in range(a.rounds):
            for group in a.groups:
                fs_bench.log(f"[{group}] round {rnd + 1}/{a.rounds}")
                step = {"seq": self.seq, "random": self.random_io, "meta": self.metadata_round,
                        "small": self.small, "tree": self.tree}[group]
                step(rnd)
            self.remove_big()


# -- report -------------------------------------------------------------------------------------

def columns(results: Results, targets: list[str]) -> list[str]:
    cols = list(targets)
    if any(k[1] == KEPT for k in results.samples):
        cols.insert(cols.index("fusefs") + 1, KEPT)
    return cols


def ratio_columns(targets: list[str]) -> list[str]:
    return [p for p in PEERS if p in targets] if "fusefs" in targets else []


def row_labels(args, entries: int = 0, tar_bytes: int = 0) -> dict:
    return {"large": size_text(args.large), "small": size_text(args.small),
            "files": f"{args.files:,}", "nsmall": f"{args.small_files:,}",
            "entries": f"{entries:,}", "mb": f"{tar_bytes / MB:.0f} MB"}


def size_text(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB and n % GiB == 0 else f"{n // MiB} MiB"


def render(results: Results, targets: list[str], labels: dict) -> str:
    """The table: medians per target, then fusefs / each peer (above 1: fusefs faster)."""
    short = {"passthrough": "passthru", KEPT: "fusefs kept", "moosefs": "MooseFS",
             "glusterfs": "GlusterFS"}
    cols, ratios = columns(results, targets), ratio_columns(targets)
    header = ["workload", "unit", *(short.get(c, c) for c in cols),
              *(RATIO_HEADERS[p] for p in ratios)]
    rows = []
    for key, _, label, unit, cold in ROWS:
        if not any(results.get(key, c) for c in cols):
            continue
        rows.append([label.format(**labels) + (" *" if cold else ""), unit,
                     *(fmt(results.median(key, c)) for c in cols),
                     *(fmt_ratio(results.ratio(key, "fusefs", p)) for p in ratios)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def ceiling_line(results: Results, targets: list[str], ceilings: list[float]) -> str:
    """Seq write as a share of the replicated-write ceiling, per target: the median over
    rounds of each round's seq write / that round's ceiling."""
    if not ceilings:
        return ""
    shares = []
    for t in columns(results, targets):
        samples = results.get("seq_write", t)
        if samples:
            ratios = sorted(s.value / c for s, c in zip(samples, ceilings))
            shares.append(f"{t} {statistics.median(ratios):.0%}")
    return (f"Replicated-write ceiling of this disk ({R} copies by a local loop, fsync at the "
            f"end, /{R}): {statistics.median(ceilings):,.0f} MB/s; seq write as a share of "
            f"it: {', '.join(shares)}.")


def report(results: Results, targets: list[str], labels: dict) -> dict:
    """What --json prints: per row, the samples, medians and fusefs / peer ratios."""
    cols, rows = columns(results, targets), []
    for key, group, label, unit, cold in ROWS:
        if not any(results.get(key, c) for c in cols):
            continue
        rows.append({
            "key": key, "group": group, "label": label.format(**labels), "unit": unit,
            "cold": cold,
            "samples": {c: [round(s.value, 3) for s in results.get(key, c)] for c in cols},
            "seconds": {c: [round(s.seconds, 4) for s in results.get(key, c)] for c in cols},
            "median": {c: results.median(key, c) for c in cols},
            "fusefs_over": {p: results.ratio(key, "fusefs", p) for p in ratio_columns(targets)},
        })
    return {"rows": rows}


FOOTNOTES = (
    "Figures: medians over rounds; ratios fs/X: median of the per-round ratios fusefs / X "
    "(above 1: fusefs faster). MB = 10^6 bytes. Tree steps: entries of the tree per second.",
    "* cold: sync + drop_caches, every FUSE client remounted, fusefs's disk block cache "
    "deleted; 'fusefs kept': the same with fusefs's disk block cache kept.",
    "Random reads: page cache dropped first, each client keeps its own caches. fusefs at "
    "its defaults (R=3, W=2, dirty limit {dirty}); MooseFS goal 3; GlusterFS replica 3.",
)


# -- command line -------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="compare.py",
        description="fusefs side by side with a Python passthrough, MooseFS (goal 3, 3 "
                    "chunkservers) and GlusterFS (replica 3) on this host: one matrix, "
                    "interleaved by round, medians and fusefs / peer ratios.",
        epilog="Run as root (drop_caches, mounts, a network namespace). Installs the "
               "moosefs-* and glusterfs-* Debian packages when missing. Progress lines go "
               "to stderr, the table (or --json) to stdout. Exit status 0 when every "
               "workload ran, 1 on a failure, 2 on bad usage, 130 when interrupted.")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 round, 1,000 files, 500 small files, 500 random ops, "
                        "the standard library without its tests as the tree (the large file "
                        "stays 4x the dirty limit, that being the point of its row)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    p.add_argument("--targets", default="", metavar="T[,T...]",
                   help=f"targets to run ({', '.join(TARGETS)}; pt, mfs, gluster); default all")
    p.add_argument("--only", default="", metavar="G[,G...]",
                   help=f"workload groups to run ({', '.join(GROUPS)}); default all")
    p.add_argument("--large", type=fs_bench.parse_size, default=4 * DIRTY_LIMIT,
                   help="the large file: seq write/read and its random I/O (default 4x "
                        f"fusefs's dirty limit = {size_text(4 * DIRTY_LIMIT)})")
    p.add_argument("--small", type=fs_bench.parse_size, default=DIRTY_LIMIT // 2,
                   help="the file for random I/O under the dirty limit (default half of it "
                        f"= {size_text(DIRTY_LIMIT // 2)})")
    p.add_argument("--ops", type=int, default=5000, help="random 4 KiB reads, and writes, "
                   "per file and round (default 5000)")
    p.add_argument("--files", type=int, default=10_000, help="entries of the metadata "
                   "workload (default 10000)")
    p.add_argument("--small-files", type=int, default=5000, help="small files of 4-64 KiB "
                   "(default 5000)")
    p.add_argument("--no-kept", dest="kept", action="store_false",
                   help="skip the 'fusefs kept' column (cold steps with its disk cache kept)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--workdir", default="/var/tmp", help="where the work directory goes "
                   "(every target lives there, so on one disk; default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="do not delete the work directory")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.files, args.small_files = min(args.files, 1000), min(args.small_files, 500)
        args.ops = min(args.ops, 500)
    args.targets = pick(p, "--targets", args.targets, TARGET_ALIASES, TARGETS)
    args.groups = pick(p, "--only", args.only, {g: g for g in GROUPS}, GROUPS)
    if min(args.rounds, args.ops, args.files, args.small_files) < 1:
        p.error("--rounds, --ops, --files and --small-files must be >= 1")
    for name in ("large", "small"):
        if getattr(args, name) < 1 * MiB or getattr(args, name) % (1 * MiB):
            p.error(f"--{name} must be a whole number of MiB")
    args.small_rounds = args.rounds  # what fs_bench's metadata workload reads
    return args


def pick(p, option: str, text: str, aliases: dict, allowed: tuple) -> list[str]:
    chosen = []
    for token in filter(None, (x.strip().lower() for x in text.split(","))):
        if token not in aliases:
            p.error(f"{option}: unknown {token!r}; choose from {', '.join(allowed)}")
        chosen.append(aliases[token])
    return [x for x in allowed if x in chosen] if chosen else list(allowed)


def make_targets(args) -> list:
    classes = {"floor": Floor, "passthrough": Passthrough, "fusefs": Fusefs, "moosefs": MooseFS,
               "glusterfs": GlusterFS}
    return [classes[name](args.work) for name in args.targets]


def stop_all(targets) -> list[str]:
    """Stop every target (the others even when one fails); returns what is still mounted."""
    for t in reversed(targets):
        try:
            t.stop()
        except Exception as e:  # noqa: BLE001 - stop the others anyway
            fs_bench.log(f"compare: stopping {t.name}: {type(e).__name__}: {e}")
    return [t.mnt for t in targets if fs_bench.is_mounted(t.mnt)]


def print_results(args, bench: Compare, results: Results, started: float) -> None:
    labels = row_labels(args, bench.entries, bench.tar_bytes)
    if args.json:
        out = report(results, args.targets, labels)
        out["ceiling_mb_s"] = [round(c, 1) for c in bench.ceilings]
        out.update(config={k: getattr(args, k) for k in (
            "rounds", "large", "small", "ops", "files", "small_files", "quick", "groups",
            "targets")}, dirty_limit=DIRTY_LIMIT, seconds=round(time.monotonic() - started))
        print(json.dumps(out, indent=1))
        return
    print()
    print(render(results, args.targets, labels))
    print()
    line = ceiling_line(results, args.targets, bench.ceilings)
    if line:
        print(line)
    for note in FOOTNOTES:
        print(note.format(dirty=size_text(DIRTY_LIMIT)))
    print(f"total time {time.monotonic() - started:.0f}s")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not fs_bench.prepare_run(args, "compare"):
        return 2
    started, results = time.monotonic(), Results()
    targets = make_targets(args)
    bench = Compare(args, targets, results)
    code = 0
    try:
        if not args.json:
            fs_bench.print_machine(args.work)
        for t in targets:
            fs_bench.log(f"compare: starting {t.name}")
            t.start()
            fs_bench.log(f"{t.name}: {t.describe()}")
        bench.run()
        print_results(args, bench, results, started)
    except (BenchError, subprocess.CalledProcessError, OSError) as e:
        print(f"compare: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("compare: interrupted", file=sys.stderr)
        code = 130
    finally:
        leftovers = stop_all(targets)
        if leftovers:
            print(f"compare: still mounted, not deleting {args.work}: {leftovers}",
                  file=sys.stderr)
        elif args.keep:
            print(f"kept {args.work}", file=sys.stderr)
        else:
            shutil.rmtree(args.work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
