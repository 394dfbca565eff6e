"""The benchmark suite runs end to end in --quick mode and reports a positive figure for every peer scenario.

Runs as a subprocess (like a user would) so the figures come from the real entry point.  Only the peers the
suite itself finds usable run (redis needs redis-server and redis-py); walsvc is left to its own tests.  The
quick suite takes ~30 s on the 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


PEERS_AVAILABLE = ("from benchmarks.suite import harness; print(','.join(s.name for s in harness.load_systems() "
                   "if s.unavailable is None and s.name != harness.SUBJECT))")


def test_quick_suite_reports_every_peer_scenario(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    found = subprocess.run([sys.executable, "-c", PEERS_AVAILABLE], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout.split()[-1]
    peers = found.split(",")
    assert "sqlite" in peers  # always there: stdlib
    proc = subprocess.run([sys.executable, "-m", "benchmarks.suite.run", "--quick", "--out", str(tmp_path),
                           "--only", ",".join(peers)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    report = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "report.md").read_text().startswith("# walsvc benchmark results")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("scratch-")], "scratch data left behind"
    assert report["config"]["quick"] is True
    assert report["machine"]["cores"] >= 1 and report["machine"]["filesystem"]
    scenarios = {s["name"]: s for s in report["scenarios"]}
    kinds = {s["kind"] for s in scenarios.values()}
    assert kinds == {"throughput", "latency", "rotation", "replay", "recovery"}
    for name, scenario in scenarios.items():
        for peer in peers:
            cell = scenario["systems"][peer]
            assert not cell["errors"], (name, peer, cell["errors"])
            if scenario["kind"] in ("recovery", "rotation"):  # only walsvc provides them
                assert cell["na"], (name, peer)
                continue
            if "server_cpu" in scenario["params"] and (peer == "sqlite" or len(os.sched_getaffinity(0)) < 2):
                # the pinned scenario places a server process: SQLite has none, and one CPU leaves no room
                assert cell["na"] and ("no server process" in cell["na"] or "another CPU" in cell["na"]), (name, peer)
                continue
            assert cell["median"] > 0, (name, peer)
            run = cell["runs"][0]
            # Busy and stolen CPU come from /proc/stat's 10 ms ticks: a light 1 s run can read 0 of either.
            assert all(value > 0 for key, value in run.items() if key not in ("cpu_cores", "steal_cores")), (
                name, peer, run)
            assert 0 <= run["steal_cores"] <= os.cpu_count(), (name, peer, run)  # every run says what was stolen
            if scenario["kind"] == "latency":
                assert run["p50_us"] <= run["p99_us"] <= run["p999_us"]
                assert 0 <= run["cpu_cores"] <= os.cpu_count() and 0 <= run["steal_cores"] <= os.cpu_count(), run
                sent = scenario["params"]["rate"] * scenario["params"]["seconds"]
                assert run["samples"] >= 0.9 * sent, (name, peer, run)  # the reader saw (nearly) every record


def test_the_redis_paced_producer_counts_every_reply_and_stops_at_an_error() -> None:
    """The pipelined XADD producer's reply reader, over a real socket pair: replies split anywhere across
    reads are all counted, and an error reply is reported, not counted."""
    import socket
    import threading

    from benchmarks.suite.redis_streams import _count_replies

    replies = b"$15\r\n1700000000000-0\r\n$15\r\n1700000000000-1\r\n$1\r\nx\r\n"
    for cut in range(len(replies)):
        a, b = socket.socketpair()
        failures: list[str] = []
        reader = threading.Thread(target=_count_replies, args=(b, 3, failures))
        reader.start()
        a.sendall(replies[:cut])
        a.sendall(replies[cut:])
        reader.join(5)
        assert not reader.is_alive() and failures == [], (cut, failures)
        a.close()
        b.close()
    a, b = socket.socketpair()
    failures = []
    a.sendall(b"$1\r\nx\r\n-ERR wrong number of arguments\r\n")
    _count_replies(b, 3, failures)
    assert failures == ["-ERR wrong number of arguments"]
    a.close()
    _count_replies(b, 1, failures)
    assert failures[-1] == "connection closed with 1 replies missing"
    b.close()
