"""The scenarios of the VM suite, each run from the host against booted QEMU machines.

A ``Suite`` holds the running cluster and the machines of this run. The cluster says how to
reach and treat its guests, so the same scenarios run on QEMU machines (``tests.vm.cluster``)
and on the Vagrantfile's (``tests.vm.vagrant``): ``ssh``/``ssh_argv``/``spawn`` run commands,
``power_cut``/``start``/``wait_up`` cut power and boot, ``cut_link``/``restore_link``
partition, ``start_server``/``stop_server`` run the block server, and ``python``, ``secret``
and ``probe`` are the guest's Python command, secret file and probe script. Setup starts every
block server and formats and mounts the filesystem on client1 (R=3, W=2). Each scenario raises ``Failed`` (or any error) when what it
checks does not hold, and returns a one-line summary of what it measured.

Scenario numbers follow issue 17. A scenario leaves the cluster as it found it (every server up
and serving, client1 mounted read-write) so the next one can run; one that fails may not, which is
why the runner stops at the first failure of setup but goes on after a failed scenario.
"""
import json
import subprocess
import threading
import time

MNT = "/mnt/fs"


class Failed(Exception):
    """A scenario's check did not hold."""


def poll(what, predicate, timeout, interval=1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Suite:
    """Setup and scenarios over one cluster; see the module docstring."""

    def __init__(self, cluster, servers, clients, log):
        self.cluster = cluster
        self.servers = list(servers)
        self.clients = list(clients)
        self.log = log
        self.py = cluster.python
        self.secret = cluster.secret
        self.probe = f"{cluster.python} {cluster.probe}"

    def machine(self, name):
        return next(m for m in self.servers + self.clients if m.name == name)

    @property
    def client1(self):
        return self.clients[0]

    def urls(self):
        return ",".join(m.url for m in self.servers)

    def fusefs(self, args):
        return f"{self.py} -m fusefs {args} --servers {self.urls()} --secret-file {self.secret}"

    def on(self, m, command, **kw):
        return self.cluster.ssh(m, "set -e; " + command, **kw)

    # -- setup --------------------------------------------------------------------------------
    def server_answers(self, m):
        probe = f"{self.probe} list {m.url} {self.secret} >/dev/null"
        return self.cluster.ssh(self.client1, probe, timeout=60, check=False).returncode == 0

    def wait_server(self, m, timeout=120):
        try:
            poll(f"{m.name}'s block server", lambda: self.server_answers(m), timeout, 2.0)
        except Failed as e:
            tail = self.cluster.ssh(m, self.cluster.server_log_tail, check=False,
                                    timeout=30).stdout
            raise Failed(f"{e}; its log ends: {tail.strip()}") from None

    def setup(self):
        for m in self.servers:
            self.cluster.start_server(m)
        for m in self.servers:
            self.wait_server(m)
        self.on(self.client1, self.fusefs("mkfs") + " >/dev/null")
        self.mount(self.client1)

    def mount(self, m, extra="", cache="/var/cache/fusefs"):
        self.on(m, f"mkdir -p {MNT} && " + self.fusefs(f"mount --cache-dir {cache} {extra} {MNT}")
                + " </dev/null >>/var/log/mount.log 2>&1")

    def umount(self, m):
        self.on(m, f"{self.py} -m fusefs umount {MNT} </dev/null >>/var/log/mount.log 2>&1")

    # -- scenario 1: real tools on the mount ----------------------------------------------------
    def scenario_tools(self):
        src = "/usr/lib/python3.11"
        steps = {
            "cp -a + diff -r": f"mkdir -p {MNT}/copy && cp -a {src}/email {src}/json /etc/ssh "
                               f"{MNT}/copy/ && diff -r {src}/email {MNT}/copy/email && "
                               f"diff -r {src}/json {MNT}/copy/json && diff -r /etc/ssh {MNT}/copy/ssh",
            "tar round trip": f"tar -C {src} -cf {MNT}/a.tar email json && mkdir -p {MNT}/untar "
                              f"&& tar -C {MNT}/untar -xf {MNT}/a.tar && "
                              f"diff -r {src}/email {MNT}/untar/email && diff -r {src}/json "
                              f"{MNT}/untar/json",
            "git clone/commit/fsck": "rm -rf /tmp/src && mkdir /tmp/src && cd /tmp/src && "
                                     f"git init -q && cp -a {src}/json . && git add -A && "
                                     "git -c user.name=vm -c user.email=vm@e2e commit -qm one && "
                                     f"git clone -q /tmp/src {MNT}/clone && cd {MNT}/clone && "
                                     "echo change > new && git add new && "
                                     "git -c user.name=vm -c user.email=vm@e2e commit -qm two && "
                                     "git fsck --full --strict && test $(git rev-list --count HEAD) = 2",
            "sqlite integrity_check": f"sqlite3 {MNT}/db.sqlite 'CREATE TABLE t(a, b); WITH RECURSIVE "
                                      "c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) "
                                      "INSERT INTO t SELECT x, randomblob(100) FROM c;' && "
                                      f"test \"$(sqlite3 {MNT}/db.sqlite 'PRAGMA integrity_check')\" = ok "
                                      f"&& test \"$(sqlite3 {MNT}/db.sqlite 'SELECT count(*) FROM t')\" = 20000",
        }
        timings = []
        for name, command in steps.items():
            started = time.monotonic()
            result = self.on(self.client1, command, check=False)
            if result.returncode != 0:
                raise Failed(f"{name}: exit {result.returncode}: {result.stderr.strip()[-1500:]}")
            timings.append(f"{name} {time.monotonic() - started:.0f}s")
        self.remount_fresh()
        again = self.on(self.client1, f"diff -r {src}/json {MNT}/copy/json && cd {MNT}/clone && "
                        "git fsck --full --strict && test \"$(sqlite3 "
                        f"{MNT}/db.sqlite 'PRAGMA integrity_check')\" = ok", check=False)
        if again.returncode != 0:
            raise Failed(f"after a remount with an empty cache: {again.stderr.strip()[-1500:]}")
        return "; ".join(timings) + "; all intact again after a remount with an empty cache"

    def remount_fresh(self):
        """Unmount client1, mount again with an empty cache: reads must come from the servers."""
        self.umount(self.client1)
        stamp = int(time.time())
        self.mount(self.client1, cache=f"/var/cache/fusefs-{stamp}")

    # -- scenario 3: power loss of a server during writes ----------------------------------------
    def manifest_lines(self, path):
        out = self.cluster.ssh(self.client1, f"cat {path} 2>/dev/null || true", timeout=60).stdout
        return [line for line in out.splitlines() if len(line.split()) == 2]

    def start_writer(self, directory, count, size, tag):
        self.cluster.spawn(self.client1, f"{self.probe} write {MNT}/{directory} {count} {size} "
                           f"> /var/log/{tag}.manifest & echo $! > /var/log/{tag}.pid; wait $!; "
                           f"echo $? > /var/log/{tag}.rc", tag)

    def writer_status(self, tag):
        out = self.cluster.ssh(self.client1, f"cat /var/log/{tag}.rc 2>/dev/null || true",
                               timeout=60).stdout.strip()
        return out or None

    def scenario_server_power_loss(self, victim_name="bs2", count=240, size=20000):
        victim = self.machine(victim_name)
        tag = "s3"
        self.start_writer("s3", count, size, tag)
        poll("30 fsynced files before the power cut",
             lambda: len(self.manifest_lines(f"/var/log/{tag}.manifest")) >= 30, 300, 2.0)
        listed = self.on(self.client1, f"{self.probe} list {victim.url} {self.secret}",
                         timeout=120).stdout
        self.cluster.power_cut(victim)
        acknowledged = json.loads(listed)
        before = len(self.manifest_lines(f"/var/log/{tag}.manifest"))
        self.log(f"  {victim.name} powered off holding {len(acknowledged)} blocks; "
                 f"{before} files fsynced so far")
        poll("20 more fsynced files with the server down",
             lambda: len(self.manifest_lines(f"/var/log/{tag}.manifest")) >= before + 20, 300, 2.0)
        self.cluster.start(victim)
        self.cluster.wait_up([victim])
        self.cluster.start_server(victim)
        self.wait_server(victim)
        checked = self.on(self.client1, f"{self.probe} check {victim.url} {self.secret}",
                          input=json.dumps(acknowledged), check=False, timeout=300)
        report = json.loads(checked.stdout or "{}")
        if checked.returncode != 0:
            raise Failed(f"{victim.name} lost blocks it had acknowledged: "
                         f"{len(report.get('missing', []))} missing, "
                         f"{len(report.get('corrupt', []))} corrupt of {len(acknowledged)} "
                         f"({checked.stderr.strip()[-500:]})")
        rc = poll("the writer to finish", lambda: self.writer_status(tag), 900, 3.0)
        if rc != "0":
            raise Failed(f"the writer saw an error (exit {rc}): "
                         + self.on(self.client1, f"tail -5 /var/log/{tag}.log").stdout)
        manifest = "\n".join(self.manifest_lines(f"/var/log/{tag}.manifest")) + "\n"
        self.remount_fresh()
        verified = self.on(self.client1, f"{self.probe} verify {MNT}/s3",
                           input=manifest, check=False, timeout=600)
        if verified.returncode != 0:
            raise Failed(f"fsynced files not served intact: {verified.stdout[-1500:]}")
        files = json.loads(verified.stdout)["checked"]
        return (f"{victim.name} cut with {len(acknowledged)} blocks acknowledged: all {len(acknowledged)} "
                f"intact after reboot; writer 0 errors; {files} fsynced files intact (empty cache)")

    # -- shared by scenarios 2, 5 and 7 ---------------------------------------------------------
    def fsynced(self, tag):
        return len(self.manifest_lines(f"/var/log/{tag}.manifest"))

    def more_fsynced(self, tag, count, why, timeout=300):
        """Wait until `count` more files are fsynced than now: the workload goes on."""
        target = self.fsynced(tag) + count
        poll(f"{count} more fsynced files {why}", lambda: self.fsynced(tag) >= target, timeout, 1.0)

    def run_writer(self, tag, size, during):
        """Write fsynced files before, while and after `during()` runs, then stop the writer
        (SIGTERM ends it between two files); it must have seen no error at all."""
        self.start_writer(tag, 100_000, size, tag)
        self.more_fsynced(tag, 10, "before the fault")
        before = self.fsynced(tag)
        during()
        if self.writer_status(tag) is not None:
            raise Failed("the writer ended during the fault: "
                         + self.on(self.client1, f"tail -5 /var/log/{tag}.log").stdout)
        during_fault = self.fsynced(tag) - before
        self.more_fsynced(tag, 10, "after the fault")
        self.on(self.client1, f"kill -TERM $(cat /var/log/{tag}.pid)")
        rc = poll("the writer to stop", lambda: self.writer_status(tag), 300, 1.0)
        if rc != "0":
            raise Failed(f"the writer saw an error (exit {rc}): "
                         + self.on(self.client1, f"tail -5 /var/log/{tag}.log").stdout)
        self.log(f"  {during_fault} files fsynced while the fault lasted")
        return self.manifest_lines(f"/var/log/{tag}.manifest"), during_fault

    def fault_under_writes(self, tag, size, fault):
        """`fault()` under fsynced writes (run_writer), then every fsynced file read back and
        `fusefs repair` polled until every block has R copies: (files fsynced during the
        fault, files verified, seconds until repaired)."""
        lines, during = self.run_writer(tag, size, fault)
        files = self.verify_files(self.client1, tag, lines)
        return during, files, self.repaired()

    def verify_files(self, m, directory, lines):
        verified = self.on(m, f"{self.probe} verify {MNT}/{directory}",
                           input="\n".join(lines) + "\n", check=False, timeout=600)
        if verified.returncode != 0:
            raise Failed(f"fsynced files not read back intact: {verified.stdout[-1500:]}")
        return json.loads(verified.stdout)["checked"]

    def repaired(self):
        """Poll `fusefs repair` until every live block has R healthy copies on its homes."""
        started = time.monotonic()

        def attempt():
            return self.on(self.client1, self.fusefs("repair") + " >/dev/null 2>&1",
                           check=False, timeout=600).returncode == 0
        poll("fusefs repair to report every block with R copies", attempt, 600, 5.0)
        check = self.on(self.client1, self.fusefs("repair --check") + " >/dev/null 2>&1",
                        check=False, timeout=600)
        if check.returncode != 0:
            raise Failed("fusefs repair --check still finds blocks short of R copies")
        return time.monotonic() - started

    # -- scenario 2: server power loss during a workload; back to R copies ----------------------
    def scenario_server_power_loss_repair(self, victim_name="bs3"):
        victim = self.machine(victim_name)

        def cut_and_return():
            self.cluster.power_cut(victim)
            time.sleep(10)  # the workload runs on without it for a while (not a synchronisation)
            self.cluster.start(victim)
            self.cluster.wait_up([victim])
            self.cluster.start_server(victim)
            self.wait_server(victim)
        during, files, seconds = self.fault_under_writes("s2", 30000, cut_and_return)
        return (f"{victim.name} power cut and rebooted under writes ({during} files fsynced "
                f"meanwhile): 0 writer errors, {files} "
                f"fsynced files intact; R copies again {seconds:.0f} s after it returned")

    # -- scenario 5: a server partitioned and reconnected ----------------------------------------
    def scenario_partition(self, victim_name="bs4"):
        victim = self.machine(victim_name)

        def partition():
            self.cluster.cut_link(victim)
            time.sleep(15)  # writes go on while it is unreachable (not a synchronisation)
            self.cluster.restore_link(victim)
        during, files, seconds = self.fault_under_writes("s5", 30000, partition)
        return (f"{victim.name} cut off 15 s under writes ({during} files fsynced meanwhile): "
                f"0 writer errors, {files} fsynced files "
                f"intact; missed copies restored {seconds:.0f} s after reconnecting")

    # -- scenario 6: one writer; a read-only mount elsewhere follows it ---------------------------
    def scenario_second_mount(self):
        client2 = self.clients[1]
        refused = self.on(client2, f"mkdir -p {MNT} && "
                          + self.fusefs(f"mount --cache-dir /var/cache/fusefs {MNT}")
                          + " </dev/null 2>&1", check=False, timeout=300)
        if refused.returncode == 0:
            raise Failed("a second read-write mount on client2 was allowed beside client1's")
        if self.on(client2, f"mountpoint -q {MNT}", check=False).returncode == 0:
            raise Failed("the refused mount left something mounted on client2")
        reason = refused.stdout.strip().splitlines()[-1:] or ["(no message)"]
        self.mount(client2, extra="--read-only")
        stamp = f"written-on-client1-{time.time_ns()}"
        self.on(self.client1, f"echo {stamp} > {MNT}/follow.txt && sync {MNT}/follow.txt")
        started = time.monotonic()
        poll("client2's read-only mount to show client1's write",
             lambda: stamp in self.cluster.ssh(client2, f"cat {MNT}/follow.txt 2>/dev/null",
                                               check=False, timeout=60).stdout, 120, 1.0)
        lag = time.monotonic() - started
        self.umount(client2)
        return (f"read-write mount refused ({reason[0][:120]}); read-only mount saw the write "
                f"after {lag:.0f} s")

    # -- scenario 4: the writing client loses power; another takes over ---------------------------
    def scenario_client_power_loss(self, files_before_cut=40):
        client1, client2 = self.clients[0], self.clients[1]
        manifest, reader, writer = self.stream_writer(client1, "s4", 20000)
        try:
            poll(f"{files_before_cut} fsynced files on client1",
                 lambda: len(manifest) >= files_before_cut, 300, 1.0)
            self.cluster.power_cut(client1)
            cut = time.monotonic()
        finally:
            writer.kill()
            writer.wait()
            reader.join(timeout=30)
        promised = list(manifest)
        self.log(f"  client1 powered off; the host holds {len(promised)} fsynced files' hashes")
        attempts = []

        def take_over():
            result = self.on(client2, f"mkdir -p {MNT} && " + self.fusefs(
                f"mount --cache-dir /var/cache/fusefs {MNT}") + " </dev/null 2>&1",
                check=False, timeout=300)
            attempts.append(result.stdout.strip().splitlines()[-1:] or ["(no message)"])
            return result.returncode == 0
        poll("client2 to take the writer lease over", take_over, 300, 5.0)
        waited = time.monotonic() - cut
        if len(attempts) < 2:
            raise Failed("client2 mounted read-write at once: client1's lease was not honoured")
        files = self.verify_files(client2, "s4", promised)
        stamp = f"written-on-client2-{time.time_ns()}"
        self.on(client2, f"echo {stamp} > {MNT}/after-takeover.txt && sync {MNT}/after-takeover.txt")
        self.umount(client2)
        fsck = self.on(client2, self.fusefs("fsck") + " 2>&1", check=False, timeout=900)
        if fsck.returncode != 0:
            raise Failed(f"fsck after the takeover: exit {fsck.returncode}: {fsck.stdout[-1500:]}")
        # client1 comes back and mounts with the cache its power cut left behind
        self.cluster.start(client1)
        self.cluster.wait_up([client1])
        self.mount(client1)
        seen = self.on(client1, f"cat {MNT}/after-takeover.txt").stdout
        if stamp not in seen:
            raise Failed(f"client1, mounted again, does not see client2's write: {seen!r}")
        self.verify_files(client1, "s4", promised)
        return (f"client1 cut after {len(promised)} fsynced files; client2 refused "
                f"{len(attempts) - 1} time(s) ({attempts[0][0][:80]}), took over {waited:.0f} s "
                f"after the cut; all {files} files intact from an empty cache; fsck clean; "
                "client1 rebooted, remounted with its old cache, sees client2's write")

    def stream_writer(self, m, directory, size):
        """A writer on `m` whose manifest lines come straight to this host as it prints them,
        so they survive `m` losing power. Returns (lines so far, reader thread, ssh process)."""
        argv = self.cluster.ssh_argv(m, f"{self.probe} write {MNT}/{directory} 100000 {size}")
        writer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  stdin=subprocess.DEVNULL, text=True)
        lines = []

        def read():
            for line in writer.stdout:
                if len(line.split()) == 2:
                    lines.append(line.strip())
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        return lines, reader, writer

    # -- scenario 7: a rolling restart of every server under load ----------------------------
    def scenario_rolling_restart(self):
        stopped = []

        def restart_each():
            for m in self.servers:
                self.cluster.stop_server(m)
                poll(f"{m.name} to stop answering", lambda: not self.server_answers(m), 120, 1.0)
                self.more_fsynced("s7", 5, f"with {m.name} stopped")
                self.cluster.start_server(m)
                self.wait_server(m)
                self.more_fsynced("s7", 3, f"after {m.name} is back")
                stopped.append(m.name)
        during, files, seconds = self.fault_under_writes("s7", 20000, restart_each)
        return (f"{', '.join(stopped)} stopped and started one at a time under writes "
                f"({during} files fsynced meanwhile): 0 writer errors, {files} fsynced files "
                f"intact; every block at R copies {seconds:.0f} s after the last restart")
