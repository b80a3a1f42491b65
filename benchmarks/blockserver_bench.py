#!/usr/bin/env python3
"""Block server throughput against the disk's own baseline, measured in the same run.

For each case (4 KiB blocks one per request, 4 KiB blocks in batches, 64 KiB, 1 MiB and
4 MiB blocks) and each client thread count, the benchmark

  1. PUTs a fixed budget of bytes to the block server, the threads sharing the blocks out
     (each thread has its own requests.Session, i.e. its own keep-alive connection);
  2. GETs the same blocks back (verifying each checksum) - these reads mostly come from the
     server machine's page cache, so they measure the request path, not the disk;
  3. writes the same bytes with a local Python loop, same block sizes, same thread count:
     temp file, fsync, rename into place, fsync of the directory ("fsync-each" baseline);
     for batched 4 KiB blocks also a loop that writes a batch of files and then makes them
     durable with one syncfs(2) ("1 sync/batch" baseline).

Every measurement is repeated --rounds times, server and baseline interleaved (their order
alternating from round to round). The table shows the median of each figure; a ratio
column is the median over rounds of server / baseline measured in the same round.

By default a private block server is started on a fresh data directory next to the
baseline's files (so both write to the same disk) and always stopped at the end. With
--url an already running server is used; the baseline then goes to --data-dir (or the
temp dir), which should be on the server's disk for the ratio to mean anything.

Only the standard library, requests, xxhash and blockserver.protocol are used.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import requests  # noqa: E402
import xxhash  # noqa: E402

from blockserver import protocol  # noqa: E402
from servers import (BenchError, ServerProcess, filesystem_of, load_average,  # noqa: E402
                     mount_of, process_cpu_seconds)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MB = 1_000_000  # throughput is reported in decimal MB/s, like the perf notes
MAX_CASE_BYTES = 1 * GiB  # one case's blocks live on disk at once: keep disk use bounded
DELETE_CHUNK = 5000  # ids per /v1/batch/delete (the server accepts up to 10000)


@dataclass(frozen=True)
class Case:
    name: str
    block_size: int
    budget: int  # bytes at --scale 1
    batch: bool = False


CASES = [
    Case("4k", 4 * KiB, 4 * MiB),
    Case("4k-batch", 4 * KiB, 16 * MiB, batch=True),
    Case("64k", 64 * KiB, 32 * MiB),
    Case("1m", 1 * MiB, 256 * MiB),
    Case("4m", 4 * MiB, 256 * MiB),
]
CASE_LABELS = {"4k": "4 KiB", "4k-batch": "4 KiB batch", "64k": "64 KiB", "1m": "1 MiB",
               "4m": "4 MiB"}


def _filesystem_notes(path: str) -> list[str]:
    """Facts about the disk that change what the figures mean."""
    m = mount_of(path)
    notes = []
    if m and m[2] in ("tmpfs", "ramfs"):
        notes.append(f"{m[1]} is {m[2]}: the baseline and the server write to memory, not a "
                     "disk; use --data-dir on a real disk")
    if m and m[2] == "ext4":
        try:
            with open(f"/sys/fs/ext4/{os.path.basename(m[0])}/journal_task") as f:
                no_journal = f.read().strip() == "<none>"
        except OSError:
            no_journal = False
        if no_journal:
            notes.append("ext4 without a journal: for a few minutes after files are deleted, "
                         "each file create scans the recently deleted inodes (ext4 "
                         "recently_deleted()), so small-block figures depend on how many "
                         "files this benchmark (and anything else on the disk) deleted lately")
    return notes


# -- workload ------------------------------------------------------------------------------

@dataclass
class Workload:
    """The blocks of one measurement and how the threads share them out."""

    case: Case
    ids: list[str]
    checksums: list[str]
    blocks: list[bytes]
    batch_blocks: int
    # per thread: list of work items; an item is a list of block indexes (one for a
    # single-block request, batch_blocks for a batch)
    shares: list[list[list[int]]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return len(self.blocks) * self.case.block_size


class DataPool:
    """Random bytes that blocks are cut from, so building a workload costs one copy."""

    def __init__(self, size: int = 16 * MiB):
        self.size = size
        self.data = os.urandom(size + 4 * MiB)
        self.next = 0

    def block(self, size: int) -> bytes:
        if size > len(self.data) - self.size:
            raise ValueError("block larger than the pool's margin")
        start = self.next
        self.next = (self.next + 4099 * 7) % self.size  # a prime stride: blocks differ
        return self.data[start:start + size]


def build_workload(case: Case, n_blocks: int, threads: int, batch_blocks: int,
                   pool: DataPool) -> Workload:
    blocks = [pool.block(case.block_size) for _ in range(n_blocks)]
    w = Workload(case=case, ids=[protocol.new_block_id() for _ in blocks],
                 checksums=[protocol.checksum(b) for b in blocks], blocks=blocks,
                 batch_blocks=batch_blocks)
    per_item = batch_blocks if case.batch else 1
    items = [list(range(i, min(i + per_item, n_blocks))) for i in range(0, n_blocks, per_item)]
    w.shares = [items[t::threads] for t in range(threads)]
    return w


def blocks_for(case: Case, scale: float, max_threads: int, batch_blocks: int) -> int:
    per_item = batch_blocks if case.batch else 1
    n = int(case.budget * scale) // case.block_size
    n = max(n, max_threads * per_item)  # every thread gets work at every thread count
    return (n // per_item) * per_item


# -- running threads in step ---------------------------------------------------------------

def run_threads(worker, shares: list, setup=None) -> float:
    """Run worker(state, share) in one thread per share, all released together.

    `setup()` runs in each thread before the start line (e.g. to open a keep-alive
    connection); its result is passed to the worker as `state`. Returns the wall time from
    the start line until the last thread finished. Any exception in a thread is re-raised.
    """
    n = len(shares)
    start_line = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def body(share):
        state = None
        try:
            state = setup() if setup else None
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        try:
            start_line.wait()
        except threading.BrokenBarrierError:
            return
        if errors:
            return
        try:
            worker(state, share)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            if state is not None and hasattr(state, "close"):
                state.close()

    threads = [threading.Thread(target=body, args=(s,), daemon=True) for s in shares]
    for t in threads:
        t.start()
    start_line.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


# -- server side: PUT, GET, delete ---------------------------------------------------------

class _Signing(requests.auth.AuthBase):
    """Signs requests as fusefs.transport does (SHA-256 of the body, for this server, with
    the headers with meaning); the answers' signatures are not checked here."""

    def __init__(self, secret: bytes):
        self.secret, self.server_id = secret, ""

    def __call__(self, r):
        # sign_request signs exactly the headers of protocol.SIGNED_HEADERS found here
        r.headers.update(protocol.sign_request(self.secret, r.method, r.path_url,
                                               protocol.content_digest(r.body or b""),
                                               server_id=self.server_id, headers=r.headers))
        return r


