"""A seeded model checker on a real mount (in the manner of fsx): random operations on a
few names and several descriptors per file, each result compared with an in-memory model.

The operations: open (create, O_APPEND, O_TRUNC), close, pwrite at any offset, O_APPEND
writes, lseek+read/write, pread, ftruncate and truncate by name (up and down), fstat
(size, link count, mode), fchmod, f*xattr, fsync and fdatasync, reads and writes through
MAP_SHARED mappings, unlink (also of files still open), rename (also over files still
open), and a check of a name through a fresh open. A file whose last name is gone stays
fully usable through its descriptors until the last close, and is then verified through
them. At the end every name is read again through a fresh open.

On a mismatch the test fails with the seed and the whole operation trace, which replays
the run: `FUSEFS_MODEL_SEED=S scripts/test -k model`. A soak runs many seeds and longer
runs: `FUSEFS_MODEL_SEEDS=50 FUSEFS_MODEL_OPS=10000 scripts/test -k model` (the timeout
scales with the work).
"""

from __future__ import annotations

import errno
import mmap
import os
import random

import pytest

KiB, MiB = 1 << 10, 1 << 20
NAMES = ["f0", "f1", "f2"]
MAX_SIZE = 3 * MiB
XATTR = "user.model"

SEEDS = int(os.environ.get("FUSEFS_MODEL_SEEDS", "3"))
OPS = int(os.environ.get("FUSEFS_MODEL_OPS", "1500"))
BASE = int(os.environ.get("FUSEFS_MODEL_SEED", "9100"))


class Mismatch(AssertionError):
    pass


class File:
    """The model of one inode."""

    def __init__(self, number: int):
        self.number = number
        self.data = bytearray()
        self.mode = 0o644
        self.xattr: bytes | None = None


