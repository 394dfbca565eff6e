"""Prometheus metrics for the writer: `[service] metrics_port` serves /metrics on 127.0.0.1 only.

The collector turns the writer's status snapshot (refreshed by the writer's own thread, so this thread never
touches the log) into metric families named by Prometheus conventions: `walsvc_` prefix, `_total` for
counters, `_seconds` for durations, labels for reasons and events.  Every family is present from the start.

The HTTP server runs in its own thread.  It must not die silently: a failing scrape or a crash of the serving
loop is logged and counted (`walsvc_events_total{event="metrics_error"}`), and the loop starts again.
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler

from .errors import ConfigError

log = logging.getLogger("walsvc.metrics")
HOST = "127.0.0.1"
MAX_CONNECTIONS = 8  # scrapes served at once; a connection past them is closed at once
REQUEST_TIMEOUT_S = 5.0  # a connection that sends no whole request within this is closed


BUCKET_BOUNDS_US = [1 << i for i in range(25)]  # 1 us .. 16.8 s, powers of two, the same in every scrape


def _histogram(name: str, doc: str, summary: dict[str, Any]) -> HistogramMetricFamily:
    """Every bound in BUCKET_BOUNDS_US, always: a bucket series that appears only once a sample reaches it
    (the status dict stops at the last non-empty bucket) starts at its count, so rate() never sees the
    first slow fsync that created it."""
    cumulative = {upper_us: n for upper_us, n in summary.get("buckets", [])}
    count = summary.get("count", 0)
    last = max(cumulative, default=0)
    buckets = [(repr(float(upper_us) / 1e6), cumulative.get(upper_us, count if upper_us > last else 0))
               for upper_us in BUCKET_BOUNDS_US]
    buckets.append(("+Inf", count))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=summary.get("sum_us", 0.0) / 1e6)


def families(st: dict[str, Any]) -> Iterator[Metric]:
    """Metric families from a writer status dict (the same dict `walsvc status --json` prints)."""
    c = st["counters"]
    yield CounterMetricFamily("walsvc_records_appended", "Records appended to the log since the writer started",
                              value=st["records_appended"])
    yield CounterMetricFamily("walsvc_bytes_appended", "Bytes of frames appended since the writer started",
                              value=st["bytes_appended"])
    yield CounterMetricFamily("walsvc_batches", "Producer batches appended", value=c["batches"])
    yield CounterMetricFamily("walsvc_duplicate_batches", "Resent batches answered from the dedup window",
                              value=c["duplicates"])
    rejected = CounterMetricFamily("walsvc_rejected_messages", "Messages refused, by nack code", labels=["reason"])
    for reason, n in sorted(st["rejected"].items()):
        rejected.add_metric([reason], n)
    yield rejected
    events = CounterMetricFamily("walsvc_events", "Events logged by the writer", labels=["event"])
    for name, n in sorted(st["events"].items()):
        events.add_metric([name], n)
    yield events
    yield CounterMetricFamily("walsvc_segments_deleted", "Segments deleted by retention", value=st["segments_deleted"])
    yield _histogram("walsvc_fsync_seconds", "Duration of each fsync of the log", st["fsync_latency"])
    yield _histogram("walsvc_append_to_ack_seconds", "From appending a batch to sending its ack",
                     st["append_to_ack_latency"])
    yield GaugeMetricFamily("walsvc_committed_lsn", "Highest committed LSN", value=st["committed_lsn"])
    yield GaugeMetricFamily("walsvc_first_lsn", "Oldest LSN still stored", value=st["first_lsn"])
    yield GaugeMetricFamily("walsvc_segments", "Segment files", value=st["segments"])
    yield GaugeMetricFamily("walsvc_log_bytes", "Bytes of data in the log's segments", value=st["bytes"])
    yield GaugeMetricFamily("walsvc_producers", "Producers remembered for deduplication", value=st["producers"])
    yield GaugeMetricFamily("walsvc_log_stopped", "1 when the log refuses writes after an I/O error",
                            value=1 if st["stopped"] else 0)
    lag = GaugeMetricFamily("walsvc_cursor_lag_records", "Records a named reader is behind", labels=["cursor"])
    for name, cur in sorted(st["cursors"].items()):
        lag.add_metric([name], cur["lag_records"])
    yield lag


class _Collector:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return families(self._snapshot())


class MetricsServer:
    """/metrics on 127.0.0.1:`port`, bound at construction (a port in use is a ConfigError at start-up)."""

    def __init__(self, port: int, snapshot: Callable[[], dict[str, Any]], on_error: Callable[[str], None]) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(snapshot))
        on_request_error = on_error

        slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

        class Handler(MetricsHandler.factory(registry)):  # type: ignore[misc]
            timeout = REQUEST_TIMEOUT_S

            def do_GET(self) -> None:
                """/metrics only: a typo in a scrape config should fail loudly, not scrape happily."""
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "this server serves /metrics only")
                    return
                super().do_GET()

        class Server(ThreadingHTTPServer):
            """A thread per connection, but only MAX_CONNECTIONS of them, each closed after REQUEST_TIMEOUT_S
            of silence: idle connections held open (slow-loris) ran the writer out of threads and file
            descriptors, and libzmq aborts the whole process when an accept meets EMFILE."""
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                if not slots.acquire(blocking=False):
                    self.shutdown_request(request)
                    return
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    slots.release()
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

            def handle_error(self, request: Any, client_address: Any) -> None:  # a failed scrape: say so
                log.exception("metrics: scrape from %s failed", client_address)
                on_request_error("scrape failed")

        try:
            self.httpd = Server((HOST, port), Handler)
        except OSError as exc:
            raise ConfigError("service.metrics_port", f"cannot serve metrics on {HOST}:{port}: "
                              f"{exc.strerror or exc}") from None
        self.port = self.httpd.server_address[1]
        self.url = f"http://{HOST}:{self.port}/metrics"
        self._on_error = on_error
        self._closing = threading.Event()
        self.thread = threading.Thread(target=self._run, name="walsvc-metrics", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                self.httpd.serve_forever(poll_interval=0.2)
            except Exception as exc:  # never end silently: log, count, serve again
                log.exception("metrics: the server loop failed; restarting it")
                self._on_error(f"server loop failed: {exc}")
                time.sleep(1.0)

    def close(self) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
