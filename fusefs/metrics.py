"""The mounted client's metrics, in the Prometheus text format (`fusefs mount --metrics
ADDR:PORT`; what each metric means: docs/metrics.md).

Two kinds of figures live in one `CollectorRegistry` of the mount's own (never the
library's global one, so nothing another module registers leaks in):
- counted as they happen, by the code doing the work: FUSE operations (a latency
  histogram per operation, whose count is the number of calls, and errors by operation
  and errno name), recorded by `FuseOps` through `op_done`/`op_failed`; requests to block
  servers (latency histogram and bytes by method, endpoint and outcome), recorded by
  `Transport.call` through `request`;
- read when scraped (`_StatusCollector`): everything `fusefs status` shows, from the status
  dict the daemon writes every second (`status`, a callable), and the age of the oldest
  dirty data (`dirty_age`, a callable).

Label values come from fixed sets only: operation names are the adapter's callbacks,
endpoints and outcomes the transport's names, errnos their symbolic names, and servers the
cluster's members. A path or block id is never a label.

States: built (counting, not serving) -> `serve(host, port)` (an HTTP thread answers
GET /metrics) -> `close()`. Nothing is kept on disk: a daemon that restarts (or crashes)
starts its counters at zero again, which Prometheus reads as a counter reset.

Cost on the hot path: a FUSE operation with metrics on pays two clock reads and one
histogram update (about a microsecond); without `--metrics` the adapter has no meter and
pays one attribute test.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

log = logging.getLogger("fusefs.metrics")

# Seconds. FUSE operations answered from memory take tens of microseconds; one that waits
# for the servers (fsync, a read that misses the cache) milliseconds to seconds.
OP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
              0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)


class MetricsError(Exception):
    """The metrics endpoint cannot be served (a bad address, a port in use)."""


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) of "HOST:PORT" or "[IPv6]:PORT". The host is required: what is bound
    is exactly what the user wrote. Raises ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not ADDR:PORT (e.g. 127.0.0.1:9110)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def status_file(path: str):
    """A callable returning the JSON status the daemon writes at `path` ({} while there is
    none yet, or when it cannot be read)."""
    def read() -> dict:
        try:
            with open(path) as f:
                value = json.load(f)
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    return read


def oldest_dirty_seconds(flusher) -> float:
    """How long the oldest block still only in this machine's memory has been dirty (0
    when nothing is). Takes each live file's lock in turn, never two at once."""
    now, oldest = time.monotonic(), None
    for live in flusher.live_files():
        with live.lock:
            for block in live.dirty.values():
                if oldest is None or block.since < oldest:
                    oldest = block.since
    return 0.0 if oldest is None else max(0.0, now - oldest)


