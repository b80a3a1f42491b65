"""Crash consistency of a real mount: kill -9 of the client at random moments, in the manner
of ALICE and CrashMonkey (a workload that records what it made durable, a crash, a check of
the recovered state against that record).

What the design promises (fusefs/journal.py, fusefs/flusher.py, docs/filesystem.md):

- Every metadata change is one SQLite transaction that also appends a journal record;
  records are numbered without gaps and shipped to the block servers in order, in
  segments that are each written whole. A mount on another machine (an empty
  --cache-dir) loads the newest checkpoint and replays the shipped records after it, so it
  sees a *prefix* of the writer's changes. A mount on the same machine with the same
  --cache-dir reuses the local database, which holds every committed transaction, so a
  process crash loses no metadata change at all there.
- File data is uploaded asynchronously. A block map change (`commit_blocks`, which also
  persists the size) is recorded only once the new block is on W servers, and a block is
  deleted only once the record that dropped it is durable: no record can reference a block
  that is missing, so nothing ever reads as EIO after a crash.
- fsync of a file waits for its dirty blocks, then for every record so far to be shipped;
  fsync of a directory waits for every record. So a file whose fsync and whose
  directory's fsync both returned survives any crash of the client, with its exact bytes
  and attributes.

The tests:

1. `test_random_workload_survives_repeated_kill_9` - a writer subprocess runs a seeded random
   workload on the mount: files of random sizes (some over 1 MiB, on 64 KiB blocks, so they
   span many blocks), partial overwrites, appends (O_APPEND), truncations, holes, renames
   (also over existing files and of directories), deletes, symlinks and subdirectories.
   Files it is done with go to `final/<round>/...` (written in place, or written aside and
   renamed over a name that may already exist) and are never touched again; once a file's
   fsync and its directory's fsync have returned, its path, size, sha256, mode, xattr and
   mtime are appended to a manifest *outside* the mount, which is fsynced too. Everything
   under `churn/` is changed over and over and is never in the manifest. At a seeded
   random moment the daemon is killed with SIGKILL (then the writer). Before remounting,
   `fusefs fsck --json` must find the state a new mount would load clean; then the
   filesystem is mounted again - with the same cache directory, with a fresh empty one
   (as on another machine), or with an older one whose metadata is stale - and every
   manifest entry must be there, exact, and every name in the tree must be readable to the
   end without an error. The rounds run on the same filesystem, so state (and the debris
   of earlier crashes) accumulates; each round has its own seed.

   Rounds: FUSEFS_CRASH_ROUNDS (default 6, 40-50 s on a small machine); a soak run
   sets it to 50 or more. FUSEFS_CRASH_SEED changes the base seed (default 1207); round r
   uses seed base * 1000 + r, and every failure message names the round and its seed.
   Timing still varies from run to run, so a seed replays the workload, not the moment of
   the kill.

2. `test_server_killed_while_shipping_then_client_killed` - R=3, W=2: one block server is
   killed with SIGKILL while the writer is fsyncing continuously (journal segments and data
   blocks in flight). The application sees no error, its fsyncs keep returning, and after a
   kill -9 of the client, a remount with an empty cache directory (the dead server still
   down) has every fsynced file intact.

3. `test_unsynced_creates_survive_as_a_prefix` - files 000001, 000002, ... are created in
   order and written, never fsynced; the client is killed while they keep coming. What may
   be asserted, and is:
   - the names form a prefix in creation order (records are shipped in order, and replay
     stops at the first segment that does not exist; a crash cannot leave a gap);
   - with an empty cache directory, at least the creates shipped before the kill are there
     (the kill comes once the daemon reports 60 of the writer's records shipped and at
     least 20 more waiting, so the crash practically always cuts the journal short); with
     the same cache directory every create that returned before the kill is there (the
     local database keeps every committed transaction: the writer is paused for longer
     than the 10 ms group commit before that kill, since a kill may lose the last group);
   - no name is invented: the prefix ends at most one file after the last one the writer
     finished (the create of the next one may have committed before the kill);
   - contents: a file's data may be missing in part or in whole - its blocks are uploaded
     after close, asynchronously, and each block map change is a record of its own that may
     or may not have been shipped. But the size a block map change records never covers a
     block that is still dirty, so a file always reads as a prefix of what was written (the
     writer writes each file front to back): never zeros that were never written, never
     bytes of another file or block, never EIO.

The random workload of 1 also writes files it never fsyncs (`final/.../u...`): their
content is a function of their name, and after every crash each one that exists must be a
prefix of it. Its finished files are made durable with fsync or, now and then, fdatasync.

Every test uses real processes and real SIGKILL, polls with `wait_until` and never
asserts a duration. Writers are killed and mounts unmounted at teardown even on failure.
The writer is this very module run as `python -m tests.test_crash_consistency MODE ...`.

What the tests catch was checked against deliberately broken copies of fusefs: fsync not
waiting for the journal (1 and 2 fail), replay dropping a record (3 fails: a gap), a mount
that never reuses its local database (3 with the same cache fails: committed creates
lost). Garbage collection deleting blocks before the record that dropped them is shipped
is caught by 1 only now and then (in two trials, at rounds 12 and 24): its window is the
fraction of a second between two shipments, which is why a soak run does many rounds.
The daemon logs of every cache directory a mount used are checked by the fusefs_mount
fixture's log policy (an ERROR line or a traceback fails the test).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import traceback

import pytest

from .support import REPO, alive, read_through, wait_until

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB  # the block size the tests format with
SMALL_BLOCKS = ["--block-size", "64KiB"]
GONE = (errno.ENOTCONN, errno.ECONNABORTED)  # what a writer sees once the daemon is dead
EXIT_DAEMON_GONE = 3  # the writer's exit status when the mount's daemon died under it
XATTR = "user.crash"


# =============================================================================================
# The writer: runs in its own process, on the mounted directory
# =============================================================================================

def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data, offset: int, rng: random.Random) -> None:
    """Write `data` at `offset` in chunks of random sizes (so writes straddle blocks)."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        want = rng.choice([1, 4095, 4096, 60 * KiB, 64 * KiB, 100 * KiB, 128 * KiB])
        pos += os.pwrite(fd, view[pos:pos + want], offset + pos)


