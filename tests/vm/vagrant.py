"""The VM suite's cluster on machines the user brought up with ``vagrant up`` (the Vagrantfile).

A ``VagrantCluster`` gives the scenarios (``tests.vm.e2e.Suite``) the same interface as the QEMU
cluster (``tests.vm.cluster.Cluster``), on the Vagrantfile's machines: it finds them in
``vagrant/.state/inventory.json`` (names, roles, private addresses, provider), reaches them with
ssh from one ``vagrant ssh-config`` as the ``vagrant`` user (every command runs as root through
``sudo -n sh -c``), and drives the provider for faults: a power cut is ``virsh destroy`` (libvirt)
or ``VBoxManage controlvm ID poweroff`` (VirtualBox), never ``vagrant halt``; power on is ``virsh
start`` / ``VBoxManage startvm --type headless``; a partition sets the link of the NIC on the
private network down and up. The block server is the systemd service ``fusefs-blockserver``.

It never creates or destroys a VM. ``attach`` refuses (``Unavailable``, saying what to run)
when the inventory is missing or a machine the plan needs is not running, then resets what a
run depends on: on every client, stale probe writers are killed, the mount at /mnt/fs is
unmounted and the caches and scenario logs are removed; on every block server the service is
stopped and its data (/srv/fusefs/blocks) is DELETED, so the suite's mkfs starts from empty
servers. That destroys any fusefs filesystem on those machines; nothing else is touched.

States of a machine: running -> cut (after ``power_cut``; remembered) -> running (``start``).
``close`` boots every machine still cut and starts its block server, so the user's machines
are left running; a crash of the runner itself can leave a cut machine off (``vagrant up``
boots it).
"""
import base64
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from tests.vm.guest import GuestShell
from tests.vm.layout import Machine

BOOT_TIMEOUT = 600.0
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
               "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
MNT = "/mnt/fs"
SERVICE = "fusefs-blockserver"
DATA = "/srv/fusefs/blocks"
PRIVATE_NETWORK = "fusefs-private"


class Unavailable(Exception):
    """The Vagrant machines cannot be used as they are; the message says what to run."""


def read_inventory(root):
    path = Path(root) / "vagrant/.state/inventory.json"
    if not path.exists():
        raise Unavailable(f"{path} is missing: bring the machines up first, e.g. "
                          "`FUSEFS_VM_SERVERS=3 FUSEFS_VM_CLIENTS=1 vagrant up` for --smoke or "
                          "`vagrant up` for the full set (docs/vagrant.md)")
    return json.loads(path.read_text())


def machines_of(inventory):
    """Machine objects for every machine of the inventory, in its order."""
    return [Machine(m["name"], m["role"], i, m["address"])
            for i, m in enumerate(inventory["machines"], 1)]