class Client:
    def __init__(self, url: str, timeout: float, secret: bytes | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.secret = secret

    def session(self) -> requests.Session:
        s = _session()
        if self.secret is not None:
            s.auth = _Signing(self.secret)
        r = s.get(self.url + "/v1/status", timeout=self.timeout)  # opens the connection
        if r.status_code != 200:
            raise BenchError(f"GET /v1/status answered {r.status_code}: {r.text[:200]} "
                             "(a server with --secret-file needs --secret-file here too)")
        if self.secret is not None:
            s.auth.server_id = r.json()["server_id"]
        return s

    def put_worker(self, w: Workload):
        url, timeout = self.url, self.timeout

        def single(session, share):
            for (i,) in share:
                r = session.put(f"{url}/v1/blocks/{w.ids[i]}", data=w.blocks[i],
                                headers={protocol.H_CHECKSUM: w.checksums[i]}, timeout=timeout)
                if r.status_code not in (200, 201):
                    raise BenchError(f"PUT {w.ids[i]} answered {r.status_code}: {r.text[:200]}")

        bodies = {}
        if w.case.batch:  # built before the clock starts, like a client's write buffer
            for share in w.shares:
                for item in share:
                    manifest = {"blocks": [{"id": w.ids[i], "checksum": w.checksums[i],
                                            "size": len(w.blocks[i])} for i in item]}
                    bodies[item[0]] = b"".join(
                        protocol.encode_batch(manifest, [w.blocks[i] for i in item]))

        def batched(session, share):
            for item in share:
                r = session.post(f"{url}/v1/batch/put", data=bodies[item[0]], timeout=timeout)
                if r.status_code != 200:
                    raise BenchError(f"batch put answered {r.status_code}: {r.text[:200]}")
                results = r.json()["results"]
                bad = [x for x in results if x.get("status") not in (200, 201)]
                if len(results) != len(item) or bad:
                    raise BenchError(f"batch put: {len(bad)} of {len(item)} items failed, "
                                     f"e.g. {bad[:1]}")

        return batched if w.case.batch else single

    def get_worker(self, w: Workload):
        url, timeout = self.url, self.timeout

        def single(session, share):
            for (i,) in share:
                # stream=True + raw.read(): one read of Content-Length bytes. r.content
                # would gather 10 KiB chunks in Python, which made the client, not the
                # server, the limit for large blocks (2-3x slower for 1 MiB here).
                r = session.get(f"{url}/v1/blocks/{w.ids[i]}", timeout=timeout, stream=True)
                data = r.raw.read()
                r.close()
                if r.status_code != 200:
                    raise BenchError(f"GET {w.ids[i]} answered {r.status_code}: {data[:200]!r}")
                if (r.headers.get(protocol.H_CHECKSUM) != w.checksums[i]
                        or xxhash.xxh3_128_hexdigest(data) != w.checksums[i]):
                    raise BenchError(f"GET {w.ids[i]}: wrong bytes or checksum")

        def batched(session, share):
            for item in share:
                body = b"".join(protocol.encode_batch({"ids": [w.ids[i] for i in item]}))
                r = session.post(f"{url}/v1/batch/get", data=body, timeout=timeout,
                                 stream=True)
                content = r.raw.read()
                r.close()
                if r.status_code != 200:
                    raise BenchError(f"batch get answered {r.status_code}: {content[:200]!r}")
                manifest, payload = protocol.decode_batch(content)
                offset = 0
                entries = manifest.get("blocks", [])
                if len(entries) != len(item):
                    raise BenchError(f"batch get: {len(entries)} entries for {len(item)} ids")
                for i, e in zip(item, entries):
                    if e.get("status") != 200 or e.get("id") != w.ids[i]:
                        raise BenchError(f"batch get: item {w.ids[i]} came back as {e}")
                    size = e["size"]
                    data = payload[offset:offset + size]
                    offset += size
                    if (e.get("checksum") != w.checksums[i]
                            or xxhash.xxh3_128_hexdigest(data) != w.checksums[i]):
                        raise BenchError(f"batch get {w.ids[i]}: wrong bytes or checksum")
                if offset != len(payload):
                    raise BenchError("batch get: payload longer than the manifest says")

        return batched if w.case.batch else single

    def delete(self, ids: list[str]) -> None:
        with self.session() as s:
            for start in range(0, len(ids), DELETE_CHUNK):
                chunk = ids[start:start + DELETE_CHUNK]
                body = b"".join(protocol.encode_batch({"ids": chunk}))
                r = s.post(f"{self.url}/v1/batch/delete", data=body, timeout=self.timeout)
                if r.status_code != 200:
                    raise BenchError(f"batch delete answered {r.status_code}: {r.text[:200]}")


def _session() -> requests.Session:
    s = requests.Session()
    # No proxy, netrc or CA settings from the environment: a benchmark talks to the server
    # directly, and requests would otherwise scan os.environ on every request (~0.5 ms per
    # request with a large environment on this kind of machine - more than the server's own
    # cost for a small GET).
    s.trust_env = False
    return s


# -- the physical baseline -----------------------------------------------------------------

def _syncfs_function():
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _syncfs_function()


def sync_filesystem(path: str) -> None:
    """syncfs(2) on the filesystem holding `path`; os.sync() where that is unavailable."""
    if _SYNCFS is not None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _SYNCFS(fd) == 0:
                return
        finally:
            os.close(fd)
    os.sync()


class Baseline:
    """Local writes of the same blocks to files in a directory on the same disk.

    The layout mirrors the server's (files fanned out into 256 directories by the first two
    hex digits of their id, temp files in a separate directory) so each operation costs the
    filesystem about what the server's costs it; only HTTP and the server's Python are
    missing.
    """

    def __init__(self, root: str):
        self.root = root
        self.tmp = os.path.join(root, "tmp")
        self.blocks = os.path.join(root, "blocks")

    def prepare(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.tmp)
        for i in range(256):
            os.makedirs(os.path.join(self.blocks, f"{i:02x}"))
        sync_filesystem(self.root)

    def clear(self) -> None:
        """Remove the files a measurement wrote (not timed)."""
        for i in range(256):
            d = os.path.join(self.blocks, f"{i:02x}")
            with os.scandir(d) as it:
                for entry in it:
                    os.unlink(entry.path)
        with os.scandir(self.tmp) as it:
            for entry in it:
                os.unlink(entry.path)

    def fsync_each_worker(self, w: Workload):
        blocks_dir, tmp_dir = self.blocks, self.tmp

        def worker(_, share):
            for item in share:
                for i in item:
                    block_id = w.ids[i]
                    tmp = os.path.join(tmp_dir, block_id)
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    try:
                        _write_all(fd, w.blocks[i])
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    directory = os.path.join(blocks_dir, block_id[:2])
                    os.rename(tmp, os.path.join(directory, block_id))
                    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(dfd)
                    finally:
                        os.close(dfd)

        return worker

    def sync_per_batch_worker(self, w: Workload):
        blocks_dir, root = self.blocks, self.root

        def worker(_, share):
            for item in share:
                for i in item:
                    block_id = w.ids[i]
                    path = os.path.join(blocks_dir, block_id[:2], block_id)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    try:
                        _write_all(fd, w.blocks[i])
                    finally:
                        os.close(fd)
                sync_filesystem(root)

        return worker


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# -- measurements and the report -------------------------------------------------------------

@dataclass
class Sample:
    seconds: float
    n_blocks: int
    n_bytes: int
    server_cpu: float | None = None  # server CPU seconds / wall seconds
    client_cpu: float | None = None

    @property
    def mb_s(self) -> float:
        return self.n_bytes / self.seconds / MB

    @property
    def blocks_s(self) -> float:
        return self.n_blocks / self.seconds


def measure(worker, shares, setup=None, server_pid=None) -> Sample:
    cpu_before = process_cpu_seconds(server_pid)
    me_before = os.times()
    seconds = run_threads(worker, shares, setup)
    me_after = os.times()
    cpu_after = process_cpu_seconds(server_pid)
    n_blocks = sum(len(item) for share in shares for item in share)
    server_cpu = None
    if cpu_before is not None and cpu_after is not None:
        server_cpu = (cpu_after - cpu_before) / seconds
    # os.times() includes the set-up phase (session warm-up) too; it is tiny.
    client_cpu = ((me_after.user - me_before.user) + (me_after.system - me_before.system)) \
        / seconds
    return Sample(seconds, n_blocks, 0, server_cpu, client_cpu)


@dataclass
class Results:
    # (case name, threads, figure) -> list of samples (one per round)
    samples: dict = field(default_factory=dict)

    def add(self, case: str, threads: int, figure: str, sample: Sample) -> None:
        self.samples.setdefault((case, threads, figure), []).append(sample)

    def get(self, case: str, threads: int, figure: str) -> list[Sample]:
        return self.samples.get((case, threads, figure), [])

    def median(self, case, threads, figure, attr) -> float | None:
        values = [getattr(s, attr) for s in self.get(case, threads, figure)]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def ratio(self, case, threads, figure, base) -> float | None:
        """Median over rounds of figure / base, each pair from the same round."""
        a, b = self.get(case, threads, figure), self.get(case, threads, base)
        ratios = [x.mb_s / y.mb_s for x, y in zip(a, b) if y.mb_s > 0]
        return statistics.median(ratios) if ratios else None


def run_round(r: int, cases, thread_counts, args, client: Client, baseline: Baseline,
              pool: DataPool, results: Results, server_pid, log) -> None:
    for case in cases:
        n = blocks_for(case, args.scale, max(thread_counts), args.batch_blocks)
        for threads in thread_counts:
            w = build_workload(case, n, threads, args.batch_blocks, pool)
            total = w.total_bytes

            def server_side():
                put = measure(client.put_worker(w), w.shares, client.session, server_pid)
                try:
                    get = measure(client.get_worker(w), w.shares, client.session, server_pid)
                finally:
                    client.delete(w.ids)
                for figure, s in (("put", put), ("get", get)):
                    s.n_bytes = total
                    results.add(case.name, threads, figure, s)
                return put, get

            def baseline_side():
                out = []
                kinds = [("base", baseline.fsync_each_worker)]
                if case.batch:
                    kinds.append(("base1", baseline.sync_per_batch_worker))
                for figure, make in kinds:
                    try:
                        s = measure(make(w), w.shares)
                    finally:
                        baseline.clear()
                    s.n_bytes = total
                    results.add(case.name, threads, figure, s)
                    out.append(s)
                return out

            if r % 2 == 0:
                put, get = server_side()
                bases = baseline_side()
            else:
                bases = baseline_side()
                put, get = server_side()
            log(f"round {r + 1} {CASE_LABELS[case.name]:>11} x{threads:<2} "
                f"{len(w.blocks)} blocks, {total / MiB:.0f} MiB: PUT {put.mb_s:7.1f} MB/s "
                f"{put.blocks_s:8.0f} blk/s | GET {get.mb_s:7.1f} MB/s | baseline "
                + " / ".join(f"{b.mb_s:.1f} MB/s {b.blocks_s:.0f} blk/s" for b in bases))
            del w


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(results: Results, cases, thread_counts) -> str:
    header = ["case", "thr", "PUT MB/s", "PUT blk/s", "GET MB/s", "GET blk/s",
              "base MB/s", "base blk/s", "PUT/base", "base1 blk/s", "PUT/base1",
              "srv cpu P/G", "cli cpu P/G"]
    rows = []
    for case in cases:
        for t in thread_counts:
            m = lambda fig, attr: results.median(case.name, t, fig, attr)  # noqa: E731

            def cpu(attr):
                p, g = m("put", attr), m("get", attr)
                return "-" if p is None or g is None else f"{p * 100:.0f}/{g * 100:.0f}%"

            rows.append([
                CASE_LABELS[case.name], str(t),
                _fmt(m("put", "mb_s"), ".1f"), _fmt(m("put", "blocks_s"), ",.0f"),
                _fmt(m("get", "mb_s"), ".1f"), _fmt(m("get", "blocks_s"), ",.0f"),
                _fmt(m("base", "mb_s"), ".1f"), _fmt(m("base", "blocks_s"), ",.0f"),
                _fmt(results.ratio(case.name, t, "put", "base"), ".2f"),
                _fmt(m("base1", "blocks_s"), ",.0f") if case.batch else "",
                _fmt(results.ratio(case.name, t, "put", "base1"), ".2f") if case.batch else "",
                cpu("server_cpu"), cpu("client_cpu"),
            ])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {0}

    def line(cells):
        return "  ".join(c.ljust(widths[i]) if i in left else c.rjust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            out.append("")
        previous = row[0]
        out.append(line(row))
    return "\n".join(out)


def target_checks(results: Results, thread_counts) -> list[str]:
    lines = []

    def best(case, figure, attr):
        values = [(results.median(case, t, figure, attr), t) for t in thread_counts]
        values = [v for v in values if v[0] is not None]
        return max(values) if values else (None, None)

    put, put_t = best("1m", "put", "mb_s")
    base, base_t = best("1m", "base", "mb_s")
    if put is not None and base:
        verdict = "PASS" if put >= 0.5 * base else "MISS"
        lines.append(f"1 MiB PUT >= 50% of baseline MB/s: {verdict}  (server best {put:.1f} "
                     f"MB/s at {put_t} threads = {put / base:.0%} of baseline best {base:.1f} "
                     f"MB/s at {base_t} threads)")
    else:
        lines.append("1 MiB PUT >= 50% of baseline MB/s: not measured")
    bput, bput_t = best("4k-batch", "put", "blocks_s")
    if bput is not None:
        verdict = "PASS" if bput >= 5000 else "MISS"
        lines.append(f"4 KiB batched PUT >= 5,000 blocks/s: {verdict}  (server best "
                     f"{bput:,.0f} blocks/s at {bput_t} threads)")
    else:
        lines.append("4 KiB batched PUT >= 5,000 blocks/s: not measured")
    return lines


# -- command line ----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Block server PUT/GET throughput next to a local fsync baseline "
                    "measured in the same run.",
        epilog="Figures are medians over --rounds interleaved rounds; trust the ratios more "
               "than the absolute numbers on a shared machine.")
    p.add_argument("--url", help="use this running block server instead of starting one "
                   "(e.g. http://127.0.0.1:7001); the blocks written are deleted again")
    p.add_argument("--secret-file", help="sign every request with this cluster secret "
                   "(for a --url server started with the same --secret-file)")
    p.add_argument("--data-dir", help="directory to create the benchmark's temp directory in "
                   "(server data and baseline files; default: the system temp dir). Put it "
                   "on the disk you want to measure")
    p.add_argument("--rounds", type=int, default=3, help="repetitions of every measurement "
                   "(default 3; the median is reported)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every byte budget "
                   "(default 1: 4 MiB of 4 KiB single blocks, 16 MiB batched, 32 MiB of "
                   "64 KiB, 256 MiB of 1 MiB and of 4 MiB blocks)")
    p.add_argument("--threads", default="1,4,16", help="client thread counts (default 1,4,16)")
    p.add_argument("--cases", default=",".join(c.name for c in CASES),
                   help="cases to run, from " + ",".join(c.name for c in CASES))
    p.add_argument("--batch-blocks", type=int, default=256,
                   help="blocks per /v1/batch/put and /v1/batch/get request (default 256)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds: "
                   "1 round, threads 1,4, budgets scaled by 1/32")
    p.add_argument("--verbose", "-v", action="store_true", help="print every measurement")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.scale = 1, args.scale / 32
        if args.threads == "1,4,16":
            args.threads = "1,4"
    try:
        args.thread_counts = sorted({int(t) for t in args.threads.split(",") if t.strip()})
    except ValueError:
        p.error("--threads takes comma-separated whole numbers, e.g. 1,4,16")
    if not args.thread_counts or min(args.thread_counts) < 1:
        p.error("--threads needs at least one count >= 1")
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in {c.name for c in CASES}]
    if unknown or not names:
        p.error(f"unknown case(s) {unknown}; choose from {[c.name for c in CASES]}")
    args.case_list = [c for c in CASES if c.name in names]
    if args.rounds < 1 or args.scale <= 0 or not 1 <= args.batch_blocks <= 10000:
        p.error("--rounds >= 1, --scale > 0 and 1 <= --batch-blocks <= 10000")
    for c in args.case_list:
        n = blocks_for(c, args.scale, max(args.thread_counts), args.batch_blocks)
        if n * c.block_size > MAX_CASE_BYTES:
            p.error(f"case {c.name} would keep {n * c.block_size / GiB:.1f} GiB on disk "
                    f"(limit {MAX_CASE_BYTES / GiB:.0f} GiB per copy); lower --scale")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()

    def log(msg):
        if args.verbose:
            print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    work = tempfile.mkdtemp(prefix="blockserver-bench-", dir=args.data_dir)
    server = None
    try:
        if args.url:
            url, server_pid = args.url, None
        else:
            server = ServerProcess("server", os.path.join(work, "server"),
                                   os.path.join(work, "server.log"))
            server.start()
            url, server_pid = server.url, server.pid
        secret = protocol.load_secret(args.secret_file) if args.secret_file else None
        client = Client(url, args.timeout, secret)
        baseline = Baseline(os.path.join(work, "baseline"))
        baseline.prepare()
        pool = DataPool()
        print(f"block server: {url}" + (" (started by this benchmark)" if server else ""))
        print(f"baseline dir: {baseline.root} ({filesystem_of(baseline.root)})")
        for note in _filesystem_notes(baseline.root):
            print(f"note: {note}")
        print(f"rounds {args.rounds}, threads {args.threads}, scale {args.scale:g}, "
              f"batch {args.batch_blocks} blocks; {os.cpu_count()} CPUs; "
              f"python {sys.version.split()[0]}")
        most = max(args.thread_counts)
        sizes = ", ".join(f"{CASE_LABELS[c.name]}: "
                          f"{blocks_for(c, args.scale, most, args.batch_blocks)} blocks"
                          for c in args.case_list)
        print(f"blocks per measurement: {sizes}")
        print(f"load average at start: {load_average()}", flush=True)
        results = Results()
        for r in range(args.rounds):
            run_round(r, args.case_list, args.thread_counts, args, client, baseline, pool,
                      results, server_pid, log)
        print()
        print(render_table(results, args.case_list, args.thread_counts))
        print()
        print("MB = 10^6 bytes. Medians over rounds; ratios are medians of per-round ratios.")
        print("base = local loop: temp file, fsync, rename, fsync dir, per block (same threads).")
        print("base1 = local loop: write a batch of files, then one syncfs (batched case only).")
        print("GET reads the blocks the PUT just wrote (warm page cache). cpu = CPU seconds "
              "per wall second of PUT/GET (100% = one core).")
        print()
        for check in target_checks(results, args.thread_counts):
            print(check)
        print(f"\ntotal time {time.monotonic() - started:.0f}s; load average at end: {load_average()}")
        return 0
    except BenchError as e:
        print(f"blockserver_bench: {e}", file=sys.stderr)
        if server is not None:
            print(f"server log tail:\n{server.log_tail()}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
            log_text = server.log_tail(200)
            if "Traceback" in log_text or " ERROR " in log_text:
                print(f"note: the block server logged errors:\n{log_text}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
