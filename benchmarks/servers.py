"""What the benchmarks share: block-server child processes (start on a free loopback port,
wait until ready, measure CPU, stop) and the facts each run prints about the machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_average() -> str:
    """The 1/5/15-minute load averages (other work on the machine skews the figures)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def mount_of(path: str) -> tuple[str, str, str] | None:
    """(device, mountpoint, fstype) of the mount holding `path`, best effort."""
    path = os.path.realpath(path)
    best = None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                mnt = mnt.replace("\\040", " ")
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and (best is None or len(mnt) >= len(best[1])):
                    best = (dev, mnt, fstype)
    except OSError:
        return None
    return best


def filesystem_of(path: str) -> str:
    m = mount_of(path)
    return f"{m[0]} on {m[1]} ({m[2]})" if m else "unknown filesystem"


class BenchError(Exception):
    """Something went wrong that makes the figures meaningless (a refused request, ...)."""


def process_cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads), from /proc; None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class ServerProcess:
    """One `python -m blockserver serve` child on a free loopback port."""

    def __init__(self, name: str, data_dir: str, log_path: str):
        self.name = name
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.server_id = ""

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> None:
        cmd = [sys.executable, "-m", "blockserver", "serve", "--data", self.data_dir,
               "--listen", "127.0.0.1:0", "--log-level", "warning"]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=log_file)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Read the `serving URL` line, then ask /v1/status for the server's id."""
        assert self.proc is not None
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        line = got[0].decode(errors="replace").strip() if got else ""
        if not line.startswith("serving "):
            raise BenchError(f"server {self.name} did not start (stdout {line!r}); "
                             f"log:\n{self.log_tail()}")
        self.url = line.split()[1]
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/v1/status", timeout=2) as r:
                    self.server_id = json.loads(r.read())["server_id"]
                    return
            except (OSError, ValueError, KeyError):
                if time.monotonic() > deadline:
                    raise BenchError(f"server {self.name} at {self.url} never answered "
                                     f"/v1/status; log:\n{self.log_tail()}") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"