def seq_content(seed: int, i: int) -> bytes:
    """What file number i of the prefix test holds (a function of seed and i only)."""
    rng = random.Random(f"prefix/{seed}/{i}")
    r = rng.random()
    if r < 0.1:
        size = 0
    elif r < 0.7:
        size = rng.randint(1, 16 * KiB)
    elif r < 0.95:
        size = rng.randint(16 * KiB, 4 * BS + 1000)
    else:
        size = rng.randint(MiB, MiB + 5 * BS)
    return rng.randbytes(size)


def unsynced_content(rel: str) -> bytes:
    """What the never-fsynced file at `rel` (under the mount) was written with: a function
    of its unique name only, so the checker needs no record of it. No zero bytes in it,
    so a hole read back as zeros can never pass for written data."""
    rng = random.Random(f"unsynced/{rel}")
    size = rng.choice([rng.randint(1, 8 * KiB), rng.randint(BS, 6 * BS + 7),
                       rng.randint(MiB, MiB + 3 * BS)])
    return rng.randbytes(size).replace(b"\0", b"\1")


class RandomWorkload:
    """The random workload of tests 1 and 2 (see the module docstring)."""

    def __init__(self, root: str, manifest: str, progress: str, seed: int, tag: str):
        self.rng = random.Random(seed)
        self.root = root
        self.final = os.path.join(root, "final", tag)
        self.churn = os.path.join(root, "churn")
        self.tag = tag
        self.manifest = open(manifest, "a")
        self.progress_fd = os.open(progress, os.O_WRONLY | os.O_CREAT, 0o644)
        self.ops = 0
        self.counter = 0
        self.final_dirs = [self.final]
        self.files: list[str] = []  # churn files (absolute paths): found at start, then tracked
        self.links: list[str] = []  # churn symlinks
        self.dirs: list[str] = []  # churn subdirectories (not churn itself)

    # -- set-up ----------------------------------------------------------------------------

    def mkdir(self, path: str) -> None:
        """A directory whose name is durable (its parent fsynced)."""
        os.mkdir(path)
        fsync_dir(os.path.dirname(path))

    def start(self) -> None:
        for path in (os.path.join(self.root, "final"), self.churn):
            if not os.path.isdir(path):
                self.mkdir(path)
        self.mkdir(self.final)
        # What earlier rounds (and their crashes) left in churn/ is churned further.
        for dirpath, dirnames, filenames in os.walk(self.churn):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    self.links.append(path)
                elif os.path.isdir(path):
                    self.dirs.append(path)
                else:
                    self.files.append(path)

    def new_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.tag}-{self.counter}"

    def size(self, big: float = 0.2) -> int:
        r = self.rng.random()
        if r < 0.1:
            return 0
        if r < 0.45:
            return self.rng.randint(1, 8 * KiB)
        if r < 1 - big:
            return self.rng.randint(8 * KiB, 5 * BS + 100)
        return self.rng.randint(MiB + 1, 2 * MiB + 3 * BS)  # spans 17 to 35 blocks

    def record(self, path: str, content, mode: int, xattr: bytes | None,
               mtime_ns: int | None) -> None:
        """The file is durable: add it to the manifest (outside the mount), durably."""
        rel = os.path.relpath(path, self.root)
        line = " ".join([rel, str(len(content)), hashlib.sha256(content).hexdigest(),
                         f"{mode:o}", xattr.hex() if xattr is not None else "-",
                         str(mtime_ns) if mtime_ns is not None else "-"])
        self.manifest.write(line + "\n")
        self.manifest.flush()
        os.fsync(self.manifest.fileno())

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Phases: a few files made durable, then a burst of churn with no fsync at all,
        sometimes after a pause in which the daemon's background work runs on its own
        (a kill then lands among changes that are not shipped yet), and so on."""
        final = [(self.final_direct, 4), (self.final_replace, 3), (self.final_mkdir, 1),
                 (self.final_unsynced, 2)]
        churn = [(self.churn_create, 3), (self.churn_overwrite, 2), (self.churn_append, 2),
                 (self.churn_truncate, 1), (self.churn_rename, 2), (self.churn_delete, 2),
                 (self.churn_mkdir, 1), (self.churn_rmdir, 1), (self.churn_rename_dir, 1),
                 (self.churn_symlink, 1)]
        while True:
            if self.rng.random() < 0.4:
                phase, n = final, self.rng.randint(1, 4)
            else:
                phase, n = churn, self.rng.randint(2, 20)
                if self.rng.random() < 0.2:  # idle: uploads, shipping, garbage collection
                    time.sleep(self.rng.uniform(0.1, 1.2))
            funcs, weights = zip(*phase)
            for _ in range(n):
                if phase is churn and len(self.files) > 40:
                    op = self.rng.choice([self.churn_delete, self.churn_truncate])
                else:
                    op = self.rng.choices(funcs, weights)[0]
                op()
                self.ops += 1
                os.pwrite(self.progress_fd, f"{self.ops:012d}\n".encode(), 0)

    # -- files that end in the manifest ----------------------------------------------------

    def mutate(self, path: str, fd: int, content: bytearray) -> int:
        """Overwrite, append, truncate, extend or write past the end, a few times, some of
        them after closing and opening again (the blocks are clean then: read, merge)."""
        rng = self.rng
        for _ in range(rng.randint(0, 3)):
            if rng.random() < 0.5:
                os.close(fd)
                fd = os.open(path, rng.choice([os.O_WRONLY, os.O_RDWR]))
            kind = rng.choice(["overwrite", "append", "truncate", "extend", "hole"])
            if kind == "overwrite":
                off = rng.randint(0, len(content))
                data = rng.randbytes(rng.randint(1, 3 * BS))
                pwrite_all(fd, data, off, rng)
                content[off:off + len(data)] = data
            elif kind == "append":
                data = rng.randbytes(rng.randint(1, 3 * BS))
                app = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    view = memoryview(data)
                    pos = 0
                    while pos < len(data):
                        pos += os.write(app, view[pos:pos + rng.choice([1000, 64 * KiB])])
                finally:
                    os.close(app)
                content += data
            elif kind == "truncate":
                new = rng.randint(0, len(content))
                os.ftruncate(fd, new)
                del content[new:]
            elif kind == "extend":
                new = len(content) + rng.randint(1, 3 * BS)
                os.ftruncate(fd, new)
                content += bytes(new - len(content))
            else:
                off = len(content) + rng.randint(1, 2 * BS)
                data = rng.randbytes(rng.randint(1, BS))
                pwrite_all(fd, data, off, rng)
                content += bytes(off - len(content)) + data
        return fd

    def finish(self, path: str, fd: int, content) -> None:
        """Attributes, fsync of the file and of its directory, then the manifest."""
        rng = self.rng
        mode = 0o644
        if rng.random() < 0.4:
            mode = rng.choice([0o600, 0o640, 0o755, 0o444, 0o700])
            os.chmod(path, mode)
        xattr = None
        if rng.random() < 0.3:
            xattr = rng.randbytes(rng.randint(0, 200))
            os.setxattr(path, XATTR, xattr)
        mtime = None
        if rng.random() < 0.3:
            mtime = 1_400_000_000 * 10**9 + rng.randrange(10**17)
            os.utime(path, ns=(mtime, mtime))
        (os.fdatasync if rng.random() < 0.3 else os.fsync)(fd)
        os.close(fd)
        fsync_dir(os.path.dirname(path))
        self.record(path, content, mode, xattr, mtime)

    def final_direct(self) -> None:
        path = os.path.join(self.rng.choice(self.final_dirs), self.new_name("f"))
        content = bytearray(self.rng.randbytes(self.size()))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        pwrite_all(fd, content, 0, self.rng)
        fd = self.mutate(path, fd, content)
        self.finish(path, fd, content)

    def final_replace(self) -> None:
        """The atomic-replace pattern: write aside, fsync, rename over the name, fsync the
        directories. The name may exist already (an older version, synced or not)."""
        rng = self.rng
        path = os.path.join(rng.choice(self.final_dirs), self.new_name("r"))
        if rng.random() < 0.6:
            with open(path, "wb") as f:
                f.write(rng.randbytes(self.size(big=0.1)))
                if rng.random() < 0.5:
                    f.flush()
                    os.fsync(f.fileno())
        aside = os.path.join(rng.choice([self.churn, os.path.dirname(path)]),
                             self.new_name(".tmp-"))
        content = bytearray(rng.randbytes(self.size()))
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        pwrite_all(fd, content, 0, rng)
        fd = self.mutate(aside, fd, content)
        os.fsync(fd)
        os.rename(aside, path)
        if os.path.dirname(aside) != os.path.dirname(path):
            fsync_dir(os.path.dirname(aside))
        self.finish(path, fd, content)  # fd still refers to the renamed file

    def final_unsynced(self) -> None:
        """A file written front to back and closed, never fsynced and never touched again:
        after a crash it is absent or a prefix of `unsynced_content` (never a size that
        runs ahead of its data, never bytes that were never written)."""
        path = os.path.join(self.rng.choice(self.final_dirs), self.new_name("u"))
        content = unsynced_content(os.path.relpath(path, self.root))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(content)
            pos = 0
            while pos < len(view):  # appends of random sizes, as a log or a download
                pos += os.write(fd, view[pos:pos + self.rng.choice([4096, 60 * KiB, 200 * KiB])])
                if self.rng.random() < 0.05:
                    time.sleep(self.rng.uniform(0, 0.3))  # the flusher may run meanwhile
        finally:
            os.close(fd)

    def final_mkdir(self) -> None:
        path = os.path.join(self.rng.choice(self.final_dirs), self.new_name("d"))
        self.mkdir(path)
        self.final_dirs.append(path)

    # -- churn: never in the manifest ------------------------------------------------------

    def churn_dir(self) -> str:
        return self.rng.choice([self.churn, self.churn, *self.dirs])

    def churn_create(self) -> None:
        path = os.path.join(self.churn_dir(), self.new_name("c"))
        with open(path, "wb") as f:
            f.write(self.rng.randbytes(self.size(big=0.1)))
            if self.rng.random() < 0.3:
                f.flush()
                os.fsync(f.fileno())
        self.files.append(path)

    def churn_overwrite(self) -> None:
        if not self.files:
            return self.churn_create()
        path = self.rng.choice(self.files)
        fd = os.open(path, os.O_WRONLY | (os.O_TRUNC if self.rng.random() < 0.3 else 0))
        try:
            size = os.fstat(fd).st_size
            pwrite_all(fd, self.rng.randbytes(self.rng.randint(1, 3 * BS)),
                       self.rng.randint(0, size), self.rng)
        finally:
            os.close(fd)

    def churn_append(self) -> None:
        if not self.files:
            return self.churn_create()
        with open(self.rng.choice(self.files), "ab") as f:
            f.write(self.rng.randbytes(self.rng.randint(1, 2 * BS)))

    def churn_truncate(self) -> None:
        if not self.files:
            return
        path = self.rng.choice(self.files)
        os.truncate(path, self.rng.randint(0, os.stat(path).st_size + BS))

    def churn_rename(self) -> None:
        if not self.files:
            return
        src = self.rng.choice(self.files)
        if len(self.files) > 1 and self.rng.random() < 0.4:  # over an existing file
            dst = self.rng.choice([f for f in self.files if f != src])
            self.files.remove(dst)
        else:
            dst = os.path.join(self.churn_dir(), self.new_name("m"))
        os.rename(src, dst)
        self.files[self.files.index(src)] = dst

    def churn_delete(self) -> None:
        pool = self.files + self.links
        if not pool:
            return
        path = self.rng.choice(pool)
        os.unlink(path)
        (self.files if path in self.files else self.links).remove(path)

    def churn_mkdir(self) -> None:
        path = os.path.join(self.churn_dir(), self.new_name("s"))
        os.mkdir(path)
        self.dirs.append(path)

    def inside(self, directory: str) -> list[str]:
        return [p for p in self.files + self.links + self.dirs
                if p.startswith(directory + "/")]

    def churn_rmdir(self) -> None:
        empty = [d for d in self.dirs if not self.inside(d)]
        if empty:
            path = self.rng.choice(empty)
            os.rmdir(path)
            self.dirs.remove(path)

    def churn_rename_dir(self) -> None:
        if not self.dirs:
            return
        src = self.rng.choice(self.dirs)
        dst = os.path.join(self.churn, self.new_name("s"))
        os.rename(src, dst)
        for pool in (self.files, self.links, self.dirs):
            pool[:] = [dst + p[len(src):] if p == src or p.startswith(src + "/") else p
                       for p in pool]

    def churn_symlink(self) -> None:
        path = os.path.join(self.churn_dir(), self.new_name("l"))
        target = self.rng.choice(self.files) if self.files and self.rng.random() < 0.7 \
            else "dangling/" + self.new_name("x")
        os.symlink(target, path)
        self.links.append(path)


def run_prefix_writer(root: str, progress: str, seed: int) -> None:
    """Create seq/000001, seq/000002, ... in order, each written and closed, no fsync."""
    progress_fd = os.open(progress, os.O_WRONLY | os.O_CREAT, 0o644)
    i = 0
    while True:
        i += 1
        data = seq_content(seed, i)
        fd = os.open(os.path.join(root, "seq", f"{i:06d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o644)
        view = memoryview(data)
        pos = 0
        while pos < len(data):  # pieces of 48 KiB: not aligned to the blocks
            pos += os.write(fd, view[pos:pos + 48 * KiB])
        os.close(fd)
        os.pwrite(progress_fd, f"{i:012d}\n".encode(), 0)


def writer_main(argv: list[str]) -> int:
    mode, root, manifest, progress, seed, tag = argv
    os.umask(0o022)  # the manifest's modes assume it
    try:
        if mode == "random":
            workload = RandomWorkload(root, manifest, progress, int(seed), tag)
            workload.start()
            workload.run()
        else:
            run_prefix_writer(root, progress, int(seed))
    except OSError as e:
        if e.errno in GONE:
            return EXIT_DAEMON_GONE  # the daemon was killed: the test's doing
        traceback.print_exc()
        return 1
    except BaseException:  # noqa: BLE001 - anything else is a failure the test reports
        traceback.print_exc()
        return 1
    return 0


# =============================================================================================
# The tests
# =============================================================================================

class Writer:
    """One writer subprocess (this module run with -m); its stderr is kept in a file."""

    def __init__(self, tmp_path, name: str, mode: str, root: str, seed: int, tag: str,
                 manifest: str):
        self.name = name
        self.progress_path = str(tmp_path / f"{name}.progress")
        self.stderr_path = str(tmp_path / f"{name}.stderr")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.test_crash_consistency", mode, root, manifest,
                 self.progress_path, str(seed), tag],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def progress(self) -> int:
        try:
            with open(self.progress_path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return 0
        return int(text) if text else 0

    def stderr(self) -> str:
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def healthy(self) -> None:
        """Fail unless the writer is still running: it exits only on an error."""
        code = self.proc.poll()
        if code is not None:
            pytest.fail(f"writer {self.name} exited with {code} while the mount was alive "
                        f"(an operation failed):\n{self.stderr()[-4000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def check_after_crash(self) -> None:
        """Killed by us, or stopped by ENOTCONN once the daemon was dead: nothing else."""
        assert self.proc.returncode in (-signal.SIGKILL, EXIT_DAEMON_GONE), (
            f"writer {self.name} failed (exit {self.proc.returncode}):\n"
            f"{self.stderr()[-4000:]}")


@pytest.fixture
def writers(tmp_path):
    """Factory for Writer processes; every one is killed at teardown, whatever happened."""
    started: list[Writer] = []

    def start(*args, **kwargs) -> Writer:
        w = Writer(tmp_path, *args, **kwargs)
        started.append(w)
        return w

    try:
        yield start
    finally:
        for w in started:
            try:
                w.kill()
            except Exception:  # noqa: BLE001 - kill the others all the same
                pass


def crash(m, writer: Writer | None = None) -> None:
    """kill -9 of the daemon (the crash), then of the writer, then detach the dead mount.

    The daemon dies first, so the writer meets the crash in the middle of whatever it was
    doing; it is killed before the mountpoint is detached, so it never sees the empty
    directory underneath (its paths would fail with ENOENT there)."""
    from fusefs.mounts import unmount

    pid = m.daemon_pid()
    assert pid and alive(pid), "no daemon to kill"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), "the killed daemon to die")
    if writer is not None:
        writer.kill()
    unmount(m.path, lazy=True)
    wait_until(lambda: not m.mounted, "the dead mount to be detached")


def fsck(m) -> dict:
    """`fusefs fsck --json`; fails unless the report is clean (warnings are allowed)."""
    result = m.cli("fsck", *m.cluster_args(), "--json", check=False)
    assert result.returncode in (0, 1), f"fsck could not run:\n{result.stderr}"
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["clean"] and not report["errors"], (
        f"fsck found problems:\n{json.dumps(report, indent=1)}")
    return report


def read_manifest(path: str) -> dict[str, dict]:
    """rel path -> what was made durable. A line cut short by the kill is not an entry."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    entries = {}
    for line in text.split("\n")[:-1]:
        rel, size, sha, mode, xattr, mtime = line.split(" ")
        assert rel not in entries, f"the writer recorded {rel} twice"
        entries[rel] = {"size": int(size), "sha256": sha, "mode": int(mode, 8),
                        "xattr": None if xattr == "-" else bytes.fromhex(xattr),
                        "mtime_ns": None if mtime == "-" else int(mtime)}
    return entries


