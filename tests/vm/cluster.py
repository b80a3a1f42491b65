"""Boots, power-cuts, restarts and tears down the suite's QEMU machines.

One ``Cluster`` owns a work directory (the per-VM qcow2 overlays on the cached base image, the
serial consoles, the monitor sockets, the 9p share) and every QEMU process it starts, by PID.

Network, per VM: NIC 1 is QEMU's user network with ``restrict=on`` (the guest reaches nothing;
the host reaches the guest's sshd through one forwarded loopback port); NIC 2 is a multicast
socket on 127.0.0.1 with a random group and port per cluster, the private L2 network between
the VMs. Nothing routes from either to the outside.

States of a machine: down (no QEMU) -> booting (QEMU running, sshd not answering) -> up.
``power_cut`` is ``kill -9`` of its QEMU: the guest's unflushed page cache is lost, its overlay
stays. ``start`` on the same overlay boots it again. ``close`` kills every QEMU still running
and removes the work directory; callers run it from ``finally`` and from signal handlers, so
nothing outlives the suite, including on failure or Ctrl-C.
"""
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.vm.guest import GuestShell
from tests.vm.layout import MACHINES, NETWORK_PREFIX

BOOT_TIMEOUT = 240.0
SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5", "-o", "BatchMode=yes"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_kvm():
    """Real hardware virtualization only: KVM with PVM runs stock kernels far slower than TCG."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    return any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))


class Cluster(GuestShell):
    """The running VMs of one suite run; see the module docstring."""

    # how the scenarios (tests.vm.e2e) reach the project inside these guests: the host's
    # read-only share holds it (pip install --target), the secret and the probe
    python = "PYTHONPATH=/opt/fusefs/site python3"
    secret = "/opt/fusefs/secret"
    probe = "/opt/fusefs/probe.py"
    server_log_tail = "tail -5 /var/log/blockserver.log"

    def __init__(self, image, share, log):
        self.image = Path(image)
        self.work = Path(tempfile.mkdtemp(prefix="fusefs-vm-"))
        self.share = share
        self.log = log
        self.processes = {}
        self.ports = {m.name: free_port() for m in MACHINES}
        self.mcast = f"230.{random.randint(1, 254)}.{random.randint(1, 254)}." \
                     f"{random.randint(1, 254)}:{random.randint(20000, 60000)}"

    # -- lifecycle -------------------------------------------------------------------------
    def create_disks(self, machines):
        for m in machines:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                            "-b", str(self.image / "base.qcow2"), str(self.disk(m))], check=True)

    def disk(self, m):
        return self.work / f"{m.name}.qcow2"

    def start(self, m):
        console = open(self.work / f"{m.name}.console", "ab")
        self.processes[m.name] = subprocess.Popen(
            self.qemu_command(m), stdin=subprocess.DEVNULL, stdout=console,
            stderr=subprocess.STDOUT, start_new_session=True)
        console.close()

    def qemu_command(self, m):
        accel = ["-accel", "kvm", "-cpu", "host"] if use_kvm() else \
            ["-accel", "tcg,thread=multi,tb-size=128", "-cpu", "max"]
        append = (f"root=/dev/vda rw console=ttyS0 init=/sbin/fusefs-init quiet net.ifnames=0 "
                  f"fusefs.name={m.name} fusefs.ip={m.address}/{NETWORK_PREFIX}")
        return ["qemu-system-x86_64", "-name", m.name, *accel, "-m", "384", "-smp", "1",
                "-nodefaults", "-display", "none", "-serial", "stdio",
                "-monitor", f"unix:{self.work / (m.name + '.monitor')},server,nowait",
                "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
                "-append", append,
                "-drive", f"file={self.disk(m)},if=virtio,format=qcow2",
                "-netdev", f"user,id=ssh,restrict=on,hostfwd=tcp:127.0.0.1:{self.ports[m.name]}-:22",
                "-device", f"virtio-net-pci,netdev=ssh,mac=52:54:00:17:00:{m.index:02x}",
                "-netdev", f"socket,id=lan,mcast={self.mcast},localaddr=127.0.0.1",
                "-device", f"virtio-net-pci,netdev=lan,mac=52:54:00:17:01:{m.index:02x}",
                "-virtfs", f"local,path={self.share},mount_tag=fusefs,security_model=none,"
                           "readonly=on"]

    def wait_up(self, machines, timeout=BOOT_TIMEOUT):
        deadline = time.monotonic() + timeout
        waiting = list(machines)
        while waiting:
            for m in list(waiting):
                if self.processes[m.name].poll() is not None:
                    raise RuntimeError(f"{m.name}: QEMU exited; see {self.work}/{m.name}.console")
                if self.ssh(m, "true", timeout=10, check=False).returncode == 0:
                    waiting.remove(m)
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"{', '.join(m.name for m in waiting)} not up after "
                                   f"{timeout:.0f} s; see the consoles in {self.work}")
            if waiting:
                time.sleep(2)

    def power_cut(self, m):
        """kill -9 of the VM's QEMU: a power cut for the guest (its page cache is lost)."""
        process = self.processes.pop(m.name)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def monitor(self, m, command):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.work / f"{m.name}.monitor"))
            s.sendall(command.encode() + b"\n")
            time.sleep(0.5)

    def cut_link(self, m):
        """Partition: the VM's private NIC loses its carrier (QEMU's monitor)."""
        self.monitor(m, "set_link lan off")

    def restore_link(self, m):
        self.monitor(m, "set_link lan on")

    def close(self):
        for name, process in list(self.processes.items()):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
            del self.processes[name]
        if os.environ.get("FUSEFS_VM_KEEP"):
            self.log(f"kept {self.work} (FUSEFS_VM_KEEP)")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- commands in the guests ---------------------------------------------------------------
    def ssh_argv(self, m, command):
        return ["ssh", *SSH_OPTIONS, "-i", str(self.image / "id_ed25519"),
                "-p", str(self.ports[m.name]), "root@127.0.0.1", command]

    # -- the block server in a server VM (data on the VM's own disk) --------------------------
    def start_server(self, m):
        self.spawn(m, f"exec env {self.python} -m blockserver serve --data /var/lib/bs "
                      f"--listen 0.0.0.0:7001 --secret-file {self.secret}", "blockserver")

    def stop_server(self, m):
        """A clean stop (SIGTERM), as a service manager restarting it does."""
        # "[b]" keeps the patterns from matching this very command line
        self.ssh(m, "pkill -TERM -f '[b]lockserver serve' && "
                    "while pgrep -f '[b]lockserver serve' >/dev/null; do sleep 0.2; done",
                 timeout=120)
