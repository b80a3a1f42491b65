"""The smallest end-to-end check: a real mount on real servers survives a remount."""

import errno
import hashlib
import os
import subprocess
import sys

import pytest

from .support import alive, wait_until


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


# -- /etc/fstab: the mount.fusefs helper ---------------------------------------------------

HELPER = os.path.join(os.path.dirname(sys.executable), "mount.fusefs")
SBIN_HELPER = "/sbin/mount.fusefs"


def _wait_for_daemon_exit(pid: int) -> None:
    wait_until(lambda: not alive(pid), f"the daemon {pid} to exit", timeout=60)


def test_the_fstab_helper_mounts_and_a_plain_umount_uploads_everything(fusefs_mount):
    """mount(8)'s calling convention: `mount.fusefs SERVERS DIR -o OPTIONS`, with
    fstab-only options mixed in; it returns once mounted, exit 0. A plain umount(8) (what
    shutdown does) still uploads the data written just before it."""
    m = fusefs_mount(secret=b"s" * 32)
    m.umount()
    options = (f"defaults,_netdev,nofail,x-systemd.requires=network-online.target,"
               f"secret-file={m.secret_file},cache_dir={m.cache_dir},noatime")
    done = subprocess.run([HELPER, m.urls, m.path, "-o", options], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert m.mounted
    # Quiet, as mount(8) helpers are: test suites compare what `mount` prints.
    assert done.stdout == "" and done.stderr == "", (done.stdout, done.stderr)
    table = open("/proc/self/mountinfo").read()
    mine = [line.split() for line in table.splitlines() if line.split()[4] == m.path]
    flags = [fields[5].split(",") for fields in mine]
    # the servers show as the mount's source (df, findmnt -S), commas and all
    assert mine and mine[0][mine[0].index("-") + 2] == m.urls, mine
    assert flags and "noatime" in flags[0], "noatime did not reach FUSE"
    # as any fstab filesystem: dev and suid unless the line says otherwise
    assert "nodev" not in flags[0] and "nosuid" not in flags[0], flags
    data = os.urandom(5 << 20)
    with open(os.path.join(m.path, "late.bin"), "wb") as f:
        f.write(data)  # no fsync: only the unmount's upload saves it
    pid = m.daemon_pid()
    subprocess.run(["umount", m.path], check=True, timeout=120)
    _wait_for_daemon_exit(pid)
    verbose = subprocess.run([HELPER, "-v", m.urls, m.path, "-o", options],
                             capture_output=True, text=True, timeout=120)
    assert verbose.returncode == 0, verbose.stderr
    assert f"mounted at {m.path}" in verbose.stdout, verbose.stdout  # -v says where the log is
    with open(os.path.join(m.path, "late.bin"), "rb") as f:
        assert f.read() == data
    # `mount -o remount,ro DIR` as mount(8) calls the helper: the same daemon goes on,
    # refusing writes until `remount,rw`.
    pid = m.daemon_pid()
    for flags in ("remount,ro", "remount,rw"):
        done = subprocess.run([HELPER, m.urls, m.path, "-o", f"{flags},{options}"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout == "", (done.stdout, done.stderr)
        if flags == "remount,ro":
            with pytest.raises(OSError) as refused:
                open(os.path.join(m.path, "new.txt"), "w")
            assert refused.value.errno == errno.EROFS
            with open(os.path.join(m.path, "late.bin"), "rb") as f:
                assert f.read() == data
    with open(os.path.join(m.path, "new.txt"), "w") as f:
        f.write("writable again\n")
    assert m.daemon_pid() == pid


def test_the_fstab_helper_refuses_what_it_cannot_mount_with_mounts_exit_statuses(
        fusefs_mount):
    """1 for a wrong invocation (said before anything starts), 32 for a mount that
    failed, with the daemon's reason; nothing is left mounted."""
    m = fusefs_mount()
    m.umount()
    wrong = subprocess.run([HELPER, m.urls, m.path, "-o", f"cache-dir,servers={m.urls}"],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and "needs a value" in wrong.stderr, wrong.stderr
    failed = subprocess.run([HELPER, m.urls, m.path, "-o",
                             f"cache-dir={m.cache_dir},no_such_fuse_option"],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 32, failed.stderr
    assert "no_such_fuse_option" in failed.stderr, failed.stderr
    assert "FUSE did not mount" in failed.stderr and "Traceback" not in failed.stderr
    assert not m.mounted
    m.mount()  # and the filesystem is none the worse for it
    assert m.mounted


def test_an_fstab_line_mounts_with_mount_8_read_only_beside_the_writer(fusefs_mount,
                                                                        tmp_path):
    """The whole path a user takes: a line in an fstab, `mount DIR` (here `mount -T` reads
    a private fstab), and umount(8). `ro` is a read-only mount beside the writer."""
    if os.path.lexists(SBIN_HELPER) and os.path.realpath(SBIN_HELPER) != \
            os.path.realpath(HELPER):
        pytest.skip(f"{SBIN_HELPER} belongs to another installation")
    m = fusefs_mount()
    with open(os.path.join(m.path, "shared.txt"), "w") as f:
        f.write("from the writer\n")
        f.flush()
        os.fsync(f.fileno())
    reader = str(tmp_path / "reader")
    os.makedirs(reader)
    fusefs_mount.track(reader, str(tmp_path / "reader-cache"), m.servers)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# fusefs, read-only\n{m.urls}  {reader}  fusefs  "
                     f"ro,cache-dir={tmp_path / 'reader-cache'},_netdev,nofail  0  0\n")
    installed = not os.path.lexists(SBIN_HELPER)
    if installed:
        os.symlink(HELPER, SBIN_HELPER)
    try:
        done = subprocess.run(["mount", "-T", str(fstab), reader], capture_output=True,
                              text=True, timeout=120)
    finally:
        if installed:
            os.unlink(SBIN_HELPER)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", (done.stdout, done.stderr)
    with open(os.path.join(reader, "shared.txt")) as f:
        assert f.read() == "from the writer\n"
    with pytest.raises(OSError) as refused:
        open(os.path.join(reader, "new.txt"), "w")
    assert refused.value.errno == errno.EROFS
    pid = _mount_pid(reader)
    subprocess.run(["umount", reader], check=True, timeout=120)
    _wait_for_daemon_exit(pid)
    assert m.mounted  # the writer goes on


def _mount_pid(path: str) -> int:
    from fusefs.mounts import read_registry

    return read_registry(path)["pid"]
