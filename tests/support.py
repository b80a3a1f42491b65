"""Helpers for the tests: real block servers and mounts, polling, files, users, cleanup.

Nothing here is a fixture or a pytest hook (those live in conftest.py); test modules import
what they use from here (`from .support import wait_until`). The pieces:

- `BlockServer`, `ServerSet`, `SigningAuth`: real `blockserver serve` processes and their logs;
- `Mount`: a real `fusefs mount`, its daemon, its logs and the log lines a test expects;
- `wait_until`, `alive`: polling instead of sleeping;
- `sha256_of`, `check_files`, `read_through`: reading back through the daemon;
- `as_user`: one call in a child process with other ids (bounded by a timeout);
- `cleanup_all`: run every cleanup step even when one fails, then report them all;
- `sweep_stale`, `leftovers_under`: find and end mounts and processes a run left behind.

Log policy (one for servers and daemons): a line that starts with a timestamp and ERROR or
CRITICAL, or a "Traceback" line, is a problem unless a pattern declared by the test matches
it (`servers.allow(regex)`, `mount.expect_log(regex)` or `@pytest.mark.expect_log(regex)`).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import NamedTuple

import pytest
import requests

from blockserver import protocol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBLEM = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) |^Traceback ", re.M)

# The tier of the test running now (set by conftest); a "unit" test may start no process.
current_tier: str | None = None


def refuse_in_unit_tier(what: str) -> None:
    """Fail loudly when a test of the unit tier starts a server or a mount: its module
    belongs in another tier of conftest's table."""
    if current_tier == "unit":
        raise RuntimeError(f"a unit-tier test started {what}: move its module to the "
                           "right tier in tests/conftest.py")


def problem_lines(text: str, allowed, start: int = 0) -> list[str]:
    """The ERROR/CRITICAL/Traceback lines of `text` from offset `start` that no pattern
    in `allowed` matches."""
    found = []
    for match in PROBLEM.finditer(text, start):
        end = text.find("\n", match.start())
        line = text[match.start():end if end >= 0 else len(text)]
        if not any(p.search(line) for p in allowed):
            found.append(line)
    return found


def cleanup_all(steps, what: str = "cleanup") -> None:
    """Call every step (a callable), whatever the earlier ones raised; then raise one
    error naming each step that failed."""
    failures = []
    for step in steps:
        try:
            step()
        except BaseException as e:  # noqa: BLE001 - every step must run; reported below
            failures.append(f"{getattr(step, '__name__', step)}: {e!r}")
    if failures:
        raise RuntimeError(f"{what}: {len(failures)} step(s) failed:\n" + "\n".join(failures))


