"""Shared test harness: real block-server processes on loopback ports.

`blockservers(n, **options)` starts n `blockserver serve` processes, each with its own data
directory under the test's tmp_path and its own log file, on ports the kernel picks. It
waits until each answers, and at teardown always stops every one (SIGTERM, then SIGKILL),
even when the test failed. Teardown then fails the test if any server logged an ERROR or a
traceback that the test did not declare with `servers.allow(regex)`. When a test fails,
each server's log tail is attached to the report.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import traceback

import pytest
import requests

from blockserver import protocol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROBLEM = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) |^Traceback ", re.M)


class BlockServer:
    """One real `blockserver serve` process, restartable on the same port and data."""

    def __init__(self, data_dir: str, log_path: str, args: list[str], secret: bytes | None):
        self.data_dir = data_dir
        self.log_path = log_path
        self.args = args
        self.secret = secret
        self.port = 0
        self.url = None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "BlockServer":
        cmd = [sys.executable, "-m", "blockserver", "serve", "--data", self.data_dir,
               "--listen", f"127.0.0.1:{self.port}", *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, cwd=REPO)
        line = _read_line(self.proc.stdout, timeout)
        if not line.startswith("serving "):
            self.stop()
            raise RuntimeError(f"blockserver did not start: {line!r}\n{self.log_tail()}")
        self.url = line.split()[1]
        self.port = int(self.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = requests.get(self.url + "/v1/status", timeout=2,
                                      verify=False).status_code
                if status in (200, 401):
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"blockserver at {self.url} never answered\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)  # a paused server cannot hear SIGTERM
                self.proc.terminate()
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        self.proc.kill()
        self.proc.wait(5)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> "BlockServer":
        self.stop()
        return self.start()

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def session(self, verify=False) -> requests.Session:
        """A requests session that signs every request for this server when it has a
        secret (its id is asked first, from a status answer signed for no server)."""
        s = requests.Session()
        if self.secret is not None:
            s.auth = SigningAuth(self.secret)
            s.auth.server_id = s.get(self.url + "/v1/status", timeout=10,
                                     verify=verify).json()["server_id"]
        return s


class SigningAuth(requests.auth.AuthBase):
    """Signs each request as fusefs.transport does, for raw protocol tests: for one
    server, over the body's SHA-256 and the headers with meaning."""

    def __init__(self, secret: bytes, server_id: str = ""):
        self.secret, self.server_id = secret, server_id

    def __call__(self, r):
        body = r.body or b""
        body = body.encode() if isinstance(body, str) else body
        meaning = {k: v for k, v in r.headers.items()
                   if k.lower() in {h.lower() for h in protocol.SIGNED_HEADERS}}
        r.headers.update(protocol.sign_request(self.secret, r.method, r.path_url,
                                               protocol.content_digest(body),
                                               server_id=self.server_id, headers=meaning))
        return r


def _read_line(stream, timeout: float) -> str:
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].decode(errors="replace").strip() if result else ""


class ServerSet(list):
    """The servers one test started, and the log problems it expects."""

    def __init__(self):
        super().__init__()
        self.allowed: list[re.Pattern] = []

    def allow(self, pattern: str) -> None:
        """Declare an expected ERROR/traceback line (regex) so teardown does not fail on it."""
        self.allowed.append(re.compile(pattern))

    def unexpected_problems(self) -> list[str]:
        found = []
        for server in self:
            text = server.log_text()
            for match in _PROBLEM.finditer(text):
                line = text[match.start():text.find("\n", match.start())]
                if not any(p.search(line) for p in self.allowed):
                    found.append(f"{server.url}: {line}")
        return found


@pytest.fixture
def blockservers(tmp_path, request):
    """Factory: `blockservers(n, secret=None, args=[...])` -> list of running BlockServer."""
    started = ServerSet()
    request.node.stash[_SERVERS] = started

    def start(n: int = 1, *, secret: bytes | None = None, args=()) -> list[BlockServer]:
        extra = list(args)
        if secret is not None:
            secret_file = tmp_path / "secret"
            secret_file.write_bytes(secret)
            extra += ["--secret-file", str(secret_file)]
        new = []
        for _ in range(n):
            i = len(started)
            server = BlockServer(str(tmp_path / f"server{i}"), str(tmp_path / f"server{i}.log"),
                                 extra, secret)
            started.append(server)
            new.append(server.start())
        return new

    start.servers = started
    try:
        yield start
    finally:
        for server in started:
            server.stop()
    problems = started.unexpected_problems()
    if problems:
        pytest.fail("block server logged unexpected errors:\n" + "\n".join(problems[:20]))


