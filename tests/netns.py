"""Network namespaces for the multi-host tests: one namespace per block server and per
client, each with its own address, wired through veth pairs into a bridge.

Layout of one `Network` (X is a /24 picked free at creation, 10.77.X.0/24):

    hub namespace  "fz<pid>-<X>-hub": bridge br0, one veth end per host, no address
    host namespace "fz<pid>-<X>-<name>": veth `eth0` at 10.77.X.<n>, and `lo`
    this machine:  veth `fzh<pid>x<X>` at 10.77.X.254, so the test process itself can
                   reach every server (its checks and the servers' readiness polls)

No namespace has a default route, and nothing forwards: the namespaces reach each other
and the test process, nothing else. A partition is `cut(name)` (the host's veth end in
the hub goes down; its own end stays up, as when a cable is pulled at the switch);
`restore(name)` brings it back. `shape(name, rate)` limits a host's link with `tc tbf`;
`delay_loss(name, ...)` uses `tc netem` and raises `Unsupported` on a kernel without it.

Processes: `command(name, argv)` prefixes argv so it runs with the host's network
namespace only (`nsenter --net`), and a hostname of its own (`unshare --uts`), so a
fusefs lease taken there names another machine. The mount namespace stays this
machine's: a FUSE mount made by a client is visible to the test. (`ip netns exec`
would unshare the mount namespace and hide it.)

States: created -> hosts added -> `close()`: every process still in one of the
namespaces is killed (SIGKILL), then every namespace is deleted, which deletes the veth
pairs and the bridge with them. `close()` is idempotent. A test process that dies before
`close()` leaves namespaces named after its pid: `sweep_stale()` (run when a Network is
made) kills what runs in them and deletes them once that pid no longer runs.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import time

PREFIX = "fz"
NETNS_DIR = "/run/netns"
LOCK = "/run/lock/fusefs-netns.lock"
_NAME = re.compile(rf"^{PREFIX}(\d+)-(\d+)-")


class Unsupported(RuntimeError):
    """This machine cannot do what was asked (no `ip`, not root, a qdisc the kernel lacks)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def available() -> str | None:
    """None when namespaces can be made here, else why not (for a skip message)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "nsenter", "unshare"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"the {tool} command is missing (scripts/setup.sh installs iproute2)"
    return None


def has_qdisc(*qdisc: str) -> bool:
    """True if this kernel has the qdisc (tried on `lo` of a throwaway namespace)."""
    probe = f"{PREFIX}{os.getpid()}-252-probe"  # (subnet 252: never one a Network picks)
    _ip("netns", "add", probe)
    try:
        return subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", *qdisc],
                              capture_output=True, timeout=30).returncode == 0
    finally:
        _ip("netns", "delete", probe, check=False)


def _pids_in(namespace: str) -> list[int]:
    result = _ip("netns", "pids", namespace, check=False)
    return [int(p) for p in result.stdout.split()]


def _kill_and_delete(namespace: str) -> None:
    """SIGKILL everything in the namespace (until nothing is left), then delete it."""
    deadline = time.monotonic() + 10
    while (pids := _pids_in(namespace)) and time.monotonic() < deadline:
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)
    _ip("netns", "delete", namespace, check=False)


def _ours() -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if _NAME.match(n))
    except FileNotFoundError:
        return []


def sweep_stale() -> list[str]:
    """Delete the namespaces of test processes that no longer run; return their names."""
    stale = []
    for name in _ours():
        pid = int(_NAME.match(name).group(1))
        if not os.path.exists(f"/proc/{pid}"):
            _kill_and_delete(name)
            stale.append(name)
    return stale


def _free_subnet() -> int:
    """An X such that 10.77.X.0/24 is neither routed here nor used by another Network."""
    used = set(int(m) for m in re.findall(r"10\.77\.(\d+)\.", _ip("-4", "route").stdout))
    used |= {int(_NAME.match(n).group(2)) for n in _ours()}
    for x in range(1, 250):
        if x not in used:
            return x
    raise Unsupported("no free 10.77.X.0/24 subnet (250 test networks exist)")


class Network:
    """A private network of named hosts (see the module docstring)."""

    def __init__(self):
        sweep_stale()
        self.hosts: dict[str, str] = {}  # name -> address
        self.namespaces: list[str] = []
        os.makedirs(os.path.dirname(LOCK), exist_ok=True)
        with open(LOCK, "w") as lock:  # two test runs must not pick the same subnet
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = _free_subnet()
            self.hub = self._namespace("hub")
        try:
            self._wire_hub()
        except BaseException:
            self.close()
            raise

    def _namespace(self, role: str) -> str:
        name = f"{PREFIX}{os.getpid()}-{self.subnet}-{role}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        return name

    def _wire_hub(self) -> None:
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        outside = self.outside
        _ip("link", "add", outside, "type", "veth", "peer", "name", "p-test",
            "netns", self.hub)
        self._attach("p-test")
        _ip("addr", "add", f"10.77.{self.subnet}.254/24", "dev", outside)
        _ip("link", "set", outside, "up")

    @property
    def outside(self) -> str:
        """The name of this machine's veth end on the network."""
        return f"fzh{os.getpid()}x{self.subnet}"[:15]

    def _attach(self, port: str) -> None:
        _ip("-n", self.hub, "link", "set", port, "master", "br0")
        _ip("-n", self.hub, "link", "set", port, "up")

    @property
    def test_address(self) -> str:
        """The test process's own address on this network."""
        return f"10.77.{self.subnet}.254"

    def add_host(self, name: str) -> str:
        """A new namespace `name` on the network; returns its address."""
        if name in self.hosts or not re.fullmatch(r"[a-z0-9]{1,8}", name):
            raise ValueError(f"bad or duplicate host name {name!r}")
        namespace = self._namespace(name)
        address = f"10.77.{self.subnet}.{len(self.hosts) + 1}"
        _ip("link", "add", "eth0", "netns", namespace, "type", "veth",
            "peer", "name", f"p-{name}", "netns", self.hub)
        self._attach(f"p-{name}")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        self.hosts[name] = address
        return address

    def namespace(self, name: str) -> str:
        return f"{PREFIX}{os.getpid()}-{self.subnet}-{name}"

    def command(self, name: str, argv: list[str]) -> list[str]:
        """argv run in host `name`'s network namespace, with hostname `name`."""
        return ["nsenter", f"--net={NETNS_DIR}/{self.namespace(name)}", "unshare", "--uts",
                "sh", "-c", 'hostname "$0" && exec "$@"', f"{name}-{self.subnet}", *argv]

    def cut(self, name: str) -> None:
        """Partition host `name`: its port on the bridge goes down."""
        _ip("-n", self.hub, "link", "set", f"p-{name}", "down")

    def restore(self, name: str) -> None:
        _ip("-n", self.hub, "link", "set", f"p-{name}", "up")

    def _links(self, name: str) -> list[tuple[str, str]]:
        """(namespace, device) of both ends of host `name`'s link: what it sends leaves
        through its eth0, what it receives leaves the hub through p-NAME."""
        return [(self.namespace(name), "eth0"), (self.hub, f"p-{name}")]

    def _tc(self, name: str, *qdisc: str) -> None:
        for namespace, device in self._links(name):
            result = subprocess.run(["tc", "-n", namespace, "qdisc", "replace", "dev", device,
                                     "root", *qdisc], capture_output=True, text=True,
                                    timeout=30)
            if result.returncode != 0:
                self.unshape(name)
                if "unknown" in result.stderr.lower():
                    raise Unsupported(f"this kernel has no {qdisc[0]} qdisc")
                raise RuntimeError(f"tc {' '.join(qdisc)}: {result.stderr.strip()}")

    def shape(self, name: str, rate: str = "8mbit") -> None:
        """Limit host `name`'s link to `rate` each way (a token bucket, `tc tbf`)."""
        self._tc(name, "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")

    def delay_loss(self, name: str, delay_ms: int = 0, loss_percent: float = 0) -> None:
        """Delay and drop packets on host `name`'s link each way (`tc netem`; raises
        Unsupported on a kernel built without it)."""
        self._tc(name, "netem", "delay", f"{delay_ms}ms", "loss", f"{loss_percent}%")

    def unshape(self, name: str) -> None:
        """Host `name`'s link at full speed again (no qdisc of ours on either end)."""
        for namespace, device in self._links(name):
            subprocess.run(["tc", "-n", namespace, "qdisc", "del", "dev", device, "root"],
                           capture_output=True, timeout=30)

    def close(self) -> None:
        """Kill every process in the namespaces, then delete them (hosts first)."""
        for namespace in reversed(self.namespaces):
            _kill_and_delete(namespace)
        _ip("link", "delete", self.outside, check=False)  # (gone with the hub, eventually)
        self.namespaces = []
        self.hosts = {}