# -- block servers -------------------------------------------------------------------------

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
        self.launch()
        return self.ready(timeout)

    def launch(self) -> None:
        """Start the process; `ready` waits until it serves (ServerSet starts several
        processes before it waits for the first)."""
        refuse_in_unit_tier("a block server")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._command(), stdout=subprocess.PIPE, stderr=log, cwd=REPO)

    def ready(self, timeout: float = 20.0) -> "BlockServer":
        line = _read_line(self.proc.stdout, timeout)
        if not line.startswith("serving "):
            self.stop()
            raise RuntimeError(f"blockserver did not start: {line!r}\n{self.log_tail()}")
        self.url = line.split()[1]
        self.port = int(self.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout
        while not self._answers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"blockserver at {self.url} never answered\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def _command(self) -> list[str]:
        """How the server is started (a subclass may run it elsewhere, e.g. in a namespace)."""
        return [sys.executable, "-m", "blockserver", "serve", "--data", self.data_dir,
                "--listen", f"127.0.0.1:{self.port}", *self.args]

    def _answers(self) -> bool:
        try:
            status = requests.get(self.url + "/v1/status", timeout=2, verify=False).status_code
        except requests.RequestException:
            return False
        return status in (200, 401)

    def ask_to_stop(self) -> None:
        """SIGTERM without waiting (ServerSet stops several at once)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot hear SIGTERM
            self.proc.terminate()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.ask_to_stop()
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
    """The block servers one test (or one module) started, and the log lines it expects.

    `start(n)` adds servers with data and logs under `directory`; `stop_all()` stops every
    one even when some stop fails; `unexpected_problems()` applies the log policy, from
    the log offsets taken by `mark()` (none: from the start)."""

    def __init__(self, directory=None):
        super().__init__()
        self.directory = directory
        self.allowed: list[re.Pattern] = []
        self.marks: dict[str, int] = {}

    def allow(self, pattern: str) -> None:
        """Declare an expected ERROR/traceback line (regex) so teardown does not fail on it."""
        self.allowed.append(re.compile(pattern))

    def start(self, n: int = 1, *, secret: bytes | None = None, args=()) -> list[BlockServer]:
        extra = list(args)
        if secret is not None:
            secret_file = os.path.join(self.directory, "secret")
            with open(secret_file, "wb") as f:
                f.write(secret)
            extra += ["--secret-file", secret_file]
        new = []
        for _ in range(n):
            i = len(self)
            server = BlockServer(os.path.join(self.directory, f"server{i}"),
                                 os.path.join(self.directory, f"server{i}.log"), extra, secret)
            self.append(server)  # before start(): a server that fails to start is stopped
            server.launch()
            new.append(server)
        return [server.ready() for server in new]  # they start side by side

    def stop_all(self) -> None:
        cleanup_all([server.ask_to_stop for server in self] + [server.stop for server in self],
                    "stopping block servers")

    def mark(self) -> None:
        """From now on, only log lines written after this call count as problems."""
        self.marks = {s.log_path: len(s.log_text()) for s in self}

    def unexpected_problems(self, extra_allowed=()) -> list[str]:
        allowed = self.allowed + list(extra_allowed)
        return [f"{server.url}: {line}" for server in self
                for line in problem_lines(server.log_text(), allowed,
                                          self.marks.get(server.log_path, 0))]


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


def members_of(servers) -> list:
    """The cluster membership (stable id + URL) of running BlockServer objects."""
    from fusefs.transport import Member

    ids = []
    for server in servers:
        s = server.session()
        ids.append(s.get(server.url + "/v1/status", timeout=5).json()["server_id"])
    return [Member(i, s.url) for i, s in zip(ids, servers)]


# -- waiting, reading back -----------------------------------------------------------------

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


def alive(pid: int) -> bool:
    """True while `pid` runs (stopped counts; a zombie does not)."""
    from fusefs.host import process_alive

    return process_alive(pid)


def is_mounted(path: str) -> bool:
    """True if something is mounted exactly at `path`."""
    return _mount_table().is_mounted(path)


def unmount(path: str, lazy: bool = False) -> bool:
    """Detach the FUSE mount at `path` (with whichever of fusermount3, fusermount and
    umount this machine has); True if one of them succeeded."""
    return _mount_table().unmount(path, lazy=lazy)


def _mount_table():
    """fusefs's module for the daemon registry and the kernel's mount table (is_mounted,
    read_registry, unmount): the one place the helpers import it from."""
    from fusefs import mounts

    return mounts


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


# -- mounts --------------------------------------------------------------------------------

class WriteLoad:
    """Writes, fsyncs and reads back files on a mount until stopped. `written` is the
    manifest: every file whose fsync returned, with its digest. `errors` is every
    operation that failed."""

    def __init__(self, root: str, size: int = 150_000):
        self.root, self.size = root, size
        self.written: dict[str, str] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "WriteLoad":
        os.makedirs(self.root, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=180)
        assert not self._thread.is_alive(), "the workload hangs"

    def wait_for(self, more: int, what: str, timeout: float = 90) -> None:
        target = len(self.written) + more
        wait_until(lambda: len(self.written) >= target or self._stop.is_set(),
                   f"{more} more files ({what})", timeout=timeout)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            path = os.path.join(self.root, f"w{i}.bin")
            data = os.urandom(self.size + i * 997)
            try:
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                self.written[path] = sha256_of(path)
                earlier = os.path.join(self.root, f"w{i // 2}.bin")
                if sha256_of(earlier) != self.written[earlier]:
                    self.errors.append(f"{earlier} reads back wrong")
            except OSError as e:
                self.errors.append(f"{path}: {e}")
                if not os.path.isdir(self.root):
                    return  # the mount is gone (its daemon was killed)
            i += 1


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_fusefs_daemon(pid: int) -> bool:
    """True while `pid` is a live fusefs mount daemon (not a reused pid, not a zombie)."""
    args = " ".join(_cmdline(pid))
    return "fusefs" in args and "mount" in args and alive(pid)


class Mount:
    """A real `fusefs mount` of a filesystem on real block servers (see `fusefs_mount`).

    It remembers every cache directory it was mounted with (each holds a daemon log), the
    log lines its test expects (`expect_log`), and where the logs stood at `mark_logs()`."""

    def __init__(self, servers, path: str, cache_dir: str, secret_file: str | None):
        self.servers = servers
        self.path = path
        self.cache_dir = cache_dir
        self.secret_file = secret_file
        self.cache_dirs = [cache_dir]
        self.expected: list[re.Pattern] = []
        self.log_marks: dict[str, int] = {}

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
        refuse_in_unit_tier("a mount")
        cache_dir = cache_dir or self.cache_dir
        if cache_dir not in self.cache_dirs:
            self.cache_dirs.append(cache_dir)
        os.makedirs(self.path, exist_ok=True)
        self.cli("mount", *self.cluster_args(), "--cache-dir", cache_dir, *extra, self.path)

    def umount(self) -> None:
        self.cli("umount", self.path)

    @property
    def mounted(self) -> bool:
        return _mount_table().is_mounted(self.path)

    def registry_record(self) -> dict | None:
        """What the daemon serving this mount registered (pid, state_dir, ...), or None."""
        return _mount_table().read_registry(self.path)

    def daemon_pid(self) -> int | None:
        record = self.registry_record()
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
        _mount_table().unmount(self.path, lazy=True)

    def cleanup(self) -> None:
        """Unmount whatever is mounted here (a clean umount first, then SIGKILL and a lazy
        unmount), including mounts stacked on the same path; raise if one stays."""
        for _ in range(3):
            pid = self.daemon_pid()
            if pid and _is_fusefs_daemon(pid):
                os.kill(pid, signal.SIGCONT)  # a paused daemon cannot unmount
            if self.mounted:
                try:
                    self.cli("umount", self.path, check=False, timeout=120)
                except subprocess.TimeoutExpired:
                    pass
            if self.mounted or self.daemon_pid():
                self.force_unmount()
            if not self.mounted:
                self._wait_for_exit(pid)
                return
        raise RuntimeError(f"{self.path} is still mounted after cleanup")

    @staticmethod
    def _wait_for_exit(pid: int | None, timeout: float = 30.0) -> None:
        """`fusefs umount` returns once the mount is detached; the daemon then closes what
        it holds (its metrics endpoint takes up to half a second) and exits. Wait for that,
        so a test leaves no process behind; raise if it does not come."""
        deadline = time.monotonic() + timeout
        while pid and _is_fusefs_daemon(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise RuntimeError(f"fusefs daemon {pid} still running {timeout:.0f} s after "
                                   "its unmount (killed)")
            time.sleep(0.01)

    def _log_files(self) -> list[str]:
        found = []
        for cache in self.cache_dirs:
            for root, _, files in os.walk(cache):
                found += [os.path.join(root, n) for n in files if n == "fusefs.log"]
        return found

    @staticmethod
    def _read(path: str) -> str:
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def logs(self) -> str:
        """The daemon logs of every cache directory this mount used."""
        return "\n".join(self._read(p) for p in self._log_files())

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def expect_log(self, pattern: str) -> None:
        """Declare a daemon log line (regex) this test expects, so the log policy lets it
        pass (an ERROR line or traceback no pattern matches fails the test)."""
        self.expected.append(re.compile(pattern))

    def mark_logs(self) -> None:
        """From now on, only daemon log lines written after this call count as problems."""
        self.log_marks = {p: len(self._read(p)) for p in self._log_files()}

    def unexpected_problems(self, extra_allowed=()) -> list[str]:
        allowed = self.expected + list(extra_allowed)
        return [line for p in self._log_files()
                for line in problem_lines(self._read(p), allowed, self.log_marks.get(p, 0))]


class Workspace(NamedTuple):
    """A test's own directory (`path`) on a mount that other tests share (`mount`)."""

    mount: Mount
    path: str


class MountSet(list):
    """The mounts one test (or one module) made, each on its own new servers; `cleanup()`
    takes every one down even when some fail, then stops the servers."""

    def __init__(self, servers: ServerSet, directory: str):
        super().__init__()
        self.servers = servers
        self.directory = directory

    def make(self, servers: int = 3, *, secret: bytes | None = None, mkfs=(), mount=()) -> Mount:
        started = self.servers.start(servers, secret=secret)
        m = self.track(os.path.join(self.directory, f"mnt{len(self)}"),
                       os.path.join(self.directory, f"cache{len(self)}"), started,
                       os.path.join(self.directory, "secret") if secret else None)
        m.cli("mkfs", *m.cluster_args(), *mkfs)
        m.mount(*mount)
        return m

    def track(self, path: str, cache_dir: str, servers=(), secret_file=None) -> Mount:
        """A Mount the teardown will take down and whose logs it checks: also for a mount
        that a test expects to be refused (if it is not, it must not stay behind)."""
        m = Mount(list(servers), str(path), str(cache_dir), secret_file)
        self.append(m)
        return m

    def cleanup(self) -> None:
        cleanup_all([m.cleanup for m in self], "taking the mounts down")

    def unexpected_problems(self, extra_allowed=()) -> list[str]:
        return [line for m in self for line in m.unexpected_problems(extra_allowed)]


# -- other users ---------------------------------------------------------------------------

NOBODY = 65534


def as_user(fn, uid: int = NOBODY, gid: int = NOBODY, timeout: float = 60.0):
    """Run fn() in a forked child with all ids dropped to uid/gid.

    Returns ("ok", value) or ("errno", errno). The child reaches the mount through file
    descriptors the parent opened (dir_fd), because the pytest tmp directories above the
    mountpoint are not searchable by other users. A child that has not answered within
    `timeout` is killed and the test fails.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(r)
            _child_reports(fn, uid, gid, w)
        finally:
            os._exit(0)
    os.close(w)
    payload = None
    try:
        payload = _read_all(r, timeout)
    finally:
        os.close(r)
        if payload is None:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if payload is None:
        pytest.fail(f"as_user({getattr(fn, '__name__', fn)}) gave no answer in {timeout} s")
    result = pickle.loads(payload)
    assert result[0] != "crash", result[1]
    return result


def _child_reports(fn, uid: int, gid: int, w: int) -> None:
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


def _read_all(fd: int, timeout: float) -> bytes | None:
    """Everything until EOF on `fd`, or None if EOF has not come within `timeout`."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# -- what earlier runs and tests left behind -----------------------------------------------

def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _our_processes_under(root: str) -> list[int]:
    """Block servers and fusefs daemons whose command line names a path under `root`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        args = _cmdline(int(name))
        ours = ("blockserver" in " ".join(args) and "serve" in args) or \
            ("fusefs" in " ".join(args) and ("mount" in args or "up" in args))
        if ours and any(_under(a, root) for a in args):
            found.append(int(name))
    return found


def _mounts_under(root: str) -> list[str]:
    """Mountpoints under `root`, deepest first."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:  # the mountpoint is field 5, with octal escapes such as \040
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if _under(point, root) and point != root:
                points.append(point)
    return sorted(points, key=len, reverse=True)


def leftovers_under(root: str) -> list[str]:
    """End the block servers and fusefs daemons still running with paths under `root`
    and detach the mounts under it; return what was found (empty: nothing was left)."""
    found = []
    for pid in _our_processes_under(root):
        found.append(f"process {pid}: {' '.join(_cmdline(pid))[:200]}")
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    for point in _mounts_under(root):
        found.append(f"mount at {point}")
        _mount_table().unmount(point, lazy=True)
    return found


def stale_session_dirs(basetemp: str) -> list[str]:
    """The other numbered pytest directories beside `basetemp` whose session has ended:
    no lock file, or a lock file naming a process that no longer runs. (pytest writes its
    pid into `.lock` while a session runs; a live session of another run is left alone.)"""
    parent = os.path.dirname(os.path.abspath(basetemp))
    if not os.path.basename(parent).startswith("pytest-of-"):
        return []
    stale = []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not name.startswith("pytest-") or os.path.islink(path) or \
                os.path.abspath(path) == os.path.abspath(basetemp) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, ".lock")) as f:
                owner = int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            owner = 0
        if not alive(owner):
            stale.append(path)
    return stale


def sweep_stale(basetemp: str) -> list[str]:
    """End what ended pytest sessions left behind (mounts, block servers, daemons)."""
    return [item for d in stale_session_dirs(basetemp) for item in leftovers_under(d)]
