"""Status, metrics and events as an operator sees them: `walsvc status`, a Prometheus scrape over HTTP, the
writer's event log lines.  A real writer process, real producers, real HTTP."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, strategies

from helpers import REPO_ROOT, python_env, run_cli, wait_for, walsvc_cmd

import walsvc
from walsvc.metrics import EVENTS, Histogram


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_histogram_quantiles_are_real_values_not_bucket_bounds() -> None:
    h = Histogram()
    assert h.quantile(0.5) is None and h.summary()["p50_us"] is None  # none rather than a made-up 0
    for ms in range(1, 101):
        h.record(ms / 1000)
    s = h.summary()
    assert (s["p50_us"], s["p99_us"], s["max_us"], s["count"]) == (50000.0, 99000.0, 100000.0, 100)
    assert s["buckets"][-1] == [131072, 100]  # cumulative, for Prometheus


@given(strategies.lists(strategies.floats(min_value=0, max_value=100, allow_nan=False), min_size=1, max_size=300),
       strategies.sampled_from([0.01, 0.5, 0.9, 0.99, 1.0]))
def test_histogram_quantile_is_a_recorded_sample_at_its_rank(seconds: list[float], q: float) -> None:
    h = Histogram()
    for s in seconds:
        h.record(s)
    got = h.quantile(q)
    samples = sorted(s * 1e6 for s in seconds)
    assert got in samples
    below = sum(1 for s in samples if s < got)
    at_or_below = sum(1 for s in samples if s <= got)
    assert below < q * len(samples) <= at_or_below or (q * len(samples) <= 1 and below == 0)
    assert h.cumulative()[-1][1] == len(seconds)


def metrics_writer(tmp_path: Path, writers, toml: str = "") -> tuple[Path, Any, Path, str]:
    """A writer process serving /metrics on a free port: (directory, writer, config file, metrics URL)."""
    port = free_port()
    config = tmp_path / "walsvc.toml"
    config.write_text(f"{toml}[service]\nmetrics_port = {port}\n")
    d = tmp_path / "wal"
    return d, writers(d, config=config).start(), config, f"http://127.0.0.1:{port}/metrics"


def test_prometheus_scrape_status_and_events_move_with_real_traffic(tmp_path: Path, writers) -> None:
    d, writer, config, url = metrics_writer(tmp_path, writers, "[log]\nsegment_bytes = 1048576\n")

    # From the start, every counter is there at 0: in status --json and in the scrape.
    st = json.loads(run_cli("status", "--dir", str(d), "--json").stdout)
    assert st["metrics_url"] == url
    assert st["counters"] == {"batches": 0, "records": 0, "duplicates": 0}
    assert set(st["rejected"]) >= {"malformed", "too_large", "out_of_sequence"} and not any(st["rejected"].values())
    assert st["events"] == {name: 0 for name in EVENTS}
    before = scrape(url)
    assert before["walsvc_records_appended_total"] == 0
    assert all(before[f'walsvc_events_total{{event="{name}"}}'] == 0 for name in EVENTS)
    assert before['walsvc_rejected_messages_total{reason="malformed"}'] == 0

    with walsvc.Producer(d) as producer:  # 1.5 MiB: at least one segment roll at 1 MiB segments
        for i in range(300):
            producer.put(f"k{i}", b"v" * 5000)
        producer.flush(60)

    after = wait_for(lambda: (m := scrape(url))["walsvc_records_appended_total"] == 300 and
                     m['walsvc_events_total{event="segment_rolled"}'] >= 1 and m, 20, "the scrape to show 300 records")
    assert after['walsvc_events_total{event="producer_connected"}'] == 1
    assert after["walsvc_batches_total"] >= 1 and after["walsvc_committed_lsn"] == 300
    assert after["walsvc_fsync_seconds_count"] >= 1 and after['walsvc_fsync_seconds_bucket{le="+Inf"}'] >= 1
    assert after["walsvc_append_to_ack_seconds_count"] == after["walsvc_batches_total"]
    # The same 25 bucket bounds (1 us .. 16.8 s) in every scrape, empty or not: before, the series of a
    # bucket appeared only with its first sample, already at its count, so rate() missed that sample.
    for name in ("walsvc_fsync_seconds", "walsvc_append_to_ack_seconds"):
        bounds = {k for k in before if k.startswith(name + "_bucket")}
        assert len(bounds) == 26 and bounds == {k for k in after if k.startswith(name + "_bucket")}, bounds
        assert before[name + '_bucket{le="1e-06"}'] == 0 and before[name + '_bucket{le="16.777216"}'] == 0
        assert after[name + '_bucket{le="16.777216"}'] == after[name + "_count"]
    assert after["walsvc_segments"] >= 2 and after["walsvc_log_stopped"] == 0

    text = run_cli("status", "--dir", str(d)).stdout
    assert text.startswith("writer: running"), text
    assert re.search(r"fsyncs: [\d,]+; latency p50 [\d,]+ us, p99 [\d,]+ us", text), text
    assert not re.search(r"\b(True|False|None)\b|[{}]", text), text

    # --watch repeats with rates over the last interval.
    watch = subprocess.Popen(walsvc_cmd("status", "--dir", str(d), "--watch", "0.3"), cwd=REPO_ROOT,
                             env=python_env(), stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "/s over the last" in watch.stdout.readline(), 30, "a rate line from status --watch")
    finally:
        watch.kill()
        watch.wait()

    # The same port for a second writer is one clear line, at start-up.
    clash = run_cli("serve", "--dir", str(tmp_path / "other"), "--config", str(config))
    assert clash.returncode == 2 and "service.metrics_port" in clash.stderr and "Traceback" not in clash.stderr

    assert writer.stop() == 0
    events = [line for line in writer.stderr().splitlines() if "event=" in line]
    assert any(re.search(r"event=producer_connected producer=[0-9a-f]{16}$", e) for e in events), events
    assert any("event=segment_rolled segments=" in e for e in events), events
    assert any("event=writer_stopped committed_lsn=300" in e for e in events), events


def test_a_scrape_shows_every_record_acked_before_it(tmp_path: Path, writers) -> None:
    """The loop builds each scrape's snapshot when asked, so a scrape right after an ack counts that record
    (a snapshot refreshed on a timer lagged by up to its period)."""
    d, writer, _, url = metrics_writer(tmp_path, writers)
    with walsvc.Producer(d) as producer:
        for round_ in range(1, 6):
            for i in range(10):
                producer.put(f"r{round_}-{i}", b"v")
            producer.flush(30)
            m = scrape(url)
            assert (m["walsvc_records_appended_total"], m["walsvc_committed_lsn"]) == (10 * round_, 10 * round_)
    assert writer.stop() == 0


def test_the_writer_loop_turns_a_slow_fsync_into_an_event(tmp_path: Path) -> None:
    """The loop's watch (`Writer._watch`, from `Log.activity`) reports an fsync of about a second or more once,
    with its duration, and a stop once; a turn with nothing new reports nothing."""
    from walsvc.config import load
    from walsvc.writer import Writer

    w = Writer(load(directory=tmp_path / "wal"))
    try:
        w.log._syncer.latency.record(0.002)
        w._next_watch = 0.0
        w._watch()
        assert w.metrics.events["slow_fsync"] == 0
        w.log._syncer.latency.record(1.5)
        w._next_watch = 0.0
        w._watch()
        w._next_watch = 0.0
        w._watch()
        assert w.metrics.events["slow_fsync"] == 1
        w.log.stop("a test", OSError(5, "Input/output error"))
        w._next_watch = 0.0
        w._watch()
        w._next_watch = 0.0
        w._watch()
        assert w.metrics.events["log_stopped"] == 1
    finally:
        w.close()


def test_scraping_in_a_loop_cannot_take_the_writer_loop_over(tmp_path: Path) -> None:
    """Four threads scraping as fast as they can for a second get fresh figures, built by the writer's loop at
    most once per SCRAPE_EVERY_S (each build costs the loop about 0.4 ms), and no scrape waits out
    SCRAPE_WAIT_S."""
    import threading
    import time

    from walsvc.config import load
    from walsvc.writer import SCRAPE_EVERY_S, SCRAPE_WAIT_S, Writer

    made: list[Writer] = []
    built = [0]

    def serve() -> None:
        w = Writer(load(directory=tmp_path / "wal"))
        status = w.status

        def counted() -> dict:
            built[0] += 1
            return status()
        w.status = counted
        made.append(w)
        w.serve()

    loop = threading.Thread(target=serve, daemon=True)
    loop.start()
    wait_for(lambda: made, 30, "the writer to start")
    w = made[0]
    waits: list[float] = []

    def scrape_loop() -> None:
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            started = time.monotonic()
            assert w._scrape_snapshot()["pid"] > 0
            waits.append(time.monotonic() - started)

    scrapers = [threading.Thread(target=scrape_loop) for _ in range(4)]
    for t in scrapers:
        t.start()
    for t in scrapers:
        t.join(30)
    w.stop()
    loop.join(30)
    assert len(waits) > 40, len(waits)
    assert 10 <= built[0] <= 1.5 / SCRAPE_EVERY_S, (built[0], len(waits))
    assert max(waits) < SCRAPE_WAIT_S, max(waits)


def test_a_status_that_fails_for_a_scrape_leaves_the_loop_serving(tmp_path: Path) -> None:
    """A real fault under the status a scrape asks for (a file where the cursors folder goes: listing it
    fails) is counted and logged as `metrics_error`; the scrape gets the last figures and the loop serves on."""
    import threading

    from walsvc.config import load
    from walsvc.writer import Writer

    made: list[Writer] = []

    def serve() -> None:
        made.append(Writer(load(directory=tmp_path / "wal")))
        made[0].serve()

    loop = threading.Thread(target=serve, daemon=True)
    loop.start()
    wait_for(lambda: made, 30, "the writer to start")
    w = made[0]
    try:
        cursors = tmp_path / "wal" / "cursors"
        if cursors.is_dir():
            cursors.rmdir()
        cursors.write_text("not a folder")
        last = w._snapshot
        assert w._scrape_snapshot() is last
        assert w.metrics.events["metrics_error"] == 1
        with walsvc.Producer(tmp_path / "wal") as producer:
            assert producer.put(b"k", b"v").result(10) == 1
        assert loop.is_alive()
    finally:
        w.stop()
        loop.join(30)


def test_idle_connections_to_metrics_cannot_exhaust_the_writer(tmp_path: Path, writers) -> None:
    """Slow-loris: 40 connections that never send a request.  Before, each held a thread and a descriptor
    for good (the writer died of EMFILE, inside libzmq, once they ran out).  Now at most 8 are served at
    once, the others are closed at once, and each idle one is closed after 5 s; the writer acks all along,
    and a scrape works once the idle ones are gone."""
    from walsvc.prometheus import MAX_CONNECTIONS, REQUEST_TIMEOUT_S
    d, writer, _, url = metrics_writer(tmp_path, writers)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    threads_before = len(list(Path(f"/proc/{writer.pid}/task").iterdir()))
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
    try:
        with walsvc.Producer(d) as producer:
            assert producer.put(b"k", b"v").result(10) == 1
        threads = len(list(Path(f"/proc/{writer.pid}/task").iterdir()))
        assert threads <= threads_before + MAX_CONNECTIONS, (threads_before, threads)
        closed = 0
        for s in idle:  # every one is closed by the writer: at once past the limit, else after the timeout
            s.settimeout(REQUEST_TIMEOUT_S + 5)
            closed += s.recv(1) == b""
        assert closed == len(idle)
    finally:
        for s in idle:
            s.close()
    assert scrape(url)["walsvc_committed_lsn"] == 1


def test_metrics_serves_its_one_path_and_404_elsewhere(tmp_path: Path, writers) -> None:
    """Before, every path answered 200 with the metrics, so a scrape config with a typo never failed."""
    _, _, _, url = metrics_writer(tmp_path, writers)
    assert "walsvc_committed_lsn" in scrape(url)
    base = url.rsplit("/", 1)[0]
    for path in ("/", "/metric", "/metrics/x", "/nonexistent"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(base + path, timeout=10)
        assert caught.value.code == 404, path
