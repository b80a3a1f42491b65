"""The multi-host scenarios on network namespaces: four block servers (bs1..bs4) and two
clients (c1, c2), each in a network namespace of its own with its own address on one
private network (tests/netns.py), R=3, W=2, the servers signing every request.

These are the end-to-end scenarios of issue 17 that need no kernel of their own: a
server killed with kill -9 under load, a client's daemon killed and another client
taking over, a server's link cut and restored, one writer at a time across clients, a
rolling restart of every server. Each client has its own hostname, so a lease a dead
client held must expire before the other client may write (as between two machines).

Every namespace, process and mount a test makes is removed at teardown, also when it
fails; namespaces an earlier run left behind are swept first. The log policy of
tests/support.py applies to every server and daemon.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from . import netns
from .conftest import _MOUNTS, _SERVERS  # (a failed test's report shows these logs)
from .support import (REPO, BlockServer, Mount, ServerSet, WriteLoad, alive, check_files,
                      cleanup_all, sha256_of, wait_until)

pytestmark = pytest.mark.skipif(netns.available() is not None,
                                reason=netns.available() or "")

LEASE = "3"  # seconds: a dead client's lease expires quickly
PORT = 7001  # every server has an address of its own, so all use one port
SECRET = b"netns-suite-secret-0123456789abcdef"


class NetServer(BlockServer):
    """A block server running in host `host`'s namespace, listening on its address."""

    def __init__(self, net: netns.Network, host: str, data_dir: str, log_path: str,
                 args: list[str]):
        super().__init__(data_dir, log_path, args, SECRET)
        self.net, self.host = net, host
        self.address = net.add_host(host)
        self.port = PORT

    def _command(self) -> list[str]:
        return self.net.command(self.host, [
            sys.executable, "-m", "blockserver", "serve", "--data", self.data_dir,
            "--listen", f"{self.address}:{self.port}", *self.args])


class NetMount(Mount):
    """A fusefs mount whose commands (and so its daemon) run in client `host`'s
    namespace; the mount itself is in this machine's mount namespace."""

    def __init__(self, net: netns.Network, host: str, servers, path: str, cache_dir: str,
                 secret_file: str):
        super().__init__(servers, path, cache_dir, secret_file)
        self.net, self.host = net, host

    def cli(self, *args: str, check: bool = True, timeout: float = 120):
        argv = self.net.command(self.host, [sys.executable, "-m", "fusefs", *args])
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                cwd=REPO)
        if check and result.returncode != 0:
            raise AssertionError(f"fusefs {' '.join(args)} on {self.host} failed:\n"
                                 f"{result.stderr}")
        return result


class Cluster:
    """The namespaces, the four servers and the clients' mounts of one test."""

    def __init__(self, directory: str):
        self.directory = directory
        self.net = netns.Network()
        self.servers = ServerSet(directory)
        self.mounts: list[NetMount] = []
        self.secret_file = os.path.join(directory, "secret")
        with open(self.secret_file, "wb") as f:
            f.write(SECRET)

    def start(self, n: int = 4) -> None:
        """Two client hosts and n servers (bs1..bsN), started."""
        self.net.add_host("c1")
        self.net.add_host("c2")
        for i in range(1, n + 1):
            server = NetServer(self.net, f"bs{i}", os.path.join(self.directory, f"bs{i}"),
                               os.path.join(self.directory, f"bs{i}.log"),
                               ["--secret-file", self.secret_file])
            self.servers.append(server)
            server.start()

    def client(self, host: str) -> NetMount:
        m = NetMount(self.net, host, self.servers, os.path.join(self.directory, f"mnt-{host}"),
                     os.path.join(self.directory, f"cache-{host}"), self.secret_file)
        os.makedirs(m.path, exist_ok=True)
        self.mounts.append(m)
        return m

    def close(self) -> None:
        cleanup_all([*(m.cleanup for m in self.mounts), self.servers.stop_all,
                     self.net.close], "taking the namespace cluster down")

    def problems(self, allowed) -> list[str]:
        return self.servers.unexpected_problems(allowed) + \
            [line for m in self.mounts for line in m.unexpected_problems(allowed)]


@pytest.fixture
def cluster(tmp_path, request):
    """Four servers in namespaces, formatted (R=3, W=2); clients made with
    `cluster.client("c1")`. Teardown removes everything, then applies the log policy."""
    c = Cluster(str(tmp_path))
    request.node.stash[_SERVERS], request.node.stash[_MOUNTS] = c.servers, c.mounts
    try:
        c.start()
        admin = c.client("c1")
        admin.cli("mkfs", *admin.cluster_args(), "--replicas", "3", "--write-quorum", "2")
        c.mounts.remove(admin)
        yield c
    finally:
        c.close()
    allowed = [re.compile(p) for mark in request.node.iter_markers("expect_log")
               for p in mark.args]
    problems = c.problems(allowed)
    if problems:
        pytest.fail("unexpected errors logged:\n" + "\n".join(problems[:20]))


