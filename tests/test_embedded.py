"""`fusefs up` / `fusefs down`: the embedded default, as the README's main command runs it.

The servers and the daemon that `up` starts log under the test's directory (servers/sN.log,
cache/.../fusefs.log); the suite's log policy applies to them (`support.problem_lines`).
Whatever `down` does - fail, hang past its timeout - the mount is detached and every
process `up` started is ended before the test ends.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time

from fusefs.mounts import is_mounted as mounted
from fusefs.mounts import read_registry

from .support import REPO, cleanup_all, leftovers_under, problem_lines, unmount


def fusefs(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "fusefs", *args], capture_output=True,
                            text=True, timeout=180, cwd=REPO)
    assert not check or result.returncode == 0, result.stderr
    return result


def take_down(root: str, mnt: str) -> None:
    """`fusefs down`, then a lazy unmount and an end to the processes `up` started, each
    step run even when an earlier one failed or timed out."""

    def down():
        fusefs("down", root, check=False)

    def detach():
        if mounted(mnt):
            unmount(mnt, lazy=True)

    def end_processes():
        leftovers_under(root)

    cleanup_all([down, detach, end_processes], "taking the embedded filesystem down")


def logged_problems(root: str) -> list[str]:
    """ERROR lines and tracebacks in the logs of the servers and the daemon under root."""
    found = []
    for part in ("servers", "cache"):
        for dirpath, _, names in os.walk(os.path.join(root, part)):
            for name in (n for n in names if n.endswith(".log")):
                with open(os.path.join(dirpath, name), errors="replace") as f:
                    found += [f"{name}: {line}" for line in problem_lines(f.read(), ())]
    return found


def test_up_down_up_keeps_the_data(tmp_path):
    root = str(tmp_path / "data")
    mnt = os.path.join(root, "mnt")
    try:
        out = fusefs("up", root)
        assert "fusefs down" in out.stdout  # it says how to stop it
        assert mounted(mnt)
        data = os.urandom(2_500_000)
        with open(os.path.join(mnt, "kept.bin"), "wb") as f:
            f.write(data)  # no fsync: down must upload it
        fusefs("up", root)  # idempotent: already up
        fusefs("down", root)
        assert not mounted(mnt)
        fusefs("up", root)
        with open(os.path.join(mnt, "kept.bin"), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
        status = fusefs("status", mnt)
        assert status.stdout.count(": up") == 3
    finally:
        take_down(root, mnt)
    assert not mounted(mnt)
    problems = logged_problems(root)
    assert not problems, "fusefs up's servers or daemon logged errors:\n" + "\n".join(problems[:20])


def test_status_and_down_of_a_stopped_daemon_say_so_and_never_hang(tmp_path):
    """A daemon that is stopped (SIGSTOP, a debugger) or hung answers nothing, and a
    request to its mount waits where only SIGKILL ends it. `status` and `umount` used to
    resolve the mountpoint with a stat of it, and hung there (on that code, a status like
    the one below timed out after 120 s); `down` showed nothing of what `umount` said
    while it waited. Now status says its figures are old and why, exit 1, and `down` says
    the daemon is stopped and finishes once it goes on, with the data uploaded."""
    root = str(tmp_path / "data")
    mnt = os.path.join(root, "mnt")
    down = None
    try:
        fusefs("up", root)
        with open(os.path.join(mnt, "kept"), "wb") as f:
            f.write(b"uploaded by down")
        pid = (read_registry(mnt) or {})["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            # Status is written each second and 15 s without one is old; by then the
            # kernel no longer caches the root's attributes, so a stat of it would hang.
            time.sleep(17)
            status = fusefs("status", mnt, check=False)
            down = subprocess.Popen([sys.executable, "-m", "fusefs", "down", root], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
            said = down.stderr.readline()
        finally:
            os.kill(pid, signal.SIGCONT)
        assert status.returncode == 1, status.stdout + status.stderr
        assert "reported nothing for" in status.stdout, status.stdout
        assert f"kill -CONT {pid}" in status.stdout, status.stdout
        assert f"(pid {pid}) is stopped" in said and f"kill -CONT {pid}" in said, said
        _, err = down.communicate(timeout=180)
        assert down.returncode == 0, err
        assert not mounted(mnt)
        fusefs("up", root)
        with open(os.path.join(mnt, "kept"), "rb") as f:
            assert f.read() == b"uploaded by down"
    finally:
        if down is not None and down.poll() is None:
            down.kill()
            down.wait()
        take_down(root, mnt)
    assert not mounted(mnt)
    problems = logged_problems(root)
    assert not problems, "fusefs up's servers or daemon logged errors:\n" + "\n".join(problems[:20])