def drop_cut_line(path: str) -> None:
    """Before the next writer appends: remove a manifest line a kill cut short, if any
    (it is not an entry, and must not run into the next one)."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def walk_everything(root: str) -> tuple[dict[str, str], list[str]]:
    """Read every name in the tree: (rel path -> sha256 of each regular file, problems).

    Any error is a problem: after a crash no name may point at a missing inode and no file
    at a missing block (EIO)."""
    digests, problems = {}, []

    def fail(path, e):
        problems.append(f"{os.path.relpath(path, root)}: {e.__class__.__name__} "
                        f"{errno.errorcode.get(getattr(e, 'errno', None), '')} {e}")

    def on_error(e):
        fail(e.filename or root, e)

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    os.readlink(path)
                elif stat.S_ISREG(st.st_mode):
                    data = read_through(path)
                    if len(data) != st.st_size:
                        problems.append(f"{os.path.relpath(path, root)}: read {len(data)} "
                                        f"bytes, stat says {st.st_size}")
                    digests[os.path.relpath(path, root)] = hashlib.sha256(data).hexdigest()
                elif not stat.S_ISDIR(st.st_mode):
                    problems.append(f"{os.path.relpath(path, root)}: unexpected type "
                                    f"{stat.filemode(st.st_mode)}")
            except OSError as e:
                fail(path, e)
    return digests, problems


def check_manifest(root: str, manifest: dict[str, dict], digests: dict[str, str]) -> list[str]:
    """Every durable file is there with its exact bytes and attributes."""
    problems = []
    for rel, want in sorted(manifest.items()):
        path = os.path.join(root, rel)
        if rel not in digests:
            state = "unreadable" if os.path.lexists(path) else "missing"
            problems.append(f"{rel}: fsynced, now {state}")
            continue
        st = os.stat(path)
        if st.st_size != want["size"] or digests[rel] != want["sha256"]:
            problems.append(f"{rel}: size {st.st_size}, want {want['size']}; content "
                            f"{'same' if digests[rel] == want['sha256'] else 'differs'}")
        if stat.S_IMODE(st.st_mode) != want["mode"]:
            problems.append(f"{rel}: mode {stat.S_IMODE(st.st_mode):o}, want {want['mode']:o}")
        if want["mtime_ns"] is not None and st.st_mtime_ns != want["mtime_ns"]:
            problems.append(f"{rel}: mtime {st.st_mtime_ns}, want {want['mtime_ns']}")
        if want["xattr"] is not None:
            try:
                got = os.getxattr(path, XATTR)
            except OSError as e:
                got = f"error {e}"
            if got != want["xattr"]:
                problems.append(f"{rel}: xattr {got!r:.60}, want {want['xattr']!r:.60}")
    return problems


def check_unsynced(root: str, digests: dict[str, str]) -> list[str]:
    """Every never-fsynced file under final/ is a prefix of what was written to it."""
    problems = []
    for rel in digests:
        if rel.startswith("final/") and re.fullmatch(r"u\S*-\d+", os.path.basename(rel)):
            got = read_through(os.path.join(root, rel))
            want = unsynced_content(rel)
            if got != want[:len(got)]:
                problems.append(f"{rel}: {len(got)} bytes (of {len(want)} written), not a "
                                f"prefix of what was written ({got.count(0)} zero bytes)")
    return problems


def verify(m, manifest_path: str, where: str) -> int:
    """Everything readable, every manifest entry exact. Returns the number of entries."""
    manifest = read_manifest(manifest_path)
    digests, problems = walk_everything(m.path)
    problems += check_manifest(m.path, manifest, digests)
    problems += check_unsynced(m.path, digests)
    assert not problems, (f"{where}: {len(problems)} problems ({len(manifest)} fsynced files, "
                          f"{len(digests)} files in the tree):\n" + "\n".join(problems[:30]))
    return len(manifest)


def daemon_status(m) -> dict:
    """The running daemon's status report (what `fusefs status --json` shows; rewritten
    every second). Read from the file directly: polling it must be cheap."""
    from fusefs.mounts import read_registry

    record = read_registry(m.path)
    try:
        with open(record["status"]) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):  # not written yet, or being replaced
        return {"time": 0.0, "journal": {"seq": 0, "shipped": 0}}


def committed_seq(m) -> int:
    """The newest journal record committed to the daemon's local database (read-only: an
    open group is invisible; shipped records are dropped, the setting keeps their end)."""
    from fusefs.mounts import read_registry

    path = os.path.join(read_registry(m.path)["state_dir"], "metadata.db")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        shipped = db.execute("SELECT value FROM settings WHERE key = 'shipped'").fetchone()
        newest = db.execute("SELECT max(seq) FROM journal").fetchone()[0]
        return max(int(shipped[0]) if shipped else 0, newest or 0)
    finally:
        db.close()


def all_committed(m, since: float) -> bool:
    """True once a status report written after `since` names a newest record that the
    local database has committed (a poll: the writer is paused, nothing new comes)."""
    status = daemon_status(m)
    return status["time"] > since and committed_seq(m) >= status["journal"]["seq"]


# -- 1. the random workload, killed again and again ----------------------------------------

ROUNDS = int(os.environ.get("FUSEFS_CRASH_ROUNDS", "6"))


@pytest.mark.timeout(max(300, 60 * ROUNDS))  # a soak sets many rounds: its own time limit
def test_random_workload_survives_repeated_kill_9(fusefs_mount, writers, tmp_path):
    rounds = ROUNDS
    base = int(os.environ.get("FUSEFS_CRASH_SEED", "1207"))
    m = fusefs_mount(mkfs=SMALL_BLOCKS)
    manifest = str(tmp_path / "manifest")
    caches = [m.cache_dir]  # every cache directory used, oldest first
    current = m.cache_dir
    history = []
    for r in range(rounds):
        seed = base * 1000 + r
        rng = random.Random(seed)
        where = f"round {r} (seed {seed}, FUSEFS_CRASH_SEED={base}; history {history})"
        drop_cut_line(manifest)
        writer = writers(f"writer{r}", "random", m.path, seed, f"r{r:03d}", manifest)
        # The kill comes after a random number of operations plus a random delay, so it
        # lands anywhere: in a write, an fsync, a rename, a journal shipment...
        ops = rng.randint(2, 60)
        wait_until(lambda: writer.progress() >= ops or writer.proc.poll() is not None,
                   f"{where}: the writer to do {ops} operations", timeout=300)
        time.sleep(rng.uniform(0, 1.5))
        writer.healthy()
        crash(m, writer)
        writer.check_after_crash()

        try:
            fsck(m)  # the state any new mount would load: the crashed writer's journal
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from None

        # Mount again: same cache directory, an empty one (another machine), or an
        # older one whose metadata is stale. The first rounds take each kind once.
        kinds = ["fresh", "same", "stale"]
        kind = kinds[r] if r < 3 else rng.choice(kinds)
        if kind == "stale" and len(caches) < 2:
            kind = "fresh"
        if kind == "fresh":
            current = str(tmp_path / f"cache-r{r}")
            caches.append(current)
        elif kind == "stale":
            current = rng.choice([c for c in caches if c != current])
        history.append(f"{writer.progress()} ops, {kind}")
        m.mount(cache_dir=current)
        count = verify(m, manifest, f"{where}, remounted with the {kind} cache")
        history[-1] += f", {count} fsynced"
    print(f"{rounds} rounds: " + "; ".join(history))
    assert read_manifest(manifest), "no file was ever fsynced: the test checked nothing"
    m.umount()
    assert fsck(m)["clean"]
    # The daemon logs of every cache directory used (m.mount records each one) are
    # checked by the fusefs_mount fixture's log policy at teardown.


# -- 2. a block server dies mid-shipment, then the client ----------------------------------

def test_server_killed_while_shipping_then_client_killed(fusefs_mount, writers, tmp_path):
    seed = 4242
    rng = random.Random(seed)
    m = fusefs_mount(3, mkfs=SMALL_BLOCKS + ["--replicas", "3", "--write-quorum", "2"])
    manifest = str(tmp_path / "manifest")
    writer = writers("writer", "random", m.path, seed, "s", manifest)
    wait_until(lambda: len(read_manifest(manifest)) >= 3 or writer.proc.poll() is not None,
               "the first fsynced files", timeout=300)
    time.sleep(rng.uniform(0, 1))  # fsyncs, segment puts and block uploads are under way
    writer.healthy()
    victim = m.servers[rng.randrange(3)]
    victim.kill()
    at_kill = len(read_manifest(manifest))
    # The application must not notice: it goes on writing, and its fsyncs keep returning.
    wait_until(lambda: len(read_manifest(manifest)) >= at_kill + 10
               or writer.proc.poll() is not None, "fsyncs after the server died", timeout=300)
    writer.healthy()
    crash(m, writer)
    writer.check_after_crash()
    assert not victim.running

    fsck(m)  # one server is down: it may warn about it, but must find nothing wrong
    m.mount(cache_dir=str(tmp_path / "other-machine"))
    count = verify(m, manifest, f"after a server and the client died (seed {seed})")
    assert count >= at_kill + 10
    m.umount()  # the log of the other machine's cache: checked by the fixture's log policy


# -- 3. un-fsynced creates: lost at the end, never out of order -----------------------------

@pytest.mark.parametrize("cache", ["fresh", "same"])
def test_unsynced_creates_survive_as_a_prefix(fusefs_mount, writers, tmp_path, cache):
    seed = 77 if cache == "fresh" else 78
    m = fusefs_mount(mkfs=SMALL_BLOCKS)
    os.mkdir(os.path.join(m.path, "seq"))
    fsync_dir(m.path)  # every record so far is shipped
    synced_at = time.time()
    wait_until(lambda: daemon_status(m)["time"] > synced_at, "a status report after the fsync")
    base = daemon_status(m)["journal"]["seq"]  # all shipped: nothing else changes anything
    writer = writers("writer", "prefix", m.path, seed, "p", str(tmp_path / "unused"))

    def kill_now():
        """At least 60 of the writer's records shipped, and a backlog not shipped yet."""
        journal = daemon_status(m)["journal"]
        return writer.proc.poll() is not None or (
            journal["shipped"] >= base + 60 and journal["seq"] - journal["shipped"] >= 20)

    wait_until(kill_now, "records shipped and records waiting", timeout=300, interval=0.05)
    time.sleep(random.Random(seed).uniform(0, 0.2))  # a random moment: not synchronisation
    writer.healthy()
    if cache == "same":
        # A create is committed locally up to GROUP_SECONDS (10 ms) after it returned; a
        # kill -9 may lose that last group (P2 allows it). Pause the writer for longer than
        # that, so that every create it finished is committed, and kill the daemon then:
        # the records not yet shipped (shipped once a second) are only in the local copy.
        writer.proc.send_signal(signal.SIGSTOP)
        paused_at = time.time()
        wait_until(lambda: all_committed(m, paused_at), "the last group of creates committed")
    finished = writer.progress()  # files the writer closed (it may have created one more)
    crash(m, writer)
    writer.check_after_crash()
    finished = max(finished, writer.progress())

    fsck(m)
    m.mount(cache_dir=str(tmp_path / "fresh-cache") if cache == "fresh" else None)
    names = sorted(os.listdir(os.path.join(m.path, "seq")))
    assert all(re.fullmatch(r"\d{6}", n) for n in names), f"unexpected names: {names[:20]}"
    numbers = [int(n) for n in names]
    k = len(numbers)
    assert numbers == list(range(1, k + 1)), (
        f"the surviving names are not a prefix of the creation order: "
        f"missing {sorted(set(range(1, max(numbers, default=0) + 1)) - set(numbers))[:20]}")
    assert k <= finished + 1, f"{k} files, but the writer only got to {finished + 1}"
    if cache == "same":
        assert k >= finished, (f"the local database lost committed creates: {k} files, the "
                               f"writer had finished {finished}")
    else:
        assert k >= 1, "nothing survived although the journal had shipped 60 records"

    kinds = {"complete": 0, "partial": 0, "empty": 0}
    bad = []
    for i in numbers:
        want = seq_content(seed, i)
        try:
            got = read_through(os.path.join(m.path, "seq", f"{i:06d}"))
        except OSError as e:
            bad.append(f"{i:06d}: {e}")
            continue
        if got == want:
            kinds["complete"] += 1
            continue
        kinds["empty" if not got else "partial"] += 1
        if len(got) > len(want):
            bad.append(f"{i:06d}: {len(got)} bytes, only {len(want)} were written")
            continue
        if got != want[:len(got)]:
            first = next(j for j in range(len(got)) if got[j] != want[j])
            bad.append(f"{i:06d}: {len(got)} bytes, not a prefix of what was written: "
                       f"differs from byte {first} (block {first // BS}) on")
    print(f"{cache} cache: {k} files survived, the writer finished {finished}: {kinds}")
    assert not bad, f"{len(bad)} files wrong ({kinds}):\n" + "\n".join(bad[:20])
    m.umount()


if __name__ == "__main__":
    sys.exit(writer_main(sys.argv[1:]))
