"""The read-only extended attribute `user.fusefs.replicas` (fusefs/replicas.py), read with
the real getfattr/setfattr tools on a real mount: healthy copies per block, asked of the
servers; pending blocks; refusals; and the count dropping for the blocks homed on a server
that was killed after the write."""

from __future__ import annotations

import os
import sqlite3
import subprocess

from fusefs import replicas
from fusefs.placement import rank

from .support import members_of, wait_until
from .test_mount_tools import need

NAME = "user.fusefs.replicas"
BLOCK = 64 << 10
MKFS = ["--block-size", "64KiB"]


def tool(*cmd) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)


def health(path) -> str:
    """What `getfattr -n user.fusefs.replicas` shows for `path`."""
    result = tool("getfattr", "--absolute-names", "--only-values", "-n", NAME, path)
    assert result.returncode == 0, result.stderr
    return result.stdout


def write_synced(path, data: bytes, offset: int = 0) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def block_ids(m, path) -> dict[int, str]:
    """index -> block id of the file at `path`, from the mount's own metadata database."""
    db = os.path.join(m.registry_record()["state_dir"], "metadata.db")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT idx, block_id FROM blocks WHERE ino=?",
                            (os.stat(path).st_ino,)).fetchall()
    return dict(rows)


def test_counts_drop_for_the_blocks_homed_on_a_killed_server(fusefs_mount):
    need("getfattr")
    m = fusefs_mount(servers=4, mkfs=MKFS)
    path = os.path.join(m.path, "data")
    write_synced(path, os.urandom(8 * BLOCK + 1000))
    # fsync returned at W=2 copies; the third follows.
    wait_until(lambda: health(path) == "replicas=3 blocks=9 pending=0 under=0 unreachable=0 "
                                       "healthy=3*9", "three copies of every block")

    members = members_of(m.servers)
    homes = {i: {h.id for h in rank(b, members)[:3]} for i, b in block_ids(m, path).items()}
    assert len(homes) == 9
    victim = max(members, key=lambda v: sum(v.id in h for h in homes.values()))
    m.servers[members.index(victim)].kill()

    expected = replicas.describe({i: 2 if victim.id in h else 3 for i, h in homes.items()},
                                 3, unreachable=1)
    assert "under=0" not in expected
    wait_until(lambda: health(path) == expected, f"getfattr showing {expected}")


def test_pending_holes_refusals_and_what_tools_copy(fusefs_mount):
    need("getfattr", "setfattr")
    m = fusefs_mount(mkfs=MKFS)
    path = os.path.join(m.path, "file")

    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"x" * 1000)  # not uploaded before its age or an fsync
        assert health(path) == "replicas=3 blocks=1 pending=1 under=0 unreachable=0 healthy=p"
        os.fsync(fd)
    finally:
        os.close(fd)
    wait_until(lambda: health(path) == "replicas=3 blocks=1 pending=0 under=0 unreachable=0 "
                                       "healthy=3", "the uploaded block")

    sparse = os.path.join(m.path, "sparse")
    write_synced(sparse, b"y" * 10, offset=3 * BLOCK)
    wait_until(lambda: health(sparse).endswith(" healthy=-*3,3"), "a hole, then a block")

    # Not listed, so getfattr -d and copying tools leave it alone; other xattrs still work.
    os.setxattr(path, "user.mine", b"kept")
    dump = tool("getfattr", "--absolute-names", "-d", path)
    assert dump.returncode == 0 and 'user.mine="kept"' in dump.stdout, dump
    assert "fusefs" not in dump.stdout
    assert NAME not in os.listxattr(path)
    copy = os.path.join(m.path, "copy")
    cp = tool("cp", "-a", path, copy)
    assert cp.returncode == 0, cp.stderr
    assert os.listxattr(copy) == ["user.mine"]

    for refused in (("setfattr", "-n", NAME, "-v", "3", path), ("setfattr", "-x", NAME, path)):
        result = tool(*refused)
        assert result.returncode != 0
        assert "Operation not permitted" in result.stderr, result.stderr

    directory = tool("getfattr", "--absolute-names", "-n", NAME, m.path)
    assert directory.returncode != 0
    assert "No such attribute" in directory.stderr, directory.stderr


def test_the_value_stays_small_for_any_file():
    layout = {i: 2 + i % 2 for i in range(200_000)}  # the worst case: no two runs alike
    text = replicas.describe(layout, 3, unreachable=0)
    assert text.startswith("replicas=3 blocks=200000 pending=0 under=100000 unreachable=0 ")
    assert text.endswith(",...")
    assert len(text) < 4096
    assert replicas.describe({0: 3, 1: 3, 5: replicas.PENDING, 6: 1}, 3, 2) == \
        "replicas=3 blocks=4 pending=1 under=1 unreachable=2 healthy=3*2,-*3,p,1"
