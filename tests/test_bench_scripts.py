"""Every standalone benchmark script runs to the end with tiny arguments and prints its figures.

Nothing here is timed: the scripts measure, these runs only show they still work (benchmarks/groups.py had
stopped working when the producer helper it shares with benchmarks/producers.py began returning CPU time
too, and nothing ran it).  limits.py, latency_hops.py and latency_parts.py are run by test_bench_targets.py,
the suite by test_bench_quick.py.  mirror.py needs nats-server, which .ci/run installs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RUNS = [
    ("codec.py", ["--records", "256"], "ns/record"),
    ("engine.py", ["--seconds", "0.3", "--runs", "1", "--rows", "20000"], "records/s"),
    ("groups.py", ["--seconds", "1", "--producers", "2", "--consumers", "2"], "records/s processed"),
    ("large_log.py", ["--gib", "0.02", "--runs", "1"], "median open"),
    ("producers.py", ["--seconds", "0.5", "--producers", "2"], "acked records/s"),
    ("replay.py", ["--mib", "2", "--runs", "1", "--sizes", "100"], "walsvc rec/s"),
    ("rotation.py", ["--segment-mib", "1", "--rotations", "2", "--runs", "1"], "rotating p50"),
    ("roundtrip.py", ["--seconds", "0.5"], "per round trip"),
    ("validation.py", ["--repeat", "1"], "ingest receive"),
    ("mirror.py", ["--records", "2000", "--no-lag"], '"mirror packed"'),
]


@pytest.mark.parametrize("script,args,expect", RUNS, ids=[r[0] for r in RUNS])
def test_benchmark_script_runs(script: str, args: list[str], expect: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}: {proc.stderr[-2000:]}"
    assert expect in proc.stdout, f"{script} printed no {expect!r}: {proc.stdout[-2000:]}"
