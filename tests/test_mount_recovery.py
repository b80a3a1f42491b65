"""A mount that recovers from its own crash: after `kill -9` of the daemon the mountpoint is a
dead FUSE mount ("Transport endpoint is not connected"); every command must say so, and
`mount`, `up` and `umount` must get past it (detach it lazily, then mount again)."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from fusefs.mounts import is_mounted

from .support import alive, wait_until
from .test_embedded import fusefs, take_down


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _kill_daemon(m) -> int:
    """kill -9 the mount's daemon and wait until it is gone; the mount stays, dead."""
    pid = m.daemon_pid()
    assert pid and alive(pid)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), "the killed daemon to be gone", timeout=30)
    assert not alive(pid)
    with pytest.raises(OSError) as e:
        os.statvfs(m.path)  # (stat may still answer from the kernel's attribute cache)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # the dead mount
    return pid


def test_status_names_a_dead_mount_and_fails(fusefs_mount):
    m = fusefs_mount()
    pid = _kill_daemon(m)
    for args in (("status",), ("status", m.path)):
        result = m.cli(*args, check=False)
        assert result.returncode != 0, result.stdout
        said = result.stdout + result.stderr
        assert m.path in said and "dead" in said and str(pid) in said, said
    result = m.cli("status", "--json", check=False)
    assert result.returncode != 0
    dead = {s["mountpoint"]: s for s in json.loads(result.stdout) if s.get("state") == "dead"}
    assert dead[m.path]["pid"] == pid  # (other tests' mounts may be listed too)
    result = m.cli("status", "--json", m.path, check=False)
    assert result.returncode != 0
    assert [(s["mountpoint"], s["state"]) for s in json.loads(result.stdout)] == \
        [(m.path, "dead")]


def test_mount_over_a_dead_mount_keeps_every_fsynced_file(fusefs_mount):
    m = fusefs_mount()
    files = {f"f{i}.bin": os.urandom(100_000 * (i + 1)) for i in range(4)}
    os.makedirs(os.path.join(m.path, "sub"))
    for name, data in files.items():
        _write_synced(os.path.join(m.path, "sub", name), data)
    _kill_daemon(m)
    result = m.cli("mount", *m.cluster_args(), "--cache-dir", m.cache_dir, m.path, check=False)
    assert result.returncode == 0, result.stderr
    assert "dead" in result.stdout + result.stderr  # it says what it did
    assert alive(m.daemon_pid())
    for name, data in files.items():
        with open(os.path.join(m.path, "sub", name), "rb") as f:
            assert f.read() == data, name
    assert m.cli("status", m.path).stdout.count(": up") == 3


def test_umount_detaches_a_dead_mount_even_while_a_process_sits_in_it(fusefs_mount):
    m = fusefs_mount()
    os.makedirs(os.path.join(m.path, "work"))
    # A shell left in the mount: a plain unmount of the dead mount would fail "busy".
    sitter = subprocess.Popen(["sleep", "600"], cwd=os.path.join(m.path, "work"))
    try:
        _kill_daemon(m)
        result = m.cli("umount", m.path, check=False)
        assert result.returncode == 0, result.stderr
        assert "dead" in result.stdout, result.stdout
        assert not is_mounted(m.path)
        assert os.path.isdir(m.path)
    finally:
        sitter.kill()
        sitter.wait()


def test_up_after_the_daemon_was_killed_mounts_again_with_the_data(tmp_path):
    from fusefs.mounts import read_registry

    root = str(tmp_path / "data")
    mnt = os.path.join(root, "mnt")
    try:
        fusefs("up", root)
        data = os.urandom(1_500_000)
        _write_synced(os.path.join(mnt, "kept.bin"), data)
        pid = read_registry(mnt)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), "the killed daemon to be gone")
        result = fusefs("up", root, check=False)
        assert result.returncode == 0, result.stderr
        assert alive(read_registry(mnt)["pid"])
        with open(os.path.join(mnt, "kept.bin"), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
        assert "dead" in result.stderr  # it says what it found
    finally:
        take_down(root, mnt)  # `down` stops the servers only once the unmount worked
    assert not is_mounted(mnt)


_OTHER_FS = """
import sys
from fuse import FUSE, Operations
FUSE(Operations(), sys.argv[1], foreground=True, fsname="otherfs", subtype="otherfs")
"""


def test_a_dead_mount_of_another_filesystem_is_left_alone(tmp_path):
    """fusefs detaches only its own dead mounts: another program's is named, with what to do."""
    mnt = str(tmp_path / "other")
    os.mkdir(mnt)
    other = subprocess.Popen([sys.executable, "-c", _OTHER_FS, mnt])
    try:
        wait_until(lambda: is_mounted(mnt), "the other filesystem mounted", timeout=30)
        other.kill()
        other.wait()
        for args in (("umount", mnt), ("mount", "--servers", "http://127.0.0.1:9", mnt),
                     ("status", mnt)):
            result = fusefs(*args, check=False)
            assert result.returncode == 1, (args, result.stdout)
            assert "did not make" in result.stderr and "fusermount -u -z" in result.stderr
            assert is_mounted(mnt), args  # still there: not ours to detach
    finally:
        other.kill()
        other.wait()
        subprocess.run(["fusermount", "-u", "-z", mnt], capture_output=True)
    assert not is_mounted(mnt)
