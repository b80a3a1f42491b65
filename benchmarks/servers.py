"""Block-server child processes for the benchmarks (shared by blockserver_bench.py and
cluster_bench.py): start on a free loopback port, wait until ready, measure CPU, stop."""

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
