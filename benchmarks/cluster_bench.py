#!/usr/bin/env python3
"""Replicated block store throughput: R=3, W=2 on three block servers against R=1, W=1 on one.

One invocation starts four local block servers (`python -m blockserver serve`), each on a
fresh data directory under one temp directory (so all of them write to the same disk):
three form the R=3 cluster, the fourth is the R=1 baseline. Two `ReplicatedStore` objects
are built over them, one per configuration, and shared by all client threads.

For each round and each client thread count, and for each store (R=3 first in even rounds,
R=1 first in odd ones), the benchmark

  1. puts a budget of fresh 1 MiB blocks (`store.put`, the threads taking blocks from a
     shared queue) - timed until the last put returns, i.e. what a writer waits for (W
     acknowledgements; the R-th copy may still be in flight);
  2. waits, untimed, until every block has all R copies on the servers (checked with
     /v1/batch/check), so the next phase does not compete with write-back;
  3. gets the same blocks (`store.get`, which verifies each checksum) - they mostly come
     from the servers' page cache, so this measures the request path, not the disk;
  4. deletes them (`store.delete_many`) so disk use stays bounded.

The table shows the median MB/s over rounds of each figure and the median over rounds of
the per-round ratio R=3 / R=1 (both measured back to back in the same round). CPU columns
are CPU seconds per wall second (100% = one core) of this process and of the servers used.

The servers are always stopped at the end (also on Ctrl-C / SIGTERM) and their data removed.

Only the standard library and the project's own modules (fusefs, blockserver) are used.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from blockserver import protocol  # noqa: E402
from fusefs import errors  # noqa: E402
from fusefs.cluster import ClusterConfig, ReplicatedStore  # noqa: E402
from fusefs.transport import Member, Transport, TransportConfig  # noqa: E402
from servers import BenchError, ServerProcess, filesystem_of, load_average  # noqa: E402


def member_of(server: ServerProcess) -> Member:
    return Member(server.server_id, server.url)


MiB = 1 << 20
MB = 1_000_000  # throughput in decimal MB/s, like docs/fuse-and-performance.md
BLOCK_SIZE = 1 * MiB
DISTINCT_PAYLOADS = 64  # blocks are drawn from this many distinct random MiB (ids differ)
PUT_TARGET = 0.40  # put R=3 >= 40% of R=1
GET_TARGET = 0.90  # get R=3 >= 90% of R=1


# -- the two configurations under test ----------------------------------------------------------

@dataclass
class Setup:
    label: str  # "R=3" / "R=1"
    store: ReplicatedStore
    servers: list[ServerProcess]

    @property
    def replicas(self) -> int:
        return self.store.config.replicas

    def server_cpu(self) -> float | None:
        values = [s.cpu_seconds() for s in self.servers]
        return None if any(v is None for v in values) else sum(values)

    def copies(self, ids: list[str]) -> int:
        """How many copies of `ids` the servers hold, all servers together."""
        total = 0
        for server in self.servers:
            for start in range(0, len(ids), 1000):
                entries = self.store.transport.batch_check(member_of(server), ids[start:start + 1000])
                total += sum(1 for e in entries if e["status"] == 200)
        return total

    def settle(self, ids: list[str], timeout: float = 60.0) -> float:
        """Wait until every block has all R copies; seconds waited."""
        started = time.monotonic()
        want = len(ids) * self.replicas
        while True:
            have = self.copies(ids)
            if have >= want:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise BenchError(f"{self.label}: only {have} of {want} block copies exist "
                                 f"{timeout:.0f}s after the last put returned "
                                 f"(repair backlog {self.store.repair_backlog()})")
            time.sleep(0.02)


# -- one timed phase ----------------------------------------------------------------------------

@dataclass
class Sample:
    seconds: float
    n_bytes: int
    client_cpu: float  # CPU seconds of this process per wall second
    server_cpu: float | None  # CPU seconds of the servers used per wall second

    @property
    def mb_s(self) -> float:
        return self.n_bytes / self.seconds / MB


def run_phase(threads: int, op, items: list, setup: Setup) -> Sample:
    """Run `op(item)` for every item on `threads` threads taking items from one queue."""
    lock = threading.Lock()
    queue = iter(items)
    failures: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)

    def worker():
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        while not failures:
            with lock:
                item = next(queue, None)
            if item is None:
                return
            try:
                op(item)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                failures.append(e)
                return

    workers = [threading.Thread(target=worker, name=f"bench-{i}", daemon=True)
               for i in range(threads)]
    for w in workers:
        w.start()
    server_before = setup.server_cpu()
    me_before = os.times()
    barrier.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - started
    me_after = os.times()
    server_after = setup.server_cpu()
    if failures:
        raise failures[0]
    client_cpu = (me_after.user - me_before.user + me_after.system - me_before.system) / seconds
    server_cpu = None
    if server_before is not None and server_after is not None:
        server_cpu = (server_after - server_before) / seconds
    return Sample(seconds, len(items) * BLOCK_SIZE, client_cpu, server_cpu)


class Payloads:
    """Random 1 MiB payloads and their checksums, made once; every block gets a fresh id."""

    def __init__(self, seed: int = 1):
        rng = random.Random(seed)
        self.data = [rng.randbytes(BLOCK_SIZE) for _ in range(DISTINCT_PAYLOADS)]
        self.sums = [protocol.checksum(d) for d in self.data]

    def blocks(self, n: int) -> list[tuple[str, bytes, str]]:
        return [(protocol.new_block_id(), self.data[i % DISTINCT_PAYLOADS],
                 self.sums[i % DISTINCT_PAYLOADS]) for i in range(n)]


def measure(setup: Setup, threads: int, blocks: list[tuple[str, bytes, str]]):
    """put, settle, get, delete; returns (put sample, get sample, settle seconds)."""
    store = setup.store
    ids = [b[0] for b in blocks]

    def put(item):
        store.put(*item)

    def get(item):
        block_id, data, checksum = item
        got = store.get(block_id, checksum)
        if len(got) != len(data):
            raise BenchError(f"{setup.label}: block {block_id} came back with {len(got)} "
                             f"bytes instead of {len(data)}")

    try:
        put_sample = run_phase(threads, put, blocks, setup)
        settled = setup.settle(ids)
        get_sample = run_phase(threads, get, blocks, setup)
    finally:
        store.delete_many(ids)
    return put_sample, get_sample, settled


def warm_up(setup: Setup, threads: int, payloads: Payloads) -> None:
    """Open the store's connections (one per I/O thread and server) before timing anything."""
    measure(setup, threads, payloads.blocks(max(32, 8 * threads)))


