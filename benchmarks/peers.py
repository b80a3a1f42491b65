"""MooseFS and GlusterFS as benchmark targets beside fusefs (used by compare.py).

Both keep three copies of every chunk on three storage daemons on this one host, like
fusefs with R=3 (MooseFS: goal 3; GlusterFS: one replica-3 volume of three bricks), so they
are the fair comparison. Each target is an `fs_bench.Target`: `start()` sets the peer up
from nothing under the run's work directory and mounts it, `make_cold()` drops the kernel's
caches and remounts the client (the FUSE clients keep caches of their own), `stop()` takes
everything down.

MooseFS runs in a private network namespace (`ip netns add`, a veth pair inside it with a
10.x address): its chunkservers refuse a master on 127.0.0.1, and the machine's own address
is off limits. Every MooseFS process is started with `nsenter --net=...` only, so the
`mfsmount` FUSE mount is an ordinary mount of the host while all MooseFS traffic stays in
the namespace. GlusterFS runs on loopback: `glusterd` with its own working directory (under
the work directory, not /var/lib/glusterd) and brick ports fixed to 18100-18199.

Teardown (also after a failure half-way through start): unmount, the peer's own stop
commands (`mfschunkserver/mfsmaster -c CFG stop`; `gluster volume stop/delete`), then
every daemon still alive is killed by the PID its pid or lock file names, never by name;
the namespace is deleted last. A crash of this script leaves daemons running: they are
found again by their pid files under the work directory and /var/run/gluster, and the
namespace is named `fusefs-bench-<pid>`.

Debian packages (`moosefs-master moosefs-chunkserver moosefs-client moosefs-cli`,
`glusterfs-server glusterfs-client`) are installed with apt-get when a command is missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time

from fs_bench import BenchError, Target, alive, drop_caches, kill_quietly, log, unmount
from fusefs.mounts import is_mounted

MFS_PACKAGES = ("moosefs-master", "moosefs-chunkserver", "moosefs-client", "moosefs-cli")
GLUSTER_PACKAGES = ("glusterfs-server", "glusterfs-client")
MFS_COMMANDS = ("mfsmaster", "mfschunkserver", "mfsmount", "mfscli", "mfssetgoal")
GLUSTER_COMMANDS = ("glusterd", "gluster", "glusterfs")
COPIES = 3
GLUSTER_PORTS = (18100, 18199)


def ensure_packages(commands, packages) -> None:
    """apt-get install the packages when one of the commands is missing."""
    if all(shutil.which(c) for c in commands):
        return
    log(f"peers: installing {' '.join(packages)} (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    result = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages],
                            env=env, capture_output=True, text=True)
    missing = [c for c in commands if not shutil.which(c)]
    if result.returncode != 0 or missing:
        raise BenchError(f"apt-get install {' '.join(packages)} failed (missing {missing}); "
                         f"run it by hand:\n{result.stdout[-1500:]}{result.stderr[-1500:]}")


def run(cmd: list[str], what: str, timeout: float = 120,
        check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: `{' '.join(cmd)}` timed out after {timeout:.0f}s") from None
    if check and result.returncode != 0:
        raise BenchError(f"{what}: `{' '.join(cmd)}` failed ({result.returncode}): "
                         f"{(result.stderr or result.stdout).strip()[-800:]}")
    return result


def read_pid(path: str) -> int | None:
    """The first number in a pid or lock file, or None."""
    try:
        with open(path) as f:
            text = f.read().split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def wait_for(check, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(0.1)


def write_config(path: str, settings: dict) -> None:
    with open(path, "w") as f:
        f.writelines(f"{k} = {v}\n" for k, v in settings.items())


def loopback_hostname() -> str:
    """This host's name, which must resolve to a loopback address: glusterd refuses bricks
    on 127.0.0.1 or localhost, and the traffic must stay on loopback."""
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        addr = ""
    if not addr.startswith("127."):
        raise BenchError(f"GlusterFS: host name {host!r} resolves to {addr or 'nothing'}, not "
                         f"to loopback; add `127.0.1.1 {host}` to /etc/hosts, or run with "
                         f"--targets without glusterfs")
    return host


def unmount_client(mnt: str, proc_pid: int | None, what: str) -> None:
    """Unmount a FUSE client and wait for its process to end (killed after 20 s)."""
    unmount(mnt)
    deadline = time.monotonic() + 20
    while alive(proc_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_quietly(proc_pid, what)


class MooseFS(Target):
    """A master and three chunkservers (goal 3) in namespace `fusefs-bench-<pid>`.

    States: nothing -> namespace up -> master + chunkservers running -> mounted (3
    chunkservers registered, goal 3 set on the root). Every step records what it made, and
    `stop()` undoes exactly that, whatever state start() reached."""

    name = "moosefs"
    PORT = 9421

    def __init__(self, work: str, addr: str = "10.213.18.1"):
        super().__init__(work)
        self.dir = os.path.join(work, "moosefs")
        self.mnt = os.path.join(self.dir, "mnt")
        self.addr = addr
        self.ns = f"fusefs-bench-{os.getpid()}"
        self.ns_made = False
        self.configs: list[str] = []  # started daemons' config files (master first)
        self.client: subprocess.Popen | None = None

    def _in_ns(self, *cmd: str) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.ns}", *cmd]

    def start(self) -> None:
        ensure_packages(MFS_COMMANDS, MFS_PACKAGES)
        os.makedirs(self.mnt)
        self._namespace()
        self._master()
        for i in range(1, COPIES + 1):
            self._chunkserver(i)
        self.mount()
        wait_for(lambda: self._chunkservers() >= COPIES, "MooseFS chunkservers", 60)
        run(self._in_ns("mfssetgoal", "-r", str(COPIES), self.mnt), "mfssetgoal")
        self.root = os.path.join(self.mnt, "bench")
        os.makedirs(self.root, exist_ok=True)
        self._warm_up()

    def _warm_up(self) -> None:
        """Wait until a new chunk gets all its copies at once. In the first seconds after
        the chunkservers register, the master creates chunks with fewer copies and
        replicates them afterwards; writes to such a file stalled for seconds here."""
        probe = os.path.join(self.mnt, "probe")

        def complete() -> bool:
            with open(probe, "wb") as f:
                f.write(b"x" * 65536)
                os.fsync(f.fileno())
            info = run(self._in_ns("mfsfileinfo", probe), "mfsfileinfo", check=False).stdout
            os.unlink(probe)
            return info.count("status:VALID") >= COPIES

        wait_for(complete, "MooseFS chunks with all their copies", 60)

    def _namespace(self) -> None:
        run(["ip", "netns", "add", self.ns], "MooseFS namespace")
        self.ns_made = True
        run(["ip", "-n", self.ns, "link", "set", "lo", "up"], "MooseFS namespace")
        run(["ip", "-n", self.ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            "MooseFS namespace")
        for link in ("v0", "v1"):
            run(["ip", "-n", self.ns, "link", "set", link, "up"], "MooseFS namespace")
        run(["ip", "-n", self.ns, "addr", "add", f"{self.addr}/24", "dev", "v0"],
            "MooseFS namespace")

    def _common(self, name: str) -> dict:
        data = os.path.join(self.dir, name)
        os.makedirs(data)
        return {"WORKING_USER": "root", "WORKING_GROUP": "root", "DATA_PATH": data,
                "SYSLOG_IDENT": f"bench-{name}"}

    def _master(self) -> None:
        cfg = self._common("master")
        exports = os.path.join(self.dir, "mfsexports.cfg")
        topology = os.path.join(self.dir, "mfstopology.cfg")
        with open(exports, "w") as f:
            f.write("*  /  rw,alldirs,admin,maproot=0:0\n")
        open(topology, "w").close()
        shutil.copy("/var/lib/mfs/metadata.mfs.empty",
                    os.path.join(cfg["DATA_PATH"], "metadata.mfs"))
        cfg.update(EXPORTS_FILENAME=exports, TOPOLOGY_FILENAME=topology,
                   MATOML_LISTEN_HOST=self.addr, MATOCS_LISTEN_HOST=self.addr,
                   MATOCL_LISTEN_HOST=self.addr)
        self._daemon("mfsmaster", "master", cfg)

    def _chunkserver(self, i: int) -> None:
        cfg = self._common(f"cs{i}")
        chunks = os.path.join(self.dir, f"chunks{i}")
        os.makedirs(chunks)
        hdd = os.path.join(self.dir, f"mfshdd{i}.cfg")
        with open(hdd, "w") as f:
            f.write(chunks + "\n")
        cfg.update(HDD_CONF_FILENAME=hdd, HDD_LEAVE_SPACE_DEFAULT="1GiB", MASTER_HOST=self.addr,
                   BIND_HOST=self.addr, CSSERV_LISTEN_HOST=self.addr,
                   CSSERV_LISTEN_PORT=str(9421 + 100 * i))
        self._daemon("mfschunkserver", f"cs{i}", cfg)

    def _daemon(self, program: str, name: str, cfg: dict) -> None:
        path = os.path.join(self.dir, f"{name}.cfg")
        write_config(path, cfg)
        self.configs.append(path)
        run(self._in_ns(program, "-c", path, "start"), f"{program} start")

    def _chunkservers(self) -> int:
        """Chunkservers the master lists as connected."""
        result = run(self._in_ns("mfscli", "-H", self.addr, "-SCS", "-p"), "mfscli", check=False)
        return sum(1 for line in result.stdout.splitlines()
                   if line.startswith("chunk servers:") and self.addr in line.split())

    def mount(self) -> None:
        log_path = os.path.join(self.dir, "mfsmount.log")
        with open(log_path, "ab") as f:
            self.client = subprocess.Popen(
                self._in_ns("mfsmount", "-f", self.mnt, "-o",
                            f"mfsmaster={self.addr},mfsport={self.PORT}"),
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_for(lambda: is_mounted(self.mnt) or self.client.poll() is not None, "mfsmount", 30)
        if not is_mounted(self.mnt):
            raise BenchError(f"mfsmount exited; see {log_path}")

    def umount(self) -> None:
        if self.client is not None:
            unmount_client(self.mnt, self.client.pid, "mfsmount")
            self.client.wait(5)
            self.client = None

    def make_cold(self, keep_disk_cache: bool = False) -> None:
        self.umount()
        drop_caches()
        self.mount()

    def daemon_pids(self) -> list[int | None]:
        """Master, then chunkservers, from the lock files (.mfsmaster.lock,
        .mfschunkserver.lock: the PID as text) they keep in DATA_PATH."""
        out = []
        for path in self.configs:
            name = os.path.basename(path)[:-4]
            program = "mfsmaster" if name == "master" else "mfschunkserver"
            out.append(read_pid(os.path.join(self.dir, name, f".{program}.lock")))
        return out

    def stop(self) -> None:
        try:
            self.umount()
        finally:
            pids = self.daemon_pids()
            for path, program in zip(reversed(self.configs), self._programs()):
                run(self._in_ns(program, "-c", path, "stop"), f"{program} stop", check=False)
            for pid in pids:
                kill_quietly(pid, "MooseFS daemon")
            if self.ns_made:
                run(["ip", "netns", "del", self.ns], "MooseFS namespace", check=False)
                self.ns_made = False

    def _programs(self) -> list[str]:
        """The program of each started daemon, in stop order (chunkservers, then master)."""
        return [("mfsmaster" if os.path.basename(p) == "master.cfg" else "mfschunkserver")
                for p in reversed(self.configs)]

    def processes(self):
        pids = self.daemon_pids()
        return {"daemon": self.client.pid if self.client else None, "servers": pids}

    def describe(self) -> str:
        return (f"{self.mnt} (mfsmount, goal {COPIES}, {COPIES} chunkservers, namespace "
                f"{self.ns} {self.addr})")


class GlusterFS(Target):
    """glusterd with a private working directory and one replica-3 volume of three bricks.

    States: nothing -> glusterd running -> volume created -> started -> mounted. `stop()`
    undoes what start() reached; brick and self-heal daemons are found by the pid files
    glusterd writes under /var/run/gluster/{vols,shd}/VOLUME/."""

    name = "glusterfs"

    def __init__(self, work: str):
        super().__init__(work)
        self.dir = os.path.join(work, "glusterfs")
        self.mnt = os.path.join(self.dir, "mnt")
        self.volume = f"bench{os.getpid()}"
        self.pidfile = os.path.join(self.dir, "glusterd.pid")
        self.client_pidfile = os.path.join(self.dir, "client.pid")
        self.glusterd_started = False
        self.created = False
        self.sockets_before: set[str] = set()  # /var/run/gluster/*.socket not ours

    def gluster(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["gluster", "--mode=script", *args], f"gluster {args[0]}", check=check)

    def start(self) -> None:
        ensure_packages(GLUSTER_COMMANDS, GLUSTER_PACKAGES)
        os.makedirs(self.mnt)
        self.sockets_before = set(glob.glob("/var/run/gluster/*.socket"))
        host = loopback_hostname()
        self._glusterd()
        bricks = []
        for i in range(1, COPIES + 1):
            brick = os.path.join(self.dir, f"brick{i}", "b")
            os.makedirs(brick)
            bricks.append(f"{host}:{brick}")
        self.gluster("volume", "create", self.volume, "replica", str(COPIES), *bricks, "force")
        self.created = True
        self.gluster("volume", "start", self.volume)
        self.mount()
        self.root = os.path.join(self.mnt, "bench")
        os.makedirs(self.root, exist_ok=True)

    def _glusterd(self) -> None:
        work = os.path.join(self.dir, "glusterd")
        os.makedirs(work)
        with open("/etc/glusterfs/glusterd.vol") as f:
            lines = [x for x in f if not x.strip().startswith(
                ("option working-directory", "option base-port", "option max-port"))]
        at = max(i for i, x in enumerate(lines) if x.strip() == "end-volume")
        lines[at:at] = [f"    option working-directory {work}\n",
                        f"    option base-port {GLUSTER_PORTS[0]}\n",
                        f"    option max-port {GLUSTER_PORTS[1]}\n"]
        vol = os.path.join(self.dir, "glusterd.vol")
        with open(vol, "w") as f:
            f.writelines(lines)
        run(["glusterd", "-f", vol, "-p", self.pidfile, "-l",
             os.path.join(self.dir, "glusterd.log")], "glusterd")
        self.glusterd_started = True
        wait_for(lambda: self.gluster("volume", "list", check=False).returncode == 0,
                 "glusterd", 30)

    def mount(self) -> None:
        run(["glusterfs", "--volfile-server=127.0.0.1", f"--volfile-id={self.volume}",
             f"--pid-file={self.client_pidfile}",
             f"--log-file={os.path.join(self.dir, 'client.log')}", self.mnt], "glusterfs mount")
        wait_for(lambda: is_mounted(self.mnt), "glusterfs mount", 30)

    def umount(self) -> None:
        unmount_client(self.mnt, read_pid(self.client_pidfile), "glusterfs client")

    def make_cold(self, keep_disk_cache: bool = False) -> None:
        self.umount()
        drop_caches()
        self.mount()

    def daemon_pids(self) -> list[int | None]:
        files = sorted(glob.glob(f"/var/run/gluster/vols/{self.volume}/*.pid"))
        files += sorted(glob.glob(f"/var/run/gluster/shd/{self.volume}/*.pid"))
        return [read_pid(p) for p in files]

    def stop(self) -> None:
        try:
            self.umount()
        finally:
            pids = self.daemon_pids()
            if self.created and alive(read_pid(self.pidfile)):
                self.gluster("volume", "stop", self.volume, "force", check=False)
                self.gluster("volume", "delete", self.volume, check=False)
            for pid in pids:
                kill_quietly(pid, "GlusterFS brick/self-heal daemon")
            if self.glusterd_started:
                kill_quietly(read_pid(self.pidfile), "glusterd", stray=False)
            for d in (f"/var/run/gluster/vols/{self.volume}", f"/var/run/gluster/shd/{self.volume}"):
                shutil.rmtree(d, ignore_errors=True)
            if self.glusterd_started:  # the brick sockets glusterd made for this volume
                for path in set(glob.glob("/var/run/gluster/*.socket")) - self.sockets_before:
                    os.unlink(path)

    def processes(self):
        return {"daemon": read_pid(self.client_pidfile), "servers": self.daemon_pids()}

    def describe(self) -> str:
        return (f"{self.mnt} (glusterfs FUSE client, volume {self.volume}: replica {COPIES}, "
                f"bricks on ports {GLUSTER_PORTS[0]}-{GLUSTER_PORTS[1]})")
