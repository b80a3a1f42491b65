"""Everyday tools on a real mount: cp, tar, git, SQLite, rsync, gcc (docs/promises.md).

Each test runs the real program on a real kernel FUSE mount of fusefs (three block
servers, R=3, W=2) and checks what the tool itself checks (diff -r, git fsck, PRAGMA
integrity_check, rsync -c) plus the metadata the tool is supposed to carry over (modes,
mtimes to the nanosecond where the tool keeps them, hard links).

The trees copied are a private snapshot of this repository's own sources (taken into the
test's tmp_path first, so edits made meanwhile cannot make the two sides differ), plus a
few awkward extras: an empty file, files larger than one block, unusual modes, a symlink,
a deep directory, a name with spaces and non-ASCII bytes, fixed old mtimes with a
nanosecond part.

One mount serves the module (`shared_mount`): each test works in a directory of its own,
and the tests that remount remount that shared mount.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess

import pytest

from .support import REPO

SOURCE_DIRS = ("fusefs", "blockserver", "tests")


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def run(*cmd, cwd=None, env=None) -> str:
    """Run a tool; fail with its stderr if it fails; return its stdout."""
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def make_tree(root: str) -> str:
    """A private copy of the repository's sources plus awkward extras; returns `root`."""
    os.makedirs(root)
    for name in SOURCE_DIRS:
        shutil.copytree(os.path.join(REPO, name), os.path.join(root, name),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
    extra = os.path.join(root, "extra")
    deep = os.path.join(extra, "a", "b", "c", "d", "e")
    os.makedirs(deep)
    open(os.path.join(extra, "empty"), "wb").close()
    with open(os.path.join(extra, "big.bin"), "wb") as f:  # several 1 MiB blocks, ragged end
        f.write(os.urandom((3 << 20) + 4321))
    with open(os.path.join(deep, "leaf.txt"), "w") as f:
        f.write("deep\n" * 1000)
    with open(os.path.join(extra, "name with spaces \xe9\u00df.txt"), "w") as f:
        f.write("unicode name\n")
    script = os.path.join(extra, "run.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\necho hi\n")
    os.chmod(script, 0o755)
    secret = os.path.join(extra, "private")
    with open(secret, "w") as f:
        f.write("x")
    os.chmod(secret, 0o600)
    os.chmod(os.path.join(extra, "a"), 0o700)
    os.symlink("big.bin", os.path.join(extra, "link-to-big"))
    # Old, distinct mtimes with a nanosecond part, set bottom-up so directory times stick.
    stamp = 1_000_000_000_123_456_789
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            stamp += 1_000_000_007
            os.utime(os.path.join(dirpath, name), ns=(stamp, stamp), follow_symlinks=False)
    os.utime(root, ns=(stamp + 5, stamp + 5))
    return root


def tree_stats(root: str) -> dict[str, tuple]:
    """relative path -> (file type and mode bits, mtime in ns, size, symlink target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["."] + dirnames + filenames:
            path = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            size = st.st_size if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_mtime_ns, size, target)
    return out


def assert_same_tree(a: str, b: str, mtime_precision_ns: int = 1) -> None:
    """`diff -r` finds nothing, and every entry has the same type, mode, size and mtime."""
    assert run("diff", "-r", "--no-dereference", a, b) == ""
    sa, sb = tree_stats(a), tree_stats(b)
    assert sorted(sa) == sorted(sb)
    assert len(sa) > 50
    for rel, (mode, mtime, size, target) in sa.items():
        mode_b, mtime_b, size_b, target_b = sb[rel]
        assert (oct(mode), size, target) == (oct(mode_b), size_b, target_b), rel
        assert mtime // mtime_precision_ns == mtime_b // mtime_precision_ns, \
            f"{rel}: mtime {mtime} became {mtime_b}"


def test_cp_a_tree_identical_with_modes_and_mtimes(shared_mount, tmp_path):
    need("cp", "diff")
    src = make_tree(str(tmp_path / "src"))
    m, here = shared_mount
    dst = os.path.join(here, "copy")
    run("cp", "-a", src, dst)
    assert_same_tree(src, dst)
    # ...and the other way: out of the mount into a native directory, after a remount.
    m.umount()
    m.mount()
    back = str(tmp_path / "back")
    run("cp", "-a", dst, back)
    assert_same_tree(src, back)


def test_tar_round_trip_on_the_mount(shared_mount, tmp_path):
    need("tar", "diff")
    src = make_tree(str(tmp_path / "src"))
    m, here = shared_mount
    archive = os.path.join(here, "tree.tar")
    run("tar", "cf", archive, "-C", src, ".")
    out = os.path.join(here, "extracted")
    os.mkdir(out)
    run("tar", "xf", archive, "-C", out)
    # The default (gnu) format keeps whole seconds only.
    assert_same_tree(src, out, mtime_precision_ns=10**9)
    # The archive on the mount lists every entry of the tree.
    listed = {os.path.normpath(n) for n in run("tar", "tf", archive).splitlines()}
    assert listed == set(tree_stats(src))


def test_tar_x_of_an_archive_made_elsewhere_keeps_mtimes(shared_mount, tmp_path):
    need("tar", "diff")
    src = make_tree(str(tmp_path / "src"))
    archive = str(tmp_path / "tree.tar")
    run("tar", "--format=posix", "-cf", archive, "-C", src, ".")  # pax: nanosecond mtimes
    m, here = shared_mount
    out = os.path.join(here, "x")
    os.mkdir(out)
    run("tar", "xf", archive, "-C", out)
    assert_same_tree(src, out)
    m.umount()
    m.mount()
    assert_same_tree(src, out)


def git_env(tmp_path) -> dict:
    env = dict(os.environ, HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="Test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="Test", GIT_COMMITTER_EMAIL="test@example.com")
    env.pop("GIT_DIR", None)
    env.pop("GIT_WORK_TREE", None)
    return env


def test_git_repository_and_local_clone_on_the_mount(shared_mount, tmp_path):
    need("git", "diff")
    env = git_env(tmp_path)
    src = make_tree(str(tmp_path / "src"))
    m, here = shared_mount
    repo = os.path.join(here, "repo")
    os.mkdir(repo)

    def git(*args, cwd=repo):
        return run("git", *args, cwd=cwd, env=env)

    git("init", "-q", "-b", "main")
    shutil.copytree(os.path.join(src, "fusefs"), os.path.join(repo, "fusefs"), symlinks=True)
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    shutil.copytree(os.path.join(src, "tests"), os.path.join(repo, "tests"), symlinks=True)
    shutil.copytree(os.path.join(src, "extra"), os.path.join(repo, "extra"), symlinks=True)
    git("add", "-A")
    git("commit", "-q", "-m", "second")
    for i in range(5):  # small edits, a rename, a delete: loose objects and index rewrites
        with open(os.path.join(repo, "fusefs", "cli.py"), "a") as f:
            f.write(f"# edit {i}\n")
        if i == 2:
            git("mv", "extra/big.bin", "extra/moved.bin")
        if i == 3:
            git("rm", "-q", "extra/empty")
        git("commit", "-q", "-a", "-m", f"edit {i}")
    assert git("status", "--porcelain") == ""
    log = git("log", "--format=%s").splitlines()
    assert log == [f"edit {i}" for i in reversed(range(5))] + ["second", "first"]
    head = git("rev-parse", "HEAD").strip()

    git("gc", "-q", "--prune=now")
    packs = [p for p in os.listdir(os.path.join(repo, ".git", "objects", "pack"))
             if p.endswith(".pack")]
    assert packs, "git gc wrote no pack"
    git("fsck", "--full", "--strict")

    clone = os.path.join(here, "clone")
    run("git", "clone", "-q", repo, clone, env=env)  # a local clone hard-links the objects
    pack = packs[0]
    a = os.stat(os.path.join(repo, ".git", "objects", "pack", pack))
    b = os.stat(os.path.join(clone, ".git", "objects", "pack", pack))
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2), "git clone did not hard-link the pack"
    git("fsck", "--full", "--strict", cwd=clone)
    assert git("rev-parse", "HEAD", cwd=clone).strip() == head
    assert git("status", "--porcelain", cwd=clone) == ""
    assert run("diff", "-r", "--no-dereference", "-x", ".git", repo, clone) == ""

    m.umount()
    m.mount()
    git("fsck", "--full", "--strict")
    git("fsck", "--full", "--strict", cwd=clone)
    assert git("status", "--porcelain", cwd=clone) == ""
    assert git("rev-parse", "HEAD", cwd=clone).strip() == head


def sqlite_workload(path: str, journal_mode: str, transactions: int = 200) -> dict[int, str]:
    """Many small transactions (insert, update, delete, one rollback in ten); returns the
    rows the database must hold."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        mode = db.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0]
        assert mode.lower() == journal_mode.lower()
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL, pad BLOB)")
        db.execute("CREATE INDEX t_v ON t (v)")
        expected: dict[int, str] = {}
        next_id = 0
        for n in range(transactions):
            db.execute("BEGIN")
            added = {}
            for _ in range(5):
                added[next_id] = f"row {next_id} of txn {n}"
                db.execute("INSERT INTO t VALUES (?, ?, ?)",
                           (next_id, added[next_id], os.urandom(300 + next_id % 700)))
                next_id += 1
            updated = {k: expected[k] + " updated" for k in list(expected)[-3:]}
            for k, v in updated.items():
                db.execute("UPDATE t SET v=? WHERE id=?", (v, k))
            gone = list(expected)[:1] if n % 3 == 0 else []
            for k in gone:
                db.execute("DELETE FROM t WHERE id=?", (k,))
            if n % 10 == 9:
                db.execute("ROLLBACK")
                continue
            db.execute("COMMIT")
            expected.update(updated)
            expected.update(added)
            for k in gone:
                del expected[k]
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return expected
    finally:
        db.close()