# -- results and report -------------------------------------------------------------------------

@dataclass
class Results:
    samples: dict = field(default_factory=dict)  # (threads, label, op) -> [Sample per round]

    def add(self, threads: int, label: str, op: str, sample: Sample) -> None:
        self.samples.setdefault((threads, label, op), []).append(sample)

    def median(self, threads, label, op, attr="mb_s") -> float | None:
        values = [getattr(s, attr) for s in self.samples.get((threads, label, op), [])]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def ratio(self, threads, op) -> float | None:
        """Median over rounds of R=3 MB/s / R=1 MB/s measured in the same round."""
        r3 = self.samples.get((threads, "R=3", op), [])
        r1 = self.samples.get((threads, "R=1", op), [])
        values = [a.mb_s / b.mb_s for a, b in zip(r3, r1) if b.mb_s > 0]
        return statistics.median(values) if values else None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def render_table(results: Results, thread_counts: list[int]) -> str:
    header = ["threads", "op", "R=3 MB/s", "R=1 MB/s", "R3/R1", "target", "",
              "cli cpu R3", "cli cpu R1", "srv cpu R3", "srv cpu R1"]
    rows = []
    for t in thread_counts:
        for op, target in (("put", PUT_TARGET), ("get", GET_TARGET)):
            ratio = results.ratio(t, op)
            verdict = "-" if ratio is None else ("PASS" if ratio >= target else "MISS")
            rows.append([str(t), op, _fmt(results.median(t, "R=3", op), ".1f"),
                         _fmt(results.median(t, "R=1", op), ".1f"), _fmt(ratio, ".2f"),
                         f">={target:.2f}", verdict,
                         _pct(results.median(t, "R=3", op, "client_cpu")),
                         _pct(results.median(t, "R=1", op, "client_cpu")),
                         _pct(results.median(t, "R=3", op, "server_cpu")),
                         _pct(results.median(t, "R=1", op, "server_cpu"))])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {1, 6}

    def line(cells):
        return "  ".join(c.ljust(widths[i]) if i in left else c.rjust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def target_checks(results: Results, thread_counts: list[int]) -> list[str]:
    lines = []
    for op, target in (("put", PUT_TARGET), ("get", GET_TARGET)):
        name = f"{op} R=3 >= {target:.0%} of R=1"
        for t in thread_counts:
            ratio = results.ratio(t, op)
            if ratio is None:
                lines.append(f"{name}: not measured ({t} threads)")
                continue
            verdict = "PASS" if ratio >= target else "MISS"
            lines.append(f"{name}: {verdict}  ({t} threads: R=3 "
                         f"{results.median(t, 'R=3', op):.1f} MB/s = {ratio:.0%} of R=1 "
                         f"{results.median(t, 'R=1', op):.1f} MB/s)")
    return lines


# -- command line -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Put/get throughput of 1 MiB blocks through ReplicatedStore with R=3, W=2 "
                    "on three local block servers, against R=1, W=1 on one, in one run.",
        epilog="Figures are medians over interleaved rounds; on a shared machine trust the "
               "R3/R1 ratios more than the absolute MB/s. Exit status 0 unless an error "
               "occurred (the targets are informational).")
    p.add_argument("--data-root", help="directory to create the servers' temp data "
                   "directories in (default: the system temp dir); all four share it, so "
                   "they share its disk")
    p.add_argument("--threads", default="4", help="client thread counts sharing one store, "
                   "comma-separated, e.g. 1,4,8 (default 4)")
    p.add_argument("--mib", type=int, default=512,
                   help="MiB of 1 MiB blocks per measurement (default 512)")
    p.add_argument("--rounds", type=int, default=3, help="repetitions of every measurement, "
                   "R=3 and R=1 interleaved (default 3; medians are reported)")
    p.add_argument("--hedge-delay", type=float, default=ClusterConfig.hedge_delay,
                   help=f"ClusterConfig.hedge_delay for both stores (default "
                   f"{ClusterConfig.hedge_delay})")
    p.add_argument("--timeout", type=float, default=60.0, help="read timeout per request, s")
    p.add_argument("--quick", action="store_true", help="smoke run of a few seconds: 1 round, "
                   "16 MiB per measurement")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.mib = 1, min(args.mib, 16)
    try:
        args.thread_counts = sorted({int(t) for t in args.threads.split(",") if t.strip()})
    except ValueError:
        p.error("--threads takes comma-separated whole numbers, e.g. 1,4,8")
    if not args.thread_counts or min(args.thread_counts) < 1:
        p.error("--threads needs counts >= 1")
    if args.rounds < 1 or args.mib < 1:
        p.error("--rounds and --mib must be >= 1")
    if args.mib > 4096:
        p.error("--mib above 4096 would keep too much on disk (R=3 writes 3 copies)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()

    def on_term(signum, frame):
        raise KeyboardInterrupt  # unwinds through `finally`: servers stopped, data removed

    signal.signal(signal.SIGTERM, on_term)
    work = tempfile.mkdtemp(prefix="cluster-bench-", dir=args.data_root)
    servers = [ServerProcess(name, os.path.join(work, name), os.path.join(work, name + ".log"))
               for name in ("s1", "s2", "s3", "solo")]
    setups: list[Setup] = []
    failed = False
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
        for label, members, r, w in (("R=3", servers[:3], 3, 2), ("R=1", servers[3:], 1, 1)):
            config = ClusterConfig(replicas=r, write_quorum=w, hedge_delay=args.hedge_delay)
            transport = Transport(TransportConfig(read_timeout=args.timeout))  # own sessions
            store = ReplicatedStore([member_of(s) for s in members], transport, config)
            setups.append(Setup(label, store, members))
            store.start()
        r3, r1 = setups
        payloads = Payloads()
        print(f"servers: R=3 on {', '.join(s.url for s in servers[:3])}; "
              f"R=1 on {servers[3].url}")
        print(f"data: {work} ({filesystem_of(work)})")
        print(f"1 MiB blocks, {args.mib} MiB per measurement, threads {args.thread_counts}, "
              f"rounds {args.rounds}, hedge {args.hedge_delay}s; {os.cpu_count()} CPUs, "
              f"load {load_average()}, python {sys.version.split()[0]}", flush=True)
        for setup in setups:
            warm_up(setup, max(args.thread_counts), payloads)

        results = Results()
        for rnd in range(args.rounds):
            for t in args.thread_counts:
                order = (r3, r1) if rnd % 2 == 0 else (r1, r3)
                for setup in order:
                    put, get, settled = measure(setup, t, payloads.blocks(args.mib))
                    results.add(t, setup.label, "put", put)
                    results.add(t, setup.label, "get", get)
                    print(f"round {rnd + 1} threads {t:<2} {setup.label}: put {put.mb_s:7.1f} "
                          f"MB/s ({put.seconds:5.2f}s)  get {get.mb_s:7.1f} MB/s "
                          f"({get.seconds:5.2f}s)  all copies {settled:.2f}s after last put",
                          flush=True)
        for setup in setups:
            if setup.store.repair_backlog():
                print(f"note: {setup.label} store remembers {setup.store.repair_backlog()} "
                      f"missing copies", file=sys.stderr)
        print()
        print(render_table(results, args.thread_counts))
        print()
        print("MB = 10^6 bytes. MB/s: median over rounds; R3/R1: median of per-round ratios.")
        print("put: until the last put returned (W acks); get: warm page cache, checksums "
              "verified by the store. cpu: CPU s per wall s (100% = one core); srv = sum of "
              "the servers used.")
        print()
        for check in target_checks(results, args.thread_counts):
            print(check)
        print(f"\ntotal time {time.monotonic() - started:.0f}s")
        return 0
    except (BenchError, errors.StorageError) as e:
        failed = True
        print(f"cluster_bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        failed = True
        print("cluster_bench: interrupted", file=sys.stderr)
        return 130
    finally:
        for setup in setups:
            try:
                setup.store.close()
            except Exception as e:  # noqa: BLE001 - still stop the servers
                print(f"cluster_bench: closing {setup.label} store: {e}", file=sys.stderr)
        for server in servers:
            server.stop()
        for server in servers:
            text = server.log_tail(200)
            if failed or "Traceback" in text or " ERROR " in text:
                if text.strip():
                    print(f"server {server.name} log tail:\n{text}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
