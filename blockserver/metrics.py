"""Request metrics of one block server, rendered in the Prometheus text format.

Labels are bounded: `route` is a template ("/v1/blocks/{id}"), never a raw path, so a
client cannot grow the series set. One lock guards all counters; it is held for a few
dictionary updates and never across I/O.
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class Metrics:
    """Counters of one server's requests, bytes, latencies and closed connections; the
    gauges (blocks, bytes, connections) are passed in when rendered."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = {}  # (method, route, status)
        self._bytes_in = 0
        self._bytes_out = 0
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._latency_count = 0
        self._closed: dict[str, int] = {}  # connections closed by the server, by reason

    def observe(self, method: str, route: str, status: int, bytes_in: int, bytes_out: int,
                seconds: float) -> None:
        slot = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        key = (method, route, status)
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1
            self._bytes_in += bytes_in
            self._bytes_out += bytes_out
            self._buckets[slot] += 1
            self._latency_sum += seconds
            self._latency_count += 1

    def connection_closed(self, reason: str) -> None:
        with self._lock:
            self._closed[reason] = self._closed.get(reason, 0) + 1

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; `gauges` maps a metric name to (help text, value)."""
        with self._lock:
            requests = sorted(self._requests.items())
            bytes_in, bytes_out = self._bytes_in, self._bytes_out
            buckets = list(self._buckets)
            total, count = self._latency_sum, self._latency_count
            closed = sorted(self._closed.items())
        out = ["# HELP blockserver_requests_total Requests answered, by method, route and status.",
               "# TYPE blockserver_requests_total counter"]
        for (method, route, status), n in requests:
            out.append(f'blockserver_requests_total{{method="{method}",route="{route}",'
                       f'status="{status}"}} {n}')
        out += ["# HELP blockserver_received_bytes_total Request body bytes received.",
                "# TYPE blockserver_received_bytes_total counter",
                f"blockserver_received_bytes_total {bytes_in}",
                "# HELP blockserver_sent_bytes_total Response body bytes sent.",
                "# TYPE blockserver_sent_bytes_total counter",
                f"blockserver_sent_bytes_total {bytes_out}",
                "# HELP blockserver_request_seconds Time from request head to response sent.",
                "# TYPE blockserver_request_seconds histogram"]
        running = 0
        for bound, n in zip(LATENCY_BUCKETS, buckets):
            running += n
            out.append(f'blockserver_request_seconds_bucket{{le="{bound}"}} {running}')
        out += [f'blockserver_request_seconds_bucket{{le="+Inf"}} {running + buckets[-1]}',
                f"blockserver_request_seconds_sum {total:.6f}",
                f"blockserver_request_seconds_count {count}",
                "# HELP blockserver_connections_closed_total Connections the server cut, by reason.",
                "# TYPE blockserver_connections_closed_total counter"]
        for reason, n in closed:
            out.append(f'blockserver_connections_closed_total{{reason="{reason}"}} {n}')
        for name, (help_text, value) in gauges.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"
