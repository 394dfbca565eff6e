"""Write a suite's results as report.json (every run, for tools) and report.md (tables, for people).

The Markdown has the machine first, then (when walsvc ran) a summary of walsvc against the best peer, then one
table per scenario: system | median | min | max | ratio | other figures.  The ratio is walsvc's median over
the best peer's, inverted for lower-is-better metrics, so above 1 always means walsvc did better.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .harness import OUTLIER_FACTOR, STOLEN_SHARE, SUBJECT, Scenario, SuiteResult, Target, format_value, other_figures

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def to_json(result: SuiteResult, machine: dict[str, Any]) -> dict[str, Any]:
    """Everything, including each run's raw dict, so later analysis need not rerun anything."""
    scenarios = []
    for scenario in result.scenarios:
        ratio, best_peer = result.ratio(scenario)
        systems = {}
        for entry in result.systems:
            cell = result.cells.get((scenario.name, entry.name))
            if cell is None:
                continue
            systems[entry.name] = {**(cell.stats(scenario.metric) or {}), "runs": cell.runs, "na": cell.na,
                                   "errors": cell.errors}
        targets = [{"target": t.describe(), "figure": figure, "met": met}
                   for t, figure, met in result.target_results(scenario)]
        _calm, calm_results = _uncontended(result, scenario, machine)
        for entry, (_t, figure, met) in zip(targets, calm_results):
            entry["uncontended"] = {"figure": figure, "met": met}
        scenarios.append({"name": scenario.name, "kind": scenario.kind, "params": scenario.params,
                          "metric": scenario.metric, "unit": scenario.unit,
                          "higher_is_better": scenario.higher_is_better, "ratio": ratio, "best_peer": best_peer,
                          "targets": targets, "systems": systems,
                          "below_rate": {name: sent for name in systems
                                         if (sent := result.below_rate(scenario, name)) is not None}})
    return {"machine": machine,
            "config": {"quick": result.quick, "runs": result.runs, "elapsed_s": round(result.elapsed_s, 1)},
            "systems": {e.name: e.unavailable for e in result.systems},
            "flagged": [{"scenario": sc, "system": sy, "run": run, "p99_us": p99}
                        for sc, sy, run, p99 in result.flagged()],
            "contended": [{"scenario": sc, "system": sy, "run": run, "steal_cores": stolen}
                          for sc, sy, run, stolen in result.contended(machine.get("cores"))],
            "scenarios": scenarios}


def _cell_text(text: str) -> str:
    """A failure fit for one table cell: a worker traceback's last line (the exception), no pipes."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first, last = lines[0], lines[-1]
    short = first if first == last else f"{first.split(':', 1)[0]}: {last}"  # "run 2: ...Error: why"
    return short[:300].replace("|", "\\|")


def _params(scenario: Scenario) -> str:
    return ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in scenario.params.items())


def _uncontended(result: SuiteResult, scenario: Scenario,
                 machine: dict[str, Any]) -> tuple[SuiteResult | None, list[tuple[Target, float | None, bool | None]]]:
    """When some of `scenario`'s runs were contended (SuiteResult.contended): the result without them, and the
    scenario's targets judged on it; else (None, [])."""
    cores = machine.get("cores")
    if not any(name == scenario.name for name, *_ in result.contended(cores)):
        return None, []
    calm = result.uncontended(cores)
    return calm, calm.target_results(scenario) if calm else []


def _targets(result: SuiteResult, scenario: Scenario, machine: dict[str, Any]) -> list[tuple[Target, str]]:
    """Each target of `scenario` with its verdict text.  When some of the scenario's runs were contended, the
    verdict on the others alone follows: the medians of all runs can swing with whichever system the
    hypervisor happened to slow."""
    calm, calm_results = _uncontended(result, scenario, machine)
    out = []
    for i, (target, figure, met) in enumerate(result.target_results(scenario)):
        text = _target_text(target, figure, met, result, scenario)
        if calm:
            _t, calm_figure, calm_met = calm_results[i]
            runs = ", ".join(f"{name} {len(cell.runs)}" for (sname, name), cell in calm.cells.items()
                             if sname == scenario.name and name in (SUBJECT, target.peer))
            text += (f"; uncontended runs only ({runs}): "
                     + (_target_text(target, calm_figure, calm_met, calm, scenario) if calm_figure is not None
                        else "not measured"))
        out.append((target, text))
    return out


def _scenario_table(result: SuiteResult, scenario: Scenario, machine: dict[str, Any]) -> list[str]:
    ratio, best_peer = result.ratio(scenario)
    better = "higher" if scenario.higher_is_better else "lower"
    lines = [f"### {scenario.name}", "",
             f"{scenario.metric} ({scenario.unit}, {better} is better); {_params(scenario)}", "",
             "| system | median | min | max | ratio | other medians |", "|---|---:|---:|---:|---:|---|"]
    for entry in result.systems:
        cell = result.cells.get((scenario.name, entry.name))
        if cell is None:
            continue
        stats = cell.stats(scenario.metric)
        if stats is None:
            why = cell.na or "; ".join(_cell_text(e) for e in cell.errors) or "no result"
            lines.append(f"| {entry.name} | n/a | | | | {why} |")
            continue
        fmt = [format_value(stats[k], scenario.unit) for k in ("median", "min", "max")]
        shown = f"{ratio:.2f}x vs {best_peer}" if entry.name == SUBJECT and ratio is not None else ""
        notes = other_figures(scenario, stats["medians"])
        if cell.errors:
            notes += f"; {len(cell.errors)} failed run(s): {'; '.join(_cell_text(e) for e in cell.errors)}"
        lines.append(f"| {entry.name} | {fmt[0]} | {fmt[1]} | {fmt[2]} | {shown} | {notes} |")
    lines.append("")
    lines += [f"- target {target.describe()}: {text}" for target, text in _targets(result, scenario, machine)]
    return lines + ([""] if scenario.targets else [])


