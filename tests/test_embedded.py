"""`fusefs up` / `fusefs down`: the embedded default, as the README's main command runs it."""

import hashlib
import os
import subprocess
import sys

from fusefs.mounts import is_mounted as mounted

from .support import REPO


def fusefs(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "fusefs", *args], capture_output=True,
                            text=True, timeout=180, cwd=REPO)
    assert not check or result.returncode == 0, result.stderr
    return result




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
        fusefs("down", root, check=False)
        if mounted(mnt):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    assert not mounted(mnt)