def check_sqlite(path: str, expected: dict[int, str]) -> None:
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert dict(db.execute("SELECT id, v FROM t")) == expected
    finally:
        db.close()


@pytest.mark.parametrize("journal_mode", ["DELETE", "WAL"])
def test_sqlite_many_transactions_then_integrity_check(shared_mount, journal_mode):
    m, here = shared_mount
    path = os.path.join(here, "db", "test.sqlite")
    os.mkdir(os.path.dirname(path))
    expected = sqlite_workload(path, journal_mode)
    assert len(expected) > 500
    check_sqlite(path, expected)
    m.umount()
    m.mount()
    check_sqlite(path, expected)


def test_rsync_second_run_transfers_nothing(shared_mount, tmp_path):
    need("rsync")
    src = make_tree(str(tmp_path / "src"))
    m, here = shared_mount
    dst = os.path.join(here, "r")
    run("rsync", "-a", src + "/", dst + "/")
    # -c compares every file's content read back from the mount; -i prints a line for
    # anything (content, size, time, mode, link) it would still change.
    assert run("rsync", "-a", "-c", "--itemize-changes", src + "/", dst + "/") == ""
    assert_same_tree(src, dst)
    m.umount()
    m.mount()
    assert run("rsync", "-a", "-c", "--itemize-changes", src + "/", dst + "/") == ""