class VagrantCluster(GuestShell):
    """The user's running Vagrant machines, for one suite run; see the module docstring."""

    python = "/opt/fusefs/venv/bin/python"
    secret = "/etc/fusefs/secret"
    probe = "/opt/fusefs/probe.py"    # copied from this checkout by attach()
    server_log_tail = f"journalctl -u {SERVICE} -n 5 --no-pager -o cat"

    def __init__(self, root, inventory, log):
        self.root = Path(root)
        self.provider = inventory["provider"]
        if self.provider not in ("libvirt", "virtualbox"):
            raise Unavailable(f"provider {self.provider!r}: --vagrant drives libvirt or virtualbox")
        self.log = log
        self.all = {m.name: m for m in machines_of(inventory)}
        self.cut = set()
        self.used = []    # the machines of this run, the only ones asked about
        self.ssh_config = Path(tempfile.mkstemp(prefix="fusefs-vagrant-ssh-")[1])
        self.virsh = ["virsh", "-c", os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system")]

    @classmethod
    def attach(cls, root, servers, clients, log):
        """The cluster for these machine names, checked running and reset (see the docstring)."""
        cluster = cls(root, read_inventory(root), log)
        cluster.used = list(servers) + list(clients)
        try:
            cluster.check(cluster.used)
            cluster.refresh_ssh_config(cluster.used)
            cluster.reset(cluster.machines(servers), cluster.machines(clients))
        except BaseException:
            cluster.ssh_config.unlink(missing_ok=True)
            raise
        return cluster

    def machines(self, names):
        return [self.all[n] for n in names]

    # -- the provider ---------------------------------------------------------------------------
    def provider_id(self, name):
        path = self.root / ".vagrant/machines" / name / self.provider / "id"
        return path.read_text().strip() if path.exists() else None

    def running(self, name):
        vm = self.provider_id(name)
        if vm is None:
            return False
        if self.provider == "libvirt":
            out = subprocess.run([*self.virsh, "domstate", vm], capture_output=True, text=True)
            return out.returncode == 0 and out.stdout.strip() == "running"
        out = subprocess.run(["VBoxManage", "showvminfo", vm, "--machinereadable"],
                             capture_output=True, text=True)
        return 'VMState="running"' in out.stdout

    def check(self, names):
        missing = [n for n in names if n not in self.all]
        if missing:
            servers = sum(1 for n in names if n.startswith("bs"))
            clients = len(names) - servers
            raise Unavailable(f"the Vagrant cluster has no {', '.join(missing)}: run "
                              f"`FUSEFS_VM_SERVERS={servers} FUSEFS_VM_CLIENTS={clients} "
                              "vagrant up` (after `vagrant destroy -f` if it runs with fewer)")
        down = [n for n in names if not self.running(n)]
        if down:
            raise Unavailable(f"not running: {', '.join(down)}; run `vagrant up {' '.join(down)}` "
                              "with the same FUSEFS_VM_* settings as before")

    def provider_command(self, action, name):
        vm = self.provider_id(name)
        if self.provider == "libvirt":
            argv = {"cut": ["destroy", vm], "start": ["start", vm]}[action]
            return [*self.virsh, *argv]
        argv = {"cut": ["controlvm", vm, "poweroff"],
                "start": ["startvm", vm, "--type", "headless"]}[action]
        return ["VBoxManage", *argv]

    def power_cut(self, m):
        """A hard power-off through the provider: the guest's unflushed page cache is lost."""
        subprocess.run(self.provider_command("cut", m.name), check=True, capture_output=True)
        self.cut.add(m.name)

    def start(self, m):
        subprocess.run(self.provider_command("start", m.name), check=True, capture_output=True)
        self.cut.discard(m.name)

    def set_link(self, m, up):
        vm = self.provider_id(m.name)
        if self.provider == "virtualbox":   # adapter 2 is the private network
            argv = ["VBoxManage", "controlvm", vm, "setlinkstate2", "on" if up else "off"]
        else:
            argv = [*self.virsh, "domif-setlink", vm, self.private_mac(vm), "up" if up else "down"]
        subprocess.run(argv, check=True, capture_output=True)

    def private_mac(self, vm):
        rows = subprocess.run([*self.virsh, "domiflist", vm], check=True, capture_output=True,
                              text=True).stdout.splitlines()
        for row in rows:
            fields = row.split()
            if len(fields) == 5 and fields[2] == PRIVATE_NETWORK:
                return fields[4]
        raise RuntimeError(f"{vm}: no interface on the libvirt network {PRIVATE_NETWORK}")

    def cut_link(self, m):
        """Partition: the machine's NIC on the private network loses its link."""
        self.set_link(m, False)

    def restore_link(self, m):
        self.set_link(m, True)

    # -- ssh ------------------------------------------------------------------------------------
    def refresh_ssh_config(self, names):
        out = subprocess.run(["vagrant", "ssh-config", *names], cwd=self.root, capture_output=True,
                             text=True, timeout=300)
        if out.returncode != 0:
            raise Unavailable(f"`vagrant ssh-config` failed: {out.stderr.strip()[-500:]}")
        self.ssh_config.write_text(out.stdout)

    def try_refresh_ssh_config(self):
        """Addresses again for every machine not powered off; a failure (a machine still
        without a DHCP lease) keeps the old file."""
        try:
            self.refresh_ssh_config([n for n in self.used if n not in self.cut])
        except (Unavailable, subprocess.TimeoutExpired) as e:
            self.log(f"  vagrant ssh-config failed, keeping the old one: {e}")

    def ssh_argv(self, m, command):
        """`command` runs as root in the guest; it travels base64-encoded, so no process on
        the way (login shell, sudo, sh) has its text in its command line, and a ``pkill -f``
        in it cannot match the shell running it."""
        encoded = base64.b64encode(command.encode()).decode()
        return ["ssh", "-F", str(self.ssh_config), *SSH_OPTIONS, m.name,
                f"sudo -n sh -c 'eval \"$(echo {encoded} | base64 -d)\"'"]

    def answers(self, m):
        try:
            return self.ssh(m, "true", timeout=30, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def wait_up(self, machines, timeout=BOOT_TIMEOUT):
        """Poll until ssh answers on every machine; ask Vagrant for addresses again now and then
        (the management network's DHCP could give a booted machine another one)."""
        deadline = time.monotonic() + timeout
        refreshed = time.monotonic()
        waiting = list(machines)
        while waiting:
            waiting = [m for m in waiting if not self.answers(m)]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{', '.join(m.name for m in waiting)}: no ssh after "
                                   f"{timeout:.0f} s (see `vagrant ssh-config`, virsh console)")
            if time.monotonic() - refreshed > 60:
                self.try_refresh_ssh_config()
                refreshed = time.monotonic()
            time.sleep(3)

    # -- the block server -----------------------------------------------------------------------
    def start_server(self, m):
        self.ssh(m, f"systemctl start {SERVICE}", timeout=120)

    def stop_server(self, m):
        """A clean stop; systemctl returns once the process is gone."""
        self.ssh(m, f"systemctl stop {SERVICE}", timeout=180)

    # -- before and after a run -----------------------------------------------------------------
    def install_probe(self, m):
        probe = (Path(__file__).resolve().parent / "probe.py").read_text()
        self.ssh(m, f"install -d -m 0755 {os.path.dirname(self.probe)} && "
                    f"cat > {self.probe}.tmp && mv {self.probe}.tmp {self.probe}", input=probe,
                 timeout=60)

    def reset(self, servers, clients):
        """Empty block servers (data deleted, service stopped) and clients with nothing mounted."""
        for m in clients:
            self.log(f"reset {m.name}: stop writers, unmount {MNT}, remove caches and logs")
            self.ssh(m, f"pkill -KILL -f '{self.probe} write ' || true; "
                        f"if grep -q ' {MNT} ' /proc/mounts; then timeout 60 {self.python} -m "
                        f"fusefs umount {MNT} </dev/null >/dev/null 2>&1 || true; fi; "
                        "pkill -KILL -f -- '-m fusefs mount' || true; "
                        f"if grep -q ' {MNT} ' /proc/mounts; then umount -l {MNT}; fi; "
                        "rm -rf /var/cache/fusefs /var/cache/fusefs-* /var/log/s[0-9].* "
                        "/var/log/mount.log", timeout=180)
        for m in servers:
            self.log(f"reset {m.name}: stop {SERVICE}, delete its data in {DATA}")
            self.ssh(m, f"systemctl stop {SERVICE} && test -d {DATA} && "
                        f"find {DATA} -mindepth 1 -delete", timeout=300)
        for m in servers + clients:
            self.install_probe(m)

    def close(self):
        """Boot every machine left powered off by a scenario; remove the ssh config."""
        try:
            for name in sorted(self.cut):
                m = self.all[name]
                self.log(f"booting {name} again (it was power-cut)")
                self.start(m)
                self.wait_up([m])
                if m.role == "server":
                    self.start_server(m)
        finally:
            self.ssh_config.unlink(missing_ok=True)
