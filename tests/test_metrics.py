"""The mounted client's Prometheus endpoint (`fusefs mount --metrics`, fusefs/metrics.py):
a real mount on real servers, scraped over 127.0.0.1 and read with prometheus_client's own
parser. Counters must move by what the test did; gauges come from the mount's status."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fusefs.metrics import parse_address

from .support import wait_until

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """{(sample name, frozenset of labels): value} of everything the endpoint serves."""
    reply = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(reply.text)
            for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """The sum of every sample `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def op_count(samples: dict, op: str) -> float:
    return value(samples, "fusefs_fuse_op_seconds_count", op=op)


def puts(samples: dict) -> tuple[float, float]:
    """(block PUT requests that succeeded, bytes they sent)."""
    count = bytes_sent = 0.0
    for method, endpoint in (("PUT", "block"), ("POST", "batch_put")):
        count += value(samples, "fusefs_block_request_seconds_count", method=method,
                       endpoint=endpoint, outcome="ok")
        bytes_sent += value(samples, "fusefs_block_request_bytes_total", method=method,
                            endpoint=endpoint, direction="sent")
    return count, bytes_sent


def test_operations_requests_and_gauges_of_a_real_mount(fusefs_mount):
    port = free_port()
    m = fusefs_mount(mount=["--metrics", f"127.0.0.1:{port}", "--repair-delay", "0"])
    wait_until(lambda: total(scrape(port), "fusefs_server_up") == 3, "the first status")
    before = scrape(port)

    os.mkdir(os.path.join(m.path, "d"))
    data = os.urandom(300_000)
    for i in range(4):
        fd = os.open(os.path.join(m.path, "d", f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(m.path, "d", "no-such-file"))
    assert sorted(os.listdir(os.path.join(m.path, "d"))) == [f"f{i}" for i in range(4)]

    after = scrape(port)
    assert op_count(after, "mkdir") - op_count(before, "mkdir") == 1
    assert op_count(after, "create") - op_count(before, "create") == 4
    assert op_count(after, "fsync") - op_count(before, "fsync") == 4
    assert op_count(after, "write") - op_count(before, "write") >= 4
    assert op_count(after, "readdir") > op_count(before, "readdir")
    missing = ("fusefs_fuse_op_errors_total", "getattr", "ENOENT")
    assert value(after, missing[0], op=missing[1], errno=missing[2]) \
        > value(before, missing[0], op=missing[1], errno=missing[2])
    # A latency histogram per operation: its +Inf bucket holds every call.
    assert value(after, "fusefs_fuse_op_seconds_bucket", op="fsync", le="+Inf") \
        == op_count(after, "fsync")

    # fsync returned: W=2 copies of each file's block are on the servers.
    (puts_before, sent_before), (puts_after, sent_after) = puts(before), puts(after)
    assert puts_after - puts_before >= 4 * 2
    assert sent_after - sent_before >= 4 * 2 * len(data)

    # Gauges from the mount's status (and the cache's counters): every server up.
    gauges = scrape(port)
    assert ("fusefs_dirty_bytes", frozenset()) in gauges
    for name in ("fusefs_repair_backlog_copies", "fusefs_copies_behind_bytes",
                 "fusefs_dirty_oldest_seconds", "fusefs_status_age_seconds"):
        assert (name, frozenset()) in gauges, name
    for tier in ("memory", "disk"):
        assert ("fusefs_cache_hits_total", frozenset({("tier", tier)})) in gauges
    assert ("fusefs_cache_misses_total", frozenset()) in gauges
    for server in m.servers:
        assert total(gauges, "fusefs_server_up", url=server.url) == 1
    # The writer's repair reports once its first survey of the servers ended.
    wait_until(lambda: ("fusefs_under_replicated_blocks", frozenset()) in scrape(port),
               "the first repair survey")
    assert ("fusefs_handoff_copies", frozenset()) in scrape(port)

    # Dirty data has an age (read live) until it is uploaded.
    fd = os.open(os.path.join(m.path, "d", "dirty"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"not uploaded yet")
        assert value(scrape(port), "fusefs_dirty_oldest_seconds") > 0
        os.fsync(fd)
    finally:
        os.close(fd)
    wait_until(lambda: value(scrape(port), "fusefs_dirty_oldest_seconds") == 0,
               "nothing dirty after fsync")

    # A stopped server: its up gauge goes to 0 within seconds, the others stay 1.
    stopped = m.servers[2]
    stopped.stop()
    wait_until(lambda: total(scrape(port), "fusefs_server_up", url=stopped.url) == 0,
               "the stopped server's up gauge at 0")
    final = scrape(port)
    assert [total(final, "fusefs_server_up", url=s.url) for s in m.servers[:2]] == [1, 1]


def test_a_port_in_use_fails_the_mount_saying_so(fusefs_mount):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        m = fusefs_mount()
        m.umount()
        result = m.cli("mount", *m.cluster_args(), "--cache-dir", m.cache_dir,
                       "--metrics", f"127.0.0.1:{port}", m.path, check=False)
    assert result.returncode != 0
    assert "port is in use" in result.stderr, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr, result.stderr
    assert not m.mounted


def test_the_address_must_name_host_and_port():
    assert parse_address("127.0.0.1:9110") == ("127.0.0.1", 9110)
    assert parse_address("[::1]:9110") == ("::1", 9110)
    for wrong in ("9110", ":9110", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:http",
                  "127.0.0.1:70000"):
        with pytest.raises(ValueError):
            parse_address(wrong)


def test_gauges_follow_the_status_dict_and_skip_what_it_lacks():
    """The collector alone, over status dicts as the daemon writes them: every figure it
    has becomes a gauge, a missing key gives no metric (never a made-up 0)."""
    from prometheus_client import generate_latest

    from fusefs.metrics import MountMetrics

    status = {"fs_id": "f1", "mountpoint": "/mnt", "time": 1.0, "dirty_bytes": 5,
              "cluster": {"servers": [{"id": "s1", "url": "http://a", "up": True,
                                       "missing_copies": 2, "latency_ms": 1.5},
                                      {"id": "s2", "url": "http://b", "up": False,
                                       "missing_copies": 0}],
                          "repair_backlog": 2, "copies_behind_bytes": 7},
              "health": {"under_replicated": 3, "handoffs": 1,
                         "last_repair": {"finished": 100.0, "found": 4, "fixed": 3},
                         "last_scrub": {"finished": None, "found": 0, "fixed": 0}}}
    meter = MountMetrics(status=lambda: status, dirty_age=lambda: 12.5)
    text = generate_latest(meter.registry).decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert value(samples, "fusefs_server_up", server="s1", url="http://a") == 1
    assert value(samples, "fusefs_server_up", server="s2", url="http://b") == 0
    assert value(samples, "fusefs_server_missing_copies", server="s1") == 2
    assert value(samples, "fusefs_server_latency_seconds", server="s1") == 0.0015
    assert ("fusefs_server_latency_seconds", frozenset({("server", "s2")})) not in samples
    assert value(samples, "fusefs_dirty_bytes") == 5
    assert value(samples, "fusefs_dirty_oldest_seconds") == 12.5
    assert value(samples, "fusefs_repair_backlog_copies") == 2
    assert value(samples, "fusefs_copies_behind_bytes") == 7
    assert value(samples, "fusefs_under_replicated_blocks") == 3
    assert value(samples, "fusefs_handoff_copies") == 1
    assert value(samples, "fusefs_last_pass_finished_timestamp_seconds", **{"pass": "repair"}) \
        == 100
    assert value(samples, "fusefs_last_pass_fixed", **{"pass": "repair"}) == 3
    assert ("fusefs_last_pass_finished_timestamp_seconds",
            frozenset({("pass", "scrub")})) not in samples  # never finished: no timestamp
    assert "fusefs_cache" not in text and "fusefs_journal" not in text  # no such keys

    status.clear()  # no status yet: the counters and histograms are still served
    assert "fusefs_server_up" not in generate_latest(meter.registry).decode()


def test_reading_a_directory_in_name_order_fetches_its_files_in_batches(fusefs_mount,
                                                                        tmp_path):
    """A cold tar-like walk (files opened in name order, nothing cached): the next files'
    blocks arrive in batch requests ahead of the reader, not as one request per file."""
    m = fusefs_mount()
    tree = os.path.join(m.path, "tree")
    os.mkdir(tree)
    written = {}
    for i in range(200):
        written[f"f{i:03d}"] = data = os.urandom(1000 + 37 * i)
        with open(os.path.join(tree, f"f{i:03d}"), "wb") as f:
            f.write(data)
    m.umount()  # every block on the servers; then a new mount with an empty cache
    port = free_port()
    # as a mount on another host: blocks over HTTP, not from the local servers' files
    m.mount("--metrics", f"127.0.0.1:{port}", "--no-local-reads",
            cache_dir=str(tmp_path / "empty-cache"))
    before = scrape(port)
    names = sorted(os.listdir(tree))
    assert names == sorted(written)
    for name in names:
        with open(os.path.join(tree, name), "rb") as f:
            assert f.read() == written[name], name
    after = scrape(port)

    def requests_to(method, endpoint):
        key = "fusefs_block_request_seconds_count"
        return value(after, key, method=method, endpoint=endpoint, outcome="ok") \
            - value(before, key, method=method, endpoint=endpoint, outcome="ok")
    singles, batches = requests_to("GET", "block"), requests_to("POST", "batch_get")
    assert batches >= 2, (singles, batches)  # 200 files: at least two steps ahead
    assert singles <= 50, (singles, batches)  # one per file without read-ahead: 200


def test_one_pass_over_a_file_too_large_to_keep_stays_off_the_disk_cache(fusefs_mount,
                                                                         tmp_path):
    """A sequential read past half the disk cache (32 MiB of 64 MiB here) is a scan: its
    read-ahead blocks go to the disk cache only when a scan read them before. A file of
    24 MiB is kept whole at its first read; one of 48 MiB only in part, and whole once read
    a second time."""
    m = fusefs_mount()
    written = {}
    for name, size in (("small", 24 * MiB), ("large", 48 * MiB)):
        written[name] = data = os.urandom(size)
        with open(os.path.join(m.path, name), "wb") as f:
            f.write(data)
    m.umount()
    port = free_port()
    cache_dir = tmp_path / "cache"

    def mount():
        # --no-local-reads: as on another host, where fetched blocks go to the disk cache
        m.mount("--metrics", f"127.0.0.1:{port}", "--cache-size", "64MiB",
                "--memory-cache", "4MiB", "--no-local-reads", cache_dir=str(cache_dir))

    def read_all(name):
        with open(os.path.join(m.path, name), "rb") as f:
            got = b"".join(iter(lambda: f.read(MiB), b""))
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the next read is ours
        assert got == written[name], name

    def on_disk() -> float:
        """MiB of block files in the disk cache (once unmounted: nothing left to write)."""
        return sum(os.path.getsize(os.path.join(d, name)) for d, _, names in os.walk(cache_dir)
                   if os.path.basename(d) != "tmp" for name in names if len(name) == 32) / MiB

    mount()
    read_all("small")
    m.umount()
    assert on_disk() >= 24, "a file under the threshold is kept whole"
    shutil.rmtree(cache_dir)
    mount()
    read_all("large")
    wait_until(lambda: value(scrape(port), "fusefs_cache_scan_skips_total") >= 4,
               "blocks past the threshold left off the disk")
    read_all("large")  # seen before: now they are kept
    m.umount()
    assert on_disk() >= 48


def test_a_cold_find_looks_up_directories_only(fusefs_mount, tmp_path):
    """readdir reports each entry's file type, so a cold `find` (new mount, kernel caches
    empty) learns from the listings which entries are directories and looks up only
    those, not every file: one LOOKUP (a getattr here) per directory instead of one per
    entry. A symlink and a hard link (the link record takes its type from the inode) are
    listed with their types too."""
    m = fusefs_mount()
    root = os.path.join(m.path, "tree")
    dirs = [os.path.join(root, f"d{i}") for i in range(4)]
    for d in dirs:
        os.makedirs(d)
        for j in range(30):
            with open(os.path.join(d, f"f{j:02d}"), "wb") as f:
                f.write(b"x")
    os.symlink("d0/f00", os.path.join(root, "sym"))
    os.link(os.path.join(dirs[0], "f00"), os.path.join(root, "hard"))
    m.umount()
    port = free_port()
    m.mount("--metrics", f"127.0.0.1:{port}", cache_dir=str(tmp_path / "empty-cache"))
    before = op_count(scrape(port), "getattr")
    found = subprocess.run(["find", root, "-type", "f"], capture_output=True, text=True,
                           check=True).stdout.split()
    lookups = op_count(scrape(port), "getattr") - before
    assert len(found) == 4 * 30 + 1  # the hard link is a file; the symlink is not
    assert lookups < 30, lookups  # 1 per directory (and the root); 126 without types
    with os.scandir(root) as listing:
        kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink()) for e in listing}
    assert kinds == {**{f"d{i}": (True, False) for i in range(4)}, "sym": (False, True),
                     "hard": (False, False)}
