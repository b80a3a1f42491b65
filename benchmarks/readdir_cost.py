#!/usr/bin/env python3
"""Where the time of listing a directory goes on fusepy + libfuse 2, per entry.

    sudo .venv/bin/python benchmarks/readdir_cost.py [--entries 10000] [--repeat 20] [--json]

Three measurements, each reported in microseconds per directory entry:

  in process   no mount: the loop of floor.py's readdir over a prebuilt list of --entries
               names, (a) with no call at all, (b) calling libfuse's `fuse_add_direntry`
               through ctypes for each name (the C routine that packs one entry into the
               reply; libfuse's filler ends in it), (c) fusepy's own readdir glue over a
               list of names (as benchmarks/passthrough.py answers), its filler a Python
               function making the same call (one Python call per entry more than real).
  mounted      benchmarks/floor.py mounted under --workdir: `os.listdir` of a directory of
               --entries empty files, --repeat times, minus the same for an empty directory,
               per entry: the client's wall time, and the CPU time of the floor process
               (libfuse's request handling, the Python callback, the ctypes filler calls).
               Every listing reaches the process: libfuse 2 cannot ask the kernel to cache
               directory contents (FOPEN_CACHE_DIR is not in its fuse_file_info).
  native       the same listings of a plain directory in --workdir (the kernel's dentry
               cache answers): what the system call costs without FUSE.
  find         (--find) the source tree of compare.py untarred into a floor.py mount,
               which is then made cold (unmounted, caches dropped, mounted), and `find .`
               timed: once with file types in readdir (floor.py's default), once without
               (`--no-dtype`, as fusefs did before c1867d8). Without them, find must look
               up every entry to learn whether it is a directory: a LOOKUP per entry.

Everything this starts (the floor process, its mount, the work directory) is removed at
the end, also on Ctrl-C. Must run as root (for the mount's allow_other, like compare.py).
Exit status 0, 1 when the mount failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import fs_bench  # noqa: E402
from servers import process_cpu_seconds  # noqa: E402

import fuse  # noqa: E402
from fuse import c_stat  # noqa: E402

BUFSIZE = 1 << 20  # room for every entry at once, like libfuse's growing buffer


def names(n: int) -> list[str]:
    return [f"f{i:06d}" for i in range(n)]


def per_entry_in_process(n: int, repeat: int) -> dict:
    """(a), (b), (c) of the module docstring, µs per entry (the best of `repeat` runs)."""
    add = fuse._libfuse.fuse_add_direntry
    add.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                    ctypes.POINTER(c_stat), fuse.c_off_t]
    add.restype = ctypes.c_size_t
    buf = ctypes.create_string_buffer(BUFSIZE)
    listing = []
    for i, name in enumerate(names(n)):
        st = c_stat()
        st.st_ino, st.st_mode = i + 2, 0o100000
        listing.append((name.encode(), st))

    def bare():
        for entry, st in listing:
            if entry is None:
                break

    def packed():
        for entry, st in listing:
            if add(None, buf, BUFSIZE, entry, st, 0) == 0:
                break

    return {"loop only": best(bare, repeat) / n * 1e6,
            "loop + ctypes fuse_add_direntry": best(packed, repeat) / n * 1e6,
            "fusepy's readdir glue + the same call": fusepy_glue(n, repeat, add, buf) / n * 1e6}


def fusepy_glue(n: int, repeat: int, add, buf) -> float:
    """Seconds of fusepy's FUSE.readdir over n names (as passthrough.py answers: names
    only), its filler a Python function that packs each entry with fuse_add_direntry
    (for real, the filler is libfuse's C function, called through ctypes)."""
    class Ops:
        def __call__(self, op, *args):
            return listing

    listing = [".", "..", *names(n - 2)]
    glue = fuse.FUSE.__new__(fuse.FUSE)
    glue.operations, glue.encoding, glue.raw_fi, glue.use_ns = Ops(), "utf-8", True, True

    zero = c_stat()  # libfuse's filler packs a zeroed stat when given none

    def fill(_, name, st, offset):
        return 0 if add(None, buf, BUFSIZE, name, st or zero, offset) else 1

    fi = fuse.fuse_file_info()
    return best(lambda: glue.readdir(b"/", None, fill, 0, ctypes.pointer(fi)), repeat)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def listing_cost(directory: str, empty: str, n: int, repeat: int, pid: int | None) -> dict:
    """µs per entry of `os.listdir`, the wall time of this process and (with a pid) the CPU
    time of that process, the full directory minus the empty one."""
    def run(path):
        cpu0, t0 = process_cpu_seconds(pid), time.perf_counter()
        for _ in range(repeat):
            if len(os.listdir(path)) not in (0, n):
                raise fs_bench.BenchError(f"{path} lists a wrong number of entries")
        return time.perf_counter() - t0, (process_cpu_seconds(pid) or 0) - (cpu0 or 0)

    run(directory)  # warm: the names are looked up once, nothing after that
    (wall_full, cpu_full), (wall_empty, cpu_empty) = run(directory), run(empty)
    out = {"client wall": (wall_full - wall_empty) / (n * repeat) * 1e6}
    if pid is not None:
        out["filesystem process CPU"] = (cpu_full - cpu_empty) / (n * repeat) * 1e6
    return out


def make_dirs(root: str, n: int) -> tuple[str, str]:
    full, empty = os.path.join(root, "full"), os.path.join(root, "empty")
    os.mkdir(full)
    os.mkdir(empty)
    for name in names(n):
        os.close(os.open(os.path.join(full, name), os.O_WRONLY | os.O_CREAT, 0o644))
    return full, empty


def measure(args, work: str) -> dict:
    out = {"in process": per_entry_in_process(args.entries, args.repeat)}
    native = os.path.join(work, "native")
    os.mkdir(native)
    out["native"] = listing_cost(*make_dirs(native, args.entries), args.entries,
                                 args.repeat, None)
    floor = fs_bench.Floor(work)
    try:
        floor.start()
        fs_bench.log(f"readdir_cost: floor mounted at {floor.mnt}")
        out["mounted floor"] = listing_cost(*make_dirs(floor.mnt, args.entries),
                                            args.entries, args.repeat, floor.proc.pid)
    finally:
        floor.stop()
    if args.find:
        out["find"] = find_cost(work)["mounted floor"]
    return out


def find_cost(work: str) -> dict:
    """µs per entry of a cold `find .` on floor.py, with and without file types."""
    import compare  # (the tree and the way it is read: compare.py's own)

    tarball = os.path.join(work, "tree.tar")
    entries, _ = compare.make_tarball(tarball, quick=False)
    out = {}
    for label, flags in (("cold find, file types in readdir", []),
                         ("cold find, no file types in readdir", ["--no-dtype"])):
        sub = os.path.join(work, f"find-{len(out)}")
        os.mkdir(sub)
        floor = fs_bench.Floor(sub)
        floor.flags = flags
        try:
            floor.start()
            subprocess.run(["tar", "xf", tarball, "-C", floor.mnt], check=True)
            floor.make_cold()
            t0 = time.perf_counter()
            compare.drain(["find", "."], floor.mnt)
            out[label] = (time.perf_counter() - t0) / entries * 1e6
        finally:
            floor.stop()
    fs_bench.log(f"readdir_cost: find over {entries:,} entries")
    return {"mounted floor": out}


def render(result: dict, args) -> str:
    lines = [f"µs per directory entry ({args.entries:,} entries, best or sum of "
             f"{args.repeat} listings)"]
    for part, figures in result.items():
        for what, value in figures.items():
            lines.append(f"  {part:<14} {what:<40} {value:8.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="readdir_cost.py",
        description="Per-entry cost of listing a directory through fusepy + libfuse 2: the "
                    "ctypes filler call in process, a mounted in-memory floor.py, and a "
                    "native directory for comparison.",
        epilog="Run as root, alone on the machine (take /tmp/fusefs-vm.lock with flock). "
               "Prints a table (or --json) to stdout. Exit status 0, 1 when the mount "
               "failed, 2 on bad usage.")
    p.add_argument("--entries", type=int, default=10_000, help="entries of the directory "
                   "(default 10000, compare.py's list row)")
    p.add_argument("--repeat", type=int, default=20, help="listings per measurement "
                   "(default 20)")
    p.add_argument("--workdir", default="/var/tmp", help="where the work directory goes "
                   "(default /var/tmp)")
    p.add_argument("--find", action="store_true", help="also time a cold `find` of "
                   "compare.py's source tree on floor.py with and without file types")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    if args.entries < 1 or args.repeat < 1:
        p.error("--entries and --repeat must be >= 1")
    if os.geteuid() != 0:
        print("readdir_cost: must run as root (the mount uses allow_other)", file=sys.stderr)
        return 2
    os.makedirs(args.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="readdir-cost-", dir=args.workdir)
    try:
        result = measure(args, work)
    except (fs_bench.BenchError, OSError) as e:
        print(f"readdir_cost: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if not fs_bench.is_mounted(os.path.join(work, "floor-mnt")):
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1) if args.json else render(result, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
