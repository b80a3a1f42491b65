"""The benchmarks' own filesystems (benchmarks/floor.py, benchmarks/passthrough.py) mounted
for real: they share fusefs's FUSE glue or fusepy, so a change there must not leave a
benchmark column reading errors. (A glue change once did: the floor answered every read
with EIO, which only a run of the benchmark would have shown.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .support import is_mounted, unmount, wait_until

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _serve(script: str, *args: str) -> subprocess.Popen:
    """The filesystem in the foreground, its log in a file (a pipe nobody reads would fill
    up with a failing build's tracebacks and block it)."""
    log = open(f"{args[-1]}.log", "ab")
    with log:
        return subprocess.Popen([sys.executable, os.path.join(BENCH, script), *args],
                                stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen, mnt: str) -> str:
    """Unmount, wait for the process to exit, return its log."""
    if is_mounted(mnt) and not unmount(mnt):
        unmount(mnt, lazy=True)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with open(f"{mnt}.log", errors="replace") as f:
        return f.read()[-3000:]


def _exercise(mnt: str) -> bytes:
    """Files across several 128 KiB read requests, read back through the kernel."""
    data = os.urandom(300_000) + b"end"
    os.mkdir(os.path.join(mnt, "d"))
    path = os.path.join(mnt, "d", "f")
    with open(path, "wb") as f:
        f.write(data)
    with open(path, "rb", buffering=0) as f:
        assert f.read() == data
        f.seek(131_000)
        assert f.read(1000) == data[131_000:132_000]
    assert os.listdir(os.path.join(mnt, "d")) == ["f"]
    assert os.stat(path).st_size == len(data)
    return data


@pytest.mark.parametrize("script", ["floor.py", "passthrough.py"])
def test_a_benchmark_filesystem_reads_and_writes_through_a_real_mount(tmp_path, script):
    mnt, other = str(tmp_path / "mnt"), str(tmp_path / "other")
    os.mkdir(mnt)
    os.mkdir(other)  # floor: its state file's directory; passthrough: the backing tree
    args = (os.path.join(other, "state"),) if script == "floor.py" else (other,)
    proc = _serve(script, *args, mnt)
    try:
        wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, f"{script} mounted")
        assert proc.poll() is None, _stop(proc, mnt)
        data = _exercise(mnt)
    finally:
        out = _stop(proc, mnt)
    assert proc.returncode == 0, out
    if script == "passthrough.py":
        with open(os.path.join(other, "d", "f"), "rb") as f:
            assert f.read() == data
        return
    # the floor saved its tree at unmount: the next mount serves the same bytes
    proc = _serve(script, *args, mnt)
    try:
        wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, "floor mounted again")
        with open(os.path.join(mnt, "d", "f"), "rb") as f:
            assert f.read() == data
    finally:
        out = _stop(proc, mnt)
    assert proc.returncode == 0, out