@pytest.fixture
def server(blockservers) -> BlockServer:
    """One running block server without authentication."""
    return blockservers(1)[0]


_SERVERS = pytest.StashKey[ServerSet]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    servers = item.stash.get(_SERVERS, None)
    if report.failed and servers:
        for server in servers:
            report.sections.append((f"log of block server {server.url}", server.log_tail(60)))
    return report


def self_signed_cert(directory) -> tuple[str, str]:
    """(certificate, key) PEM files of a throwaway certificate for 127.0.0.1, made with
    the openssl command; skips the test where it cannot be made."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, timeout=60)
    if made.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate: {made.stderr[-300:]!r}")
    return cert, key


def wait_until(condition, what: str = "condition", timeout: float = 60.0,
               interval: float = 0.02):
    """Poll `condition` until it is true and return its value. The timeout only stops a
    hang; no test asserts how long anything took."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(interval)


def members_of(servers) -> list:
    """The cluster membership (stable id + URL) of running BlockServer objects."""
    from fusefs.transport import Member

    ids = []
    for server in servers:
        s = server.session()
        ids.append(s.get(server.url + "/v1/status", timeout=5).json()["server_id"])
    return [Member(i, s.url) for i, s in zip(ids, servers)]


@pytest.fixture
def make_cluster():
    """Factory: `make_cluster(servers, secret=None, **ClusterConfig fields)` -> a started
    ReplicatedStore over those servers; every store made is closed at teardown."""
    from fusefs.cluster import ClusterConfig, ReplicatedStore
    from fusefs.transport import Transport, TransportConfig

    stores = []

    def make(servers, *, secret=None, members=None, read_timeout=10.0, **config):
        transport = Transport(TransportConfig(secret=secret, read_timeout=read_timeout,
                                              connect_timeout=2.0))
        config.setdefault("probe_min", 0.1)
        config.setdefault("probe_max", 0.5)
        store = ReplicatedStore(members or members_of(servers), transport,
                                ClusterConfig(**config))
        stores.append(store)
        store.start()
        return store

    try:
        yield make
    finally:
        for store in stores:
            store.close()