class Model:
    """Drives one mount directory and the model side by side; `trace` replays a run."""

    def __init__(self, root: str, seed: int):
        self.root = root
        self.rng = random.Random(seed)
        self.names: dict[str, File] = {}
        self.fds: dict[int, tuple[File, bool]] = {}  # descriptor -> (file, O_APPEND)
        self.trace: list[str] = []
        self.step = 0
        self.files = 0

    # -- helpers ----------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def log(self, text: str) -> None:
        self.trace.append(f"#{self.step} {text}")

    def fail(self, what: str) -> None:
        raise Mismatch(f"MISMATCH at op #{self.step}: {what}")

    def links(self, f: File) -> int:
        return sum(1 for g in self.names.values() if g is f)

    def some_fd(self):
        return self.rng.choice(list(self.fds)) if self.fds else None

    def offset(self, f: File) -> int:
        r = self.rng.random()
        if r < 0.4:
            return self.rng.randint(0, max(len(f.data), 1))
        if r < 0.6:  # near a block boundary (the tests format with 64 KiB blocks)
            return max(0, self.rng.randint(1, MAX_SIZE // (64 * KiB)) * 64 * KiB
                       + self.rng.randint(-3, 3))
        return self.rng.randint(0, MAX_SIZE - 1)

    def length(self) -> int:
        return self.rng.choice([1, self.rng.randint(1, 4096), self.rng.randint(1, 70 * KiB),
                                self.rng.randint(1, 300 * KiB)])

    def expect(self, got: bytes, want: bytes, what: str) -> None:
        if got != want:
            first = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                         min(len(got), len(want)))
            self.fail(f"{what}: {len(got)} bytes read, {len(want)} expected; first "
                      f"difference at byte {first}")

    @staticmethod
    def write_into(f: File, offset: int, data: bytes) -> None:
        if offset > len(f.data):
            f.data.extend(bytes(offset - len(f.data)))
        f.data[offset:offset + len(data)] = data

    @staticmethod
    def resize(f: File, size: int) -> None:
        if size < len(f.data):
            del f.data[size:]
        else:
            f.data.extend(bytes(size - len(f.data)))

    # -- operations -------------------------------------------------------------------------

    def op_open(self) -> None:
        name = self.rng.choice(NAMES)
        append = self.rng.random() < 0.25
        trunc = self.rng.random() < 0.1
        flags = os.O_RDWR | os.O_CREAT | (os.O_APPEND if append else 0) | \
            (os.O_TRUNC if trunc else 0)
        f = self.names.get(name)
        if f is None:
            self.files += 1
            f = File(self.files)
        self.log(f"open {name}{' O_APPEND' if append else ''}{' O_TRUNC' if trunc else ''} "
                 f"(file#{f.number})")
        fd = os.open(self.path(name), flags, 0o644)
        self.names[name] = f
        if trunc:
            f.data.clear()
        self.fds[fd] = (f, append)
        self.log(f"  -> fd{fd}")

    def op_close(self) -> None:
        fd = self.some_fd()
        if fd is None:
            return self.op_open()
        self.op_close_fd(fd)

    def verify_through(self, fd: int, f: File, why: str) -> None:
        self.log(f"verify fd{fd} (file#{f.number}, {why})")
        st = os.fstat(fd)
        if st.st_size != len(f.data) or st.st_nlink != self.links(f):
            self.fail(f"fstat fd{fd}: size {st.st_size} nlink {st.st_nlink}, expected "
                      f"{len(f.data)} and {self.links(f)}")
        self.expect(os.pread(fd, len(f.data) + 10, 0), bytes(f.data), f"fd{fd} whole")

    def op_pwrite(self) -> None:
        fd = self.some_fd()
        if fd is None:
            return self.op_open()
        f, append = self.fds[fd]
        data = self.rng.randbytes(self.length())
        if append:  # O_APPEND: the offset is ignored, the data goes at the end
            self.log(f"append fd{fd} len={len(data)} (at {len(f.data)})")
            if len(f.data) + len(data) > MAX_SIZE:
                return
            n = os.write(fd, data)
            at = len(f.data)
        else:
            off = min(self.offset(f), MAX_SIZE - len(data))
            self.log(f"pwrite fd{fd} off={off} len={len(data)}")
            n = os.pwrite(fd, data, off)
            at = off
        if n != len(data):
            self.fail(f"short write: {n} of {len(data)}")
        self.write_into(f, at, data)

    def op_seek_write(self) -> None:
        fd = self.some_fd()
        if fd is None or self.fds[fd][1]:
            return self.op_pwrite()
        f, _ = self.fds[fd]
        data = self.rng.randbytes(self.length())
        off = min(self.offset(f), MAX_SIZE - len(data))
        self.log(f"lseek+write fd{fd} off={off} len={len(data)}")
        os.lseek(fd, off, os.SEEK_SET)
        if os.write(fd, data) != len(data):
            self.fail("short write")
        self.write_into(f, off, data)

    def op_pread(self) -> None:
        fd = self.some_fd()
        if fd is None:
            return self.op_open()
        f, _ = self.fds[fd]
        off, n = self.offset(f), self.length()
        self.log(f"pread fd{fd} off={off} len={n} (size {len(f.data)})")
        self.expect(os.pread(fd, n, off), bytes(f.data[off:off + n]), f"pread fd{fd}")

    def op_seek_read(self) -> None:
        fd = self.some_fd()
        if fd is None:
            return self.op_open()
        f, _ = self.fds[fd]
        off, n = self.offset(f), self.length()
        self.log(f"lseek+read fd{fd} off={off} len={n}")
        os.lseek(fd, off, os.SEEK_SET)
        self.expect(os.read(fd, n), bytes(f.data[off:off + n]), f"read fd{fd}")

    def op_ftruncate(self) -> None:
        fd = self.some_fd()
        if fd is None:
            return self.op_open()
        f, _ = self.fds[fd]
        size = self.offset(f)
        self.log(f"ftruncate fd{fd} {len(f.data)} -> {size}")
        os.ftruncate(fd, size)
        self.resize(f, size)

    def op_truncate(self) -> None:
        name = self.rng.choice(NAMES)
        f = self.names.get(name)
        if f is None:
            return self.op_open()
        size = self.offset(f)
        self.log(f"truncate {name} {len(f.data)} -> {size}")
        os.truncate(self.path(name), size)
        self.resize(f, size)

    def op_fstat(self) -> None:
        fd = self.some_fd()
        if fd is None:
            return self.op_open()
        f, _ = self.fds[fd]
        st = os.fstat(fd)
        self.log(f"fstat fd{fd} size={st.st_size} nlink={st.st_nlink} (model {len(f.data)}, "
                 f"{self.links(f)})")
        if (st.st_size, st.st_nlink, st.st_mode & 0o7777) != \
                (len(f.data), self.links(f), f.mode):
            self.fail(f"fstat fd{fd}: size {st.st_size} nlink {st.st_nlink} mode "
                      f"{st.st_mode & 0o7777:o}, expected {len(f.data)}, {self.links(f)}, "
                      f"{f.mode:o}")

    def op_fchmod(self) -> None:
        fd = self.some_fd()
        if fd is None:
            return self.op_open()
        f, _ = self.fds[fd]
        mode = self.rng.choice([0o600, 0o644, 0o640, 0o755])
        self.log(f"fchmod fd{fd} {mode:o}")
        os.fchmod(fd, mode)
        f.mode = mode

    def op_xattr(self) -> None:
        fd = self.some_fd()
        if fd is None:
            return self.op_open()
        f, _ = self.fds[fd]
        if self.rng.random() < 0.5:
            value = self.rng.randbytes(self.rng.randint(0, 300))
            self.log(f"fsetxattr fd{fd} len={len(value)}")
            os.setxattr(fd, XATTR, value)
            f.xattr = value
            return
        self.log(f"fgetxattr fd{fd}")
        try:
            got = os.getxattr(fd, XATTR)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
            got = None
        if got != f.xattr:
            self.fail(f"fgetxattr fd{fd}: {got!r:.40} expected {f.xattr!r:.40}")

    def op_sync(self) -> None:
        fd = self.some_fd()
        if fd is None:
            return self.op_open()
        call = self.rng.choice([os.fsync, os.fdatasync])
        self.log(f"{call.__name__} fd{fd}")
        call(fd)

    def op_mmap(self) -> None:
        fd = self.some_fd()
        if fd is None:
            return self.op_open()
        f, _ = self.fds[fd]
        if len(f.data) < 1:
            return
        start = self.rng.randrange(0, len(f.data)) // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(f.data), start + self.rng.randint(1, 200 * KiB))
        writing = self.rng.random() < 0.5
        self.log(f"map{'write' if writing else 'read'} fd{fd} off={start} len={end - start}")
        with mmap.mmap(fd, end - start, mmap.MAP_SHARED, offset=start) as mm:
            if writing:
                data = self.rng.randbytes(self.rng.randint(1, end - start))
                at = self.rng.randint(0, end - start - len(data))
                mm[at:at + len(data)] = data
                mm.flush()
                self.write_into(f, start + at, data)
            else:
                self.expect(mm[:], bytes(f.data[start:end]), f"mapped fd{fd}")

    def op_unlink(self) -> None:
        name = self.rng.choice(NAMES)
        if name not in self.names:
            return self.op_open()
        f = self.names.pop(name)
        self.log(f"unlink {name} (file#{f.number}, "
                 f"{sum(1 for g, _ in self.fds.values() if g is f)} fds open)")
        os.unlink(self.path(name))

    def op_rename(self) -> None:
        src, dst = self.rng.sample(NAMES, 2)
        if src not in self.names:
            return self.op_open()
        f = self.names.pop(src)
        over = self.names.get(dst)
        self.log(f"rename {src} -> {dst} (file#{f.number}"
                 f"{f' over file#{over.number}' if over else ''})")
        os.rename(self.path(src), self.path(dst))
        self.names[dst] = f

    def op_check(self) -> None:
        name = self.rng.choice(NAMES)
        f = self.names.get(name)
        self.log(f"check {name} via fresh open (size {len(f.data) if f else None})")
        try:
            fd = os.open(self.path(name), os.O_RDONLY)
        except FileNotFoundError:
            if f is not None:
                self.fail(f"open {name}: ENOENT, but the name exists (file#{f.number})")
            return
        try:
            if f is None:
                self.fail(f"open {name} succeeded, but the name does not exist")
            self.expect(os.pread(fd, len(f.data) + 10, 0), bytes(f.data), f"{name} whole")
        finally:
            os.close(fd)

    def op_listdir(self) -> None:
        got = sorted(os.listdir(self.root))
        self.log(f"listdir -> {got}")
        if got != sorted(self.names):
            self.fail(f"listdir: {got}, expected {sorted(self.names)}")

    OPS = [("op_open", 6), ("op_close", 6), ("op_pwrite", 10), ("op_seek_write", 3),
           ("op_pread", 8), ("op_seek_read", 3), ("op_ftruncate", 3), ("op_truncate", 2),
           ("op_fstat", 5), ("op_fchmod", 2), ("op_xattr", 2), ("op_sync", 2), ("op_mmap", 3),
           ("op_unlink", 3), ("op_rename", 3), ("op_check", 4), ("op_listdir", 1)]

    def run(self, count: int) -> None:
        names, weights = zip(*self.OPS)
        for self.step in range(1, count + 1):
            if len(self.fds) > 8:
                self.op_close()
                continue
            op = getattr(self, self.rng.choices(names, weights)[0])
            try:
                op()
            except OSError as e:
                self.fail(f"operation failed: {self.trace[-1]} -> "
                          f"{errno.errorcode.get(e.errno, e.errno)}")
        self.finish()

    def finish(self) -> None:
        self.step += 1
        for fd in list(self.fds):
            self.op_close_fd(fd)
        for name in NAMES:
            self.log(f"final check {name}")
            f = self.names.get(name)
            if f is None:
                if os.path.exists(self.path(name)):
                    self.fail(f"{name} exists, but was removed")
                continue
            with open(self.path(name), "rb") as fh:
                self.expect(fh.read(), bytes(f.data), f"final {name}")
        self.op_listdir()

    def op_close_fd(self, fd: int) -> None:
        f, _ = self.fds.pop(fd)
        if not self.links(f) and not any(g is f for g, _ in self.fds.values()):
            self.verify_through(fd, f, "last descriptor of a file with no name")
        self.log(f"close fd{fd} (file#{f.number})")
        os.close(fd)


@pytest.fixture
def model_mount(fusefs_mount):
    return fusefs_mount(mkfs=["--block-size", "64KiB"])


@pytest.mark.timeout(max(300, SEEDS * OPS // 5))
def test_random_operations_match_the_model(model_mount):
    m = model_mount
    for i in range(SEEDS):
        seed = BASE + i
        root = os.path.join(m.path, f"seed{seed}")
        os.mkdir(root)
        model = Model(root, seed)
        try:
            model.run(OPS)
        except Mismatch as e:
            trace = "\n".join(model.trace[-60:])
            raise AssertionError(f"seed {seed} (FUSEFS_MODEL_SEED={seed}): {e}\n"
                                 f"last operations:\n{trace}") from None
        finally:
            for fd in model.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        # Nothing hidden stays behind: the directory is empty once its names are gone.
        for name in list(model.names):
            os.unlink(os.path.join(root, name))
        os.rmdir(root)
