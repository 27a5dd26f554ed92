"""Summarizes perf/loop_probe's output over the seconds a benchmark's tasks fell due.

    .venv/bin/python perf/loop_probe_report.py PREFIX REPORT.json [--top 15]

PREFIX is the probe's TASKWHEEL_LOOP_PROBE; of its files the one with the most callbacks is
taken (the server's). REPORT.json is perf/run_bench.py's report of the same run: its
lateness-by-due-second timeline gives the window. Prints the loop's busy time per second, the
slow callbacks by name, the longest ones by CPU, and the store's calls by thread and function:
how many, their items (a call's batch: p10, median, p90, max), and the CPU they took an item.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prefix")
    ap.add_argument("report")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    probes = [json.load(open(path)) for path in glob.glob(f"{args.prefix}.*.json")]
    if not probes:
        raise SystemExit(f"no probe files {args.prefix}.<pid>.json")
    probe = max(probes, key=lambda p: sum(n for _, n in p["callbacks"]))
    report = json.load(open(args.report))
    timeline = report["timeline"]
    due = [i for i, p99 in enumerate(timeline["lateness_ms_by_due_second"]["p99"]) if p99 is not None]
    start_ms = report["run"]["t0_ms"] + due[0] * timeline["bin_s"] * 1000
    end_ms = report["run"]["horizon_ms"]
    busy = dict(probe["busy_ms"])
    count = dict(probe["callbacks"])
    print("second  loop busy  callbacks")
    for second in range(int(start_ms // 1000), int(end_ms // 1000) + 1):
        print(f"{second - int(start_ms // 1000):6d}  {busy.get(second, 0.0):6.0f} ms  {count.get(second, 0):9d}")
    slow = [s for s in probe["slow"] if start_ms <= s[0] <= end_ms]
    by_name: dict[str, list] = collections.defaultdict(list)
    for _, wall, cpu, name in slow:
        by_name[name].append((wall, cpu))
    print("\ncallbacks of 1 ms or more while tasks fell due: count, wall ms, CPU ms (sum, max)")
    for name, runs in sorted(by_name.items(), key=lambda kv: -sum(w for w, _ in kv[1])):
        print(f"  {name[:60]:60s} {len(runs):5d} {sum(w for w, _ in runs):7.0f} {sum(c for _, c in runs):7.0f}"
              f" {max(w for w, _ in runs):6.1f} {max(c for _, c in runs):6.1f}")
    print("\nlongest by CPU (seconds into the window, wall ms, CPU ms, name):")
    for end, wall, cpu, name in sorted(slow, key=lambda s: -s[2])[:args.top]:
        print(f"  {(end - start_ms) / 1000:6.2f} {wall:7.2f} {cpu:7.2f}  {name[:70]}")
    calls = [c for c in probe.get("store", []) if start_ms <= c[0] <= end_ms]
    if calls:
        print("\nthe store's calls while tasks fell due:")
        for line in store_summary(calls, (end_ms - start_ms) / 1000):
            print("  " + line)


def store_summary(calls: list, seconds: float) -> list[str]:
    """One line per (thread, function) of the probe's store calls: [end ms, thread, function,
    items, wall ms, CPU ms] each. Calls that name no items count in calls and CPU only."""
    by_fn: dict[tuple[str, str], list] = collections.defaultdict(list)
    for _, thread, name, items, wall, cpu in calls:
        by_fn[(thread, name)].append((items, wall, cpu))
    lines = [f"{'thread':22s} {'function':18s} {'calls':>6s} {'items':>8s} "
             f"{'batch p10/med/p90/max':>22s} {'wall s':>7s} {'CPU s':>6s} {'cores':>5s} {'CPU/item':>9s}"]
    for (thread, name), runs in sorted(by_fn.items(), key=lambda kv: -sum(c for _, _, c in kv[1])):
        sizes = sorted(i for i, _, _ in runs if i is not None)
        items = sum(sizes)
        cpu_ms = sum(c for _, _, c in runs)
        batch = (f"{sizes[len(sizes) // 10]}/{statistics.median(sizes):.0f}/"
                 f"{sizes[len(sizes) * 9 // 10]}/{sizes[-1]}") if sizes else "-"
        per_item = f"{cpu_ms * 1000 / items:.2f} us" if items else "-"
        lines.append(f"{thread[:22]:22s} {name[:18]:18s} {len(runs):6d} {items:8d} {batch:>22s} "
                     f"{sum(w for _, w, _ in runs) / 1000:7.2f} {cpu_ms / 1000:6.2f} "
                     f"{cpu_ms / 1000 / seconds:5.2f} {per_item:>9s}")
    return lines


if __name__ == "__main__":
    main()