class MountMetrics:
    """The registry of one mount, what records into it, and its HTTP endpoint."""

    def __init__(self, status=None, dirty_age=None):
        self.status = status or dict  # () -> the status dict; read at each scrape
        self.dirty_age = dirty_age  # () -> seconds; None until the mount has a flusher
        self.registry = CollectorRegistry()
        self._op_seconds = Histogram(
            "fusefs_fuse_op_seconds", "Time to answer a FUSE operation, by operation",
            ["op"], buckets=OP_BUCKETS, registry=self.registry)
        self._op_errors = Counter(
            "fusefs_fuse_op_errors", "FUSE operations answered with an error, by errno",
            ["op", "errno"], registry=self.registry)
        self._request_seconds = Histogram(
            "fusefs_block_request_seconds", "Requests to block servers, by outcome",
            ["method", "endpoint", "outcome"], buckets=REQUEST_BUCKETS,
            registry=self.registry)
        self._request_bytes = Counter(
            "fusefs_block_request_bytes", "Bytes of request and answer bodies",
            ["method", "endpoint", "direction"], registry=self.registry)
        # Children resolved once per label set: labels() costs more than the update.
        self._ops: dict[str, object] = {}  # op name -> its histogram child
        self._errors: dict[tuple[str, int], object] = {}  # (op, errno) -> counter child
        self._children_lock = threading.Lock()
        self.registry.register(_StatusCollector(self))
        self._server = None
        self._thread = None

    # -- recording --------------------------------------------------------------------------

    def op_done(self, name: str, seconds: float) -> None:
        child = self._ops.get(name)
        if child is None:
            with self._children_lock:
                child = self._ops[name] = self._op_seconds.labels(name)
        child.observe(seconds)

    def op_failed(self, name: str, code: int) -> None:
        child = self._errors.get((name, code))
        if child is None:
            with self._children_lock:
                child = self._errors[name, code] = self._op_errors.labels(
                    name, errno.errorcode.get(code, str(code)))
        child.inc()

    def request(self, method: str, endpoint: str, outcome: str, sent: int, received: int,
                seconds: float) -> None:
        """One request to a block server ended (Transport's `observe`)."""
        self._request_seconds.labels(method, endpoint, outcome).observe(seconds)
        if sent:
            self._request_bytes.labels(method, endpoint, "sent").inc(sent)
        if received:
            self._request_bytes.labels(method, endpoint, "received").inc(received)

    # -- serving ----------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> None:
        """Answer GET /metrics on host:port from a daemon thread. Raises MetricsError."""
        try:
            self._server, self._thread = start_http_server(port, host, self.registry)
        except OSError as e:
            hint = ("the port is in use: pick another --metrics port"
                    if e.errno == errno.EADDRINUSE else "check the --metrics address")
            raise MetricsError(f"cannot serve metrics on {host}:{port}: "
                               f"{e.strerror or e}; {hint}") from None
        if not is_loopback(host):
            log.warning("metrics are served on %s:%d, beyond this machine, without "
                        "authentication", host, port)
        log.info("serving metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _gauge(name: str, doc: str, value, labels=None, label_values=()):
    """A gauge family with one sample, or None when `value` is not a number."""
    value = _number(value)
    if value is None:
        return None
    family = GaugeMetricFamily(name, doc, labels=labels)
    family.add_metric(list(label_values), value)
    return family


class _StatusCollector(Collector):
    """Gauges (and the cache's counters) read from the status dict at each scrape. Keys
    that are absent (an older daemon, a read-only mount, no status yet) give no metric."""

    def __init__(self, meter: MountMetrics):
        self.meter = meter

    def collect(self):
        try:
            status = self.meter.status() or {}
        except Exception:  # noqa: BLE001 - a scrape shows what it can
            log.exception("could not read the mount's status for metrics")
            status = {}
        try:
            families = [*self._mount(status), *self._servers(status.get("cluster") or {}),
                        *self._cache(status.get("cache") or {}),
                        *self._health(status.get("health") or {}),
                        *self._journal(status.get("journal") or {})]
        except Exception:  # noqa: BLE001 - the counters are still worth serving
            log.exception("could not turn the mount's status into metrics")
            return []
        return [f for f in families if f is not None]

    def _mount(self, status: dict):
        if "fs_id" in status:
            info = GaugeMetricFamily("fusefs_mount_info", "The mounted filesystem",
                                     labels=["fs_id", "mountpoint"])
            info.add_metric([str(status["fs_id"]), str(status.get("mountpoint", ""))], 1)
            yield info
        written = _number(status.get("time"))
        yield _gauge("fusefs_status_age_seconds", "Age of the status these gauges come from",
                     max(0.0, time.time() - written) if written is not None else None)
        yield _gauge("fusefs_dirty_bytes", "File data in memory not yet on the servers",
                     status.get("dirty_bytes"))
        if self.meter.dirty_age is not None:
            yield _gauge("fusefs_dirty_oldest_seconds",
                         "How long the oldest dirty data has waited for its upload",
                         self.meter.dirty_age())
        if isinstance(status.get("upload_errors"), list):
            yield _gauge("fusefs_upload_errors_recent", "Recent upload errors kept for status",
                         len(status["upload_errors"]))

    @staticmethod
    def _servers(cluster: dict):
        yield _gauge("fusefs_copies_behind_bytes", "Bytes of block copies still being "
                     "written after their write returned", cluster.get("copies_behind_bytes"))
        yield _gauge("fusefs_repair_backlog_copies", "Block copies this mount knows are "
                     "missing and will repair", cluster.get("repair_backlog"))
        servers = [s for s in cluster.get("servers") or () if isinstance(s, dict)]
        if not servers:
            return
        up = GaugeMetricFamily("fusefs_server_up", "1 if the block server is usable",
                               labels=["server", "url"])
        missing = GaugeMetricFamily("fusefs_server_missing_copies", "Copies the server "
                                    "should get from a repair", labels=["server"])
        latency = GaugeMetricFamily("fusefs_server_latency_seconds", "Time of the server's "
                                    "last status answer", labels=["server"])
        direct = CounterMetricFamily("fusefs_server_blocks_read_from_files", "Blocks read "
                                     "from the server's files directly (a server on this "
                                     "host), not over HTTP", labels=["server"])
        for s in servers:
            server = str(s.get("id", ""))
            up.add_metric([server, str(s.get("url", ""))], 1.0 if s.get("up") else 0.0)
            if _number(s.get("missing_copies")) is not None:
                missing.add_metric([server], s["missing_copies"])
            if _number(s.get("latency_ms")) is not None:
                latency.add_metric([server], s["latency_ms"] / 1000)
            if _number(s.get("blocks_read_from_files")) is not None:
                direct.add_metric([server], s["blocks_read_from_files"])
        yield from (up, missing, latency, direct)

    @staticmethod
    def _cache(cache: dict):
        if not cache:
            return
        hits = CounterMetricFamily("fusefs_cache_hits", "Block reads served by the cache",
                                   labels=["tier"])
        for tier in ("memory", "disk", "local"):
            if _number(cache.get(f"hits_{tier}")) is not None:
                hits.add_metric([tier], cache[f"hits_{tier}"])
        yield hits
        for key, doc in (("misses", "Block reads the cache could not serve"),
                         ("fetches", "Blocks fetched from the servers into the cache"),
                         ("evictions", "Blocks evicted from the cache"),
                         ("scan_skips", "Blocks a long sequential read fetched and did not "
                          "keep on disk (seen for the first time)"),
                         ("local_skips", "Blocks read from a local server's file, and so "
                          "not kept on disk")):
            if _number(cache.get(key)) is not None:
                family = CounterMetricFamily(f"fusefs_cache_{key}", doc)
                family.add_metric([], cache[key])
                yield family
        size = GaugeMetricFamily("fusefs_cache_bytes", "Bytes held by the block cache",
                                 labels=["tier"])
        for tier in ("memory", "disk"):
            if _number(cache.get(f"{tier}_bytes")) is not None:
                size.add_metric([tier], cache[f"{tier}_bytes"])
        yield size

    @staticmethod
    def _health(health: dict):
        yield _gauge("fusefs_under_replicated_blocks", "Live blocks with fewer than R "
                     "healthy copies on their homes", health.get("under_replicated"))
        yield _gauge("fusefs_handoff_copies", "Copies on servers that are not the block's "
                     "homes", health.get("handoffs"))
        passes = {k: health.get(f"last_{k}") for k in ("repair", "scrub")}
        passes = {k: v for k, v in passes.items() if isinstance(v, dict)}
        if not passes:
            return
        for key, doc in (("finished", "When the last pass ended (unix time)"),
                         ("found", "Damaged or missing copies the last pass found"),
                         ("fixed", "Copies the last pass repaired")):
            suffix = "_timestamp_seconds" if key == "finished" else ""
            family = GaugeMetricFamily(f"fusefs_last_pass_{key}{suffix}", doc,
                                       labels=["pass"])
            for name, last in passes.items():
                if _number(last.get(key)) is not None:
                    family.add_metric([name], last[key])
            yield family

    @staticmethod
    def _journal(journal: dict):
        yield _gauge("fusefs_journal_seq", "Newest metadata record of this mount",
                     journal.get("seq"))
        yield _gauge("fusefs_journal_shipped_seq", "Newest record on the servers",
                     journal.get("shipped"))
        yield _gauge("fusefs_lease_valid_seconds", "How long the writer lease stays valid "
                     "without a renewal", journal.get("lease_valid_for"))
