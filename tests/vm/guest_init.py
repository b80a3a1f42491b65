#!/usr/bin/python3
"""PID 1 of every test VM (instead of systemd, which takes 30 s more to boot under TCG).

Mounts /proc, /sys, /dev and the host's read-only share (tag ``fusefs``, at /opt/fusefs: the
project installed with ``pip install --target`` and the test secret), gives eth0 the address
QEMU's user network expects (ssh comes in through a host port forward) and eth1 the address
named by ``fusefs.ip=`` on the kernel command line (the private network between the VMs), sets
the hostname from ``fusefs.name=``, starts sshd, then reaps orphans forever.

State: none of its own. A power cut (QEMU killed) loses whatever the guest had not flushed; on
the next boot this script runs again from the start. It never exits (PID 1 must not).
"""
import os
import subprocess
import time


def run(*argv):
    subprocess.run(argv, check=False)


def kernel_options():
    with open("/proc/cmdline") as f:
        words = f.read().split()
    return dict(w.split("=", 1) for w in words if w.startswith("fusefs.") and "=" in w)


def mount_basics():
    for kind, where in (("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev"),
                        ("tmpfs", "/run"), ("tmpfs", "/tmp")):
        os.makedirs(where, exist_ok=True)
        if not os.path.ismount(where):  # the initramfs moves /proc, /sys, /dev over
            run("mount", "-t", kind, kind, where)
    os.makedirs("/dev/pts", exist_ok=True)
    run("mount", "-t", "devpts", "devpts", "/dev/pts")
    run("mount", "-o", "remount,rw", "/")
    for module in ("virtio_net", "fuse", "9p", "9pnet_virtio"):
        run("modprobe", module)
    os.makedirs("/opt/fusefs", exist_ok=True)
    run("mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,ro", "fusefs", "/opt/fusefs")


def wait_for_nics(names, timeout=30.0):
    """The virtio NICs appear a moment after their module loads (no udev here to wait on)."""
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(f"/sys/class/net/{n}") for n in names):
        if time.monotonic() > deadline:
            print("fusefs-vm: NICs missing; have", os.listdir("/sys/class/net"), flush=True)
            return
        time.sleep(0.2)


def configure_network(options):
    wait_for_nics(["eth0", "eth1"])
    run("ip", "link", "set", "lo", "up")
    run("ip", "addr", "add", "10.0.2.15/24", "dev", "eth0")
    run("ip", "link", "set", "eth0", "up")
    if "fusefs.ip" in options:
        run("ip", "addr", "add", options["fusefs.ip"], "dev", "eth1")
        run("ip", "link", "set", "eth1", "up")
    name = options.get("fusefs.name", "guest")
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(name)


def start_sshd():
    os.makedirs("/run/sshd", exist_ok=True)
    run("/usr/sbin/sshd")


def reap_forever():
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(1)


def main():
    os.environ["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    mount_basics()
    configure_network(kernel_options())
    start_sshd()
    print("fusefs-vm: ready", flush=True)
    reap_forever()


if __name__ == "__main__":
    main()
