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


def test_mounting_servers_with_no_filesystem_says_how_to_make_one(fusefs_mount, blockservers,
                                                                  tmp_path):
    """"No filesystem" is decided only once every server answered (one that holds the
    superblock may be the slowest), and the error says what to run."""
    servers = blockservers.servers.start(3)
    m = fusefs_mount.track(str(tmp_path / "mnt"), str(tmp_path / "cache"), servers)
    os.makedirs(m.path, exist_ok=True)
    refused = m.cli("mount", *m.cluster_args(), "--cache-dir", m.cache_dir, m.path,
                    check=False)
    assert refused.returncode != 0 and not m.mounted
    assert "no filesystem on these servers" in refused.stderr, refused.stderr
    assert "fusefs mkfs" in refused.stderr, refused.stderr