def _repair_check(m: NetMount) -> dict:
    result = m.cli("repair", *m.cluster_args(), "--check", "--json", check=False)
    assert result.returncode in (0, 1), result.stderr
    return {"ok": result.returncode == 0, **json.loads(result.stdout)}


def _healed(m: NetMount) -> dict:
    """Waits until every live block has R healthy copies on its homes."""
    return wait_until(lambda: (r := _repair_check(m))["ok"] and r, "every block at R copies",
                      timeout=120, interval=1)


def _stored(server: NetServer) -> set[str]:
    """The ids of the blocks a server holds on disk (read beside it, not asked over HTTP)."""
    root = os.path.join(server.data_dir, "blocks")
    return {name for prefix in os.listdir(root) for name in os.listdir(os.path.join(root, prefix))}


def _check_manifest(written: dict[str, str], old_root: str, new_root: str) -> None:
    check_files(new_root, {os.path.relpath(p, old_root): d for p, d in written.items()})


# -- the scenarios --------------------------------------------------------------------------

def test_a_server_killed_mid_workload_costs_no_error_and_heals(cluster):
    """(2) bs2 is killed with kill -9 while c1 writes and reads: no operation fails; bs2
    starts again on its data and every block gets back to 3 healthy copies."""
    m = cluster.client("c1")
    m.mount("--lease-seconds", LEASE)
    victim = cluster.servers[1]
    with WriteLoad(os.path.join(m.path, "w")) as load:
        load.wait_for(3, "before the kill")
        victim.kill()
        held = _stored(victim)
        load.wait_for(4, "with bs2 dead")
        assert _stored(victim) == held  # it was down for real
        victim.start()
        load.wait_for(3, "after bs2 is back")
    assert load.errors == []
    report = _healed(m)
    assert report["survey"]["under_replicated"] == 0
    assert _stored(victim) - held  # it got the copies it missed (3 per block: above)
    check_files(m.path, {os.path.relpath(p, m.path): d for p, d in load.written.items()})