def test_rsync_H_keeps_hard_links(shared_mount, tmp_path):
    need("rsync")
    src = tmp_path / "links"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(os.urandom(200_000))
    os.link(src / "a", src / "b")
    os.link(src / "a", src / "sub" / "c")
    (src / "single").write_bytes(b"alone")
    m, here = shared_mount
    dst = os.path.join(here, "h")
    run("rsync", "-aH", f"{src}/", dst + "/")
    stats = {n: os.stat(os.path.join(dst, n)) for n in ("a", "b", "sub/c", "single")}
    assert stats["a"].st_ino == stats["b"].st_ino == stats["sub/c"].st_ino
    assert [stats[n].st_nlink for n in ("a", "b", "sub/c", "single")] == [3, 3, 3, 1]
    assert stats["single"].st_ino != stats["a"].st_ino
    with open(os.path.join(dst, "sub", "c"), "rb") as f:
        assert f.read() == (src / "a").read_bytes()
    assert run("rsync", "-aH", "-c", "--itemize-changes", f"{src}/", dst + "/") == ""
    m.umount()
    m.mount()
    again = os.stat(os.path.join(dst, "b"))
    assert (again.st_ino, again.st_nlink) == (os.stat(os.path.join(dst, "a")).st_ino, 3)


C_MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include "sum.h"

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s FILE\n", argv[0]); return 2; }
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 1; }
    unsigned char buf[65536];
    size_t n, total = 0;
    unsigned long long h = 1469598103934665603ULL;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) { h = fnv1a(h, buf, n); total += n; }
    fclose(f);
    printf("%zu %016llx\n", total, h);
    return 0;
}
"""

C_SUM = r"""
#include "sum.h"
unsigned long long fnv1a(unsigned long long h, const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 1099511628211ULL; }
    return h;
}
"""

C_HEADER = "#include <stddef.h>\n" \
           "unsigned long long fnv1a(unsigned long long, const unsigned char *, size_t);\n"


def fnv1a(data: bytes) -> int:
    h = 1469598103934665603
    for byte in data:
        h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def test_gcc_builds_and_runs_a_program_from_the_mount(shared_mount):
    need("gcc")
    m, here = shared_mount
    work = os.path.join(here, "prog")
    os.mkdir(work)
    for name, text in (("main.c", C_MAIN), ("sum.c", C_SUM), ("sum.h", C_HEADER)):
        with open(os.path.join(work, name), "w") as f:
            f.write(text)
    # Separate compile and link steps: object files written to and read back from the mount.
    run("gcc", "-O2", "-Wall", "-Werror", "-c", "main.c", "sum.c", cwd=work)
    run("gcc", "-o", "fnvsum", "main.o", "sum.o", cwd=work)
    binary = os.path.join(work, "fnvsum")
    assert os.stat(binary).st_mode & 0o111
    payload = os.urandom((1 << 20) + 777)
    with open(os.path.join(work, "payload"), "wb") as f:
        f.write(payload)
    expected = f"{len(payload)} {fnv1a(payload):016x}\n"
    assert run(binary, os.path.join(work, "payload"), cwd=work) == expected
    m.umount()
    m.mount()
    assert run(binary, os.path.join(work, "payload"), cwd=work) == expected
