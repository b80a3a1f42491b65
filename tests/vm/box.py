"""A Vagrant box for libvirt, built from Debian packages only (no download of a box).

What it makes, in ``CACHE/box-<hash>/`` (default CACHE: /var/cache/fusefs-vm):
``fusefs-bookworm-libvirt.box``, a tar holding ``box.img`` (qcow2: one ext4 filesystem with no
partition table, root is /dev/vda), ``vmlinuz`` and ``initrd.img`` copied out of it,
``metadata.json`` and a ``Vagrantfile`` that tells vagrant-libvirt to boot that kernel and
initrd directly (so the disk needs no boot loader, and no loop device or partition tool is
needed to build it). The guest is a plain Debian 12 with systemd, sshd, sudo and ifupdown
(DHCP on eth0, which is how Vagrant reaches it), the user ``vagrant`` with Vagrant's public
insecure key and password-less sudo, and every package the Vagrantfile's provisioning and the
end-to-end scenarios need, so guests that reach nothing (FUSEFS_VM_OFFLINE=1) install nothing.

The hash covers this file, so an unchanged recipe reuses the cached box. A build killed half
way leaves only ``box-<hash>.partial``, removed by the next build; the final directory appears
by an atomic rename. Each VM makes its own ssh host keys and machine id at first boot.

Run: ``scripts/vagrant-box`` (prints the box's path; ``--add`` also ``vagrant box add``s it).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(os.environ.get("FUSEFS_VM_CACHE", "/var/cache/fusefs-vm"))
BOX_NAME = "fusefs/bookworm"
BOX_FILE = "fusefs-bookworm-libvirt.box"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DISK_GB = 4
PACKAGES = [
    "linux-image-amd64", "systemd", "systemd-sysv", "udev", "dbus", "openssh-server", "sudo",
    "ifupdown", "isc-dhcp-client", "iproute2", "netbase", "kmod", "procps", "psmisc",
    "util-linux", "e2fsprogs", "python3", "python3-venv", "fuse3", "libfuse2", "rsync", "git",
    "sqlite3", "attr", "tar", "diffutils",
]
# Timers that would only compete for the emulated CPU of a test VM.
MASKED = ["apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer", "e2scrub_all.timer",
          "fstrim.timer"]
VAGRANT_KEYS = ["/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub",
                "/opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub"]
CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet"
BOX_VAGRANTFILE = f"""\
# The fusefs test box (tests/vm/box.py): its disk has no boot loader, libvirt boots the kernel
# and initrd that sit beside this file.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "{CMDLINE}"
  end
