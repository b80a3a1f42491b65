#!/usr/bin/env python3
"""How long writers wait when a block server hangs.

    sudo .venv/bin/python benchmarks/hung_server.py [--stop-seconds 8] [--rounds 3]

Starts `python -m fusefs up` in a temporary directory (three local block servers, R=3,
W=2, mounted at DIR/mnt) and runs two writers on the mount for the whole run:

- a steady one: 40 MiB files in 1 MiB writes, each fsynced, one after another;
- a probe: 200 KB written and fsynced every 0.1 s; each of its fsyncs is timed.

Each round stops one server with SIGSTOP (it keeps its connections and answers nothing,
like a machine that hangs) for `--stop-seconds`, then continues it; the servers take
turns. Printed per round: the longest probe fsync while that server was stopped, and at
the end the median and longest of every probe fsync. With W=2 of three servers, one hung
server need not hold a writer at all: the figure to look at is how far the longest fsync
of a round is above the median.

Everything it started is stopped at the end, also on Ctrl-C: the servers are continued,
the writers stopped, `fusefs down` run and the directory removed. Exit status 0, or 1 if
a write failed (it prints why).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def fusefs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusefs", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


class Writers:
    """The steady writer and the timed probe, on threads, until `stop()`."""

    def __init__(self, mnt: str):
        self.mnt = mnt
        self.timings: list[tuple[float, float]] = []  # (monotonic start, seconds)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._guard, args=(f,), daemon=True)
                         for f in (self._steady, self._probe)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _guard(self, fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported by main
            self.error = e
            self._stop.set()

    def _steady(self) -> None:
        chunk = os.urandom(MiB)
        n = 0
        while not self._stop.is_set():
            with open(os.path.join(self.mnt, f"steady{n % 3}"), "wb") as f:
                for _ in range(40):
                    f.write(chunk)
                    if self._stop.is_set():
                        break
                f.flush()
                os.fsync(f.fileno())
            n += 1

    def _probe(self) -> None:
        data = os.urandom(200_000)
        n = 0
        while not self._stop.wait(0.1):
            started = time.monotonic()
            fd = os.open(os.path.join(self.mnt, f"probe{n % 50}"),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.timings.append((started, time.monotonic() - started))
            n += 1

    def longest_between(self, start: float, end: float) -> float:
        """The longest fsync that was under way at some moment of [start, end]."""
        inside = [s for t, s in self.timings if t <= end and t + s >= start]
        return max(inside, default=0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="How long writers on a fusefs mount wait while "
                                "one block server hangs (SIGSTOP). Needs FUSE (root).")
    p.add_argument("--stop-seconds", type=float, default=8.0,
                   help="how long each server stays stopped (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="servers stopped in turn (default 3)")
    p.add_argument("--workdir", default="/var/tmp", help="where the temporary cluster lives")
    args = p.parse_args(argv)

    work = tempfile.mkdtemp(prefix="fusefs-hung-", dir=args.workdir)
    mnt = os.path.join(work, "mnt")
    pids: list[int] = []
    writers = None
    try:
        up = fusefs("up", work)
        if up.returncode != 0:
            print(f"`fusefs up` failed:\n{up.stderr}{up.stdout}", file=sys.stderr)
            return 1
        with open(os.path.join(work, "cluster.json")) as f:
            pids = [s["pid"] for s in json.load(f)["servers"]]
        writers = Writers(mnt)
        writers.start()
        time.sleep(5)
        print(f"one server of {len(pids)} stopped for {args.stop_seconds:g} s per round; "
              "a small file is written and fsynced every 0.1 s beside a steady writer")
        for rnd in range(args.rounds):
            victim = pids[rnd % len(pids)]
            start = time.monotonic()
            os.kill(victim, signal.SIGSTOP)
            try:
                time.sleep(args.stop_seconds)
            finally:
                os.kill(victim, signal.SIGCONT)
            end = time.monotonic()
            time.sleep(5)
            if writers.error is not None:
                break
            print(f"round {rnd + 1}: server {rnd % len(pids)} stopped: longest fsync "
                  f"{writers.longest_between(start, end):.2f} s", flush=True)
        writers.stop()
        if writers.error is not None:
            print(f"a write failed: {writers.error}", file=sys.stderr)
            return 1
        times = [s for _, s in writers.timings]
        print(f"all {len(times)} fsyncs: median {statistics.median(times) * 1000:.0f} ms, "
              f"longest {max(times):.2f} s")
        return 0
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        if writers is not None:
            writers.stop()
        fusefs("down", work)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
