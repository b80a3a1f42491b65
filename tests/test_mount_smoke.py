"""The smallest end-to-end check: a real mount on real servers survives a remount."""

import hashlib
import os


def test_write_fsync_remount_identical(fusefs_mount):
    m = fusefs_mount()
    data = os.urandom(3 * (1 << 20) + 12345)
    path = os.path.join(m.path, "file.bin")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    m.umount()
    assert not m.mounted
    m.mount()
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