def _target_text(target: Target, figure: float | None, met: bool | None, result: SuiteResult,
                 scenario: Scenario) -> str:
    if figure is None:
        return "not measured"
    shown = f"{figure:.2f}x" if target.peer else format_value(figure, target.metric)
    text = f"{shown}, {'met' if met else 'MISSED'}"
    for system in (SUBJECT, target.peer) if target.peer else (SUBJECT,):
        sent = result.below_rate(scenario, system)
        if sent is not None:
            text += (f" ({system} sent {sent:,.0f} of {scenario.params['rate']:,}/s: measured at a lighter load "
                     "than asked)")
    return text


def _median(result: SuiteResult, scenario: Scenario, system: str | None) -> float | None:
    cell = result.cells.get((scenario.name, system)) if system else None
    stats = cell.stats(scenario.metric) if cell else None
    return stats["median"] if stats else None


def to_markdown(result: SuiteResult, machine: dict[str, Any]) -> str:
    mode = "quick (1 short run each: a smoke test, not a measurement)" if result.quick else f"{result.runs} runs each"
    lines = ["# walsvc benchmark results", "",
             f"{machine['date']}, {mode}, {result.elapsed_s:,.0f} s in all. "
             "Shared, noisy machine: compare figures side by side within one report, not across reports.", "",
             "## Machine", "", "| what | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine.items()]
    lines += ["", "## Systems", ""]
    lines += [f"- {e.name}: {'ran' if e.unavailable is None else 'skipped: ' + e.unavailable}" for e in result.systems]
    if all(e.name != SUBJECT for e in result.systems):
        lines.append(f"- {SUBJECT}: not benchmarked (benchmarks.suite.walsvc_system does not exist yet)")
    lines.append("")
    summary = [(s, *result.ratio(s)) for s in result.scenarios]
    if any(r is not None for _s, r, _b in summary):
        lines += ["## walsvc against the best peer", "",
                  "Medians; ratio above 1 means walsvc did better (for latency: best peer / walsvc).", "",
                  "| scenario | walsvc | best peer | ratio |", "|---|---:|---:|---:|"]
        for scenario, ratio, best in summary:
            mine = _median(result, scenario, SUBJECT)
            theirs = _median(result, scenario, best)
            cell = result.cells.get((scenario.name, SUBJECT))
            mine_text = (format_value(mine, scenario.unit) if mine is not None
                         else "failed" if cell and cell.errors else "n/a")
            theirs_text = f"{format_value(theirs, scenario.unit)} ({best})" if theirs is not None else "n/a"
            ratio_text = f"{ratio:.2f}x" if ratio is not None else ""
            lines.append(f"| {scenario.name} | {mine_text} | {theirs_text} | {ratio_text} |")
        lines.append("")
    flagged = result.flagged()
    if flagged:
        lines += ["## Flagged runs", "",
                  f"Latency runs whose p99 is over {OUTLIER_FACTOR:g}x the median run's: a stall, not noise.", ""]
        lines += [f"- {system} {scenario} run {run}: p99 {p99:,.0f} us" for scenario, system, run, p99 in flagged]
        lines.append("")
    contended = result.contended(machine.get("cores"))
    if contended:
        lines += ["## Runs on a contended VM", "",
                  f"Runs during which the hypervisor took at least {STOLEN_SHARE:.0%} of the machine's "
                  f"{machine['cores']} CPUs (stolen time): they measured the VM as much as the system, so compare "
                  "them with care.", ""]
        lines += [f"- {system} {scenario} run {run}: {stolen:.2f} cores stolen"
                  for scenario, system, run, stolen in contended]
        lines.append("")
    targets = [(s, *t) for s in result.scenarios for t in _targets(result, s, machine)]
    if targets:
        lines += ["## Targets", "", "| scenario | target | figure |", "|---|---|---|"]
        lines += [f"| {s.name} | {t.describe()} | {text} |" for s, t, text in targets]
        lines.append("")
    lines += ["## Scenarios", ""]
    for scenario in result.scenarios:
        lines += _scenario_table(result, scenario, machine)
    return "\n".join(lines)


def write(result: SuiteResult, machine: dict[str, Any], out_dir: str) -> tuple[str, str]:
    """Write both files into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, REPORT_JSON), os.path.join(out_dir, REPORT_MD)
    with open(json_path, "w") as f:
        json.dump(to_json(result, machine), f, indent=2)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(to_markdown(result, machine))
        f.write("\n")
    return json_path, md_path