end
"""


def say(message):
    print(f"vagrant-box: {message}", file=sys.stderr, flush=True)


def recipe_hash():
    return hashlib.sha256((HERE / "box.py").read_bytes()).hexdigest()[:16]


def vagrant_public_key():
    from glob import glob
    for pattern in VAGRANT_KEYS:
        found = sorted(glob(pattern))
        if found:
            return Path(found[-1]).read_text()
    raise SystemExit("vagrant-box: Vagrant's insecure public key (keys/vagrant.pub) not found: "
                     "install Vagrant first (apt-get install vagrant)")


def ensure_box(cache=DEFAULT_CACHE):
    """The path of the box file, building it first when this recipe has not been built."""
    final = cache / f"box-{recipe_hash()}"
    if (final / BOX_FILE).exists():
        say(f"box {final / BOX_FILE} (cached)")
        return final / BOX_FILE
    key = vagrant_public_key()
    partial = cache / (final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    build(partial, key)
    partial.rename(final)
    return final / BOX_FILE


def build(out, key):
    rootfs = out / "rootfs"
    say(f"step 1/4: mmdebstrap {SUITE} into {rootfs} (1-4 minutes)")
    subprocess.run(["mmdebstrap", "--variant=apt", "--include=" + ",".join(PACKAGES),
                    "--dpkgopt=path-exclude=*.mo", "--dpkgopt=path-exclude=/usr/share/man/*",
                    SUITE, str(rootfs), MIRROR], check=True, stdout=subprocess.DEVNULL)
    say("step 2/4: the vagrant user, networking, fstab, first-boot host keys")
    customize(rootfs, key)
    say("step 3/4: kernel and initrd out; mkfs.ext4 -d; qemu-img convert")
    image = out / "image"
    image.mkdir()
    shutil.copy(sorted((rootfs / "boot").glob("vmlinuz-*"))[-1], image / "vmlinuz")
    shutil.copy(sorted((rootfs / "boot").glob("initrd.img-*"))[-1], image / "initrd.img")
    raw = out / "root.raw"
    subprocess.run(["mkfs.ext4", "-q", "-L", "root", "-d", str(rootfs), str(raw),
                    f"{DISK_GB}G"], check=True)
    shutil.rmtree(rootfs)
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(image / "box.img")],
                   check=True)
    raw.unlink()
    say("step 4/4: the box (tar)")
    (image / "metadata.json").write_text(json.dumps(
        {"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_GB}) + "\n")
    (image / "Vagrantfile").write_text(BOX_VAGRANTFILE)
    with tarfile.open(out / BOX_FILE, "w") as tar:
        for name in ("metadata.json", "Vagrantfile", "box.img", "vmlinuz", "initrd.img"):
            tar.add(image / name, arcname=name)
    shutil.rmtree(image)


def chroot(rootfs, *argv):
    subprocess.run(["chroot", str(rootfs), *argv], check=True, stdout=subprocess.DEVNULL)


def write(path, text, mode=0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def customize(rootfs, key):
    write(rootfs / "etc/fstab", "/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    write(rootfs / "etc/hostname", "fusefs-box\n")
    write(rootfs / "etc/hosts", "127.0.0.1 localhost\n127.0.1.1 fusefs-box\n")
    write(rootfs / "etc/network/interfaces",
          "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\n"
          "auto eth0\niface eth0 inet dhcp\n")
    chroot(rootfs, "useradd", "--create-home", "--shell", "/bin/bash", "vagrant")
    write(rootfs / "etc/sudoers.d/vagrant", "vagrant ALL=(ALL) NOPASSWD: ALL\n", 0o440)
    ssh = rootfs / "home/vagrant/.ssh"
    write(ssh / "authorized_keys", key, 0o600)
    ssh.chmod(0o700)
    chroot(rootfs, "chown", "-R", "vagrant:vagrant", "/home/vagrant/.ssh")
    for old in (rootfs / "etc/ssh").glob("ssh_host_*"):
        old.unlink()   # every VM makes its own at first boot (the unit below)
    write(rootfs / "etc/systemd/system/ssh-host-keys.service",
          "[Unit]\nDescription=make the ssh host keys this machine lacks\nBefore=ssh.service\n\n"
          "[Service]\nType=oneshot\nExecStart=/usr/bin/ssh-keygen -A\n\n"
          "[Install]\nWantedBy=multi-user.target\n")
    chroot(rootfs, "systemctl", "enable", "ssh-host-keys.service")
    for unit in MASKED:
        link = rootfs / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (rootfs / "etc/machine-id").write_text("")   # made at first boot, one per VM


def add(box):
    subprocess.run(["vagrant", "box", "add", "--force", "--name", BOX_NAME, str(box)], check=True)


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(
        prog="scripts/vagrant-box",
        description="Build (or reuse) a libvirt Vagrant box of Debian 12 from Debian packages, "
                    "holding every package the Vagrantfile and the end-to-end scenarios need, "
                    "and print its path. Needs root, mmdebstrap, qemu-utils and Vagrant. Cached "
                    f"in {DEFAULT_CACHE}/box-<hash> (FUSEFS_VM_CACHE moves it). See docs/vagrant.md.",
        epilog=f"then: FUSEFS_VM_BOX={BOX_NAME} FUSEFS_VM_OFFLINE=1 "
               "FUSEFS_VM_LIBVIRT_DRIVER=qemu vagrant up. Exit 0 built or cached, 1 failed.")
    parser.add_argument("--add", action="store_true",
                        help=f"also `vagrant box add --force --name {BOX_NAME}` it")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        say("needs root (mmdebstrap, chroot)")
        return 1
    try:
        box = ensure_box()
        if args.add:
            add(box)
    except subprocess.CalledProcessError as e:
        say(f"failed: {e}")
        return 1
    print(box)
    return 0


if __name__ == "__main__":
    sys.exit(main())
