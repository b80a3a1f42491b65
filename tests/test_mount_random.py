"""A seeded random sequence of file operations, applied both to a real fusefs mount and to a
local reference directory, must leave both in the same state.

Operations: create (sometimes O_EXCL), open (sometimes O_TRUNC or O_APPEND), write at random
offsets (many straddle block boundaries or leave holes), append, read, truncate up and down
(by path and by descriptor), rename (also over an existing file), unlink (also of open
files, which stay usable through their descriptors), fsync/fdatasync, close and reopen.
Every op's outcome (value or errno) must match. Every CHECK_EVERY ops, and at the end, the
names, sizes and full contents of every file, and the contents seen through every open
descriptor, are compared; at the end the filesystem is unmounted, mounted again and
compared once more.

The sequence is drawn from the reference's state only, so a seed replays exactly. A
mismatch names the seed, the op index and the recent ops; to replay one case run
`pytest tests/test_mount_random.py -k SEED`.

Small block sizes make multi-block files cheap; one case keeps the default 1 MiB blocks.
Hard links are left out on purpose: libfuse 2 gives each name its own kernel inode, so
descriptors open through two names of one file are not coherent (docs/fuse-and-performance.md);
tests/test_mount_posix.py covers links with the cases that must work.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest

KiB = 1024
MiB = 1024 * KiB
CHECK_EVERY = 25
MAX_HANDLES = 6
NAMES = [f"f{i}" for i in range(6)] + [f"sub/g{i}" for i in range(3)]

# (seed, block size as mkfs takes it, block size in bytes, number of ops)
CASES = [
    (1101, "64KiB", 64 * KiB, 600),
    (2202, "4KiB", 4 * KiB, 600),
    (3303, "1MiB", 1 * MiB, 300),
]


@dataclass
class Handle:
    local: int
    mount: int
    append: bool
    label: str  # the name it was opened by (for the op log)


class Mismatch(AssertionError):
    pass


class Runner:
    def __init__(self, seed: int, block_size: int, local_root: str, mount_root: str):
        self.seed = seed
        self.rng = random.Random(seed)
        self.bs = block_size
        self.max_size = 12 * block_size
        self.roots = (local_root, mount_root)
        self.handles: list[Handle] = []
        self.log: list[str] = []
        self.index = -1
        self.largest = 0  # the largest file size the comparisons saw

    # -- helpers ----------------------------------------------------------------------------

    def fail(self, what: str) -> None:
        recent = "\n".join(self.log[-25:])
        raise Mismatch(f"seed={self.seed} block_size={self.bs} op={self.index}: {what}\n"
                       f"recent ops (newest last):\n{recent}")

    def note(self, text: str) -> None:
        self.log.append(f"#{self.index} {text}")

    def existing(self) -> list[str]:
        """Regular files present in the reference, sorted (drives every random choice)."""
        local = self.roots[0]
        return [n for n in NAMES if os.path.isfile(os.path.join(local, n))]

    def both(self, what: str, fn):
        """Run fn(root_or_handle_side) on the reference, then on the mount; outcomes match."""
        results = []
        for side in (0, 1):
            try:
                results.append(("ok", fn(side)))
            except OSError as e:
                results.append(("errno", e.errno))
        if results[0] != results[1]:
            self.fail(f"{what}: reference gave {results[0]!r}, mount gave {results[1]!r}")
        return results[0]

    def data(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def pick_offset(self, size: int) -> int:
        r = self.rng.random()
        if r < 0.4:  # around a block boundary
            k = self.rng.randrange(0, size // self.bs + 2)
            return max(0, k * self.bs + self.rng.randrange(-100, 100))
        if r < 0.75 and size:
            return self.rng.randrange(0, size + 1)
        return self.rng.randrange(0, self.max_size)  # often past the end: a hole

    def pick_length(self) -> int:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.randrange(1, 600)
        if r < 0.85:
            return self.rng.randrange(1, self.bs + 1)
        return self.rng.randrange(self.bs, 3 * self.bs)

    def pick_size(self, size: int) -> int:
        r = self.rng.random()
        if r < 0.15:
            return 0
        if r < 0.45:  # on or near a block boundary
            k = self.rng.randrange(0, self.max_size // self.bs + 1)
            return max(0, k * self.bs + self.rng.choice([0, 0, -1, 1, -37, 512]))
        if r < 0.75 and size:
            return self.rng.randrange(0, size)  # shrink
        return self.rng.randrange(0, self.max_size)

    @staticmethod
    def fd_of(h: Handle, side: int) -> int:
        return h.mount if side else h.local

    def path(self, side: int, name: str) -> str:
        return os.path.join(self.roots[side], name)

    def size_of(self, name: str) -> int:
        return os.stat(self.path(0, name)).st_size

    # -- operations -------------------------------------------------------------------------

    def op_create(self) -> None:
        name = self.rng.choice(NAMES)
        flags = os.O_RDWR | os.O_CREAT
        flags |= os.O_EXCL if self.rng.random() < 0.3 else os.O_TRUNC
        self._open(name, flags, "create")

    def op_open(self) -> None:
        names = self.existing()
        if not names:
            return self.op_create()
        name = self.rng.choice(names)
        flags = os.O_RDWR
        r = self.rng.random()
        if r < 0.3:
            flags = os.O_WRONLY | os.O_APPEND
        elif r < 0.4:
            flags |= os.O_TRUNC
        self._open(name, flags, "open")

    def _open(self, name: str, flags: int, verb: str) -> None:
        if len(self.handles) >= MAX_HANDLES:
            self.op_close()
        self.note(f"{verb} {name} flags={flags:#o}")
        fds = []

        def do(side):
            fd = os.open(self.path(side, name), flags, 0o644)
            fds.append(fd)
            return None

        try:
            outcome = self.both(f"{verb} {name}", do)
        except Mismatch:
            for fd in fds:
                os.close(fd)
            raise
        if outcome[0] == "ok":
            self.handles.append(Handle(fds[0], fds[1], bool(flags & os.O_APPEND), name))

    def op_close(self) -> None:
        if not self.handles:
            return
        h = self.handles.pop(self.rng.randrange(len(self.handles)))
        self.note(f"close handle of {h.label}")
        self.both("close", lambda side: os.close(self.fd_of(h, side)))

    def op_reopen(self) -> None:
        """Close a descriptor and open its name again (if it still has that name)."""
        if not self.handles:
            return
        h = self.handles[self.rng.randrange(len(self.handles))]
        self.handles.remove(h)
        self.note(f"close for reopen {h.label}")
        self.both("close", lambda side: os.close(self.fd_of(h, side)))
        if os.path.isfile(self.path(0, h.label)):
            self._open(h.label, os.O_RDWR, "reopen")

    def op_write(self) -> None:
        if not self.handles:
            return self.op_open()
        h = self.rng.choice(self.handles)
        if h.append:
            return self.op_append(h)
        size = os.lseek(h.local, 0, os.SEEK_END)
        offset = self.pick_offset(size)
        chunk = self.data(self.pick_length())
        self.note(f"pwrite {h.label} offset={offset} len={len(chunk)} (size {size})")
        self.both("pwrite", lambda side: os.pwrite(self.fd_of(h, side), chunk, offset))

    def op_append(self, h: Handle | None = None) -> None:
        if h is None:
            appenders = [x for x in self.handles if x.append]
            if not appenders:
                return self.op_open()
            h = self.rng.choice(appenders)
        chunk = self.data(self.rng.choice([1, 17, 300, self.bs // 2, self.bs + 3]))
        self.note(f"append {h.label} len={len(chunk)}")
        self.both("append", lambda side: os.write(self.fd_of(h, side), chunk))

    def op_read(self) -> None:
        readable = [h for h in self.handles if not h.append]
        if not readable:
            return
        h = self.rng.choice(readable)
        size = os.lseek(h.local, 0, os.SEEK_END)
        offset = self.pick_offset(size)
        n = self.pick_length()
        self.note(f"pread {h.label} offset={offset} len={n}")
        self.both("pread", lambda side: os.pread(self.fd_of(h, side), n, offset))

    def op_truncate(self) -> None:
        if self.handles and self.rng.random() < 0.5:
            writable = [h for h in self.handles]  # O_WRONLY|O_APPEND may ftruncate too
            h = self.rng.choice(writable)
            size = os.lseek(h.local, 0, os.SEEK_END)
            new = self.pick_size(size)
            self.note(f"ftruncate {h.label} {size} -> {new}")
            self.both("ftruncate", lambda side: os.ftruncate(self.fd_of(h, side), new))
            return
        names = self.existing()
        if not names:
            return
        name = self.rng.choice(names)
        new = self.pick_size(self.size_of(name))
        self.note(f"truncate {name} -> {new}")
        self.both(f"truncate {name}", lambda side: os.truncate(self.path(side, name), new))

    def op_rename(self) -> None:
        names = self.existing()
        if not names or self.rng.random() < 0.05:
            src = self.rng.choice(NAMES)  # maybe missing: ENOENT on both sides
        else:
            src = self.rng.choice(names)
        dst = self.rng.choice(NAMES)
        self.note(f"rename {src} -> {dst}")
        self.both(f"rename {src} {dst}",
                  lambda side: os.rename(self.path(side, src), self.path(side, dst)))

    def op_unlink(self) -> None:
        names = self.existing()
        if not names or self.rng.random() < 0.1:
            name = self.rng.choice(NAMES)
        else:
            name = self.rng.choice(names)
        self.note(f"unlink {name}")
        self.both(f"unlink {name}", lambda side: os.unlink(self.path(side, name)))

    def op_sync(self) -> None:
        if not self.handles:
            return
        h = self.rng.choice(self.handles)
        call = self.rng.choice([os.fsync, os.fdatasync])
        self.note(f"{call.__name__} {h.label}")
        self.both(call.__name__, lambda side: call(self.fd_of(h, side)))

    OPS = [("write", 30), ("append", 8), ("read", 8), ("open", 8), ("create", 6),
           ("close", 5), ("reopen", 4), ("truncate", 10), ("rename", 7), ("unlink", 5),
           ("sync", 4)]

    def step(self, index: int) -> None:
        self.index = index
        names, weights = zip(*self.OPS)
        op = self.rng.choices(names, weights)[0]
        getattr(self, f"op_{op}")()

    # -- comparison -------------------------------------------------------------------------

    def tree(self, side: int) -> set[str]:
        root = self.roots[side]
        found = set()
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for n in filenames + dirnames:
                found.add(os.path.normpath(os.path.join(rel, n)))
        return found

    def compare_bytes(self, what: str, ref: bytes, got: bytes) -> None:
        if ref == got:
            return
        if len(ref) != len(got):
            self.fail(f"{what}: size {len(got)} on the mount, {len(ref)} in the reference")
        first = next(i for i in range(len(ref)) if ref[i] != got[i])
        self.fail(f"{what}: contents differ from byte {first} (block {first // self.bs}, "
                  f"offset {first % self.bs} in it); size {len(ref)}")

    def check(self, with_handles: bool = True) -> None:
        local_tree, mount_tree = self.tree(0), self.tree(1)
        if local_tree != mount_tree:
            self.fail(f"names differ: only in reference {sorted(local_tree - mount_tree)}, "
                      f"only on mount {sorted(mount_tree - local_tree)}")
        for name in sorted(local_tree):
            ref_path, got_path = self.path(0, name), self.path(1, name)
            if os.path.isdir(ref_path):
                if not os.path.isdir(got_path):
                    self.fail(f"{name} is a directory only in the reference")
                continue
            ref_size, got_size = os.stat(ref_path).st_size, os.stat(got_path).st_size
            if ref_size != got_size:
                self.fail(f"st_size of {name}: {got_size} on the mount, {ref_size} expected")
            self.largest = max(self.largest, ref_size)
            with open(ref_path, "rb") as f:
                ref = f.read()
            with open(got_path, "rb") as f:
                got = f.read()
            self.compare_bytes(f"file {name}", ref, got)
        if with_handles:
            for h in self.handles:
                sizes = [os.lseek(fd, 0, os.SEEK_END) for fd in (h.local, h.mount)]
                if sizes[0] != sizes[1]:
                    self.fail(f"size through descriptor of {h.label}: {sizes[1]} on the mount,"
                              f" {sizes[0]} expected")
                if h.append:
                    continue  # O_WRONLY: cannot read back through it
                ref = os.pread(h.local, sizes[0] + 10, 0)
                got = os.pread(h.mount, sizes[1] + 10, 0)
                self.compare_bytes(f"descriptor of {h.label}", ref, got)

    def close_all(self) -> None:
        while self.handles:
            h = self.handles.pop()
            self.both("close", lambda side: os.close(self.fd_of(h, side)))


@pytest.mark.parametrize("seed,block_arg,block_size,ops", CASES,
                         ids=[f"seed{c[0]}-{c[1]}" for c in CASES])
def test_random_ops_match_local_directory(fusefs_mount, tmp_path, seed, block_arg,
                                          block_size, ops):
    m = fusefs_mount(mkfs=["--block-size", block_arg])
    local = tmp_path / "reference"
    local.mkdir()
    for root in (str(local), m.path):
        os.mkdir(os.path.join(root, "sub"))
    run = Runner(seed, block_size, str(local), m.path)
    try:
        for i in range(ops):
            run.step(i)
            if (i + 1) % CHECK_EVERY == 0:
                run.check()
        run.index = ops
        run.check()
        run.close_all()
        run.check()
    finally:
        for h in run.handles:  # a failed test must not keep the mount busy
            for fd in (h.local, h.mount):
                try:
                    os.close(fd)
                except OSError:
                    pass
    # The sequence really exercised multi-block files (else the test proves little).
    assert run.largest > 2 * block_size, run.largest

    m.umount()
    assert not m.mounted
    m.mount()
    run.note("remount")
    run.check(with_handles=False)
