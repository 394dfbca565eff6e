"""The benchmark suite's judgement: targets met or missed against the right peer, stalled runs flagged.

Pure: results are built by hand, nothing is run.  Plus one run of benchmarks/limits.py in its quick form, every
section, and one of benchmarks/latency_parts.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.suite import harness
from benchmarks.suite.harness import Cell, Scenario, SuiteResult, SystemEntry, Target
from benchmarks.suite.report import to_json, to_markdown

ROOT = Path(__file__).resolve().parent.parent


def _result(scenario: Scenario, figures: dict[str, list[dict[str, float]]]) -> SuiteResult:
    systems = [SystemEntry(name, None, None) for name in figures]
    cells = {(scenario.name, name): Cell(runs=runs) for name, runs in figures.items()}
    return SuiteResult([scenario], systems, cells, runs=3, quick=False, elapsed_s=1.0)


def test_ratio_targets_judge_higher_and_lower_is_better_figures() -> None:
    scenario = Scenario("s", "throughput", {}, "records_per_s", True, "rec/s",
                        targets=(Target("records_per_s", 1.5, "redis"), Target("cpu_s_per_million", 1.0, "redis"),
                                 Target("records_per_s", 2.0, "sqlite")))
    result = _result(scenario, {
        "walsvc": [{"records_per_s": 3000.0, "cpu_s_per_million": 100.0}],
        "redis": [{"records_per_s": 1800.0, "cpu_s_per_million": 150.0}],
        "sqlite": [{"records_per_s": 2000.0, "cpu_s_per_million": 50.0}]})
    judged = [(t.describe(), round(figure, 3), met) for t, figure, met in result.target_results(scenario)]
    assert judged == [("rec/s >= 1.5x redis", 1.667, True), ("CPU s/M rec <= redis", 1.5, True),
                      ("rec/s >= 2x sqlite", 1.5, False)]


def test_bound_targets_and_a_missing_peer() -> None:
    scenario = Scenario("latency", "latency", {}, "p99_us", False, "us p99",
                        targets=(Target("p999_us", 5000.0, at_most=True), Target("p50_us", 1.0, "redis")))
    result = _result(scenario, {"walsvc": [{"p50_us": 300.0, "p99_us": 900.0, "p999_us": 6000.0}]})
    judged = [(figure, met) for _t, figure, met in result.target_results(scenario)]
    assert judged == [(6000.0, False), (None, None)]
    markdown = to_markdown(result, {"date": "today"})
    assert "| latency | us p99.9 <= 5,000 | 6,000, MISSED |" in markdown
    assert "| latency | us p50 <= redis | not measured |" in markdown


def test_a_peer_that_sent_below_the_rate_is_named_beside_the_verdict() -> None:
    """A paced scenario compares latencies at the rate asked: a system whose producer could not keep up was
    measured at a lighter load, and the report says so next to every target judged against it."""
    scenario = Scenario("latency 10k/s os", "latency", {"rate": 10_000}, "p99_us", False, "us p99",
                        targets=(Target("p50_us", 1.0, "redis"), Target("p999_us", 5000.0, at_most=True)))
    result = _result(scenario, {
        "walsvc": [{"p50_us": 330.0, "p99_us": 1500.0, "p999_us": 4000.0, "sent_per_s": 10_000.0}] * 3,
        "redis": [{"p50_us": 240.0, "p99_us": 700.0, "p999_us": 3500.0, "sent_per_s": v} for v in (6300, 6700, 7500)]})
    assert result.below_rate(scenario, "redis") == 6700 and result.below_rate(scenario, "walsvc") is None
    markdown = to_markdown(result, {"date": "today"})
    assert ("| latency 10k/s os | us p50 <= redis | 0.73x, MISSED (redis sent 6,700 of 10,000/s: measured at a "
            "lighter load than asked) |") in markdown
    assert "| latency 10k/s os | us p99.9 <= 5,000 | 4,000, met |" in markdown
    assert to_json(result, {})["scenarios"][0]["below_rate"] == {"redis": 6700}


def test_a_stalled_latency_run_is_flagged_and_noise_is_not() -> None:
    scenario = Scenario("latency 10k/s os", "latency", {}, "p99_us", False, "us p99")
    runs = [{"p99_us": v, "p50_us": 1.0, "p999_us": v} for v in (1300.0, 1400.0, 4_550_000.0, 2500.0)]
    result = _result(scenario, {"walsvc": runs, "redis": runs[:2]})
    assert result.flagged() == [("latency 10k/s os", "walsvc", 3, 4_550_000.0)]
    assert to_json(result, {})["flagged"] == [{"scenario": "latency 10k/s os", "system": "walsvc", "run": 3,
                                               "p99_us": 4_550_000.0}]
    assert "walsvc latency 10k/s os run 3: p99 4,550,000 us" in to_markdown(result, {"date": "today"})


def test_runs_on_a_contended_vm_are_noted_with_their_stolen_cores() -> None:
    """A latency run during which the hypervisor took 5 % or more of the machine's CPUs is listed (report.json,
    report.md), and a run with less, or with no stolen figure at all (an older report), is not."""
    scenario = Scenario("latency 10k/s os", "latency", {}, "p99_us", False, "us p99")
    runs = [{"p99_us": 900.0, "p50_us": 300.0, "p999_us": 2000.0, "steal_cores": v} for v in (0.02, 0.1, 0.59)]
    result = _result(scenario, {"walsvc": runs, "redis": [{"p99_us": 800.0, "p50_us": 1.0, "p999_us": 900.0}]})
    assert result.contended(2) == [("latency 10k/s os", "walsvc", 2, 0.1), ("latency 10k/s os", "walsvc", 3, 0.59)]
    assert result.contended(4) == [("latency 10k/s os", "walsvc", 3, 0.59)]
    assert result.contended(None) == []
    assert to_json(result, {"cores": 2})["contended"][1] == {"scenario": "latency 10k/s os", "system": "walsvc",
                                                             "run": 3, "steal_cores": 0.59}
    markdown = to_markdown(result, {"date": "today", "cores": 2})
    assert "## Runs on a contended VM" in markdown
    assert "- walsvc latency 10k/s os run 3: 0.59 cores stolen" in markdown
    assert "## Runs on a contended VM" not in to_markdown(result, {"date": "today", "cores": 64})
    throughput = Scenario("throughput 4p 1KiB always x1", "throughput", {}, "records_per_s", True, "rec/s")
    result = _result(throughput, {"walsvc": [{"records_per_s": 5000.0, "steal_cores": 0.2}],
                                  "redis": [{"records_per_s": 6000.0, "steal_cores": 0.0}]})
    assert result.contended(2) == [("throughput 4p 1KiB always x1", "walsvc", 1, 0.2)]  # every kind, not only latency


def test_targets_are_judged_again_on_the_uncontended_runs_alone() -> None:
    """When the hypervisor slowed some runs, the medians of all runs can favour whichever system it slowed
    less: each verdict is followed by the one on the uncontended runs alone, with how many each system had."""
    scenario = Scenario("latency 10k/s os", "latency", {}, "p99_us", False, "us p99",
                        targets=(Target("p50_us", 1.0, "redis"), Target("p999_us", 5000.0, at_most=True)))

    def run(p50: float, stolen: float) -> dict[str, float]:
        return {"p50_us": p50, "p99_us": 3 * p50, "p999_us": 6 * p50, "steal_cores": stolen}

    result = _result(scenario, {"walsvc": [run(300, 0.0), run(320, 0.0), run(2000, 0.4)],
                                "redis": [run(250, 0.0), run(1600, 0.5), run(1700, 0.3)]})
    machine = {"date": "today", "cores": 2}
    markdown = to_markdown(result, machine)
    assert ("| latency 10k/s os | us p50 <= redis | 5.00x, met; uncontended runs only (walsvc 2, redis 1): "
            "0.81x, MISSED |") in markdown
    assert ("| latency 10k/s os | us p99.9 <= 5,000 | 1,920, met; uncontended runs only (walsvc 2): 1,860, met |"
            in markdown)
    targets = to_json(result, machine)["scenarios"][0]["targets"]
    assert targets[0]["met"] is True and targets[0]["uncontended"]["met"] is False
    assert round(targets[0]["uncontended"]["figure"], 2) == 0.81
    assert "uncontended" not in to_json(result, {"cores": 64})["scenarios"][0]["targets"][0]  # none contended
    assert "uncontended runs only" not in to_markdown(result, {"date": "today", "cores": 64})


def test_every_issue_target_names_a_scenario_of_the_suite() -> None:
    names = {s.name for s in harness.scenarios()}
    assert set(harness.TARGETS) <= names


def _check_latency_line(label: str, line: str, records: int) -> None:
    """A latency line of the scripts: ordered positive percentiles, and exactly `records` samples (all sent
    but the first 5 %, dropped as warm-up: none lost)."""
    found = re.fullmatch(rf"{re.escape(label)}: p50 ([\d,]+) us, p99 ([\d,]+) us, p99.9 ([\d,]+) us "
                         r"\(([\d,]+) records, sent [\d,]+/s\)", line)
    assert found, line
    p50, p99, p999, got = (int(g.replace(",", "")) for g in found.groups())
    assert 0 < p50 <= p99 <= p999, line
    assert got == records, line


def test_machine_cpu_counts_busy_ticks_and_cores_average_them() -> None:
    """`cpu_cores` turns two /proc/stat readings into cores: busy ticks over all ticks, times the CPUs; a
    process spinning for half a second shows as busy time between two real readings."""
    from benchmarks.suite.harness import cpu_cores, machine_cpu

    assert cpu_cores((100, 0, 1000, 2), (250, 10, 1200, 2)) == {"cpu_cores": 1.5, "steal_cores": 0.1}
    assert cpu_cores((100, 0, 1000, 4), (100, 0, 1000, 4)) == {}  # no tick between them: no figure
    before = machine_cpu()
    assert before[3] >= 1 and 0 <= before[0] <= before[2] and 0 <= before[1] <= before[2]
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        pass
    figures = cpu_cores(before, machine_cpu())
    assert 0.3 <= figures["cpu_cores"] <= before[3], figures  # this process alone kept about one CPU busy
    assert 0 <= figures["steal_cores"] <= before[3], figures


def test_limits_script_prints_the_bounds(tmp_path: Path) -> None:
    """The one-in-flight bound, then the skeleton's rate, CPU and wake-ups per record (every transport, each
    producer count) and its append-to-reader latency, with every record of the latency run read back."""
    proc = subprocess.run([sys.executable, "benchmarks/limits.py", "--quick", "--dir", str(tmp_path),
                           "--architecture", "--producers", "1,2", "--latency"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fdatasync after a 1024 B append: p50 ")
    assert lines[1].startswith("one-way ZeroMQ ipc hop")
    rate = int(lines[2].split(" us, ")[1].split(" rec/s")[0].replace(",", ""))
    assert rate > 0
    shapes = []
    for line in lines[3:7]:
        found = re.fullmatch(r"architecture (\w+) (\d+)p always x1: ([\d,]+) rec/s; per record CPU us server "
                             r"([\d.]+) \+ producers ([\d.]+) = [\d.]+; wake-ups server ([\d.]+), producers "
                             r"([\d.]+)", line)
        assert found, line
        shapes.append((found[1], int(found[2])))
        assert int(found[3].replace(",", "")) > 0 and float(found[4]) > 0 and float(found[5]) > 0, line
    assert shapes == [("zmq", 1), ("unix", 1), ("zmq", 2), ("unix", 2)]
    assert len(lines) == 12, lines
    for transport, line in zip(("zmq", "zmq+inotify", "zmq+inotify+acks", "unix", "unix+acks"), lines[7:12]):
        _check_latency_line(f"latency {transport} 10,000/s os", line, 1_900)
    assert not list(tmp_path.iterdir()), "scratch files left behind"


def test_latency_parts_script_runs_both_producers(tmp_path: Path) -> None:
    """benchmarks/latency_parts.py --quick: one run with walsvc.Producer and one with the wire-protocol
    producer against a real writer and reader, every record read back, then the medians."""
    proc = subprocess.run([sys.executable, "benchmarks/latency_parts.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4, lines
    for kind, line in zip(("walsvc.Producer", "wire protocol"), lines[:2]):
        _check_latency_line(kind, line, 9_500)
    assert lines[2].startswith("median of 1, walsvc.Producer: p50 ")
    assert lines[3].startswith("median of 1, wire protocol: p50 ")


def test_latency_hops_script_times_every_hop_of_every_record() -> None:
    """benchmarks/latency_hops.py --quick (the writer on its own CPU where there are two): every record read
    back and matched to its batch in the writer, each hop's percentiles in order."""
    pin = ["--pin", "writer"] if 0 in os.sched_getaffinity(0) and len(os.sched_getaffinity(0)) > 1 else []
    proc = subprocess.run([sys.executable, "benchmarks/latency_hops.py", "--quick", *pin], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 9, lines
    assert re.match(r"9,500 records \([\d,]+/s sent\) in [\d,]+ batches; ", lines[0]), lines[0]
    for name, line in zip(("put returned", "reached the writer", "writer's handling", "writer to reader",
                           "append to reader"), lines[1:6]):
        # writer to reader may be below 0: HEAD's update, which wakes the reader, is not the batch's last step
        found = re.fullmatch(rf"  {re.escape(name)} +(-?[\d,]+) / +(-?[\d,]+) / +(-?[\d,]+)", line)
        assert found, line
        p50, p90, p99 = (int(g.replace(",", "")) for g in found.groups())
        assert p50 <= p90 <= p99, line
    found = re.fullmatch(r"  (append to reader of the records sent alone ([\d,]+) / ([\d,]+) / ([\d,]+)"
                         r"|no record was sent alone); (\d+)% of records shared a batch "
                         r"\(held while the producer's pipeline was full\)",
                         lines[6])
    assert found, lines[6]
    if found[2] is not None:
        p50, p90, p99 = (int(g.replace(",", "")) for g in found.groups()[1:4])
        assert p50 <= p90 <= p99, lines[6]
        assert int(found[5]) < 100, lines[6]
    else:
        assert found[5] == "100", lines[6]
    assert re.fullmatch(r"  writer idle between batches [\d,]+ / [\d,]+ / [\d,]+; [\d.]+ batches per loop turn",
                        lines[7]), lines[7]
    found = re.fullmatch(r"  CPU µs per record: producer ([\d.]+), writer ([\d.]+), reader ([\d.]+)", lines[8])
    assert found and all(float(g) > 0 for g in found.groups()), lines[8]


def test_bound_scripts_refuse_a_missing_folder(tmp_path: Path) -> None:
    """limits.py and roundtrip.py name a --dir that is not a folder, before measuring anything."""
    missing = tmp_path / "absent"
    for script, extra in (("limits.py", []), ("roundtrip.py", []), ("roundtrip.py", ["--producers", "0"])):
        args = extra or ["--dir", str(missing)]
        proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, (script, proc.stdout, proc.stderr)
        assert (f"--dir {missing}: no such folder" if not extra else "must be positive") in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not missing.exists()
