"""The guest image of the VM suite, built from Debian packages and cached by its recipe's hash.

What it makes, in ``CACHE/<hash>/`` (default CACHE: /var/cache/fusefs-vm): ``base.qcow2`` (an
ext4 filesystem with no partition table: root is /dev/vda), ``vmlinuz`` and ``initrd.img``
copied out of it (QEMU boots them with -kernel/-initrd, so no boot loader), and ``id_ed25519``,
the key ssh uses to log in as root. The hash covers this file and tests/vm/guest_init.py, so
changing either builds a new image; an unchanged recipe reuses the cached one.

No loop devices and no root-only kernel features: mmdebstrap fills a directory, ``mkfs.ext4 -d``
copies it into a raw file. Nothing is installed inside a guest later (guests cannot reach the
package registries): the project comes from the host over virtio-9p.

A build killed half way leaves only ``CACHE/<hash>.partial``, removed by the next build; the
final directory appears by an atomic rename, so a present directory is always complete.
"""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(os.environ.get("FUSEFS_VM_CACHE", "/var/cache/fusefs-vm"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = [
    "linux-image-amd64", "openssh-server", "python3", "fuse3", "libfuse2", "iproute2", "kmod",
    "procps", "git", "sqlite3", "tar", "diffutils", "psmisc",
]
DISK_SIZE = "3G"
HOST_PACKAGES = ["qemu-system-x86", "qemu-utils", "mmdebstrap"]


def recipe_hash():
    digest = hashlib.sha256()
    for name in ("image.py", "guest_init.py", "layout.py"):
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:16]


def image_dir(cache=DEFAULT_CACHE):
    return cache / recipe_hash()


def say(message):
    print(f"vm-e2e: {message}", file=sys.stderr, flush=True)


def ensure_host_tools():
    """Install the Debian packages the suite runs on, if any is missing."""
    if all(shutil.which(tool) for tool in ("qemu-system-x86_64", "qemu-img", "mmdebstrap")):
        return
    say("installing " + " ".join(HOST_PACKAGES))
    subprocess.run(["apt-get", "install", "-y", "-q", *HOST_PACKAGES], check=True,
                   stdout=subprocess.DEVNULL)


def ensure_image(cache=DEFAULT_CACHE):
    """Return the image directory, building it first when its recipe has not been built."""
    final = image_dir(cache)
    if (final / "base.qcow2").exists():
        say(f"image {final} (cached)")
        return final
    partial = cache / (final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    build(partial)
    partial.rename(final)
    return final


def build(out):
    rootfs = out / "rootfs"
    say(f"building the guest image in {out} (mmdebstrap, 1-4 minutes)")
    subprocess.run(["mmdebstrap", "--variant=apt", "--include=" + ",".join(PACKAGES),
                    "--dpkgopt=path-exclude=*.mo", "--dpkgopt=path-exclude=*.gz",
                    SUITE, str(rootfs), MIRROR], check=True, stdout=subprocess.DEVNULL)
    say("configuring the guest (init, ssh key, host keys)")
    customize(rootfs, out)
    say("copying the kernel and initrd out; mkfs.ext4 -d into a raw file")
    copy_boot_files(rootfs, out)
    raw = out / "base.raw"
    subprocess.run(["mkfs.ext4", "-q", "-L", "root", "-d", str(rootfs), str(raw), DISK_SIZE],
                   check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / "base.qcow2")],
                   check=True)
    raw.unlink()
    shutil.rmtree(rootfs)


def customize(rootfs, out):
    key = out / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    ssh_dir = rootfs / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(key.with_suffix(".pub"), ssh_dir / "authorized_keys")
    shutil.copy(HERE / "guest_init.py", rootfs / "sbin/fusefs-init")
    os.chmod(rootfs / "sbin/fusefs-init", 0o755)
    subprocess.run(["chroot", str(rootfs), "ssh-keygen", "-A"], check=True,
                   stdout=subprocess.DEVNULL)
    (rootfs / "etc/fstab").write_text("/dev/vda / ext4 rw 0 1\n")
    (rootfs / "etc/hosts").write_text(hosts_file())


def hosts_file():
    from tests.vm.layout import MACHINES
    lines = ["127.0.0.1 localhost"]
    lines += [f"{m.address} {m.name}" for m in MACHINES]
    return "\n".join(lines) + "\n"


def copy_boot_files(rootfs, out):
    boot = rootfs / "boot"
    kernel = sorted(boot.glob("vmlinuz-*"))[-1]
    initrd = sorted(boot.glob("initrd.img-*"))[-1]
    shutil.copy(kernel, out / "vmlinuz")
    shutil.copy(initrd, out / "initrd.img")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent))
    ensure_host_tools()
    print(ensure_image())