def sha256_of(path: str) -> str:
    """The file's digest, read through the daemon (the kernel's cached pages dropped)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_files(root: str, expected: dict[str, str]) -> None:
    """Every relative path in `expected` exists under root with that sha256."""
    bad = {}
    for rel, want in expected.items():
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            bad[rel] = "missing"
        elif sha256_of(path) != want:
            bad[rel] = "differs"
    assert not bad, f"{len(bad)} of {len(expected)} files wrong under {root}: {bad}"


def alive(pid: int) -> bool:
    """True while `pid` runs (stopped counts; a zombie does not)."""
    from fusefs.journal import process_alive

    return process_alive(pid)


def _is_fusefs_daemon(pid: int) -> bool:
    """True while `pid` is a live fusefs mount daemon (not a reused pid, not a zombie)."""
    from fusefs.journal import process_alive

    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"fusefs" in cmdline and b"mount" in cmdline and process_alive(pid)


class Mount:
    """A real `fusefs mount` of a filesystem on real block servers (see `fusefs_mount`)."""

    def __init__(self, servers, path: str, cache_dir: str, secret_file: str | None):
        self.servers = servers
        self.path = path
        self.cache_dir = cache_dir
        self.secret_file = secret_file

    @property
    def urls(self) -> str:
        return ",".join(s.url for s in self.servers)

    def cli(self, *args: str, check: bool = True, timeout: float = 120):
        """Run `fusefs ARGS` (with this mount's servers and secret where they apply)."""
        result = subprocess.run([sys.executable, "-m", "fusefs", *args], capture_output=True,
                                text=True, timeout=timeout, cwd=REPO)
        if check and result.returncode != 0:
            raise AssertionError(f"fusefs {' '.join(args)} failed:\n{result.stderr}")
        return result

    def cluster_args(self) -> list[str]:
        args = ["--servers", self.urls]
        return args + (["--secret-file", self.secret_file] if self.secret_file else [])

    def mount(self, *extra: str, cache_dir: str | None = None) -> None:
        os.makedirs(self.path, exist_ok=True)
        self.cli("mount", *self.cluster_args(), "--cache-dir", cache_dir or self.cache_dir,
                 *extra, self.path)

    def umount(self) -> None:
        self.cli("umount", self.path)

    @property
    def mounted(self) -> bool:
        from fusefs.daemon import is_mounted

        return is_mounted(self.path)

    def daemon_pid(self) -> int | None:
        from fusefs.daemon import read_registry

        record = read_registry(self.path)
        return record["pid"] if record else None

    def force_unmount(self) -> None:
        """A crash of the client: SIGKILL the daemon, wait for it to die, then detach the
        dead mount. (Detaching first would let a live daemon start a clean shutdown.)"""
        pid = self.daemon_pid()
        if pid and _is_fusefs_daemon(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 30
            while _is_fusefs_daemon(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        subprocess.run(["fusermount", "-u", "-z", self.path], capture_output=True)
        subprocess.run(["umount", "-l", self.path], capture_output=True)

    def logs(self) -> str:
        out = []
        for root, _, files in os.walk(self.cache_dir):
            for name in files:
                if name == "fusefs.log":
                    with open(os.path.join(root, name), errors="replace") as f:
                        out.append(f.read())
        return "\n".join(out)


@pytest.fixture
def fusefs_mount(blockservers, tmp_path, request):
    """Factory: `fusefs_mount(servers=3, secret=None, mkfs=[...], mount=[...])` -> Mount.

    Starts the block servers, formats, mounts at tmp_path/mnt and returns once mounted.
    Teardown always unmounts (umount, then lazy unmount and SIGKILL), and fails the test
    if the daemon logged an ERROR or a traceback the test did not allow with
    `blockservers.servers.allow(regex)`.
    """
    mounts: list[Mount] = []

    def make(servers: int = 3, *, secret: bytes | None = None, mkfs=(), mount=()) -> Mount:
        started = blockservers(servers, secret=secret)
        m = Mount(started, str(tmp_path / f"mnt{len(mounts)}"),
                  str(tmp_path / f"cache{len(mounts)}"),
                  str(tmp_path / "secret") if secret else None)
        mounts.append(m)
        m.cli("mkfs", *m.cluster_args(), *mkfs)
        m.mount(*mount)
        return m

    try:
        yield make
    finally:
        for m in mounts:
            if m.mounted:
                try:
                    m.cli("umount", m.path, check=False, timeout=120)
                except subprocess.TimeoutExpired:
                    pass
            if m.mounted or m.daemon_pid():
                m.force_unmount()
    problems = []
    for m in mounts:
        for match in _PROBLEM.finditer(m.logs()):
            text = m.logs()
            line = text[match.start():text.find("\n", match.start())]
            if not any(p.search(line) for p in blockservers.servers.allowed):
                problems.append(line)
    if problems:
        pytest.fail("fusefs daemon logged unexpected errors:\n" + "\n".join(problems[:20]))


NOBODY = 65534


def as_user(fn, uid: int = NOBODY, gid: int = NOBODY):
    """Run fn() in a forked child with all ids dropped to uid/gid.

    Returns ("ok", value) or ("errno", errno). The child reaches the mount through file
    descriptors the parent opened (dir_fd), because the pytest tmp directories above the
    mountpoint are not searchable by other users.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(r)
            try:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                result = ("ok", fn())
            except OSError as e:
                result = ("errno", e.errno)
            except BaseException:  # noqa: BLE001 - report it to the parent
                result = ("crash", traceback.format_exc())
            payload = pickle.dumps(result)
            while payload:
                payload = payload[os.write(w, payload):]
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        payload = f.read()
    os.waitpid(pid, 0)
    result = pickle.loads(payload)
    assert result[0] != "crash", result[1]
    return result


def read_through(path: str) -> bytes:
    """Read a whole file from the daemon, not from pages the kernel kept (a symlink is
    not followed: the read then fails with ELOOP)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