def test_a_client_killed_mid_write_loses_no_fsynced_file(cluster):
    """(4) c1's daemon is killed with kill -9 while it writes; c2 mounts with an empty
    cache once c1's lease has expired, and finds every file c1's fsync acknowledged."""
    c1, c2 = cluster.client("c1"), cluster.client("c2")
    c1.mount("--lease-seconds", LEASE)
    with WriteLoad(os.path.join(c1.path, "w")) as load:
        load.wait_for(6, "before the kill")
        pid = c1.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), "c1's daemon to die")
        c1.force_unmount()
    manifest = dict(load.written)
    assert len(manifest) >= 6
    refused = c2.cli("mount", *c2.cluster_args(), "--cache-dir", c2.cache_dir,
                     "--lease-seconds", LEASE, c2.path, check=False)
    if refused.returncode != 0:  # the lease of c1 (another host) has not expired yet
        assert "--read-only" in refused.stderr, refused.stderr
        wait_until(lambda: c2.cli("mount", *c2.cluster_args(), "--cache-dir", c2.cache_dir,
                                  "--lease-seconds", LEASE, c2.path,
                                  check=False).returncode == 0,
                   "c2 to take the lease over", timeout=60, interval=1)
    # c1 was another host: its lease was taken over only once it had expired
    assert re.search(rf"taking over the writer lease from pid {pid} on c1-.*expired at",
                     c2.logs()), c2.log_tail()
    _check_manifest(manifest, c1.path, c2.path)
    c2.umount()
    fsck = c2.cli("fsck", *c2.cluster_args(), "--json", check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_partitioned_server_misses_nothing_once_its_link_is_back(cluster):
    """(5) bs3's link is cut while c1 writes: no operation fails; once the link is back,
    the copies bs3 missed are restored."""
    m = cluster.client("c1")
    m.mount("--lease-seconds", LEASE)
    cut_off = cluster.servers[2]
    with WriteLoad(os.path.join(m.path, "w")) as load:
        load.wait_for(3, "before the cut")
        cluster.net.cut("bs3")
        wait_until(lambda: not cut_off._answers(), "bs3 to be unreachable")
        load.wait_for(1, "while requests that got through before the cut end")
        held = _stored(cut_off)
        load.wait_for(5, "with bs3 cut off")
        assert _stored(cut_off) == held  # nothing reached it
        cluster.net.restore("bs3")
        load.wait_for(3, "after the link is back")
    assert load.errors == []
    _healed(m)
    assert _stored(cut_off) - held  # what it missed was restored (3 per block: above)
    check_files(m.path, {os.path.relpath(p, m.path): d for p, d in load.written.items()})


def test_one_writer_across_clients_and_a_reader_follows(cluster):
    """(6) c2's read-write mount is refused while c1 holds the lease; c2's read-only mount
    shows what c1 writes afterwards."""
    c1, c2 = cluster.client("c1"), cluster.client("c2")
    c1.mount("--lease-seconds", LEASE)
    first = os.path.join(c1.path, "first")
    with open(first, "wb") as f:
        f.write(b"written on c1\n")
        f.flush()
        os.fsync(f.fileno())
    refused = c2.cli("mount", *c2.cluster_args(), "--cache-dir", c2.cache_dir, c2.path,
                     check=False)
    assert refused.returncode != 0 and "--read-only" in refused.stderr, refused.stderr
    assert "c1-" in refused.stderr, refused.stderr  # it names the holder's host
    assert not c2.mounted
    c2.mount("--read-only")
    check_files(c2.path, {"first": sha256_of(first)})
    data = os.urandom(700_000)
    with open(os.path.join(c1.path, "later"), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    wanted = sha256_of(os.path.join(c1.path, "later"))
    later = os.path.join(c2.path, "later")
    wait_until(lambda: os.path.exists(later) and sha256_of(later) == wanted,
               "c2 to show c1's new file", timeout=30, interval=0.2)


def test_a_rolling_restart_of_every_server_under_load(cluster):
    """(7) every server is stopped and started again, one at a time, each once the one
    before answers again, while c1 writes and reads: no operation fails, and every block
    ends with its 3 copies."""
    m = cluster.client("c1")
    m.mount("--lease-seconds", LEASE)
    with WriteLoad(os.path.join(m.path, "w")) as load:
        load.wait_for(2, "before the restarts")
        for server in cluster.servers:
            server.stop()
            load.wait_for(2, f"with {server.url} stopped")
            server.start()
            load.wait_for(1, f"after {server.url} is back")
    assert load.errors == []
    _healed(m)
    check_files(m.path, {os.path.relpath(p, m.path): d for p, d in load.written.items()})


def test_the_namespaces_reach_nothing_outside(cluster):
    """Isolation: a client namespace has no route beyond its own network."""
    routes = subprocess.run(cluster.net.command("c1", ["ip", "-4", "route"]),
                            capture_output=True, text=True, timeout=30).stdout
    assert "default" not in routes and routes.strip(), routes
    assert all(line.startswith(f"10.77.{cluster.net.subnet}.0/24")
               for line in routes.strip().splitlines()), routes


def test_a_slow_server_link_costs_no_error(cluster):
    """bs4's link is limited to 2 Mbit/s each way while c1 writes and reads: nothing fails,
    and once its link is fast again every block has its 3 copies."""
    m = cluster.client("c1")
    m.mount("--lease-seconds", LEASE)
    with WriteLoad(os.path.join(m.path, "w")) as load:
        cluster.net.shape("bs4", "2mbit")
        load.wait_for(5, "with bs4's link slow")
    cluster.net.unshape("bs4")
    assert load.errors == []
    _healed(m)
    check_files(m.path, {os.path.relpath(p, m.path): d for p, d in load.written.items()})


def test_a_delayed_lossy_server_link_costs_no_error(request):
    """bs2's link delays every packet 20 ms and drops 2% of them (tc netem) while c1
    writes and reads: nothing fails. Skipped on a kernel without netem."""
    if not netns.has_qdisc("netem", "delay", "1ms"):
        pytest.skip("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM)")
    cluster = request.getfixturevalue("cluster")
    m = cluster.client("c1")
    m.mount("--lease-seconds", LEASE)
    cluster.net.delay_loss("bs2", delay_ms=20, loss_percent=2)
    with WriteLoad(os.path.join(m.path, "w")) as load:
        load.wait_for(5, "with bs2's link delayed and lossy")
    cluster.net.unshape("bs2")
    assert load.errors == []
    _healed(m)
    check_files(m.path, {os.path.relpath(p, m.path): d for p, d in load.written.items()})


def test_namespaces_of_a_test_process_that_died_are_swept(tmp_path):
    """A namespace named after a process that no longer runs is deleted by the next
    Network, and what still ran in it is killed first."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    name = f"{netns.PREFIX}{gone.pid}-251-hub"  # (subnet 251: never one a Network picks)
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    orphan = subprocess.Popen(["nsenter", f"--net={netns.NETNS_DIR}/{name}", "sleep", "300"])
    try:
        wait_until(lambda: orphan.pid in netns._pids_in(name), "the orphan in its namespace")
        assert name in netns.sweep_stale()
        assert orphan.wait(timeout=30) == -signal.SIGKILL
        assert not os.path.exists(os.path.join(netns.NETNS_DIR, name))
    finally:
        orphan.kill()
        orphan.wait()
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
