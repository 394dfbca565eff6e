"""Entry point: python benchmarks/run.py [--quick] [--out DIR] [--runs N] [--only SYSTEM,...] [--scenarios TEXT,...]

Runs every scenario on every available system (interleaved run by run), printing one line per step, then
writes report.md and report.json into --out.  Scratch data (Redis AOFs, SQLite files, walsvc segments) goes into
a temporary folder inside --out, so the figures are for the filesystem the report names; it is deleted at the
end.  Exits 1 if any step failed or a walsvc latency run was flagged as a stall (p99 over 10x the median run's; the
report still shows the rest), 2 on a bad command line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from . import harness, machine, report


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true",
                        help="1 run per step, ~1 s durations and small logs: a smoke test of the suite (< 60 s)")
    parser.add_argument("--out", default="bench-results", help="folder for report.md/report.json and scratch data")
    parser.add_argument("--runs", type=int, help="runs per (system, scenario); default 3, or 1 with --quick")
    parser.add_argument("--only", help="comma-separated systems to run, e.g. redis,sqlite (default: all available)")
    parser.add_argument("--scenarios", help="comma-separated substrings; run scenarios whose name contains one")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    runs = args.runs or (1 if args.quick else 3)
    systems = harness.load_systems()
    only = _split(args.only)
    if only:
        known = {s.name: s for s in systems}
        for name in only:
            if name not in known:
                print(f"unknown or missing system {name!r}; have: {', '.join(known)}", file=sys.stderr)
                return 2
            if known[name].unavailable:
                print(f"{name} cannot run: {known[name].unavailable}", file=sys.stderr)
                return 2
        systems = [s for s in systems if s.name in only]
    for entry in systems:
        if entry.unavailable:
            print(f"skipping {entry.name}: {entry.unavailable}")
    try:
        suite = harness.select_scenarios(harness.scenarios(args.quick), _split(args.scenarios))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    args.out = os.path.abspath(args.out)  # peers run in their own working directories (redis-server's log)
    os.makedirs(args.out, exist_ok=True)
    facts = machine.describe(args.out)
    scratch = tempfile.mkdtemp(prefix="scratch-", dir=args.out)
    try:
        result = harness.run_suite(systems, suite, runs, args.quick, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    facts["load_average_after"] = machine.load_average()
    json_path, md_path = report.write(result, facts, args.out)
    print(f"wrote {md_path} and {json_path} ({result.elapsed_s:,.0f} s)")
    stolen = {(scenario, system, run): cores for scenario, system, run, cores in result.contended(facts["cores"])}
    for (scenario, system, run), cores in stolen.items():
        print(f"CONTENDED: {system} {scenario} run {run}: {cores:.2f} of {facts['cores']} cores stolen by the "
              "hypervisor during the run", file=sys.stderr)
    flagged = result.flagged()
    for scenario, system, run, p99 in flagged:
        during = stolen.get((scenario, system, run))
        print(f"FLAGGED: {system} {scenario} run {run}: p99 {p99:,.0f} us is over "
              f"{harness.OUTLIER_FACTOR:g}x the median run's"
              + (f" ({during:.2f} cores stolen during it)" if during is not None else ""), file=sys.stderr)
    return 1 if result.failed or any(system == harness.SUBJECT for _s, system, _r, _p in flagged) else 0


if __name__ == "__main__":
    sys.exit(main())
